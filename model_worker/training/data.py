"""From traces to token batches: the tokenizer, tokenized examples, and shared-prefix batches.

A training sequence is a step's chat-rendered prompt (as the model worker encodes it, ending with the
generation prompt) followed by its action's tokens and EOS, with loss on every assistant turn in it that
was taken in the same context: each step retrieves memories into the system message afresh, and a later
step can show memories an earlier one did not (the fact it just wrote, say), so an earlier action is
labelled only in a sequence whose system message equals the one that step saw. Otherwise a model learns to
copy its `memory_write` text from a memory block that, when it really writes it, does not hold it yet.
`step_sequences` picks the fewest sequences that label every step so. A batch's shared prefix is the
longest run of tokens every one of its sequences starts with.

`short_form` drops the fixed part of the system message (instructions, reply format, tool schemas),
keeping the retrieved memories: an auxiliary form, a fifth the length, that the trainer mixes in so the
model learns early to read the task, the memories and the observations (what to copy from) before it
has learned to look past 700 tokens of constant text; the full form stays half of all batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model_worker.demo_tokenizer import ASSISTANT, SPECIAL_TOKENS, build_demo_tokenizer
from model_worker.tokenizer import Tokenizer
from model_worker.training import pools, traces
from model_worker.training.forward import PrefixBatch
from model_worker.training.retrieval import WORD_OVERLAP, Retrieval

TOKENIZER_CORPUS_EXAMPLES = 4000


@dataclass
class Tokenized:
    ids: list[int]
    spans: list[tuple[int, int]]  # [start, end) of each assistant turn's tokens (action + EOS) in ids
    kind: str

    @property
    def first_target(self) -> int:
        return self.spans[0][0]


def train_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int, seed: int,
                    corpus_examples: int = TOKENIZER_CORPUS_EXAMPLES) -> Tokenizer:
    """A byte-level BPE tokenizer trained on rendered training traces (never on held-out ones). Spaces are
    tokens of their own, so a name or a value has the same tokens after a space as after a quote (in the
    action JSON): copying it is then repeating tokens, which a small model learns far sooner."""
    draft = build_demo_tokenizer(Path(out_dir), vocab_size=1024)  # only to render the chat template
    corpus = [draft.apply_chat_template(e.messages) + e.target
              for e in traces.examples(corpus_examples, seed=seed + 7919)]
    return build_demo_tokenizer(Path(out_dir), vocab_size=vocab_size, corpus=corpus, isolate_spaces=True)


def word_pieces(tokenizer: Tokenizer, max_count: int = pools.PIECE_MAX_COUNT) -> pools.WordPieces:
    """The tokenizer's alphabetic tokens (byte-level BPE spells ASCII letters as themselves), made-up words
    taking up to `max_count` of them."""
    return pools.WordPieces.from_vocab((tokenizer.id_to_token(i) or "" for i in range(tokenizer.vocab_size)),
                                       max_count)


def tokenize(tokenizer: Tokenizer, examples: list[traces.Example]) -> list[Tokenized]:
    prompts = [tokenizer.apply_chat_template(e.messages) for e in examples]
    prompt_ids = tokenizer.encode_batch(prompts, add_special_tokens=False)
    target_ids = tokenizer.encode_batch([e.target for e in examples], add_special_tokens=False)
    eos, assistant = tokenizer.eos_token_id, tokenizer.token_to_id(ASSISTANT)
    out = []
    for prompt, target, example in zip(prompt_ids, target_ids, examples, strict=True):
        ids = prompt + target + [eos]
        starts = [i + 1 for i, token in enumerate(ids) if token == assistant][example.labelled_from:]
        spans = [(start, ids.index(eos, start) + 1) for start in starts]
        out.append(Tokenized(ids, spans, example.kind))
    return out


MEMORY_HEADING = "## From your long-term memory"


def short_form(example: traces.Example) -> traces.Example:
    """The example without the system message's fixed sections (its memories section, if any, stays)."""
    system, rest = example.messages[0], example.messages[1:]
    start = system["content"].find(MEMORY_HEADING)
    head = [] if start < 0 else [{"role": "system", "content": system["content"][start:]}]
    return traces.Example(head + rest, example.target, example.kind, example.labelled_from)


def step_sequences(steps: list[traces.Example]) -> list[traces.Example]:
    """A session's steps -> the sequences to train on: step k's, unless step k + 1 shows the same system
    message (its sequence then labels step k too), each labelled from the first step of its run of steps
    with that system message; none labels a step before its example's `labelled_from` (a sequence left with no
    step to label is dropped)."""
    system = [step.messages[0]["content"] if step.messages[0]["role"] == "system" else "" for step in steps]
    sequences = []
    for k, step in enumerate(steps):
        if k + 1 < len(steps) and system[k + 1] == system[k]:
            continue
        first = k
        while first > 0 and system[first - 1] == system[k]:
            first -= 1
        if step.labelled_from <= k:
            sequences.append(traces.Example(step.messages, step.target, step.kind, max(first, step.labelled_from)))
    return sequences


def session_examples(count: int, seed: int, held_out: bool = False, short: bool = False,
                     weights: tuple[float, ...] = traces.KIND_WEIGHTS,
                     pieces: pools.WordPieces | None = None,
                     retrieval: Retrieval = WORD_OVERLAP, same_form_results: float = 0.0,
                     saved_results: float = 0.0,
                     answers: traces.AnswerForms = traces.DEFAULT_ANSWERS) -> list[traces.Example]:
    """`count` training sequences from whole sessions (`step_sequences`: usually one per session, two where a
    step's memories change); `short` gives their short_form; `weights` (one per traces.KINDS) the task mix;
    `pieces` lets made-up names and values be built from the tokenizer's own tokens (`word_pieces`);
    `retrieval` how the sessions rank memories (retrieval.py); `same_form_results` the share of arithmetic
    sessions with a saved result of the same form in memory; `saved_results` the share of remember and question
    sessions with a saved result (and its session's summary) in memory, as after the quickstart; `answers`
    how the answer after a search is worded (traces.AnswerForms)."""
    generator = traces.TraceGenerator(seed, held_out, weights, pieces, retrieval, same_form_results, saved_results,
                                      answers)
    examples: list[traces.Example] = []
    while len(examples) < count:
        examples.extend(step_sequences(generator.session()))
    examples = examples[:count]
    return [short_form(e) for e in examples] if short else examples


def question_groups(count: int, seed: int, pieces: pools.WordPieces | None = None,
                    follow_ups: bool = False, retrieval: Retrieval = WORD_OVERLAP,
                    answers: traces.AnswerForms = traces.DEFAULT_ANSWERS) -> list[traces.Example]:
    """`count` training sequences (full form) from `TraceGenerator.question_group`s. Per group the first steps,
    in a pair: the same question over the same store, once with the fact stored and retrieved (answer it;
    search when retrieval ranked it below the block's k) and once never stored (search): the step where a
    model decides between the two, and the shortest sequences of a group. With `follow_ups`, also the last
    steps of two of its searching sessions, labelled on that step only: one that finds the fact (answer from
    the hits, also after a cautious search of a fact the block held) and the one where it was never stored
    (say there is none), so that only the hits tell the two apart."""
    generator = traces.TraceGenerator(seed, pieces=pieces, retrieval=retrieval, answers=answers)
    examples: list[traces.Example] = []
    while len(examples) < count:
        direct, cautious, searched, refused = generator.question_group()
        examples.extend((direct[0], refused[0]))
        if follow_ups:  # the decision after a search, both ways over the same store: the hits hold it or not
            for session in (generator.rng.choice((cautious, searched)), refused):
                last = session[-1]
                earlier = sum(message["role"] == "assistant" for message in last.messages)
                examples.append(traces.Example(last.messages, last.target, last.kind, labelled_from=earlier))
    return examples[:count]


def copy_batch(generator: torch.Generator, vocab_size: int, bos_id: int, batch: int, span: int) -> PrefixBatch:
    """A batch of pure copying: random tokens then the same tokens again ([x; x], x of `span` ids drawn past
    the special tokens), labelled on the repeat. It grows induction heads (attend to the token after an
    earlier occurrence of the current one) within a few hundred steps, the circuit every skill here needs
    to copy names and numbers; agent traces alone take far longer to grow it."""
    x = torch.randint(SPECIAL_IDS, vocab_size, (batch, span), generator=generator)
    suffixes = torch.cat((x, x), dim=1)  # [B, 2*span]
    labels = torch.full_like(suffixes, -100)
    labels[:, span:2 * span - 1] = suffixes[:, span + 1:]  # position t predicts t + 1, from the repeat's first token
    return PrefixBatch(torch.tensor([bos_id]), suffixes, torch.full((batch,), 2 * span), labels)


SPECIAL_IDS = len(SPECIAL_TOKENS)  # ids below this are special tokens: never drawn for copy batches


def _common_prefix(sequences: list[list[int]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


def prefix_batch(items: list[Tokenized], pad_id: int) -> PrefixBatch:
    """Shared prefix (never reaching into a target, so every labelled position is in a suffix), padded
    suffixes, and labels: position t of a sequence predicts token t + 1, labelled on assistant turns."""
    P = min(_common_prefix([item.ids for item in items]), min(item.first_target for item in items) - 1)
    P = max(P, 1)
    prefix = torch.tensor(items[0].ids[:P], dtype=torch.int64)
    S = max(len(item.ids) for item in items) - P
    suffixes = torch.full((len(items), S), pad_id, dtype=torch.int64)
    labels = torch.full((len(items), S), -100, dtype=torch.int64)
    lengths = torch.zeros(len(items), dtype=torch.int64)
    for b, item in enumerate(items):
        rest = item.ids[P:]
        suffixes[b, : len(rest)] = torch.tensor(rest)
        lengths[b] = len(rest)
        for start, end in item.spans:  # position t predicts ids[t + 1]; its suffix index is t - P
            labels[b, start - 1 - P:end - 1 - P] = torch.tensor(item.ids[start:end])
    return PrefixBatch(prefix, suffixes, lengths, labels)

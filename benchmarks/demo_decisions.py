"""The first decision of a question, teacher-forced: does a demo checkpoint answer from its memory block when
the block holds the fact, and search when it does not?

For each split (training, held-out) and question kind it draws sessions from the trace generator, feeds
each first step's prompt and target action, and counts the sessions whose action opening (through
`"final"` or `"tool_calls"`) the model predicts greedily. The kinds: recall (the fact is in the block:
answer), recall_search (stored but not retrieved: search) and refusal (never stored: search). A model that
always answers directly scores 100% on the first and 0% on the others; the reference line beside each
checkpoint is that of a coin, 50%. It needs no Redis and no runtime: the failure it isolates is the one
`python -m runtime.evaluation` showed (refusals answered from another person's memory).

    python benchmarks/demo_decisions.py [--model DIR ...] [--sessions 60]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_worker.tokenizer import Tokenizer  # noqa: E402
from model_worker.training import data, traces  # noqa: E402
from model_worker.training.forward import batch_loss, suffix_hidden  # noqa: E402
from model_worker.training.model_setup import build_trainable, demo_model_config, load_exported  # noqa: E402
from model_worker.training.retrieval import WORD_OVERLAP, Retrieval, retrieval_for  # noqa: E402
from model_worker.training.traces import DEFAULT_ANSWERS, AnswerForms  # noqa: E402

KINDS = ("recall", "recall_search", "refusal")
AFTER_SEARCH_KINDS = ("recall_search", "recall_cautious", "refusal")
OPENING_TOKENS = 6  # `{"type": "final` / `{"type": "tool` and the tokens before it
BATCH = 10


def _model(checkpoint: Path):
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    config = demo_model_config(tokenizer, engram=True, mhc=False)
    model, tables = build_trainable(config, tokenizer, seed=0)
    load_exported(model, tables, checkpoint)
    return tokenizer, model.eval()


def _splits(tokenizer, seed: int, retrieval: Retrieval = WORD_OVERLAP, answers: AnswerForms = DEFAULT_ANSWERS):
    """(held_out, trace generator) for the training split (made-up words from the tokenizer's pieces, as in
    training) and for the held-out one; `answers`: how the checkpoint words its answers after a search."""
    pieces = data.word_pieces(tokenizer)
    for held_out in (False, True):
        yield held_out, traces.TraceGenerator(seed + held_out, held_out=held_out, pieces=None if held_out else pieces,
                                              retrieval=retrieval, answers=answers)


@torch.no_grad()
def decisions(checkpoint: Path, sessions: int, seed: int = 123,
              retrieval: Retrieval = WORD_OVERLAP,
              answers: AnswerForms = DEFAULT_ANSWERS) -> dict[tuple[bool, str], float]:
    """(held_out, kind) -> the share of first steps whose action opening the model predicts right."""
    tokenizer, model = _model(checkpoint)
    out = {}
    for held_out, generator in _splits(tokenizer, seed, retrieval, answers):
        for kind in KINDS:
            firsts = [generator.session(kind)[0] for _ in range(sessions)]
            right = 0
            for start in range(0, sessions, BATCH):
                items = data.tokenize(tokenizer, firsts[start:start + BATCH])
                batch = data.prefix_batch(items, tokenizer.pad_token_id)
                _, hits, _ = batch_loss(model, batch)
                for row in range(hits.shape[0]):
                    labelled = hits[row][batch.labels[row] >= 0]
                    right += bool(labelled[:OPENING_TOKENS].all())
            out[(held_out, kind)] = right / sessions
    return out


def _answer(text: str) -> str:
    return json.dumps({"type": "final", "answer": text}, ensure_ascii=False)


def top_hit_value(hits: list[dict]) -> str:
    """The value the top hit states (its last "... is <value>."): what a careless answer copies."""
    values = re.findall(r" is ([^.\n]+)\.", hits[0]["text"]) if hits else []
    return values[-1] if values else "12"  # no hits: any made-up value is the wrong answer


def _right_and_wrong(last: traces.Example, answers: AnswerForms = DEFAULT_ANSWERS) -> tuple[str, str]:
    """The last step's target and the tempting wrong final answer for it (see the module docstring)."""
    answer = json.loads(last.target)["answer"]
    key = answers.refused_key(answer)
    if key is not None:
        hits = json.loads(last.messages[-1]["content"])[-1]["result"]["hits"]
        return last.target, _answer(answers.found(f"{key} is {top_hit_value(hits)}."))
    key = answer.removeprefix(answers.found_prefix).rsplit(" is ", 1)[0]
    return last.target, _answer(answers.not_found(key))


@torch.no_grad()
def token_nlls(model, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (labels [n] int64, negative log-likelihood [n] of each) over its labelled tokens, in order."""
    h = suffix_hidden(model, batch)
    where = batch.labels >= 0  # [B, S]
    logp = torch.log_softmax(model.head(h[where]).float(), -1)  # [M, vocab]
    labels = batch.labels[where]  # [M]
    nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # [M]
    counts = where.sum(1).tolist()
    return list(zip(labels.split(counts), nll.split(counts)))


def decision_margin(model, tokenizer, pair: list[traces.Example]) -> float:
    """log p(right) - log p(wrong) at the first token where the two final answers differ: the choice greedy
    decoding makes there (both share `{"type": "final", "answer": "`)."""
    (right_ids, right_nll), (wrong_ids, wrong_nll) = token_nlls(
        model, data.prefix_batch(data.tokenize(tokenizer, pair), tokenizer.pad_token_id))
    n = min(len(right_ids), len(wrong_ids))
    j = next(i for i in range(n) if right_ids[i] != wrong_ids[i])
    return float(wrong_nll[j] - right_nll[j])


def after_search(checkpoint: Path, sessions: int, seed: int = 321,
                 retrieval: Retrieval = WORD_OVERLAP,
                 answers: AnswerForms = DEFAULT_ANSWERS) -> dict[tuple[bool, str], tuple[float, float]]:
    """(held_out, kind) -> (share of last steps whose right final answer wins at the token where
    the two part, median margin there in nats)."""
    tokenizer, model = _model(checkpoint)
    out = {}
    for held_out, generator in _splits(tokenizer, seed, retrieval, answers):
        for kind in AFTER_SEARCH_KINDS:
            margins = []
            while len(margins) < sessions:
                last = generator.session(kind)[-1]
                if "memory_search" not in last.messages[-2]["content"]:
                    continue  # answered from the block: no search to decide after
                prior_turns = sum(m["role"] == "assistant" for m in last.messages)
                pair = [traces.Example(last.messages, target, kind, labelled_from=prior_turns)
                        for target in _right_and_wrong(last, answers)]
                margins.append(decision_margin(model, tokenizer, pair))
            out[(held_out, kind)] = (sum(m > 0 for m in margins) / sessions, statistics.median(margins))
    return out


def add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    """--found-prefix and --refusal: how the checkpoints word their answers after a search (as trained)."""
    parser.add_argument("--found-prefix", default="", metavar="TEXT",
                        help="what the checkpoints' answers from a search open with (training's --found-prefix)")
    parser.add_argument("--refusal", default=AnswerForms.refusal, metavar="TEXT",
                        help="the checkpoints' answer when a search finds nothing (training's --refusal)")


def answer_forms(parser: argparse.ArgumentParser, args: argparse.Namespace) -> AnswerForms:
    """The wording `add_answer_arguments` read; a wording the trainer would refuse is a usage error."""
    try:
        return AnswerForms(args.found_prefix, args.refusal)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="checkpoint directory (repeatable; default: the shipped demo model)")
    parser.add_argument("--sessions", type=int, default=60, help="sessions per split and kind")
    parser.add_argument("--runtime-retrieval", action="store_true",
                        help="sessions rank memories with the runtime's embedder (as training's --runtime-retrieval)")
    add_answer_arguments(parser)
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be positive")
    answers = answer_forms(parser, args)
    checkpoints = args.model or [ROOT / "model_worker" / "demo_model"]
    for checkpoint in checkpoints:
        if not (checkpoint / "config.json").is_file():
            print(f"error: no checkpoint at {checkpoint} (config.json missing)", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    retrieval = retrieval_for(args.runtime_retrieval)
    print(f"memories ranked by {'the runtime embedder' if args.runtime_retrieval else 'word overlap'}")
    print(f"{'checkpoint':<40} {'split':<9} " + " ".join(f"{k:>14}" for k in KINDS) + f" {'coin':>6}")
    for checkpoint in checkpoints:
        shares = decisions(checkpoint, args.sessions, retrieval=retrieval, answers=answers)
        for held_out in (False, True):
            row = " ".join(f"{shares[(held_out, k)]:>14.0%}" for k in KINDS)
            print(f"{str(checkpoint)[-40:]:<40} {'held-out' if held_out else 'training':<9} {row} {0.5:>6.0%}",
                  flush=True)
    print(f"(share of {args.sessions} first steps per cell whose action opening is predicted right: answer for "
          "recall, search for the other two)")
    print(f"\nafter the search: {'checkpoint':<23} {'split':<9} " + " ".join(f"{k:>18}" for k in AFTER_SEARCH_KINDS)
          + f" {'coin':>6}")
    for checkpoint in checkpoints:
        shares = after_search(checkpoint, args.sessions, retrieval=retrieval, answers=answers)
        for held_out in (False, True):
            row = " ".join(f"{shares[(held_out, k)][0]:>8.0%} ({shares[(held_out, k)][1]:+5.1f})"
                           for k in AFTER_SEARCH_KINDS)
            print(f"{str(checkpoint)[-40:]:<40} {'held-out' if held_out else 'training':<9} {row} {0.5:>6.0%}",
                  flush=True)
    print(f"(share of {args.sessions} last steps per cell where the right final answer is likelier than the "
          "tempting wrong one at the token where they part; in brackets the median margin there, in nats)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

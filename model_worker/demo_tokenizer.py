"""Build a small, deterministic byte-level BPE tokenizer for demos and tests, with no downloads.

The result looks like a DeepSeek tokenizer on disk (`tokenizer.json` + `tokenizer_config.json` with
BOS/EOS/pad and a DeepSeek-style chat template) so the whole serving path can run end to end on a tiny
random model. Special tokens take ids 0.. in the order of SPECIAL_TOKENS (BOS 0, EOS 1, pad 2, as in
DeepSeek-V3); numbers are split into runs of at most 3 digits, as DeepSeek does. The built-in corpus
is about sixty sentences plus a thousand generated arithmetic facts (so every number below 1000 gets
learned, and 2048 ids fill with real tokens). When a corpus is too small to learn `vocab_size` tokens,
`<|reserved_i|>` special tokens fill the rest so the vocabulary size is exactly `vocab_size`.

It deliberately does not aim for good compression of real text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _BackendTokenizer

from model_worker.tokenizer import CONFIG_FILE, DEFAULT_CHAT_TEMPLATE, TOKENIZER_FILE, Tokenizer

BOS, EOS, PAD, USER, ASSISTANT = (
    "<|begin_of_sentence|>",
    "<|end_of_sentence|>",
    "<|pad|>",
    "<|User|>",
    "<|Assistant|>",
)
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT)
_BYTE_ALPHABET = 256

DEMO_CORPUS = (
    "An agent keeps a memory of what it has seen, and it can search that memory later.",
    "The agent called the calculator tool with two numbers and waited for the result.",
    "Memory that survives a restart lets an agent resume a long task without losing a step.",
    "When the tool returns an error, the agent reads the message and tries a different plan.",
    "Two plus two is four, and four times three is twelve.",
    "If you add 17 and 25 you get 42; subtracting 42 from 100 leaves 58.",
    "The product of 12 and 12 is 144, and 144 divided by 16 is 9.",
    "A session stores every message, every tool call, and every tool result in order.",
    "The scheduler decides which sequences run in this step and which ones must wait.",
    "Each page of the cache holds sixty-four tokens for one layer of the model.",
    "Hello! How can I help you today?",
    "hello, world. HELLO again, and hello once more.",
    "She ordered a café au lait at the café next to the old library.",
    "The user asked the assistant to remember her favourite colour: deep blue.",
    "Recall memory finds past conversations; archival memory stores long documents.",
    "The weather tool said it would rain tomorrow, so the agent suggested an umbrella.",
    "An n-gram is a short run of consecutive tokens, like two or three words in a row.",
    "Hashing the last few tokens gives an address into a very large table of embeddings.",
    "The memory service answers a search in a few milliseconds, even with ten thousand entries.",
    "To compute 7 times 8, the agent used the calculator and got 56.",
    "Three hundred and twenty-one minus one hundred and twenty is two hundred and one.",
    "The square root of 81 is 9, and 9 squared is 81 again.",
    "Please write the answer as JSON with the keys name and arguments.",
    "The tool call failed with a timeout, so the agent retried it once.",
    "Idempotent tools can run twice without doing the work twice.",
    "A checkpoint records the state after every step, so a crash loses nothing.",
    "The assistant summarised the meeting notes in three short bullet points.",
    "Tokens are numbers that stand for pieces of text, such as words or parts of words.",
    "The model reads the prompt, then writes one token at a time until it stops.",
    "Long contexts need more cache; compressing the cache lets more users share one machine.",
    "The planner split the task into four steps: search, read, compute, and answer.",
    "At 3:45 the agent set a reminder for the 5 o'clock meeting.",
    "One thousand and twenty-four is two to the power of ten.",
    "The sum of the first ten numbers is fifty-five.",
    "Why did the agent forget? Because nobody saved its memory before the restart.",
    "The retrieval step returned five documents, and two of them were relevant.",
    "Good tools have clear names, typed arguments, and short descriptions.",
    "The user said: remember that my meeting moved to Thursday.",
    "The assistant replied: noted, your meeting is now on Thursday.",
    "Search the notes for the word budget and list every match.",
    "Forty-two is the answer, but what was the question?",
    "The agent compared the two prices, 19.99 and 24.50, and chose the cheaper one.",
    "A stack keeps the most recent item on top; a queue serves the oldest item first.",
    "Memory writes should be fast, and duplicate memories should be merged.",
    "The router sends each token to a few experts and adds their weighted outputs.",
    "Attention lets each token look back at the tokens that came before it.",
    "The cache for one token holds a small latent vector instead of full keys and values.",
    "Résumé, naïve, and coöperate keep their accents in careful writing.",
    "Tabs\tand\tnewlines\nseparate\n\nsome of these words.",
    "  Extra   spaces   appear   here   on   purpose.  ",
    "The agent multiplied 6 by 7, added 8, and reported 50.",
    "What is 15 percent of 200? It is 30.",
    "The tool listed the files in the folder and the agent opened the largest one.",
    "Each agent has its own memory, but agents can share facts through a common store.",
    "The user asked for a summary, and the agent kept it under fifty words.",
    "Streaming sends each new token to the client as soon as it is ready.",
    "A budget of 1500 tokens was enough for the whole answer.",
    "The agent wrote the result to memory, then confirmed the write succeeded.",
    "Yesterday the agent learned that the user prefers short answers.",
    "Counting from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.",
    "The calculator tool accepts an expression such as (3 + 4) * 5 and returns 35.",
    "If the memory is full, the oldest entries are archived, never silently deleted.",
)


def _arithmetic_facts() -> list[str]:
    """One line per number a in [0, 1000): a sum and a product, deterministic."""
    return [f"{a} + {a * 37 % 1000} = {a + a * 37 % 1000}, and {a} times 3 is {3 * a}." for a in range(1000)]


def _check_arguments(vocab_size: int, corpus: list[str]) -> None:
    minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"vocab_size must be an int >= {minimum} (bytes + special tokens), got {vocab_size!r}")
    if not corpus or not all(isinstance(t, str) for t in corpus):
        raise ValueError("corpus must be a non-empty iterable of str")


def _train(vocab_size: int, corpus: list[str], isolate_spaces: bool = False) -> _BackendTokenizer:
    backend = _BackendTokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated")]
    if isolate_spaces:  # a word gets the same tokens after a space, a quote or a line start
        splits.append(pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    missing = vocab_size - backend.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        backend.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )
    return backend


def build_demo_tokenizer(
    out_dir: str | os.PathLike[str], vocab_size: int = 2048, corpus: Iterable[str] | None = None,
    isolate_spaces: bool = False,
) -> Tokenizer:
    """Train the demo tokenizer, write tokenizer.json + tokenizer_config.json to out_dir, load it back.

    The same arguments always give byte-identical files. The vocabulary has exactly vocab_size ids.
    """
    corpus_list = [*DEMO_CORPUS, *_arithmetic_facts()] if corpus is None else list(corpus)
    _check_arguments(vocab_size, corpus_list)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _train(vocab_size, corpus_list, isolate_spaces).save(str(out / TOKENIZER_FILE))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Tokenizer.from_pretrained(out)

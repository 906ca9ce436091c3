"""Grammar-constrained decoding with xgrammar: JSON-schema and regex grammars as per-step token masks.

`GrammarBackend` holds one xgrammar compiler for a tokenizer and a model vocabulary and compiles
(and caches) grammars; `GrammarState` follows one request's output, fills the disallowed logits of its
next token with -inf and advances on each accepted token. The tokenizer's stop token (EOS) is allowed
exactly when the grammar can end there; once it is accepted the state is terminated.

Vocabulary: xgrammar sees every token as the raw bytes it adds to the text. For byte-level BPE
tokenizers (DeepSeek, Llama 3, Qwen, the demo tokenizer) those are the GPT-2 byte-to-unicode characters
of the token string mapped back to bytes; non-special added tokens are their literal UTF-8 content.
Special tokens (BOS, chat markers, ...) and ids past the tokenizer's vocabulary (the model's lm_head may
be padded) get no text, so a grammar never allows them.

JSON output is compact (", " and ": " separators, no other whitespace). xgrammar lets raw control
characters (U+0000-U+001F) into length-bounded strings, which JSON forbids; JSON grammars therefore also
mask every token holding a byte below 0x20 (a compact JSON text never needs one).

It deliberately does not: support tokenizers whose decoder is not byte-level (sentencepiece-style
Metaspace/ByteFallback vocabularies) -- they raise ValueError; do jump-forward decoding; or decide when a
request stops (the engine reads `is_terminated`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer as _BackendTokenizer

from model_worker.tokenizer import Tokenizer

_BITS = 32  # xgrammar bitmask words are int32; bit j of word w is token 32 * w + j
_FIRST_PRINTABLE_BYTE = 0x20
_XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[12:00:00] /path/file.cc:123: "


def byte_level_char_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the character a byte-level BPE vocabulary uses -> that byte.

    Printable Latin-1 bytes ('!'..'~', U+00A1..U+00AC, U+00AE..U+00FF) stand for themselves; the other 68
    bytes, in increasing order, are written as U+0100, U+0101, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    char_of = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in char_of)
    for n, b in enumerate(shifted):
        char_of[b] = chr(256 + n)
    return {c: b for b, c in char_of.items()}


def _backend_of(tokenizer: Tokenizer | _BackendTokenizer) -> _BackendTokenizer:
    if isinstance(tokenizer, _BackendTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        return tokenizer._backend
    raise TypeError(f"tokenizer must be a model_worker Tokenizer, got {type(tokenizer).__name__}")


def _is_byte_level(backend: _BackendTokenizer) -> bool:
    decoder = backend.decoder
    if decoder is None:
        return False
    config = json.loads(decoder.__getstate__())
    steps = config.get("decoders", []) if config.get("type") == "Sequence" else [config]
    return bool(steps) and all(step.get("type") == "ByteLevel" for step in steps)


def token_bytes(tokenizer: Tokenizer | _BackendTokenizer, vocab_size: int) -> list[bytes | None]:
    """The bytes each id in [0, vocab_size) adds to decoded text; None for special tokens and unused ids.

    Raises ValueError for tokenizers whose decoder is not byte-level.
    """
    backend = _backend_of(tokenizer)
    if not _is_byte_level(backend):
        raise ValueError("tokenizer: structured decoding needs a byte-level BPE tokenizer (ByteLevel decoder)")
    added = backend.get_added_tokens_decoder()
    to_byte = byte_level_char_to_byte()
    vocab: list[bytes | None] = []
    for token_id in range(vocab_size):
        token = backend.id_to_token(token_id)
        if token is None or (token_id in added and added[token_id].special):
            vocab.append(None)
        elif token_id in added:  # non-special added tokens decode to their literal content
            vocab.append(token.encode("utf-8"))
        else:
            vocab.append(b"".join(bytes([to_byte[c]]) if c in to_byte else c.encode("utf-8") for c in token))
    return vocab


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar bitmask int32 [..., ceil(V / 32)] -> allowed bool [..., V] (bit j of word w = token 32w + j)."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [..., W, 32]
    return bits.reshape(*bitmask.shape[:-1], -1)[..., :vocab_size].bool()


def _clean_error(exc: Exception) -> str:
    """xgrammar's message without its "[time] file.cc:line:" prefix and trailing blank lines."""
    return _XGRAMMAR_LOCATION.sub("", str(exc)).strip()


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled xgrammar grammar plus the tokens this backend also masks out for it (bool [V] or None)."""

    kind: str  # "json_schema" | "regex"
    source: str
    compiled: Any  # xgrammar.CompiledGrammar
    banned: torch.Tensor | None


class GrammarBackend:
    """Compiles JSON-schema / regex grammars for one tokenizer and model vocabulary, and starts matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None,
                 cache_size: int = 256) -> None:
        """vocab_size: the model's logits width (may exceed the tokenizer's vocabulary).

        stop_token_ids: tokens that end a grammar's output; default [tokenizer.eos_token_id].
        """
        import xgrammar as xgr  # deferred: importing xgrammar also imports transformers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is None:
                raise ValueError("stop_token_ids: the tokenizer has no eos_token_id; pass the stop tokens")
            stop_token_ids = [eos]
        if not stop_token_ids or not all(isinstance(t, int) and 0 <= t < vocab_size for t in stop_token_ids):
            raise ValueError(f"stop_token_ids must be a non-empty list of ids in [0, {vocab_size}), "
                             f"got {stop_token_ids!r}")
        vocab = token_bytes(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._xgr = xgr
        info = xgr.TokenizerInfo([b or b"" for b in vocab], xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._control_tokens = torch.tensor(
            [b is not None and any(x < _FIRST_PRINTABLE_BYTE for x in b) for b in vocab], dtype=torch.bool)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, json_schema: dict | None = None, regex: str | None = None) -> CompiledGrammar:
        """Compile exactly one of a JSON schema (dict) or a regex; the same grammar is compiled once.

        Raises ValueError("json_schema: ...") / ValueError("regex: ...") for invalid ones.
        """
        if (json_schema is None) == (regex is None):
            raise ValueError("json_schema / regex: give exactly one of them")
        if json_schema is not None:
            if not isinstance(json_schema, dict):
                raise ValueError(f"json_schema: must be a JSON object (dict), got {type(json_schema).__name__}")
            try:
                key = ("json_schema", json.dumps(json_schema, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"json_schema: not serialisable as JSON ({exc})") from exc
        else:
            if not isinstance(regex, str):
                raise ValueError(f"regex: must be a str, got {type(regex).__name__}")
            key = ("regex", regex)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            grammar = self._compile(*key)
            self._cache[key] = grammar
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return grammar

    def _compile(self, kind: str, source: str) -> CompiledGrammar:
        try:
            if kind == "json_schema":
                compiled = self._compiler.compile_json_schema(source, any_whitespace=False, strict_mode=True)
            else:
                compiled = self._compiler.compile_regex(source)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{kind}: {_clean_error(exc)}") from exc
        banned = self._control_tokens if kind == "json_schema" else None
        return CompiledGrammar(kind, source, compiled, banned)

    def matcher(self, compiled: CompiledGrammar) -> GrammarState:
        """A fresh state at the start of `compiled`'s output."""
        if not isinstance(compiled, CompiledGrammar):
            raise TypeError(f"compiled must come from GrammarBackend.compile, got {type(compiled).__name__}")
        return GrammarState(self, compiled)


class GrammarState:
    """One request's position in its grammar: which tokens may come next, and whether it has ended."""

    def __init__(self, backend: GrammarBackend, compiled: CompiledGrammar) -> None:
        self._backend = backend
        self._grammar = compiled
        self._matcher = backend._xgr.GrammarMatcher(compiled.compiled)
        self._bitmask = backend._xgr.allocate_token_bitmask(1, backend.vocab_size)  # int32 [1, W]

    def allowed_tokens(self) -> torch.Tensor:
        """bool [V] on CPU: True for the tokens the grammar accepts next (only stop tokens once it has ended)."""
        vocab_size = self._backend.vocab_size
        if self._matcher.is_terminated():
            allowed = torch.zeros(vocab_size, dtype=torch.bool)
            allowed[self._backend.stop_token_ids] = True
            return allowed
        self._matcher.fill_next_token_bitmask(self._bitmask)
        allowed = unpack_bitmask(self._bitmask[0], vocab_size)
        banned = self._grammar.banned
        if banned is not None:
            narrowed = allowed & ~banned
            if narrowed.any():  # never leave a grammar with no way forward
                allowed = narrowed
        return allowed

    def fill_mask(self, logits_row: torch.Tensor) -> None:
        """In place: logits_row [V] gets -inf at every token the grammar does not allow next."""
        if not isinstance(logits_row, torch.Tensor) or not logits_row.is_floating_point():
            raise TypeError("logits_row must be a floating-point torch.Tensor")
        if logits_row.shape != (self._backend.vocab_size,):
            raise ValueError(f"logits_row must have shape [{self._backend.vocab_size}], got {tuple(logits_row.shape)}")
        allowed = self.allowed_tokens().to(logits_row.device)
        with torch.inference_mode(logits_row.is_inference()):  # the runner may hand out inference tensors
            logits_row.masked_fill_(~allowed, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; ValueError if the grammar does not allow it here."""
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"token_id must be an int, got {type(token_id).__name__}")
        if self._matcher.is_terminated():
            raise ValueError(f"token_id: grammar output has already ended; cannot accept {token_id}")
        if not self._matcher.accept_token(token_id):
            raise ValueError(f"token_id: {self._grammar.kind} grammar does not allow token {token_id} here")

    def is_terminated(self) -> bool:
        """True once a stop token was accepted after a complete grammar output."""
        return bool(self._matcher.is_terminated())

    def can_terminate(self) -> bool:
        """True when the output so far is complete for the grammar (a stop token may come next)."""
        return bool(self._matcher.is_completed())


def apply_grammar_masks(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """Batched fill_mask: logits [N, V] in place, row i masked by states[i] (None = unconstrained)."""
    if logits.dim() != 2 or len(states) != logits.shape[0]:
        raise ValueError(f"states must hold one entry per logits row ({logits.shape[0]}), got {len(states)}")
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    allowed = torch.stack([states[i].allowed_tokens() for i in rows]).to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    with torch.inference_mode(logits.is_inference()):
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

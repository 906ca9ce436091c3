"""Streaming detokenization of one sequence: token ids in, text deltas out, stop strings cut.

Each step decodes only a short window of ids: a few already-emitted tokens for context (so
tokenizers whose spacing depends on the previous token decode right) plus the new ones, and emits the
text past the context. Three things are held back instead of emitted:
- a trailing U+FFFD, which is what the decoder makes of an incomplete UTF-8 byte sequence (a
  multi-byte character split across tokens); it is emitted once the character completes, or by
  `flush` at the end;
- the longest tail of the text that is a proper prefix of a stop string, until it either completes
  the stop string or stops matching;
- ids outside the tokenizer's vocabulary (a model's lm_head may be padded past it): they have no text.
On a stop string the delta ends right before it and `text` never contains it. Without a stop, the
concatenated deltas plus `flush()` equal `tokenizer.decode(output ids)` for byte-level tokenizers
whenever the prompt ends on a character boundary.

It deliberately does not: check stop token ids or max_tokens (the engine does), or keep the ids
(the sequence does).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first output tokens


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas, holding back partial characters and stops."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        """tokenizer: anything with decode(ids, skip_special_tokens) and vocab_size (model_worker Tokenizer)."""
        has_decode = callable(getattr(tokenizer, "decode", None))
        if not has_decode or not isinstance(getattr(tokenizer, "vocab_size", None), int):
            raise TypeError("tokenizer must have decode(ids, skip_special_tokens) and an int vocab_size")
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty str, got {stop!r}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = stop
        context = self._text_ids(_checked_ids(prompt_token_ids, "prompt_token_ids"))[-CONTEXT_TOKENS:]
        self._window: list[int] = context  # context ids, then ids not yet fully emitted
        self._read = len(context)  # window[:read] is context already emitted (or prompt)
        self._prefix_text = self._decode(context)
        self._taken = 0  # chars of decode(window) past prefix_text already moved to _pending
        self._pending = ""  # decoded text held back as a possible stop-string start
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was hit
        self.finished = False  # stopped or flushed: further steps emit nothing

    def step(self, new_token_ids: list[int]) -> tuple[str, bool]:
        """Add generated ids; returns (text delta, hit_stop_string). After a hit, returns ("", True)."""
        ids = self._text_ids(_checked_ids(new_token_ids, "new_token_ids"))
        if self.finished:
            return "", self.stopped
        self._window.extend(ids)
        full = self._decode(self._window)
        stable = full.rstrip(REPLACEMENT_CHAR)
        start = len(self._prefix_text) + self._taken
        if len(stable) > start:
            self._pending += stable[start:]
            self._taken += len(stable) - start
        if len(stable) == len(full) and len(full) > len(self._prefix_text):  # window ends on a whole char
            self._window = self._window[self._read:]
            self._read = len(self._window)
            self._prefix_text = self._decode(self._window)
            self._taken = 0
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: emit everything held back (an unfinished character becomes U+FFFD)."""
        if self.finished:
            return ""
        full = self._decode(self._window)
        self._pending += full[len(self._prefix_text) + self._taken:]
        delta, _ = self._release(final=True)
        self.finished = True
        return delta

    # ---------------------------------------------------------------------------------------------

    def _release(self, final: bool) -> tuple[str, bool]:
        """Move pending text to the output, cutting at the first stop string and holding a possible start."""
        pending = self._pending
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            delta = pending[: min(hits)]
            self._pending = ""
            self.text += delta
            self.stopped = self.finished = True
            return delta, True
        hold = 0 if final else self._stop_prefix_length(pending)
        delta = pending[: len(pending) - hold]
        self._pending = pending[len(pending) - hold:]
        self.text += delta
        return delta, False

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _text_ids(self, ids: list[int]) -> list[int]:
        vocab = self._tokenizer.vocab_size
        return [i for i in ids if i < vocab]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _checked_ids(ids: Any, name: str) -> list[int]:
    if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{name} must be a list of int token ids")
    checked = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in checked):
        raise TypeError(f"{name} must hold ints")
    if any(i < 0 for i in checked):
        raise ValueError(f"{name} holds negative ids")
    return checked

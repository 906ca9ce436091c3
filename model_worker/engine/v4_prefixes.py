"""Prefix reuse for V4 models: snapshots of decoding states keyed by the tokens they hold.

A V4State after L tokens is all a sequence needs to continue from token L, so where the paged latent
cache shares pages of a common prefix, a V4 engine shares a snapshot: the runner stores one when a prompt
has been computed and when a request ends (an agent's next step re-sends that whole history), and a new
sequence starts from the longest stored prefix of its tokens. A snapshot is a copy (`V4State.copy`: the
lossless rows are shared until either side appends, FP8 pages are shared and copied before a write); the
least recently used ones go first beyond `capacity`, or when the FP8 page pool runs out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def _digest(tokens: list[int]) -> bytes:
    return hashlib.blake2b(array("q", tokens).tobytes(), digest_size=16).digest()


class StateSnapshots:
    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._snapshots: OrderedDict[bytes, object] = OrderedDict()  # digest of the tokens -> V4State
        self.reused_tokens = 0

    def store(self, tokens: list[int], state) -> None:
        """Keep a copy of `state`, which holds exactly `tokens`."""
        if self.capacity < 1 or not tokens:
            return
        key = _digest(tokens)
        if key in self._snapshots:
            self._snapshots.pop(key).release()
        self._snapshots[key] = state.copy()
        self._snapshots.move_to_end(key)
        while len(self._snapshots) > self.capacity:
            self.evict_oldest()

    def evict_oldest(self) -> bool:
        """Drop the least recently used snapshot, giving its FP8 pages back; False when there is none."""
        if not self._snapshots:
            return False
        self._snapshots.popitem(last=False)[1].release()
        return True

    def longest(self, tokens: list[int], limit: int):
        """A copy of the stored state holding the longest prefix of `tokens` of at most `limit` tokens, or None."""
        for length in sorted({state.length for state in self._snapshots.values() if state.length <= limit},
                             reverse=True):
            key = _digest(tokens[:length])
            if key in self._snapshots:
                self._snapshots.move_to_end(key)
                self.reused_tokens += length
                return self._snapshots[key].copy()
        return None

    def clear(self) -> None:
        while self.evict_oldest():
            pass

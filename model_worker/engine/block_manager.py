"""Pages of the paged KV cache: allocation, reference counts and the prefix cache.

A page (block) holds the KV of `block_size` consecutive tokens of one sequence. The manager only does
the bookkeeping of page ids; the storage itself is `PagedLatentCache`, and it never looks at tensors.

Prefix caching: once a page is full and computed, it is registered under a chained hash
`page_hash(parent page's hash, page tokens)`, so a page matches only when its whole prefix matches too.
A new sequence reuses the cached pages of its longest matching prefix (reference count + 1) and computes
only the rest. A page shared by several sequences is full, hence never written again. Pages whose
reference count drops to 0 while registered stay reusable in an LRU list and are evicted (unregistered,
handed out again) only when no free page is left.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from hashlib import blake2b

from model_worker.engine.sequence import Sequence

BLOCK_SIZE = 64


def page_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Chained hash of one full page: 128-bit BLAKE2b of (parent page hash, page token ids as int64)."""
    digest = blake2b(digest_size=16)
    digest.update(parent if parent is not None else b"root")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def _pages_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Owns `num_blocks` page ids: free list, reference counts, prefix-hash registry and LRU of cached pages."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, unregistered
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, registered; oldest first
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # page hash -> physical page
        self.stats = {"prefix_queries_tokens": 0, "prefix_hit_tokens": 0, "evictions": 0}

    @staticmethod
    def blocks_for_budget(budget_bytes: int, bytes_per_token: int, block_size: int = BLOCK_SIZE) -> int:
        """Pages that fit in `budget_bytes`; `bytes_per_token` counts all layers together."""
        for name, value in (("budget_bytes", budget_bytes), ("bytes_per_token", bytes_per_token),
                            ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        num_blocks = budget_bytes // (bytes_per_token * block_size)
        if num_blocks < 1:
            raise ValueError(
                f"budget_bytes: {budget_bytes} bytes do not hold one page of {block_size} tokens "
                f"({bytes_per_token * block_size} bytes)"
            )
        return num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Pages that can be handed out now: free ones plus unreferenced cached ones (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Pages registered in the prefix cache (referenced or not)."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_count[block_id]

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Cached pages (and their hashes) of the longest cached prefix of `token_ids`, read-only.

        Never covers every token: when all of them are covered, the last page is left out so at least
        one token is computed (its logits are needed).
        """
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent: bytes | None = None
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            parent = page_hash(parent, token_ids[start:start + bs])
            block = self._cached.get(parent)
            if block is None:
                break
            blocks.append(block)
            hashes.append(parent)
        if blocks and len(blocks) * bs >= len(token_ids):
            blocks.pop()
            hashes.pop()
        return blocks, hashes

    def allocate_prompt(self, seq: Sequence) -> bool:
        """First allocation of a WAITING seq: reuse cached pages, reserve fresh ones for the rest.

        All of seq.token_ids count (after preemption they include the generated tokens). Sets
        block_table, block_hashes, num_computed_tokens (reused tokens) and num_cached_tokens. Returns
        False and changes nothing when not enough pages are free.
        """
        if seq.block_table:
            raise ValueError(f"seq: {seq.request_id!r} already holds pages; free it before allocating again")
        reused, hashes = self.match_prefix(seq.token_ids)
        fresh = _pages_for(seq.num_tokens, self.block_size) - len(reused)
        reused_evictable = sum(1 for block in reused if self._ref_count[block] == 0)
        if fresh > self.num_free_blocks - reused_evictable:
            return False
        for block in reused:
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1
        seq.block_table = reused + [self._take_block() for _ in range(fresh)]
        seq.block_hashes = hashes
        seq.num_computed_tokens = len(reused) * self.block_size
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        if self.enable_prefix_caching:
            self.stats["prefix_queries_tokens"] += seq.num_tokens
            self.stats["prefix_hit_tokens"] += seq.num_computed_tokens
        return True

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Append pages so seq.block_table covers `num_tokens` tokens; False (no change) if out of pages."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")
        missing = _pages_for(num_tokens, self.block_size) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take_block() for _ in range(missing))
        return True

    def commit_full_pages(self, seq: Sequence) -> None:
        """Register seq's newly full, computed pages in the prefix cache (by chained hash)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for index in range(len(seq.block_hashes), num_full):
            parent = page_hash(parent, seq.token_ids[index * bs:(index + 1) * bs])
            seq.block_hashes.append(parent)
            block = seq.block_table[index]
            if parent not in self._cached and self._block_hash[block] is None:
                self._cached[parent] = block
                self._block_hash[block] = parent

    def free(self, seq: Sequence) -> None:
        """Drop seq's page references; clears seq.block_table and seq.block_hashes.

        Unreferenced registered pages become evictable, the tail of the sequence first (a prefix is
        worth more than its continuation: a later page can only match after its parents did).
        """
        for block in reversed(seq.block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] < 0:
                raise RuntimeError(f"page {block} freed more often than allocated")
            if self._ref_count[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def _take_block(self) -> int:
        """A free page, else the least-recently-used evictable cached page (unregistered first)."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash[block]]
            self._block_hash[block] = None
            self.stats["evictions"] += 1
        self._ref_count[block] = 1
        return block

"""One pool of MODEL1 FP8 pages for every sequence's V4 rows (window keys and compressed entries).

`Model1PagePool` holds pages uint8 [num_pages, page_bytes] with a free list and a reference count per page:
a snapshot (`V4State.copy`, prefix reuse) shares its source's pages, and a shared page is copied before it is
written (only a store's last, partly filled page is ever written). A fixed-size pool (the engine's, sized by
the cache budget) asks `on_exhausted` to free pages (drop least recently used snapshots) before it refuses;
a pool made without a size grows as needed (a state used outside the engine). Pages go back to the pool when
a store releases them: when the window moves past them, or when its state is released.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engram_kernels.mla_decode.model1_layout import Model1CacheLayout


class PoolExhausted(RuntimeError):
    """No free page, and nothing left to evict."""


class Model1PagePool:
    def __init__(self, layout: Model1CacheLayout, num_pages: int | None = None, device: str | torch.device = "cpu"):
        self.layout, self.growable = layout, num_pages is None
        self.pages = torch.zeros(num_pages or 0, layout.page_bytes, dtype=torch.uint8, device=device)
        self._free = list(range(self.pages.shape[0] - 1, -1, -1))
        self._refs = [0] * self.pages.shape[0]
        self.on_exhausted: Callable[[], bool] | None = None  # frees some pages (True) or cannot (False)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.pages.shape[0] - len(self._free)

    def allocate(self) -> int:
        """A free page's id, referenced once."""
        while not self._free:
            if self.growable:
                self._grow()
            elif self.on_exhausted is None or not self.on_exhausted():
                raise PoolExhausted(f"the FP8 cache pool's {self.pages.shape[0]} pages are all in use "
                                    "(raise cache_budget_bytes or lower max_num_seqs)")
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def retain(self, page: int) -> None:
        self._refs[page] += 1

    def release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def shared(self, page: int) -> bool:
        return self._refs[page] > 1

    def writable(self, page: int) -> int:
        """`page` itself if only one store references it, else a private copy (the shared one released)."""
        if not self.shared(page):
            return page
        fresh = self.allocate()
        self.pages[fresh] = self.pages[page]
        self.release(page)
        return fresh

    def _grow(self) -> None:
        old = self.pages.shape[0]
        more = max(old, 4)
        self.pages = torch.cat((self.pages, self.pages.new_zeros(more, self.layout.page_bytes)))
        self._refs += [0] * more
        self._free = list(range(old + more - 1, old - 1, -1)) + self._free

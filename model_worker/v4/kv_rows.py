"""Where a V4 decoding state keeps its shared key/value rows (a layer's sliding-window keys and its
compressed entries, [B, count, D] per layer): as they are (`FloatRows`, the lossless cache) or in FlashMLA's
MODEL1 FP8 layout (`Model1Rows`: 584 bytes per V4 token, `engram_kernels.mla_decode.model1_layout`), in pages
of `block_size` tokens from a pool shared by every sequence (`page_pool`); the window gives whole pages back as
it moves on. Both give the rows back as floats for
the attention (the FP8 rows dequantized: what a MODEL1 kernel reads)."""

from __future__ import annotations

import copy

import torch

from engram_kernels.mla_decode.model1_layout import (
    Model1CacheLayout,
    dequantize_tokens,
    page_views,
    quantize_tokens,
)
from model_worker.v4.page_pool import Model1PagePool


class FloatRows:
    """Rows in the model's dtype: rows() is exactly what was appended."""

    def __init__(self):
        self._rows: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return 0 if self._rows is None else self._rows.shape[1]

    def append(self, rows: torch.Tensor) -> None:
        """rows [B, n, D] after the stored ones."""
        self._rows = rows if self._rows is None else torch.cat((self._rows, rows), dim=1)

    def keep_last(self, n: int) -> None:
        """Forget all but the last n rows."""
        if self._rows is not None:
            self._rows = self._rows[:, max(self.count - n, 0):]

    def rows(self, like: torch.Tensor) -> torch.Tensor:
        """[B, count, D] (like: a tensor giving the batch, width, dtype and device when nothing is stored)."""
        return like.new_zeros(like.shape[0], 0, like.shape[-1]) if self._rows is None else self._rows

    def copy(self) -> FloatRows:
        return copy.copy(self)  # appending makes a new tensor: the copies never share a write

    def release(self) -> None:
        self._rows = None


class Model1Rows:
    """Rows as MODEL1 FP8 rows in pages of a `Model1PagePool`: `ids` int64 [B, P] are each batch row's pages in
    order, `first` the slot of the oldest kept row in the first page."""

    def __init__(self, pool: Model1PagePool):
        self.pool, self.layout = pool, pool.layout
        self.ids: torch.Tensor | None = None
        self.first = 0
        self.count = 0

    def append(self, rows: torch.Tensor) -> None:
        B, n, _ = rows.shape
        size = self.layout.block_size
        end = self.first + self.count
        if self.ids is not None and end % size:  # the last page is partly filled: write into a private copy
            self.ids[:, -1] = torch.tensor([self.pool.writable(int(p)) for p in self.ids[:, -1]])
        have = 0 if self.ids is None else self.ids.shape[1]
        needed = -(-(end + n) // size)
        if needed > have:
            fresh = torch.tensor([[self.pool.allocate() for _ in range(needed - have)] for _ in range(B)])
            self.ids = fresh if self.ids is None else torch.cat((self.ids, fresh), dim=1)
        slots = torch.arange(end, end + n)
        data, scales = page_views(self.pool.pages, self.layout)  # [N, size, 576], [N, size, 8]
        pages, slot = self.ids[:, slots // size].to(self.pool.pages.device), (slots % size).to(self.pool.pages.device)
        data[pages, slot], scales[pages, slot] = quantize_tokens(rows, self.layout)
        self.count += n

    def keep_last(self, n: int) -> None:
        """Forget all but the last n rows; pages that hold only forgotten rows go back to the pool."""
        drop = max(self.count - n, 0)
        self.first, self.count = self.first + drop, self.count - drop
        whole = self.first // self.layout.block_size
        if whole and self.ids is not None:
            for page in self.ids[:, :whole].flatten().tolist():
                self.pool.release(page)
            self.ids, self.first = self.ids[:, whole:], self.first - whole * self.layout.block_size

    def rows(self, like: torch.Tensor) -> torch.Tensor:
        if self.ids is None or not self.count:
            return like.new_zeros(like.shape[0], 0, like.shape[-1])
        data, scales = page_views(self.pool.pages[self.ids.to(self.pool.pages.device)], self.layout)  # [B, P, ...]
        flat = dequantize_tokens(data.flatten(1, 2), scales.flatten(1, 2), self.layout)  # [B, P*size, D]
        return flat[:, self.first: self.first + self.count].to(like.dtype)

    @property
    def nbytes(self) -> int:
        return 0 if self.ids is None else self.ids.numel() * self.layout.page_bytes

    def copy(self) -> Model1Rows:
        twin = copy.copy(self)
        if self.ids is not None:
            twin.ids = self.ids.clone()
            for page in self.ids.flatten().tolist():
                self.pool.retain(page)
        return twin

    def release(self) -> None:
        """Give every page back to the pool (the rows are gone)."""
        if self.ids is not None:
            for page in self.ids.flatten().tolist():
                self.pool.release(page)
        self.ids, self.first, self.count = None, 0, 0


def model1_layout(head_dim: int, rope_dim: int, block_size: int = 64) -> Model1CacheLayout:
    """The MODEL1 layout of a V4 model's rows: the nope part in e4m3 tiles of 64 (V4: 448 = 7 tiles), or of the
    largest width up to 64 that divides it in at most 8 tiles for smaller test models; the rope part in bf16."""
    nope = head_dim - rope_dim
    tile = next((t for t in range(min(64, nope), 0, -1) if nope % t == 0 and nope // t <= 8), None)
    if tile is None:
        raise ValueError(f"no MODEL1 tiling for a nope width of {nope}")
    return Model1CacheLayout(nope_dim=nope, rope_dim=rope_dim, tile=tile, block_size=block_size)

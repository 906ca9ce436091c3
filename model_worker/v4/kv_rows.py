"""Where a V4 decoding state keeps its shared key/value rows (a layer's sliding-window keys and its
compressed entries, [B, count, D] per layer): as they are (`FloatRows`, the lossless cache) or in FlashMLA's
MODEL1 FP8 layout (`Model1Rows`: 584 bytes per V4 token, `engram_kernels.mla_decode.model1_layout`), in pages
of `block_size` tokens; the window drops whole pages as it moves on. Both give the rows back as floats for
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


class Model1Rows:
    """Rows as MODEL1 FP8 pages uint8 [B, pages, page_bytes]; `first` is the slot of the oldest kept row."""

    def __init__(self, layout: Model1CacheLayout):
        self.layout = layout
        self._pages: torch.Tensor | None = None
        self.first = 0
        self.count = 0

    def append(self, rows: torch.Tensor) -> None:
        B, n, _ = rows.shape
        size = self.layout.block_size
        needed = -(-(self.first + self.count + n) // size)
        have = 0 if self._pages is None else self._pages.shape[1]
        if needed > have:
            fresh = torch.zeros(B, needed - have, self.layout.page_bytes, dtype=torch.uint8, device=rows.device)
            self._pages = fresh if self._pages is None else torch.cat((self._pages, fresh), dim=1)
        slots = torch.arange(self.first + self.count, self.first + self.count + n, device=rows.device)
        data, scales = page_views(self._pages, self.layout)  # [B, P, size, 576], [B, P, size, 8]
        page, slot = slots // size, slots % size
        data[:, page, slot], scales[:, page, slot] = quantize_tokens(rows, self.layout)
        self.count += n

    def keep_last(self, n: int) -> None:
        """Forget all but the last n rows; pages that hold only forgotten rows are released."""
        drop = max(self.count - n, 0)
        self.first, self.count = self.first + drop, self.count - drop
        whole = self.first // self.layout.block_size
        if whole and self._pages is not None:
            self._pages, self.first = self._pages[:, whole:], self.first - whole * self.layout.block_size

    def rows(self, like: torch.Tensor) -> torch.Tensor:
        if self._pages is None or not self.count:
            return like.new_zeros(like.shape[0], 0, like.shape[-1])
        data, scales = page_views(self._pages, self.layout)
        flat = dequantize_tokens(data.flatten(1, 2), scales.flatten(1, 2), self.layout)  # [B, P*size, D]
        return flat[:, self.first: self.first + self.count].to(like.dtype)

    @property
    def nbytes(self) -> int:
        return 0 if self._pages is None else self._pages.numel()

    def copy(self) -> Model1Rows:
        twin = copy.copy(self)
        twin._pages = None if self._pages is None else self._pages.clone()  # appends write into the last page
        return twin


def model1_layout(head_dim: int, rope_dim: int, block_size: int = 64) -> Model1CacheLayout:
    """The MODEL1 layout of a V4 model's rows: the nope part in e4m3 tiles of 64 (V4: 448 = 7 tiles), or of the
    largest width up to 64 that divides it in at most 8 tiles for smaller test models; the rope part in bf16."""
    nope = head_dim - rope_dim
    tile = next((t for t in range(min(64, nope), 0, -1) if nope % t == 0 and nope // t <= 8), None)
    if tile is None:
        raise ValueError(f"no MODEL1 tiling for a nope width of {nope}")
    return Model1CacheLayout(nope_dim=nope, rope_dim=rope_dim, tile=tile, block_size=block_size)

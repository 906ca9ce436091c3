"""PagedLatentCache: the tensors that hold every layer's MLA latent KV cache, page by page.

Per layer, storage is one tensor [num_blocks, block_size, row_width]; a token lives in slot
`block_id * block_size + offset`. Each token row stores the normalised latent c [kv_lora_rank] and
the rotated shared key k_rope [rope_dim] in one of two formats (defined in
`engram_kernels.mla_decode.layout`, which the decode kernel reads the same way):

    "bf16": bfloat16 [r + rope]                        -> 2 * (r + rope) bytes   (1152 for V3)
    "fp8" : uint8    [r | 4 * r/tile | 2 * rope]        -> FlashMLA V3.2 layout   (656 for V3)
            r e4m3 latent bytes in tiles of min(128, r); one little-endian fp32 scale per tile
            (scale = max(amax, 1e-4) / 448, value = e4m3 * scale); then k_rope in bf16.

This module only stores and reads rows by slot. Which pages a sequence owns (allocation, ref counts,
prefix hashes) is the BlockManager's job; attention over the pages is `engram_kernels.mla_decode`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engram_kernels.mla_decode.layout import LatentCacheLayout, pack_tokens, unpack_tokens


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PagedLatentCache:
    """All layers' paged latent KV storage for one model."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        kv_lora_rank: int,
        rope_dim: int,
        fmt: str = "bf16",
        block_size: int = 64,
        device: torch.device | str = "cpu",
    ):
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        self.block_size = _positive_int("block_size", block_size)
        self.layout = LatentCacheLayout(kv_lora_rank, rope_dim, fmt)
        self.kv_lora_rank, self.rope_dim, self.fmt = kv_lora_rank, rope_dim, fmt
        shape = (num_blocks, block_size, self.layout.row_width)
        # zeros, not empty: a never-written slot reads back as finite values in every format
        self._storage = [torch.zeros(shape, dtype=self.layout.storage_dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(kv_lora_rank: int, rope_dim: int, fmt: str) -> int:
        """Bytes one token takes in one layer: 656 (fp8) or 1152 (bf16) for V3's (512, 64)."""
        return LatentCacheLayout(kv_lora_rank, rope_dim, fmt).bytes_per_token

    @property
    def num_slots(self) -> int:
        """Tokens per layer the cache can hold."""
        return self.num_blocks * self.block_size

    @property
    def measured_bytes_per_token_per_layer(self) -> int:
        """Bytes actually allocated, divided by slots and layers (equals `bytes_per_token`)."""
        total = sum(t.numel() * t.element_size() for t in self._storage)
        return total // (self.num_slots * self.num_layers)

    def layer_storage(self, layer: int) -> torch.Tensor:
        """The [num_blocks, block_size, row_width] tensor of one layer, as the decode kernel reads it."""
        return self._storage[self._check_layer(layer)]

    def write(self, layer: int, slot_mapping: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
              check_slots: bool = True) -> None:
        """Store N tokens: slot_mapping int64 [N] (block_id * block_size + offset), latent [N, r],
        k_rope [N, rope] (any float dtype). FP8 quantizes per tile of the latent; rope stays bf16.
        check_slots=False skips the slot range check (a host sync), for callers that checked the step's
        slots once for all layers (`check_slot_range`)."""
        storage = self.layer_storage(layer)
        rows = pack_tokens(self.layout, latent, k_rope)  # [N, row_width]; validates latent and k_rope
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int64, torch.int32):
            got = getattr(slot_mapping, "dtype", type(slot_mapping).__name__)
            raise TypeError(f"slot_mapping must be an int64 (or int32) tensor, got {got}")
        if tuple(slot_mapping.shape) != (rows.shape[0],):
            raise ValueError(f"slot_mapping must have shape [N] = [{rows.shape[0]}], got {tuple(slot_mapping.shape)}")
        if rows.shape[0] == 0:
            return
        if check_slots:
            self.check_slot_range(slot_mapping)
        if slot_mapping.device != storage.device or slot_mapping.dtype != torch.int64:
            slot_mapping = slot_mapping.to(device=storage.device, dtype=torch.int64)
        storage.view(self.num_slots, -1)[slot_mapping] = rows.to(storage.device)

    def check_slot_range(self, slot_mapping: torch.Tensor) -> None:
        """Raise unless every slot lies in [0, num_slots)."""
        if slot_mapping.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(slot_mapping))
        if low < 0 or high >= self.num_slots:
            raise ValueError(f"slot_mapping: slots must lie in [0, {self.num_slots}), got min {low} max {high}")

    def gather(
        self, layer: int, block_table: Sequence[int] | torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first `length` tokens, dequantized: (latent [length, r], k_rope [length, rope]) fp32.

        block_table: the sequence's page ids in logical order (list or int tensor), covering `length`.
        """
        storage = self.layer_storage(layer)
        if isinstance(block_table, torch.Tensor):
            pages = block_table.to(storage.device)
        else:
            pages = torch.tensor(list(block_table), dtype=torch.int64, device=storage.device)
        if pages.dim() != 1 or pages.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"block_table must be 1-D int page ids, got {pages.dtype} {tuple(pages.shape)}")
        capacity = pages.numel() * self.block_size
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= capacity:
            raise ValueError(f"length must be an int in [0, {capacity}] (pages * block_size), got {length!r}")
        pos = torch.arange(length, device=storage.device)  # [length]
        used = pages[: -(-length // self.block_size)].long()
        if used.numel() and not all(0 <= int(v) < self.num_blocks for v in torch.aminmax(used)):
            raise ValueError(f"block_table: page ids must lie in [0, {self.num_blocks})")
        rows = storage[used[pos // self.block_size], pos % self.block_size]  # [length, row_width]
        return unpack_tokens(self.layout, rows)

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

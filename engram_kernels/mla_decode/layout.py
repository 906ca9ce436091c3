"""Byte layout of one token's entry in the paged latent KV cache, and packing to / unpacking from it.

Per token per layer MLA caches the normalised latent c [r = kv_lora_rank] and the rotated shared key
k_rope [rope_dim]. A page holds `block_size` consecutive tokens; storage of one layer is
[num_blocks, block_size, row_width] and a token's row is one of the three formats below.

"bf16": torch.bfloat16 [r + rope_dim] = c values, then k_rope values. 2 * (r + rope) bytes
    (1152 for V3's 512 + 64).

"fp32": torch.float32 [r + rope_dim], the same order, lossless for an fp32 model. 4 * (r + rope) bytes.

"fp8" (FlashMLA's V3.2 layout, generalised): torch.uint8 [bytes_per_token], packed as

    offset 0                 r bytes         c quantized to float8_e4m3fn, tile after tile
    offset r                 4 * n_tiles     one float32 scale per tile (native little-endian)
    offset r + 4 * n_tiles   2 * rope_dim    k_rope in bfloat16 (not quantized)

    tile = min(128, r) and n_tiles = r / tile; a tile's scale = max(amax, 1e-4) / 448 and its
    values are e4m3(c / scale), so c ~= e4m3 * scale. V3 (512, 64): 512 + 16 + 128 = 656 bytes.
    Requirements: r <= 128 or r % 128 == 0, r % 4 == 0 and rope_dim even, so that scales and
    rope values sit at 4- and 2-byte aligned offsets in every row.

Pages, slots and block tables are the cache's and the kernel's business, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engram_kernels.quant import quantize_fp8_block
from engram_kernels.quant.fp8_format import BLOCK_SIZES, FP8_DTYPE, check_float, one_byte_float_to_float32

CACHE_FORMATS = ("bf16", "fp32", "fp8")
_PLAIN = {"bf16": torch.bfloat16, "fp32": torch.float32}  # formats that store [c | k_rope] as is
MAX_TILE = 128
SCALE_BYTES = 4  # float32
ROPE_BYTES = 2  # bfloat16


@dataclass(frozen=True)
class LatentCacheLayout:
    """Where c, its scales and k_rope live inside one token's cache row."""

    kv_lora_rank: int
    rope_dim: int
    fmt: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "rope_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.fmt not in CACHE_FORMATS:
            raise ValueError(f"fmt must be one of {CACHE_FORMATS}, got {self.fmt!r}")
        if self.fmt == "fp8":
            r = self.kv_lora_rank
            if r > MAX_TILE and r % MAX_TILE:
                raise ValueError(f"kv_lora_rank must be <= {MAX_TILE} or a multiple of it for fp8, got {r}")
            if r % SCALE_BYTES:
                raise ValueError(f"kv_lora_rank must be a multiple of {SCALE_BYTES} for fp8, got {r}")
            if self.rope_dim % 2:
                raise ValueError(f"rope_dim must be even for fp8, got {self.rope_dim}")

    @property
    def tile(self) -> int:
        """Latent values sharing one fp32 scale (fp8 only)."""
        return min(MAX_TILE, self.kv_lora_rank)

    @property
    def num_tiles(self) -> int:
        return self.kv_lora_rank // self.tile

    @property
    def scale_offset(self) -> int:
        """Byte offset of the first tile scale in an fp8 row."""
        return self.kv_lora_rank

    @property
    def rope_offset(self) -> int:
        """Byte offset of k_rope in an fp8 row."""
        return self.kv_lora_rank + SCALE_BYTES * self.num_tiles

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's row (one layer): 656 for V3 dims in fp8, 1152 in bf16."""
        if self.fmt in _PLAIN:
            return _PLAIN[self.fmt].itemsize * (self.kv_lora_rank + self.rope_dim)
        return self.rope_offset + ROPE_BYTES * self.rope_dim

    @property
    def storage_dtype(self) -> torch.dtype:
        return _PLAIN.get(self.fmt, torch.uint8)

    @property
    def is_plain(self) -> bool:
        """Rows hold [c | k_rope] as plain floats (bf16, fp32): no scales to apply."""
        return self.fmt in _PLAIN

    @property
    def row_width(self) -> int:
        """Elements of `storage_dtype` per token row."""
        return self.bytes_per_token // torch.empty((), dtype=self.storage_dtype).element_size()


def _quantize_tiles(latent: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [N, r] -> (e4m3 [N, r], scale fp32 [N, r / tile]) with one scale per `tile` values.

    Tiles narrower than a supported quant block are zero-padded to one: zeros do not change amax.
    """
    n, r = latent.shape
    block = min(b for b in BLOCK_SIZES if b >= tile)
    tiles = F.pad(latent.reshape(n, r // tile, tile), (0, block - tile))  # [N, n_tiles, block]
    q, scale = quantize_fp8_block(tiles, block=block)  # [N, n_tiles, block], [N, n_tiles, 1]
    return q[..., :tile].reshape(n, r), scale.reshape(n, r // tile)


def pack_tokens(layout: LatentCacheLayout, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """latent [N, r], k_rope [N, rope] (any float dtype) -> cache rows [N, row_width] of `storage_dtype`."""
    check_float(latent, "latent", min_dim=2)
    check_float(k_rope, "k_rope", min_dim=2)
    n = latent.shape[0]
    if latent.dim() != 2 or latent.shape[1] != layout.kv_lora_rank:
        raise ValueError(f"latent must have shape [N, {layout.kv_lora_rank}], got {tuple(latent.shape)}")
    if tuple(k_rope.shape) != (n, layout.rope_dim):
        raise ValueError(f"k_rope must have shape [{n}, {layout.rope_dim}], got {tuple(k_rope.shape)}")
    if layout.is_plain:  # each value rounded once, as separately
        return torch.cat((latent, k_rope), dim=-1).to(layout.storage_dtype)
    rope_bf16 = k_rope.to(torch.bfloat16)
    q, scale = _quantize_tiles(latent.float(), layout.tile)
    parts = (q.view(torch.uint8), scale.contiguous().view(torch.uint8), rope_bf16.contiguous().view(torch.uint8))
    return torch.cat(parts, dim=-1)  # [N, bytes_per_token]


def unpack_tokens(layout: LatentCacheLayout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows [..., row_width] -> (latent [..., r], k_rope [..., rope]) dequantized to float32."""
    if rows.dtype != layout.storage_dtype or rows.shape[-1] != layout.row_width:
        raise ValueError(
            f"rows must be {layout.storage_dtype} [..., {layout.row_width}], got {rows.dtype} {tuple(rows.shape)}"
        )
    r = layout.kv_lora_rank
    if layout.is_plain:
        return rows[..., :r].float(), rows[..., r:].float()
    q = one_byte_float_to_float32(rows[..., :r].view(FP8_DTYPE))  # [..., r]
    scale = rows[..., layout.scale_offset : layout.rope_offset].contiguous().view(torch.float32)  # [..., n_tiles]
    latent = (q.unflatten(-1, (layout.num_tiles, layout.tile)) * scale[..., None]).flatten(-2)
    k_rope = rows[..., layout.rope_offset :].contiguous().view(torch.bfloat16).float()
    return latent, k_rope

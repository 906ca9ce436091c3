"""FlashMLA's MODEL1 FP8 page layout: DeepSeek-V4's shared-KV cache, 584 bytes per token.

V4 attention caches one shared key/value vector per token (head_dim 512 = 448 "nope" values + 64 rotated
rope values), the same way in its sliding-window branch and in its compressed entries. In FP8 a page of
`block_size` tokens is stored structure-of-arrays, as FlashMLA's MODEL1 kernels read it:

    offset 0                        block_size x (nope + 2 * rope) bytes: per token, the nope values in
                                    float8_e4m3fn, then the rope values in bfloat16 (448 + 128 = 576 B)
    offset block_size x 576         block_size x 8 bytes: per token, one float8_e8m0fnu scale per tile of
                                    64 nope values (7 tiles), then 1 pad byte
    then zero padding               up to a multiple of 576 bytes (the page's size in memory)

so 584 bytes per token. A tile's scale is a power of two, 2^ceil(log2(max(amax / 448, 1e-4))) (ue8m0:
just an exponent byte), and its values are e4m3(x / scale); x ~= e4m3 * scale, exactly representable in
bfloat16 and float32. Smaller test models keep the same rules with their own sizes (`Model1CacheLayout`).

Pages, slots and block tables are the cache's business, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
MIN_SCALE = 1e-4
SCALE_SLOT_BYTES = 8  # 7 tile scales + 1 pad byte per token (V4: 448 / 64 tiles)


@dataclass(frozen=True)
class Model1CacheLayout:
    """Sizes of one page: `nope_dim` e4m3 values in tiles of `tile`, `rope_dim` bf16 values, `block_size` tokens."""

    nope_dim: int = 448
    rope_dim: int = 64
    tile: int = 64
    block_size: int = 64

    def __post_init__(self) -> None:
        for name in ("nope_dim", "rope_dim", "tile", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.nope_dim % self.tile:
            raise ValueError(f"nope_dim ({self.nope_dim}) must be a multiple of tile ({self.tile})")
        if self.num_tiles > SCALE_SLOT_BYTES:
            raise ValueError(f"at most {SCALE_SLOT_BYTES} tiles per token, got {self.num_tiles}")

    @property
    def num_tiles(self) -> int:
        return self.nope_dim // self.tile

    @property
    def head_dim(self) -> int:
        return self.nope_dim + self.rope_dim

    @property
    def token_data_bytes(self) -> int:
        """One token's nope + rope bytes: 576 for V4."""
        return self.nope_dim + 2 * self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        """584 for V4: data plus its scale slot (page padding aside)."""
        return self.token_data_bytes + SCALE_SLOT_BYTES

    @property
    def scales_offset(self) -> int:
        """Byte offset of the first token's scales in a page."""
        return self.block_size * self.token_data_bytes

    @property
    def page_bytes(self) -> int:
        """A page's size: block_size x bytes_per_token rounded up to a multiple of token_data_bytes."""
        used = self.block_size * self.bytes_per_token
        return -(-used // self.token_data_bytes) * self.token_data_bytes


def tile_scales(x: torch.Tensor, layout: Model1CacheLayout) -> torch.Tensor:
    """Power-of-two scales of the nope tiles: x [..., head_dim] -> [..., num_tiles] float32."""
    nope = x[..., : layout.nope_dim].float().unflatten(-1, (layout.num_tiles, layout.tile))
    return torch.exp2(torch.log2((nope.abs().amax(dim=-1) / E4M3_MAX).clamp_min(MIN_SCALE)).ceil())


def quantize_tokens(kv: torch.Tensor, layout: Model1CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """kv [..., head_dim] (any float dtype) -> each token's bytes: (data uint8 [..., token_data_bytes]: nope
    e4m3 then rope bf16; scale slot uint8 [..., 8]: the e8m0 tile scales then padding). Tokens are
    independent, so a page is its tokens' bytes laid out (`quantize_pages`)."""
    scales = tile_scales(kv, layout)  # [..., tiles]
    nope = kv[..., : layout.nope_dim].float().unflatten(-1, (layout.num_tiles, layout.tile)) / scales[..., None]
    nope_bytes = nope.flatten(-2).to(torch.float8_e4m3fn).view(torch.uint8)  # [..., nope]
    rope_bytes = kv[..., layout.nope_dim:].to(torch.bfloat16).contiguous().view(torch.uint8)  # [..., 2 * rope]
    slots = torch.zeros(*kv.shape[:-1], SCALE_SLOT_BYTES, dtype=torch.uint8, device=kv.device)
    slots[..., : layout.num_tiles] = scales.to(torch.float8_e8m0fnu).view(torch.uint8)
    return torch.cat((nope_bytes, rope_bytes), dim=-1), slots


def page_views(pages: torch.Tensor, layout: Model1CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Writable views of pages uint8 [..., page_bytes]: (token data [..., block_size, token_data_bytes], scale
    slots [..., block_size, 8])."""
    data = pages[..., : layout.scales_offset].unflatten(-1, (layout.block_size, layout.token_data_bytes))
    end = layout.scales_offset + layout.block_size * SCALE_SLOT_BYTES
    return data, pages[..., layout.scales_offset: end].unflatten(-1, (layout.block_size, SCALE_SLOT_BYTES))


def dequantize_tokens(data: torch.Tensor, slots: torch.Tensor, layout: Model1CacheLayout) -> torch.Tensor:
    """Token bytes (`quantize_tokens`' two fields: [..., token_data_bytes], [..., 8]) -> kv float32 [..., D]."""
    nope = data[..., : layout.nope_dim].view(torch.float8_e4m3fn)
    rope = data[..., layout.nope_dim:].contiguous().view(torch.bfloat16)
    scales = slots[..., : layout.num_tiles].contiguous().view(torch.float8_e8m0fnu)
    values = nope.float().unflatten(-1, (layout.num_tiles, layout.tile)) * scales.float()[..., None]
    return torch.cat((values.flatten(-2), rope.float()), dim=-1)


def quantize_pages(kv: torch.Tensor, layout: Model1CacheLayout) -> torch.Tensor:
    """kv [num_pages, block_size, head_dim] (any float dtype) -> pages uint8 [num_pages, page_bytes]."""
    if kv.dim() != 3 or tuple(kv.shape[1:]) != (layout.block_size, layout.head_dim) or not kv.is_floating_point():
        raise ValueError(f"kv must be a float tensor [num_pages, {layout.block_size}, {layout.head_dim}], "
                         f"got {kv.dtype} {tuple(kv.shape)}")
    out = torch.zeros(kv.shape[0], layout.page_bytes, dtype=torch.uint8, device=kv.device)
    data, slots = page_views(out, layout)
    data[...], slots[...] = quantize_tokens(kv, layout)
    return out


def token_fields(pages: torch.Tensor, layout: Model1CacheLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the fields of pages uint8 [num_pages, page_bytes]: (nope e4m3 [P, T, nope], rope bf16 [P, T, rope],
    scales e8m0 [P, T, num_tiles])."""
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != layout.page_bytes:
        raise ValueError(f"pages must be uint8 [num_pages, {layout.page_bytes}], "
                         f"got {pages.dtype} {tuple(pages.shape)}")
    data, slots = page_views(pages, layout)
    nope = data[..., : layout.nope_dim].view(torch.float8_e4m3fn)
    rope = data[..., layout.nope_dim:].contiguous().view(torch.bfloat16)
    return nope, rope, slots[..., : layout.num_tiles].contiguous().view(torch.float8_e8m0fnu)


def dequantize_pages(pages: torch.Tensor, layout: Model1CacheLayout) -> torch.Tensor:
    """pages uint8 [num_pages, page_bytes] -> kv float32 [num_pages, block_size, head_dim]."""
    token_fields(pages, layout)  # checks the shape
    return dequantize_tokens(*page_views(pages, layout), layout)

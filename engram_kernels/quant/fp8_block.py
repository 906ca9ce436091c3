"""Per-token FP8 block quantization of activations: torch reference and dispatchers.

Along the last dim, every `block` values share one scale: scale = max(amax, 1e-4) / 448 (with
`scale_fmt="ue8m0"` rounded up to a power of two) and q = clamp(x / scale, -448, 448) in E4M3.
The reference below is the definition; `fp8_block_kernel` is the Triton kernel that must match it.
2-D weight tiles live in `fp8_weight`; nothing here multiplies matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_kernels.dispatch import dispatched
from engram_kernels.quant.fp8_block_kernel import dequantize_fp8_block_triton, quantize_fp8_block_triton
from engram_kernels.quant.fp8_format import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    check_block,
    check_float,
    check_fp8_blocks,
    check_out_dtype,
    check_scale_fmt,
    num_blocks,
    one_byte_float_to_float32,
    round_scale_up_pow2,
)


def quantize_fp8_block_ref(
    x: torch.Tensor, block: int = 128, scale_fmt: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per `block` values of the last dim.

    Returns q float8_e4m3fn [..., K] and scale float32 [..., ceil(K / block)], with x ~= q * scale
    blockwise. The last block may be partial; its amax covers only the values present.
    """
    check_float(x, "x")
    check_block(block)
    check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    nb = num_blocks(k, block)
    padded = F.pad(x.float(), (0, nb * block - k))  # [..., nb * block], zeros do not change amax
    blocks = padded.unflatten(-1, (nb, block))  # [..., nb, block]
    amax = blocks.abs().amax(dim=-1)  # [..., nb]
    scale = amax.clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX  # [..., nb]
    if scale_fmt == "ue8m0":
        scale = round_scale_up_pow2(scale)
    q = (blocks / scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :k].contiguous(), scale


def dequantize_fp8_block_ref(
    q: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x [..., K] = q [..., K] times the scale [..., ceil(K / block)] of its block, cast to `dtype`."""
    check_fp8_blocks(q, scale, block)
    check_out_dtype(dtype)
    per_value = scale.repeat_interleave(block, dim=-1)[..., : q.shape[-1]]  # [..., K]
    return (one_byte_float_to_float32(q) * per_value).to(dtype)


quantize_fp8_block = dispatched(quantize_fp8_block_ref, quantize_fp8_block_triton)


dequantize_fp8_block = dispatched(dequantize_fp8_block_ref, dequantize_fp8_block_triton)

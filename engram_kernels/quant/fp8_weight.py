"""DeepSeek FP8 weights (block x block tiles, one fp32 `weight_scale_inv` each): reference and dispatcher.

A weight w [N, K] is stored as w_q float8_e4m3fn [N, K] plus scale_inv float32
[ceil(N / block), ceil(K / block)]; the real weight is each tile of w_q times its scale_inv. The
reference below is the definition; `fp8_weight_kernel` is the Triton dequantizer that must match it.
Weights are quantized offline, so there is no Triton quantizer; per-token activation blocks live in
`fp8_block`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_kernels.dispatch import dispatched
from engram_kernels.quant.fp8_format import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    check_block,
    check_float,
    check_fp8_weight,
    check_out_dtype,
    one_byte_float_to_float32,
    weight_scale_shape,
)
from engram_kernels.quant.fp8_weight_kernel import dequantize_fp8_weight_triton


def quantize_fp8_weight_ref(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [N, K] per block x block tile.

    Returns w_q float8_e4m3fn [N, K] and scale_inv float32 [ceil(N/block), ceil(K/block)] with
    scale_inv = max(amax_of_tile, 1e-4) / 448; edge tiles may be partial.
    """
    check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    check_block(block)
    n, k = w.shape
    nb_n, nb_k = weight_scale_shape(n, k, block)
    padded = F.pad(w.float(), (0, nb_k * block - k, 0, nb_n * block - n))  # [nb_n * b, nb_k * b]
    tiles = padded.view(nb_n, block, nb_k, block)
    amax = tiles.abs().amax(dim=(1, 3))  # [nb_n, nb_k]
    scale_inv = amax.clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX
    w_q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return w_q.view(nb_n * block, nb_k * block)[:n, :k].contiguous(), scale_inv


def dequantize_fp8_weight_ref(
    w_q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w [N, K] = each block x block tile of w_q [N, K] times its scale_inv, cast to `dtype`."""
    check_fp8_weight(w_q, scale_inv, block)
    check_out_dtype(dtype)
    n, k = w_q.shape
    per_value = scale_inv.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)[:n, :k]
    return (one_byte_float_to_float32(w_q) * per_value).to(dtype)


dequantize_fp8_weight = dispatched(dequantize_fp8_weight_ref, dequantize_fp8_weight_triton)

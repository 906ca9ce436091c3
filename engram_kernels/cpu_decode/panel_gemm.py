"""Panel-packed fp32 GEMM on the CPU (`panel_gemm.h`): the weight read as one sequential stream per thread.

    panel_pack(weight [..., N, K]) -> [..., ceil(N / PW), K, PW]   (PW = `panel_width()`, zero-padded)
    y = addend + alpha * x @ weight^T                              (`panel_gemm`, from the packed weight)
    y[rows of g] = x[rows of g] @ weight[g]^T for each group g     (`grouped_panel_gemm`: a MoE layer's experts)

Packing costs one extra copy of the weight, made once at load (`model_worker.execution.panel_packs`); in return
the kernel reads a few rows' weights at the memory bandwidth and runs many rows (prefill) near the FMA
peak, where torch's kernels read small weights at half of it (benchmarks/weight_layout.py). The
definition is `decode_gemm_ref` on the unpacked weight.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from engram_kernels.cpu_decode import native
from engram_kernels.cpu_decode.decode_gemm import addend_operand, check_out, checked_offsets, kernels_or_raise


def panel_width(lib: ctypes.CDLL | None = None) -> int:
    """Output columns per panel of the kernels built here (32 with AVX-512, 16 with AVX2), or 0 where they
    are unavailable; lib: another build of them (tests build each ISA)."""
    lib = lib or native.load()
    return int(lib.engram_panel_width()) if lib is not None else 0


def panel_pack(weight: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """weight [..., N, K] fp32 -> a new contiguous [..., ceil(N / width), K, width]: panel p holds output
    columns p * width to p * width + width - 1, column k of all of them together; the last panel is
    zero-padded. width: `panel_width()` unless given."""
    width = width or panel_width()
    if width <= 0:
        raise RuntimeError(f"panel_pack: no panel kernel here ({native.unavailable_reason()})")
    if weight.dim() < 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"panel_pack takes a CPU fp32 weight [..., N, K], got {weight.dtype} "
                         f"{list(weight.shape)} on {weight.device}")
    *lead, n, k = weight.shape
    panels = -(-n // width)
    with torch.inference_mode(False), torch.no_grad():
        padded = F.pad(weight.detach(), (0, 0, 0, panels * width - n))  # [..., panels * width, K]
        return padded.view(*lead, panels, width, k).transpose(-1, -2).contiguous()


def panel_unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of `panel_pack`: [..., panels, K, width] -> [..., out_features, K]."""
    *lead, panels, k, width = packed.shape
    return packed.transpose(-1, -2).reshape(*lead, panels * width, k)[..., :out_features, :]


def _check_packed(x: torch.Tensor, packed: torch.Tensor, out_features: int, dims: int, op: str) -> None:
    """ValueError unless x is CPU fp32 [M, K] with unit stride along K, packed a contiguous CPU fp32
    panel pack of `dims` dims ([..., panels, K, PW]) for out_features columns, and no gradient is wanted."""
    width = panel_width()
    fits = (packed.dim() == dims and packed.dtype == torch.float32 and packed.device.type == "cpu"
            and packed.is_contiguous() and packed.shape[-1] == width
            and (packed.shape[-3] - 1) * width < out_features <= packed.shape[-3] * width)
    takes_x = (x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and fits
               and x.shape[1] == packed.shape[-2] and (x.stride(1) == 1 or x.shape[1] == 1))
    if not takes_x or (torch.is_grad_enabled() and (x.requires_grad or packed.requires_grad)):
        raise ValueError(f"{op} takes CPU fp32 x [M, K] with unit stride along K and a contiguous fp32 panel pack "
                         f"(panel_pack) of {dims} dims [..., panels, K, {width}] for {out_features} columns, no "
                         f"gradient; got x {x.dtype} {list(x.shape)} strides {x.stride()}, packed {packed.dtype} "
                         f"{list(packed.shape)}")


def panel_gemm(x: torch.Tensor, packed: torch.Tensor, out_features: int, addend: torch.Tensor | None = None,
               alpha: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """addend + alpha * x @ weight^T with packed = panel_pack(weight [out_features, K]): x [M, K] fp32 with unit
    stride along K; addend [M, N] (any row stride, unit column stride; it may be `out`), a [N] row added to
    every row, or None; out [M, N] fp32 to write into (new if None). -> [M, N]. Raises RuntimeError where the
    kernels are unavailable and ValueError for operands they do not take."""
    lib = kernels_or_raise("panel_gemm")
    _check_packed(x, packed, out_features, 3, "panel_gemm")
    rows = x.shape[0]
    check_out(out, rows, out_features, x.dtype)
    addend, addend_stride = addend_operand(addend, rows, out_features, x.dtype)
    result = out if out is not None else torch.empty(rows, out_features)
    if rows and out_features:
        lib.engram_panel_gemm_f32(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                  None if addend is None else addend.data_ptr(), addend_stride, result.data_ptr(),
                                  result.stride(0), rows, out_features, x.shape[1], float(alpha),
                                  torch.get_num_threads())
    return result


def grouped_panel_gemm(x: torch.Tensor, offsets: list[int], packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Each group's rows times its own weight, all groups in one call: x [P, K] fp32 (rows sorted by group;
    group g owns rows offsets[g] to offsets[g + 1]); packed = panel_pack(weight [G, out_features, K]) ->
    [P, out_features]. The definition is `grouped_decode_gemm_ref` on the unpacked stack."""
    lib = kernels_or_raise("grouped_panel_gemm")
    _check_packed(x, packed, out_features, 4, "grouped_panel_gemm")
    groups, rows = packed.shape[0], x.shape[0]
    bounds = checked_offsets(offsets, groups, rows)
    out = torch.empty(rows, out_features)
    if rows and out_features:
        lib.engram_grouped_panel_gemm_f32(x.data_ptr(), x.stride(0), (ctypes.c_int64 * len(bounds))(*bounds), groups,
                                          packed.data_ptr(), packed.stride(0), out.data_ptr(), out.stride(0),
                                          out_features, x.shape[1], torch.get_num_threads())
    return out

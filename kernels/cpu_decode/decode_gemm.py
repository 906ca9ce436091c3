"""Decode-sized fp32 GEMM on the CPU: `decode_gemm_ref` (the definition) and `decode_gemm` (the C kernel).

    y = addend + alpha * x @ weight^T        x [M, K], weight [N, K], addend [M, N] or [N] or None

The kernel (`decode_gemm.c`, built by `native`) is for the few rows of a decode step, where reading the
weight is the whole cost; model code reaches it through `model_worker.layers.linear`, which uses it only
where this host measured it faster than torch's kernels.
"""

from __future__ import annotations

import torch

from kernels.cpu_decode import native


def decode_gemm_ref(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor | None = None,
                    alpha: float = 1.0) -> torch.Tensor:
    """addend + alpha * x @ weight^T in torch. x [M, K]; weight [N, K]; addend [M, N], [N] or None -> [M, N]."""
    y = alpha * (x @ weight.t()) if alpha != 1.0 else x @ weight.t()
    return y if addend is None else addend + y


def decode_gemm_available() -> bool:
    """Whether the C kernel runs here (built on first call; see `native.unavailable_reason`)."""
    return native.load() is not None


def decode_gemm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_gemm` takes these operands as they are: fp32 CPU tensors, x [M, K] and weight [N, K]
    each with unit stride along K (any row stride), no gradient wanted."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 2 and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.shape[1] == weight.shape[1]
            and (x.stride(1) == 1 or x.shape[1] == 1) and (weight.stride(1) == 1 or weight.shape[1] == 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor | None = None, alpha: float = 1.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_gemm_ref` through the C kernel: x [M, K] and weight [N, K] fp32 with unit stride along K;
    addend [M, N] (any row stride, unit column stride; it may be `out`) or a [N] row added to every row;
    out [M, N] to write into (a new tensor if None). Raises RuntimeError where the kernel is unavailable
    and ValueError for operands it does not take."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"decode_gemm kernel unavailable: {native.unavailable_reason()}")
    if not decode_gemm_supports(x, weight):
        raise ValueError(f"decode_gemm takes fp32 CPU x [M, K] and weight [N, K] with unit stride along K and no "
                         f"gradient; got x {x.dtype} {list(x.shape)} strides {x.stride()}, weight {weight.dtype} "
                         f"{list(weight.shape)} strides {weight.stride()}")
    rows, cols = x.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty(rows, cols)
    elif out.shape != (rows, cols) or out.dtype != torch.float32 or out.device.type != "cpu" or \
            (out.stride(1) != 1 and cols > 1):
        raise ValueError(f"out must be fp32 CPU [{rows}, {cols}] with unit column stride, got {out.dtype} "
                         f"{list(out.shape)} strides {out.stride()}")
    addend_ptr, addend_stride = None, 0
    if addend is not None:
        if addend.dtype != torch.float32 or addend.device.type != "cpu":
            raise ValueError(f"addend must be fp32 on the CPU, got {addend.dtype} on {addend.device}")
        if addend.shape == (cols,) and (addend.stride(0) == 1 or cols == 1):
            addend_ptr, addend_stride = addend.data_ptr(), 0
        elif addend.shape == (rows, cols) and (addend.stride(1) == 1 or cols == 1):
            addend_ptr, addend_stride = addend.data_ptr(), addend.stride(0)
        else:
            raise ValueError(f"addend must be [{rows}, {cols}] or [{cols}] with unit column stride, got "
                             f"{list(addend.shape)} strides {addend.stride()}")
    if rows and cols:
        lib.engram_decode_gemm(x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), addend_ptr,
                               addend_stride, out.data_ptr(), out.stride(0), rows, cols, x.shape[1], float(alpha),
                               torch.get_num_threads())
    return out

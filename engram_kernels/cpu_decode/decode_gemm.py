"""Decode-sized fp32 GEMM on the CPU: `decode_gemm_ref` (the definition) and `decode_gemm` (the C kernel).

    y = addend + alpha * x @ weight^T        x [M, K], weight [N, K] (fp32 or bf16), addend [M, N] or [N] or None
    y[rows of g] = x[rows of g] @ weight[g]^T for each group g  (grouped: a MoE layer's experts in one call)

The kernel (`decode_gemm.c`, built by `native`) is for the few rows of a decode step, where reading the
weight is the whole cost; model code reaches it through `model_worker.layers.linear`, which uses it only
where this host measured it faster than torch's kernels.
"""

from __future__ import annotations

import ctypes

import torch

from engram_kernels.cpu_decode import native


def decode_gemm_ref(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor | None = None,
                    alpha: float = 1.0) -> torch.Tensor:
    """addend + alpha * x @ weight^T in torch. x [M, K]; weight [N, K]; addend [M, N], [N] or None -> [M, N]."""
    y = alpha * (x @ weight.t()) if alpha != 1.0 else x @ weight.t()
    return y if addend is None else addend + y


def kernels_or_raise(op: str) -> ctypes.CDLL:
    """The built library, or RuntimeError naming op and why the kernels are unavailable here."""
    lib = native.load()
    if lib is None:
        raise RuntimeError(f"{op} kernel unavailable: {native.unavailable_reason()}")
    return lib


def decode_gemm_available() -> bool:
    """Whether the C kernel runs here (built on first call; see `native.unavailable_reason`)."""
    return native.load() is not None


_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def decode_gemm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_gemm` takes these operands as they are: CPU tensors, both fp32 or both bf16, x [M, K]
    and weight [N, K] each with unit stride along K (any row stride), no gradient wanted."""
    return (x.dtype == weight.dtype and x.dtype in _KERNEL_DTYPES and x.dim() == 2 and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.shape[1] == weight.shape[1]
            and (x.stride(1) == 1 or x.shape[1] == 1) and (weight.stride(1) == 1 or weight.shape[1] == 1)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def decode_gemm(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor | None = None, alpha: float = 1.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_gemm_ref` through the C kernel: x [M, K] and weight [N, K], both fp32 or both bf16, with unit
    stride along K; the sum is accumulated in fp32 and returned in x's dtype. addend [M, N] (any row stride,
    unit column stride; it may be `out`) or a [N] row added to every row, fp32 or x's dtype; out [M, N] in
    x's dtype to write into (a new tensor if None). Raises RuntimeError where the kernel is unavailable and
    ValueError for operands it does not take."""
    lib = kernels_or_raise("decode_gemm")
    if not decode_gemm_supports(x, weight):
        raise ValueError(f"decode_gemm takes CPU x [M, K] and weight [N, K], both fp32 or both bf16, with unit stride "
                         f"along K and no gradient; got x {x.dtype} {list(x.shape)} strides {x.stride()}, weight "
                         f"{weight.dtype} {list(weight.shape)} strides {weight.stride()}")
    rows, cols = x.shape[0], weight.shape[0]
    check_out(out, rows, cols, x.dtype)
    addend, addend_stride = addend_operand(addend, rows, cols, x.dtype)
    addend_ptr = None if addend is None else addend.data_ptr()
    fp32 = x.dtype == torch.float32
    result = (out if out is not None else torch.empty(rows, cols)) if fp32 else torch.empty(rows, cols)
    if rows and cols:
        gemm = lib.engram_decode_gemm_f32 if fp32 else lib.engram_decode_gemm_bf16
        gemm(x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0), addend_ptr, addend_stride,
             result.data_ptr(), result.stride(0), rows, cols, x.shape[1], float(alpha), torch.get_num_threads())
    if fp32:
        return result
    return result.to(x.dtype) if out is None else out.copy_(result)


def check_out(out: torch.Tensor | None, rows: int, cols: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless out is None or a CPU [rows, cols] tensor of dtype with unit column stride."""
    if out is not None and (out.shape != (rows, cols) or out.dtype != dtype or out.device.type != "cpu"
                            or (out.stride(1) != 1 and cols > 1)):
        raise ValueError(f"out must be {dtype} CPU [{rows}, {cols}] with unit column stride, got {out.dtype} "
                         f"{list(out.shape)} strides {out.stride()}")


def addend_operand(addend: torch.Tensor | None, rows: int, cols: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor | None, int]:
    """(addend as fp32, its row stride for the kernels: 0 for a [cols] row added to every row), or (None, 0).
    Raises ValueError for an addend the kernels do not take."""
    if addend is None:
        return None, 0
    if addend.dtype not in (torch.float32, dtype) or addend.device.type != "cpu":
        raise ValueError(f"addend must be fp32 or {dtype} on the CPU, got {addend.dtype} on {addend.device}")
    addend = addend.float()  # the kernels add in fp32 (no copy for fp32)
    if addend.shape == (cols,) and (addend.stride(0) == 1 or cols == 1):
        return addend, 0
    if addend.shape == (rows, cols) and (addend.stride(1) == 1 or cols == 1):
        return addend, addend.stride(0)
    raise ValueError(f"addend must be [{rows}, {cols}] or [{cols}] with unit column stride, got "
                     f"{list(addend.shape)} strides {addend.stride()}")


def checked_offsets(offsets, groups: int, rows: int) -> list[int]:
    """offsets as ints, or ValueError unless they are groups + 1 non-decreasing ints from 0 to rows."""
    bounds = [int(b) for b in offsets]
    if len(bounds) != groups + 1 or bounds[0] != 0 or bounds[-1] != rows or \
            any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"offsets must be {groups + 1} non-decreasing ints from 0 to {rows}, got {bounds}")
    return bounds


def grouped_decode_gemm_ref(x: torch.Tensor, offsets: list[int], weight: torch.Tensor) -> torch.Tensor:
    """Each group's rows times its own weight, in torch: x [P, K] (rows sorted by group; group g owns rows
    offsets[g] to offsets[g + 1]); weight [G, N, K] -> [P, N]."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for g in range(weight.shape[0]):
        rows = slice(offsets[g], offsets[g + 1])
        out[rows] = x[rows] @ weight[g].t()
    return out


def grouped_decode_gemm(x: torch.Tensor, offsets: list[int], weight: torch.Tensor) -> torch.Tensor:
    """`grouped_decode_gemm_ref` through the C kernel, all groups in one call (a MoE layer's experts):
    x [P, K] fp32 with unit stride along K; offsets: G + 1 non-decreasing ints from 0 to P; weight
    [G, N, K] fp32 with unit stride along K (a stack of output-major weights) -> [P, N]."""
    lib = kernels_or_raise("grouped_decode_gemm")
    if weight.dim() != 3 or not decode_gemm_supports(x, weight[0] if weight.shape[0] else weight.view(0, 0)):
        raise ValueError(f"grouped_decode_gemm takes fp32 CPU x [P, K] and weight [G, N, K] with unit stride "
                         f"along K and no gradient; got x {x.dtype} {list(x.shape)} strides {x.stride()}, weight "
                         f"{weight.dtype} {list(weight.shape)} strides {weight.stride()}")
    groups, rows = weight.shape[0], x.shape[0]
    bounds = checked_offsets(offsets, groups, rows)
    out = torch.empty(rows, weight.shape[1])
    if rows and weight.shape[1]:
        lib.engram_grouped_decode_gemm(x.data_ptr(), x.stride(0), (ctypes.c_int64 * len(bounds))(*bounds), groups,
                                       weight.data_ptr(), weight.stride(0), weight.stride(1), out.data_ptr(),
                                       out.stride(0), weight.shape[1], x.shape[1], torch.get_num_threads())
    return out

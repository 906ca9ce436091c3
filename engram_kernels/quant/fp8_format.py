"""The FP8 E4M3 block-scaling format shared by the quant and GEMM kernels: constants and argument checks.

Holds the numbers that define the format (E4M3 range, amax floor, block sizes, scale formats) and
the validation every FP8 entry point runs, so a bad argument fails the same way everywhere. It does
not quantize or dequantize anything.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value; a block's amax maps onto it."""

AMAX_FLOOR = 1e-4
"""A block's amax is floored here before scaling, so an all-zero block gets a finite scale."""

BLOCK_SIZES = (32, 64, 128)
SCALE_FMTS = ("fp32", "ue8m0")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPE = torch.float8_e4m3fn


_ONE_BYTE_FLOATS = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                    torch.float8_e8m0fnu)
_DECODE_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def one_byte_float_to_float32(x: torch.Tensor) -> torch.Tensor:
    """An fp8 (e4m3, e5m2, e8m0, ...) tensor -> float32, by a 256-entry table lookup.

    The table is torch's own conversion of every code, so the result is bit-identical to `x.float()`
    (NaN codes included); on CPU the lookup is 2-3x faster than that element-wise conversion, which is
    what FP8 cache reads and Engram row dequantization spend most of their time on. Any layout works
    (strided slices are read in place)."""
    if x.dtype not in _ONE_BYTE_FLOATS:
        raise TypeError(f"x must be a one-byte float tensor, got {x.dtype}")
    key = (x.dtype, x.device)
    table = _DECODE_TABLES.get(key)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(x.dtype)
        table = _DECODE_TABLES[key] = codes.float().to(x.device)  # [256]
    return table.take(x.view(torch.uint8).long())


def num_blocks(k: int, block: int) -> int:
    """ceil(k / block): how many (possibly partial) blocks cover k values."""
    return -(-k // block)


def round_scale_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(scale)) for positive normal fp32 scales, computed exactly on the bits.

    A scale that is already a power of two is kept; any other is bumped to the next power of two
    (exponent + 1, mantissa cleared). log2 in floating point can round 2**k * (1 + 2**-23) down to
    k, so the bit form is used to guarantee the result is never below `scale`.
    """
    bits = scale.contiguous().view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def check_block(block: int, name: str = "block") -> None:
    if block not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {block!r}")


def check_scale_fmt(scale_fmt: str) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def check_float(x: torch.Tensor, name: str, min_dim: int = 1) -> None:
    """x must be a float32/bfloat16/float16 tensor with at least `min_dim` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(x.shape)}")


def check_fp8(q: torch.Tensor, name: str, dim: int | None = None) -> None:
    """q must be a float8_e4m3fn tensor (with exactly `dim` dims when given, else at least 1)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"{name} must be float8_e4m3fn, got {q.dtype}")
    if (dim is not None and q.dim() != dim) or q.dim() < 1:
        want = f"{dim}" if dim is not None else "at least 1"
        raise ValueError(f"{name} must have {want} dim(s), got shape {tuple(q.shape)}")


def check_scale(scale: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    """scale must be a float32 tensor of exactly `shape`."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(scale.shape)}")


def check_out_dtype(dtype: torch.dtype, name: str = "dtype") -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dtype}")


def block_scale_shape(shape: torch.Size | tuple[int, ...], block: int) -> tuple[int, ...]:
    """Shape of the per-block scales of a [..., K] tensor: [..., ceil(K / block)]."""
    return (*shape[:-1], num_blocks(shape[-1], block))


def weight_scale_shape(n: int, k: int, block: int) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for a [n, k] weight: [ceil(n / block), ceil(k / block)]."""
    return num_blocks(n, block), num_blocks(k, block)


def check_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, block: int) -> None:
    """q e4m3 [..., K] with per-token block scales float32 [..., ceil(K / block)]."""
    check_fp8(q, "q")
    check_block(block)
    check_scale(scale, "scale", block_scale_shape(q.shape, block))


def check_fp8_weight(w_q: torch.Tensor, scale_inv: torch.Tensor, block: int) -> None:
    """w_q e4m3 [N, K] with tile scales float32 [ceil(N / block), ceil(K / block)]."""
    check_fp8(w_q, "w_q", dim=2)
    check_block(block)
    check_scale(scale_inv, "scale_inv", weight_scale_shape(*w_q.shape, block))

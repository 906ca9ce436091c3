"""Argument checks shared by the V4 decode ops (shapes, dtypes, devices; values with one host sync)."""

from __future__ import annotations

import torch

from engram_kernels.quant.fp8_format import check_float

INDEX_DTYPES = (torch.int32, torch.int64)


def check_shape(x: torch.Tensor, name: str, shape: tuple[int, ...], spec: str) -> None:
    """x must have exactly `shape`; `spec` names the dims for the message, e.g. "[B, T, dI]"."""
    if tuple(x.shape) != tuple(shape):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {spec} = {want}, got {tuple(x.shape)}")


def check_float_dims(x: torch.Tensor, name: str, dims: int, spec: str) -> None:
    """x must be a float32/bfloat16/float16 tensor with exactly `dims` dims."""
    check_float(x, name)
    if x.dim() != dims:
        raise ValueError(f"{name} must have shape {spec}, got {tuple(x.shape)}")


def check_float32(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")


def check_index(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")


def check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


def check_device(**tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"{', '.join(tensors)} must share a device, got {devices}")


def check_ranges(*ranges: tuple[torch.Tensor, str, int, int]) -> None:
    """Each (x, name, lo, hi): every value of x lies in [lo, hi]. Empty tensors pass. One host sync."""
    ranges = [r for r in ranges if r[0].numel()]
    if not ranges:
        return
    bounds = torch.stack([v for x, *_ in ranges for v in (x.min().long(), x.max().long())]).tolist()
    for i, (_, name, lo, hi) in enumerate(ranges):
        got_lo, got_hi = bounds[2 * i], bounds[2 * i + 1]
        if got_lo < lo or got_hi > hi:
            raise ValueError(f"{name} values must lie in [{lo}, {hi}], got min {got_lo} max {got_hi}")

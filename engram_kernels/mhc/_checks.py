"""Argument checks shared by the mHC ops: each failure names the offending argument.

Only shape/dtype/device validation lives here; no math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_tensor(name: str, value: object) -> torch.Tensor:
    """Return `value` if it is a tensor, else raise TypeError naming `name`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """Raise TypeError unless `t.dtype` is one of `dtypes`."""
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def require_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    """Raise ValueError unless `t.shape == shape`."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def require_positive_int(name: str, value: object) -> int:
    """Return `value` if it is an int >= 1 (not a bool), else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def require_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must share a device: {listing}")

"""Choose between a Triton kernel and its torch reference.

Triton runs when every tensor argument is on CUDA and triton imports; everything else (CPU, no
triton, `ENGRAM_KERNELS=reference`) runs the reference. Tests call the Triton entry points
directly under `TRITON_INTERPRET=1` to compare them with the reference on CPU.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when the triton package imports (it is absent on some platforms)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton implementation should run for these tensor arguments."""
    if os.environ.get("ENGRAM_KERNELS", "auto") == "reference":
        return False
    if not triton_available():
        return False
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))

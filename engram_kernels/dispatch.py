"""Choose between a Triton kernel and its torch reference.

Triton runs when every tensor argument is on CUDA and triton imports; everything else (CPU, no
triton, `ENGRAM_KERNELS=reference`, or an argument autograd is tracking: the kernels have no backward)
runs the reference. Tests call the Triton entry points
directly under `TRITON_INTERPRET=1` to compare them with the reference on CPU.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

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
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False  # training: the Triton kernels define no backward, the references do
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))


def dispatched(reference: Callable, triton_impl: Callable) -> Callable:
    """The dispatcher of one op: `triton_impl` when every tensor argument is on CUDA (see use_triton),
    else `reference`. Both take the same arguments; the dispatcher keeps the reference's signature."""

    @functools.wraps(reference)
    def op(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return (triton_impl if use_triton(*tensors) else reference)(*args, **kwargs)

    op.__name__ = op.__qualname__ = reference.__name__.removesuffix("_ref")
    op.__doc__ = f"`{reference.__name__}` semantics; the Triton kernel on CUDA tensors, the reference elsewhere."
    return op

"""Copies of weight tensors in a kernel's own layout, kept beside the weights they were made from.

A CPU kernel that reads a weight faster in its own layout (our C panel kernel's, `panel_packs`) gets a copy
made once at load instead of a conversion per call. The dense
weight stays the source of truth (`state_dict()`, checkpoints, FP8, other devices), so a kept copy costs
the weight's memory again. `get(weight)` returns the copy of exactly that tensor object, made again if
the weight's storage, dtype, shape, strides or version (an in-place update) changed since; the copy is
released when the weight is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Copy:
    tensor: torch.Tensor | None  # the weight in the kernel's layout, same values
    key: tuple


def weight_key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's current values without reading them."""
    version = 0 if weight.is_inference() else weight._version
    return weight.data_ptr(), weight.dtype, weight.shape, weight.stride(), version


def _storage_id(tensor: torch.Tensor) -> int:
    """What tells copies sharing memory apart: the storage's address (the tensor itself for oneDNN's opaque
    tensors, which have no storage to ask)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return id(tensor)


class WeightCopies:
    """make(weight) -> the copy; can_make(weight) -> whether make takes it (checked before each make)."""

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor], can_make: Callable[[torch.Tensor], bool]):
        self._make, self._can_make = make, can_make
        self._copies: dict[int, _Copy] = {}  # id(weight) -> its copy

    def keep(self, weight: torch.Tensor, copy: torch.Tensor | None = None) -> bool:
        """Keep a copy of weight (`copy` if given: one made from it by other means, e.g. a slice of a
        larger copy); False, and nothing kept, if can_make refuses the weight."""
        if not self._can_make(weight):
            return False
        if id(weight) not in self._copies:
            weakref.finalize(weight, self._copies.pop, id(weight), None)
        self._copies[id(weight)] = _Copy(self._make(weight) if copy is None else copy, weight_key(weight))
        return True

    def release(self, weight: torch.Tensor) -> None:
        """Drop the copy of weight, if any."""
        entry = self._copies.get(id(weight))
        if entry is not None:
            entry.tensor, entry.key = None, ()

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The copy of this weight tensor (made again first if the weight changed), or None if none is kept."""
        entry = self._copies.get(id(weight))
        if entry is None or entry.tensor is None:
            return None
        key = weight_key(weight)
        if key != entry.key:
            if not self._can_make(weight):
                entry.tensor, entry.key = None, ()
                return None
            entry.tensor, entry.key = self._make(weight), key
        return entry.tensor

    def count(self) -> int:
        """How many weights hold a copy."""
        return sum(entry.tensor is not None for entry in self._copies.values())

    def nbytes(self) -> int:
        """Bytes of the values the copies hold (their extra memory, before any layout padding); copies that
        are slices of another (`keep(weight, copy)`) count once, with the largest copy of their storage."""
        largest: dict[int, int] = {}
        for entry in self._copies.values():
            if entry.tensor is not None:
                storage = _storage_id(entry.tensor)
                largest[storage] = max(largest.get(storage, 0), entry.tensor.numel() * entry.tensor.element_size())
        return sum(largest.values())

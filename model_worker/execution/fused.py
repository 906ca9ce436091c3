"""Inference-time weight fusion: fewer, larger GEMMs for the same weights.

Decode runs one or a few tokens per sequence, so a step is dominated by per-call overhead and weight
reads, not arithmetic. Two fusions cut the number of calls without changing the function:

- `ConcatenatedWeight`: float Linears that read the same input (an MLP's gate and up projections, MLA's
  q_a and kv_a) become one [sum(out), in] weight and one GEMM whose output is split.
- `StackedWeight`: a MoE's routed experts become [E, out, in] tensors, run by `grouped_linear` as one
  grouped GEMM over the tokens sorted by expert.

The fused tensor is built on first use and the member parameters are re-pointed to views of it, so
checkpoint names, `state_dict()` and memory use stay as they were. Anything that gives a member new
storage (`cast`, `.to(device)`, a weight update, switching to FP8) is noticed by comparing data
pointers on every call, and the fusion is rebuilt or, for FP8 or biased members, skipped (callers then
run the members one by one); the previous fused tensor is released on that call. A ConcatenatedWeight runs
its GEMM by its own linear method (`execution.linear_methods`), chosen at load like a Linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_worker.execution.linear_methods import REFERENCE, LinearMethod
from model_worker.layers.linear import Linear

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _FusedWeight:
    """One [G, sum(out), in] tensor for G groups of Linears (a group's members concatenated along out).
    `get()` -> that tensor, or None when the members cannot be fused."""

    def __init__(self, groups: list[list[Linear]]):
        self._groups = groups
        self._members = [lin for group in groups for lin in group]
        self._key: tuple[int, ...] | None = None
        self._tensor: torch.Tensor | None = None
        self._groups_cache: tuple | None = None  # (fused tensor, per_group() views)
        self._disabled = False

    @property
    def members(self) -> list[Linear]:
        return self._members

    def _fusable(self) -> bool:
        first = self._members[0]
        widths = {sum(lin.out_features for lin in group) for group in self._groups}
        return len(widths) == 1 and all(
            not lin.is_fp8 and lin.bias is None and not lin.weight.is_meta and lin.weight.dtype == first.weight.dtype
            and lin.weight.device == first.weight.device and lin.in_features == first.in_features
            for lin in self._members)

    def _current_key(self) -> tuple[int, ...]:
        # Straight from each module's parameter dict: nn.Module attribute lookup costs more than the check.
        return tuple(lin._parameters["weight"].data_ptr() for lin in self._members)

    def get(self) -> torch.Tensor | None:
        key = self._current_key()
        if key == self._key:
            return self._tensor
        self._tensor = self._key = None
        if self._disabled or not self._fusable():
            return None
        # Built outside inference mode so the parameters stay ordinary tensors (loading and weight
        # updates write into them in place later).
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.stack([torch.cat([lin.weight.detach() for lin in group])
                                 for group in self._groups])  # [G, sum(out), in]
            for g, group in enumerate(self._groups):
                offset = 0
                for lin in group:
                    lin.weight.data = fused[g, offset : offset + lin.out_features]
                    offset += lin.out_features
        self._tensor = fused
        self._key = self._current_key()
        self._groups_cache = None
        return fused

    def disable(self) -> None:
        """Never fuse these members (get() gives None from now on; they keep their current storage): for
        members another fusion owns, such as an expert MLP's gate and up inside its MoE's stack."""
        self._disabled = True
        self._tensor = self._key = self._groups_cache = None

    def per_group(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
        """(views [sum(out), in] of each group, their transposes [in, sum(out)]) of the tensor the last get()
        returned (call get() first: it checks the members), or None: made once per fused tensor, so a decode
        step indexes Python tuples instead of dispatching a select and a transpose per expert."""
        fused = self._tensor
        if fused is None:
            return None
        cached = self._groups_cache
        if cached is None or cached[0] is not fused:
            views = tuple(fused.unbind(0))
            cached = self._groups_cache = (fused, (views, tuple(v.t() for v in views)))
        return cached[1]


class ConcatenatedWeight(_FusedWeight):
    """Linears reading the same input, as one [sum(out), in] weight: one GEMM, output split per member."""

    def __init__(self, *linears: Linear):
        super().__init__([list(linears)])
        self.sizes = [lin.out_features for lin in linears]
        self.method: LinearMethod = REFERENCE  # chosen at load (`execution.prepare.arrange_weights`)

    @property
    def weight(self) -> torch.Tensor | None:
        """The fused weight [sum(out), in] (None when the members cannot be fused)."""
        return None if self.get() is None else self.per_group()[0][0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one output per member, [..., out_i] each (fused GEMM when possible)."""
        if self.get() is None:
            return tuple(lin(x) for lin in self._members)
        return self.method.run(x, self.per_group()[0][0]).split(self.sizes, dim=-1)


def fusions_of(module: torch.nn.Module) -> dict[str, _FusedWeight]:
    """The weight fusions a module owns (its ConcatenatedWeight / StackedWeight attributes), by attribute name."""
    return {name: value for name, value in vars(module).items() if isinstance(value, _FusedWeight)}


class StackedWeight(_FusedWeight):
    """One group of Linears per expert (e.g. [gate, up]), as an [E, sum(out), in] tensor for grouped GEMMs."""


def grouped_mm_available(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `grouped_linear` can run these as one grouped GEMM: torch >= 2.8 with fp32/bf16 on CPU;
    on CUDA bf16 only, with every dimension a multiple of 8 (16-byte aligned strides)."""
    if not _HAS_GROUPED_MM:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    dims = [x.shape[-1], *(d for w in weights for d in w.shape[1:])]
    return x.is_cuda and x.dtype == torch.bfloat16 and all(d % 8 == 0 for d in dims)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert, each group times its expert's weight, as one grouped GEMM.

    x [M, in] sorted by group; weight [E, out, in]; counts int [E] rows per group, summing to M
    -> [M, out]. Requires `grouped_mm_available(x)`."""
    return F.grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))

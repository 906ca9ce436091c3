"""Experts methods: how a MoE block's routed experts run, chosen once per block at load
(`execution.prepare.arrange_weights`, by `execution.policy`'s rule), like the linear methods.

- TORCH_EXPERTS: the experts as stacked weights [E, out, in] (`execution.fused.StackedWeight`), tokens sorted
  by expert: one grouped GEMM per projection when most experts have tokens, else each expert that has
  tokens in turn; one token (decode of one sequence) runs its k experts in turn without sorting.
- C_ROWS_EXPERTS: the same, each expert's product through `linear_methods.C_ROWS` (bf16 on CPU).
- PANEL_EXPERTS: fp32 on CPU: the stacks panel-packed whole (`panel_packs.pack_stack`), all experts in one
  grouped call of our C panel kernel per projection, at any row count.

Experts that cannot be stacked (FP8) run one by one through their own Linears. Every path computes the same
sum (tests compare them with float64 references).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from engram_kernels.cpu_decode import grouped_panel_gemm
from model_worker.execution.fused import grouped_linear, grouped_mm_available
from model_worker.execution.linear_methods import C_ROWS, PANEL, REFERENCE, LinearMethod, method_for


class ExpertsMethod:
    """Stacked experts through torch's kernels, or through `linear` (a linear method) one expert at a time."""

    name = "torch"

    def __init__(self, linear: LinearMethod = REFERENCE):
        self.linear = linear

    def prepare(self, moe) -> None:
        """Make what `run` needs of the block's stacks, once, at load."""

    def release(self, moe) -> None:
        """Drop what `prepare` made."""

    def run(self, moe, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Tokens flat [N, D] routed to experts ids [N, k] with weights [N, k] fp32 -> the routed experts'
        weighted sum plus the shared experts, [N, D]. moe: the block (`layers.moe.MoE`)."""
        gate_up, down = moe._stacked_gate_up.get(), moe._stacked_down.get()
        if gate_up is None or down is None:
            return self._combine(moe, flat, *_sorted_pairs(flat, ids, weights, len(moe.experts)), _each_expert)
        if flat.shape[0] == 1:
            return self._one_token(moe, flat, weights, ids)
        return self._combine(moe, flat, *_sorted_pairs(flat, ids, weights, len(moe.experts)), self._stacked)

    def _stacked(self, moe, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each pair's expert output for sorted_x [N*k, D] (sorted by expert; counts [E]) -> [N*k, D]."""
        gate_up, down = moe._stacked_gate_up.get(), moe._stacked_down.get()
        if len(sorted_x) >= len(counts) and grouped_mm_available(sorted_x, gate_up, down):
            return grouped_linear(_swiglu(grouped_linear(sorted_x, gate_up, counts)), down, counts)
        gate_up_views, down_views = moe._stacked_gate_up.per_group()[0], moe._stacked_down.per_group()[0]
        outs, start = [], 0
        for expert_id, count in enumerate(counts.tolist()):
            if count:
                rows = sorted_x[start : start + count]
                hidden = _swiglu(self.linear.run(rows, gate_up_views[expert_id]))
                outs.append(self.linear.run(hidden, down_views[expert_id]))
                start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _one_token(self, moe, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode of a single sequence: its k experts in turn, no sorting or scattering. flat [1, D] -> [1, D]."""
        gate_up, down = moe._stacked_gate_up.per_group()[0], moe._stacked_down.per_group()[0]
        out = moe.shared_experts(flat) if moe.shared_experts is not None else torch.zeros_like(flat)
        for expert_id, weight in zip(ids.tolist()[0], weights.tolist()[0]):
            hidden = _swiglu(self.linear.run(flat, gate_up[expert_id]))  # [1, I]
            out = self.linear.accumulate(out, hidden, down[expert_id], weight)  # out + weight * down(hidden)
        return out

    @staticmethod
    def _combine(moe, flat, token, pair_weight, sorted_x, counts, experts_out) -> torch.Tensor:
        """Scatter-add each (token, expert) pair's weighted output back to its token, plus the shared experts."""
        expert_out = experts_out(moe, sorted_x, counts)  # [N*k, D]
        out = torch.zeros_like(flat).index_add_(0, token, expert_out * pair_weight)
        return out + moe.shared_experts(flat) if moe.shared_experts is not None else out

    def __repr__(self) -> str:
        return f"<experts method {self.name}>"


class PanelExperts(ExpertsMethod):
    """fp32 stacks panel-packed whole: every expert in one grouped call of our C panel kernel per projection."""

    name = "c-panel"

    def __init__(self):
        super().__init__(PANEL)

    def prepare(self, moe) -> None:
        from model_worker.execution import panel_packs

        for stack in (moe._stacked_gate_up, moe._stacked_down):
            if stack.get() is not None:
                panel_packs.pack_stack(stack.get(), stack.per_group()[0])

    def release(self, moe) -> None:
        from model_worker.execution import panel_packs

        for stack in (moe._stacked_gate_up, moe._stacked_down):
            if stack.get() is not None:
                for view in (stack.get(), *stack.per_group()[0]):
                    panel_packs.unpack(view)

    def _panels(self, moe, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        gate_up, down = moe._stacked_gate_up.get(), moe._stacked_down.get()
        if gate_up is None or down is None:
            return None
        panels = PANEL.panel_for(flat, gate_up), PANEL.panel_for(flat, down)
        return None if panels[0] is None or panels[1] is None else panels

    def run(self, moe, flat, weights, ids):
        panels = self._panels(moe, flat)
        if panels is None:  # cast, moved or training since load: torch's kernels
            return TORCH_EXPERTS.run(moe, flat, weights, ids)
        hidden2, width = moe._stacked_gate_up.get().shape[1], flat.shape[1]
        if flat.shape[0] > 1:
            return self._combine(moe, flat, *_sorted_pairs(flat, ids, weights, len(moe.experts)),
                                 lambda _, x, counts: _panel_experts(x, counts.tolist(), *panels, hidden2, width))
        # One token: its k experts in two grouped calls, weighted and summed with the shared experts in one addmm.
        pairs = sorted(zip(ids.tolist()[0], weights.tolist()[0]))  # (expert, weight), by expert
        counts = [0] * len(moe.experts)
        for expert_id, _ in pairs:
            counts[expert_id] += 1
        rows = flat.expand(len(pairs), width)  # [k, D]: the token's row k times (stride 0, no copy)
        expert_out = _panel_experts(rows, counts, *panels, hidden2, width)  # [k, D]
        out = moe.shared_experts(flat) if moe.shared_experts is not None else torch.zeros_like(flat)
        return torch.addmm(out, torch.tensor([[w for _, w in pairs]], dtype=flat.dtype), expert_out)


TORCH_EXPERTS = ExpertsMethod()
C_ROWS_EXPERTS = ExpertsMethod(C_ROWS)
C_ROWS_EXPERTS.name = "c-rows"
PANEL_EXPERTS = PanelExperts()


def experts_method_for(moe) -> ExpertsMethod:
    """The experts method of a MoE block on this host: by its gate/up stack's linear method (`method_for`)."""
    stack = moe._stacked_gate_up.get()
    if stack is None or moe._stacked_down.get() is None:
        return TORCH_EXPERTS  # unstackable (FP8): each expert through its own Linears
    return {PANEL: PANEL_EXPERTS, C_ROWS: C_ROWS_EXPERTS}.get(method_for(stack), TORCH_EXPERTS)


def _sorted_pairs(flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, n_experts: int):
    """(token of each pair [N*k], pair weight [N*k, 1], each pair's token row sorted by expert [N*k, D],
    pairs per expert [E]) for the (token, expert) pairs of ids [N, k] sorted by expert."""
    order = ids.flatten().argsort(stable=True)
    token = order // ids.shape[1]
    pair_weight = weights.flatten()[order, None].to(flat.dtype)
    return token, pair_weight, flat[token], torch.bincount(ids.flatten(), minlength=n_experts)


def _each_expert(moe, sorted_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Unstackable (FP8) experts: only the experts that have pairs, one by one through their own Linears."""
    outs, start = [], 0
    for expert_id, count in enumerate(counts.tolist()):
        if count:
            outs.append(moe.experts[expert_id](sorted_x[start : start + count]))
            start += count
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _panel_experts(sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                   hidden2: int, width: int) -> torch.Tensor:
    """All experts in two grouped calls of our C panel kernel: sorted_x [N*k, D] sorted by expert, counts per
    expert, the stacks' panel-packed copies gate_up (of [E, 2I, D], hidden2 = 2I) and down (of [E, D, I],
    width = D) -> [N*k, D] in the same order."""
    offsets = [0, *itertools.accumulate(counts)]
    x = sorted_x if sorted_x.stride(-1) == 1 else sorted_x.contiguous()
    hidden = _swiglu(grouped_panel_gemm(x, offsets, gate_up, hidden2))
    return grouped_panel_gemm(hidden if hidden.stride(-1) == 1 else hidden.contiguous(), offsets, down, width)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

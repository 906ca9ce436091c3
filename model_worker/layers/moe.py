"""Feed-forward blocks: dense SwiGLU MLP, the DeepSeek router and the MoE block.

Routing follows MODEL_SPEC.md and is defined once, in `kernels.moe_routing`: V3 selects with sigmoid scores
+ e_score_correction_bias, group-limited (group score = sum of its top-2 biased scores), and weights the
chosen experts by their unbiased scores (normalised when norm_topk_prob) times routed_scaling_factor; V2
uses softmax scores with greedy or group-limited greedy top-k, normalised *or* scaled (DeepSeek's V2 code).
Float experts run as stacked weights (tokens sorted by expert): where the
stacks are panel-packed (`layers.panel_packs`, fp32 on hosts where our C panel kernel won), all experts in
one grouped call of that kernel per projection, at any row count; else in a decode step where no expert
has more rows than the C decode kernel takes, through its grouped GEMM, all experts in one call per
projection (`kernels.cpu_decode`, where it builds and won on this host); otherwise one grouped GEMM per
projection, or one packed GEMM per expert with tokens where the experts are packed.
FP8 experts, which cannot be stacked, run one by one. An MLP's gate and up projections run as one GEMM
(`layers.fused`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from kernels.cpu_decode import grouped_decode_gemm, grouped_panel_gemm
from kernels.moe_routing import Routing, select_experts
from model_worker.config import ModelConfig
from model_worker.layers.cpu_gemm import choice_wins, cpu_gemm_preferences, row_bucket
from model_worker.layers.fused import ConcatenatedWeight, StackedWeight, grouped_linear, grouped_mm_available
from model_worker.layers.linear import Linear, linear, linear_accumulate, native_kernel_takes, panel_for
from model_worker.layers.packed_gemm import packed


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self._gate_up = ConcatenatedWeight(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Top-k expert selection (`mlp.gate`, `kernels.moe_routing`); weight kept in fp32 like the reference
    implementations."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.routing = Routing(config.router_kind, config.n_routed_experts, config.num_experts_per_tok,
                               config.n_group or 1, config.topk_group or config.n_group or 1, config.topk_method,
                               config.norm_topk_prob, config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        if self.routing.kind == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts,
                                                                        dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, expert ids [N, k] int64)."""
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), weight)  # [N, E]
        return select_experts(logits, self.routing, getattr(self, "e_score_correction_bias", None))


class MoE(nn.Module):
    """Routed experts + always-on shared experts (`mlp.experts.{j}`, `mlp.shared_experts`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts))
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self._stacked_gate_up = StackedWeight([[e.gate_proj, e.up_proj] for e in self.experts])  # [E, 2I, D]
        self._stacked_down = StackedWeight([[e.down_proj] for e in self.experts])  # [E, D, I]
        for expert in self.experts:  # their gate and up weights live in the stack, not in a fusion of their own
            expert._gate_up.disable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)  # [N, k]
        gate_up, down = self._stacked_gate_up.get(), self._stacked_down.get()
        stacked = gate_up is not None and down is not None
        panels = (panel_for(flat, gate_up), panel_for(flat, down)) if stacked else (None, None)
        if panels[0] is not None and panels[1] is not None and flat.shape[0] == 1:
            return self._one_token_panels(flat, weights, ids, *panels, gate_up.shape[1]).view_as(x)
        if stacked and flat.shape[0] == 1:
            return self._one_token(flat, weights, ids).view_as(x)
        order = ids.flatten().argsort(stable=True)  # (token, expert) pairs sorted by expert
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts))  # [E]
        token = order // ids.shape[1]  # [N*k] token of each sorted pair
        pair_weight = weights.flatten()[order, None].to(flat.dtype)  # [N*k, 1]
        # The C kernel's grouped GEMM where it takes every expert's rows and wins here; else, when most experts
        # have tokens, one grouped GEMM per projection over the stacked weights, unless the experts are packed
        # (`layers.packed_gemm`), where one packed GEMM per expert with tokens beats it.
        per_expert = counts.tolist() if stacked else []
        sorted_x = flat[token] if stacked else flat  # [N*k, D] each pair's token row, sorted by expert
        if panels[0] is not None and panels[1] is not None:
            expert_out = self._panel_experts(sorted_x, per_expert, *panels, gate_up.shape[1], down.shape[1])
        elif stacked and self._native_experts_win(sorted_x, per_expert, gate_up, down):
            expert_out = self._native_experts(sorted_x, per_expert, gate_up, down)
        elif stacked and len(order) >= len(counts) and grouped_mm_available(flat, gate_up, down) \
                and packed(self._stacked_gate_up.per_group()[0][0]) is None:
            hidden = _swiglu(grouped_linear(sorted_x, gate_up, counts))
            expert_out = grouped_linear(hidden, down, counts)  # [N*k, D]
        elif stacked:  # few tokens (decode) or packed experts: only the experts that have tokens
            expert_out = self._each_stacked_expert(sorted_x, per_expert)
        else:
            # Unstackable (FP8) experts: run only the experts that have tokens, one by one.
            expert_out = flat.new_empty(len(order), flat.shape[-1])
            start = 0
            for expert_id, count in enumerate(counts.tolist()):
                if count:
                    rows = slice(start, start + count)
                    expert_out[rows] = self.experts[expert_id](flat[token[rows]])
                    start += count
        out = torch.zeros_like(flat).index_add_(0, token, expert_out * pair_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)

    def _each_stacked_expert(self, sorted_x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert with tokens on its rows of sorted_x [N*k, D] (sorted by expert; counts per expert),
        through the stacked weights' cached per-expert views -> [N*k, D] in the same order."""
        gate_up, _ = self._stacked_gate_up.per_group()  # [2I, D] each
        down, _ = self._stacked_down.per_group()  # [D, I] each
        outs, start = [], 0
        for expert_id, count in enumerate(counts):
            if count:
                rows = sorted_x[start : start + count]
                outs.append(linear(_swiglu(linear(rows, gate_up[expert_id])), down[expert_id]))
                start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _native_experts_win(self, sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                            down: torch.Tensor) -> bool:
        """Whether every expert's rows go through the C kernel's grouped GEMM (`_native_experts`): it takes the
        operands with as many rows as the busiest expert has (`native_kernel_takes`), and on this host it beat
        the per-expert loop for this stack shape and that row count (`layers.cpu_gemm.choice_wins`)."""
        busiest = max(counts)
        if gate_up.dtype != torch.float32 or not (native_kernel_takes(sorted_x, busiest, gate_up)
                                                  and native_kernel_takes(sorted_x, busiest, down)):
            return False  # the grouped kernel is fp32 only
        if not cpu_gemm_preferences().tune_native:
            return True
        key = ("native experts", *gate_up.shape, *down.shape[1:], row_bucket(busiest))
        return choice_wins(key, lambda: (lambda: self._each_stacked_expert(sorted_x, counts),
                                         lambda: self._native_experts(sorted_x, counts, gate_up, down)))

    @staticmethod
    def _panel_experts(sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                       hidden2: int, width: int) -> torch.Tensor:
        """All experts in two calls of our C panel kernel (`kernels.cpu_decode.grouped_panel_gemm`), any number
        of rows each: sorted_x [N*k, D] sorted by expert, counts per expert, the stacks' panel-packed copies
        (`layers.panel_packs`) gate_up (of [E, 2I, D], hidden2 = 2I) and down (of [E, D, I], width = D)
        -> [N*k, D] in the same order."""
        return _grouped_swiglu(sorted_x, counts, lambda x, offsets: grouped_panel_gemm(x, offsets, gate_up, hidden2),
                               lambda h, offsets: grouped_panel_gemm(h, offsets, down, width))

    @staticmethod
    def _native_experts(sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                        down: torch.Tensor) -> torch.Tensor:
        """All experts in two C calls (`kernels.cpu_decode.grouped_decode_gemm`): sorted_x [N*k, D] sorted by
        expert, counts per expert, stacks gate_up [E, 2I, D] and down [E, D, I] -> [N*k, D] in the same order."""
        return _grouped_swiglu(sorted_x, counts, lambda x, offsets: grouped_decode_gemm(x, offsets, gate_up),
                               lambda h, offsets: grouped_decode_gemm(h, offsets, down))

    def _one_token(self, flat, weights, ids) -> torch.Tensor:
        """Decode of a single sequence: its k experts in turn, no sorting or scattering. flat [1, D] -> [1, D].
        Experts' weights come as cached per-expert views (`StackedWeight.per_group`)."""
        gate_up, _ = self._stacked_gate_up.per_group()  # [2I, D] each
        down, down_t = self._stacked_down.per_group()  # [D, I] and [I, D] each
        out = self.shared_experts(flat) if self.shared_experts is not None else torch.zeros_like(flat)
        for expert_id, weight in zip(ids.tolist()[0], weights.tolist()[0]):
            hidden = _swiglu(linear(flat, gate_up[expert_id]))  # [1, I]
            out = linear_accumulate(out, hidden, down[expert_id], weight, down_t[expert_id])  # out + weight * down(h)
        return out

    def _one_token_panels(self, flat, weights, ids, gate_up: torch.Tensor, down: torch.Tensor,
                          hidden2: int) -> torch.Tensor:
        """Decode of a single sequence through the panel-packed stacks: its k experts in two grouped calls (no
        sorting or scattering in torch), their outputs weighted and summed with the shared experts' in one
        addmm. flat [1, D] -> [1, D]."""
        pairs = sorted(zip(ids.tolist()[0], weights.tolist()[0]))  # (expert, weight), by expert
        counts = [0] * len(self.experts)
        for expert_id, _ in pairs:
            counts[expert_id] += 1
        rows = flat.expand(len(pairs), flat.shape[1])  # [k, D]: the token's row k times (stride 0, no copy)
        expert_out = self._panel_experts(rows, counts, gate_up, down, hidden2, flat.shape[1])  # [k, D]
        out = self.shared_experts(flat) if self.shared_experts is not None else torch.zeros_like(flat)
        pair_weight = torch.tensor([[weight for _, weight in pairs]], dtype=flat.dtype)  # [1, k]
        return torch.addmm(out, pair_weight, expert_out)


def _grouped_swiglu(sorted_x: torch.Tensor, counts: list[int], gate_up, down) -> torch.Tensor:
    """Every expert's SwiGLU over its rows of sorted_x [N*k, D] (sorted by expert, counts per expert) through
    a grouped kernel: gate_up(x, offsets) -> [N*k, 2I] and down(h, offsets) -> [N*k, D], each taking rows with
    unit stride along their last axis."""
    offsets = [0, *itertools.accumulate(counts)]
    x = sorted_x if sorted_x.stride(-1) == 1 else sorted_x.contiguous()
    hidden = _swiglu(gate_up(x, offsets))
    return down(hidden if hidden.stride(-1) == 1 else hidden.contiguous(), offsets)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

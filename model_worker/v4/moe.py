"""V4's MoE block (docs/v4-model-spec.md, 6.1): every layer is one. A router scores the experts
(sqrt(softplus) or sigmoid of x @ gate^T) and picks k of them: by top-k of the scores plus a correction
bias ("moe" layers), or from a fixed token-id table `tid2eid` ("hash_moe" layers). The chosen experts are
weighted by their unbiased scores, normalised and scaled; every expert, and the one shared expert, is a
SwiGLU whose gate is clamped from above and whose up projection is clamped both ways at swiglu_limit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_worker.execution.fused import StackedWeight, grouped_linear, grouped_mm_available
from model_worker.layers.linear import Linear
from model_worker.v4.config import V4Config


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


class V4Router(nn.Module):
    """weight [E, H]; buffer e_score_correction_bias [E] (learned routing) or tid2eid [V, k] (hash routing)."""

    def __init__(self, config: V4Config, hashed: bool):
        super().__init__()
        self.k, self.scale, self.scoring = config.num_experts_per_tok, config.routed_scaling_factor, config.scoring_func
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.k, dtype=torch.int64))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], token_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        logits = F.linear(x.float(), self.weight.float())
        scores = F.softplus(logits).sqrt() if self.scoring == "sqrtsoftplus" else torch.sigmoid(logits)
        if hasattr(self, "tid2eid"):
            ids = self.tid2eid[token_ids]
        else:
            ids = (scores + self.e_score_correction_bias.float()).topk(self.k, dim=-1).indices
        chosen = scores.gather(1, ids)
        return chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * self.scale, ids


class Expert(nn.Module):
    """One routed expert as the checkpoint stores it: w1 (gate) and w3 (up) [I, H], w2 (down) [H, I]."""

    def __init__(self, hidden: int, inner: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1, self.w2, self.w3 = Linear(hidden, inner), Linear(inner, hidden), Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit))


class V4Experts(nn.ModuleList):
    """The routed experts (`experts.{e}.w1/w2/w3`), run as stacked weights (`execution.fused.StackedWeight`:
    gate and up of all experts as one [E, 2I, H] tensor, down as [E, H, I], the experts' parameters views of
    them): one grouped GEMM per projection when most experts have tokens, else each expert with tokens."""

    def __init__(self, config: V4Config):
        super().__init__(Expert(config.hidden_size, config.moe_intermediate_size, config.swiglu_limit)
                         for _ in range(config.n_routed_experts))
        self.limit = config.swiglu_limit
        self._gate_up = StackedWeight([[expert.w1, expert.w3] for expert in self])
        self._down = StackedWeight([[expert.w2] for expert in self])

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], weights/ids [N, k] -> sum_j weights[:, j] * expert_{ids[:, j]}(x), [N, H]; a repeated id
        counts once per occurrence."""
        order = ids.flatten().argsort(stable=True)  # (token, expert) pairs sorted by expert
        token = order // ids.shape[1]
        counts = torch.bincount(ids.flatten(), minlength=len(self))  # [E]
        sorted_x = x[token]  # [N*k, H]
        gate_up, down = self._gate_up.get(), self._down.get()
        if gate_up is None or down is None:  # FP8 experts cannot be stacked: each through its own Linears
            y = self._each(sorted_x, counts, lambda e, rows: self[e](rows))
        elif len(order) >= len(self) and grouped_mm_available(sorted_x, gate_up, down):
            gate, up = grouped_linear(sorted_x, gate_up, counts).chunk(2, dim=-1)
            y = grouped_linear(clamped_swiglu(gate, up, self.limit), down, counts)
        else:
            gate_ups, downs = self._gate_up.per_group()[0], self._down.per_group()[0]
            y = self._each(sorted_x, counts, lambda e, rows: F.linear(
                clamped_swiglu(*F.linear(rows, gate_ups[e]).chunk(2, dim=-1), self.limit), downs[e]))
        out = torch.zeros_like(x, dtype=torch.float32)
        return out.index_add_(0, token, y.float() * weights.flatten()[order, None]).to(x.dtype)

    @staticmethod
    def _each(sorted_x: torch.Tensor, counts: torch.Tensor, expert) -> torch.Tensor:
        """expert(e, its rows) for each expert with rows of sorted_x [N*k, H] (sorted by expert) -> [N*k, H]."""
        outs, start = [], 0
        for e, count in enumerate(counts.tolist()):
            if count:
                outs.append(expert(e, sorted_x[start:start + count]))
                start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class SharedExpert(nn.Module):
    """The always-on expert: gate_proj, up_proj [I, H], down_proj [H, I], clamped like the routed ones."""

    def __init__(self, config: V4Config):
        super().__init__()
        H, inner = config.hidden_size, config.moe_intermediate_size
        self.limit = config.swiglu_limit
        self.gate_proj = Linear(H, inner, bias=config.mlp_bias)
        self.up_proj = Linear(H, inner, bias=config.mlp_bias)
        self.down_proj = Linear(inner, H, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(clamped_swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class V4MoE(nn.Module):
    def __init__(self, config: V4Config, hashed: bool):
        super().__init__()
        self.gate = V4Router(config, hashed)
        self.experts = V4Experts(config)
        self.shared_experts = SharedExpert(config)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, H], token_ids [B, S] -> [B, S, H]: routed experts plus the shared expert."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat, token_ids.reshape(-1))
        return (self.experts.run(flat, weights, ids) + self.shared_experts(flat)).view_as(x)

"""Feed-forward blocks: dense SwiGLU MLP, DeepSeek routers (V3 sigmoid, V2 softmax) and the MoE block.

Routing follows MODEL_SPEC.md: V3 selects with sigmoid scores + e_score_correction_bias, group-limited
(group score = sum of its top-2 biased scores), and weights the chosen experts by their unbiased scores
(normalised when norm_topk_prob) times routed_scaling_factor. V2 uses softmax scores with greedy or
group-limited greedy top-k. Expert dispatch here is a per-expert gather/scatter loop, adequate for
prefill on CPU; grouped GEMMs on GPU are the engine's concern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_worker.config import ModelConfig
from model_worker.layers.linear import Linear


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert selection (`mlp.gate`); weight kept in fp32 like the reference implementations."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.router_kind
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.n_experts, config.hidden_size, dtype=torch.float32))
        if self.kind == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, expert ids [N, k] int64)."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        if self.kind == "sigmoid":
            scores = logits.sigmoid()
            biased = scores + self.e_score_correction_bias
            group_scores = biased.view(-1, self.n_group, self.n_experts // self.n_group).topk(2, dim=-1)[0].sum(-1)
            choice = self._keep_top_groups(biased, group_scores, fill=float("-inf"))
            ids = choice.topk(self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1)
            if self.topk_method == "group_limited_greedy":
                group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).max(dim=-1).values
                scores = self._keep_top_groups(scores, group_scores, fill=0.0)
            weights, ids = scores.topk(self.top_k, dim=-1)
            if self.norm_topk_prob and self.top_k > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids

    def _keep_top_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """Mask experts outside the topk_group best groups. scores [N, E], group_scores [N, G]."""
        if self.n_group == 1:
            return scores
        top_groups = group_scores.topk(self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)
        return scores.masked_fill(~expert_mask, fill)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)  # [N, k]
        out = torch.zeros_like(flat)
        token_ids = torch.arange(flat.shape[0], device=x.device).unsqueeze(1).expand_as(ids)
        order = ids.flatten().argsort(stable=True)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        tokens_sorted = token_ids.flatten()[order]
        weights_sorted = weights.flatten()[order]
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens_sorted[start : start + count]
            expert_out = self.experts[expert_id](flat[rows]) * weights_sorted[start : start + count, None].to(x.dtype)
            out.index_add_(0, rows, expert_out)
            start += count
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)

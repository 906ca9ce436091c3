"""Feed-forward blocks: dense SwiGLU MLP, the DeepSeek router and the MoE block.

Routing follows MODEL_SPEC.md and is defined once, in `engram_kernels.moe_routing`: V3 selects with sigmoid scores
+ e_score_correction_bias, group-limited (group score = sum of its top-2 biased scores), and weights the
chosen experts by their unbiased scores (normalised when norm_topk_prob) times routed_scaling_factor; V2
uses softmax scores with greedy or group-limited greedy top-k, normalised *or* scaled (DeepSeek's V2 code).
An MLP's gate and up projections run as one GEMM (`execution.fused`); the routed experts run by the block's
experts method (`model_worker.execution.experts`), chosen at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_kernels.moe_routing import Routing, select_experts
from model_worker.config import ModelConfig
from model_worker.execution.experts import TORCH_EXPERTS, ExpertsMethod
from model_worker.execution.fused import ConcatenatedWeight, StackedWeight
from model_worker.layers.linear import Linear


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
    """Top-k expert selection (`mlp.gate`, `engram_kernels.moe_routing`); weight kept in fp32 like the reference
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
        self.experts_method: ExpertsMethod = TORCH_EXPERTS  # chosen at load (`CausalLM.arrange_weights`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]: sum over each token's experts of weight x expert(token), plus the shared
        experts."""
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat)  # [N, k]
        return self.experts_method.run(self, flat, weights, ids).view_as(x)

"""DeepSeek's expert selection, defined once: the torch definitions of V3 (sigmoid) and V2 (softmax) routing,
and `select_experts`, which the model's Router calls. Where it is faster, the same selection runs as a
kernel behind that function: V3 routing of a decode-sized batch on the CPU runs as one C call
(`engram_kernels.cpu_decode.sigmoid_route`, tested against `sigmoid_route_ref`), since torch spends about twenty
small ops per MoE layer per step on a few hundred comparisons; torch's vectorised ops win on prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram_kernels.cpu_decode import decode_gemm_available, sigmoid_route, sigmoid_route_ref
from engram_kernels.cpu_decode.moe_router import MAX_EXPERTS as C_MAX_EXPERTS

C_MAX_TOKENS = 64  # V3 routing of up to this many tokens runs in C (decode); more run in torch (prefill)


@dataclass(frozen=True)
class Routing:
    """A router's configuration (DeepSeek config fields)."""

    kind: str  # "sigmoid" (V3) or "softmax" (V2)
    n_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"  # V2: "greedy" or "group_limited_greedy"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    @property
    def c_routable(self) -> bool:
        """Whether the C routine takes this configuration: its groups divide the experts and hold top_k."""
        return self.kind == "sigmoid" and self.n_experts <= C_MAX_EXPERTS and self.n_experts % self.n_group == 0 \
            and self.top_k <= self.topk_group * (self.n_experts // self.n_group)


def softmax_route_ref(logits: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """V2: softmax scores, greedy or group-limited greedy top-k; as DeepSeek's V2 code, the chosen weights are
    normalised (norm_topk_prob, top_k > 1) or scaled by routed_scaling_factor, never both (transformers' V2
    always scales). logits [N, E] fp32 -> (weights [N, k] fp32, ids [N, k] int64)."""
    scores = logits.softmax(dim=-1)
    if r.topk_method == "group_limited_greedy" and r.n_group > 1:
        grouped = scores.view(scores.shape[0], r.n_group, -1)  # [N, G, E/G]
        top_groups = grouped.max(dim=-1).values.topk(r.topk_group, dim=-1)[1]
        dropped = torch.ones(grouped.shape[:2], dtype=torch.bool, device=logits.device).scatter_(1, top_groups, False)
        scores = grouped.masked_fill(dropped[..., None], 0.0).view_as(scores)
    weights, ids = scores.topk(r.top_k, dim=-1)
    if r.norm_topk_prob and r.top_k > 1:
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids
    return weights * r.routed_scaling_factor, ids


def select_experts(logits: torch.Tensor, r: Routing,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token goes to: logits [N, E] fp32 (bias [E]: V3's e_score_correction_bias) ->
    (weights [N, k] fp32, ids [N, k] int64)."""
    if r.kind != "sigmoid":
        return softmax_route_ref(logits, r)
    args = (r.n_group, r.topk_group, r.top_k, r.norm_topk_prob, r.routed_scaling_factor)
    if _in_c(logits, r, bias):
        return sigmoid_route(logits, bias, *args)
    return sigmoid_route_ref(logits, bias, *args)


def _in_c(logits: torch.Tensor, r: Routing, bias: torch.Tensor | None) -> bool:
    """C for at most C_MAX_TOKENS tokens on the CPU with no gradient wanted, a contiguous bias and a routable
    configuration, where the C kernels are built (ties aside, which real scores do not produce, the same
    selection)."""
    if logits.shape[0] > C_MAX_TOKENS or logits.device.type != "cpu" or logits.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and logits.requires_grad or (bias is not None and not bias.is_contiguous()):
        return False
    return r.c_routable and decode_gemm_available()

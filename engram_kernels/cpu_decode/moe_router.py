"""DeepSeek-V3 expert selection on the CPU: `sigmoid_route_ref` (torch, the definition) and `sigmoid_route`
(the C routine in `moe_router.h`).

    scores = sigmoid(logits); biased = scores + bias
    keep the topk_group groups whose two best biased scores sum highest; ids = top_k biased among them
    weights = scores[ids] (normalised to sum 1 if norm), times scale

The selection is a few hundred comparisons per token, which torch spends about 20 small ops on: at decode
that is per MoE layer per step, so the model's Router (`layers.moe`) calls the C routine where it builds.
"""

from __future__ import annotations

import torch

from engram_kernels.cpu_decode.decode_gemm import kernels_or_raise

MAX_EXPERTS = 1024  # ROUTE_MAX_EXPERTS in moe_router.h


def sigmoid_route_ref(logits: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
                      norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32 -> (weights [N, top_k] fp32, ids [N, top_k] int64), ids by biased score, largest first."""
    scores = logits.sigmoid()
    biased = scores if bias is None else scores + bias
    if n_group > 1:
        grouped = biased.view(logits.shape[0], n_group, -1)  # [N, G, E/G]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)  # [N, G]
        top_groups = group_scores.topk(topk_group, dim=-1)[1]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, False)
        biased = grouped.masked_fill(dropped[..., None], float("-inf")).view_as(biased)
    ids = biased.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def sigmoid_route(logits: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
                  norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`sigmoid_route_ref` through the C routine: logits [N, E] fp32 on the CPU with unit stride along E; bias
    [E] fp32 or None. Ties go to the lower group and the lower expert id. Raises RuntimeError where the
    kernels are unavailable and ValueError for a configuration it does not take."""
    lib = kernels_or_raise("sigmoid_route")
    n, experts = logits.shape if logits.dim() == 2 else (0, 0)
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu" or \
            (logits.stride(1) != 1 and experts > 1):
        raise ValueError(f"sigmoid_route takes CPU fp32 logits [N, E] with unit stride along E, got {logits.dtype} "
                         f"{list(logits.shape)} strides {logits.stride()} on {logits.device}")
    if bias is not None and (bias.shape != (experts,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous fp32 [{experts}], got {bias.dtype} {list(bias.shape)}")
    if not (0 < experts <= MAX_EXPERTS and n_group > 0 and experts % n_group == 0 and 0 < topk_group <= n_group
            and 0 < top_k <= topk_group * (experts // n_group)):
        raise ValueError(f"sigmoid_route: {experts} experts (at most {MAX_EXPERTS}) in {n_group} groups, "
                         f"{topk_group} kept, top {top_k}: the groups must divide the experts and the kept "
                         f"groups hold at least top_k experts")
    ids = torch.empty(n, top_k, dtype=torch.int64)
    weights = torch.empty(n, top_k)
    if n:
        lib.engram_sigmoid_route(logits.data_ptr(), logits.stride(0), n, experts,
                                 None if bias is None else bias.data_ptr(), n_group, topk_group, top_k, int(norm),
                                 float(scale), ids.data_ptr(), weights.data_ptr())
    return weights, ids

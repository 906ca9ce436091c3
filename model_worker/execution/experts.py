"""How a MoE block's routed experts run: chosen per call from the block's weights and the batch.

Float experts run as stacked weights (tokens sorted by expert): where the stacks are panel-packed
(`execution.panel_packs`, fp32 on hosts where our C panel kernel won), all experts in one grouped call of that
kernel per projection, at any row count; else in a decode step where no expert has more rows than the C
decode kernel takes, through its grouped GEMM, all experts in one call per projection
(`engram_kernels.cpu_decode`, where it builds and won on this host); otherwise one grouped GEMM per projection,
or one packed GEMM per expert with tokens where the experts are packed. A single token (decode of one
sequence) runs its k experts in turn, without sorting. FP8 experts, which cannot be stacked, run one by
one. Every path computes the same sum (tests compare them with float64 references).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from engram_kernels.cpu_decode import grouped_decode_gemm, grouped_panel_gemm
from model_worker.execution.cpu_gemm import choice_wins, cpu_gemm_preferences, row_bucket
from model_worker.execution.fused import grouped_linear, grouped_mm_available
from model_worker.execution.gemm import linear, linear_accumulate, native_kernel_takes, panel_for
from model_worker.execution.packed_gemm import packed


def run_experts(moe, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A MoE block's output for tokens flat [N, D] routed to experts ids [N, k] with weights [N, k] fp32:
    the routed experts' weighted sum plus the shared experts -> [N, D]. moe: the MoE module (`layers.moe.MoE`)."""
    gate_up, down = moe._stacked_gate_up.get(), moe._stacked_down.get()
    stacked = gate_up is not None and down is not None
    panels = (panel_for(flat, gate_up), panel_for(flat, down)) if stacked else (None, None)
    if panels[0] is not None and panels[1] is not None and flat.shape[0] == 1:
        return _one_token_panels(moe, flat, weights, ids, *panels, gate_up.shape[1])
    if stacked and flat.shape[0] == 1:
        return _one_token(moe, flat, weights, ids)
    order = ids.flatten().argsort(stable=True)  # (token, expert) pairs sorted by expert
    counts = torch.bincount(ids.flatten(), minlength=len(moe.experts))  # [E]
    token = order // ids.shape[1]  # [N*k] token of each sorted pair
    pair_weight = weights.flatten()[order, None].to(flat.dtype)  # [N*k, 1]
    # The C kernel's grouped GEMM where it takes every expert's rows and wins here; else, when most experts
    # have tokens, one grouped GEMM per projection over the stacked weights, unless the experts are packed
    # (`execution.packed_gemm`), where one packed GEMM per expert with tokens beats it.
    per_expert = counts.tolist() if stacked else []
    sorted_x = flat[token] if stacked else flat  # [N*k, D] each pair's token row, sorted by expert
    if panels[0] is not None and panels[1] is not None:
        expert_out = _panel_experts(sorted_x, per_expert, *panels, gate_up.shape[1], down.shape[1])
    elif stacked and _native_experts_win(moe, sorted_x, per_expert, gate_up, down):
        expert_out = _native_experts(sorted_x, per_expert, gate_up, down)
    elif stacked and len(order) >= len(counts) and grouped_mm_available(flat, gate_up, down) \
            and packed(moe._stacked_gate_up.per_group()[0][0]) is None:
        hidden = _swiglu(grouped_linear(sorted_x, gate_up, counts))
        expert_out = grouped_linear(hidden, down, counts)  # [N*k, D]
    elif stacked:  # few tokens (decode) or packed experts: only the experts that have tokens
        expert_out = _each_stacked_expert(moe, sorted_x, per_expert)
    else:
        # Unstackable (FP8) experts: run only the experts that have tokens, one by one.
        expert_out = flat.new_empty(len(order), flat.shape[-1])
        start = 0
        for expert_id, count in enumerate(counts.tolist()):
            if count:
                rows = slice(start, start + count)
                expert_out[rows] = moe.experts[expert_id](flat[token[rows]])
                start += count
    out = torch.zeros_like(flat).index_add_(0, token, expert_out * pair_weight)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out


def _each_stacked_expert(moe, sorted_x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert with tokens on its rows of sorted_x [N*k, D] (sorted by expert; counts per expert),
    through the stacked weights' cached per-expert views -> [N*k, D] in the same order."""
    gate_up, _ = moe._stacked_gate_up.per_group()  # [2I, D] each
    down, _ = moe._stacked_down.per_group()  # [D, I] each
    outs, start = [], 0
    for expert_id, count in enumerate(counts):
        if count:
            rows = sorted_x[start : start + count]
            outs.append(linear(_swiglu(linear(rows, gate_up[expert_id])), down[expert_id]))
            start += count
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _native_experts_win(moe, sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                        down: torch.Tensor) -> bool:
    """Whether every expert's rows go through the C kernel's grouped GEMM (`_native_experts`): it takes the
    operands with as many rows as the busiest expert has (`native_kernel_takes`), and on this host it beat
    the per-expert loop for this stack shape and that row count (`execution.cpu_gemm.choice_wins`)."""
    busiest = max(counts)
    if gate_up.dtype != torch.float32 or not (native_kernel_takes(sorted_x, busiest, gate_up)
                                              and native_kernel_takes(sorted_x, busiest, down)):
        return False  # the grouped kernel is fp32 only
    if not cpu_gemm_preferences().tune_native:
        return True
    key = ("native experts", *gate_up.shape, *down.shape[1:], row_bucket(busiest))
    return choice_wins(key, lambda: (lambda: _each_stacked_expert(moe, sorted_x, counts),
                                     lambda: _native_experts(sorted_x, counts, gate_up, down)))


def _panel_experts(sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor,
                   hidden2: int, width: int) -> torch.Tensor:
    """All experts in two calls of our C panel kernel (`engram_kernels.cpu_decode.grouped_panel_gemm`), any number
    of rows each: sorted_x [N*k, D] sorted by expert, counts per expert, the stacks' panel-packed copies
    (`execution.panel_packs`) gate_up (of [E, 2I, D], hidden2 = 2I) and down (of [E, D, I], width = D)
    -> [N*k, D] in the same order."""
    return _grouped_swiglu(sorted_x, counts, lambda x, offsets: grouped_panel_gemm(x, offsets, gate_up, hidden2),
                           lambda h, offsets: grouped_panel_gemm(h, offsets, down, width))


def _native_experts(sorted_x: torch.Tensor, counts: list[int], gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """All experts in two C calls (`engram_kernels.cpu_decode.grouped_decode_gemm`): sorted_x [N*k, D] sorted by
    expert, counts per expert, stacks gate_up [E, 2I, D] and down [E, D, I] -> [N*k, D] in the same order."""
    return _grouped_swiglu(sorted_x, counts, lambda x, offsets: grouped_decode_gemm(x, offsets, gate_up),
                           lambda h, offsets: grouped_decode_gemm(h, offsets, down))


def _one_token(moe, flat, weights, ids) -> torch.Tensor:
    """Decode of a single sequence: its k experts in turn, no sorting or scattering. flat [1, D] -> [1, D].
    Experts' weights come as cached per-expert views (`StackedWeight.per_group`)."""
    gate_up, _ = moe._stacked_gate_up.per_group()  # [2I, D] each
    down, down_t = moe._stacked_down.per_group()  # [D, I] and [I, D] each
    out = moe.shared_experts(flat) if moe.shared_experts is not None else torch.zeros_like(flat)
    for expert_id, weight in zip(ids.tolist()[0], weights.tolist()[0]):
        hidden = _swiglu(linear(flat, gate_up[expert_id]))  # [1, I]
        out = linear_accumulate(out, hidden, down[expert_id], weight, down_t[expert_id])  # out + weight * down(h)
    return out


def _one_token_panels(moe, flat, weights, ids, gate_up: torch.Tensor, down: torch.Tensor,
                      hidden2: int) -> torch.Tensor:
    """Decode of a single sequence through the panel-packed stacks: its k experts in two grouped calls (no
    sorting or scattering in torch), their outputs weighted and summed with the shared experts' in one
    addmm. flat [1, D] -> [1, D]."""
    pairs = sorted(zip(ids.tolist()[0], weights.tolist()[0]))  # (expert, weight), by expert
    counts = [0] * len(moe.experts)
    for expert_id, _ in pairs:
        counts[expert_id] += 1
    rows = flat.expand(len(pairs), flat.shape[1])  # [k, D]: the token's row k times (stride 0, no copy)
    expert_out = _panel_experts(rows, counts, gate_up, down, hidden2, flat.shape[1])  # [k, D]
    out = moe.shared_experts(flat) if moe.shared_experts is not None else torch.zeros_like(flat)
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

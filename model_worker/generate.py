"""Greedy generation by full recompute: the simple, obviously-correct loop.

Every step re-runs the whole sequence through `CausalLM.prefill`; there is no KV cache. It is the
reference the engine's cached, batched decode is checked against, and what the demo uses until the
engine exists. Stops at `max_new_tokens` or at any of `stop_token_ids`.
"""

from __future__ import annotations

import torch

from model_worker.model import CausalLM


@torch.inference_mode()
def greedy_generate(model: CausalLM, prompt_ids: list[int], max_new_tokens: int,
                    stop_token_ids: set[int] | None = None) -> list[int]:
    """Returns only the new token ids (at most max_new_tokens)."""
    if not prompt_ids:
        raise ValueError("prompt_ids: the prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {limit} tokens")
    stop = stop_token_ids or set()
    ids = list(prompt_ids)
    new: list[int] = []
    device = next(model.parameters()).device
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=device))[0, -1]
        token = int(logits.argmax())
        new.append(token)
        if token in stop:
            break
        ids.append(token)
    return new

"""Our model loads checkpoints written by transformers and reproduces its logits."""

from __future__ import annotations

import pytest
import torch

from model_worker import load_model
from tests.model_worker.hf_checkpoints import V2_VARIANTS, V3_VARIANTS, write_hf_checkpoint

LENGTHS = [7, 19, 12]  # > original_max_position_embeddings (16) for the YaRN configs


def _prompts(vocab: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]


def _pad(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


def _max_error_vs_hf(ours, hf_model, prompts, side: str) -> float:
    ids, mask = _pad(prompts, side)
    logits = ours(ids, attention_mask=mask)
    worst = 0.0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model(p[None]).logits[0]
        got = logits[i][mask[i].bool()]
        worst = max(worst, (got - expected).abs().max().item())
    return worst


CHECKPOINTS = [("v3", v) for v in sorted(V3_VARIANTS)] + [("v2", v) for v in sorted(V2_VARIANTS)]


@pytest.mark.parametrize("family,variant", CHECKPOINTS)
def test_checkpoint_logits_match_transformers(tmp_path, family, variant):
    path, hf_model = write_hf_checkpoint(tmp_path, family, variant)
    ours = load_model(path)
    prompts = _prompts(ours.config.vocab_size)
    assert _max_error_vs_hf(ours, hf_model, prompts, "right") <= 1e-4
    assert _max_error_vs_hf(ours, hf_model, prompts, "left") <= 1e-4


@pytest.mark.parametrize("family,variant", [("v3", "moe_grouped"), ("v3", "yarn"), ("v2", "greedy")])
def test_absorbed_and_naive_attention_agree(tmp_path, family, variant):
    path, _ = write_hf_checkpoint(tmp_path, family, variant)
    model = load_model(path)
    ids, mask = _pad(_prompts(model.config.vocab_size), "left")
    naive = model(ids, attention_mask=mask)
    model.set_absorbed_attention(True)
    absorbed = model(ids, attention_mask=mask)
    valid = mask.bool()
    assert (naive[valid] - absorbed[valid]).abs().max().item() <= 1e-4
    # and the comparison is meaningful: the logits are far from constant
    assert naive[valid].std().item() > 0.1


def test_routing_bias_changes_the_output(tmp_path):
    """The V3 correction bias steers expert choice; zeroing it must change logits (guards a silent no-op)."""
    path, _ = write_hf_checkpoint(tmp_path, "v3", "moe_grouped")
    model = load_model(path)
    ids, mask = _pad(_prompts(model.config.vocab_size), "right")
    before = model(ids, attention_mask=mask)
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.e_score_correction_bias.zero_()
    after = model(ids, attention_mask=mask)
    assert (before - after).abs().max().item() > 1e-3

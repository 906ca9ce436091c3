"""FP8 latent cache vs bf16 latent cache: teacher-forced next-token agreement, and its byte cost."""

from __future__ import annotations

import pytest
import torch

from model_worker import build_random_model
from model_worker.engine.block_manager import BlockManager
from model_worker.engine.kv_cache import PagedLatentCache
from model_worker.engine.runner import ModelRunner
from model_worker.engine.scheduler import Scheduler
from model_worker.engine.sequence import Sequence
from tests.model_worker.engine.engine_fixtures import (
    demo_tokenizer,
    greedy,
    make_engine,
    random_prompt,
    run_to_completion,
    tiny_config,
)

NEW_TOKENS = 128


def _teacher_forced_logits(model, fmt: str, sequences: dict[str, list[int]], prompt_lens: dict[str, int]):
    """Run every sequence through the real scheduler + runner + paged cache, feeding the given tokens
    instead of sampled ones. -> {request_id: logits [NEW_TOKENS, vocab]} (logits before each fed token)."""
    cfg = model.config
    per_token = PagedLatentCache.bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim, fmt) * cfg.num_hidden_layers
    blocks = BlockManager.blocks_for_budget(64 * 2**20, per_token)
    cache = PagedLatentCache(cfg.num_hidden_layers, blocks, cfg.kv_lora_rank, cfg.qk_rope_head_dim, fmt=fmt)
    scheduler = Scheduler(BlockManager(blocks), max_num_seqs=16, max_num_batched_tokens=4096)
    runner = ModelRunner(model, cache)
    for request_id, tokens in sequences.items():
        scheduler.add(Sequence(request_id=request_id, prompt_token_ids=tokens[: prompt_lens[request_id]],
                               sampling=greedy(NEW_TOKENS)))
    logits: dict[str, list[torch.Tensor]] = {rid: [] for rid in sequences}
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        seqs, step_logits = runner.execute(batch)
        forced = {seq.request_id: None for seq in batch.seqs}
        for seq, row in zip(seqs, step_logits):
            logits[seq.request_id].append(row)
            forced[seq.request_id] = sequences[seq.request_id][seq.num_tokens]
        scheduler.update(batch, forced)
        for seq in seqs:
            if len(seq.output_token_ids) >= NEW_TOKENS:
                scheduler.finish(seq, "length")
    return {rid: torch.stack(rows) for rid, rows in logits.items()}


@pytest.mark.parametrize("std,patch,min_agreement,max_error_ratio", [
    # The default random model (weights ~ N(0, 0.02^2), transformers' initializer_range), whole
    # architecture: MLA + MoE + mHC + Engram. The bar: top-1 agreement >= 99%.
    (0.02, {}, 0.99, 32),
    # Stress: weights 10x larger, dense. Attention then dominates the residual stream and top-1 margins
    # are a fraction of a logit, so FP8 rounding flips more of them.
    (0.2, {"n_routed_experts": None}, 0.90, 24),
], ids=["default-init-moe", "std0.2-dense-stress"])
def test_fp8_cache_top1_agreement_and_error_bounded_by_its_precision(std, patch, min_agreement, max_error_ratio):
    """8 prompts x 128 teacher-forced tokens through both cache formats, against an fp32 full recompute.

    The error-ratio bound is the sharp check: e4m3 keeps 3 mantissa bits to bf16's 7, so the FP8 cache's
    logit error may be about 2^4 = 16x the bf16 cache's (more where a perturbation flips an expert
    choice); a wrong scale or layout would be far beyond that.
    """
    config = tiny_config(**patch)
    token_map = torch.tensor(demo_tokenizer().compressed_token_map(), dtype=torch.int64)
    model = build_random_model(config, seed=1, token_map=token_map, std=std)
    engine = make_engine(model)
    prompts = {f"p{i}": random_prompt(10 + 13 * i, seed=60 + i) for i in range(8)}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, greedy(NEW_TOKENS))
    outputs = run_to_completion(engine)
    sequences = {rid: prompts[rid] + [t for out in outs for t in out.new_token_ids] for rid, outs in outputs.items()}
    prompt_lens = {rid: len(p) for rid, p in prompts.items()}

    bf16 = _teacher_forced_logits(model, "bf16", sequences, prompt_lens)
    fp8 = _teacher_forced_logits(model, "fp8", sequences, prompt_lens)
    agree, total, err_bf16, err_fp8 = 0, 0, 0.0, 0.0
    for rid, tokens in sequences.items():
        start = prompt_lens[rid] - 1
        full = model(torch.tensor([tokens]))[0, start : start + NEW_TOKENS]  # fp32 latents, no cache
        agree += (bf16[rid].argmax(-1) == fp8[rid].argmax(-1)).sum().item()
        total += NEW_TOKENS
        err_bf16 = max(err_bf16, (bf16[rid] - full).abs().max().item())
        err_fp8 = max(err_fp8, (fp8[rid] - full).abs().max().item())
    print(f"\nFP8 vs bf16 cache (weights std {std}), teacher-forced: top-1 agreement {agree}/{total} = "
          f"{agree / total:.4f}; max |logit error| vs fp32 recompute: fp8 {err_fp8:.4f}, bf16 {err_bf16:.4f} "
          f"({err_fp8 / err_bf16:.1f}x)")
    assert err_bf16 < err_fp8 <= max_error_ratio * err_bf16
    assert agree / total >= min_agreement


def test_fp8_layout_costs_656_bytes_per_token_per_layer_for_v3_dims():
    cache = PagedLatentCache(num_layers=2, num_blocks=3, kv_lora_rank=512, rope_dim=64, fmt="fp8")
    assert cache.measured_bytes_per_token_per_layer == 656
    bf16 = PagedLatentCache(num_layers=2, num_blocks=3, kv_lora_rank=512, rope_dim=64, fmt="bf16")
    assert bf16.measured_bytes_per_token_per_layer == 1152

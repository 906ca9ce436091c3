"""The engine end to end against the full-recompute reference: batching, prefix cache, preemption, seeds."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from model_worker.engine.sampling import SamplingParams
from model_worker.generate import greedy_generate
from tests.model_worker.engine.engine_fixtures import (
    greedy,
    make_engine,
    random_prompt,
    run_to_completion,
    tiny_model,
    tokens_of,
)


def _reference(model, prompt, n, cache="auto"):
    """Naive full recompute; for a bf16 cache, with latents rounded to bf16 as the cache stores them (the
    default "auto" cache of an fp32 model is fp32: the naive recompute as is)."""
    model.set_latent_rounding(torch.bfloat16 if cache == "bf16" else None)
    try:
        return greedy_generate(model, prompt, n)
    finally:
        model.set_latent_rounding(None)


@pytest.mark.parametrize("cache", ["auto", "bf16"])
def test_continuous_batching_matches_full_recompute_greedy(cache):
    """8 prompts of different lengths joining at different steps, 64 new tokens each; under the default
    cache of an fp32 model (fp32 rows) the greedy tokens equal a naive full recompute token for token."""
    model = tiny_model()
    engine = make_engine(model, max_num_batched_tokens=96, kv_cache_dtype=cache)  # chunked prefill of longer ones
    assert engine.kv_cache_format == ("fp32" if cache == "auto" else "bf16")
    lengths = [3, 17, 40, 64, 65, 100, 130, 9]
    prompts = {f"r{i}": random_prompt(n, seed=i) for i, n in enumerate(lengths)}
    outputs: dict[str, list] = {}
    pending = list(prompts.items())
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # a new request joins every third step
            request_id, prompt = pending.pop(0)
            engine.add_request(request_id, prompt, greedy(64))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    for request_id, prompt in prompts.items():
        got = tokens_of(outputs[request_id])
        assert got == _reference(model, prompt, 64, cache), request_id
        assert outputs[request_id][-1].finish_reason == "length"


def test_prefix_cache_computes_only_new_tokens_and_keeps_output():
    model = tiny_model()
    engine = make_engine(model)
    prefix = random_prompt(1024, seed=7)  # 16 full pages
    first, second = prefix + random_prompt(20, seed=8), prefix + random_prompt(30, seed=9)
    engine.add_request("a", first, greedy(8))
    run_to_completion(engine)
    before = engine.stats["computed_tokens"]
    engine.add_request("b", second, greedy(8))
    out = run_to_completion(engine)["b"]
    computed = engine.stats["computed_tokens"] - before
    assert computed == 30 + 8 - 1  # the new prompt tokens, then one decode step per further token
    assert out[-1].usage.cached_tokens == 1024
    fresh = make_engine(model, enable_prefix_caching=False)
    fresh.add_request("b", second, greedy(8))
    assert tokens_of(out) == tokens_of(run_to_completion(fresh)["b"])


def test_prefix_cache_shares_whole_pages_of_an_unaligned_prefix():
    model = tiny_model()
    engine = make_engine(model)
    prefix = random_prompt(1000, seed=11)  # 15 full pages + 40 tokens
    engine.add_request("a", prefix + [7, 8, 9], greedy(4))
    run_to_completion(engine)
    before = engine.stats["computed_tokens"]
    engine.add_request("b", prefix + [10, 11], greedy(4))
    out = run_to_completion(engine)["b"]
    assert engine.stats["computed_tokens"] - before == (1002 - 960) + 3
    assert out[-1].usage.cached_tokens == 960


def test_page_exhaustion_preempts_and_every_request_completes_correctly():
    model = tiny_model()
    cfg = model.config
    per_token = 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers  # fp32 rows (auto)
    engine = make_engine(model, cache_budget_bytes=per_token * 64 * 6)  # 6 pages of 64 tokens
    prompts = {f"p{i}": random_prompt(60 + 7 * i, seed=20 + i) for i in range(4)}  # each needs 2-3 pages
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, greedy(70))
    outputs = run_to_completion(engine)
    assert engine.stats["preemptions"] > 0
    for request_id, prompt in prompts.items():
        assert tokens_of(outputs[request_id]) == _reference(model, prompt, 70), request_id


def test_seeded_sampling_is_reproducible_alone_and_batched():
    model = tiny_model()
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = random_prompt(12, seed=3)
    alone = make_engine(model)
    alone.add_request("x", prompt, params)
    text_alone = "".join(o.text_delta for o in run_to_completion(alone)["x"])
    batched = make_engine(model)
    for i in range(5):
        batched.add_request(f"other{i}", random_prompt(5 + i, seed=40 + i),
                            SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True))
    batched.add_request("x", prompt, params)
    text_batched = "".join(o.text_delta for o in run_to_completion(batched)["x"])
    assert text_alone == text_batched and len(text_alone) > 0
    other_seed = make_engine(model)
    other_seed.add_request("x", prompt, params.model_copy(update={"seed": 99}))
    assert "".join(o.text_delta for o in run_to_completion(other_seed)["x"]) != text_alone


SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["calculator", "memory_search", "final_answer"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["tool", "count", "ok", "note"],
    "additionalProperties": False,
}


def test_schema_constrained_generation_always_validates():
    engine = make_engine(tiny_model(seed=5))
    for i in range(50):
        params = SamplingParams(max_tokens=160, temperature=1.0, seed=i, json_schema=SCHEMA)
        engine.add_request(f"s{i}", random_prompt(8, seed=100 + i), params)
    outputs = run_to_completion(engine)
    assert len(outputs) == 50
    for request_id, outs in outputs.items():
        assert outs[-1].finish_reason == "stop", request_id
        text = "".join(o.text_delta for o in outs)
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("patch,match", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1] * 2000), "context"),
    (dict(prompt=[10**6]), "token ids"),
])
def test_bad_requests_are_refused_and_nothing_is_queued(patch, match):
    engine = make_engine()
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", patch["prompt"], greedy(100))
    assert not engine.has_unfinished()


def test_invalid_schema_and_duplicate_ids_are_refused():
    engine = make_engine()
    with pytest.raises(ValueError):
        engine.add_request("s", [5, 6], SamplingParams(json_schema={"type": "no-such-type"}))
    engine.add_request("dup", [5, 6], greedy(3))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("dup", [5, 6], greedy(3))
    engine.abort("dup")
    assert not engine.has_unfinished()

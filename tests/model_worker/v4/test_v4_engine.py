"""A DeepSeek-V4 model served by the engine (`engine.v4_runner`): continuous batching with chunked prefill,
prompts longer than the sliding window and a shared-prefix pair give the greedy tokens of naive full
recompute; under a cache budget small enough to preempt, too; and the ModelWorker loads a V4 checkpoint
and answers token-id requests."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model_worker.engine.engine import EngineConfig, LLMEngine
from model_worker.engine.v4_runner import v4_bytes_per_token
from tests.model_worker.engine.engine_fixtures import greedy, run_to_completion, tokens_of
from tests.model_worker.v4.test_v4_parity import BASE, DeepseekV4Config, _random_reference

pytestmark = pytest.mark.skipif(DeepseekV4Config is None, reason="this transformers has no deepseek_v4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4")
    _random_reference(BASE, seed=21).save_pretrained(path)
    return path


def _naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


def _prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(0, 128, (19,), generator=g).tolist()
    return {"long": torch.randint(0, 128, (37,), generator=g).tolist(),  # > W = 8, closes windows of 4 and 8
            "short": torch.randint(0, 128, (3,), generator=g).tolist(),
            "shared-a": shared + [5, 6, 7], "shared-b": shared + [9]}


@pytest.mark.parametrize("budget_blocks", [None, 6])
def test_engine_greedy_equals_naive_recompute(checkpoint, budget_blocks):
    from model_worker.v4 import load_v4_model

    model = load_v4_model(checkpoint)
    config = EngineConfig(block_size=8, max_num_batched_tokens=16, max_num_seqs=4)
    if budget_blocks:  # room for 6 pages of 8 tokens (the longest request needs all 6): preemption
        config.cache_budget_bytes = budget_blocks * 8 * v4_bytes_per_token(model.config, 4)
    engine = LLMEngine(model, None, config)
    prompts = _prompts()
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(10 if not budget_blocks else 5))
    outputs = run_to_completion(engine)
    for rid, prompt in prompts.items():
        assert tokens_of(outputs[rid]) == _naive_greedy(model, prompt, 10 if not budget_blocks else 5), rid
    if budget_blocks:
        assert engine.preemptions > 0
    assert engine.runner._states == {}  # finished requests leave no state behind


def test_fp8_pages_come_from_one_pool_and_go_back_to_it(checkpoint):
    from model_worker.v4 import load_v4_model

    model = load_v4_model(checkpoint)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_dtype="fp8", block_size=8, max_num_seqs=4))
    prompts = _prompts()
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy(4))
    outputs = run_to_completion(engine)
    layout = engine.runner.pool.layout
    for rid, prompt in prompts.items():  # the same FP8 rows decoded alone, each state in its own pool
        state, want = model.new_state(layout), []
        with torch.no_grad():
            logits = model(torch.tensor([prompt]), state)[0, -1]
            for _ in range(4):
                want.append(int(logits.argmax()))
                logits = model(torch.tensor([[want[-1]]]), state)[0, -1]
        assert tokens_of(outputs[rid]) == want, rid
    pool = engine.runner.pool
    assert pool.used_pages > 0  # the snapshots of finished requests hold theirs
    engine.runner.close()
    assert pool.used_pages == 0


def test_engine_serves_v4_with_the_fp8_cache_and_refuses_other_formats(checkpoint):
    from model_worker.v4 import load_v4_model
    from model_worker.v4.kv_rows import Model1Rows, model1_layout

    model = load_v4_model(checkpoint)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_dtype="fp8", block_size=8))
    layout = model1_layout(model.config.head_dim, model.config.qk_rope_head_dim)
    assert engine.block_manager.num_blocks * 8 * v4_bytes_per_token(model.config, 4, layout) <= 256 * 2**20
    engine.add_request("long", _prompts()["long"], greedy(6))
    engine.step()  # the prefill
    (state,) = engine.runner._states.values()
    assert isinstance(state.layers[0].keys, Model1Rows) and state.layers[0].keys.count == BASE["sliding_window"] - 1
    outputs = run_to_completion(engine)
    assert len(tokens_of(outputs["long"])) == 5  # the sixth came from the prefill step
    with pytest.raises(ValueError, match="MODEL1 FP8 rows"):
        LLMEngine(model, None, EngineConfig(kv_cache_dtype="bf16"))  # an fp32 V4 model: auto or fp8 only


def test_model_worker_serves_a_v4_checkpoint(checkpoint):
    from model_worker.worker import GenerateRequest, ModelWorker

    worker = ModelWorker.from_pretrained(checkpoint)
    prompt = _prompts()["long"]

    async def run():
        async with worker:
            (result,) = await worker.generate([GenerateRequest(prompt_token_ids=prompt, params=greedy(6))])
            return result

    result = asyncio.run(run())
    assert result.token_ids == _naive_greedy(worker.engine.model, prompt, 6)


def test_a_later_request_resumes_from_the_longest_stored_prefix(checkpoint):
    """An agent's next step re-sends its history: the second request starts from the snapshot the first left
    (its prompt plus what it generated), computes only the new tokens, and still equals naive recompute."""
    from model_worker.v4 import load_v4_model

    model = load_v4_model(checkpoint)
    engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_batched_tokens=16))
    first = _prompts()["long"]
    engine.add_request("step-1", first, greedy(6))
    answer = tokens_of(run_to_completion(engine)["step-1"])
    computed = engine.runner.computed_tokens
    second = first + answer + [7, 8, 9, 10]
    engine.add_request("step-2", second, greedy(6))
    got = tokens_of(run_to_completion(engine)["step-2"])
    assert got == _naive_greedy(model, second, 6)
    # step 1 left a snapshot of its prompt + 5 of its 6 tokens (the last was sampled, never fed back)
    reused = len(first) + len(answer) - 1
    assert engine.runner.prefixes.reused_tokens == reused
    assert engine.runner.computed_tokens - computed == len(second) - reused + 5  # the rest, then 5 decode steps


def test_openai_chat_with_a_json_schema_on_a_v4_model(tmp_path):
    """Structured decoding and the OpenAI handlers are the engine's own: a V4 model's constrained chat output
    parses and validates against the schema."""
    import json

    import jsonschema

    from model_worker.engine.engine import EngineConfig as Config
    from model_worker.v4 import load_v4_model
    from model_worker.worker import ModelWorker
    from tests.model_worker.engine.engine_fixtures import demo_tokenizer
    from tests.model_worker.test_openai_api import CHAT, PERSON

    tokenizer = demo_tokenizer()
    _random_reference({**BASE, "vocab_size": tokenizer.vocab_size}, seed=2).save_pretrained(tmp_path)
    worker = ModelWorker(load_v4_model(tmp_path), tokenizer, Config(), model_name="v4")
    response_format = {"type": "json_schema", "json_schema": {"name": "flags", "schema": PERSON}}

    async def run():
        try:
            bodies = [{"model": "v4", "messages": CHAT, "max_tokens": 200, "seed": seed,
                       "response_format": response_format} for seed in range(3)]
            return await asyncio.gather(*(worker.chat_completions(body) for body in bodies))
        finally:
            await worker.close()

    for response in asyncio.run(run()):
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)

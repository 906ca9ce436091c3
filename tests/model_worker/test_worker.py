"""ModelWorker over a real tiny engine: generate/stream agree with a directly driven LLMEngine,
concurrency, cancellation, per-request failure, bad input, loading and shutdown."""

from __future__ import annotations

import asyncio
import functools

import pytest

from model_worker.engine import engine as engine_module
from model_worker.engine.detokenizer import IncrementalDetokenizer
from model_worker.engine.engine import EngineConfig
from model_worker.engine.sampling import SamplingParams
from model_worker.worker import GenerateRequest, ModelWorker
from tests.model_worker.engine.engine_fixtures import (
    demo_tokenizer,
    greedy,
    make_engine,
    random_prompt,
    run_to_completion,
    tiny_model,
    tokens_of,
)

TIMEOUT_S = 60  # a hung engine thread must fail the test, not the session


@functools.cache
def shared_model():
    return tiny_model()


def _worker(**config) -> ModelWorker:
    return ModelWorker(shared_model(), demo_tokenizer(), EngineConfig(**config), model_name="tiny")


def run_with_worker(test):
    """Run `test(worker)` on a fresh event loop and worker; always closes the worker."""

    async def main():
        worker = _worker()
        try:
            return await asyncio.wait_for(test(worker), TIMEOUT_S)
        finally:
            await worker.close()

    return asyncio.run(main())


def _engine_tokens(prompt: list[int], params: SamplingParams) -> list[int]:
    """The independent reference: the same request through an LLMEngine stepped by hand."""
    engine = make_engine(shared_model())
    engine.add_request("ref", prompt, params)
    return tokens_of(run_to_completion(engine)["ref"])


async def wait_idle(worker: ModelWorker) -> None:
    while not worker.is_idle():
        await asyncio.sleep(0.005)


def test_generate_and_stream_agree_with_a_hand_driven_engine():
    prompt = random_prompt(20, seed=1)
    params = greedy(12)

    async def test(worker):
        (result,) = await worker.generate([GenerateRequest(prompt_token_ids=prompt, params=params)])
        deltas = [d async for d in worker.stream(GenerateRequest(prompt_token_ids=prompt, params=params))]
        return result, deltas

    result, deltas = run_with_worker(test)
    expected = _engine_tokens(prompt, params)
    assert result.token_ids == expected
    assert [t for d in deltas for t in d.token_ids] == expected
    assert "".join(d.text for d in deltas) == result.text == demo_tokenizer().decode(expected)
    assert [d.finish_reason for d in deltas] == [None] * 11 + ["length"]
    assert result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (20, 12)


def test_text_and_chat_prompts_are_encoded_as_the_tokenizer_does():
    tok = demo_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}]
    params = greedy(4)

    async def test(worker):
        return await worker.generate([GenerateRequest(prompt="The agent called", params=params),
                                      GenerateRequest(messages=messages, params=params)])

    text_result, chat_result = run_with_worker(test)
    assert text_result.token_ids == _engine_tokens(tok.encode("The agent called"), params)
    assert chat_result.token_ids == _engine_tokens(tok.encode_chat(messages), params)
    assert chat_result.usage.prompt_tokens == len(tok.encode_chat(messages))


def test_concurrent_requests_each_match_their_solo_run():
    """Seeded sampling and greedy requests, started together from separate tasks, batch in the engine."""
    requests = [GenerateRequest(prompt_token_ids=random_prompt(5 + 9 * i, seed=10 + i),
                                params=SamplingParams(max_tokens=6 + i, seed=100 + i, ignore_eos=True))
                for i in range(4)]
    requests.append(GenerateRequest(prompt_token_ids=random_prompt(70, seed=3), params=greedy(9)))

    async def streamed(worker, request):
        return [t async for d in worker.stream(request) for t in d.token_ids]

    async def test(worker):
        batched = await asyncio.gather(*(worker.generate([r]) for r in requests[:2]),
                                       *(streamed(worker, r) for r in requests[2:]))
        return [b[0].token_ids for b in batched[:2]] + list(batched[2:])

    got = run_with_worker(test)
    for request, tokens in zip(requests, got):
        assert tokens == _engine_tokens(request.prompt_token_ids, request.params)


def test_usage_reports_prefix_cache_hits():
    prefix = random_prompt(128, seed=4)  # two full pages

    async def test(worker):
        first = await worker.generate([GenerateRequest(prompt_token_ids=prefix + [7, 8], params=greedy(3))])
        second = await worker.generate([GenerateRequest(prompt_token_ids=prefix + [9], params=greedy(3))])
        return first[0].usage, second[0].usage

    first, second = run_with_worker(test)
    assert (first.prompt_tokens, first.completion_tokens, first.cached_tokens) == (130, 3, 0)
    assert (second.prompt_tokens, second.completion_tokens, second.cached_tokens) == (129, 3, 128)


@pytest.mark.parametrize("how", ["cancel_task", "aclose"])
def test_stopping_the_consumer_aborts_the_request_in_the_engine(how):
    request = GenerateRequest(prompt_token_ids=random_prompt(10, seed=5), params=greedy(1500))

    async def test(worker):
        seen = []
        stream = worker.stream(request)

        async def consume():
            async for delta in stream:
                seen.append(delta)

        if how == "cancel_task":
            task = asyncio.create_task(consume())
            while len(seen) < 3:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            seen.append(await anext(stream))
            await stream.aclose()
        await wait_idle(worker)
        return seen, worker.engine.has_unfinished(), worker.engine.stats["computed_tokens"]

    seen, unfinished, computed = run_with_worker(test)
    assert not unfinished and computed < 500  # stopped long before its 1500 tokens
    assert all(d.finish_reason is None for d in seen)


def test_cancelling_generate_aborts_all_its_requests():
    requests = [GenerateRequest(prompt_token_ids=random_prompt(8, seed=i), params=greedy(1500)) for i in range(3)]

    async def test(worker):
        task = asyncio.create_task(worker.generate(requests))
        while not worker.engine.has_unfinished():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(worker)
        return worker.engine.has_unfinished(), worker.engine.stats["computed_tokens"]

    unfinished, computed = run_with_worker(test)
    assert not unfinished and computed < 3 * 500


def test_a_failing_request_fails_alone(monkeypatch):
    poison = random_prompt(6, seed=99)

    class FailingDetokenizer(IncrementalDetokenizer):
        def step(self, new_token_ids):
            if self._poisoned and len(new_token_ids) and self._count == 2:
                raise RuntimeError("detokenizer exploded")
            self._count += 1
            return super().step(new_token_ids)

        def __init__(self, tokenizer, prompt_token_ids, stop):
            super().__init__(tokenizer, prompt_token_ids, stop)
            self._poisoned, self._count = list(prompt_token_ids) == poison, 0

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", FailingDetokenizer)
    healthy = [GenerateRequest(prompt_token_ids=random_prompt(9, seed=i), params=greedy(8)) for i in range(2)]
    requests = [healthy[0], GenerateRequest(prompt_token_ids=poison, params=greedy(8)), healthy[1]]

    results = run_with_worker(lambda worker: worker.generate(requests))
    assert results[1].finish_reason == "error" and "detokenizer exploded" in results[1].error
    assert len(results[1].token_ids) == 3
    for request, result in zip(healthy, (results[0], results[2])):
        assert result.error is None and result.finish_reason == "length"
        assert result.token_ids == _engine_tokens(request.prompt_token_ids, request.params)


def test_refused_request_raises_value_error_naming_it_and_nothing_runs():
    too_long = GenerateRequest(prompt_token_ids=random_prompt(2040, seed=6), params=greedy(16))  # context 2048
    fine = GenerateRequest(prompt_token_ids=random_prompt(8, seed=7), params=greedy(1500))

    async def test(worker):
        with pytest.raises(ValueError, match=r"requests\[1\]: .*context of 2048"):
            await worker.generate([fine, too_long])
        with pytest.raises(ValueError, match=r"requests\[0\]: prompt"):
            await worker.generate([GenerateRequest(prompt_token_ids=[10**6], params=greedy(2))])
        with pytest.raises(TypeError, match="requests"):
            await worker.generate(fine)
        await wait_idle(worker)
        return worker.engine.stats["computed_tokens"]

    assert run_with_worker(test) == 0


def test_generate_request_needs_exactly_one_prompt():
    with pytest.raises(ValueError, match="exactly one of"):
        GenerateRequest(prompt="a", prompt_token_ids=[1])
    with pytest.raises(ValueError, match="exactly one of"):
        GenerateRequest()
    with pytest.raises(ValueError, match="tools"):
        GenerateRequest(prompt="a", tools=[{"type": "function"}])


def test_engine_step_failure_ends_requests_in_flight_and_the_worker_keeps_serving(monkeypatch):
    request = GenerateRequest(prompt_token_ids=random_prompt(8, seed=8), params=greedy(4))

    async def test(worker):
        real_step = worker.engine.step
        calls = []

        def step_failing_once():
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("device lost")
            return real_step()

        monkeypatch.setattr(worker.engine, "step", step_failing_once)
        with pytest.raises(RuntimeError, match="device lost"):
            await worker.generate([request])
        await wait_idle(worker)
        return await worker.generate([request])

    (result,) = run_with_worker(test)
    assert result.token_ids == _engine_tokens(request.prompt_token_ids, request.params)


def test_close_ends_streams_in_flight_and_refuses_new_requests():
    request = GenerateRequest(prompt_token_ids=random_prompt(8, seed=9), params=greedy(1500))

    async def main():
        worker = _worker()
        stream = worker.stream(request)
        await anext(stream)
        await asyncio.wait_for(worker.close(), TIMEOUT_S)
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="closed"):
            await worker.generate([request])
        return worker.engine.has_unfinished()

    assert not asyncio.run(main())


def test_from_pretrained_loads_a_checkpoint_and_checks_engine_settings(tmp_path):
    from model_worker import save_model
    from model_worker.demo_tokenizer import build_demo_tokenizer

    save_model(shared_model(), tmp_path)
    build_demo_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="max_batch_size"):
        ModelWorker.from_pretrained(tmp_path, max_batch_size=4)
    worker = ModelWorker.from_pretrained(tmp_path, max_num_seqs=4)  # the default cache, as _engine_tokens
    assert worker.engine.config.max_num_seqs == 4 and worker.model_name == tmp_path.name
    prompt = random_prompt(11, seed=12)

    async def main():
        try:
            return await worker.generate([GenerateRequest(prompt_token_ids=prompt, params=greedy(6))])
        finally:
            await worker.close()

    (result,) = asyncio.run(main())
    assert result.token_ids == _engine_tokens(prompt, greedy(6))

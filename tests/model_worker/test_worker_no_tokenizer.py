"""A checkpoint without tokenizer.json is served for token-id requests (same tokens as the engine driven by
hand); text, chat, stop-string and structured requests are refused with a clear error; a broken tokenizer
fails before the weights are loaded."""

from __future__ import annotations

import asyncio

import pytest

import model_worker
from model_worker.worker import GenerateRequest, ModelWorker
from runtime.model_client import WorkerModelClient
from tests.model_worker.engine.engine_fixtures import greedy, make_engine, random_prompt, run_to_completion, tokens_of
from tests.model_worker.test_worker import shared_model


def _checkpoint(path):
    model_worker.save_model(shared_model(), path)
    assert not (path / "tokenizer.json").exists()
    return path


def test_token_id_requests_are_served_without_a_tokenizer(tmp_path):
    worker = ModelWorker.from_pretrained(_checkpoint(tmp_path))  # the default cache, as make_engine below
    assert worker.tokenizer is None
    prompt = random_prompt(9, seed=4)

    async def main():
        try:
            (result,) = await worker.generate([GenerateRequest(prompt_token_ids=prompt, params=greedy(5))])
            refusals = []
            for request in (GenerateRequest(prompt="hello", params=greedy(5)),
                            GenerateRequest(messages=[{"role": "user", "content": "hi"}], params=greedy(5)),
                            GenerateRequest(prompt_token_ids=prompt, params=greedy(5, stop=["x"])),
                            GenerateRequest(prompt_token_ids=prompt, params=greedy(5, json_schema={"type": "object"}))):
                with pytest.raises(ValueError, match="tokenizer") as refused:
                    await worker.generate([request])
                refusals.append(str(refused.value))
            return result, refusals
        finally:
            await worker.close()

    result, refusals = asyncio.run(main())
    engine = make_engine(shared_model())
    engine.add_request("ref", prompt, greedy(5))
    assert result.token_ids == tokens_of(run_to_completion(engine)["ref"]) and result.text == ""
    assert "send prompt token ids" in refusals[0] and "no tokenizer.json" in refusals[2]
    with pytest.raises(ValueError, match="an agent .* needs a tokenizer"):
        WorkerModelClient(worker)  # the agent runtime renders chat prompts: refused at start, not per step


def test_a_broken_tokenizer_fails_before_the_weights_load(tmp_path, monkeypatch):
    (_checkpoint(tmp_path) / "tokenizer.json").write_text("{not json")
    loaded = []
    monkeypatch.setattr(model_worker, "load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(Exception):  # noqa: B017 - whatever the tokenizer library raises for a broken file
        ModelWorker.from_pretrained(tmp_path)
    assert loaded == []

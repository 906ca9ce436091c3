"""Must-show: Engram across the split is exact. A tiny Engram checkpoint served by a remote-Engram model-worker
deployment whose tables live in 1, 2 and 3 memory-service shard deployments gives the same greedy tokens, token
for token, as the same checkpoint in an in-process `ModelWorker`, over either transport (the shards' row-server
actors with FP8 rows, or a Serve request per step with fp32 rows: the bytes counted in the shards); a killed row
server is started again without failing a step; and a worker whose memory service is gone fails its requests
with an error naming the memory service (and its health check fails) instead of computing."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.model_worker.engine.engine_fixtures import random_prompt
from tests.random_model import RANDOM_MODEL_BOUNDS
from tests.runtime.conftest import delete_keys

PROMPTS = [random_prompt(n, seed=40 + n) for n in (4, 19, 33)]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engram_checkpoint(tmp_path_factory):
    """(checkpoint dir with a tokenizer, greedy tokens of PROMPTS from an in-process ModelWorker on it)."""
    from model_worker import save_model
    from model_worker.demo_tokenizer import build_demo_tokenizer
    from model_worker.engine.sampling import SamplingParams
    from model_worker.worker import GenerateRequest, ModelWorker
    from tests.model_worker.engine.engine_fixtures import tiny_model

    path = tmp_path_factory.mktemp("engram-split") / "split-model"
    model = tiny_model(seed=6, num_hidden_layers=3, engram_layer_ids=[1, 2])
    assert model.config.uses_engram
    save_model(model, path)
    build_demo_tokenizer(path)

    async def run():
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        async with ModelWorker.from_pretrained(path) as worker:
            responses = await worker.generate([GenerateRequest(prompt_token_ids=p, params=params) for p in PROMPTS])
        return [r.token_ids for r in responses]

    want = asyncio.run(run())
    assert all(len(tokens) == NEW_TOKENS for tokens in want)
    return path, want


def shard_deployment(path, shard: int, num_shards: int, name: str):
    from runtime.serve import MemoryServiceDeployment

    return MemoryServiceDeployment.options(name=name, ray_actor_options={"num_cpus": 0.1}).bind(
        engram_path=str(path), shard=shard, num_shards=num_shards, hot_cache_rows=64)


def fp8_head_dim(path) -> int:
    """Values per row of the checkpoint's (FP8) Engram tables."""
    from safetensors import safe_open

    with safe_open(str(path / "engram_tables.safetensors"), "pt") as tables:
        table = tables.get_slice(next(key for key in tables.keys() if key.endswith(".table")))
        assert table.get_dtype() == "F8_E4M3"
        return table.get_shape()[1]


@pytest.mark.parametrize("num_shards,transport", [(1, "direct"), (2, "direct"), (3, "direct"), (2, "serve")])
def test_remote_engram_equals_in_process(ray_serve, engram_checkpoint, num_shards, transport):
    from ray import serve

    from runtime.serve import ModelWorkerDeployment

    path, want = engram_checkpoint
    shards = [shard_deployment(path, i, num_shards, f"EngramShard{i}") for i in range(num_shards)]
    app = ModelWorkerDeployment.options(name="RemoteEngramWorker", ray_actor_options={"num_cpus": 0.3}).bind(
        str(path), engram="remote", engram_shards=shards, engram_transport=transport)
    name = f"engram-split-{num_shards}-{transport}"
    handle = serve.run(app, name=name, route_prefix=None)
    try:
        got = handle.generate_ids.remote(PROMPTS, NEW_TOKENS).result(timeout_s=120)
        assert got == want  # token for token
        info = handle.info.remote().result(timeout_s=30)
        assert info["engram"] == "remote" and info["engram_transport"] == transport
        steps = info["engram_lookups"] // 2  # two Engram layers: one request per step carried both
        assert steps > 0 and info["engram_requests"] == steps
        traffic = [serve.get_deployment_handle(f"EngramShard{i}", name).engram_traffic.remote().result(timeout_s=30)
                   for i in range(num_shards)]
        ids, row_bytes = sum(t["ids"] for t in traffic), sum(t["row_bytes"] for t in traffic)
        assert ids > 0 and steps <= sum(t["requests"] for t in traffic) <= steps * num_shards
        # per row: FP8 bytes + one e8m0 scale per 32 values on the direct path, fp32 values through Serve
        head_dim = fp8_head_dim(path)
        assert row_bytes == ids * (head_dim + head_dim // 32 if transport == "direct" else 4 * head_dim)
        handle.check_health.remote().result(timeout_s=30)  # healthy while the memory service answers
    finally:
        serve.delete(name)


def test_lost_row_server_is_started_again_and_no_step_fails(ray_serve, engram_checkpoint):
    """Killing a shard's row-server actor: the worker's next lookup finds it gone, asks the shard deployment,
    which starts a new one, and retries; the request completes with the same tokens."""
    import ray
    from ray import serve

    from runtime.serve import ModelWorkerDeployment

    path, want = engram_checkpoint
    app = ModelWorkerDeployment.options(name="RemoteEngramWorker", ray_actor_options={"num_cpus": 0.3}).bind(
        str(path), engram="remote", engram_shards=[shard_deployment(path, 0, 1, "KilledRowsShard")])
    name = "engram-killed-rows"
    handle = serve.run(app, name=name, route_prefix=None)
    try:
        assert handle.generate_ids.remote(PROMPTS[:1], NEW_TOKENS).result(timeout_s=120) == want[:1]
        shard = serve.get_deployment_handle("KilledRowsShard", name)
        first = shard.engram_info.remote("split-model").result(timeout_s=30)["row_server"]
        ray.kill(first)
        assert handle.generate_ids.remote(PROMPTS, NEW_TOKENS).result(timeout_s=120) == want
        assert handle.info.remote().result(timeout_s=30)["engram_row_server_refreshes"] == 1
        second = shard.engram_info.remote("split-model").result(timeout_s=30)["row_server"]
        assert second != first
    finally:
        serve.delete(name)


def test_worker_without_its_memory_service_fails_clearly(ray_serve, engram_checkpoint):
    from ray import serve

    from runtime.serve import ModelWorkerDeployment

    path, want = engram_checkpoint
    serve.run(shard_deployment(path, 0, 1, "GoneShard"), name="engram-gone-memory", route_prefix=None)
    memory = serve.get_deployment_handle("GoneShard", "engram-gone-memory")
    app = ModelWorkerDeployment.options(name="OrphanWorker", ray_actor_options={"num_cpus": 0.3},
                                        health_check_period_s=1, health_check_timeout_s=20).bind(
        str(path), engram="remote", engram_shards=[memory], engram_timeout_s=3)
    handle = serve.run(app, name="engram-gone-worker", route_prefix=None)
    try:
        assert handle.generate_ids.remote(PROMPTS[:1], NEW_TOKENS).result(timeout_s=120) == want[:1]
        serve.delete("engram-gone-memory")
        started = time.monotonic()
        with pytest.raises(Exception, match="memory service") as failed:
            handle.generate_ids.remote(PROMPTS[:1], NEW_TOKENS).result(timeout_s=60)
        assert "Engram rows" in str(failed.value)
        print(f"the failed request: {failed.value}")
        assert time.monotonic() - started < 30
        with pytest.raises(Exception, match="memory service"):
            handle.check_health.remote().result(timeout_s=60)
        deadline = time.monotonic() + 45  # Serve's own health checks see it too: the worker is not HEALTHY
        while True:
            status = serve.status().applications["engram-gone-worker"].deployments["OrphanWorker"].status
            if status != "HEALTHY":
                break
            assert time.monotonic() < deadline, "the worker still reports healthy without its memory service"
            time.sleep(0.5)
    finally:
        serve.delete("engram-gone-worker")


def test_build_app_serves_engram_from_memory_shards(ray_serve, engram_checkpoint, redis_url, tmp_path):
    """The application builder's `engram_shards` gives the same split: the worker it deploys fetches its rows
    from the shard deployments and answers the same greedy tokens."""
    from ray import serve

    from runtime.serve import build_app

    path, want = engram_checkpoint
    prefix = f"test-built-{time.time_ns()}"
    app = build_app({"redis_url": redis_url, "key_prefix": prefix, "model_path": str(path),
                     "embedder": "hashing", "data_dir": str(tmp_path), "engram_shards": 2, **RANDOM_MODEL_BOUNDS})
    serve.run(app, name="engram-built", route_prefix=None)
    try:
        worker = serve.get_deployment_handle("ModelWorkerDeployment", "engram-built")
        assert worker.generate_ids.remote(PROMPTS, NEW_TOKENS).result(timeout_s=120) == want
        info = worker.info.remote().result(timeout_s=30)
        assert info["engram"] == "remote" and info["engram_requests"] > 0
        statuses = serve.status().applications["engram-built"].deployments
        assert {"EngramShard0", "EngramShard1"} <= set(statuses)
    finally:
        serve.delete("engram-built")
        delete_keys(redis_url, prefix)

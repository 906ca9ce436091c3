"""The three deployments (memory service, model worker, API ingress), the application builder and the
local deploy/shutdown used by `engram serve --ray`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from model_worker.openai_protocol import OpenAIError
from runtime.model_client import _usage_dict
from runtime.serve.adapters import HandleMemory, HandleModelClient, SessionOrchestrator, WorkerProxy
from runtime.serve.engram_rows import HandleEngramClient, start_row_server
from runtime.serve.handles import ErrorRecord, call
from runtime.serve.router import DEFAULT_MAX_QUEUE, SessionAffinityRouter
from runtime.settings import Settings

serve_log = logging.getLogger("ray.serve")  # what a replica logs here lands in its Serve replica log

# The builder's args that configure the memory service and the model worker (the ingress takes all of
# them as its Settings).
MEMORY_ARGS = ("database_url", "embedder")
WORKER_ARGS = ("model_path", "model_dtype", "kv_cache_dtype", "cache_budget_mib")


# ---- memory service ------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.2}, health_check_period_s=10, health_check_timeout_s=30)
class MemoryServiceDeployment:
    """Long-term agent memory (SQL source of truth + faiss indexes) and/or one shard of a model's Engram tables
    (served by a row-server actor this replica starts and owns), in one replica."""

    def __init__(self, database_url: str | None = None, embedder: str = "minilm", *, engram_path: str | None = None,
                 engram_model: str | None = None, shard: int = 0, num_shards: int = 1,
                 hot_cache_rows: int = 65536):
        """database_url: the agent-memory database (None: this replica serves Engram tables only).
        engram_path: a checkpoint directory (or its engram_tables.safetensors) whose Engram tables this replica
        serves, as model `engram_model` (default: the checkpoint directory's name); shard/num_shards: serve
        only the rows `shard_ranges(rows, num_shards)[shard]` of every layer."""
        from memory_service.service import MemoryService

        if database_url is None and engram_path is None:
            raise ValueError("database_url, engram_path: give at least one (agent memory, Engram tables)")
        agent_memory = None
        self._engine = None
        if database_url is not None:
            from sqlalchemy import create_engine

            from memory_service.agent_memory.embedder import HashingEmbedder, MiniLMEmbedder
            from memory_service.agent_memory.store import AgentMemoryStore

            if embedder not in ("minilm", "hashing"):
                raise ValueError(f"embedder: 'minilm' or 'hashing', got {embedder!r}")
            agent_memory = AgentMemoryStore(database_url, MiniLMEmbedder() if embedder == "minilm"
                                            else HashingEmbedder())
            self._engine = create_engine(database_url, pool_pre_ping=True)
        self.engram_shard, self.engram_num_shards = shard, num_shards
        self.row_server, self._row_server_args, self._row_server_lock = None, None, asyncio.Lock()
        if engram_path is not None:  # the tables live in this replica's row-server actor (engram_rows)
            path = Path(engram_path)
            name = engram_model or (path.name if path.is_dir() else path.parent.name)
            self._row_server_args = ((path, name), dict(shard=shard, num_shards=num_shards,
                                                        hot_cache_rows=hot_cache_rows))
            self.row_server = start_row_server(*self._row_server_args[0], **self._row_server_args[1])
        self.service = MemoryService(agent_memory)

    async def engram_lookup_many(self, model: str, requests: dict[int, Any]) -> dict[int, Any]:
        """{layer: global row ids int64 [n] of this shard} -> {layer: rows fp32 [n, head_dim]} (tensors both
        ways: Ray's object store carries them): a Serve request per step, through the row-server actor. Workers
        call that actor directly instead (`engram_info`'s "row_server"); this path is kept for comparison."""
        return await self._row_server().lookup_many.remote(model, requests)

    async def engram_info(self, model: str) -> dict:
        """{"shard", "num_shards", "layer_rows": {layer: rows of the whole table}, "row_server": the actor that
        serves the rows} of a served model; a row server found dead is started again first."""
        actor = await self._live_row_server()
        return {**await actor.info.remote(model), "row_server": actor}

    async def engram_traffic(self, reset: bool = False) -> dict:
        """What the row server served: {requests, ids, id_bytes, row_bytes} (since the start or last reset)."""
        return await self._row_server().traffic.remote(reset)

    def _row_server(self):
        if self.row_server is None:
            raise RuntimeError("this memory service serves no Engram tables")
        return self.row_server

    async def _live_row_server(self):
        """The row-server actor, started again (tables mapped anew) if it died or stopped answering."""
        actor = self._row_server()
        try:
            await asyncio.wait_for(actor.ping.remote(), 10.0)
            return actor
        except (TimeoutError, RayActorError) as exc:
            async with self._row_server_lock:
                if self.row_server is actor:
                    serve_log.warning("Engram row server gone (%s: %s); starting a new one", type(exc).__name__, exc)
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                    args, kwargs = self._row_server_args
                    self.row_server = await asyncio.to_thread(start_row_server, *args, **kwargs)
                return self.row_server

    async def write(self, tenant: str, agent: str, text: str, **kwargs):
        return await self.service.write(tenant, agent, text, **kwargs)

    async def search(self, tenant: str, agent: str, query: str, **kwargs):
        return await self.service.search(tenant, agent, query, **kwargs)

    async def get(self, tenant: str, memory_id: str):
        return await self.service.get(tenant, memory_id)

    async def list(self, tenant: str, agent: str | None = None, **kwargs):
        return await self.service.list(tenant, agent, **kwargs)

    async def update(self, tenant: str, memory_id: str, **kwargs):
        return await self.service.update(tenant, memory_id, **kwargs)

    async def delete(self, tenant: str, memory_id: str) -> None:
        await self.service.delete(tenant, memory_id)

    async def forget_agent(self, tenant: str, agent: str) -> int:
        return await self.service.forget_agent(tenant, agent)

    def _select_one(self) -> None:
        from sqlalchemy import text

        with self._engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def ping(self) -> None:
        """Raises when the database is unreachable (the ingress's /readyz asks this)."""
        if self._engine is not None:
            await asyncio.wait_for(asyncio.to_thread(self._select_one), 5.0)

    async def check_health(self) -> None:
        await self.ping()
        if self.row_server is not None:  # restarts a dead row server; unhealthy if that fails
            await self._live_row_server()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.service.close()
            if self.row_server is not None:
                ray.kill(self.row_server)
            if self._engine is not None:
                self._engine.dispose()


# ---- model worker --------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, health_check_period_s=10,
                  health_check_timeout_s=30, request_router_config=RequestRouterConfig(
                      request_router_class=SessionAffinityRouter,
                      request_router_kwargs={"max_queue": DEFAULT_MAX_QUEUE}))
class ModelWorkerDeployment:
    """One ModelWorker (one engine thread batching every request this replica takes). Handles route a
    session's calls to the replica that served it before (its prefix cache), see `router`."""

    async def __init__(self, model_path: str, model_dtype: str = "float32", kv_cache_dtype: str = "auto",
                       cache_budget_mib: int = 256, *, device: str = "cpu", engram: str = "local",
                       engram_shards: list[DeploymentHandle] | None = None, engram_model: str | None = None,
                       engram_timeout_s: float = 30.0, engram_transport: str = "direct"):
        """engram: "local" (the checkpoint's Engram tables in this process) or "remote" (rows from the memory
        deployments `engram_shards`, shard i of len(engram_shards) at index i, serving the tables as model
        `engram_model`, default the checkpoint directory's name; a lookup waits at most engram_timeout_s).
        engram_transport: "direct" (each step calls the shards' row-server actors, FP8 rows) or "serve" (a
        Serve request per step, fp32 rows); see runtime/serve/engram_rows.py."""
        from model_worker.worker import ModelWorker

        if engram not in ("local", "remote"):
            raise ValueError(f"engram: 'local' or 'remote', got {engram!r}")
        if engram == "remote" and not engram_shards:
            raise ValueError("engram_shards: engram='remote' needs the memory deployment(s) serving the tables")
        self.model_path = str(model_path)
        self.engram_client: HandleEngramClient | None = None
        if engram == "remote":
            self.engram_client = await HandleEngramClient.connect(
                engram_model or Path(model_path).name, list(engram_shards), timeout_s=engram_timeout_s,
                transport=engram_transport)
        self.worker = ModelWorker.from_pretrained(model_path, dtype=model_dtype, device=device,
                                                  kv_cache_dtype=kv_cache_dtype,
                                                  cache_budget_bytes=cache_budget_mib * 2**20,
                                                  engram_tables=self.engram_client)
        if self.engram_client is not None:
            self.engram_client.check_config(self.worker.engine.model.config)

    def info(self) -> dict:
        info = {"model_name": self.worker.model_name, "context_window": self.worker.max_sequence_tokens,
                "model_path": self.model_path, "models": self.worker.models(),
                "engram": "remote" if self.engram_client is not None else "local",
                "engram_lookups": self.worker.engine.runner.engram_lookups}  # one per Engram layer per step
        if self.engram_client is not None:  # requests to the memory service: one lookup_many per step
            info["engram_requests"] = self.engram_client.client.requests
            info["engram_transport"] = self.engram_client.transport
            info["engram_row_server_refreshes"] = sum(getattr(s, "refreshes", 0) for s in self.engram_client.shards)
            runner = self.worker.engine.runner  # seconds summed over steps: the model waiting, the fetch
            info["engram_wait_s"], info["engram_fetch_s"] = runner.engram_wait_s, runner.engram_fetch_s
            info["engram_send_s"] = runner.engram_send_s
        return info

    def models(self):
        return self.worker.models()

    async def generate_ids(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy output token ids of each prompt (token ids in, token ids out; EOS does not stop it).
        Raises what failed a request (e.g. the memory service being unreachable)."""
        from model_worker.engine.sampling import SamplingParams
        from model_worker.worker import GenerateRequest

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        responses = await self.worker.generate([GenerateRequest(prompt_token_ids=list(p), params=params)
                                                for p in prompts])
        for response in responses:
            if response.finish_reason == "error":
                raise RuntimeError(response.error or "the request failed")
        return [r.token_ids for r in responses]

    async def stream_complete(self, messages: list[dict], json_schema: dict | None, max_tokens: int,
                              seed: int | None = None, temperature: float = 0.0) -> AsyncIterator[dict]:
        """{"text": delta} per engine step with new text, then {"finish_reason", "usage", "error"} last."""
        from model_worker.engine.sampling import SamplingParams
        from model_worker.worker import GenerateRequest

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, json_schema=json_schema)
        async with contextlib.aclosing(self.worker.stream(GenerateRequest(messages=messages, params=params))) as deltas:
            async for delta in deltas:
                if delta.text:
                    yield {"text": delta.text}
                if delta.finish_reason is not None:
                    yield {"finish_reason": delta.finish_reason, "usage": _usage_dict(delta.usage),
                           "error": delta.error}

    async def _respond(self, handler, body: Any):
        """A non-streaming OpenAI response, or its error as an ErrorRecord."""
        try:
            result = await handler(body)
        except OpenAIError as exc:
            return ErrorRecord.of(exc)
        if hasattr(result, "__aiter__"):  # asked to stream: this method does not (see *_stream)
            await result.aclose()
            return ErrorRecord(400, "stream: use the streaming method for stream: true", param="stream")
        return result

    async def _stream(self, handler, body: Any) -> AsyncIterator[Any]:
        """"accepted" once the request was validated and queued (or an ErrorRecord, and nothing more), then
        the chunks; an error mid-stream comes as an ErrorRecord, last."""
        try:
            result = await handler(body)
        except OpenAIError as exc:
            yield ErrorRecord.of(exc)
            return
        if not hasattr(result, "__aiter__"):
            yield "accepted"
            yield result
            return
        yield "accepted"
        async with contextlib.aclosing(result) as chunks:
            try:
                async for chunk in chunks:
                    yield chunk
            except OpenAIError as exc:
                yield ErrorRecord.of(exc)

    async def chat_completions(self, body: Any):
        return await self._respond(self.worker.chat_completions, body)

    async def completions(self, body: Any):
        return await self._respond(self.worker.completions, body)

    async def chat_completions_stream(self, body: Any) -> AsyncIterator[Any]:
        async for item in self._stream(self.worker.chat_completions, body):
            yield item

    async def completions_stream(self, body: Any) -> AsyncIterator[Any]:
        async for item in self._stream(self.worker.completions, body):
            yield item

    async def check_health(self) -> None:
        if self.worker._closed:
            raise RuntimeError("the model worker is closed")
        thread = self.worker._thread
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the model worker's engine thread died")
        if self.engram_client is not None:
            await self.engram_client.check()

    async def __del__(self):
        with contextlib.suppress(Exception):
            await self.worker.close()


# ---- API ingress ---------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=200, health_check_period_s=10,
                  health_check_timeout_s=30)
@serve.ingress()
class ApiIngress:
    """The HTTP API (runtime.api) over a RuntimeService whose memory and model live in other deployments."""

    async def __init__(self, memory: DeploymentHandle, worker: DeploymentHandle, settings: dict):
        from runtime.agents import DEFAULT_AGENT
        from runtime.api.app import ensure_first_key
        from runtime.api_keys import ApiKeyStore
        from runtime.catalog import AgentCatalog
        from runtime.orchestrator import OrchestratorSettings
        from runtime.service import CountingMemory, RuntimeService
        from runtime.sessions import SessionStore
        from runtime.tools.loading import load_tools, runtime_registry

        self.settings = s = Settings(**settings)
        if not s.redis_url:
            raise ValueError("redis_url: required in a Ray Serve deployment (replicas share sessions through Redis)")
        self.replica = uuid.uuid4().hex[:8]
        info = await call(worker.info)
        self.store = SessionStore(s.redis_url, key_prefix=s.key_prefix, finished_ttl_s=s.finished_session_ttl_s)
        try:
            counters: collections.Counter = collections.Counter()
            self.memory = HandleMemory(memory)
            counting = CountingMemory(self.memory, counters)
            model = HandleModelClient(worker, context_window=info["context_window"],
                                      model_path=s.model_path or info["model_path"])
            tools = runtime_registry(load_tools(s.tools) if s.tools else ())
            DEFAULT_AGENT.check_tools(tools.names())
            catalog = AgentCatalog(self.store.redis, key_prefix=s.key_prefix, builtin=[DEFAULT_AGENT],
                                   tool_names=tools.names(), model_names=[m.id for m in info["models"].data])
            orchestrator = SessionOrchestrator(self.store, model, tools, catalog, counting, settings=(
                OrchestratorSettings(lease_ms=s.lease_ms, heartbeat_s=s.heartbeat_s,
                                     max_concurrent_sessions=s.max_concurrent_sessions,
                                     max_string_chars=s.max_action_string_chars,
                                     max_items=s.max_action_items)))
            keys = ApiKeyStore(self.store.redis, key_prefix=s.key_prefix, cache_s=s.api_key_cache_s)
            self.service = RuntimeService(self.store, orchestrator, catalog, counting, keys,
                                          worker=WorkerProxy(worker, info["models"]),
                                          database_check=self._database_check, counters=counters)
            self.service.start_runner()
            await ensure_first_key(self.service, lambda key: serve_log.warning(
                "created the first API key (shown once): %s", key))
        except BaseException:
            await self.store.close()
            raise
        self._loop = asyncio.get_running_loop()

    def _database_check(self) -> None:
        """RuntimeService calls this in a thread: ask the memory deployment on the replica's loop."""
        asyncio.run_coroutine_threadsafe(self.memory.ping(), self._loop).result(timeout=5.0)

    def __serve_build_asgi_app__(self):
        from runtime.api import create_app

        return create_app(self.settings, service=self.service)

    async def check_health(self) -> None:
        runner = self.service._runner
        if runner is None or runner.done():
            raise RuntimeError("the task runner is not running")
        await asyncio.wait_for(self.store.ping(), 5.0)

    async def __del__(self):
        with contextlib.suppress(Exception):
            await self.service.close()
        with contextlib.suppress(Exception):
            await self.store.close()


# ---- application builder -------------------------------------------------------------------------------
def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run runtime.serve:build_app redis_url=... model_path=...`, or `import_path` in a Serve config.

    args: Settings fields (redis_url required; database_url, model_path, key_prefix, embedder, ...).
    Without model_path the demo model is served (`runtime.local.demo_model_path`); without database_url, SQLite there
    (one node only). engram_shards=N serves the checkpoint's Engram tables from N memory-service shard
    deployments (`EngramShard{i}`) instead of the worker."""
    from runtime.local import demo_model_path

    settings = Settings(**dict(args or {}))
    if not settings.redis_url:
        raise ValueError("redis_url: required in a Ray Serve deployment (replicas share sessions through Redis)")
    model_path = str(demo_model_path(settings))
    database_url = settings.resolved_database_url()
    ingress_settings = settings.model_dump(mode="json", exclude_unset=True)
    ingress_settings.update(model_path=model_path, database_url=database_url)
    memory = MemoryServiceDeployment.bind(database_url, settings.embedder)
    engram: dict[str, Any] = {}
    if settings.engram_shards:  # the tables in memory-service shards, not in the worker
        count = settings.engram_shards
        engram = {"engram": "remote", "engram_shards": [
            MemoryServiceDeployment.options(name=f"EngramShard{i}").bind(engram_path=model_path, shard=i,
                                                                        num_shards=count)
            for i in range(count)]}
    on_gpu = settings.device.startswith("cuda")  # each worker replica then holds a GPU of its own (device cuda:0)
    worker = (ModelWorkerDeployment.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": 1}) if on_gpu
              else ModelWorkerDeployment).bind(model_path, settings.model_dtype, settings.kv_cache_dtype,
                                               settings.cache_budget_mib, device="cuda" if on_gpu else "cpu",
                                               **engram)
    return ApiIngress.bind(memory, worker, ingress_settings)


def deploy(settings: Settings, *, host: str, port: int, address: str | None = None) -> None:
    """Start a local Ray instance on loopback (its GCS picks a free port, never Redis's 6379) or join the
    cluster at `address`, start Serve's HTTP proxy on host:port, and deploy the app; returns once ready."""
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": host, "port": port})
    fields = settings.model_dump(mode="json", exclude_none=True, exclude={"host", "port"})
    serve.run(build_app(fields), name="engram", route_prefix="/")


def shutdown(address: str | None = None) -> None:
    """Undo `deploy`: on a cluster it joined (`address`), delete only this app and disconnect, leaving the
    cluster's other applications running; on the local instance it started, stop Serve and Ray."""
    if address:
        serve.delete("engram")
    else:
        serve.shutdown()
    ray.shutdown()

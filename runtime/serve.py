"""The runtime as a Ray Serve application: memory service, model worker and API ingress as deployments.

The one module that imports Ray. Each deployment is a thin shell over the plain classes `LocalRuntime`
composes in one process:

- `MemoryServiceDeployment`: a `MemoryService` over an `AgentMemoryStore` (the SQL database + faiss);
  async `write/search/get/list/update/delete/forget_agent` forward to it.
- `ModelWorkerDeployment`: one `ModelWorker`; `stream_complete` (an async generator of text deltas and a
  final record, for the orchestrator), the OpenAI handlers (`chat_completions`/`completions` answer
  one response; `*_stream` are async generators of chunks), `models()` and `info()`.
- `ApiIngress`: the FastAPI app of `runtime.api.create_app` through `serve.ingress`, over a
  `RuntimeService` built in the replica (its async constructor, on the replica's event loop: the
  session store's redis.asyncio client belongs to that loop) from Redis, the orchestrator, and
  adapters over the two other deployments' handles (`HandleMemory`, `HandleModelClient`,
  `WorkerProxy`). Replicas share sessions, tasks and API keys through Redis (so `redis_url` is
  required), and each runs the task runner: leases decide which replica runs a session.

`build_app(args)` is the application builder for `serve run runtime.serve:build_app` and
`deploy/serve_config.yaml`. Errors raised in another replica come back as `RayTaskError`; the adapters
re-raise the original exception (`.cause`), so the API maps them as in one process (404, 400 ...).
`OpenAIError` does not survive pickling (its constructor takes more than its args), so the worker
deployment returns it as an `ErrorRecord` that the ingress raises again.

Not here (yet): Engram rows served across the split, a session-affinity request router, multi-node
placement of the checkpoint (the ingress reads the tokenizer from `model_path` itself).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from model_worker.openai_protocol import OpenAIError
from runtime.model_client import DeltaCallback, ModelError, ModelReply, _usage_dict
from runtime.settings import Settings

log = logging.getLogger(__name__)
serve_log = logging.getLogger("ray.serve")  # what a replica logs here lands in its Serve replica log

__all__ = ["ApiIngress", "ErrorRecord", "HandleMemory", "HandleModelClient", "MemoryServiceDeployment",
           "ModelWorkerDeployment", "WorkerProxy", "build_app", "deploy", "shutdown"]

# The builder's args that configure the memory service and the model worker (the ingress takes all of
# them as its Settings).
MEMORY_ARGS = ("database_url", "embedder")
WORKER_ARGS = ("model_path", "model_dtype", "kv_cache_dtype", "cache_budget_mib")


# ---- errors across replicas ----------------------------------------------------------------------------
@dataclass
class ErrorRecord:
    """An OpenAIError as data (it cannot be pickled as an exception)."""

    status_code: int
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: OpenAIError) -> ErrorRecord:
        return cls(exc.status_code, exc.message, exc.param, exc.code)

    def error(self) -> OpenAIError:
        return OpenAIError(self.status_code, self.message, param=self.param, code=self.code)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, from the RayTaskError a handle call raised with it."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


async def call(method, *args, **kwargs):
    """`await handle.method.remote(...)`, raising what the replica raised."""
    try:
        return await method.remote(*args, **kwargs)
    except RayTaskError as exc:
        raise unwrap(exc) from None


@contextlib.asynccontextmanager
async def streaming(method, *args, **kwargs):
    """An async iterator over a generator method's items (handle `stream=True`), raising what the replica
    raised; leaving early cancels the call in the replica (closing its generator)."""
    gen = method.options(stream=True).remote(*args, **kwargs)

    async def items():
        try:
            async for item in gen:
                yield item
        except RayTaskError as exc:
            raise unwrap(exc) from None

    it = items()
    try:
        yield it
    finally:
        await it.aclose()
        gen.cancel()  # no-op when the generator finished


# ---- memory service ------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.2}, health_check_period_s=10, health_check_timeout_s=30)
class MemoryServiceDeployment:
    """Long-term agent memory: SQL source of truth + faiss indexes, in one replica."""

    def __init__(self, database_url: str, embedder: str = "minilm"):
        from sqlalchemy import create_engine

        from memory_service.agent_memory.embedder import HashingEmbedder, MiniLMEmbedder
        from memory_service.agent_memory.store import AgentMemoryStore
        from memory_service.service import MemoryService

        if embedder not in ("minilm", "hashing"):
            raise ValueError(f"embedder: 'minilm' or 'hashing', got {embedder!r}")
        self.service = MemoryService(AgentMemoryStore(database_url, MiniLMEmbedder() if embedder == "minilm"
                                                      else HashingEmbedder()))
        self._engine = create_engine(database_url, pool_pre_ping=True)

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
        await asyncio.wait_for(asyncio.to_thread(self._select_one), 5.0)

    async def check_health(self) -> None:
        await self.ping()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.service.close()
            self._engine.dispose()


# ---- model worker --------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, health_check_period_s=10,
                  health_check_timeout_s=30)
class ModelWorkerDeployment:
    """One ModelWorker (one engine thread batching every request this replica takes)."""

    def __init__(self, model_path: str, model_dtype: str = "float32", kv_cache_dtype: str = "bf16",
                 cache_budget_mib: int = 256):
        from model_worker.worker import ModelWorker

        self.model_path = str(model_path)
        self.worker = ModelWorker.from_pretrained(model_path, dtype=model_dtype, kv_cache_dtype=kv_cache_dtype,
                                                  cache_budget_bytes=cache_budget_mib * 2**20)

    def info(self) -> dict:
        return {"model_name": self.worker.model_name, "context_window": self.worker.max_sequence_tokens,
                "model_path": self.model_path, "models": self.worker.models()}

    def models(self):
        return self.worker.models()

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

    def check_health(self) -> None:
        if self.worker._closed:
            raise RuntimeError("the model worker is closed")
        thread = self.worker._thread
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the model worker's engine thread died")

    async def __del__(self):
        with contextlib.suppress(Exception):
            await self.worker.close()


# ---- adapters used in the ingress replica --------------------------------------------------------------
class HandleMemory:
    """The MemoryService interface over the memory deployment's handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def write(self, tenant: str, agent: str, text: str, **kwargs):
        return await call(self.handle.write, tenant, agent, text, **kwargs)

    async def search(self, tenant: str, agent: str, query: str, **kwargs):
        return await call(self.handle.search, tenant, agent, query, **kwargs)

    async def get(self, tenant: str, memory_id: str):
        return await call(self.handle.get, tenant, memory_id)

    async def list(self, tenant: str, agent: str | None = None, **kwargs):
        return await call(self.handle.list, tenant, agent, **kwargs)

    async def update(self, tenant: str, memory_id: str, **kwargs):
        return await call(self.handle.update, tenant, memory_id, **kwargs)

    async def delete(self, tenant: str, memory_id: str) -> None:
        await call(self.handle.delete, tenant, memory_id)

    async def forget_agent(self, tenant: str, agent: str) -> int:
        return await call(self.handle.forget_agent, tenant, agent)

    async def ping(self) -> None:
        await call(self.handle.ping)

    def close(self) -> None:
        pass  # the deployment owns the store


class HandleModelClient:
    """The orchestrator's ModelClient over the model-worker deployment: generation there, token counting
    here with the checkpoint's own tokenizer."""

    def __init__(self, handle: DeploymentHandle, *, context_window: int, model_path: str | Path,
                 temperature: float = 0.0):
        from model_worker import load_tokenizer

        self.handle = handle
        self.context_window = context_window
        self.temperature = temperature
        self.tokenizer = load_tokenizer(model_path)

    async def complete(self, messages: list[dict], *, json_schema: dict | None, max_tokens: int,
                       seed: int | None = None, on_delta: DeltaCallback | None = None) -> ModelReply:
        parts: list[str] = []
        finish, usage = None, {}
        async with streaming(self.handle.stream_complete, messages, json_schema, max_tokens, seed,
                             self.temperature) as items:
            async for item in items:
                if "text" in item:
                    parts.append(item["text"])
                    if on_delta is not None:
                        await on_delta(item["text"])
                    continue
                finish, usage = item["finish_reason"], item["usage"]
                if finish == "error":
                    raise ModelError(item.get("error") or "the model worker failed this request")
        return ModelReply("".join(parts), finish, usage)

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode_chat(messages))


class WorkerProxy:
    """What the OpenAI routes call as `service.worker`, over the model-worker deployment."""

    def __init__(self, handle: DeploymentHandle, model_list):
        self.handle = handle
        self._models = model_list

    def models(self):
        return self._models

    async def chat_completions(self, body: Any):
        return await self._call(body, self.handle.chat_completions, self.handle.chat_completions_stream)

    async def completions(self, body: Any):
        return await self._call(body, self.handle.completions, self.handle.completions_stream)

    async def _call(self, body: Any, method, stream_method):
        if isinstance(body, dict) and body.get("stream") is True:
            return await self._stream(stream_method, body)
        result = await call(method, body)
        if isinstance(result, ErrorRecord):
            raise result.error()
        return result

    async def _stream(self, method, body: Any):
        """Waits for the worker's verdict on the request (so a bad one is a 400 before the response
        starts), then returns an async iterator of the chunks."""
        context = streaming(method, body)
        items = await context.__aenter__()
        try:
            first = await anext(items)
        except BaseException as exc:
            await context.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if isinstance(first, ErrorRecord):
            await context.__aexit__(None, None, None)
            raise first.error()

        async def chunks():
            try:
                async for item in items:
                    if isinstance(item, ErrorRecord):
                        raise item.error()
                    yield item
            finally:
                await context.__aexit__(None, None, None)

        return chunks()


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
        from runtime.orchestrator import Orchestrator, OrchestratorSettings
        from runtime.service import CountingMemory, RuntimeService
        from runtime.sessions import SessionStore
        from runtime.tools import ToolRegistry, builtin_tools

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
            tools = ToolRegistry(builtin_tools())
            DEFAULT_AGENT.check_tools(tools.names())
            catalog = AgentCatalog(self.store.redis, key_prefix=s.key_prefix, builtin=[DEFAULT_AGENT],
                                   tool_names=tools.names())
            orchestrator = Orchestrator(self.store, model, tools, catalog, counting, settings=(
                OrchestratorSettings(lease_ms=s.lease_ms, heartbeat_s=s.heartbeat_s,
                                     max_concurrent_sessions=s.max_concurrent_sessions,
                                     max_string_chars=s.max_action_string_chars)))
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
    Without model_path the demo checkpoint is built under data_dir; without database_url, SQLite there
    (one node only)."""
    from runtime.local import demo_model_path

    settings = Settings(**dict(args or {}))
    if not settings.redis_url:
        raise ValueError("redis_url: required in a Ray Serve deployment (replicas share sessions through Redis)")
    model_path = str(demo_model_path(settings))
    database_url = settings.resolved_database_url()
    ingress_settings = settings.model_dump(mode="json", exclude_unset=True)
    ingress_settings.update(model_path=model_path, database_url=database_url)
    memory = MemoryServiceDeployment.bind(database_url, settings.embedder)
    worker = ModelWorkerDeployment.bind(model_path, settings.model_dtype, settings.kv_cache_dtype,
                                        settings.cache_budget_mib)
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


def shutdown() -> None:
    serve.shutdown()
    ray.shutdown()

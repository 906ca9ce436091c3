"""The embedded default: every part in one process, with real components and nothing to install.

`LocalRuntime` wires the same classes a Ray Serve deployment uses: a real Redis (the configured URL,
or a `redis-server` it starts under the data dir), the memory service over SQLite (or the configured
database) with the bundled MiniLM embedder, a ModelWorker (the configured checkpoint, or the shipped
demo agent model), the built-in tools, the agent catalog, the orchestrator, and the
`RuntimeService` over them. Its `agents`, `tasks`, `sessions` and `memories` offer the SDK's interface
in-process (`runtime.sdk.local`), so the same code runs with or without a server. Nothing here is
Ray-aware.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from memory_service.agent_memory.embedder import HashingEmbedder, MiniLMEmbedder
from memory_service.agent_memory.store import AgentMemoryStore
from memory_service.service import MemoryService
from model_worker.worker import ModelWorker
from runtime.agents import DEFAULT_AGENT, AgentDefinition
from runtime.api_keys import ApiKeyStore
from runtime.catalog import AgentCatalog
from runtime.model_client import ModelClient, WorkerModelClient
from runtime.orchestrator import Orchestrator, OrchestratorSettings
from runtime.redis_server import RedisServer, embedded_or_url
from runtime.service import CountingMemory, RuntimeService
from runtime.sessions import SessionState, SessionStore, Step
from runtime.settings import Settings
from runtime.tools.loading import load_tools, runtime_registry, tools_of

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_AGENT", "LocalRuntime"]


DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "model_worker" / "demo_model"


def trained_demo_model() -> Path | None:
    """The shipped demo agent model (trained on synthetic tool-use traces by `python -m model_worker.training`),
    or None when this checkout has none."""
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").is_file() else None


def demo_model_path(settings: Settings) -> Path:
    """The configured checkpoint; else the shipped demo agent model; else a random-weight checkpoint of the
    same architecture, built under the data dir on first use (it shows the machinery, not a skill)."""
    if settings.model_path is not None:
        return settings.model_path
    trained = trained_demo_model()
    if trained is not None:
        return trained
    from model_worker.demo import build_demo_checkpoint

    path = settings.data_dir / "demo-model"
    if not (path / "config.json").is_file():
        log.info("building the demo checkpoint under %s", path)
        build_demo_checkpoint(Path(path))
    return path


class LocalRuntime:
    def __init__(self, settings: Settings | None = None, *, agents: list[AgentDefinition] | None = None,
                 model: ModelClient | None = None, tenant: str = "default", tools: Any = ()):
        """`tools`: your own tools beside the built-ins (a ToolRegistry, Tools, typed functions or a list of
        them), added to those ENGRAM_TOOLS names; agents list them by name."""
        self.settings = settings or Settings()
        self.builtin_agents = list(agents or [DEFAULT_AGENT])
        self._own_tools = tools_of(tools)
        self.tenant = tenant  # whose agents, tasks and memories the SDK-style namespaces act on
        self._model_override = model
        self.redis_server: RedisServer | None = None
        self.worker: ModelWorker | None = None
        self.service: RuntimeService | None = None

    async def start(self, *, run_tasks: bool = False) -> LocalRuntime:
        """Start every part; with run_tasks, also the background runner that executes submitted tasks
        (what a server does; `run_task` drives its own task without it)."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url, self.redis_server = embedded_or_url(s.redis_url, s.data_dir)
        try:
            self.store = SessionStore(redis_url, key_prefix=s.key_prefix, finished_ttl_s=s.finished_session_ttl_s)
            embedder = MiniLMEmbedder() if s.embedder == "minilm" else HashingEmbedder()
            database_url = s.resolved_database_url()
            counters: collections.Counter = collections.Counter()
            self.memory = CountingMemory(MemoryService(AgentMemoryStore(database_url, embedder)), counters)
            tools = runtime_registry([*self._own_tools, *(load_tools(s.tools) if s.tools else [])])  # before the
            model = self._model_override or WorkerModelClient(self._start_worker())  # model: a bad one fails fast
            for agent in self.builtin_agents:
                agent.check_tools(tools.names())
            self.catalog = AgentCatalog(self.store.redis, key_prefix=s.key_prefix, builtin=self.builtin_agents,
                                        tool_names=tools.names(),
                                        model_names=None if self.worker is None else [self.worker.model_name])
            self.orchestrator = Orchestrator(self.store, model, tools, self.catalog, self.memory, settings=(
                OrchestratorSettings(lease_ms=s.lease_ms, heartbeat_s=s.heartbeat_s,
                                     max_concurrent_sessions=s.max_concurrent_sessions,
                                     max_string_chars=s.max_action_string_chars,
                                     max_items=s.max_action_items)))
            keys = ApiKeyStore(self.store.redis, key_prefix=s.key_prefix, cache_s=s.api_key_cache_s)
            self.service = RuntimeService(self.store, self.orchestrator, self.catalog, self.memory, keys,
                                          worker=self.worker, database_check=_database_check(database_url),
                                          counters=counters)
        except BaseException:
            await self.close()
            raise
        from runtime.sdk.local import bind_namespaces

        bind_namespaces(self)
        if run_tasks:
            self.service.start_runner()
        return self

    def _start_worker(self) -> ModelWorker:
        s = self.settings
        self.worker = ModelWorker.from_pretrained(demo_model_path(s), dtype=s.model_dtype, device=s.device,
                                                  kv_cache_dtype=s.kv_cache_dtype,
                                                  cache_budget_bytes=s.cache_budget_mib * 2**20)
        return self.worker

    async def run_task(self, task: str, *, tenant: str = "default", agent: str = "assistant",
                       session_id: str | None = None) -> tuple[SessionState, list[Step]]:
        """Submit a task and drive its session to the end in this process. session_id continues that
        conversation (an id from an earlier task's `thread_id`)."""
        submitted, _ = await self.service.tasks.submit(tenant, agent, task, conversation_id=session_id)
        await self.orchestrator.run_session(submitted.id)
        return await self.store.load(submitted.id)

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()
        if getattr(self, "store", None) is not None:
            await self.store.close()
        if getattr(self, "memory", None) is not None:
            self.memory.close()
        if self.worker is not None:
            await self.worker.close()
        if self.redis_server is not None:
            self.redis_server.stop()

    async def __aenter__(self) -> LocalRuntime:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _database_check(database_url: str):
    engine = create_engine(database_url, pool_pre_ping=True)

    def check() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return check

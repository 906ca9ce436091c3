"""The embedded default: every part in one process, with real components and nothing to install.

`LocalRuntime` wires the same classes a Ray Serve deployment uses: a real Redis (the configured URL,
or a `redis-server` it starts under the data dir), the memory service over SQLite (or the configured
database) with the bundled MiniLM embedder, a ModelWorker (the configured checkpoint, or the demo
checkpoint built on first use), the built-in tools and the orchestrator. Nothing here is Ray-aware.
"""

from __future__ import annotations

import logging
from pathlib import Path

from memory_service.agent_memory.embedder import HashingEmbedder, MiniLMEmbedder
from memory_service.agent_memory.store import AgentMemoryStore
from memory_service.service import MemoryService
from model_worker.worker import ModelWorker
from runtime.agents import AgentDefinition, AgentLimits, MemorySettings
from runtime.model_client import ModelClient, WorkerModelClient
from runtime.orchestrator import Orchestrator, OrchestratorSettings
from runtime.redis_server import RedisServer, embedded_or_url
from runtime.sessions import SessionState, SessionStore, Step
from runtime.settings import Settings
from runtime.tools import ToolRegistry, builtin_tools

log = logging.getLogger(__name__)

DEFAULT_AGENT = AgentDefinition(
    name="assistant",
    instructions="You are a careful assistant. Use the calculator for arithmetic, remember useful facts with "
                 "memory_write, look things up with memory_search, and give a short final answer.",
    tools=["calculator", "memory_write", "memory_search", "current_time"],
    memory=MemorySettings(k=4),
    limits=AgentLimits(max_steps=6, max_tokens_per_step=384, max_tool_calls_per_step=2),
)


class LocalRuntime:
    def __init__(self, settings: Settings | None = None, *, agents: list[AgentDefinition] | None = None,
                 model: ModelClient | None = None):
        self.settings = settings or Settings()
        self.agents = {a.name: a for a in (agents or [DEFAULT_AGENT])}
        self._model_override = model
        self.redis_server: RedisServer | None = None
        self.worker: ModelWorker | None = None

    async def start(self) -> LocalRuntime:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        redis_url, self.redis_server = embedded_or_url(s.redis_url, s.data_dir)
        self.store = SessionStore(redis_url, finished_ttl_s=s.finished_session_ttl_s)
        embedder = MiniLMEmbedder() if s.embedder == "minilm" else HashingEmbedder()
        self.memory = MemoryService(AgentMemoryStore(s.resolved_database_url(), embedder))
        model = self._model_override or WorkerModelClient(self._start_worker())
        tools = ToolRegistry(builtin_tools())
        for agent in self.agents.values():
            agent.check_tools(tools.names())
        self.orchestrator = Orchestrator(self.store, model, tools, self.agents, self.memory, settings=(
            OrchestratorSettings(lease_ms=s.lease_ms, heartbeat_s=s.heartbeat_s,
                                 max_concurrent_sessions=s.max_concurrent_sessions,
                                 max_string_chars=s.max_action_string_chars)))
        return self

    def _start_worker(self) -> ModelWorker:
        s = self.settings
        path = s.model_path
        if path is None:
            from model_worker.demo import build_demo_checkpoint

            path = s.data_dir / "demo-model"
            if not (path / "config.json").is_file():
                log.info("building the demo checkpoint under %s", path)
                build_demo_checkpoint(Path(path))
        self.worker = ModelWorker.from_pretrained(path, dtype=s.model_dtype, kv_cache_dtype=s.kv_cache_dtype,
                                                  cache_budget_bytes=s.cache_budget_mib * 2**20)
        return self.worker

    async def run_task(self, task: str, *, tenant: str = "default", agent: str = "assistant",
                       session_id: str | None = None) -> tuple[SessionState, list[Step]]:
        """Submit a task and drive its session to the end in this process."""
        state = await self.orchestrator.submit(tenant, agent, task, session_id=session_id)
        await self.orchestrator.run_session(state.session_id)
        return await self.store.load(state.session_id)

    async def close(self) -> None:
        await self.store.close()
        self.memory.close()
        if self.worker is not None:
            await self.worker.close()
        if self.redis_server is not None:
            self.redis_server.stop()

    async def __aenter__(self) -> LocalRuntime:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

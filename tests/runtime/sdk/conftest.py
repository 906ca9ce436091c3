"""Fixtures for the SDK suite: one set of scenarios, run against the SDK over HTTP and in-process.

`backend` is parametrized: `http` runs a scenario against `AsyncClient` talking to the API on a real
uvicorn server on 127.0.0.1 (the LocalRuntime and uvicorn share one background thread and its event loop,
where the runtime's Redis clients belong); `local` runs it against `LocalRuntime`'s own namespaces in the
test's loop. Both sides use the same settings (the test's Redis under its own key prefix, SQLite memory
with the hashing embedder), the same scripted model and the same tenant (the API key's), so a scenario
`async def scenario(sdk)` must behave identically on both.

The suite needs no asyncio plugin: `backend.run(scenario)` runs it with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from runtime.api import create_app
from runtime.local import LocalRuntime
from runtime.sdk import AsyncClient
from runtime.settings import Settings
from tests.runtime.crash_worker import ScriptedModel

TENANT = "sdk-tenant"
SCENARIO_TIMEOUT_S = 60.0
# generous, so scenarios that poll or stream never meet the per-key rate limit
LIMITS = {"rate_limit_per_s": 1000.0, "rate_limit_burst": 10_000}


class SlowModel(ScriptedModel):
    """ScriptedModel that takes `delay_s` per call: its tasks stay running long enough to cancel them or
    to find their session busy (4 calls: about 2 s at the default)."""

    def __init__(self, delay_s: float = 0.5):
        self.delay_s = delay_s

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None):
        await asyncio.sleep(self.delay_s)
        return await super().complete(messages, json_schema=json_schema, max_tokens=max_tokens, seed=seed,
                                      on_delta=on_delta)


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServedRuntime:
    """LocalRuntime + the API on uvicorn in one background thread with its own event loop."""

    settings: Settings
    model: Any
    tenant: str = TENANT
    base_url: str = ""
    api_key: str = ""
    runtime: LocalRuntime | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _failure: BaseException | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout_s: float = 60.0) -> ServedRuntime:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._main, args=(sock,), name="sdk-served-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._failure is not None or not self._thread.is_alive():
                raise RuntimeError("the server thread failed to start") from self._failure
            assert time.monotonic() < deadline, "the runtime did not start in time"
        while True:
            if self._failure is not None or not self._thread.is_alive():
                raise RuntimeError("the server thread failed") from self._failure
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self
            assert time.monotonic() < deadline, "the server did not answer /healthz in time"
            time.sleep(0.02)

    def _main(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # reported to the waiting test
            self._failure = exc

    async def _serve(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self.runtime = LocalRuntime(self.settings, model=self.model, tenant=self.tenant)
        await self.runtime.start(run_tasks=True)
        try:
            self.api_key = (await self.runtime.service.keys.create(self.tenant, name="sdk suite")).key
            app = create_app(self.settings, service=self.runtime.service)
            self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
            self._ready.set()
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            await self.runtime.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the server thread did not stop"
        if self._failure is not None:
            raise RuntimeError("the server thread failed") from self._failure


@dataclass
class Backend:
    """Where a scenario runs: `http` (AsyncClient over a served runtime) or `local` (LocalRuntime)."""

    kind: str
    make_settings: Callable[[], Settings]

    def run(self, scenario: Callable[[Any], Awaitable[Any]], *, model: Any = None,
            timeout_s: float = SCENARIO_TIMEOUT_S) -> Any:
        """Run `scenario(sdk)` on a fresh runtime (its own data dir and Redis key prefix); its result."""
        settings = self.make_settings()
        model = model if model is not None else ScriptedModel()
        if self.kind == "local":
            return asyncio.run(self._local(scenario, settings, model, timeout_s))
        with serve(settings, model) as server:
            return asyncio.run(self._http(scenario, server, timeout_s))

    @staticmethod
    async def _local(scenario, settings: Settings, model, timeout_s: float):
        runtime = LocalRuntime(settings, model=model, tenant=TENANT)
        await runtime.start()
        try:
            return await asyncio.wait_for(scenario(runtime), timeout_s)
        finally:
            await runtime.close()

    @staticmethod
    async def _http(scenario, server: ServedRuntime, timeout_s: float):
        async with AsyncClient(server.base_url, server.api_key) as client:
            return await asyncio.wait_for(scenario(client), timeout_s)


@contextlib.contextmanager
def serve(settings: Settings, model: Any = None) -> Iterator[ServedRuntime]:
    server = ServedRuntime(settings, model if model is not None else ScriptedModel())
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def sdk_settings(tmp_path: Path, redis_url: str, key_prefix: str) -> Callable[[], Settings]:
    """sdk_settings() -> Settings with a new data dir and a new Redis sub-prefix (under the test's
    `key_prefix`, so the fixture's clean-up deletes its keys) at each call."""
    counter = itertools.count()

    def make() -> Settings:
        n = next(counter)
        return Settings(data_dir=tmp_path / f"data-{n}", redis_url=redis_url, key_prefix=f"{key_prefix}:run{n}",
                        embedder="hashing", **LIMITS)

    return make


@pytest.fixture
def make_backend(sdk_settings) -> Callable[[str], Backend]:
    return lambda kind: Backend(kind, sdk_settings)


@pytest.fixture(params=["http", "local"])
def backend(request, make_backend) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def served(sdk_settings):
    """`with served(model=None) as server:` the API on a real uvicorn server (server.base_url, server.api_key)."""

    def open_(model: Any = None):
        return serve(sdk_settings(), model)

    return open_

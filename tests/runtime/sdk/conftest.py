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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.local import LocalRuntime
from runtime.sdk import AsyncClient
from runtime.settings import Settings
from tests.random_model import RANDOM_MODEL_BOUNDS
from tests.runtime.api.support import ServedApi
from tests.runtime.crash_worker import ScriptedModel

TENANT = "sdk-tenant"
SCENARIO_TIMEOUT_S = 60.0
# generous, so scenarios that poll or stream never meet the per-key rate limit
LIMITS = {"rate_limit_per_s": 1000.0, "rate_limit_burst": 10_000, **RANDOM_MODEL_BOUNDS}


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
    async def _http(scenario, server: ServedApi, timeout_s: float):
        async with AsyncClient(server.base_url, server.api_key) as client:
            return await asyncio.wait_for(scenario(client), timeout_s)


@contextlib.contextmanager
def serve(settings: Settings, model: Any = None) -> Iterator[ServedApi]:
    server = ServedApi(settings, model if model is not None else ScriptedModel(), tenant=TENANT)
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

"""Fixtures for the HTTP API tests: the app over a started LocalRuntime (Redis under the test's own key
prefix, SQLite memory with the hashing embedder, a scripted model), reached in-process through httpx's
ASGI transport (`open_api`) or over real HTTP from a uvicorn server in a thread (`serve_api`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from runtime.api import create_app
from runtime.local import LocalRuntime
from runtime.settings import Settings
from tests.random_model import RANDOM_MODEL_BOUNDS
from tests.runtime.api.support import ServedApi, served
from tests.runtime.conftest import delete_keys
from tests.runtime.crash_worker import ScriptedModel

# generous by default, so tests that are not about limits never meet them
DEFAULT_LIMITS = {"rate_limit_per_s": 1000.0, "rate_limit_burst": 10_000, **RANDOM_MODEL_BOUNDS}


@dataclass
class Api:
    runtime: LocalRuntime
    app: Any
    client: httpx.AsyncClient
    settings: Settings

    @property
    def service(self):
        return self.runtime.service

    async def key(self, tenant: str, *, admin: bool = False) -> str:
        """A new API key's bearer secret."""
        return (await self.service.keys.create(tenant, admin=admin)).key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def wait_status(api_or_client, key: str, task_id: str, statuses: tuple[str, ...]) -> dict:
    """Poll GET /v1/tasks/{id} (through an API fixture or an httpx client) until the task has one of `statuses`."""
    client = getattr(api_or_client, "client", api_or_client)
    for _ in range(300):
        task = (await client.get(f"/v1/tasks/{task_id}", headers=bearer(key))).json()
        if task["status"] in statuses:
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {statuses}: {task}")


@pytest.fixture
def api_settings(tmp_path, redis_url, key_prefix):
    """api_settings(**overrides) -> Settings on the test's Redis prefix, each call with its own data dir."""
    counter = itertools.count()

    def make(**overrides) -> Settings:
        values = {"data_dir": tmp_path / f"data-{next(counter)}", "redis_url": redis_url, "key_prefix": key_prefix,
                  "embedder": "hashing", **DEFAULT_LIMITS, **overrides}
        return Settings(**values)

    return make


@pytest.fixture
def open_api(api_settings):
    """`async with open_api(model=..., **settings) as api:` the app over a started runtime (tasks run), with an
    httpx.AsyncClient on its ASGI transport. Use inside `asyncio.run`: the runtime belongs to that loop."""

    @contextlib.asynccontextmanager
    async def open_(*, model: Any = None, **overrides) -> AsyncIterator[Api]:
        settings = api_settings(**overrides)
        runtime = LocalRuntime(settings, model=model if model is not None else ScriptedModel())
        await runtime.start(run_tasks=True)
        try:
            app = create_app(settings, service=runtime.service)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                yield Api(runtime, app, client, settings)
        finally:
            await runtime.close()

    return open_


@pytest.fixture
def serve_api(api_settings):
    """`with serve_api(model=..., **settings) as server:` the app on a real uvicorn server (see ServedApi).
    model=None with model_path set starts a real ModelWorker."""

    def serve(*, model: Any = None, **overrides):
        return served(api_settings(**overrides), model)

    return serve


MODEL_NAME = "tiny-model"  # the worker serves its checkpoint directory's name


@pytest.fixture(scope="session")
def model_server(tmp_path_factory, redis_url) -> ServedApi:
    """The app over real HTTP with a real ModelWorker (no scripted model) on a tiny random checkpoint, built
    like tests/runtime/test_local_e2e.py does; shared by the tests of this folder that need a worker."""
    from tests.model_worker.engine.engine_fixtures import tiny_checkpoint

    root = tmp_path_factory.mktemp("model-server")
    model_dir = tiny_checkpoint(root / MODEL_NAME)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    settings = Settings(data_dir=root / "data", redis_url=redis_url, key_prefix=prefix, embedder="hashing",
                        model_path=model_dir, **DEFAULT_LIMITS)
    try:
        with served(settings) as server:
            assert server.runtime.worker is not None  # a real worker, not a scripted model
            yield server
    finally:
        delete_keys(redis_url, prefix)

"""Helpers for the HTTP API tests: models that script the agent loop, the one error shape, the app's route
table, and an app served by a real uvicorn server on 127.0.0.1 (its own thread and event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi.routing import APIRoute

try:  # FastAPI >= 0.16x keeps included routers as one entry of app.routes each; this flattens them
    from fastapi.routing import iter_route_contexts
except ImportError:  # older FastAPI: app.routes is already flat
    def iter_route_contexts(routes):
        return iter(routes)

from runtime.api import create_app
from runtime.local import LocalRuntime
from runtime.model_client import ModelReply
from runtime.settings import Settings

PATH_PARAM = re.compile(r"{(\w+)(?::[^}]*)?}")


# ---- models -----------------------------------------------------------------------------------------------
class QuickModel:
    """Answers at once: every task completes after one step."""

    context_window = 100_000

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        text = json.dumps({"type": "final", "answer": "done"})
        if on_delta is not None:
            await on_delta(text)
        return ModelReply(text, "stop", {"prompt_tokens": 5, "completion_tokens": 5, "cached_tokens": 0})

    def count_tokens(self, messages) -> int:
        return sum(len(str(m.get("content", ""))) // 4 for m in messages)


class StuckModel(QuickModel):
    """Never answers (until cancelled): its tasks stay running, so their event streams stay open."""

    def __init__(self):
        self.calls = 0

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


# ---- the one error shape ----------------------------------------------------------------------------------
def assert_error(response: httpx.Response, status: int, *, type_: str | None = None,
                 field: str | None | type(...) = ...) -> dict[str, Any]:
    """The response is `status` with exactly {"error": {"type", "message", "field", ...}}; returns the error."""
    assert response.status_code == status, (response.status_code, response.text[:2000])
    assert "Traceback" not in response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert isinstance(error.get("type"), str) and error["type"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    assert "field" in error and (error["field"] is None or isinstance(error["field"], str)), body
    if type_ is not None:
        assert error["type"] == type_, body
    if field is not ...:
        assert error["field"] == field, body
    return error


# ---- the route table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the template, e.g. /v1/tasks/{task_id}
    params: tuple[str, ...]
    has_body: bool

    def url(self, values: dict[str, str]) -> str:
        return PATH_PARAM.sub(lambda m: values[m.group(1)], self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def endpoints(app, prefix: str = "/v1") -> list[Endpoint]:
    """Every (method, path) the app routes under `prefix`, read from the app's own route table."""
    found = []
    for route in iter_route_contexts(app.routes):
        path = getattr(route, "path", None) or ""
        if not path.startswith(prefix):
            continue
        original = getattr(route, "original_route", route)
        if not isinstance(original, APIRoute):  # the docs pages; under /v1, something the tests must learn
            assert not path.startswith("/v1"), f"{path}: not an APIRoute ({type(original).__name__})"
            continue
        for method in sorted(set(route.methods) - {"HEAD", "OPTIONS"}):
            found.append(Endpoint(method, path, tuple(PATH_PARAM.findall(path)), original.body_field is not None))
    assert found, f"no routes under {prefix}"
    return found


# ---- a real server ----------------------------------------------------------------------------------------
def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class ServedApi:
    """The app over HTTP on 127.0.0.1: uvicorn and the runtime in one background thread with its own loop.
    `call(coro)` runs a coroutine on that loop (the runtime's Redis clients belong to it)."""

    settings: Settings
    model: Any = None  # None: LocalRuntime starts a real ModelWorker on settings.model_path
    tenant: str = "default"  # the runtime's own tenant (its in-process namespaces) and `api_key`'s
    api_key: str = ""  # a key of `tenant`, created at start
    runtime: LocalRuntime | None = None
    app: Any = None
    base_url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _failure: BaseException | None = None
    _ready: threading.Event = field(default_factory=threading.Event)

    def start(self, timeout_s: float = 120.0) -> ServedApi:
        sock = free_socket()
        host, port = sock.getsockname()
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._main, args=(sock,), name="served-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            if self._failure is not None or not self._thread.is_alive():
                raise RuntimeError("the server thread failed to start") from self._failure
            assert time.monotonic() < deadline, "the runtime did not start in time"
        while True:  # it answers /healthz over real HTTP
            if self._failure is not None:
                raise RuntimeError("the server thread failed") from self._failure
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self
            assert time.monotonic() < deadline, "the server did not answer /healthz in time"
            time.sleep(0.05)

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
            self.api_key = (await self.runtime.service.keys.create(self.tenant, name="test server")).key
            self.app = create_app(self.settings, service=self.runtime.service)
            self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
            self._ready.set()
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()
            await self.runtime.close()

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def key(self, tenant: str, *, admin: bool = False) -> str:
        return self.call(self.runtime.service.keys.create(tenant, admin=admin)).key

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(60)
            assert not self._thread.is_alive(), "the server thread did not stop"


@contextlib.contextmanager
def served(settings: Settings, model: Any = None) -> Iterator[ServedApi]:
    server = ServedApi(settings, model)
    try:
        yield server.start()
    finally:
        server.stop()

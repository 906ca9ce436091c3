"""The FastAPI application: the runtime over HTTP, in one process on the embedded defaults, and the
ingress a Ray Serve deployment wraps later without changing a route.

`create_app(settings)` builds the app; its lifespan starts the runtime (`LocalRuntime` with the task
runner, unless a `RuntimeService` is passed in), and on the first start creates an admin API key for the
`default` tenant and logs it once. Routes: `/v1/...` (see `routes` and `openai_routes`), `/healthz`
(process alive), `/readyz` (Redis, database, model worker; 503 naming what failed), `/metrics`
(Prometheus), OpenAPI at `/openapi.json`, docs at `/docs`. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from runtime.api import openai_routes, routes
from runtime.api.errors import error_body, install_error_handlers
from runtime.api.guards import BodyLimit, RateLimiter, StreamSlots
from runtime.api.metrics import CONTENT_TYPE_LATEST, ApiMetrics, RequestMetrics
from runtime.settings import Settings

log = logging.getLogger(__name__)


async def ensure_first_key(service, on_new_key: Callable[[str], None] | None) -> None:
    """On a store with no API keys at all, create an admin key for tenant 'default' and hand it over once
    (atomically: of several replicas starting together, one creates it)."""
    key = await service.keys.create_first("default", name="first admin key", admin=True)
    if key is not None:
        (on_new_key or (lambda k: log.warning("created the first API key (shown once): %s", k)))(key.key)


def create_app(settings: Settings | None = None, *, service=None,
               on_new_key: Callable[[str], None] | None = None, on_ready: Callable[[], None] | None = None,
               on_start_failed: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app. With `service` (a started RuntimeService) it serves that; else its lifespan starts and
    stops an embedded LocalRuntime that runs submitted tasks (`on_ready` is called once it is up,
    `on_start_failed` with the error when it cannot start, before the server reports it)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            app.state.service = service
            yield
            return
        from runtime.local import LocalRuntime

        runtime = LocalRuntime(settings)
        try:
            try:
                await runtime.start(run_tasks=True)
                app.state.service = runtime.service
                await ensure_first_key(runtime.service, on_new_key)  # the first call that needs Redis
            except BaseException as exc:
                if on_start_failed is not None:
                    on_start_failed(exc)
                raise
            if on_ready is not None:
                on_ready()
            yield
        finally:
            await runtime.close()

    app = FastAPI(title="engram-runtime", version="0.1.0", lifespan=lifespan,
                  description="Agents with durable sessions and long-term memory, and OpenAI-compatible model "
                              "endpoints. Authenticate with 'Authorization: Bearer <API key>'.")
    if service is not None:
        app.state.service = service
    app.state.settings = settings
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
    app.state.stream_slots = StreamSlots(settings.max_streams_per_key)
    app.state.metrics = metrics = ApiMetrics()
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "a dependency failed"}})
    async def readyz(request: Request) -> JSONResponse:
        checks = await request.app.state.service.readiness()
        failed = sorted(name for name, result in checks.items() if result != "ok")
        if failed:
            body = error_body(503, f"not ready: {', '.join(f'{n} ({checks[n]})' for n in failed)}")
            return JSONResponse({**body, "checks": checks}, status_code=503)
        return JSONResponse({"status": "ready", "checks": checks})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus(request: Request) -> Response:
        await metrics.refresh(request.app.state.service)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app

"""Who is calling and how much they may do: API-key authentication (a key maps to a tenant), a per-key
token-bucket rate limit (429 with Retry-After), a bound on concurrent event streams per key, and a
request-body size limit (413) enforced while the body is read, so a lying Content-Length cannot
smuggle in more.

The limits are per server process (each replica of a scaled deployment enforces its own share).

Deliberately not here: what a tenant may see (the runtime scopes every call by tenant).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.api.errors import ApiError, error_body
from runtime.resources import ApiKey


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per key: `rate` requests/s sustained, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """0 when the request may proceed, else the seconds to wait before retrying."""
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            if len(self._buckets) > 100_000:
                self._buckets.clear()
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


class StreamSlots:
    """At most `limit` concurrent event streams per key."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, key: str):
        """Take a slot (ApiError 429 when none is free); returns its release function (idempotent)."""
        if self._open.get(key, 0) >= self.limit:
            raise ApiError(429, f"too many concurrent event streams for this API key (limit {self.limit})",
                           headers={"Retry-After": "1"})
        self._open[key] = self._open.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[key] -= 1

        return release


async def caller(request: Request) -> ApiKey:
    """The dependency every tenant route takes: the caller's key (401 without a valid one, 429 over rate)."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    key = await request.app.state.service.keys.verify(presented.strip())
    if key is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    wait_s = request.app.state.rate_limiter.take(key.id)
    if wait_s > 0:
        raise ApiError(429, "rate limit exceeded for this API key",
                       headers={"Retry-After": str(max(1, math.ceil(wait_s)))})
    request.state.api_key = key
    return key


async def admin(request: Request) -> ApiKey:
    key = await caller(request)
    if not key.admin:
        raise ApiError(403, "this route needs an admin API key")
    return key


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413 (by Content-Length up front, and
    by counting what is actually received)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(413, f"request body over the limit of {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(StarletteHTTPException):
    """Raised from `receive`: FastAPI passes HTTP exceptions through its body parsing, so the app's own
    handler answers 413 in the one error shape."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over the limit of {max_bytes} bytes")

"""Prometheus metrics of the API process (`GET /metrics`, text format via prometheus_client).

Request counts and latencies by route template and status (the template, not the raw path, so ids do
not explode the label set); tasks by state (in the queue, running here, finished here by status); model
tokens (counter and the rate since the previous scrape); prefix-cache hit rate; Engram lookups; memory
searches. Values owned by other parts are read when scraped, so the hot paths carry no metrics code.

Deliberately not here: exporting anywhere (Prometheus scrapes this route).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics", "RequestMetrics"]


class ApiMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("engram_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram("engram_http_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["method", "route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tasks = Gauge("engram_tasks", "Tasks by state: queued (pending or running anywhere), active (driven "
                           "by this process)", ["state"], registry=r)
        self.finished = Gauge("engram_tasks_finished", "Tasks this process finished, by final status",
                              ["status"], registry=r)
        self.submitted = Counter("engram_tasks_submitted", "Tasks submitted through this process", registry=r)
        self.queue_depth = Gauge("engram_queue_depth", "Unfinished tasks (pending, or running under a lease)",
                                 registry=r)
        self.model_tokens = Gauge("engram_model_tokens_computed", "Tokens run through the model since start",
                                  registry=r)
        self.tokens_per_s = Gauge("engram_model_tokens_per_second", "Model tokens/s since the previous scrape",
                                  registry=r)
        self.prefix_hit_rate = Gauge("engram_prefix_cache_hit_rate", "Prompt tokens served from the prefix "
                                     "cache / prompt tokens looked up", registry=r)
        self.engram_lookups = Gauge("engram_engram_lookups", "Engram table lookups since start", registry=r)
        self.memory_searches = Gauge("engram_memory_searches", "Agent-memory searches since start", registry=r)
        self._last_tokens: tuple[float, float] | None = None

    async def refresh(self, service) -> None:
        """Read the values other parts own (called per scrape)."""
        try:
            self.queue_depth.set(await service.store.runnable_count())
        except Exception:  # Redis away: /readyz says so; keep serving the rest
            pass
        self.tasks.labels("active").set(len(service.orchestrator.active))
        for status, count in service.orchestrator.finished.items():
            self.finished.labels(status).set(count)
        stats = service.model_stats()
        tokens = float(stats.get("computed_tokens", 0))
        self.model_tokens.set(tokens)
        now = time.monotonic()
        if self._last_tokens is not None and now > self._last_tokens[0]:
            self.tokens_per_s.set((tokens - self._last_tokens[1]) / (now - self._last_tokens[0]))
        self._last_tokens = (now, tokens)
        queried = stats.get("prefix_queries_tokens", 0)
        self.prefix_hit_rate.set(stats.get("prefix_hit_tokens", 0) / queried if queried else 0.0)
        self.engram_lookups.set(stats.get("engram_lookups", 0))
        self.memory_searches.set(service.counters.get("memory_searches", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template and status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def observe(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)

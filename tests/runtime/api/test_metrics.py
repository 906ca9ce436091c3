"""GET /metrics: Prometheus text that the official parser reads, with request counts by route template and
status, submitted tasks and memory searches moving as the API is used."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.api.conftest import bearer
from tests.runtime.api.support import QuickModel


async def scrape(api) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    r = await api.client.get("/metrics")  # no key: Prometheus scrapes it as is
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_total(samples, method: str, route: str, status: int) -> float:
    key = ("engram_http_requests_total", (("method", method), ("route", route), ("status", str(status))))
    return samples.get(key, 0.0)


def value(samples, name: str) -> float:
    assert (name, ()) in samples, sorted({n for n, _ in samples})
    return samples[(name, ())]


def test_metrics_parse_and_count_requests_by_route_template(open_api):
    async def scenario():
        async with open_api(model=QuickModel()) as api:
            key = await api.key("tenant-a")
            before = await scrape(api)
            names = {name for name, _ in before}
            for expected in ("engram_tasks_submitted_total", "engram_memory_searches", "engram_queue_depth",
                             "engram_model_tokens_computed", "engram_prefix_cache_hit_rate"):
                assert expected in names, (expected, sorted(names))

            for _ in range(3):
                assert (await api.client.get("/v1/agents", headers=bearer(key))).status_code == 200
            assert (await api.client.get("/v1/agents")).status_code == 401
            for task_id in ("task_" + "0" * 24, "task_" + "1" * 24):  # ids land in one template, not two series
                assert (await api.client.get(f"/v1/tasks/{task_id}", headers=bearer(key))).status_code == 404
            after = await scrape(api)
            for status, made in ((200, 3), (401, 1)):
                moved = requests_total(after, "GET", "/v1/agents", status) - requests_total(
                    before, "GET", "/v1/agents", status)
                assert moved == made, (status, moved)
            assert requests_total(after, "GET", "/v1/tasks/{task_id}", 404) == 2
            assert not any("task_000" in str(labels) for _, labels in after)
            # the scrape itself is counted, and latency is observed per template
            assert requests_total(after, "GET", "/metrics", 200) >= 1
            count = ("engram_http_request_duration_seconds_count", (("method", "GET"), ("route", "/v1/agents")))
            assert after[count] >= 4

    asyncio.run(scenario())


def test_submitted_tasks_and_memory_searches_are_counted(open_api):
    async def scenario():
        async with open_api(model=QuickModel()) as api:
            key = await api.key("tenant-a")
            c = api.client
            assert (await c.post("/v1/agents", headers=bearer(key), json={
                "name": "quiet", "instructions": "answer", "memory": {"retrieve": False}})).status_code == 201
            before = await scrape(api)

            r = await c.post("/v1/tasks", headers={**bearer(key), "Idempotency-Key": "k"},
                             json={"agent": "quiet", "input": "hello"})
            assert r.status_code == 201, r.text
            mid = await scrape(api)
            assert value(mid, "engram_tasks_submitted_total") - value(before, "engram_tasks_submitted_total") == 1
            # an idempotent replay is not a new submission; a refused one is not one either
            assert (await c.post("/v1/tasks", headers={**bearer(key), "Idempotency-Key": "k"},
                                 json={"agent": "quiet", "input": "hello"})).status_code == 200
            assert (await c.post("/v1/tasks", headers=bearer(key), json={"agent": "nobody", "input": "x"}
                                 )).status_code == 404
            submitted = value(mid, "engram_tasks_submitted_total")
            assert value(await scrape(api), "engram_tasks_submitted_total") == submitted

            searches = value(await scrape(api), "engram_memory_searches")
            assert (await c.post("/v1/agents/quiet/memories", headers=bearer(key), json={"text": "the sky is blue"}
                                 )).status_code == 201
            r = await c.post("/v1/agents/quiet/memories/search", headers=bearer(key), json={"query": "sky"})
            assert r.status_code == 200 and r.json()["data"][0]["memory"]["text"] == "the sky is blue", r.text
            assert value(await scrape(api), "engram_memory_searches") == searches + 1

    asyncio.run(scenario())

"""Tenant isolation over the app's whole route table: tenant B reaching for tenant A's agents, tasks,
sessions, memories and keys gets exactly what a missing id gets (404 in the one error shape), lists show
B nothing of A's, and nothing B does through A's ids changes A's data.

The routes come from `app.routes`, so a route added later is covered without touching this file, and a
route with a path parameter this test does not know fails it (add the parameter to `ids` below once the
route is scoped by tenant)."""

from __future__ import annotations

import asyncio
import uuid

from tests.runtime.api.conftest import bearer, wait_status
from tests.runtime.api.support import Endpoint, StuckModel, assert_error, endpoints

# A valid body for each route that takes one and has path parameters: an invalid body would answer 422
# before the route looks at the ids, hiding what the test is after.
SAMPLE_BODIES = {
    ("PATCH", "/v1/agents/{name}"): {"instructions": "changed by tenant B"},
    ("POST", "/v1/sessions/{session_id}/messages"): {"input": "a message from tenant B"},
    ("POST", "/v1/agents/{agent}/memories"): {"text": "planted by tenant B"},
    ("POST", "/v1/agents/{agent}/memories/search"): {"query": "alpha secret"},
    ("PATCH", "/v1/agents/{agent}/memories/{memory_id}"): {"text": "overwritten by tenant B"},
}
# Routes only admin keys reach (keys are managed by the operator, across tenants): a tenant key gets 403.
ADMIN_ONLY = {("DELETE", "/v1/keys/{key_id}")}
AGENT = "alpha-private"
INSTRUCTIONS = "alpha instructions nobody else may read"
MEMORY_TEXT = "alpha secret memory text"
TASK_INPUT = "alpha private task input"


async def _send(api, endpoint: Endpoint, ids: dict[str, str], key: str):
    body = SAMPLE_BODIES.get((endpoint.method, endpoint.path))
    assert body is not None or not endpoint.has_body, f"{endpoint}: add a valid sample body to SAMPLE_BODIES"
    # a route that wrongly serves A's task events would stream until A's (stuck) task ends: bound the wait
    return await asyncio.wait_for(api.client.request(endpoint.method, endpoint.url(ids), json=body,
                                                     headers=bearer(key)), 15)


def _normalized(message: str, ids: dict[str, str]) -> str:
    for value in sorted(set(ids.values()), key=len, reverse=True):
        message = message.replace(value, "<id>")
    return message




def test_another_tenants_ids_answer_exactly_like_missing_ones(open_api):
    async def scenario():
        # tenant A's task never finishes (the model is stuck), so a leaked cancel or event stream would show
        async with open_api(model=StuckModel()) as api:
            key_a, key_b = await api.key("tenant-a"), await api.key("tenant-b")
            a_key_id = key_a.split("_")[1]
            c = api.client
            r = await c.post("/v1/agents", headers=bearer(key_a), json={
                "name": AGENT, "instructions": INSTRUCTIONS, "tools": ["memory_write", "calculator"]})
            assert r.status_code == 201, r.text
            r = await c.post(f"/v1/agents/{AGENT}/memories", headers=bearer(key_a), json={"text": MEMORY_TEXT})
            assert r.status_code == 201, r.text
            memory_id = r.json()["id"]
            r = await c.post("/v1/tasks", headers=bearer(key_a), json={"agent": AGENT, "input": TASK_INPUT})
            assert r.status_code == 201, r.text
            task = r.json()
            await wait_status(api, key_a, task["id"], ("running",))
            a_ids = {"agent": AGENT, "name": AGENT, "task_id": task["id"], "session_id": task["session_id"],
                     "memory_id": memory_id, "key_id": a_key_id}
            missing = {"agent": "missing-agent", "name": "missing-agent", "task_id": "task_" + "0" * 24,
                       "session_id": "sess_" + "0" * 24, "memory_id": str(uuid.uuid4()), "key_id": "0" * 16}
            # tenant B is an active tenant too, with a task of its own
            r = await c.post("/v1/tasks", headers=bearer(key_b), json={"input": "tenant b's own task"})
            assert r.status_code == 201, r.text

            routes = endpoints(api.app)
            unknown = sorted({f"{e} ({p})" for e in routes for p in e.params if p not in a_ids})
            assert not unknown, (f"routes with path parameters this test does not know: {unknown}; add them to "
                                 "the ids here once they are scoped by tenant")
            with_params = [e for e in routes if e.params]
            assert len(with_params) >= 12, with_params  # the table is really read

            admin_only, checked = set(), []
            for endpoint in with_params:
                if endpoint.path.startswith("/v1/keys"):
                    for ids in (a_ids, missing):
                        assert_error(await _send(api, endpoint, ids, key_b), 403, type_="permission_error")
                    admin_only.add((endpoint.method, endpoint.path))
                    continue
                foreign = assert_error(await _send(api, endpoint, a_ids, key_b), 404, type_="not_found_error")
                absent = assert_error(await _send(api, endpoint, missing, key_b), 404, type_="not_found_error")
                assert foreign["field"] == absent["field"], endpoint
                assert _normalized(foreign["message"], a_ids) == _normalized(absent["message"], missing), (
                    f"{endpoint}: {foreign['message']!r} vs {absent['message']!r}")
                checked.append(endpoint)
            assert admin_only == ADMIN_ONLY
            assert {e.path for e in checked} >= {"/v1/agents/{name}", "/v1/tasks/{task_id}/events",
                                                 "/v1/sessions/{session_id}",
                                                 "/v1/agents/{agent}/memories/{memory_id}"}

            # B's own agent under A's agent's name: still none of A's memories through it
            r = await c.post("/v1/agents", headers=bearer(key_b), json={"name": AGENT, "instructions": "b's own"})
            assert r.status_code == 201, r.text
            for endpoint in with_params:
                if "memory_id" in endpoint.params:
                    ids_a, ids_missing = {**a_ids}, {**missing, "agent": AGENT}
                    foreign = assert_error(await _send(api, endpoint, ids_a, key_b), 404, type_="not_found_error")
                    absent = assert_error(await _send(api, endpoint, ids_missing, key_b), 404,
                                          type_="not_found_error")
                    assert _normalized(foreign["message"], a_ids) == _normalized(absent["message"], missing)
                elif set(endpoint.params) <= {"agent", "name"} and (
                        endpoint.method == "GET" or endpoint.path.endswith("/search")):
                    r = await _send(api, endpoint, a_ids, key_b)
                    assert r.status_code == 200, (endpoint, r.text)
                    for secret in (INSTRUCTIONS, MEMORY_TEXT, memory_id):
                        assert secret not in r.text, (endpoint, secret)

            # nothing B sent through A's ids changed A's data
            agent = (await c.get(f"/v1/agents/{AGENT}", headers=bearer(key_a))).json()
            assert agent["instructions"] == INSTRUCTIONS
            memories = (await c.get(f"/v1/agents/{AGENT}/memories", headers=bearer(key_a))).json()["data"]
            assert [(m["id"], m["text"]) for m in memories] == [(memory_id, MEMORY_TEXT)]
            assert (await c.get(f"/v1/tasks/{task['id']}", headers=bearer(key_a))).json()["status"] == "running"
            session = (await c.get(f"/v1/sessions/{task['session_id']}", headers=bearer(key_a))).json()
            assert [t["id"] for t in session["tasks"]] == [task["id"]]
            assert (await c.get("/v1/agents", headers=bearer(key_a))).status_code == 200  # A's key not revoked


    asyncio.run(scenario())


def test_lists_show_another_tenant_nothing(open_api):
    async def scenario():
        async with open_api(model=StuckModel()) as api:
            key_a, key_b = await api.key("tenant-a"), await api.key("tenant-b")
            c = api.client
            assert (await c.post("/v1/agents", headers=bearer(key_a),
                                 json={"name": AGENT, "instructions": INSTRUCTIONS})).status_code == 201
            r = await c.post(f"/v1/agents/{AGENT}/memories", headers=bearer(key_a), json={"text": MEMORY_TEXT})
            memory_id = r.json()["id"]
            a_task = (await c.post("/v1/tasks", headers=bearer(key_a), json={"agent": AGENT, "input": TASK_INPUT}
                                   )).json()
            b_task = (await c.post("/v1/tasks", headers=bearer(key_b), json={"input": "tenant b's own task"})).json()
            a_markers = [AGENT, INSTRUCTIONS, MEMORY_TEXT, memory_id, a_task["id"], a_task["session_id"], TASK_INPUT]

            listing = [e for e in endpoints(api.app) if e.method == "GET" and not e.params]
            assert {"/v1/agents", "/v1/tasks"} <= {e.path for e in listing}
            for endpoint in listing:
                r = await c.get(endpoint.path, headers=bearer(key_b))
                if endpoint.path.startswith("/v1/keys"):
                    assert_error(r, 403, type_="permission_error")
                    continue
                for marker in a_markers:
                    assert marker not in r.text, (str(endpoint), marker, r.text[:500])

            tasks_b = (await c.get("/v1/tasks", headers=bearer(key_b))).json()["data"]
            assert [t["id"] for t in tasks_b] == [b_task["id"]]
            for query in ({"agent": AGENT}, {"status": "pending"}, {"status": "running"}, {"limit": 200}):
                r = await c.get("/v1/tasks", params=query, headers=bearer(key_b))
                assert r.status_code == 200 and a_task["id"] not in r.text, (query, r.text)
            agents_b = [a["name"] for a in (await c.get("/v1/agents", headers=bearer(key_b))).json()["data"]]
            assert AGENT not in agents_b and "assistant" in agents_b  # the built-in is everyone's
            # A sees its own
            assert a_task["id"] in (await c.get("/v1/tasks", headers=bearer(key_a))).text
            assert AGENT in (await c.get("/v1/agents", headers=bearer(key_a))).text

    asyncio.run(scenario())


def test_idempotency_keys_are_per_tenant(open_api):
    async def scenario():
        async with open_api(model=StuckModel()) as api:
            key_a, key_b = await api.key("tenant-a"), await api.key("tenant-b")
            body, headers = {"input": "same request"}, {"Idempotency-Key": "shared-key-1"}
            ra = await api.client.post("/v1/tasks", json=body, headers={**bearer(key_a), **headers})
            rb = await api.client.post("/v1/tasks", json=body, headers={**bearer(key_b), **headers})
            assert (ra.status_code, rb.status_code) == (201, 201), (ra.text, rb.text)
            assert ra.json()["id"] != rb.json()["id"]
            # and B's replay returns B's task, not A's
            again = await api.client.post("/v1/tasks", json=body, headers={**bearer(key_b), **headers})
            assert again.status_code == 200 and again.json()["id"] == rb.json()["id"]

    asyncio.run(scenario())


def test_a_memory_is_reachable_only_under_its_own_agent(open_api):
    async def scenario():
        async with open_api(model=StuckModel()) as api:
            key = await api.key("tenant-a")
            c = api.client
            for name in ("owner", "other"):
                assert (await c.post("/v1/agents", headers=bearer(key),
                                     json={"name": name, "instructions": "x"})).status_code == 201
            memory_id = (await c.post("/v1/agents/owner/memories", headers=bearer(key),
                                      json={"text": MEMORY_TEXT})).json()["id"]
            missing = str(uuid.uuid4())
            memory_routes = [e for e in endpoints(api.app) if "memory_id" in e.params]
            assert {e.method for e in memory_routes} == {"GET", "PATCH", "DELETE"}
            for endpoint in memory_routes:
                wrong = assert_error(await _send(api, endpoint, {"agent": "other", "memory_id": memory_id}, key), 404)
                absent = assert_error(await _send(api, endpoint, {"agent": "other", "memory_id": missing}, key), 404)
                assert wrong["message"].replace(memory_id, "<id>") == absent["message"].replace(missing, "<id>")
            r = await c.get(f"/v1/agents/owner/memories/{memory_id}", headers=bearer(key))
            assert r.status_code == 200 and r.json()["text"] == MEMORY_TEXT  # untouched, and there

    asyncio.run(scenario())

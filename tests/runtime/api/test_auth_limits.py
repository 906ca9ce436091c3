"""Who may call and how much: API keys on every /v1 route (read from the app's route table), admin-only
key management, the request-body limit, the per-key rate limit, the per-key bound on concurrent event
streams, the one error shape (never a stack trace), validation errors naming their field, and
Idempotency-Key on task submission."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

from tests.runtime.api.conftest import bearer, wait_status
from tests.runtime.api.support import QuickModel, StuckModel, assert_error, endpoints


def _url(endpoint) -> str:
    return endpoint.url({name: f"some-{name}".replace("_", "-") for name in endpoint.params})




# ---- authentication -------------------------------------------------------------------------------------
def test_every_v1_route_refuses_missing_wrong_and_revoked_keys(open_api):
    async def scenario():
        async with open_api() as api:
            revoked = await api.key("tenant-a", admin=True)
            await api.service.keys.revoke(revoked.split("_")[1])
            valid = await api.key("tenant-a", admin=True)
            key_id, _, secret = valid.removeprefix("engram_").partition("_")
            presented = {
                "no header": {},
                "empty bearer": {"Authorization": "Bearer "},
                "other scheme": {"Authorization": f"Basic {valid}"},
                "not a key": bearer("nonsense"),
                "unknown key id": bearer(f"engram_{'0' * 16}_{secret}"),
                "wrong secret": bearer(f"engram_{key_id}_{secret[:-2]}xx"),
                "revoked key": bearer(revoked),
            }
            routes = endpoints(api.app)
            assert len(routes) >= 20, [str(e) for e in routes]
            for endpoint in routes:
                for what, headers in presented.items():
                    r = await api.client.request(endpoint.method, _url(endpoint), headers=headers,
                                                 json={} if endpoint.has_body else None)
                    assert_error(r, 401, type_="authentication_error")
                    assert r.headers.get("www-authenticate") == "Bearer", (str(endpoint), what)
                    assert secret not in r.text
            # the valid key passes the same gate (GET /v1/agents), so the 401s above are about the key
            assert (await api.client.get("/v1/agents", headers=bearer(valid))).status_code == 200

    asyncio.run(scenario())


def test_key_routes_need_an_admin_key(open_api):
    async def scenario():
        async with open_api() as api:
            tenant_key = await api.key("tenant-a")
            key_routes = [e for e in endpoints(api.app) if e.path.startswith("/v1/keys")]
            assert {str(e) for e in key_routes} == {"POST /v1/keys", "GET /v1/keys", "DELETE /v1/keys/{key_id}"}
            victim_id = (await api.service.keys.create("tenant-b")).id
            bodies = {"POST": {"tenant": "tenant-a", "admin": True}}
            for endpoint in key_routes:
                r = await api.client.request(endpoint.method, endpoint.url({"key_id": victim_id}),
                                             headers=bearer(tenant_key), json=bodies.get(endpoint.method))
                assert_error(r, 403, type_="permission_error")
            # nothing happened: no key was made, the victim is not revoked
            keys = await api.service.keys.list()
            assert len(keys) == 2 and all(k.revoked_ms is None for k in keys)

    asyncio.run(scenario())


def test_admin_creates_lists_and_revokes_keys(open_api):
    async def scenario():
        async with open_api() as api:
            admin = await api.key("ops", admin=True)
            c = api.client
            r = await c.post("/v1/keys", headers=bearer(admin), json={"tenant": "tenant-x", "name": "ci"})
            assert r.status_code == 201, r.text
            created = r.json()
            assert (created["tenant"], created["admin"]) == ("tenant-x", False)
            assert created["key"].startswith("engram_")
            new_key = created["key"]
            assert (await c.get("/v1/agents", headers=bearer(new_key))).status_code == 200
            assert_error(await c.get("/v1/keys", headers=bearer(new_key)), 403)  # not an admin key

            listed = await c.get("/v1/keys", headers=bearer(admin))
            assert listed.status_code == 200
            assert {k["id"] for k in listed.json()["data"]} == {admin.split("_")[1], created["id"]}
            assert new_key.split("_", 2)[2] not in listed.text and "sha256" not in listed.text  # no secrets
            only_x = (await c.get("/v1/keys", params={"tenant": "tenant-x"}, headers=bearer(admin))).json()["data"]
            assert [k["id"] for k in only_x] == [created["id"]]

            r = await c.delete(f"/v1/keys/{created['id']}", headers=bearer(admin))
            assert r.status_code == 200 and r.json()["revoked_ms"] > 0, r.text
            assert_error(await c.get("/v1/agents", headers=bearer(new_key)), 401)
            again = await c.delete(f"/v1/keys/{created['id']}", headers=bearer(admin))
            assert again.status_code == 200 and again.json()["revoked_ms"] == r.json()["revoked_ms"]
            assert_error(await c.delete(f"/v1/keys/{'f' * 16}", headers=bearer(admin)), 404, type_="not_found_error")

            r = await c.post("/v1/keys", headers=bearer(admin), json={"tenant": "tenant-y", "admin": True})
            assert r.status_code == 201 and r.json()["admin"] is True
            assert (await c.get("/v1/keys", headers=bearer(r.json()["key"]))).status_code == 200
            assert_error(await c.post("/v1/keys", headers=bearer(admin), json={"tenant": "bad tenant!"}), 422,
                         field="tenant")

    asyncio.run(scenario())


# ---- request size -----------------------------------------------------------------------------------------
def test_bodies_over_the_limit_are_refused_with_413(open_api):
    async def scenario():
        async with open_api(max_body_bytes=2048) as api:
            key = await api.key("tenant-a")
            c = api.client

            def agent(size: int) -> bytes:
                body = {"name": "big", "instructions": ""}
                body["instructions"] = "x" * (size - len(json.dumps(body)))
                data = json.dumps(body).encode()
                assert len(data) == size
                return data

            headers = {**bearer(key), "Content-Type": "application/json"}
            r = await c.post("/v1/agents", content=agent(4000), headers=headers)  # honest Content-Length
            assert r.request.headers["content-length"] == "4000"
            assert_error(r, 413, type_="request_too_large")

            async def chunks(data: bytes):
                for start in range(0, len(data), 500):
                    yield data[start:start + 500]

            r = await c.post("/v1/agents", content=chunks(agent(4000)), headers=headers)  # no Content-Length
            assert "content-length" not in r.request.headers
            assert_error(r, 413, type_="request_too_large")
            r = await c.post("/v1/agents", content=chunks(agent(2049)), headers=headers)
            assert_error(r, 413, type_="request_too_large")
            # nothing was created; a body at the limit is served, streamed or not
            assert_error(await c.get("/v1/agents/big", headers=bearer(key)), 404)
            assert (await c.post("/v1/agents", content=agent(2048), headers=headers)).status_code == 201
            r = await c.post("/v1/agents/big/memories", content=chunks(json.dumps({"text": "y" * 1900}).encode()),
                             headers=headers)
            assert r.status_code == 201, r.text

    asyncio.run(scenario())


def test_a_streamed_oversized_body_over_real_http_gets_413(serve_api):
    with serve_api(model=QuickModel(), max_body_bytes=2048) as server:
        key = server.key("tenant-a")

        def chunks():
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(f"{server.base_url}/v1/agents", content=chunks(), timeout=30,
                       headers={**bearer(key), "Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, type_="request_too_large")


# ---- rate and stream limits ---------------------------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after(open_api):
    async def scenario():
        async with open_api(rate_limit_per_s=1, rate_limit_burst=3) as api:
            key, other = await api.key("tenant-a"), await api.key("tenant-a")
            statuses = [(await api.client.get("/v1/agents", headers=bearer(key))).status_code for _ in range(3)]
            assert statuses == [200, 200, 200]
            r = await api.client.get("/v1/agents", headers=bearer(key))
            assert_error(r, 429, type_="rate_limit_error")
            retry_after = r.headers["Retry-After"]
            assert retry_after.isdigit() and int(retry_after) >= 1, retry_after
            # per key: another key of the same tenant is not throttled
            assert (await api.client.get("/v1/agents", headers=bearer(other))).status_code == 200
            # the bucket refills at the configured rate
            await asyncio.sleep(int(retry_after) + 0.1)
            assert (await api.client.get("/v1/agents", headers=bearer(key))).status_code == 200

    asyncio.run(scenario())


def test_concurrent_event_streams_per_key_are_bounded(serve_api):
    async def scenario(server, key: str, other: str):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            r = await client.post("/v1/tasks", headers=bearer(key), json={"input": "never finishes"})
            assert r.status_code == 201, r.text
            task_id = r.json()["id"]
            await wait_status(client, key, task_id, ("running",))
            url = f"/v1/tasks/{task_id}/events"
            async with contextlib.AsyncExitStack() as streams:
                opened = [await streams.enter_async_context(client.stream("GET", url, headers=bearer(key)))
                          for _ in range(2)]
                assert [s.status_code for s in opened] == [200, 200]
                assert all(s.headers["content-type"].startswith("text/event-stream") for s in opened)
                lines = opened[0].aiter_lines()  # kept: a dropped iterator is finalized, closing its stream
                first = await anext(lines)  # the stream really streams
                assert first.startswith(("id:", ":")), first

                r = await client.get(url, headers=bearer(key), timeout=5)  # the third stream of this key
                assert_error(r, 429, type_="rate_limit_error")
                assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
                # the bound is per key
                async with client.stream("GET", url, headers=bearer(other)) as s:
                    assert s.status_code == 200
                # closing a stream frees its slot
                await lines.aclose()
                await opened[0].aclose()
                for _ in range(100):
                    async with client.stream("GET", url, headers=bearer(key)) as s:
                        if s.status_code == 200:
                            break
                        await s.aread()
                        assert_error(s, 429)
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("a closed stream's slot was never released")

    with serve_api(model=StuckModel(), max_streams_per_key=2) as server:
        key, other = server.key("tenant-a"), server.key("tenant-a")
        asyncio.run(scenario(server, key, other))


# ---- the error shape ------------------------------------------------------------------------------------------
def test_validation_errors_name_the_field(open_api):
    async def scenario():
        async with open_api() as api:
            key = await api.key("tenant-a")
            c = api.client
            error = assert_error(await c.post("/v1/agents", headers=bearer(key), json={
                "name": "tooly", "instructions": "hi", "tools": ["no_such_tool"]}), 422, field="tools")
            assert "no_such_tool" in error["message"]
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={
                "name": "limited", "instructions": "hi", "limits": {"max_steps": 0}}), 422, field="limits.max_steps")
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={
                "name": "limited", "instructions": "hi", "limits": {"max_wall_time_s": -1}}), 422,
                field="limits.max_wall_time_s")
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={
                "name": "Not A Slug", "instructions": "hi"}), 422, field="name")
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={
                "name": "extra", "instructions": "hi", "surprise": 1}), 422, field="surprise")
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={"name": "noinstr"}), 422,
                         field="instructions")
            assert (await c.post("/v1/agents", headers=bearer(key), json={"name": "ok", "instructions": "hi"}
                                 )).status_code == 201
            assert_error(await c.patch("/v1/agents/ok", headers=bearer(key), json={"tools": ["nope"]}), 422,
                         field="tools")
            assert_error(await c.patch("/v1/agents/ok", headers=bearer(key), json={"limits": {"max_steps": -3}}),
                         422, field="limits.max_steps")
            assert_error(await c.post("/v1/tasks", headers=bearer(key), json={"input": ""}), 422, field="input")
            assert_error(await c.post("/v1/tasks", headers={**bearer(key), "Idempotency-Key": ""},  # would merge
                                      json={"input": "x"}), 422, field="Idempotency-Key")  # unrelated tasks
            assert_error(await c.get("/v1/tasks", headers=bearer(key), params={"limit": 0}), 422, field="limit")
            assert_error(await c.get("/v1/tasks", headers=bearer(key), params={"cursor": "abc"}), 422,
                         field="cursor")
            assert_error(await c.post("/v1/tasks", headers=bearer(key), json={"agent": "nobody", "input": "x"}),
                         404, type_="not_found_error")
            assert_error(await c.post("/v1/agents", headers={**bearer(key), "Content-Type": "application/json"},
                                      content=b"{not json"), 422)
            assert_error(await c.post("/v1/agents", headers=bearer(key), json={"name": "ok", "instructions": "x"}),
                         409, type_="conflict_error")
            for bad in ("abc", "99999999999999999999-0", "1-18446744073709551616"):  # past 64 bits: not a stream id
                assert_error(await c.get("/v1/tasks/task_x/events", headers={**bearer(key), "Last-Event-ID": bad}),
                             422, field="Last-Event-ID")
            assert_error(await c.get("/v1/tasks/task_x/events", headers={  # the largest id passes, the task is unknown
                **bearer(key), "Last-Event-ID": "18446744073709551615-18446744073709551615"}), 404)
            assert_error(await c.get("/v1/no-such-route", headers=bearer(key)), 404)
            assert_error(await c.put("/v1/agents", headers=bearer(key), json={}), 405)

    asyncio.run(scenario())


def test_unexpected_errors_are_500_without_a_traceback(open_api):
    async def scenario():
        async with open_api() as api:
            key = await api.key("tenant-a")

            async def broken(tenant):
                raise RuntimeError("secret internal detail")

            api.service.catalog.list = broken
            # the raw ASGI transport: Starlette re-raises after answering, as a server would log it
            transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                r = await client.get("/v1/agents", headers=bearer(key))
            error = assert_error(r, 500, type_="server_error")
            assert "secret internal detail" not in r.text and "RuntimeError" not in r.text
            assert "id " in error["message"]  # an error id to find the log entry

    asyncio.run(scenario())


# ---- idempotent submission ----------------------------------------------------------------------------------
def test_idempotency_key_returns_the_same_task_or_409(open_api):
    async def scenario():
        async with open_api(model=QuickModel()) as api:
            key = await api.key("tenant-a")
            c = api.client
            headers = {**bearer(key), "Idempotency-Key": "order-42"}
            first = await c.post("/v1/tasks", headers=headers, json={"input": "do it once"})
            assert first.status_code == 201, first.text
            task = first.json()
            assert first.headers["Location"] == f"/v1/tasks/{task['id']}"
            second = await c.post("/v1/tasks", headers=headers, json={"input": "do it once"})
            assert second.status_code == 200, second.text
            assert second.json()["id"] == task["id"] and second.headers["Location"] == first.headers["Location"]
            assert_error(await c.post("/v1/tasks", headers=headers, json={"input": "something else"}), 409,
                         type_="conflict_error")
            listed = (await c.get("/v1/tasks", headers=bearer(key))).json()["data"]
            assert [t["id"] for t in listed] == [task["id"]]  # one task, however often it was sent

            # the same for a message to a session
            await wait_status(api, key, task["id"], ("completed",))
            url = f"/v1/sessions/{task['session_id']}/messages"
            headers = {**bearer(key), "Idempotency-Key": "message-1"}
            m1 = await c.post(url, headers=headers, json={"input": "and then?"})
            m2 = await c.post(url, headers=headers, json={"input": "and then?"})
            assert (m1.status_code, m2.status_code) == (201, 200), (m1.text, m2.text)
            assert m1.json()["id"] == m2.json()["id"] != task["id"]
            assert_error(await c.post(url, headers=headers, json={"input": "different"}), 409)
            # without a key every request is a new task
            a = await c.post("/v1/tasks", headers=bearer(key), json={"input": "do it once"})
            b = await c.post("/v1/tasks", headers=bearer(key), json={"input": "do it once"})
            assert (a.status_code, b.status_code) == (201, 201) and a.json()["id"] != b.json()["id"]

    asyncio.run(scenario())


def test_first_key_is_created_once_by_replicas_starting_together(redis_url, key_prefix):
    """Twelve stores starting at once (API replicas, `engram serve`) each try to create the first key against
    the real Redis: exactly one does, and a store that already has keys creates none."""
    import redis.asyncio as aioredis

    from runtime.api_keys import ApiKeyStore

    async def scenario():
        clients = [aioredis.from_url(redis_url) for _ in range(12)]
        try:
            stores = [ApiKeyStore(c, key_prefix=key_prefix) for c in clients]
            made = await asyncio.gather(*(s.create_first("default", name="first") for s in stores))
            created = [k for k in made if k is not None]
            assert len(created) == 1 and created[0].admin
            assert [k.id for k in await stores[0].list()] == [created[0].id]
            assert (await stores[3].verify(created[0].key)).id == created[0].id
            assert await stores[5].create_first("default") is None
            assert await stores[0].count() == 1
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(scenario())

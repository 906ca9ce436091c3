"""SessionStore on a real Redis: atomic, idempotent, gap-free commits; tool intent/result records; event
streams; TTL and retention; listings. State is checked with a plain redis-py client where it matters."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from runtime.sessions import LeaseLost, SessionFinished, SessionNotFound, SessionStore, Step

OWNER = "orchestrator-1"
LEASE_MS = 60_000


def run(coro):
    return asyncio.run(coro)


async def _claimed(store: SessionStore, tenant: str = "acme", agent: str = "helper", **kwargs):
    state = await store.create(tenant, agent, "add two numbers", **kwargs)
    claimed = await store.claim(state.session_id, OWNER, LEASE_MS)
    return state.session_id, claimed.fencing_token


def test_committed_steps_load_back_equal_and_in_order(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            steps = [make_step(sid, i, text="x" * i) for i in range(5)]
            for step in steps:
                assert await store.append_step(sid, step, OWNER, token) is True
            state, loaded = await store.load(sid)
            assert loaded == steps
            assert state.step_count == 5 and state.status == "running"
            raw = redis.Redis.from_url(redis_url).lrange(f"{key_prefix}:session:{sid}:steps", 0, -1)
            assert [json.loads(r)["index"] for r in raw] == list(range(5))  # the step id is derived on load

    run(body())


def test_same_step_committed_twice_leaves_one_entry(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            step = make_step(sid, 0)
            results = await asyncio.gather(*[store.append_step(sid, step, OWNER, token) for _ in range(4)])
            assert sorted(results) == [False, False, False, True]
            assert await store.append_step(sid, step, OWNER, token) is False
            state, loaded = await store.load(sid)
            assert state.step_count == 1 and loaded == [step]
            committed = [e for e in await store.events(sid) if e[1] == "step_committed"]
            assert len(committed) == 1 and committed[0][2]["index"] == step.index

    run(body())


def test_a_commit_that_would_leave_a_gap_is_rejected_and_writes_nothing(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            await store.append_step(sid, make_step(sid, 0), OWNER, token)
            before = await store.bytes_used(sid)
            with pytest.raises(ValueError, match="gap-free"):
                await store.append_step(sid, make_step(sid, 2), OWNER, token)
            state, loaded = await store.load(sid)
            assert state.step_count == 1 and [s.index for s in loaded] == [0]
            assert await store.bytes_used(sid) == before

    run(body())


def test_state_patch_is_applied_in_the_same_commit(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            await store.append_step(sid, make_step(sid, 0, kind="summary"), OWNER, token,
                                    state_patch={"summary": "user wants 2+2", "summarized_through": 1})
            state = await store.state(sid)
            assert (state.summary, state.summarized_through, state.step_count) == ("user wants 2+2", 1, 1)
            await store.append_step(sid, make_step(sid, 1), OWNER, token, state_patch={"summary": None})
            assert (await store.state(sid)).summary is None
            for bad in ({"step_count": 9}, {"fencing_token": 0}, {"status": "pending"}, {"summarized_through": -1}):
                with pytest.raises(ValueError, match="state_patch"):
                    await store.append_step(sid, make_step(sid, 2), OWNER, token, state_patch=bad)
            with pytest.raises(TypeError, match="summary"):
                await store.append_step(sid, make_step(sid, 2), OWNER, token, state_patch={"summary": 3})
            assert (await store.state(sid)).step_count == 2

    run(body())


def test_final_commit_ends_the_session_releases_the_lease_and_sets_the_ttl(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix, finished_ttl_s=100) as store:
            sid, token = await _claimed(store)
            await store.append_step(sid, make_step(sid, 0), OWNER, token)
            await store.record_tool_intent(sid, f"{sid}:0:0", "calculator", {"expression": "1+1"}, OWNER, token)
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            keys = [f"{key_prefix}:session:{sid}:{part}" for part in ("state", "steps", "tools", "events")]
            assert [client.pttl(k) for k in keys] == [-1, -1, -1, -1]  # running sessions never expire
            assert await store.finish(sid, make_step(sid, 1, kind="final"), OWNER, token, final_answer="2")
            ttls = [client.pttl(k) for k in keys]
            assert all(0 < ttl <= 100_000 for ttl in ttls), ttls
            state = await store.state(sid)
            assert (state.status, state.final_answer, state.lease_owner) == ("completed", "2", None)
            assert state.step_count == 2
            assert sid not in await store.runnable_sessions()
            kinds = [(e[1], e[2]) for e in await store.events(sid)][-2:]
            assert kinds == [("step_committed", {"index": 1, "kind": "final"}),
                             ("final", {"status": "completed", "answer": "2"})]
            # the final commit retried (reply lost) is a no-op, not an error
            assert await store.finish(sid, make_step(sid, 1, kind="final"), OWNER, token, final_answer="2") is False
            with pytest.raises(SessionFinished):
                await store.append_step(sid, make_step(sid, 2), OWNER, token)
            with pytest.raises(SessionFinished):
                await store.claim(sid, "someone-else", LEASE_MS)
            client.delete(keys[3])
            await store.emit(sid, "model_tokens", {"text": "late"})  # a late event expires with the session
            assert 0 < client.pttl(keys[3]) <= 100_000

    run(body())


def test_expired_finished_sessions_disappear_and_leave_the_tenant_index(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix, finished_ttl_s=1) as store:
            sid, token = await _claimed(store, tenant="t-expire")
            await store.finish(sid, make_step(sid, 0, kind="error"), OWNER, token, status="failed", error="boom")
            assert [s.status for s in await store.list_sessions("t-expire")] == ["failed"]
            await asyncio.sleep(1.3)
            with pytest.raises(SessionNotFound):
                await store.state(sid)
            assert await store.list_sessions("t-expire") == []
            index = redis.Redis.from_url(redis_url, decode_responses=True)
            assert index.zscore(f"{key_prefix}:tenant:t-expire:sessions", sid) is not None
            other, other_token = await _claimed(store, tenant="t-expire")  # the next finish prunes the index
            await store.finish(other, make_step(other, 0, kind="final"), OWNER, other_token, final_answer="ok")
            assert index.zscore(f"{key_prefix}:tenant:t-expire:sessions", sid) is None
            assert index.zscore(f"{key_prefix}:tenant:t-expire:sessions", other) is not None

    run(body())


def test_tool_intent_and_result_records_keep_the_first_write(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            key = f"{sid}:0:0"
            assert await store.tool_record(sid, key) is None
            with pytest.raises(ValueError, match="no tool intent"):
                await store.record_tool_result(sid, key, {"value": 2}, OWNER, token)
            intent = await store.record_tool_intent(sid, key, "calculator", {"expression": "1+1"}, OWNER, token)
            again = await store.record_tool_intent(sid, key, "calculator", {"expression": "9+9"}, OWNER, token)
            assert intent == again == {"tool": "calculator", "arguments": {"expression": "1+1"}}
            assert await store.tool_record(sid, key) == {"intent": intent, "result": None}  # re-run on resume
            assert await store.record_tool_result(sid, key, {"value": 2}, OWNER, token) == {"value": 2}
            assert await store.record_tool_result(sid, key, {"value": 3}, OWNER, token) == {"value": 2}
            assert await store.tool_record(sid, key) == {"intent": intent, "result": {"value": 2}}
            with pytest.raises(LeaseLost):
                await store.record_tool_intent(sid, f"{sid}:0:1", "calculator", {}, OWNER, token + 1)
            with pytest.raises(LeaseLost):
                await store.record_tool_result(sid, key, {"value": 4}, "intruder", token)
            assert (await store.tool_record(sid, key))["result"] == {"value": 2}

    run(body())


def test_events_carry_ids_that_resume_the_stream(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            ids = [await store.emit(sid, "model_tokens", {"text": f"tok{i}"}) for i in range(6)]
            events = await store.events(sid)
            assert [e[0] for e in events] == ids
            assert [(e[1], e[2]) for e in events] == [("model_tokens", {"text": f"tok{i}"}) for i in range(6)]
            assert [e[0] for e in await store.events(sid, after_id=ids[2])] == ids[3:]  # SSE Last-Event-ID
            assert [e[0] for e in await store.events(sid, after_id=ids[0], count=2)] == ids[1:3]
            assert await store.events(sid, after_id=ids[-1], block_ms=20) == []

            waiter = asyncio.create_task(store.events(sid, after_id=ids[-1], block_ms=30_000))
            await asyncio.sleep(0.05)
            new_id = await store.emit(sid, "tool_call", {"name": "calculator"})
            assert await waiter == [(new_id, "tool_call", {"name": "calculator"})]
            with pytest.raises(SessionNotFound):
                await store.emit("no-such-session", "final", {})

    run(body())


def test_event_retention_is_bounded(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix, event_maxlen=10) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            ids = [await store.emit(sid, "model_tokens", {"i": i}) for i in range(400)]
            length = redis.Redis.from_url(redis_url).xlen(f"{key_prefix}:session:{sid}:events")
            # MAXLEN ~ trims whole stream nodes (at most 100 entries each), keeping at least maxlen
            assert 10 <= length <= 10 + 100
            kept = [e[0] for e in await store.events(sid, count=1000)]
            assert kept == ids[-length:]

    run(body())


def test_create_is_idempotent_by_session_id(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            first = await store.create("acme", "helper", "task", session_id="fixed-id")
            second = await store.create("acme", "helper", "task", session_id="fixed-id")
            assert first == second
            assert [s.session_id for s in await store.list_sessions("acme")] == ["fixed-id"]
            with pytest.raises(ValueError, match="already belongs"):
                await store.create("other-tenant", "helper", "task", session_id="fixed-id")

    run(body())


def test_listings_filter_by_tenant_and_status_and_runnable_means_no_live_lease(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            a = (await store.create("t1", "helper", "a")).session_id
            b = (await store.create("t1", "helper", "b")).session_id
            c = (await store.create("t2", "helper", "c")).session_id
            assert [s.session_id for s in await store.list_sessions("t1")] == [b, a]  # newest first
            assert [s.session_id for s in await store.list_sessions("t1", limit=1)] == [b]
            assert set(await store.runnable_sessions()) == {a, b, c}
            token = (await store.claim(a, OWNER, LEASE_MS)).fencing_token
            short = (await store.claim(b, OWNER, 50)).fencing_token
            await asyncio.sleep(0.2)  # b's lease expires: its owner died
            assert set(await store.runnable_sessions()) == {b, c}
            assert [s.session_id for s in await store.list_sessions("t1", status="running")] == [b, a]
            await store.finish(a, make_step(a, 0, kind="final"), OWNER, token, final_answer="done")
            assert [s.session_id for s in await store.list_sessions("t1", status="completed")] == [a]
            assert set(await store.runnable_sessions()) == {b, c}
            await store.release(b, OWNER, short)
            assert [s.session_id for s in await store.list_sessions("t2")] == [c]

    run(body())


def test_unknown_sessions_raise_session_not_found(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            for call in (store.state("missing"), store.load("missing"), store.claim("missing", OWNER, 10),
                         store.heartbeat("missing", OWNER, 1, 10),
                         store.append_step("missing", make_step("missing", 0), OWNER, 1)):
                with pytest.raises(SessionNotFound):
                    await call

    run(body())


def test_bad_arguments_are_rejected_by_name(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid, token = await _claimed(store)
            cases = [
                (store.create("acme", "helper", "t", session_id="has space"), ValueError, "session_id"),
                (store.create("", "helper", "t"), ValueError, "tenant"),
                (store.create("acme", "helper", 5), TypeError, "task"),
                (store.claim(sid, OWNER, 0), ValueError, "lease_ms"),
                (store.heartbeat(sid, OWNER, -1, 10), ValueError, "fencing_token"),
                (store.append_step(sid, make_step("other", 0), OWNER, token), ValueError, "step_id"),
                (store.append_step(sid, {"index": 0}, OWNER, token), TypeError, "step"),
                (store.record_tool_intent(sid, "", "calculator", {}, OWNER, token), ValueError, "idempotency_key"),
                (store.record_tool_intent(sid, "k", "calculator", [1], OWNER, token), TypeError, "arguments"),
                (store.emit(sid, "tool_result", {"x": object()}), TypeError, "data"),
                (store.events(sid, block_ms=-5), ValueError, "block_ms"),
                (store.finish(sid, make_step(sid, 0), OWNER, token, status="running"), ValueError, "status"),
            ]
            for call, error, name in cases:
                with pytest.raises(error, match=name):
                    await call
            assert (await store.state(sid)).step_count == 0
        with pytest.raises(ValueError, match="step_id"):
            Step(step_id="s:3", index=4, kind="action", started_ms=0, committed_ms=0)
        with pytest.raises(ValueError, match="event_maxlen"):
            SessionStore(redis_url, event_maxlen=0)

    run(body())


def test_lease_expiry_is_counted_on_the_servers_clock(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            client = redis.Redis.from_url(redis_url)
            before = client.time()
            state = await store.claim(sid, OWNER, 5_000)
            after = client.time()
            to_ms = lambda t: t[0] * 1000 + t[1] // 1000
            assert to_ms(before) + 5_000 <= state.lease_expires_ms <= to_ms(after) + 5_000

    run(body())

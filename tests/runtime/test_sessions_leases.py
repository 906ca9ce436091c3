"""Leases and fencing on a real Redis: one orchestrator runs a session at a time, and an owner that lost its
lease (stalled, expired, superseded) can never write again with its old fencing token."""

from __future__ import annotations

import asyncio
import random

import pytest

from runtime.sessions import LeaseLost, SessionStore

LONG_MS = 60_000
SHORT_MS = 100
PAST_SHORT_S = 0.25  # sleeping this long guarantees a SHORT_MS lease has expired


def run(coro):
    return asyncio.run(coro)


def test_two_orchestrators_racing_for_one_session_one_wins(redis_url, key_prefix, make_step):
    async def body():
        stores = [SessionStore(redis_url, key_prefix=key_prefix) for _ in range(2)]
        try:
            for round_ in range(10):
                sid = (await stores[0].create("acme", "helper", f"race {round_}")).session_id
                owners = ["A", "B"]
                results = await asyncio.gather(*[s.claim(sid, o, LONG_MS) for s, o in zip(stores, owners)],
                                               return_exceptions=True)
                winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
                assert len(winners) == 1, results
                assert all(isinstance(r, LeaseLost) for i, r in enumerate(results) if i not in winners)
                win, lose = winners[0], 1 - winners[0]
                token = results[win].fencing_token
                assert token == 1 and results[win].lease_owner == owners[win]
                # the loser's commit is rejected, even if it guesses the winner's token
                with pytest.raises(LeaseLost):
                    await stores[lose].append_step(sid, make_step(sid, 0), owners[lose], token)
                assert await stores[win].append_step(sid, make_step(sid, 0), owners[win], token)
                state, steps = await stores[win].load(sid)
                assert state.step_count == 1 and len(steps) == 1
        finally:
            for store in stores:
                await store.close()

    run(body())


def test_stale_owner_is_fenced_off_after_its_lease_moves_on_twice(redis_url, key_prefix, make_step):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            a = await store.claim(sid, "A", SHORT_MS)
            await store.append_step(sid, make_step(sid, 0, text="by A"), "A", a.fencing_token)
            await asyncio.sleep(PAST_SHORT_S)  # A stalls past its lease
            with pytest.raises(LeaseLost):  # even with nobody else holding it: expired is lost
                await store.append_step(sid, make_step(sid, 1, text="by A"), "A", a.fencing_token)
            b = await store.claim(sid, "B", SHORT_MS)
            assert b.fencing_token == a.fencing_token + 1
            await store.append_step(sid, make_step(sid, 1, text="by B"), "B", b.fencing_token)
            # A wakes up: its late commit of index 1 is LeaseLost, not an idempotent no-op
            with pytest.raises(LeaseLost, match="stale fencing token"):
                await store.append_step(sid, make_step(sid, 1, text="by A"), "A", a.fencing_token)
            await asyncio.sleep(PAST_SHORT_S)  # B stalls too
            c = await store.claim(sid, "C", LONG_MS)
            assert c.fencing_token == b.fencing_token + 1
            for owner, token in (("A", a.fencing_token), ("B", b.fencing_token)):
                for index in (1, 2):
                    with pytest.raises(LeaseLost):
                        await store.append_step(sid, make_step(sid, index, text=f"by {owner}"), owner, token)
                with pytest.raises(LeaseLost):
                    await store.heartbeat(sid, owner, token, LONG_MS)
                with pytest.raises(LeaseLost):
                    await store.record_tool_intent(sid, f"{sid}:2:0", "calculator", {}, owner, token)
            # the same owner name with a stale token is still stale
            with pytest.raises(LeaseLost):
                await store.append_step(sid, make_step(sid, 2, text="by C"), "C", b.fencing_token)
            assert await store.append_step(sid, make_step(sid, 2, text="by C"), "C", c.fencing_token)
            state, steps = await store.load(sid)
            assert [s.model_output.rsplit(" ", 1)[-1] for s in steps] == ["A", "B", "C"]
            assert (state.lease_owner, state.fencing_token, state.step_count) == ("C", c.fencing_token, 3)

    run(body())


def test_heartbeat_extends_a_live_lease_and_fails_once_it_expired(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            first = await store.claim(sid, "A", 1_000)
            extended = await store.heartbeat(sid, "A", first.fencing_token, LONG_MS)
            assert extended >= first.lease_expires_ms + LONG_MS - 1_000
            assert (await store.state(sid)).lease_expires_ms == extended
            with pytest.raises(LeaseLost):
                await store.claim(sid, "B", LONG_MS)  # still held thanks to the heartbeat
            again = await store.claim(sid, "A", SHORT_MS)  # re-claim of our live lease keeps the token
            assert again.fencing_token == first.fencing_token
            await asyncio.sleep(PAST_SHORT_S)
            with pytest.raises(LeaseLost, match="expired"):
                await store.heartbeat(sid, "A", first.fencing_token, LONG_MS)
            renewed = await store.claim(sid, "A", LONG_MS)  # after expiry: a new acquisition, a new token
            assert renewed.fencing_token == first.fencing_token + 1

    run(body())


def test_release_frees_the_session_and_a_non_holder_cannot_release(redis_url, key_prefix):
    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "t")).session_id
            a = await store.claim(sid, "A", LONG_MS)
            await store.release(sid, "B", a.fencing_token)  # not B's: no-op
            await store.release(sid, "A", a.fencing_token - 1)  # stale token: no-op
            assert (await store.state(sid)).lease_owner == "A"
            assert sid not in await store.runnable_sessions()
            await store.release(sid, "A", a.fencing_token)
            assert sid in await store.runnable_sessions()
            b = await store.claim(sid, "B", LONG_MS)
            assert (b.lease_owner, b.fencing_token) == ("B", a.fencing_token + 1)

    run(body())


def test_contending_workers_with_expiring_leases_write_a_gap_free_log_in_token_order(redis_url, key_prefix,
                                                                                     make_step):
    """Three workers keep grabbing one session with 30 ms leases and stall at random; whatever interleaving
    happens, each index is written exactly once and tokens never go backwards along the log."""
    total = 40

    async def worker(name: str, store: SessionStore, sid: str, rng: random.Random, written: list):
        while True:
            try:
                state = await store.claim(sid, name, 30)
            except LeaseLost:
                await asyncio.sleep(rng.uniform(0, 0.01))
                continue
            if state.step_count >= total:
                return
            try:
                for index in range(state.step_count, total):
                    step = make_step(sid, index, text=f"{name}/{state.fencing_token}")
                    if await store.append_step(sid, step, name, state.fencing_token):
                        written.append((index, name, state.fencing_token))
                    await asyncio.sleep(rng.choice([0, 0, 0.001, 0.04]))  # sometimes stall past the lease
            except LeaseLost:
                continue

    async def body():
        stores = [SessionStore(redis_url, key_prefix=key_prefix) for _ in range(3)]
        try:
            sid = (await stores[0].create("acme", "helper", "t")).session_id
            written: list = []
            rng = random.Random(7)
            await asyncio.gather(*[worker(f"w{i}", s, sid, random.Random(rng.random()), written)
                                   for i, s in enumerate(stores)])
            state, steps = await stores[0].load(sid)
        finally:
            for store in stores:
                await store.close()
        assert state.step_count == total and [s.index for s in steps] == list(range(total))
        assert sorted(index for index, _, _ in written) == list(range(total))  # each index won once
        tokens = [int(s.model_output.rsplit("/", 1)[-1]) for s in steps]
        assert tokens == sorted(tokens) and len(set(tokens)) > 1  # the lease really moved
        assert {(i, n, t) for i, n, t in written} == {
            (s.index, s.model_output.rsplit(" ", 1)[-1].split("/")[0], t) for s, t in zip(steps, tokens)}

    run(body())

"""Exactly-once external effects when a tool honours its idempotency key (issue 17, item 8): `SqlEffects`
commits an effect and its key in one transaction, on SQLite and PostgreSQL. A call re-run after its process
died (the documented at-least-once corner) credits an account twice without the key and once with it.
Balances are read back with plain SQL, independent of the helper."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from runtime.tools import SqlEffects, ToolContext, ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator

POSTGRES_URL = os.environ.get("ENGRAM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine with an `accounts` table (account 'acme' at 0 cents): a SQLite file, or a schema of its own
    on the test PostgreSQL server (skipped when unreachable), dropped afterwards."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'effects.sqlite3'}")
        schema = None
    else:
        schema = f"effects_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        except OperationalError as exc:
            admin.dispose()
            pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}: {exc.orig}")
        engine = create_engine(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (id VARCHAR(64) PRIMARY KEY, cents BIGINT NOT NULL)"))
        conn.execute(text("INSERT INTO accounts VALUES ('acme', 0)"))
    yield engine
    engine.dispose()
    if schema is not None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def balance(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT cents FROM accounts WHERE id = 'acme'")).scalar_one()


def credit_tool(effects: SqlEffects):
    """The README's example: a tool that honours its idempotency key."""

    async def credit(account: str, cents: int, idempotency_key: str) -> dict:
        """Credit an account (once per call, even when the call is re-run after a crash)."""

        def effect(conn):
            conn.execute(text("UPDATE accounts SET cents = cents + :c WHERE id = :a"), {"c": cents, "a": account})
            return {"credited": cents}

        return await effects.apply_async(idempotency_key, effect)

    return credit


def naive_credit_tool(engine):
    async def credit(account: str, cents: int) -> dict:
        """Credit an account (ignores its idempotency key)."""
        with engine.begin() as conn:
            conn.execute(text("UPDATE accounts SET cents = cents + :c WHERE id = :a"), {"c": cents, "a": account})
        return {"credited": cents}

    return credit


def test_the_example_tool_applies_its_effect_once_per_key(engine):
    tools = ToolRegistry()
    tools.register_function(credit_tool(SqlEffects(engine)), name="credit")

    async def call_with(key: str) -> dict:
        ctx = ToolContext(tenant="t", agent="a", session_id="s", step_index=0, call_index=0, idempotency_key=key)
        return await tools.call("credit", {"account": "acme", "cents": 250}, ctx)

    first, again, other = asyncio.run(call_with("k1")), asyncio.run(call_with("k1")), asyncio.run(call_with("k2"))
    assert first == again == other == {"credited": 250}
    assert balance(engine) == 500  # k1 once, k2 once


def test_concurrent_calls_with_one_key_apply_once(engine):
    effects = SqlEffects(engine)
    barrier, results, errors = threading.Barrier(4), [], []

    def effect(conn):
        conn.execute(text("UPDATE accounts SET cents = cents + 1 WHERE id = 'acme'"))
        return {"n": 1}

    def worker():
        barrier.wait()
        try:
            results.append(effects.apply("same-key", effect))
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [{"n": 1}] * 4
    assert balance(engine) == 1


def test_a_failed_effect_leaves_neither_its_effect_nor_its_key(engine):
    effects = SqlEffects(engine)

    def failing(conn):
        conn.execute(text("UPDATE accounts SET cents = cents + 7 WHERE id = 'acme'"))
        raise RuntimeError("the effect failed halfway")

    with pytest.raises(RuntimeError):
        effects.apply("k", failing)
    assert balance(engine) == 0 and not effects.applied("k")
    assert effects.apply("k", lambda conn: conn.execute(
        text("UPDATE accounts SET cents = cents + 7 WHERE id = 'acme'")).rowcount) == 1
    assert balance(engine) == 7 and effects.applied("k")


@pytest.mark.parametrize("honours_key", [True, False])
def test_a_call_re_run_after_its_process_died_credits_once_only_with_the_key(engine, redis_url, key_prefix,
                                                                             honours_key):
    tools = ToolRegistry()
    tool = credit_tool(SqlEffects(engine)) if honours_key else naive_credit_tool(engine)
    tools.register_function(tool, name="credit")
    action = call("credit", account="acme", cents=100)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, ScriptModel([action, FINAL]), tools, agent(["credit"]))
        store, sid = orch.store, (await orch.submit("t", "worker", "credit acme")).session_id
        # a first process chose the action, recorded the call's intent, ran it ... and died before its result
        dead = await store.claim(sid, "dead-process", 100)
        await store.record_tool_intent(sid, f"{sid}:0:action", "__action__", action, "dead-process",
                                       dead.fencing_token)
        await store.record_tool_intent(sid, f"{sid}:0:0", "credit", action["calls"][0]["arguments"],
                                       "dead-process", dead.fencing_token)
        ctx = ToolContext(tenant="t", agent="worker", session_id=sid, step_index=0, call_index=0)
        await tools.call("credit", action["calls"][0]["arguments"], ctx)
        await asyncio.sleep(0.25)  # its lease runs out
        final = await asyncio.wait_for(orch.run_session(sid), 30)  # a resume re-runs the call with its key
        await store.close()
        return final

    assert asyncio.run(scenario()).status == "completed"
    assert balance(engine) == (100 if honours_key else 200)

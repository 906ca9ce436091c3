"""Kill the orchestrator with SIGKILL at random moments: every session still completes, step logs have
no gaps or duplicates, and every memory write happened exactly once (checked in the database)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from runtime.sessions import SessionStore
from tests.runtime.crash_worker import AGENT, CALLS_PER_STEP, TOOL_STEPS, expected_memory_texts

SESSIONS = 32
REPO = Path(__file__).resolve().parents[2]


def _spawn(redis_url: str, prefix: str, database_url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.crash_worker", redis_url, prefix, database_url],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()  # blocks until the orchestrator is built and serving
    assert line.strip() == b"ready", proc.stderr.read().decode()[-2000:]
    return proc


async def _statuses(store: SessionStore, ids: list[str]) -> dict[str, str]:
    return {sid: (await store.state(sid)).status for sid in ids}


def test_sigkilled_orchestrator_loses_and_repeats_nothing(tmp_path, redis_url, key_prefix):
    prefix = key_prefix
    database_url = f"sqlite:///{tmp_path / 'memory.sqlite3'}"
    rng = random.Random(7)

    async def scenario():
        store = SessionStore(redis_url, key_prefix=prefix)
        ids = []
        for j in range(SESSIONS):
            state = await store.create("acme", AGENT.name, f"task-{j}", session_id=f"s{j:02d}")
            ids.append(state.session_id)
        kills, interrupted, deadline = 0, 0, time.monotonic() + 240
        while True:
            proc = _spawn(redis_url, prefix, database_url)
            if kills < 6:
                await asyncio.sleep(rng.uniform(0.05, 0.4))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                statuses = await _statuses(store, ids)
                interrupted += any(s != "completed" for s in statuses.values())
                continue
            # last run: no more kills; wait for everything to finish
            while time.monotonic() < deadline:
                statuses = await _statuses(store, ids)
                if all(s == "completed" for s in statuses.values()):
                    break
                if proc.poll() is not None:
                    raise AssertionError(f"orchestrator exited: {proc.stderr.read().decode()[-2000:]}")
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        assert kills == 6 and interrupted >= 3  # most kills landed while sessions were mid-run
        statuses = await _statuses(store, ids)
        assert all(s == "completed" for s in statuses.values()), statuses
        logs = {}
        for sid in ids:
            state, steps = await store.load(sid)
            indices = [s.index for s in steps]
            assert indices == list(range(len(steps))), (sid, indices)  # gap-free, no duplicates
            assert [s.kind for s in steps] == ["action"] * TOOL_STEPS + ["final"], sid
            assert len({s.step_id for s in steps}) == len(steps)
            logs[sid] = (state, steps)
        await store.close()
        return logs

    logs = asyncio.run(scenario())
    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT text, idempotency_key, kind FROM memories")).all()
    facts = [r for r in rows if r.kind == "fact"]
    episodes = [r for r in rows if r.kind == "episode"]
    expected = sorted(t for j in range(SESSIONS) for t in expected_memory_texts(f"task-{j}"))
    assert sorted(r.text for r in facts) == expected  # each write exactly once: none lost, none doubled
    assert len({r.idempotency_key for r in facts}) == SESSIONS * TOOL_STEPS * CALLS_PER_STEP
    assert len(episodes) == SESSIONS  # one end-of-session summary each
    # every logged memory_write observation points at the row that holds it
    keys = {r.idempotency_key for r in facts}
    for _sid, (_state, steps) in logs.items():
        for step in steps[:TOOL_STEPS]:
            for obs in step.observations:
                assert obs["idempotency_key"] in keys and "result" in obs

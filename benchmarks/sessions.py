"""Durable sessions: checkpoint commit latency, resume latency after an orchestrator died, the store's work
per agent step, and checkpoint bytes per step against a full-state snapshot per step (the LangGraph
pattern: every checkpoint holds the whole history again).

Runs against a private redis-server it starts (AOF on, `appendfsync everysec`, over loopback TCP), or
`--redis-url` (keys under a unique prefix, deleted afterwards). Orchestrator overhead excluding model
time belongs to the orchestrator's own benchmark; here "store work per step" is the Redis part of it. A
long session run through the Orchestrator with an instant model gives its work per step at steps 10, 100
and 400 (flat when the prompt is built incrementally) and the bytes the whole session takes in Redis
against its payload.

    python benchmarks/sessions.py [--quick] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import redis  # noqa: E402

from runtime.redis_server import RedisServer  # noqa: E402
from runtime.sessions import SessionStore, Step, step_id_for  # noqa: E402

LANGGRAPH_SQLITE_PUT_MS = 2.27  # LangGraph SqliteSaver put, third-party measurement (PEERS.md)
LANGGRAPH_SQLITE_GET_MS = 0.104
TARGET_COMMIT_P50_MS = 1.0
OWNER = "bench-orchestrator"
LONG_STEPS, LONG_AT = 410, (10, 100, 400)  # the long session, and the steps whose cost is reported


def agent_step(session_id: str, index: int, rng: random.Random) -> Step:
    """A step shaped like a real one: one tool call, its observation, three retrieved memories (~1 KB)."""
    words = ["memory", "tool", "answer", "user", "search", "result", "value", "context", "agent", "note"]
    text = " ".join(rng.choice(words) for _ in range(60))
    call = {"name": "memory_search", "arguments": {"query": text[:60], "k": 3}}
    return Step(step_id=step_id_for(session_id, index), index=index, kind="action",
                model_output=f'{{"type":"tool_calls","calls":[{{"name":"memory_search","query":"{text[:60]}"}}]}}',
                action={"type": "tool_calls", "calls": [call]},
                observations=[{"call_index": 0, "tool": "memory_search", "arguments": call["arguments"],
                               "result": {"hits": [text[i * 80:(i + 1) * 80] for i in range(3)]},
                               "idempotency_key": f"{session_id}:{index}:0"}],
                retrieved_memories=[{"id": uuid.uuid4().hex, "score": round(rng.random(), 4)} for _ in range(3)],
                usage={"prompt_tokens": 900 + 40 * index, "completion_tokens": 30, "cached_tokens": 850 + 40 * index},
                started_ms=int(time.time() * 1000), committed_ms=int(time.time() * 1000))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def new_running_session(store: SessionStore, steps: int, rng: random.Random) -> tuple[str, int]:
    sid = (await store.create("bench", "agent", "benchmark task")).session_id
    token = (await store.claim(sid, OWNER, 600_000)).fencing_token
    for index in range(steps):
        await store.append_step(sid, agent_step(sid, index, rng), OWNER, token)
    return sid, token


async def commit_latencies(store: SessionStore, commits: int, rng: random.Random) -> list[float]:
    """Seconds per append_step on one session (lease check + RPUSH + state + event, one Lua script)."""
    sid, token = await new_running_session(store, 0, rng)
    steps = [agent_step(sid, i, rng) for i in range(commits)]
    samples = []
    for step in steps:
        start = time.perf_counter()
        await store.append_step(sid, step, OWNER, token)
        samples.append(time.perf_counter() - start)
    return samples


async def resume_latencies(store: SessionStore, sessions: int, steps: int, rng: random.Random):
    """Per session of `steps` steps whose owner died (lease lapsed): seconds for claim + load, and load."""
    dead = []
    for _ in range(sessions):
        sid, token = await new_running_session(store, steps, rng)
        await store.heartbeat(sid, OWNER, token, 1)  # the owner's last heartbeat, then it was killed
        dead.append(sid)
    await asyncio.sleep(0.01)
    resume, load = [], []
    for sid in dead:
        start = time.perf_counter()
        await store.claim(sid, "bench-replica-2", 60_000)
        _, loaded = await store.load(sid)
        resume.append(time.perf_counter() - start)
        assert len(loaded) == steps
        start = time.perf_counter()
        await store.load(sid)
        load.append(time.perf_counter() - start)
    return resume, load


async def store_work_per_step(store: SessionStore, steps: int, rng: random.Random) -> list[float]:
    """Seconds of Redis work an orchestrator does per step besides the model: heartbeat, tool intent and
    result, three events (step_started, tool_call, tool_result), commit."""
    sid, token = await new_running_session(store, 0, rng)
    samples = []
    for index in range(steps):
        step = agent_step(sid, index, rng)
        key = f"{sid}:{index}:0"
        start = time.perf_counter()
        await store.heartbeat(sid, OWNER, token, 60_000)
        await store.emit(sid, "step_started", {"index": index})
        await store.record_tool_intent(sid, key, "memory_search", {"query": "q"}, OWNER, token)
        await store.emit(sid, "tool_call", {"index": index, "tool": "memory_search"})
        await store.record_tool_result(sid, key, step.observations[0]["result"], OWNER, token)
        await store.emit(sid, "tool_result", {"index": index})
        await store.append_step(sid, step, OWNER, token)
        samples.append(time.perf_counter() - start)
    return samples


async def bytes_per_step(store: SessionStore, client: redis.Redis, prefix: str, steps: int,
                         rng: random.Random) -> tuple[float, float, float]:
    """(ours, snapshot-per-step average, snapshot at the last step) in bytes per step, measured in Redis."""
    sid, token = await new_running_session(store, 0, rng)
    before = await store.bytes_used(sid)
    history = []
    for index in range(steps):
        step = agent_step(sid, index, rng)
        await store.append_step(sid, step, OWNER, token)
        history.append(step.model_dump_json())
    ours = (await store.bytes_used(sid) - before) / steps
    snapshot_sizes = []
    for n in range(1, steps + 1):  # a checkpoint per step, each holding the whole history so far
        key = f"{prefix}:snapshot:{n}"
        client.set(key, "[" + ",".join(history[:n]) + "]")
        snapshot_sizes.append(client.memory_usage(key, samples=0))
    return ours, statistics.mean(snapshot_sizes), float(snapshot_sizes[-1])


class _InstantModel:
    """A model that answers immediately (two calculator steps, then a final answer), so the timing below
    is the orchestrator's own work per step: prompt building, parsing, tool dispatch and the Redis I/O."""

    context_window = 1_000_000

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None):
        from runtime.model_client import ModelReply

        done = sum(1 for m in messages if m["role"] == "assistant")
        action = ({"type": "tool_calls", "calls": [{"name": "calculator", "arguments": {"expression": "6*7"}}]}
                  if done < 2 else {"type": "final", "answer": "42"})
        text = json.dumps(action)
        if on_delta is not None:
            await on_delta(text)
        return ModelReply(text, "stop", {})

    def count_tokens(self, messages) -> int:
        return sum(len(str(m.get("content", ""))) for m in messages) // 4


async def orchestrator_overhead(store: SessionStore, sessions: int) -> list[float]:
    """Seconds per step of real Orchestrator runs with an instant model (no memory service)."""
    from runtime.agents import AgentDefinition
    from runtime.orchestrator import Orchestrator
    from runtime.tools import ToolRegistry, builtin_tools

    tools = ToolRegistry()
    for tool in builtin_tools():
        tools.register(tool)
    agent = AgentDefinition(name="bench", instructions="Compute.", tools=["calculator"])
    orchestrator = Orchestrator(store, _InstantModel(), tools, {"bench": agent})
    samples = []
    for i in range(sessions):
        state = await orchestrator.submit("bench", "bench", f"compute {i}")
        start = time.perf_counter()
        final = await orchestrator.run_session(state.session_id)
        samples.append((time.perf_counter() - start) / final.step_count)
    return samples


class _LongSessionModel:
    """An instant model for one long session: `steps` calculator steps, then a final answer. Its own work is
    O(1) per call (the step number, not the transcript), so the gaps between its calls are the orchestrator's
    work per step: prompt building, parsing, the tool, the Redis I/O and the commit."""

    context_window = 100_000_000

    def __init__(self, steps: int, calls: list[dict]):
        self.steps, self.calls, self.asked = steps, calls, []

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None):
        from runtime.model_client import ModelReply

        self.asked.append(time.perf_counter())
        action = ({"type": "tool_calls", "calls": self.calls}
                  if len(self.asked) <= self.steps else {"type": "final", "answer": "42"})
        return ModelReply(json.dumps(action), "stop", {})

    def count_tokens(self, messages) -> int:
        return sum(len(str(m.get("content") or "")) for m in messages) // 4


CALCULATOR_CALL = {"name": "calculator", "arguments": {"expression": "6*7"}}


async def long_session(store: SessionStore, steps: int, at: tuple[int, ...],
                       result_bytes: int | None = None) -> tuple[dict[int, float], int, int]:
    """One `steps`-step session through the Orchestrator: ({step: median ms per step over the 10 steps around
    it}, bytes the session takes in Redis, bytes of its payload: each step's model output and tool results).
    Each step calls the calculator, or with `result_bytes` a tool whose result is that long."""
    from runtime.agents import AgentDefinition, AgentLimits
    from runtime.orchestrator import Orchestrator
    from runtime.tools import ToolRegistry, builtin_tools

    tools, call = ToolRegistry(builtin_tools()), CALCULATOR_CALL
    if result_bytes is not None:
        async def padded(n: int) -> str:
            """A result of a fixed size."""
            return "y" * n

        tools.register_function(padded)
        call = {"name": "padded", "arguments": {"n": result_bytes}}
    agent = AgentDefinition(name="long", instructions="Compute.", tools=[call["name"]],
                            limits=AgentLimits(max_steps=steps + 10, max_wall_time_s=3600,
                                               max_tool_result_chars=100_000))
    model = _LongSessionModel(steps, [call])
    orchestrator = Orchestrator(store, model, tools, {"long": agent})
    state = await orchestrator.submit("bench", "long", "compute for a long time")
    await orchestrator.run_session(state.session_id)
    gaps = [(b - a) * 1e3 for a, b in zip(model.asked, model.asked[1:])]  # gaps[i]: step i's own work
    per_step = {n: statistics.median(gaps[max(0, n - 5):n + 5]) for n in at}
    _, logged = await store.load(state.session_id)
    payload = sum(len((s.model_output or "").encode()) + len(json.dumps(
        [o.get("result", o.get("error")) for o in s.observations], ensure_ascii=False).encode()) for s in logged)
    return per_step, await store.bytes_used(state.session_id), payload


async def payload_copies(store: SessionStore, steps: int = 100, sizes: tuple[int, int] = (100, 4100),
                         ) -> tuple[float, float]:
    """(bytes Redis holds per payload byte, fixed bytes per step), from two sessions through the orchestrator
    that differ only in the size of every tool result: the slope is how many times a payload is stored."""
    (_, small, small_payload), (_, big, big_payload) = [await long_session(store, steps, (), size) for size in sizes]
    copies = (big - small) / (big_payload - small_payload)
    return copies, (small - copies * small_payload) / steps


def machine_facts(client: redis.Redis, where: str) -> str:
    info = client.info("server")
    fsync = client.config_get("appendfsync").get("appendfsync", "?")
    aof = client.config_get("appendonly").get("appendonly", "?")
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"redis {info['redis_version']} ({where}), appendonly {aof}, appendfsync {fsync}, loopback TCP")


async def measure(url: str, prefix: str, quick: bool) -> list[tuple[str, str, str, str]]:
    rng = random.Random(0)
    commits, sessions, work_steps, byte_steps = (300, 20, 100, 50) if quick else (3000, 100, 500, 200)
    client = redis.Redis.from_url(url)
    async with SessionStore(url, key_prefix=prefix) as store:
        await commit_latencies(store, 50, rng)  # warm-up: scripts loaded, connection open
        commit = [s * 1e3 for s in await commit_latencies(store, commits, rng)]
        resume, load = await resume_latencies(store, sessions, 50, rng)
        work = [s * 1e3 for s in await store_work_per_step(store, work_steps, rng)]
        ours, snapshot_mean, snapshot_last = await bytes_per_step(store, client, prefix, byte_steps, rng)
        overhead = [x * 1e3 for x in await orchestrator_overhead(store, 20 if quick else 100)]
        per_step, session_bytes, payload = await long_session(store, LONG_STEPS, LONG_AT)
        copies, fixed_per_step = await payload_copies(store)
    p50, load_p50 = statistics.median(commit), statistics.median(load) * 1e3
    target = "target met" if p50 < TARGET_COMMIT_P50_MS else "TARGET MISSED"
    return [
        ("checkpoint commit p50 (append_step)", f"{p50:.3f} ms",
         f"LangGraph SqliteSaver put {LANGGRAPH_SQLITE_PUT_MS} ms; target < {TARGET_COMMIT_P50_MS} ms",
         f"{LANGGRAPH_SQLITE_PUT_MS / p50:.1f}x faster; {target}"),
        ("checkpoint commit p99", f"{percentile(commit, 0.99):.3f} ms", "", ""),
        ("resume after kill p50 (claim + load 50 steps)", f"{statistics.median(resume) * 1e3:.3f} ms", "", ""),
        ("resume after kill p99", f"{percentile(resume, 0.99) * 1e3:.3f} ms", "", ""),
        ("load of a 50-step session p50", f"{load_p50:.3f} ms",
         f"LangGraph SqliteSaver get {LANGGRAPH_SQLITE_GET_MS} ms (one checkpoint)",
         f"{load_p50 / LANGGRAPH_SQLITE_GET_MS:.1f}x slower (reads and validates 50 steps)"),
        ("store work per step p50 (heartbeat, tool intent+result, 3 events, commit)",
         f"{statistics.median(work):.3f} ms", "", ""),
        ("orchestrator overhead per step p50 (instant model, calculator tool)",
         f"{statistics.median(overhead):.3f} ms", "excludes model time", ""),
        (f"bytes per step, {byte_steps}-step session (measured)", f"{ours:.0f} B",
         f"snapshot per step: mean {snapshot_mean:.0f} B, at step {byte_steps} {snapshot_last:.0f} B",
         f"{snapshot_mean / ours:.0f}x / {snapshot_last / ours:.0f}x smaller"),
        *[(f"orchestrator work per step around step {n} ({LONG_STEPS}-step session, instant model)",
           f"{per_step[n]:.2f} ms", f"step {LONG_AT[0]}: {per_step[LONG_AT[0]]:.2f} ms; goal <= 1.2x",
           f"{per_step[n] / per_step[LONG_AT[0]]:.2f}x") for n in LONG_AT],
        ("Redis bytes per payload byte (two 100-step sessions, results of 100 B vs 4,100 B)", f"{copies:.2f}",
         f"fixed {fixed_per_step:.0f} B per step (ids, timestamps, events)", "goal: each payload once"),
        (f"bytes per session, {LONG_STEPS} steps through the orchestrator (step log, tool records, events)",
         f"{session_bytes / 1e3:.0f} kB",
         f"payload {payload / 1e3:.0f} kB + fixed {fixed_per_step * LONG_STEPS / 1e3:.0f} kB; goal <= 1.5x",
         f"{session_bytes / (payload + fixed_per_step * LONG_STEPS):.2f}x (payload + fixed); "
         f"{session_bytes / payload:.1f}x payload"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private server")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    server = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.redis_url:
            url, where = args.redis_url, "given URL"
        else:
            server = RedisServer(Path(tmp) / "redis", appendonly=True, appendfsync="everysec")
            server.start()
            url, where = server.url, "private server"
        client = redis.Redis.from_url(url)
        try:
            rows = asyncio.run(measure(url, prefix, args.quick))
            facts = machine_facts(client, where)
        finally:
            if server is not None:
                server.stop(kill=True)
            else:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for start in range(0, len(keys), 500):
                    client.delete(*keys[start:start + 500])
    header = ("figure", "ours", "peer / bound", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(facts)


if __name__ == "__main__":
    main()

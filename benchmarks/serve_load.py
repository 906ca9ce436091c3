"""HTTP API under load: task submissions/s and `POST /v1/tasks` p50/p99, and the latency from opening
`GET /v1/tasks/{id}/events` to the first Server-Sent Event, with 1, 8 and 32 concurrent clients, beside a
bare FastAPI no-op route served by the same app in the same server process in the same run (the
framework's own floor: the same middleware, uvicorn, loopback and client; no auth, no Redis).

The server is a subprocess (this script with `--serve`): `LocalRuntime` on the given Redis (keys under a
unique prefix, deleted afterwards), SQLite memory and the hashing embedder, with the task runner on, and a
stand-in model (`InstantModel`, below: it answers a final action after a fixed, labelled delay, so the
figures are the API's, not inference's). It prints one API key, then serves `create_app(...)` plus the
benchmark-only routes `/bench/*` with uvicorn on 127.0.0.1. The per-key rate limit and stream bound are
raised in that server (one key drives every client; the limiter's own cost is unchanged).

Clients: asyncio, one `httpx.AsyncClient` (one keep-alive connection) per simulated client, each sending
its requests back to back (closed loop). Per concurrency: no-op POSTs (same body and headers as a submit,
parsed into the same `TaskCreate` model); submits (a fresh Idempotency-Key each) with the task runner
paused, the API path alone; submits with the runner on, as served (it executes the submitted tasks in the
same process meanwhile); event streams (submit, open the stream, time to the first event, read on to the
task's final event); event streams of finished tasks (replay: the first event is already stored); after
each phase that submitted, a wait until the runner has drained the queue. Request counts, each phase's time
and each request's time are bounded; the run stops by itself. The server process's CPU time per request
and the other processes' share of the cores during the run are printed too (this box is shared).

    python benchmarks/serve_load.py [--quick] [--redis-url redis://127.0.0.1:6379/0]
    python benchmarks/serve_load.py --ray [--quick]   # the same API through Ray Serve (serve_load_ray.py):
                                                      # Serve's own overhead, and 1/2/4 orchestrator replicas
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import select
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from runtime.resources import TaskCreate  # noqa: E402  (module level: FastAPI resolves the no-op's annotation here)

MODEL_DELAY_S = 0.0  # the stand-in model's fixed latency per call (0: the figures are the API and runner alone)
RUNNER_POLL_S = 0.1  # RuntimeService.start_runner's default poll interval (what LocalRuntime uses)
CONCURRENCY = (1, 8, 32)
OPERATION_TIMEOUT_S = 20.0  # bound on one request or one event stream (a stuck task would stream keep-alives)
TARGET_RATIO = 1.5  # goal: submit p50 <= 1.5x the no-op p50
BODY = {"agent": "assistant", "input": "benchmark task: say hello"}


class InstantModel:
    """Stand-in for the language model (this benchmark measures the API, not inference): after
    MODEL_DELAY_S it answers a final action, so each task is one step."""

    context_window = 100_000

    def __init__(self, delay_s: float = MODEL_DELAY_S):
        self.delay_s = delay_s

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None):
        from runtime.model_client import ModelReply

        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = json.dumps({"type": "final", "answer": "hello"})
        if on_delta is not None:
            await on_delta(text)
        return ModelReply(text, "stop", {"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 0})

    def count_tokens(self, messages) -> int:
        return sum(len(str(m.get("content", ""))) // 4 for m in messages)


# ---- the server (subprocess) ------------------------------------------------------------------------------
def add_bench_routes(app, service) -> None:
    """Benchmark-only routes on the app under test: the no-op floor, and the queue depth for draining."""

    @app.post("/bench/noop")
    async def noop_post(body: TaskCreate) -> dict:
        return {"ok": True}

    @app.post("/bench/runner")
    async def runner(on: bool) -> dict:
        """Pause (cancels nothing here: called with the queue drained) or resume the background task runner."""
        if on:
            service.start_runner()
        else:
            await service.stop_runner()
        return {"on": on}

    @app.get("/bench/queue")
    async def queue() -> dict:
        return {"depth": await service.store.runnable_count(), "active": len(service.orchestrator.active)}


async def serve(port: int, prefix: str, redis_url: str, data_dir: str) -> None:
    import uvicorn

    from runtime.api import create_app
    from runtime.local import LocalRuntime
    from runtime.settings import Settings

    settings = Settings(data_dir=Path(data_dir), redis_url=redis_url, key_prefix=prefix, embedder="hashing",
                        rate_limit_per_s=1e9, rate_limit_burst=10**9, max_streams_per_key=100_000)
    runtime = LocalRuntime(settings, model=InstantModel())
    await runtime.start(run_tasks=True)
    try:
        key = await runtime.service.keys.create("default", name="serve_load benchmark")
        app = create_app(settings, service=runtime.service)
        add_bench_routes(app, runtime.service)
        print(f"KEY {key.key}", flush=True)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                timeout_graceful_shutdown=3)
        await uvicorn.Server(config).serve()
    finally:
        await runtime.close()


# ---- the clients ------------------------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


class Phase:
    """Latency samples (seconds), errors and wall time of one closed-loop phase."""

    def __init__(self):
        self.samples: list[float] = []
        self.extra: list[float] = []  # the event streams' time to the final event
        self.errors: list[str] = []
        self.wall_s = 0.0
        self.cpu_s = 0.0  # the server process's CPU time during the phase

    @property
    def rate(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0

    def ms(self, q: float) -> float:
        return percentile(self.samples, q) * 1e3


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def run_phase(clients, per_client: int, deadline_s: float, one, server_pid: int) -> Phase:
    """Each client calls `one(client, i, phase)` per_client times back to back; stops early at the deadline."""
    phase = Phase()
    stop_at = time.perf_counter() + deadline_s

    async def drive(client, c: int) -> None:
        for i in range(per_client):
            if time.perf_counter() > stop_at:
                return
            try:
                await asyncio.wait_for(one(client, c * per_client + i, phase), OPERATION_TIMEOUT_S)
            except Exception as exc:  # counted, and shown under the table
                phase.errors.append(f"{type(exc).__name__}: {exc}")

    cpu0, start = process_cpu_s(server_pid), time.perf_counter()
    await asyncio.gather(*(drive(client, c) for c, client in enumerate(clients)))
    phase.wall_s, phase.cpu_s = time.perf_counter() - start, process_cpu_s(server_pid) - cpu0
    return phase


class Load:
    def __init__(self, key: str):
        self.auth = {"Authorization": f"Bearer {key}"}
        self.finished: list[str] = []  # task ids whose streams reached the final event
        self.rng = random.Random(0)
        self.done: list[str] = []  # finished tasks whose streams the replay phase opens

    def submit_headers(self) -> dict:
        return {**self.auth, "Idempotency-Key": uuid.uuid4().hex}

    async def noop(self, client, i: int, phase: Phase) -> None:
        start = time.perf_counter()
        response = await client.post("/bench/noop", json=BODY, headers=self.submit_headers())
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"no-op answered {response.status_code}")
        phase.samples.append(elapsed)

    async def submit(self, client, i: int, phase: Phase | None) -> str:
        start = time.perf_counter()
        response = await client.post("/v1/tasks", json=BODY, headers=self.submit_headers())
        elapsed = time.perf_counter() - start
        if response.status_code != 201:
            raise RuntimeError(f"submit answered {response.status_code}: {response.text[:200]}")
        if phase is not None:
            phase.samples.append(elapsed)
        return response.json()["id"]

    async def stream(self, client, task_id: str, phase: Phase) -> None:
        """Open the task's event stream; record the time to its first event and to its terminal event."""
        start = time.perf_counter()
        first = None
        async with client.stream("GET", f"/v1/tasks/{task_id}/events", headers=self.auth) as response:
            if response.status_code != 200:
                raise RuntimeError(f"events answered {response.status_code}")
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    if first is None:
                        first = time.perf_counter() - start
                    if line.split(":", 1)[1].strip() in ("final", "error"):
                        phase.samples.append(first)
                        phase.extra.append(time.perf_counter() - start)
                        self.finished.append(task_id)
                        return
        raise RuntimeError("event stream ended before the task's final event")

    async def fresh_stream(self, client, i: int, phase: Phase) -> None:
        # a random pause first (not timed), so submissions do not fall into step with the runner's polling
        await asyncio.sleep(self.rng.uniform(0, RUNNER_POLL_S))
        await self.stream(client, await self.submit(client, i, None), phase)

    async def replay_stream(self, client, i: int, phase: Phase) -> None:
        await self.stream(client, self.done[i % len(self.done)], phase)


async def wait_drained(client, limit_s: float, row: dict, name: str) -> None:
    """Wait until the server's queue is empty (no pending or running task), at most limit_s; records the
    seconds it took in row[name], and in row["undrained"] what was left when it gave up."""
    start = time.perf_counter()
    while True:
        state = (await client.get("/bench/queue")).json()
        left = state["depth"] + state["active"]
        if left == 0 or time.perf_counter() - start > limit_s:
            break
        await asyncio.sleep(0.1)
    row[name] = time.perf_counter() - start
    if left:
        row.setdefault("undrained", []).append(f"{left} tasks left after {name}")


async def measure(port: int, key: str, server_pid: int, quick: bool) -> list[dict]:
    import httpx

    # requests per phase (split over the clients; paused: submits while the runner is paused) and the bounds on
    # each phase's time and on waiting for the runner to drain the queue
    noops, paused, submits, streams, deadline_s, drain_s = (
        (1000, 300, 300, 32, 8.0, 30.0) if quick else (5000, 2000, 1500, 200, 30.0, 90.0))
    load = Load(key)
    base = f"http://127.0.0.1:{port}"
    results = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as control:
        for n in CONCURRENCY:
            clients = [httpx.AsyncClient(base_url=base, timeout=30,
                                         limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
                       for _ in range(n)]
            try:
                row: dict = {"clients": n}
                warm = Phase()
                for client in clients:  # open each connection; the first requests of a route are slower
                    for i in range(3):
                        await load.noop(client, i, warm)
                        await load.submit(client, i, None)
                await wait_drained(control, drain_s, row, "drain_warmup_s")
                row["noop"] = await run_phase(clients, max(1, noops // n), deadline_s, load.noop, server_pid)
                await control.post("/bench/runner", params={"on": False})  # the API path alone
                row["submit_paused"] = await run_phase(clients, max(1, paused // n), deadline_s, load.submit,
                                                       server_pid)
                await control.post("/bench/runner", params={"on": True})
                await wait_drained(control, drain_s, row, "drain_paused_s")
                row["submit"] = await run_phase(clients, max(1, submits // n), deadline_s, load.submit, server_pid)
                await wait_drained(control, drain_s, row, "drain_after_submit_s")
                load.finished = []
                row["sse"] = await run_phase(clients, max(1, streams // n), deadline_s, load.fresh_stream,
                                             server_pid)
                load.done = list(load.finished) or [await load.submit(clients[0], 0, None)]
                row["replay"] = await run_phase(clients, max(1, streams // n), deadline_s, load.replay_stream,
                                                server_pid)
                await wait_drained(control, drain_s, row, "drain_s")
                results.append(row)
            finally:
                await asyncio.gather(*(client.aclose() for client in clients))
    return results


# ---- the parent: start the server, run the load, clean up ----------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, prefix: str, redis_url: str, data_dir: str, log_path: Path):
    """The server subprocess and its API key (read from its stdout)."""
    log = open(log_path, "wb")
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port), prefix,
                              "--redis-url", redis_url, "--data-dir", data_dir],
                             stdout=subprocess.PIPE, stderr=log, cwd=str(ROOT))
    log.close()
    try:
        return child, _wait_until_serving(child, port, log_path)
    except BaseException:
        stop_server(child)
        raise


def _wait_until_serving(child: subprocess.Popen, port: int, log_path: Path) -> str:
    """The API key the child prints, once its /healthz answers."""
    deadline = time.monotonic() + 120
    key = None
    while key is None:  # the child prints "KEY ..." before it serves, or exits
        if not select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise RuntimeError("server did not print its key within 120 s")
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"server exited ({child.wait()}) before printing its key:\n"
                               f"{log_path.read_text()[-3000:]}")
        if line.startswith(b"KEY "):
            key = line.split()[1].decode()
    import httpx

    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return key
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy (exit {child.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


def stop_server(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()  # uvicorn shuts down, then the runtime closes
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    child.stdout.close()


def delete_keys(redis_url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.close()
    return len(keys)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (Linux /proc/stat: all but idle and iowait), 0 elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_facts(redis_url: str) -> str:
    import fastapi
    import httpx
    import redis
    import starlette
    import uvicorn

    info = redis.Redis.from_url(redis_url).info("server")
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return (f"machine: {platform.machine()}, {os.cpu_count()} cores (client, server and Redis share them), "
            f"Python {platform.python_version()}; uvicorn {uvicorn.__version__} ({loop}, {http}), fastapi "
            f"{fastapi.__version__}, starlette {starlette.__version__}, httpx {httpx.__version__} (client); "
            f"redis {info['redis_version']} over loopback TCP; load average {os.getloadavg()[0]:.1f}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def report(rows: list[dict], quick: bool, facts: str) -> None:
    print(f"HTTP API under load ({'quick' if quick else 'full'}): POST /v1/tasks beside a no-op POST served by the "
          f"same app and process; stand-in model, delay {MODEL_DELAY_S * 1e3:.0f} ms per call (one step per task)")
    header = ("clients", "task runner", "submit/s", "submit p50", "p99", "no-op/s", "no-op p50", "p99",
              "submit/no-op p50", "srv CPU/submit", "srv CPU/no-op", "SSE 1st event p50", "p99", "to final p50",
              "replay 1st p50")
    table = []
    for r in rows:
        noop = r["noop"]
        for runner, submit in (("paused", r["submit_paused"]), ("on", r["submit"])):
            ratio = submit.ms(0.5) / noop.ms(0.5)
            cells = [str(r["clients"]) if runner == "paused" else "", runner, f"{submit.rate:.0f}",
                     f"{submit.ms(0.5):.2f} ms", f"{submit.ms(0.99):.2f} ms"]
            cells += ([f"{noop.rate:.0f}", f"{noop.ms(0.5):.2f} ms", f"{noop.ms(0.99):.2f} ms"] if runner == "paused"
                      else ["", "", ""])
            cells += [f"{ratio:.2f}x {'(met)' if ratio <= TARGET_RATIO else '(MISSED)'}",
                      f"{submit.cpu_s / max(1, len(submit.samples)) * 1e3:.2f} ms",
                      f"{noop.cpu_s / max(1, len(noop.samples)) * 1e3:.2f} ms" if runner == "paused" else ""]
            if runner == "on":
                sse, replay = r["sse"], r["replay"]
                cells += [f"{sse.ms(0.5):.1f} ms", f"{sse.ms(0.99):.1f} ms",
                          f"{percentile(sse.extra, 0.5) * 1e3:.1f} ms", f"{replay.ms(0.5):.2f} ms"]
            else:
                cells += ["-", "-", "-", "-"]
            table.append(tuple(cells))
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    print(f"goal: submit p50 <= {TARGET_RATIO}x the no-op p50, the framework's floor (same app, middleware, uvicorn, "
          "client, loopback; same body parsed into TaskCreate; no auth, no Redis). task runner paused: the API path "
          "alone; on: as served, the runner executing the submitted tasks in the same process meanwhile. srv CPU: "
          "the server process's CPU per request during the phase. SSE 1st event: submit, then open "
          "GET /v1/tasks/{id}/events, until its first event (step_started, emitted when the runner picks the task "
          f"up; the runner polls every {RUNNER_POLL_S * 1e3:.0f} ms; each stream starts after a random pause of "
          f"0-{RUNNER_POLL_S * 1e3:.0f} ms); to final: until its final event; replay: a finished task's stream "
          "(first event already stored)")
    phases = ("noop", "submit_paused", "submit", "sse", "replay")
    for r in rows:
        counts = ", ".join(f"{name} {len(r[name].samples)} in {r[name].wall_s:.1f} s" for name in phases)
        errors = sum(len(r[name].errors) for name in phases)
        first_error = next((e for name in phases for e in r[name].errors), "")
        undrained = f"; NOT DRAINED: {', '.join(r['undrained'])}" if r.get("undrained") else ""
        print(f"{r['clients']:>2} clients: {counts}; queue drained {r['drain_after_submit_s']:.1f} s after the "
              f"runner-on submits; errors {errors}{' (first: ' + first_error + ')' if errors else ''}{undrained}")
    print(facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (about a minute in all)")
    parser.add_argument("--redis-url", default=os.environ.get("ENGRAM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--ray", action="store_true", help="through Ray Serve instead (benchmarks/serve_load_ray.py)")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "PREFIX"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray:  # run as a script of its own, so Ray ships its deployment classes to the replicas by value
        import runpy

        sys.argv = [str(Path(__file__).with_name("serve_load_ray.py")), *(["--quick"] if args.quick else []),
                    "--redis-url", args.redis_url]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), args.serve[1], args.redis_url, args.data_dir))
        return
    prefix = f"bench-serve-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        child = None
        try:
            port = free_port()
            child, key = start_server(port, prefix, args.redis_url, str(Path(tmp) / "data"), Path(tmp) / "server.log")
            busy0, ours0, start = busy_cpu_s(), process_cpu_s(os.getpid()) + process_cpu_s(child.pid), time.time()
            rows = asyncio.run(measure(port, key, child.pid, args.quick))
            wall = time.time() - start
            others = busy_cpu_s() - busy0 - (process_cpu_s(os.getpid()) + process_cpu_s(child.pid) - ours0)
            facts = machine_facts(args.redis_url)
        finally:
            if child is not None:
                stop_server(child)
            delete_keys(args.redis_url, prefix)
    report(rows, args.quick, f"{facts}\nduring the run ({wall:.0f} s): other processes, Redis included, kept "
                             f"{others / wall:.2f} of the {os.cpu_count()} cores busy")


if __name__ == "__main__":
    main()

"""The HTTP API under load through Ray Serve: Serve's own overhead, and task throughput as orchestrator
replicas are added. The Serve half of `serve_load.py` (which measures the one-process server).

1. Overhead: `POST /v1/tasks` served by the real application on Ray Serve (ApiIngress, MemoryServiceDeployment,
   a stand-in model-worker deployment) beside a no-op route on a Serve ingress of its own in the same Serve
   instance (`ServeFloor`: the same body parsed into the same `TaskCreate`, no auth, no Redis), with 1, 8 and
   32 concurrent clients; the no-op is Serve's floor (proxy, routing to a replica, FastAPI in the replica).
2. Scaling: completed tasks/s with 1, 2 and 4 ApiIngress replicas (each runs a task runner bounded by
   `max_concurrent_sessions`; any replica runs any task, sessions shared through Redis), under the same closed
   loop of clients that submit a task, open its event stream and read to the final event. The stand-in
   model answers a final action after a fixed, labelled delay (an asyncio sleep, no CPU), so what scales or
   not is orchestration: submission, leases, step commits, event streams. Reported as a fraction of linear
   (rate with r replicas / (r x the rate with 1)).

Everything runs on one local Ray instance (its GCS on a free port, never Redis's 6379) on this machine, with
the clients in this process: on a machine with few cores the replicas, Serve's proxy, Redis and the clients
share them, which bounds the scaling (the core count and load are printed).

    python benchmarks/serve_load_ray.py [--quick] [--redis-url redis://127.0.0.1:6379/0]
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load as base  # noqa: E402  (client side only: the replicas never import this script's modules)

sys.path.insert(0, str(base.ROOT))
from runtime.resources import TaskCreate  # noqa: E402  (module level: the floor route's annotation)

SCALING_DELAY_S = 0.2  # the stand-in model's fixed latency per call in the scaling runs
SESSIONS_PER_REPLICA = 4  # max_concurrent_sessions of each ApiIngress replica
REPLICAS = (1, 2, 4)
SCALING_CLIENTS = 48  # enough to keep 4 replicas' runners full (4 x 4 sessions) with submissions queued


def floor_deployment():
    """A Serve ingress with only the no-op route (defined here so Ray ships it to the replica by value)."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @app.post("/bench/noop")
    async def noop(body: TaskCreate) -> dict:
        return {"ok": True}

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=200)
    @serve.ingress(app)
    class ServeFloor:
        pass

    return ServeFloor


def delayed_worker_deployment():
    """The model-worker deployment's interface (what ApiIngress calls) over a stand-in model: after a fixed
    delay it answers a final action, so each task is one step."""
    from ray import serve

    class DelayedWorker:
        def __init__(self, tokenizer_dir: str, delay_s: float):
            self.tokenizer_dir, self.delay_s = tokenizer_dir, delay_s

        def info(self) -> dict:
            return {"model_name": "delayed-stand-in", "context_window": 100_000, "model_path": self.tokenizer_dir,
                    "models": {"object": "list", "data": []}}

        async def stream_complete(self, messages, json_schema, max_tokens, seed=None, temperature=0.0):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield {"text": json.dumps({"type": "final", "answer": "hello"})}
            yield {"finish_reason": "stop", "usage": {"prompt_tokens": 10, "completion_tokens": 5,
                                                      "cached_tokens": 0}, "error": None}

        async def check_health(self) -> None:
            return None

    return serve.deployment(DelayedWorker, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)


def start_ray(port: int) -> None:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20, log_to_driver=False, namespace=f"serve-load-{os.getpid()}")
    if int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]) == 6379:
        raise RuntimeError("Ray took Redis's port 6379")
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def deploy_app(replicas: int, delay_s: float, settings: dict, tokenizer_dir: str) -> None:
    """The application (memory service, stand-in worker, ApiIngress x replicas) at route prefix "/"."""
    from ray import serve

    from runtime.serve import ApiIngress, MemoryServiceDeployment

    memory = MemoryServiceDeployment.bind(settings["database_url"], "hashing")
    worker = delayed_worker_deployment().bind(tokenizer_dir, delay_s)
    ingress = ApiIngress.options(num_replicas=replicas).bind(memory, worker, settings)
    serve.run(ingress, name="engram", route_prefix="/")


async def create_key(redis_url: str, prefix: str) -> str:
    import redis.asyncio as aioredis

    from runtime.api_keys import ApiKeyStore

    client = aioredis.Redis.from_url(redis_url)
    try:
        return (await ApiKeyStore(client, key_prefix=prefix).create("default", name="serve_load_ray",
                                                                    admin=True)).key
    finally:
        await client.aclose()


class ServeLoad(base.Load):
    """serve_load's clients, with the no-op on the floor application."""

    async def noop(self, client, i: int, phase: base.Phase) -> None:
        start = time.perf_counter()
        response = await client.post("/floor/bench/noop", json=base.BODY, headers=self.submit_headers())
        if response.status_code != 200:
            raise RuntimeError(f"no-op answered {response.status_code}")
        phase.samples.append(time.perf_counter() - start)


async def with_clients(port: int, n: int, body):
    import httpx

    url = f"http://127.0.0.1:{port}"
    clients = [httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1,
                                                                                max_keepalive_connections=1))
               for _ in range(n)]
    try:
        return await body(clients)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))


async def overhead(port: int, load: ServeLoad, quick: bool) -> list[dict]:
    noops, submits, deadline_s = (300, 300, 8.0) if quick else (2000, 1000, 30.0)
    rows = []
    for n in base.CONCURRENCY:
        async def phases(clients, n=n):
            warm = base.Phase()
            for client in clients:
                for i in range(3):
                    await load.noop(client, i, warm)
                    await load.submit(client, i, None)
            noop = await base.run_phase(clients, max(1, noops // n), deadline_s, load.noop, 0)
            submit = await base.run_phase(clients, max(1, submits // n), deadline_s, load.submit, 0)
            return {"clients": n, "noop": noop, "submit": submit}

        rows.append(await with_clients(port, n, phases))
    return rows


async def throughput(port: int, load: ServeLoad, quick: bool) -> base.Phase:
    """Completed tasks under a closed loop of SCALING_CLIENTS clients (submit, stream to the final event)."""
    duration_s = 10.0 if quick else 30.0

    async def phase(clients):
        for client in clients[:4]:  # open the replicas' routes once
            await load.fresh_stream(client, 0, base.Phase())
        return await base.run_phase(clients, 10**6, duration_s, load.fresh_stream, 0)

    return await with_clients(port, SCALING_CLIENTS, phase)


def report(rows: list[dict], scaling: dict[int, base.Phase], quick: bool, wall: float, busy: float) -> None:
    print(f"HTTP API through Ray Serve ({'quick' if quick else 'full'}); stand-in model, one step per task")
    print("\n1. Serve's own overhead: POST /v1/tasks on the application beside a no-op Serve ingress (same body "
          "parsed into TaskCreate; no auth, no Redis), model delay 0")
    header = ("clients", "no-op/s", "no-op p50", "p99", "submit/s", "submit p50", "p99", "submit/no-op p50")
    table = [(str(r["clients"]), f"{r['noop'].rate:.0f}", f"{r['noop'].ms(0.5):.2f} ms", f"{r['noop'].ms(0.99):.2f} ms",
              f"{r['submit'].rate:.0f}", f"{r['submit'].ms(0.5):.2f} ms", f"{r['submit'].ms(0.99):.2f} ms",
              f"{r['submit'].ms(0.5) / r['noop'].ms(0.5):.2f}x") for r in rows]
    print_table(header, table)
    print(f"\n2. Task throughput by ApiIngress replicas: {SCALING_CLIENTS} clients in a closed loop (submit, stream "
          f"to the final event); stand-in model delay {SCALING_DELAY_S * 1e3:.0f} ms (labelled: not inference); "
          f"max_concurrent_sessions {SESSIONS_PER_REPLICA} per replica, so the model-bound ceiling is "
          f"{SESSIONS_PER_REPLICA / SCALING_DELAY_S:.0f} tasks/s per replica")
    one = scaling[REPLICAS[0]].rate
    header = ("replicas", "tasks/s", "fraction of linear", "ceiling", "to-final p50", "p99", "errors")
    table = [(str(r), f"{p.rate:.1f}", f"{p.rate / (r * one):.2f}" if one else "-",
              f"{r * SESSIONS_PER_REPLICA / SCALING_DELAY_S:.0f}", f"{base.percentile(p.extra, 0.5) * 1e3:.0f} ms",
              f"{base.percentile(p.extra, 0.99) * 1e3:.0f} ms", str(len(p.errors))) for r, p in scaling.items()]
    print_table(header, table)
    errors = [e for r in rows for name in ("noop", "submit") for e in r[name].errors]
    errors += [e for p in scaling.values() for e in p.errors]
    if errors:
        print(f"errors: {len(errors)} (first: {errors[0]})")
    print(f"machine: {os.cpu_count()} cores shared by Ray (proxy, replicas), Redis, the clients and anything else "
          f"running; during the run ({wall:.0f} s) {busy:.2f} of them were busy on average; load average "
          f"{os.getloadavg()[0]:.1f}")


def print_table(header: tuple, table: list[tuple]) -> None:
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *table]:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def run(args) -> None:
    from ray import serve

    from model_worker.demo_tokenizer import build_demo_tokenizer

    prefix = f"bench-serve-ray-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = str(Path(tmp) / "tokenizer")
        build_demo_tokenizer(tokenizer_dir)
        settings = {"redis_url": args.redis_url, "key_prefix": prefix, "embedder": "hashing",
                    "database_url": f"sqlite:///{Path(tmp) / 'memory.db'}", "model_path": tokenizer_dir,
                    "rate_limit_per_s": 1e9, "rate_limit_burst": 10**9, "max_streams_per_key": 100_000,
                    "max_concurrent_sessions": SESSIONS_PER_REPLICA}
        port = base.free_port()
        busy0, start = base.busy_cpu_s(), time.time()
        try:
            key = asyncio.run(create_key(args.redis_url, prefix))
            start_ray(port)
            serve.run(floor_deployment().bind(), name="floor", route_prefix="/floor")
            load = ServeLoad(key)
            deploy_app(1, 0.0, settings, tokenizer_dir)
            rows = asyncio.run(overhead(port, load, args.quick))
            scaling = {}
            for replicas in REPLICAS:
                print(f"scaling: {replicas} ApiIngress replica(s)...", file=sys.stderr, flush=True)
                serve.delete("engram")
                deploy_app(replicas, SCALING_DELAY_S, settings, tokenizer_dir)
                scaling[replicas] = asyncio.run(throughput(port, load, args.quick))
            wall, busy = time.time() - start, base.busy_cpu_s() - busy0
        finally:
            import ray

            serve.shutdown()
            ray.shutdown()
            base.delete_keys(args.redis_url, prefix)
    report(rows, scaling, args.quick, wall, busy / wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter phases")
    parser.add_argument("--redis-url", default=os.environ.get("ENGRAM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()

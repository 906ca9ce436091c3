"""The transport floor under a remote Engram lookup: a Ray Serve handle call, a plain Ray actor call and a
Ray compiled graph.

docs/capacity.md (sections 5-6) found the remote-Engram cost bound by the per-step round trip: a no-op Serve
handle call took 3-6 ms on this host, while the 3% goal allows an exposed wait of about 0.5-1 ms at the
measured step times. A direct actor path (the worker calling the shard's actor, skipping Serve's router) is
the alternative named there (built since: runtime/serve/engram_rows.py); a Ray compiled graph (channels set up
once, no task submission per call) is faster still, but its actor polls a core while it waits (measured here
too), so the runtime does not use it. This measures the three in one run on one local Ray instance, with no
payload and with one engine step's Engram rows (the engram_remote.py geometry: 2 layers x 24 rows of 64 values
per token; fp32 at 1 and 16 tokens, and FP8 at 16), as torch tensors, beside a plain in-process call and the
3% budget at the step times engram_remote.py measured. Each figure is a median (and p90) of N calls, the kinds
interleaved. Also: the CPU an idle actor uses, plain and in a compiled graph.

    python benchmarks/ray_call_floor.py [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from common import machine_line  # noqa: E402
from engram_remote import start_ray  # noqa: E402

ROWS_PER_TOKEN, ROW_VALUES, LAYERS = 24, 64, 2  # engram_remote.py's geometry: 8 heads x n-grams 2..4
# FP8 rows travel as their bytes (uint8): Ray's serializer cannot rebuild a float8 tensor
PAYLOADS = ((1, torch.float32), (16, torch.float32), (16, torch.uint8))
STEP_MS = (15.0, 34.0)  # engram_remote.py run 1's step times at 1 and 16 requests (docs/capacity.md §6)
GOAL = 0.03
IDLE_S = 5.0  # seconds of nothing called, to see what an idle actor costs


def _rows(tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, rows per token, values] in fp32, or FP8 values viewed as uint8."""
    rows = torch.randn(tokens, ROWS_PER_TOKEN, ROW_VALUES)
    return rows.to(torch.float8_e4m3fn).view(torch.uint8) if dtype == torch.uint8 else rows


class RowServer:
    """The same two methods behind both transports: nothing, and one step's rows for `tokens` tokens."""

    def __init__(self) -> None:
        self.rows = {(tokens, dtype): {layer: _rows(tokens, dtype) for layer in range(LAYERS)}
                     for tokens, dtype in PAYLOADS}

    def noop(self) -> None:
        return None

    def step_rows(self, tokens: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        return self.rows[tokens, dtype]

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (all its threads)."""
        return time.process_time()

    def dispatch(self, call: tuple) -> dict[int, torch.Tensor] | None:
        """One method for a compiled graph to bind: ("noop",) or ("step_rows", tokens, dtype)."""
        return getattr(self, call[0])(*call[1:])


def compiled_graph(actor):
    """A Ray compiled graph over the actor's `dispatch` (Ray's low-overhead path for a repeated call: channels
    set up once instead of a task submission per call). Only the compiling process may call it, and an actor
    serves one compiled graph at a time."""
    from ray.dag import InputNode

    with InputNode() as call:
        dag = actor.dispatch.bind(call)
    return dag.experimental_compile()


def idle_cpu(actor, graph_actor, seconds: float) -> dict[str, float]:
    """CPU seconds each actor's process used while nobody called it for `seconds`."""
    import ray

    actors = {"Ray actor": actor, "compiled graph": graph_actor}
    before = {kind: ray.get(a.cpu_seconds.remote()) for kind, a in actors.items()}
    time.sleep(seconds)
    return {kind: ray.get(a.cpu_seconds.remote()) - before[kind] for kind, a in actors.items()}


def timings_ms(call, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per kind (default 300)")
    args = parser.parse_args()
    if args.calls < 10:
        parser.error("--calls must be at least 10")
    import ray
    from ray import serve

    print(machine_line())
    start_ray()
    graph = None
    try:
        handle = serve.run(serve.deployment(RowServer, ray_actor_options={"num_cpus": 0.2}).bind(),
                           name="row-server", route_prefix=None)
        actor = ray.remote(num_cpus=0.2)(RowServer).remote()
        graph_actor = ray.remote(num_cpus=0)(RowServer).remote()
        graph = compiled_graph(graph_actor)
        local = RowServer()
        paths = {"in-process": lambda method, *a: getattr(local, method)(*a),
                 "Ray actor": lambda method, *a: ray.get(getattr(actor, method).remote(*a)),
                 "compiled graph": lambda method, *a: graph.execute((method, *a)).get(),
                 "Serve handle": lambda method, *a: getattr(handle, method).remote(*a).result(timeout_s=60)}
        kinds = {kind: {"noop": (lambda p=path: p("noop")),
                        **{payload: (lambda p=path, t=payload: p("step_rows", *t)) for payload in PAYLOADS}}
                 for kind, path in paths.items()}
        for calls in kinds.values():  # warm up every path
            for call in calls.values():
                timings_ms(call, 5)
        idle = idle_cpu(actor, graph_actor, IDLE_S)
        samples = {(kind, what): [] for kind, calls in kinds.items() for what in calls}
        for _ in range(args.calls // 10):  # interleaved blocks, so drift of the host hits every kind alike
            for kind, calls in kinds.items():
                for what, call in calls.items():
                    samples[kind, what] += timings_ms(call, 10)
    finally:
        if graph is not None:
            graph.teardown()
        serve.shutdown()
        ray.shutdown()
    print(f"{'transport':<16}{'payload':>36}{'median ms':>11}{'p90 ms':>9}{'vs actor':>10}")
    for (kind, what), times in samples.items():
        payload = "none"
        if what != "noop":
            tokens, dtype = what
            size = tokens * LAYERS * ROWS_PER_TOKEN * ROW_VALUES * dtype.itemsize // 1024
            payload = f"{'FP8' if dtype.itemsize == 1 else 'fp32'} rows of {tokens} token(s), {size} KiB"
        median = statistics.median(times)
        actor_median = statistics.median(samples["Ray actor", what])
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"{kind:<16}{payload:>36}{median:>11.3f}{p90:>9.3f}{median / actor_median:>9.1f}x")
    budgets = ", ".join(f"{step:g} ms step: {step * GOAL / (1 - GOAL):.2f} ms" for step in STEP_MS)
    print(f"3% budget for an exposed wait (cost = wait / (step + wait)): {budgets}")
    print(f"({args.calls} calls per row, in blocks of 10 interleaved across kinds)")
    print(f"CPU used by an idle actor over {IDLE_S:g} s, nothing called: plain actor {idle['Ray actor']:.2f} s, "
          f"the compiled graph's actor {idle['compiled graph']:.2f} s (its loop waits for input by polling); "
          "that actor ran through the whole measurement, so every figure above had one core less")
    return 0


if __name__ == "__main__":
    sys.exit(main())

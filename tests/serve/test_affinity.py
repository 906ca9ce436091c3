"""Session affinity (runtime/serve/affinity.py, router.py). The choice itself, without Ray: a session stays on the
replica that served it while that one is a candidate under the queue threshold, else goes to the least loaded.
On Ray Serve, with 2 model-worker replicas and 8 concurrent multi-step sessions driven through the orchestrator's
model client (`HandleModelClient`, which names the session to the router), the prefix-cache hit rate the workers
report (cached_tokens / prompt_tokens) is higher through SessionAffinityRouter than through Serve's default router
(power of two choices); both are measured in the same test and printed."""

from __future__ import annotations

import asyncio
import random

import pytest

from runtime.serve.affinity import SessionReplicas, rank_replicas

SESSIONS, STEPS = 8, 5
WORDS = ("alpha river stone green table window seven market quiet orange lamp cloud paper silver garden "
         "bridge winter copper forest signal harbor violet thunder mirror candle").split()


# ---- the choice, without Ray ---------------------------------------------------------------------------
def test_session_stays_on_its_replica_while_under_the_threshold():
    assert rank_replicas(["a", "b"], {"a": 3, "b": 0}, "a", max_queue=4) == ["a", "b"]
    assert rank_replicas(["a", "b"], {"a": None, "b": 0}, "a", max_queue=4)[0] == "a"  # unknown load: idle


def test_overloaded_or_gone_replica_hands_the_session_to_the_least_loaded():
    assert rank_replicas(["a", "b", "c"], {"a": 4, "b": 2, "c": 1}, "a", max_queue=4) == ["c", "b", "a"]
    assert rank_replicas(["b", "c"], {"b": 2, "c": 1}, "a", max_queue=4) == ["c", "b"]  # "a" is not a candidate
    assert rank_replicas(["a", "b"], {"a": 0, "b": 3}, None, max_queue=4) == ["a", "b"]  # a new session
    assert rank_replicas([], {}, "a", max_queue=4) == []


def test_equal_loads_spread_new_sessions_reproducibly():
    firsts = [rank_replicas(["a", "b"], {"a": 1, "b": 1}, None, max_queue=4, session=f"s{i}")[0] for i in range(64)]
    assert 16 <= firsts.count("a") <= 48, firsts
    again = [rank_replicas(["b", "a"], {"a": 1, "b": 1}, None, max_queue=4, session=f"s{i}")[0] for i in range(64)]
    assert again == firsts  # the order candidates arrive in does not matter


def test_session_replicas_forget_the_least_recently_used():
    table = SessionReplicas(capacity=2)
    table.record("s1", "a")
    table.record("s2", "b")
    table.record("s1", "b")  # s1 used again: s2 is now the oldest
    table.record("s3", "a")
    assert (table.get("s1"), table.get("s2"), table.get("s3"), len(table)) == ("b", None, "a", 2)
    with pytest.raises(ValueError):
        SessionReplicas(capacity=0)


def test_session_orchestrator_names_the_session_it_drives(monkeypatch):
    from runtime.orchestrator import Orchestrator
    from runtime.serve.adapters import SessionOrchestrator, current_session

    seen = []

    async def run_session(self, session_id):
        async def model_call():  # a task the step starts inherits the session
            seen.append(current_session.get())

        seen.append(current_session.get())
        await asyncio.create_task(model_call())
        return session_id

    monkeypatch.setattr(Orchestrator, "run_session", run_session)
    orchestrator = object.__new__(SessionOrchestrator)

    async def main():
        got = await asyncio.gather(orchestrator.run_session("s1"), orchestrator.run_session("s2"))
        return got, current_session.get()

    assert asyncio.run(main()) == (["s1", "s2"], "")
    assert sorted(seen) == ["s1", "s1", "s2", "s2"]


# ---- on Ray Serve --------------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def run_sessions(client) -> tuple[int, int]:
    """SESSIONS concurrent sessions of STEPS model calls each, every prompt the previous one plus an assistant
    turn and an observation (as the orchestrator's prompts grow), a short tool call between the steps (without
    it the sessions move in lockstep, and the replica a session just left is always the less loaded, so the
    default router keeps it there by chance); -> (cached tokens, prompt tokens)."""
    from runtime.serve.adapters import current_session

    system = {"role": "system", "content": words(random.Random(0), 40)}  # shared by all sessions

    async def session(i: int) -> list[dict]:
        current_session.set(f"session-{i}")  # what SessionOrchestrator sets around a session's steps
        rng = random.Random(100 + i)
        messages = [system, {"role": "user", "content": words(rng, 40)}]
        usages = []
        for step in range(STEPS):
            reply = await client.complete(messages, json_schema=None, max_tokens=4)
            usages.append(reply.usage)
            await asyncio.sleep(rng.uniform(0.0, 0.2))  # a tool runs: the sessions fall out of step
            messages = [*messages, {"role": "assistant", "content": f"step {step}: calling a tool"},
                        {"role": "user", "content": f"observation: {words(rng, 100)}"}]
        return usages

    usages = [u for per_session in await asyncio.gather(*(session(i) for i in range(SESSIONS)))
              for u in per_session]
    assert len(usages) == SESSIONS * STEPS
    return sum(u["cached_tokens"] for u in usages), sum(u["prompt_tokens"] for u in usages)


def hit_rate(serve_model_dir, name: str, **options) -> float:
    from ray import serve

    from runtime.serve import HandleModelClient, ModelWorkerDeployment

    app = ModelWorkerDeployment.options(name=name, num_replicas=2, ray_actor_options={"num_cpus": 0.25},
                                        **options).bind(str(serve_model_dir))
    handle = serve.run(app, name=name, route_prefix=None)
    try:
        client = HandleModelClient(handle, context_window=4096, model_path=serve_model_dir)
        cached, prompt = asyncio.run(run_sessions(client))
        return cached / prompt
    finally:
        serve.delete(name)


def test_affinity_router_raises_the_prefix_cache_hit_rate(ray_serve, serve_model_dir):
    from ray.serve.config import RequestRouterConfig

    affinity = hit_rate(serve_model_dir, "affinity-worker")  # the deployment's own request_router_config
    default = hit_rate(serve_model_dir, "default-router-worker", request_router_config=RequestRouterConfig())
    print(f"prefix-cache hit rate, {SESSIONS} sessions x {STEPS} steps on 2 replicas: "
          f"session affinity {affinity:.3f}, Serve's default router {default:.3f}")
    assert affinity > default

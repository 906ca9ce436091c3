"""A checkpoint stores only the new step: over a 200-step session the Redis memory of the session's keys
(MEMORY USAGE, every element counted) grows linearly, by about one step's JSON per step, far below what a
full-state snapshot per step (the whole history written again) costs at the end."""

from __future__ import annotations

import asyncio
import random

import redis

from runtime.sessions import SessionStore

STEPS = 200
WINDOW = 40


def test_bytes_per_step_stay_flat_over_200_steps(redis_url, key_prefix, make_step):
    rng = random.Random(0)

    async def body():
        async with SessionStore(redis_url, key_prefix=key_prefix) as store:
            sid = (await store.create("acme", "helper", "a long task")).session_id
            token = (await store.claim(sid, "owner", 120_000)).fencing_token
            used, history = [await store.bytes_used(sid)], []
            for index in range(STEPS):
                text = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(200, 400)))
                step = make_step(sid, index, text=text)
                history.append(step.model_dump_json())
                await store.append_step(sid, step, "owner", token)
                used.append(await store.bytes_used(sid))
            return sid, used, history

    sid, used, history = asyncio.run(body())
    step_bytes = sum(map(len, history)) / STEPS
    per_step = [(used[w + WINDOW] - used[w]) / WINDOW for w in range(0, STEPS, WINDOW)]
    # flat: the increment in the last window is like the first one (no growth with history length)
    assert max(per_step) / min(per_step) < 1.35, per_step
    assert all(step_bytes * 0.8 < inc < step_bytes * 2 for inc in per_step), (step_bytes, per_step)
    # a full-state snapshot at step 200, measured in the same Redis
    client = redis.Redis.from_url(redis_url)
    client.set(f"{key_prefix}:snapshot", "[" + ",".join(history) + "]")
    snapshot = client.memory_usage(f"{key_prefix}:snapshot", samples=0)
    assert snapshot > 0.95 * STEPS * step_bytes
    assert max(per_step) < snapshot / 50
    assert used[-1] - used[0] < 2 * snapshot  # the whole log costs about one snapshot, not 200 of them
    assert client.llen(f"{key_prefix}:session:{sid}:steps") == STEPS

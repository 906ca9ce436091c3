"""Redis fixtures for the runtime tests.

`redis_url`: the shared server (ENGRAM_TEST_REDIS_URL, default 127.0.0.1:6379), or a private one started for
the test session when none answers there. Tests on it only touch keys under their own `key_prefix`,
deleted afterwards; they never flush, stop or reconfigure it.
`own_redis`: a private redis-server with AOF (`appendfsync always`) on a free port under tmp_path, for
tests that stop, kill or restart Redis.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from runtime.redis_server import RedisServer
from runtime.sessions import Step, step_id_for

SHARED_REDIS_URL = os.environ.get("ENGRAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    try:
        with redis.Redis.from_url(SHARED_REDIS_URL, socket_connect_timeout=2) as client:
            client.ping()
        yield SHARED_REDIS_URL
        return
    except redis.RedisError:
        pass
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"), appendonly=False)
    server.start()
    yield server.url
    server.stop()


def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` (a test's own prefix on the shared server)."""
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])


@pytest.fixture
def key_prefix(redis_url) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on, fsync on every write) that the test may stop, kill and restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True, appendfsync="always")
    server.start()
    yield server
    server.resume()  # in case the test left it SIGSTOPped
    server.stop(kill=True)


@pytest.fixture
def make_step():
    """make_step(session_id, index, kind="action", text=...) -> a Step shaped like an agent step."""

    def make(session_id: str, index: int, kind: str = "action", text: str = "") -> Step:
        call = {"name": "calculator", "arguments": {"expression": f"{index} * 7"}}
        return Step(step_id=step_id_for(session_id, index), index=index, kind=kind,
                    model_output=f'{{"type": "tool_calls", "calls": [{call}]}} {text}',
                    action={"type": "tool_calls", "calls": [call]},
                    observations=[{"call_index": 0, "tool": "calculator", "arguments": call["arguments"],
                                   "result": {"value": index * 7, "note": text},
                                   "idempotency_key": f"{session_id}:{index}:0"}],
                    retrieved_memories=[{"id": f"m{index}", "score": 0.5}],
                    usage={"prompt_tokens": 100 + index, "completion_tokens": 12}, started_ms=1000 * index,
                    committed_ms=1000 * index + 5)

    return make

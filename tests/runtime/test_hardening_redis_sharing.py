"""The embedded redis-server shared by processes on one data dir (issue 17, item 6): the first process to
finish does not stop it under another that still uses it, the last one stops it, and a process killed
while its server was still starting leaves nothing orphaned: the next start adopts that server instead of
starting a second one on the same files. Checked with real processes and a plain redis-py client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runtime.redis_server import RedisServer, redis_server_binary

USER_SCRIPT = textwrap.dedent("""
    import sys
    from runtime.redis_server import RedisServer
    server = RedisServer(sys.argv[1], binary=sys.argv[2] if len(sys.argv) > 2 else None)
    server.start()
    print(server.pid, server.port, flush=True)
    sys.stdin.readline()  # used until told to finish
    server.stop()
    print("stopped", flush=True)
""")


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping())
    except redis.ConnectionError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _user(data_dir, *binary) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", USER_SCRIPT, str(data_dir), *binary], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())


def test_the_first_process_to_finish_leaves_the_server_to_the_other(tmp_path):
    data_dir = tmp_path / "redis"
    first = RedisServer(data_dir)
    first.start()
    other = _user(data_dir)
    try:
        pid, port = map(int, other.stdout.readline().split())
        assert (pid, port) == (first.pid, first.port)  # the other process adopted the running server
        first.stop()  # the first process finishes ...
        assert _answers(port)  # ... and the other one's server is still up
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "stopped"
        assert other.wait(30) == 0
        assert not _answers(port) and not _alive(pid)  # the last user stopped it
    finally:
        other.kill()
        first.stop(kill=True, force=True)


def test_a_process_killed_during_start_up_leaves_no_orphan(tmp_path):
    data_dir, marker = tmp_path / "redis", tmp_path / "spawned"
    slow = tmp_path / "slow-redis-server"  # a redis-server that takes a while to come up
    slow.write_text(f"#!/bin/sh\necho $$ > {marker}\nsleep 2\nexec {redis_server_binary()} \"$@\"\n")
    slow.chmod(0o755)
    starting = _user(data_dir, str(slow))
    orphan = None
    try:
        deadline = time.monotonic() + 30
        while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.02)
        orphan = int(marker.read_text())
        starting.send_signal(signal.SIGKILL)  # dies while its server is still starting
        starting.wait(30)
        assert _alive(orphan)
        server = RedisServer(data_dir)
        server.start()
        assert server.pid == orphan  # adopted, not a second server on the same files
        server.stop()
        assert not _alive(orphan)
    finally:
        starting.kill()
        if orphan is not None and _alive(orphan):
            os.kill(orphan, signal.SIGKILL)

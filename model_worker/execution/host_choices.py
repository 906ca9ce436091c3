"""CPU kernel choices kept per host on disk, so every process on a host runs the same kernels.

`execution.cpu_gemm` picks kernels by timing them. Timed in each process, two processes on one machine could
pick differently (a noisy neighbour is enough) and so compute slightly different logits for the same
prompt. Instead the first process that needs a choice measures it while holding an exclusive lock on the
host's choice file and records it; every other process, including one that was waiting for the lock, reads
the recorded answer. The file is named by a digest of what the answers depend on: the CPU (model and
feature flags), torch's version and the C kernels' source, so a new CPU, torch or kernel build measures
afresh. It lives beside the built C kernels (`$ENGRAM_KERNEL_CACHE`, see `engram_kernels.cpu_decode.native`);
`ENGRAM_CPU_GEMM_CACHE=off` keeps choices per process. A file that cannot be read or parsed is measured
again and rewritten, never trusted.

Deliberately not here: what is measured and how (`cpu_gemm`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CACHE_SWITCH_ENV = "ENGRAM_CPU_GEMM_CACHE"


def host_digest() -> str:
    """What recorded choices depend on: the CPU, torch and our C kernels' source."""
    from engram_kernels.cpu_decode import native

    sources = b""
    for file in sorted(native.SOURCE.parent.glob("*.[ch]")):  # the kernel source and the headers it includes
        try:
            sources += file.name.encode() + b"\0" + file.read_bytes()
        except OSError:
            pass
    parts = [native._cpu_identity().encode(), torch.__version__.encode(), sources]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def choices_file() -> Path | None:
    """This host's choice file, or None when the cache is switched off."""
    if os.environ.get(CACHE_SWITCH_ENV, "on").strip().lower() in ("off", "0", "no", "false"):
        return None
    from engram_kernels.cpu_decode import native

    return native.cache_dir() / f"cpu-gemm-choices-{host_digest()}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _write(path: Path, recorded: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(recorded, out, sort_keys=True)
    os.replace(tmp, path)


_in_process = threading.RLock()  # one thread of this process at a time; re-entrant: a measurement may need
_held = 0  # another choice (a kernel it times picks its own), and the host lock is then already ours


def recorded_or_measured(key: str, measure: Callable[[], Any]) -> Any:
    """The host's recorded answer for `key`, else `measure()` (a JSON value), recorded for every later process.
    Without a usable cache directory or with the cache off, just `measure()`."""
    global _held
    path = choices_file()
    if path is None:
        return measure()
    with _in_process:
        lock = None
        if _held == 0:
            try:
                lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the measurement
            except OSError:
                return measure()
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _held += 1
        try:
            recorded = _read(path)
            if key in recorded:
                return recorded[key]
            value = measure()
            recorded = {**_read(path), key: value}  # a nested measurement may have recorded meanwhile
            try:
                _write(path, recorded)
            except OSError:
                pass  # a read-only cache: this process keeps its answer, the next measures again
            return value
        finally:
            _held -= 1
            if lock is not None:
                lock.close()

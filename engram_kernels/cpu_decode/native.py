"""Build and load the C kernels of this package on the machine that runs them.

The source is compiled once per (source, compiler, CPU) with -O3 -march=native -fopenmp into a shared
library in a cache directory, then loaded with ctypes (whose calls release the GIL). Nothing is
shipped pre-built: -march=native needs the CPU it runs on. Without a C compiler ($CC, else cc, then
gcc if cc fails), on a CPU without AVX2/FMA or AVX-512, or if the build fails, `load()` returns None
with the reason in `unavailable_reason()` and callers keep torch's kernels.

Cache: $ENGRAM_KERNEL_CACHE, else $XDG_CACHE_HOME/engram-runtime/kernels, else
~/.cache/engram-runtime/kernels (a temporary directory if none is writable). The file name carries a hash
of everything the build depends on; it is written to a temporary name and renamed, so concurrent
processes never load a half-written library. A cached file that fails to load is rebuilt.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share its OpenMP runtime)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_gemm.c")
# Included by SOURCE: part of the build key.
HEADERS = tuple(Path(__file__).with_name(name) for name in ("decode_gemm_tile.h", "panel_gemm.h", "moe_router.h"))
CACHE_ENV = "ENGRAM_KERNEL_CACHE"
COMPILER_ENV = "CC"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")

_reason: str | None = None


def unavailable_reason() -> str | None:
    """Why `load()` returned None (after a call to it), else None."""
    return _reason


def cache_dir() -> Path:
    """Where built libraries are kept (created if missing)."""
    if os.environ.get(CACHE_ENV):
        base = Path(os.environ[CACHE_ENV])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engram-runtime" / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, delete=True)
        probe.close()
        return base
    except OSError:
        return Path(tempfile.mkdtemp(prefix="engram-kernels-"))


def _compilers() -> list[str]:
    """$CC if set, else cc and gcc (a cc that cannot build OpenMP code, e.g. clang without libomp, falls
    back to gcc): the paths found, without repeats."""
    names = [os.environ[COMPILER_ENV]] if os.environ.get(COMPILER_ENV) else ["cc", "gcc"]
    found = [shutil.which(name) for name in names]
    return list(dict.fromkeys(path for path in found if path))


def _cpu_identity() -> str:
    """The CPU's model and feature flags (-march=native depends on them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted)) or platform.machine()


def _build_key(compiler: str, source: bytes) -> str:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [source, compiler.encode(), version.encode(), " ".join(FLAGS).encode(), _cpu_identity().encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _compile(compiler: str, target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """Compile SOURCE into target (atomically: a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_for(march: str, target: Path) -> ctypes.CDLL:
    """Build the kernels for another -march than this CPU's (tests run each ISA path of the source on a CPU
    that has them all) into target and load it, bypassing the cache. Raises RuntimeError if that fails."""
    compilers = _compilers()
    if not compilers:
        raise RuntimeError("no C compiler")
    _compile(compilers[0], target, tuple(f"-march={march}" if flag == "-march=native" else flag for flag in FLAGS))
    return _open(target)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.engram_decode_gemm_isa.restype = ctypes.c_int
    lib.engram_decode_gemm_isa.argtypes = []
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for gemm in (lib.engram_decode_gemm_f32, lib.engram_decode_gemm_bf16):
        gemm.restype = None
        gemm.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    lib.engram_grouped_decode_gemm.restype = None
    lib.engram_grouped_decode_gemm.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, i64, i64, ctypes.c_int]
    lib.engram_panel_width.restype = ctypes.c_int
    lib.engram_panel_width.argtypes = []
    lib.engram_panel_gemm_f32.restype = None
    lib.engram_panel_gemm_f32.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ctypes.c_float,
                                          ctypes.c_int]
    lib.engram_sigmoid_route.restype = None
    lib.engram_sigmoid_route.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr,
                                         ptr]
    lib.engram_grouped_panel_gemm_f32.restype = None
    lib.engram_grouped_panel_gemm_f32.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64, ctypes.c_int]
    return lib


def _cached_or_built(compiler: str, target: Path) -> ctypes.CDLL:
    """The library at target, compiled first if it is missing or does not load (a damaged cache entry)."""
    if target.exists():
        try:
            return _open(target)
        except (OSError, AttributeError) as exc:
            log.warning("rebuilding %s: %s", target, exc)
            target.unlink(missing_ok=True)
    _compile(compiler, target)
    return _open(target)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built library (compiled on first use), or None where the kernels cannot run here."""
    global _reason
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"no kernel for {platform.machine()} (x86-64 AVX2/AVX-512 only)"
        return None
    compilers = _compilers()
    if not compilers:
        _reason = "no C compiler (set CC, or install gcc)"
        return None
    source = b"\0".join(path.read_bytes() for path in (SOURCE, *HEADERS))
    failures = []
    for compiler in compilers:
        try:
            lib = _cached_or_built(compiler, cache_dir() / f"decode_gemm-{_build_key(compiler, source)}.so")
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            failures.append(f"{compiler}: {exc}")
    else:
        _reason = f"could not build {SOURCE.name}: {'; '.join(failures)}"
        log.warning("CPU decode kernels unavailable, using torch's: %s", _reason)
        return None
    if lib.engram_decode_gemm_isa() == 0:
        _reason = "this CPU has neither AVX2 with FMA nor AVX-512"
        return None
    _reason = None
    return lib

"""Which CPU kernels the model's products run: one fixed rule, so every process on a host (and every host
with the same build) runs the same kernels and computes the same logits for the same prompt.

The rule, from `benchmarks/weight_layout.py` and `benchmarks/decode.py` (docs/performance.md): where our C
kernels build (`engram_kernels.cpu_decode`), fp32 weights run through the C panel kernel at every row count
(the fastest fp32 kernel at every shape of the model at 1, 4 and 16 rows, against torch's own in both
operand orders, oneDNN with packed weights and our dot-product kernel), and up to `C_ROWS_MAX_ROWS` rows of a
bf16 weight through the C dot-product kernel; everything else (GPU tensors, other dtypes, training with
gradients, a host without a C compiler) runs torch's kernels. Nothing is timed at run time.

`ENGRAM_CPU_GEMM=torch` keeps torch's kernels everywhere (a deployment that wants no native code);
`ours` is the default. `set_cpu_gemm_mode` does the same for tests and benchmarks.
"""

from __future__ import annotations

import os

CPU_GEMM_ENV = "ENGRAM_CPU_GEMM"
CPU_GEMM_MODES = ("ours", "torch")
C_ROWS_MAX_ROWS = 8  # bf16 rows the C dot-product kernel takes; beyond, torch's GEMM (weight_layout.py)

_forced: str | None = None


def set_cpu_gemm_mode(mode: str | None) -> None:
    """Use this mode instead of ENGRAM_CPU_GEMM (None: the environment's again). Takes effect for weights
    prepared afterwards (`CausalLM.arrange_weights`)."""
    global _forced
    if mode is not None and mode not in CPU_GEMM_MODES:
        raise ValueError(f"CPU GEMM mode {mode!r}: expected one of {', '.join(CPU_GEMM_MODES)}")
    _forced = mode


def cpu_gemm_mode() -> str:
    """'ours' or 'torch': the forced mode, else ENGRAM_CPU_GEMM (default 'ours')."""
    if _forced is not None:
        return _forced
    mode = os.environ.get(CPU_GEMM_ENV, "ours").strip().lower() or "ours"
    if mode not in CPU_GEMM_MODES:
        raise ValueError(f"{CPU_GEMM_ENV}={mode!r}: expected one of {', '.join(CPU_GEMM_MODES)}")
    return mode


def our_cpu_kernels() -> bool:
    """Whether our C kernels run here: the mode is 'ours' and they built on this machine."""
    if cpu_gemm_mode() != "ours":
        return False
    from engram_kernels.cpu_decode import decode_gemm_available

    return decode_gemm_available()

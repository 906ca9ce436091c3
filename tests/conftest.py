"""Test-wide setup: run Triton kernels through the interpreter when no GPU is present, and pin the CPU
GEMM choices (`model_worker.execution.cpu_gemm`) so that which kernel path runs never depends on this host's
timing: every path is then exercised the same way on every machine (tests/model_worker/test_cpu_gemm.py
covers the measured mode)."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model_worker.execution.cpu_gemm import CpuGemmPreferences, set_cpu_gemm_preferences  # noqa: E402

PINNED_CPU_GEMM = CpuGemmPreferences(input_major_one_row=True, wide_min_rows_output_major=2,
                                     wide_min_rows_input_major=16, tune_input_major_wide=False,
                                     pack_weights=True, tune_packed=False, native_max_rows=8, tune_native=False,
                                     panel_weights=True)
set_cpu_gemm_preferences(PINNED_CPU_GEMM)

"""Test-wide setup: run Triton kernels through the interpreter when no GPU is present. Which CPU kernels run
is a fixed rule (`model_worker.execution.policy`), so no test depends on this host's timing."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

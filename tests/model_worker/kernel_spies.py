"""Helpers for tests of the CPU kernel choices: a spy that counts calls to a kernel, and CPU GEMM
preferences changed from the conftest's pinned ones for the length of a `with` block."""

from __future__ import annotations

import contextlib
import dataclasses

from model_worker.execution import cpu_gemm
from tests.conftest import PINNED_CPU_GEMM


class Spy:
    """Counts calls to a function it forwards to."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def spy_on(monkeypatch, module, name: str) -> Spy:
    """Replace module.name with a Spy forwarding to it for the test's length; returns the spy."""
    spy = Spy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


@contextlib.contextmanager
def pinned_cpu_gemm(**changes):
    """PINNED_CPU_GEMM with `changes` inside the block; afterwards the pinned preferences again, and no
    per-shape choice timed inside the block is remembered."""
    cpu_gemm.set_cpu_gemm_preferences(dataclasses.replace(PINNED_CPU_GEMM, **changes))
    try:
        yield
    finally:
        cpu_gemm.set_cpu_gemm_preferences(PINNED_CPU_GEMM)
        cpu_gemm._choices.clear()

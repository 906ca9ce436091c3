"""A spy that counts calls to a kernel, for tests of which kernel a layer's method runs."""

from __future__ import annotations


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

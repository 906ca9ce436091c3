"""Errors the model worker raises for bad checkpoints and bad model configs.

Both are `ValueError`s so callers that only care about "bad input" can catch one type. This module
does not decide what is bad; `weights.py` and the config code do.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model.

    The message names every offending tensor or file, one per line, so that one attempt shows all
    that is wrong. `problems` holds the same lines for programs.
    """

    def __init__(self, summary: str, problems: Iterable[str] = ()) -> None:
        self.summary = summary
        self.problems: list[str] = list(problems)
        lines = [summary] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigError(ValueError):
    """A model config field is missing, of the wrong type, or out of range.

    The message names the offending config field; `field` holds its name when the raiser gave it.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message if field is None else f"config field {field!r}: {message}")

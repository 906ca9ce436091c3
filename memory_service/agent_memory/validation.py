"""Input checks of the agent-memory API: each raises MemoryValidationError naming the field.

Checks only shapes and bounds of arguments; whether a memory or agent exists is the store's business.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from memory_service.agent_memory.models import KEY_CHARS, MEMORY_KINDS, NAME_CHARS
from memory_service.agent_memory.records import MemoryValidationError

MAX_METADATA_BYTES = 16_384
MAX_K = 1000
MAX_PAGE = 1000


def name(value: object, field: str) -> str:
    """A tenant or agent name: non-empty str of at most NAME_CHARS characters."""
    if not isinstance(value, str) or not value.strip():
        raise MemoryValidationError(f"{field}: expected a non-empty string, got {value!r}")
    if len(value) > NAME_CHARS:
        raise MemoryValidationError(f"{field}: longer than {NAME_CHARS} characters")
    return value


def text(value: object, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise MemoryValidationError(f"{field}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise MemoryValidationError(f"{field}: must not be empty or only whitespace")
    if len(value) > max_chars:
        raise MemoryValidationError(f"{field}: {len(value)} characters is over the limit of {max_chars}")
    return value


def kind(value: object) -> str:
    if value not in MEMORY_KINDS:
        raise MemoryValidationError(f"kind: expected one of {MEMORY_KINDS}, got {value!r}")
    return value  # type: ignore[return-value]


def kinds(value: Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    chosen = set(value)
    if not chosen or not chosen <= set(MEMORY_KINDS):
        raise MemoryValidationError(f"kinds: expected a non-empty subset of {MEMORY_KINDS}, got {value!r}")
    return chosen


def metadata(value: object, field: str = "metadata") -> dict[str, Any]:
    """A JSON object (str keys, finite numbers) of at most MAX_METADATA_BYTES once encoded."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise MemoryValidationError(f"{field}: expected a dict with str keys, got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MemoryValidationError(f"{field}: not JSON-serialisable: {exc}") from exc
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise MemoryValidationError(f"{field}: over {MAX_METADATA_BYTES} bytes as JSON")
    return json.loads(encoded)  # a private copy, exactly as the database will hand it back


def optional_key(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > KEY_CHARS:
        raise MemoryValidationError(f"{field}: expected None or a string of 1..{KEY_CHARS} characters")
    return value


def optional_step(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise MemoryValidationError(f"source_step: expected None or an int in [0, 2**31), got {value!r}")
    return value


def count(value: object, field: str, largest: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest:
        raise MemoryValidationError(f"{field}: expected an int in [1, {largest}], got {value!r}")
    return value


def optional_score(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemoryValidationError(f"min_score: expected None or a finite number, got {value!r}")
    return float(value)


def memory_id(value: object) -> str:
    if not isinstance(value, str):
        raise MemoryValidationError(f"memory_id: expected a string, got {type(value).__name__}")
    return value

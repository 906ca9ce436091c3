"""What the agent-memory API hands out and raises: records, search hits, pages, errors.

Plain dataclasses detached from the database session; timestamps are UTC-aware datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


class MemoryNotFound(KeyError):
    """No such memory (or agent) for this tenant: another tenant's id looks exactly like a missing one."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else "not found"


class MemoryValidationError(ValueError):
    """Bad input to the store; the message starts with the offending field's name."""


@dataclass(frozen=True)
class MemoryRecord:
    id: str
    tenant: str
    agent: str
    kind: str  # fact | episode | summary
    text: str
    metadata: dict[str, Any]
    source_session: str | None
    source_step: int | None
    created_at: datetime
    updated_at: datetime
    idempotency_key: str | None


@dataclass(frozen=True)
class MemoryHit:
    memory: MemoryRecord
    score: float  # cosine similarity; the reciprocal-rank-fusion score in hybrid search


@dataclass(frozen=True)
class MemoryPage:
    items: list[MemoryRecord]
    next_cursor: str | None  # pass back as `cursor` for the next page; None on the last page

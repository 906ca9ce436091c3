"""What a durable session is made of: the small state hash (`SessionState`), the append-only step log
entries (`Step`), and the errors the store raises.

`SessionState` round-trips through a Redis hash as plain strings (ints in decimal, absent fields for
None) so the Lua scripts can read and compare fields without JSON. A `Step` is stored as one JSON
document and never re-encoded by Redis.

Deliberately not here: how keys are named or scripts run (`store.py`, `lua.py`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

SessionStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
StepKind = Literal["action", "summary", "final", "error"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")

# Fields a commit may change through `state_patch`, with the Python types they accept.
PATCHABLE_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,), "final_answer": (str, type(None)), "error": (str, type(None)),
    "summary": (str, type(None)), "summarized_through": (int,),
}


class LeaseLost(Exception):
    """A write with a stale fencing token, by a non-holder, or after the lease expired."""


class SessionFinished(LeaseLost):
    """The session reached a terminal status: nobody can hold its lease or append to it any more."""


class SessionNotFound(KeyError):
    """No session with this id (never created, or expired after it finished)."""


class SessionState(BaseModel):
    """The small per-session state hash."""

    session_id: str
    tenant: str
    agent: str
    status: SessionStatus
    step_count: int = Field(ge=0)  # committed steps
    lease_owner: str | None = None
    lease_expires_ms: int | None = None
    fencing_token: int = Field(ge=0)
    created_ms: int
    updated_ms: int
    final_answer: str | None = None
    error: str | None = None
    task: str
    summary: str | None = None  # running summary of turns folded out of the context window
    summarized_through: int = Field(default=0, ge=0)  # steps covered by `summary`
    thread_id: str | None = None  # the conversation (API "session") this run belongs to, if any
    context: str | None = None  # earlier turns of that conversation, shown to the model (set at creation)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> SessionState:
        """From the Redis hash (the Lua scripts write it: strings, ints in decimal, None as absent)."""
        return cls.model_validate(fields)


class Step(BaseModel):
    """One committed step: an append-only log entry, idempotent by `step_id`."""

    step_id: str  # f"{session_id}:{index}": the idempotency key of the commit
    index: int = Field(ge=0)  # 0-based, gap-free
    kind: StepKind
    model_output: str | None = None  # raw text the model produced (after repair attempts)
    action: dict[str, Any] | None = None  # {"type": "tool_calls", "calls": [...]} or {"type": "final", ...}
    observations: list[dict[str, Any]] = Field(default_factory=list)  # one per tool call
    retrieved_memories: list[dict[str, Any]] = Field(default_factory=list)  # memory ids + scores
    usage: dict[str, Any] = Field(default_factory=dict)  # prompt/completion/cached tokens
    started_ms: int
    committed_ms: int

    @model_validator(mode="after")
    def _step_id_names_index(self) -> Step:
        if not self.step_id.endswith(f":{self.index}") or len(self.step_id) <= len(f":{self.index}"):
            raise ValueError(f"step_id must be f'{{session_id}}:{{index}}', got {self.step_id!r} "
                             f"for index {self.index}")
        return self

    @property
    def session_id(self) -> str:
        return self.step_id[: -len(f":{self.index}")]


def step_id_for(session_id: str, index: int) -> str:
    """The idempotency key of step `index` of a session."""
    return f"{session_id}:{index}"


def validate_session_id(session_id: Any, name: str = "session_id") -> str:
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise ValueError(f"{name} must be 1-200 characters of [A-Za-z0-9_.:@-], got {session_id!r}")
    return session_id


def validate_patch(state_patch: dict[str, Any] | None) -> dict[str, Any]:
    """Check a commit's state patch: only patchable fields, with the right types; status never back
    to pending."""
    if state_patch is None:
        return {}
    if not isinstance(state_patch, dict):
        raise TypeError(f"state_patch must be a dict, got {type(state_patch).__name__}")
    for name, value in state_patch.items():
        if name not in PATCHABLE_FIELDS:
            raise ValueError(f"state_patch may not set {name!r}; allowed: {sorted(PATCHABLE_FIELDS)}")
        if not isinstance(value, PATCHABLE_FIELDS[name]) or isinstance(value, bool):
            raise TypeError(f"state_patch[{name!r}] must be {PATCHABLE_FIELDS[name]}, got {value!r}")
    status = state_patch.get("status")
    if status is not None and status not in ("running", *sorted(TERMINAL_STATUSES)):
        raise ValueError(f"state_patch['status'] must be running, completed, failed or cancelled, "
                         f"got {status!r}")
    if state_patch.get("summarized_through", 0) < 0:
        raise ValueError("state_patch['summarized_through'] must be >= 0")
    return dict(state_patch)

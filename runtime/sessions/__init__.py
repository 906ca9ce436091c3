"""Durable agent sessions in Redis: an append-only step log, leases with fencing tokens, exactly-once tool
records and per-session event streams. See `store.py` for the protocol an orchestrator follows."""

from .models import (
    TERMINAL_STATUSES,
    LeaseLost,
    SessionFinished,
    SessionNotFound,
    SessionState,
    Step,
    step_id_for,
)
from .store import SessionStore

__all__ = ["TERMINAL_STATUSES", "LeaseLost", "SessionFinished", "SessionNotFound", "SessionState", "SessionStore",
           "Step", "step_id_for"]

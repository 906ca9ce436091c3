"""Durable agent sessions in Redis: an append-only step log, leases with fencing tokens, exactly-once tool
records and per-session event streams. See `store.py` for the protocol an orchestrator follows.

Names are imported on first use (PEP 562), so a light submodule (`payloads`, `models`) can be used without
loading the Redis store and its dependencies (the demo model's trace generator runs where they are absent).
"""

from runtime.lazy_exports import lazy_getattr

_EXPORTS = {
    "TERMINAL_STATUSES": "models", "LeaseLost": "models", "SessionFinished": "models",
    "SessionNotFound": "models", "SessionState": "models", "Step": "models", "step_id_for": "models",
    "SessionStore": "store",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)

"""Redis key names of the session store, all under one prefix.

Every per-session key ends in a distinct suffix (`:state`, `:steps`, `:tools`, `:events`), so no session
id can produce another session's key name.

Deliberately not here: what the keys hold (see `lua.py` and `store.py`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one session."""

    state: str  # hash: SessionState fields as strings
    steps: str  # list: one Step JSON per committed step, position == index
    tools: str  # hash: "intent:<key>" / "result:<key>" -> JSON
    events: str  # stream: (type, data JSON[, nonce]) entries, MAXLEN ~ event_maxlen

    def all(self) -> tuple[str, str, str, str]:
        return (self.state, self.steps, self.tools, self.events)


@dataclass(frozen=True)
class KeySpace:
    """Key names under `prefix`."""

    prefix: str

    def session(self, session_id: str) -> SessionKeys:
        base = f"{self.prefix}:session:{session_id}"
        return SessionKeys(f"{base}:state", f"{base}:steps", f"{base}:tools", f"{base}:events")

    def state_key_affixes(self) -> tuple[str, str]:
        """(prefix, suffix) with `prefix + session_id + suffix == session(session_id).state`, for scripts that
        read the state of sessions they find in an index."""
        return f"{self.prefix}:session:", ":state"

    def tenant_index(self, tenant: str) -> str:
        """Sorted set of the tenant's session ids, scored by creation order (`creation_seq`)."""
        return f"{self.prefix}:tenant:{tenant}:sessions"

    def tenant_finished(self, tenant: str) -> str:
        """Sorted set of the tenant's finished session ids, scored by when their keys expire (ms)."""
        return f"{self.prefix}:tenant:{tenant}:finished"

    @property
    def runnable(self) -> str:
        """Sorted set of non-terminal session ids, scored by creation order (`creation_seq`)."""
        return f"{self.prefix}:runnable"

    @property
    def creation_seq(self) -> str:
        """Counter numbering sessions in creation order."""
        return f"{self.prefix}:creation_seq"

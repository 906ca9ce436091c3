"""Exactly-once effects on a SQL database, for tools: the effect and the call's idempotency key are committed
in one transaction.

The orchestrator records every tool call's result exactly once, but a call may run again when its
process dies before the result is recorded; it then runs with the same idempotency key. `SqlEffects`
makes an effect on a SQL database happen once per key: `apply(key, effect)` opens a transaction, reserves
the key in a small table (`tool_effects` by default), runs `effect(connection)` in the same transaction,
stores its JSON result beside the key and commits. A second call with the key returns the stored result
without running the effect; a concurrent one waits on the key's row (PostgreSQL) or the write lock
(SQLite) and then does the same. Effects roll back with their key, so a failed effect leaves no trace.

    effects = SqlEffects(engine_or_url)

    async def credit(account: str, cents: int, idempotency_key: str) -> dict:
        def effect(conn):
            conn.execute(text("UPDATE accounts SET cents = cents + :c WHERE id = :a"), {"c": cents, "a": account})
            return {"credited": cents}
        return await effects.apply_async(idempotency_key, effect)

Deliberately not here: effects outside this database (an HTTP call needs the remote side to honour the
key), or pruning old keys (delete rows by `created_ms` when a retried call can no longer arrive).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, Text, create_engine, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SqlEffects:
    """Idempotent effects on one database (a SQLAlchemy Engine or URL), keyed in table `table`."""

    def __init__(self, engine: Engine | str, *, table: str = "tool_effects") -> None:
        if not isinstance(table, str) or not _TABLE_NAME.match(table):
            raise ValueError(f"table must be a SQL identifier, got {table!r}")
        self.engine = create_engine(engine) if isinstance(engine, str) else engine
        self.table = Table(table, MetaData(), Column("idempotency_key", String(512), primary_key=True),
                           Column("result", Text, nullable=False), Column("created_ms", BigInteger, nullable=False))
        self.table.create(self.engine, checkfirst=True)

    def applied(self, key: str) -> bool:
        """Whether an effect was committed under `key`."""
        return self._stored(key) is not None

    def _stored(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(self.table.c.result).where(self.table.c.idempotency_key == key)).scalar()

    def apply(self, key: str, effect: Callable[[Connection], Any]) -> Any:
        """Run `effect(connection)` once per `key`, committed with the key; returns its (JSON) result, the
        stored one when the key was applied before."""
        if not isinstance(key, str) or not key or len(key) > 512:
            raise ValueError(f"key must be a non-empty string of at most 512 characters, got {key!r}")
        try:
            with self.engine.begin() as conn:
                # reserve the key first: a concurrent call with it blocks here until this one ends
                conn.execute(self.table.insert().values(idempotency_key=key, result="{}",
                                                        created_ms=int(time.time() * 1000)))
                value = effect(conn)
                conn.execute(self.table.update().where(self.table.c.idempotency_key == key)
                             .values(result=json.dumps({"value": value})))
                return value
        except IntegrityError:
            stored = self._stored(key)
            if stored is None:  # the insert failed for another reason than an existing key
                raise
            return json.loads(stored)["value"]

    async def apply_async(self, key: str, effect: Callable[[Connection], Any]) -> Any:
        """`apply` in a worker thread, for async tools."""
        return await asyncio.to_thread(self.apply, key, effect)

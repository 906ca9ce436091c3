"""Engine creation and schema migration for agent memory: SQLite (a file) or PostgreSQL, by URL.

SQLite runs in WAL mode with synchronous=NORMAL: a committed memory survives a crash of this process
(what the store promises); an OS crash or power loss may lose the last few commits. An in-memory SQLite URL
(`sqlite://` or `sqlite:///:memory:`, for tests and notebooks) is one connection that every thread shares, one
user at a time; it lives as long as the engine and persists nothing. Foreign keys are switched on and
writers wait up to 30 s for the lock instead of failing. This module runs no queries of its own beyond the
pragmas and the Alembic upgrade to the newest revision.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(database_url: str) -> Engine:
    """An engine for `database_url` (sqlite:///path, sqlite:// in memory, or postgresql+psycopg://...)."""
    if not isinstance(database_url, str) or not database_url:
        raise ValueError(f"database_url: expected a non-empty URL string, got {database_url!r}")
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ValueError(f"database_url: cannot parse {database_url!r}: {exc}") from exc
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            # One connection shared by every thread (the store's thread pool): each new connection to
            # `sqlite://` would be a different, empty database.
            engine = create_engine(url, poolclass=_OneUserPool, connect_args={"check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"database_url: expected sqlite or postgresql, got {url.get_backend_name()!r}")
    return create_engine(url, pool_pre_ping=True)


class _OneUserPool(StaticPool):
    """StaticPool (one connection for the engine's life) that hands the connection to one checkout at a time:
    a second thread waits until the first returns it, so two threads' transactions never interleave on it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._user = threading.Lock()

    def _do_get(self):
        self._user.acquire()
        try:
            return super()._do_get()
        except BaseException:
            self._user.release()
            raise

    def _do_return_conn(self, record) -> None:
        super()._do_return_conn(record)
        self._user.release()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def upgrade_schema(engine: Engine) -> None:
    """Bring the database to the newest Alembic revision (creates everything on a fresh database)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None before the first upgrade)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()

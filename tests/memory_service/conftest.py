"""Database fixtures for the memory-service tests: a SQLite file per test, and a fresh PostgreSQL schema per
test (dropped afterwards) on the server at ENGRAM_TEST_POSTGRES_URL (default 127.0.0.1:5432, database test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

POSTGRES_URL = os.environ.get("ENGRAM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_admin():
    """An engine on the test PostgreSQL server; skips the PostgreSQL cases if it cannot be reached."""
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}: {exc.orig}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin) -> Iterator[str]:
    """URL of a schema of its own on the test server (its search_path), dropped after the test."""
    schema = f"agent_memory_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with postgres_admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """Each test that takes this runs twice: on a SQLite file and on a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'agent_memory.sqlite3'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_store(database_url):
    """open_store(embedder=HashingEmbedder(64), **settings) -> AgentMemoryStore on `database_url`; every
    store opened is closed after the test (before its database is dropped)."""
    from memory_service.agent_memory import AgentMemoryStore, HashingEmbedder

    stores = []

    def open_(embedder=None, **settings):
        store = AgentMemoryStore(database_url, embedder or HashingEmbedder(64), **settings)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, loaded once for the session."""
    from memory_service.agent_memory import MiniLMEmbedder

    return MiniLMEmbedder(batch_size=128)

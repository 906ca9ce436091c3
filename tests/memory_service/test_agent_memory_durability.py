"""The database is the source of truth (SQLite and PostgreSQL): restart gives the same search results from
an index rebuilt out of the database, a crash between commit and index update loses nothing, concurrent
retries of one idempotency key make one row, and the Alembic migrations build exactly the declared schema."""

from __future__ import annotations

import threading
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from memory_service.agent_memory import AgentMemoryStore, HashingEmbedder, MemoryNotFound, VectorIndex
from memory_service.agent_memory.models import Base

QUERIES = ("where does the user live", "favourite food", "project deadline", "the cat")
FACTS = ["the user lives in Lisbon", "the user's favourite food is ramen", "the project deadline is March 3",
         "the cat is called Miso", "the user dislikes early meetings", "the deadline for taxes is April",
         "ramen shop on the corner closes at ten", "Lisbon trip booked for May"]


def snapshot(store, tenant="t", agent="a"):
    return [[(h.memory.id, round(h.score, 5)) for h in store.search(tenant, agent, q, k=4)] for q in QUERIES]


def count_rows(url: str, where: str = "") -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT COUNT(*) FROM memories {where}")).scalar_one()
    finally:
        engine.dispose()


def test_restart_returns_the_same_search_results(open_store):
    store = open_store(hnsw_threshold=6)
    for i, fact in enumerate(FACTS):
        store.write("t", "a", fact, kind=("fact", "episode")[i % 2])
    store.delete("t", store.list("t").items[0].id)
    before = snapshot(store)
    stats = store.index_stats()
    store.close()
    reopened = open_store(hnsw_threshold=6)
    assert reopened.index_stats() == {key: {**value, "tombstones": 0} for key, value in stats.items()}
    assert snapshot(reopened) == before


def test_index_is_rebuilt_from_rows_the_store_never_saw(open_store, database_url):
    embedder = HashingEmbedder(64)
    store = open_store(embedder)
    store.write("t", "a", "first memory")
    store.close()
    engine = create_engine(database_url)
    with engine.begin() as connection:  # rows written behind the store's back: one current, one stale model
        for memory_id, body, blob, model in (
                (str(uuid.uuid4()), "inserted directly with sql", embedder.embed(["inserted directly with sql"])[0]
                 .tobytes(), embedder.name),
                (str(uuid.uuid4()), "embedded by an older model", b"\x00" * 12, "old-model")):
            connection.execute(text(
                "INSERT INTO memories (id, tenant_id, agent_id, kind, text, metadata, embedding, embedding_model, "
                "created_at, updated_at) VALUES (:id, 't', 'a', 'fact', :text, '{}', :blob, :model, "
                "'2024-01-01 00:00:00', '2024-01-01 00:00:00')"),
                {"id": memory_id, "text": body, "blob": blob, "model": model})
    engine.dispose()
    reopened = open_store(embedder)
    assert reopened.search("t", "a", "inserted directly with sql", k=1)[0].score == pytest.approx(1.0)
    assert reopened.search("t", "a", "embedded by an older model", k=1)[0].score == pytest.approx(1.0)
    assert count_rows(database_url, f"WHERE embedding_model = '{embedder.name}'") == 3


class Crash(BaseException):
    """Stands in for the process dying: not an Exception, so nothing on the way out handles it."""


def test_crash_between_commit_and_index_add_loses_nothing(open_store, monkeypatch):
    store = open_store()
    store.write("t", "a", "written before the crash")
    real_add = VectorIndex.add

    def crash_once(self, ids, vectors):
        monkeypatch.setattr(VectorIndex, "add", real_add)
        raise Crash

    monkeypatch.setattr(VectorIndex, "add", crash_once)
    with pytest.raises(Crash):
        store.write("t", "a", "committed but never indexed")
    assert "committed but never indexed" not in [h.memory.text for h in store.search("t", "a", "committed", k=5)]
    store.close()
    reopened = open_store()
    assert reopened.search("t", "a", "committed but never indexed", k=1)[0].memory.text == \
        "committed but never indexed"


def test_failed_index_update_heals_from_the_database_without_restart(open_store, monkeypatch):
    store = open_store()
    store.write("t", "a", "an older memory")
    real_add = VectorIndex.add

    def fail_once(self, ids, vectors):
        monkeypatch.setattr(VectorIndex, "add", real_add)
        raise RuntimeError("index out of memory")

    monkeypatch.setattr(VectorIndex, "add", fail_once)
    written = store.write("t", "a", "indexed on the next search")
    assert store.index_stats()[("t", "a")] == {"kind": "stale"}
    assert store.search("t", "a", "indexed on the next search", k=1)[0].memory.id == written.id
    assert store.index_stats()[("t", "a")]["vectors"] == 2


def test_concurrent_retries_of_one_key_make_one_memory(open_store, database_url):
    stores = [open_store(), open_store()]  # two stores on one database: the unique constraint decides
    barrier = threading.Barrier(20)
    results, errors = [None] * 20, []

    def retry(n: int) -> None:
        try:
            barrier.wait()
            results[n] = stores[n % 2].write("t", "a", "pay the invoice", idempotency_key="req-42",
                                             metadata={"attempt": n})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=retry, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({r.id for r in results}) == 1 and len({r.metadata["attempt"] for r in results}) == 1
    assert count_rows(database_url) == 1
    assert stores[0].write("t", "a", "a late retry", idempotency_key="req-42") == results[0]


def test_concurrent_writes_deletes_and_searches_leave_index_equal_to_database(open_store, database_url):
    store = open_store(hnsw_threshold=40)
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                memory = store.write("t", "a", f"writer {n} note {i} about topic {i % 5}")
                if i % 3 == 0:
                    store.delete("t", memory.id)
                elif i % 3 == 1:
                    store.update("t", memory.id, text=f"writer {n} revised note {i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def searcher() -> None:
        try:
            for i in range(40):
                store.search("t", "a", f"note about topic {i % 5}", k=5, hybrid=i % 2 == 0)
        except MemoryNotFound:  # before the first write the agent does not exist yet
            pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + \
        [threading.Thread(target=searcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = count_rows(database_url)
    assert rows == 3 * 16 and store.index_stats()[("t", "a")]["vectors"] == rows
    texts = {h.memory.text for h in store.search("t", "a", "writer note", k=1000)}
    assert texts == {r.text for r in store.list("t", limit=1000).items}
    assert store.index_stats()[("t", "a")]["kind"] == "hnsw"


def test_migrations_create_exactly_the_declared_schema(open_store, database_url):
    open_store()
    open_store()  # a second start is a no-op upgrade
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            assert context.get_current_revision() == "0001_initial"
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_store_refuses_unusable_database_urls(tmp_path):
    # (an in-memory sqlite:// URL works: test_api_edges)
    for url, match in (("", "database_url"), ("mysql://x/y", "sqlite or postgresql")):
        with pytest.raises(ValueError, match=match):
            AgentMemoryStore(url, HashingEmbedder(16))


def raw_rows(url: str) -> list[tuple]:
    """Every column of every memory as the database holds it (SQLite storage classes included)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            columns = [c.name for c in Base.metadata.tables["memories"].columns]
            select_list = ", ".join(f"{c}, typeof({c})" for c in columns)
            return [tuple(row) for row in connection.execute(text(f"SELECT {select_list} FROM memories ORDER BY id"))]
    finally:
        engine.dispose()


def test_sqlite_writes_store_exactly_what_sqlalchemy_core_stores(tmp_path):
    """On SQLite the store inserts on a DBAPI connection of its own (statements compiled once, parameters
    through the column types' bind processors): the same values give the same stored bytes and storage
    classes as SQLAlchemy Core's INSERT, and the agent's tenant and agent rows are made in that transaction."""
    from memory_service.agent_memory.store import INSERT_MEMORY

    fast_url, core_url = (f"sqlite:///{tmp_path / name}" for name in ("fast.sqlite3", "core.sqlite3"))
    store = AgentMemoryStore(fast_url, HashingEmbedder(16))
    captured = []
    real_insert = store._insert
    store._insert = lambda key, rows, now: (captured.extend(dict(r) for r in rows), real_insert(key, rows, now))
    store.write("t", "a", "one memory", kind="episode", metadata={"k": [1, "é", None]}, idempotency_key="key-1",
                source_session="s-1", source_step=7)
    store.write_many("t", "b", ["a second", {"text": "a third", "metadata": {"n": 1.5}}])
    assert store.search("t", "b", "a third", k=1)[0].memory.metadata == {"n": 1.5}
    store.close()
    core = AgentMemoryStore(core_url, HashingEmbedder(16))  # makes the schema; then rows through Core only
    core.close()
    engine = create_engine(core_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tenants (id, created_at) VALUES ('t', '2024-01-01 00:00:00.000000')"))
        for agent in ("a", "b"):
            connection.execute(text("INSERT INTO agents (tenant_id, id, created_at) "
                                    f"VALUES ('t', '{agent}', '2024-01-01 00:00:00.000000')"))
        for row in captured:
            connection.execute(INSERT_MEMORY, row)
    engine.dispose()
    assert len(captured) == 3 and raw_rows(fast_url) == raw_rows(core_url)
    assert count_rows(fast_url) == 3


def test_sqlite_insert_error_rolls_back_and_the_store_keeps_writing(tmp_path, monkeypatch):
    """A failed INSERT on the store's own SQLite connection is SQLAlchemy's IntegrityError, writes nothing
    and leaves the connection usable; threads writing to many agents at once all land, once each."""
    from sqlalchemy.exc import IntegrityError

    url = f"sqlite:///{tmp_path / 'memory.sqlite3'}"
    store = AgentMemoryStore(url, HashingEmbedder(16))
    first = store.write("t", "a", "the first write", idempotency_key="req-1")
    monkeypatch.setattr(store, "_by_keys", lambda tenant, keys: {})  # as if another process took the key
    with pytest.raises(IntegrityError):
        store.write("t", "a", "a retry that misses the earlier row", idempotency_key="req-1")
    with pytest.raises(IntegrityError):
        store.write_many("t", "a", [{"text": "a batch", "idempotency_key": "req-1"}, "fresh"])
    monkeypatch.undo()
    assert store.write("t", "a", "written after the failures").text == "written after the failures"
    assert count_rows(url) == 2 and store.get("t", first.id) == first
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                store.write("t", f"agent-{n}", f"memory {i} of agent {n}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert count_rows(url) == 2 + 80
    for n in range(8):
        assert len(store.list("t", f"agent-{n}", limit=50).items) == 10
        assert store.index_stats()[("t", f"agent-{n}")]["vectors"] == 10
    store.close()

"""AgentMemoryStore: agents' long-term memory (facts, episodes, summaries), written and searched by agents.

The database is the source of truth. A write commits its row first and only then touches the in-memory
indexes (one `VectorIndex`, and once hybrid search has been used one `KeywordIndex`, per (tenant, agent)),
so a crash between the two loses nothing: indexes are rebuilt from the database at start, and an index
update that fails marks that agent's indexes stale, to be rebuilt from the database on its next search.
Search results are always read back from the database, so an index entry whose row is gone never surfaces.
Every call is scoped by tenant: another tenant's memory id, or agent name, behaves exactly like a missing
one. Search on an agent that has never written (or was forgotten) returns no hits; list on one raises
MemoryNotFound; `forget_agent` of an unknown agent returns 0 (forgetting is idempotent).

Writes to one agent are serialised in this process (its lock spans the commit and the index update, so
the index applies changes in commit order). One process owns the indexes: another process writing to the
same database is seen by this one only after a restart. Not here: embedding model choice, HTTP, Ray."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from memory_service.agent_memory import validation as check
from memory_service.agent_memory.database import make_engine, upgrade_schema
from memory_service.agent_memory.embedder import Embedder
from memory_service.agent_memory.index import VectorIndex
from memory_service.agent_memory.keywords import KeywordIndex
from memory_service.agent_memory.models import Agent, Memory, Tenant
from memory_service.agent_memory.records import (
    MemoryHit,
    MemoryNotFound,
    MemoryPage,
    MemoryRecord,
    MemoryValidationError,
)
from memory_service.agent_memory.sqlite_inserts import SqliteInserts

log = logging.getLogger(__name__)
RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)
REEMBED_BATCH = 256

AgentKey = tuple[str, str]  # (tenant, agent)


@dataclass
class _AgentIndexes:
    """The in-memory indexes of one agent; None = stale or not built, rebuilt from the database on use.
    `lock` guards the indexes (searches and updates); the store's per-agent write lock, taken first, orders
    commits and their index updates."""

    vectors: VectorIndex | None = None
    keywords: KeywordIndex | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# What reads select: every column but the embedding, as plain rows (no ORM identity map on the read path).
RECORD_COLUMNS = (Memory.id, Memory.tenant_id, Memory.agent_id, Memory.kind, Memory.text, Memory.meta.label("meta"),
                  Memory.source_session, Memory.source_step, Memory.created_at, Memory.updated_at,
                  Memory.idempotency_key)


# Statements built once (SQLAlchemy caches their compiled form): the hot paths run Core, not the ORM.
INSERT_MEMORY = insert(Memory.__table__)  # parameters by column name
READ_ROWS = select(*RECORD_COLUMNS).where(Memory.id.in_(bindparam("ids", expanding=True)))
WRITE_FIELDS = frozenset({"text", "kind", "metadata", "idempotency_key", "source_session", "source_step"})


def _record_of(values: dict[str, Any]) -> MemoryRecord:
    """The record of a row just inserted, from its INSERT parameters (no read back)."""
    return MemoryRecord(
        id=values["id"], tenant=values["tenant_id"], agent=values["agent_id"], kind=values["kind"],
        text=values["text"], metadata=values["metadata"], source_session=values["source_session"],
        source_step=values["source_step"], created_at=values["created_at"].replace(tzinfo=UTC),
        updated_at=values["updated_at"].replace(tzinfo=UTC), idempotency_key=values["idempotency_key"])


def _record(row: Any) -> MemoryRecord:
    """A Memory object or a row of RECORD_COLUMNS -> MemoryRecord."""
    return MemoryRecord(
        id=row.id, tenant=row.tenant_id, agent=row.agent_id, kind=row.kind, text=row.text, metadata=row.meta,
        source_session=row.source_session, source_step=row.source_step,
        created_at=row.created_at.replace(tzinfo=UTC), updated_at=row.updated_at.replace(tzinfo=UTC),
        idempotency_key=row.idempotency_key)


def _matches(meta: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(key in meta and meta[key] == value for key, value in wanted.items())


class AgentMemoryStore:
    """Long-term memory of many tenants' agents over one database (SQLite file or PostgreSQL URL)."""

    def __init__(self, database_url: str, embedder: Embedder, *, hnsw_threshold: int = 5000,
                 max_text_chars: int = 8000, use_gpu: bool | None = None) -> None:
        if not all(hasattr(embedder, attr) for attr in ("name", "dim", "embed")):
            raise TypeError("embedder: expected an Embedder (name, dim, embed(texts))")
        if not isinstance(max_text_chars, int) or max_text_chars < 1:
            raise ValueError(f"max_text_chars: expected a positive int, got {max_text_chars!r}")
        self.embedder = embedder
        self.max_text_chars = max_text_chars
        self._new_vector_index: Callable[[], VectorIndex] = lambda: VectorIndex(
            embedder.dim, hnsw_threshold=hnsw_threshold, use_gpu=use_gpu)
        self._new_vector_index()  # validates the index settings now rather than at the first write
        self._engine = make_engine(database_url)
        upgrade_schema(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._dialect = self._engine.dialect.name
        self._sqlite_inserts = SqliteInserts(self._engine) if self._dialect == "sqlite" else None
        self._agents: dict[AgentKey, _AgentIndexes] = {}  # every agent in the database
        self._write_locks: dict[AgentKey, threading.RLock] = {}
        self._registry_lock = threading.Lock()
        self._closed = False
        self._rebuild()

    # ---- lifecycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self._agents.clear()
        if self._sqlite_inserts is not None:
            self._sqlite_inserts.close()
        self._engine.dispose()

    def __enter__(self) -> AgentMemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("AgentMemoryStore is closed")

    def index_stats(self) -> dict[AgentKey, dict[str, Any]]:
        """Per (tenant, agent): index kind ('flat' / 'hnsw' / 'stale'), live vectors, tombstones."""
        return {key: {"kind": s.vectors.kind, "vectors": len(s.vectors), "tombstones": s.vectors.tombstones}
                if s.vectors is not None else {"kind": "stale"} for key, s in list(self._agents.items())}

    # ---- rebuilding indexes from the database ---------------------------------------------------------

    def _rebuild(self) -> None:
        """All agents' vector indexes from the database (at start)."""
        with self._sessions() as session:
            for tenant, agent in session.execute(select(Agent.tenant_id, Agent.id)):
                self._agents[(tenant, agent)] = _AgentIndexes(vectors=self._new_vector_index())
        for key, (ids, vectors) in self._load_vectors().items():
            self._agents.setdefault(key, _AgentIndexes(vectors=self._new_vector_index())).vectors.add(ids, vectors)

    def _load_vectors(self, where: Iterable = ()) -> dict[AgentKey, tuple[list[str], np.ndarray]]:
        """Stored embeddings grouped by agent; rows embedded by another model (or corrupt) are re-embedded
        and written back."""
        dim, model = self.embedder.dim, self.embedder.name
        grouped: dict[AgentKey, tuple[list[str], list[np.ndarray]]] = {}
        outdated: list[str] = []
        stmt = select(Memory.tenant_id, Memory.agent_id, Memory.id, Memory.embedding, Memory.embedding_model)
        with self._engine.connect() as connection:
            rows = connection.execution_options(stream_results=True, yield_per=4096).execute(stmt.where(*where))
            for tenant, agent, memory_id, blob, blob_model in rows:
                vector = np.frombuffer(blob, np.float32) if len(blob) == 4 * dim else None
                if blob_model != model or vector is None or not np.isfinite(vector).all():
                    outdated.append(memory_id)
                    continue
                ids, vectors = grouped.setdefault((tenant, agent), ([], []))
                ids.append(memory_id)
                vectors.append(vector)
        for start in range(0, len(outdated), REEMBED_BATCH):
            for key, memory_id, vector in self._reembed(outdated[start:start + REEMBED_BATCH]):
                ids, vectors = grouped.setdefault(key, ([], []))
                ids.append(memory_id)
                vectors.append(vector)
        return {key: (ids, np.stack(vectors)) for key, (ids, vectors) in grouped.items()}

    def _reembed(self, memory_ids: list[str]) -> list[tuple[AgentKey, str, np.ndarray]]:
        with self._sessions.begin() as session:
            rows = session.execute(select(Memory.tenant_id, Memory.agent_id, Memory.id, Memory.text)
                                   .where(Memory.id.in_(memory_ids))).all()
            vectors = self._embed([row.text for row in rows], "text")
            for row, vector in zip(rows, vectors):
                session.execute(update(Memory).where(Memory.id == row.id).values(
                    embedding=vector.tobytes(), embedding_model=self.embedder.name))
        log.info("re-embedded %d memories with %s", len(rows), self.embedder.name)
        return [((row.tenant_id, row.agent_id), row.id, vector) for row, vector in zip(rows, vectors)]

    def _vectors(self, key: AgentKey, state: _AgentIndexes) -> VectorIndex:
        """The agent's vector index, rebuilt from the database if stale (call with state.lock held)."""
        if state.vectors is None:
            index = self._new_vector_index()
            loaded = self._load_vectors([Memory.tenant_id == key[0], Memory.agent_id == key[1]])
            if key in loaded:
                index.add(*loaded[key])
            state.vectors = index
        return state.vectors

    def _keywords(self, key: AgentKey, state: _AgentIndexes) -> KeywordIndex:
        """The agent's keyword index, built from the database texts on first use (call with state.lock held)."""
        if state.keywords is None:
            index = KeywordIndex()
            with self._sessions() as session:
                for memory_id, text in session.execute(select(Memory.id, Memory.text).where(
                        Memory.tenant_id == key[0], Memory.agent_id == key[1])):
                    index.add(memory_id, text)
            state.keywords = index
        return state.keywords

    def _apply(self, key: AgentKey, memory_id: str, vector: np.ndarray | None, text: str | None) -> None:
        """Mirror one committed change into the agent's indexes (vector None: the memory was deleted)."""
        state = self._state(key)
        with state.lock:
            try:
                if state.vectors is not None:
                    if vector is None:
                        state.vectors.remove([memory_id])
                    else:
                        state.vectors.add([memory_id], vector[None])
                if state.keywords is not None:
                    if text is None:
                        state.keywords.remove(memory_id)
                    else:
                        state.keywords.add(memory_id, text)
            except Exception:
                log.exception("index update of memory %s failed; agent %s indexes will be rebuilt", memory_id, key)
                state.vectors = state.keywords = None

    def _apply_many(self, key: AgentKey, memory_ids: list[str], vectors: np.ndarray, texts: list[str]) -> None:
        """Mirror committed inserts (new ids) into the agent's indexes in one index call."""
        state = self._state(key)
        with state.lock:
            try:
                if state.vectors is not None:
                    state.vectors.add(memory_ids, vectors)
                if state.keywords is not None:
                    for memory_id, text in zip(memory_ids, texts):
                        state.keywords.add(memory_id, text)
            except Exception:
                log.exception("index update of %d memories failed; agent %s indexes will be rebuilt",
                              len(memory_ids), key)
                state.vectors = state.keywords = None

    # ---- helpers ---------------------------------------------------------------------------------------

    def _write_lock(self, key: AgentKey) -> threading.RLock:
        lock = self._write_locks.get(key)
        if lock is None:
            with self._registry_lock:
                lock = self._write_locks.setdefault(key, threading.RLock())
        return lock

    def _state(self, key: AgentKey) -> _AgentIndexes:
        state = self._agents.get(key)
        return state if state is not None else self._agents.setdefault(key, _AgentIndexes())

    def _embed(self, texts: list[str], field_name: str) -> np.ndarray:
        vectors = np.asarray(self.embedder.embed(texts))
        if vectors.shape != (len(texts), self.embedder.dim):
            raise ValueError(f"embedder: returned shape {vectors.shape} for {len(texts)} texts of dim "
                             f"{self.embedder.dim}")
        if not np.isfinite(vectors).all():
            raise MemoryValidationError(f"{field_name}: its embedding is not finite (NaN or inf)")
        if (np.linalg.norm(vectors, axis=1) < 1e-6).any():
            raise MemoryValidationError(f"{field_name}: its embedding is the zero vector")
        return vectors.astype(np.float32)

    def _find(self, session: Session, tenant: str, memory_id: str) -> Memory:
        row = session.get(Memory, memory_id)
        if row is None or row.tenant_id != tenant:
            raise MemoryNotFound(f"memory {memory_id!r} not found")
        return row

    def _by_key(self, tenant: str, key: str) -> MemoryRecord | None:
        return self._by_keys(tenant, [key]).get(key)

    def _insert(self, key: AgentKey, rows: list[dict[str, Any]], now: datetime) -> None:
        """Commit new memories' rows (INSERT parameters by column name) in one transaction, with the agent's
        tenant and agent rows first if this store has not seen the agent."""
        new_agent = None if key in self._agents else (key[0], key[1], now)
        if self._sqlite_inserts is not None:
            self._sqlite_inserts.insert(rows, new_agent)
            return
        with self._engine.begin() as connection:
            if new_agent is not None:
                self._ensure_agent(connection, *new_agent)
            connection.execute(INSERT_MEMORY, rows[0] if len(rows) == 1 else rows)

    def _ensure_agent(self, session: Session | Any, tenant: str, agent: str, now: datetime) -> None:
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        session.execute(insert(Tenant).values(id=tenant, created_at=now).on_conflict_do_nothing())
        session.execute(insert(Agent).values(tenant_id=tenant, id=agent, created_at=now).on_conflict_do_nothing())

    # ---- API -------------------------------------------------------------------------------------------

    def write(self, tenant: str, agent: str, text: str, *, kind: str = "fact", metadata: dict | None = None,
              idempotency_key: str | None = None, source_session: str | None = None,
              source_step: int | None = None, vector: np.ndarray | None = None) -> MemoryRecord:
        """Store a memory. With an idempotency key (unique per tenant), a retried write returns the memory
        the first write made (whatever the retry's text), never a duplicate. `vector`: the text's embedding,
        computed beforehand by this store's embedder (bulk imports); it is checked and normalised, not
        recomputed."""
        self._open()
        key = (check.name(tenant, "tenant"), check.name(agent, "agent"))
        values = self._row_values(key, dict(text=text, kind=kind, metadata=metadata, idempotency_key=idempotency_key,
                                            source_session=source_session, source_step=source_step))
        if idempotency_key is not None and (earlier := self._by_key(tenant, idempotency_key)) is not None:
            return earlier
        if vector is None:
            vector = self._embed([values["text"]], "text")[0]
        else:
            vector = self._given_vectors(np.asarray(vector)[None], 1, "vector")[0]
        values["embedding"] = vector.tobytes()
        with self._write_lock(key):
            values["created_at"] = values["updated_at"] = _now()
            try:
                self._insert(key, [values], values["created_at"])
            except IntegrityError:
                earlier = None if idempotency_key is None else self._by_key(tenant, idempotency_key)
                if earlier is None:
                    raise
                return earlier
            if key not in self._agents:
                self._agents[key] = _AgentIndexes(vectors=self._new_vector_index())
            self._apply(key, values["id"], vector, values["text"])
        return _record_of(values)

    def write_many(self, tenant: str, agent: str, items: Sequence[str | Mapping[str, Any]], *,
                   vectors: np.ndarray | None = None) -> list[MemoryRecord]:
        """Store many memories of one agent in one transaction and one embedder call: `items` are texts, or
        dicts of `write`'s keyword arguments (text, kind, metadata, idempotency_key, source_session,
        source_step). `vectors` [len(items), dim]: precomputed embeddings (as for `write`'s `vector`).
        Returns the records in item order; an item whose idempotency key was already used (before, or by an
        earlier item of the batch) gets that memory's record, as `write` would. All items are checked before
        anything is written: one bad item writes nothing."""
        self._open()
        key = (check.name(tenant, "tenant"), check.name(agent, "agent"))
        if isinstance(items, (str, Mapping)) or not isinstance(items, Sequence):
            raise MemoryValidationError("items: expected a list of texts or of dicts of write() arguments")
        rows = []
        for n, item in enumerate(items):
            fields = {"text": item} if isinstance(item, str) else dict(item) if isinstance(item, Mapping) else None
            if fields is None or not set(fields) <= WRITE_FIELDS or "text" not in fields:
                raise MemoryValidationError(f"items[{n}]: expected a text or a dict with 'text' and any of "
                                            f"{sorted(WRITE_FIELDS - {'text'})}, got {item!r}")
            rows.append(self._row_values(key, fields, f"items[{n}]."))
        if vectors is not None:
            vectors = self._given_vectors(np.asarray(vectors), len(rows), "vectors")
        if not rows:
            return []
        records: list[MemoryRecord | None] = [None] * len(rows)
        first_of_key: dict[str, int] = {}
        fresh = []  # item positions to insert
        earlier = self._by_keys(tenant, [r["idempotency_key"] for r in rows if r["idempotency_key"] is not None])
        for n, row in enumerate(rows):
            idem = row["idempotency_key"]
            if idem is not None and idem in earlier:
                records[n] = earlier[idem]
            elif idem is not None and idem in first_of_key:
                continue  # filled from the first item with this key below
            else:
                if idem is not None:
                    first_of_key[idem] = n
                fresh.append(n)
        if fresh:
            new_vectors = vectors[fresh] if vectors is not None else \
                self._embed([rows[n]["text"] for n in fresh], "text")
            for n, vector in zip(fresh, new_vectors):
                rows[n]["embedding"] = vector.tobytes()
            with self._write_lock(key):
                now = _now()
                for n in fresh:
                    rows[n]["created_at"] = rows[n]["updated_at"] = now
                try:
                    self._insert(key, [rows[n] for n in fresh], now)
                except IntegrityError:  # a concurrent writer took one of the keys: one at a time, as write() does
                    given = dict(zip(fresh, new_vectors))
                    return [records[n] or self.write(
                        tenant, agent, row["text"], kind=row["kind"], metadata=row["metadata"],
                        idempotency_key=row["idempotency_key"], source_session=row["source_session"],
                        source_step=row["source_step"], vector=given.get(n)) for n, row in enumerate(rows)]
                if key not in self._agents:
                    self._agents[key] = _AgentIndexes(vectors=self._new_vector_index())
                self._apply_many(key, [rows[n]["id"] for n in fresh], np.stack(new_vectors),
                                 [rows[n]["text"] for n in fresh])
            for n in fresh:
                records[n] = _record_of(rows[n])
        for n, row in enumerate(rows):
            if records[n] is None:
                records[n] = records[first_of_key[row["idempotency_key"]]]
        return records  # type: ignore[return-value]

    def _row_values(self, key: AgentKey, fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """Checked INSERT parameters (by column name) of one memory, without embedding and timestamps."""
        try:
            return dict(
                id=str(uuid.uuid4()), tenant_id=key[0], agent_id=key[1],
                kind=check.kind(fields.get("kind", "fact")),
                text=check.text(fields.get("text"), "text", self.max_text_chars),
                metadata=check.metadata(fields.get("metadata")), embedding_model=self.embedder.name,
                source_session=check.optional_key(fields.get("source_session"), "source_session"),
                source_step=check.optional_step(fields.get("source_step")),
                idempotency_key=check.optional_key(fields.get("idempotency_key"), "idempotency_key"))
        except MemoryValidationError as exc:
            if not prefix:
                raise
            raise MemoryValidationError(f"{prefix}{exc}") from exc

    def _given_vectors(self, vectors: np.ndarray, rows: int, field_name: str) -> np.ndarray:
        """Precomputed embeddings [rows, dim]: finite, non-zero, returned as unit float32 rows."""
        if vectors.shape != (rows, self.embedder.dim) or not np.issubdtype(vectors.dtype, np.floating):
            raise MemoryValidationError(f"{field_name}: expected floats of shape {(rows, self.embedder.dim)}, got "
                                        f"{vectors.dtype} {vectors.shape}")
        vectors = vectors.astype(np.float32)
        if not np.isfinite(vectors).all():
            raise MemoryValidationError(f"{field_name}: not finite (NaN or inf)")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms < 1e-6).any():
            raise MemoryValidationError(f"{field_name}: a zero vector")
        return vectors / norms

    def _by_keys(self, tenant: str, keys: list[str]) -> dict[str, MemoryRecord]:
        if not keys:
            return {}
        stmt = select(*RECORD_COLUMNS).where(Memory.tenant_id == tenant, Memory.idempotency_key.in_(keys))
        with self._engine.connect() as connection:
            return {row.idempotency_key: _record(row) for row in connection.execute(stmt)}

    def get(self, tenant: str, memory_id: str) -> MemoryRecord:
        self._open()
        tenant, memory_id = check.name(tenant, "tenant"), check.memory_id(memory_id)
        with self._sessions() as session:
            row = session.execute(select(*RECORD_COLUMNS).where(Memory.id == memory_id)).one_or_none()
        if row is None or row.tenant_id != tenant:
            raise MemoryNotFound(f"memory {memory_id!r} not found")
        return _record(row)

    def search(self, tenant: str, agent: str, query: str, *, k: int = 5, kinds: Iterable[str] | None = None,
               metadata: dict | None = None, min_score: float | None = None, hybrid: bool = False,
               ) -> list[MemoryHit]:
        """The k memories of the agent most similar to the query (cosine of embeddings), optionally only of
        some kinds, with metadata equal to every given key/value, and scoring at least min_score. Hybrid
        ranks by reciprocal rank fusion of the vector ranking and a BM25 keyword ranking; min_score still
        bounds the cosine similarity."""
        self._open()
        key = (check.name(tenant, "tenant"), check.name(agent, "agent"))
        query = check.text(query, "query", self.max_text_chars)
        k, kinds = check.count(k, "k", check.MAX_K), check.kinds(kinds)
        wanted = check.metadata(metadata, "metadata")
        min_score = check.optional_score(min_score)
        state = self._agents.get(key)
        if state is None:  # an agent that never wrote (or was forgotten) has no memories: nothing matches
            return []
        vector = self._embed([query], "query")[0]
        filtered = kinds is not None or bool(wanted) or min_score is not None
        fetch = 4 * k if filtered else k
        while True:
            ranked, exhausted = self._ranked(key, state, vector, query, fetch, hybrid)
            hits, below_min = self._read_hits(key, ranked, kinds, wanted, min_score, ordered_by_cosine=not hybrid)
            if len(hits) >= k or exhausted or below_min:
                return hits[:k]
            fetch *= 4

    def _ranked(self, key: AgentKey, state: _AgentIndexes, vector: np.ndarray, query: str, fetch: int,
                hybrid: bool) -> tuple[list[tuple[str, float, float]], bool]:
        """Candidates (memory id, ranking score, cosine) best first, and whether they are all there are."""
        with state.lock:
            index = self._vectors(key, state)
            by_vector = index.search(vector, fetch) if len(index) else []
            exhausted = fetch >= len(index)
            if not hybrid:
                return [(memory_id, score, score) for memory_id, score in by_vector], exhausted
            by_keyword = self._keywords(key, state).search(query, fetch)
            fused: dict[str, float] = {}
            for ranking in (by_vector, by_keyword):
                for rank, (memory_id, _) in enumerate(ranking, start=1):
                    fused[memory_id] = fused.get(memory_id, 0.0) + 1.0 / (RRF_K + rank)
            cosine = dict(by_vector)
            missing = [memory_id for memory_id in fused if memory_id not in cosine and memory_id in index]
            if missing:
                cosine.update(zip(missing, (index.vectors_of(missing) @ vector).tolist()))
        order = sorted(fused, key=lambda memory_id: (-fused[memory_id], memory_id))
        return [(m, fused[m], cosine[m]) for m in order if m in cosine], exhausted

    def _read_hits(self, key: AgentKey, ranked: list[tuple[str, float, float]], kinds: set[str] | None,
                   wanted: dict[str, Any], min_score: float | None, ordered_by_cosine: bool,
                   ) -> tuple[list[MemoryHit], bool]:
        """Rows of the ranked candidates that pass the filters, in rank order; and whether a candidate fell
        under min_score in a cosine-ordered list (so no later one can pass)."""
        if not ranked:
            return [], False
        # Only the primary key in SQL: with tenant/agent there too, SQLite's planner may scan the agent's rows.
        with self._engine.connect() as connection:
            result = connection.execute(READ_ROWS, {"ids": [memory_id for memory_id, _, _ in ranked]})
            rows = {row.id: row for row in result if (row.tenant_id, row.agent_id) == key
                    and (kinds is None or row.kind in kinds)}
        hits = []
        for memory_id, score, cosine in ranked:
            if min_score is not None and cosine < min_score:
                if ordered_by_cosine:
                    return hits, True
                continue
            row = rows.get(memory_id)
            if row is not None and _matches(row.meta, wanted):
                hits.append(MemoryHit(_record(row), score))
        return hits, False

    def list(self, tenant: str, agent: str | None = None, *, kinds: Iterable[str] | None = None, limit: int = 50,
             cursor: str | None = None) -> MemoryPage:
        """The tenant's memories (of one agent if given), oldest first, `limit` per page."""
        self._open()
        tenant = check.name(tenant, "tenant")
        limit, kinds = check.count(limit, "limit", check.MAX_PAGE), check.kinds(kinds)
        stmt = select(*RECORD_COLUMNS).where(Memory.tenant_id == tenant)
        if agent is not None:
            stmt = stmt.where(Memory.agent_id == check.name(agent, "agent"))
        if kinds is not None:
            stmt = stmt.where(Memory.kind.in_(sorted(kinds)))
        if cursor is not None:
            after_time, after_id = _decode_cursor(cursor)
            stmt = stmt.where(or_(Memory.created_at > after_time,
                                  and_(Memory.created_at == after_time, Memory.id > after_id)))
        with self._sessions() as session:
            if agent is not None and session.get(Agent, (tenant, agent)) is None:
                raise MemoryNotFound(f"agent {agent!r} not found")
            rows = session.execute(stmt.order_by(Memory.created_at, Memory.id).limit(limit + 1)).all()
        items = [_record(row) for row in rows[:limit]]
        next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return MemoryPage(items=items, next_cursor=next_cursor)

    def update(self, tenant: str, memory_id: str, *, text: str | None = None,
               metadata: dict | None = None) -> MemoryRecord:
        """Replace a memory's text (re-embedded) and/or its whole metadata object."""
        self._open()
        tenant, memory_id = check.name(tenant, "tenant"), check.memory_id(memory_id)
        if text is None and metadata is None:
            raise MemoryValidationError("text/metadata: give at least one to update")
        text = None if text is None else check.text(text, "text", self.max_text_chars)
        new_meta = None if metadata is None else check.metadata(metadata)
        current = self.get(tenant, memory_id)
        vector = None if text is None else self._embed([text], "text")[0]
        key = (tenant, current.agent)
        with self._write_lock(key):
            with self._sessions.begin() as session:
                row = self._find(session, tenant, memory_id)
                if text is not None:
                    row.text, row.embedding, row.embedding_model = text, vector.tobytes(), self.embedder.name
                if new_meta is not None:
                    row.meta = new_meta
                row.updated_at = max(_now(), row.updated_at)
            if vector is not None:
                self._apply(key, memory_id, vector, text)
        return _record(row)

    def delete(self, tenant: str, memory_id: str) -> None:
        self._open()
        tenant, memory_id = check.name(tenant, "tenant"), check.memory_id(memory_id)
        key = (tenant, self.get(tenant, memory_id).agent)
        with self._write_lock(key):
            with self._sessions.begin() as session:
                gone = session.execute(delete(Memory).where(Memory.id == memory_id, Memory.tenant_id == tenant))
                if gone.rowcount == 0:
                    raise MemoryNotFound(f"memory {memory_id!r} not found")
            self._apply(key, memory_id, None, None)

    def forget_agent(self, tenant: str, agent: str) -> int:
        """Delete the agent and all its memories; returns how many memories were deleted (0 if unknown)."""
        self._open()
        key = (check.name(tenant, "tenant"), check.name(agent, "agent"))
        with self._write_lock(key):
            with self._sessions.begin() as session:
                gone = session.execute(delete(Memory).where(Memory.tenant_id == tenant, Memory.agent_id == agent))
                session.execute(delete(Agent).where(Agent.tenant_id == tenant, Agent.id == agent))
            self._agents.pop(key, None)
        return gone.rowcount


def _encode_cursor(row: Any) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_cursor(cursor: object) -> tuple[datetime, str]:
    try:
        created, memory_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))  # type: ignore[union-attr]
        return datetime.fromisoformat(created), str(memory_id)
    except (AttributeError, binascii.Error, ValueError, TypeError) as exc:
        raise MemoryValidationError(f"cursor: not a cursor returned by list(): {cursor!r}") from exc

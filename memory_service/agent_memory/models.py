"""SQLAlchemy 2.x tables of long-term agent memory: tenants, their agents, and the agents' memories.

The database is the source of truth for memory; the vector and keyword indexes are rebuilt from it.
This module only declares the schema (the Alembic migrations create it); it runs no queries.
Timestamps are stored as naive UTC (SQLite has no time zones); the store attaches UTC on the way out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MEMORY_KINDS = ("fact", "episode", "summary")
NAME_CHARS = 128  # longest tenant / agent name
KEY_CHARS = 255  # longest idempotency key / source session


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime())


class Agent(Base):
    """An agent is named within its tenant: (tenant_id, id) is the key."""

    __tablename__ = "agents"

    tenant_id: Mapped[str] = mapped_column(
        String(NAME_CHARS), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[str] = mapped_column(String(NAME_CHARS), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime())


class Memory(Base):
    """One memory: its text, a JSON metadata object and the float32 embedding of the text (dim * 4 bytes,
    made by `embedding_model`)."""

    __tablename__ = "memories"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "agent_id"], ["agents.tenant_id", "agents.id"], ondelete="CASCADE",
                             name="fk_memories_agent"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_memories_tenant_idempotency_key"),
        CheckConstraint("kind IN ('fact', 'episode', 'summary')", name="ck_memories_kind"),
        Index("ix_memories_tenant_agent_created", "tenant_id", "agent_id", "created_at", "id"),
        Index("ix_memories_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4 text
    tenant_id: Mapped[str] = mapped_column(String(NAME_CHARS))
    agent_id: Mapped[str] = mapped_column(String(NAME_CHARS))
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    # "metadata" is reserved on declarative classes, so the attribute is `meta` over a column named metadata.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    embedding: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    embedding_model: Mapped[str] = mapped_column(String(KEY_CHARS))
    source_session: Mapped[str | None] = mapped_column(String(KEY_CHARS))
    source_step: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime())
    updated_at: Mapped[datetime] = mapped_column(DateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(KEY_CHARS))

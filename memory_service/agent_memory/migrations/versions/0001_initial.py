"""Initial agent-memory schema: tenants, agents, memories.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("tenant_id", sa.String(128), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "memories",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("embedding_model", sa.String(255), nullable=False),
        sa.Column("source_session", sa.String(255), nullable=True),
        sa.Column("source_step", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id", "agent_id"], ["agents.tenant_id", "agents.id"], ondelete="CASCADE",
                                name="fk_memories_agent"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_memories_tenant_idempotency_key"),
        sa.CheckConstraint("kind IN ('fact', 'episode', 'summary')", name="ck_memories_kind"),
    )
    op.create_index("ix_memories_tenant_agent_created", "memories", ["tenant_id", "agent_id", "created_at", "id"])
    op.create_index("ix_memories_tenant_created", "memories", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_table("memories")
    op.drop_table("agents")
    op.drop_table("tenants")

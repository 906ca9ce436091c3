"""Alembic migrations of the agent-memory schema (run by `database.upgrade_schema`, not by an alembic.ini)."""

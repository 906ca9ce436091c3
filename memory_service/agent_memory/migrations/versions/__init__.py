"""Alembic revision scripts of the agent-memory schema, oldest first."""

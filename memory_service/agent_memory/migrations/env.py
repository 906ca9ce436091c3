"""Alembic environment: runs migrations on the connection handed over in `config.attributes["connection"]`
(what `database.upgrade_schema` does), or on an engine made from `sqlalchemy.url` (the alembic command line).
No logging setup here: the service configures logging, not its migrations."""

from alembic import context
from sqlalchemy import create_engine

from memory_service.agent_memory.models import Base

target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        run_migrations(connection)
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("agent-memory migrations run online only (see database.upgrade_schema)")
run_online()

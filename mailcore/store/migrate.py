"""Running Alembic migrations from code (blocking; call on a pool thread)."""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# Alembic keeps the running migration in module globals (alembic.context, alembic.op), so two
# migrations in two threads at once (two Databases opening) corrupt each other: one at a time.
_ALEMBIC_LOCK = threading.Lock()


def upgrade_to_head(engine: Engine) -> None:
    """Bring the database at `engine` to the newest revision. Blocks."""
    with _ALEMBIC_LOCK, engine.connect() as conn:
        # A migration is DDL plus data; on SQLite take the write lock for all of it.
        with conn.begin():
            command.upgrade(alembic_config(conn), "head")


def downgrade_to(engine: Engine, revision: str) -> None:
    """Take the database at `engine` down to `revision` ("base": empty). Blocks."""
    with _ALEMBIC_LOCK, engine.connect() as conn, conn.begin():
        command.downgrade(alembic_config(conn), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()

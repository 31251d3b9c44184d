"""Running Alembic migrations from code (blocking; call on a pool thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _without_foreign_keys(conn: Connection) -> Iterator[None]:
    """SQLite: foreign keys off while the migrations run (outside their transaction: SQLite
    ignores the pragma inside one). A migration that rebuilds a table (a copy, then DROP
    TABLE of the old one) would otherwise delete the rows of every table referencing it
    with ON DELETE CASCADE, as DROP TABLE first deletes every row. A migration that rebuilds
    a table checks its keys itself (`PRAGMA foreign_key_check`)."""
    if conn.dialect.name != "sqlite":
        yield
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        driver.execute("PRAGMA foreign_keys=ON")


def upgrade_to_head(engine: Engine) -> None:
    """Bring the database at `engine` to the newest revision. Blocks."""
    upgrade_to(engine, "head")


def upgrade_to(engine: Engine, revision: str) -> None:
    """Bring the database at `engine` up to `revision`. Blocks."""
    with _ALEMBIC_LOCK, engine.connect() as conn, _without_foreign_keys(conn):
        # A migration is DDL plus data; on SQLite take the write lock for all of it.
        with conn.begin():
            command.upgrade(alembic_config(conn), revision)


def downgrade_to(engine: Engine, revision: str) -> None:
    """Take the database at `engine` down to `revision` ("base": empty). Blocks."""
    with _ALEMBIC_LOCK, engine.connect() as conn, _without_foreign_keys(conn), conn.begin():
        command.downgrade(alembic_config(conn), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()

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
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, text

from mailcore.config import ConfigError

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

# PostgreSQL: the key of the advisory lock that serialises migrations across processes (two
# nodes starting at once on one database). Any constant bigint; this one spells "mailcore".
_PG_MIGRATION_LOCK = 0x6D61696C636F7265


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
    """Bring the database at `engine` up to `revision`. Blocks.

    One process at a time migrates a database: on PostgreSQL the migration transaction
    first takes an advisory lock, so a node starting beside another one waits for it and
    then finds the schema at head. A schema newer than this code knows is a ConfigError."""
    with _ALEMBIC_LOCK, engine.connect() as conn, _without_foreign_keys(conn):
        # A migration is DDL plus data; on SQLite take the write lock for all of it.
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Released when the transaction ends (commit or rollback).
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _PG_MIGRATION_LOCK})
            cfg = alembic_config(conn)
            _refuse_unknown_revision(conn, cfg)
            try:
                command.upgrade(cfg, revision)
            except CommandError as e:
                raise ConfigError(f"cannot migrate the database: {_first_line(e)}") from None


def _refuse_unknown_revision(conn: Connection, cfg: AlembicConfig) -> None:
    """ConfigError when the database is at a revision this code does not have: a newer
    Mailcore migrated it (Alembic would fail with a traceback)."""
    script = ScriptDirectory.from_config(cfg)
    known = {s.revision for s in script.walk_revisions()}
    for current in MigrationContext.configure(conn).get_current_heads():
        if current not in known:
            raise ConfigError(
                f"the database schema is at revision {current}, newer than this version of "
                f"Mailcore knows (its newest is {script.get_current_head()}): run the Mailcore "
                "that migrated it, or a newer one"
            )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def downgrade_to(engine: Engine, revision: str) -> None:
    """Take the database at `engine` down to `revision` ("base": empty). Blocks."""
    with _ALEMBIC_LOCK, engine.connect() as conn, _without_foreign_keys(conn), conn.begin():
        command.downgrade(alembic_config(conn), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()

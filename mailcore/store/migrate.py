"""Running Alembic migrations from code (blocking; call on a pool thread).

Every `mailcore` command and every daemon start checks the schema (`upgrade_to_head`). A
store already at the newest revision, the usual case, is told by one SELECT against the
newest migration's file name (`newest_revision`): Alembic (its import, 40 migration modules
read, `env.py` run) cost each command some 0.15 s of CPU to find nothing to do, so it is
imported only when there is something to do or to refuse.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError
from twisted.logger import Logger

from mailcore.config import ConfigError
from mailcore.outages import DATABASE_BUSY, outage
from mailcore.store.engine import SQLITE_BUSY_TIMEOUT_MS, WRITE_INTENT
from mailcore.text import first_line

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"
VERSIONS = MIGRATIONS / "versions"


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

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

log = Logger()

# Revisions that released commits stamped stores with, under an id the chain no longer has
# (renamed when lines of work were put in one line at merge), and the revision each is now.
# A store stamped with one is restamped before it is upgraded: Alembic would otherwise take
# it for a store of a newer Mailcore and nothing could upgrade it. 0054_file_nodes made
# only the file_nodes table of 0052 (0056_schema_repair makes its rate_buckets).
# 0065_token_usage_day (09a378d) made only ix_token_usage_day, one of the two indexes of
# what is now 0065_purge_and_count_indexes: such a store is restamped 0064, and 0065 makes
# the index it lacks (ix_token_usage_day only where it is missing).
RETIRED_REVISIONS = {
    "0010_domain_generation": "0010_change_counters",  # once _replace_domain_generation ran
    "0054_file_nodes": "0052_file_nodes_rate_buckets",
    "0054_file_nodes_rate_buckets": "0052_file_nodes_rate_buckets",
    "0065_token_usage_day": "0064_webhook_prune_index",
}


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
    """Bring the database at `engine` to the newest revision. Blocks.

    A store already there is left alone without Alembic; any other (empty, older, newer
    than this code, branched) goes through `upgrade_to`, as before."""
    if not at_newest_revision(engine):
        upgrade_to(engine, "head")


def check_writable(engine: Engine, shown: str) -> None:
    """ConfigError when the migrated database at `engine` (`shown` in the message) takes no
    writes: a read-only SQLite file or mount, a PostgreSQL standby or read-only role. A
    store already at head is migrated without a write, so this is what finds it before the
    daemon starts to answer, rather than every write failing after. Blocks.

    The probe writes nothing: a DELETE of no row still asks for write access (SQLite's
    write lock, PostgreSQL's check of a read-only transaction), and it is rolled back.

    On SQLite it does not wait for the write lock: another process that holds it (the admin
    CLI in a long command or migration, another daemon on the same file) made the daemon
    wait the whole busy timeout (30 s) and then refuse to start, saying "database is
    locked" as if it could not write. A database that another process holds the write lock
    of takes writes; a read-only one (a read-only file, mount or `mode=ro`) is refused at
    once, locked or not (its BEGIN IMMEDIATE takes no lock, its DELETE fails)."""
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                with _no_busy_wait(conn):
                    try:
                        _probe_write(conn)
                    except DBAPIError as e:
                        if outage(e) is not DATABASE_BUSY:
                            raise
                        log.info("the database {db} is locked by another process (the "
                                 "admin CLI, another daemon): this daemon's writes wait for "
                                 "it", db=shown)
            else:
                _probe_write(conn)
    except DBAPIError as e:
        cause = e.orig if isinstance(e.orig, Exception) else e
        reason = first_line(str(cause)) or type(cause).__name__
        raise ConfigError(f"cannot write to the database {shown}: {reason}") from None


def _probe_write(conn: Connection) -> None:
    """Ask for write access in a transaction that is rolled back (see check_writable)."""
    with conn.begin() as transaction:
        conn.execute(text("DELETE FROM alembic_version WHERE 1 = 0"))
        transaction.rollback()


@contextmanager
def _no_busy_wait(conn: Connection) -> Iterator[None]:
    """SQLite: while inside, a lock held elsewhere fails at once (SQLITE_BUSY)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA busy_timeout=0")
    try:
        yield
    finally:
        driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def newest_revision() -> str | None:
    """The revision of the newest migration, from the file names alone.

    Each migration is `versions/<revision>.py` and the revisions form one chain in the
    order of their names (`0041_…` revises `0040_…`; tests/test_store_migrations.py holds
    the files to both), so the greatest name is Alembic's head. None when there is no
    migration source to read (the check then leaves the question to Alembic)."""
    return max((path.stem for path in VERSIONS.glob("[0-9]*.py")), default=None)


def at_newest_revision(engine: Engine) -> bool:
    """Whether the database at `engine` is exactly at `newest_revision` (one row in
    alembic_version). False for an empty database. Blocks."""
    try:
        with engine.connect() as conn:
            conn.info[WRITE_INTENT] = False  # SQLite: a plain BEGIN, not the write lock
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except DBAPIError:  # no alembic_version table: nothing was migrated yet
        return False
    newest = newest_revision()
    return newest is not None and [row[0] for row in rows] == [newest]


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
            _replace_domain_generation(conn)
            _restamp_retired(conn)
            cfg = alembic_config(conn)
            _refuse_unknown_revision(conn, cfg)
            from alembic import command
            from alembic.util.exc import CommandError

            try:
                command.upgrade(cfg, revision)
            except CommandError as e:
                reason = first_line(str(e)) or type(e).__name__
                raise ConfigError(f"cannot migrate the database: {reason}") from None
        _give_back_wal(conn)


def _give_back_wal(conn: Connection) -> None:
    """SQLite: copy the WAL into the database and cut the file to nothing. A migration's
    writes all go through the WAL, a table rebuilt twice over (its copy, and its old pages
    zeroed by secure_delete, on in Debian's SQLite): about twice the table and its
    indexes, and SQLite keeps the file at its largest size while a connection is open, so
    a daemon held it for as long as it ran. Outside a transaction (the driver's own
    statement: SQLAlchemy's would begin one, in which no checkpoint runs); a reader still
    in the WAL (a command starting) is waited for up to the busy timeout, then the file
    is left as it is."""
    if conn.dialect.name != "sqlite":
        return
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _replace_domain_generation(conn: Connection) -> None:
    """Blocking: a store migrated by the commits of `0010_domain_generation` (0f7cfb3 to
    93420a9) holds its one-row table `domain_generation`, where 0010_change_counters makes
    `change_counters`, whether it is stamped with that revision or with 0011 on top of it:
    the table is made as 0010_change_counters makes it and the old one goes, in the
    migration transaction (0029 writes to change_counters, and the daemon reads it)."""
    inspector = inspect(conn)
    if not inspector.has_table("domain_generation"):
        return
    if not inspector.has_table("change_counters"):
        metadata = MetaData()
        counters = Table(
            "change_counters", metadata,
            Column("name", String(40), nullable=False),
            Column("value", BigInteger(), nullable=False),
            PrimaryKeyConstraint("name", name="pk_change_counters"))
        counters.create(conn)
        conn.execute(counters.insert(), [{"name": "domains", "value": 0},
                                         {"name": "queue_flush", "value": 0}])
    conn.execute(text("DROP TABLE domain_generation"))
    log.info("the database held domain_generation (revision 0010_domain_generation): "
             "replaced by change_counters before the upgrade")


def _restamp_retired(conn: Connection) -> None:
    """Blocking: a store stamped with a retired revision id (RETIRED_REVISIONS) gets the id
    that revision has now, in the migration transaction."""
    if not inspect(conn).has_table("alembic_version"):
        return
    for current in conn.execute(text("SELECT version_num FROM alembic_version")).scalars():
        now = RETIRED_REVISIONS.get(current)
        if now is not None:
            conn.execute(text("UPDATE alembic_version SET version_num = :now "
                              "WHERE version_num = :old"), {"now": now, "old": current})
            log.info("the database schema was stamped {old}, a revision now named {now}: "
                     "restamped before the upgrade", old=current, now=now)


def _refuse_unknown_revision(conn: Connection, cfg: AlembicConfig) -> None:
    """ConfigError when the database is at a revision this code does not have: a newer
    Mailcore migrated it (Alembic would fail with a traceback)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(cfg)
    known = {s.revision for s in script.walk_revisions()}
    for current in MigrationContext.configure(conn).get_current_heads():
        if current not in known:
            raise ConfigError(
                f"the database schema is at revision {current}, newer than this version of "
                f"Mailcore knows (its newest is {script.get_current_head()}): run the Mailcore "
                "that migrated it, or a newer one"
            )


def downgrade_to(engine: Engine, revision: str) -> None:
    """Take the database at `engine` down to `revision` ("base": empty). Blocks."""
    from alembic import command

    with _ALEMBIC_LOCK, engine.connect() as conn, _without_foreign_keys(conn), conn.begin():
        command.downgrade(alembic_config(conn), revision)


def head_revision() -> str | None:
    """Alembic's head, from the migration modules themselves."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def rebuild_autoincrement(conn: Connection, table: str, autoincrement: bool,
                          references: tuple[str, ...], named_ids: str | None = None) -> None:
    """In a migration, on SQLite (nothing elsewhere: PostgreSQL's sequences never give an
    id twice): rebuild `table` with or without AUTOINCREMENT, every row and id kept, and
    check its row count and the foreign keys to it of `references` (tables that point at
    it) after. With AUTOINCREMENT, the sequence starts at what the query `named_ids` gives
    (the highest id any row still names, the table's own included), so that no id given
    before is given again. Foreign keys are off while migrations run (`_without_foreign_keys`), so
    dropping the old table deletes nothing that references it.

    The rebuild is the one SQLite documents for a change ALTER TABLE cannot make, from the
    table's stored SQL (not a reflection of it, which loses triggers, partial and
    expression indexes): a new table of the same definition but its id column's, every row
    copied with its id, the old table dropped, the new one renamed (legacy rename: the
    references of other tables and triggers already name `table`), and the old table's
    indexes and triggers made again from their stored SQL in the order they were first
    made (SQLite's planner, without statistics, breaks ties between indexes by that
    order). A full-text index whose content is `table` reads its rows by id and stays
    valid. Needs free disk for a second copy of the table while it runs."""
    if conn.dialect.name != "sqlite":
        return
    if conn.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(f"rebuilding {table}: run it with foreign keys off "
                           "(mailcore.store.migrate does)")
    create_sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).scalar()
    assert isinstance(create_sql, str)
    dependents = [sql for (sql,) in conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND type IN ('index', 'trigger') "
        "AND sql IS NOT NULL ORDER BY rowid", (table,))]
    columns = ", ".join(f'"{row[1]}"' for row in conn.exec_driver_sql(
        f'PRAGMA table_info("{table}")'))
    new = f"{table}_rebuilt"
    before = conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
    conn.exec_driver_sql(_with_autoincrement(create_sql, new, autoincrement))
    conn.exec_driver_sql(
        f'INSERT INTO "{new}" ({columns}) SELECT {columns} FROM "{table}" ORDER BY id')
    conn.exec_driver_sql(f'DROP TABLE "{table}"')
    conn.exec_driver_sql("PRAGMA legacy_alter_table=ON")
    try:
        conn.exec_driver_sql(f'ALTER TABLE "{new}" RENAME TO "{table}"')
    finally:
        conn.exec_driver_sql("PRAGMA legacy_alter_table=OFF")
    for sql in dependents:
        conn.exec_driver_sql(sql)
    after = conn.exec_driver_sql(f'SELECT count(*) FROM "{table}"').scalar()
    broken = None
    for name in (table, *references):
        broken = broken or _broken_reference(conn, name, table)
    if after != before or broken is not None:
        raise RuntimeError(f"{table} rebuilt with {after} of {before} rows, "
                           f"first broken reference: {broken}")
    if conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first() is not None:
        # Planner statistics (an operator's ANALYZE) went with the old table: make them again.
        conn.exec_driver_sql(f'ANALYZE "{table}"')
    if conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first() is None:
        return  # no AUTOINCREMENT table at all (a downgrade of the last one)
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name IN (?, ?)", (table, new))
    if autoincrement:
        highest = int(conn.exec_driver_sql(
            named_ids or f'SELECT max(id) FROM "{table}"').scalar() or 0)
        conn.exec_driver_sql(
            "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, highest))


def _broken_reference(conn: Connection, name: str, table: str) -> tuple[str, int] | None:
    """A row of table `name` whose foreign key to `table` names no row of it (the table
    and the row id), or None. Only the keys to `table`: `PRAGMA foreign_key_check(name)`
    checks every key of `name`, whose other targets a rebuild of `table` leaves alone (on
    a million messages, 7 s a table that points at them)."""
    for key in conn.exec_driver_sql(f'PRAGMA foreign_key_list("{name}")').fetchall():
        if key[2] != table:
            continue
        row = conn.exec_driver_sql(
            f'SELECT rowid FROM "{name}" WHERE "{key[3]}" IS NOT NULL AND "{key[3]}" '
            f'NOT IN (SELECT "{key[4] or "id"}" FROM "{table}") LIMIT 1').first()
        if row is not None:
            return name, int(row[0])
    return None


# The `id INTEGER` column's definition, and a table constraint making it the primary key.
_ID_COLUMN = re.compile(r'^"?id"?\s+INTEGER\b', re.IGNORECASE)
_ID_PRIMARY_KEY = re.compile(
    r'^(?:CONSTRAINT\s+"?(\w+)"?\s+)?PRIMARY\s+KEY\s*\(\s*"?id"?\s*\)$', re.IGNORECASE)
_INLINE_PRIMARY_KEY = re.compile(r"\bPRIMARY\s+KEY\b", re.IGNORECASE)
_AUTOINCREMENT = re.compile(r"\s+AUTOINCREMENT\b", re.IGNORECASE)


def _with_autoincrement(create_sql: str, name: str, autoincrement: bool) -> str:
    """`create_sql` (a table's CREATE TABLE, its primary key an `id INTEGER` column) as
    CREATE TABLE `name`, its id column with AUTOINCREMENT or without (which SQLite takes
    only on the column, `PRIMARY KEY AUTOINCREMENT`: a table constraint naming the
    column moves onto it, its name kept); every other definition as it was."""
    _, _, rest = create_sql.partition("(")
    definitions = split_definitions(rest[: rest.rindex(")")])
    ids = [i for i, d in enumerate(definitions) if _ID_COLUMN.match(d)]
    if len(ids) != 1:
        raise RuntimeError(f"no single id INTEGER column in {create_sql!r}")
    column = _AUTOINCREMENT.sub("", definitions[ids[0]])
    if autoincrement:
        keys = [(i, m) for i, d in enumerate(definitions) if (m := _ID_PRIMARY_KEY.match(d))]
        if keys:
            index, key = keys[0]
            named = f"CONSTRAINT {key.group(1)} " if key.group(1) else ""
            column += f" {named}PRIMARY KEY AUTOINCREMENT"
            del definitions[index]
        elif _INLINE_PRIMARY_KEY.search(column):
            column = _INLINE_PRIMARY_KEY.sub("PRIMARY KEY AUTOINCREMENT", column, count=1)
        else:
            raise RuntimeError(f"id is not the primary key in {create_sql!r}")
    definitions[ids[0]] = column
    return f'CREATE TABLE "{name}" (\n\t' + ",\n\t".join(definitions) + "\n)"


def split_definitions(body: str) -> list[str]:
    """The comma-separated definitions of a CREATE TABLE's body, commas inside brackets or
    quotes left alone (also migration 0025's, which moves columns)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(body):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"`[":
            quote = "]" if ch == "[" else ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i].strip())
            start = i + 1
    parts.append(body[start:].strip())
    return [p for p in parts if p]

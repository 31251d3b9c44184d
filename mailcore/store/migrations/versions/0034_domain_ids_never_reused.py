"""Domains: the id of a removed domain is never given to another one (SQLite AUTOINCREMENT).

A queued recipient names its served domain by id (`queue_recipients.domain_id`, no foreign
key), and the queue routes, filters, charges and quarantines it by that id. On SQLite an
INTEGER PRIMARY KEY without AUTOINCREMENT takes the highest id in use plus one, so a user
removing their newest domain and any user adding one next gave the new domain the removed
one's id: mail still queued for the removed domain (its server down, a retry pending) was
delivered to the new domain's next hop, its tokens charged to, and its spam quarantined
for, the new domain's owner. PostgreSQL's sequence never gives an id twice.

Upgrade (SQLite): the table is rebuilt with AUTOINCREMENT, rows and ids kept, and its
sequence starts above every domain id still named anywhere (queued recipients, the change
log), so that no id removed before this revision is given again either. PostgreSQL: nothing
to do. Downgrade: the table is rebuilt without AUTOINCREMENT.

Revision ID: 0034_domain_ids_never_reused
Revises: 0033_drop_open_receipts
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import Connection

revision = "0034_domain_ids_never_reused"
down_revision = "0033_drop_open_receipts"
branch_labels = None
depends_on = None

# The domain ids a row may still name after the domain is gone.
_NAMED_IDS = (
    "SELECT max(n) FROM (SELECT max(id) AS n FROM domains"
    " UNION ALL SELECT max(domain_id) FROM queue_recipients"
    " UNION ALL SELECT max(domain_id) FROM domain_changes)"
)


def _rebuild(conn: Connection, autoincrement: bool) -> None:
    """Rebuild `domains` (SQLite) with or without AUTOINCREMENT; every row and reference
    checked after. Foreign keys are off while migrations run (mailcore.store.migrate), so
    dropping the old table deletes nothing that references it."""
    before = conn.exec_driver_sql("SELECT count(*) FROM domains").scalar()
    with op.batch_alter_table("domains", recreate="always",
                              table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass
    after = conn.exec_driver_sql("SELECT count(*) FROM domains").scalar()
    broken = None
    for table in ("domains", "domain_addresses", "quarantine"):
        broken = broken or conn.exec_driver_sql(f"PRAGMA foreign_key_check({table})").first()
    if after != before or broken is not None:
        raise RuntimeError(f"0034: domains rebuilt with {after} of {before} rows, "
                           f"first broken reference: {broken}")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    _rebuild(conn, autoincrement=True)
    highest = int(conn.exec_driver_sql(_NAMED_IDS).scalar() or 0)
    conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'domains'")
    conn.exec_driver_sql(
        "INSERT INTO sqlite_sequence (name, seq) VALUES ('domains', ?)", (highest,))


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    _rebuild(conn, autoincrement=False)

"""Mail API: a mailbox belongs to the domain row it was created under (`mailboxes.domain_id`).

A mailbox named its domain only by the domain part of its address. Removing the domain left
the mailbox, and once anyone claimed the name again (and it was served) the old mailbox was
live again: mail to bob@ that domain went into the old owner's mailbox, and the old owner's
users sent as the new owner's domain. `domain_id` binds a mailbox to one domain row; the row's
removal sets it NULL (ON DELETE SET NULL), and a new row of the same name is another domain.

Upgrade: each mailbox gets the id of the domain now named as its address's domain, unless it
was created more than `_SKEW` seconds before that domain row (`mailcore mailbox add` needs the
domain row: such a mailbox belongs to a row removed since, whose name was claimed again); those
mailboxes and the ones of a domain no longer there keep NULL. Downgrade: the column, its
foreign key and its index go (the mailboxes are then matched by name again).

Revision ID: 0037_mailbox_domain_rows
Revises: 0036_drop_download_attempts
"""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from alembic import op

revision = "0037_mailbox_domain_rows"
down_revision = "0036_drop_download_attempts"
branch_labels = None
depends_on = None

# How much earlier than its domain row a mailbox of that row may have been stamped: the two
# times come from the clocks of the nodes that wrote them.
_SKEW = 300.0

_FK = "fk_mailboxes_domain_id_domains"
_INDEX = "ix_mailboxes_domain_id"

_domains = sa.table("domains", sa.column("id", sa.Integer), sa.column("name", sa.String),
                    sa.column("created_at", sa.DateTime(timezone=True)))
_mailboxes = sa.table("mailboxes", sa.column("id", sa.Integer),
                      sa.column("address", sa.String), sa.column("created_at", sa.Float),
                      sa.column("domain_id", sa.Integer))


def _epoch(value: datetime.datetime) -> float:
    """Seconds since the epoch of a stored domain time (SQLite gives it back naive, in UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()


def upgrade() -> None:
    # Batch mode: SQLite adds a foreign key only by rebuilding the table.
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("domain_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(_FK, "domains", ["domain_id"], ["id"], ondelete="SET NULL")
    op.create_index(_INDEX, "mailboxes", ["domain_id"])
    conn = op.get_bind()
    rows = {name: (domain_id, _epoch(created))
            for domain_id, name, created in conn.execute(sa.select(_domains))}
    bound = []
    for box_id, address, created_at in conn.execute(
            sa.select(_mailboxes.c.id, _mailboxes.c.address, _mailboxes.c.created_at)):
        found = rows.get(address.rpartition("@")[2])
        if found is not None and created_at >= found[1] - _SKEW:
            bound.append({"box": box_id, "domain": found[0]})
    if bound:
        conn.execute(sa.update(_mailboxes).where(_mailboxes.c.id == sa.bindparam("box"))
                     .values(domain_id=sa.bindparam("domain")), bound)


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="mailboxes")
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_constraint(_FK, type_="foreignkey")
        batch.drop_column("domain_id")

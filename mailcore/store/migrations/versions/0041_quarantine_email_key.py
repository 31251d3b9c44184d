"""quarantine: `email_key`, the recipient's local part as a listing by address compares it.

The listing of one address (`GET /api/v1/quarantine/{local@domain}/...`) compared SQL
lower(email) with the address lower-cased in Python. SQLite's lower() folds ASCII only, so
an address with another letter in its local part (SMTPUTF8: "Ünal@q.test") was not found
when asked for in another case ("ünal@q.test"), nor when its domain was spelled as a
U-label where the listing gives the A-label. The key is made in Python
(`mailcore.gateway.quarantine.address_key`: the local part, trimmed, NFC, lower case) when a
row is stored and when it is looked up, and compared as is, on SQLite and PostgreSQL alike.

Upgrade: the column, filled from each row's email (the same rule as address_key, copied
here so that this migration keeps doing what it did), made NOT NULL, and an index on
(domain_id, email_key, created_at) for the listing. Downgrade: the index and the column go.

Revision ID: 0041_quarantine_email_key
Revises: 0040_users_lower_unique
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0041_quarantine_email_key"
down_revision = "0040_users_lower_unique"
branch_labels = None
depends_on = None

_INDEX = "ix_quarantine_domain_email_key"
_BATCH = 1000

_quarantine = sa.table("quarantine", sa.column("id", sa.Integer),
                       sa.column("email", sa.String), sa.column("email_key", sa.Text))


def _key(email: str) -> str:
    local = email.rpartition("@")[0] if "@" in email else email
    return unicodedata.normalize("NFC", local.strip()).lower()


def upgrade() -> None:
    op.add_column("quarantine", sa.Column("email_key", sa.Text(), nullable=True))
    conn = op.get_bind()
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_quarantine.c.id, _quarantine.c.email)
            .where(_quarantine.c.id > after).order_by(_quarantine.c.id).limit(_BATCH)
        ).all()
        if not rows:
            break
        conn.execute(
            sa.update(_quarantine).where(_quarantine.c.id == sa.bindparam("row"))
            .values(email_key=sa.bindparam("key")),
            [{"row": row_id, "key": _key(email)} for row_id, email in rows],
        )
        after = rows[-1][0]
    # Batch mode: SQLite makes a column NOT NULL only by rebuilding the table.
    with op.batch_alter_table("quarantine") as batch:
        batch.alter_column("email_key", existing_type=sa.Text(), nullable=False)
    op.create_index(_INDEX, "quarantine", ["domain_id", "email_key", "created_at"])


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="quarantine")
    with op.batch_alter_table("quarantine") as batch:
        batch.drop_column("email_key")

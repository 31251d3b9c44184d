"""Change counters, so that every node sees a change made elsewhere at once.

`change_counters` holds one row per name: "domains" (raised with every change to the served
domains and their addresses; each node polls it and reloads its RCPT snapshot when it moved)
and "queue_flush" (raised by `mailcore queue flush`; each node's queue sweep then makes the
next hops it had marked unusable usable again).

Revision ID: 0010_change_counters
Revises: 0009_credential_parent
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_change_counters"
down_revision = "0009_credential_parent"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "change_counters",
        sa.Column("name", sa.String(40), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_change_counters")),
    )
    op.bulk_insert(table, [{"name": "domains", "value": 0}, {"name": "queue_flush", "value": 0}])


def downgrade() -> None:
    op.drop_table("change_counters")

"""The next hops' answers about their recipients (`recipient_verdicts`), for the SMTP
server's recipient verification (`[smtp] verify_recipients`, mailcore.gateway.callout): one
row per address (its local part as written, its domain lower-cased), with the route that was
asked (`domain_id`, `hop`: an answer of another route is none), swept once expired (by
`expires_at`, indexed).

Upgrade: the table, empty (the first RCPT for each address asks its next hop). Downgrade:
it goes (what it held is asked again).

Revision ID: 0068_recipient_verdicts
Revises: 0067_drop_unsent_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0068_recipient_verdicts"
down_revision = "0067_drop_unsent_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recipient_verdicts",
        sa.Column("address", sa.String(320), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("hop", sa.String(300), nullable=False),
        sa.Column("deliverable", sa.Boolean(), nullable=False),
        sa.Column("reply", sa.String(512), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_recipient_verdicts")),
    )
    op.create_index("ix_recipient_verdicts_expires_at", "recipient_verdicts", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_recipient_verdicts_expires_at", table_name="recipient_verdicts")
    op.drop_table("recipient_verdicts")

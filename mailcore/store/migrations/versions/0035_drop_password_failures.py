"""safedrop: wrong drop passwords are counted per recipient, and lock the link as wrong codes do.

The password had only a per-process rate (5 guesses per 5 minutes per link), which a
restart or a second node started afresh: about 1,440 guesses a day. `password_failures`
counts a recipient's wrong passwords; once it reaches the limit the link takes no password
until `password_locked_until` (a day later), as `code_failures` and `code_locked_until`
do for one-time codes (migration 0032).

Upgrade: the two columns (no wrong passwords, not locked). Downgrade: they go.

Revision ID: 0035_drop_password_failures
Revises: 0034_domain_ids_never_reused
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0035_drop_password_failures"
down_revision = "0034_domain_ids_never_reused"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.add_column(
            sa.Column("password_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("password_locked_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.drop_column("password_locked_until")
        batch.drop_column("password_failures")

"""safedrop: wrong one-time codes are counted per recipient, across new codes.

Each new code reset the count of wrong guesses (5 per code), and asking for one had no
limit: 40 new codes gave 200 guesses at once. `code_failures` counts a recipient's wrong
codes whatever new codes it asked for; once it reaches the limit the link takes and sends no
code until `code_locked_until` (a day later).

Upgrade: the two columns (no wrong codes, not locked). Downgrade: they go.

Revision ID: 0032_drop_code_failures
Revises: 0031_domain_changes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0032_drop_code_failures"
down_revision = "0031_domain_changes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.add_column(
            sa.Column("code_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("code_locked_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.drop_column("code_locked_until")
        batch.drop_column("code_failures")

"""quarantine_digest_runs: the latest digest run, so that one cut short is finished later.

A digest run that crashed (or was killed) part-way left the recipients it had not reached
for the next period's run, a day later by default. The run is now recorded when it starts
(in the transaction that claims the period) and marked finished when every digest is
queued; a run still unfinished is taken up again at the next start of the daemon or purge
sweep, for the recipients it had not served (a recipient served in the run has rows
digested since its start), so no one gets two digests for one period.

Upgrade: the table. Downgrade: it goes.

Revision ID: 0046_quarantine_digest_runs
Revises: 0042_user_deleting
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0046_quarantine_digest_runs"
down_revision = "0042_user_deleting"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine_digest_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine_digest_runs")),
    )


def downgrade() -> None:
    op.drop_table("quarantine_digest_runs")

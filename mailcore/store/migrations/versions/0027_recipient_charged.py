"""A queued recipient records whether its filtering tokens were paid (issue 17.2).

A relayed message's tokens are charged in the group commit that stores it. Until now each
charge also wrote a `token_charges` row keyed by queue id and domain: the record that lets
a retry, a restart or another node find the charge made, so it is never made twice. That
row (a row and two index entries per message, on the write transaction's critical path,
kept until the purge) cost about 3 % of the filtered relay's throughput. The recipient
rows are written in the same transaction anyway: `charged` on each of them is now that
record. A charge asked for later (a tank that was empty at the accept, a message stored
before this revision) still writes its keyed row, as do the API's keyed charges.

Upgrade: the column is added, false for every row (their charges, if any, have their keyed
rows, which the filtering still asks for). Downgrade: the column is dropped; a message
still queued then whose tokens were paid at the accept has no keyed row and would be
charged once more when it is filtered.

Revision ID: 0027_recipient_charged
Revises: 0026_fts_automerge
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0027_recipient_charged"
down_revision = "0026_fts_automerge"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("queue_recipients",
                  sa.Column("charged", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("queue_recipients", "charged")

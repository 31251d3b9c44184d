"""drop_bundles.has_secure_message, so that a removed drop's secrets can go.

A drop's secure message (encrypted with the daemon's key) and its password's hash stayed in
its row for good after the drop expired or self-destructed (read_remove): its files went
from disk, but the secret text any backup or copy of the database holds, and the key beside
it opens, did not. The API says whether a secure message was set, which was read from the
ciphertext being there; that flag is now a column of its own, and the removal of a drop's
files (expiry, read_remove, no link left) clears both secrets in the same commit.

Upgrade: the flag is set where a secure message is held; then the secrets of drops already
removed are cleared. Downgrade: the column goes (a removed drop then reads back as having
had no secure message; the secrets cleared stay cleared).

Revision ID: 0051_drop_secrets_removed
Revises: 0050_mailapi_mail_author
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0051_drop_secrets_removed"
down_revision = "0050_mailapi_mail_author"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("drop_bundles", sa.Column("has_secure_message", sa.Boolean(),
                                            nullable=False, server_default="0"))
    bundles = sa.table("drop_bundles", sa.column("has_secure_message", sa.Boolean()),
                       sa.column("secure_message", sa.LargeBinary()),
                       sa.column("password_hash", sa.String()),
                       sa.column("removed_at", sa.DateTime(timezone=True)))
    op.execute(sa.update(bundles).where(bundles.c.secure_message.is_not(None))
               .values(has_secure_message=True))
    op.execute(sa.update(bundles).where(bundles.c.removed_at.is_not(None))
               .values(secure_message=None, password_hash=None))


def downgrade() -> None:
    # Not in batch mode: SQLite (3.35 and later, as the store requires) drops a column in
    # place.
    op.drop_column("drop_bundles", "has_secure_message")

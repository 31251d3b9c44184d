"""mailapi_gone: where a mail stood in a mailbox it left, for the listing's cursors.

A listing cursor (`next_page_id`, `previous_page_id`, or any mail id a client holds) is a
mail's public id, and a page starts at that mail's place. When the mail was deleted (or sent
from another mailbox the caller may not read) before the next request, nothing said where it
had stood: the reply was 400 `invalid cursor` and a client walking its mail while deleting
it could not go on. The Mail API now writes the mail's public id, its place (`id`) and the
mailbox it left here, and the listing starts at that place when the caller may read that
mailbox (mailcore.mailapi.listing).

Upgrade: the table, empty (mail deleted before it has no place kept), and its indexes.
Downgrade: it goes.

Revision ID: 0057_mailapi_gone
Revises: 0056_schema_repair
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0057_mailapi_gone"
down_revision = "0056_schema_repair"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailapi_gone",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(16), nullable=False),
        sa.Column("mail_id", sa.Integer(), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("gone_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["mailbox_id"], ["mailboxes.id"],
                                name=op.f("fk_mailapi_gone_mailbox_id_mailboxes"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailapi_gone")),
    )
    op.create_index("ix_mailapi_gone_public_id", "mailapi_gone", ["public_id"])
    op.create_index("ix_mailapi_gone_mailbox_id", "mailapi_gone", ["mailbox_id"])
    op.create_index("ix_mailapi_gone_gone_at", "mailapi_gone", ["gone_at"])


def downgrade() -> None:
    op.drop_index("ix_mailapi_gone_gone_at", table_name="mailapi_gone")
    op.drop_index("ix_mailapi_gone_mailbox_id", table_name="mailapi_gone")
    op.drop_index("ix_mailapi_gone_public_id", table_name="mailapi_gone")
    op.drop_table("mailapi_gone")

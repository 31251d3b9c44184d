"""A credential made from another one (a safedrop session from its API key) names it.

`credentials.parent_id` is NULL for keys and tokens, and the API key's id for a safedrop
session made with it: the session resolves only while its key does, and is deleted with
it. Sessions made before this revision have no parent and live out their TTL.

Revision ID: 0009_credential_parent
Revises: 0008_domain_tls
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_credential_parent"
down_revision = "0008_domain_tls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite adds a foreign key only by rebuilding the table.
    with op.batch_alter_table("credentials") as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_credentials_parent_id_credentials"), "credentials",
            ["parent_id"], ["id"], ondelete="CASCADE",
        )
    op.create_index("ix_credentials_parent_id", "credentials", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_credentials_parent_id", table_name="credentials")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_constraint(op.f("fk_credentials_parent_id_credentials"), type_="foreignkey")
        batch.drop_column("parent_id")

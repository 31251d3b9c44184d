"""safedrop (seed 003): drop bundles, recipients and files.

Revision ID: 0012_safedrop
Revises: 0011_domain_verification
"""

import sqlalchemy as sa
from alembic import op

revision = "0012_safedrop"
down_revision = "0011_domain_verification"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drop_bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("secure_message", sa.LargeBinary(), nullable=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("expiry_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("email_receipt_when", sa.Integer(), nullable=False),
        sa.Column("read_remove", sa.Boolean(), nullable=False),
        sa.Column("allow_comments", sa.Boolean(), nullable=False),
        sa.Column("require_token_auth", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_drop_bundles_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_bundles")),
    )
    op.create_index("ix_drop_bundles_owner", "drop_bundles", ["owner_id", "id"])
    op.create_index("ix_drop_bundles_expiry", "drop_bundles", ["expiry_date"])

    op.create_table(
        "drop_recipients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("telephone", sa.String(16), nullable=False),
        sa.Column("valid_for", sa.BigInteger(), nullable=False),
        sa.Column("link_digest", sa.LargeBinary(32), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["drop_bundles.id"],
            name=op.f("fk_drop_recipients_bundle_id_drop_bundles"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_recipients")),
        sa.UniqueConstraint("link_digest", name=op.f("uq_drop_recipients_link_digest")),
    )
    op.create_index("ix_drop_recipients_bundle", "drop_recipients", ["bundle_id", "id"])

    op.create_table(
        "drop_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["drop_bundles.id"],
            name=op.f("fk_drop_files_bundle_id_drop_bundles"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_files")),
    )
    op.create_index("ix_drop_files_bundle", "drop_files", ["bundle_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_drop_files_bundle", table_name="drop_files")
    op.drop_table("drop_files")
    op.drop_index("ix_drop_recipients_bundle", table_name="drop_recipients")
    op.drop_table("drop_recipients")
    op.drop_index("ix_drop_bundles_expiry", table_name="drop_bundles")
    op.drop_index("ix_drop_bundles_owner", table_name="drop_bundles")
    op.drop_table("drop_bundles")

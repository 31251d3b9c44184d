"""Quarantined messages.

Revision ID: 0007_quarantine
Revises: 0006_webhooks
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_quarantine"
down_revision = "0006_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ident", sa.String(20), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("mailfrom", sa.String(320), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("category", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("queue_id", sa.String(32), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_queue_id", sa.String(32), nullable=True),
        sa.Column("digested_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_quarantine_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["domain_id"], ["domains.id"], name=op.f("fk_quarantine_domain_id_domains"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
        sa.UniqueConstraint("ident", name=op.f("uq_quarantine_ident")),
    )
    op.create_index("ix_quarantine_domain_created", "quarantine", ["domain_id", "created_at"])
    op.create_index("ix_quarantine_email_created", "quarantine", ["email", "created_at"])
    op.create_index("ix_quarantine_created_at", "quarantine", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_created_at", table_name="quarantine")
    op.drop_index("ix_quarantine_email_created", table_name="quarantine")
    op.drop_index("ix_quarantine_domain_created", table_name="quarantine")
    op.drop_table("quarantine")

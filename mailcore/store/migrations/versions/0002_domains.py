"""Domains and addresses.

Revision ID: 0002_domains
Revises: 0001_identity
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_domains"
down_revision = "0001_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("redirect_host", sa.String(255), nullable=False),
        sa.Column("redirect_port", sa.Integer(), nullable=False, server_default="25"),
        sa.Column("require_tls", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("spam_action", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("virus_action", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("send_resume", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("resume_template_subject", sa.Text(), nullable=True),
        sa.Column("resume_template_body", sa.Text(), nullable=True),
        sa.Column("resume_template_resume", sa.Text(), nullable=True),
        sa.Column("resume_link_hostname", sa.String(255), nullable=True),
        sa.Column("resume_reply_to", sa.String(254), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_domains_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domains")),
        sa.UniqueConstraint("name", name=op.f("uq_domains_name")),
    )
    op.create_table(
        "domain_addresses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.Column("local_part", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["domain_id"], ["domains.id"], name=op.f("fk_domain_addresses_domain_id_domains"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domain_addresses")),
        sa.UniqueConstraint(
            "domain_id", "local_part", name="uq_domain_addresses_domain_local"
        ),
    )


def downgrade() -> None:
    op.drop_table("domain_addresses")
    op.drop_table("domains")

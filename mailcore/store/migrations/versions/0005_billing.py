"""Filtering token tanks, their daily usage and idempotent charges; invoices.

Revision ID: 0005_billing
Revises: 0004_mail
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_billing"
down_revision = "0004_mail"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_tanks",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("monthly", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("perm", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("period", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("monthly >= 0", name=op.f("ck_token_tanks_monthly_not_negative")),
        sa.CheckConstraint("perm >= 0", name=op.f("ck_token_tanks_perm_not_negative")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_token_tanks_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_token_tanks")),
    )
    op.create_table(
        "token_usage",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False, server_default="0"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_token_usage_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_token_usage")),
    )
    op.create_table(
        "token_charges",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("charge_key", sa.String(128), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("charged_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_token_charges_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", "charge_key", name=op.f("pk_token_charges")),
    )
    op.create_index("ix_token_charges_charged_at", "token_charges", ["charged_at"])
    counters = op.create_table(
        "billing_counters",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_billing_counters")),
    )
    op.bulk_insert(counters, [{"name": "invoice_ref", "value": 0}])
    op.create_table(
        "invoices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ref", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("total_cents", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("nic", sa.String(64), nullable=False, server_default=""),
        sa.Column("first_name", sa.String(150), nullable=False, server_default=""),
        sa.Column("last_name", sa.String(150), nullable=False, server_default=""),
        sa.Column("email", sa.String(254), nullable=False, server_default=""),
        sa.Column("organisation", sa.String(255), nullable=False, server_default=""),
        sa.Column("tva_intra", sa.String(64), nullable=False, server_default=""),
        sa.Column("address", sa.String(255), nullable=False, server_default=""),
        sa.Column("zip", sa.String(32), nullable=False, server_default=""),
        sa.Column("city", sa.String(150), nullable=False, server_default=""),
        sa.Column("country", sa.String(64), nullable=False, server_default=""),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_invoices_user_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("ref", name=op.f("uq_invoices_ref")),
    )
    op.create_index("ix_invoices_user_id", "invoices", ["user_id"])
    op.create_table(
        "invoice_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("invoice_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(255), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_lines_invoice_id_invoices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_lines")),
        sa.UniqueConstraint(
            "invoice_id", "position", name="uq_invoice_lines_invoice_position"
        ),
    )


def downgrade() -> None:
    op.drop_table("invoice_lines")
    op.drop_index("ix_invoices_user_id", table_name="invoices")
    op.drop_table("invoices")
    op.drop_table("billing_counters")
    op.drop_index("ix_token_charges_charged_at", table_name="token_charges")
    op.drop_table("token_charges")
    op.drop_table("token_usage")
    op.drop_table("token_tanks")

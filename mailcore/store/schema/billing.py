"""Filtering tokens and invoices (migration 0005).

Token counts are BigInteger (a permanent tank grows with every purchase and every unused
month). Money is in integer cents of the invoice's currency. An invoice keeps a copy of the
account's details as they were when it was issued: an invoice never changes afterwards.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
)

from mailcore.store.schema.meta import metadata

# One row per user: the monthly tank, the permanent tank, and the month the monthly tank
# belongs to (`period` = year * 12 + month - 1, UTC). A row whose period is behind the
# current month is rolled over (monthly -> perm, refill) before it is used.
token_tanks = Table(
    "token_tanks",
    metadata,
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("monthly", BigInteger, nullable=False, server_default="0"),
    Column("perm", BigInteger, nullable=False, server_default="0"),
    Column("period", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("monthly >= 0", name="monthly_not_negative"),
    CheckConstraint("perm >= 0", name="perm_not_negative"),
)

# Tokens consumed per user and UTC day, for the daily average.
token_usage = Table(
    "token_usage",
    metadata,
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("day", Date, primary_key=True),
    Column("used", BigInteger, nullable=False, server_default="0"),
    Index("ix_token_usage_day", "day"),  # the token sweep's purge (migration 0065)
)

# Charges made with an idempotency key (the pipeline passes the queue id): a message
# processed again after a crash or a deferral is not charged twice. Purged after a while.
token_charges = Table(
    "token_charges",
    metadata,
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("charge_key", String(128), primary_key=True),
    Column("tokens", BigInteger, nullable=False),
    Column("charged_at", DateTime(timezone=True), nullable=False),
    Index("ix_token_charges_charged_at", "charged_at"),
)

# Named counters that must never hand out a value twice (the invoice reference).
billing_counters = Table(
    "billing_counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

invoices = Table(
    "invoices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ref", BigInteger, nullable=False, unique=True),
    # Kept (NULL) if the user is deleted: an issued invoice is a record of its own.
    Column("user_id", Integer, ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
    # The account as it was at issue time.
    Column("nic", String(64), nullable=False, server_default=""),
    Column("first_name", String(150), nullable=False, server_default=""),
    Column("last_name", String(150), nullable=False, server_default=""),
    Column("email", String(254), nullable=False, server_default=""),
    Column("organisation", String(255), nullable=False, server_default=""),
    Column("tva_intra", String(64), nullable=False, server_default=""),
    Column("address", String(255), nullable=False, server_default=""),
    Column("zip", String(32), nullable=False, server_default=""),
    Column("city", String(150), nullable=False, server_default=""),
    Column("country", String(64), nullable=False, server_default=""),
    Index("ix_invoices_user_id", "user_id"),
)

invoice_lines = Table(
    "invoice_lines",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "invoice_id", Integer, ForeignKey("invoices.id", ondelete="CASCADE"), nullable=False
    ),
    Column("position", Integer, nullable=False),
    Column("description", String(255), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    UniqueConstraint("invoice_id", "position", name="uq_invoice_lines_invoice_position"),
)

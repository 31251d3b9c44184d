"""Webhooks a user registered, and the durable log of every delivery to them (migration 0006).

A webhook is a URL, the events it wants and a signing secret (`secret_enc`: the Fernet token
of the secret, never returned after creation). Each event for a webhook becomes one
`webhook_deliveries` row, written when the event happens and then sent, retried and finally
marked by the background sender; the row is the delivery log the API and the CLI show.
Delivery times are epoch seconds (float) from the injected clock, as in the queue.
`webhook_events` holds what a sync committed that its webhooks were not told yet (migration
0059): written in the sync's own transactions, turned into delivery rows by a transaction
that deletes them (`mailcore.webhooks.events`).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from mailcore.store.schema.meta import metadata

webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    # Comma-separated event names ("sync.completed,email.new").
    Column("events", Text, nullable=False),
    Column("description", String(255), nullable=False, server_default=""),
    Column("secret_enc", LargeBinary, nullable=False),
    Column("active", Boolean, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_webhooks_user_id", "user_id"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0063)
)

# status: pending (to send, at next_attempt_at), success, failed (gave up), cancelled
# (the webhook was disabled before it went out).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "webhook_id", Integer, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False
    ),
    Column("user_id", Integer, nullable=False),
    # Sent as X-Mailcore-Delivery and in the body: receivers deduplicate retries with it.
    Column("delivery_uuid", String(36), nullable=False),
    Column("event", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_attempt_at", Float, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("completed_at", Float, nullable=True),
    Index("ix_webhook_deliveries_webhook_id", "webhook_id"),
    Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_completed_at", "completed_at"),  # the hourly prune
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# A sync's pending events: one row per new e-mail ("email.new", `ref_id` its messages.id),
# per thread it added to ("thread.updated", `ref_id` the thread's id; one per account until
# told) and per finished sync ("sync.completed", `data` the event's JSON data). `account_id`
# is no foreign key: an account deleted before its events were told leaves them to be told
# (its e-mails and threads are gone with it, so only its sync.completed is).
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("account_id", Integer, nullable=False),
    Column("event", String(64), nullable=False),
    Column("ref_id", Integer, nullable=True),
    Column("data", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ux_webhook_events_ref", "account_id", "event", "ref_id", unique=True),
)

"""The mail the APIs sent for each user (migration 0058): one row per send (a Mail API mail
put in the outbox, a safedrop bundle sent) with its number of recipients, at the database's
clock, so that `[limits] user_recipients_per_hour` and `user_recipients_per_day`
(mailcore.sendcaps) count every node's sends in one place. Rows older than the longest
window are deleted (by the next send of the user, and by a periodic sweep)."""

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, Table

from mailcore.store.schema.meta import metadata

api_sends = Table(
    "api_sends",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("at", Float, nullable=False),
    Column("recipients", Integer, nullable=False),
    # A window's sum is read from the index alone.
    Index("ix_api_sends_user_id_at", "user_id", "at", "recipients"),
    Index("ix_api_sends_at", "at"),
)

"""The mail queue: one row per message (the bytes), one row per recipient (the state).

A message row holds the envelope and the body until every recipient is final; then the body
is dropped and the row stays for a while as the delivered log that `queue show` reads.
Recipient state is one of queued, deferred (both active), delivered, bounced (both final).
Work is leased: `lease_owner` is the node delivering it and `lease_until` when that claim
lapses, so several nodes sharing one database never deliver the same recipient at once.
Times are epoch seconds (float) from the injected clock, which the runner compares cheaply.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
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

queue_messages = Table(
    "queue_messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("mail_from", String(512), nullable=False),
    Column("client_ip", String(64), nullable=False, server_default=""),
    Column("helo", String(255), nullable=False, server_default=""),
    Column("tls", Boolean, nullable=False, server_default="0"),
    Column("size", Integer, nullable=False),
    Column("body", LargeBinary, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("done_at", Float, nullable=True),
    Index("ix_queue_messages_done_at", "done_at"),
)

queue_recipients = Table(
    "queue_recipients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "message_id",
        String(32),
        ForeignKey("queue_messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("address", String(512), nullable=False),
    # The served domain the address belongs to; NULL for a bounce to a foreign sender.
    Column("domain_id", Integer, nullable=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("next_hop", String(300), nullable=True),
    Column("updated_at", Float, nullable=False),
    # Its filtering tokens were charged in the commit that stored it (no keyed charge row).
    Column("charged", Boolean, nullable=False, server_default="0"),
    Index("ix_queue_recipients_message_id", "message_id"),
    Index("ix_queue_recipients_state_next", "state", "next_attempt_at"),
    Index("ix_queue_recipients_lease_owner", "lease_owner"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

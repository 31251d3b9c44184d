"""Quarantined messages (migrations 0007, 0038 and 0041) and digest runs (0046).

One row per quarantined recipient: the message bytes as they arrived, the seed-shaped
`ident` (20 digits, ddmmyyyyHHMMSS in UTC + 6 random digits), the recipient and its domain,
the envelope sender, the decoded subject and why it was held. `released_at` is set once,
by a conditional UPDATE, when the message is handed back to the queue; `digested_at` when
a summary mail listed it.

`quarantine_digest_runs` holds the latest digest run (one row; a new run replaces it): when
it started, on which node, and when it had queued every digest (NULL while running, or
after a crash: the run is then taken up again, for the recipients not served since it
started).
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from mailcore.store.schema.meta import metadata

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ident", String(20), nullable=False, unique=True),
    Column("owner_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("domain_id", Integer, ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
    Column("domain", String(253), nullable=False),
    Column("email", String(320), nullable=False),
    # What a listing by address compares: the local part of `email`, trimmed, NFC, lower
    # case (mailcore.gateway.quarantine.address_key; migration 0041).
    Column("email_key", Text, nullable=False),
    Column("mailfrom", String(320), nullable=False),
    Column("subject", Text, nullable=False),
    # "spam" or "virus"; `reason` says more (score and rules, or the virus names).
    Column("category", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("queue_id", String(32), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("released_at", DateTime(timezone=True), nullable=True),
    Column("release_queue_id", String(32), nullable=True),
    Column("digested_at", DateTime(timezone=True), nullable=True),
    Index("ix_quarantine_domain_created", "domain_id", "created_at"),
    Index("ix_quarantine_email_created", "email", "created_at"),
    Index("ix_quarantine_created_at", "created_at"),
    # The row of one recipient of one queued message (kept once, migration 0038).
    Index("ix_quarantine_queue_id", "queue_id", "email"),
    Index("ix_quarantine_domain_email_key", "domain_id", "email_key", "created_at"),
)

quarantine_digest_runs = Table(
    "quarantine_digest_runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("node", String(128), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)

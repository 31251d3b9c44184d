"""Served domains and their address lists (migration 0002)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from mailcore.store.schema.meta import metadata

# A customer domain we are MX for. `name` is the IDNA (A-label), lower-case form.
# redirect_host/redirect_port is the next hop ("redirectTo"); `tls` is the outbound STARTTLS
# policy towards it (NULL: the `[queue] tls` default; else none, may, verify-if-offered or
# verify; migration 0008 folded the former `require_tls` flag into it as "verify"); the
# resume_* fields are seed 004's quarantine-summary settings. An id is never given twice
# (SQLite AUTOINCREMENT, migration 0034): queued recipients name their domain by id.
domains = Table(
    "domains",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(253), nullable=False, unique=True),
    Column("redirect_host", String(255), nullable=False),
    Column("redirect_port", Integer, nullable=False, server_default="25"),
    Column("tls", String(20), nullable=True),
    Column("spam_action", Integer, nullable=False, server_default="0"),
    Column("virus_action", Integer, nullable=False, server_default="0"),
    Column("send_resume", Boolean, nullable=False, server_default="0"),
    Column("resume_template_subject", Text, nullable=True),
    Column("resume_template_body", Text, nullable=True),
    Column("resume_template_resume", Text, nullable=True),
    Column("resume_link_hostname", String(255), nullable=True),
    Column("resume_reply_to", String(254), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Proof of ownership ([protecmail] verify_domains, migration 0011): a domain added while
    # verification is on gets a random `verify_token` to publish in DNS and is not served
    # until `verified_at` is set; a NULL token means it never needed the proof.
    Column("verify_token", String(64), nullable=True),
    Column("verified_at", DateTime(timezone=True), nullable=True),
    sqlite_autoincrement=True,
)

# The local parts a domain accepts; a domain with no rows accepts every local part.
domain_addresses = Table(
    "domain_addresses",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "domain_id", Integer, ForeignKey("domains.id", ondelete="CASCADE"), nullable=False
    ),
    Column("local_part", String(64), nullable=False),
    UniqueConstraint("domain_id", "local_part", name="uq_domain_addresses_domain_local"),
)

# Which domains each raise of the "domains" change counter stood for (migration 0031): a
# node that sees the counter move reads the domains changed since the value it holds and
# patches its RCPT snapshot, instead of reading every domain and address again. `seq` is the
# counter's value after the raise; `domain_id` has no foreign key, as a removed domain's
# change is logged too. The writer deletes rows more than `CHANGE_LOG_KEEP` raises old
# (`mailcore.gateway.domains`); a node further behind than that reloads everything.
domain_changes = Table(
    "domain_changes",
    metadata,
    Column("seq", BigInteger, primary_key=True),
    Column("domain_id", Integer, primary_key=True),
)

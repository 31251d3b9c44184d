"""The MTA-STS policies (RFC 8461) of the domains the queue delivers to by MX (migration
0070), shared by the nodes of one store: a policy fetched by one node protects every node's
mail to that domain against a later downgrade (its TXT record stripped, its policy host
unreachable) until it expires (mailcore.queue.mtasts).

One row per domain (`domain`, lower-cased, without a trailing dot): the id of the TXT record
(`_mta-sts.<domain>`) the policy was fetched under (`policy_id`: a new id fetches it again),
its `mode` (enforce, testing or none), its `mx` patterns (one a line), its `max_age` (seconds,
at most 31557600), when it was fetched (`fetched_at`) and when it stops counting
(`expires_at`, fetched_at + max_age; epoch seconds; indexed: an expired row counts for
nothing and is deleted by the hourly sweep, mailcore.queue.mtasts.PolicySweeper)."""

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text

from mailcore.store.schema.meta import metadata

mta_sts_policies = Table(
    "mta_sts_policies",
    metadata,
    Column("domain", String(253), primary_key=True),
    Column("policy_id", String(32), nullable=False),
    Column("mode", String(8), nullable=False),
    Column("mx", Text, nullable=False),
    Column("max_age", Integer, nullable=False),
    Column("fetched_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_mta_sts_policies_expires_at", "expires_at"),  # the sweep
)

"""Rate-limit buckets shared by the nodes of one store (migration 0052), for the limits that
guard secrets (password logins, a drop's password, one-time codes sent) and must not grow
with the number of nodes. `mailcore.ratelimits` takes from them.

One row per limited key: `name` is a digest of the limit's name and the key (no address or
account name in clear), `tokens` what the bucket held at `at` (epoch seconds, the
database's clock), `full_at` when it is full again: a row past it holds nothing worth
keeping and is swept."""

from sqlalchemy import Column, Float, Index, String, Table

from mailcore.store.schema.meta import metadata

rate_buckets = Table(
    "rate_buckets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("at", Float, nullable=False),
    Column("full_at", Float, nullable=False),
    Index("ix_rate_buckets_full_at", "full_at"),
)

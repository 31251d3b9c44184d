"""The fingerprints of each node's secret keys (migration 0054), so that nodes sharing a
PostgreSQL store can tell whether they hold the same keys: `mailcore.nodekeys` checks it.

One row per node (`[queue] node_id`) and key (`name`: `pages.key`, `quarantine.key`,
`safedrop.key`, `fetch.key`): `fingerprints` are the HMAC-SHA256 of a fixed label under each
of the node's keys of that name (32 hex digits each, comma-separated, the key that signs or
encrypts first), never the key nor a plain hash of it; `seen_at` (epoch seconds, the
database's clock) when the node last said it runs."""

from sqlalchemy import Column, Float, String, Table

from mailcore.store.schema.meta import metadata

node_keys = Table(
    "node_keys",
    metadata,
    Column("node_id", String(255), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("fingerprints", String(1024), nullable=False),
    Column("seen_at", Float, nullable=False),
)

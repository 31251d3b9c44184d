"""The nodes sharing a PostgreSQL store and what each declares (migration 0055), so that
each node can tell whether the others see its files and hold its keys:
`mailcore.nodes` keeps it and checks it.

One row per running node (`[queue] node_id`), removed when it stops cleanly: `seen_at`
(epoch seconds, the database's clock) when it last said it runs; `files_marker` the random
text it wrote, at its start, in a file of its own under each files area (`safedrop/nodes/`,
`mailapi/nodes/`); `key_fingerprints` a JSON object naming each of its secret keys
(`pages.key`, `quarantine.key`, `safedrop.key`, `fetch.key`) with the HMAC-SHA256 of a fixed
label under each of its keys of that name (32 hex digits each, the key that signs or
encrypts first), never the key nor a plain hash of it."""

from sqlalchemy import Column, Float, String, Table, Text

from mailcore.store.schema.meta import metadata

nodes = Table(
    "nodes",
    metadata,
    Column("node_id", String(255), primary_key=True),
    Column("seen_at", Float, nullable=False),
    Column("files_marker", String(64), nullable=False),
    Column("key_fingerprints", Text, nullable=False),
)

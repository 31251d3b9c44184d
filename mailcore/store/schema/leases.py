"""Leases on named background jobs (migration 0016), so that nodes sharing one store run
each such job on one node at a time. `mailcore.store.leases` claims them.

One row per job name: `owner` is the node id of the node that runs the job (`[queue]
node_id`) and `until` (epoch seconds) when its claim lapses unless it claims again."""

from sqlalchemy import Column, Float, String, Table

from mailcore.store.schema.meta import metadata

job_leases = Table(
    "job_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("until", Float, nullable=False),
)

"""The nodes that keep files under `files_dir` (migration 0052), so that each node can tell
whether it sees the others' files: `mailcore.filenodes` checks it.

One row per node (`[queue] node_id`): `marker` is the random text this node wrote, at its
start, in a file of its own under each files area (`safedrop/nodes/`, `mailapi/nodes/`);
`seen_at` (epoch seconds, the database's clock) when the node last said it runs. A node
that cannot read another's marker, with that text, does not see the same storage."""

from sqlalchemy import Column, Float, String, Table

from mailcore.store.schema.meta import metadata

file_nodes = Table(
    "file_nodes",
    metadata,
    Column("node_id", String(255), primary_key=True),
    Column("marker", String(64), nullable=False),
    Column("seen_at", Float, nullable=False),
)

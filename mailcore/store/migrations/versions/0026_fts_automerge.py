"""SQLite: the full-text index merges its segments 16 at a time, not 4 (issue 17.1).

FTS5 writes each transaction's new terms as a new segment of its index and merges segments
as they pile up: by default as soon as 4 of one level exist, so a backup that commits a
batch of 200 messages at a time rewrites most of the index pages it wrote over and over.
With 16 the same term lists are merged less often. Measured through the backup's store
path (parsed messages stored in batches of 200: rows, blobs, threads, index and commit):
20,000 messages 2,576 → 3,453 msg/s, 100,000 messages 1,837 → 2,224 msg/s. The index ends
the same size, and prefix searches of the 100,000 (200 uncommon words, the 20 commonest)
took the same time either way, within the noise between runs. `automerge` is a setting of
the index kept in the store (`messages_fts_config`), so it holds for every connection and
every node.

Upgrade (SQLite): the setting is written; no index page changes. PostgreSQL: nothing (its
GIN index merges its pending list on its own terms). Downgrade: FTS5's default, 4.

Revision ID: 0026_fts_automerge
Revises: 0025_message_columns
"""

from __future__ import annotations

from alembic import op

revision = "0026_fts_automerge"
down_revision = "0025_message_columns"
branch_labels = None
depends_on = None

AUTOMERGE = 16
FTS5_DEFAULT = 4


def _automerge(value: int) -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("INSERT INTO messages_fts (messages_fts, rank) "
                   f"VALUES ('automerge', {int(value)})")


def upgrade() -> None:
    _automerge(AUTOMERGE)


def downgrade() -> None:
    _automerge(FTS5_DEFAULT)

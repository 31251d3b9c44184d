"""Domains: the id of a removed domain is never given to another one (SQLite AUTOINCREMENT).

A queued recipient names its served domain by id (`queue_recipients.domain_id`, no foreign
key), and the queue routes, filters, charges and quarantines it by that id. On SQLite an
INTEGER PRIMARY KEY without AUTOINCREMENT takes the highest id in use plus one, so a user
removing their newest domain and any user adding one next gave the new domain the removed
one's id: mail still queued for the removed domain (its server down, a retry pending) was
delivered to the new domain's next hop, its tokens charged to, and its spam quarantined
for, the new domain's owner. PostgreSQL's sequence never gives an id twice.

Upgrade (SQLite): the table is rebuilt with AUTOINCREMENT, rows and ids kept, and its
sequence starts above every domain id still named anywhere (queued recipients, the change
log), so that no id removed before this revision is given again either. PostgreSQL: nothing
to do. Downgrade: the table is rebuilt without AUTOINCREMENT.

Revision ID: 0034_domain_ids_never_reused
Revises: 0033_drop_open_receipts
"""

from __future__ import annotations

from alembic import op

from mailcore.store.migrate import rebuild_autoincrement

revision = "0034_domain_ids_never_reused"
down_revision = "0033_drop_open_receipts"
branch_labels = None
depends_on = None

# The tables whose rows point at a domain (foreign keys), checked after the rebuild.
_REFERENCES = ("domain_addresses", "quarantine")
# The domain ids a row may still name after the domain is gone.
_NAMED_IDS = (
    "SELECT max(n) FROM (SELECT max(id) AS n FROM domains"
    " UNION ALL SELECT max(domain_id) FROM queue_recipients"
    " UNION ALL SELECT max(domain_id) FROM domain_changes)"
)


def upgrade() -> None:
    rebuild_autoincrement(op.get_bind(), "domains", True, _REFERENCES, _NAMED_IDS)


def downgrade() -> None:
    rebuild_autoincrement(op.get_bind(), "domains", False, _REFERENCES)

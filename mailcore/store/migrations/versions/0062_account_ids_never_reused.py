"""Fetch accounts: the id of a deleted account is never given to another one (SQLite
AUTOINCREMENT).

An account's id is what the Simple IMAP2API (`/api/imap-servers/{id}/`, `imap_server` in
e-mails and webhook payloads) and Dropmyemail (`/v1/accounts/:id`) give clients, and the
webhook events a sync left untold name it (`webhook_events.account_id`, no foreign key: a
deleted account's `sync.completed` is still told). On SQLite an INTEGER PRIMARY KEY without
AUTOINCREMENT takes the highest id in use plus one, so a user deleting their newest account
and any user creating one next gave the new account the deleted one's id: a client holding
the old id reached another account, and the deleted one's untold event was told under the
new one's id. PostgreSQL's sequence never gives an id twice.

Upgrade (SQLite): the table is rebuilt with AUTOINCREMENT, rows and ids kept, and its
sequence starts above every account id still named anywhere (pending webhook events), so
that no id deleted before this revision is given again either. PostgreSQL: nothing to do.
Downgrade: the table is rebuilt without AUTOINCREMENT.

Revision ID: 0062_account_ids_never_reused
Revises: 0061_pop_sizes
"""

from __future__ import annotations

from alembic import op

from mailcore.store.migrate import rebuild_autoincrement

revision = "0062_account_ids_never_reused"
down_revision = "0061_pop_sizes"
branch_labels = None
depends_on = None

# The tables whose rows point at an account (foreign keys), checked after the rebuild.
_REFERENCES = ("fetch_folders", "messages", "mailbox_jobs")
# The account ids a row may still name after the account is gone.
_NAMED_IDS = (
    "SELECT max(n) FROM (SELECT max(id) AS n FROM fetch_accounts"
    " UNION ALL SELECT max(account_id) FROM webhook_events)"
)


def upgrade() -> None:
    rebuild_autoincrement(op.get_bind(), "fetch_accounts", True, _REFERENCES, _NAMED_IDS)


def downgrade() -> None:
    rebuild_autoincrement(op.get_bind(), "fetch_accounts", False, _REFERENCES)

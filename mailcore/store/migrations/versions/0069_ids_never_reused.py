"""Messages, threads, attachments, folders, Mail API mail, safedrop bundles, recipients and
files, users, queue recipients and webhook deliveries: the id of a deleted row is never
given to another one (SQLite AUTOINCREMENT).

On SQLite an INTEGER PRIMARY KEY without AUTOINCREMENT takes the highest id in use plus
one, so the id of a deleted newest row was given to the next row made, by any user. These
ids are what clients and operators hold: a message's id in the Simple IMAP2API
(`/api/emails/{id}/`), Dropmyemail (`.../messages/:id`, an attachment's `message_id`) and
the webhooks (`email.new`, `thread.updated`), its thread's (`thread-N`), its attachments'
and its Dropmyemail folder's (`mailbox_id`); a safedrop bundle's, recipient's and file's
(`/dropbundles/:id/...`; a bundle's files live on disk under its id); a user's (Dropmyemail's
`user_id`); a webhook delivery's (its log, in the API and `mailcore webhook log`). A Mail
API mail's id is its place in the listing (a cursor, `mailapi_gone.mail_id`), and a queue
recipient's is the key that keeps a local delivery from being stored twice
(`mailapi_mail.queue_rcpt_id`): a recipient given a delivered one's id would be taken for
stored already, and its mail never put in the mailbox. A client holding an old id reached
another object, or another user's. PostgreSQL's sequences never give an id twice.

Left as they are (their id is never shown, nor named by a row that outlives them):
mailboxes (named by address), grants (no id: a mailbox and a user), Mail API attachments (by
index), quarantine (by `ident`), invoices (by `ref`), OAuth apps, codes and tokens (by uid
or digest), credentials (by prefix), domain addresses, webhook events, API sends, digest
runs, safedrop downloads; contacts have no table (their id is derived from the address).

Upgrade (SQLite): each table is rebuilt with AUTOINCREMENT (`rebuild_autoincrement`: rows,
ids, indexes and triggers kept; the full-text index reads messages by id and stays valid),
its sequence starting above every id still named anywhere (pending webhook events, the
Mail API's gone mail and delivered recipients). It takes about as long as copying the
tables and building their indexes again, `messages` most: some 9 s per 100,000 messages
(a store of 200,000 generated messages, 1.8 GB: 18 s, of which 13 s for `messages`, on a
loaded 2-core machine; a million: about a minute and a half at the first start), and free
disk for a second copy of `messages`. PostgreSQL: nothing to do. Downgrade: the tables are rebuilt without
AUTOINCREMENT.

Revision ID: 0069_ids_never_reused
Revises: 0068_recipient_verdicts
"""

from __future__ import annotations

from alembic import op

from mailcore.store.migrate import rebuild_autoincrement

revision = "0069_ids_never_reused"
down_revision = "0068_recipient_verdicts"
branch_labels = None
depends_on = None


def _highest(*named: str) -> str:
    """The highest of the ids the queries `named` give (each a max)."""
    return "SELECT max(n) FROM (" + " UNION ALL ".join(f"SELECT ({q}) AS n" for q in named) + ")"


# Each table: the tables whose rows point at it (foreign keys, checked after the rebuild),
# and the highest id a row may still name after the row is gone.
TABLES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "users": (
        ("threads", "token_tanks", "token_usage", "token_charges", "invoices", "credentials",
         "drop_bundles", "mailbox_grants", "oauth_apps", "oauth_codes", "oauth_tokens",
         "message_counts", "message_thread_totals", "messages", "domains", "mailboxes",
         "quarantine", "mailapi_mail", "api_sends", "webhook_events", "fetch_accounts",
         "mailbox_jobs", "webhooks"),
        _highest("SELECT max(id) FROM users", "SELECT max(user_id) FROM webhook_deliveries",
                 "SELECT max(user_id) FROM message_refs"),
    ),
    "fetch_folders": (("messages",), None),
    "threads": (("messages",), _highest(
        "SELECT max(id) FROM threads",
        "SELECT max(ref_id) FROM webhook_events WHERE event = 'thread.updated'")),
    "messages": (
        ("message_refs", "message_attachments", "mailbox_job_items", "message_pop_sizes"),
        _highest("SELECT max(id) FROM messages",
                 "SELECT max(ref_id) FROM webhook_events WHERE event = 'email.new'"),
    ),
    "message_attachments": ((), None),
    "mailapi_mail": (("mailapi_attachments",), _highest(
        "SELECT max(id) FROM mailapi_mail", "SELECT max(mail_id) FROM mailapi_gone")),
    "drop_bundles": (("drop_recipients", "drop_files"), None),
    "drop_recipients": (
        ("drop_downloads", "drop_download_parts", "drop_download_attempts"), None),
    "drop_files": (("drop_downloads", "drop_download_parts", "drop_download_attempts"), None),
    "queue_recipients": ((), _highest(
        "SELECT max(id) FROM queue_recipients", "SELECT max(queue_rcpt_id) FROM mailapi_mail")),
    "webhook_deliveries": ((), None),
}


def upgrade() -> None:
    conn = op.get_bind()
    for table, (references, named_ids) in TABLES.items():
        rebuild_autoincrement(conn, table, True, references, named_ids)


def downgrade() -> None:
    conn = op.get_bind()
    for table, (references, _) in TABLES.items():
        rebuild_autoincrement(conn, table, False, references)

"""Migrate/restore jobs and webhooks: the id of a deleted one is never given to another one
(SQLite AUTOINCREMENT).

Their ids are what Dropmyemail (`/v1/accounts/:id/migrates/:id`, `/restores/:id`), the
Simple IMAP2API (`/api/webhooks/{id}/`) and the CLI (`mailcore jobs show ID`, `webhook
remove USER ID`) give clients and operators, and a job's lease is named by its id
(`job_leases`, `mailbox-job-N`, no foreign key). On SQLite an INTEGER PRIMARY KEY without
AUTOINCREMENT takes the highest id in use plus one, so a job deleted with its account, or a
webhook deleted, gave its id to the next one made, by any user: a client holding the old id
reached another user's object. PostgreSQL's sequences never give an id twice.

Upgrade (SQLite): both tables are rebuilt with AUTOINCREMENT, rows and ids kept, the jobs'
sequence starting above every job id a lease still names. PostgreSQL: nothing to do.
Downgrade: the tables are rebuilt without AUTOINCREMENT.

Revision ID: 0063_job_webhook_ids
Revises: 0062_account_ids_never_reused
"""

from __future__ import annotations

from alembic import op

from mailcore.store.migrate import rebuild_autoincrement

revision = "0063_job_webhook_ids"
down_revision = "0062_account_ids_never_reused"
branch_labels = None
depends_on = None

# The job ids a row may still name after the job is gone (mailcore.fetch.jobs.lease_name).
_NAMED_JOB_IDS = (
    "SELECT max(n) FROM (SELECT max(id) AS n FROM mailbox_jobs"
    " UNION ALL SELECT max(CAST(substr(name, 13) AS INTEGER)) FROM job_leases"
    " WHERE name LIKE 'mailbox-job-%')"
)


def upgrade() -> None:
    conn = op.get_bind()
    rebuild_autoincrement(conn, "mailbox_jobs", True, ("mailbox_job_items",), _NAMED_JOB_IDS)
    rebuild_autoincrement(conn, "webhooks", True, ("webhook_deliveries",))


def downgrade() -> None:
    conn = op.get_bind()
    rebuild_autoincrement(conn, "mailbox_jobs", False, ("mailbox_job_items",))
    rebuild_autoincrement(conn, "webhooks", False, ("webhook_deliveries",))

"""Migrate and restore jobs of Dropmyemail accounts (migration 0018), and what each job did
to each backed-up message.

`mailbox_jobs`: one row per job. `kind` is migrate (copy an account's backup into another
mailbox) or restore (put the backup back into the account itself); `status` is queued,
running, done or failed (`reason` says why). A migrate keeps its destination's server and
login here, the password only as ciphertext (`password_enc`, the fetch engine's key), and
the CA or certificate fingerprint to trust for it when not the system's (as accounts do).
`downloaded` counts the messages dealt with so far, `messages` the messages the job has to
deal with, `appended` those it actually wrote (the rest were found there already),
`restore_size` their bytes. `phase` is backup (bring the backup up to date first), copy, or
recheck (a migrate whose last sync passed over a folder it could not tell deleted: synced
again first, `mailcore.fetch.migrate.MailboxCopier.bring_backup_up_to_date`).
`next_attempt_at` (epoch seconds) delays a retry after a transient failure. Which node runs a
job is leased in `job_leases` under the name `mailbox-job-<id>`.

`mailbox_job_items`: one row per (job, backed-up message) the job wrote or found. `inflight`
is written before the message is sent (so a crash between the server's OK and our record is
resolved by looking at the destination first), `done` once the server said OK (with the
APPENDUID where the server has UIDPLUS), `present` when the destination already held it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from mailcore.store.schema.meta import metadata

mailbox_jobs = Table(
    "mailbox_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column(
        "account_id", Integer, ForeignKey("fetch_accounts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("status", String(8), nullable=False, server_default="queued"),
    Column("reason", Text, nullable=True),
    Column("phase", String(8), nullable=False, server_default="backup"),
    Column("email", String(254), nullable=False, server_default=""),
    Column("host", String(255), nullable=True),
    Column("protocol", String(8), nullable=True),
    Column("port", Integer, nullable=True),
    Column("use_ssl", Boolean, nullable=False, server_default="0"),
    Column("start_tls", Boolean, nullable=False, server_default="0"),
    Column("allow_cleartext", Boolean, nullable=False, server_default="0"),
    Column("username", String(255), nullable=True),
    Column("password_enc", LargeBinary, nullable=True),
    Column("tls_ca_pem", Text, nullable=True),
    Column("tls_fingerprint", String(64), nullable=True),
    Column("downloaded", Integer, nullable=False, server_default="0"),
    Column("messages", Integer, nullable=False, server_default="0"),
    Column("appended", Integer, nullable=False, server_default="0"),
    Column("restore_size", BigInteger, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("start_time", DateTime(timezone=True), nullable=True),
    Column("end_time", DateTime(timezone=True), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_mailbox_jobs_status_next", "status", "next_attempt_at"),
    Index("ix_mailbox_jobs_account_kind", "account_id", "kind"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0063)
)

mailbox_job_items = Table(
    "mailbox_job_items",
    metadata,
    Column(
        "job_id", Integer, ForeignKey("mailbox_jobs.id", ondelete="CASCADE"), nullable=False
    ),
    Column(
        "message_row_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("state", String(8), nullable=False),
    Column("dest_uidvalidity", BigInteger, nullable=True),
    Column("dest_uid", BigInteger, nullable=True),
    PrimaryKeyConstraint("job_id", "message_row_id", name="pk_mailbox_job_items"),
    Index("ix_mailbox_job_items_message_row_id", "message_row_id"),
)

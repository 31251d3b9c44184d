"""Repair stores stamped past migrations they never ran (0017-0020, 0042-0052).

Migrations written at once on separate lines of work were chained onto the same revision
and put in one line when merged, so a store some released commits migrated holds a revision
whose ancestors, as the chain now runs, include migrations it never ran or ran before they
were complete:

- stamped 0017-0021 by the commits where 0017-0021 were reserved, empty, for the changes
  in flight (56c1ca3, fe67b6a) until each was filled: no `message_attachments.meta_data`
  (0017), no `mailbox_jobs` (0018), no Mail API file columns or `mailboxes.mail_count`
  (0019), no `message_counts` and its triggers (0020); and where 0018 and 0019 were filled
  and later completed, no `mailbox_jobs.tls_ca_pem`/`tls_fingerprint` or no
  `mailboxes.mail_count`. Head's daemon then failed at its start ("cannot open the
  database ...: no such table: mailbox_jobs");

- stamped `0048_fetch_folder_skipped` by the commits where 0048 revised 0041 (no 0042, no
  0046) or 0046 (no 0042): no `users.deleting_at`, and without 0046 no
  `quarantine_digest_runs`;
- stamped `0051_drop_secrets_removed` by the commits where 0051 revised 0048: no
  `mailapi_mail.size`, `mailboxes.used_bytes` (0049), `mailapi_mail.author_id` (0050);
- stamped `0054_file_nodes` (restamped 0052_file_nodes_rate_buckets before the upgrade:
  mailcore.store.migrate.RETIRED_REVISIONS), which made 0052's file_nodes and not its
  `rate_buckets`.

Alembic saw such a store as past those migrations and never ran them; the upgrade then
ended without an error, and the daemon and every admin command failed on the first query
of the missing column ("no such column: users.deleting_at", "mailboxes.used_bytes").

Upgrade: what is missing is made as those migrations made it: 0017-0020 never run are run
(their own upgrade, in turn, counts and triggers included), the pieces added to 0018 and 0019
later are added, and the statements of 0042-0052 are copied here (as a migration keeps
doing what it did): the column or table, and for 0049 the sizes counted from the rows. A
store that has them is left as it is. Downgrade: nothing
(what was added belongs to 0042-0052 and goes with their downgrades).

Revision ID: 0056_schema_repair
Revises: 0055_node_registry
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0056_schema_repair"
down_revision = "0055_node_registry"
branch_labels = None
depends_on = None


def _columns(table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}


def _run_migration(stem: str) -> None:
    """Run the upgrade of migration `stem` (this directory's `stem`.py) on a store that
    never ran it."""
    spec = importlib.util.spec_from_file_location(f"mailcore_repair_{stem}",
                                                  Path(__file__).with_name(f"{stem}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.upgrade()


def _repair_reserved() -> None:
    """0017-0020, reserved empty and filled later (and 0018, 0019 completed later still)."""
    inspector = sa.inspect(op.get_bind())
    if "meta_data" not in _columns("message_attachments"):
        _run_migration("0017_backup_attachments")
    if not inspector.has_table("mailbox_jobs"):
        _run_migration("0018_mailbox_jobs")
    elif "tls_ca_pem" not in _columns("mailbox_jobs"):  # as 7608f97 completed 0018
        with op.batch_alter_table("mailbox_jobs") as batch:
            batch.add_column(sa.Column("tls_ca_pem", sa.Text(), nullable=True))
            batch.add_column(sa.Column("tls_fingerprint", sa.String(64), nullable=True))
    if "raw_sha256" not in _columns("mailapi_mail"):
        _run_migration("0019_mailapi_files")
    elif "mail_count" not in _columns("mailboxes"):  # as 869030d completed 0019
        with op.batch_alter_table("mailboxes") as batch:
            batch.add_column(sa.Column("mail_count", sa.Integer(), nullable=False,
                                       server_default="0"))
        op.execute("UPDATE mailboxes SET mail_count = (SELECT count(*) FROM mailapi_mail"
                   " WHERE mailapi_mail.mailbox_id = mailboxes.id)")
    if not inspector.has_table("message_counts"):
        _run_migration("0020_message_read_indexes")


def _repair_user_deleting() -> None:  # as 0042_user_deleting
    if "deleting_at" not in _columns("users"):
        op.add_column("users", sa.Column("deleting_at", sa.DateTime(timezone=True),
                                         nullable=True))


def _repair_digest_runs() -> None:  # as 0046_quarantine_digest_runs
    if sa.inspect(op.get_bind()).has_table("quarantine_digest_runs"):
        return
    op.create_table(
        "quarantine_digest_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine_digest_runs")),
    )


def _repair_mailapi_usage() -> None:  # as 0049_mailapi_usage
    if "size" in _columns("mailapi_mail"):
        return
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.add_column(sa.Column("size", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("used_bytes", sa.BigInteger(), nullable=False,
                                   server_default="0"))
    if op.get_bind().dialect.name == "postgresql":
        octets = "octet_length({})"
    else:  # SQLite's length() of text counts characters; of a blob, bytes
        octets = "length(CAST({} AS BLOB))"
    fields = " + ".join(octets.format(c) for c in (
        "mail_from", "to_addrs", "cc_addrs", "bcc_addrs", "reply_to", "subject", "body"))
    op.execute(
        f"UPDATE mailapi_mail SET size = {fields} + coalesce(length(raw), 0)"
        " + coalesce((SELECT sum(a.size) FROM mailapi_attachments a"
        " WHERE a.mail_id = mailapi_mail.id), 0)")
    op.execute("UPDATE mailboxes SET used_bytes = coalesce((SELECT sum(size) FROM mailapi_mail"
               " WHERE mailapi_mail.mailbox_id = mailboxes.id), 0)")


def _repair_mail_author() -> None:  # as 0050_mailapi_mail_author
    if "author_id" in _columns("mailapi_mail"):
        return
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.add_column(sa.Column("author_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_mailapi_mail_author_id_users", "users", ["author_id"],
                                 ["id"], ondelete="SET NULL")
    op.create_index("ix_mailapi_mail_author_id", "mailapi_mail", ["author_id"])


def _repair_rate_buckets() -> None:  # as 0052_file_nodes_rate_buckets
    if sa.inspect(op.get_bind()).has_table("rate_buckets"):
        return
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("full_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_rate_buckets_full_at", "rate_buckets", ["full_at"])


def upgrade() -> None:
    _repair_reserved()
    _repair_user_deleting()
    _repair_digest_runs()
    _repair_mailapi_usage()
    _repair_mail_author()
    _repair_rate_buckets()


def downgrade() -> None:
    pass

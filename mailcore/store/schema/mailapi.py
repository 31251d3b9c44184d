"""The Mail API's tables (seed 002, migrations 0013, 0019, 0029, 0037, 0049, 0050 and 0057):
hosted mailboxes, access grants, the mail kept in them, and its attachments.

A mailbox is an address whose mail is kept here; its owner has every right on it, other
users have what `mailbox_grants` gives them. A mail row is a draft, an outbox message
waiting for the queue, sent mail, or inbox mail delivered locally. `public_id` is the short
opaque id the API shows; `id` orders the listing (newest first, keyset cursor). Times are
epoch seconds from the injected clock. `mailapi_gone` keeps where a mail stood in a mailbox
it left (deleted, or sent from another mailbox) so that a listing cursor naming it goes on.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Sequence,
    String,
    Table,
    Text,
)

from mailcore.store.schema.meta import metadata

# `address` is the normalised form: local part as given, domain in lower-case A-labels.
# `domain_id` is the domain row the mailbox was created under (migration 0037): mail is routed
# to it and sent from it only while that row is served. Removing the domain sets it NULL for
# good (a new row of the same name, whoever claims it, is another domain); the mailbox keeps
# its mail, readable, until it is deleted.
mailboxes = Table(
    "mailboxes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(254), nullable=False, unique=True),
    Column("owner_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", Float, nullable=False),
    # How many mailapi_mail rows it holds, kept by their writers (mailcore.mailapi.counts).
    Column("mail_count", Integer, nullable=False, server_default="0"),
    Column("domain_id", Integer, ForeignKey("domains.id", ondelete="SET NULL"), nullable=True),
    # The bytes its mail takes: the sum of its mailapi_mail rows' `size`, kept by their
    # writers (migration 0049; mailcore.mailapi.counts), checked against
    # `[mailapi] mailbox_quota_bytes`.
    Column("used_bytes", BigInteger, nullable=False, server_default="0"),
    # Its own quota in bytes, set by the operator (migration 0053; `mailcore mailbox quota`):
    # NULL follows `[mailapi] mailbox_quota_bytes`, 0 is no limit.
    Column("quota_bytes", BigInteger, nullable=True),
    Index("ix_mailboxes_owner_id", "owner_id"),
    Index("ix_mailboxes_domain_id", "domain_id"),
)

# What a user other than the owner may do with a mailbox; no row (or every right false)
# means the mailbox is invisible to that user.
mailbox_grants = Table(
    "mailbox_grants",
    metadata,
    Column(
        "mailbox_id", Integer, ForeignKey("mailboxes.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("allow_read", Boolean, nullable=False, server_default="0"),
    Column("allow_send", Boolean, nullable=False, server_default="0"),
    Column("allow_reply_to", Boolean, nullable=False, server_default="0"),
    Column("allow_delete", Boolean, nullable=False, server_default="0"),
    Column("allow_modify", Boolean, nullable=False, server_default="0"),
    Index("ix_mailbox_grants_user_id", "user_id"),
)

# The values of `mailapi_mail.status`; every module that reads or writes it takes them here.
DRAFT, OUTBOX, SENT, INBOX = "draft", "outbox", "sent", "inbox"

# `status`: draft, outbox, sent or inbox. Address fields are comma-separated addresses as
# given. `raw` is the message as handed to the queue (outbox, sent); an inbox message as
# received is the file `raw_sha256` names (mailcore.mailapi.files: one file for every
# recipient of the message; `raw` holds it in rows stored before migration 0019).
# `queue_id` is the spool id an outbox message is (or will be) accepted under: the
# idempotency key that keeps a crash from sending it twice. `queue_rcpt_id` is the queue
# recipient a local delivery stored: unique, so a delivery replayed after a crash stores
# nothing twice. `outbox_seq` is the mail's place in the outbox, given when it enters the
# outbox (a draft may enter long after it was created, so `id` is not that order): the
# sender takes each mailbox's outbox mail in this order (mailcore.mailapi.outbox). `size` is
# the bytes the mail keeps (migration 0049): its text fields (UTF-8), its attachments and its
# message (`raw`, or the received file), counted in its mailbox's `used_bytes`. `author_id`
# is the user who put it in the outbox (migration 0050; NULL: before it, or a deleted user):
# it is sent only while that user is enabled, and goes back to the drafts when the user's
# `allow_send` on its mailbox is taken away (mailcore.mailapi.outbox, mailboxes).
mailapi_mail = Table(
    "mailapi_mail",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", String(16), nullable=False, unique=True),
    Column(
        "mailbox_id", Integer, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False
    ),
    Column("status", String(8), nullable=False),
    Column("read", Boolean, nullable=False, server_default="0"),
    Column("mail_from", Text, nullable=False, server_default=""),
    Column("to_addrs", Text, nullable=False, server_default=""),
    Column("cc_addrs", Text, nullable=False, server_default=""),
    Column("bcc_addrs", Text, nullable=False, server_default=""),
    Column("reply_to", Text, nullable=False, server_default=""),
    Column("subject", Text, nullable=False, server_default=""),
    Column("body", Text, nullable=False, server_default=""),
    Column("raw", LargeBinary, nullable=True),
    Column("raw_sha256", String(64), nullable=True),
    Column("queue_id", String(32), nullable=True, unique=True),
    Column("queue_rcpt_id", Integer, nullable=True, unique=True),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("outbox_seq", BigInteger, nullable=True),
    Column("size", BigInteger, nullable=False, server_default="0"),
    Column("author_id", Integer, ForeignKey("users.id", ondelete="SET NULL"), nullable=True),
    Index("ix_mailapi_mail_mailbox_id", "mailbox_id", "id"),
    Index("ix_mailapi_mail_author_id", "author_id"),
    Index("ix_mailapi_mail_outbox", "status", "mailbox_id", "outbox_seq"),
    Index("ix_mailapi_mail_raw_sha256", "raw_sha256"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# Where `outbox_seq` values come from on PostgreSQL: a sequence, which every node draws from
# without waiting on another's transaction. SQLite has none; its writers take turns anyway,
# and the change counter "mailapi_outbox_seq" (change_counters) holds the last value given.
mailapi_outbox_seq = Sequence("mailapi_outbox_seq", metadata=metadata)

# An attachment's bytes are the file `sha256` names (mailcore.mailapi.files), shared by every
# row with the same content; `data` holds them only in rows stored before migration 0019.
mailapi_attachments = Table(
    "mailapi_attachments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "mail_id", Integer, ForeignKey("mailapi_mail.id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", String(255), nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=True),
    Column("sha256", String(64), nullable=True),
    Index("ix_mailapi_attachments_mail_id", "mail_id"),
    Index("ix_mailapi_attachments_sha256", "sha256"),
)

# Where a mail stood in a mailbox it left (migration 0057): its public id, its `id` (its place
# in the listing's order) and the mailbox, written when it is deleted or sent from another
# mailbox, kept GONE_KEEP seconds (mailcore.mailapi.listing). A listing cursor naming a mail
# no longer in a mailbox the caller may read starts at that place when the caller may read
# the mailbox it left, so a client walking its mail while mail is deleted goes on. Not
# unique: a public id no mail holds may be given again.
mailapi_gone = Table(
    "mailapi_gone",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", String(16), nullable=False),
    Column("mail_id", Integer, nullable=False),
    Column(
        "mailbox_id", Integer, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False
    ),
    Column("gone_at", Float, nullable=False),
    Index("ix_mailapi_gone_public_id", "public_id"),
    Index("ix_mailapi_gone_mailbox_id", "mailbox_id"),
    Index("ix_mailapi_gone_gone_at", "gone_at"),
)

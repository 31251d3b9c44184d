"""Mail in hosted mailboxes (seed 002's `/api/v1/mail/…`): listing (its reads are
mailcore.mailapi.listing), reading, drafts, the outbox, deleting.

Who may do what follows the mailbox's rights (mailcore.mailapi.mailboxes): reading needs
`allow_read`, writing as a `from` needs `allow_send`, a `reply-to` needs `allow_reply_to`
on that address, deleting needs `allow_delete`, and so does sending a draft from another
mailbox than its own (it leaves its mailbox for that one). Mail the caller may not read
answers as unknown, so a draft is kept in a mailbox the caller may read and send from (its
`from`'s when the caller holds both there, else its own): one written from a mailbox where
it holds only `allow_send` would be out of its reach at once. A caller with no such mailbox
can send mail, but not keep a draft.

A client's mail is always stored: what cannot be sent (no `to`, a bad address, a header
field with a line break, a `from` or `reply-to` the caller may not use, a `from` or
`reply-to` mailbox whose domain was removed, a send past the caller's `[limits]` cap on
recipients: mailcore.sendcaps, counted in the transaction that would put it in the outbox)
stays a draft and the reply says why. Mail set to `outbox` is built with Python's `email`
package (Message-ID, Date, MIME attachments, no Bcc field; mailcore.mailapi.mime) and given
a queue id and its place in the outbox's order in the transaction that puts it in the
outbox; the OutboxSender hands it to the spool in that order (mailcore.mailapi.outbox). A
large mail (fields and attachments over BUILT_APART bytes) is built before that transaction
(on the same pool thread), from a read of what the transaction will find: building it
(attachments read from disk and encoded, up to max_message_bytes) must not hold the store's
one write lock, which the SMTP spool needs for every message it accepts. The transaction
checks the mail again and keeps the built message only when it would build it from the same
fields and parts; else (the mail or the caller's rights changed in between) it builds the
message itself. A small mail is built in the transaction: it takes a millisecond or two,
less than the extra read and, with several built at once, the contention for Python's lock
would cost.

On SQLite (the daemon sets `ride` to Spool.ride) a write's transaction is a rider of the
spool's next group commit, in a savepoint of its own: the mail posted meanwhile and the
queue's messages commit together, one fsync for all of them, where each post's own commit
cost one (and took turns with the spool for the store's one write lock). Its reply still
waits for that commit; a write refused (its savepoint rolled back) is refused alone, a group
whose commit fails fails each of its writes (SpoolError, whose cause is the store's error).
Mail to be sent has its addresses parsed (and a large one is built) on the pool before it
rides. PostgreSQL groups concurrent commits itself, and there a rider's row locks would make
the queue's lane wait on other transactions: each write is a transaction of its own.

Attachments are files on disk named by their content hash (mailcore.mailapi.files): a
multipart upload is streamed to disk within `[mailapi] max_attachment_bytes` per file and
`max_message_bytes` in all (413 otherwise), before the mail's row is written; an edit
adding attachments to a draft is refused (413) when the draft's would then be over
`max_message_bytes` or MAX_PARTS files in all. A write that
stores no mail (refused, or failed) takes back the files its upload made; files of deleted
mail are removed once no row names them.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO
from typing import Any, BinaryIO, NamedTuple, TypeVar

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.emailpolicy import header_breaks
from mailcore.mailapi.addresses import display_name, parse_address_list
from mailcore.mailapi.counts import (
    mail_size,
    thd_charge,
    thd_count_mail,
    thd_draft_room,
    thd_lock_drafts,
    thd_use,
)
from mailcore.mailapi.delivery import thd_new_public_id
from mailcore.mailapi.errors import CONFLICT, DENIED, NOT_FOUND, MailApiError
from mailcore.mailapi.files import (
    GRACE,
    MAX_PARTS,
    TOO_LARGE,
    MailFiles,
    Received,
    StoredFile,
)
from mailcore.mailapi.listing import (
    COLUMNS,
    FIELDS,
    GONE_SWEEP_BATCH,
    Mail,
    Page,
    mail_of,
    thd_attachments,
    thd_left,
    thd_page,
    thd_sweep_gone,
)
from mailcore.mailapi.mailboxes import RIGHTS, Rights, thd_hold_mailbox, thd_mailbox
from mailcore.mailapi.mime import OutgoingPart, build_message
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.queue.model import SERVED
from mailcore.sendcaps import SendCaps
from mailcore.smtp.queueid import new_queue_id
from mailcore.store import Database
from mailcore.store.chunks import found_keys
from mailcore.store.counters import thd_bump_counter
from mailcore.store.database import Reader
from mailcore.store.errands import Errand
from mailcore.store.schema import (
    domains,
    mailapi_attachments,
    mailapi_mail,
    mailbox_grants,
    mailboxes,
)
from mailcore.store.schema.mailapi import DRAFT, INBOX, OUTBOX, mailapi_outbox_seq
from mailcore.store.sends import SendVerdict
from mailcore.text import has_control_multiline
from mailcore.uploads import shielded
from mailcore.workers import CpuPool

log = Logger()

DEFAULT_COUNT = 25
# Mail whose fields (header fields and body) and attachments together are larger is built
# before its transaction.
BUILT_APART = 64 * 1024
MAX_COUNT = 1000
# How often GoneSweeper deletes the places cursors no longer find (seconds).
GONE_SWEEP_INTERVAL = 3600.0
# The longest subject mail is sent with (characters): RFC 5322's line length. Folding one
# costs more than its length (a 200 KB subject took seconds), and a mail is built holding
# the store's write lock; a longer subject keeps the mail a draft.
MAX_SUBJECT = 998
# The most recipients (to, cc and bcc) a mail is sent to: [smtp] max_recipients' default, so
# that a relay answering as ours does takes them in one transaction. A longer list keeps the
# mail a draft; one whose text cannot be that short (ADDRESS_TEXT characters an address, or
# more than two `@` an address) is refused before it is parsed.
MAX_RECIPIENTS = 100
ADDRESS_TEXT = 512
_RECIPIENT_FIELDS = ("to", "cc", "bcc")
_ADDRESS_FIELDS = ("to", "cc", "bcc", "reply-to", "from")
T = TypeVar("T")

_m = mailapi_mail.c
_a = mailapi_attachments.c
# A mail's row as listing, reading and editing use it: every column but `raw`, the message
# as sent or received (an outbox mail's attachments in it, base64: up to
# max_message_bytes and more). Only sending reads it (mailcore.mailapi.outbox); a page of
# up to MAX_COUNT mails that read it would hold every one in memory at once.
_ROW = select(*[c for c in mailapi_mail.c if c.key != "raw"])
_NEXT_OUTBOX_SEQ = select(mailapi_outbox_seq.next_value())  # PostgreSQL
# The statements a post and a mail's reads and edits run, built once: SQLAlchemy builds,
# keys and compiles a statement made in the call every time (about 100 us each), one built
# once it runs from its cache.
_ROW_BY_ID = _ROW.where(_m.id == bindparam("row_id"))
_ROW_BY_PUBLIC_ID = _ROW.where(_m.public_id == bindparam("public_id"))
# Sets the columns the parameters name besides row_id.
_UPDATE_BY_ID = update(mailapi_mail).where(_m.id == bindparam("row_id"))
# A draft's fields, only while it is still a draft.
_EDIT_DRAFT = update(mailapi_mail).where(_m.id == bindparam("row_id"), _m.status == DRAFT)
_INSERT_MAIL = insert(mailapi_mail)
_DELETE_BY_ID = delete(mailapi_mail).where(_m.id == bindparam("row_id")) \
    .returning(_m.mailbox_id, _m.size)
_PARTS = select(_a.id, _a.name, _a.content_type, _a.sha256, _a.size) \
    .where(_a.mail_id == bindparam("mail_id")).order_by(_a.id)
_OWNED = select(mailboxes.c.id, mailboxes.c.address, mailboxes.c.domain_id) \
    .where(mailboxes.c.owner_id == bindparam("user"))
_GRANTED = select(mailboxes.c.id, mailboxes.c.address, mailboxes.c.domain_id, mailbox_grants) \
    .join(mailbox_grants, mailbox_grants.c.mailbox_id == mailboxes.c.id) \
    .where(mailbox_grants.c.user_id == bindparam("user"),
           mailboxes.c.owner_id != bindparam("user"))


class Outcome(enum.Enum):
    """What became of a create or update (the web layer picks the seed's reply)."""

    SAVED = "saved"  # a draft saved (or a flag changed)
    ENQUEUED = "enqueued"  # in the outbox, to be sent
    MISSING = "missing"  # no to / no status: kept as a draft
    INVALID = "invalid"  # a malformed address: kept as a draft
    BAD_HEADER = "bad_header"  # a line break or control character in the subject
    LONG_SUBJECT = "long_subject"  # a subject over MAX_SUBJECT characters: a draft
    TOO_MANY = "too_many"  # over MAX_RECIPIENTS recipients: a draft
    BAD_BODY = "bad_body"  # a control character other than TAB, CR, LF in the body: a draft
    UNAUTHORIZED = "unauthorized"  # a from / reply-to the caller may not use: a draft
    CAPPED = "capped"  # past the caller's [limits] cap on recipients: a draft


@dataclass(frozen=True)
class Download:
    """An attachment to serve: its bytes are the file `sha256` names, or `data` (rows
    stored before migration 0019)."""

    name: str
    content_type: str
    size: int
    sha256: str | None
    data: bytes | None


@dataclass
class Edit:
    """What a client sends: fields it gives (absent ones keep their value on update)."""

    status: str | None = None
    values: dict[str, str] = field(default_factory=dict)
    attachments: list[StoredFile] = field(default_factory=list)


@dataclass(frozen=True)
class Written:
    outcome: Outcome
    public_id: str
    # The mailbox an enqueued mail is sent from (None for any other outcome).
    mailbox_id: int | None = None
    # Why a CAPPED mail was not sent (mailcore.sendcaps).
    capped: SendVerdict | None = None


class Held(NamedTuple):
    """A mailbox as one user holds it: its address, the user's rights on it, and whether
    it is active (bound to the domain it was created under; mailcore.mailapi.mailboxes)."""

    address: str
    rights: Rights
    active: bool


# Every mailbox a user holds a right on, by id.
Holdings = dict[int, Held]


# What a write reads before its transaction to build the message: the mail's fields, the
# caller's rights, the attachments (name, content type, file hash), and the size of the
# body and attachments.
Gathered = tuple[dict[str, str], Holdings,
                 list[tuple[str, str, str | None]], int]
# What a message is built from: the checked fields, the parsed recipients, the attachments
# (name, content type, file hash; None for bytes kept in the row) and the time.
MadeFrom = tuple[dict[str, str], dict[str, list[str]], tuple[tuple[str, str, str | None], ...],
                 float]


@dataclass(frozen=True)
class Built:
    """A message built before its write transaction, and what it was built from."""

    made_from: MadeFrom
    raw: bytes


def thd_rights_by_mailbox(conn: Connection, user_id: int) -> Holdings:
    """Blocking: every mailbox `user_id` holds a right on: id → (address, rights, active)."""
    out: Holdings = {}
    for row in conn.execute(_OWNED, {"user": user_id}):
        out[row.id] = Held(row.address, Rights.every(), row.domain_id is not None)
    for row in conn.execute(_GRANTED, {"user": user_id}):
        rights = Rights(**{r: bool(getattr(row, r)) for r in RIGHTS})
        if rights.any():
            out[row.id] = Held(row.address, rights, row.domain_id is not None)
    return out


_ATTACHMENT_FILES = select(_a.sha256).where(
    _a.sha256.in_(bindparam("keys", expanding=True))).distinct()
_MESSAGE_FILES = select(_m.raw_sha256).where(
    _m.raw_sha256.in_(bindparam("keys", expanding=True))).distinct()


def thd_files_in_use(conn: Connection, hashes: Sequence[str]) -> set[str]:
    """Blocking: which of these file hashes a row names (an attachment, an inbox message)."""
    return (found_keys(conn, _ATTACHMENT_FILES, {}, hashes)
            | found_keys(conn, _MESSAGE_FILES, {}, hashes))


def _part(f: StoredFile) -> tuple[str, str, str]:
    """An uploaded file as its attachment row names it: name, content type, hash."""
    return f.name[:255], f.content_type[:255], f.sha256


def _thd_insert_attachments(conn: Connection, mail_id: int,
                            files: Sequence[StoredFile]) -> None:
    for f in files:
        name, content_type, sha256 = _part(f)
        conn.execute(insert(mailapi_attachments).values(
            mail_id=mail_id, name=name, content_type=content_type, size=f.size,
            sha256=sha256, data=None))


def _thd_parts(conn: Connection, mail_id: int) -> Sequence[Any]:
    """A mail's attachment rows in their order: id, name, content type, hash, size."""
    return conn.execute(_PARTS, {"mail_id": mail_id}).all()


def _check_room(kept: Sequence[Any], added: Sequence[StoredFile], max_total: int) -> None:
    """TOO_LARGE unless a draft's attachments `kept` and those an edit `added` are together
    within what one upload may bring (`max_total` bytes, MAX_PARTS files): the limits of
    the message it is sent as, which each edit's upload would otherwise bound only for
    itself."""
    if len(kept) + len(added) > MAX_PARTS:
        raise MailApiError(TOO_LARGE, f"a mail has at most {MAX_PARTS} attachments",
                           "attachment")
    if sum(a.size for a in kept) + sum(f.size for f in added) > max_total:
        raise MailApiError(TOO_LARGE, f"the attachments are larger than {max_total} bytes "
                           "in all", "attachment")


def _thd_edit_draft(conn: Connection, row_id: int, values: dict[str, str]) -> None:
    """Blocking: write a draft's fields, if it is still a draft (the row then stays locked
    until the transaction ends). The edit's read of the row took no lock: on PostgreSQL
    another request may have put the draft in the outbox, and the sender marked it sent,
    since; that mail is not changed (the caller is told it is no draft now), nor put in the
    outbox a second time. Deleted meanwhile: NOT_FOUND."""
    written = conn.execute(_EDIT_DRAFT, {
        "row_id": row_id, **{COLUMNS[n]: v for n, v in values.items()}}).rowcount
    if written == 1:
        return
    now = conn.execute(_ROW_BY_ID, {"row_id": row_id}).first()
    if now is None:
        raise MailApiError(NOT_FOUND, "email not found")
    raise MailApiError(CONFLICT, f"{now.status} mail cannot be changed; only drafts can")


def _size(values: dict[str, str], sizes: Iterable[int]) -> int:
    """About how large a mail's message is: its fields (header fields and body) and
    attachments (before encoding)."""
    return sum(len(v) for v in values.values()) + sum(sizes)


def _new_values(edit: Edit, rights: Holdings, user_email: str
                ) -> dict[str, str]:
    """A new mail's fields: the ones given, `from` the caller's default when not given."""
    values = {name: edit.values.get(name, "") for name in FIELDS}
    if not values["from"]:
        values["from"] = _default_from(rights, user_email) or ""
    return values


def _edited_values(edit: Edit, row: Any) -> dict[str, str]:
    """A draft's fields after `edit`: the ones given, the row's for the rest."""
    return {name: edit.values.get(name, getattr(row, COLUMNS[name]) or "")
            for name in FIELDS}


class MailService:
    """The mail of hosted mailboxes, over the store; see the module docstring."""

    def __init__(self, db: Database, clock: IReactorTime, hostname: str, files: MailFiles,
                 io: CpuPool, *, max_attachment_bytes: int = 25 * 1024 * 1024,
                 max_message_bytes: int = 25 * 1024 * 1024,
                 quota_bytes: int | None = None,
                 max_drafts: int | None = None,
                 ride: Callable[..., defer.Deferred[Any]] | None = None,
                 caps: SendCaps | None = None) -> None:
        self.db = db
        self.clock = clock
        self.hostname = hostname
        self.files = files
        self.io = io  # where file work blocks
        self.max_attachment_bytes = max_attachment_bytes
        self.max_message_bytes = max_message_bytes
        self.quota_bytes = quota_bytes  # bytes a mailbox's mail may take (None: no limit)
        self.max_drafts = max_drafts  # drafts a mailbox may hold (None: no limit)
        # How a write commits in the spool's group commit (Spool.ride; see the module
        # docstring); None: in a transaction of its own.
        self.ride = ride
        # The caps on the recipients of a user's mail ([limits]; None: no cap).
        self.caps = caps
        # Callables told when mail enters the outbox, with the mailbox it is sent from.
        self.on_enqueued: list[Callable[[int | None], object]] = []

    # -- reading ----------------------------------------------------------------------

    async def page(self, user_id: int, count: int, cursor: str | None) -> Page:
        """Up to `count` mails, newest first, starting at `cursor` (a mail id; None: the
        newest). A keyset page: stable while new mail arrives (mailcore.mailapi.listing)."""
        return await self.db.read("mailapi_page", thd_page, user_id, count, cursor,
                                  self.clock.seconds())

    def _thd_find(self, conn: Connection, user_id: int, public_id: str,
                  rights: Holdings | None = None
                  ) -> tuple[Any, str, Rights]:
        """The mail `public_id` if the caller may read it (else NOT_FOUND), the address of
        its mailbox and the caller's rights there; `rights` when the caller has them."""
        if rights is None:
            rights = thd_rights_by_mailbox(conn, user_id)
        row = conn.execute(_ROW_BY_PUBLIC_ID, {"public_id": public_id}).first()
        if row is None or row.mailbox_id not in rights \
                or not rights[row.mailbox_id][1].allow_read:
            raise MailApiError(NOT_FOUND, "email not found")
        address, held, _ = rights[row.mailbox_id]
        return row, address, held

    async def get(self, user_id: int, public_id: str, *, mark_read: bool = True) -> Mail:
        """One mail; reading inbox mail marks it read (unless not `mark_read`: a HEAD, which
        reads nothing of it)."""

        def txn(conn: Connection) -> Mail:
            row, address, _ = self._thd_find(conn, user_id, public_id)
            if mark_read and row.status == INBOX and not row.read:
                # The read above took no lock: on PostgreSQL the mail may have been deleted
                # (alone, or with its mailbox) since.
                marked = conn.execute(_UPDATE_BY_ID, {"row_id": row.id, "read": True})
                row = conn.execute(_ROW_BY_ID, {"row_id": row.id}).first() \
                    if marked.rowcount == 1 else None
                if row is None:
                    raise MailApiError(NOT_FOUND, "email not found")
            return mail_of(row.id, row.public_id, address, row.status, row.read,
                           row.created_at, (getattr(row, COLUMNS[f]) for f in FIELDS),
                           thd_attachments(conn, [row.id]).get(row.id, ()))

        return await self.db.run("mailapi_get", txn)

    async def attachment(self, user_id: int, public_id: str, index: int, *,
                         with_data: bool = True) -> Download:
        """The attachment `index` (from 1) of the mail, to serve; the bytes a row stored
        before migration 0019 holds are read only `with_data` (a HEAD's answers from the
        row's size)."""

        def txn(conn: Connection) -> Download:
            row, _, _ = self._thd_find(conn, user_id, public_id)
            found = conn.execute(select(_a.id, _a.name, _a.content_type, _a.size, _a.sha256)
                                 .where(_a.mail_id == row.id).order_by(_a.id)).all()
            if not 1 <= index <= len(found):
                raise MailApiError(NOT_FOUND, "attachment not found")
            a = found[index - 1]
            data = None
            if a.sha256 is None and with_data:  # stored in the row, before migration 0019
                data = bytes(conn.execute(select(_a.data).where(_a.id == a.id)).scalar_one())
            return Download(a.name, a.content_type, a.size, a.sha256, data)

        return await self.db.read("mailapi_attachment", txn)

    async def check(self, download: Download) -> None:
        """What `open` would find, without opening the file: NOT_FOUND when its file is not
        there (a HEAD, which answers from the row's size and reads no byte)."""
        if download.sha256 is None:
            return
        if not await self.io.run(self.files.path(download.sha256).is_file):
            raise MailApiError(NOT_FOUND, "attachment not found")

    async def open(self, download: Download) -> BinaryIO:
        """The bytes of an attachment, to be read a chunk at a time (the caller closes it)."""
        if download.sha256 is None:
            return BytesIO(download.data or b"")
        try:
            return await self.io.run(self.files.open, download.sha256)
        except FileNotFoundError:
            raise MailApiError(NOT_FOUND, "attachment not found") from None

    async def delete(self, user_id: int, public_id: str) -> None:
        def txn(conn: Connection) -> list[str]:
            row, _, held = self._thd_find(conn, user_id, public_id)
            if not held.allow_delete:
                raise MailApiError(DENIED, "you may not delete this email")
            hashes = _hashes_of(conn, [row.id])
            # The mailbox it is in as it goes: the read above took no lock, and on
            # PostgreSQL another request may have deleted it (a second click) or sent it
            # from another mailbox since; only the delete that removes it counts it.
            gone = conn.execute(_DELETE_BY_ID, {"row_id": row.id}).first()
            if gone is None:
                raise MailApiError(NOT_FOUND, "email not found")
            thd_count_mail(conn, gone.mailbox_id, -1)
            thd_use(conn, gone.mailbox_id, -gone.size)
            thd_left(conn, row.public_id, row.id, gone.mailbox_id, self.clock.seconds())
            return hashes

        hashes = await self.db.run("mailapi_delete", txn)
        try:
            await self.collect(hashes)
        except Exception:  # the mail is deleted; the sweep takes its files later
            log.failure("removing the files of a deleted Mail API mail failed")

    # -- files ------------------------------------------------------------------------

    async def receive(self, content_type: str, body: BinaryIO, max_text: int) -> Received:
        """Stream a multipart body's file parts to disk (within the limits) and return
        them with its text fields; a refusal (MailApiError) leaves no file."""
        received = Received()
        try:
            await self.io.run(partial(
                self.files.receive, body, content_type, received,
                max_attachment=self.max_attachment_bytes, max_total=self.max_message_bytes,
                max_text=max_text))
        except BaseException:
            await self.discard(received.files)
            raise
        return received

    async def discard(self, files: Sequence[StoredFile]) -> None:
        """Take back the files an upload made when its mail was not stored (a file a row
        names meanwhile stays, and so does one another upload has written again since)."""
        made = [f for f in files if f.new]
        if not made:
            return
        named = await self.db.read("mailapi_files_in_use", thd_files_in_use,
                                   [f.sha256 for f in made])
        await self.io.run(self.files.take_back, [f for f in made if f.sha256 not in named])

    async def collect(self, hashes: Sequence[str], grace: float = GRACE) -> int:
        """Remove the files among `hashes` no row names that are older than `grace`
        seconds (their age is read before the rows are: a write naming one meanwhile
        keeps it); returns how many."""
        if not hashes:
            return 0
        # Ages are the file system's (modification times), so the wall clock's.
        cutoff = time.time() - grace
        old = await self.io.run(self.files.older_than, list(hashes), cutoff)
        if not old:
            return 0
        named = await self.db.read("mailapi_files_in_use", thd_files_in_use, old)
        unused = [h for h in old if h not in named]
        return int(await self.io.run(self.files.remove_older, unused, cutoff))

    async def mailbox_files(self, mailbox_id: int) -> list[str]:
        """The files the mail of one mailbox names: what `collect` may remove once the
        mailbox is deleted with its mail (`MailboxService.remove`)."""

        def txn(conn: Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(select(_m.id).where(_m.mailbox_id == mailbox_id))]
            return sorted({h for start in range(0, len(ids), 500)
                           for h in _hashes_of(conn, ids[start:start + 500])})

        return await self.db.read("mailapi_mailbox_files", txn)

    async def sweep(self, grace: float = GRACE, batch: int = 500) -> int:
        """Remove every file on disk no row names (older than `grace`), and temp files a
        crash left."""
        await self.io.run(self.files.clear_tmp)
        stored = await self.io.run(self.files.hashes)
        removed = 0
        for start in range(0, len(stored), batch):
            removed += await self.collect(stored[start:start + batch], grace)
        return removed

    async def sweep_gone(self) -> int:
        """Delete the places mail left in mailboxes that cursors no longer find (kept
        GONE_KEEP seconds: mailcore.mailapi.listing), a batch a transaction; how many."""
        return await delete_in_batches(self.db, "mailapi_gone_sweep", thd_sweep_gone,
                                       self.clock.seconds(), batch=GONE_SWEEP_BATCH)

    async def _storing(self, edit: Edit, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a write that may store `edit`'s files; when it stores no mail (refused or
        failed), take the files its upload made back. Not cancelled midway (shielded): a
        caller that gives up (its client left, or `[web] reply_timeout` passed) takes the
        write back if the store has not begun it (an errand: mailcore.store.errands), and
        its files with it; a write begun ends as it would have, its files kept with it."""
        errand = Errand()

        async def run() -> T:
            try:
                return await errand.run(work())
            except BaseException:
                await self.discard(edit.attachments)
                raise

        return await shielded(run(), errand)

    # -- writing ----------------------------------------------------------------------

    async def create(self, user_id: int, user_email: str, edit: Edit) -> Written:
        """Store a new mail (always, unless the store fails) and say what became of it."""
        return await self._storing(edit, partial(self._create, user_id, user_email, edit))

    async def _create(self, user_id: int, user_email: str, edit: Edit) -> Written:
        now = self.clock.seconds()

        def gather(conn: Connection) -> Gathered:
            rights = thd_rights_by_mailbox(conn, user_id)
            values = _new_values(edit, rights, user_email)
            return (values, rights, [_part(f) for f in edit.attachments],
                    _size(values, (f.size for f in edit.attachments)))

        def txn(conn: Connection, built: Built | None) -> Written:
            self._thd_hold_caps(conn, user_id, edit)
            # The mailbox the mail is kept in is held once chosen (PostgreSQL: its delete
            # waits for this commit, then takes the mail along or refuses, 409, while it is
            # in the outbox). One deleted since the rights were read is not there to hold:
            # they are read again, so that the mail is kept where it can be, never failed
            # on the row's foreign key.
            while True:
                rights = thd_rights_by_mailbox(conn, user_id)
                values = _new_values(edit, rights, user_email)
                # Checked once here (it parses every address field, inside the write
                # lock) and handed to _thd_settle.
                sendable = _thd_served(conn, _sendable(values, rights)) \
                    if edit.status == OUTBOX else None
                sending = sendable is not None and not isinstance(sendable, Outcome)
                box = _home(rights, values["from"], user_email, sending)
                if box is None:
                    raise MailApiError(DENIED, "unauthorized from/reply-to - no mailbox of "
                                       "yours can keep this email")
                if thd_hold_mailbox(conn, box):
                    break
            # Drafts are counted once the mail is settled (below); the mailbox is locked
            # first, so that two new mails at once count one after the other.
            thd_lock_drafts(conn, box, self.max_drafts)
            size = mail_size(values, (f.size for f in edit.attachments))
            thd_charge(conn, box, size, self.quota_bytes, rights[box][0])
            key = conn.execute(_INSERT_MAIL, {
                "public_id": thd_new_public_id(conn), "mailbox_id": box, "status": DRAFT,
                "read": True, "created_at": now, "size": size,
                **{COLUMNS[n]: v for n, v in values.items()},
            }).inserted_primary_key
            assert key is not None
            thd_count_mail(conn, box, 1)
            _thd_insert_attachments(conn, key[0], edit.attachments)
            row = conn.execute(_ROW_BY_ID, {"row_id": key[0]}).one()
            written = self._thd_settle(conn, row, values, edit.status, rights, now, built,
                                       user_id, sendable)
            if written.outcome != Outcome.ENQUEUED:
                # It stayed a draft in `box` (asked for, or not sendable): one more draft.
                # A mail sent at once adds none, so a mailbox full of drafts still sends.
                thd_draft_room(conn, box, self.max_drafts, rights[box][0])
            return written

        # A new mail's size is the request's: a small one is not read for before.
        large = _size(edit.values, (f.size for f in edit.attachments)) > BUILT_APART
        prepare: Callable[[Reader], Built | None] = partial(
            self._thd_built, edit.status, now, gather) if large \
            else partial(_parse_ahead, edit.values if edit.status == OUTBOX else {})
        written = await self._write("mailapi_create", prepare, txn,
                                    building=large or edit.status == OUTBOX)
        await self._told(user_id, written)
        return written

    async def _write(self, name: str, prepare: Callable[[Reader], Built | None],
                     txn: Callable[[Connection, Built | None], Written], *,
                     building: bool) -> Written:
        """Commit `txn(conn, prepare(read))`, `prepare` run first outside the write
        transaction. With `ride` (SQLite), `txn` rides the spool's next group commit (one
        fsync for the mail posted meanwhile and the queue's messages), `prepare` run on the
        pool before it only when `building` (mail to be sent: its addresses are parsed, a
        large one built; a draft has nothing to prepare). Without, `txn` is a transaction
        of its own, `prepare` run on its pool thread just before it."""
        if self.ride is None:
            return await self.db.run_prepared(name, prepare, txn)
        built = await self.db.prepare(name, prepare) if building else None
        return await self.ride(name, txn, built)

    async def update(self, user_id: int, public_id: str, edit: Edit,
                     read: bool | None) -> Written:
        """Change a draft (or only the read flag of any mail the caller may read)."""
        return await self._storing(edit, partial(self._update, user_id, public_id, edit, read))

    async def _update(self, user_id: int, public_id: str, edit: Edit,
                      read: bool | None) -> Written:
        now = self.clock.seconds()

        def gather(conn: Connection) -> Gathered | None:
            rights = thd_rights_by_mailbox(conn, user_id)
            row, _, _ = self._thd_find(conn, user_id, public_id, rights)
            if row.status != DRAFT:
                return None
            kept = _thd_parts(conn, row.id)
            values = _edited_values(edit, row)
            return (values, rights,
                    [(a.name, a.content_type, a.sha256) for a in kept]
                    + [_part(f) for f in edit.attachments],
                    _size(values, [a.size for a in kept]
                          + [f.size for f in edit.attachments]))

        def txn(conn: Connection, built: Built | None) -> Written:
            self._thd_hold_caps(conn, user_id, edit)
            rights = thd_rights_by_mailbox(conn, user_id)
            row, _, held = self._thd_find(conn, user_id, public_id, rights)
            changing = bool(edit.values or edit.attachments or edit.status)
            if read is not None:
                conn.execute(_UPDATE_BY_ID, {"row_id": row.id, "read": read})
            if not changing:
                return Written(Outcome.SAVED, row.public_id)
            if row.status != DRAFT:
                raise MailApiError(CONFLICT, f"{row.status} mail cannot be changed; only "
                                   "drafts can")
            if not held.allow_send:
                raise MailApiError(DENIED, "you may not write mail from this mailbox")
            values = _edited_values(edit, row)
            # The draft's row is written (locked, PostgreSQL: FOR NO KEY UPDATE) before its
            # attachments are counted: two uploads to one draft at once count one after the
            # other, so that both together cannot pass the limits each passed alone.
            _thd_edit_draft(conn, row.id, values)
            if edit.attachments:
                _check_room(_thd_parts(conn, row.id), edit.attachments,
                            self.max_message_bytes)
            _thd_insert_attachments(conn, row.id, edit.attachments)
            # The draft is locked (written above): its size and mailbox are as they stand.
            before = conn.execute(_ROW_BY_ID, {"row_id": row.id}).one()
            size = mail_size(values, (a.size for a in _thd_parts(conn, row.id)))
            thd_charge(conn, before.mailbox_id, size - before.size, self.quota_bytes,
                       rights[before.mailbox_id][0] if before.mailbox_id in rights
                       else "the mailbox")
            conn.execute(_UPDATE_BY_ID, {"row_id": row.id, "size": size})
            fresh = conn.execute(_ROW_BY_ID, {"row_id": row.id}).one()
            return self._thd_settle(conn, fresh, values, edit.status or DRAFT, rights, now,
                                    built, user_id)

        written = await self._write(
            "mailapi_update", partial(self._thd_built, edit.status, now, gather), txn,
            building=edit.status == OUTBOX)
        await self._told(user_id, written)
        return written

    def _thd_built(self, status: str | None, now: float,
                   gather: Callable[[Connection], Gathered | None], read: Reader
                   ) -> Built | None:
        """Blocking: the message a write to `status` will send, built from what `gather`
        reads (fields, rights, attachments) before the write transaction; None when the
        mail is small or will not be sent as read (the transaction then decides, and
        builds the message itself when it does send)."""
        if status != OUTBOX:
            return None
        try:
            gathered = read(gather)
        except MailApiError:
            return None  # unknown, or not the caller's: the transaction answers
        if gathered is None:
            return None
        values, rights, parts, size = gathered
        sendable = _sendable(values, rights)  # parses the addresses (cached) for the txn too
        if size <= BUILT_APART:
            return None
        outgoing = [OutgoingPart(name, content_type, partial(self.files.open, sha256))
                    for name, content_type, sha256 in parts if sha256 is not None]
        if isinstance(sendable, Outcome) or len(outgoing) < len(parts):
            return None  # not sent, or a part's bytes are in its row (the transaction reads)
        checked, recipients = sendable
        raw = build_message(checked, outgoing, self.hostname, now)
        return Built((checked, recipients, tuple(parts), now), raw)

    def _opener(self, conn: Connection, attachment_id: int, sha256: str | None
                ) -> Callable[[], BinaryIO]:
        """How to read an attachment's bytes while its message is built (its file, or the
        row's `data` before migration 0019)."""
        if sha256 is not None:
            return partial(self.files.open, sha256)
        data = bytes(conn.execute(select(_a.data).where(_a.id == attachment_id)).scalar_one())
        return partial(BytesIO, data)

    async def _told(self, user_id: int, written: Written) -> None:
        if written.outcome is Outcome.ENQUEUED:
            for hook in self.on_enqueued:
                hook(written.mailbox_id)
        elif written.capped is not None and self.caps is not None:
            await self.caps.refused(user_id, "mailapi", written.capped)

    def _thd_hold_caps(self, conn: Connection, user_id: int, edit: Edit) -> None:
        """Blocking, first in a write that may send the caller's mail: the caller's
        send-cap lock (mailcore.sendcaps), before any row's. A draft sent from another
        mailbox than its own counted its send, then waited for that mailbox's row while a
        post from it, holding the row, waited for the lock: deadlocked."""
        if edit.status == OUTBOX and self.caps is not None:
            self.caps.thd_hold(conn, user_id)

    def _thd_settle(self, conn: Connection, row: Any, values: dict[str, str],
                    status: str | None, rights: Holdings,
                    now: float, built: Built | None, author: int,
                    sendable: Sendable | None = None) -> Written:
        """Leave `row` a draft, or check it and put it in the outbox (with the message
        `built` before, when it was built from what the row now holds), as `author`'s
        (the caller's: its mail waits while it is disabled). `sendable`: what
        `_sendable` said of `values` and `rights` in this transaction, when the caller
        asked it already."""
        public_id = row.public_id
        if status == DRAFT:
            return Written(Outcome.SAVED, public_id)
        if status != OUTBOX:
            return Written(Outcome.MISSING, public_id)
        if sendable is None:
            sendable = _thd_served(conn, _sendable(values, rights))
        if isinstance(sendable, Outcome):
            return Written(sendable, public_id)
        checked, recipients = sendable
        sender = thd_mailbox(conn, checked["from"], hold=True)
        if sender is None:  # deleted since its rights were read: the mail stays a draft
            return Written(Outcome.UNAUTHORIZED, public_id)
        if sender.id != row.mailbox_id and not _may_take_out(rights, row.mailbox_id):
            # Sent from another mailbox, it would leave its own (below): a grantee without
            # allow_delete there would take the owner's draft out of the owner's reach.
            return Written(Outcome.UNAUTHORIZED, public_id)
        if self.caps is not None:
            # Counted last, when nothing else keeps it a draft; each distinct address once,
            # as the envelope has it (mailcore.mailapi.outbox).
            verdict = self.caps.thd_take(conn, author, len({
                a for name in _RECIPIENT_FIELDS for a in recipients[name]}), now)
            if not verdict.allowed:
                return Written(Outcome.CAPPED, public_id, capped=verdict)
        found = _thd_parts(conn, row.id)
        made_from = (checked, recipients,
                     tuple((a.name, a.content_type, a.sha256) for a in found), now)
        if built is not None and built.made_from == made_from:
            raw = built.raw
        else:
            parts = [OutgoingPart(a.name, a.content_type, self._opener(conn, a.id, a.sha256))
                     for a in found]
            raw = build_message(checked, parts, self.hostname, now)
        # The message built is kept with the mail (its size counted unchecked: the draft
        # was let in, and is not refused for the message it is sent as).
        size = row.size + len(raw)
        # `from` is kept as the client wrote it, display name and all (as `to` and `cc`
        # are); the sender takes the envelope's address from it (mailcore.mailapi.outbox).
        conn.execute(_UPDATE_BY_ID, {
            "row_id": row.id, "status": OUTBOX, "mailbox_id": sender.id, "raw": raw,
            "queue_id": new_queue_id(now),
            "outbox_seq": thd_next_outbox_seq(conn), "size": size, "author_id": author})
        if sender.id != row.mailbox_id:  # kept with the mailbox it is sent from
            thd_left(conn, row.public_id, row.id, row.mailbox_id, now)
            thd_count_mail(conn, row.mailbox_id, -1)
            thd_count_mail(conn, sender.id, 1)
            thd_use(conn, row.mailbox_id, -row.size)
            thd_use(conn, sender.id, size)
        else:
            thd_use(conn, sender.id, size - row.size)
        return Written(Outcome.ENQUEUED, public_id, sender.id)


def thd_next_outbox_seq(conn: Connection) -> int:
    """Blocking: the next place in the outbox's order (`mailapi_mail.outbox_seq`), drawn
    from the database so that every node sharing it draws from one series: mail that
    entered the outbox before another was put there is sent before it, whichever node
    took either. PostgreSQL: a sequence (no node waits on another's transaction; a value
    drawn by a transaction still running can only belong to mail put in the outbox at the
    same time as a later one, which has no order to keep). SQLite: a change counter,
    raised in the caller's transaction (its writers take turns)."""
    if conn.dialect.name == "postgresql":
        return int(conn.execute(_NEXT_OUTBOX_SEQ).scalar_one())
    return thd_bump_counter(conn, mailapi_outbox_seq.name)


def _hashes_of(conn: Connection, mail_ids: Sequence[int]) -> list[str]:
    """The files these mails name (attachments, inbox messages as received)."""
    ids = list(mail_ids)
    found = {r[0] for r in conn.execute(select(_a.sha256).where(
        _a.mail_id.in_(ids), _a.sha256.is_not(None)))}
    found.update(r[0] for r in conn.execute(select(_m.raw_sha256).where(
        _m.id.in_(ids), _m.raw_sha256.is_not(None))))
    return sorted(found)


def _parse_ahead(values: dict[str, str], read: Reader) -> None:
    """A small mail's message is built in its transaction; the address fields it will send
    are parsed before (parse_address_list keeps them), outside the write lock."""
    if _too_long(values):
        return
    for name in _ADDRESS_FIELDS:
        try:
            parse_address_list(values.get(name, ""), name)
        except MailApiError:
            return


def _too_long(values: dict[str, str]) -> bool:
    """Whether the recipient fields cannot hold MAX_RECIPIENTS addresses or fewer."""
    text = [values.get(name, "") for name in _RECIPIENT_FIELDS]
    return sum(map(len, text)) > MAX_RECIPIENTS * ADDRESS_TEXT \
        or sum(t.count("@") for t in text) > 2 * MAX_RECIPIENTS


# What `_sendable` says: the outcome that keeps a mail a draft, or its checked fields and
# parsed recipients.
Sendable = Outcome | tuple[dict[str, str], dict[str, list[str]]]


def _sendable(values: dict[str, str], rights: Holdings) -> Sendable:
    """Whether a mail with `values` may go out with these rights: its checked fields
    (`from` as the bare address) and parsed recipients, else the outcome that keeps it a
    draft."""
    if not values["to"].strip():
        return Outcome.MISSING
    if _too_long(values):  # not parsed: that costs a millisecond an address
        return Outcome.TOO_MANY
    recipients: dict[str, list[str]] = {}
    try:
        for name in _ADDRESS_FIELDS:
            recipients[name] = parse_address_list(values[name], name)
    except MailApiError:
        return Outcome.INVALID
    if len(recipients["from"]) != 1 or not recipients["to"]:
        return Outcome.INVALID
    if sum(len(recipients[name]) for name in _RECIPIENT_FIELDS) > MAX_RECIPIENTS:
        return Outcome.TOO_MANY
    if len(values["subject"]) > MAX_SUBJECT:  # checked first: reading it costs as much
        return Outcome.LONG_SUBJECT
    if header_breaks("Subject", values["subject"]):  # its encoded words decoded too
        return Outcome.BAD_HEADER
    if has_control_multiline(values["body"]):
        # ESC, DEL, C1...: no text/plain body carries them (RFC 2045 2.7, RFC 5322 2.3).
        return Outcome.BAD_BODY
    sendable = {h.address for h in rights.values() if h.rights.allow_send}
    reply_ok = {h.address for h in rights.values() if h.rights.allow_reply_to}
    if recipients["from"][0] not in sendable \
            or any(a not in reply_ok for a in recipients["reply-to"]):
        return Outcome.UNAUTHORIZED
    # `from` as the bare address (its mailbox, the envelope); the name the client gave it
    # goes in the message's From header.
    return {**values, "from": recipients["from"][0],
            "from_name": display_name(values["from"])}, recipients


# The domain row of the mailbox at :address, if it is served; held (FOR KEY SHARE on
# PostgreSQL) until the transaction ends, so that the domain's removal, which locks the row
# first (mailcore.gateway.domains), waits for the mail this puts in the outbox and sends it
# back to the drafts.
_SERVED_FROM = select(domains.c.id) \
    .join(mailboxes, mailboxes.c.domain_id == domains.c.id) \
    .where(mailboxes.c.address == bindparam("address"), SERVED) \
    .with_for_update(read=True, key_share=True, of=domains)


def _thd_served(conn: Connection, sendable: Sendable) -> Sendable:
    """Blocking: `sendable`, unless its `from` or a `reply-to` is a mailbox whose domain
    this gateway no longer serves (UNAUTHORIZED: kept as a draft). Removing a domain leaves
    its mailboxes (and their mail) in place, bound to the removed row; mail sent from one
    would go out as a domain whose owner removed it, or which someone else has claimed
    since (a new row of the name is not the mailbox's domain, whoever holds it), and its
    replies would go to that domain's new owner."""
    if isinstance(sendable, Outcome):
        return sendable
    values, recipients = sendable
    for address in (values["from"], *recipients["reply-to"]):
        if conn.execute(_SERVED_FROM, {"address": address}).first() is None:
            return Outcome.UNAUTHORIZED
    return sendable


def _may_take_out(rights: Holdings, box: int) -> bool:
    """Whether mail may leave the mailbox `box` by the caller's hand (sent from another
    mailbox, where it is then kept): as deleting it there, `allow_delete` (the owner holds
    it)."""
    held = rights.get(box)
    return held is not None and held.rights.allow_delete


def _default_from(rights: Holdings, user_email: str) -> str | None:
    """The user's main address: its own email when it may send from it, else the first
    mailbox it owns or may send from; of those, a mailbox still bound to its domain
    (`Held.active`) before one whose domain was removed, which sends nothing."""
    return _main_address(rights, user_email, lambda r: r.allow_send)


def _main_address(rights: Holdings, user_email: str,
                  usable: Callable[[Rights], bool]) -> str | None:
    """Of the mailboxes whose rights are `usable`, active ones first: the user's own
    address, else the first by address."""
    own = user_email.lower()
    found = sorted((not h.active, h.address != own, h.address)
                   for h in rights.values() if usable(h.rights))
    return found[0][2] if found else None


def _home(rights: Holdings, mail_from: str, user_email: str,
          sending: bool) -> int | None:
    """The mailbox a new mail is kept in. Mail `sending` now: its from's (the caller may
    send from it). Mail kept as a draft: one the caller may read as well as send from, as
    reading and editing the draft need both (allow_send alone lets the caller send from a
    mailbox, not see its mail): its from's when so, else the caller's own address's, else
    the first such; None when the caller has none."""
    by_address = {h.address: (i, h.rights) for i, h in rights.items()}
    try:
        parsed = parse_address_list(mail_from, "from")
    except MailApiError:
        parsed = []
    if len(parsed) == 1 and parsed[0] in by_address:
        box, held = by_address[parsed[0]]
        if held.allow_send and (sending or held.allow_read):
            return box
    keeping = _main_address(rights, user_email, lambda r: r.allow_read and r.allow_send)
    return by_address[keeping][0] if keeping is not None else None


class MailFilesSweeper(Sweeper[int]):
    """Removes the Mail API's files no row names (MailService.sweep) at start and every
    `[mailapi] file_sweep_interval` seconds. The nodes sharing a PostgreSQL store share its
    `files_dir` too, so the Core gives it the store's job leases: one node of them sweeps
    each period (it lists every file of the shared directory, which costs each node as much
    as it costs one)."""

    name = "mailapi_files_sweep"
    failed = "sweeping the Mail API's files failed"

    def __init__(self, mail: MailService, interval: float) -> None:
        super().__init__(mail.clock, interval)
        self.mail = mail

    def sweep(self) -> Awaitable[int]:
        return self.mail.sweep()

    def swept(self, removed: int) -> None:
        if removed:
            log.info("removed {n} Mail API files no mail names", n=removed)


class GoneSweeper(Sweeper[int]):
    """Deletes the places mail left in mailboxes that listing cursors no longer find
    (MailService.sweep_gone) at start and every GONE_SWEEP_INTERVAL seconds, instead of each
    delete and send (which on SQLite ride the spool's group commit). Idempotent, but the
    Core gives it the store's job leases: one node of those sharing a PostgreSQL store
    sweeps each period, and no two delete the same rows at once."""

    name = "mailapi_gone_sweep"
    failed = "sweeping the places mail left in Mail API mailboxes failed"

    def __init__(self, mail: MailService, every: float = GONE_SWEEP_INTERVAL) -> None:
        super().__init__(mail.clock, every)
        self.mail = mail

    def sweep(self) -> Awaitable[int]:
        return self.mail.sweep_gone()

    def swept(self, removed: int) -> None:
        if removed:
            log.info("removed {n} places mail left in Mail API mailboxes, kept for cursors "
                     "until now", n=removed)

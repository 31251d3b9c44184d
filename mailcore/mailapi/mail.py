"""Mail in hosted mailboxes (seed 002's `/api/v1/mail/…`): listing, reading, drafts, the
outbox, deleting.

Who may do what follows the mailbox's rights (mailcore.mailapi.mailboxes): reading needs
`allow_read`, writing as a `from` needs `allow_send`, a `reply-to` needs `allow_reply_to`
on that address, deleting needs `allow_delete`. Mail the caller may not read answers as
unknown.

A client's mail is always stored: what cannot be sent (no `to`, a bad address, a header
field with a line break, a `from` or `reply-to` the caller may not use) stays a draft and
the reply says why. Mail set to `outbox` is built with Python's `email` package at once
(Message-ID, Date, MIME attachments, no Bcc field) and given a queue id in the same
transaction; the OutboxSender hands it to the spool in posting order
(mailcore.mailapi.outbox).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from twisted.internet.interfaces import IReactorTime

from mailcore.mailapi.addresses import parse_address_list
from mailcore.mailapi.delivery import thd_new_public_id
from mailcore.mailapi.errors import DENIED, INVALID, NOT_FOUND, MailApiError
from mailcore.mailapi.mailboxes import RIGHTS, Rights, thd_mailbox
from mailcore.smtp.queueid import new_queue_id
from mailcore.store import Database
from mailcore.store.schema import mailapi_attachments, mailapi_mail, mailbox_grants, mailboxes
from mailcore.text import has_control

DRAFT, OUTBOX, SENT, INBOX = "draft", "outbox", "sent", "inbox"
# The fields a client writes, by their names on the wire.
FIELDS = ("to", "cc", "bcc", "reply-to", "from", "subject", "body")
_COLUMNS = {"to": "to_addrs", "cc": "cc_addrs", "bcc": "bcc_addrs", "reply-to": "reply_to",
            "from": "mail_from", "subject": "subject", "body": "body"}
DEFAULT_COUNT = 25
MAX_COUNT = 1000

_m = mailapi_mail.c
_a = mailapi_attachments.c


class Outcome(enum.Enum):
    """What became of a create or update (the web layer picks the seed's reply)."""

    SAVED = "saved"  # a draft saved (or a flag changed)
    ENQUEUED = "enqueued"  # in the outbox, to be sent
    MISSING = "missing"  # no to / no status: kept as a draft
    INVALID = "invalid"  # a malformed address: kept as a draft
    BAD_HEADER = "bad_header"  # a line break or control character in the subject
    UNAUTHORIZED = "unauthorized"  # a from / reply-to the caller may not use: a draft


@dataclass(frozen=True)
class AttachmentInfo:
    index: int
    name: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Upload:
    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Mail:
    id: int
    public_id: str
    mailbox: str
    status: str
    read: bool
    fields: dict[str, str]
    attachments: tuple[AttachmentInfo, ...]
    created_at: float


@dataclass(frozen=True)
class Page:
    emails: list[Mail]
    count: int
    previous_id: str | None
    next_id: str | None


@dataclass
class Edit:
    """What a client sends: fields it gives (absent ones keep their value on update)."""

    status: str | None = None
    values: dict[str, str] = field(default_factory=dict)
    attachments: list[Upload] = field(default_factory=list)


@dataclass(frozen=True)
class Written:
    outcome: Outcome
    public_id: str


def thd_rights_by_mailbox(conn: Connection, user_id: int) -> dict[int, tuple[str, Rights]]:
    """Blocking: every mailbox `user_id` holds a right on: id → (address, rights)."""
    out: dict[int, tuple[str, Rights]] = {}
    for row in conn.execute(select(mailboxes.c.id, mailboxes.c.address)
                            .where(mailboxes.c.owner_id == user_id)):
        out[row.id] = (row.address, Rights.every())
    granted = conn.execute(
        select(mailboxes.c.id, mailboxes.c.address, mailbox_grants)
        .join(mailbox_grants, mailbox_grants.c.mailbox_id == mailboxes.c.id)
        .where(mailbox_grants.c.user_id == user_id, mailboxes.c.owner_id != user_id))
    for row in granted:
        rights = Rights(**{r: bool(getattr(row, r)) for r in RIGHTS})
        if rights.any():
            out[row.id] = (row.address, rights)
    return out


def _readable(rights: dict[int, tuple[str, Rights]]) -> list[int]:
    return sorted(i for i, (_, r) in rights.items() if r.allow_read)


def _attachments(conn: Connection, mail_ids: Sequence[int]
                 ) -> dict[int, tuple[AttachmentInfo, ...]]:
    """The attachments of these mails (one query), numbered from 1 per mail."""
    found: dict[int, list[AttachmentInfo]] = {}
    if mail_ids:
        for a in conn.execute(select(_a.mail_id, _a.name, _a.content_type, _a.size)
                              .where(_a.mail_id.in_(list(mail_ids))).order_by(_a.id)):
            mine = found.setdefault(a.mail_id, [])
            mine.append(AttachmentInfo(len(mine) + 1, a.name, a.content_type, a.size))
    return {mail_id: tuple(items) for mail_id, items in found.items()}


def _mail(row: Any, address: str, attachments: tuple[AttachmentInfo, ...]) -> Mail:
    values = {name: getattr(row, column) or "" for name, column in _COLUMNS.items()}
    return Mail(row.id, row.public_id, address, row.status, bool(row.read), values,
                attachments, row.created_at)


def build_message(values: dict[str, str], recipients: dict[str, list[str]],
                  attachments: Sequence[Upload], hostname: str, now: float) -> bytes:
    """The message as it goes out: header fields from checked values, no Bcc field."""
    message = EmailMessage(policy=SMTP)
    message["From"] = values["from"]
    if recipients["to"]:
        message["To"] = ", ".join(recipients["to"])
    if recipients["cc"]:
        message["Cc"] = ", ".join(recipients["cc"])
    if recipients["reply-to"]:
        message["Reply-To"] = ", ".join(recipients["reply-to"])
    message["Subject"] = values.get("subject", "")
    message["Date"] = formatdate(now, usegmt=True)
    message["Message-ID"] = make_msgid(domain=hostname)
    message.set_content(values.get("body", "") or "")
    for upload in attachments:
        maintype, _, subtype = upload.content_type.partition("/")
        if not maintype or not subtype or has_control(upload.content_type):
            maintype, subtype = "application", "octet-stream"
        message.add_attachment(upload.data, maintype=maintype, subtype=subtype,
                               filename=upload.name)
    return message.as_bytes(policy=SMTP)


class MailService:
    """The mail of hosted mailboxes, over the store; see the module docstring."""

    def __init__(self, db: Database, clock: IReactorTime, hostname: str,
                 max_attachment_bytes: int = 10 * 1024 * 1024) -> None:
        self.db = db
        self.clock = clock
        self.hostname = hostname
        self.max_attachment_bytes = max_attachment_bytes
        self.on_enqueued: list[Any] = []  # callables told when mail enters the outbox

    # -- reading ----------------------------------------------------------------------

    async def page(self, user_id: int, count: int, cursor: str | None) -> Page:
        """Up to `count` mails, newest first, starting at `cursor` (a mail id; None: the
        newest). A keyset page: stable while new mail arrives."""

        def txn(conn: Connection) -> Page:
            rights = thd_rights_by_mailbox(conn, user_id)
            boxes = _readable(rights)
            if not boxes:
                return Page([], 0, None, None)
            mine = _m.mailbox_id.in_(boxes)
            total = conn.execute(select(func.count()).select_from(mailapi_mail)
                                 .where(mine)).scalar_one()
            query = select(mailapi_mail).where(mine)
            previous = None
            if cursor is not None:
                start = conn.execute(select(_m.id).where(_m.public_id == cursor, mine)).first()
                if start is None:
                    raise MailApiError(INVALID, "invalid cursor", "cursor")
                query = query.where(_m.id <= start.id)
                before = conn.execute(select(_m.public_id).where(mine, _m.id > start.id)
                                      .order_by(_m.id).limit(count)).all()
                previous = before[-1].public_id if before else None
            rows = conn.execute(query.order_by(_m.id.desc()).limit(count + 1)).all()
            following = rows[count].public_id if len(rows) > count else None
            shown = rows[:count]
            attached = _attachments(conn, [row.id for row in shown])
            emails = [_mail(row, rights[row.mailbox_id][0], attached.get(row.id, ()))
                      for row in shown]
            return Page(emails, total, previous, following)

        return await self.db.read("mailapi_page", txn)

    def _thd_find(self, conn: Connection, user_id: int, public_id: str
                  ) -> tuple[Any, str, Rights]:
        rights = thd_rights_by_mailbox(conn, user_id)
        row = conn.execute(select(mailapi_mail).where(_m.public_id == public_id)).first()
        if row is None or row.mailbox_id not in rights \
                or not rights[row.mailbox_id][1].allow_read:
            raise MailApiError(NOT_FOUND, "email not found")
        address, held = rights[row.mailbox_id]
        return row, address, held

    async def get(self, user_id: int, public_id: str) -> Mail:
        """One mail; reading inbox mail marks it read."""

        def txn(conn: Connection) -> Mail:
            row, address, _ = self._thd_find(conn, user_id, public_id)
            if row.status == INBOX and not row.read:
                conn.execute(update(mailapi_mail).where(_m.id == row.id).values(read=True))
                row = conn.execute(select(mailapi_mail).where(_m.id == row.id)).one()
            return _mail(row, address, _attachments(conn, [row.id]).get(row.id, ()))

        return await self.db.run("mailapi_get", txn)

    async def attachment(self, user_id: int, public_id: str, index: int) -> Upload:
        def txn(conn: Connection) -> Upload:
            row, _, _ = self._thd_find(conn, user_id, public_id)
            found = conn.execute(select(_a.name, _a.content_type, _a.data)
                                 .where(_a.mail_id == row.id).order_by(_a.id)).all()
            if not 1 <= index <= len(found):
                raise MailApiError(NOT_FOUND, "attachment not found")
            a = found[index - 1]
            return Upload(a.name, a.content_type, bytes(a.data))

        return await self.db.read("mailapi_attachment", txn)

    async def delete(self, user_id: int, public_id: str) -> None:
        def txn(conn: Connection) -> None:
            row, _, held = self._thd_find(conn, user_id, public_id)
            if not held.allow_delete:
                raise MailApiError(DENIED, "you may not delete this email")
            conn.execute(delete(mailapi_mail).where(_m.id == row.id))

        await self.db.run("mailapi_delete", txn)

    # -- writing ----------------------------------------------------------------------

    def _check_uploads(self, uploads: Sequence[Upload]) -> None:
        for upload in uploads:
            if len(upload.data) > self.max_attachment_bytes:
                raise MailApiError("too_large", f"attachment {upload.name!r} is larger than "
                                   f"{self.max_attachment_bytes} bytes", "attachment")

    async def create(self, user_id: int, user_email: str, edit: Edit) -> Written:
        """Store a new mail (always, unless the store fails) and say what became of it."""
        self._check_uploads(edit.attachments)
        now = self.clock.seconds()

        def txn(conn: Connection) -> Written:
            rights = thd_rights_by_mailbox(conn, user_id)
            values = {name: edit.values.get(name, "") for name in FIELDS}
            if not values["from"]:
                values["from"] = _default_from(rights, user_email) or ""
            box = _home(rights, values["from"], user_email)
            if box is None:
                raise MailApiError(DENIED, "unauthorized from/reply-to - no mailbox of yours "
                                   "can keep this email")
            key = conn.execute(insert(mailapi_mail).values(
                public_id=thd_new_public_id(conn), mailbox_id=box, status=DRAFT, read=True,
                created_at=now, **{_COLUMNS[n]: v for n, v in values.items()},
            )).inserted_primary_key
            assert key is not None
            for upload in edit.attachments:
                conn.execute(insert(mailapi_attachments).values(
                    mail_id=key[0], name=upload.name[:255],
                    content_type=upload.content_type[:255], size=len(upload.data),
                    data=upload.data))
            row = conn.execute(select(mailapi_mail).where(_m.id == key[0])).one()
            return self._thd_settle(conn, row, values, edit.status, rights, now)

        written = await self.db.run("mailapi_create", txn)
        self._told(written)
        return written

    async def update(self, user_id: int, public_id: str, edit: Edit,
                     read: bool | None) -> Written:
        """Change a draft (or only the read flag of any mail the caller may read)."""
        self._check_uploads(edit.attachments)
        now = self.clock.seconds()

        def txn(conn: Connection) -> Written:
            row, _, held = self._thd_find(conn, user_id, public_id)
            changing = bool(edit.values or edit.attachments or edit.status)
            if read is not None:
                conn.execute(update(mailapi_mail).where(_m.id == row.id).values(read=read))
            if not changing:
                return Written(Outcome.SAVED, row.public_id)
            if row.status != DRAFT:
                raise MailApiError("state", f"{row.status} mail cannot be changed; only "
                                   "drafts can")
            if not held.allow_send:
                raise MailApiError(DENIED, "you may not write mail from this mailbox")
            values = {name: edit.values.get(name, getattr(row, _COLUMNS[name]) or "")
                      for name in FIELDS}
            conn.execute(update(mailapi_mail).where(_m.id == row.id).values(
                **{_COLUMNS[n]: v for n, v in values.items()}))
            for upload in edit.attachments:
                conn.execute(insert(mailapi_attachments).values(
                    mail_id=row.id, name=upload.name[:255],
                    content_type=upload.content_type[:255], size=len(upload.data),
                    data=upload.data))
            rights = thd_rights_by_mailbox(conn, user_id)
            fresh = conn.execute(select(mailapi_mail).where(_m.id == row.id)).one()
            return self._thd_settle(conn, fresh, values, edit.status or DRAFT, rights, now)

        written = await self.db.run("mailapi_update", txn)
        self._told(written)
        return written

    def _told(self, written: Written) -> None:
        if written.outcome is Outcome.ENQUEUED:
            for hook in self.on_enqueued:
                hook()

    def _thd_settle(self, conn: Connection, row: Any, values: dict[str, str],
                    status: str | None, rights: dict[int, tuple[str, Rights]],
                    now: float) -> Written:
        """Leave `row` a draft, or check it and put it in the outbox."""
        public_id = row.public_id
        if status == DRAFT:
            return Written(Outcome.SAVED, public_id)
        if status != OUTBOX or not values["to"].strip():
            return Written(Outcome.MISSING, public_id)
        recipients: dict[str, list[str]] = {}
        try:
            for name in ("to", "cc", "bcc", "reply-to", "from"):
                recipients[name] = parse_address_list(values[name], name)
        except MailApiError:
            return Written(Outcome.INVALID, public_id)
        if len(recipients["from"]) != 1 or not recipients["to"]:
            return Written(Outcome.INVALID, public_id)
        if has_control(values["subject"]):
            return Written(Outcome.BAD_HEADER, public_id)
        sendable = {a for a, r in rights.values() if r.allow_send}
        reply_ok = {a for a, r in rights.values() if r.allow_reply_to}
        if recipients["from"][0] not in sendable \
                or any(a not in reply_ok for a in recipients["reply-to"]):
            return Written(Outcome.UNAUTHORIZED, public_id)
        sender = thd_mailbox(conn, recipients["from"][0])
        assert sender is not None
        uploads = [Upload(a.name, a.content_type, bytes(a.data)) for a in conn.execute(
            select(_a.name, _a.content_type, _a.data).where(_a.mail_id == row.id)
            .order_by(_a.id))]
        checked = {**values, "from": recipients["from"][0]}
        raw = build_message(checked, recipients, uploads, self.hostname, now)
        conn.execute(update(mailapi_mail).where(_m.id == row.id).values(
            status=OUTBOX, mailbox_id=sender.id, raw=raw, queue_id=new_queue_id(now),
            mail_from=checked["from"]))
        return Written(Outcome.ENQUEUED, public_id)


def _default_from(rights: dict[int, tuple[str, Rights]], user_email: str) -> str | None:
    """The user's main address: its own email when it may send from it, else the first
    mailbox it owns or may send from."""
    sendable = sorted(a for a, r in rights.values() if r.allow_send)
    if user_email.lower() in sendable:
        return user_email.lower()
    return sendable[0] if sendable else None


def _home(rights: dict[int, tuple[str, Rights]], mail_from: str, user_email: str
          ) -> int | None:
    """The mailbox a new mail is kept in: its from's, when the caller may send from it,
    else the caller's default one."""
    by_address = {a: (i, r) for i, (a, r) in rights.items()}
    try:
        parsed = parse_address_list(mail_from, "from")
    except MailApiError:
        parsed = []
    if len(parsed) == 1 and parsed[0] in by_address and by_address[parsed[0]][1].allow_send:
        return by_address[parsed[0]][0]
    default = _default_from(rights, user_email)
    return by_address[default][0] if default is not None else None

"""The Mail API's listing (`GET /api/v1/mail/`): one keyset page of the mail a user may read,
newest first, and the mail as every read hands it out (`Mail`).

A page is read in one read transaction of three statements (five from a cursor), each a
`Prepared` statement (mailcore.store.prepared: compiled once, run on the driver, with no
SQLAlchemy work per execution): the count, [the cursor's row, the page before it,] the
page's rows with their mailbox's address, and the attachments of the page's mails. Which
mailboxes a user may read (their own and those granted with `allow_read`) is a subquery of
each statement, not a list read first and bound into them: the mail of a mailbox granted
between two statements can never come back without its address, and no statement takes a
list parameter (which a prepared statement cannot).

SQLite reads `mailbox_id IN (subquery) AND id <= ? ORDER BY id DESC LIMIT n` down the
(mailbox_id, id) index of each readable mailbox and stops each once it has n rows, so a
page over several large shared mailboxes costs about what one over a single mailbox does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Connection, bindparam, func, or_, select

from mailcore.mailapi.errors import INVALID, MailApiError
from mailcore.store.prepared import Prepared
from mailcore.store.schema import mailapi_attachments, mailapi_mail, mailbox_grants, mailboxes

# The fields a client writes, by their names on the wire, and their columns.
FIELDS = ("to", "cc", "bcc", "reply-to", "from", "subject", "body")
COLUMNS = {"to": "to_addrs", "cc": "cc_addrs", "bcc": "bcc_addrs", "reply-to": "reply_to",
           "from": "mail_from", "subject": "subject", "body": "body"}
# No mail id reaches this: the first page is the page from it. (Bound as a BIGINT:
# PostgreSQL's ids are INTEGERs, compared across the types down their index as they are.)
_NEWEST = 2**62


@dataclass(frozen=True)
class AttachmentInfo:
    index: int
    name: str
    content_type: str
    size: int


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


_m = mailapi_mail.c
_a = mailapi_attachments.c
_b = mailboxes.c
_g = mailbox_grants.c

# The mailboxes :user_id may read: their own, and those granted with allow_read.
_READABLE = or_(
    _b.owner_id == bindparam("user_id"),
    _b.id.in_(select(_g.mailbox_id).where(_g.user_id == bindparam("user_id"), _g.allow_read)),
)
_MINE = _m.mailbox_id.in_(select(_b.id).where(_READABLE))
_START = bindparam("start", type_=BigInteger)

_COUNT = Prepared(select(func.coalesce(func.sum(_b.mail_count), 0)).where(_READABLE))
_CURSOR = Prepared(select(_m.id).where(_m.public_id == bindparam("cursor"), _MINE))
# The :n mails after :start (newer), oldest first: the last is where the previous page starts.
_BEFORE = Prepared(select(_m.public_id).where(_MINE, _m.id > _START)
                   .order_by(_m.id).limit(bindparam("n")))
_FIELD_COLUMNS = [_m[COLUMNS[name]] for name in FIELDS]
# The page: :n mails from :start down, each with its mailbox's address (never `raw`, the
# message as sent: a page of up to 1,000 outbox mails would hold every one in memory).
_ROWS = Prepared(
    select(_m.id, _m.public_id, _b.address, _m.status, _m.read, _m.created_at, *_FIELD_COLUMNS)
    .join_from(mailapi_mail, mailboxes, _b.id == _m.mailbox_id)
    .where(_MINE, _m.id <= _START)
    .order_by(_m.id.desc()).limit(bindparam("n")))
_PAGE_IDS = (select(_m.id).where(_MINE, _m.id <= _START)
             .order_by(_m.id.desc()).limit(bindparam("n")))
_ATTACHMENTS = Prepared(select(_a.mail_id, _a.name, _a.content_type, _a.size)
                        .where(_a.mail_id.in_(_PAGE_IDS.scalar_subquery())).order_by(_a.id))
# Every statement of a page, for tests.
STATEMENTS = (_COUNT, _CURSOR, _BEFORE, _ROWS, _ATTACHMENTS)


def thd_page(conn: Connection, user_id: int, count: int, cursor: str | None) -> Page:
    """Blocking: up to `count` mails `user_id` may read, newest first, from the mail
    `cursor` names (a public id; None: the newest). A cursor of mail the user may not read
    (or of none) is invalid."""
    total = int(_COUNT.rows(conn, {"user_id": user_id})[0][0])
    start, previous = _NEWEST, None
    if cursor is not None:
        found = _CURSOR.rows(conn, {"user_id": user_id, "cursor": cursor})
        if not found:
            raise MailApiError(INVALID, "invalid cursor", "cursor")
        start = int(found[0][0])
        before = _BEFORE.rows(conn, {"user_id": user_id, "start": start, "n": count})
        previous = before[-1][0] if before else None
    rows = _ROWS.rows(conn, {"user_id": user_id, "start": start, "n": count + 1})
    following = rows[count][1] if len(rows) > count else None
    shown = rows[:count]
    attached = _attachments(conn, user_id, shown)
    return Page([_mail(row, attached.get(row[0], ())) for row in shown], total, previous,
                following)


def _attachments(conn: Connection, user_id: int, shown: Sequence[Any]
                 ) -> dict[int, tuple[AttachmentInfo, ...]]:
    """The attachments of the mails `shown` (rows of _ROWS), numbered from 1 per mail."""
    if not shown:
        return {}
    found: dict[int, list[AttachmentInfo]] = {}
    for mail_id, name, content_type, size in _ATTACHMENTS.rows(
            conn, {"user_id": user_id, "start": shown[0][0], "n": len(shown)}):
        mine = found.setdefault(mail_id, [])
        mine.append(AttachmentInfo(len(mine) + 1, name, content_type, size))
    return {mail_id: tuple(items) for mail_id, items in found.items()}


def _mail(row: Sequence[Any], attachments: tuple[AttachmentInfo, ...]) -> Mail:
    mail_id, public_id, address, status, read, created_at, *values = row
    return Mail(mail_id, public_id, address, status, bool(read),
                {name: value or "" for name, value in zip(FIELDS, values, strict=True)},
                attachments, created_at)

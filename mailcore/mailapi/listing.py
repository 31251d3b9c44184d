"""The Mail API's listing (`GET /api/v1/mail/`): one keyset page of the mail a user may read,
newest first, and the mail as every read hands it out (`Mail`).

A page is one read transaction: the mailboxes the user may read (their own and those
granted with `allow_read`: addresses and counts, the page's `count` their sum), [the
cursor's row and, per mailbox, the mails above it for the previous page,] per mailbox its
part of the page read down its (mailbox_id, id) index, merged, and the attachments of the
mails shown. Each statement but the last is `Prepared` (mailcore.store.prepared: compiled
once, run on the driver, no SQLAlchemy work per execution); the last takes the page's ids
as a list, which a prepared statement cannot.

A page holds at most `count` mails, and fewer when their fields together (body, subject,
addresses) are over PAGE_CHARS characters (the first mail always): the parts of the page are
read with each mail's size and without its fields, which are read for the mails shown only.
An inbox mail's body is up to 1 Mi characters (mailcore.mailapi.mime; one delivered
before that bound may be as large as the SMTP server's max_message_size, 50 MB), a
draft's 1 MiB: read whole, a page of 25 such mails, or of 1,000 (MAX_COUNT) drafts, held a
gigabyte or more. `next_page_id` then names the first mail not shown, so a client following
it misses none.

A cursor is a mail's public id, and the page starts at the mail's place (its `id`). A mail
that left a mailbox (deleted, or sent from another mailbox) leaves its place there for
GONE_KEEP seconds (`thd_left`, table mailapi_gone): a cursor naming a mail no longer in a
mailbox the caller may read starts at that place if the caller may read the mailbox it left,
so a client walking its mail while it deletes some goes on where it was. Any other cursor
(no such mail, mail of a mailbox the caller may not read, now or when it left it, or a place
left more than GONE_KEEP seconds ago) is `invalid cursor`, whether a mail had that id or not.
The places kept longer go in batches of GONE_SWEEP_BATCH rows, a transaction each, by a
periodic sweep (`thd_sweep_gone`, run by mailcore.mailapi.mail.GoneSweeper), not by the
delete or send that leaves a place: on SQLite those run inside the spool's group commit,
under the store's one write lock, which deleting every expired row there held for as long
as that took.

Read per mailbox, a page costs the same whichever mailbox holds the newest mail, one short
statement per mailbox the user may read (a few tens of microseconds each). One statement
over all of them (`mailbox_id IN (...) ORDER BY id DESC LIMIT n`) reads fine on SQLite but
not on PostgreSQL, whose plans walk the primary key backwards and test each row: for a user
whose mail is older than most, over 300,000 mails, 70-100 ms against 0.5 ms.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
)

from mailcore.mailapi.errors import INVALID, MailApiError
from mailcore.store.prepared import Prepared
from mailcore.store.schema import (
    mailapi_attachments,
    mailapi_gone,
    mailapi_mail,
    mailbox_grants,
    mailboxes,
)

# The fields a client writes, by their names on the wire, and their columns.
FIELDS = ("to", "cc", "bcc", "reply-to", "from", "subject", "body")
COLUMNS = {"to": "to_addrs", "cc": "cc_addrs", "bcc": "bcc_addrs", "reply-to": "reply_to",
           "from": "mail_from", "subject": "subject", "body": "body"}
# The most characters of mail fields one page holds (more than one mail only when they fit).
PAGE_CHARS = 8 * 1024 * 1024
# No mail id reaches this: the first page is the page from it. (Bound as a BIGINT:
# PostgreSQL's ids are INTEGERs, compared across the types down their index as they are.)
_NEWEST = 2**62
# How long the place of a mail that left a mailbox is kept for cursors naming it (seconds).
GONE_KEEP = 30 * 24 * 3600.0
# Expired places deleted by one transaction of the sweep (`thd_sweep_gone`).
GONE_SWEEP_BATCH = 1000


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

# The mailboxes :user_id may read (their own, and those granted with allow_read), with their
# addresses and how much mail each holds.
_BOXES = Prepared(select(_b.id, _b.address, _b.mail_count).where(or_(
    _b.owner_id == bindparam("user_id"),
    _b.id.in_(select(_g.mailbox_id).where(_g.user_id == bindparam("user_id"), _g.allow_read)),
)))
_CURSOR = Prepared(select(_m.id, _m.mailbox_id).where(_m.public_id == bindparam("cursor")))
_gone = mailapi_gone.c
# The places a mail with this public id left since :since (kept still), the latest first.
_GONE = Prepared(select(_gone.mail_id, _gone.mailbox_id).where(
    _gone.public_id == bindparam("cursor"), _gone.gone_at >= bindparam("since"))
    .order_by(_gone.id.desc()))
_LEFT = insert(mailapi_gone)
# Up to :n places left before :before (down the gone_at index).
_EXPIRED = delete(mailapi_gone).where(_gone.id.in_(
    select(_gone.id).where(_gone.gone_at < bindparam("before"))
    .limit(bindparam("n", type_=Integer)).scalar_subquery()))
_BOX = bindparam("box", type_=Integer)
_START = bindparam("start", type_=BigInteger)
_KEY = tuple_(_m.mailbox_id, _m.id)


def _box_part(columns: Sequence[Any], *, newer: bool) -> dict[str, Prepared]:
    """One mailbox's :n mails from :start down (oldest last), or with `newer` the :n after
    :start (oldest first), by dialect.

    SQLite: `mailbox_id = :box` and a bound on `id`, down the (mailbox_id, id) index.
    PostgreSQL: the same rows as a range of that index's keys, `(mailbox_id, id)` between
    `(:box, low)` and `(:box, high)`, in the index's order. A generic plan (PostgreSQL's,
    for a statement run often) knows neither the mailbox nor how much of the mail it holds:
    asked for `mailbox_id = :box ... ORDER BY id`, it may walk the primary key and test
    each row (every row above an old mailbox's mail: 300,000 in a test, for 26). Only that
    index gives this order without a sort. SQLite reads such a range through the mailbox
    alone (5 ms instead of 0.05), hence the two forms."""
    n = bindparam("n", type_=Integer)
    if newer:
        plain = (_m.id > _START,)
        keys = (_KEY > tuple_(_BOX, _START), _KEY <= tuple_(_BOX, literal(_NEWEST)))
        order = [_m.mailbox_id.asc(), _m.id.asc()]
    else:
        plain = (_m.id <= _START,)
        keys = (_KEY <= tuple_(_BOX, _START), _KEY > tuple_(_BOX, literal(0)))
        order = [_m.mailbox_id.desc(), _m.id.desc()]
    return {"sqlite": Prepared(select(*columns).where(_m.mailbox_id == _BOX, *plain)
                               .order_by(order[1]).limit(n)),
            "postgresql": Prepared(select(*columns).where(*keys).order_by(*order).limit(n))}


# One mailbox's mails after the cursor, for the previous page.
_AFTER = _box_part([_m.id, _m.public_id], newer=True)
_FIELD_COLUMNS = [_m[COLUMNS[name]] for name in FIELDS]
# One mailbox's part of the page, with each mail's size (its fields' characters) instead of
# its fields (and never `raw`, the message as sent); then the fields of the mails shown.
_SIZE = reduce(operator.add, [func.coalesce(func.length(c), 0) for c in _FIELD_COLUMNS])
_ROWS = _box_part([_m.id, _m.public_id, _m.mailbox_id, _m.status, _m.read, _m.created_at,
                   _SIZE.label("size")], newer=False)
_FIELDS = select(_m.id, *_FIELD_COLUMNS).where(_m.id.in_(bindparam("ids", expanding=True)))
_ATTACHMENTS = (select(_a.mail_id, _a.name, _a.content_type, _a.size)
                .where(_a.mail_id.in_(bindparam("ids", expanding=True))).order_by(_a.id))
# Every statement of a page, for tests.
STATEMENTS = (_BOXES.statement, _CURSOR.statement, _GONE.statement,
              *(p.statement for part in (_AFTER, _ROWS) for p in part.values()), _FIELDS,
              _ATTACHMENTS)


def thd_page(conn: Connection, user_id: int, count: int, cursor: str | None,
             now: float) -> Page:
    """Blocking: up to `count` mails `user_id` may read, newest first, from the mail
    `cursor` names (a public id; None: the newest), or from the place it left in a mailbox
    the user may read less than GONE_KEEP seconds before `now`. Any other cursor (of mail
    the user may not read, or of none) is invalid."""
    boxes = {box: (address, mail_count)
             for box, address, mail_count in _BOXES.rows(conn, {"user_id": user_id})}
    total = sum(int(mail_count) for _, mail_count in boxes.values())
    start, previous = _NEWEST, None
    if cursor is not None:
        found = [row for row in _CURSOR.rows(conn, {"cursor": cursor}) if row[1] in boxes]
        if not found:
            found = [row for row in _GONE.rows(conn, {"cursor": cursor,
                                                      "since": now - GONE_KEEP})
                     if row[1] in boxes]
        if not found:
            raise MailApiError(INVALID, "invalid cursor", "cursor")
        start = int(found[0][0])
        # The previous page starts `count` mails up, the newest when there are fewer.
        after = sorted(row for box in boxes for row in _AFTER[conn.dialect.name].rows(
            conn, {"box": box, "start": start, "n": count}))[:count]
        previous = after[-1][1] if after else None
    rows = sorted((row for box in boxes for row in _ROWS[conn.dialect.name].rows(
        conn, {"box": box, "start": start, "n": count + 1})), key=lambda r: -r[0])
    shown = _within(rows[:count], PAGE_CHARS)
    following = rows[len(shown)][1] if len(rows) > len(shown) else None
    ids = [row[0] for row in shown]
    values = {row[0]: row[1:] for row in conn.execute(_FIELDS, {"ids": ids})} if ids else {}
    attached = thd_attachments(conn, ids)
    # (A mail deleted since its part was read is left out.)
    return Page([mail_of(row[0], row[1], boxes[row[2]][0], row[3], row[4], row[5],
                         values[row[0]], attached.get(row[0], ()))
                 for row in shown if row[0] in values], total, previous, following)


def thd_left(conn: Connection, public_id: str, mail_id: int, mailbox_id: int,
             now: float) -> None:
    """Blocking: the mail `mail_id` (public id `public_id`) left the mailbox `mailbox_id`
    (deleted, or sent from another one): its place there is kept for cursors naming it
    (GONE_KEEP seconds; `thd_sweep_gone` deletes it after)."""
    conn.execute(_LEFT, {"public_id": public_id, "mail_id": mail_id, "mailbox_id": mailbox_id,
                         "gone_at": now})


def thd_sweep_gone(conn: Connection, now: float, batch: int = GONE_SWEEP_BATCH) -> int:
    """Blocking: delete up to `batch` places left more than GONE_KEEP seconds before `now`
    (which no cursor finds any more); how many. Idempotent: nodes sharing the store may
    run it at once."""
    return int(conn.execute(_EXPIRED, {"before": now - GONE_KEEP, "n": batch}).rowcount or 0)


def _within(rows: Sequence[Any], most: int) -> Sequence[Any]:
    """The first of `rows` whose sizes (their last column) together are at most `most`
    characters; the first row always."""
    total = 0
    for n, row in enumerate(rows):
        total += int(row[-1])
        if n and total > most:
            return rows[:n]
    return rows


def thd_attachments(conn: Connection, mail_ids: Sequence[int]
                    ) -> dict[int, tuple[AttachmentInfo, ...]]:
    """Blocking: the attachments of these mails (one query), numbered from 1 per mail."""
    found: dict[int, list[AttachmentInfo]] = {}
    if mail_ids:
        for mail_id, name, content_type, size in conn.execute(
                _ATTACHMENTS, {"ids": list(mail_ids)}):
            mine = found.setdefault(mail_id, [])
            mine.append(AttachmentInfo(len(mine) + 1, name, content_type, size))
    return {mail_id: tuple(items) for mail_id, items in found.items()}


def mail_of(mail_id: int, public_id: str, address: str, status: str, read: Any,
            created_at: float, values: Iterable[str | None],
            attachments: tuple[AttachmentInfo, ...]) -> Mail:
    """A mail as every read hands it out; `values` are the FIELDS' columns in that order
    (SQLite's 0 and 1 of `read` a bool, a missing field "")."""
    return Mail(mail_id, public_id, address, status, bool(read),
                {name: value or "" for name, value in zip(FIELDS, values, strict=True)},
                attachments, created_at)

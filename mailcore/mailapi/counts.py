"""How much mail each mailbox holds: `mailboxes.mail_count` and `used_bytes`, kept by the
writers of its mail in the transactions that change it.

The listing's `count` (every mail the caller may read) is the sum of the counts of the
mailboxes it may read: a few rows, where counting the mail rows themselves walks an index
of every mail (about 10 ms per 100,000 on SQLite, on every page).

`used_bytes` is the sum of the `size` of the mailbox's mail (mail_size: the bytes a mail
keeps), checked against the mailbox's quota (its own `quota_bytes`, set by the operator, 0
for no limit; else `[mailapi] mailbox_quota_bytes`: `effective_quota`) by the write that
would grow it:
one conditional UPDATE of the mailbox's row (`thd_charge`), so that two writes at once
cannot both pass a limit that only one fits under. PostgreSQL's row lock orders them (the
second re-reads the row the first committed, READ COMMITTED), SQLite's writers take turns.
Writes that free bytes (a delete, a smaller draft) and a mail's message built when it is
sent are never refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import Connection, bindparam, func, or_, select, update

from mailcore.mailapi.errors import QUOTA, MailApiError
from mailcore.store.schema import mailapi_mail, mailboxes
from mailcore.store.schema.mailapi import DRAFT

_COUNT = update(mailboxes).where(mailboxes.c.id == bindparam("box")) \
    .values(mail_count=mailboxes.c.mail_count + bindparam("delta"))
_USE = update(mailboxes).where(mailboxes.c.id == bindparam("box")) \
    .values(used_bytes=mailboxes.c.used_bytes + bindparam("bytes"))
_b = mailboxes.c
# Within the mailbox's own quota (0: none), else the configured one (:quota)...
_USE_WITHIN = _USE.where(or_(
    _b.quota_bytes == 0,
    _b.used_bytes + bindparam("bytes") <= func.coalesce(_b.quota_bytes, bindparam("quota"))))
# ... or, when none is configured, within its own if it has one.
_USE_WITHIN_OWN = _USE.where(or_(
    _b.quota_bytes.is_(None), _b.quota_bytes == 0,
    _b.used_bytes + bindparam("bytes") <= _b.quota_bytes))
_QUOTA_OF = select(_b.quota_bytes).where(_b.id == bindparam("box"))
# The mailbox's row, locked against another writer (PostgreSQL: FOR NO KEY UPDATE, which
# takes turns with itself but not with the FOR KEY SHARE of thd_hold_mailbox).
_LOCK_BOX = select(_b.id).where(_b.id == bindparam("box")).with_for_update(key_share=True)
# Its drafts, counted up to :cap (ix_mailapi_mail_outbox: status, mailbox_id).
_DRAFTS = select(func.count()).select_from(
    select(mailapi_mail.c.id)
    .where(mailapi_mail.c.status == DRAFT, mailapi_mail.c.mailbox_id == bindparam("box"))
    .limit(bindparam("cap")).subquery())
# All of them, for the refusal to say.
_ALL_DRAFTS = select(func.count()).select_from(mailapi_mail) \
    .where(mailapi_mail.c.status == DRAFT, mailapi_mail.c.mailbox_id == bindparam("box"))


def effective_quota(own: int | None, configured: int | None) -> int | None:
    """A mailbox's quota in bytes (None: no limit): its own `quota_bytes` (0: no limit), or
    the configured `[mailapi] mailbox_quota_bytes` when it has none."""
    if own is None:
        return configured
    return own or None


def thd_count_mail(conn: Connection, mailbox_id: int, delta: int) -> None:
    """Blocking: `mailboxes.mail_count` of a mailbox changes by `delta`, in the transaction
    that adds, removes or moves its mail (every writer of mailapi_mail rows calls it)."""
    conn.execute(_COUNT, {"box": mailbox_id, "delta": delta})


def mail_size(fields: Mapping[str, str] | Iterable[str], *sizes: Iterable[int]) -> int:
    """The bytes a mail keeps: its text fields in UTF-8, plus `sizes` (its attachments, its
    message as sent or received)."""
    texts = fields.values() if isinstance(fields, Mapping) else fields
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) \
        + sum(sum(s) for s in sizes)


def thd_use(conn: Connection, mailbox_id: int, delta: int) -> None:
    """Blocking: `used_bytes` of a mailbox changes by `delta`, unchecked (bytes freed or
    moved, a message built as the mail is sent)."""
    if delta:
        conn.execute(_USE, {"box": mailbox_id, "bytes": delta})


def thd_fits(conn: Connection, mailbox_id: int, delta: int, quota: int | None) -> bool:
    """Blocking: add `delta` bytes to a mailbox's `used_bytes` if it stays within its quota
    (`effective_quota` of its own and the configured `quota`; None: no limit; a delta of 0
    or less always fits); whether it did. The mailbox row stays locked until the
    transaction ends (PostgreSQL)."""
    if delta <= 0:
        thd_use(conn, mailbox_id, delta)
        return True
    if quota is None:
        return conn.execute(_USE_WITHIN_OWN, {"box": mailbox_id, "bytes": delta}).rowcount == 1
    return conn.execute(_USE_WITHIN, {"box": mailbox_id, "bytes": delta,
                                      "quota": quota}).rowcount == 1


def thd_charge(conn: Connection, mailbox_id: int, delta: int, quota: int | None,
               address: str = "the mailbox") -> None:
    """Blocking: thd_fits, or QUOTA (the caller's transaction then stores nothing)."""
    if not thd_fits(conn, mailbox_id, delta, quota):
        own = conn.execute(_QUOTA_OF, {"box": mailbox_id}).scalar()
        raise MailApiError(QUOTA, f"mailbox full: {address} has no room for {delta} more "
                           f"bytes (quota {effective_quota(own, quota)} bytes) - email not "
                           "saved")


def thd_lock_drafts(conn: Connection, mailbox_id: int, max_drafts: int | None) -> None:
    """Blocking: lock the mailbox's row before a new mail is stored in it, so that two
    writes at once count its drafts (thd_draft_room) one after the other (SQLite's writers
    take turns anyway). Nothing with no limit."""
    if max_drafts is not None:
        conn.execute(_LOCK_BOX, {"box": mailbox_id})


def thd_draft_room(conn: Connection, mailbox_id: int, max_drafts: int | None,
                   address: str = "the mailbox") -> None:
    """Blocking: QUOTA (the caller's transaction then stores nothing) when the mailbox
    holds more than `max_drafts` drafts (None: no limit), the new one counted: called
    after a new mail is stored and settled, and only when it stayed a draft (a mail sent
    at once adds none). An empty draft takes no byte of the quota, so without it a client
    could add drafts without end. The caller locked the mailbox's row (thd_lock_drafts)
    before storing the mail."""
    if max_drafts is None:
        return
    if (conn.execute(_DRAFTS, {"box": mailbox_id, "cap": max_drafts + 1}).scalar() or 0) \
            <= max_drafts:
        return
    # Counted whole, to say how many the mailbox holds (mail sent back to the drafts is
    # kept past the cap), without the new one, which the refusal takes back.
    held = (conn.execute(_ALL_DRAFTS, {"box": mailbox_id}).scalar() or 0) - 1
    raise MailApiError(QUOTA, f"mailbox full: {address} holds {held} "
                       f"draft{'' if held == 1 else 's'}, and [mailapi] max_drafts_per_mailbox "
                       f"allows {max_drafts}; send or delete drafts - email not saved")

"""The sends the APIs made for each user (`schema.api_sends`), counted against caps over
sliding windows (mailcore.sendcaps): one transaction checks a send against every window and
records it, so that two sends at once, on one node or on several sharing a PostgreSQL
store, never both pass the last of a cap. Blocking (`thd_`): run them in the transaction
that sends."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, case, delete, func, insert, select, text

from mailcore.store.schema import api_sends

_s = api_sends.c

# PostgreSQL: the namespace of the per-user advisory lock held while a send is counted (its
# high 32 bits spell "send"; the user's id is the low ones).
_SEND_LOCK = 0x73656E64 << 32
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
# Built once: they run for every send.
_COUNTED = select(_s.at, _s.recipients).where(
    _s.user_id == bindparam("user"), _s.at > bindparam("since")).order_by(_s.at)
_FORGET = delete(api_sends).where(_s.user_id == bindparam("user"), _s.at <= bindparam("before"))
_RECORD = insert(api_sends)


@dataclass(frozen=True)
class Window:
    """A cap: at most `cap` recipients in any `seconds` (`name` says which, as "hour")."""

    name: str
    seconds: float
    cap: int


@dataclass(frozen=True)
class SendVerdict:
    """Whether a send of `recipients` passes; when not, the window whose cap refused it,
    the recipients already counted there, and the seconds until it would pass (the
    longest wait of the windows that refuse it), None when it never can (more recipients
    than the cap)."""

    recipients: int
    window: Window | None = None  # None: it passes
    used: int = 0
    retry_after: int | None = None

    @property
    def allowed(self) -> bool:
        return self.window is None


def thd_hold_sends(conn: Connection, user_id: int) -> None:
    """Blocking: take `user_id`'s send-cap lock (PostgreSQL: an advisory lock, held until
    the transaction ends; taken again by `thd_take_sends`, it waits for nothing). A
    transaction that may count a send takes it first, before any row lock: one that
    counted its send, then waited for a row another of the user's sends held while that
    one waited for the lock, deadlocked (a Mail API draft sent from another mailbox than
    its own, and a post from that mailbox)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"key": _SEND_LOCK + user_id})


def thd_take_sends(conn: Connection, user_id: int, recipients: int, now: float,
                   windows: Sequence[Window], *, take: bool = True) -> SendVerdict:
    """Count a send of `recipients` by `user_id` at `now` against `windows`: recorded
    (with `take`) when every window has room for it, else refused, nothing recorded. In
    the caller's transaction: on PostgreSQL it holds the user's advisory lock until it
    ends (READ COMMITTED: a send that waited for it reads the one before it), so the
    transaction must count no other user's send (two transactions each holding one user's
    lock and waiting for the other's deadlock); SQLite's writers take turns anyway.
    Without `take` (a check that sends nothing) no lock is taken and nothing is written."""
    if not windows or recipients <= 0:
        return SendVerdict(recipients)
    for window in windows:
        if recipients > window.cap:
            return SendVerdict(recipients, window)
    longest = max(w.seconds for w in windows)
    if take:
        thd_hold_sends(conn, user_id)
        conn.execute(_FORGET, {"user": user_id, "before": now - longest})
    refused: SendVerdict | None = None
    counted = conn.execute(_used(len(windows)), {
        "user": user_id, "since": now - longest,
        **{f"since_{i}": now - w.seconds for i, w in enumerate(windows)}}).one()
    for window, total in zip(windows, counted, strict=True):
        used = int(total)
        if used + recipients <= window.cap:
            continue
        wait = _wait(conn, user_id, now, window, used + recipients - window.cap)
        if refused is None or wait > (refused.retry_after or 0):
            refused = SendVerdict(recipients, window, used, wait)
    if refused is not None:
        return refused
    if take:
        conn.execute(_RECORD, {"user_id": user_id, "at": now, "recipients": recipients})
    return SendVerdict(recipients)


@functools.cache
def _used(windows: int) -> Select[Any]:
    """The recipients a user's sends counted in each of `windows` windows (the one
    starting at `since_0`, `since_1`, ...), in one read of its sends since the earliest
    start (`since`)."""
    return select(*(
        func.coalesce(func.sum(case((_s.at > bindparam(f"since_{i}"), _s.recipients),
                                    else_=0)), 0)
        for i in range(windows))).where(
            _s.user_id == bindparam("user"), _s.at > bindparam("since"))


def _wait(conn: Connection, user_id: int, now: float, window: Window, excess: int) -> int:
    """Seconds until the sends counted in `window` leave it by at least `excess`
    recipients (each leaves `window.seconds` after it was made), at least 1."""
    freed = 0
    leaves = now + window.seconds
    for row in conn.execute(_COUNTED, {"user": user_id, "since": now - window.seconds}):
        freed += row.recipients
        if freed >= excess:
            leaves = row.at + window.seconds
            break
    return max(1, math.ceil(leaves - now))


def thd_sweep_sends(conn: Connection, before: float, batch: int) -> int:
    """Delete up to `batch` of the sends made at or before `before` (no window counts them;
    ix_api_sends_at finds them); how many."""
    ids = select(_s.id).where(_s.at <= before).limit(batch).scalar_subquery()
    return int(conn.execute(delete(api_sends).where(_s.id.in_(ids))).rowcount or 0)


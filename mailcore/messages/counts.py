"""Counts the database keeps for the message reads (migration 0020), instead of counting rows.

`message_counts` holds messages per (user, account, folder) and `message_thread_totals` the
non-empty threads per user, both kept by triggers in the transaction of every write; these
functions read them inside a read transaction. A count they cannot give exactly (threads of
one account among several) is None, and the caller counts rows.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Collection, Hashable
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Select, and_, bindparam, case, exists, func, select
from sqlalchemy.sql.elements import ColumnElement

from mailcore.store.prepared import Prepared
from mailcore.store.schema.fetch import fetch_accounts
from mailcore.store.schema.messages import message_counts, message_thread_totals, messages

V = TypeVar("V")


def thd_folder_totals(
    conn: Connection, user_id: int, account_id: int | None = None
) -> dict[str, int]:
    """Messages per folder name (folders holding none left out), in no particular order."""
    q = (
        select(message_counts.c.folder, func.sum(message_counts.c.total))
        .where(message_counts.c.user_id == user_id)
        .where(message_counts.c.total > 0)
        .group_by(message_counts.c.folder)
    )
    q = q.where(*_of(account_id, None))
    return {folder: int(n) for folder, n in conn.execute(q)}


def thd_visible_folder_totals(conn: Connection, user_id: int, account_id: int | None = None
                              ) -> tuple[dict[str, int], tuple[int, ...]]:
    """`thd_folder_totals` but the messages of the user's accounts that are not IMAP ones
    (the IMAP2API's `without_pop`), and those of them that hold mail
    (`store.thd_hidden_accounts`), read in one statement: the user's kept counts by folder
    and account, each account looked up by its key."""
    c, f = message_counts.c, fetch_accounts
    rows = conn.execute(
        select(c.folder, c.account_key, c.total, f.c.id.is_not(None))
        .select_from(message_counts.outerjoin(
            f, and_(f.c.id == c.account_key, f.c.protocol != "imap")))
        .where(c.user_id == user_id, c.total > 0)
    ).all()
    hidden = tuple(sorted({key for _, key, _, pop in rows if pop}))
    totals: dict[str, int] = {}
    for folder, key, total, pop in rows:
        if not pop and (account_id is None or key == account_id):
            totals[folder] = totals.get(folder, 0) + int(total)
    return totals, hidden


def _of(account_id: int | None, folder: str | None, hidden: Collection[int] = ()
        ) -> list[ColumnElement[bool]]:
    """`message_counts` rows of this account and folder (None: any), but the `hidden`
    accounts'."""
    c = message_counts.c
    return [cond for cond in (
        c.account_key == account_id if account_id is not None else None,
        c.folder == folder if folder is not None else None,
        c.account_key.not_in(sorted(hidden)) if hidden else None,
    ) if cond is not None]


def thd_message_total(
    conn: Connection, user_id: int, account_id: int | None = None, folder: str | None = None,
    hidden: Collection[int] = (),
) -> int:
    """How many messages the user holds (in this account, in this folder), but those of
    the `hidden` accounts."""
    q = select(func.coalesce(func.sum(message_counts.c.total), 0)).where(
        message_counts.c.user_id == user_id, *_of(account_id, folder, hidden)
    )
    return int(conn.execute(q).scalar() or 0)


def thd_total_stamp_and_pop(
    conn: Connection, user_id: int, account_id: int | None = None, folder: str | None = None,
    pop: bool = False,
) -> tuple[int, int, bool]:
    """`thd_message_total` and `thd_change_stamp` in one statement (a list page needs both),
    and with `pop` whether one of the user's POP3 accounts holds mail (`pop_mail`), in the
    same statement (else False)."""
    [row] = _total_and_stamp(account_id is not None, folder is not None, pop).rows(
        conn, {"user_id": user_id, "account_id": account_id, "folder": folder})
    return int(row[0]), int(row[1]), bool(row[2]) if pop else False


@functools.cache
def _total_and_stamp(by_account: bool, by_folder: bool, pop: bool = False) -> Prepared:
    """The statement of `thd_total_stamp_and_pop`, built and compiled once per filter shape
    (every list page runs it)."""
    return Prepared(total_and_stamp_select(by_account, by_folder, pop))


def pop_mail() -> ColumnElement[bool]:
    """Whether one of the user `:user_id`'s accounts that is not an IMAP one (a Dropmyemail
    POP3 account) holds mail: the IMAP2API leaves out such an account's mail
    (`store.thd_hidden_accounts` names them). A probe of the user's accounts index, asked
    in the statement a read runs anyway, so that a user with none (nearly all) costs no
    round trip more than before."""
    held = message_counts.alias("pop_counts")  # (not the outer statement's message_counts)
    return exists().where(
        fetch_accounts.c.user_id == bindparam("user_id"),
        fetch_accounts.c.protocol != "imap",
        exists().where(held.c.user_id == bindparam("user_id"),
                       held.c.account_key == fetch_accounts.c.id,
                       held.c.total > 0))


def total_and_stamp_select(by_account: bool, by_folder: bool, pop: bool = False
                           ) -> Select[Any]:
    """`thd_total_stamp_and_pop`'s one row (total, stamp), of the messages of the account
    `:account_id` (with `by_account`) in the folder `:folder` (with `by_folder`) of the
    user `:user_id`; with `pop`, a third column: `pop_mail` (1 or 0)."""
    c = message_counts.c
    wanted = [cond for cond, on in ((c.account_key == bindparam("account_id"), by_account),
                                    (c.folder == bindparam("folder"), by_folder)) if on]
    total = func.sum(case((and_(*wanted), c.total), else_=0) if wanted else c.total)
    columns: list[ColumnElement[Any]] = [func.coalesce(total, 0),
                                         func.coalesce(func.sum(c.changes), 0)]
    if pop:
        columns.append(case((pop_mail(), 1), else_=0))
    return select(*columns).where(c.user_id == bindparam("user_id"))


def _unthreaded(conn: Connection, user_id: int, account_id: int | None) -> int:
    """Messages without a thread (each one its own thread); none once stored, normally."""
    q = (
        select(func.count())
        .select_from(messages)
        .where(messages.c.thread_id.is_(None))
        # "+ 0": no index on user_id for this one, or SQLite (without statistics) walks the
        # user's whole date index instead of the few NULLs of (thread_id, date).
        .where(messages.c.user_id + 0 == user_id)
    )
    if account_id is not None:
        q = q.where(messages.c.account_id == account_id)
    return int(conn.execute(q).scalar() or 0)


def thd_thread_total(conn: Connection, user_id: int, account_id: int | None = None,
                     hidden: Collection[int] = ()) -> int | None:
    """How many threads the user's messages (of this account) form; None when only counting
    rows can tell (an account's threads while other accounts hold messages too, or while
    one of the `hidden` accounts, whose messages are left out, holds some)."""
    if account_id is not None or hidden:
        keys = set(conn.execute(
            select(message_counts.c.account_key)
            .where(message_counts.c.user_id == user_id)
            .where(message_counts.c.total > 0)
            .distinct()
        ).scalars())
        if account_id is not None and (account_id not in keys or account_id in hidden):
            return 0
        if account_id is not None and keys != {account_id}:
            return None
        if keys & set(hidden):
            return None
    threads = conn.execute(
        select(message_thread_totals.c.threads).where(message_thread_totals.c.user_id == user_id)
    ).scalar()
    return int(threads or 0) + _unthreaded(conn, user_id, account_id)


def thd_change_stamp(conn: Connection, user_id: int) -> int:
    """A number that changes whenever one of the user's messages is stored, deleted or moved."""
    return int(conn.execute(
        select(func.coalesce(func.sum(message_counts.c.changes), 0))
        .where(message_counts.c.user_id == user_id)
    ).scalar() or 0)


def thd_change_stamp_and_pop(conn: Connection, user_id: int) -> tuple[int, bool]:
    """`thd_change_stamp`, and whether one of the user's POP3 accounts holds mail
    (`pop_mail`), in one statement."""
    [(stamp, pop)] = conn.execute(
        select(func.coalesce(func.sum(message_counts.c.changes), 0),
               case((pop_mail(), 1), else_=0))
        .where(message_counts.c.user_id == bindparam("user_id")), {"user_id": user_id}
    ).all()
    return int(stamp or 0), bool(pop)


class StampedCache(Generic[V]):
    """Values each kept with the user's change stamp (`thd_change_stamp`) and good while it
    stands: a store, delete or move of one of the user's messages (on any node: the stamp
    is in the database) makes them stale. A lock guards it (the store's pool threads use
    it); the least recently used entry goes first."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, tuple[int, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, stamp: int) -> V | None:
        """The value kept for `key` at `stamp`, else None."""
        with self._lock:
            found = self._items.get(key)
            if found is None or found[0] != stamp:
                return None
            self._items.move_to_end(key)
            return found[1]

    def peek(self, key: Hashable) -> tuple[int, V] | None:
        """The stamp and value kept for `key`, whatever the stamp (the caller asks the
        store whether that stamp still stands)."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: Hashable, stamp: int, value: V) -> None:
        with self._lock:
            self._items[key] = (stamp, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class CountCache(StampedCache[int]):
    """Counts of list queries the kept counts cannot answer (a search, a date range): the
    pages of one search share one count."""

"""Threads, JWZ-style: a message joins the conversation of the messages it references or that
reference it (References and In-Reply-To), with a subject fallback for replies that carry no
references. Runs inside the transaction that stores the messages, so a thread is never seen
half-built.

A batch is threaded before its rows are written: what the store already holds is read in a
few set-wise queries, the batch's own messages are threaded in order against that and each
other in memory, and every message row is then inserted with its final thread. The outcome is
the one storing the messages one at a time in batch order would give.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Select, bindparam, delete, exists, select, update

from mailcore.messages.parse import ParsedMessage, indexed_text, subject_key
from mailcore.messages.sql import allocate_ids, insert_rows
from mailcore.store.chunks import key_chunks
from mailcore.store.schema import message_refs, messages, threads

_PROVISIONAL = 1 << 62
# threads.subject_key holds at most this much (and at most MAX_INDEXED_BYTES of UTF-8,
# `indexed_text`); a longer key is stored cut and never matches.
_KEY_CHARS = 2000

# Built once; values are bound parameters (see the note in mailcore.messages.store).
_THREADS_BY_MESSAGE_ID = (
    select(messages.c.message_id, messages.c.thread_id)
    .where(messages.c.user_id == bindparam("u"))
    .where(messages.c.message_id.in_(bindparam("ids", expanding=True)))
    .where(messages.c.thread_id.is_not(None))
    .distinct()
)
_THREADS_BY_CHILD_REF = (
    select(message_refs.c.ref, messages.c.thread_id)
    .select_from(message_refs.join(messages, messages.c.id == message_refs.c.message_row_id))
    .where(message_refs.c.user_id == bindparam("u"))
    .where(message_refs.c.ref.in_(bindparam("ids", expanding=True)))
    .where(messages.c.thread_id.is_not(None))
    .distinct()
)
_NEWEST_BY_SUBJECT = (
    select(threads.c.id)
    .where(threads.c.user_id == bindparam("u"))
    .where(threads.c.subject_key == bindparam("k"))
    .order_by(threads.c.id.desc())
    .limit(1)
)


def _stored_key(key: str) -> str:
    """What threads.subject_key holds of a subject key."""
    return indexed_text(key[:_KEY_CHARS])


def _pairs(conn: Connection, statement: Select[Any], user_id: int,
           keys: Iterable[str]) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for chunk in key_chunks(keys):
        for key, thread_id in conn.execute(statement, {"u": user_id, "ids": chunk}):
            found.setdefault(key, set()).add(int(thread_id))
    return found


class _Threads:
    """The batch's view of the user's threads: merges recorded as aliases, new threads
    held until they are written."""

    def __init__(self, conn: Connection, user_id: int, now: datetime.datetime) -> None:
        self.conn = conn
        self.user_id = user_id
        self.now = now
        self.alias: dict[int, int] = {}
        # The batch's new threads, by provisional id (above every stored id, in order of
        # creation, so "oldest" and "newest" compare as for stored ones) -> subject key.
        self.new: dict[int, str] = {}
        self.new_by_key: dict[str, list[int]] = {}
        self.stored_by_key: dict[str, int | None] = {}
        self.written: dict[int, int] = {}  # provisional id -> id it was written with
        self._provisional = itertools.count(_PROVISIONAL)

    def resolve(self, thread_id: int) -> int:
        while thread_id in self.alias:
            thread_id = self.alias[thread_id]
        return thread_id

    def newest_with_subject(self, key: str) -> int | None:
        """The newest live thread with this subject key (the batch's own are newest)."""
        mine = self.new_by_key.get(key)
        while mine:
            if mine[-1] in self.new:
                return mine[-1]
            mine.pop()
        if key not in self.stored_by_key or (
            self.stored_by_key[key] is not None and self.stored_by_key[key] in self.alias
        ):
            self.stored_by_key[key] = self.conn.execute(
                _NEWEST_BY_SUBJECT, {"u": self.user_id, "k": key}
            ).scalar()
        return self.stored_by_key[key]

    def create(self, key: str) -> int:
        """A new thread with this subject key; its provisional id."""
        thread_id = next(self._provisional)
        self.new[thread_id] = key
        if _stored_key(key) == key:
            self.new_by_key.setdefault(key, []).append(thread_id)
        return thread_id

    def merge(self, target: int, others: Sequence[int]) -> None:
        """Fold `others` into `target`: stored rows move now, the batch's at insert."""
        stored = [t for t in others if t not in self.new]
        for t in others:
            self.alias[t] = target
            self.new.pop(t, None)
        if stored:
            self.conn.execute(
                update(messages).where(messages.c.thread_id.in_(stored)).values(thread_id=target)
            )
            self.conn.execute(delete(threads).where(threads.c.id.in_(stored)))

    def write_new(self) -> None:
        """Insert the new threads still alive, with ids allocated now."""
        if not self.new:
            return
        ids = allocate_ids(self.conn, threads, len(self.new))
        self.written = dict(zip(self.new, ids, strict=True))
        insert_rows(self.conn, threads, [
            {"id": self.written[t], "user_id": self.user_id, "subject_key": _stored_key(key),
             "created_at": self.now}
            for t, key in self.new.items()
        ])

    def final(self, thread_id: int) -> int:
        """The id a thread has once the batch is written."""
        thread_id = self.resolve(thread_id)
        return self.written.get(thread_id, thread_id)


def thd_assign_threads(
    conn: Connection, user_id: int, batch: Sequence[ParsedMessage], now: datetime.datetime,
    refs_of: Sequence[list[str]] | None = None,
) -> list[int]:
    """The thread of each message of `batch` (in order), whose rows are not written yet.
    New threads are written and threads a message links are merged (into the oldest); the
    caller inserts each message row with the thread returned for it. `refs_of`: each
    message's `thread_refs`, when the caller has them already."""
    if not batch:
        return []
    if refs_of is None:
        refs_of = [p.thread_refs for p in batch]
    own_ids = {p.message_id for p in batch if p.message_id}
    by_message_id = _pairs(conn, _THREADS_BY_MESSAGE_ID, user_id,
                           own_ids.union(*refs_of))
    by_child_ref = _pairs(conn, _THREADS_BY_CHILD_REF, user_id, own_ids)
    view = _Threads(conn, user_id, now)
    assigned: list[int] = []
    for parsed, refs in zip(batch, refs_of, strict=True):
        found: set[int] = set()
        for ref in refs:
            found.update(by_message_id.get(ref, ()))
        if parsed.message_id:
            # Copies of this message in other folders, and children that arrived first.
            found.update(by_message_id.get(parsed.message_id, ()))
            found.update(by_child_ref.get(parsed.message_id, ()))
        found = {view.resolve(t) for t in found}
        key, is_reply = subject_key(parsed.subject)
        if not found and key and is_reply:
            # A reply whose references match nothing we hold: the newest thread with its subject.
            match = view.newest_with_subject(key)
            if match is not None:
                found.add(match)
        if found:
            target = min(found)
            others = sorted(found - {target})
            if others:
                view.merge(target, others)
        else:
            target = view.create(key)
        assigned.append(target)
        if parsed.message_id:
            by_message_id.setdefault(parsed.message_id, set()).add(target)
        for ref in refs:
            by_child_ref.setdefault(ref, set()).add(target)
    view.write_new()
    return [view.final(t) for t in assigned]


# The threads among :ids of user :u that no message points at any more.
_EMPTY_THREADS = delete(threads).where(
    threads.c.user_id == bindparam("u"),
    threads.c.id.in_(bindparam("ids", expanding=True)),
    ~exists().where(messages.c.thread_id == threads.c.id),
)


def thd_drop_threads_if_empty(conn: Connection, user_id: int, thread_ids: Iterable[int]
                              ) -> None:
    """Delete those of the user's threads `thread_ids` that no message points at any more
    (after messages of theirs went): one index probe each, whatever the store holds."""
    for chunk in key_chunks(thread_ids):
        conn.execute(_EMPTY_THREADS, {"u": user_id, "ids": chunk})


def thd_drop_empty_threads(conn: Connection, user_id: int) -> None:
    """Delete the user's threads that no message points at any more."""
    conn.execute(
        delete(threads)
        .where(threads.c.user_id == user_id)
        .where(~threads.c.id.in_(select(messages.c.thread_id).where(
            messages.c.thread_id.is_not(None)
        )))
    )

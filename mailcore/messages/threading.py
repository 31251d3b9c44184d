"""Threads, JWZ-style: a message joins the conversation of the messages it references or that
reference it (References and In-Reply-To), with a subject fallback for replies that carry no
references. Runs inside the transaction that stores the message, so a thread is never seen
half-built.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from mailcore.messages.parse import ParsedMessage, subject_key
from mailcore.messages.sql import new_id
from mailcore.store.schema import message_refs, messages, threads

_CHUNK = 500

# Built once; values are bound parameters (see the note in mailcore.messages.store).
_BY_MESSAGE_ID = (
    select(messages.c.thread_id)
    .where(messages.c.user_id == bindparam("u"))
    .where(messages.c.message_id == bindparam("m"))
    .where(messages.c.id != bindparam("row"))
    .where(messages.c.thread_id.is_not(None))
    .distinct()
)
_BY_CHILD_REF = (
    select(messages.c.thread_id)
    .select_from(message_refs.join(messages, messages.c.id == message_refs.c.message_row_id))
    .where(message_refs.c.user_id == bindparam("u"))
    .where(message_refs.c.ref == bindparam("m"))
    .where(messages.c.thread_id.is_not(None))
    .distinct()
)
_BY_REFS = (
    select(messages.c.thread_id)
    .where(messages.c.user_id == bindparam("u"))
    .where(messages.c.message_id.in_(bindparam("refs", expanding=True)))
    .where(messages.c.thread_id.is_not(None))
    .distinct()
)
_SET_THREAD = update(messages).where(messages.c.id == bindparam("row")).values(
    thread_id=bindparam("t")
)


def thd_assign_thread(
    conn: Connection, user_id: int, row_id: int, parsed: ParsedMessage, now: datetime.datetime
) -> int:
    """Put message row `row_id` into a thread (merging threads it links); returns the thread id."""
    found: set[int] = set()
    refs = parsed.thread_refs
    for i in range(0, len(refs), _CHUNK):
        found.update(
            conn.execute(_BY_REFS, {"u": user_id, "refs": refs[i : i + _CHUNK]}).scalars()
        )
    if parsed.message_id:
        # Copies of this message in other folders, and children that arrived first.
        params = {"u": user_id, "m": parsed.message_id, "row": row_id}
        found.update(conn.execute(_BY_MESSAGE_ID, params).scalars())
        found.update(conn.execute(_BY_CHILD_REF, params).scalars())
    key, is_reply = subject_key(parsed.subject)
    if not found and key and is_reply:
        # A reply whose references match nothing we hold: the newest thread with its subject.
        match = conn.execute(
            select(threads.c.id)
            .where(threads.c.user_id == user_id)
            .where(threads.c.subject_key == key)
            .order_by(threads.c.id.desc())
            .limit(1)
        ).scalar()
        if match is not None:
            found.add(match)
    if found:
        target = min(found)
        others = sorted(found - {target})
        if others:
            conn.execute(
                update(messages).where(messages.c.thread_id.in_(others)).values(thread_id=target)
            )
            conn.execute(delete(threads).where(threads.c.id.in_(others)))
    else:
        target = new_id(conn.execute(
            insert(threads).values(user_id=user_id, subject_key=key[:2000], created_at=now)
        ))
    conn.execute(_SET_THREAD, {"row": row_id, "t": target})
    return int(target)


def thd_drop_empty_threads(conn: Connection, user_id: int) -> None:
    """Delete the user's threads that no message points at any more."""
    conn.execute(
        delete(threads)
        .where(threads.c.user_id == user_id)
        .where(~threads.c.id.in_(select(messages.c.thread_id).where(
            messages.c.thread_id.is_not(None)
        )))
    )

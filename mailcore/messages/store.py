"""The message store service: storing fetched messages and answering every read the APIs need.

Raw bytes are kept byte-exact, once per SHA-256, in `message_blobs`; each copy of a message
in a folder is a `messages` row carrying the parsed fields, its (folder, uidvalidity, uid) or
(folder, uidl), its thread and its full-text entry, all written in one transaction per batch.
A batch stored twice changes nothing: a rerun after a crash gives exactly the source set.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    Select,
    bindparam,
    case,
    column,
    delete,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.sql.elements import ColumnElement
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mailcore.messages.counts import (
    CountCache,
    pop_mail,
    thd_change_stamp,
    thd_change_stamp_and_pop,
    thd_folder_totals,
    thd_message_total,
    thd_thread_total,
    thd_total_stamp_and_pop,
    thd_visible_folder_totals,
    total_and_stamp_select,
)
from mailcore.messages.keyset import PageMarks
from mailcore.messages.models import (
    AccountUsage,
    AttachmentSummary,
    FetchedMessage,
    FolderInfo,
    Location,
    MessageDetail,
    MessageQuery,
    MessageSummary,
    Page,
    Statistics,
    StoreResult,
)
from mailcore.messages.parse import (
    MimeLimits,
    ParsedMessage,
    extract_part,
    parse_message,
    search_extra,
)
from mailcore.messages.rendered import email_array
from mailcore.messages.search import (
    PG_MATCH_COUNT,
    match_clause,
    pg_match_ids,
    pg_tsquery,
    thd_index_messages,
)
from mailcore.messages.sql import allocate_ids, insert_rows, utc
from mailcore.messages.threading import (
    thd_assign_threads,
    thd_drop_empty_threads,
    thd_drop_threads_if_empty,
)
from mailcore.store import Database
from mailcore.store.chunks import KEY_CHUNK, found_keys, key_chunks, rows_for
from mailcore.store.engine import ilike, like_pattern
from mailcore.store.prepared import Prepared
from mailcore.store.schema import (
    fetch_accounts,
    fetch_folders,
    message_attachments,
    message_blobs,
    message_pop_sizes,
    message_refs,
    messages,
    threads,
)
from mailcore.store.schema.messages import message_counts
from mailcore.store.schema.types import UTCDateTime, sqlite_time
from mailcore.workers import CpuPool

_ORDER_COLUMNS = {
    "id": messages.c.id,
    "date": messages.c.date,
    "subject": messages.c.subject,
    "sender": messages.c.sender,
    "from": messages.c.sender,
    "recipient": messages.c.recipient,
    "to": messages.c.recipient,
    "folder": messages.c.folder,
    "size": messages.c.size,
    "created_at": messages.c.created_at,
    "updated_at": messages.c.updated_at,
    "message_id": messages.c.message_id,
    "has_attachments": messages.c.has_attachments,
}
# The field names a MessageQuery's `ordering` may name (each with "-" for descending).
ORDER_FIELDS: frozenset[str] = frozenset(_ORDER_COLUMNS)

_SUMMARY_COLUMNS = (
    messages.c.id, messages.c.user_id, messages.c.account_id, messages.c.folder_id,
    messages.c.folder, messages.c.message_id, messages.c.subject, messages.c.sender,
    messages.c.sender_address, messages.c.recipient, messages.c.date, messages.c.size,
    messages.c.has_attachments, messages.c.flags, messages.c.thread_id, messages.c.created_at,
    messages.c.updated_at,
)
_SUMMARY_WIDTH = len(_SUMMARY_COLUMNS)
_THREAD_ID_AT = 14
assert _SUMMARY_COLUMNS[_THREAD_ID_AT] is messages.c.thread_id
_DATE_AT = 10
assert _SUMMARY_COLUMNS[_DATE_AT] is messages.c.date
# A page of the list: the summaries and each one's thread size (a primary-key probe a row).
_PAGE_COLUMNS = (*_SUMMARY_COLUMNS, threads.c.message_count)
# SQLite reads a plain list's page as JSON (_in_one_row), which holds no BLOB and writes a
# REAL with 15 significant digits: a page column of either kind would need another way.
assert not any(isinstance(c.type, Float | Numeric | LargeBinary) for c in _PAGE_COLUMNS)
# Where a page's times are (date, created_at, updated_at): ISO text in that JSON.
_TIMES_AT = tuple(i for i, c in enumerate(_PAGE_COLUMNS) if isinstance(c.type, UTCDateTime))
_PAGE_FROM = messages.outerjoin(threads, threads.c.id == messages.c.thread_id)


# Namespace of the per-user PostgreSQL advisory lock taken while storing messages.
_THREAD_LOCK = 0x6D61696C << 32


class MessageNotFound(Exception):
    """No such message (or attachment) for this user."""


class QueryError(ValueError):
    """A list query asks for something we cannot do; `field` names the parameter."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


# -- writing -----------------------------------------------------------------------------


# Statements of the hot path, built once: values come as bound parameters, so SQLAlchemy
# compiles each statement once. A batch is written set-wise: one query per kind of lookup
# and one multi-row INSERT per table, whatever its number of messages.
_HELD_UIDS = select(messages.c.uid).where(
    messages.c.folder_id == bindparam("f"),
    messages.c.uidvalidity == bindparam("v"),
    messages.c.uid.in_(bindparam("keys", expanding=True)),
)
_HELD_UIDLS = select(
    messages.c.pop_uidl, messages.c.id, messages.c.sha256, message_pop_sizes.c.size,
).select_from(messages.outerjoin(
    message_pop_sizes, message_pop_sizes.c.message_row_id == messages.c.id,
)).where(
    messages.c.folder_id == bindparam("f"),
    messages.c.pop_uidl.in_(bindparam("keys", expanding=True)),
)
_HELD_BLOBS = select(message_blobs.c.sha256).where(
    message_blobs.c.sha256.in_(bindparam("keys", expanding=True))
)
# Our copies in a folder that no UID of the server stands for, of these bytes: expunged
# there, or fetched by POP3 before the account turned to IMAP.
_GONE_COPIES = select(messages.c.id, messages.c.sha256).where(
    messages.c.folder_id == bindparam("f"),
    or_(messages.c.on_server.is_(False), messages.c.uid.is_(None)),
    messages.c.sha256.in_(bindparam("keys", expanding=True)),
)
# Our copies in a folder that no UIDL stands for, of these bytes: fetched by IMAP before
# the account turned to POP3.
_UNLISTED_COPIES = select(messages.c.id, messages.c.sha256).where(
    messages.c.folder_id == bindparam("f"),
    messages.c.pop_uidl.is_(None),
    messages.c.sha256.in_(bindparam("keys", expanding=True)),
)


def _copy_key(item: FetchedMessage) -> tuple[str, Any] | None:
    if item.uid is not None:
        return ("uid", item.uid)
    if item.uidl is not None:
        return ("uidl", item.uidl)
    return None


def _held_copies(
    conn: Connection, where: Location, items: Sequence[tuple[FetchedMessage, ParsedMessage]]
) -> tuple[set[tuple[str, Any]], dict[str, tuple[int, str]]]:
    """The (folder, uidvalidity, uid) and (folder, uidl) of the batch we hold already; and
    by UIDL, the (row id, SHA-256) of the copies held under a UIDL that LIST now gives
    another size (`FetchedMessage.listed_size`): the server may have given it to another
    message."""
    if where.folder_id is None:
        return set(), {}
    uids = [i.uid for i, _ in items if i.uid is not None]
    listed = {i.uidl: i.listed_size for i, _ in items if i.uid is None and i.uidl is not None}
    held: set[tuple[str, Any]] = set()
    reused: dict[str, tuple[int, str]] = {}
    if uids:
        params = {"f": where.folder_id, "v": where.uidvalidity}
        held.update(("uid", u) for u in found_keys(conn, _HELD_UIDS, params, uids))
    for uidl, row_id, sha256, size in rows_for(conn, _HELD_UIDLS, {"f": where.folder_id},
                                               listed):
        if pop_size_changed(size, listed[uidl]):
            reused[uidl] = (int(row_id), sha256)
        else:
            held.add(("uidl", uidl))
    return held, reused


def pop_size_changed(held: int | None, listed: int | None) -> bool:
    """Whether a UIDL we hold with the LIST size `held` names another message now that LIST
    gives it `listed`; not when either is unknown (fetched before sizes were kept, or LIST
    left it out)."""
    return held is not None and listed is not None and held != listed


def thd_set_pop_sizes(conn: Connection, sizes: dict[int, int]) -> None:
    """The LIST size of each copy fetched by POP3 (message row id -> size)."""
    if not sizes:
        return
    for chunk in key_chunks(sizes):
        conn.execute(delete(message_pop_sizes)
                     .where(message_pop_sizes.c.message_row_id.in_(chunk)))
    insert_rows(conn, message_pop_sizes, [{"message_row_id": row_id, "size": size}
                                          for row_id, size in sizes.items()])


def _gone_copies(conn: Connection, where: Location, hashes: Sequence[str],
                 query: Any = _GONE_COPIES) -> dict[str, list[int]]:
    """Our copies of these bytes in this folder marked no longer on the server (or held
    under no UID: fetched by POP3), oldest first, by SHA-256: a message put back (a restore
    appends what was expunged) is the same message again under a new UID, not a second
    copy to back up (and to migrate); so is one an account that turned from POP3 to IMAP
    sees under its UID. With `_UNLISTED_COPIES`: the copies held under no UIDL, which an
    account that turned from IMAP to POP3 lists under their UIDLs."""
    found: dict[str, list[int]] = {}
    for row_id, sha256 in rows_for(conn, query, {"f": where.folder_id}, hashes):
        found.setdefault(sha256, []).append(int(row_id))
    for ids in found.values():
        ids.sort(reverse=True)  # popped from the end: the oldest first
    return found


def _relink_candidate(
    conn: Connection, where: Location, sha256: str
) -> int | None:
    """After a UIDVALIDITY change: our copy of these bytes in this folder under an old
    UIDVALIDITY, not yet matched to a new UID."""
    return conn.execute(
        select(messages.c.id)
        .where(messages.c.folder_id == where.folder_id)
        .where(messages.c.sha256 == sha256)
        .where(or_(messages.c.uidvalidity.is_(None),
                   messages.c.uidvalidity != where.uidvalidity))
        .order_by(messages.c.id)
        .limit(1)
    ).scalar()


def thd_put_blobs(conn: Connection, items: Sequence[tuple[bytes, str]],
                  now: datetime.datetime) -> None:
    """Store each (bytes, sha256) under its hash unless it is there already."""
    held = found_keys(conn, _HELD_BLOBS, {}, [h for _, h in items])
    new: dict[str, bytes] = {}
    for raw, sha256 in items:
        if sha256 not in held:
            new.setdefault(sha256, raw)
    insert_rows(conn, message_blobs, [
        {"sha256": h, "size": len(raw), "raw": raw, "created_at": now}
        for h, raw in new.items()
    ], skip_existing=True)


def _untaken(candidates: list[int], taken: set[int]) -> int | None:
    """The oldest of `candidates` (popped from the end) that no item of the batch has
    taken yet, or None; those passed over are dropped."""
    while candidates:
        old = candidates.pop()
        if old not in taken:
            return old
    return None


def thd_store_batch(
    conn: Connection,
    where: Location,
    items: Sequence[tuple[FetchedMessage, ParsedMessage]],
    now: datetime.datetime,
    rescan: bool = False,
) -> StoreResult:
    """Store fetched messages in one transaction; idempotent for (folder, uidvalidity, uid).
    A message under a new UID whose bytes the folder holds only in a copy marked no longer
    on the server, or held under no UID (fetched by POP3), is that copy again: it takes the
    UID (relinked, `_gone_copies`); a POP3 message under a new UIDL whose bytes the folder
    holds in a copy under no UIDL (fetched by IMAP) takes that copy's (the account turned
    from one protocol to the other). A POP3 message under a UIDL we hold whose LIST size
    changed (`pop_size_changed`) and whose bytes are not our copy's is another message: our
    copy gives the UIDL up (kept, no longer on the server) and the message is stored.
    The outcome (rows, threads, search entries) is the one of storing them one by one in
    order; the work is a few statements per batch."""
    if conn.dialect.name == "postgresql":
        # Threads of one user are built by one transaction at a time (SQLite serialises
        # writers anyway): two accounts syncing at once must not split a conversation.
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:k)"), {"k": _THREAD_LOCK + where.user_id}
        )
    held, reused = _held_copies(conn, where, items)
    sizes: dict[int, int] = {}  # the LIST sizes of copies taken or kept under a UIDL
    gone = _gone_copies(conn, where, [
        p.sha256 for i, p in items
        if i.uid is not None and ("uid", i.uid) not in held]) if where.folder_id else {}
    unlisted = _gone_copies(conn, where, [
        p.sha256 for i, p in items
        if i.uid is None and i.uidl is not None and ("uidl", i.uidl) not in held],
        _UNLISTED_COPIES) if where.folder_id else {}
    fresh: list[tuple[FetchedMessage, ParsedMessage]] = []
    relinked = already = 0
    taken: set[int] = set()
    for item, parsed in items:
        key = _copy_key(item) if where.folder_id is not None else None
        if key is not None:
            if key in held:
                already += 1
                continue
            held.add(key)  # the same UID twice in one batch is stored once
        replaced = reused.pop(item.uidl, None) if item.uid is None and item.uidl else None
        if replaced is not None:
            if replaced[1] == parsed.sha256:  # the same message, listed with another size
                if item.listed_size is not None:
                    sizes[replaced[0]] = item.listed_size
                already += 1
                continue
            # The server gave the UIDL of a message it deleted to this one: our copy of the
            # other stays, under no UIDL, as one no longer on the server.
            conn.execute(update(messages).where(messages.c.id == replaced[0]).values(
                pop_uidl=None, on_server=False, updated_at=now))
            conn.execute(delete(message_pop_sizes)
                         .where(message_pop_sizes.c.message_row_id == replaced[0]))
        old: int | None = None
        if rescan and item.uid is not None:
            old = _relink_candidate(conn, where, parsed.sha256)
        if old is None and item.uid is None and item.uidl is not None:
            old = _untaken(unlisted.get(parsed.sha256, []), taken)
            if old is not None:
                taken.add(old)
                conn.execute(update(messages).where(messages.c.id == old).values(
                    pop_uidl=item.uidl, on_server=True, updated_at=now))
                if item.listed_size is not None:
                    sizes[old] = item.listed_size
                relinked += 1
                continue
        if old is None and item.uid is not None:
            old = _untaken(gone.get(parsed.sha256, []), taken)
        if old is not None:
            taken.add(old)
            conn.execute(
                update(messages).where(messages.c.id == old).values(
                    uidvalidity=where.uidvalidity, uid=item.uid,
                    flags=" ".join(item.flags), on_server=True, updated_at=now,
                )
            )
            relinked += 1
            continue
        fresh.append((item, parsed))
    created = thd_insert_messages(conn, where, fresh, now)
    sizes.update((row_id, item.listed_size) for (row_id, _), (item, _) in zip(
        created, fresh, strict=True) if item.uidl is not None and item.listed_size is not None)
    thd_set_pop_sizes(conn, sizes)
    return StoreResult(
        created=[row_id for row_id, _ in created], relinked=relinked, already_stored=already,
        thread_ids=[thread_id for _, thread_id in created],
    )


def thd_insert_messages(
    conn: Connection,
    where: Location,
    items: Sequence[tuple[FetchedMessage, ParsedMessage]],
    now: datetime.datetime,
) -> list[tuple[int, int]]:
    """New message rows with their blobs, threads, references, attachments and search
    entries, one statement per table; (row id, thread id) of each, in order."""
    if not items:
        return []
    thd_put_blobs(conn, [(item.raw, parsed.sha256) for item, parsed in items], now)
    refs_of = [parsed.thread_refs for _, parsed in items]
    thread_ids = thd_assign_threads(conn, where.user_id, [p for _, p in items], now, refs_of)
    row_ids = allocate_ids(conn, messages, len(items))
    rows: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    attachments: list[dict[str, Any]] = []
    for (item, parsed), row_id, thread_id, thread_refs in zip(items, row_ids, thread_ids,
                                                               refs_of, strict=True):
        rows.append({
            "id": row_id,
            "user_id": where.user_id,
            "account_id": where.account_id,
            "folder_id": where.folder_id,
            "folder": where.folder,
            "uidvalidity": where.uidvalidity if item.uid is not None else None,
            "uid": item.uid,
            "pop_uidl": item.uidl,
            "sha256": parsed.sha256,
            "size": parsed.size,
            "flags": " ".join(item.flags),
            "internal_date": item.internal_date,
            "on_server": True,
            "message_id": parsed.message_id,
            "subject": parsed.subject,
            "sender": parsed.sender,
            "sender_address": parsed.sender_address,
            "recipient": parsed.recipient,
            "cc": parsed.cc,
            "date": parsed.date or item.internal_date or now,
            "body_text": parsed.body_text,
            "body_html": parsed.body_html,
            "headers": parsed.headers,
            "in_reply_to": parsed.in_reply_to,
            "references": " ".join(parsed.references),
            "has_attachments": parsed.has_attachments,
            "parse_problems": "\n".join(parsed.problems),
            "search_extra": search_extra(parsed),
            "thread_id": thread_id,
            "created_at": now,
            "updated_at": now,
        })
        refs.extend({"message_row_id": row_id, "user_id": where.user_id, "ref": r}
                    for r in thread_refs)
        attachments.extend(
            {
                "message_row_id": row_id,
                "part_path": a.part_path,
                "filename": a.filename,
                "mime_type": a.mime_type,
                "size": a.size,
                "content_id": a.content_id,
            }
            for a in parsed.attachments
        )
    insert_rows(conn, messages, rows)
    insert_rows(conn, message_refs, refs)
    insert_rows(conn, message_attachments, attachments)
    thd_index_messages(conn, where.user_id, [
        (row["id"], row["date"], parsed)
        for row, (_, parsed) in zip(rows, items, strict=True)])
    return list(zip(row_ids, thread_ids, strict=True))


# A chunk of an account's messages (in no order: the account's index finds the first ones).
_ACCOUNT_MESSAGES = (
    select(messages.c.id, messages.c.sha256, messages.c.thread_id)
    .where(messages.c.account_id == bindparam("account_id"))
    .limit(KEY_CHUNK)
)
# A chunk of a user's messages (its index on (user_id, date) finds them).
_USER_MESSAGES = (
    select(messages.c.id, messages.c.sha256, messages.c.thread_id)
    .where(messages.c.user_id == bindparam("user_id"))
    .limit(KEY_CHUNK)
)
# The blobs among :keys that no message points at any more.
_UNUSED_BLOBS = delete(message_blobs).where(
    message_blobs.c.sha256.in_(bindparam("keys", expanding=True)),
    ~exists().where(messages.c.sha256 == message_blobs.c.sha256),
)


def thd_delete_account_messages(conn: Connection, user_id: int, account_id: int) -> int:
    """Blocking: delete every message of a fetch account, with the blobs and threads only
    they used; how many messages went. It reads the account's rows, KEY_CHUNK at a time,
    and one index probe per blob and thread of theirs: never the whole store (which
    `thd_collect_garbage` reads, seconds of a write transaction on a large one)."""
    return _thd_delete_chunks(conn, user_id, _ACCOUNT_MESSAGES, {"account_id": account_id})


def thd_delete_user_messages(conn: Connection, user_id: int) -> int:
    """Blocking: delete every message of a user (in its accounts or outside any: local
    delivery, imports), with the blobs and threads only they used; how many went."""
    return _thd_delete_chunks(conn, user_id, _USER_MESSAGES, {"user_id": user_id})


def _thd_delete_chunks(conn: Connection, user_id: int, chunk: Any,
                       params: dict[str, int]) -> int:
    """Blocking: delete the messages `chunk` reads, KEY_CHUNK at a time, with the blobs
    and threads only they used; how many went."""
    total = 0
    while rows := conn.execute(chunk, params).all():
        conn.execute(delete(messages).where(messages.c.id.in_([r.id for r in rows])))
        conn.execute(_UNUSED_BLOBS, {"keys": sorted({r.sha256 for r in rows})})
        thd_drop_threads_if_empty(conn, user_id,
                                  {r.thread_id for r in rows if r.thread_id is not None})
        total += len(rows)
    return total


def thd_collect_garbage(conn: Connection) -> int:
    """Delete blobs no message points at; returns how many went."""
    result = conn.execute(
        delete(message_blobs).where(
            ~message_blobs.c.sha256.in_(select(messages.c.sha256).distinct())
        )
    )
    return int(result.rowcount or 0)


# -- reading -----------------------------------------------------------------------------


# How much of a blob one chunked read takes (`raw_chunks`).
RAW_CHUNK = 1024 * 1024


def thd_raw_slice(conn: Connection, sha256: str, offset: int, length: int) -> bytes | None:
    """Blocking: `length` bytes of a blob from byte `offset` (0-based), fewer at its end
    (b"" past it); None when there is no such blob. Only the slice leaves the database:
    substr() on SQLite (byte indices for a BLOB), substr()/substring() on PostgreSQL."""
    if offset < 0 or length <= 0:
        raise ValueError("a slice needs offset >= 0 and length > 0")
    piece = conn.execute(
        select(func.substr(message_blobs.c.raw, offset + 1, length, type_=LargeBinary))
        .where(message_blobs.c.sha256 == sha256)
    ).scalar()
    return None if piece is None else bytes(piece)


async def raw_chunks(db: Database, sha256: str, *,
                     chunk_size: int = RAW_CHUNK) -> AsyncGenerator[bytes]:
    """A blob's bytes, `chunk_size` at a time, each read in its own transaction on the
    store's thread pool (the next read runs while the caller uses the current chunk), so
    at most two chunks are held, never the whole message. Yields nothing when the blob is
    gone; a blob deleted halfway ends early (the caller checks the total)."""
    offset = 0
    pending: defer.Deferred[bytes | None] | None = db.read(
        "message_raw_slice", thd_raw_slice, sha256, 0, chunk_size)
    try:
        while pending is not None:
            piece = await pending
            pending = None
            if not piece:
                return
            offset += len(piece)
            if len(piece) == chunk_size:
                pending = db.read("message_raw_slice", thd_raw_slice, sha256, offset,
                                  chunk_size)
            yield piece
    finally:
        if pending is not None:  # abandoned halfway: the read ahead is not wanted
            pending.addErrback(lambda _f: None)


def _day_start(day: datetime.date) -> datetime.datetime:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)


def _day_after(day: datetime.date) -> datetime.datetime:
    """The start of the day after `day` (UTC): what an inclusive `date_to` bounds dates
    below. The calendar's last day (9999-12-31, a valid date_to) has none: its bound is the
    last moment a time holds."""
    if day == datetime.date.max:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    return _day_start(day + datetime.timedelta(days=1))


# The user's POP3 accounts that hold mail (see `thd_hidden_accounts`), compiled once: an
# IMAP2API list that is not a plain one runs it (the others read it only when `pop_mail`,
# asked in their first statement, finds such an account).
_POP_ACCOUNTS_WITH_MAIL = Prepared(
    select(fetch_accounts.c.id)
    .where(fetch_accounts.c.user_id == bindparam("user_id"),
           fetch_accounts.c.protocol != "imap")
    .where(exists().where(message_counts.c.user_id == bindparam("user_id"),
                          message_counts.c.account_key == fetch_accounts.c.id,
                          message_counts.c.total > 0))
    .order_by(fetch_accounts.c.id)
)


def thd_hidden_accounts(conn: Connection, user_id: int) -> tuple[int, ...]:
    """The user's POP3 accounts that hold mail, whose mail the IMAP2API leaves out
    (`MessageQuery.without_pop`): it lists only the IMAP accounts as its imap-servers, so
    an e-mail of a POP3 account would name in `imap_server` an id the same API answers
    404 for. Read by the user's accounts index and the kept counts' key; a user with no
    such account (nearly all) keeps every quick way of the reads. The reads that can ask
    `pop_mail` in a statement they run anyway (a plain list's count and stamp, an e-mail's
    or a thread's rows, the folder totals) read this only when it finds one."""
    return tuple(row[0] for row in _POP_ACCOUNTS_WITH_MAIL.rows(conn, {"user_id": user_id}))


def _visible(table: Any, hidden: Sequence[int]) -> ColumnElement[bool]:
    """Rows of `table` (`messages` or an alias of it) outside the `hidden` accounts."""
    return or_(table.c.account_id.is_(None), table.c.account_id.not_in(list(hidden)))


# The filters of a query, as WHERE terms with named parameters (`_filter_values` gives
# them): a list page's statement is then built once per shape of query and reused, its
# SQLAlchemy cache key memoised, instead of built and keyed anew on every request.
_FILTER_TERMS: dict[str, Callable[[Any], ColumnElement[bool]]] = {
    "folder": lambda c: c.folder == bindparam("folder"),
    "folder_id": lambda c: c.folder_id == bindparam("folder_id"),
    "account_id": lambda c: c.account_id == bindparam("account_id"),
    "date_from": lambda c: c.date >= bindparam("date_from", type_=c.date.type),
    "date_to": lambda c: c.date < bindparam("date_to", type_=c.date.type),
    "has_attachments": lambda c: c.has_attachments == bindparam("has_attachments"),
    "thread_id": lambda c: c.thread_id == bindparam("thread_id"),
}


def _filter_values(user_id: int, query: MessageQuery) -> dict[str, Any]:
    """The parameters of the query's filters (`user_id` and those it sets)."""
    values: dict[str, Any] = {"user_id": user_id}
    for name in ("folder", "folder_id", "account_id", "has_attachments", "thread_id"):
        value = getattr(query, name)
        if value is not None:
            values[name] = value
    if query.date_from is not None:
        values["date_from"] = _day_start(query.date_from)
    if query.date_to is not None:
        values["date_to"] = _day_after(query.date_to)
    return values


def _filter_shape(query: MessageQuery) -> tuple[str, ...]:
    """Which of `_FILTER_TERMS` the query sets."""
    return tuple(name for name in _FILTER_TERMS if getattr(query, name) is not None)


# `_FILTER_TERMS` as a search read through its matches writes them (see `_filters`,
# `by_match`): those an index could serve are written so that none does.
_MATCH_TERMS: dict[str, Callable[[Any], ColumnElement[bool]]] = {
    **_FILTER_TERMS,
    "account_id": lambda c: c.account_id + 0 == bindparam("account_id"),
    "folder_id": lambda c: c.folder_id + 0 == bindparam("folder_id"),
}


def _shape_terms(shape: tuple[str, ...], c: Any, by_match: bool = False
                 ) -> list[ColumnElement[bool]]:
    """The user's rows (see `_filters` for `by_match`) and the `_FILTER_TERMS` of `shape`.
    A thread's rows are found through the thread's index too: one thread is a handful of
    rows, the user's index (as good a way in to a planner without statistics) all of them.

    An account's rows are found through its own indexes ((account_id, date) and
    (account_id, folder, date), migration 0028) with the user's term left as it is: each of
    them is as narrow as the user's for SQLite, which then takes the account's, and a
    PostgreSQL generic plan prices it narrower. Writing the user's term "+ 0" there, as for
    a thread, would make PostgreSQL price it at 0.5 % of the rows and plan a generic page
    as a sequential scan and a sort."""
    user: Any = bindparam("user_id")
    by_other = by_match or "thread_id" in shape
    terms = _MATCH_TERMS if by_match else _FILTER_TERMS
    return [(c.user_id + 0 == user) if by_other else (c.user_id == user),
            *(terms[name](c) for name in shape)]


def _filters(
    dialect: str, user_id: int, query: MessageQuery, table: Any = messages,
    by_match: bool = False,
) -> list[ColumnElement[bool]]:
    """WHERE terms of the query's filters on `table` (`messages` or an alias of it); the
    statement runs with `_filter_values` as its parameters.

    `by_match`: the user's rows are found through another index (the full-text matches'
    row ids, or a thread's for `_first_of_thread`), not through one on user_id ("+ 0"
    keeps the database from walking the user's whole date index and probing each entry:
    SQLite has no statistics, and PostgreSQL, asked for the newest 50, takes that walk for
    a rare word too, some 50,000 rows deep over a million messages), nor through the
    account's or the folder's (a search of one account of 100,000 messages walked them
    all: 15 ms for a word in 200 of them, 150 ms for one in 2,000, against 1 and 5 ms
    through the matches)."""
    conds = _shape_terms(_filter_shape(query), table.c, by_match)
    if query.hidden_accounts:
        conds.append(_visible(table, query.hidden_accounts))
    if query.q:
        conds.append(match_clause(dialect, table.c.id, query.q))
    return conds


def _order_terms(ordering: str) -> list[tuple[str, bool]]:
    """(column name, descending) of each term of `ordering`, the row id last; a name we
    cannot order by is a QueryError. A column already ordered by is not ordered by again
    (a later term on it cannot change the order): the list holds each column once, so a
    client repeating a field thousands of times cannot pass the database's limit on ORDER
    BY terms (SQLite: 2000) and turn the request into a 500."""
    terms = [t.strip() for t in (ordering or "-date").split(",") if t.strip()]
    out = []
    seen: set[str] = set()
    for term in [*terms, "-id" if ordering.startswith("-") else "id"]:
        name = term.lstrip("-+")
        if name not in _ORDER_COLUMNS:
            raise QueryError(f"cannot order by {name!r}", "ordering")
        column = _ORDER_COLUMNS[name].key
        if column not in seen:
            seen.add(column)
            out.append((name, term.startswith("-")))
    return out


def _order_by(ordering: str, *, reverse: bool = False, of: Any = None) -> list[Any]:
    """ORDER BY terms of `ordering` with the row id last; `reverse` turns each one round.
    On `messages`' columns, or on those of `of` (a subquery of them) by the same keys."""
    terms = []
    for name, desc in _order_terms(ordering):
        col = _ORDER_COLUMNS[name] if of is None else of.c[_ORDER_COLUMNS[name].key]
        terms.append(col.desc() if desc != reverse else col.asc())
    return terms


def _summary(row: Any, thread_counts: dict[int, int]) -> MessageSummary:
    """The summary of a row that starts with `_SUMMARY_COLUMNS` (read by position: a page
    builds 50 to 100 of these per request)."""
    (row_id, user_id, account_id, folder_id, folder, message_id, subject, sender,
     sender_address, recipient, date, size, has_attachments, flags, thread_id, created_at,
     updated_at) = row[:_SUMMARY_WIDTH]
    return MessageSummary(
        row_id, user_id, account_id, folder_id, folder, message_id, subject, sender,
        sender_address, recipient,
        date if date is None or date.tzinfo else date.replace(tzinfo=datetime.UTC),
        size, bool(has_attachments), tuple(flags.split()), thread_id,
        thread_counts.get(thread_id, 1) if thread_id is not None else 1,
        created_at if created_at.tzinfo else created_at.replace(tzinfo=datetime.UTC),
        updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=datetime.UTC),
    )


_THREAD_SIZES = select(threads.c.id, threads.c.message_count).where(
    threads.c.id.in_(bindparam("ids", expanding=True))
)


def _thread_counts(conn: Connection, thread_ids: set[int]) -> dict[int, int]:
    """Messages per thread, as the triggers of migration 0020 keep them."""
    if not thread_ids:
        return {}
    rows = conn.execute(_THREAD_SIZES, {"ids": sorted(thread_ids)})
    return {tid: int(n) for tid, n in rows}


def _visible_thread_counts(conn: Connection, user_id: int, thread_ids: set[int],
                           hidden: Sequence[int]) -> dict[int, int]:
    """Messages per thread outside the `hidden` accounts (the kept counts count them all),
    counted through the threads' index."""
    if not thread_ids:
        return {}
    rows = conn.execute(
        select(messages.c.thread_id, func.count())
        .where(messages.c.thread_id.in_(sorted(thread_ids)),
               messages.c.user_id + 0 == user_id, _visible(messages, hidden))
        .group_by(messages.c.thread_id))
    return {tid: int(n) for tid, n in rows}


def _first_of_thread(
    dialect: str, user_id: int, query: MessageQuery
) -> ColumnElement[bool]:
    """`messages` is the first (oldest by date, then id: the order of a thread's own
    listing) of its thread among the rows matching the query's filters: no older matching
    message shares its thread. Seed 001 shows a thread by its first e-mail (its thread list
    and its thread-123 example: id 1 at 12:00, whose reply id 2 came at 12:30). The
    thread's messages are read through (thread_id, date), so a page walks only as many rows
    as it shows."""
    other = messages.alias("older")
    # The thread's index is the way in (`by_match`): without statistics SQLite may weigh
    # (user_id, date) the same and walk every message of the user for each row of a page.
    same = [c for c in _filters(dialect, user_id, query, table=other, by_match=True)]
    oldest = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC)
    mine = func.coalesce(messages.c.date, oldest)
    theirs = func.coalesce(other.c.date, oldest)
    older = (
        select(literal(1))
        .select_from(other)
        .where(other.c.thread_id == messages.c.thread_id, *same)
        .where(or_(theirs < mine, (theirs == mine) & (other.c.id < messages.c.id)))
    )
    return or_(messages.c.thread_id.is_(None), ~older.exists())


def _counted(query: MessageQuery) -> bool:
    """Whether the kept counts answer the query's count (only user, account and folder)."""
    return (query.q is None and query.folder_id is None and query.date_from is None
            and query.date_to is None and query.has_attachments is None
            and query.thread_id is None)


def _total(conn: Connection, user_id: int, query: MessageQuery,
           count_rows: Callable[[], int], cache: CountCache | None,
           stamp: int | None) -> int:
    """The count of the query: from the kept counts, else from `cache` while the user's
    change `stamp` stands (None: the query's rows can change without it), else counted."""
    hidden = query.hidden_accounts
    if _counted(query):
        if not query.threads_only:
            return thd_message_total(conn, user_id, query.account_id, query.folder, hidden)
        if query.folder is None:
            total = thd_thread_total(conn, user_id, query.account_id, hidden)
            if total is not None:
                return total
    if cache is None or stamp is None:
        return count_rows()
    key = (user_id, query.q, query.folder, query.account_id, query.date_from,
           query.date_to, query.has_attachments, query.threads_only) + \
        ((hidden,) if hidden else ())
    cached = cache.get(key, stamp)
    if cached is not None:
        return cached
    count = count_rows()
    cache.put(key, stamp, count)
    return count


def _stamped(query: MessageQuery) -> bool:
    """Whether the query's rows change only with the user's change stamp (its filters are
    on columns whose changes move it). `has_attachments` is one: it is written with the
    row and never changed (a later change of it must move the stamp), so its lists change
    only by stores and deletes. Without it in here a list of the messages with (or
    without) attachments was counted on every request: 0.1 s per 100,000 messages."""
    return query.folder_id is None and query.thread_id is None


def _walk_the_date_index(conn: Connection, user_id: int, hits: int, depth: int) -> bool:
    """Whether a search page is cheaper read along the user's date index, testing each
    entry against the matches (about depth x messages / hits entries), than by fetching
    every match and sorting them (a row lookup costs about four index steps)."""
    total = thd_message_total(conn, user_id)
    return depth * total < 4 * hits * hits


def _keyset_filters(query: MessageQuery) -> bool:
    """Whether every filter of the query is on a column whose changes move the stamp."""
    return not query.threads_only and _stamped(query)


def thd_list_messages(
    conn: Connection, user_id: int, query: MessageQuery, cache: CountCache | None = None,
    marks: PageMarks | None = None, unless: int | None = None, as_json: bool = False,
) -> Page[MessageSummary]:
    """One page of the user's messages matching `query`, and the total count.

    With `as_json`, a plain list page comes back as `Page.json` (the messages as
    `email_json` shows them, written by the database: `mailcore.messages.rendered`), its
    items left empty; any other page as usual.

    When the query's rows change only with the user's change stamp, the page carries the
    stamp it was read at; `unless` is the stamp of a page the caller keeps for this query:
    while it stands, nothing is read and the page says `unchanged`.

    The count comes from the kept counts when the filters allow, else from `cache`. A page
    starts from the nearest row `marks` remembers before it (keyset) when that is closer
    than either end; else a page past the middle is read from the other end (every order
    term reversed, the rows turned back), so the deepest page walks as few index entries
    as the first one. A plain list counted from the kept counts reads its count and stamp
    in the statement that reads its rows (on SQLite when written as JSON): a first page
    always, a later one when it can be planned from the stamp and count the list was last
    read at, which the statement then finds unchanged (else the page is read again).
    """
    if query.without_pop:
        query = dataclasses.replace(query, without_pop=False)
        if _asks_pop_first(query, cache, marks, unless):
            # Its first statement (count and stamp, or the stamp) tells whether a POP3
            # account holds mail: no round trip more for a user with none (nearly all).
            try:
                return _thd_list_messages(conn, user_id, query, cache, marks, unless,
                                          as_json, check_pop=True)
            except _PopMail:
                pass
        query = dataclasses.replace(query, hidden_accounts=thd_hidden_accounts(conn, user_id))
    if not query.hidden_accounts:
        return _thd_list_messages(conn, user_id, query, cache, marks, unless, as_json)
    # An account's protocol changes without the change stamp (a Dropmyemail PUT): a page
    # kept with it would show what is hidden now, or hide what is not. The counts and the
    # marks are kept by the set of hidden accounts too (`_total`, `marks_key`).
    page = _thd_list_messages(conn, user_id, query, cache, marks, None, False)
    return dataclasses.replace(page, stamp=None)


class _PopMail(Exception):
    """`_thd_list_messages(check_pop=True)`: one of the user's POP3 accounts holds mail,
    found by the list's first statement (nothing else read): read its hidden accounts."""


def _asks_pop_first(query: MessageQuery, cache: CountCache | None, marks: PageMarks | None,
                    unless: int | None) -> bool:
    """Whether the first statement `_thd_list_messages` runs for a query without hidden
    accounts reads the user's change stamp, so can ask `pop_mail` too: a list counted from
    the kept counts (`thd_total_stamp_and_pop`, `_page_with_total`: keyset ones, so
    stamped) or one whose rows change only with the stamp (`thd_change_stamp_and_pop`),
    which every list of the store's is (it keeps counts)."""
    return _reads_stamp(query, cache, _keyset(query, marks), unless)


def _keyset(query: MessageQuery, marks: PageMarks | None) -> bool:
    """Whether the list's pages are planned from `marks` (`_plan`): in date order, by
    filters whose changes move the stamp."""
    return marks is not None and query.ordering.strip() in ("-date", "date") \
        and _keyset_filters(query)


def _reads_stamp(query: MessageQuery, cache: CountCache | None, keyset: bool,
                 unless: int | None) -> bool:
    """Whether the list reads the user's change stamp (its rows change only with it, and
    its count is kept, its pages planned or its reply spared by it)."""
    return _stamped(query) and (cache is not None or keyset or unless is not None)


def _thd_list_messages(
    conn: Connection, user_id: int, query: MessageQuery, cache: CountCache | None,
    marks: PageMarks | None, unless: int | None, as_json: bool, check_pop: bool = False,
) -> Page[MessageSummary]:
    """`thd_list_messages` once its hidden accounts are read; with `check_pop` (none read,
    `_asks_pop_first`) its first statement asks whether there are any (`pop_mail`), and
    _PopMail is raised if so."""
    dialect = conn.dialect.name
    by_match = bool(query.q)
    values = _filter_values(user_id, query)
    ordering = query.ordering.strip()
    # A plain list (no words, no thread grouping, no hidden accounts) reads through
    # statements built once per shape of query; the others are built for the request.
    shape = None if query.q or query.threads_only or query.hidden_accounts \
        else _filter_shape(query)

    def where(by_match: bool) -> list[ColumnElement[bool]]:
        conds = _filters(dialect, user_id, query, by_match=by_match)
        if query.threads_only:
            conds.append(_first_of_thread(dialect, user_id, query))
        return conds

    # PostgreSQL: a search with no other filter, in date order, picks and counts its
    # matches in the full-text table alone (migration 0024).
    tsq = pg_tsquery(query.q) if dialect == "postgresql" and query.q \
        and not query.threads_only and ordering in ("-date", "date") \
        and not _filter_shape(query) and not query.hidden_accounts else None
    if tsq is not None:
        values["tsq"] = tsq

    def count_rows() -> int:
        statement: Any = PG_MATCH_COUNT if tsq is not None else \
            select(func.count()).select_from(messages).where(*where(by_match))
        return int(conn.execute(statement, values).scalar() or 0)

    keyset = _keyset(query, marks)
    stamp: int | None = None
    marks_key: tuple[Any, ...] | None = None
    if keyset:
        marks_key = (user_id, query.q, query.folder, query.account_id, query.date_from,
                     query.date_to, query.has_attachments, ordering) + \
            ((query.hidden_accounts,) if query.hidden_accounts else ())
    offset, limit = max(query.offset, 0), max(query.limit, 0)
    # (thd_total_stamp_and_pop counts the hidden accounts' messages: `_total` does not.)
    counted = keyset and _counted(query) and not query.hidden_accounts
    if counted and shape is not None and unless is None and limit > 0 \
            and (dialect == "postgresql" or as_json):
        # The count, the stamp and the rows in one statement (PostgreSQL: one round trip
        # to the server instead of two; SQLite, written as JSON: one hand-over of Python's
        # lock instead of two); else the page is read as below.
        assert marks is not None and marks_key is not None  # (a counted list is keyset)
        page = _page_with_known_total(conn, dialect, shape, ordering, values, offset, limit,
                                      marks, marks_key, as_json, check_pop)
        if page is not None:
            return page
    if counted:
        count, stamp, pop = thd_total_stamp_and_pop(conn, user_id, query.account_id,
                                                    query.folder, check_pop)
        if pop:
            raise _PopMail()
        if stamp == unless:
            return Page(count=count, items=[], stamp=stamp, unchanged=True)
    else:
        reads_stamp = _reads_stamp(query, cache, keyset, unless)
        assert reads_stamp or not check_pop  # (`_asks_pop_first`)
        if reads_stamp:
            # (before the rows: a later change misses)
            stamp, pop = thd_change_stamp_and_pop(conn, user_id) if check_pop \
                else (thd_change_stamp(conn, user_id), False)
            if pop:
                raise _PopMail()
            if stamp == unless:
                return Page(count=0, items=[], stamp=stamp, unchanged=True)
        count = _total(conn, user_id, query, count_rows, cache, stamp)
    if limit == 0 or offset >= count:
        return Page(count=count, items=[], stamp=stamp)
    if by_match and _walk_the_date_index(conn, user_id, count, offset + limit):
        by_match = False
    skip, n, reverse, from_mark = _plan(values, marks, marks_key, stamp, count, offset, limit)
    window = _window(dialect, skip, n, limit)
    if shape is not None and as_json:
        # A plain list as the reply's JSON array (see mailcore.messages.rendered); what it
        # cannot hold is read as rows below.
        found = _plain_json_page(dialect, shape, ordering, reverse, from_mark, window).rows(
            conn, {**values, "skip": skip, "n": n})
        page = _json_page(dialect, found[0] if found else None, count, stamp, offset,
                          marks, marks_key)
        if page is not None:
            return page
    # SQLite, a plain list: the page's rows in one row (see _in_one_row). Built once per
    # shape of query; wrapping a search's statement, built for each request, would cost
    # more (a millisecond) than it saves.
    one_row = dialect == "sqlite" and shape is not None
    statement: Select[Any] | Prepared
    if shape is not None:
        statement = _plain_page(shape, ordering, reverse, from_mark, one_row, window)
    elif tsq is not None and by_match:
        statement = _search_page(ordering, reverse, from_mark)
    else:
        statement = _page(where(by_match), ordering, reverse, from_mark, ids_first=by_match)
    rows = _page_rows(conn, statement, {**values, "skip": skip, "n": n}, one_row)
    if reverse:
        rows.reverse()
    sizes = _visible_thread_counts(
        conn, user_id, {r[_THREAD_ID_AT] for r in rows if r[_THREAD_ID_AT] is not None},
        query.hidden_accounts) if query.hidden_accounts else None
    return _page_of_rows(rows, count, stamp, offset, marks, marks_key, sizes)


def _page_with_known_total(
    conn: Connection, dialect: str, shape: tuple[str, ...], ordering: str,
    values: dict[str, Any], offset: int, limit: int, marks: PageMarks,
    marks_key: tuple[Any, ...], as_json: bool, check_pop: bool = False,
) -> Page[MessageSummary] | None:
    """A plain list's page read in one statement with its count and stamp
    (`_page_with_total`), as rows or (`as_json`) as `_json_page`; None when it must be read
    the general way. A first page needs nothing the count tells: from the first row on,
    LIMIT stops at the last. A later page is planned with the stamp and count the list was
    last read at (`marks`), and kept only if the statement finds them unchanged. With
    `check_pop`, _PopMail if one of the user's POP3 accounts holds mail (`pop_mail`)."""
    known = None
    skip, n, reverse, from_mark = 0, limit, False, False
    if offset:
        known = marks.known(marks_key)
        if known is None or offset >= known[1]:
            return None
        skip, n, reverse, from_mark = _plan(values, marks, marks_key, *known, offset, limit)
    found = _page_with_total(dialect, shape, ordering, reverse, from_mark, as_json,
                             _window(dialect, skip, n, limit), check_pop).rows(
        conn, {**values, "skip": skip, "n": n})
    count, stamp = int(found[0][0]), int(found[0][1])
    if check_pop:
        if found[0][2]:
            raise _PopMail()
        found = [row[:2] + row[3:] for row in found]
    if known is not None and (stamp, count) != known:
        return None  # the list changed since
    if as_json:
        return _json_page(dialect, found[0][2:], count, stamp, offset, marks, marks_key)
    rows = [row[2:] for row in found if row[2] is not None]
    if reverse:
        rows.reverse()
    return _page_of_rows(rows, count, stamp, offset, marks, marks_key)


def _plan(values: dict[str, Any], marks: PageMarks | None, marks_key: tuple[Any, ...] | None,
          stamp: int | None, count: int, offset: int, limit: int
          ) -> tuple[int, int, bool, bool]:
    """How to read the page at `offset` of `limit` rows of a list of `count` rows at
    `stamp`: (rows to skip, rows to read, whether from the other end, whether from a
    remembered row, whose (date, id) it puts in `values` as :mark_date and :mark_id)."""
    near = marks.nearest(marks_key, stamp, offset) \
        if marks is not None and marks_key is not None and stamp is not None else None
    n = min(limit, count - offset)
    if near is not None and offset - near[0] < min(offset, count - offset - n):
        # From the remembered row (itself included) on, in the list's own order.
        at, (values["mark_date"], values["mark_id"]) = near
        return offset - at, n, False, True
    reverse = offset > count // 2
    return (count - offset - n if reverse else offset), n, reverse, False


def _json_page(dialect: str, row: Sequence[Any] | None, count: int, stamp: int | None,
               offset: int, marks: PageMarks | None, marks_key: tuple[Any, ...] | None
               ) -> Page[MessageSummary] | None:
    """The page `rendered.email_array`'s `row` holds (None: no row, an empty page), as
    `Page.json`, its first and last rows remembered as `_page_of_rows` remembers them;
    None when it cannot be written that way (a time not in the store's own form, text
    UTF-8 cannot hold): read it as rows."""
    if row is None or row[0] is None:
        return Page(count=count, items=[], stamp=stamp, json=b"[]")
    text, well_formed, n, first_date, first_id, last_date, last_id = row
    if not well_formed:
        return None
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if dialect == "sqlite":  # (read without result processing: ISO text)
        first_date, last_date = sqlite_time(first_date), sqlite_time(last_date)
    if marks is not None and marks_key is not None and stamp is not None \
            and first_date is not None and last_date is not None:
        marks.remember(marks_key, stamp, count, {offset: (first_date, first_id),
                                                 offset + n - 1: (last_date, last_id)})
    return Page(count=count, items=[], stamp=stamp, json=encoded)


def _page_of_rows(rows: Sequence[Any], count: int, stamp: int | None, offset: int,
                  marks: PageMarks | None, marks_key: tuple[Any, ...] | None,
                  sizes: dict[int, int] | None = None) -> Page[MessageSummary]:
    """The page of `rows` (`_PAGE_COLUMNS`, in the list's order, from `offset` on), its
    first and last rows remembered in `marks` under `marks_key` at `stamp`; `sizes`, the
    thread sizes to show, else those the rows carry."""
    if marks is not None and marks_key is not None and stamp is not None and rows \
            and rows[0][_DATE_AT] is not None and rows[-1][_DATE_AT] is not None:
        marks.remember(marks_key, stamp, count, {
            offset: (rows[0][_DATE_AT], rows[0][0]),
            offset + len(rows) - 1: (rows[-1][_DATE_AT], rows[-1][0]),
        })
    if sizes is None:
        sizes = {r[_THREAD_ID_AT]: r[_SUMMARY_WIDTH] for r in rows
                 if r[_SUMMARY_WIDTH] is not None}
    return Page(count=count, items=[_summary(r, sizes) for r in rows], stamp=stamp)


def _page(conds: list[ColumnElement[bool]], ordering: str, reverse: bool,
          from_mark: bool, ids_first: bool = False, window: tuple[int, int] | None = None,
          ) -> Select[Any]:
    """A page of the list: `_PAGE_COLUMNS` of the rows matching `conds`, in `ordering`
    (turned round with `reverse`), from the row (mark_date, mark_id) on when `from_mark`,
    `skip` rows skipped, `n` rows; with `window` (skip, n), those numbers are written into
    the SQL instead (see `_window`).

    `ids_first` (a search, which reads every match to sort them): the page's ids are
    picked first, reading of each match only the columns the filters and the order need,
    then only the page's rows are read whole and joined to their threads. Read whole, each
    of a thousand matches cost its row's body too (on SQLite the columns after body_text
    sit in its overflow pages) and a thread lookup."""
    if from_mark:
        here = tuple_(messages.c.date, messages.c.id)
        mark = tuple_(bindparam("mark_date", type_=messages.c.date.type), bindparam("mark_id"))
        conds = [*conds, here <= mark if ordering == "-date" else here >= mark]
    order = _order_by(ordering, reverse=reverse)
    if ids_first:
        ids = (select(messages.c.id).where(*conds).order_by(*order)
               .offset(bindparam("skip")).limit(bindparam("n")).correlate(None))
        return (select(*_PAGE_COLUMNS).select_from(_PAGE_FROM)
                .where(messages.c.id.in_(ids)).order_by(*order))
    page = select(*_PAGE_COLUMNS).select_from(_PAGE_FROM).where(*conds).order_by(*order)
    if window is None:
        return page.offset(bindparam("skip")).limit(bindparam("n"))
    skip, n = window
    page = page.limit(literal_column(str(int(n)), Integer))
    return page.offset(literal_column(str(int(skip)), Integer)) if skip else page


# The rows a page of the published APIs holds at most (their page_size limits).
_WINDOW_ROWS = 100


def _window(dialect: str, skip: int, n: int, limit: int) -> tuple[int, int] | None:
    """PostgreSQL, a page read from its first row or the one before (a first page, a page
    from a remembered row): (skip, n) to write into its statement, or None (parameters).

    A statement with parameters is planned again at every execution: PostgreSQL keeps its
    generic plan only when that is not dearer than the custom ones, and with the LIMIT and
    OFFSET unknown it prices a generic page as a tenth of the user's rows (a parallel
    sort). Planning cost 0.25-0.3 ms of the server's CPU a list page, about half of what
    executing it costs, over a million messages. With the numbers written in, the generic
    plan is the custom one (the user's date index, 50 entries) and is kept after
    PostgreSQL's five trial runs. Only for whole pages of at most `_WINDOW_ROWS` rows
    skipping none or one, so that a list makes a few statements, not one per page."""
    if dialect != "postgresql" or skip > 1 or n != limit or n > _WINDOW_ROWS:
        return None
    return skip, n


@functools.lru_cache(maxsize=8)
def _search_page(ordering: str, reverse: bool, from_mark: bool) -> Select[Any]:
    """PostgreSQL: a page of a search with no other filter, in date order: the page's match
    ids are picked from `message_search` (`pg_match_ids`, the same parameters as `_page`
    and :tsq), then only those rows are read."""
    ids = text(pg_match_ids((ordering == "date") != reverse, from_mark)).columns(
        column("message_row_id", Integer)).subquery()
    return (select(*_PAGE_COLUMNS).select_from(_PAGE_FROM)
            .where(messages.c.user_id == bindparam("user_id"),
                   messages.c.id.in_(select(ids.c.message_row_id)))
            .order_by(*_order_by(ordering, reverse=reverse)))


@functools.lru_cache(maxsize=256)
def _plain_page(shape: tuple[str, ...], ordering: str, reverse: bool,
                from_mark: bool, one_row: bool, window: tuple[int, int] | None = None
                ) -> Prepared:
    """`_page` of a list filtered by `shape` only (no words, no thread grouping), built and
    compiled once (`Prepared`: its columns need no result processing, its times being
    ISO text in `_in_one_row`'s JSON on SQLite and aware already on PostgreSQL);
    `_in_one_row` with `one_row`."""
    page = _page(_shape_terms(shape, messages.c), ordering, reverse, from_mark,
                 window=window)
    return Prepared(_in_one_row(page, ordering, reverse) if one_row else page)


@functools.lru_cache(maxsize=256)
def _plain_json_page(dialect: str, shape: tuple[str, ...], ordering: str, reverse: bool,
                     from_mark: bool, window: tuple[int, int] | None = None) -> Prepared:
    """`_plain_page`'s rows as `rendered.email_array` writes them for `dialect`, in the
    list's own order (also when they are picked from the other end, with `reverse`)."""
    rows = _page(_shape_terms(shape, messages.c), ordering, reverse, from_mark,
                 window=window).subquery()
    return Prepared(email_array(rows, _order_by(ordering, of=rows), dialect))


@functools.lru_cache(maxsize=256)
def _page_with_total(dialect: str, shape: tuple[str, ...], ordering: str, reverse: bool,
                     from_mark: bool, as_json: bool, window: tuple[int, int] | None = None,
                     pop: bool = False) -> Prepared:
    """`total_and_stamp_select` (of `shape`, the account and folder filters) and
    `_plain_page`'s page in one statement: each row is (total, stamp, then the page's
    columns, in the order they are read: turned round with `reverse`); no page row gives
    one row, its page columns NULL. With `as_json`, one row: (total, stamp, then
    `rendered.email_array`'s columns for `dialect`, in the list's own order). Without,
    PostgreSQL only (SQLite's rows come as `_in_one_row`'s). With `pop`, `pop_mail`
    follows the stamp (`total_and_stamp_select`'s third column)."""
    totals = total_and_stamp_select("account_id" in shape, "folder" in shape, pop).subquery()
    if as_json:
        written = _plain_json_page(dialect, shape, ordering, reverse, from_mark,
                                   window).statement.subquery()
        return Prepared(select(*totals.c, *written.c)
                        .select_from(totals.outerjoin(written, true())))
    page = _plain_page(shape, ordering, reverse, from_mark, False, window).statement.subquery()
    return Prepared(select(*totals.c, *page.c).select_from(totals.outerjoin(page, true()))
                    .order_by(*_order_by(ordering, reverse=reverse, of=page)))


def _in_one_row(page: Select[Any], ordering: str, reverse: bool) -> Select[Any]:
    """SQLite: the rows of `page` (`_PAGE_COLUMNS`, in `ordering`, turned round with
    `reverse`) as one row holding a JSON array of them, in the same order; `_page_rows`
    reads it.

    Why: Python's sqlite3 gives up the interpreter's lock around each row it steps to, and
    while the reactor thread is busy (many clients at once) each of those hand-overs is a
    switch to the reactor thread and back. Stepping to one row instead of 50 raised the
    rate of 50-row pages at 16 connections by a sixth to a fifth over a million messages
    (the bench's store, runs side by side), though SQLite then does more (the JSON) and
    Python parses it. The order is the window's, not the subquery's: an aggregate's order
    over a subquery is SQLite's choice, a window's ORDER BY is not."""
    rows = page.subquery()
    every = func.json_group_array(func.json_array(*rows.c)).over(
        order_by=_order_by(ordering, reverse=reverse, of=rows), rows=(None, None))
    return select(every).limit(1)


def _json_rows(text: str) -> list[list[Any]]:
    """`_in_one_row`'s JSON, read by orjson (half the standard library's time for a page
    of 50); what orjson refuses (text holding a lone surrogate) by the standard library."""
    try:
        return orjson.loads(text)  # type: ignore[no-any-return]
    except orjson.JSONDecodeError:
        return json.loads(text)  # type: ignore[no-any-return]


def _page_rows(conn: Connection, statement: Select[Any] | Prepared, values: dict[str, Any],
               one_row: bool) -> list[Any]:
    """The rows of a list page (`_PAGE_COLUMNS`, by position), from `_in_one_row`'s
    statement when `one_row`: its times are ISO text there, read as `sqlite_time`."""
    if isinstance(statement, Prepared):
        found = statement.rows(conn, values)
    else:
        found = list(conn.execute(statement, values))
    if not one_row:
        return found
    rows: list[list[Any]] = _json_rows(found[0][0]) if found and found[0][0] else []
    for row in rows:
        for at in _TIMES_AT:
            row[at] = sqlite_time(row[at])
    return rows


def _attachment(row: Any) -> AttachmentSummary:
    m = row._mapping
    return AttachmentSummary(
        id=m["id"],
        message_row_id=m["message_row_id"],
        account_id=m["account_id"],
        part_path=m["part_path"],
        filename=m["filename"],
        mime_type=m["mime_type"],
        size=m["size"],
        content_id=m["content_id"],
        sender=m["sender"],
        date=utc(m["date"]),
    )


_ATTACHMENT_COLUMNS = (
    message_attachments.c.id, message_attachments.c.message_row_id, messages.c.account_id,
    message_attachments.c.part_path, message_attachments.c.filename,
    message_attachments.c.mime_type, message_attachments.c.size,
    message_attachments.c.content_id, messages.c.sender, messages.c.date,
)
_ATTACHMENT_JOIN = message_attachments.join(
    messages, messages.c.id == message_attachments.c.message_row_id
)


# One email's detail (and its thread's) reads these: built once, so that SQLAlchemy runs
# them from its cache instead of building and keying them for every request.
_DETAILS = select(
    *_SUMMARY_COLUMNS, messages.c.cc, messages.c.body_text, messages.c.body_html,
    messages.c.headers, messages.c.in_reply_to, messages.c.references,
    messages.c.internal_date, messages.c.uidvalidity, messages.c.uid,
    messages.c.sha256, messages.c.parse_problems,
).where(messages.c.user_id == bindparam("user_id"),
        messages.c.id.in_(bindparam("ids", expanding=True)))
_ATTACHMENTS_OF = select(*_ATTACHMENT_COLUMNS).select_from(_ATTACHMENT_JOIN) \
    .where(message_attachments.c.message_row_id.in_(bindparam("ids", expanding=True))) \
    .order_by(message_attachments.c.id)
_THREAD_OF = select(messages.c.thread_id, messages.c.account_id).where(
    messages.c.user_id == bindparam("user_id"), messages.c.id == bindparam("row_id"))
# With `pop_mail` as a last column "pop" (`without_pop`: asked in the statement that runs
# anyway, a user with no POP3 account holding mail costs no round trip more).
_DETAILS_POP = _DETAILS.add_columns(case((pop_mail(), 1), else_=0).label("pop"))
_THREAD_OF_POP = _THREAD_OF.add_columns(case((pop_mail(), 1), else_=0).label("pop"))


def thd_get_messages(conn: Connection, user_id: int, ids: Sequence[int],
                     hidden: Sequence[int] = (), *, without_pop: bool = False
                     ) -> list[MessageDetail]:
    """Full details of the user's messages with these row ids (missing ids, and those of
    the `hidden` accounts, left out); `without_pop`: those of the accounts
    `thd_hidden_accounts` names left out, read only if the rows' statement finds one."""
    if not ids:
        return []
    rows = conn.execute(_DETAILS_POP if without_pop else _DETAILS,
                        {"user_id": user_id, "ids": list(ids)}).all()
    if without_pop and rows and rows[0].pop:
        hidden = thd_hidden_accounts(conn, user_id)
    threads_of = {r.thread_id for r in rows if r.thread_id is not None}
    if hidden:
        rows = [r for r in rows if r.account_id not in hidden]
        counts = _visible_thread_counts(conn, user_id, threads_of, hidden)
    else:
        counts = _thread_counts(conn, threads_of)
    attachments: dict[int, list[AttachmentSummary]] = {}
    found = [r.id for r in rows]
    for a in conn.execute(_ATTACHMENTS_OF, {"ids": found}) if found else ():
        attachments.setdefault(a.message_row_id, []).append(_attachment(a))
    by_id = {}
    for r in rows:
        m = r._mapping
        by_id[m["id"]] = MessageDetail(
            summary=_summary(r, counts),
            cc=m["cc"],
            body_text=m["body_text"],
            body_html=m["body_html"],
            headers=m["headers"],
            in_reply_to=m["in_reply_to"],
            references=tuple(m["references"].split()),
            internal_date=utc(m["internal_date"]),
            uidvalidity=m["uidvalidity"],
            uid=m["uid"],
            sha256=m["sha256"],
            parse_problems=tuple(p for p in m["parse_problems"].split("\n") if p),
            attachments=tuple(attachments.get(m["id"], ())),
        )
    return [by_id[i] for i in ids if i in by_id]


def thd_thread_ids(conn: Connection, user_id: int, row_id: int, *,
                   without_pop: bool = False) -> list[int]:
    """Row ids of every message in the thread of `row_id`, oldest first; `without_pop`:
    those of the accounts `thd_hidden_accounts` names left out (`row_id` itself one of
    them: MessageNotFound), read only if the row's statement finds one."""
    found = conn.execute(_THREAD_OF_POP if without_pop else _THREAD_OF,
                         {"user_id": user_id, "row_id": row_id}).first()
    hidden = thd_hidden_accounts(conn, user_id) \
        if without_pop and found is not None and found.pop else ()
    if found is None or found.account_id in hidden:
        raise MessageNotFound(row_id)
    if found.thread_id is None:
        return [row_id]
    rows = conn.execute(_THREAD_ROWS, {"user_id": user_id, "thread_id": found.thread_id})
    return [r.id for r in rows if r.account_id not in hidden]


# A thread's row ids (and accounts), oldest first, found by the terms of a list filtered
# by thread_id (through the thread's index).
_THREAD_ROWS = (select(messages.c.id, messages.c.account_id)
                .where(*_shape_terms(("thread_id",), messages.c))
                .order_by(messages.c.date.asc(), messages.c.id.asc()))


# Messages whose details (bodies included) are read at once by `MessageStore.details_of`.
DETAILS_BATCH = 32


def _thread_count(conn: Connection, user_id: int, account_id: int | None,
                  hidden: Sequence[int]) -> int:
    """The threads of the user's messages (of this account), but the `hidden` accounts',
    counted from the rows (`thd_thread_total` cannot tell)."""
    conds = [messages.c.user_id == user_id]
    if account_id is not None:
        conds.append(messages.c.account_id == account_id)
    if hidden:
        conds.append(_visible(messages, hidden))
    return int(conn.execute(
        select(func.count(func.distinct(
            case((messages.c.thread_id.is_(None), -messages.c.id),
                 else_=messages.c.thread_id)
        ))).where(*conds)
    ).scalar() or 0)


class MessageStore:
    """Stores fetched messages and answers the message, thread, folder and search reads."""

    def __init__(
        self,
        db: Database,
        cpu: CpuPool,
        clock: IReactorTime,
        *,
        limits: MimeLimits | None = None,
    ) -> None:
        self.db = db
        self.cpu = cpu
        self.clock = clock
        self.limits = limits or MimeLimits()
        self.count_cache = CountCache()
        self.page_marks = PageMarks()

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(
            self.clock.seconds(), datetime.UTC  # type: ignore[misc]
        )

    # -- writing -------------------------------------------------------------------------

    async def parse(self, raws: Sequence[bytes]) -> list[ParsedMessage]:
        """Parse raw messages on the CPU pool (never on the reactor thread)."""
        limits = self.limits
        return await self.cpu.run(lambda: [parse_message(r, limits) for r in raws])

    async def store_batch(
        self, where: Location, fetched: Sequence[FetchedMessage], *, rescan: bool = False,
        parsed: Sequence[ParsedMessage] | None = None, relaxed: bool = False,
        also: Callable[[Connection, StoreResult], None] | None = None,
    ) -> StoreResult:
        """Parse (unless `parsed` holds the parse of each message already) and store one
        batch atomically; a rerun of the same batch stores nothing. `relaxed`: committed
        without an fsync of its own (`Database.run_relaxed`), for a caller whose own later
        commit makes it durable before anything is acknowledged (a sync's folder state).
        `also` runs in the same transaction with what was stored (a sync's recorders)."""
        if not fetched:
            return StoreResult()
        if parsed is None:
            parsed = await self.parse([f.raw for f in fetched])
        run = self.db.run_relaxed if relaxed else self.db.run
        items = list(zip(fetched, parsed, strict=True))

        def txn(conn: Connection, now: datetime.datetime) -> StoreResult:
            stored = thd_store_batch(conn, where, items, now, rescan)
            if also is not None:
                also(conn, stored)
            return stored

        return await run("store_message_batch", txn, self.now())

    async def add_message(
        self, user_id: int, raw: bytes, *, folder: str = "INBOX",
        internal_date: datetime.datetime | None = None,
    ) -> int:
        """Store one message outside any fetch account (local delivery, imports, tests)."""
        result = await self.store_batch(
            Location(user_id=user_id, account_id=None, folder_id=None, folder=folder),
            [FetchedMessage(raw=raw, internal_date=internal_date)],
        )
        return result.created[0]

    async def delete_user_messages(self, user_id: int) -> int:
        """Delete every message the user still has (a deleted user's: those outside any
        fetch account, and any an account's deletion left); how many went."""
        return await self.db.run("delete_user_messages", thd_delete_user_messages, user_id)

    async def collect_garbage(self) -> int:
        """Drop blobs and threads nothing refers to any more (after deleting an account)."""

        def txn(conn: Connection) -> int:
            return thd_collect_garbage(conn)

        return await self.db.run("collect_message_garbage", txn)

    async def drop_empty_threads(self, user_id: int) -> None:
        await self.db.run("drop_empty_threads", thd_drop_empty_threads, user_id)

    # -- reading -------------------------------------------------------------------------

    async def list_messages(self, user_id: int, query: MessageQuery,
                            unless: int | None = None, as_json: bool = False
                            ) -> Page[MessageSummary]:
        """A page of messages: filters, full-text `q`, ordering, optional one-per-thread;
        `unless`, `as_json`: see `thd_list_messages`."""
        _order_terms(query.ordering)  # reject a bad ordering before touching the store
        # A search spends long in the database: the shared pool, not the read lane.
        read = self.db.read_long if query.q else self.db.read
        return await read(
            "list_messages", thd_list_messages, user_id, query, self.count_cache,
            self.page_marks, unless, as_json,
        )

    async def list_threads(self, user_id: int, query: MessageQuery) -> Page[MessageSummary]:
        """One row per thread (its first matching message) with thread_count."""
        return await self.list_messages(
            user_id,
            MessageQuery(**{**query.__dict__, "threads_only": True}),
        )

    async def get_message(self, user_id: int, row_id: int) -> MessageDetail:
        found = await self.db.read("get_message", thd_get_messages, user_id, [row_id])
        if not found:
            raise MessageNotFound(row_id)
        return found[0]

    async def message_and_thread(
        self, user_id: int, row_id: int, *, without_pop: bool = False
    ) -> tuple[MessageDetail, list[int]]:
        """A message and the row ids of every message of its thread, oldest first (itself
        included), read in one transaction; the others' details come from `details_of`.
        `without_pop`: as `MessageQuery.without_pop` (a POP3 account's message is not
        found)."""

        def txn(conn: Connection) -> tuple[MessageDetail, list[int]]:
            ids = thd_thread_ids(conn, user_id, row_id, without_pop=without_pop)
            found = thd_get_messages(conn, user_id, [row_id], without_pop=without_pop)
            if not found:
                raise MessageNotFound(row_id)
            return found[0], ids

        return await self.db.read("get_message_with_thread", txn)

    async def thread_ids(self, user_id: int, row_id: int, *, without_pop: bool = False
                         ) -> list[int]:
        """The row ids of every message of the thread `row_id` belongs to, oldest first
        (itself included); `without_pop`: as `message_and_thread`'s."""

        def txn(conn: Connection) -> list[int]:
            return thd_thread_ids(conn, user_id, row_id, without_pop=without_pop)

        return await self.db.read("get_thread", txn)

    async def details_of(self, user_id: int, ids: Sequence[int], *, without_pop: bool = False
                         ) -> AsyncGenerator[MessageDetail]:
        """The details of the user's messages `ids`, in that order, read DETAILS_BATCH at a
        time (a thread may hold thousands, their bodies hundreds of megabytes: a reply
        writes them as they come instead of holding them all); those deleted meanwhile are
        left out, and with `without_pop` those of a POP3 account (one turned from IMAP
        meanwhile)."""

        def batch(conn: Connection, some: Sequence[int]) -> list[MessageDetail]:
            return thd_get_messages(conn, user_id, some, without_pop=without_pop)

        for start in range(0, len(ids), DETAILS_BATCH):
            for detail in await self.db.read("get_thread_batch", batch,
                                             ids[start:start + DETAILS_BATCH]):
                yield detail

    async def raw_message(self, user_id: int, row_id: int) -> bytes:
        """The exact bytes of a message (the .eml)."""

        def txn(conn: Connection) -> bytes | None:
            return conn.execute(
                select(message_blobs.c.raw)
                .select_from(messages.join(
                    message_blobs, message_blobs.c.sha256 == messages.c.sha256
                ))
                .where(messages.c.user_id == user_id)
                .where(messages.c.id == row_id)
            ).scalar()

        raw = await self.db.read("get_raw_message", txn)
        if raw is None:
            raise MessageNotFound(row_id)
        return bytes(raw)

    async def folder_names(self, user_id: int, account_id: int | None = None, *,
                           without_pop: bool = False) -> list[str]:
        """Distinct folder names the user has messages in, sorted (seed 001 /folders/);
        `without_pop`: as `MessageQuery.without_pop`."""

        def txn(conn: Connection) -> list[str]:
            if without_pop:
                return sorted(thd_visible_folder_totals(conn, user_id, account_id)[0])
            return sorted(thd_folder_totals(conn, user_id, account_id))

        return await self.db.read("list_folder_names", txn)

    async def mailboxes(
        self, user_id: int, account_id: int, *, sort: str = "name", direction: str = "asc",
        offset: int = 0, limit: int = 20,
    ) -> Page[FolderInfo]:
        """An account's folders with how many messages we hold of each (Dropmyemail)."""
        if sort not in ("name", "message_count"):
            raise QueryError(f"cannot sort by {sort!r}", "sort")
        if direction not in ("asc", "desc"):
            raise QueryError(f"direction must be asc or desc, not {direction!r}", "direction")

        def txn(conn: Connection) -> Page[FolderInfo]:
            counts = (
                select(messages.c.folder_id, func.count().label("n"))
                .where(messages.c.user_id == user_id)
                .where(messages.c.account_id == account_id)
                .group_by(messages.c.folder_id)
                .subquery()
            )
            n = func.coalesce(counts.c.n, 0)
            key = fetch_folders.c.name if sort == "name" else n
            base = (
                select(fetch_folders.c.id, fetch_folders.c.name, fetch_folders.c.special_use,
                       n.label("n"))
                .select_from(fetch_folders.outerjoin(
                    counts, counts.c.folder_id == fetch_folders.c.id
                ))
                .where(fetch_folders.c.account_id == account_id)
            )
            total = conn.execute(
                select(func.count()).select_from(base.subquery())
            ).scalar() or 0
            order = key.desc() if direction == "desc" else key.asc()
            rows = conn.execute(
                base.order_by(order, fetch_folders.c.id).offset(offset).limit(limit)
            ).all()
            return Page(
                count=int(total),
                items=[FolderInfo(id=r.id, account_id=account_id, name=r.name,
                                  message_count=int(r.n), special_use=r.special_use)
                       for r in rows],
            )

        return await self.db.read("list_mailboxes", txn)

    async def statistics(self, user_id: int, account_id: int | None = None, *,
                         without_pop: bool = False) -> Statistics:
        """Totals of messages and threads, and messages per folder (seed 001);
        `without_pop`: as `MessageQuery.without_pop`."""

        def txn(conn: Connection) -> Statistics:
            counts, hidden = thd_visible_folder_totals(conn, user_id, account_id) \
                if without_pop else (thd_folder_totals(conn, user_id, account_id), ())
            folders = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
            total_threads = thd_thread_total(conn, user_id, account_id, hidden)
            if total_threads is None:  # some accounts' threads among others': count them
                # (over all the user's messages: seconds for a million, so kept while the
                # stamp stands, by the set of hidden accounts too, as `_total` keeps its)
                stamp = thd_change_stamp(conn, user_id)
                key = ("statistics.threads", user_id, account_id, hidden)
                total_threads = self.count_cache.get(key, stamp)
                if total_threads is None:
                    total_threads = _thread_count(conn, user_id, account_id, hidden)
                    self.count_cache.put(key, stamp, total_threads)
            return Statistics(
                total_emails=sum(counts.values()), total_threads=total_threads,
                folders=folders,
            )

        return await self.db.read("message_statistics", txn)

    async def account_usage(self, user_id: int) -> dict[int, AccountUsage]:
        """Per account of the user: messages held and their total size in bytes."""

        def txn(conn: Connection) -> dict[int, AccountUsage]:
            rows = conn.execute(
                select(messages.c.account_id, func.count(), func.coalesce(
                    func.sum(messages.c.size), 0))
                .where(messages.c.user_id == user_id)
                .where(messages.c.account_id.is_not(None))
                .group_by(messages.c.account_id)
            )
            return {aid: AccountUsage(int(n), int(s)) for aid, n, s in rows}

        return await self.db.read("account_usage", txn)

    async def list_attachments(
        self, user_id: int, *, account_id: int | None = None, query: str | None = None,
        sort: str = "date", direction: str = "asc", offset: int = 0, limit: int = 20,
    ) -> Page[AttachmentSummary]:
        """Attachments of the user's messages; `query` matches file names (substring)."""
        keys = {"date": messages.c.date, "filename": message_attachments.c.filename,
                "sender": messages.c.sender, "size": message_attachments.c.size}
        if sort not in keys:
            raise QueryError(f"cannot sort by {sort!r}", "sort")
        if direction not in ("asc", "desc"):
            raise QueryError(f"direction must be asc or desc, not {direction!r}", "direction")

        def txn(conn: Connection) -> Page[AttachmentSummary]:
            conds: list[ColumnElement[bool]] = [messages.c.user_id == user_id]
            if account_id is not None:
                conds.append(messages.c.account_id == account_id)
            if query:
                pattern = like_pattern(query)
                conds.append(or_(
                    ilike(conn, message_attachments.c.filename, pattern),
                    ilike(conn, message_attachments.c.mime_type, pattern),
                ))
            total = conn.execute(
                select(func.count()).select_from(_ATTACHMENT_JOIN).where(*conds)
            ).scalar() or 0
            key = keys[sort]
            rows = conn.execute(
                select(*_ATTACHMENT_COLUMNS)
                .select_from(_ATTACHMENT_JOIN)
                .where(*conds)
                .order_by(key.desc() if direction == "desc" else key.asc(),
                          message_attachments.c.id)
                .offset(offset)
                .limit(limit)
            ).all()
            return Page(count=int(total), items=[_attachment(r) for r in rows])

        return await self.db.read("list_attachments", txn)

    async def attachment_content(
        self, user_id: int, attachment_id: int
    ) -> tuple[AttachmentSummary, bytes]:
        """An attachment and its decoded bytes, cut from the raw message on the CPU pool."""

        def txn(conn: Connection) -> tuple[AttachmentSummary, bytes] | None:
            row = conn.execute(
                select(*_ATTACHMENT_COLUMNS, message_blobs.c.raw)
                .select_from(_ATTACHMENT_JOIN.join(
                    message_blobs, message_blobs.c.sha256 == messages.c.sha256
                ))
                .where(messages.c.user_id == user_id)
                .where(message_attachments.c.id == attachment_id)
            ).first()
            if row is None:
                return None
            return _attachment(row), bytes(row.raw)

        found = await self.db.read("get_attachment", txn)
        if found is None:
            raise MessageNotFound(attachment_id)
        info, raw = found
        content = await self.cpu.run(extract_part, raw, info.part_path, self.limits)
        if content is None:
            raise MessageNotFound(attachment_id)
        return info, content

    async def thread_subject_count(self, user_id: int) -> int:
        """How many threads the user has (rows in `threads`)."""

        def txn(conn: Connection) -> int:
            return int(conn.execute(
                select(func.count()).select_from(threads).where(threads.c.user_id == user_id)
            ).scalar() or 0)

        return await self.db.read("count_threads", txn)

"""Per-folder sync state in the store: folder rows, what we hold of a folder, flag updates.

The messages table is the authority on what we hold: a (folder, uidvalidity, uid) row exists
only once its message is committed. The folder row's uidvalidity/uidnext/highestmodseq are
written after a folder sync completes and only serve to skip work; its skipped_uids as soon
as a sync skips one, before it commits a higher UID, and a first uidvalidity before the
folder's first batch is committed (a UIDVALIDITY changed after a first sync cut short is
then a rescan).
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from mailcore.messages.sql import new_id
from mailcore.messages.store import thd_set_pop_sizes
from mailcore.store.chunks import found_keys, key_chunks, rows_for
from mailcore.store.schema import fetch_folders, message_pop_sizes, messages


@dataclass(frozen=True)
class FolderState:
    """A folder row as the engine needs it."""

    id: int
    name: str
    uidvalidity: int | None
    uidnext: int | None
    highestmodseq: int | None
    delimiter: str | None = None  # as the server's LIST last gave them
    special_use: str | None = None
    # UIDs (under `uidvalidity`) the last sync could not fetch (its error says why).
    skipped_uids: tuple[int, ...] = ()


def _uids(text: str | None) -> tuple[int, ...]:
    return tuple(int(u) for u in (text or "").split() if u.isdigit())


def _state(row: Any) -> FolderState:
    m = row._mapping
    return FolderState(m["id"], m["name"], m["uidvalidity"], m["uidnext"], m["highestmodseq"],
                       m["delimiter"], m["special_use"], _uids(m["skipped_uids"]))


def thd_upsert_folders(
    conn: Connection, account_id: int, remote: list[tuple[str, str | None, str | None]]
) -> dict[str, FolderState]:
    """Make sure a row exists for every remote (name, delimiter, special_use); rows for
    folders gone from the server are kept (with their messages) and flagged."""
    existing = {
        r.name: r
        for r in conn.execute(
            select(fetch_folders).where(fetch_folders.c.account_id == account_id)
        )
    }
    names = set()
    for name, delimiter, special_use in remote:
        names.add(name)
        row = existing.get(name)
        if row is None:
            conn.execute(
                insert(fetch_folders).values(
                    account_id=account_id, name=name, delimiter=delimiter,
                    special_use=special_use, exists_on_server=True,
                )
            )
        elif (row.delimiter, row.special_use, row.exists_on_server) != (
            delimiter, special_use, True
        ):
            conn.execute(
                update(fetch_folders).where(fetch_folders.c.id == row.id).values(
                    delimiter=delimiter, special_use=special_use, exists_on_server=True
                )
            )
    gone = [row.id for name, row in existing.items() if name not in names]
    if gone:
        conn.execute(
            update(fetch_folders).where(fetch_folders.c.id.in_(gone)).values(
                exists_on_server=False
            )
        )
    return {
        r.name: _state(r)
        for r in conn.execute(
            select(fetch_folders).where(fetch_folders.c.account_id == account_id)
        )
    }


def thd_known_folders(conn: Connection, account_id: int) -> list[FolderState]:
    """The folders a past sync of the account opened (they have a UIDVALIDITY) that the
    last LIST still showed, in name order."""
    rows = conn.execute(
        select(fetch_folders)
        .where(fetch_folders.c.account_id == account_id)
        .where(fetch_folders.c.exists_on_server.is_(True))
        .where(fetch_folders.c.uidvalidity.is_not(None))
        .order_by(fetch_folders.c.name)
    )
    return [_state(r) for r in rows]


def thd_folder(conn: Connection, account_id: int, name: str) -> FolderState:
    """The folder row `name` of the account, created if missing (POP3's INBOX)."""
    row = conn.execute(
        select(fetch_folders)
        .where(fetch_folders.c.account_id == account_id)
        .where(fetch_folders.c.name == name)
    ).first()
    if row is None:
        new_id(conn.execute(insert(fetch_folders).values(account_id=account_id, name=name)))
        row = conn.execute(
            select(fetch_folders)
            .where(fetch_folders.c.account_id == account_id)
            .where(fetch_folders.c.name == name)
        ).one()
    return _state(row)


def thd_max_uid(conn: Connection, folder_id: int, uidvalidity: int,
                below: int | None = None) -> int:
    """The highest UID we hold for (folder, uidvalidity), only those `below` when given;
    0 when none."""
    query = (select(func.max(messages.c.uid)).where(messages.c.folder_id == folder_id)
             .where(messages.c.uidvalidity == uidvalidity))
    if below is not None:
        query = query.where(messages.c.uid < below)
    return int(conn.execute(query).scalar() or 0)


def thd_stored_uids(conn: Connection, folder_id: int, uidvalidity: int,
                    among: Sequence[int] | None = None) -> set[int]:
    """The UIDs we hold of (folder, uidvalidity); only those `among` when given (asked a
    chunk at a time, mailcore.store.chunks)."""
    query = (select(messages.c.uid).where(messages.c.folder_id == folder_id)
             .where(messages.c.uidvalidity == uidvalidity))
    if among is None:
        return set(conn.execute(query).scalars())
    return found_keys(conn, query.where(messages.c.uid.in_(bindparam("keys", expanding=True))),
                      {}, among)


def thd_held_uids(conn: Connection, folder_id: int, uidvalidity: int, after: int,
                  highest: int, limit: int) -> list[int]:
    """The UIDs we hold of (folder, uidvalidity) above `after` and up to `highest`, in
    order, the first `limit` of them: the folder read a page at a time."""
    return list(conn.execute(
        select(messages.c.uid).where(messages.c.folder_id == folder_id)
        .where(messages.c.uidvalidity == uidvalidity)
        .where(messages.c.uid > after).where(messages.c.uid <= highest)
        .order_by(messages.c.uid).limit(limit)
    ).scalars())


def thd_held_span(conn: Connection, folder_id: int, uidvalidity: int,
                  highest: int) -> tuple[int, int]:
    """How many UIDs we hold of (folder, uidvalidity) up to `highest`, and the lowest of
    them (0 when none): one look at the (folder, uidvalidity, uid) index."""
    count, lowest = conn.execute(
        select(func.count(), func.min(messages.c.uid)).where(messages.c.folder_id == folder_id)
        .where(messages.c.uidvalidity == uidvalidity).where(messages.c.uid <= highest)
    ).one()
    return int(count), int(lowest or 0)


def thd_stored_uidls(conn: Connection, folder_id: int) -> dict[str, int | None]:
    """The UIDLs we hold of a POP3 folder, with the size LIST gave each when it was fetched
    (None: fetched before sizes were kept, or LIST left it out)."""
    return {
        row.pop_uidl: row.size
        for row in conn.execute(
            select(messages.c.pop_uidl, message_pop_sizes.c.size)
            .select_from(messages.outerjoin(
                message_pop_sizes, message_pop_sizes.c.message_row_id == messages.c.id))
            .where(messages.c.folder_id == folder_id)
            .where(messages.c.pop_uidl.is_not(None))
        )
    }


def thd_note_pop_sizes(conn: Connection, folder_id: int, sizes: dict[str, int]) -> None:
    """The LIST sizes (by UIDL) of copies held without one: those fetched before sizes
    were kept take the size at their next sync, so that a later reuse of their UIDL shows."""
    thd_set_pop_sizes(conn, {
        int(row.id): sizes[row.pop_uidl]
        for row in rows_for(conn, select(messages.c.id, messages.c.pop_uidl).where(
            messages.c.folder_id == folder_id,
            messages.c.pop_uidl.in_(bindparam("keys", expanding=True))), {}, sizes)
    })


def thd_save_folder_state(
    conn: Connection,
    folder_id: int,
    *,
    uidvalidity: int | None,
    uidnext: int | None,
    highestmodseq: int | None,
    now: datetime.datetime,
    error: str | None,
    skipped_uids: Sequence[int] = (),
) -> None:
    """A folder synced: its new state, and what it could not fetch (`skipped_uids`, under
    `uidvalidity`, with `error` saying why)."""
    conn.execute(
        update(fetch_folders).where(fetch_folders.c.id == folder_id).values(
            uidvalidity=uidvalidity, uidnext=uidnext, highestmodseq=highestmodseq,
            last_sync=now, sync_error=error,
            skipped_uids=" ".join(str(u) for u in sorted(skipped_uids)) or None,
        )
    )


def thd_note_skipped(conn: Connection, folder_id: int, uidvalidity: int,
                     uids: Sequence[int]) -> None:
    """UIDs (under `uidvalidity`) a sync skipped, kept with those already noted before the
    sync goes on to commit higher ones: the next sync looks only above the highest UID held,
    so a skip noted only at the folder's end was forgotten when the sync did not get there.
    A folder first opened takes `uidvalidity` now (its UIDNEXT and HIGHESTMODSEQ wait for
    its end); under another one it is being rescanned, which finds every UID again."""
    row = conn.execute(
        select(fetch_folders.c.uidvalidity, fetch_folders.c.skipped_uids)
        .where(fetch_folders.c.id == folder_id)
    ).first()
    if row is None or row.uidvalidity not in (None, uidvalidity):
        return
    kept = set(_uids(row.skipped_uids)) if row.uidvalidity == uidvalidity else set()
    conn.execute(
        update(fetch_folders).where(fetch_folders.c.id == folder_id).values(
            uidvalidity=uidvalidity,
            skipped_uids=" ".join(str(u) for u in sorted(kept.union(uids))) or None,
        )
    )


def thd_set_folder_error(conn: Connection, folder_id: int, error: str | None) -> None:
    conn.execute(
        update(fetch_folders).where(fetch_folders.c.id == folder_id).values(sync_error=error)
    )


def thd_update_flags(
    conn: Connection, folder_id: int, uidvalidity: int, flags: dict[int, tuple[str, ...]],
    now: datetime.datetime,
) -> int:
    """Apply flag changes the server reported (CONDSTORE/QRESYNC, or a flags resync) to our
    copies: how many copies changed. The changes are written by flag set (most share a few:
    \\Seen, \\Seen \\Flagged...), each an UPDATE a chunk of its UIDs (mailcore.store.chunks):
    50,000 changes were as many statements."""
    by_flags: dict[str, list[int]] = defaultdict(list)
    for uid, values in flags.items():
        by_flags[" ".join(values)].append(uid)
    statement = (
        update(messages)
        .where(messages.c.folder_id == folder_id)
        .where(messages.c.uidvalidity == uidvalidity)
        .where(messages.c.uid.in_(bindparam("keys", expanding=True)))
        .values(flags=bindparam("new_flags"), updated_at=now)
    )
    changed = 0
    for joined, uids in by_flags.items():
        for chunk in key_chunks(uids):
            result = conn.execute(statement, {"new_flags": joined, "keys": chunk})
            changed += int(result.rowcount or 0)
    return changed


def thd_mark_stale(conn: Connection, folder_id: int, uidvalidity: int) -> None:
    """After a complete rescan: copies left under another UIDVALIDITY are not on the server."""
    conn.execute(
        update(messages)
        .where(messages.c.folder_id == folder_id)
        .where(messages.c.uidvalidity != uidvalidity)
        .values(on_server=False)
    )


def thd_mark_gone(
    conn: Connection, folder_id: int, uidvalidity: int, uids: list[int]
) -> None:
    """Messages expunged on the server: our copies stay, marked as no longer there."""
    for i in range(0, len(uids), 500):
        conn.execute(
            update(messages)
            .where(and_(
                messages.c.folder_id == folder_id,
                messages.c.uidvalidity == uidvalidity,
                messages.c.uid.in_(uids[i : i + 500]),
            ))
            .values(on_server=False)
        )


def thd_created_since(conn: Connection, account_id: int, since: datetime.datetime) -> int:
    """How many copies of the account were stored at or after `since` (what a sync that
    started then and was cut short had stored), read from ix_messages_account_created
    alone: it runs in the write transaction that settles the sync."""
    return int(conn.execute(
        select(func.count()).select_from(messages)
        .where(messages.c.account_id == account_id, messages.c.created_at >= since)
    ).scalar() or 0)

"""A sync's pending webhook events: recorded with what they describe, told at least once.

A sync records its events in the transactions that commit what they describe
(`SyncEngine.recorders`, wired by `Webhooks.attach`): each batch its new e-mails
(`email.new`, one row each) and the threads it added to (`thread.updated`, one row a thread
until told), the sync's outcome its `sync.completed`, in the `webhook_events` table. Only for
a user with an active webhook that wants the event: a backup of a user without webhooks
writes nothing more than one read of the user's webhooks a transaction.

A transaction of `thd_tell` turns the oldest pending event, with up to `BATCH` more of its
account and kind (one delivery's e-mails or threads), into delivery rows and deletes them:
an event is told once, whichever node and transaction takes it (PostgreSQL's row locks,
SKIP LOCKED; SQLite's one writer), and a crash or a store error before the commit leaves it
pending. Each such transaction reads one delivery's data, so SQLite's write lock is never
held across a sync's worth of e-mails. The events are told when the sync ends
(`Webhooks.on_sync`), and what is left (a crash, a store error, a sync cancelled by a stop,
a node that died mid-sync) by the sender's sweep: at its start, then every `SWEEP_INTERVAL`
seconds, for the accounts no sync runs on (`thd_not_syncing`: a live sync tells its own at
its end, its e-mails in as few deliveries as they fill). A POP3 account's syncs have none:
the webhooks are the IMAP2API's, which shows only the IMAP accounts and their mail.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, exists, select

from mailcore.fetch.engine import SyncResult
from mailcore.messages.sql import insert_rows
from mailcore.messages.store import thd_get_messages
from mailcore.store.schema import fetch_accounts, webhook_events
from mailcore.webhooks.model import BATCH
from mailcore.webhooks.payload import email_json, iso
from mailcore.webhooks.store import _thread_entries, thd_enqueue, thd_subscribers

# The sender's sweep looks for events left untold this often (seconds), and at its start.
SWEEP_INTERVAL = 60.0

_e = webhook_events.c
_f = fetch_accounts.c


def _wanted(conn: Connection, user_id: int) -> set[str]:
    """The events some active webhook of the user wants."""
    return {event for hook in thd_subscribers(conn, user_id) for event in hook.events}


def _of_pop(conn: Connection, account_id: int) -> bool:
    """Whether the account is a POP3 one: the webhooks are the IMAP2API's, whose
    imap-servers are the IMAP accounts only, so its events would name in `imap_server` an
    id that API answers 404 for (as its e-mail lists leave that mail out)."""
    protocol = conn.execute(select(_f.protocol).where(_f.id == account_id)).scalar()
    return protocol is not None and protocol != "imap"


def thd_record_batch(conn: Connection, user_id: int, account_id: int,
                     created: Sequence[int], thread_ids: Collection[int], now: float) -> None:
    """Blocking, in the transaction that stores a sync's batch: its new e-mails and their
    threads as pending events, for the events the user's webhooks want."""
    if not created:
        return
    wanted = _wanted(conn, user_id) & {"email.new", "thread.updated"}
    if not wanted or _of_pop(conn, account_id):
        return
    rows = []
    if "email.new" in wanted:
        rows += [{"user_id": user_id, "account_id": account_id, "event": "email.new",
                  "ref_id": row_id, "data": None, "created_at": now} for row_id in created]
    if "thread.updated" in wanted:
        rows += [{"user_id": user_id, "account_id": account_id, "event": "thread.updated",
                  "ref_id": thread_id, "data": None, "created_at": now}
                 for thread_id in sorted(set(thread_ids))]
    insert_rows(conn, webhook_events, rows, skip_existing=True)


def sync_completed_data(result: SyncResult) -> dict[str, Any]:
    """`sync.completed`'s data for a finished sync."""
    return {
        "imap_server": result.account_id, "status": result.status, "error": result.problems(),
        "new_messages": result.new_messages, "started_at": iso(result.started_at),
        "finished_at": iso(result.finished_at),
    }


def thd_record_outcome(conn: Connection, result: SyncResult, now: float) -> None:
    """Blocking, in the transaction that records a sync's outcome: its sync.completed as a
    pending event, if a webhook of the user wants it."""
    if "sync.completed" in _wanted(conn, result.user_id) \
            and not _of_pop(conn, result.account_id):
        insert_rows(conn, webhook_events, [{
            "user_id": result.user_id, "account_id": result.account_id,
            "event": "sync.completed", "ref_id": None,
            "data": json.dumps(sync_completed_data(result), separators=(",", ":")),
            "created_at": now,
        }], skip_existing=True)


def thd_not_syncing(now: float, node_id: str | None, running: Sequence[int]) -> ColumnElement[
        bool]:
    """The pending events of accounts no sync runs on: none holds a live lease on the
    account, or this node (`node_id`) does and does not run its sync (`running`: a run of
    this node that a crash cut short). An account gone is syncing nowhere."""
    live = exists().where(
        _f.id == _e.account_id, _f.lease_owner.is_not(None), _f.lease_until.is_not(None),
        _f.lease_until > now,
    )
    if node_id is not None:
        live = live.where(_f.lease_owner != node_id)
    mine_running = _e.account_id.in_(list(running)) if running else None
    return and_(~live, ~mine_running) if mine_running is not None else ~live


def thd_any_pending(conn: Connection, scope: ColumnElement[bool]) -> bool:
    """Blocking: whether an event in `scope` is pending (a read, so that nothing takes the
    write lock when there is none)."""
    return conn.execute(select(_e.id).where(scope).limit(1)).first() is not None


def _locked(conn: Connection, query: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return query.with_for_update(skip_locked=True)
    return query


def thd_tell(conn: Connection, scope: ColumnElement[bool], created: datetime.datetime,
             now: float) -> tuple[int, bool]:
    """Blocking: turn the oldest pending event in `scope`, with up to BATCH of its account
    and kind, into the delivery rows of one event for each webhook of its user that wants
    it, and delete them; (delivery rows written, whether any event was pending). Events
    another transaction holds are skipped (PostgreSQL), so two nodes tell each once."""
    first = conn.execute(_locked(conn, select(
        _e.id, _e.user_id, _e.account_id, _e.event, _e.data,
    ).where(scope).order_by(_e.id).limit(1))).first()
    if first is None:
        return 0, False
    if first.event == "sync.completed":
        taken = [first.id]
        refs: list[int] = []
    else:
        rows = conn.execute(_locked(conn, select(_e.id, _e.ref_id).where(
            _e.account_id == first.account_id, _e.event == first.event, _e.id >= first.id,
        ).order_by(_e.id).limit(BATCH))).all()
        taken = [r.id for r in rows]
        refs = [r.ref_id for r in rows]
    conn.execute(delete(webhook_events).where(_e.id.in_(taken)))
    user_id, account = first.user_id, first.account_id
    if _of_pop(conn, account):  # turned from IMAP since they were recorded: not told
        return 0, True
    data: dict[str, Any] | None
    if first.event == "sync.completed":
        data = json.loads(first.data)
    elif first.event == "email.new":
        found = thd_get_messages(conn, user_id, refs, without_pop=True)
        data = {"imap_server": account, "emails": [email_json(d.summary) for d in found]
                } if found else None
    else:
        entries = _thread_entries(conn, user_id, refs)
        data = {"imap_server": account, "threads": entries} if entries else None
    if data is None:  # its e-mails or threads were deleted meanwhile
        return 0, True
    return thd_enqueue(conn, user_id, first.event, [data], thd_subscribers(conn, user_id),
                       created, now), True


def account_scope(account_id: int) -> ColumnElement[bool]:
    """The pending events of one account (told when its sync ends)."""
    return _e.account_id == account_id

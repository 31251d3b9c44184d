"""Webhook and delivery rows: the SQL, run in the store's transactions (`thd_` functions block)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, insert, select, update

from mailcore.messages.counts import pop_mail
from mailcore.messages.sql import utc
from mailcore.messages.store import thd_get_messages, thd_hidden_accounts
from mailcore.store.schema import messages, users, webhook_deliveries, webhooks
from mailcore.webhooks.model import Webhook, WebhookNotFound, _webhook
from mailcore.webhooks.payload import _event_payload, email_json, thread_ref


def thd_get_webhook(conn: Connection, user_id: int, webhook_id: int) -> Webhook:
    row = conn.execute(
        select(webhooks).where(webhooks.c.id == webhook_id, webhooks.c.user_id == user_id)
    ).first()
    if row is None:
        raise WebhookNotFound("Not found.", "id")
    return _webhook(row)


@dataclass(frozen=True)
class Due:
    """A delivery claimed for one attempt, with what the attempt needs."""

    id: int
    webhook_id: int
    user_id: int
    delivery_id: str
    event: str
    payload: str
    attempts: int
    url: str
    secret_enc: bytes
    active: bool
    # Its lease: the `next_attempt_at` the claim wrote. While the row still says so and is
    # pending, no other node took the delivery over; the attempt is recorded only then.
    lease: float


def thd_claim_due(
    conn: Connection, now: float, lease_until: float, limit: int,
    busy: Mapping[int, int] | None = None, per_webhook: int = 2,
    busy_users: Mapping[int, int] | None = None, per_user: int = 3,
) -> list[Due]:
    """Up to `limit` pending deliveries due at `now`, oldest first, at most `per_webhook`
    per webhook counting the `busy` ones (webhook id -> attempts in flight), so that one
    dead receiver cannot take every slot, and at most `per_user` per user counting the
    `busy_users` ones (user id -> attempts in flight), so that one user's backlog cannot
    either. Leased until `lease_until`: a crash mid-attempt retries after the lease."""
    busy = dict(busy or {})
    busy_users = dict(busy_users or {})
    full = [w for w, n in busy.items() if n >= per_webhook]
    full_users = [u for u, n in busy_users.items() if n >= per_user]
    q = (
        select(webhook_deliveries, webhooks.c.url, webhooks.c.secret_enc, webhooks.c.active)
        .select_from(webhook_deliveries.join(
            webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id
        ).join(users, users.c.id == webhook_deliveries.c.user_id))
        .where(webhook_deliveries.c.status == "pending")
        # A disabled user's deliveries wait (`mailcore user disable`): none leaves with the
        # user's mail until the user is enabled again.
        .where(users.c.is_active.is_(True))
        .where(webhook_deliveries.c.next_attempt_at <= now)
        .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
        .limit(limit * 8)
    )
    if full:
        q = q.where(webhook_deliveries.c.webhook_id.not_in(full))
    if full_users:
        q = q.where(webhook_deliveries.c.user_id.not_in(full_users))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(of=webhook_deliveries, skip_locked=True)
    rows: list[Any] = []
    for r in conn.execute(q):
        if len(rows) >= limit:
            break
        if (busy.get(r.webhook_id, 0) >= per_webhook
                or busy_users.get(r.user_id, 0) >= per_user):
            continue
        busy[r.webhook_id] = busy.get(r.webhook_id, 0) + 1
        busy_users[r.user_id] = busy_users.get(r.user_id, 0) + 1
        rows.append(r)
    if rows:
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id.in_([r.id for r in rows]))
            .values(next_attempt_at=lease_until)
        )
    return [
        Due(id=r.id, webhook_id=r.webhook_id, user_id=r.user_id, delivery_id=r.delivery_uuid,
            event=r.event, payload=r.payload, attempts=r.attempts, url=r.url,
            secret_enc=bytes(r.secret_enc), active=bool(r.active), lease=lease_until)
        for r in rows
    ]


def thd_record_attempt(
    conn: Connection, delivery_id: int, *, lease: float, now: float, status: str,
    attempts: int, next_attempt_at: float, status_code: int | None, error: str | None,
    disable_webhook: int | None = None,
) -> str:
    """Record one attempt of a delivery claimed with `lease` (`Due.lease`), if the claim
    still stands: RECORDED. A node that stalled past its lease (a pause, a slow store)
    finds the delivery taken over by another node, or already recorded by it: its outcome
    is then dropped, and the other node's stands (an overwrite would make a delivered one
    pending again, to be posted once more): TAKEN. A delivery whose row is gone (its
    webhook or its user was deleted meanwhile) has nothing to record: GONE."""
    _d = webhook_deliveries.c
    recorded = conn.execute(
        update(webhook_deliveries)
        .where(_d.id == delivery_id, _d.status == "pending", _d.next_attempt_at == lease)
        .values(
            status=status, attempts=attempts, next_attempt_at=next_attempt_at,
            last_attempt_at=now, last_status_code=status_code, last_error=error,
            completed_at=None if status == "pending" else now,
        )
    ).rowcount
    if not recorded:
        still = conn.execute(select(_d.id).where(_d.id == delivery_id)).first()
        return TAKEN if still is not None else GONE
    if disable_webhook is not None:
        conn.execute(update(webhooks).where(webhooks.c.id == disable_webhook).values(
            active=False))
    return RECORDED


# What thd_record_attempt did with an attempt.
RECORDED, TAKEN, GONE = "recorded", "taken", "gone"


PRUNE_BATCH = 1000  # finished deliveries deleted a transaction by the hourly prune


def thd_prune(conn: Connection, before: float, batch: int = PRUNE_BATCH) -> int:
    """Drop up to `batch` finished deliveries that completed before `before`; how many."""
    d = webhook_deliveries.c
    ids = select(d.id).where(d.status != "pending", d.completed_at < before) \
        .limit(batch).scalar_subquery()
    return int(conn.execute(delete(webhook_deliveries).where(d.id.in_(ids))).rowcount or 0)


def _thread_entries(conn: Connection, user_id: int, thread_ids: Sequence[int]
                    ) -> list[dict[str, Any]]:
    """thread.updated entries: each thread's size and its newest e-mail, not one of the
    accounts `thd_hidden_accounts` names (the IMAP2API's `without_pop`), read only if the
    rows' statement finds one (`pop_mail`)."""
    rows = conn.execute(
        select(messages.c.id, messages.c.thread_id, messages.c.date, messages.c.account_id,
               case((pop_mail(), 1), else_=0).label("pop"))
        .where(messages.c.user_id == bindparam("user_id"))
        .where(messages.c.thread_id.in_(list(thread_ids))), {"user_id": user_id}
    ).all()
    hidden = thd_hidden_accounts(conn, user_id) if rows and rows[0].pop else ()
    newest: dict[int, tuple[Any, int]] = {}
    for r in rows:
        if r.account_id in hidden:
            continue
        key = (utc(r.date) or datetime.datetime.min.replace(tzinfo=datetime.UTC), r.id)
        if r.thread_id not in newest or key > newest[r.thread_id]:
            newest[r.thread_id] = key
    latest = {d.summary.id: d.summary for d in thd_get_messages(
        conn, user_id, [k[1] for k in newest.values()], hidden
    )}
    out = []
    for tid in thread_ids:
        if tid in newest and newest[tid][1] in latest:
            summary = latest[newest[tid][1]]
            out.append({"thread_id": thread_ref(tid),
                        "thread_count": summary.thread_count,
                        "latest_email": email_json(summary)})
    return out


@dataclass
class _Subscriber:
    id: int
    events: tuple[str, ...]


def thd_subscribers(conn: Connection, user_id: int) -> list[_Subscriber]:
    """The user's active webhooks and the events each wants."""
    return [
        _Subscriber(r.id, tuple(e for e in r.events.split(",") if e))
        for r in conn.execute(
            select(webhooks.c.id, webhooks.c.events)
            .where(webhooks.c.user_id == user_id, webhooks.c.active.is_(True))
        )
    ]


def thd_enqueue(
    conn: Connection, user_id: int, event: str, data_list: Sequence[dict[str, Any]],
    subscribers: Sequence[_Subscriber], created: datetime.datetime, now: float,
) -> int:
    """One delivery row per (subscribed webhook, data); returns how many. `subscribers` may
    have been read in an earlier transaction: a webhook deleted (or turned off) since gets no
    row, and the others still get theirs (a row for a deleted webhook would fail its foreign
    key and take the whole insert with it). The webhooks found are locked against deletion
    (FOR KEY SHARE) until this transaction ends."""
    wanted = [hook.id for hook in subscribers if event in hook.events]
    if not wanted:
        return 0
    live = set(conn.execute(
        select(webhooks.c.id)
        .where(webhooks.c.id.in_(wanted), webhooks.c.user_id == user_id,
               webhooks.c.active.is_(True))
        .with_for_update(read=True, key_share=True)
    ).scalars())
    rows = []
    for hook in subscribers:
        if event not in hook.events or hook.id not in live:
            continue
        for data in data_list:
            delivery_id = str(uuid.uuid4())
            rows.append({
                "webhook_id": hook.id, "user_id": user_id, "delivery_uuid": delivery_id,
                "event": event, "payload": _event_payload(delivery_id, event, created, data),
                "status": "pending", "attempts": 0, "next_attempt_at": now,
                "created_at": now,
            })
    if rows:
        conn.execute(insert(webhook_deliveries), rows)
    return len(rows)

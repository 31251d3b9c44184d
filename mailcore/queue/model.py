"""The queue's rows and every transaction on them (`thd_…`: blocking, run on the DB pool).

A recipient is active while `queued` or `deferred`, final once `delivered`, `bounced` or
`quarantined`. A message is finished when none of its recipients is active: its body is then
dropped (`done_at` set) and the row stays as the log `queue show` reads until pruned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import (
    Connection,
    LargeBinary,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)

from mailcore.smtp.dsn import MAX_DETAIL
from mailcore.smtp.envelope import Envelope
from mailcore.store.counters import thd_bump_counter
from mailcore.store.schema import domains, queue_messages, queue_recipients
from mailcore.text import storable

QUEUED = "queued"
DEFERRED = "deferred"
DELIVERED = "delivered"
BOUNCED = "bounced"
QUARANTINED = "quarantined"
ACTIVE = (QUEUED, DEFERRED)
# Raised by every `queue flush` (mailcore.store.counters); each node's sweep reads it.
FLUSH_COUNTER = "queue_flush"
FINAL = (DELIVERED, BOUNCED, QUARANTINED)

_m = queue_messages.c
_r = queue_recipients.c

T = TypeVar("T")


@dataclass(frozen=True)
class Rcpt:
    """One active recipient the runner holds: enough to route and report it."""

    id: int
    address: str
    domain_id: int | None
    attempts: int
    charged: bool = False  # its filtering tokens were charged when it was stored


@dataclass
class Job:
    """One message's recipients that go to one next hop in one SMTP transaction."""

    message_id: str
    mail_from: str
    kind: str
    created_at: float
    size: int
    recipients: list[Rcpt] = field(default_factory=list)
    # When this node's lease on the recipients ends, as written when it took them (the
    # runner moves it by the renewals that commit in time; see QueueRunner.leases_renewed).
    lease_until: float = math.inf


@dataclass(frozen=True)
class NewMessage:
    """A message to insert: what the spool commits in one group."""

    queue_id: str
    envelope: Envelope
    body: bytes
    leased: bool
    # The recipient domains whose filtering tokens were charged in the commit that stores
    # the message: their recipients are stored `charged`.
    paid: frozenset[int] = frozenset()


class LocalStored(NamedTuple):
    """What a local store (mailcore.queue.runner.LocalStore.thd_store) did with a message's
    recipients: the ids stored (now or before), those whose mailbox is full, those whose
    domain is suspended."""

    stored: set[int]
    full: set[int]
    suspended: set[int]


@dataclass(frozen=True)
class Result:
    """The outcome for one recipient, as the runner reports it (`detail` at most
    MAX_DETAIL characters: the runner cuts it before the journal and the store see it)."""

    rcpt_id: int
    message_id: str
    state: str  # delivered | deferred | bounced | quarantined
    detail: str
    hop: str = ""
    next_attempt_at: float = 0.0
    count_attempt: bool = True


@dataclass(frozen=True)
class BouncedRecipient:
    """A failed recipient of a finished message, for its one DSN."""

    address: str
    detail: str
    hop: str


@dataclass(frozen=True)
class FinishedWithFailures:
    """A message that just finished with at least one bounced recipient."""

    message_id: str
    mail_from: str
    kind: str
    created_at: float
    headers: bytes
    failures: tuple[BouncedRecipient, ...]


# -- accepting ------------------------------------------------------------------------------


def thd_insert_messages(
    conn: Connection, messages: Sequence[NewMessage], node_id: str, now: float,
    lease_until: float,
) -> list[list[int]]:
    """Insert messages and their recipients; returns the recipient ids of each message.

    Recipients of a `leased` message are claimed by this node at once, so that the accepting
    node can deliver them without waiting for the sweeper.
    """
    ids = _hot(conn).insert_messages(conn, messages, node_id, now, lease_until)
    return _ids_by_message(messages, ids)


def _ids_by_message(messages: Sequence[NewMessage], ids: Sequence[int]) -> list[list[int]]:
    """The recipient ids of all `messages` (in order) split into one list per message."""
    out: list[list[int]] = []
    i = 0
    for m in messages:
        n = len(m.envelope.recipients)
        out.append(list(ids[i : i + n]))
        i += n
    return out


# -- claiming and leases --------------------------------------------------------------------


def thd_claim_due(
    conn: Connection, node_id: str, now: float, lease_until: float, limit: int
) -> list[Job]:
    """Lease up to `limit` due recipients whose lease is absent or lapsed; return them as jobs.

    On PostgreSQL the candidate rows are locked with SKIP LOCKED, so concurrent claimers on
    other nodes pass over them; on SQLite the write transaction (BEGIN IMMEDIATE) serialises
    claims.
    """
    if limit <= 0:
        return []
    candidates = (
        select(_r.id)
        .where(
            _r.state.in_(ACTIVE),
            _r.next_attempt_at <= now,
            or_(_r.lease_until.is_(None), _r.lease_until < now),
        )
        .order_by(_r.next_attempt_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    ids = [row[0] for row in conn.execute(candidates)]
    if not ids:
        return []
    conn.execute(
        update(queue_recipients)
        .where(_r.id.in_(ids))
        .values(lease_owner=node_id, lease_until=lease_until)
    )
    return _jobs_for(conn, ids, lease_until)


def _jobs_for(conn: Connection, rcpt_ids: Sequence[int], lease_until: float) -> list[Job]:
    """Load recipients and their messages' envelopes (never the body), grouped per message."""
    rows = conn.execute(
        select(
            _r.id, _r.message_id, _r.address, _r.domain_id, _r.attempts, _r.charged,
            _m.mail_from, _m.kind, _m.created_at, _m.size,
        )
        .join(queue_messages, _m.id == _r.message_id)
        .where(_r.id.in_(list(rcpt_ids)))
        .order_by(_r.id)
    ).all()
    jobs: dict[str, Job] = {}
    for row in rows:
        job = jobs.get(row.message_id)
        if job is None:
            job = jobs[row.message_id] = Job(
                row.message_id, row.mail_from, row.kind, row.created_at, row.size,
                lease_until=lease_until,
            )
        job.recipients.append(Rcpt(row.id, row.address, row.domain_id, row.attempts,
                                   bool(row.charged)))
    return list(jobs.values())


def thd_renew_leases(conn: Connection, node_id: str, lease_until: float) -> int:
    """Extend every active lease this node holds; returns how many."""
    result = conn.execute(
        update(queue_recipients)
        .where(_r.lease_owner == node_id, _r.state.in_(ACTIVE))
        .values(lease_until=lease_until)
    )
    return result.rowcount or 0


def thd_release_leases(conn: Connection, node_id: str, rcpt_ids: Sequence[int] | None) -> int:
    """Give up this node's leases (all of them, or those listed) so any node may claim them."""
    stmt = update(queue_recipients).where(_r.lease_owner == node_id)
    if rcpt_ids is not None:
        if not rcpt_ids:
            return 0
        stmt = stmt.where(_r.id.in_(list(rcpt_ids)))
    result = conn.execute(stmt.values(lease_owner=None, lease_until=None))
    return result.rowcount or 0


def thd_load_bodies(conn: Connection, message_ids: Sequence[str]) -> dict[str, bytes]:
    """The bodies of messages about to be sent."""
    rows = conn.execute(
        select(_m.id, _m.body).where(_m.id.in_(list(message_ids)))
    ).all()
    return {row.id: bytes(row.body) for row in rows if row.body is not None}


def thd_depth(conn: Connection) -> int:
    """Active recipients in the whole queue (for the queue-depth gauge)."""
    return int(
        conn.execute(
            select(func.count()).select_from(queue_recipients).where(_r.state.in_(ACTIVE))
        ).scalar_one()
    )


# -- results --------------------------------------------------------------------------------


def thd_apply_results(
    conn: Connection, node_id: str, now: float, results: Sequence[Result]
) -> tuple[list[FinishedWithFailures], int]:
    """Record outcomes in one transaction, finish messages that have no active recipient.

    Only rows this node still leases are changed: if another node took a lease over (ours
    lapsed), its outcome wins. Returns the messages that finished with bounced recipients
    (each gets exactly one DSN, made by the caller in this same transaction) and how many
    results were applied. A result's detail is often a next hop's reply, which may hold NUL:
    it is stored `storable`, as a client's HELO is, since PostgreSQL would refuse the whole
    group commit for it.
    """
    if not results:
        return [], 0
    hot = _hot(conn)
    applied = hot.apply_results(conn, node_id, now, results)
    message_ids = sorted({r.message_id for r in results})
    if conn.dialect.name == "postgresql":
        _lock_messages(conn, sorted({r.message_id for r in results if r.state in FINAL}))
    # The common case: every result of a message here is final and none is a bounce, so it
    # finishes without a DSN, and one guarded UPDATE does it (instead of a query for the
    # finished, one for their bounces, and the UPDATE). If any of them did not finish that
    # way (a recipient still active, or one that bounced earlier), all go the full way.
    clean = _clean_among(results)
    if clean and hot.finish_clean(conn, clean, now) == len(clean):
        done = set(clean)
        message_ids = [m for m in message_ids if m not in done]
    finished = _finish_messages(conn, hot, message_ids, now)[1] if message_ids else []
    return finished, applied


def _lock_messages(conn: Connection, message_ids: Sequence[str]) -> None:
    """Lock the rows of messages that may finish (PostgreSQL), in id order so that two
    transactions never wait on each other, before asking whether any recipient is left.

    Under READ COMMITTED two nodes recording the last two recipients of one message at
    once each saw the other's still active, and neither finished it (no DSN, the body
    kept). Now the second waits here for the first's commit, and its check, a statement
    after the lock, sees it. SQLite serialises writers already (BEGIN IMMEDIATE)."""
    if message_ids:
        conn.execute(_LOCK_MESSAGES, {"ids": list(message_ids)}).all()


def _clean_among(results: Sequence[Result]) -> list[str]:
    """The messages all of whose results here are delivered or quarantined."""
    unclean = {r.message_id for r in results if r.state not in (DELIVERED, QUARANTINED)}
    return sorted({r.message_id for r in results} - unclean)


def _finish_messages(
    conn: Connection, hot: _HotStatements, message_ids: Sequence[str], now: float
) -> tuple[int, list[FinishedWithFailures]]:
    """Mark messages with no active recipient done and drop their bodies; returns how many,
    and those that finished with bounced recipients."""
    done_ids, bounced = hot.done_and_bounced(conn, message_ids)
    if not done_ids:
        return 0, []
    failures: dict[str, list[BouncedRecipient]] = {}
    for message_id, address, last_error, next_hop in bounced:
        failures.setdefault(message_id, []).append(
            BouncedRecipient(address, last_error or "", next_hop or "")
        )
    out: list[FinishedWithFailures] = []
    if failures:
        # Only the start of each body, where its header section is (the DSN returns no
        # more): a group of bounces of 50 MB messages loaded every body whole.
        head = func.substr(_m.body, 1, HEADER_LIMIT, type_=LargeBinary).label("head")
        body_rows = conn.execute(
            select(_m.id, _m.mail_from, _m.kind, _m.created_at, head).where(
                _m.id.in_(list(failures))
            )
        ).all()
        for row in body_rows:
            out.append(
                FinishedWithFailures(
                    row.id, row.mail_from, row.kind, row.created_at,
                    header_block(bytes(row.head or b"")), tuple(failures[row.id]),
                )
            )
    hot.finish(conn, done_ids, now)
    return len(done_ids), out


def thd_finish_stranded(
    conn: Connection, now: float, limit: int
) -> tuple[int, list[FinishedWithFailures]]:
    """Finish up to `limit` messages that no active recipient keeps but that were never
    marked done (two nodes recording their last recipients at once left them so before
    `_lock_messages`): returns how many it finished, and those with bounced recipients,
    for their DSN."""
    ids = [
        row[0]
        for row in conn.execute(
            select(_m.id)
            .where(_m.done_at.is_(None),
                   ~exists().where(_r.message_id == _m.id, _r.state.in_(ACTIVE)))
            .order_by(_m.id)
            .limit(limit)
        )
    ]
    if not ids:
        return 0, []
    if conn.dialect.name == "postgresql":
        _lock_messages(conn, ids)
    return _finish_messages(conn, _hot(conn), ids, now)


# The most of a message's header section a DSN returns.
HEADER_LIMIT = 65536


def header_block(body: bytes, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of a message (up to the first empty line), capped in size."""
    end = body.find(b"\r\n\r\n")
    if end < 0:
        end = body.find(b"\n\n")
    head = body if end < 0 else body[: end + 2]
    return head[:limit]


# A domain row that is served: one still waiting for proof of ownership
# (`mailcore.gateway.verification`) is not.
SERVED = or_(domains.c.verify_token.is_(None), domains.c.verified_at.is_not(None))


def thd_domain_for(conn: Connection, domain: str) -> int | None:
    """The id of a served domain by name (lower-case A-label), or None. A domain still
    waiting for proof of ownership is not served: a claim on gmail.com must not draw
    bounces to gmail.com addresses to the claimant's next hop."""
    row = conn.execute(select(domains.c.id).where(domains.c.name == domain, SERVED)).first()
    return None if row is None else int(row[0])


# A served domain this gateway's own mail (bounces, Mail API and safedrop mail) is routed
# to directly: one proved in DNS or vouched for by the operator (`mailcore domain add`).
# Without that, a user could claim any name through the API (`[protecmail] verify_domains`
# off) and draw every user's mail to it to their own server; such mail goes the way the
# world's mail goes instead (`mailcore.queue.routing.Router` takes the served hop when that
# way leads back to us).
VOUCHED = domains.c.verified_at.is_not(None)


def thd_vouched_domain_for(conn: Connection, domain: str) -> int | None:
    """The id of a served domain by name (lower-case A-label) that this gateway's own mail
    may be routed to directly (`VOUCHED`), or None."""
    row = conn.execute(
        select(domains.c.id).where(domains.c.name == domain, SERVED, VOUCHED)).first()
    return None if row is None else int(row[0])


def thd_prune(conn: Connection, before: float) -> int:
    """Forget finished messages older than `before` (their recipients go with them)."""
    old = [
        row[0]
        for row in conn.execute(
            select(_m.id).where(_m.done_at.is_not(None), _m.done_at < before).limit(5000)
        )
    ]
    if not old:
        return 0
    conn.execute(delete(queue_recipients).where(_r.message_id.in_(old)))
    conn.execute(delete(queue_messages).where(_m.id.in_(old)))
    return len(old)


# -- the group commit's statements, one set per backend ---------------------------------------
#
# Accepting, results and finishing run in the spool's group commits, on the commit stream's
# one pool thread, where every millisecond delays the next 250. On SQLite they go straight
# to the sqlite3 driver with multi-row statements: SQLAlchemy's work per statement and one
# driver step per row (the driver releases the GIL at every step and must take it back, which
# in a busy daemon is what costs) were measured at several percent of the relay's throughput.
# Any other backend gets the same SQL through SQLAlchemy Core. `_hot` picks the set for a
# connection; the `thd_…` functions call it and never ask which backend they are on.

# A bounced recipient of a finished message: message id, address, last error, next hop.
_Bounced = tuple[str, str, str | None, str | None]


class _HotStatements(Protocol):
    """The group commit's statements on one backend: the same SQL and results on each."""

    def insert_messages(
        self, conn: Connection, messages: Sequence[NewMessage], node_id: str, now: float,
        lease_until: float,
    ) -> list[int]:
        """Insert messages and their recipients (see `thd_insert_messages`); returns the
        recipients' ids in order."""

    def apply_results(
        self, conn: Connection, node_id: str, now: float, results: Sequence[Result]
    ) -> int:
        """Record outcomes on the recipients this node leases; returns how many."""

    def finish_clean(self, conn: Connection, message_ids: Sequence[str], now: float) -> int:
        """Finish those of `message_ids` that have no active and no bounced recipient (and
        are not finished yet); returns how many it finished."""

    def done_and_bounced(
        self, conn: Connection, message_ids: Sequence[str]
    ) -> tuple[list[str], list[_Bounced]]:
        """The messages among `message_ids` with no active recipient left (not yet marked
        done), and the bounced recipients of those in recipient order."""

    def finish(self, conn: Connection, message_ids: Sequence[str], now: float) -> None:
        """Mark messages done and drop their bodies."""


# Built once: per call they would cost more than their SQL.
_INSERT_MESSAGES = queue_messages.insert()
_INSERT_RECIPIENTS = queue_recipients.insert().returning(_r.id, sort_by_parameter_order=True)
_APPLY_RESULT = (
    update(queue_recipients)
    .where(_r.id == bindparam("rid"), _r.lease_owner == bindparam("owner"))
    .values(
        state=bindparam("state"),
        attempts=_r.attempts + bindparam("inc"),
        next_attempt_at=bindparam("next_at"),
        last_error=bindparam("detail"),
        next_hop=func.coalesce(bindparam("hop"), _r.next_hop),
        updated_at=bindparam("now"),
        lease_owner=None,
        lease_until=None,
    )
)
_LOCK_MESSAGES = (
    select(_m.id)
    .where(_m.id.in_(bindparam("ids", expanding=True)))
    .order_by(_m.id)
    .with_for_update(key_share=True)
)
_DONE_AMONG = select(_m.id).where(
    _m.id.in_(bindparam("ids", expanding=True)),
    _m.done_at.is_(None),
    ~exists().where(_r.message_id == _m.id, _r.state.in_(ACTIVE)),
)
_BOUNCED_AMONG = (
    select(_r.message_id, _r.address, _r.last_error, _r.next_hop)
    .where(_r.message_id.in_(bindparam("ids", expanding=True)), _r.state == BOUNCED)
    .order_by(_r.id)
)
_FINISH = (
    update(queue_messages)
    .where(_m.id.in_(bindparam("ids", expanding=True)))
    .values(body=None, done_at=bindparam("now"))
)
# Recipient states that keep a message from finishing without a DSN.
_UNCLEAN = (*ACTIVE, BOUNCED)
_FINISH_CLEAN = (
    update(queue_messages)
    .where(
        _m.id.in_(bindparam("ids", expanding=True)),
        _m.done_at.is_(None),
        ~exists().where(_r.message_id == _m.id, _r.state.in_(_UNCLEAN)),
    )
    .values(body=None, done_at=bindparam("now"))
)


class _CoreStatements:
    """Through SQLAlchemy Core, on any backend (PostgreSQL in production)."""

    def insert_messages(
        self, conn: Connection, messages: Sequence[NewMessage], node_id: str, now: float,
        lease_until: float,
    ) -> list[int]:
        conn.execute(
            _INSERT_MESSAGES,
            [
                {
                    "id": m.queue_id,
                    "kind": m.envelope.kind,
                    "mail_from": m.envelope.mail_from,
                    "client_ip": m.envelope.client_ip,
                    "helo": storable(m.envelope.helo),
                    "tls": m.envelope.tls,
                    "size": len(m.body),
                    "body": m.body,
                    "created_at": now,
                    "done_at": None,
                }
                for m in messages
            ],
        )
        rows = [
            {
                "message_id": m.queue_id,
                "address": r.address,
                "domain_id": r.domain_id,
                "state": QUEUED,
                "attempts": 0,
                "next_attempt_at": now,
                "lease_owner": node_id if m.leased else None,
                "lease_until": lease_until if m.leased else None,
                "last_error": None,
                "next_hop": None,
                "updated_at": now,
                "charged": r.domain_id in m.paid,
            }
            for m in messages
            for r in m.envelope.recipients
        ]
        if not rows:
            return []
        return [row[0] for row in conn.execute(_INSERT_RECIPIENTS, rows)]

    def apply_results(
        self, conn: Connection, node_id: str, now: float, results: Sequence[Result]
    ) -> int:
        params = [
            {
                "rid": r.rcpt_id,
                "owner": node_id,
                "state": r.state,
                "detail": storable(r.detail[:MAX_DETAIL]),
                "hop": r.hop[:300] or None,
                "next_at": r.next_attempt_at if r.state == DEFERRED else now,
                "inc": 1 if r.count_attempt else 0,
                "now": now,
            }
            for r in results
        ]
        return conn.execute(_APPLY_RESULT, params).rowcount or 0

    def finish_clean(self, conn: Connection, message_ids: Sequence[str], now: float) -> int:
        return int(conn.execute(_FINISH_CLEAN, {"ids": list(message_ids), "now": now})
                   .rowcount or 0)

    def done_and_bounced(
        self, conn: Connection, message_ids: Sequence[str]
    ) -> tuple[list[str], list[_Bounced]]:
        done_ids = [row[0] for row in conn.execute(_DONE_AMONG, {"ids": list(message_ids)})]
        if not done_ids:
            return [], []
        rows = conn.execute(_BOUNCED_AMONG, {"ids": done_ids}).all()
        return done_ids, [(r[0], r[1], r[2], r[3]) for r in rows]

    def finish(self, conn: Connection, message_ids: Sequence[str], now: float) -> None:
        conn.execute(_FINISH, {"ids": list(message_ids), "now": now})


# The same statements for the sqlite3 driver. Multi-row VALUES: one driver step for many rows.
_SQLITE_INSERT_MESSAGES = (
    "INSERT INTO queue_messages (id, kind, mail_from, client_ip, helo, tls, size, body, "
    "created_at, done_at) VALUES "
)
_SQLITE_MESSAGE_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)"
_SQLITE_INSERT_RECIPIENTS = (
    "INSERT INTO queue_recipients (message_id, address, domain_id, state, attempts, "
    "next_attempt_at, lease_owner, lease_until, last_error, next_hop, updated_at, charged) "
    "VALUES "
)
_SQLITE_RECIPIENT_ROW = "(?, ?, ?, ?, 0, ?, ?, ?, NULL, NULL, ?, ?)"
_SQLITE_APPLY_RESULTS = (
    "UPDATE queue_recipients SET state = v.column2, attempts = attempts + v.column3, "
    "next_attempt_at = v.column4, last_error = v.column5, "
    "next_hop = coalesce(v.column6, next_hop), updated_at = ?, lease_owner = NULL, "
    "lease_until = NULL FROM (VALUES {rows}) AS v "
    "WHERE queue_recipients.id = v.column1 AND queue_recipients.lease_owner = ?"
)
_SQLITE_RESULT_ROW = "(?, ?, ?, ?, ?, ?)"
_SQLITE_DONE_AMONG = (
    "SELECT group_concat(m.id, ' ') FROM queue_messages AS m WHERE m.id IN ({ids}) "
    "AND m.done_at IS NULL AND NOT EXISTS (SELECT 1 FROM queue_recipients AS r "
    "WHERE r.message_id = m.id AND r.state IN ({active}))"
)
_SQLITE_BOUNCED_AMONG = (
    "SELECT message_id, address, last_error, next_hop FROM queue_recipients "
    "WHERE message_id IN ({ids}) AND state = ? ORDER BY id"
)
_SQLITE_FINISH = "UPDATE queue_messages SET body = NULL, done_at = ? WHERE id IN ({ids})"
_SQLITE_FINISH_CLEAN = (
    "UPDATE queue_messages SET body = NULL, done_at = ? WHERE id IN ({ids}) "
    "AND done_at IS NULL AND NOT EXISTS (SELECT 1 FROM queue_recipients AS r "
    "WHERE r.message_id = queue_messages.id AND r.state IN ({states}))"
)
# Bound parameters per statement: 999 is the smallest limit any SQLite build has.
_SQLITE_MAX_PARAMS = 999


class _SQLiteStatements:
    """Straight through the sqlite3 driver, each statement split only where the parameter
    limit demands."""

    def insert_messages(
        self, conn: Connection, messages: Sequence[NewMessage], node_id: str, now: float,
        lease_until: float,
    ) -> list[int]:
        with closing(_driver_cursor(conn)) as cursor:
            _insert_rows(cursor, _SQLITE_INSERT_MESSAGES, _SQLITE_MESSAGE_ROW, [
                (m.queue_id, m.envelope.kind, m.envelope.mail_from, m.envelope.client_ip,
                 storable(m.envelope.helo), 1 if m.envelope.tls else 0, len(m.body), m.body,
                 now)
                for m in messages
            ])
            rows = [
                (m.queue_id, r.address, r.domain_id, QUEUED, now,
                 *((node_id, lease_until) if m.leased else (None, None)), now,
                 1 if r.domain_id in m.paid else 0)
                for m in messages
                for r in m.envelope.recipients
            ]
            return _insert_rows(cursor, _SQLITE_INSERT_RECIPIENTS, _SQLITE_RECIPIENT_ROW, rows)

    def apply_results(
        self, conn: Connection, node_id: str, now: float, results: Sequence[Result]
    ) -> int:
        latest = {r.rcpt_id: r for r in results}  # a recipient reported twice: the last wins
        rows = [
            (r.rcpt_id, r.state, 1 if r.count_attempt else 0,
             r.next_attempt_at if r.state == DEFERRED else now, storable(r.detail[:MAX_DETAIL]),
             r.hop[:300] or None)
            for r in latest.values()
        ]
        per = (_SQLITE_MAX_PARAMS - 2) // len(_SQLITE_RESULT_ROW.split(","))
        applied = 0
        with closing(_driver_cursor(conn)) as cursor:
            for chunk in _chunks(rows, per):
                cursor.execute(
                    _SQLITE_APPLY_RESULTS.format(
                        rows=", ".join([_SQLITE_RESULT_ROW] * len(chunk))),
                    [now, *(value for row in chunk for value in row), node_id],
                )
                applied += int(cursor.rowcount or 0)
        return applied

    def finish_clean(self, conn: Connection, message_ids: Sequence[str], now: float) -> int:
        finished = 0
        with closing(_driver_cursor(conn)) as cursor:
            for chunk in _chunks(message_ids, _SQLITE_MAX_PARAMS - 1 - len(_UNCLEAN)):
                cursor.execute(
                    _SQLITE_FINISH_CLEAN.format(ids=_marks(len(chunk)),
                                                states=_marks(len(_UNCLEAN))),
                    [now, *chunk, *_UNCLEAN],
                )
                finished += int(cursor.rowcount or 0)
        return finished

    def done_and_bounced(
        self, conn: Connection, message_ids: Sequence[str]
    ) -> tuple[list[str], list[_Bounced]]:
        done_ids: list[str] = []
        bounced: list[_Bounced] = []
        with closing(_driver_cursor(conn)) as cursor:
            for chunk in _chunks(message_ids, _SQLITE_MAX_PARAMS - len(ACTIVE)):
                (found,) = cursor.execute(
                    _SQLITE_DONE_AMONG.format(ids=_marks(len(chunk)),
                                              active=_marks(len(ACTIVE))),
                    [*chunk, *ACTIVE],
                ).fetchone()
                done_ids.extend(found.split() if found else ())  # queue ids have no spaces
            for chunk in _chunks(done_ids, _SQLITE_MAX_PARAMS - 1):
                bounced.extend(cursor.execute(
                    _SQLITE_BOUNCED_AMONG.format(ids=_marks(len(chunk))), [*chunk, BOUNCED]
                ).fetchall())
        return done_ids, bounced

    def finish(self, conn: Connection, message_ids: Sequence[str], now: float) -> None:
        with closing(_driver_cursor(conn)) as cursor:
            for chunk in _chunks(message_ids, _SQLITE_MAX_PARAMS - 1):
                cursor.execute(_SQLITE_FINISH.format(ids=_marks(len(chunk))), [now, *chunk])


def _driver_cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _chunks(items: Sequence[T], per: int) -> Iterator[Sequence[T]]:
    """`items` in slices of at most `per`."""
    for i in range(0, len(items), per):
        yield items[i : i + per]


def _insert_rows(
    cursor: Any, head: str, row: str, rows: Sequence[tuple[Any, ...]]
) -> list[int]:
    """Insert `rows` with as few multi-row INSERT statements as the parameter limit allows;
    returns the rowid each row got.

    The rowids come from `lastrowid` rather than a query: under the write lock (BEGIN
    IMMEDIATE) a multi-row INSERT gives rows without an explicit rowid max(rowid) + 1, + 2, …
    in VALUES order (SQLite's rowid algorithm; the table never nears the largest rowid)."""
    if not rows:
        return []
    ids: list[int] = []
    for chunk in _chunks(rows, max(1, _SQLITE_MAX_PARAMS // len(rows[0]))):
        cursor.execute(head + ", ".join([row] * len(chunk)),
                       [value for r in chunk for value in r])
        last = int(cursor.lastrowid)
        ids.extend(range(last - len(chunk) + 1, last + 1))
    return ids


# The sqlite3 driver's own statements where it can have them; SQLAlchemy Core elsewhere.
_HOT_BY_DRIVER: dict[str, _HotStatements] = {"pysqlite": _SQLiteStatements()}
_CORE_STATEMENTS = _CoreStatements()


def _hot(conn: Connection) -> _HotStatements:
    """The group commit's statements for `conn`'s backend and driver."""
    return _HOT_BY_DRIVER.get(conn.dialect.driver, _CORE_STATEMENTS)


# -- operating (the queue CLI) ----------------------------------------------------------------


@dataclass(frozen=True)
class RecipientView:
    address: str
    state: str
    attempts: int
    next_attempt_at: float
    lease_owner: str | None
    last_error: str | None
    next_hop: str | None
    updated_at: float


@dataclass(frozen=True)
class MessageView:
    id: str
    kind: str
    mail_from: str
    size: int
    created_at: float
    done_at: float | None
    client_ip: str
    recipients: tuple[RecipientView, ...]


def _views(conn: Connection, message_rows: Iterable[Any]) -> list[MessageView]:
    msgs = list(message_rows)
    if not msgs:
        return []
    ids = [m.id for m in msgs]
    rcpts: dict[str, list[RecipientView]] = {}
    for row in conn.execute(
        select(queue_recipients).where(_r.message_id.in_(ids)).order_by(_r.id)
    ):
        rcpts.setdefault(row.message_id, []).append(
            RecipientView(
                row.address, row.state, row.attempts, row.next_attempt_at, row.lease_owner,
                row.last_error, row.next_hop, row.updated_at,
            )
        )
    return [
        MessageView(
            m.id, m.kind, m.mail_from, m.size, m.created_at, m.done_at, m.client_ip,
            tuple(rcpts.get(m.id, ())),
        )
        for m in msgs
    ]


_HEAD = (_m.id, _m.kind, _m.mail_from, _m.size, _m.created_at, _m.done_at, _m.client_ip)


def thd_list_active(conn: Connection, limit: int) -> list[MessageView]:
    """Messages with at least one active recipient, oldest first."""
    active = exists().where(_r.message_id == _m.id, _r.state.in_(ACTIVE))
    rows = conn.execute(
        select(*_HEAD).where(_m.done_at.is_(None), active).order_by(_m.created_at).limit(limit)
    )
    return _views(conn, rows)


def thd_show(conn: Connection, message_id: str) -> MessageView | None:
    """One message and its recipients, finished or not."""
    rows = conn.execute(select(*_HEAD).where(_m.id == message_id)).all()
    views = _views(conn, rows)
    return views[0] if views else None


def thd_flush(conn: Connection, now: float) -> int:
    """Make every deferred recipient due now, and tell every node (the `queue_flush` change
    counter) to try the next hops it found unusable again; returns how many recipients."""
    result = conn.execute(
        update(queue_recipients)
        .where(_r.state == DEFERRED, _r.next_attempt_at > now)
        .values(next_attempt_at=now)
    )
    thd_bump_counter(conn, FLUSH_COUNTER)
    return result.rowcount or 0


def thd_delete(conn: Connection, message_id: str) -> bool:
    """Remove a message from the queue without delivering or bouncing it."""
    found = conn.execute(select(_m.id).where(_m.id == message_id)).first()
    if found is None:
        return False
    conn.execute(delete(queue_recipients).where(_r.message_id == message_id))
    conn.execute(delete(queue_messages).where(_m.id == message_id))
    return True


def thd_counts(conn: Connection) -> dict[str, int]:
    """Recipients per state."""
    rows = conn.execute(
        select(_r.state, func.count()).group_by(_r.state)
    ).all()
    return {row[0]: int(row[1]) for row in rows}


__all__ = [
    "ACTIVE", "BOUNCED", "DEFERRED", "DELIVERED", "FINAL", "QUARANTINED", "QUEUED",
    "BouncedRecipient", "FinishedWithFailures", "Job", "MessageView", "NewMessage", "Rcpt",
    "RecipientView", "Result",
]

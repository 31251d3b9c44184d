"""Migrate and restore jobs: the durable job rows, and the runner that runs each on one node.

A job (`mailbox_jobs`, see `mailcore.store.schema.jobs`) is made queued; the `JobRunner`
service of every node looks for due jobs every `poll` seconds (and at once when a job is
made here), leases each in `job_leases` as `mailbox-job-<id>` before it runs it, renews the
lease every third of `LEASE` while it runs, and gives it up when it stops. So on several
nodes sharing PostgreSQL one node runs a job; a node that dies holds it at most `LEASE`
seconds (the same node restarted, with the same node id, takes it back at once). A job still
marked running when its node died resumes by itself: what it recorded stays, and messages it
had in flight are looked for at the destination before anything is sent again
(`mailcore.fetch.migrate`).

A node runs at most `JobSettings.max_concurrent` jobs at once, at most `max_per_user` of one
user's: a user's further due jobs wait, queued, leaving the other slots to the other users'
(a destination that holds each run up to the command deadline, retried eight times, held a
slot for hours; four such jobs of one user held every slot).

One job at a time writes to a mailbox (host, port, user: a migrate's destination, a
restore's own account), whichever kind, account or user it is of: a due job waits, queued,
while another writing there runs (its lease live), and starts at a later poll once that one
ended or its node died. Two run at once each found the same messages missing and each
appended them (two restores of two accounts naming one mailbox put every message back
twice); one after the other, the second finds what the first wrote.

A transient failure (the server unreachable, a timeout, a dropped connection, an APPEND the
server says may succeed later) puts the job back in the queue after a backoff
(`retry_base` * 2^(attempt-1), at most `retry_max`), up to `max_attempts` runs; anything
else (refused login, a refused message, TLS that does not verify) fails it with the reason.
An operator's `cancel` fails it at once ("cancelled by an operator"); the node running it
notices at its next batch or lease renewal and stops.

A job of a disabled user (`mailcore user disable`) waits: no node claims it, and a run
under way stops at its next batch or lease renewal and is queued again as it stood, the run
not counted as an attempt (`reason` says "paused: the user is disabled"). Nothing it
recorded is lost, and once the user is enabled it resumes as a job whose node stopped does.

A finished job (done or failed) queues the webhook event `migrate.completed` or
`restore.completed` for its owner's subscribed webhooks in the same transaction that records
the outcome, and counts in the Prometheus registry (`JobMetrics`).
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import (
    Connection,
    String,
    case,
    cast,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.backoff import doubling
from mailcore.fetch.errors import ACCOUNT_DELETED, INTERNAL_ERROR, AccountNotFound
from mailcore.fetch.secrets import SecretError
from mailcore.messages.sql import new_id, utc
from mailcore.outages import log_failure
from mailcore.store import Database
from mailcore.store.leases import thd_claim_job, thd_release_job
from mailcore.store.schema import (
    fetch_accounts,
    job_leases,
    mailbox_job_items,
    mailbox_jobs,
    users,
)
from mailcore.webhooks.payload import iso
from mailcore.webhooks.store import thd_enqueue, thd_subscribers

log = Logger()

KINDS = ("migrate", "restore")
STATUSES = ("queued", "running", "done", "failed")
ACTIVE = ("queued", "running")
JOB_EVENTS = {"migrate": "migrate.completed", "restore": "restore.completed"}
CANCELLED = "cancelled by an operator"
PAUSED = "paused: the user is disabled"
# A running job's lease lasts this long and is renewed every third of it.
LEASE = 300.0


class JobError(Exception):
    """A job operation was refused (unknown job, wrong state); the message says why."""


class JobStopped(Exception):
    """The job is no longer this node's to run (cancelled, or its lease was taken over)."""


class JobPaused(JobStopped):
    """The job's user is disabled: the job waits, queued, until the user is enabled."""


class TransientJobError(Exception):
    """The job should be tried again later; the message says why."""


@dataclass(frozen=True)
class JobSettings:
    """How often the runner looks for jobs, how many run at once, and the retry policy."""

    poll: float = 5.0
    max_concurrent: int = 4
    # Of them, at most this many of one user's on one node: a user's destinations that hold
    # each run up to the command deadline (and its retries after), or the same user's many
    # jobs, leave the other slots to the other users' jobs.
    max_per_user: int = 2
    max_attempts: int = 8
    retry_base: float = 10.0
    retry_max: float = 600.0
    # A batch of messages appended at once (pipelined), bounded in count and bytes.
    batch_messages: int = 250
    batch_bytes: int = 4 * 1024 * 1024
    # A message larger than this is appended alone, streamed from the store chunk by chunk
    # (mailcore.messages.store.raw_chunks), never read whole.
    stream_bytes: int = 1024 * 1024

    def backoff(self, attempt: int) -> float:
        return doubling(attempt, self.retry_base, self.retry_max)


@dataclass(frozen=True)
class Job:
    """A job row as it may be shown: never the destination's password."""

    id: int
    kind: str
    user_id: int
    account_id: int
    status: str
    reason: str | None
    phase: str
    email: str
    host: str | None
    protocol: str | None
    port: int | None
    use_ssl: bool
    start_tls: bool
    allow_cleartext: bool
    username: str | None
    tls_ca_pem: str | None
    tls_fingerprint: str | None
    downloaded: int
    messages: int
    appended: int
    restore_size: int
    attempts: int
    next_attempt_at: float
    created_at: datetime.datetime
    start_time: datetime.datetime | None
    end_time: datetime.datetime | None
    updated_at: datetime.datetime
    lease_owner: str | None = None
    message_ids: tuple[int, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


_JOB_COLUMNS = [f.name for f in fields(Job) if f.name not in ("lease_owner", "message_ids")]
_TIMES = {"created_at", "start_time", "end_time", "updated_at"}


LEASE_PREFIX = "mailbox-job-"  # a job's lease is this and its id, in Python and in SQL


def lease_name(job_id: int) -> str:
    return f"{LEASE_PREFIX}{job_id}"


def _job(row: Any, *, lease_owner: str | None = None,
         message_ids: tuple[int, ...] = ()) -> Job:
    m = row._mapping
    values: dict[str, Any] = {k: (utc(m[k]) if k in _TIMES else m[k]) for k in _JOB_COLUMNS}
    return Job(**values, lease_owner=lease_owner, message_ids=message_ids)


def thd_create_job(conn: Connection, values: dict[str, Any]) -> int:
    """Blocking: a new queued job from its column values; its id."""
    return new_id(conn.execute(insert(mailbox_jobs).values(**values)))


def thd_owner_active(conn: Connection, job_id: int) -> bool:
    """Blocking: whether the job's user is enabled (a disabled user's jobs wait)."""
    return bool(conn.execute(
        select(users.c.is_active)
        .select_from(mailbox_jobs.join(users, users.c.id == mailbox_jobs.c.user_id))
        .where(mailbox_jobs.c.id == job_id)
    ).scalar())


def thd_message_ids(conn: Connection, job_ids: list[int]) -> dict[int, tuple[int, ...]]:
    """Blocking: the backed-up messages each job copied or found, by job."""
    out: dict[int, list[int]] = {j: [] for j in job_ids}
    if not job_ids:
        return {}
    rows = conn.execute(
        select(mailbox_job_items.c.job_id, mailbox_job_items.c.message_row_id)
        .where(mailbox_job_items.c.job_id.in_(job_ids),
               mailbox_job_items.c.state.in_(("done", "present")))
        .order_by(mailbox_job_items.c.job_id, mailbox_job_items.c.message_row_id)
    )
    for job_id, message_id in rows:
        out[job_id].append(int(message_id))
    return {k: tuple(v) for k, v in out.items()}


def thd_message_id_chunk(conn: Connection, job_id: int, after: int, limit: int) -> list[int]:
    """Blocking: the next `limit` backed-up messages the job copied or found, after message
    `after`, in order (a list read a chunk at a time: a job may have dealt with millions)."""
    i = mailbox_job_items.c
    return [int(r[0]) for r in conn.execute(
        select(i.message_row_id)
        .where(i.job_id == job_id, i.message_row_id > after, i.state.in_(("done", "present")))
        .order_by(i.message_row_id).limit(limit)
    )]


def _leases(conn: Connection, job_ids: list[int], now: float) -> dict[int, str]:
    if not job_ids:
        return {}
    names = {lease_name(j): j for j in job_ids}
    rows = conn.execute(
        select(job_leases.c.name, job_leases.c.owner)
        .where(job_leases.c.name.in_(list(names)), job_leases.c.until > now)
    )
    return {names[name]: owner for name, owner in rows}


def _writes_to(jobs: Any = mailbox_jobs, accounts: Any = fetch_accounts
               ) -> tuple[Any, Any, Any]:
    """The mailbox (host, port, user) a job writes to, as columns of mailbox_jobs joined
    with fetch_accounts (or aliases of them): a migrate's destination, a restore's own
    account."""
    j, a = jobs.c, accounts.c
    restore = j.kind == "restore"
    return (func.lower(case((restore, a.host), else_=j.host)),
            case((restore, a.port), else_=j.port),
            case((restore, a.username), else_=j.username))


def thd_mailbox_busy(conn: Connection, job_id: int, now: float) -> int | None:
    """Blocking: another job writing to the mailbox job `job_id` writes to that runs now
    (marked running, its lease live), or None. Two such jobs run at once each find the same
    messages missing and each append them: every message twice (two restores of two
    accounts of one mailbox, a migrate into an account while it is restored). Run one
    after the other, the second finds what the first wrote (`mailcore.fetch.migrate`).
    The active jobs of that mailbox are locked first (PostgreSQL: two nodes claiming two
    of them at once take turns; SQLite's write lock does it there)."""
    host, port, username = _writes_to()
    joined = mailbox_jobs.join(fetch_accounts, fetch_accounts.c.id == mailbox_jobs.c.account_id)
    mine = conn.execute(
        select(host, port, username).select_from(joined).where(mailbox_jobs.c.id == job_id)
    ).first()
    if mine is None or mine[0] is None:
        return None
    rows = conn.execute(
        select(mailbox_jobs.c.id, mailbox_jobs.c.status).select_from(joined)
        .where(mailbox_jobs.c.status.in_(ACTIVE), host == mine[0], port == mine[1],
               username == mine[2])
        .order_by(mailbox_jobs.c.id).with_for_update(of=mailbox_jobs)
    ).all()
    running = [int(i) for i, status in rows if status == "running" and i != job_id]
    live = _leases(conn, running, now)
    return min(live) if live else None


def thd_get_job(conn: Connection, job_id: int, *, user_id: int | None = None,
                account_id: int | None = None, kind: str | None = None,
                now: float = 0.0, with_message_ids: bool = True) -> Job | None:
    """Blocking: one job (of that user, account and kind when given), or None."""
    q = select(mailbox_jobs).where(mailbox_jobs.c.id == job_id)
    if user_id is not None:
        q = q.where(mailbox_jobs.c.user_id == user_id)
    if account_id is not None:
        q = q.where(mailbox_jobs.c.account_id == account_id)
    if kind is not None:
        q = q.where(mailbox_jobs.c.kind == kind)
    row = conn.execute(q).first()
    if row is None:
        return None
    return _job(row, lease_owner=_leases(conn, [job_id], now).get(job_id),
                message_ids=thd_message_ids(conn, [job_id]).get(job_id, ())
                if with_message_ids else ())


def thd_list_jobs(
    conn: Connection, *, user_id: int | None = None, account_id: int | None = None,
    kind: str | None = None, status: str | None = None, sort: str = "id",
    direction: str = "asc", limit: int | None = None, now: float = 0.0,
    with_message_ids: bool = True,
) -> list[Job]:
    """Blocking: jobs filtered as asked, sorted by id, created_at, start_time or end_time
    (jobs not started or not ended last, whatever the direction)."""
    c = mailbox_jobs.c
    q = select(mailbox_jobs)
    for column, value in (("user_id", user_id), ("account_id", account_id), ("kind", kind),
                          ("status", status)):
        if value is not None:
            q = q.where(c[column] == value)
    key = c[sort]
    order = key.desc() if direction == "desc" else key.asc()
    q = q.order_by(key.is_(None), order, c.id.desc() if direction == "desc" else c.id)
    if limit is not None:
        q = q.limit(limit)
    rows = conn.execute(q).all()
    ids = [r.id for r in rows]
    leases = _leases(conn, ids, now)
    messages = thd_message_ids(conn, ids) if with_message_ids else {}
    return [_job(r, lease_owner=leases.get(r.id), message_ids=messages.get(r.id, ()))
            for r in rows]


def thd_cancel_job(conn: Connection, job_id: int, now: datetime.datetime) -> Job | None:
    """Blocking: fail a queued or running job as cancelled; None if there is no such job.
    JobError if it has finished already."""
    job = thd_get_job(conn, job_id)
    if job is None:
        return None
    if job.finished:
        raise JobError(f"job {job_id} has already ended ({job.status})")
    thd_finish(conn, job_id, "failed", CANCELLED, now, expect=ACTIVE)
    return thd_get_job(conn, job_id)


def thd_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """Blocking: how many jobs of each (kind, status)."""
    rows = conn.execute(
        select(mailbox_jobs.c.kind, mailbox_jobs.c.status, func.count())
        .group_by(mailbox_jobs.c.kind, mailbox_jobs.c.status)
    )
    return {(k, s): int(n) for k, s, n in rows}


def event_data(job: Job) -> dict[str, Any]:
    """The `data` of a job's webhook event."""
    data: dict[str, Any] = {
        "id": job.id, "account_id": job.account_id, "status": job.status,
        "reason": job.reason, "downloaded": job.downloaded, "messages": job.messages,
        "appended": job.appended, "attempts": job.attempts,
        "start_time": iso(job.start_time), "end_time": iso(job.end_time),
    }
    if job.kind == "migrate":
        data.update(email=job.email, host=job.host, port=job.port)
    else:
        data["restore_size"] = job.restore_size
    return data


def thd_finish(conn: Connection, job_id: int, status: str, reason: str | None,
               now: datetime.datetime, *, expect: tuple[str, ...] = ("running",)) -> int:
    """Blocking: end a job as done or failed (if it is in one of `expect`) and queue its
    webhook event with it, in this transaction; how many deliveries were queued (-1 when
    the job was not in an expected state and nothing changed)."""
    changed = conn.execute(
        update(mailbox_jobs)
        .where(mailbox_jobs.c.id == job_id, mailbox_jobs.c.status.in_(expect))
        .values(status=status, reason=reason, end_time=now, updated_at=now)
    )
    if not changed.rowcount:
        return -1
    job = thd_get_job(conn, job_id)
    assert job is not None
    subscribers = thd_subscribers(conn, job.user_id)
    if not subscribers:
        return 0
    return thd_enqueue(conn, job.user_id, JOB_EVENTS[job.kind], [event_data(job)], subscribers,
                       now, now.timestamp())


class JobMetrics:
    """The jobs' Prometheus collectors: jobs by kind and status (refreshed at every poll of
    the runner), messages written and found, and runs ended by outcome on this node."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge("mailcore_mailbox_jobs", "Migrate and restore jobs in the store, "
                          "by kind and status.", ["kind", "status"], registry=registry)
        self.messages = Counter(
            "mailcore_mailbox_job_messages",
            "Messages migrate and restore jobs of this node appended (written) or found "
            "already at the destination (present), by kind.", ["kind", "outcome"],
            registry=registry)
        self.finished = Counter("mailcore_mailbox_jobs_finished",
                                "Jobs this node ended, by kind and status.",
                                ["kind", "status"], registry=registry)
        for kind in KINDS:
            for status in STATUSES:
                self.jobs.labels(kind=kind, status=status).set(0)

    def counts(self, counts: dict[tuple[str, str], int]) -> None:
        for kind in KINDS:
            for status in STATUSES:
                self.jobs.labels(kind=kind, status=status).set(counts.get((kind, status), 0))


# What runs a job once this node holds it: (runner, job) -> None, raising JobStopped,
# TransientJobError or any other exception (a failure with its message as the reason).
JobBody = Callable[["JobRunner", Job], Awaitable[None]]


class JobRunner(service.Service):
    """Runs due jobs on this node, each leased (module docstring)."""

    name = "mailbox-jobs"

    def __init__(
        self, reactor: Any, db: Database, node_id: str, bodies: dict[str, JobBody], *,
        settings: JobSettings | None = None, metrics: JobMetrics | None = None,
        on_finished: Callable[[Job], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.db = db
        self.node_id = node_id
        self.bodies = bodies
        self.settings = settings or JobSettings()
        self.metrics = metrics
        self.on_finished = on_finished
        self._running: dict[int, defer.Deferred[None]] = {}
        self._owners: dict[int, int] = {}  # the user of each job running here
        self._claiming: set[int] = set()
        # Runs this node cancels because their user was disabled: queued again, not ended.
        self._pausing: set[int] = set()
        self._loop: task.LoopingCall | None = None
        self._renewal: task.LoopingCall | None = None
        self._tick: defer.Deferred[int] | None = None
        self._kick: Any = None
        self._stopping = False

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    # -- service -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = task.LoopingCall(self._poll)
        self._loop.clock = self.reactor
        self._loop.start(self.settings.poll, now=True).addErrback(
            lambda f: log.failure("the job runner stopped", f))
        self._renewal = task.LoopingCall(self._renew)
        self._renewal.clock = self.reactor
        self._renewal.start(LEASE / 3, now=False).addErrback(
            lambda f: log.failure("renewing job leases stopped", f))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        for loop in (self._loop, self._renewal):
            if loop is not None and loop.running:
                loop.stop()
        self._loop = self._renewal = None
        if self._kick is not None and self._kick.active():
            self._kick.cancel()
        self._kick = None
        return defer.Deferred.fromCoroutine(self.stop())

    async def stop(self) -> None:
        """Stop every running job (they resume on the next start) and wait for them."""
        self._stopping = True
        if self._tick is not None:
            await defer.DeferredList([self._tick], consumeErrors=True)
        pending = list(self._running.values())
        for d in pending:
            d.cancel()
        if pending:
            await defer.DeferredList(pending, consumeErrors=True)

    def running_jobs(self) -> list[int]:
        """The jobs this node runs now."""
        return sorted(self._running)

    def kick(self) -> None:
        """Look for due jobs soon (a job was just made)."""
        if self._stopping or not self.running:  # service.Service.running: started
            return
        if self._kick is None or not self._kick.active():
            self._kick = self.reactor.callLater(0, self._poll)

    def _poll(self) -> defer.Deferred[int] | None:
        if self._tick is not None:
            return None  # one look at a time
        self._tick = defer.Deferred.fromCoroutine(self.tick())

        def done(outcome: Any) -> Any:
            self._tick = None
            if isinstance(outcome, Failure):
                log_failure(log, "looking for due jobs failed", outcome)
                return 0
            return outcome

        return self._tick.addBoth(done)

    def _renew(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.renew_leases())

    # -- finding and claiming jobs ---------------------------------------------------------

    async def tick(self) -> int:
        """Start every due job this node can claim (not waiting for them), at most
        `max_per_user` of one user's running here at once; how many."""
        seconds = self.reactor.seconds()
        full = sorted(self._full_users())

        def due(conn: Connection) -> tuple[list[tuple[int, int]], dict[tuple[str, str], int]]:
            # Jobs whose mailbox another job writing there holds (marked running, its
            # lease live) are not looked at: they wait (`thd_mailbox_busy`, checked again
            # when claiming), and one user's hundred waiting for one mailbox were the
            # hundred looked at, every poll, a claim each, while that user never had
            # max_per_user running and every later user's jobs waited unseen.
            writing, its_account = mailbox_jobs.alias("writing"), fetch_accounts.alias("w_a")
            host, port, username = _writes_to()
            w_host, w_port, w_username = _writes_to(writing, its_account)
            busy = exists(
                select(writing.c.id)
                .select_from(writing.outerjoin(
                    its_account, its_account.c.id == writing.c.account_id))
                .join(job_leases, job_leases.c.name
                      == literal(LEASE_PREFIX) + cast(writing.c.id, String))
                .where(writing.c.status == "running", writing.c.id != mailbox_jobs.c.id,
                       job_leases.c.until > seconds,
                       w_host == host, w_port == port, w_username == username)
            )
            query = (
                select(mailbox_jobs.c.id, mailbox_jobs.c.user_id)
                .select_from(mailbox_jobs.join(users, users.c.id == mailbox_jobs.c.user_id)
                             .outerjoin(fetch_accounts,
                                        fetch_accounts.c.id == mailbox_jobs.c.account_id))
                .where(mailbox_jobs.c.status.in_(ACTIVE),
                       mailbox_jobs.c.next_attempt_at <= seconds,
                       users.c.is_active.is_(True), ~busy)
            )
            if full:  # their jobs would fill the hundred looked at, the others' never
                query = query.where(mailbox_jobs.c.user_id.not_in(full))
            found = [(int(r[0]), int(r[1]))
                     for r in conn.execute(query.order_by(mailbox_jobs.c.id).limit(100))]
            return found, thd_counts(conn)

        found, counts = await self.db.read("due_mailbox_jobs", due)
        if self.metrics is not None:
            self.metrics.counts(counts)
        started = 0
        for job_id, user_id in found:
            if self._stopping or len(self._running) >= self.settings.max_concurrent:
                break
            if job_id in self._running or job_id in self._claiming:
                continue
            if user_id in self._full_users():
                continue  # the user's others run here: a later poll
            self._claiming.add(job_id)  # this node's lease is renewable by this node
            try:
                job = await self._claim(job_id)
            finally:
                self._claiming.discard(job_id)
            if job is None:
                continue
            self._start(job)
            started += 1
        return started

    def _full_users(self) -> set[int]:
        """The users with `max_per_user` jobs running (or being claimed) here."""
        counts: dict[int, int] = {}
        for user_id in self._owners.values():
            counts[user_id] = counts.get(user_id, 0) + 1
        return {u for u, n in counts.items() if n >= self.settings.max_per_user}

    async def _claim(self, job_id: int) -> Job | None:
        """Lease job `job_id` for this node and mark it running, if it is still due; the
        job, or None (another node holds it, or it ended, is waiting, its user was
        disabled meanwhile, or another job writing to its mailbox runs: it waits for that
        one, `thd_mailbox_busy`)."""
        seconds = self.reactor.seconds()
        now = self.now()
        node = self.node_id

        def txn(conn: Connection) -> Job | None:
            if not thd_claim_job(conn, lease_name(job_id), node, seconds, seconds + LEASE):
                return None
            # The lease is ours: the row as the last holder left it (a job ended before
            # its holder let go is not run again).
            job = thd_get_job(conn, job_id)
            if (job is None or job.status not in ACTIVE or job.next_attempt_at > seconds
                    or not thd_owner_active(conn, job_id)
                    or thd_mailbox_busy(conn, job_id, seconds) is not None):
                thd_release_job(conn, lease_name(job_id), node, seconds)
                return None
            conn.execute(
                update(mailbox_jobs).where(mailbox_jobs.c.id == job_id).values(
                    status="running", attempts=mailbox_jobs.c.attempts + 1,
                    start_time=func.coalesce(mailbox_jobs.c.start_time, now), updated_at=now,
                )
            )
            return thd_get_job(conn, job_id, now=seconds)

        return await self.db.run("claim_mailbox_job", txn)

    def _start(self, job: Job) -> None:
        self._owners[job.id] = job.user_id
        d = defer.Deferred.fromCoroutine(self._run(job))
        self._running[job.id] = d

        def done(outcome: Any) -> None:
            self._running.pop(job.id, None)
            self._owners.pop(job.id, None)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                log.failure("job {id} ended badly", outcome, id=job.id)
            if not self._stopping:
                self.kick()

        d.addBoth(done)

    async def wait(self, job_id: int) -> None:
        """Wait until this node's run of the job ends (tests)."""
        d = self._running.get(job_id)
        if d is not None:
            await defer.DeferredList([d], consumeErrors=True)

    async def settle(self) -> None:
        """Wait until no job runs on this node (tests)."""
        while self._running or self._tick is not None:
            pending: list[defer.Deferred[Any]] = list(self._running.values())
            if self._tick is not None:
                pending.append(self._tick)
            await defer.DeferredList(pending, consumeErrors=True)

    async def _run(self, job: Job) -> None:
        body = self.bodies[job.kind]
        try:
            await body(self, job)
        except defer.CancelledError:
            if job.id in self._pausing:
                await self._pause(job)
                return
            await self._let_go(job.id)
            raise
        except JobPaused:
            await self._pause(job)
            return
        except JobStopped as e:
            log.info("job {id} stopped on this node: {why}", id=job.id, why=str(e))
            await self._let_go(job.id)
            return
        except TransientJobError as e:
            await self._retry_later(job, str(e))
            return
        except AccountNotFound:
            # Its user may delete the account while the job waits or runs: a failure with
            # its reason, not a fault of ours.
            await self._end(job, "failed", ACCOUNT_DELETED)
            return
        except JobFailed as e:
            await self._end(job, "failed", str(e) or type(e).__name__)
            return
        except SecretError as e:
            # A password the key cannot open (or one given up with a lost key): the user
            # must set it again, which no retry does.
            await self._end(job, "failed", str(e))
            return
        except Exception:
            log.failure("job {id} failed", id=job.id)
            await self._end(job, "failed", INTERNAL_ERROR)
            return
        await self._end(job, "done", None)

    async def _let_go(self, job_id: int) -> None:
        try:
            await self.db.run("release_mailbox_job", thd_release_job, lease_name(job_id),
                              self.node_id, self.reactor.seconds())
        except Exception:
            log.failure("could not give up the lease of job {id}", id=job_id)

    async def _pause(self, job: Job) -> None:
        """Queue a running job of a disabled user again, due at once, this run not counted
        as an attempt; picked up again once the user is enabled."""
        self._pausing.discard(job.id)
        now = self.now()

        def txn(conn: Connection) -> None:
            conn.execute(
                update(mailbox_jobs)
                .where(mailbox_jobs.c.id == job.id, mailbox_jobs.c.status == "running")
                .values(status="queued", reason=PAUSED, updated_at=now,
                        attempts=case((mailbox_jobs.c.attempts > 0,
                                       mailbox_jobs.c.attempts - 1), else_=0))
            )

        try:
            await self.db.run("pause_mailbox_job", txn)
        except Exception:
            log.failure("could not queue job {id} again", id=job.id)
        log.info("job {id} paused: its user is disabled", id=job.id)
        await self._let_go(job.id)

    async def _retry_later(self, job: Job, reason: str) -> None:
        def txn(conn: Connection) -> Job | None:
            current = thd_get_job(conn, job.id)
            if current is None or current.status != "running":
                return None
            if current.attempts >= self.settings.max_attempts:
                thd_finish(conn, job.id, "failed",
                           f"gave up after {current.attempts} attempts: {reason}", now)
                return thd_get_job(conn, job.id)
            conn.execute(
                update(mailbox_jobs).where(mailbox_jobs.c.id == job.id).values(
                    status="queued", reason=reason, updated_at=now,
                    next_attempt_at=seconds + self.settings.backoff(current.attempts),
                )
            )
            return None

        seconds = self.reactor.seconds()
        now = self.now()
        ended = await self.db.run("retry_mailbox_job", txn)
        await self._let_go(job.id)
        if ended is not None:
            self._ended(ended)

    async def _end(self, job: Job, status: str, reason: str | None) -> None:
        now = self.now()

        def txn(conn: Connection) -> Job | None:
            if thd_finish(conn, job.id, status, reason, now) < 0:
                return None
            return thd_get_job(conn, job.id)

        ended = await self.db.run("finish_mailbox_job", txn)
        await self._let_go(job.id)
        if ended is not None:
            self._ended(ended)

    def _ended(self, job: Job) -> None:
        if self.metrics is not None:
            self.metrics.finished.labels(kind=job.kind, status=job.status).inc()
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                log.failure("a job listener failed")

    # -- while a job runs ------------------------------------------------------------------

    async def renew_leases(self) -> None:
        """Extend the leases of the jobs running here; a job whose lease another node took,
        that an operator cancelled, or whose lease lapsed while another job writing to its
        mailbox started, is stopped, and one whose user was disabled is paused."""
        mine = sorted(self._running)
        if not mine:
            return
        seconds = self.reactor.seconds()
        node = self.node_id

        def txn(conn: Connection) -> tuple[list[int], list[int]]:
            lost, paused = [], []
            for job_id in mine:
                # A lease of ours that lapsed (this node stalled) is not taken back while
                # another job writing to the mailbox started meanwhile runs.
                if (_leases(conn, [job_id], seconds).get(job_id) != node
                        and thd_mailbox_busy(conn, job_id, seconds) is not None):
                    lost.append(job_id)
                    continue
                held = thd_claim_job(conn, lease_name(job_id), node, seconds, seconds + LEASE)
                status = conn.execute(select(mailbox_jobs.c.status)
                                      .where(mailbox_jobs.c.id == job_id)).scalar()
                if not held or status != "running":
                    lost.append(job_id)
                elif not thd_owner_active(conn, job_id):
                    paused.append(job_id)
            return lost, paused

        try:
            lost, paused = await self.db.run("renew_mailbox_jobs", txn)
        except Exception:
            log.failure("renewing job leases failed")
            return
        for job_id in lost:
            d = self._running.get(job_id)
            if d is not None:
                log.warn("job {id} is no longer this node's: stopping it", id=job_id)
                d.cancel()
        for job_id in paused:
            d = self._running.get(job_id)
            if d is not None:
                self._pausing.add(job_id)
                d.cancel()

    def check_txn(self, conn: Connection, job_id: int, seconds: float) -> None:
        """Blocking, inside a job's own transactions: JobStopped unless the job is still
        running and this node still holds its lease (so nothing is sent for a job another
        node took over or an operator cancelled), JobPaused if its user was disabled."""
        status = conn.execute(select(mailbox_jobs.c.status)
                              .where(mailbox_jobs.c.id == job_id)).scalar()
        if status != "running":
            raise JobStopped(f"the job is {status or 'gone'}")
        owner = conn.execute(
            select(job_leases.c.owner).where(job_leases.c.name == lease_name(job_id),
                                             job_leases.c.until > seconds)
        ).scalar()
        if owner != self.node_id:
            raise JobStopped("another node holds the job")
        if not thd_owner_active(conn, job_id):
            raise JobPaused(PAUSED)


class JobFailed(Exception):
    """The job cannot succeed; the message is the reason shown to the user."""

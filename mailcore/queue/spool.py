"""The durable spool: a message is on disk before the SMTP server says 250.

`Spool.accept` returns only once the message bytes and its envelope are committed (SQLite
with `synchronous=FULL`, or a PostgreSQL commit). Commits are grouped: while one transaction
is in flight, the accepts that arrive wait together and go into the next single transaction,
so one fsync covers many messages. The groups are committed back to back on one pool thread
(`Database.stream`), without waiting for the reactor between them; when none is pending the
stream lingers a moment (STREAM_LINGER) for the next accept, which then wakes it directly,
so under steady load the lane never goes back through the reactor and the thread pool
between groups. Under load (LOAD_MESSAGES committed within RESULTS_DELAY) the stream also
waits up to GROUP_GATHER for a group of GROUP_TARGET messages before it commits, like
PostgreSQL's commit_delay: a transaction has a fixed cost (its statements, the hand-overs
of the GIL between the reactor and the pool thread, the fsync), and a fuller group spreads
it over more messages; when mail trickles in, nothing waits. A group is capped in messages
and bytes. Each caller's await completes after its group commits, or raises SpoolError,
and the server answers 451.

The spool is the queue's one write lane: new messages, delivery results and the sweeper's
chores (`run_serialized`) take turns, one transaction at a time, so two writers of ours never
meet on SQLite's lock (where its busy handler would sleep). Small writes (`ride`) go into
the next group commit, each in a savepoint of its own, so that they neither stop the commit
stream nor cost an fsync of their own; with no group due they start one. The filtering
tokens of a message (the `charger`, set by the daemon) are charged in the group commit that
stores it, with those handed in by `charge`, in one call for the group (a charge that
raises fails the group: a message is never stored without its charge); the recipients it
paid for are stored `charged`, which is the record of that charge (for a retry, a restart
or another node) and how the runner learns it. Delivery results (`record`)
ride along in the next group commit while mail streams in, or while a commit stream runs
(it takes them with its next group, or ends after its linger), in a savepoint of their own:
when they fail the group's messages still commit, and the results are tried again later as
if their own transaction had failed (RETRY_DELAY). When the lane is quiet they
get their own transaction (when the lane is free, or once RESULTS_BATCH have gathered or the
oldest has waited RESULTS_DELAY) through a twin connection that does not wait for the disk
(see `relaxed_twin`). These waits cost no duplicates when the process dies: a final
result is written to the results journal (`mailcore.queue.journal`) as it is handed in,
and the next start applies the journal before anything is delivered again.

The accepting node inserts the recipients already leased to itself (when its runner has
room) and hands them straight to the runner, so delivery starts without waiting for a poll.
Messages that finish with bounced recipients get their one DSN in the transaction that
finishes them, inserted through the same tables.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.queue.journal import NOT_WRITTEN, ResultJournal
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.model import (
    FINAL,
    FinishedWithFailures,
    Job,
    NewMessage,
    Rcpt,
    Result,
    thd_apply_results,
    thd_finish_stranded,
    thd_insert_messages,
    thd_vouched_domain_for,
)
from mailcore.queue.settings import QueueSettings
from mailcore.smtp.dsn import Failure as DsnFailure
from mailcore.smtp.dsn import build_dsn, should_bounce
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.queueid import new_queue_id
from mailcore.smtp.server import SpoolError
from mailcore.store import Database, errands

log = Logger()

T = TypeVar("T")

# Results written per transaction at most.
MAX_RESULTS = 4000
# While accepts are waiting, results wait for the lane until this many have gathered or the
# oldest is this old: few large results transactions leave the lane to the accepts.
RESULTS_BATCH = 200
RESULTS_DELAY = 0.1
LOAD_MESSAGES = 50
# How long an idle commit stream waits for the next accept before it ends (threaded
# databases only). A chore, due results or a drain end it at once.
STREAM_LINGER = 0.05
# Under load, how long a group may wait to fill up, and how full it needs to be.
GROUP_GATHER = 0.001
GROUP_TARGET = 12
# After a failed transaction, results are tried again this much later.
RETRY_DELAY = 1.0

_NOTHING_PAID: frozenset[int] = frozenset()

# A result waiting for the store, and the journal file it was written to (or NOT_WRITTEN).
_Entry = tuple[Result, int]


def _refused(failure: Failure) -> SpoolError:
    """What each caller of a group whose commit failed gets: the commit's error is its
    cause (`__cause__`), so that whoever answers the caller tells an outage (a full disk,
    the database down: mailcore.outages) from a bug."""
    error = SpoolError(f"commit failed: {failure.getErrorMessage()}")
    error.__cause__ = failure.value
    return error


class Withdrawn(SpoolError):
    """The message's guard (`Spool.accept`) said no: it was not stored."""


class Consumer(Protocol):
    """What the spool hands committed work to (the queue runner)."""

    def reserve(self, recipients: int) -> bool: ...

    def unreserve(self, recipients: int) -> None: ...

    def submit(self, jobs: Sequence[Job], bodies: dict[str, bytes]) -> None: ...

    def enqueue_new(self, jobs: Sequence[tuple[Job, bytes]]) -> None: ...


class Charger(Protocol):
    """Charges made in the group commit that stores the messages (the filtering tokens):
    a message's charge commits with the message or not at all, with no transaction, fsync
    or wait of its own. `items` are the charger's own (opaque to the spool)."""

    def charges_for(self, queue_id: str, envelope: Envelope) -> list[Any]:
        """In the reactor thread, at accept: what storing this message charges."""
        ...

    def thd_charge(self, conn: Connection, items: list[Any], now: float) -> list[Any]:
        """Blocking, in the group's transaction: apply `items`, one outcome each."""
        ...

    def paid(self, items: list[Any], outcomes: list[Any]) -> frozenset[int]:
        """In the group's transaction: the recipient domains that one message's `items`
        paid for, given their `outcomes`; its recipients of those domains are stored
        `charged` (the only record of these charges)."""
        ...


class _Pending:
    __slots__ = ("body", "charges", "done", "envelope", "guard", "leased", "queue_id")

    def __init__(self, queue_id: str, envelope: Envelope, body: bytes, leased: bool,
                 charges: list[Any] | None = None,
                 guard: Callable[[Connection], bool] | None = None,
                 withdraw: Callable[[_Pending], None] | None = None) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.body = body
        self.leased = leased  # the runner reserved room: insert it leased to this node
        self.charges = charges  # the charger's items for this message, if any
        self.guard = guard  # run in the group's transaction: whether to store it
        # Cancelled when its caller gives up waiting: `withdraw` takes it out if it can.
        self.done: defer.Deferred[None] = defer.Deferred(
            None if withdraw is None else lambda _: withdraw(self))


class _ChargeRequest:
    """Charges handed in by `Spool.charge`, applied with the next group's."""

    __slots__ = ("done", "items")

    def __init__(self, items: list[Any], withdraw: Callable[[_ChargeRequest], object]) -> None:
        self.items = items

        def cancelled(_: defer.Deferred[Any]) -> None:
            withdraw(self)

        # Cancelled when its caller gives up: `withdraw` takes it out if no group took it.
        self.done: defer.Deferred[list[Any]] = defer.Deferred(cancelled)


class _Group:
    """What one transaction of the commit stream writes: new messages, results, riders,
    charges handed in."""

    __slots__ = ("batch", "charges", "results", "riders")

    def __init__(self, batch: list[_Pending], results: list[_Entry],
                 riders: list[_Chore] | None = None,
                 charges: list[_ChargeRequest] | None = None) -> None:
        self.batch = batch
        self.results = results
        self.riders = riders or []
        self.charges = charges or []


class _Committed:
    __slots__ = ("dsns", "ids", "messages", "now", "requested", "results_failed", "riders",
                 "withdrawn")

    def __init__(self, now: float, messages: list[NewMessage], ids: list[list[int]],
                 dsns: list[tuple[Job, bytes]], riders: list[Any] | None = None,
                 requested: list[Any] | None = None,
                 withdrawn: dict[int, Failure | None] | None = None,
                 results_failed: Failure | None = None) -> None:
        self.now = now
        self.messages = messages
        self.ids = ids
        self.dsns = dsns
        # Why the group's results were not written (their savepoint rolled back), if so.
        self.results_failed = results_failed
        self.riders = riders or []  # each rider's result, or its Failure
        # The outcomes of the charges handed in by `charge` (those of the group's requests).
        self.requested = requested
        # The messages of the group not stored (by their place in it): their guard said no
        # (None) or raised (its Failure).
        self.withdrawn = withdrawn or {}


class _Chore:
    """A chore or a rider: a write of its own in the lane, or in a group commit."""

    __slots__ = ("args", "done", "fn", "name")

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...],
                 withdraw: Callable[[_Chore], object]) -> None:
        self.name = name
        self.fn = fn
        self.args = args

        def cancelled(_: defer.Deferred[Any]) -> None:
            withdraw(self)

        # Cancelled when its caller gives up: `withdraw` takes it out if it has not begun.
        self.done: defer.Deferred[Any] = defer.Deferred(cancelled)


def _take_all(waiting: deque[Any]) -> list[Any]:
    """Everything `waiting` holds, taken one by one (the reactor may append meanwhile: a
    copy then `clear()` would lose what came in between)."""
    taken = []
    while waiting:
        taken.append(waiting.popleft())
    return taken


def _answer(done: defer.Deferred[Any], outcome: Any) -> None:
    """Tell a caller (an accept, a rider, a chore, a charge request) how its work went: a
    Failure or an exception if it failed, else its result (None for a message stored);
    unless the caller gave up waiting (cancelled) after a group or the lane had taken the
    work, which then ended unheard. The rest of the group is answered all the same: a
    second answer to a cancelled Deferred that has a canceller raises AlreadyCalledError."""
    if done.called:
        return
    if isinstance(outcome, (Failure, Exception)):
        done.errback(outcome)
    else:
        done.callback(outcome)


def _start(turn: Coroutine[Any, Any, None]) -> None:
    """Start a turn of the lane (a commit stream, a chore, a results write) outside any
    errand: it runs every caller's work. Started by a request within one (a Mail API post
    riding on SQLite, when the lane was idle), it took that errand along, and once the
    post's client had left (or passed [web] reply_timeout) each later turn kicked from it
    was given up at once: the next chore failed with CancelledError, and the next stream
    failed and kicked another until RecursionError."""
    errands.outside(defer.Deferred.fromCoroutine, turn)


def _host_of(label: str) -> str:
    """The host of a hop label `host:port` / `[v6]:port` (Remote-MTA names a host)."""
    host = label.rpartition(":")[0] if label.count(":") == 1 or "]:" in label else label
    return host.strip("[]")


class NotLeased(Exception):
    """Results recorded `leased_only` were not all this node's to record (its lease had
    lapsed and another node claimed the recipients, or they were recorded already)."""


def thd_record_results(
    conn: Connection,
    results: Sequence[Result],
    node_id: str,
    now: float,
    lease_until: float,
    reporting_mta: str,
    *,
    leased_only: bool = False,
) -> list[tuple[Job, bytes]]:
    """Apply delivery results and give each message that finished with bounced recipients
    its one DSN, inserted through the same tables in this same transaction (so a crash can
    never keep one without the other). Returns the DSNs as jobs leased to this node. Only
    the recipients this node leases take their result; with `leased_only`, NotLeased is
    raised (for the caller to roll back what it wrote with them) unless all of them did."""
    finished, applied = thd_apply_results(conn, node_id, now, results)
    if leased_only and applied < len(results):
        raise NotLeased(f"{len(results) - applied} of {len(results)} recipients are not "
                        f"leased to {node_id}")
    return _thd_insert_dsns(conn, finished, node_id, now, lease_until, reporting_mta)


def thd_repair_stranded(
    conn: Connection, node_id: str, now: float, lease_until: float, reporting_mta: str,
    limit: int,
) -> tuple[int, list[tuple[Job, bytes]]]:
    """Finish messages left unfinished with no active recipient (`model.thd_finish_stranded`)
    and give those with bounced recipients their DSN; returns how many finished and the
    DSNs as jobs leased to this node."""
    count, finished = thd_finish_stranded(conn, now, limit)
    return count, _thd_insert_dsns(conn, finished, node_id, now, lease_until, reporting_mta)


def _thd_insert_dsns(
    conn: Connection, finished: Sequence[FinishedWithFailures], node_id: str, now: float,
    lease_until: float, reporting_mta: str,
) -> list[tuple[Job, bytes]]:
    """One DSN per finished message that should have one, inserted leased to this node."""
    dsns: list[tuple[Job, bytes]] = []
    for msg in finished:
        if msg.kind == "bounce" or not should_bounce(msg.mail_from):
            continue
        queue_id = new_queue_id(now)
        dsn = build_dsn(
            reporting_mta=reporting_mta,
            queue_id=msg.message_id,
            original_sender=msg.mail_from,
            original_headers=msg.headers,
            arrival_date=msg.created_at,
            failures=[DsnFailure(f.address, f.detail, _host_of(f.hop)) for f in msg.failures],
            now=now,
        )
        sender_domain = msg.mail_from.rpartition("@")[2].lower()
        domain_id = thd_vouched_domain_for(conn, sender_domain) if sender_domain else None
        env = Envelope(
            "", (Recipient(msg.mail_from, domain_id),), kind="bounce"
        )
        [rcpt_ids] = thd_insert_messages(
            conn, [NewMessage(queue_id, env, dsn, True)], node_id, now, lease_until
        )
        job = Job(queue_id, "", "bounce", now, len(dsn),
                  [Rcpt(rcpt_ids[0], msg.mail_from, domain_id, 0)], lease_until)
        dsns.append((job, dsn))
    return dsns


def _thd_open_journal(_conn: Connection, journal: ResultJournal) -> None:
    journal.thd_open()


def _thd_close_journal(_conn: Connection, journal: ResultJournal) -> None:
    journal.thd_close()


def relaxed_twin(db: Database, reactor: Any) -> Database:
    """A second Database on the same URL whose commits do not wait for the disk.

    Delivery results go through it: losing the last few on a crash only means those
    recipients are delivered again (a rare duplicate), never a lost message, while waiting
    for an fsync per result batch would hold up the accepts queued behind it. SQLite gets
    `synchronous=NORMAL` (WAL stays consistent), PostgreSQL `synchronous_commit=off`.
    An in-memory database (tests) has no twin: the same one is used.
    """
    url = make_url(db.url)
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return db
    twin = Database(db.url, reactor, max_threads=1)
    sqlite = db.is_sqlite

    @event.listens_for(twin.engine, "connect")
    def _relax(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if sqlite:
            cursor.execute("PRAGMA synchronous=NORMAL")
        else:
            cursor.execute("SET synchronous_commit TO off")
        cursor.close()
        if not sqlite:
            dbapi_connection.commit()

    return twin


class Spool:
    """Group-committing message store and write lane in front of the queue runner."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: QueueSettings,
        metrics: QueueMetrics,
        consumer: Consumer | None = None,
        reporting_mta: str = "localhost",
        results_db: Database | None = None,
        linger: float = 0.0,
        gather: float = 0.0,
        group_target: int = GROUP_TARGET,
        journal: ResultJournal | None = None,
    ) -> None:
        self.db = db
        self.journal = journal
        self.results_db = results_db or db
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.consumer = consumer
        self.reporting_mta = reporting_mta
        self._pending: deque[_Pending] = deque()
        # Guards `_pending` and `_yield_lane` between the reactor thread and a lingering
        # stream, which waits on it (held only for a few list operations, never over I/O).
        self._wake = threading.Condition()
        self.linger = linger
        self.gather = gather
        self.group_target = max(1, min(group_target, settings.batch_max_messages))
        # Set by the reactor thread after each commit, read by the stream's: whether mail
        # is streaming in, so that waiting for a fuller group pays.
        self._gathering = False
        # Appended by the reactor thread, taken by it or by the commit stream's thread
        # (deque appends and pops are atomic).
        self._results: deque[_Entry] = deque()
        self._chores: deque[_Chore] = deque()
        self._riders: deque[_Chore] = deque()  # appended by the reactor, taken by the stream
        # Charges made with each group commit (`Charger`, `charge`): set by the daemon.
        self.charger: Charger | None = None
        self._charge_requests: deque[_ChargeRequest] = deque()  # as `_riders`
        self._busy = False
        self._streaming = False  # the lane's turn (while _busy) is a commit stream
        self._idle: list[defer.Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        # The group whose results failed, set by the stream's thread, cleared by the reactor
        # thread once it has given them back (`_committed` of that group, not of an earlier
        # one answered meanwhile): the groups the stream takes meanwhile take no later
        # results, which would be written before them.
        self._results_held: _Group | None = None
        self._results_since = 0.0
        self._results_timer: IDelayedCall | None = None
        self._flushing = False
        self._recent_commits: deque[tuple[float, int]] = deque()  # (when, messages)
        self._recent_messages = 0
        self._yield_lane = False
        self.commits = 0  # group transactions run (for tests and the benchmark)
        self.streams = 0  # commit streams started
        self._failed_commits = 0  # group commits failed since the last one that succeeded
        self._refused = 0  # messages in them
        self._failed_results = 0  # results transactions failed since the last one written
        # Told (no arguments) each time delivery results of this node are committed: a
        # results transaction, a group commit they rode along in, or a write chore (local
        # delivery records its results).
        self.on_results: list[Callable[[], None]] = []
        # Told each time delivery results are recorded (`record`): the tries they report
        # have happened, their commit is still to come.
        self.on_recorded: list[Callable[[Sequence[Result]], None]] = []

    # -- the API ------------------------------------------------------------------------

    async def accept(self, queue_id: str, envelope: Envelope, data: bytes, *,
                     guard: Callable[[Connection], bool] | None = None) -> bool:
        """Commit one message; returns when it is durable, raises SpoolError otherwise.
        `guard(conn)` runs in the transaction that stores it, before it is stored (in a
        savepoint of its own): when it returns False (or raises) the message alone is left
        out, what the guard wrote with it, and accept raises Withdrawn (or what it
        raised). So a write elsewhere that the guard looks at commits either before the
        message (which it keeps out) or after it. A caller that stops waiting (cancels)
        withdraws the message if its group commit has not begun (`_withdraw`). Returns
        whether the message is leased to this node's queue runner (stored with its lease and
        handed to it: no other node tries it while the lease holds; it has not been tried yet
        when this returns)."""
        if not envelope.recipients:
            raise SpoolError("a message needs at least one recipient")
        n = len(envelope.recipients)
        charges = self.charger.charges_for(queue_id, envelope) if self.charger else None
        leased = self.consumer is not None and self.consumer.reserve(n)
        item = _Pending(queue_id, envelope, data, leased, charges or None, guard,
                        self._withdraw)
        with self._wake:
            self._pending.append(item)
            waiting = len(self._pending)
            if waiting == 1 or waiting >= self.group_target:
                # What a waiting stream waits for: the first message (the linger), or a
                # full group (the gathering); the accepts in between do not wake it.
                self._wake.notify()
        self._kick()
        await item.done
        return item.leased  # (leased since, if the runner started meanwhile: lease_waiting)

    def lease_waiting(self) -> int:
        """The runner has just started (the node's recovery is done): lease to it the
        messages whose accepts came before and still wait for their commit, as far as it
        has room. Committed unleased, behind the first sweep's claim in the lane, they
        would wait for the next sweep, `poll_interval` later; leased, they are handed to
        the runner when they commit. Returns how many."""
        consumer = self.consumer
        if consumer is None:
            return 0
        leased = 0
        # Under the lock: an accept in `_pending` has not been taken into a group, whose
        # transaction reads `leased` on the stream's thread.
        with self._wake:
            for item in self._pending:
                if not item.leased and consumer.reserve(len(item.envelope.recipients)):
                    item.leased = True
                    leased += 1
        return leased

    def _withdraw(self, item: _Pending) -> None:
        """An accept given up on (its Deferred cancelled: the SMTP server's command deadline
        passed): a message not yet taken into a group is taken out, and never stored; one
        whose group is being committed stays in it, and is stored and delivered if that
        commit succeeds (its caller was told it was not; a duplicate when the client sends
        it again, the price of answering in time)."""
        with self._wake:
            try:
                self._pending.remove(item)
            except ValueError:
                return  # in a group being committed (its answer is dropped: `_answer`)
        if item.leased and self.consumer is not None:
            self.consumer.unreserve(len(item.envelope.recipients))

    def record(self, results: Sequence[Result]) -> None:
        """Queue delivery results for a results transaction (soon, not necessarily next);
        the final ones are in the results journal when this returns."""
        if not self._results:
            self._results_since = self.clock.seconds()
        if self.journal is not None:
            self._results.extend(zip(results, self.journal.append(results), strict=True))
        else:
            self._results.extend((r, NOT_WRITTEN) for r in results)
        if self._results_timer is None or not self._results_timer.active():
            self._results_timer = self.clock.callLater(RESULTS_DELAY, self._kick)
        self._kick()
        _tell(self.on_recorded, results)

    def run_serialized(
        self, name: str, fn: Callable[..., T], *args: Any
    ) -> defer.Deferred[T]:
        """Run a write transaction of the queue in turn with the group commits. Cancelled
        before its turn, it never runs."""
        chore = _Chore(name, fn, args, self._withdraw_chore)
        self._chores.append(chore)
        self._kick()
        return chore.done

    @property
    def takes_riders(self) -> bool:
        """Whether the API's small writes should ride the group commit (`ride`): on SQLite,
        where writers take turns on one lock and a commit of their own costs an fsync;
        PostgreSQL groups concurrent commits itself, and a rider's row locks (a send-cap
        lock among them) would hold up the queue's lane and deadlock two nodes' groups."""
        return self.db.is_sqlite

    def ride(self, name: str, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run a small write `fn(conn, *args)` in the next group commit, in a savepoint of
        its own (its failure is its own: the group's messages still commit); with no group
        due, it starts one. The Deferred fires after that commit. For writes that must not
        stop the commit stream under load the way a chore does (`run_serialized`).
        Cancelled (its caller gave up) before a group takes it, it is taken out and never
        runs; taken, it commits or not with its group, unheard. Handed in within an errand
        (mailcore.store.errands) it is withdrawn with the errand's work, unless taken."""

        def start() -> tuple[defer.Deferred[T], Callable[[], None]]:
            rider = _Chore(name, fn, args, self._withdraw_rider)
            self._riders.append(rider)
            self._take_soon()
            return rider.done, lambda: self._unless_taken(rider)

        return errands.hand_in(start)

    def thd_queue(self, conn: Connection, mails: Sequence[tuple[Envelope, bytes]],
                  now: float) -> None:
        """Blocking, in the caller's transaction (a rider's, so that the mail commits with
        what decides it, or not at all): queue each (envelope, message) with a new queue
        id. Not leased: the queue's sweeper takes them (within [queue] poll_interval)."""
        thd_insert_messages(
            conn, [NewMessage(new_queue_id(now), envelope, message, False)
                   for envelope, message in mails],
            self.settings.node_id, now, now + self.settings.lease_seconds)

    def _unless_taken(self, rider: _Chore) -> None:
        """For an errand given up: drop `rider` unless a group has taken it (which then
        answers it with its outcome). Its Deferred fails as a cancelled one does, without
        going through its canceller, which would withdraw it a second time."""
        if self._withdraw_rider(rider):
            rider.done.errback(Failure(defer.CancelledError()))

    def _withdraw_chore(self, chore: _Chore) -> bool:
        """A chore given up on: taken out unless it has begun (in the reactor thread, which
        alone takes chores). Whether it was."""
        try:
            self._chores.remove(chore)
        except ValueError:
            return False
        return True

    def _withdraw_rider(self, rider: _Chore) -> bool:
        """A rider given up on: taken out unless a group has taken it. Whether it was."""
        return self._take_out(self._riders, rider)

    def _withdraw_charge(self, request: _ChargeRequest) -> bool:
        """A charge request given up on: taken out unless a group has taken it. Whether it
        was."""
        return self._take_out(self._charge_requests, request)

    def _take_out(self, waiting: deque[Any], item: Any) -> bool:
        """Take `item` out of `waiting` (riders or charge requests) unless a group has
        taken it (the stream takes them under the same lock). Whether it was."""
        with self._wake:
            try:
                waiting.remove(item)
            except ValueError:
                return False
        return True

    def charge(self, items: Sequence[Any]) -> defer.Deferred[list[Any]]:
        """Apply `items` (the charger's) in the next group commit, with the charges of the
        messages it stores, in the same one call of `Charger.thd_charge` (so one order of
        row locks covers all of them); with no group due, it starts one. Fires with one
        outcome per item after that commit, or fails (nothing of them applied). Cancelled
        (its caller gave up) before a group takes it, it is taken out and never applied
        (the filtering that asked for it goes no further: its message stays queued, and is
        charged, once, by its key, when it is filtered again); taken, it commits or not
        with its group, unheard (its key keeps the next filtering from charging again)."""
        if self.charger is None:
            raise RuntimeError("the spool has no charger")
        request = _ChargeRequest(list(items), self._withdraw_charge)
        self._charge_requests.append(request)
        self._take_soon()
        return request.done

    def _take_soon(self) -> None:
        """Get a rider or charge request just handed in written: a lingering stream takes
        it now, else a group commit starts."""
        if self._busy:
            with self._wake:
                self._wake.notify()
        else:
            self._kick()

    async def drain(self) -> None:
        """Wait until everything handed in so far is written (results: or given up on, after
        one failed attempt, unless the results journal lacks them: `_give_up`)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()  # tried now, once, while draining (the `_kick` below)
            self._retry = None
        if (not self._busy and not self._pending and not self._results and not self._chores
                and not self._riders and not self._charge_requests):
            return
        self._flushing = True
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        self._kick()
        await d

    def cancel(self) -> None:
        """Stop retrying failed result writes (at shutdown, after `drain`)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._results_timer is not None and self._results_timer.active():
            self._results_timer.cancel()
        self._results_timer = None

    async def recover(self) -> int:
        """At start, before this node releases its old leases: apply the results its last
        run left in the journal (only rows it still leases take them), then start the
        journal afresh. Returns how many results the journal held. Without a usable
        journal file the node runs unprotected (a crash may then deliver mail twice)."""
        journal = self.journal
        if journal is None:
            return 0
        found = 0
        try:
            found = await self.run_serialized("queue_replay_results", self._thd_replay, journal)
        except Exception:
            log.failure("applying the results journal of the last run failed")
        if found:
            log.info("applied {n} delivery results of the last run from the results journal",
                     n=found)
        try:
            await self.db.read("queue_journal_open", _thd_open_journal, journal)
        except OSError as e:
            log.warn("cannot open the results journal in {dir} ({error}); a crash may deliver "
                     "some mail twice", dir=str(journal.directory), error=e.strerror or str(e))
        return found

    async def close_journal(self) -> None:
        """At stop, after `drain`: close the results journal (emptied when the store has
        every result written there)."""
        if self.journal is not None and self.journal.is_open:
            await self.db.read("queue_journal_close", _thd_close_journal, self.journal)

    def _thd_replay(self, conn: Connection, journal: ResultJournal) -> int:
        results = journal.thd_read()
        if results:
            now = self.clock.seconds()
            # DSNs made here are leased to this node, whose leases are released next.
            thd_record_results(conn, results, self.settings.node_id, now,
                               now + self.settings.lease_seconds, self.reporting_mta)
        return len(results)

    # -- the lane -----------------------------------------------------------------------

    def _under_load(self) -> bool:
        """Whether accepts are streaming in (LOAD_MESSAGES committed within the last
        RESULTS_DELAY): then results ride along in the next group commit (or wait to be
        written in a large group), since every transaction in the lane delays the next 250."""
        recent = self._recent_commits
        horizon = self.clock.seconds() - RESULTS_DELAY
        while recent and recent[0][0] < horizon:
            self._recent_messages -= recent.popleft()[1]
        return self._recent_messages >= LOAD_MESSAGES

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._pending and len(batch) < self.settings.batch_max_messages:
            nxt = self._pending[0]
            if batch and size + len(nxt.body) > self.settings.batch_max_bytes:
                break
            batch.append(self._pending.popleft())
            size += len(nxt.body)
        return batch

    def _kick(self) -> None:
        """Start the next transaction: chores first, then accepts; results when the lane
        has nothing else to do and mail is not streaming in, or once enough of them (or old
        enough ones) have gathered."""
        results_ready = bool(self._results) and not (
            self._retry is not None and self._retry.active()
        )
        # A commit stream that runs takes the results waiting with its next group, or ends
        # after its linger (then they are written): it is not stopped for them only because
        # the lane looks quiet (no accept pending at this instant, which under load is true
        # after each group the stream takes). Stopping it cost a results transaction and a
        # new stream, two trips to the pool threads, every few groups.
        results_due = results_ready and (
            (not self._pending and not self._streaming and not self._under_load())
            or self._flushing
            or len(self._results) >= RESULTS_BATCH
            or self.clock.seconds() - self._results_since >= RESULTS_DELAY
        )
        if self._busy:
            if self._chores or self._flushing or (results_due and not self._pending):
                # The commit stream stops after its current group (or stops lingering).
                with self._wake:
                    self._yield_lane = True
                    self._wake.notify()
            return
        self._yield_lane = False
        if self._chores:
            self._busy = True
            _start(self._run_chore(self._chores.popleft()))
        elif results_due:
            self._busy = True
            results = self._take_results()
            self._results_since = self.clock.seconds()
            _start(self._write_results(results))
        elif self._pending or self._riders or self._charge_requests:
            self._busy = True
            self._streaming = True
            _start(self._commit_stream())
        elif not self._results:
            if self._results_timer is not None and self._results_timer.active():
                self._results_timer.cancel()
            self._results_timer = None
            self._flushing = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        elif results_ready and (self._results_timer is None
                                or not self._results_timer.active()):
            # Results not due yet (mail was streaming in) with the lane idle: the timer
            # set by `record` may have fired for earlier ones, which rode along; without
            # one these would wait for the lane's next turn, however far off.
            self._results_timer = self.clock.callLater(
                max(0.0, self._results_since + RESULTS_DELAY - self.clock.seconds()),
                self._kick)

    async def _run_chore(self, chore: _Chore) -> None:
        try:
            result = await self.db.run(chore.name, chore.fn, *chore.args)
        except Exception as e:
            _answer(chore.done, e)
        else:
            _answer(chore.done, result)
            self._tell_results()
        finally:
            self._busy = False
            self._kick()

    def _tell_results(self) -> None:
        _tell(self.on_results)

    async def _commit_stream(self) -> None:
        """Commit groups of pending messages back to back until none are left or the lane
        is wanted for a chore or results (see `Database.stream`)."""
        self.streams += 1
        try:
            await self.db.stream(
                "queue_commit", self._take_for_stream, self._thd_commit, self._committed
            )
        except Exception:  # pragma: no cover - the stream reports failures through _committed
            log.failure("spool commit stream failed")
        finally:
            self._busy = self._streaming = False
            self._kick()

    def _take_results(self) -> list[_Entry]:
        """Up to MAX_RESULTS waiting results (either thread)."""
        out: list[_Entry] = []
        results = self._results
        while results and len(out) < MAX_RESULTS:
            out.append(results.popleft())
        return out

    def _take_for_stream(self) -> _Group | None:
        """Called on the stream's pool thread: the next group, unless the lane is wanted.
        With nothing pending it waits up to `linger` seconds for an accept (or for the
        lane to be wanted); under load it then waits up to `gather` seconds for a group of
        `group_target`. Neither wait happens while draining. Only the stream takes from
        `_pending` (the reactor thread appends to it, and takes out an accept given up on,
        `_withdraw`, under the same lock). Delivery results waiting
        meanwhile ride along in the same transaction, so that under load they are written
        within one group commit, without a lane turn of their own."""
        with self._wake:
            if (not self._pending and not self._riders and not self._charge_requests
                    and not self._yield_lane and not self._flushing and self.linger > 0):
                self._wake.wait_for(
                    lambda: (self._pending or self._riders or self._charge_requests
                             or self._yield_lane),
                    self.linger,
                )
            target = self.group_target
            if (self._gathering and self.gather > 0 and self._pending
                    and len(self._pending) < target
                    and not self._yield_lane and not self._flushing):
                self._wake.wait_for(
                    lambda: len(self._pending) >= target or self._yield_lane, self.gather
                )
            if self._yield_lane:
                return None
            batch = self._take_batch()
            riders = _take_all(self._riders)
            charges = _take_all(self._charge_requests)
        if not batch and not riders and not charges:
            return None
        results = self._take_results() \
            if self._retry is None and self._results_held is None else []
        return _Group(batch, results, riders, charges)

    def _thd_commit(self, conn: Connection, group: _Group) -> _Committed:
        now = self.clock.seconds()
        until = now + self.settings.lease_seconds
        withdrawn = self._thd_guard(conn, group.batch)
        batch = [p for i, p in enumerate(group.batch) if i not in withdrawn] \
            if withdrawn else group.batch
        paid, requested = self._thd_charge(conn, group, batch, now)
        messages = [NewMessage(p.queue_id, p.envelope, p.body, p.leased,
                               paid.get(p.queue_id, _NOTHING_PAID)) for p in batch]
        ids = thd_insert_messages(conn, messages, self.settings.node_id, now, until) \
            if messages else []
        dsns: list[tuple[Job, bytes]] = []
        results_failed: Failure | None = None
        if group.results:
            # In a savepoint: results that fail (a deadlock with another node's sweeper or
            # a Mail API delete on the same rows, a DSN that cannot be built) are given back
            # and tried again later (`_committed`), and the group's messages still commit:
            # their callers' 250s never hang on the results that rode along.
            try:
                with conn.begin_nested():
                    dsns = thd_record_results(conn, [r for r, _ in group.results],
                                              self.settings.node_id, now, until,
                                              self.reporting_mta)
            except Exception:
                dsns = []
                results_failed = Failure()
                self._results_held = group
        riders: list[Any] = []
        for rider in group.riders:
            try:
                with conn.begin_nested():
                    riders.append(rider.fn(conn, *rider.args))
            except Exception:
                riders.append(Failure())
        return _Committed(now, messages, ids, dsns, riders, requested, withdrawn,
                          results_failed)

    @staticmethod
    def _thd_guard(conn: Connection, batch: list[_Pending]) -> dict[int, Failure | None]:
        """Run the guards of the group's messages (`accept`): those left out, by their place
        in the batch, with the Failure of a guard that raised."""
        withdrawn: dict[int, Failure | None] = {}
        for i, p in enumerate(batch):
            if p.guard is None:
                continue
            try:
                with conn.begin_nested() as savepoint:
                    if not p.guard(conn):
                        savepoint.rollback()
                        withdrawn[i] = None
            except Exception:
                withdrawn[i] = Failure()
        return withdrawn

    def _thd_charge(self, conn: Connection, group: _Group, batch: list[_Pending], now: float
                    ) -> tuple[dict[str, frozenset[int]], list[Any] | None]:
        """Apply the charges of the group (those of `batch`, its messages to be stored, and
        those handed in) in its transaction, before its messages are inserted: per message,
        the recipient domains its charges paid for; and the outcomes of the charges handed
        in."""
        charger = self.charger
        items = [c for p in batch if p.charges for c in p.charges]
        for request in group.charges:
            items.extend(request.items)
        if not items or charger is None:
            return {}, None
        # No savepoint (it would cost about as much as the charges): a charge that raises
        # fails the group, so no message is ever stored without its charge nor charged
        # without being stored. (An empty tank or an unknown owner is an outcome, not an
        # error.)
        outcomes = charger.thd_charge(conn, items, now)
        paid: dict[str, frozenset[int]] = {}
        at = 0
        for p in batch:
            if p.charges:
                n = len(p.charges)
                paid[p.queue_id] = charger.paid(p.charges, outcomes[at:at + n])
                at += n
        return paid, outcomes[at:]

    def _committed(self, group: _Group, result: _Committed | Failure) -> None:
        """In the reactor thread, after a group's transaction: answer its callers."""
        consumer = self.consumer
        batch = group.batch
        if isinstance(result, Failure):
            if self._results_held is group:
                self._results_held = None
            self._failed_commit(result, len(batch))
            reserved = sum(len(p.envelope.recipients) for p in batch if p.leased)
            if consumer is not None and reserved:
                consumer.unreserve(reserved)
            for p in batch:
                _answer(p.done, _refused(result))
            for rider in group.riders:
                _answer(rider.done, _refused(result))
            for request in group.charges:
                _answer(request.done, _refused(result))
            if group.results:
                self._results.extendleft(reversed(group.results))
            return
        self.commits += 1
        if self._failed_commits:
            log.info("spool commits succeed again, after {commits} failed ({messages} messages "
                     "refused)", commits=self._failed_commits, messages=self._refused)
            self._failed_commits = self._refused = 0
        results_written = bool(group.results) and result.results_failed is None
        if result.results_failed is not None:
            self._failed_results_write(result.results_failed, group.results)
        elif group.results:
            self._results_written(group.results)
        # Only once the retry is set; also when the results of an earlier attempt of this
        # transaction failed and a later attempt (after a conflict) wrote them.
        if self._results_held is group:
            self._results_held = None
        withdrawn = result.withdrawn
        stored = len(batch) - len(withdrawn)
        self._recent_commits.append((result.now, stored))
        self._recent_messages += stored
        self._gathering = self._under_load()
        self.metrics.accepted.inc(stored)
        if result.requested is not None:
            self._answer_charges(group.charges, result.requested)
        if withdrawn:
            reserved = sum(len(batch[i].envelope.recipients) for i in withdrawn
                           if batch[i].leased)
            if consumer is not None and reserved:
                consumer.unreserve(reserved)
        # The callers first (their 250s go out now), then the riders, then the delivery work.
        for i, p in enumerate(batch):
            _answer(p.done, None if i not in withdrawn
                    else withdrawn[i] or Withdrawn("its guard left the message out"))
        for rider, outcome in zip(group.riders, result.riders, strict=True):
            _answer(rider.done, outcome)
        if consumer is not None:
            self._hand_over(consumer, result.now, result.messages, result.ids)
            if result.dsns:
                consumer.enqueue_new(result.dsns)
        if results_written:
            self._tell_results()  # results rode along in this group

    def _failed_commit(self, failure: Failure, messages: int) -> None:
        """Log a failed group commit: the first of a run of them with its cause, the rest
        only when a commit succeeds again (a full disk or a database server down for a
        while fails every group, one per accept when mail trickles in)."""
        if not self._failed_commits:
            log.failure("spool commit of {n} messages failed; accepts are refused (451) "
                        "until a commit succeeds", failure, n=messages)
        self._failed_commits += 1
        self._refused += messages

    @staticmethod
    def _answer_charges(requests: list[_ChargeRequest], outcomes: list[Any]) -> None:
        """Each charge request handed in gets its own outcomes, in order."""
        at = 0
        for request in requests:
            n = len(request.items)
            _answer(request.done, outcomes[at:at + n])
            at += n

    async def _write_results(self, results: list[_Entry]) -> None:
        now = self.clock.seconds()
        try:
            dsns = await self.results_db.run(
                "queue_results", thd_record_results, [r for r, _ in results],
                self.settings.node_id, now, now + self.settings.lease_seconds,
                self.reporting_mta,
            )
        except Exception:
            self._failed_results_write(Failure(), results)
        else:
            self._results_written(results)
            self._tell_results()
            if dsns and self.consumer is not None:
                self.consumer.enqueue_new(dsns)
        finally:
            self._busy = False
            self._kick()

    def _failed_results_write(self, failure: Failure, results: list[_Entry]) -> None:
        """Results not written (their own transaction failed, or their savepoint in a group
        commit): given back, and the lane tries them again after RETRY_DELAY (no group takes
        them meanwhile)."""
        # Logged once for a run of failures, as failed commits are (_failed_commit).
        if not self._failed_results:
            log.failure("writing {n} delivery results failed; retrying every {delay:g} s",
                        failure, n=len(results), delay=RETRY_DELAY)
        self._failed_results += 1
        if self._flushing:
            results = self._give_up(results)
            if not results:
                return
        self._results.extendleft(reversed(results))
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(RETRY_DELAY, self._retry_now)

    @staticmethod
    def _give_up(results: list[_Entry]) -> list[_Entry]:
        """While draining (at stop), results that failed once more are given up on, but for
        the final ones the results journal lacks (no journal, or its write failed): losing
        those would deliver their mail again, so they are still tried (returned). The
        journal's are applied at the next start (their lines stay: they are not marked
        written); a deferral lost only means an earlier retry. A write that failed every
        time (a bounce whose DSN cannot be built) held the stop until its timeout."""
        kept = [e for e in results if e[1] == NOT_WRITTEN and e[0].state in FINAL]
        journaled = sum(1 for _, where in results if where != NOT_WRITTEN)
        deferrals = len(results) - len(kept) - journaled
        if journaled or deferrals:
            log.warn("at stop, gave up writing {n} delivery results: {journaled} in the "
                     "results journal (applied at the next start), {deferrals} deferrals "
                     "(tried again sooner)", n=journaled + deferrals, journaled=journaled,
                     deferrals=deferrals)
        return kept

    def _results_written(self, results: list[_Entry]) -> None:
        """Results are in the store (their own transaction or a group commit)."""
        if self._failed_results:
            log.info("delivery results written again, after {n} failed attempts",
                     n=self._failed_results)
            self._failed_results = 0
        self._stored(results)

    def _hand_over(
        self, consumer: Consumer, now: float, messages: list[NewMessage], ids: list[list[int]]
    ) -> None:
        until = now + self.settings.lease_seconds  # as _thd_commit leased them
        jobs: list[Job] = []
        bodies: dict[str, bytes] = {}
        for m, rcpt_ids in zip(messages, ids, strict=True):
            if not m.leased:
                continue
            env = m.envelope
            jobs.append(
                Job(
                    m.queue_id, env.mail_from, env.kind, now, len(m.body),
                    [
                        Rcpt(rid, r.address, r.domain_id, 0, r.domain_id in m.paid)
                        for rid, r in zip(rcpt_ids, env.recipients, strict=True)
                    ],
                    until,
                )
            )
            bodies[m.queue_id] = m.body
        if jobs:
            consumer.submit(jobs, bodies)

    def _stored(self, results: list[_Entry]) -> None:
        """These results are in the store: their journal lines are no longer needed."""
        if self.journal is not None and results:
            self.journal.committed(where for _, where in results)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick()


def _tell(listeners: list[Callable[..., None]], *args: Any) -> None:
    """Call each listener with `args`; one that fails is logged and the others still run."""
    for listener in list(listeners):
        try:
            listener(*args)
        except Exception:
            log.failure("a spool listener failed: {listener!r}", listener=listener)

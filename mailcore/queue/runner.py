"""The queue runner: in-memory delivery queues per next hop, connection pools, results.

Work arrives from two places: the spool hands over what it just committed (already leased to
this node), and the sweeper claims due work whose lease is absent or lapsed. The runner
routes each recipient to a next hop, groups the recipients of one message on one hop into
one transaction, and keeps per hop a bounded pool of connections that each carry several
messages. Outcomes go back to the spool, which writes them in its group transactions and
finishes messages (and makes their one DSN) there.

When the pipeline has stages (filtering), a routed message is processed by it before any
of its recipients is put on a hop queue: no connection is opened for a message that is
deferred, quarantined or discarded, and none is held while a filter works. At most
`pipeline.max_scans` messages are processed at a time; the others wait their turn. Tags
travel with the queued job and are applied when the body is sent. A message whose every
hop is known to be down is deferred without being processed. With no stages, routed jobs
go straight to their hop queues.

Recipients routed to `LOCAL` (hosted mailboxes) are not sent: after the pipeline, the
`local_store` writes them into their mailbox in one transaction of the spool's write lane
that also records their result, so a crash can neither lose nor duplicate them. A message
the pipeline quarantines is kept the same way: the quarantine's rows and the recipients'
`quarantined` results commit together (`thd_quarantine`).

A message in a mail loop (more Received header fields than `[smtp] max_hops`, see
`mailcore.smtp.hops`) is bounced with 5.4.6 before it is processed or sent.

A job is sent only while this node's lease on it has at least `LEASE_MARGIN` of
`lease_seconds` left, counted from when it was leased and moved by the renewals that commit
in time (`leases_renewed`); otherwise it is given back (released) unsent.

Connections are bounded: at most `hop_concurrency` per hop and `max_connections` in all
(opening or open). A hop that wants a connection while all are taken waits its turn (hops
are served in the order they asked); a connection with nothing left to send for its own
hop then ends at once rather than idling for `connection_idle`. While hops wait, none
holds more than its fair share (`max_connections` over the hops with connections or
waiting for one): one above it opens no more, and its connections end after their current
message until it is back within it. Without that, a next hop that answers slowly (a
customer's redirectTo may be a tarpit) kept each connection it got for minutes while fast
hops gave theirs back, and a handful of them came to hold every connection.

Memory is bounded: at most `max_in_memory` recipients are held (reserved, waiting to be
processed, queued or in flight); bodies are kept only from accept to send within
`body_cache_bytes`, otherwise loaded from the store when they are needed. The bodies that
delivery attempts hold, from before the attempt takes a connection (and its body is loaded)
until it ends (a next hop that reads its DATA slowly keeps one for up to `data_timeout`),
count against
`max_send_memory` (`SendMemory`): an attempt that would pass it waits, in the order the
attempts asked, until another ends. One attempt always goes, whatever its size. Without it,
`max_connections` attempts to slow next hops could each hold a message of `[smtp]
max_message_size`: 100 x 50 MB.

An attempt takes its room before it takes a connection: a hop's job waits for room with
no connection of its own and no slot of `hop_concurrency` or `max_connections` (it is no
contender for the fair share either), and is handed to an idle connection of its hop or
opens one only once its room is taken (`HopQueue.ready`). A connection whose hop's next job
waits for room idles as one with nothing to send does (ended at once when other hops wait
for a connection), never holding room of its own meanwhile: it gave its last message's back
before the next one asked. Each hop has at most one job waiting for room at a time (the
next asks once it has its room), as many as it may send at once taken. When attempts waited
on their connections, a budget full of slow next hops' messages left the attempts waiting
behind them holding the connections too, and the fast hops' messages could get neither; and
a hop's backlog asking all at once would put every other hop's message behind all of it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection
from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore import maillog
from mailcore.netpolicy import AddressRefused
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.model import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    QUARANTINED,
    Job,
    LocalStored,
    Rcpt,
    Result,
    thd_load_bodies,
    thd_release_leases,
)
from mailcore.queue.mtasts import Quiet
from mailcore.queue.nexthop import NextHopRefused
from mailcore.queue.pipeline import (
    LATER,
    Action,
    Decision,
    Later,
    Pipeline,
    PipelineMessage,
    PipelineRecipient,
    QuarantineStore,
    Resume,
    apply_tags,
)
from mailcore.queue.retry import expired, next_attempt
from mailcore.queue.routing import LOCAL, Hop, Router, RoutingError
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import NotLeased, Spool, thd_record_results
from mailcore.smtp.client import Reply, SMTPClientError, SMTPSession, TLSFailed
from mailcore.smtp.dotstuff import AcceptedBody
from mailcore.smtp.dsn import MAX_DETAIL
from mailcore.smtp.hops import DEFAULT_MAX_HOPS, count_received, too_many_hops
from mailcore.smtp.sevenbit import seven_bit
from mailcore.store import Database
from mailcore.workers import CpuPool

log = Logger()

# How long to stay in cleartext with a hop whose opportunistic STARTTLS failed.
CLEARTEXT_AFTER_TLS_FAILURE = 3600.0
# A job is not sent when less than this part of `lease_seconds` is left of its lease: the
# transaction must end before another node may claim the recipients.
LEASE_MARGIN = 0.25
# A tagged body larger than this is made on the CPU pool (`_tagged`): below it, the thread
# hop costs more than the copy.
TAG_INLINE = 256 * 1024


class Connector:
    """Opens an SMTPSession to a hop (greeting and EHLO done); STARTTLS is the runner's call."""

    def connect(self, hop: Hop) -> defer.Deferred[SMTPSession]:  # pragma: no cover - interface
        raise NotImplementedError

    def tls_creator(self, hop: Hop, verify: bool) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def check_peer(self, session: SMTPSession, hop: Hop) -> None:  # pragma: no cover
        """After a verified STARTTLS: raise unless the peer's certificate names the hop."""
        raise NotImplementedError


async def open_host(connector: Connector, hop: Hop, *, cleartext: bool = False,
                    tls_failed: Callable[[], None] | None = None) -> SMTPSession:
    """A session with `hop` (one host), after STARTTLS as its policy says; an opportunistic
    STARTTLS that fails is retried once in cleartext (pitfall 9, never QUIT-and-defer
    forever), `tls_failed` told first (before the new connection, which may fail too).
    `cleartext`: a 'may' hop is not asked for STARTTLS.
    The queue's delivery and the SMTP server's recipient verification
    (mailcore.gateway.callout) both open their sessions here."""
    session = await connector.connect(hop)
    offered = "STARTTLS" in session.extensions
    if hop.tls == "verify" or (hop.tls == "verify-if-offered" and offered):
        why = "is required" if hop.tls == "verify" else "was offered"
        if hop.sts == "enforce":
            # (The hop may be shared by several domains of one MX host: the recipient's
            # domain is the one whose policy it is.)
            why = "is required by the MTA-STS policy of the recipient's domain"
        if not offered:
            session.abort()
            raise SMTPClientError(f"4.7.5 TLS {why} but the server offers no STARTTLS")
        try:
            await session.starttls(connector.tls_creator(hop, verify=True))
            connector.check_peer(session, hop)
        except SMTPClientError as e:  # TLSFailed, or no reply to the STARTTLS itself
            session.abort()
            raise SMTPClientError(f"4.7.5 TLS {why} and failed: {e}") from e
        except defer.CancelledError:
            session.abort()
            raise
        except Exception as e:
            session.abort()
            raise SMTPClientError(
                f"4.7.5 TLS {why} and the certificate does not name {hop.host}: {e}"
            ) from e
        return session
    if hop.tls == "may" and offered and not cleartext:
        try:
            await session.starttls(connector.tls_creator(hop, verify=False))
        except TLSFailed as e:
            session.abort()
            log.info("STARTTLS to {hop} failed ({error}); delivering in cleartext",
                     hop=hop.label, error=str(e))
            if tls_failed is not None:
                tls_failed()
            return await connector.connect(hop)
        except BaseException:  # cancelled (verify_timeout, a stop): not left open
            session.abort()
            raise
    return session


class LocalStore(Protocol):
    """Writes a message into hosted mailboxes.

    `prepare` runs first, once per message and outside any transaction (parsing, files:
    what is slow or waits on the disk); `thd_store` then writes the rows in the caller's
    transaction (blocking), called with `(recipient id, address)` pairs of the message and
    what `prepare` returned. It returns the ids it stored (or had stored already: a replay
    stores nothing twice), those whose mailbox is full (they bounce MAILBOX_FULL) and those
    whose domain is suspended (they wait, deferred SUSPENDED); the others have no mailbox
    (any more) and bounce NO_MAILBOX."""

    async def prepare(self, queue_id: str, body: bytes) -> Any: ...

    def thd_store(
        self, conn: Connection, recipients: Sequence[tuple[int, str]], queue_id: str,
        prepared: Any, now: float,
    ) -> LocalStored: ...


LOCAL_REPLY = "250 2.0.0 stored in the mailbox"
NO_MAILBOX = "5.1.1 no such mailbox here"
# RFC 3463 X.2.2; permanent, as Dovecot's default (mailcore.mailapi.delivery says why).
MAILBOX_FULL = "5.2.2 mailbox full (over its storage quota)"
# A temporary failure, as the SMTP server's 450 for such a domain's recipients.
SUSPENDED = "4.2.1 mailbox temporarily unavailable (its domain is suspended)"

# What a recipient's result says when something of ours failed. A result's detail is shown
# by `queue show` and becomes the DSN's text and Diagnostic-Code when the message expires
# or bounces: an exception's text (a SQL statement with its parameters and the message's
# bytes, a path, a stack of names) must never go there. The exception is logged with its
# traceback; the result gets one of these.
ROUTING_FAILED = "4.4.3 routing unavailable"
PROCESSING_FAILED = "4.3.0 message processing unavailable"
QUARANTINE_FAILED = "4.3.0 quarantine unavailable"
LOAD_FAILED = "4.3.0 message store unavailable"
LOCAL_STORE_FAILED = "4.3.0 mailbox store unavailable"


def thd_deliver_local(
    conn: Connection, store: LocalStore, job: Job, prepared: Any, node_id: str, now: float,
    lease_until: float, reporting_mta: str,
) -> tuple[LocalStored, list[Result], list[tuple[Job, bytes]]]:
    """Store `job`'s recipients in their mailboxes (`prepared`: what `store.prepare` made
    of the body) and record their results, in one transaction; returns what thd_store did,
    the results and the DSNs they made. The recipients of a suspended domain get no result
    here: the caller defers them (QueueRunner._fail, which bounces them at the queue's
    lifetime)."""
    done = store.thd_store(conn, [(r.id, r.address) for r in job.recipients],
                           job.message_id, prepared, now)
    results = [
        Result(r.id, job.message_id, DELIVERED, LOCAL_REPLY, LOCAL.label)
        if r.id in done.stored
        else Result(r.id, job.message_id, BOUNCED,
                    MAILBOX_FULL if r.id in done.full else NO_MAILBOX, LOCAL.label)
        for r in job.recipients if r.id not in done.suspended
    ]
    dsns = thd_record_results(conn, results, node_id, now, lease_until, reporting_mta)
    return done, results, dsns


def thd_quarantine(
    conn: Connection, store: QuarantineStore, message: PipelineMessage, decision: Decision,
    results: Sequence[Result], node_id: str, now: float, lease_until: float,
    reporting_mta: str,
) -> list[tuple[Job, bytes]]:
    """Keep `message` in quarantine for the decision's recipients and record their
    (QUARANTINED) `results` in one transaction, so that a crash can never leave the message
    kept and still queued (filtered again at the next start, and delivered if the verdict
    or the domain's policy changed meanwhile: once by the queue, once more if released);
    returns the DSNs the results made (the message's other recipients that bounced).
    Nothing is kept unless every result is this node's to record (NotLeased: its lease
    lapsed and another node claimed the recipients, which filters and keeps the message
    itself), so two nodes never both keep it, even at the same moment."""
    dsns = thd_record_results(conn, results, node_id, now, lease_until, reporting_mta,
                              leased_only=True)
    store.thd_keep(conn, message, decision, now)
    return dsns


# -- bodies -----------------------------------------------------------------------------------


class BodyCache:
    """Bodies kept from accept to send, within a byte budget (never for waiting messages)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: dict[str, bytes] = {}

    def put(self, message_id: str, body: bytes) -> None:
        if message_id in self._items or self.bytes + len(body) > self.max_bytes:
            return
        self._items[message_id] = body
        self.bytes += len(body)

    def get(self, message_id: str) -> bytes | None:
        return self._items.get(message_id)

    def drop(self, message_id: str) -> None:
        body = self._items.pop(message_id, None)
        if body is not None:
            self.bytes -= len(body)

    def __len__(self) -> int:
        return len(self._items)


class BodyLoader:
    """Loads bodies from the store, one query for all the requests that arrive together."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._wanted: dict[str, list[defer.Deferred[bytes | None]]] = {}
        self._loading = False

    async def get(self, message_id: str) -> bytes | None:
        d: defer.Deferred[bytes | None] = defer.Deferred()
        self._wanted.setdefault(message_id, []).append(d)
        self._kick()
        return await d

    def _kick(self) -> None:
        if self._loading or not self._wanted:
            return
        self._loading = True
        defer.Deferred.fromCoroutine(self._load())

    async def _load(self) -> None:
        wanted, self._wanted = self._wanted, {}
        try:
            bodies = await self.db.read("queue_load_bodies", thd_load_bodies, list(wanted))
        except Exception as e:
            for waiters in wanted.values():
                for d in waiters:
                    d.errback(e)
        else:
            for mid, waiters in wanted.items():
                for d in waiters:
                    d.callback(bodies.get(mid))
        finally:
            self._loading = False
            self._kick()


class SendMemory:
    """The octets of message bodies outbound delivery attempts hold, within a limit
    (`[queue] max_send_memory`).

    An attempt takes its message's size before it takes a connection and gives it back when
    it ends, however it ends. One that would pass the limit waits for room; waits are
    served in the order they were asked (a small message does not pass a large one that
    waits: the large one would wait for ever behind a stream of small ones). An attempt is
    always allowed when no other holds anything, so a message larger than the limit still
    goes, alone. A wait is not a failure of the delivery: it costs the message no attempt
    and no backoff.

    Waiting is logged once when it starts (a warning: the limit is reached) and once when
    it ends, that is when no attempt has waited for `WAIT_QUIET` seconds (or the runner
    stops), with how many attempts waited and for how long, from the first wait to the end
    of the last; an attempt waiting again
    within them is the same spell, so a budget that stays full logs two lines, not two an
    attempt. `used` and `waiting` are the gauges `mailcore_queue_send_memory_bytes` and
    `mailcore_queue_send_memory_waiting`."""

    WAIT_QUIET = 60.0

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self.clock = clock
        self.used = 0  # octets the attempts under way hold
        self.attempts = 0  # attempts under way
        self._waiting: deque[tuple[int, defer.Deferred[bool]]] = deque()
        self._closed = False
        # The spell of waiting under way: when it began, the attempts that waited in it,
        # when its last wait ended, and the timer that ends it once none has waited for
        # WAIT_QUIET seconds.
        self._since: float | None = None
        self._waited = 0
        self._last = 0.0
        self._quiet: IDelayedCall | None = None

    @property
    def waiting(self) -> int:
        """Attempts waiting for room."""
        return len(self._waiting)

    def take_now(self, size: int) -> bool:
        """Take room for an attempt holding `size` octets if it is there now (none waits
        before it); False, nothing taken or waited for, if not."""
        if self._closed or self._waiting or not self._fits(size):
            return False
        self.used += size
        self.attempts += 1
        return True

    def take(self, size: int) -> defer.Deferred[bool]:
        """Room for an attempt holding `size` octets: True once it is taken (give it back
        with `give`), False when the runner stops first (nothing taken)."""
        if self._closed:
            return defer.succeed(False)
        if self.take_now(size):
            return defer.succeed(True)
        entry: tuple[int, defer.Deferred[bool]]

        def cancel(d: defer.Deferred[bool]) -> None:
            self._waiting.remove(entry)
            self._wait_ended()

        entry = (size, defer.Deferred(cancel))
        self._waiting.append(entry)
        self._wait_began(size)
        return entry[1]

    def give(self, size: int) -> None:
        """An attempt that held `size` octets ended: wake the waits that now fit."""
        self.used -= size
        self.attempts -= 1
        granted = []
        while self._waiting and self._fits(self._waiting[0][0]):
            size, d = self._waiting.popleft()
            self.used += size
            self.attempts += 1
            granted.append(d)
        if granted:
            self._wait_ended()
        for d in granted:
            d.callback(True)

    def close(self) -> None:
        """The runner stops: every wait ends with False, and so does any later take."""
        self._closed = True
        waiting, self._waiting = self._waiting, deque()
        if self._since is not None:
            self._spell_over()
        for _size, d in waiting:
            d.callback(False)

    def _wait_began(self, size: int) -> None:
        self._waited += 1
        if self._quiet is not None:  # waiting again within WAIT_QUIET: the same spell
            self._quiet.cancel()
            self._quiet = None
        if self._since is None:
            self._since = self.clock.seconds()
            log.warn("outbound deliveries wait for send memory: {used} octets held by "
                     "{attempts} {noun}, a message of {size} more would pass [queue] "
                     "max_send_memory ({limit})", used=self.used, attempts=self.attempts,
                     noun="attempt" if self.attempts == 1 else "attempts", size=size,
                     limit=self.limit)

    def _wait_ended(self) -> None:
        """A wait ended: once none is left, the spell ends if none begins in WAIT_QUIET."""
        if self._waiting or self._since is None or self._quiet is not None:
            return
        self._last = self.clock.seconds()
        self._quiet = self.clock.callLater(self.WAIT_QUIET, self._spell_over)

    def _spell_over(self) -> None:
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        elif self._quiet is None:  # (the runner stops while attempts wait)
            self._last = self.clock.seconds()
        self._quiet = None
        assert self._since is not None
        seconds = self._last - self._since
        log.info("outbound deliveries no longer wait for send memory: {waited} {noun} "
                 "waited, over {seconds:.0f} s", waited=self._waited,
                 noun="attempt" if self._waited == 1 else "attempts", seconds=seconds)
        self._since = None
        self._waited = 0

    def _fits(self, size: int) -> bool:
        return self.attempts == 0 or self.used + size <= self.limit


# -- jobs ------------------------------------------------------------------------------------


@dataclass
class TaggedJob(Job):
    """A job the pipeline said to deliver tagged: the header fields and Subject prefix are
    applied when the body is sent (it may have to be loaded from the store by then)."""

    add_headers: tuple[tuple[str, str], ...] = ()
    subject_prefix: str = ""


def part_of(job: Job, rcpts: list[Rcpt]) -> Job:
    """The job for some of `job`'s recipients, keeping its tags."""
    if len(rcpts) == len(job.recipients):
        return job
    if isinstance(job, TaggedJob):
        return TaggedJob(job.message_id, job.mail_from, job.kind, job.created_at, job.size,
                         rcpts, job.lease_until, job.add_headers, job.subject_prefix)
    return Job(job.message_id, job.mail_from, job.kind, job.created_at, job.size, rcpts,
               job.lease_until)


# Recipients of one job routed to each hop, in the order first seen.
Groups = OrderedDict[Hop, list[Rcpt]]


# -- per-hop queues ---------------------------------------------------------------------------


@dataclass
class HopQueue:
    """The jobs waiting for one next hop and the connections serving it."""

    hop: Hop
    # Jobs with no room taken in the send memory yet, the one asking for it (`asking`, at
    # most one a hop), and jobs whose room is taken, waiting for a connection (`ready`).
    jobs: deque[Job] = field(default_factory=deque)
    asking: tuple[Job, defer.Deferred[bool]] | None = None
    ready: deque[Job] = field(default_factory=deque)
    sending: int = 0  # connections with a job (its room taken) under way
    # Connections between one job and the next: they take a ready job themselves, so no
    # connection is opened for it (see QueueRunner._pump).
    finishing: int = 0
    active: int = 0
    connecting: int = 0
    established: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""
    dead_permanent: bool = False  # the reason cannot change by retrying: bounce
    cleartext_until: float = 0.0
    # Connections waiting for a job: their Deferred and since when, oldest first; one
    # timer per hop ends those idle for `connection_idle` (see QueueRunner._expire_idle).
    idle: deque[tuple[defer.Deferred[Job | None], float]] = field(default_factory=deque)
    idle_timer: IDelayedCall | None = None
    # When the hop is dead: the timer that forgets it once `dead_until` has passed, if it
    # has no work by then (see QueueRunner._forget_if_idle).
    dead_timer: IDelayedCall | None = None
    limit: int = 0  # connection limit now; lowered when the hop refuses extra connections
    limit_until: float = 0.0  # when a lowered limit is lifted (tried at full again)

    def is_dead(self, now: float) -> bool:
        """Known to be down, with no connection of ours still working."""
        return self.dead_until > now and self.established == 0


class QueueRunner:
    """Delivers held work to next hops; see the module docstring."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: QueueSettings,
        metrics: QueueMetrics,
        router: Router,
        connector: Connector,
        pipeline: Pipeline,
        hostname: str,
        max_hops: int = DEFAULT_MAX_HOPS,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.router = router
        self.connector = connector
        self.pipeline = pipeline
        self.hostname = hostname
        self.max_hops = max_hops  # [smtp] max_hops: more Received fields is a loop
        self.held = 0
        self.running = False
        self.bodies = BodyCache(settings.body_cache_bytes)
        self.send_memory = SendMemory(settings.max_send_memory, clock)
        # (the gauges read the budget of the moment: a stop makes a new one)
        metrics.send_memory.set_function(lambda: self.send_memory.used)
        metrics.send_waiting.set_function(lambda: self.send_memory.waiting)
        self.loader = BodyLoader(db)
        self.spool: Spool | None = None  # the write lane for results; set by build_queue
        self.hops: dict[Hop, HopQueue] = {}
        # A testing MTA-STS policy's MX host that offers no STARTTLS: warned about once a
        # period per host, not per connection.
        self._sts_quiet = Quiet(clock, settings.route_cache_seconds)
        # Connections opening or open, all hops together, and the hops waiting for one
        # (`max_connections`), in the order they asked.
        self.connections = 0
        self._slot_wait: OrderedDict[Hop, None] = OrderedDict()
        # Hops with a connection opening or open (for the fair share, see the module's doc).
        self._busy_hops = 0
        self._workers: set[defer.Deferred[None]] = set()
        self._sessions: set[SMTPSession] = set()
        # Connections being opened (connect, greeting, EHLO, STARTTLS): cut with the
        # sessions when a stop's grace period ends.
        self._opening: set[defer.Deferred[SMTPSession]] = set()
        self._routing: set[defer.Deferred[None]] = set()
        # Routed jobs waiting for the pipeline, the scans running, and what scans that
        # ended during a stop left undelivered.
        self._scan_wait: deque[tuple[Job, Groups]] = deque()
        self._scanning: set[defer.Deferred[None]] = set()
        self._scans = 0
        self._starting_scans = False
        self._stop_leftover: list[int] = []
        self.on_room: Callable[[], None] | None = None  # the sweeper's "claim more" hook
        # Where LOCAL recipients are written (the Mail API's mailboxes; set by the Core).
        self.local_store: LocalStore | None = None
        # Where a body is made 7-bit for a hop without 8BITMIME (set by the daemon's core;
        # None converts on the calling thread, as unit tests on a Clock do).
        self.cpu: CpuPool | None = None
        # The end of the leases the last renewal that committed gave, and the end before
        # which a lease lapsed (a renewal committed only after it: see leases_renewed).
        self._renewed_until = -math.inf
        self._lapsed_by = -math.inf

    # -- taking work --------------------------------------------------------------------

    @property
    def room(self) -> int:
        return max(0, self.settings.max_in_memory - self.held) if self.running else 0

    def reserve(self, recipients: int) -> bool:
        """Hold room for recipients the spool is about to commit leased to this node."""
        if not self.running or self.held + recipients > self.settings.max_in_memory:
            return False
        self.held += recipients
        return True

    def unreserve(self, recipients: int) -> None:
        self.held -= recipients

    def submit(self, jobs: Sequence[Job], bodies: dict[str, bytes]) -> None:
        """Take reserved, committed work (from the spool or the sweeper) and start on it."""
        for mid, body in bodies.items():
            self.bodies.put(mid, body)
        d = defer.Deferred.fromCoroutine(self._route(list(jobs)))
        self._routing.add(d)

        def done(result: object) -> object:
            self._routing.discard(d)
            return result

        d.addBoth(done)

    def enqueue_new(self, dsns: Sequence[tuple[Job, bytes]]) -> None:
        """Take messages the spool made itself (DSNs), already leased to this node."""
        jobs = []
        for job, body in dsns:
            self.held += len(job.recipients)
            self.bodies.put(job.message_id, body)
            jobs.append(job)
        self.submit(jobs, {})

    async def _route(self, jobs: list[Job]) -> None:
        """Route `jobs` and put them on their way. A job with a recipient whose route is
        an MX lookup is routed on its own, beside the others: a lookup may take a minute
        (a domain whose name servers do not answer), and routed in turn it held up every
        job after it."""
        try:
            await self.router.prefetch({r.domain_id for j in jobs for r in j.recipients})
        except Exception:
            log.failure("loading routes failed")
        touched: dict[Hop, HopQueue] = {}
        lookups: list[defer.Deferred[None]] = []
        for job in jobs:
            if any(self.router.looks_up(r.domain_id) for r in job.recipients):
                lookups.append(defer.Deferred.fromCoroutine(self._route_alone(job)))
                continue
            groups = await self._groups(job)
            if groups:
                self._dispatch(job, groups, touched)
        self._dispatched(touched)
        if lookups:
            await defer.DeferredList(lookups)

    async def _route_alone(self, job: Job) -> None:
        touched: dict[Hop, HopQueue] = {}
        groups = await self._groups(job, together=True)
        if groups:
            self._dispatch(job, groups, touched)
        self._dispatched(touched)

    async def _groups(self, job: Job, together: bool = False) -> Groups:
        """`job`'s recipients by next hop (routed all at once when `together`, else in
        turn); those that cannot be routed fail."""
        groups: Groups = OrderedDict()
        routes = [defer.Deferred.fromCoroutine(
            self.router.route(r.domain_id, r.address, job.kind))
            for r in job.recipients] if together else []
        for i, rcpt in enumerate(job.recipients):
            try:
                hop = await (routes[i] if together
                             else self.router.route(rcpt.domain_id, rcpt.address, job.kind))
            except RoutingError as e:
                self._fail(job, [rcpt], f"{e.status} {e}",
                           permanent=e.permanent, hop="", now=self.clock.seconds())
                continue
            except Exception:
                log.failure("routing {address} of {queue_id} failed",
                            address=rcpt.address, queue_id=job.message_id)
                self._fail(job, [rcpt], ROUTING_FAILED, permanent=False, hop="",
                           now=self.clock.seconds())
                continue
            groups.setdefault(hop, []).append(rcpt)
        return groups

    def _dispatch(self, job: Job, groups: Groups, touched: dict[Hop, HopQueue]) -> None:
        """A routed job to the pipeline or straight to its hops' queues (in `touched`)."""
        if not self.pipeline.stages:
            self._queue(job, groups, touched)
        elif self.running:
            self._process_now(job, groups, touched)
        else:
            self._scan_wait.append((job, groups))

    def _dispatched(self, touched: dict[Hop, HopQueue]) -> None:
        """After `_dispatch`: start the scans waiting, pump the hops given work."""
        if self.pipeline.stages:
            self._start_scans()
        for hq in touched.values():
            self._pump(hq)

    def _queue(self, job: Job, groups: Groups, touched: dict[Hop, HopQueue]) -> None:
        """Put each hop's part of `job` on that hop's queue (pumped by the caller)."""
        for hop, rcpts in groups.items():
            if hop == LOCAL:
                self._track(defer.Deferred.fromCoroutine(
                    self._deliver_local(part_of(job, rcpts))))
                continue
            hq = self.hops.get(hop)
            if hq is None:
                hq = self.hops[hop] = HopQueue(hop, limit=self.settings.hop_concurrency)
            hq.jobs.append(part_of(job, rcpts))
            touched[hop] = hq

    # -- the pipeline, before a connection is taken -------------------------------------

    def _start_scans(self) -> None:
        """Start processing waiting jobs, up to `pipeline.max_scans` at a time."""
        if self._starting_scans:  # the loop below is running further up the stack
            return
        self._starting_scans = True
        try:
            while (self._scan_wait and self.running
                   and self._scans < self.pipeline.max_scans):
                job, groups = self._scan_wait.popleft()
                self._start_scan(job.message_id, self._process(job, groups))
        finally:
            self._starting_scans = False

    def _start_scan(self, queue_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` (a message's processing, or the rest of it) as one of the scans."""
        self._scans += 1
        d = defer.Deferred.fromCoroutine(self._scan(queue_id, work))
        if not d.called:
            self._scanning.add(d)
            d.addBoth(self._scan_ended, d)

    def _scan_ended(self, result: object, d: defer.Deferred[None]) -> object:
        self._scanning.discard(d)
        return result

    async def _scan(self, queue_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Process one routed job by the pipeline and carry out the decision (`work`); what
        is left to send goes on its hops' queues."""
        try:
            await work
        except Exception:
            # Not expected (every outcome is handled in _process); the recipients stay
            # leased and are tried again once the lease lapses.
            log.failure("processing {queue_id} failed", queue_id=queue_id)
        finally:
            self._scans -= 1
            self._start_scans()

    def _process_now(self, job: Job, groups: Groups, touched: dict[Hop, HopQueue]) -> None:
        """`_process` as a plain call, as far as nothing has to wait: the usual message (its
        body at hand, decided at once by `Pipeline.process_now`, nothing to quarantine) goes
        on its hops' queues in `touched` (pumped by the caller) like unfiltered mail; what
        has to wait goes on as a scan (`_scan_wait` when nothing was done yet)."""
        body = self.bodies.get(job.message_id)
        if body is None:
            self._scan_wait.append((job, groups))
            return
        live = self._live(job, groups)
        if live is None:
            return
        job = part_of(job, [r for rcpts in live.values() for r in rcpts])
        if self._looping(job, body):
            return
        message = self._message(job, body)
        try:
            decision = self.pipeline.process_now(message)
        except Exception:
            log.failure("pipeline failed for {queue_id}", queue_id=job.message_id)
            decision = Decision(Action.DEFER, reason=PROCESSING_FAILED)
        if isinstance(decision, Resume):
            if decision.stage == 0:  # nothing done yet: a scan in its turn does it all
                self._scan_wait.append((job, live))
            else:
                self._start_scan(job.message_id,
                                 self._decide_later(job, live, message, decision))
            return
        rest = self._act_now(job, decision)
        if rest is LATER:
            self._start_scan(job.message_id, self._carry_out(job, live, message, decision))
        elif rest is not None:
            self._send_rest(rest, live, touched)

    async def _process(self, job: Job, groups: Groups) -> None:
        live = self._live(job, groups)
        if live is None:
            return
        job = part_of(job, [r for rcpts in live.values() for r in rcpts])
        body = self.bodies.get(job.message_id)
        if body is None:
            body = await self._load(job)
            if body is None:
                return
            self.bodies.put(job.message_id, body)  # for the send, within the budget
        if self._looping(job, body):
            return
        await self._decide_later(job, live, self._message(job, body))

    async def _decide_later(self, job: Job, live: Groups, message: PipelineMessage,
                            resume: Resume | None = None) -> None:
        try:
            decision = await self.pipeline.process(message, resume)
        except Exception:
            log.failure("pipeline failed for {queue_id}", queue_id=job.message_id)
            decision = Decision(Action.DEFER, reason=PROCESSING_FAILED)
        await self._carry_out(job, live, message, decision)

    async def _carry_out(self, job: Job, live: Groups, message: PipelineMessage,
                         decision: Decision) -> None:
        rest = await self._act(job, message, decision)
        if rest is None:
            return
        touched: dict[Hop, HopQueue] = {}
        self._send_rest(rest, live, touched)
        for hq in touched.values():
            self._pump(hq)

    def _live(self, job: Job, groups: Groups) -> Groups | None:
        """The groups whose hop is not known to be down (the others' recipients failed as
        that hop's are); None when none is left."""
        now = self.clock.seconds()
        live: Groups = OrderedDict()
        for hop, rcpts in groups.items():
            hq = self.hops.get(hop)
            if hq is not None and hq.is_dead(now):
                self._fail(job, rcpts, hq.dead_reason, permanent=hq.dead_permanent,
                           hop=hq.hop.label, now=now)
            else:
                live[hop] = rcpts
        return live or None

    @staticmethod
    def _message(job: Job, body: bytes) -> PipelineMessage:
        return PipelineMessage(
            job.message_id, job.kind, job.mail_from,
            tuple(PipelineRecipient(r.address, r.domain_id, r.charged) for r in job.recipients),
            body,
        )

    def _send_rest(self, rest: Job, live: Groups, touched: dict[Hop, HopQueue]) -> None:
        """Put what the pipeline left to send on its hops' queues (pumped by the caller)."""
        if not self.running:
            self._left_at_stop(rest)
            return
        if len(rest.recipients) == sum(len(rcpts) for rcpts in live.values()):
            self._queue(rest, live, touched)  # (the usual message: every recipient goes on)
            return
        keep = {r.id for r in rest.recipients}
        self._queue(rest, OrderedDict(
            (hop, kept) for hop, rcpts in live.items()
            if (kept := [r for r in rcpts if r.id in keep])
        ), touched)

    def _act_now(self, job: Job, decision: Decision) -> Job | Later | None:
        """`_act` as a plain call when the decision keeps nothing in quarantine; LATER,
        with nothing done, when it does."""
        if decision.action is Action.QUARANTINE or (decision.quarantine and any(
                r.address in decision.quarantine for r in job.recipients)):
            return LATER
        return self._after_quarantine(job, decision)

    async def _act(self, job: Job, message: PipelineMessage, decision: Decision) -> Job | None:
        """Carry out what a decision says before sending: defer, quarantine (all or some
        recipients), discard. Returns the job still to send (tagged for a TAG), or None."""
        now = self.clock.seconds()
        if decision.action is Action.QUARANTINE:
            held = job.recipients
        else:
            held = [r for r in job.recipients if r.address in decision.quarantine]
        if held:
            if self.pipeline.quarantine is None:
                self._fail(job, job.recipients, "4.3.0 quarantine requested but no store",
                           permanent=False, hop="", now=now, count_attempt=False)
                return None
            assert self.spool is not None, "build_queue attaches the spool"
            detail = f"quarantined: {decision.reason}"[:MAX_DETAIL]
            results = [Result(r.id, job.message_id, QUARANTINED, detail, "") for r in held]
            try:
                dsns = await self.spool.run_serialized(
                    "queue_quarantine", thd_quarantine, self.pipeline.quarantine, message,
                    decision, results, self.settings.node_id, now,
                    now + self.settings.lease_seconds, self.spool.reporting_mta,
                )
            except NotLeased:
                log.info("{queue_id} not quarantined here: another node took it over (this "
                         "node's lease had lapsed)", queue_id=job.message_id)
                self._release_memory(job, len(job.recipients))
                return None
            except Exception:
                log.failure("quarantining {queue_id} failed", queue_id=job.message_id)
                self._fail(job, job.recipients, QUARANTINE_FAILED, permanent=False, hop="",
                           now=self.clock.seconds())
                return None
            maillog.kept(job.message_id, "quarantined", (r.address for r in held),
                         decision.reason)
            self._release_memory(job, len(held))
            if dsns:
                self.enqueue_new(dsns)
            if len(held) == len(job.recipients):
                return None
            held_ids = {r.id for r in held}
            job = part_of(job, [r for r in job.recipients if r.id not in held_ids])
        return self._after_quarantine(job, decision)

    def _after_quarantine(self, job: Job, decision: Decision) -> Job | None:
        """The rest of `_act` for the recipients not quarantined: defer, discard, or the
        job to send (tagged for a TAG)."""
        if decision.action is Action.DEFER:
            self._fail(job, job.recipients, decision.reason, permanent=False, hop="",
                       now=self.clock.seconds())
            return None
        if decision.action is Action.DISCARD:
            maillog.kept(job.message_id, "discarded", (r.address for r in job.recipients),
                         decision.reason)
            self._delivered(job, job.recipients, f"discarded by policy: {decision.reason}", "",
                            self.clock.seconds(), state=DELIVERED, logged=True)
            return None
        if decision.action is Action.TAG and (decision.add_headers or decision.subject_prefix):
            return TaggedJob(job.message_id, job.mail_from, job.kind, job.created_at, job.size,
                             job.recipients, job.lease_until, decision.add_headers,
                             decision.subject_prefix)
        return job

    def _looping(self, job: Job, body: bytes) -> bool:
        """Bounce (5.4.6) a message whose header section holds more Received fields than
        `max_hops`: it is in a mail loop. Mail the SMTP server took was checked on the way
        in; this catches what the queue took from elsewhere (released quarantine, digests,
        bounces) and what was queued before the limit was lowered. Only the header
        section is read; an AcceptedBody was counted by the server already (same limit)."""
        if type(body) is AcceptedBody:
            return False
        failure = too_many_hops(count_received(body), self.max_hops)
        if failure is None:
            return False
        self._fail(job, job.recipients, failure, permanent=True, hop="",
                   now=self.clock.seconds())
        return True

    async def _load(self, job: Job) -> bytes | None:
        """The body from the store; None (and the job handled) when it cannot be had."""
        try:
            body = await self.loader.get(job.message_id)
        except Exception:
            log.failure("loading the body of {queue_id} failed", queue_id=job.message_id)
            self._fail(job, job.recipients, LOAD_FAILED, permanent=False, hop="",
                       now=self.clock.seconds(), count_attempt=False)
            return None
        if body is None:
            # Deleted by an operator, or finished elsewhere: nothing to do.
            self._release_memory(job, len(job.recipients))
        return body

    # -- outcomes -----------------------------------------------------------------------

    def _release_memory(self, job: Job, count: int) -> None:
        self.held -= count
        self.bodies.drop(job.message_id)
        if self.on_room is not None and self.running:
            self.on_room()

    def _fail(
        self, job: Job, rcpts: Sequence[Rcpt], detail: str, *, permanent: bool, hop: str,
        now: float, count_attempt: bool = True,
    ) -> None:
        """Record a temporary or permanent failure; temporary ones past the lifetime bounce.
        The detail is cut to what the store keeps (a next hop's reply may be 64 KiB)."""
        results = []
        if not permanent and expired(job.created_at, now, self.settings):
            days = self.settings.lifetime / 86400
            detail = f"5.4.7 delivery time expired after {days:g} days; last error: {detail}"
            permanent = True
        detail = detail[:MAX_DETAIL]
        maillog.outcome(job.message_id, BOUNCED if permanent else DEFERRED,
                        (r.address for r in rcpts), relay=hop, delay=now - job.created_at,
                        reply=detail)
        for r in rcpts:
            if permanent:
                results.append(Result(r.id, job.message_id, BOUNCED, detail, hop))
                self.metrics.bounced.inc()
            else:
                attempts = r.attempts + (1 if count_attempt else 0)
                results.append(Result(
                    r.id, job.message_id, DEFERRED, detail, hop,
                    next_attempt(attempts, job.created_at, now, self.settings),
                    count_attempt,
                ))
                self.metrics.deferred.inc()
        self._record(results)
        self._release_memory(job, len(rcpts))

    def _delivered(self, job: Job, rcpts: Sequence[Rcpt], reply: str, hop: str,
                   now: float, state: str = DELIVERED, logged: bool = False) -> None:
        """Record recipients as finished (`logged`: the mail log has its line already); the
        reply is cut to what the store keeps."""
        reply = reply[:MAX_DETAIL]
        self._record([Result(r.id, job.message_id, state, reply, hop) for r in rcpts])
        if state == DELIVERED and not logged:
            maillog.outcome(job.message_id, DELIVERED, (r.address for r in rcpts), relay=hop,
                            delay=now - job.created_at, reply=reply)
            self.metrics.delivered.inc(len(rcpts))
            self.metrics.latency.observe(max(0.0, now - job.created_at))
        self._release_memory(job, len(rcpts))

    def _record(self, results: list[Result]) -> None:
        assert self.spool is not None, "build_queue attaches the spool"
        self.spool.record(results)

    # -- hosted mailboxes ---------------------------------------------------------------

    async def _deliver_local(self, job: Job) -> None:
        """Store a job's LOCAL recipients in their mailboxes (see thd_deliver_local)."""
        now = self.clock.seconds()
        store = self.local_store
        if store is None:
            self._fail(job, job.recipients, "4.3.0 no mailbox store on this node",
                       permanent=False, hop=LOCAL.label, now=now)
            return
        body = self.bodies.get(job.message_id)
        if body is None:
            body = await self._load(job)
            if body is None:
                return
        if not self.pipeline.stages and self._looping(job, body):
            return
        if isinstance(job, TaggedJob):
            body = await self._tagged(job, body)
        assert self.spool is not None, "build_queue attaches the spool"
        try:
            prepared = await store.prepare(job.message_id, body)
            done, results, dsns = await self.spool.run_serialized(
                "queue_deliver_local", thd_deliver_local, store, job, prepared,
                self.settings.node_id, now, now + self.settings.lease_seconds,
                self.spool.reporting_mta,
            )
        except Exception:
            log.failure("storing {queue_id} in its mailboxes failed", queue_id=job.message_id)
            self._fail(job, job.recipients, LOCAL_STORE_FAILED, permanent=False,
                       hop=LOCAL.label, now=self.clock.seconds())
            return
        now = self.clock.seconds()
        delivered = [r for r in job.recipients if r.id in done.stored]
        missing = [r for r in job.recipients
                   if r.id not in done.stored and r.id not in done.suspended]
        waiting = [r for r in job.recipients if r.id in done.suspended]
        if delivered:
            maillog.outcome(job.message_id, DELIVERED, (r.address for r in delivered),
                            relay=LOCAL.label, delay=now - job.created_at, reply=LOCAL_REPLY)
            self.metrics.delivered.inc(len(delivered))
            self.metrics.latency.observe(max(0.0, now - job.created_at))
        if missing:
            replies = {result.rcpt_id: result.detail for result in results}
            for reply in (NO_MAILBOX, MAILBOX_FULL):
                these = [r.address for r in missing if replies.get(r.id) == reply]
                if these:
                    maillog.outcome(job.message_id, BOUNCED, these, relay=LOCAL.label,
                                    delay=now - job.created_at, reply=reply)
            self.metrics.bounced.inc(len(missing))
        self._release_memory(job, len(job.recipients) - len(waiting))
        if waiting:  # (released there)
            self._fail(job, waiting, SUSPENDED, permanent=False, hop=LOCAL.label, now=now)
        if dsns:
            self.enqueue_new(dsns)

    # -- connections --------------------------------------------------------------------

    def _pump(self, hq: HopQueue, most: int | None = None) -> None:
        """Give queued jobs to idle connections, open connections up to the limits (at most
        `most` of them), or defer everything at once when the hop is known to be down. A hop
        that wants more connections than it got waits its turn in `_slot_wait`."""
        now = self.clock.seconds()
        if hq.is_dead(now):
            self._fail_all(hq, now)
            return
        if hq.limit < self.settings.hop_concurrency and now >= hq.limit_until:
            hq.limit = self.settings.hop_concurrency  # (refused once: try at full again)
        self._ask_room(hq)
        while hq.ready and hq.idle:
            d, _since = hq.idle.popleft()
            d.callback(hq.ready.popleft())
        if not self.running:
            return
        while (
            hq.ready and hq.active < hq.limit
            and len(hq.ready) > hq.connecting + hq.finishing
        ):
            if self.connections >= self.settings.max_connections or most == 0:
                if hq.hop not in self._slot_wait:
                    self._slot_wait[hq.hop] = None
                    self._end_an_idle_connection()
                return
            if self._others_wait(hq) and hq.active >= self._fair_share():
                return  # (others wait: its own connections take its jobs meanwhile)
            if most is not None:
                most -= 1
            if hq.active == 0:
                self._busy_hops += 1
            hq.active += 1
            hq.connecting += 1
            self.connections += 1
            self._track(defer.Deferred.fromCoroutine(self._worker(hq)))

    def _fail_all(self, hq: HopQueue, now: float) -> None:
        """Fail every job of a hop known to be down, giving back the room of those that
        had it."""
        failed: list[Job] = []
        if hq.asking is not None:
            job, asking = hq.asking
            hq.asking = None
            asking.cancel()
            failed.append(job)
        failed.extend(self._take_back(hq))
        for job in failed:
            self._fail(job, job.recipients, hq.dead_reason, permanent=hq.dead_permanent,
                       hop=hq.hop.label, now=now)

    def _take_back(self, hq: HopQueue) -> list[Job]:
        """Take the hop's jobs not under way out of it, in their order: those whose room
        was taken (`ready`), their room given back, then those with none (`jobs`). The
        one asking for room, if any, is its caller's to end."""
        taken = list(hq.ready)
        hq.ready.clear()
        for job in taken:
            self.send_memory.give(job.size)
        taken.extend(hq.jobs)
        hq.jobs.clear()
        return taken

    def _ask_room(self, hq: HopQueue) -> None:
        """Take room in the send memory for the hop's next jobs (to `ready`), as many as it
        may send at once (its connection limit, or its fair share while other hops wait
        for a connection). The first that must wait asks (`asking`) and the hop's jobs
        behind it wait for it: one wait a hop, so that a hop's backlog takes its turns
        among the other hops' messages instead of going ahead of them all."""
        if not self.running:
            return
        most = hq.limit
        if self._others_wait(hq):
            most = min(most, self._fair_share())
        while hq.jobs and hq.asking is None and len(hq.ready) + hq.sending < most:
            job = hq.jobs.popleft()
            if self.send_memory.take_now(job.size):
                hq.ready.append(job)
                continue
            asking = self.send_memory.take(job.size)
            hq.asking = (job, asking)
            asking.addCallbacks(self._room_taken, self._ask_cancelled,
                                callbackArgs=(hq, job))

    def _room_taken(self, taken: bool, hq: HopQueue, job: Job) -> None:
        """The room `hq`'s asking job waited for is taken (False: the runner stops)."""
        hq.asking = None
        if not taken:
            self._left_at_stop(job)
            return
        hq.ready.append(job)
        self._pump(hq)

    @staticmethod
    def _ask_cancelled(failure: Failure) -> None:
        failure.trap(defer.CancelledError)  # (its hop is down: _fail_all failed its job)

    def _end_an_idle_connection(self) -> None:
        """End one connection that idles with nothing to send (it QUITs and gives its slot
        to the hops waiting): a hop that starts waiting would otherwise wait for another
        hop's `connection_idle`."""
        for other in self.hops.values():
            if other.idle and not other.ready:
                d, _since = other.idle.popleft()
                d.callback(None)
                return

    def _others_wait(self, hq: HopQueue) -> bool:
        """Whether hops other than `hq` wait for a connection."""
        return bool(self._slot_wait) and len(self._slot_wait) > (hq.hop in self._slot_wait)

    def _fair_share(self) -> int:
        """The connections one hop may hold while others wait for one."""
        contenders = self._busy_hops + len(self._slot_wait)
        return max(1, self.settings.max_connections // max(1, contenders))

    def _grant_slots(self) -> None:
        """Give free connections to the hops waiting for one, one each in turn."""
        while self._slot_wait and self.connections < self.settings.max_connections:
            hop, _ = self._slot_wait.popitem(last=False)
            hq = self.hops.get(hop)
            if hq is not None:
                self._pump(hq, most=1)

    def revive_hops(self) -> int:
        """Forget that next hops were found unusable (an operator's `queue flush`): the next
        job for each connects again. Returns how many hops were marked."""
        marked = 0
        for hq in list(self.hops.values()):
            if hq.dead_until > 0:
                marked += 1
            hq.dead_until, hq.dead_reason, hq.dead_permanent = 0.0, "", False
            self._forget_if_idle(hq)
        return marked

    def _forget_if_idle(self, hq: HopQueue) -> None:
        """Drop `hq` once it holds nothing: no jobs, no connections, and no `dead_until`
        still to come. Every hop that once failed was kept for ever (about 2 KB each, and
        bounces reach an unbounded set of hops)."""
        if (hq.jobs or hq.asking is not None or hq.ready or hq.active or hq.idle
                or hq.dead_until > self.clock.seconds()):
            return
        for timer in (hq.idle_timer, hq.dead_timer):
            if timer is not None and timer.active():
                timer.cancel()
        hq.idle_timer = hq.dead_timer = None
        if self.hops.get(hq.hop) is hq:
            del self.hops[hq.hop]

    def _forget_when_revived(self, hq: HopQueue) -> None:
        hq.dead_timer = None
        self._forget_if_idle(hq)

    def _track(self, worker: defer.Deferred[None]) -> None:
        self._workers.add(worker)

        def done(result: object) -> object:
            self._workers.discard(worker)
            return result

        worker.addBoth(done)

    def _next_job(self, hq: HopQueue) -> defer.Deferred[Job | None]:
        """The hop's next job with its room taken, for a connection that has sent its
        last; None when the connection is to end. While the next job waits for room the
        connection idles, holding none."""
        if not self.running:
            return defer.succeed(None)  # (a stop: what is ready is left over)
        if self._others_wait(hq) and hq.active > self._fair_share():
            return defer.succeed(None)  # (more than its share while others wait: end one)
        if hq.ready:
            return defer.succeed(hq.ready.popleft())
        hq.finishing += 1
        try:
            self._pump(hq)  # (room for the next jobs; no connection for the one it takes)
        finally:
            hq.finishing -= 1
        if hq.ready:
            return defer.succeed(hq.ready.popleft())
        if self._slot_wait:
            return defer.succeed(None)  # (other hops wait for a connection: end this one)
        d: defer.Deferred[Job | None] = defer.Deferred()
        hq.idle.append((d, self.clock.seconds()))
        if hq.idle_timer is None:
            hq.idle_timer = self.clock.callLater(self.settings.connection_idle,
                                                 self._expire_idle, hq)
        return d

    def _expire_idle(self, hq: HopQueue) -> None:
        """End the waits of connections idle for `connection_idle` (they QUIT), and set the
        hop's timer for the next one. A connection taken by a job leaves its place in the
        queue without touching the timer: no callLater and cancel per job."""
        hq.idle_timer = None
        limit = self.settings.connection_idle
        now = self.clock.seconds()
        while hq.idle and hq.idle[0][1] + limit <= now + 1e-6:
            d, _since = hq.idle.popleft()
            d.callback(None)
        if hq.idle and hq.idle_timer is None:
            hq.idle_timer = self.clock.callLater(max(0.0, hq.idle[0][1] + limit - now),
                                                 self._expire_idle, hq)

    async def _open(self, hq: HopQueue) -> SMTPSession:
        """A session with the hop's host, or when it cannot be had (no connection, no
        greeting, no TLS its policy wants) with each of its fallbacks (other MX hosts) in
        turn; the first host's failure when none can be had. A loop back to ourselves ends
        the search, or for a hop with a `loop_to` (the served hop of a domain served here
        but not vouched for, `mailcore.queue.routing`) turns to that hop."""
        first: Exception | None = None
        for target in hq.hop.hosts():
            try:
                return await self._open_host(hq, target)
            except NextHopRefused as e:
                if e.permanent:
                    if hq.hop.loop_to is not None:
                        return await self._open_host(hq, hq.hop.loop_to)
                    raise
                first = first or e
            except defer.CancelledError:
                raise
            except Exception as e:
                first = first or e
        assert first is not None
        raise first

    async def _open_host(self, hq: HopQueue, hop: Hop) -> SMTPSession:
        """Connect to `hop` (one host of hq's) as `open_host` does, in cleartext at once
        while an opportunistic STARTTLS to it failed lately."""
        def tls_failed() -> None:
            hq.cleartext_until = self.clock.seconds() + CLEARTEXT_AFTER_TLS_FAILURE

        session = await open_host(self.connector, hop,
                                  cleartext=hq.cleartext_until > self.clock.seconds(),
                                  tls_failed=tls_failed)
        if (hop.sts == "testing" and "STARTTLS" not in session.extensions
                and self._sts_quiet.due(hop.label)):
            # (Once a period per host, not per connection; the host may serve several
            # domains: sts_domain names one.)
            log.warn("MTA-STS policy of {domain} (testing): {hop} offers no STARTTLS; "
                     "delivering as without a policy", domain=hop.sts_domain, hop=hop.label)
        return session

    async def _worker(self, hq: HopQueue) -> None:
        """One connection: open it, deliver jobs until idle or the per-connection cap."""
        session: SMTPSession | None = None
        try:
            opening = defer.Deferred.fromCoroutine(self._open(hq))
            self._opening.add(opening)
            try:
                session = await opening
            except Exception as e:
                hq.connecting -= 1
                if not self.running:
                    return  # (cut by a stop: the hop is not to blame)
                reason = describe(e, hq.hop)
                if hq.established == 0:
                    wait = min(self.settings.dead_hop_seconds, self.settings.min_backoff)
                    hq.dead_until = self.clock.seconds() + wait
                    if hq.dead_timer is not None and hq.dead_timer.active():
                        hq.dead_timer.cancel()
                    hq.dead_timer = self.clock.callLater(wait, self._forget_when_revived, hq)
                    hq.dead_reason = reason
                    hq.dead_permanent = isinstance(e, NextHopRefused) and e.permanent
                    log.info("next hop {hop} unusable: {reason}", hop=hq.hop.label,
                             reason=reason)
                else:
                    hq.limit = max(1, hq.established)
                    hq.limit_until = self.clock.seconds() + min(
                        self.settings.dead_hop_seconds, self.settings.min_backoff)
                return
            finally:
                self._opening.discard(opening)
            hq.connecting -= 1
            hq.established += 1
            hq.dead_until = 0.0
            self._sessions.add(session)
            while session.usable and session.transactions < self.settings.messages_per_connection:
                job = await self._next_job(hq)
                if job is None:
                    break
                if not session.usable:
                    # Closed or dropped while it waited (the hop hung up, or talked unasked):
                    # the job (its room kept) is another connection's, and no attempt of its
                    # own.
                    hq.ready.appendleft(job)
                    break
                if not await self._deliver(session, job, hq):
                    break
            await session.quit()
        finally:
            if session is not None:
                self._sessions.discard(session)
                hq.established -= 1
            hq.active -= 1
            if hq.active == 0:
                self._busy_hops -= 1
            self.connections -= 1
            self._grant_slots()
            self._pump(hq)
            self._forget_if_idle(hq)

    async def _deliver(self, session: SMTPSession, job: Job, hq: HopQueue) -> bool:
        """Send one job, its room in `send_memory` taken, on an open session and give the
        room back; returns False when the session is unusable."""
        hq.sending += 1
        try:
            return await self._attempt(session, job, hq)
        finally:
            hq.sending -= 1
            hq.finishing += 1  # (a job the room given back lets go may be this one's next)
            try:
                self.send_memory.give(job.size)
            finally:
                hq.finishing -= 1

    def _left_at_stop(self, job: Job) -> None:
        """A job not sent because the runner stops: the caller of `stop` releases its
        leases."""
        self._stop_leftover.extend(r.id for r in job.recipients)
        self.held -= len(job.recipients)

    async def _attempt(self, session: SMTPSession, job: Job, hq: HopQueue) -> bool:
        """`_deliver`'s send."""
        hop = hq.hop.label
        body = self.bodies.get(job.message_id)
        if body is None:
            body = await self._load(job)
            if body is None:
                return True
        if not self.pipeline.stages and self._looping(job, body):
            return True  # (with stages, checked before the pipeline ran)
        if isinstance(job, TaggedJob):
            body = await self._tagged(job, body)
        if "8BITMIME" not in session.extensions and not body.isascii():
            body = await self._seven_bit(body)
        now = self.clock.seconds()
        if self._lease_end(job) - now < self.settings.lease_seconds * LEASE_MARGIN:
            self._give_back(job)
            return True
        try:
            result = await session.send(
                job.mail_from, [r.address for r in job.recipients], body
            )
        except SMTPClientError as e:
            self._fail(job, job.recipients, describe(e, hq.hop), permanent=False, hop=hop,
                       now=self.clock.seconds())
            session.abort()
            return False
        now = self.clock.seconds()
        delivered: list[Rcpt] = []
        by_reply: dict[Reply, list[Rcpt]] = {}
        for i, rcpt in enumerate(job.recipients):
            reply = result.for_recipient(i)
            if reply.ok:
                delivered.append(rcpt)
            else:
                by_reply.setdefault(reply, []).append(rcpt)
        if delivered:
            assert result.data is not None
            self._delivered(job, delivered, str(result.data), hop, now)
        for reply, rcpts in by_reply.items():
            self._fail(job, rcpts, str(reply), permanent=reply.permanent, hop=hop, now=now)
        return session.usable

    async def _tagged(self, job: TaggedJob, body: bytes) -> bytes:
        """The body with the job's tags (`apply_tags`); on the CPU pool when it is larger
        than TAG_INLINE (the tagged copy of a 53 MB message took 45-93 ms of the reactor's
        CPU, 21 ms once made one copy)."""
        if self.cpu is None or len(body) <= TAG_INLINE:
            return apply_tags(body, job.add_headers, job.subject_prefix)
        return await self.cpu.run(apply_tags, body, job.add_headers, job.subject_prefix)

    async def _seven_bit(self, body: bytes) -> bytes:
        """An 8-bit body made 7-bit for a hop without 8BITMIME (mailcore.smtp.sevenbit), on
        the CPU pool (a large message's parts are re-encoded whole)."""
        if self.cpu is None:
            return seven_bit(body)
        return await self.cpu.run(seven_bit, body)

    # -- leases -------------------------------------------------------------------------

    def leases_renewed(self, until: float, committed_at: float) -> None:
        """A renewal of all this node's active leases to `until` committed at
        `committed_at` (the service's lease renewal). It extends the leases of the jobs held
        only if it came in time: a job whose lease had ended by then may have been claimed
        by another node meanwhile (this node was paused, or renewals failed), and the
        renewal did not touch that node's rows."""
        if committed_at >= self._renewed_until:
            if self._renewed_until > -math.inf:
                log.warn("leases were renewed only after they had lapsed ({late:.1f} s "
                         "late): work held since then is given back unsent",
                         late=committed_at - self._renewed_until)
            self._lapsed_by = max(self._lapsed_by, committed_at)
        self._renewed_until = max(self._renewed_until, until)

    def _lease_end(self, job: Job) -> float:
        """When this node's lease on `job` ends, as far as this node knows."""
        if job.lease_until <= self._lapsed_by:
            return -math.inf
        return max(job.lease_until, self._renewed_until)

    def _give_back(self, job: Job) -> None:
        """Leave a job whose lease ended (or is about to) unsent, and release its leases (if
        still this node's) so that it is claimed again: another node may have taken it and
        be sending it."""
        log.warn("the lease of {queue_id} ({n} recipients) has ended, or less than {margin:g} s "
                 "of it is left: not sent here, given back to be claimed again",
                 queue_id=job.message_id, n=len(job.recipients),
                 margin=self.settings.lease_seconds * LEASE_MARGIN)
        self._release_memory(job, len(job.recipients))
        self._track(defer.Deferred.fromCoroutine(
            self._release_leases([r.id for r in job.recipients])))

    async def _release_leases(self, rcpt_ids: list[int]) -> None:
        assert self.spool is not None, "build_queue attaches the spool"
        try:
            await self.spool.run_serialized("queue_give_back", thd_release_leases,
                                            self.settings.node_id, rcpt_ids)
        except Exception:
            log.failure("giving back {n} recipients whose lease ended failed", n=len(rcpt_ids))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.running = True

    async def stop(self) -> list[int]:
        """Stop taking work, let in-flight transactions finish (up to the grace period,
        then cut them and the connections still being opened), write every result;
        returns the recipients still held in memory, whose leases the caller releases."""
        self.running = False
        self._slot_wait.clear()
        self.send_memory.close()
        for hq in list(self.hops.values()):
            for timer in (hq.idle_timer, hq.dead_timer):
                if timer is not None and timer.active():
                    timer.cancel()
            hq.idle_timer = hq.dead_timer = None
            while hq.idle:
                d, _since = hq.idle.popleft()
                d.callback(None)
        if self._routing:
            await defer.DeferredList(list(self._routing))
        leftover: list[int] = []
        while self._scan_wait:
            job, groups = self._scan_wait.popleft()
            for rcpts in groups.values():
                leftover.extend(r.id for r in rcpts)
                self.held -= len(rcpts)
        for hq in self.hops.values():
            # (The jobs asking for room were left over by the close.)
            for job in self._take_back(hq):
                self._left_at_stop(job)
        if self._workers or self._scanning:
            # Scans in flight finish: their outcomes are recorded, or what they would have
            # sent is left over.
            busy = defer.DeferredList(list(self._workers) + list(self._scanning))
            timer = self.clock.callLater(self.settings.stop_grace, self._abort_all)
            await busy
            if timer.active():
                timer.cancel()
        leftover.extend(self._stop_leftover)
        self._stop_leftover = []
        if self.spool is not None:
            await self.spool.drain()
            self.spool.cancel()
        self.bodies = BodyCache(self.settings.body_cache_bytes)
        self.send_memory = SendMemory(self.settings.max_send_memory, self.clock)
        return leftover

    def _abort_all(self) -> None:
        for session in list(self._sessions):
            session.abort()
        for opening in list(self._opening):
            opening.cancel()


# What a connection to a next hop can fail with that is not a fault of ours (OSError: a
# failed DNS lookup, an unreachable network).
_NETWORK_ERRORS = (SMTPClientError, NextHopRefused, AddressRefused, ConnectError,
                   ConnectingCancelledError, OSError)


def describe(error: BaseException, hop: Hop) -> str:
    """A one-line reason for a connection-level failure, for logs, `queue show` and DSNs.

    What the network or the next hop said (a refused connection, a failed DNS lookup, the
    hop's reply, our next-hop policy's refusal) is the reason; any other exception is a
    fault of ours, logged with its traceback and reported as a fixed text (its own text is
    no business of the sender who reads the DSN)."""
    if not isinstance(error, _NETWORK_ERRORS):
        log.failure("connecting to {hop} failed", Failure(error), hop=hop.label)
        return f"4.4.1 {hop.label}: connection failed"
    text = str(error) or error.__class__.__name__
    if isinstance(error, SMTPClientError) and error.code:
        return text
    if text[:1].isdigit():
        return text
    return f"4.4.1 {hop.label}: {text}"

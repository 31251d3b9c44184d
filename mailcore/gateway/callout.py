"""Recipient verification at the next hop ("SMTP callout"), against backscatter.

A served domain without an address list accepts every local part; what its next hop later
refuses bounces to the envelope sender, who is usually forged when the mail is spam, and
the gateway becomes a backscatter source (and is blocklisted). With `[smtp]
verify_recipients` on, the SMTP server asks the domain's next hop at RCPT whether it takes
the address, as Postfix's `reject_unverified_recipient` does (ADDRESS_VERIFICATION_README):
a session opened as the queue opens its own (`mailcore.queue.runner.open_host`: the
domain's route from the queue's Router, its TLS policy, the next-hop address policy), then
MAIL FROM:<>, RCPT TO:<address> and RSET; no DATA is ever sent (`SMTPSession.probe`). The
connection is then kept for PROBE_IDLE (5) seconds and the next probe to the same next hop
(the same route and TLS policy) made on it, as Postfix's verify probes go through its smtp
client's connection cache: a burst of new addresses (a dictionary attack) costs the
customer's server a MAIL, RCPT and RSET each over a few connections, not a connection
each. A connection QUITs once idle that long, after a 421 or an RSET not answered 250,
after PROBES_PER_CONNECTION (50) probes or REFUSALS_PER_CONNECTION (5) refused RCPTs (the
hop's limits on junk commands and errors), and when the daemon stops; one the hop closed
while idle is dropped, and a probe whose reused connection fails before the RCPT's answer
is made again on a new connection.

- A 2xx is `DELIVERABLE`; a 550, 551 or 553 whose enhanced status code, if any, is about
  the recipient (5.1.x but the sender's 5.1.7 and 5.1.8, or 5.2.1: `refuses_recipient`) is
  `UNDELIVERABLE` (the server answers 550 5.1.1 with the next hop's reply); both are kept
  in the store (`recipient_verdicts`, shared by the nodes of one PostgreSQL), keyed by the
  address with its domain lower-cased (`verdict_key`), with the route that answered (the
  domain's id and its next hop's label: once the domain is redirected, or removed and
  added again, the answer is none and the new next hop is asked), for
  `verify_positive_ttl` (days) and `verify_negative_ttl` (hours), and swept once expired
  (`VerdictSweeper`).
- Anything else (no connection, a 4xx, another 5xx such as "554 5.7.1 Relay access
  denied" or a blocked client's 550 5.7.1, a refused MAIL FROM:<>, past `verify_timeout` in
  all, the hop's concurrency bound included) is `UNKNOWN`, not kept: `verify_unreachable`
  decides (accept, the default: the gateway holds mail while the customer's server is
  down; or 450 4.1.1).
- Only the domains `DomainService.verifiable` names are asked for: served, relayed (a
  hosted domain's mailboxes are its list) and without an address list (a list is the
  answer). postmaster@ is always accepted (RFC 5321 4.5.1) and never asked about; a hosted
  mailbox of a relayed domain routes LOCAL and is deliverable without a probe.
- RCPTs for one address while its probe runs wait for that probe (one per node); at most
  `verify_hop_concurrency` probe connections of one node are open to one next hop at once
  (a bound per node, not shared through the store), each holding its slot until it is
  closed (while idle and during its QUIT too); one SMTP client (its address, an IPv6
  client's /64) has at most MAX_CLIENT_PROBES (2) probes of its own under way, a RCPT past
  them being UNKNOWN without a probe (a RCPT for an address being probed joins that
  probe). One session's pipelined RCPTs are probed one after another, as the SMTP server
  handles its commands one at a time.

Metrics: `mailcore_smtp_verify_probes_total{result}` and
`mailcore_smtp_verify_cache_hits_total{result}`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.queue.routing import LOCAL, Hop
from mailcore.queue.runner import Connector, open_host
from mailcore.smtp.client import Reply, SMTPClientError, SMTPSession
from mailcore.smtp.settings import SMTPSettings
from mailcore.store import Database
from mailcore.store.verdicts import thd_read_verdict, thd_sweep_verdicts, thd_write_verdict

log = Logger()

DELIVERABLE = "deliverable"
UNDELIVERABLE = "undeliverable"
UNKNOWN = "unknown"

# How often expired answers are swept, and how many rows a transaction deletes.
SWEEP_INTERVAL = 3600.0
SWEEP_BATCH = 1000
# The most of the next hop's reply kept and quoted in our 550: with the longest address
# (320 octets) and our own words, the line stays within SMTP's 512 octets (RFC 5321
# 4.5.3.1.5), which strict clients enforce.
MAX_REPLY = 120
# The probes one SMTP client (its address; an IPv6 client's /64) may have under way at
# once: past them its RCPT needing a probe is UNKNOWN at once (BUSY), so that one client's
# 20 sessions cannot hold every slot of a next hop, nor have it flooded from every node.
MAX_CLIENT_PROBES = 2
# A probe connection is kept open after its probe for the next probe to the same next hop
# (within verify_hop_concurrency, as the open connection it is) for PROBE_IDLE seconds, and
# carries at most PROBES_PER_CONNECTION probes: their RSETs count towards the hop's limit
# on commands that change nothing (Postfix's smtpd_junk_command_limit, our own
# max_junk_commands: 100 each, past which the client is in error or cut off). At most
# REFUSALS_PER_CONNECTION of its RCPTs may have been refused (4xx, 5xx): each is an error
# of ours to the hop (Postfix slows its replies after smtpd_soft_error_limit, 10, and ends
# the session at smtpd_hard_error_limit, 20; our own max_errors is 20).
PROBE_IDLE = 5.0
PROBES_PER_CONNECTION = 50
REFUSALS_PER_CONNECTION = 5
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# The RCPT replies that may refuse the recipient itself (RFC 5321 4.2.2), and the enhanced
# status codes (RFC 3463) that say it is the recipient's fault: any of 5.1.x, the
# addressing status, except 5.1.7 and 5.1.8, which are about the sender's address (5.1.1
# bad mailbox, 5.1.2 bad system, 5.1.3 bad syntax, 5.1.6 moved, 5.1.10 null MX, RFC
# 7505), and 5.2.1, a disabled mailbox (Gmail's "account disabled": RFC 3463 allows it to
# be temporary, which verify_negative_ttl bounds). A blocked client's or a relay policy's
# refusal (550 5.7.1, 554 5.7.1) is no answer about the recipient.
RECIPIENT_CODES = frozenset({550, 551, 553})
RECIPIENT_STATUS = frozenset({"5.2.1"})
SENDER_DETAILS = frozenset({"7", "8"})
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class Verdict:
    """What the next hop said of an address: DELIVERABLE, UNDELIVERABLE or UNKNOWN, and
    its reply (or why there is none)."""

    result: str
    reply: str

    @property
    def undeliverable(self) -> bool:
        return self.result == UNDELIVERABLE

    @property
    def unknown(self) -> bool:
        return self.result == UNKNOWN


# A relayed domain's address that is a hosted mailbox here (mailcore.queue.routing.LOCAL).
HOSTED = Verdict(DELIVERABLE, "a hosted mailbox")
# A RCPT whose client has MAX_CLIENT_PROBES probes under way already: not probed.
BUSY = Verdict(UNKNOWN, "too many verifications for this client at once")


class VerifiableDomains(Protocol):
    """Which domains' recipients are verified (the DomainService)."""

    def verifiable(self, domain_name: str) -> bool: ...


class HopRouter(Protocol):
    """The queue's Router: a served domain's next hop."""

    async def route(self, domain_id: int | None, address: str, kind: str = "relay") -> Hop: ...


def verify_metrics(registry: CollectorRegistry | None) -> tuple[Counter, Counter]:
    """The probes made and the answers read from the store, by result."""
    probes = Counter("mailcore_smtp_verify_probes",
                     "Recipient verifications asked of a next hop, by result",
                     ["result"], registry=registry)
    hits = Counter("mailcore_smtp_verify_cache_hits",
                   "Recipient verifications answered from the store, by result",
                   ["result"], registry=registry)
    return probes, hits


class _Stale(Exception):
    """A reused probe connection failed before its RCPT was answered: the probe is made
    again on a new one."""


@dataclass(eq=False)
class _Connection:
    """A probe connection: its session, the probes it made and how many were refused, and
    its timer while it is idle."""

    session: SMTPSession
    probes: int = 0
    refusals: int = 0
    timer: IDelayedCall | None = None

    def stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@dataclass(eq=False)
class _HopConnections:
    """A node's probe connections to one next hop: `open` of them, at most `limit`
    (verify_hop_concurrency), each opening, probing, idle (`idle`, the last used at the
    end) or saying QUIT; the probes waiting for one (`waiting`: a connection given back,
    or None for the slot of one that closed)."""

    limit: int
    open: int = 0
    idle: list[_Connection] = field(default_factory=list)
    waiting: deque[defer.Deferred[_Connection | None]] = field(default_factory=deque)


class RecipientVerifier(Service):
    """Asks served domains' next hops about their recipients (see the module docstring);
    as a service of the daemon, it closes its idle probe connections when stopped."""

    def __init__(self, settings: SMTPSettings, db: Database, clock: IReactorTime,
                 domains: VerifiableDomains, router: HopRouter, connector: Connector, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.domains = domains
        self.router = router
        self.connector = connector
        self.probes, self.hits = verify_metrics(registry)
        # verdict_key(address) -> the RCPTs waiting for its verification now.
        self._waiting: dict[str, list[defer.Deferred[Verdict]]] = {}
        # Next hop -> its probe connections (none open: not listed).
        self._hops: dict[Hop, _HopConnections] = {}
        # The QUITs under way, and whether the daemon stops (no connection is kept then).
        self._closing: set[defer.Deferred[None]] = set()
        self._stopping = False
        # Client address key -> its probes under way (none: not listed).
        self._clients: dict[str, int] = {}

    def wanted(self, local_part: str, domain_name: str) -> bool:
        """Whether a RCPT for this address is verified: never postmaster (always accepted),
        only for the domains `verifiable` names."""
        return local_part.lower() != "postmaster" and self.domains.verifiable(domain_name)

    def verify(self, address: str, domain_id: int,
               client: str | None = None) -> defer.Deferred[Verdict]:
        """What the next hop of `domain_id` says of `address`, from the store or by a probe
        shared with the other RCPTs for it meanwhile; BUSY when it needs a probe of its own
        and `client` (the SMTP client's address key, connlimits.peer_key) has
        MAX_CLIENT_PROBES under way. Never fails; cancelling it (the server's
        command_timeout) leaves the others' probe running."""
        key = verdict_key(address)
        first = key not in self._waiting
        waiters = self._waiting.setdefault(key, [])

        def cancel(d: defer.Deferred[Verdict]) -> None:
            if d in waiters:
                waiters.remove(d)

        waiter: defer.Deferred[Verdict] = defer.Deferred(cancel)
        waiters.append(waiter)
        if first:
            done = defer.Deferred.fromCoroutine(self._verify(key, address, domain_id, client))
            done.addBoth(self._answer, key)
        return waiter

    def _answer(self, result: Verdict | Failure, key: str) -> None:
        waiters = self._waiting.pop(key, [])
        if isinstance(result, Failure):  # not expected: _verify catches what it can
            log.failure("recipient verification failed", result)
            result = Verdict(UNKNOWN, "internal error")
        for waiter in waiters:
            waiter.callback(result)

    async def _verify(self, key: str, address: str, domain_id: int,
                      client: str | None) -> Verdict:
        asking = defer.Deferred.fromCoroutine(self._lookup(key, address, domain_id, client))
        asking.addTimeout(self.settings.verify_timeout, self.clock)
        hop: Hop | None = None
        try:
            verdict, hop = await asking
        except defer.TimeoutError:
            verdict = Verdict(UNKNOWN, f"no answer in {self.settings.verify_timeout:g} s")
        except Exception as e:
            verdict = Verdict(UNKNOWN, quoted(str(e) or type(e).__name__))
        if (hop is None and not verdict.unknown) or verdict is BUSY:
            return verdict  # no probe: a hosted mailbox, an answer from the store, BUSY
        self.probes.labels(verdict.result).inc()
        if hop is not None and not verdict.unknown:
            ttl = (self.settings.verify_positive_ttl if verdict.result == DELIVERABLE
                   else self.settings.verify_negative_ttl)
            try:
                await self.db.run("verdict_write", thd_write_verdict, key, domain_id,
                                  hop.label, verdict.result == DELIVERABLE,
                                  quoted(verdict.reply), self.clock.seconds() + ttl)
            except Exception:
                log.failure("keeping a recipient verdict failed")
        return verdict

    async def _lookup(self, key: str, address: str, domain_id: int,
                      client: str | None) -> tuple[Verdict, Hop | None]:
        """The domain's route for `address` now, then the store's answer given by that route
        (an answer of another domain id or next hop is none: the domain was redirected, or
        removed and added again), else a probe; with the hop probed (None: no probe)."""
        hop = await self.router.route(domain_id, address)
        if hop == LOCAL:
            return HOSTED, None  # no probe; not kept, for the mailbox may go
        try:
            known = await self.db.read("verdict_read", thd_read_verdict, key, domain_id,
                                       hop.label, self.clock.seconds())
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("reading a recipient verdict failed; asking the next hop")
            known = None
        if known is not None:
            verdict = Verdict(DELIVERABLE if known[0] else UNDELIVERABLE, known[1])
            self.hits.labels(verdict.result).inc()
            return verdict, None
        if client is None:
            return await self._probe(hop, address), hop
        probing = self._clients.get(client, 0)
        if probing >= MAX_CLIENT_PROBES:
            return BUSY, None
        self._clients[client] = probing + 1
        try:
            return await self._probe(hop, address), hop
        finally:
            left = self._clients[client] - 1
            if left:
                self._clients[client] = left
            else:
                del self._clients[client]

    async def _probe(self, hop: Hop, address: str) -> Verdict:
        """One probe of the domain's next hop, on a connection of its pool (see
        `_HopConnections`): an idle one when there is one, else a new one within the
        hop's bound. A reused connection that fails before the RCPT's answer (the hop
        closed it meanwhile, or answers 421 once it has had enough of us) costs no
        verdict: the probe is made again on a new connection, as it was before reuse."""
        pool = self._hops.get(hop)
        if pool is None:
            pool = self._hops[hop] = _HopConnections(self.settings.verify_hop_concurrency)
        connection = await self._take(pool)
        if connection is not None:
            try:
                return await self._ask(hop, pool, connection, address)
            except _Stale:
                pass  # its slot is ours still, for a new connection
        return await self._ask(hop, pool, None, address)

    async def _take(self, pool: _HopConnections) -> _Connection | None:
        """An idle connection of `pool` (the last one used of those still open), or None
        once a slot for a new one is ours (free, a dead idle connection's, or handed over
        by one that closed)."""
        while pool.idle:
            connection = pool.idle.pop()
            connection.stop_timer()
            if connection.session.usable:
                return connection
            # Closed or dropped while idle (a 421, the hop hung up): gone, its slot free
            # (none waits while a connection is idle) for another idle one or a new one.
            pool.open -= 1
        if pool.open < pool.limit:
            pool.open += 1
            return None
        waiter: defer.Deferred[_Connection | None] = defer.Deferred(pool.waiting.remove)
        pool.waiting.append(waiter)
        return await waiter

    async def _ask(self, hop: Hop, pool: _HopConnections, connection: _Connection | None,
                   address: str) -> Verdict:
        """The next hop's answer about `address`, on `connection` (None: a new one); the
        connection is then given back to the pool or closed. _Stale when a reused
        connection fails before the answer (its slot still held)."""
        reused = connection is not None
        try:
            if connection is None:
                connection = _Connection(await open_host(self.connector, hop))
            reply = await connection.session.probe(address)
        except BaseException as e:
            if connection is not None:
                connection.session.abort()
            if reused and isinstance(e, SMTPClientError):
                raise _Stale() from e
            self._free(hop, pool)
            raise
        if reply.code == 421 and reused:
            connection.session.abort()
            raise _Stale()
        connection.probes += 1
        if not reply.ok:
            connection.refusals += 1
        # The answer is in: what the connection does next (idle, or QUIT, awaited up to
        # QUIT_TIMEOUT) is not counted in verify_timeout, but it holds the hop's slot.
        self._give_back(hop, pool, connection)
        text = quoted(str(reply))
        if reply.ok:
            return Verdict(DELIVERABLE, text)
        if refuses_recipient(reply):
            return Verdict(UNDELIVERABLE, text)
        return Verdict(UNKNOWN, text)

    def _give_back(self, hop: Hop, pool: _HopConnections, connection: _Connection) -> None:
        """After a probe: the connection to the next probe waiting for the hop, else idle
        for PROBE_IDLE seconds; closed (QUIT) instead when it cannot take another (its
        transaction still open: a 421, which `probe` follows with no RSET, or an RSET not
        answered 250; PROBES_PER_CONNECTION or REFUSALS_PER_CONNECTION reached) or, no
        probe waiting for it, the verifier is stopping (a waiting probe would otherwise
        open a new connection once this one is closed)."""
        session = connection.session
        if (not session.usable or session.in_transaction
                or connection.probes >= PROBES_PER_CONNECTION
                or connection.refusals >= REFUSALS_PER_CONNECTION):
            self._quit(hop, pool, connection)
            return
        if pool.waiting:
            pool.waiting.popleft().callback(connection)
            return
        if self._stopping:
            self._quit(hop, pool, connection)
            return
        connection.timer = self.clock.callLater(PROBE_IDLE, self._expire, hop, pool,
                                                connection)
        pool.idle.append(connection)

    def _expire(self, hop: Hop, pool: _HopConnections, connection: _Connection) -> None:
        connection.timer = None
        pool.idle.remove(connection)
        self._quit(hop, pool, connection)

    def _quit(self, hop: Hop, pool: _HopConnections, connection: _Connection) -> None:
        """Say QUIT on `connection` and free its slot once it is closed."""
        quitting = defer.Deferred.fromCoroutine(connection.session.quit())
        quitting.addErrback(lambda f: log.failure("QUIT after a recipient probe failed", f))
        quitting.addBoth(lambda _: self._free(hop, pool))
        self._closing.add(quitting)
        quitting.addBoth(lambda _: self._closing.discard(quitting))

    def _free(self, hop: Hop, pool: _HopConnections) -> None:
        """A connection of `pool` is gone: its slot to the first probe waiting for one, else
        given back (the pool forgotten once nothing of it is left)."""
        if pool.waiting:
            pool.waiting.popleft().callback(None)
            return
        pool.open -= 1
        if pool.open == 0 and self._hops.get(hop) is pool:
            del self._hops[hop]

    def stopService(self) -> defer.Deferred[None]:
        """The daemon stops: the idle connections QUIT at once (those of the probes still
        under way once they end); fires once the connections saying QUIT now are closed."""
        super().stopService()
        self._stopping = True
        for hop, pool in list(self._hops.items()):
            while pool.idle:
                connection = pool.idle.pop()
                connection.stop_timer()
                self._quit(hop, pool, connection)
        closing = list(self._closing)
        return defer.DeferredList(closing).addCallback(lambda _: None)

    def sweep(self) -> defer.Deferred[int]:
        """Delete the expired answers, SWEEP_BATCH a transaction; how many."""
        return defer.Deferred.fromCoroutine(delete_in_batches(
            self.db, "verdict_sweep", thd_sweep_verdicts, self.clock.seconds(),
            batch=SWEEP_BATCH))


def refuses_recipient(reply: Reply) -> bool:
    """Whether a RCPT's reply says the recipient itself is undeliverable: 550, 551 or 553
    (RFC 5321 4.2.2/4.2.3: mailbox unavailable, not local, name not allowed) whose enhanced
    status code, when it has one, is about the recipient's address (RECIPIENT_STATUS).
    Another 5xx ("554 5.7.1 Relay access denied", "550 5.7.1 client blocked", a policy
    refusal of MAIL FROM:<> deferred to RCPT...) says nothing of the recipient: kept as
    undeliverable, it would have every address of the domain refused for
    verify_negative_ttl."""
    if reply.protocol_error or reply.code not in RECIPIENT_CODES:
        return False
    status = _ENHANCED.match(reply.lines[0] if reply.lines else "")
    if status is None:
        return True  # a next hop without enhanced status codes: its code says it
    return f"{status[1]}.{status[2]}.{status[3]}" in RECIPIENT_STATUS or (
        status[1] == "5" and status[2] == "1" and status[3] not in SENDER_DETAILS)


def verdict_key(address: str) -> str:
    """The address an answer is kept and shared under: its domain lower-cased, its local
    part as written, for the next hop may tell Bob from bob (RFC 5321 2.4, as the SMTP
    server's _add_recipient keeps them apart): its refusal of Bob@ is no answer about
    bob@, which anyone could otherwise have refused for verify_negative_ttl."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def quoted(reply: str) -> str:
    """The next hop's reply as our RCPT reply may quote it: printable ASCII only (its other
    characters become "?": nothing of it can end or split our reply line), at most
    MAX_REPLY characters."""
    return _UNPRINTABLE.sub("?", reply[:MAX_REPLY])


class VerdictSweeper(Sweeper[int]):
    """Deletes the expired recipient verdicts every SWEEP_INTERVAL seconds (on one node of
    those sharing the store: the Core gives it the job leases)."""

    name = "recipient-verdict-sweeper"
    failed = "sweeping the recipient verdicts failed"

    def __init__(self, verifier: RecipientVerifier, every: float = SWEEP_INTERVAL) -> None:
        super().__init__(verifier.clock, every)
        self.verifier = verifier

    def sweep(self) -> Awaitable[int]:
        return self.verifier.sweep()

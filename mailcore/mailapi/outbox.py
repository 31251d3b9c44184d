"""The outbox: mail set to `outbox` goes to the delivery queue in posting order (FIFO).

Each outbox row was built and given its queue id when it entered the outbox
(mailcore.mailapi.mail). The sender takes outbox rows oldest first, hands each to the spool
(`Spool.accept`, kind "outbox") and marks it `sent` once the spool has committed it. The
queue works on many messages at once (filtering runs concurrently), so to keep the order at
the next hop the sender hands over the next message only once the queue has tried the
previous one (none of its recipients still `queued`: delivered, deferred, bounced or held),
or after FIFO_WAIT seconds, so that one slow message cannot hold the outbox for long. It
looks again each time this node's spool commits delivery results (`Spool.on_results`), and
every FIFO_POLL seconds besides, for results another node sharing the store commits. The
queue id is the idempotency key: after a crash between the spool's commit and the mark, the
row's id is found in the queue and the row is marked sent without a second accept. Hosted
recipients are then delivered locally by the queue, the others routed as any mail ([queue]
relayhost or MX); bounces come back to the sender's mailbox.

Nodes sharing the store send the outbox one at a time: a node claims the job lease
"mailapi_outbox" (mailcore.store.leases) before it reads the rows it will send and again
before each one, and gives it up when the outbox is empty. A node refused the lease leaves
the outbox to the holder; every node looks at the outbox every OUTBOX_POLL seconds, so mail
posted on one node is sent even while another holds the outbox. Two nodes never hand the
same row to the spool (whose group commit the second queue id would fail).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, select, update
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailcore.mailapi.addresses import parse_address_list
from mailcore.mailapi.mail import OUTBOX, SENT
from mailcore.queue.model import thd_domain_for
from mailcore.queue.spool import Spool
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store import Database
from mailcore.store.leases import JobLeases
from mailcore.store.schema import mailapi_mail, queue_messages, queue_recipients

log = Logger()

BATCH = 200
RETRY_AFTER = 5.0
# How long the next message waits for the queue to try the one before it, at most; and how
# often the queue is looked at meanwhile when no results are committed on this node.
FIFO_WAIT = 30.0
FIFO_POLL = 0.5
# The outbox job's lease (longer than one message's FIFO_WAIT), and how often each node looks
# at the outbox when it shares the store with others.
OUTBOX_JOB = "mailapi_outbox"
OUTBOX_LEASE = 120.0
OUTBOX_POLL = 5.0

_m = mailapi_mail.c


def thd_outbox(conn: Connection, limit: int) -> list[tuple[int, str, Envelope, bytes, bool]]:
    """Blocking: the oldest outbox rows as (row id, queue id, envelope, message, already
    in the queue)."""
    rows = conn.execute(
        select(_m.id, _m.queue_id, _m.mail_from, _m.to_addrs, _m.cc_addrs, _m.bcc_addrs,
               _m.raw).where(_m.status == OUTBOX).order_by(_m.id).limit(limit)).all()
    queued = {r[0] for r in conn.execute(select(queue_messages.c.id).where(
        queue_messages.c.id.in_([row.queue_id for row in rows])))} if rows else set()
    out = []
    domains: dict[str, int | None] = {}
    for row in rows:
        addresses: list[str] = []
        for text, name in ((row.to_addrs, "to"), (row.cc_addrs, "cc"), (row.bcc_addrs, "bcc")):
            for address in parse_address_list(text, name):
                if address not in addresses:
                    addresses.append(address)
        recipients = []
        for address in addresses:
            domain = address.rpartition("@")[2]
            if domain not in domains:
                domains[domain] = thd_domain_for(conn, domain)
            recipients.append(Recipient(address, domains[domain]))
        envelope = Envelope(row.mail_from, tuple(recipients), kind="outbox")
        out.append((row.id, row.queue_id, envelope, bytes(row.raw), row.queue_id in queued))
    return out


def thd_untried(conn: Connection, queue_id: str) -> bool:
    """Blocking: whether a recipient of the queued message has not been tried yet."""
    return conn.execute(select(queue_recipients.c.id).where(
        queue_recipients.c.message_id == queue_id,
        queue_recipients.c.state == "queued", queue_recipients.c.attempts == 0,
    ).limit(1)).first() is not None


def thd_mark_sent(conn: Connection, ids: Sequence[int], now: float) -> None:
    conn.execute(update(mailapi_mail).where(_m.id.in_(list(ids)), _m.status == OUTBOX)
                 .values(status=SENT, sent_at=now, read=True))


class OutboxSender(Service):
    """Hands outbox mail to the spool, oldest first (FIFO per sending mailbox)."""

    def __init__(self, db: Database, clock: IReactorTime, spool: Spool,
                 leases: JobLeases | None = None) -> None:
        self.db = db
        self.clock = clock
        self.spool = spool
        self.leases = leases  # None: this node is alone (no lease, no polling)
        self._poll: task.LoopingCall | None = None
        self._holding = False
        self._busy = False
        self._again = False
        self._retry: IDelayedCall | None = None
        self._current: defer.Deferred[None] | None = None
        self._pause: defer.Deferred[None] | None = None
        self._results_seen = 0  # results commits of this node's spool so far
        spool.on_results.append(self._results_committed)

    def _results_committed(self) -> None:
        self._results_seen += 1
        waiting, self._pause = self._pause, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)

    def startService(self) -> None:
        super().startService()
        self.kick()  # what a crash left in the outbox
        if self.leases is not None:
            self._poll = task.LoopingCall(self.kick)
            self._poll.clock = self.clock
            self._poll.start(OUTBOX_POLL, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pause is not None:
            self._pause.cancel()
        return self._current if self._current is not None else defer.succeed(None)

    def kick(self) -> None:
        """Send what is in the outbox (again, if a pass is running)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        self._current = defer.Deferred.fromCoroutine(self._pass())

    async def _pass(self) -> None:
        try:
            while self.running:
                self._again = False
                sent = await self._send_batch()
                if not sent and not self._again:
                    await self._let_go()
                    break
        except defer.CancelledError:
            pass  # stopping
        except Exception:
            log.failure("sending the outbox failed; trying again in {s} s", s=RETRY_AFTER)
            if self.running:
                self._retry = self.clock.callLater(RETRY_AFTER, self.kick)
        finally:
            self._busy = False
            self._current = None

    async def _claim(self) -> bool:
        """Whether this node may send the outbox now (always, without leases)."""
        if self.leases is None:
            return True
        self._holding = await self.leases.claim(OUTBOX_JOB, self.clock.seconds(),
                                                OUTBOX_LEASE)
        return self._holding

    async def _let_go(self) -> None:
        """The outbox is empty: let any node's next kick take it."""
        if self.leases is not None and self._holding:
            self._holding = False
            await self.leases.release(OUTBOX_JOB, self.clock.seconds())

    async def _send_batch(self) -> int:
        rows = await self.db.read("mailapi_outbox", thd_outbox, BATCH)
        if rows and self.leases is not None:
            if not await self._claim():
                return 0  # another node is sending the outbox
            rows = await self.db.read("mailapi_outbox", thd_outbox, BATCH)  # as of the claim
        sent = 0
        for row_id, queue_id, envelope, raw, queued in rows:
            if not self.running or (sent and not await self._claim()):
                break
            if not queued:
                await self.spool.accept(queue_id, envelope, raw)
            await self.db.run("mailapi_mark_sent", thd_mark_sent, [row_id],
                              self.clock.seconds())
            sent += 1
            await self._tried(queue_id)
        return sent

    async def _tried(self, queue_id: str) -> None:
        """Wait until the queue has tried `queue_id` (at most FIFO_WAIT seconds)."""
        give_up = self.clock.seconds() + FIFO_WAIT
        while self.running and self.clock.seconds() < give_up:
            seen = self._results_seen
            if not await self.db.read("mailapi_outbox_untried", thd_untried, queue_id):
                return
            if self._results_seen != seen:
                continue  # results were committed while we looked: look again
            self._pause = defer.Deferred()
            timer = self.clock.callLater(min(FIFO_POLL, give_up - self.clock.seconds()),
                                         self._results_committed)
            try:
                await self._pause
            finally:
                self._pause = None
                if timer.active():
                    timer.cancel()

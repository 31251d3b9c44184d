"""The outbox: mail set to `outbox` goes to the delivery queue in the order it entered the
outbox, first in first out for each sending mailbox.

Each outbox row was built and given its queue id and its place in the outbox's order
(`outbox_seq`, drawn from the database: mailcore.mailapi.mail.thd_next_outbox_seq) when it
entered the outbox; a draft enters when it is put there, not when it was written. The
sender takes outbox rows in that order ("oldest" below), hands each to the spool
(`Spool.accept`, kind "outbox") and marks it `sent` in the transaction that stores it in
the queue (the accept's guard), only if it is still in the outbox as it was read: a mail
deleted (or put back in the outbox, rebuilt) once the sender read it is never sent. The
queue works on many messages at once (filtering runs concurrently), so to keep a mailbox's
order at the next hop the sender hands over its next message only once the queue has tried
the previous one (none of its recipients still `queued`: delivered, deferred, bounced or
held), or after FIFO_WAIT seconds, so that one slow message cannot hold the mailbox for
long. A stream starts the same way, waiting for the mail its mailbox handed over last
(`thd_last_untried`): a process killed while the queue held its mail untried left that
mail to be tried again once its lease is taken back, and the next mail, handed over at
once by the new run, went out before it. Each mailbox is a stream of its own: one mailbox
waiting on a slow next hop never holds up another's mail. A stream goes on as soon as this
node's queue records the try (`Spool.on_recorded`, before the results commit), looks again
each time this node's spool commits delivery results (`Spool.on_results`: local delivery
commits its results in its own transaction), and every FIFO_POLL seconds besides, for
results another node sharing the store commits. The queue id is the idempotency key: a
row still in the outbox whose id is in the queue (left by a version that marked it after
the spool's commit) is marked sent without a second accept. Hosted recipients are then
delivered locally by the queue, the others routed as any mail ([queue] relayhost or MX);
bounces come back to the sender's mailbox.

The outbox of a mailbox whose owner is disabled (`mailcore user disable`), or whose domain's
owner is (the domain is suspended: its inbound mail is refused 450 meanwhile, whoever owns the
mailbox), waits: its mail stays in the outbox, in its order, and is neither sent nor failed
until that user is enabled again; the sender leaves such mailboxes out when it reads the
outbox, and the accept's guard refuses a mail whose owner was disabled since it was read (it
stays in the outbox, as a mail changed meanwhile does). So does the mail of a disabled author
(`mailapi_mail.author_id`, the user who put it in the outbox: a grantee sending from another
user's mailbox), alone: the mailbox's other mail goes on meanwhile. A grantee whose
`allow_send` is taken away has its outbox mail in that mailbox sent back to the drafts
(mailcore.mailapi.mailboxes). Every node looks at the outbox every
OUTBOX_POLL seconds, so the mail goes within that once the user is enabled.

A row whose addresses no longer parse (stored before a check the Mail API now makes, such
as a local part spelling an RFC 2047 word: mailcore.mailapi.addresses) cannot be given an
envelope: it goes back to the drafts, where its author sees it unsent and why (a warning is
logged), and the outbox goes on with the mail after it. Read with the others, it failed the
whole read, and every mailbox's outbox waited behind it, retried every RETRY_AFTER seconds
for good.

Nodes sharing the store send the outbox one at a time: a node claims the job lease
"mailapi_outbox" (mailcore.store.leases) before it reads the rows it will send and again
before each one, and gives it up when the outbox is empty. A node refused the lease leaves
the outbox to the holder; every node looks at the outbox every OUTBOX_POLL seconds, so mail
posted on one node is sent even while another holds the outbox. Two nodes never hand the
same row to the spool (whose group commit the second queue id would fail).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from functools import partial
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailcore.mailapi.addresses import parse_address_list
from mailcore.mailapi.errors import MailApiError
from mailcore.mailapi.mailboxes import thd_unsend_where
from mailcore.outages import log_failure
from mailcore.queue.model import Result, thd_vouched_domain_for
from mailcore.queue.spool import Spool, Withdrawn
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store import Database, errands
from mailcore.store.leases import JobLeases
from mailcore.store.schema import (
    domains,
    mailapi_mail,
    mailboxes,
    queue_messages,
    queue_recipients,
    users,
)
from mailcore.store.schema.mailapi import OUTBOX, SENT

log = Logger()

BATCH = 200
# The most bytes of messages one read of the outbox takes (more than one message only when
# they fit together): a stream holds what it read until it has sent it.
BATCH_BYTES = 64 * 1024 * 1024
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
# The mailboxes whose owner and whose domain's owner are enabled, and whose domain is not
# removed: only their outbox is sent (a removal sends its mailboxes' outbox mail back to the
# drafts: this also leaves out mail read just before it, at thd_take).
_domain_owners = users.alias("domain_owners")
_SENDING = select(mailboxes.c.id).join(users, users.c.id == mailboxes.c.owner_id) \
    .join(domains, domains.c.id == mailboxes.c.domain_id) \
    .join(_domain_owners, _domain_owners.c.id == domains.c.owner_id) \
    .where(users.c.is_active.is_(True), _domain_owners.c.is_active.is_(True))


# Mail put in the outbox by a user who is enabled (or before migration 0050, or by a user
# deleted since: no author).
_AUTHOR_ENABLED = or_(_m.author_id.is_(None),
                      _m.author_id.in_(select(users.c.id).where(users.c.is_active.is_(True))))

OutboxRow = tuple[int, int, str, Envelope, bytes, bool]
# An outbox row that cannot be sent as stored: its id, its public id, and why.
Unreadable = tuple[int, str, str]

_RAWS = select(_m.id, _m.raw).where(_m.id.in_(bindparam("ids", expanding=True)))


def thd_outbox(conn: Connection, limit: int, *, mailbox: int | None = None,
               besides: Collection[int] = ()) -> list[OutboxRow]:
    """Blocking: the outbox rows that entered it first (`thd_outbox_read`), those whose
    addresses do not parse left out."""
    return thd_outbox_read(conn, limit, mailbox=mailbox, besides=besides)[0]


def thd_outbox_read(conn: Connection, limit: int, *, mailbox: int | None = None,
                    besides: Collection[int] = ()) -> tuple[list[OutboxRow], list[Unreadable]]:
    """Blocking: the outbox rows that entered it first (of `mailbox` only; of mailboxes not
    in `besides`) as (row id, mailbox id, queue id, envelope, message, already in the
    queue): at most `limit` of them, and only as many as BATCH_BYTES of messages hold (the
    first one always). The messages are read once the rows are chosen by their sizes: a
    message is up to max_message_bytes of attachments, base64 (34 MiB at the defaults), and
    a batch of 200 read whole was several GB in memory. Mail of a disabled owner's mailbox
    is left out: it waits. Second, the rows among them whose addresses do not parse (no
    envelope can be made): (row id, public id, why)."""
    query = select(_m.id, _m.public_id, _m.mailbox_id, _m.queue_id, _m.mail_from,
                   _m.to_addrs, _m.cc_addrs, _m.bcc_addrs,
                   func.coalesce(func.length(_m.raw), 0).label("size")) \
        .where(_m.status == OUTBOX, _m.mailbox_id.in_(_SENDING), _AUTHOR_ENABLED)
    if mailbox is not None:
        query = query.where(_m.mailbox_id == mailbox)
    if besides:
        query = query.where(_m.mailbox_id.not_in(list(besides)))
    # `id` only orders rows stored without a place (none are put in the outbox so).
    listed = conn.execute(query.order_by(_m.outbox_seq, _m.id).limit(limit)).all()
    rows: list[Any] = []
    total = 0
    for row in listed:
        total += int(row.size)
        if rows and total > BATCH_BYTES:
            break
        rows.append(row)
    raws = {r.id: r.raw for r in conn.execute(
        _RAWS, {"ids": [row.id for row in rows]})} if rows else {}
    rows = [row for row in rows if raws.get(row.id) is not None]  # (deleted meanwhile)
    queued = {r[0] for r in conn.execute(select(queue_messages.c.id).where(
        queue_messages.c.id.in_([row.queue_id for row in rows])))} if rows else set()
    out = []
    unreadable: list[Unreadable] = []
    domain_ids: dict[str, int | None] = {}
    for row in rows:
        addresses: list[str] = []
        try:
            for text, name in ((row.to_addrs, "to"), (row.cc_addrs, "cc"),
                               (row.bcc_addrs, "bcc")):
                for address in parse_address_list(text, name):
                    if address not in addresses:
                        addresses.append(address)
            # `from` as the client wrote it ("Bob Smith <bob@…>"; checked when it was sent).
            [sender] = parse_address_list(row.mail_from, "from")
        except (MailApiError, ValueError) as e:  # (ValueError: not one `from`)
            unreadable.append((row.id, row.public_id, str(e)))
            continue
        recipients = []
        for address in addresses:
            domain = address.rpartition("@")[2]
            if domain not in domain_ids:
                domain_ids[domain] = thd_vouched_domain_for(conn, domain)
            recipients.append(Recipient(address, domain_ids[domain]))
        envelope = Envelope(sender, tuple(recipients), kind="outbox")
        out.append((row.id, row.mailbox_id, row.queue_id, envelope, bytes(raws[row.id]),
                    row.queue_id in queued))
    return out, unreadable


# Run for every mail sent: built once (see mailcore.mailapi.mail._ROW_BY_ID).
_UNTRIED = select(queue_recipients.c.id).where(
    queue_recipients.c.message_id == bindparam("queue_id"),
    queue_recipients.c.state == "queued", queue_recipients.c.attempts == 0).limit(1)
_MARK_SENT = update(mailapi_mail) \
    .where(_m.id.in_(bindparam("ids", expanding=True)), _m.status == OUTBOX) \
    .values(status=SENT, sent_at=bindparam("now"), read=True)
_TAKE = update(mailapi_mail) \
    .where(_m.id == bindparam("row_id"), _m.status == OUTBOX,
           _m.queue_id == bindparam("read_queue_id"), _m.mailbox_id.in_(_SENDING),
           _AUTHOR_ENABLED) \
    .values(status=SENT, sent_at=bindparam("now"), read=True)


_LAST_SENT = select(_m.queue_id).where(
    _m.status == SENT, _m.mailbox_id == bindparam("mailbox"), _m.outbox_seq.is_not(None)) \
    .order_by(_m.outbox_seq.desc()).limit(1)


def thd_unsend_unreadable(conn: Connection, ids: Sequence[int]) -> int:
    """Blocking: these outbox rows (whose addresses do not parse) go back to the drafts, as
    mail the Mail API refuses to send stays one; how many were still in the outbox."""
    return thd_unsend_where(conn, [_m.id.in_(list(ids)), _m.status == OUTBOX])


def thd_untried(conn: Connection, queue_id: str) -> bool:
    """Blocking: whether a recipient of the queued message has not been tried yet."""
    return conn.execute(_UNTRIED, {"queue_id": queue_id}).first() is not None


def thd_last_untried(conn: Connection, mailbox: int) -> str | None:
    """Blocking: the queue id of the mail `mailbox`'s outbox handed to the queue last, if
    the queue has not tried it yet (a stream that ended with it, a process killed while the
    queue held it, another node's stream); else None."""
    queue_id = conn.execute(_LAST_SENT, {"mailbox": mailbox}).scalar()
    return queue_id if queue_id is not None and thd_untried(conn, queue_id) else None


def thd_mark_sent(conn: Connection, ids: Sequence[int], now: float) -> None:
    conn.execute(_MARK_SENT, {"ids": list(ids), "now": now})


def thd_take(conn: Connection, row_id: int, queue_id: str, now: float) -> bool:
    """Blocking, in the spool's transaction that stores the mail (the guard of its accept):
    mark the row sent if it is still in the outbox as `queue_id` and its mailbox's owner is
    enabled; whether it was. A delete
    of the mail commits before (the mail is left out of the queue) or after (it deletes
    mail sent); PostgreSQL's row lock orders the two, SQLite's writers take turns."""
    taken = conn.execute(_TAKE, {"row_id": row_id, "read_queue_id": queue_id, "now": now})
    return taken.rowcount == 1


class OutboxSender(Service):
    """Hands outbox mail to the spool, oldest first: a stream for each sending mailbox,
    first in first out within it (see the module docstring)."""

    def __init__(self, db: Database, clock: IReactorTime, spool: Spool,
                 leases: JobLeases | None = None) -> None:
        self.db = db
        self.clock = clock
        self.spool = spool
        self.leases = leases  # None: this node is alone (no lease, no polling)
        self._poll: task.LoopingCall | None = None
        self._holding = False
        self._claimed_at = 0.0  # when this node last claimed the lease and got it
        self._busy = False
        self._again = False
        self._retry: IDelayedCall | None = None
        self._current: defer.Deferred[None] | None = None  # the look for mailboxes to send
        self._streams: dict[int, defer.Deferred[None]] = {}  # mailbox id -> its stream
        self._resting: set[int] = set()  # mailboxes whose stream failed, until the retry
        self._pauses: set[defer.Deferred[None]] = set()  # streams waiting for a try
        self._wakes = 0  # wakes so far (tries recorded, results committed)
        # The mails streams wait on: queue id -> (its recipients, those tried so far).
        self._watched: dict[str, tuple[int, set[int]]] = {}
        spool.on_results.append(self._wake)
        spool.on_recorded.append(self._recorded)

    def _wake(self) -> None:
        """Tries happened (results committed, or recorded by `_recorded`): every stream
        waiting for one looks again."""
        self._wakes += 1
        waiting, self._pauses = self._pauses, set()
        for pause in waiting:
            if not pause.called:
                pause.callback(None)

    def _recorded(self, results: Sequence[Result]) -> None:
        """This node's queue tried recipients (the results are not committed yet): a
        stream whose mail has every recipient tried goes on at once."""
        if not self._watched:
            return  # (the relay's results: nothing of the outbox's is waited on)
        tried = False
        for result in results:
            watched = self._watched.get(result.message_id)
            if watched is not None:
                watched[1].add(result.rcpt_id)
                tried = tried or self._tried_here(result.message_id)
        if tried:
            self._wake()

    def _tried_here(self, queue_id: str) -> bool:
        """Whether this node's queue has tried every recipient of `queue_id` (as far as
        results it recorded tell)."""
        watched = self._watched.get(queue_id)
        return watched is not None and len(watched[1]) >= watched[0]

    def startService(self) -> None:
        super().startService()
        self._resting.clear()
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
        for pause in list(self._pauses):
            pause.cancel()
        return self.settled()

    def settled(self) -> defer.Deferred[None]:
        """Fires once the look for mailboxes to send and every mailbox's stream have
        ended (at once when none runs)."""
        running = [d for d in (self._current, *self._streams.values()) if d is not None]
        if not running:
            return defer.succeed(None)
        return defer.DeferredList(running, consumeErrors=True).addCallback(lambda _: None)

    def enqueued(self, mailbox: int | None) -> None:
        """Mail entered the outbox of `mailbox`. A stream running for that mailbox takes it
        in its turn: it reads the mailbox's rows again once it has sent those it read, and
        the look it starts as it ends finds any mail it missed. So only mail of a mailbox
        without a stream starts a look (which reads the oldest rows of every other mailbox:
        one per post, while a stream works through a long outbox, read the whole of it)."""
        if mailbox is None or mailbox not in self._streams:
            self.kick()

    def kick(self) -> None:
        """Send what is in the outbox (look again, if a look is running)."""
        if not self.running:
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        # Outside any errand: a post (whose write is an errand, given up with its request)
        # tells the outbox of its mail, and the look must not be given up with the post.
        self._current = errands.outside(defer.Deferred.fromCoroutine, self._look())

    async def _look(self) -> None:
        """Start a stream for each mailbox with outbox mail and none running; give the
        lease up when no mailbox has any."""
        try:
            while self.running:
                self._again = False
                # The oldest rows of mailboxes without a stream: read again until none is
                # left, so that a mailbox with much mail never hides the others' behind it.
                rows = await self._rows(besides=set(self._streams) | self._resting)
                for mailbox, mine in _by_mailbox(rows).items():
                    if mailbox not in self._streams:
                        ended = self._streams[mailbox] = defer.Deferred()
                        defer.Deferred.fromCoroutine(
                            self._stream(mailbox, mine)).chainDeferred(ended)
                if not rows and not self._again:
                    if not self._streams:
                        await self._let_go()
                    break
        except defer.CancelledError:
            pass  # stopping
        except Exception:
            self._failed(None)
        finally:
            self._busy = False
            self._current = None

    async def _rows(self, **which: Any) -> list[OutboxRow]:
        """The oldest outbox rows (`thd_outbox`), read as of a claim of the lease (read
        again after a claim this needed); none when another node holds it."""
        held = self._held()
        rows, unreadable = await self.db.read("mailapi_outbox", thd_outbox_read, BATCH,
                                              **which)
        if (rows or unreadable) and not held:
            if not await self._claim():
                return []  # another node is sending the outbox
            rows, unreadable = await self.db.read("mailapi_outbox", thd_outbox_read, BATCH,
                                                  **which)
        if unreadable:
            await self._unsend(unreadable)
            if not rows:  # (a batch of them alone: the mail after them is read now)
                return await self._rows(**which)
        return rows

    async def _unsend(self, unreadable: Sequence[Unreadable]) -> None:
        """Send these rows back to the drafts (they cannot be sent as stored), each logged:
        the mail after them goes on."""
        await self.db.run("mailapi_outbox_unreadable", thd_unsend_unreadable,
                          [row_id for row_id, _, _ in unreadable])
        for _, public_id, why in unreadable:
            log.warn("outbox mail {public_id} cannot be sent ({why}); it is back in the "
                     "drafts", public_id=public_id, why=why)

    async def _stream(self, mailbox: int, rows: list[OutboxRow]) -> None:
        """Send `mailbox`'s outbox, oldest first, until it is empty: once the queue has
        tried the mail the mailbox sent before (`thd_last_untried`), as it waits for each
        mail the stream sends."""
        try:
            previous = await self.db.read("mailapi_outbox_last", thd_last_untried, mailbox)
            if previous is not None:
                await self._tried(previous)
            while rows and self.running:
                for row in rows:
                    if not self.running or not await self._claim():
                        return
                    await self._send(row)
                rows = await self._rows(mailbox=mailbox)
        except defer.CancelledError:
            pass  # stopping
        except Exception:
            self._failed(mailbox)
            return
        finally:
            del self._streams[mailbox]
        self.kick()  # to give the lease up if the outbox is empty now

    async def _send(self, row: OutboxRow) -> None:
        """Hand one mail to the spool, marked sent in the same transaction, and wait until
        the queue has tried it. A mail no longer in the outbox as it was read (deleted
        meanwhile) is left out."""
        row_id, _, queue_id, envelope, raw, queued = row
        self._watched[queue_id] = (len(envelope.recipients), set())
        try:
            marked: defer.Deferred[None] | None = None
            leased = False
            if queued:
                # In the queue, not marked (an older version marked after the spool's
                # commit): marked while the queue tries it, without a second accept.
                marked = self.db.run("mailapi_mark_sent", thd_mark_sent, [row_id],
                                     self.clock.seconds())
            else:
                try:
                    leased = bool(await self.spool.accept(
                        queue_id, envelope, raw, guard=partial(
                            thd_take, row_id=row_id, queue_id=queue_id,
                            now=self.clock.seconds())))
                except Withdrawn:
                    return  # deleted (or changed) since it was read: not sent
            try:
                await self._tried(queue_id, ours=leased)
            finally:
                if marked is not None:
                    await marked
        finally:
            self._watched.pop(queue_id, None)

    def _failed(self, mailbox: int | None) -> None:
        """Log the failure (of `mailbox`'s stream; None: of the look) and look again after
        RETRY_AFTER seconds, the mailbox left alone until then."""
        log_failure(log, "sending the outbox failed; trying again in {s} s", s=RETRY_AFTER)
        if mailbox is not None:
            self._resting.add(mailbox)
        if self.running and not (self._retry is not None and self._retry.active()):
            self._retry = self.clock.callLater(RETRY_AFTER, self._after_rest)

    def _after_rest(self) -> None:
        self._resting.clear()
        self.kick()

    def _held(self) -> bool:
        """Whether this node may send the outbox without claiming the lease first: there
        are no leases, or it claimed the lease less than half its length ago."""
        return self.leases is None or (
            self._holding and self.clock.seconds() < self._claimed_at + OUTBOX_LEASE / 2)

    async def _claim(self) -> bool:
        """Whether this node may send the outbox now (`_held`, else claimed now)."""
        if self._held():
            return True
        assert self.leases is not None
        now = self.clock.seconds()
        self._holding = await self.leases.claim(OUTBOX_JOB, now, OUTBOX_LEASE)
        if self._holding:
            self._claimed_at = now
        return self._holding

    async def _let_go(self) -> None:
        """The outbox is empty: let any node's next kick take it."""
        if self.leases is not None and self._holding:
            self._holding = False
            await self.leases.release(OUTBOX_JOB, self.clock.seconds())

    async def _tried(self, queue_id: str, *, ours: bool = False) -> None:
        """Wait until the queue has tried `queue_id` (at most FIFO_WAIT seconds). `ours`:
        this node's spool has just stored it leased to this node's runner (Spool.accept),
        so no node has tried it yet: the first wait needs no look at the store (a read of
        every mail sent, the outbox's most frequent statement)."""
        give_up = self.clock.seconds() + FIFO_WAIT
        look = not ours
        while self.running and self.clock.seconds() < give_up:
            if self._tried_here(queue_id):
                return
            seen = self._wakes
            if look:
                if not await self.db.read("mailapi_outbox_untried", thd_untried, queue_id):
                    return
                if self._wakes != seen:
                    continue  # results came while we looked: look again
            look = True
            pause: defer.Deferred[None] = defer.Deferred()
            self._pauses.add(pause)

            def wake(pause: defer.Deferred[None] = pause) -> None:
                self._pauses.discard(pause)
                if not pause.called:
                    pause.callback(None)

            timer = self.clock.callLater(min(FIFO_POLL, give_up - self.clock.seconds()), wake)
            try:
                await pause
            finally:
                self._pauses.discard(pause)
                if timer.active():
                    timer.cancel()


def _by_mailbox(rows: list[OutboxRow]) -> dict[int, list[OutboxRow]]:
    """Rows grouped by their mailbox, each group oldest first."""
    out: dict[int, list[OutboxRow]] = {}
    for row in rows:
        out.setdefault(row[1], []).append(row)
    return out

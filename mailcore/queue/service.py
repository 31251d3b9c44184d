"""The queue as a daemon service: the sweeper, lease renewal, and an orderly stop.

On start the node applies the results its previous run left in the results journal, then
releases leases left under its own id by that run (it has nothing in flight yet), and only
then starts taking work: accepts committed meanwhile stay unleased and the first sweep, at
once, claims them with everything else that is due; those still waiting for their commit
then are leased to the runner as it starts (`Spool.lease_waiting`), since they would commit
behind that first claim and wait for the next sweep. A LoopingCall on the
injected clock sweeps every `poll_interval` (and sooner when the runner frees room after a
full claim), renews this node's leases every third of `lease_seconds`, refreshes the
queue-depth gauge, prunes the delivered log and (every ten minutes) finishes messages left
unfinished with no active recipient and compares this node's clock with PostgreSQL's (also at
start: leases are judged by each node's clock). On stop it stops claiming, lets the spool's
pending group commits finish, lets in-flight deliveries finish (or cuts them after the grace
period), writes every result, releases the leases it still holds and closes the journal.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mailcore.outages import log_failure
from mailcore.periodic import InFlight
from mailcore.queue.model import (
    FLUSH_COUNTER,
    thd_claim_due,
    thd_depth,
    thd_prune,
    thd_release_leases,
    thd_renew_leases,
)
from mailcore.queue.runner import QueueRunner
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool, thd_repair_stranded
from mailcore.store import Database
from mailcore.store.counters import thd_read_counter

log = Logger()

# Claim in batches of at most this many recipients.
CLAIM_BATCH = 1000
# How often, at most, a sweep looks for messages left unfinished with no active recipient,
# and how many it finishes at a time.
STRANDED_INTERVAL = 600.0
STRANDED_BATCH = 1000


class Sweeper:
    """Claims due, unleased (or lapsed) work for the runner; one claim in flight at a time."""

    def __init__(
        self, db: Database, clock: IReactorTime, settings: QueueSettings, runner: QueueRunner,
        spool: Spool,
    ) -> None:
        self.db = db
        self.spool = spool
        self.clock = clock
        self.settings = settings
        self.runner = runner
        self._claiming = False
        self._more = False
        self._soon: IDelayedCall | None = None
        self.claimed = 0
        runner.on_room = self._room_freed

    async def sweep(self) -> int:
        """Claim what is due now (up to the runner's room); returns how many recipients."""
        if self._claiming:
            return 0
        room = min(self.runner.room, CLAIM_BATCH)
        if room <= 0:
            self._more = True
            return 0
        self._claiming = True
        self.runner.held += room
        claimed = 0
        try:
            now = self.clock.seconds()
            jobs = await self.spool.run_serialized(
                "queue_claim", thd_claim_due, self.settings.node_id, now,
                now + self.settings.lease_seconds, room,
            )
            claimed = sum(len(j.recipients) for j in jobs)
            self.runner.held -= room - claimed
            if jobs:
                self.runner.submit(jobs, {})
            self._more = claimed == room
            self.claimed += claimed
        except Exception:
            self.runner.held -= room
            log_failure(log, "claiming due queue work failed")
        finally:
            self._claiming = False
        return claimed

    def _room_freed(self) -> None:
        """The runner finished something: if the last claim was full, claim again soon."""
        if self._more and self._soon is None and self.runner.room >= CLAIM_BATCH // 4:
            self._soon = self.clock.callLater(0, self._sweep_soon)

    def _sweep_soon(self) -> None:
        self._soon = None
        defer.Deferred.fromCoroutine(self.sweep())

    def cancel(self) -> None:
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None


class QueueService(Service):
    """Owns the runner's lifecycle and the periodic queue chores."""

    name = "queue"

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: QueueSettings,
        spool: Spool,
        runner: QueueRunner,
    ) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.spool = spool
        self.runner = runner
        self.sweeper = Sweeper(db, clock, settings, runner, spool)
        self._sweep_loop: task.LoopingCall | None = None
        self._renew_loop: task.LoopingCall | None = None
        self._started: defer.Deferred[None] | None = None
        self._flushes: int | None = None  # the flush counter as last read
        self._stranded_at: float | None = None  # when the last look for stranded ones ran
        # Chores in flight: a stop waits for them (LoopingCall.stop does not).
        self._busy = InFlight()

    def startService(self) -> None:
        super().startService()
        self._started = defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self.spool.results_db is not self.db:
            await self.spool.results_db.open()
        # Results of the last run that reached the journal but not the store, first: those
        # recipients were delivered and must not be claimed again.
        await self.spool.recover()
        try:
            released = await self.spool.run_serialized(
                "queue_release_own", thd_release_leases, self.settings.node_id, None
            )
            if released:
                log.info("took back {n} recipients leased by this node's previous run",
                         n=released)
        except Exception:
            log.failure("releasing this node's old leases failed")
        if not self.running:
            return
        # Only now may the spool lease new work to this node: an earlier lease would have
        # been released just above and then claimed a second time. Accepts still waiting
        # for their commit are leased too: they would commit after the first sweep's claim.
        self.runner.start()
        self.spool.lease_waiting()
        self._sweep_loop = task.LoopingCall(self._tracked, self._tick)
        self._sweep_loop.clock = self.clock
        self._sweep_loop.start(self.settings.poll_interval, now=True).addErrback(
            lambda f: log.failure("queue sweeper stopped", f)
        )
        self._renew_loop = task.LoopingCall(self._tracked, self._renew)
        self._renew_loop.clock = self.clock
        self._renew_loop.start(self.settings.lease_seconds / 3, now=False).addErrback(
            lambda f: log.failure("lease renewal stopped", f)
        )

    def _tracked(self, chore: Callable[[], Coroutine[Any, Any, None]]) -> defer.Deferred[None]:
        """Run one chore, remembered until it ends so that a stop can wait for it."""
        return self._busy.track(defer.Deferred.fromCoroutine(chore()))

    async def _tick(self) -> None:
        """One sweep: hear of a flush, claim due work, refresh the depth gauge, prune the
        log."""
        await self._hear_flush()
        await self.sweeper.sweep()
        now = self.clock.seconds()
        try:
            depth = await self.db.read("queue_depth", thd_depth)
            self.runner.metrics.depth.set(depth)
            await self.spool.run_serialized(
                "queue_prune", thd_prune, now - self.settings.log_retention
            )
            if self._stranded_at is None or now - self._stranded_at >= STRANDED_INTERVAL:
                self._stranded_at = now
                await self._repair_stranded(now)
        except Exception:
            log_failure(log, "queue housekeeping failed")

    async def _repair_stranded(self, now: float) -> None:
        """Finish messages that no active recipient keeps but that were never marked done,
        and send their DSNs (older versions left such messages when two nodes recorded
        their last recipients at once)."""
        count, dsns = await self.spool.run_serialized(
            "queue_repair_stranded", thd_repair_stranded, self.settings.node_id, now,
            now + self.settings.lease_seconds, self.spool.reporting_mta, STRANDED_BATCH,
        )
        if count:
            log.warn("finished {n} queued message(s) left unfinished with no recipient "
                     "to deliver ({d} DSN(s) now sent)", n=count, d=len(dsns))
        if dsns:
            self.runner.enqueue_new(dsns)

    async def _hear_flush(self) -> None:
        """After a `queue flush` (its counter moved), next hops marked unusable are tried
        again at once rather than failing the flushed mail without a connection."""
        try:
            flushes = await self.db.read("queue_flush_counter", thd_read_counter, FLUSH_COUNTER)
        except Exception:
            log_failure(log, "reading the queue flush counter failed")
            return
        if self._flushes is not None and flushes != self._flushes:
            revived = self.runner.revive_hops()
            log.info("queue flush: deferred mail is due, {n} next hop(s) marked unusable are "
                     "tried again", n=revived)
        self._flushes = flushes

    async def _renew(self) -> None:
        until = self.clock.seconds() + self.settings.lease_seconds
        try:
            await self.spool.run_serialized(
                "queue_renew_leases", thd_renew_leases, self.settings.node_id, until
            )
        except Exception:
            log_failure(log, "renewing leases failed; work whose lease ends is not sent")
        else:
            self.runner.leases_renewed(until, self.clock.seconds())

    def stopService(self) -> Any:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for loop in (self._sweep_loop, self._renew_loop):
            if loop is not None and loop.running:
                loop.stop()
        self.sweeper.cancel()
        if self._started is not None:
            await self._started
        await self.spool.drain()
        leftover = await self.runner.stop()
        # A sweep or lease renewal still running finishes on the open store.
        await self._busy.wait()
        try:
            await self.spool.run_serialized(
                "queue_release_own", thd_release_leases, self.settings.node_id, None
            )
        except Exception:
            log.failure("releasing leases at stop failed ({n} recipients held)",
                        n=len(leftover))
        try:
            await self.spool.close_journal()
        except Exception:
            log.failure("closing the results journal failed")
        if self.spool.results_db is not self.db:
            await self.spool.results_db.close()

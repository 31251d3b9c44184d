"""Periodic sync: every enabled account about every interval, jittered, a bounded number at once.

The scheduler looks for due accounts every `tick` seconds on the injected clock. An account is
due when its last attempt (`sync_started_at`, else `last_sync`) is older than its interval
(the account's `sync_interval`, else the configured one) stretched by a per-attempt random
jitter, so that accounts added together do not all hit their servers at the same second.
The engine's semaphore bounds how many run at once, and how many of one user's (so that one
user's accounts, or their server holding each sync long, leave slots to the others); an
account already syncing is skipped.

Every node runs a scheduler over the same accounts: a sync leases its account in the store
first, and a scheduled one only while the account is still due (the check is made again in
the claim's UPDATE), so each due account is synced once, by one node.

A sync whose process died (kill -9, a crash, a power loss) left its account showing
`running`, its progress frozen, until the account's next sync. At start and at each tick the
scheduler shows such syncs failed ("the sync was interrupted: ..."): this node's that it
does not run, and any whose lease has lapsed; what they committed stays, and the next sync
goes on from it. Each one's outcome is recorded as a sync's own is (`SyncEngine.recorders`):
a webhook that wants sync.completed is told it, status "error" with that error.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailcore.fetch.accounts import Account, thd_any_interrupted
from mailcore.fetch.engine import SyncEngine
from mailcore.outages import log_failure

log = Logger()


class FetchScheduler(service.Service):
    """A service that starts due syncs; stopping it cancels running ones (kill-safe)."""

    name = "fetch-scheduler"

    def __init__(self, engine: SyncEngine, *, rng: random.Random | None = None) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.clock = engine.reactor
        self.rng = rng or random.Random()
        self._loop: task.LoopingCall | None = None
        self._jitter: dict[int, float] = {}
        self._started: list[defer.Deferred[Any]] = []

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick_deferred)
        self._loop.clock = self.clock
        self._loop.start(self.settings.tick, now=True).addErrback(
            lambda f: log.failure("fetch scheduler stopped", f)
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return defer.Deferred.fromCoroutine(self.engine.stop())

    def _tick_deferred(self) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(self.tick())

    def interval(self, account: Account) -> float:
        return float(account.sync_interval or self.settings.sync_interval)

    def due_before(self, account: Account, now: datetime.datetime) -> datetime.datetime:
        """The account is due at `now` if its last attempt was no later than this."""
        jitter = self._jitter.setdefault(
            account.id, self.rng.uniform(-self.settings.jitter, self.settings.jitter)
        )
        wait = self.interval(account) * (1.0 + jitter)
        return now - datetime.timedelta(seconds=wait)

    def due(self, account: Account, now: datetime.datetime) -> bool:
        """Whether the account should be synced at `now`."""
        if self.engine.is_running(account.id):
            return False
        last = account.sync_started_at or account.last_sync
        return last is None or last <= self.due_before(account, now)

    async def settle_interrupted(self) -> None:
        """Show as failed the syncs that show running but run nowhere (`thd_settle_
        interrupted`): a sync killed with its process stayed `running`, its progress
        frozen, until the account's next sync, which may never come (an account turned off,
        a disabled user, a long interval)."""
        engine = self.engine
        now, running = self.clock.seconds(), engine.running()
        try:
            # Looked for on the read lane first: the tick writes only when there is one.
            if not await engine.db.read("fetch_syncs_interrupted", thd_any_interrupted,
                                        engine.node_id, now, running):
                return
            settled = await engine.db.run("settle_fetch_syncs", engine.thd_settle_interrupted,
                                          now, engine.running())
        except Exception:
            log_failure(log, "fetch scheduler cannot settle interrupted syncs")
            return
        if settled:
            log.info("{n} syncs interrupted by a stop were shown as failed", n=settled)

    async def tick(self) -> int:
        """Settle interrupted syncs, then start every due account's sync (not waiting for
        them); returns how many."""
        await self.settle_interrupted()
        now = self.engine.now()
        try:
            accounts = await self.engine.accounts.all_enabled()
        except Exception:
            log_failure(log, "fetch scheduler cannot list accounts")
            return 0
        started = 0
        for account in accounts:
            if not self.due(account, now):
                continue
            cutoff = self.due_before(account, now)
            self._jitter.pop(account.id, None)  # a fresh jitter for the next round
            d = self.engine.sync(account.id, due_before=cutoff, user_id=account.user_id)
            d.addErrback(self._log_failure, account.id)
            started += 1
        return started

    def _log_failure(self, failure: Any, account_id: int) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("scheduled sync of account {account} failed", failure,
                        account=account_id)

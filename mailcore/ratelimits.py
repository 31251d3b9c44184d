"""Rate limits kept in the store, so that they hold across the nodes sharing it: a limit
that guards a secret (a password, a drop's password, the one-time codes a link may have sent)
must allow the same number of tries whether one node or ten answer. The token-bucket
arithmetic is web.ratelimit.Rate's (N at once, then one every period/N seconds); each take
is one short transaction on the bucket's row (`mailcore.store.rates`), judged by the
database's clock (the injected one, mailcore.store.dbclock). Keys are stored as digests.
Limits that only pace load (per user requests a second) stay in each process's memory."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Hashable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.store.database import Database
from mailcore.store.rates import thd_available, thd_sweep, thd_take, thd_take_all

log = Logger()

# How often the buckets full again (which hold nothing) are deleted, and how many a
# transaction.
SWEEP_INTERVAL = 600.0
SWEEP_BATCH = 1000


class SharedBuckets:
    """Token buckets in the store: `take` and `available` for one limit's key."""

    def __init__(self, db: Database, clock: IReactorTime) -> None:
        self.db = db
        self.clock = clock

    @staticmethod
    def bucket_name(limit: str, key: Hashable) -> str:
        """The row's name: a digest of the limit's name and the key's repr."""
        return hashlib.sha256(f"{limit}\0{key!r}".encode("utf-8", "replace")).hexdigest()

    async def take(self, limit: str, key: Hashable, count: int, period: float,
                   cost: int = 1) -> tuple[bool, float]:
        """Take `cost` from the bucket of `key` under `limit` (`count` per `period`
        seconds): whether it had them, and what it holds now."""
        return await self.db.run("rate_take", thd_take, self.bucket_name(limit, key), count,
                                 period, cost, self.clock.seconds())

    async def take_all(self, takes: Sequence[tuple[str, Hashable, int, float]],
                       cost: int = 1) -> int | None:
        """Take `cost` from the bucket of each (limit, key, count, period) of `takes`, in
        one transaction and only if every one has them: None when they had, else the index
        of the first that had not (nothing is taken from any: a take refused by a later
        bucket spends none of an earlier one's). Give them in one order at every call."""
        buckets = [(self.bucket_name(limit, key), count, period)
                   for limit, key, count, period in takes]
        return await self.db.run("rate_take_all", thd_take_all, buckets, cost,
                                 self.clock.seconds())

    async def available(self, limit: str, key: Hashable, count: int, period: float) -> float:
        """What the bucket of `key` under `limit` holds now (nothing is taken)."""
        return await self.db.read("rate_available", thd_available,
                                  self.bucket_name(limit, key), count, period,
                                  self.clock.seconds())

    async def sweep(self) -> int:
        """Delete the buckets full again (a missing one is full), SWEEP_BATCH a
        transaction; how many."""
        return await delete_in_batches(self.db, "rate_sweep", thd_sweep, self.clock.seconds(),
                                       batch=SWEEP_BATCH)


class BucketSweeper(Sweeper[int]):
    """Deletes the shared buckets that are full again, every SWEEP_INTERVAL seconds. The
    Core gives it the store's job leases: one node of those sharing the store sweeps per
    period (the delete is idempotent, should two meet in one)."""

    name = "rate-bucket-sweeper"
    failed = "sweeping the shared rate-limit buckets failed"

    def __init__(self, buckets: SharedBuckets, every: float = SWEEP_INTERVAL) -> None:
        super().__init__(buckets.clock, every)
        self.buckets = buckets

    def sweep(self) -> Awaitable[int]:
        return self.buckets.sweep()

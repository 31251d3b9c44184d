"""Rate limits kept in the store (mailcore.ratelimits, web.ratelimit.SharedRateLimiter): the
same buckets for every node, the same decisions and headers as the in-memory limiter, takes
at the same moment never both getting the last token, and full buckets swept; on SQLite and
PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.ratelimits import SharedBuckets
from mailcore.store.schema import rate_buckets
from tests.support.db import DatabaseMixin
from web.ratelimit import Rate, RateLimiter, SharedRateLimiter


class SharedRatesMixin(DatabaseMixin):
    timeout = 120

    async def limiters(self, rate: Rate) -> tuple[Clock, SharedRateLimiter, SharedRateLimiter]:
        """Two nodes' limiters of one limit over one store."""
        db = await self.open_database()
        clock = Clock()
        clock.advance(1_700_000_000)
        self.buckets = SharedBuckets(db, clock)
        return (clock, SharedRateLimiter(self.buckets, "login", rate),
                SharedRateLimiter(SharedBuckets(db, clock), "login", rate))

    async def test_nodes_take_from_one_bucket_as_one_process_would(self) -> None:
        rate = Rate(3, 60)
        clock, a, b = await self.limiters(rate)
        memory = RateLimiter(clock, rate)
        for node in (a, b, a, b):
            self.assertEqual(await node.take("k"), memory.check("k"))
        self.assertEqual((await a.take("k")).retry_after, 20)
        self.assertEqual(await b.available("k"), 0)
        clock.advance(20)
        self.assertEqual(await b.available("k"), 1)
        self.assertEqual(await b.take("k"), memory.check("k"))
        self.assertTrue((await a.take("other")).allowed)  # another key, its own bucket
        other_limit = SharedRateLimiter(self.buckets, "drop-code", rate)
        self.assertEqual(await other_limit.available("k"), 3)

    async def test_takes_at_the_same_moment_never_share_the_last_token(self) -> None:
        _, a, b = await self.limiters(Rate(5, 3600))
        decisions = await defer.gatherResults([
            defer.Deferred.fromCoroutine(node.take("k")) for node in (a, b) * 10])
        self.assertEqual(sum(d.allowed for d in decisions), 5)

    async def test_buckets_full_again_are_swept(self) -> None:
        clock, a, _ = await self.limiters(Rate(2, 60))
        await a.take("k")
        await a.take("j")
        await a.take("j")
        clock.advance(30)
        self.assertEqual(await self.buckets.sweep(), 1)  # k is full again, j is not
        clock.advance(30)
        self.assertEqual(await self.buckets.sweep(), 1)
        db = self.buckets.db
        self.assertEqual(await db.read("n", lambda c: c.execute(
            sa.select(sa.func.count()).select_from(rate_buckets)).scalar_one()), 0)


class SQLiteSharedRatesTests(SharedRatesMixin, TestCase):
    backend = "sqlite"


class PostgresSharedRatesTests(SharedRatesMixin, TestCase):
    backend = "postgresql"

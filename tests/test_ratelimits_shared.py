"""Rate limits kept in the store (mailcore.ratelimits, web.ratelimit.SharedRateLimiter): the
same buckets for every node, the same decisions and headers as the in-memory limiter, takes
at the same moment never both getting the last token, and full buckets swept; on SQLite and
PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore import ratelimits
from mailcore.ratelimits import SharedBuckets
from mailcore.store import rates as store_rates
from mailcore.store.schema import rate_buckets
from tests.support.db import DatabaseMixin, engine_query_plans, full_scans, transaction_answers
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

    async def test_take_all_takes_from_every_bucket_or_from_none(self) -> None:
        """take_all takes from each bucket only when every one has a token: a take the
        second bucket refuses spends none of the first's; it names the first that had
        none."""
        clock, _, _ = await self.limiters(Rate(3, 60))
        buckets = self.buckets
        link, owner = ("link", 7, 2, 60.0), ("owner", 1, 3, 360.0)
        self.assertIsNone(await buckets.take_all([link, owner]))
        self.assertIsNone(await buckets.take_all([link, owner]))
        self.assertEqual(await buckets.take_all([link, owner]), 0)  # the link has none left
        self.assertEqual(await buckets.available("owner", 1, 3, 360), 1)  # nor took one
        await buckets.take("owner", 1, 3, 360)
        clock.advance(30)  # one back in the link's bucket, a quarter in the owner's
        self.assertEqual(await buckets.take_all([link, owner]), 1)
        self.assertEqual(await buckets.available("link", 7, 2, 60), 1)  # not spent on it
        self.assertIsNone(await buckets.take_all([]))

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

    async def test_a_bucket_swept_under_a_take_is_taken_as_full(self) -> None:
        """The sweep may delete a bucket full again between a take's insert of its row
        (nothing: it was there) and its lock of it (PostgreSQL: the lock waited for the
        sweep's commit, then found no row). A missing bucket is full: the take and
        take_all take from it, rather than failing with NoResultFound."""
        clock, a, _ = await self.limiters(Rate(2, 60))
        buckets = self.buckets
        await a.take("k")
        await buckets.take_all([("owner", 1, 2, 60.0)])
        clock.advance(60)  # both full again: the sweep may delete them
        insert = store_rates._insert_full
        swept: list[str] = []

        def insert_then_swept(conn: sa.Connection, name: str, limit: int, now: float) -> None:
            insert(conn, name, limit, now)
            if name not in swept:  # the sweep's delete lands just after it
                swept.append(name)
                conn.execute(sa.delete(rate_buckets).where(rate_buckets.c.name == name))

        self.patch(store_rates, "_insert_full", insert_then_swept)
        self.assertTrue((await a.take("k")).allowed)
        self.assertEqual(await a.available("k"), 1)
        self.assertIsNone(await buckets.take_all([("owner", 1, 2, 60.0)]))
        self.assertEqual(await buckets.available("owner", 1, 2, 60), 1)
        self.assertEqual(len(swept), 2)

    async def test_the_sweep_deletes_a_batch_a_transaction_through_its_index(self) -> None:
        """The sweep holds no long write transaction: SWEEP_BATCH buckets at most each,
        found through ix_rate_buckets_full_at (no batch reads the whole table)."""
        clock, a, _ = await self.limiters(Rate(2, 60))
        for key in ("k1", "k2", "k3", "k4", "k5"):
            await a.take(key)
        clock.advance(60)
        await a.take("j")
        await a.take("j")  # empty: not full again before the sweep
        self.patch(ratelimits, "SWEEP_BATCH", 2)
        db = self.buckets.db
        batches = transaction_answers(self, db, "rate_sweep".__eq__)
        with engine_query_plans(db.engine) as plans:
            self.assertEqual(await self.buckets.sweep(), 5)
        self.assertEqual([n for _, n in batches], [2, 2, 1])
        self.assertEqual(await db.read("n", lambda c: c.execute(
            sa.select(rate_buckets.c.name)).scalars().all()),
            [SharedBuckets.bucket_name("login", "j")])
        self.assertEqual(full_scans(plans, "rate_buckets"), [])
        self.assertTrue([p for p in plans if "ix_rate_buckets_full_at" in p], plans)


class SQLiteSharedRatesTests(SharedRatesMixin, TestCase):
    backend = "sqlite"


class PostgresSharedRatesTests(SharedRatesMixin, TestCase):
    backend = "postgresql"

    async def test_the_sweep_passes_over_a_bucket_a_take_holds(self) -> None:
        """A take_all holds its first bucket's row while it asks for the next; the sweep
        locked the buckets full again in its own order, so it could hold the next while it
        waited for the first: deadlocked until PostgreSQL cancelled one of them (after its
        deadlock_timeout, 1 s). It passes over the rows a take holds instead, and sweeps
        the others. (Blocking calls on the test's thread: each waits at most
        lock_timeout.)"""
        clock, a, _ = await self.limiters(Rate(2, 60))
        await a.take("held")
        await a.take("idle")
        clock.advance(60)  # both full again
        now = clock.seconds()
        engine = self.buckets.db.engine
        held = SharedBuckets.bucket_name("login", "held")
        with engine.begin() as taking:
            self.assertIsNone(store_rates.thd_take_all(taking, [(held, 2, 60.0)], 1, now))
            with engine.begin() as sweeping:
                sweeping.execute(sa.text("SET LOCAL lock_timeout = '200ms'"))
                self.assertEqual(store_rates.thd_sweep(sweeping, now, 1000), 1)
        self.assertEqual(await self.buckets.db.read("n", lambda c: c.execute(
            sa.select(rate_buckets.c.name)).scalars().all()), [held])

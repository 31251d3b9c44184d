"""Filtering tokens: charges from the monthly tank first, all or nothing, exact across month
rollovers (Clock-driven), idempotent keys, the daily average, the periodic sweep, and no
overdraw or double rollover with two nodes writing at once (threaded SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection, select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.billing import tokens as tokens_module
from mailcore.billing.plans import Plans
from mailcore.billing.tokens import (
    EMPTY,
    OK,
    ConsumeResult,
    Tanks,
    TokenError,
    TokenService,
    TokenSettings,
    month_index,
    rolled_over,
)
from mailcore.config import ConfigError
from mailcore.identity import Identity, User
from mailcore.store import Database
from mailcore.store.leases import JobLeases
from mailcore.store.schema import token_charges, token_tanks, token_usage
from mailcore.workers import CpuPool
from tests.support.db import (
    DatabaseMixin,
    engine_query_plans,
    full_scans,
    synchronous_database,
    transaction_answers,
)

PLANS = Plans({"free": 1000, "standard": 5000, "agency": 20000})


def at(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (UTC when no offset is given)."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def move(clock: Clock, text: str) -> None:
    """Advance `clock` to the time `text` (never backwards)."""
    target = at(text)
    assert target >= clock.seconds(), text
    clock.advance(target - clock.seconds())


def clock_at(text: str) -> Clock:
    clock = Clock()
    clock.advance(at(text))
    return clock


async def new_user(db: Database, clock: Clock, name: str = "alice", plan: str = "free") -> User:
    identity = Identity(db, clock, CpuPool.for_tests())
    return await identity.create_user(name, f"{name}@example.test", plan=plan)


class MonthArithmeticTests(TestCase):
    def test_month_index_is_utc(self) -> None:
        paris = datetime.timezone(datetime.timedelta(hours=1))
        new_year_in_paris = datetime.datetime(2025, 1, 1, 0, 30, tzinfo=paris)
        self.assertEqual(month_index(new_year_in_paris), 2024 * 12 + 11)

    def test_rolled_over(self) -> None:
        self.assertEqual(rolled_over(300, 50, 10, 10, 1000), (300, 50, 10))
        self.assertEqual(rolled_over(300, 50, 10, 11, 1000), (1000, 350, 11))
        self.assertEqual(rolled_over(300, 50, 10, 13, 1000), (1000, 2350, 13))


class TokenTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = synchronous_database()
        self.clock = clock_at("2024-11-14T10:00:00")
        self.tokens = TokenService(self.db, self.clock, PLANS)
        self.user = await new_user(self.db, self.clock)

    async def tanks(self) -> tuple[int, int, int]:
        found = await self.tokens.tanks(self.user.id)
        return found.monthly, found.perm, found.total

    async def test_a_new_user_has_the_plans_monthly_allowance(self) -> None:
        self.assertEqual(await self.tanks(), (1000, 0, 1000))
        standard = await new_user(self.db, self.clock, "bob", "standard")
        self.assertEqual((await self.tokens.tanks(standard.id)).as_dict(),
                         {"monthly": 5000, "perm": 0, "total": 5000})

    async def test_one_token_per_recipient_monthly_first_then_perm(self) -> None:
        await self.tokens.credit(self.user.id, 50)
        self.assertEqual(await self.tokens.consume(self.user.id, 990), OK)
        self.assertEqual(await self.tanks(), (10, 50, 60))
        self.assertEqual(await self.tokens.consume(self.user.id, 15), OK)
        self.assertEqual(await self.tanks(), (0, 45, 45))
        self.assertEqual(await self.tokens.consume(self.user.id, 45), OK)
        self.assertEqual(await self.tanks(), (0, 0, 0))

    async def test_a_charge_larger_than_both_tanks_takes_nothing(self) -> None:
        await self.tokens.credit(self.user.id, 5)
        self.assertEqual(await self.tokens.consume(self.user.id, 1006), EMPTY)
        self.assertEqual(await self.tanks(), (1000, 5, 1005))
        self.assertEqual(await self.tokens.consume(self.user.id, 1005), OK)
        self.assertEqual(await self.tokens.consume(self.user.id, 1), EMPTY)
        self.assertEqual(await self.tokens.daily_average(self.user.id), 1005 // 30)

    async def test_when_empty_allow_takes_what_is_left_and_answers_ok(self) -> None:
        tokens = TokenService(self.db, self.clock, PLANS, TokenSettings(when_empty="allow"))
        self.assertEqual(await tokens.consume(self.user.id, 1200), OK)
        self.assertEqual(await self.tanks(), (0, 0, 0))
        self.assertEqual(await tokens.consume(self.user.id, 3), OK)
        self.assertEqual(await self.tanks(), (0, 0, 0))

    async def test_a_key_charges_a_message_once(self) -> None:
        self.assertEqual(await self.tokens.consume(self.user.id, 3, key="Q1"), OK)
        self.assertEqual(await self.tokens.consume(self.user.id, 3, key="Q1"), OK)
        self.assertEqual(await self.tanks(), (997, 0, 997))
        bob = await new_user(self.db, self.clock, "bob")
        self.assertEqual(await self.tokens.consume(bob.id, 3, key="Q1"), OK)
        self.assertEqual((await self.tokens.tanks(bob.id)).total, 997)
        # An "empty" answer records nothing: the same key is charged when tokens are back.
        self.assertEqual(await self.tokens.consume(self.user.id, 2000, key="Q2"), EMPTY)
        await self.tokens.credit(self.user.id, 1003)
        self.assertEqual(await self.tokens.consume(self.user.id, 2000, key="Q2"), OK)
        self.assertEqual(await self.tanks(), (0, 0, 0))

    async def test_bad_counts_and_unknown_users_are_refused(self) -> None:
        for n in (-1, True, 1.5):
            with self.assertRaises(TokenError):
                await self.tokens.consume(self.user.id, n)  # type: ignore[arg-type]
        with self.assertRaises(TokenError):
            await self.tokens.consume(self.user.id, 1, key="")
        with self.assertRaises(TokenError):
            await self.tokens.consume(self.user.id + 100, 1)
        with self.assertRaises(TokenError):
            await self.tokens.credit(self.user.id, 0)
        self.assertEqual(await self.tokens.consume(self.user.id, 0), OK)
        self.assertEqual(await self.tanks(), (1000, 0, 1000))

    async def test_accounting_is_exact_across_a_month_rollover(self) -> None:
        await self.tokens.credit(self.user.id, 200)
        self.assertEqual(await self.tokens.consume(self.user.id, 300), OK)
        move(self.clock, "2024-11-30T23:59:59")
        self.assertEqual(await self.tokens.consume(self.user.id, 100), OK)
        self.assertEqual(await self.tanks(), (600, 200, 800))
        move(self.clock, "2024-12-01T00:00:00")
        # Seen before anything is written: 600 unused move to perm, monthly refills.
        self.assertEqual(await self.tanks(), (1000, 800, 1800))
        self.assertEqual(await self.tokens.consume(self.user.id, 1001), OK)
        self.assertEqual(await self.tanks(), (0, 799, 799))
        # Later in the same month nothing rolls again, whatever runs.
        move(self.clock, "2024-12-31T23:59:59")
        self.assertEqual(await self.tokens.sweep(), 0)
        self.assertEqual(await self.tanks(), (0, 799, 799))
        move(self.clock, "2025-01-01T00:00:01")
        self.assertEqual(await self.tokens.sweep(), 1)
        self.assertEqual(await self.tokens.sweep(), 0)
        self.assertEqual(await self.tokens.consume(self.user.id, 1), OK)
        self.assertEqual(await self.tanks(), (999, 799, 1798))

    async def test_each_missed_month_counts_as_one_unused_allowance(self) -> None:
        await self.tokens.consume(self.user.id, 400)
        move(self.clock, "2025-02-10T08:00:00")
        # November's 600 left, then December and January's whole allowances.
        self.assertEqual(await self.tanks(), (1000, 2600, 3600))
        await self.tokens.consume(self.user.id, 1)
        self.assertEqual(await self.tanks(), (999, 2600, 3599))

    async def test_the_refill_follows_the_plan_at_month_start(self) -> None:
        await self.tokens.consume(self.user.id, 1000)
        await Identity(self.db, self.clock, CpuPool.for_tests()).set_plan(self.user.id, "agency")
        self.assertEqual(await self.tanks(), (0, 0, 0))
        move(self.clock, "2024-12-01T00:00:00")
        self.assertEqual(await self.tanks(), (20000, 0, 20000))

    async def test_daily_average_covers_the_last_30_days(self) -> None:
        self.clock = clock_at("2024-09-01T12:00:00")
        self.tokens = TokenService(self.db, self.clock, PLANS)
        await self.tokens.credit(self.user.id, 100_000)
        await self.tokens.consume(self.user.id, 900)  # 2024-09-01: too old by then
        move(self.clock, "2024-10-20T12:00:00")
        await self.tokens.consume(self.user.id, 600)
        await self.tokens.consume(self.user.id, 15)
        move(self.clock, "2024-11-18T23:00:00")
        await self.tokens.consume(self.user.id, 300)
        # 2024-10-20 is the 30th day back from 2024-11-18 (today included).
        self.assertEqual(await self.tokens.daily_average(self.user.id), (600 + 15 + 300) // 30)
        move(self.clock, "2024-11-19T00:00:00")
        self.assertEqual(await self.tokens.daily_average(self.user.id), 300 // 30)

        def days(conn: Connection) -> list[tuple[datetime.date, int]]:
            rows = conn.execute(select(token_usage.c.day, token_usage.c.used)
                                .order_by(token_usage.c.day))
            return [(r.day, r.used) for r in rows]

        self.assertEqual(await self.db.read("t", days), [
            (datetime.date(2024, 9, 1), 900), (datetime.date(2024, 10, 20), 615),
            (datetime.date(2024, 11, 18), 300),
        ])


class SweepTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = synchronous_database()
        self.clock = clock_at("2024-11-14T10:00:00")
        self.settings = TokenSettings(rollover_interval=3600, usage_retention_days=60,
                                      charge_retention_days=7)
        self.tokens = TokenService(self.db, self.clock, PLANS, self.settings)

    async def rows(self) -> dict[int, tuple[int, int, int]]:
        def txn(conn: Connection) -> dict[int, tuple[int, int, int]]:
            rows = conn.execute(select(token_tanks))
            return {r.user_id: (r.monthly, r.perm, r.period) for r in rows}

        return await self.db.read("t", txn)

    async def test_the_service_opens_and_rolls_over_tanks_on_its_clock(self) -> None:
        alice = await new_user(self.db, self.clock, "alice")
        bob = await new_user(self.db, self.clock, "bob", "standard")
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        november = month_index(datetime.datetime(2024, 11, 1, tzinfo=datetime.UTC))
        self.assertEqual(await self.rows(),
                         {alice.id: (1000, 0, november), bob.id: (5000, 0, november)})
        await self.tokens.consume(alice.id, 10)
        move(self.clock, "2024-11-30T23:30:00")  # sweeps ran hourly: nothing to roll yet
        self.assertEqual((await self.rows())[alice.id], (990, 0, november))
        self.clock.advance(3600)  # the first sweep of December
        self.assertEqual(await self.rows(), {alice.id: (1000, 990, november + 1),
                                             bob.id: (5000, 5000, november + 1)})

    async def test_stopping_leaves_no_pending_call(self) -> None:
        self.tokens.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.tokens.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_a_stop_waits_for_the_sweep_in_flight(self) -> None:
        # The daemon closes the store once the service has stopped: a sweep still running
        # then used to fail with "the database is closed".
        gate: defer.Deferred[None] = defer.Deferred()
        swept: list[str] = []
        real_sweep = self.tokens.sweep

        async def held_sweep() -> int:
            swept.append("started")
            await gate
            rolled = await real_sweep()
            swept.append("finished")
            return rolled

        alice = await new_user(self.db, self.clock, "alice")
        self.tokens.sweep = held_sweep  # type: ignore[method-assign]
        self.tokens.startService()
        stopped = self.tokens.stopService()
        self.clock.advance(3 * 3600)
        self.assertNoResult(stopped)
        self.assertEqual(swept, ["started"])
        gate.callback(None)
        await stopped
        self.assertEqual(swept, ["started", "finished"])
        self.assertIn(alice.id, await self.rows())  # its tank was opened before the stop

    async def test_a_failing_sweep_is_logged_and_the_loop_goes_on(self) -> None:
        calls: list[int] = []

        async def failing() -> int:
            calls.append(1)
            raise RuntimeError("store down")

        self.tokens.sweep = failing  # type: ignore[method-assign]
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        self.clock.advance(3600)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_old_usage_and_charge_records_are_purged(self) -> None:
        alice = await new_user(self.db, self.clock)
        await self.tokens.consume(alice.id, 5, key="old")
        move(self.clock, "2024-11-22T10:00:00")
        await self.tokens.consume(alice.id, 5, key="new")
        await self.tokens.sweep()

        def keys(conn: Connection) -> list[str]:
            return [r[0] for r in conn.execute(select(token_charges.c.charge_key))]

        self.assertEqual(await self.db.read("t", keys), ["new"])
        move(self.clock, "2025-01-20T10:00:00")
        await self.tokens.sweep()

        def usage(conn: Connection) -> list[Any]:
            return [r.day for r in conn.execute(select(token_usage))]

        self.assertEqual(await self.db.read("t", usage), [datetime.date(2024, 11, 22)])


    async def test_the_purge_deletes_a_batch_a_transaction_through_its_indexes(self) -> None:
        """The sweep's purge holds no long write transaction: PURGE_BATCH rows at most
        each, found through ix_token_usage_day (migration 0065) and
        ix_token_charges_charged_at (no batch reads a whole table)."""
        alice = await new_user(self.db, self.clock)
        bob = await new_user(self.db, self.clock, "bob")
        for day in range(3):  # three days' usage and keyed charges of each
            for user in (alice, bob):
                await self.tokens.consume(user.id, 1, key=f"q{day}")
            self.clock.advance(86400)
        self.patch(tokens_module, "PURGE_BATCH", 2)
        batches = transaction_answers(self, self.db, lambda name: name.startswith("purge_token"))
        move(self.clock, "2025-03-01T00:00:00")  # past both retentions
        with engine_query_plans(self.db.engine) as plans:
            await self.tokens.sweep()
        self.assertEqual(batches, [("purge_token_usage", 2)] * 3 + [("purge_token_usage", 0)]
                         + [("purge_token_charges", 2)] * 3 + [("purge_token_charges", 0)])
        self.assertEqual(full_scans(plans, "token_usage", "token_charges"), [])
        for index in ("ix_token_usage_day", "ix_token_charges_charged_at"):
            self.assertTrue([p for p in plans if index in p], plans)

        def left(conn: Connection) -> tuple[int, int]:
            return (len(conn.execute(select(token_usage)).all()),
                    len(conn.execute(select(token_charges)).all()))

        self.assertEqual(await self.db.read("t", left), (0, 0))


class SettingsTests(TestCase):
    def test_from_config(self) -> None:
        settings = TokenSettings.from_config({"when_empty": "allow", "rollover_interval": 60})
        self.assertEqual((settings.when_empty, settings.rollover_interval), ("allow", 60.0))
        for section in (
            {"when_empty": "bounce"}, {"rollover_interval": 0}, {"rollover_interval": True},
            {"usage_retention_days": 10}, {"charge_retention_days": 0}, {"other": 1},
        ):
            with self.assertRaises(ConfigError, msg=section):
                TokenSettings.from_config(section)


async def ticked(tokens: TokenService) -> None:
    """One tick of the sweep's timer on `tokens`, ended."""
    await defer.maybeDeferred(tokens.leased_tick)


class ConcurrencyMixin(DatabaseMixin):
    """Two nodes (two Databases on one store, each with its thread pool) at once."""

    timeout = 60

    async def two_nodes(self, plans: Plans) -> tuple[TokenService, TokenService, User, Clock]:
        first = await self.open_database()
        second = await self.open_database_at(first.url)
        clock = clock_at("2024-11-14T10:00:00")
        user = await new_user(first, clock)
        return (TokenService(first, clock, plans), TokenService(second, clock, plans),
                user, clock)

    async def test_concurrent_charges_never_overdraw(self) -> None:
        a, b, user, _ = await self.two_nodes(Plans({"free": 60}))
        await a.credit(user.id, 40)
        calls = [
            defer.Deferred.fromCoroutine((a if i % 2 else b).consume(user.id, 1))
            for i in range(150)
        ]
        results: list[ConsumeResult] = await defer.gatherResults(calls)
        self.assertEqual((results.count(OK), results.count(EMPTY)), (100, 50))
        self.assertEqual(await a.tanks(user.id), Tanks(0, 0))
        self.assertEqual(await b.daily_average(user.id), 100 // 30)

    async def test_a_rollover_happens_once_whoever_races_for_it(self) -> None:
        a, b, user, clock = await self.two_nodes(Plans({"free": 60}))
        await a.credit(user.id, 40)
        self.assertEqual(await a.consume(user.id, 30), OK)
        move(clock, "2024-12-01T00:00:05")
        sweeps = [defer.Deferred.fromCoroutine(node.sweep()) for node in (a, b, b)]
        charges = [
            defer.Deferred.fromCoroutine((a if i % 2 else b).consume(user.id, 1))
            for i in range(10)
        ]
        rolled: list[int] = await defer.gatherResults(sweeps)
        results: list[ConsumeResult] = await defer.gatherResults(charges)
        self.assertEqual(results.count(OK), 10)
        # At most one sweep rolled the tank (none if a charge got there first, lazily).
        self.assertIn(sum(rolled), (0, 1))
        # November's 30 unused tokens moved to perm once; December's 60 minus 10 used.
        self.assertEqual(await b.tanks(user.id), Tanks(50, 70))


    async def test_a_node_that_did_not_sweep_rolls_a_tank_over_as_it_charges(self) -> None:
        """One node sweeps per period (the Core leases the sweep): node a swept just before
        the month ended, so node b's sweep at the month's start is not its to run, and
        its charges find the tank still in November. Each charge rolls it over first, once:
        November's unused tokens move to perm, December's allowance is charged."""
        a, b, user, clock = await self.two_nodes(Plans({"free": 60}))
        a.leases, b.leases = JobLeases(a.db, "node-a"), JobLeases(b.db, "node-b")
        self.assertEqual(await a.consume(user.id, 25), OK)
        move(clock, "2024-11-30T23:58:00")
        await ticked(a)
        move(clock, "2024-12-01T00:00:05")
        swept: list[int] = []
        real_sweep = b.sweep

        async def sweep() -> int:
            swept.append(1)
            return await real_sweep()

        b.sweep = sweep  # type: ignore[method-assign]
        await ticked(b)
        self.assertEqual(swept, [])  # within node a's period: not b's to run

        def period(conn: Connection) -> int:
            return int(conn.execute(select(token_tanks.c.period)).scalar_one())

        november = month_index(datetime.datetime(2024, 11, 1, tzinfo=datetime.UTC))
        self.assertEqual(await b.db.read("period", period), november)
        charges = [defer.Deferred.fromCoroutine((a if i % 2 else b).consume(user.id, 1))
                   for i in range(6)]
        self.assertEqual(await defer.gatherResults(charges), [OK] * 6)
        self.assertEqual(await b.tanks(user.id), Tanks(54, 35))
        self.assertEqual(await b.db.read("period", period), november + 1)


class SQLiteConcurrencyTests(ConcurrencyMixin, TestCase):
    backend = "sqlite"


class PostgresConcurrencyTests(ConcurrencyMixin, TestCase):
    backend = "postgresql"

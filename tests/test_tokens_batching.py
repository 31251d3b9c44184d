"""Batched token charging: charges requested while one charge transaction is in flight go
into the next single transaction, each still all or nothing, idempotent by key, with the
same "ok"/"empty" answers as `TokenService.consume`; through a held lane on a Clock, and
with two nodes batching into one store at once (threaded SQLite, PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.billing.plans import Plans
from mailcore.billing.tokens import (
    EMPTY,
    OK,
    Charge,
    ChargeBatcher,
    ConsumeResult,
    Tanks,
    TokenError,
    TokenService,
    TokenSettings,
    consume_batch_txn,
)
from mailcore.identity import User
from mailcore.store.errands import Errand
from mailcore.store.schema import token_charges
from tests.support.db import DatabaseMixin, hold_shared_thread, synchronous_database
from tests.test_tokens import PLANS, clock_at, new_user


class HeldLane:
    """A write lane whose transactions wait until the test lets them run, in order."""

    def __init__(self, tokens: TokenService) -> None:
        self.tokens = tokens
        self.batches: list[list[Charge]] = []
        self.held: list[tuple[defer.Deferred[Any], list[Charge]]] = []
        self.fail_next = False

    def __call__(self, charges: list[Charge]) -> defer.Deferred[Any]:
        self.batches.append(list(charges))
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((d, charges))
        return d

    def release(self) -> None:
        """Run the oldest held transaction and fire its Deferred with the outcome."""
        d, charges = self.held.pop(0)
        if self.fail_next:
            self.fail_next = False
            d.errback(RuntimeError("store down"))
            return
        tokens = self.tokens
        tokens.db.run("consume_tokens", consume_batch_txn, charges, tokens.now(), tokens.plans,
                      tokens.allow_empty).chainDeferred(d)


def gather(calls: list[Any]) -> defer.Deferred[list[Any]]:
    return defer.gatherResults([defer.Deferred.fromCoroutine(c) for c in calls],
                               consumeErrors=True)


class BatchingTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = synchronous_database()
        self.clock: Clock = clock_at("2024-11-14T10:00:00")
        self.tokens = TokenService(self.db, self.clock, PLANS)
        self.lane = HeldLane(self.tokens)
        self.batcher = ChargeBatcher(self.tokens, lane=self.lane)
        self.alice = await new_user(self.db, self.clock, "alice")
        self.bob = await new_user(self.db, self.clock, "bob")

    async def total(self, user: User) -> int:
        return (await self.tokens.tanks(user.id)).total

    async def charge_keys(self) -> list[tuple[int, str, int]]:
        def txn(conn: Connection) -> list[tuple[int, str, int]]:
            c = token_charges.c
            return [(r.user_id, r.charge_key, r.tokens) for r in conn.execute(
                select(c.user_id, c.charge_key, c.tokens).order_by(c.user_id, c.charge_key))]

        return await self.db.read("keys", txn)

    async def test_charges_arriving_during_a_transaction_share_the_next_one(self) -> None:
        first = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 1, key="Q0"))
        rest = gather([
            self.batcher.consume((self.alice if i % 2 else self.bob).id, 2, key=f"Q{i}")
            for i in range(1, 21)
        ])
        self.assertEqual([len(b) for b in self.lane.batches], [1])  # the rest wait
        self.lane.release()
        self.assertEqual(await first, OK)
        self.assertEqual([len(b) for b in self.lane.batches], [1, 20])
        self.assertFalse(rest.called)
        self.lane.release()
        self.assertEqual(await rest, [OK] * 20)
        self.assertEqual(self.batcher.transactions, 2)
        # Exact arithmetic: alice 1 + 10 charges of 2, bob 10 charges of 2.
        self.assertEqual(await self.total(self.alice), 1000 - 21)
        self.assertEqual(await self.total(self.bob), 1000 - 20)
        self.assertEqual(len(await self.charge_keys()), 21)
        self.assertEqual(await self.tokens.daily_average(self.alice.id), 21 // 30)

    async def test_a_charge_given_up_while_waiting_for_a_batch_is_never_applied(self) -> None:
        first = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 1, key="Q0"))
        given_up = defer.Deferred.fromCoroutine(self.batcher.consume(self.bob.id, 2, key="Q1"))
        kept = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 2, key="Q2"))
        given_up.cancel()
        self.failureResultOf(given_up, defer.CancelledError)
        self.lane.release()
        self.assertEqual(await first, OK)
        self.assertEqual([[c.key for c in b] for b in self.lane.batches], [["Q0"], ["Q2"]])
        self.lane.release()
        self.assertEqual(await kept, OK)
        self.assertEqual(await self.total(self.alice), 1000 - 3)
        self.assertEqual(await self.total(self.bob), 1000)

    async def test_each_charge_is_all_or_nothing_inside_a_batch(self) -> None:
        await self.tokens.credit(self.alice.id, 5)  # 1005 in all
        hold = defer.Deferred.fromCoroutine(self.batcher.consume(self.bob.id, 1))
        calls = gather([
            self.batcher.consume(self.alice.id, 600, key="A"),
            self.batcher.consume(self.alice.id, 600, key="B"),  # only 405 left: empty
            self.batcher.consume(self.alice.id, 400, key="C"),
            self.batcher.consume(self.alice.id, 6, key="D"),    # 5 left: empty
        ])
        self.lane.release()
        await hold
        self.lane.release()
        self.assertEqual(await calls, [OK, EMPTY, OK, EMPTY])
        self.assertEqual(await self.tokens.tanks(self.alice.id), Tanks(0, 5))
        # An "empty" charge records nothing: its key is charged once tokens are back.
        self.assertEqual([k for _u, k, _t in await self.charge_keys()], ["A", "C"])
        await self.tokens.credit(self.alice.id, 595)
        d = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 600, key="B"))
        self.lane.release()
        self.assertEqual(await d, OK)
        self.assertEqual(await self.total(self.alice), 0)

    async def test_a_key_is_charged_once_within_a_batch_and_across_batches(self) -> None:
        self.assertEqual(await self.tokens.consume(self.alice.id, 3, key="Q1"), OK)
        hold = defer.Deferred.fromCoroutine(self.batcher.consume(self.bob.id, 1))
        calls = gather([
            self.batcher.consume(self.alice.id, 3, key="Q1"),  # charged before the batch
            self.batcher.consume(self.alice.id, 4, key="Q2"),
            self.batcher.consume(self.alice.id, 4, key="Q2"),  # the same message again
            self.batcher.consume(self.bob.id, 4, key="Q2"),    # another owner, own key
        ])
        self.lane.release()
        await hold
        self.lane.release()
        self.assertEqual(await calls, [OK] * 4)
        self.assertEqual(await self.total(self.alice), 1000 - 3 - 4)
        self.assertEqual(await self.total(self.bob), 1000 - 1 - 4)
        self.assertEqual(await self.charge_keys(), [
            (self.alice.id, "Q1", 3), (self.alice.id, "Q2", 4), (self.bob.id, "Q2", 4),
        ])

    async def test_one_messages_charges_go_into_one_transaction(self) -> None:
        results = await self.batcher_now().consume_all([
            Charge(self.alice.id, 2, "Q1:1"), Charge(self.bob.id, 5000, "Q1:2"),
            Charge(self.bob.id, 0, "Q1:3"),
        ])
        self.assertEqual(results, [OK, EMPTY, OK])
        self.assertEqual(len(self.lane.batches), 0)

    def batcher_now(self) -> ChargeBatcher:
        """A batcher straight on the synchronous store (no held lane)."""
        batcher = ChargeBatcher(self.tokens)
        self.addCleanup(lambda: self.assertEqual(batcher.transactions, 1))
        return batcher

    async def test_when_empty_allow_takes_what_is_left(self) -> None:
        tokens = TokenService(self.db, self.clock, PLANS, TokenSettings(when_empty="allow"))
        self.lane = HeldLane(tokens)
        batcher = ChargeBatcher(tokens, lane=self.lane)
        hold = defer.Deferred.fromCoroutine(batcher.consume(self.bob.id, 1))
        calls = gather([batcher.consume(self.alice.id, 700, key=k) for k in "ABC"])
        self.lane.release()
        await hold
        self.lane.release()
        self.assertEqual(await calls, [OK, OK, OK])
        self.assertEqual(await self.total(self.alice), 0)
        self.assertEqual([t for _u, _k, t in await self.charge_keys()], [700, 300, 0])

    async def test_an_unknown_user_fails_alone(self) -> None:
        hold = defer.Deferred.fromCoroutine(self.batcher.consume(self.bob.id, 1))
        good = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 2, key="Q"))
        bad = defer.Deferred.fromCoroutine(self.batcher.consume(self.bob.id + 100, 2))
        self.lane.release()
        await hold
        self.lane.release()
        self.assertEqual(await good, OK)
        with self.assertRaises(TokenError):
            await bad
        self.assertEqual(await self.total(self.alice), 998)

    async def test_a_failed_transaction_fails_its_charges_and_takes_nothing(self) -> None:
        self.lane.fail_next = True
        first = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 1, key="Q"))
        self.lane.release()
        with self.assertRaises(RuntimeError):
            await first
        self.assertEqual(await self.total(self.alice), 1000)
        # The next charge of the same key goes through normally.
        again = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 1, key="Q"))
        self.lane.release()
        self.assertEqual(await again, OK)
        self.assertEqual(await self.total(self.alice), 999)

    async def test_bad_counts_and_keys_are_refused_before_anything_is_charged(self) -> None:
        for charges in ([Charge(self.alice.id, 1), Charge(self.alice.id, -1)],
                        [Charge(self.alice.id, 1, "")], [Charge(self.alice.id, True)]):
            with self.assertRaises(TokenError):
                await self.batcher.consume_all(charges)  # type: ignore[arg-type]
        self.assertEqual(self.lane.batches, [])

    async def test_batches_are_capped(self) -> None:
        batcher = ChargeBatcher(self.tokens, lane=self.lane, max_batch=3)
        hold = defer.Deferred.fromCoroutine(batcher.consume(self.bob.id, 1))
        calls = gather([batcher.consume(self.alice.id, 1) for _ in range(7)])
        for _ in range(4):
            self.lane.release()
        await hold
        self.assertEqual(await calls, [OK] * 7)
        self.assertEqual([len(b) for b in self.lane.batches], [1, 3, 3, 1])
        self.assertEqual(await self.total(self.alice), 993)


class ConcurrentBatchingMixin(DatabaseMixin):
    """On a threaded store: two nodes, each with its batcher on its own Database, charging
    one store at once; a batch whose first caller's errand is given up."""

    timeout = 60

    async def test_two_batching_nodes_never_overdraw(self) -> None:
        first = await self.open_database()
        second = await self.open_database_at(first.url)
        clock = clock_at("2024-11-14T10:00:00")
        plans = Plans({"free": 60})
        alice = await new_user(first, clock, "alice")
        bob = await new_user(first, clock, "bob")
        a = ChargeBatcher(TokenService(first, clock, plans))
        b = ChargeBatcher(TokenService(second, clock, plans))
        calls = []
        for i in range(150):
            node = a if i % 2 else b
            # Both users in every batch, in both orders: row locks are taken in one order.
            users = (alice, bob) if i % 3 else (bob, alice)
            calls.append(defer.Deferred.fromCoroutine(node.consume_all(
                [Charge(u.id, 1, f"Q{i}") for u in users]
            )))
        results: list[list[ConsumeResult]] = await defer.gatherResults(calls)
        per_user = {alice.id: 0, bob.id: 0}
        for i, pair in enumerate(results):
            users = (alice, bob) if i % 3 else (bob, alice)
            for user, result in zip(users, pair, strict=True):
                per_user[user.id] += result == OK
        self.assertEqual(per_user, {alice.id: 60, bob.id: 60})
        self.assertLess(a.transactions + b.transactions, 150)
        tokens = TokenService(first, clock, plans)
        self.assertEqual(await tokens.tanks(alice.id), Tanks(0, 0))
        self.assertEqual(await tokens.tanks(bob.id), Tanks(0, 0))


    async def test_a_batch_started_within_an_errand_given_up_charges_the_others(self) -> None:
        """A batch serves every caller waiting, not only the one whose charge started it:
        that caller's errand (a request whose store work it may give up) given up before
        the batch's transaction begins withdraws none of it, nor the batches after it."""
        db = await self.open_database(max_threads=1)
        clock = clock_at("2024-11-14T10:00:00")
        tokens = TokenService(db, clock, PLANS)
        alice = await new_user(db, clock, "alice")
        bob = await new_user(db, clock, "bob")
        batcher = ChargeBatcher(tokens)  # its own transactions, on the store's one thread
        holding, release = await hold_shared_thread(self, db)
        errand = Errand()
        first = defer.Deferred.fromCoroutine(errand.run(batcher.consume(alice.id, 1, key="A")))
        others = gather([batcher.consume(bob.id, 2, key="B"),
                         batcher.consume(alice.id, 3, key="C")])  # the next batch
        errand.give_up()  # the first batch is queued behind `hold`, not begun
        release.set()
        await holding
        self.assertEqual(await others, [OK, OK])
        self.assertEqual(await first, OK)
        self.assertEqual(batcher.transactions, 2)
        self.assertEqual((await tokens.tanks(alice.id)).total, 1000 - 4)
        self.assertEqual((await tokens.tanks(bob.id)).total, 1000 - 2)


class SQLiteConcurrentBatchingTests(ConcurrentBatchingMixin, TestCase):
    backend = "sqlite"


class PostgresConcurrentBatchingTests(ConcurrentBatchingMixin, TestCase):
    backend = "postgresql"


class Lookup:
    """The domain snapshot as the filtering stage reads it."""

    loaded = True

    def __init__(self, *domains: Any) -> None:
        self.domains = {d.id: d for d in domains}

    def when_loaded(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def domain_by_id(self, domain_id: int) -> Any:
        return self.domains.get(domain_id)


class StageChargeTests(TestCase):
    """The filtering stage charges every owner of a message in the batch of the moment."""

    async def setUp(self) -> None:  # type: ignore[override]
        from types import SimpleNamespace

        from filters import build_chain
        from mailcore.gateway.filtering import FilteringStage
        from mailcore.workers import CpuPool

        self.db = synchronous_database()
        self.clock = clock_at("2024-11-14T10:00:00")
        self.tokens = TokenService(self.db, self.clock, PLANS)
        self.alice = await new_user(self.db, self.clock, "alice")
        self.bob = await new_user(self.db, self.clock, "bob")
        self.assertEqual(await self.tokens.consume(self.bob.id, 1000), OK)  # bob: empty
        self.lane = HeldLane(self.tokens)
        self.batcher = ChargeBatcher(self.tokens, lane=self.lane)
        a = SimpleNamespace(id=1, owner_id=self.alice.id, name="a.test", spam_action=0,
                            virus_action=0)
        b = SimpleNamespace(id=2, owner_id=self.bob.id, name="b.test", spam_action=0,
                            virus_action=0)
        chain = build_chain({}, reactor=self.clock, runner=CpuPool.for_tests())
        self.stage = FilteringStage(chain, Lookup(a, b), self.batcher)

    def process(self, queue_id: str, *rcpts: str) -> defer.Deferred[Any]:
        from mailcore.queue.pipeline import PipelineMessage, PipelineRecipient

        recipients = tuple(
            PipelineRecipient(r, 1 if r.endswith("@a.test") else 2) for r in rcpts
        )
        body = b"From: x@y.test\r\nSubject: hi\r\n\r\nclean\r\n"
        return defer.Deferred.fromCoroutine(self.stage.process(
            PipelineMessage(queue_id, "relay", "x@y.test", recipients, body)
        ))

    async def test_messages_filtered_together_are_charged_in_one_transaction(self) -> None:
        first = self.process("Q0", "x@a.test")
        others = [
            self.process("Q1", "p@a.test", "q@a.test"),
            self.process("Q2", "r@b.test"),
            self.process("Q3", "s@a.test", "t@b.test"),
        ]
        self.assertEqual([len(b) for b in self.lane.batches], [1])
        self.lane.release()
        self.assertIsNone(await first)
        self.assertEqual([len(b) for b in self.lane.batches], [1, 4])
        self.lane.release()
        clean, empty_b, mixed = [await d for d in others]
        self.assertIsNone(clean)
        self.assertEqual((empty_b.action.value, empty_b.reason[:5]), ("defer", "4.7.1"))
        self.assertIn("b.test", mixed.reason)
        # Alice paid for Q0, Q1 and her recipient of Q3; bob's tank was empty: nothing taken.
        self.assertEqual((await self.tokens.tanks(self.alice.id)).total, 1000 - 4)
        self.assertEqual((await self.tokens.tanks(self.bob.id)).total, 0)
        # Q3 again once bob has tokens: alice is not charged twice, bob once.
        await self.tokens.credit(self.bob.id, 5)
        retry = self.process("Q3", "s@a.test", "t@b.test")
        self.lane.release()
        self.assertIsNone(await retry)
        self.assertEqual((await self.tokens.tanks(self.alice.id)).total, 1000 - 4)
        self.assertEqual((await self.tokens.tanks(self.bob.id)).total, 4)

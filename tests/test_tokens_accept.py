"""Filtering tokens charged in the group commit that stores the message (the spool's
`Charger`), recorded by storing the recipients paid for `charged` (no keyed row): exactly
once across the filtering, its retries, a restart after the commit, a failed commit and two
nodes on one PostgreSQL; an empty tank still defers the message."""

from __future__ import annotations

import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, func, insert, select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from filters import build_chain
from mailcore.billing.plans import Plans
from mailcore.billing.tokens import OK, Charge, ChargeBatcher, TokenService, TokenSettings
from mailcore.gateway.filtering import FilteringStage
from mailcore.identity import User
from mailcore.queue.model import Job, thd_claim_due
from mailcore.queue.pipeline import LATER, Action, PipelineMessage, PipelineRecipient
from mailcore.queue.runner import QueueRunner
from mailcore.queue.spool import SpoolError
from mailcore.store import Database
from mailcore.store.schema import (
    domains,
    queue_messages,
    queue_recipients,
    token_charges,
    token_tanks,
    token_usage,
)
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin, synchronous_database
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue
from tests.support.quarantine import DownChain, Gateway, message, stopper
from tests.test_queue_spool import GatedDatabase
from tests.test_tokens import PLANS, clock_at, new_user
from tests.test_tokens_batching import Lookup

BODY = b"From: x@y.test\r\nSubject: hi\r\n\r\nclean\r\n"


def thd_domain(conn: Connection, name: str, owner_id: int) -> int:
    return int(conn.execute(insert(domains).values(
        owner_id=owner_id, name=name, redirect_host="10.0.0.1", redirect_port=25,
        created_at=datetime.datetime.now(datetime.UTC),
    ).returning(domains.c.id)).scalar_one())


def thd_charges(conn: Connection) -> list[tuple[int, str, int]]:
    c = token_charges.c
    return [(r.user_id, r.charge_key, r.tokens) for r in conn.execute(
        select(c.user_id, c.charge_key, c.tokens).order_by(c.user_id, c.charge_key))]


def thd_flags(conn: Connection) -> list[tuple[str, str, bool]]:
    """Every stored recipient: (queue id, address, charged)."""
    r = queue_recipients.c
    return [(row.message_id, row.address, bool(row.charged)) for row in conn.execute(
        select(r.message_id, r.address, r.charged).order_by(r.message_id, r.address))]


def thd_stored(conn: Connection, qid: str) -> PipelineMessage:
    """Message `qid` as a node that remembers nothing of it filters it: its recipients as
    stored (with their `charged` mark)."""
    r = queue_recipients.c
    rows = conn.execute(select(r.address, r.domain_id, r.charged)
                        .where(r.message_id == qid).order_by(r.id)).all()
    return PipelineMessage(qid, "relay", "x@y.test", tuple(
        PipelineRecipient(row.address, row.domain_id, bool(row.charged)) for row in rows), BODY)


def stage_for(tokens: TokenService, lookup: Lookup, lane: Any = None) -> FilteringStage:
    """The filtering stage with the built-in chain, charging through a batcher on `lane`."""
    chain = build_chain({}, reactor=tokens.clock, runner=CpuPool.for_tests())
    return FilteringStage(chain, lookup, ChargeBatcher(tokens, lane=lane))


def batcher_of(stage: FilteringStage) -> ChargeBatcher:
    assert isinstance(stage.tokens, ChargeBatcher)
    return stage.tokens


class Runner:
    """The spool's consumer: takes every message (as a runner with room does)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.jobs: dict[str, Job] = {}

    def reserve(self, recipients: int) -> bool:
        return True

    def unreserve(self, recipients: int) -> None:
        pass

    def submit(self, jobs: Any, bodies: dict[str, bytes]) -> None:
        self.submitted.extend(bodies)
        self.jobs.update((job.message_id, job) for job in jobs)

    def message(self, qid: str) -> PipelineMessage:
        """What this node's runner filters for `qid`: the job it was handed."""
        return QueueRunner._message(self.jobs[qid], BODY)

    def enqueue_new(self, jobs: Any) -> None:
        pass


class AcceptChargeTests(TestCase):
    """On the spool of a queue whose group commits are held until released."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock: Clock = clock_at("2024-11-14T10:00:00")
        self.db = GatedDatabase()
        inner = self.db.inner
        self.tokens = TokenService(inner, self.clock, PLANS)
        self.alice = await new_user(inner, self.clock, "alice")
        self.bob = await new_user(inner, self.clock, "bob")
        self.assertEqual(await self.tokens.consume(self.bob.id, 1000), OK)  # bob: empty
        self.a = await inner.run("d", thd_domain, "a.test", self.alice.id)
        self.b = await inner.run("d", thd_domain, "b.test", self.bob.id)
        self.lookup = Lookup(
            SimpleNamespace(id=self.a, owner_id=self.alice.id, name="a.test", spam_action=1,
                            virus_action=1),
            SimpleNamespace(id=self.b, owner_id=self.bob.id, name="b.test", spam_action=1,
                            virus_action=1),
        )
        self.q = make_queue(self.db, self.clock, ScriptedConnector())  # type: ignore[arg-type]
        self.spool = self.q.spool
        self.runner = Runner()
        self.spool.consumer = self.runner
        self.stage = stage_for(self.tokens, self.lookup, self.spool.charge)
        self.spool.charger = self.stage
        self.batcher = batcher_of(self.stage)

    def rcpts(self, *addresses: str) -> tuple[tuple[str, int], ...]:
        return tuple((a, self.a if a.endswith("@a.test") else self.b) for a in addresses)

    def accept(self, qid: str, *addresses: str, kind: str = "relay") -> defer.Deferred[None]:
        env = envelope("x@y.test", *self.rcpts(*addresses), kind=kind)
        return defer.Deferred.fromCoroutine(self.spool.accept(qid, env, BODY))

    def process(self, qid: str, *addresses: str,
                stage: FilteringStage | None = None) -> defer.Deferred[Any]:
        """Filter `qid` with none of its recipients marked `charged` (a message stored
        before the mark, or never stored)."""
        msg = PipelineMessage(qid, "relay", "x@y.test", tuple(
            PipelineRecipient(a, d) for a, d in self.rcpts(*addresses)), BODY)
        return self.filter(msg, stage)

    def filter(self, msg: PipelineMessage,
               stage: FilteringStage | None = None) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine((stage or self.stage).process(msg))

    def stored(self, qid: str) -> PipelineMessage:
        return done(self.db.inner.read("stored", thd_stored, qid))

    def flags(self) -> list[tuple[str, str, bool]]:
        return done(self.db.inner.read("flags", thd_flags))

    async def total(self, user: User) -> int:
        return (await self.tokens.tanks(user.id)).total

    def charges(self) -> list[tuple[int, str, int]]:
        return done(self.db.inner.read("charges", thd_charges))

    async def test_a_message_is_charged_in_the_commit_that_stores_it(self) -> None:
        accepted = self.accept("Q1", "p@a.test", "q@a.test")
        self.assertEqual(await self.total(self.alice), 1000)  # not before the commit
        self.db.release()
        self.successResultOf(accepted)
        self.assertEqual(await self.total(self.alice), 998)
        # Recorded on its recipients, not as a keyed row.
        self.assertEqual(self.charges(), [])
        self.assertEqual(self.flags(), [("Q1", "p@a.test", True), ("Q1", "q@a.test", True)])
        self.assertEqual(self.db.transactions, [])  # no transaction of its own
        self.assertEqual(self.spool.commits, 1)
        # Its filtering (and again after a deferral) asks nothing of the store, and takes
        # nothing more.
        for _ in range(2):
            self.assertIsNone(self.successResultOf(self.filter(self.runner.message("Q1"))))
        self.assertEqual(self.batcher.transactions, 0)
        self.assertEqual(self.db.gates, [])
        self.assertEqual(await self.total(self.alice), 998)

    async def test_a_paid_message_is_filtered_at_once_and_an_unpaid_one_waits(self) -> None:
        accepted = self.accept("Q1", "p@a.test", "q@a.test")
        self.db.release()
        self.successResultOf(accepted)
        msg = self.runner.message("Q1")
        self.assertIsNone(self.stage.process_now(msg))  # clean, paid at the accept
        self.assertIsNone(self.stage.process_now(msg))  # and filtered again: still paid
        self.assertEqual((self.batcher.transactions, self.db.gates), (0, []))
        self.assertEqual(await self.total(self.alice), 998)
        # An empty tank at the accept: the message waits for its charge to be asked for.
        accepted = self.accept("Q2", "r@b.test")
        self.db.release()
        self.successResultOf(accepted)
        self.assertEqual(self.flags()[-1], ("Q2", "r@b.test", False))
        self.assertIs(self.stage.process_now(self.runner.message("Q2")), LATER)
        self.assertEqual(self.db.gates, [])  # nothing was asked for yet

    async def test_a_restart_after_the_commit_does_not_charge_again(self) -> None:
        accepted = self.accept("Q1", "p@a.test", "r@b.test")
        self.db.release()
        self.successResultOf(accepted)
        # A new run (or another node): nothing in memory. Once the lease lapsed it claims
        # the recipients, with their marks: alice's was paid at the accept, bob's was not.
        now = self.clock.seconds() + 3600
        [job] = await self.db.inner.run("claim", thd_claim_due, "node-b", now, now + 60, 10)
        self.assertEqual([r.charged for r in job.recipients], [True, False])
        await self.tokens.credit(self.bob.id, 1)
        later = stage_for(self.tokens, self.lookup)
        self.assertIsNone(await later.process(QueueRunner._message(job, BODY)))
        self.assertEqual(batcher_of(later).transactions, 1)  # bob's charge only
        self.assertEqual(await self.total(self.alice), 999)
        self.assertEqual(await self.total(self.bob), 0)
        self.assertEqual(self.charges(), [(self.bob.id, f"Q1:{self.b}", 1)])

    async def test_a_charge_given_up_before_a_group_takes_it_is_never_applied(self) -> None:
        """A filtering that gives up waiting for its charge (cancelled) takes the charge
        back while no group has it: its message stays queued and is charged, once, by its
        key, when it is filtered again. One a group took is applied with it, unheard."""
        first = self.accept("Q0", "p@a.test")
        asked = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 5, key="K"))
        asked.cancel()
        self.failureResultOf(asked, defer.CancelledError)
        self.db.release()  # Q0's group
        self.successResultOf(first)
        self.db.release()  # (the group that would have taken the charge)
        self.assertEqual(self.db.accept_batches, [1])
        self.assertEqual(self.charges(), [])
        self.assertEqual(await self.total(self.alice), 999)
        taken = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 5, key="K"))
        self.assertEqual(self.db.accept_batches, [1, 0])  # a group took it
        taken.cancel()
        self.failureResultOf(taken, defer.CancelledError)
        self.db.release()
        self.assertEqual([k for _u, k, _t in self.charges()], ["K"])
        self.assertEqual(await self.total(self.alice), 994)
        again = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 5, key="K"))
        self.db.release()
        self.assertEqual(self.successResultOf(again), OK)
        self.assertEqual(await self.total(self.alice), 994)  # by its key: nothing more
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_a_failed_commit_charges_nothing(self) -> None:
        first = self.accept("Q0", "p@a.test")
        asked = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 5, key="K"))
        second = self.accept("Q1", "q@a.test")
        self.db.release()  # Q0's group, in flight before the others came
        self.successResultOf(first)
        self.db.fail_next = True
        self.db.release()
        self.failureResultOf(second, SpoolError)
        self.failureResultOf(asked, SpoolError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(await self.total(self.alice), 999)  # Q0's token only
        # Q1 was never stored (the client got a 451); were it filtered, it would be charged.
        d = self.process("Q1", "q@a.test")
        self.db.release()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(await self.total(self.alice), 998)

    async def test_charges_asked_for_share_the_next_group_commit(self) -> None:
        first = self.accept("Q0", "p@a.test")
        asked = defer.Deferred.fromCoroutine(self.batcher.consume(self.alice.id, 5, key="K"))
        second = self.accept("Q1", "q@a.test", "r@b.test")
        self.assertEqual(self.db.accept_batches, [1])
        self.db.release()
        self.successResultOf(first)
        self.db.release()  # Q1 and the asked-for charge: one group, one transaction
        self.successResultOf(second)
        self.assertEqual(self.successResultOf(asked), OK)
        self.assertEqual(self.db.accept_batches, [1, 1])
        self.assertEqual(self.db.transactions, [])
        self.assertEqual(await self.total(self.alice), 1000 - 1 - 5 - 1)
        # Bob's tank was empty at the accept: nothing taken, nothing recorded as paid.
        self.assertEqual([k for _u, k, _t in self.charges()], ["K"])
        self.assertEqual(self.flags(), [("Q0", "p@a.test", True), ("Q1", "q@a.test", True),
                                        ("Q1", "r@b.test", False)])

    async def test_an_empty_tank_still_defers_the_message_until_tokens_come(self) -> None:
        accepted = self.accept("Q1", "p@a.test", "r@b.test")
        self.db.release()
        self.successResultOf(accepted)
        d = self.filter(self.runner.message("Q1"))
        self.db.release()  # bob's charge, asked for: still empty
        decision = self.successResultOf(d)
        self.assertEqual(decision.action, Action.DEFER)
        self.assertIn("4.7.1", decision.reason)
        self.assertIn("b.test", decision.reason)
        await self.tokens.credit(self.bob.id, 3)
        retry = self.filter(self.stored("Q1"))  # as claimed again, from the store
        self.db.release()
        self.assertIsNone(self.successResultOf(retry))
        self.assertEqual(await self.total(self.alice), 999)  # once, at the accept
        self.assertEqual(await self.total(self.bob), 2)  # once, at the retry

    async def test_with_when_empty_allow_the_accept_takes_what_is_left(self) -> None:
        tokens = TokenService(self.db.inner, self.clock, PLANS, TokenSettings(when_empty="allow"))
        self.spool.charger = self.stage = stage_for(tokens, self.lookup, self.spool.charge)
        await self.tokens.credit(self.bob.id, 1)
        accepted = self.accept("Q1", "r@b.test", "s@b.test")
        self.db.release()
        self.successResultOf(accepted)
        self.assertIsNone(self.successResultOf(self.filter(self.stored("Q1"))))
        self.assertEqual(await self.total(self.bob), 0)
        self.assertEqual(self.charges(), [])
        self.assertEqual(self.flags(), [("Q1", "r@b.test", True), ("Q1", "s@b.test", True)])

    async def test_only_relayed_mail_of_domains_in_the_snapshot_is_charged(self) -> None:
        c = await self.db.inner.run("d", thd_domain, "c.test", self.alice.id)
        released = self.accept("Q1", "p@a.test", kind="release")
        not_yet = defer.Deferred.fromCoroutine(self.spool.accept(
            "Q2", envelope("x@y.test", ("p@a.test", self.a), ("z@c.test", c)), BODY))
        self.db.release()
        self.db.release()
        self.successResultOf(released)
        self.successResultOf(not_yet)
        self.assertEqual(self.charges(), [])
        self.assertEqual({charged for _q, _a, charged in self.flags()}, {False})
        self.assertEqual(await self.total(self.alice), 1000)
        # Its filtering defers it until the snapshot has c.test (as before).
        msg = PipelineMessage("Q2", "relay", "x@y.test", (
            PipelineRecipient("p@a.test", self.a), PipelineRecipient("z@c.test", c)), BODY)
        decision = await self.stage.process(msg)
        assert decision is not None
        self.assertEqual(decision.action, Action.DEFER)


class FailingChargeTests(TestCase):
    """On a real (synchronous) store: a charge that raises fails its whole group."""

    async def test_a_charge_that_raises_fails_its_group(self) -> None:
        """No message is stored without its charge: the client gets a 451 and sends again."""
        clock = clock_at("2024-11-14T10:00:00")
        db = synchronous_database()
        tokens = TokenService(db, clock, PLANS)
        alice = await new_user(db, clock, "alice")
        a = await db.run("d", thd_domain, "a.test", alice.id)
        q = make_queue(db, clock, ScriptedConnector())
        q.spool.consumer = Runner()
        stage = stage_for(tokens, Lookup(SimpleNamespace(
            id=a, owner_id=alice.id, name="a.test", spam_action=1, virus_action=1)),
            q.spool.charge)
        q.spool.charger = stage
        await tokens.consume(alice.id, 1)
        real = stage.thd_charge

        def refused(conn: Connection, charges: list[Charge], now: float) -> list[Any]:
            real(conn, charges, now)  # taken in the transaction, then the charger fails
            raise RuntimeError("the charger failed")

        stage.thd_charge = refused  # type: ignore[method-assign]
        with self.assertRaises(SpoolError):
            await q.spool.accept("Q1", envelope("x@y.test", ("p@a.test", a)), BODY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        n = await db.read("n", lambda c: c.execute(
            select(func.count()).select_from(queue_messages)).scalar_one())
        self.assertEqual(n, 0)
        self.assertEqual((await tokens.tanks(alice.id)).total, 999)  # the consume only
        # Sent again (a new queue id): stored and charged.
        del stage.thd_charge
        await q.spool.accept("Q2", envelope("x@y.test", ("p@a.test", a)), BODY)
        self.assertEqual((await tokens.tanks(alice.id)).total, 998)
        self.assertEqual(await db.read("flags", thd_flags), [("Q2", "p@a.test", True)])
        self.assertEqual(batcher_of(stage).transactions, 0)


class GatewayAcceptChargeTests(TestCase):
    """The daemon's wiring: SMTP-accepted mail is charged once through its delivery."""

    def setUp(self) -> None:
        self.gw = Gateway()
        self.addCleanup(stopper(self.gw))

    async def test_a_filter_outage_and_its_retry_charge_once(self) -> None:
        user = await self.gw.owner()
        before = (await self.gw.core.tokens.tanks(user.id)).total
        await self.gw.domain(user, "q.test", spam_action=1)
        stage: Any = self.gw.core.queue.runner.pipeline.stages[0]
        real, stage.chain = stage.chain, DownChain()
        await self.gw.send(message("hi", b"x"), "bob@q.test", "amy@q.test")
        self.assertEqual(self.gw.states(), {"bob@q.test": "deferred", "amy@q.test": "deferred"})
        stage.chain = real
        self.gw.clock.advance(3600)
        self.assertEqual(len(self.gw.delivered()), 1)
        tanks = await self.gw.core.tokens.tanks(user.id)
        self.assertEqual(tanks.total, before - 2)
        # Paid at the accept: neither filtering asked the store for a charge.
        self.assertEqual(stage.tokens.transactions, 0)


class TwoNodesMixin(DatabaseMixin):
    """Two nodes, each a spool charging at accept, on one store at once."""

    timeout = 120

    async def test_two_nodes_charge_each_message_once_and_never_overdraw(self) -> None:
        from tests.support.reactor import get_reactor

        first = await self.open_database()
        second = await self.open_database_at(first.url)
        clock = clock_at("2024-11-14T10:00:00")
        plans = Plans({"free": 40})
        alice = await new_user(first, clock, "alice")
        bob = await new_user(first, clock, "bob")
        a = await first.run("d", thd_domain, "a.test", alice.id)
        b = await first.run("d", thd_domain, "b.test", bob.id)
        lookup = Lookup(
            SimpleNamespace(id=a, owner_id=alice.id, name="a.test", spam_action=1,
                            virus_action=1),
            SimpleNamespace(id=b, owner_id=bob.id, name="b.test", spam_action=1,
                            virus_action=1),
        )
        spools = []
        for n, db in enumerate((first, second)):
            q = make_queue(db, get_reactor(), ScriptedConnector(), node_id=f"node-{n}")
            stage = stage_for(TokenService(db, clock, plans), lookup, q.spool.charge)
            q.spool.charger = stage
            spools.append((q.spool, stage))
            self.addCleanup(q.spool.drain)
        calls = []
        asked = []
        for i in range(120):
            spool, stage = spools[i % 2]
            # Both owners in most messages, in both orders; charges asked for meanwhile
            # (another key each) share the groups: row locks are taken in one order.
            rcpts = [("p@a.test", a), ("r@b.test", b)] if i % 3 else [("r@b.test", b)]
            if i % 4 == 0:
                rcpts.reverse()
            calls.append(defer.Deferred.fromCoroutine(spool.accept(
                f"Q{i}", envelope("x@y.test", *rcpts), BODY)))
            if i % 5 == 0:
                asked.append(defer.Deferred.fromCoroutine(batcher_of(stage).consume(
                    (alice if i % 2 else bob).id, 1, key=f"K{i}")))
        await defer.gatherResults(calls)  # every message stored: no deadlock, no failure
        await defer.gatherResults(asked)
        tokens = TokenService(first, clock, plans)
        self.assertEqual((await tokens.tanks(alice.id)).total, 0)
        self.assertEqual((await tokens.tanks(bob.id)).total, 0)
        # What the tanks lost is what is recorded: the keyed charges asked for, and a token
        # per recipient stored `charged`.
        charged = await first.read("charges", thd_charges)
        flags = await first.read("flags", thd_flags)
        paid = {"a.test": alice.id, "b.test": bob.id}
        for user in (alice, bob):
            keyed = sum(t for u, _k, t in charged if u == user.id)
            marked = sum(1 for _q, address, mark in flags
                         if mark and paid[address.partition("@")[2]] == user.id)
            self.assertEqual(keyed + marked, 40)
        # Filtering every message afterwards (each node's own, then all again on a node
        # that remembers nothing, from the store) takes nothing more: exactly once.
        for rounds in range(2):
            for i in range(120):
                spool, stage = spools[i % 2]
                if rounds:
                    stage = stage_for(TokenService(first, clock, plans), lookup)
                await stage.process(await first.read("stored", thd_stored, f"Q{i}"))
        self.assertEqual(await first.read("charges", thd_charges), charged)
        self.assertEqual((await tokens.tanks(alice.id)).total, 0)
        self.assertEqual((await tokens.tanks(bob.id)).total, 0)


class SQLiteTwoNodesTests(TwoNodesMixin, TestCase):
    backend = "sqlite"


class PostgresTwoNodesTests(TwoNodesMixin, TestCase):
    backend = "postgresql"


class KillNineChargeTests(TestCase):
    """A real daemon killed with SIGKILL while mail streams in, then restarted: every
    message it stored is charged exactly once (the acknowledged ones among them), and the
    tank lost exactly what the charges record."""

    timeout = 240

    async def test_every_stored_message_is_charged_once_across_kill_9(self) -> None:
        from tests.support.mailsink import SendLog, send_numbered
        from tests.support.reactor import get_reactor
        from tests.support.servers import sleep
        from tests.test_gateway_crash import dumped, kill_from_outside, sink_and_daemon

        dump, daemon, _domain_id = await sink_and_daemon(self)

        messages = 600  # under the free plan's 1,000 tokens: every charge takes its token
        sent = SendLog()
        sending = defer.Deferred.fromCoroutine(
            send_numbered(lambda: [daemon.smtp_port], list(range(messages)), sent,
                          concurrency=10, size=400))
        while len(sent.accepted) + len(sent.failed) < messages // 2:
            await sleep(0.01)
        await kill_from_outside(daemon, 0.005)
        await daemon.stop()  # reap it
        await daemon.start()
        await sending
        reactor = get_reactor()
        deadline = reactor.seconds() + 60
        while not sent.accepted <= {seq for seq, _ in dumped(dump)}:
            self.assertLess(reactor.seconds(), deadline, "accepted mail never arrived")
            await sleep(0.5)
        await daemon.stop()

        def txn(conn: Connection) -> tuple[list[str], list[tuple[int, str, int]],
                                           list[tuple[str, str, bool]], int, int]:
            stored = [r.id for r in conn.execute(
                select(queue_messages.c.id).where(queue_messages.c.kind == "relay"))]
            tank = conn.execute(select(token_tanks.c.monthly + token_tanks.c.perm)).scalar_one()
            used = conn.execute(select(func.sum(token_usage.c.used))).scalar_one()
            return stored, thd_charges(conn), thd_flags(conn), int(tank), int(used)

        db = Database(daemon.db_url, None, synchronous=True)  # type: ignore[arg-type]
        self.addCleanup(db.engine.dispose)
        stored, charges, flags, tank, used = done(db.read("charges", txn))
        self.assertGreater(len(sent.accepted), messages // 2)
        # One charge per stored message (each has one recipient), none for anything else:
        # made at the accept, so recorded by its recipient's mark, with no keyed row.
        self.assertEqual(charges, [])
        relayed = [(qid, mark) for qid, _address, mark in flags if qid in set(stored)]
        self.assertEqual(sorted(relayed), sorted((qid, True) for qid in stored))
        # Every delivered message was stored, so charged; the tank lost exactly that much.
        delivered = {qid.decode() for _seq, qid in dumped(dump)}
        self.assertLessEqual(delivered, set(stored))
        self.assertEqual((tank, used), (1000 - len(stored), len(stored)))

"""Leases: claims skip work another node holds, lapsed leases are taken over, renewal keeps a
live node's work, a node does not send work whose lease ended, a restarted node takes its
own work back, and concurrent claimers on one PostgreSQL never get the same recipient."""

from __future__ import annotations

from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.queue.model import (
    NewMessage,
    thd_claim_due,
    thd_insert_messages,
    thd_release_leases,
    thd_renew_leases,
)
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store import Database
from mailcore.store.schema import queue_recipients
from tests.support.db import open_database, open_database_at, synchronous_database
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain


def insert(db: Database, n: int, *, leased_to: str | None = None, now: float = 100.0) -> None:
    msgs = [
        NewMessage(f"Q{i:05d}", Envelope("a@x.test", (Recipient(f"r{i}@c.test", 1),)), b"x",
                   leased_to is not None)
        for i in range(n)
    ]
    done(db.run("ins", thd_insert_messages, msgs, leased_to or "", now, now + 60))


class ClaimTests(TestCase):
    def setUp(self) -> None:
        self.db = synchronous_database()
        done(self.db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25))

    def claim(self, node: str, now: float, limit: int = 100) -> list[str]:
        jobs = done(self.db.run("c", thd_claim_due, node, now, now + 60, limit))
        return [r.address for j in jobs for r in j.recipients]

    def test_unleased_due_work_is_claimed_once(self) -> None:
        insert(self.db, 3)
        self.assertEqual(len(self.claim("a", 100)), 3)
        self.assertEqual(self.claim("b", 101), [])

    def test_work_leased_by_a_live_node_is_skipped_until_the_lease_lapses(self) -> None:
        insert(self.db, 2, leased_to="a", now=100)  # lease until 160
        self.assertEqual(self.claim("b", 159), [])
        self.assertEqual(len(self.claim("b", 161)), 2)

    def test_renewal_extends_only_the_owners_leases(self) -> None:
        insert(self.db, 2, leased_to="a", now=100)
        done(self.db.run("r", thd_renew_leases, "a", 500.0))
        self.assertEqual(self.claim("b", 400), [])
        self.assertEqual(done(self.db.run("r", thd_renew_leases, "b", 900.0)), 0)

    def test_release_makes_work_claimable_at_once(self) -> None:
        insert(self.db, 2, leased_to="a", now=100)
        done(self.db.run("r", thd_release_leases, "a", None))
        self.assertEqual(len(self.claim("b", 100)), 2)

    def test_claims_respect_the_limit_and_due_time(self) -> None:
        insert(self.db, 5, now=100)
        self.assertEqual(self.claim("a", 99), [])
        self.assertEqual(len(self.claim("a", 100, limit=2)), 2)


class TakeoverTests(TestCase):
    """Two nodes on one store, one Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.db = synchronous_database()
        self.domain = done(self.db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25))
        self.conn_a = ScriptedConnector()
        self.conn_b = ScriptedConnector()
        self.a = make_queue(self.db, self.clock, self.conn_a, node_id="a", lease_seconds=60.0,
                            poll_interval=5.0)
        self.b = make_queue(self.db, self.clock, self.conn_b, node_id="b", lease_seconds=60.0,
                            poll_interval=5.0)

    def tearDown(self) -> None:
        for q in (self.a, self.b):
            if q.service.running:
                d = q.service.stopService()
                self.clock.advance(30)
                self.successResultOf(d)

    def accept_on_a(self, n: int) -> None:
        for i in range(n):
            env = envelope("s@x.test", (f"r{i}@c.test", self.domain))
            self.successResultOf(
                defer.Deferred.fromCoroutine(self.a.spool.accept(f"Q{i}", env, b"body\r\n"))
            )

    def test_a_dead_nodes_leases_are_taken_over_after_they_lapse(self) -> None:
        self.a.service.startService()
        self.conn_a.hold = defer.Deferred()  # node a will never finish: it "dies"
        self.accept_on_a(3)
        self.a.service.running = False  # died: no stop, no renewal from here on
        for loop in (self.a.service._sweep_loop, self.a.service._renew_loop):
            loop.stop()
        self.b.service.startService()
        self.clock.advance(55)
        self.assertEqual(self.conn_b.addresses(), [])
        self.clock.advance(10)
        self.assertEqual(sorted(self.conn_b.addresses()), ["r0@c.test", "r1@c.test", "r2@c.test"])

    def test_a_live_node_keeps_its_work_by_renewing(self) -> None:
        self.a.service.startService()
        self.b.service.startService()
        self.conn_a.hold = defer.Deferred()  # a slow delivery on node a
        self.accept_on_a(2)
        for _ in range(30):
            self.clock.advance(10)
        self.assertEqual(self.conn_b.addresses(), [])
        hold, self.conn_a.hold = self.conn_a.hold, None
        hold.callback(None)
        self.assertEqual(sorted(self.conn_a.addresses()), ["r0@c.test", "r1@c.test"])

    def one_connection_each(self) -> None:
        """Nodes with one connection per hop: a's second message waits for its first."""
        self.a = make_queue(self.db, self.clock, self.conn_a, node_id="a", lease_seconds=60.0,
                            poll_interval=5.0, hop_concurrency=1)
        self.b = make_queue(self.db, self.clock, self.conn_b, node_id="b", lease_seconds=60.0,
                            poll_interval=5.0, hop_concurrency=1)

    def pause_a_while_b_takes_over(self) -> None:
        """a is sending Q0 (Q1 waits) when its process stops (no timer of its runs); b
        takes both over once the leases lapse."""
        self.one_connection_each()
        self.a.service.startService()
        self.conn_a.hold = defer.Deferred()
        self.accept_on_a(2)
        for loop in (self.a.service._sweep_loop, self.a.service._renew_loop):
            loop.stop()
        self.b.service.startService()
        self.clock.advance(65)
        self.assertEqual(sorted(self.conn_b.addresses()), ["r0@c.test", "r1@c.test"])

    def resume_a(self) -> None:
        hold, self.conn_a.hold = self.conn_a.hold, None
        assert hold is not None
        hold.callback(None)
        self.clock.advance(1)

    def test_a_node_resumed_after_its_lease_lapsed_does_not_send_what_was_taken_over(
        self,
    ) -> None:
        """The transaction a had started ends (r0 twice: that cannot be helped), but a does
        not start Q1, whose lease ended while a was stopped: it gives it back. a sent both
        before."""
        self.pause_a_while_b_takes_over()
        self.resume_a()
        self.assertEqual(self.conn_a.addresses(), ["r0@c.test"])

    def test_a_renewal_that_commits_after_the_lease_lapsed_does_not_revive_it(self) -> None:
        """a's renewal runs first when it resumes: it cannot vouch for the leases that ended
        before it (b's rows now), so Q1 is still not sent."""
        self.pause_a_while_b_takes_over()
        self.successResultOf(defer.Deferred.fromCoroutine(self.a.service._renew()))
        self.resume_a()
        self.assertEqual(self.conn_a.addresses(), ["r0@c.test"])

    def test_a_live_node_sends_work_held_longer_than_a_lease(self) -> None:
        """Renewals that commit in time carry a job's lease: Q1, waiting 300 s behind Q0
        (five leases long), is sent by a, and b takes nothing."""
        self.one_connection_each()
        self.a.service.startService()
        self.b.service.startService()
        self.conn_a.hold = defer.Deferred()
        self.accept_on_a(2)
        for _ in range(30):
            self.clock.advance(10)
        self.resume_a()
        self.assertEqual(self.conn_a.addresses(), ["r0@c.test", "r1@c.test"])
        self.assertEqual(self.conn_b.addresses(), [])

    def test_a_restarted_node_takes_back_its_own_work_at_once(self) -> None:
        self.a.service.startService()
        self.conn_a.hold = defer.Deferred()
        self.accept_on_a(2)
        for loop in (self.a.service._sweep_loop, self.a.service._renew_loop):
            loop.stop()
        self.a.service.running = False
        # A new process with the same node id (same data directory) starts.
        conn = ScriptedConnector()
        again = make_queue(self.db, self.clock, conn, node_id="a", lease_seconds=60.0)
        again.service.startService()
        self.assertEqual(sorted(conn.addresses()), ["r0@c.test", "r1@c.test"])
        d = again.service.stopService()
        self.successResultOf(d)


class PostgresSkipLockedTests(TestCase):
    """Concurrent claimers on a real PostgreSQL: SKIP LOCKED keeps their claims disjoint."""

    timeout = 60

    async def test_concurrent_claims_never_overlap(self) -> None:
        first = await open_database(self, "postgresql")
        await first.run("d", thd_add_domain, "c.test", "10.0.0.1", 25)
        msgs = [
            NewMessage(f"Q{i:05d}", Envelope("a@x.test", (Recipient(f"r{i}@c.test", 1),)),
                       b"x", False)
            for i in range(600)
        ]
        await first.run("ins", thd_insert_messages, msgs, "", 100.0, 160.0)
        second = await open_database_at(self, first.url)
        claims = []
        for i in range(24):
            db = first if i % 2 else second
            claims.append(db.run("claim", thd_claim_due, f"node{i % 2}", 200.0, 260.0, 40))
        results = await defer.gatherResults(claims)
        ids = [r.id for jobs in results for j in jobs for r in j.recipients]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(len(ids), 600)
        owners = await first.read(
            "o", lambda c: {r[0] for r in c.execute(select(queue_recipients.c.lease_owner))}
        )
        self.assertEqual(owners, {"node0", "node1"})

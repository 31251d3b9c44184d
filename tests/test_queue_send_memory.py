"""`[queue] max_send_memory`: the octets of message bodies that outbound delivery attempts
hold together are bounded. An attempt that would pass the bound waits for another to end
(no attempt counted, no backoff), in the order the attempts asked, with no connection (its
room is taken before it connects); one attempt always goes, whatever its size; room comes
back however an attempt ends (delivered, refused, cut, timed out); a stop ends the waits
with the work given back, and the leases of the waiting work stay this node's while it
waits."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.queue.connector import TCPConnector
from mailcore.queue.runner import SendMemory
from mailcore.queue.settings import QueueSettings
from mailcore.store.schema import queue_recipients
from tests.support.db import synchronous_database
from tests.support.logs import logged
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain
from tests.support.queuetest import QueueTestCase
from tests.test_queue_runner_peer import ANSWERS, ScriptedHop, ScriptedHopConnector

# A 1,000-octet message: the limits below are counted in these.
BIG = b"From: a@x.test\r\nSubject: big\r\n\r\n" + b"x" * 966 + b"\r\n"
assert len(BIG) == 1000


class SendMemoryTests(TestCase):
    """The budget on its own."""

    def test_waits_are_served_in_the_order_they_were_asked(self) -> None:
        budget = SendMemory(1000, Clock())
        self.assertTrue(self.successResultOf(budget.take(600)))
        big = budget.take(700)
        small = budget.take(100)  # would fit, but does not pass the large one that waits
        self.assertNoResult(big)
        self.assertNoResult(small)
        budget.give(600)
        self.assertTrue(self.successResultOf(big))
        self.assertTrue(self.successResultOf(small))
        self.assertEqual((budget.used, budget.attempts, budget.waiting), (800, 2, 0))

    def test_one_attempt_always_goes_whatever_its_size(self) -> None:
        budget = SendMemory(1000, Clock())
        self.assertTrue(self.successResultOf(budget.take(5000)))
        second = budget.take(1)
        self.assertNoResult(second)
        budget.give(5000)
        self.assertTrue(self.successResultOf(second))

    def test_close_ends_the_waits_and_refuses_later_takes(self) -> None:
        budget = SendMemory(1000, Clock())
        self.successResultOf(budget.take(1000))
        waiting = budget.take(1)
        budget.close()
        self.assertFalse(self.successResultOf(waiting))
        self.assertFalse(self.successResultOf(budget.take(1)))
        budget.give(1000)
        self.assertEqual((budget.used, budget.attempts), (0, 0))

    def test_a_cancelled_wait_leaves_the_queue(self) -> None:
        budget = SendMemory(1000, Clock())
        self.successResultOf(budget.take(1000))
        gone = budget.take(500)
        after = budget.take(500)
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        budget.give(1000)
        self.assertTrue(self.successResultOf(after))
        self.assertEqual((budget.used, budget.attempts), (500, 1))


def runner_lines(test: TestCase) -> list[str]:
    """What the runner logs (the budget's spells of waiting among it), from now on."""
    return logged(test, lambda event: event.get("log_namespace") == "mailcore.queue.runner")


class WaitLogTests(TestCase):
    """One line when attempts begin to wait, one when they have stopped."""

    def test_a_spell_of_waiting_is_two_lines(self) -> None:
        clock = Clock()
        lines = runner_lines(self)
        budget = SendMemory(1000, clock)
        self.assertTrue(self.successResultOf(budget.take(1000)))
        self.assertEqual(lines, [])
        first, second = budget.take(500), budget.take(500)
        self.assertEqual(lines, [
            "outbound deliveries wait for send memory: 1000 octets held by 1 attempt, a "
            "message of 500 more would pass [queue] max_send_memory (1000)"])
        clock.advance(10)
        budget.give(1000)
        self.assertTrue(self.successResultOf(first))
        self.assertTrue(self.successResultOf(second))
        # None waits now, but one soon does again: the same spell, no line.
        clock.advance(20)
        third = budget.take(500)
        clock.advance(10)
        budget.give(500)
        self.assertTrue(self.successResultOf(third))
        self.assertEqual(len(lines), 1)
        clock.advance(SendMemory.WAIT_QUIET - 1)
        self.assertEqual(len(lines), 1)
        clock.advance(1)
        self.assertEqual(lines[1:], [
            "outbound deliveries no longer wait for send memory: 3 attempts waited, over "
            "40 s"])
        self.assertEqual(clock.getDelayedCalls(), [])
        # The next wait is a spell of its own.
        budget.take(1000)
        self.assertEqual(len(lines), 3)
        self.assertIn("1000 octets held by 2 attempts", lines[2])

    def test_a_cancelled_wait_ends_a_spell_too(self) -> None:
        clock = Clock()
        lines = runner_lines(self)
        budget = SendMemory(1000, clock)
        budget.take(1000)
        waiting = budget.take(1)
        clock.advance(5)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        clock.advance(SendMemory.WAIT_QUIET)
        self.assertEqual(lines[1:], [
            "outbound deliveries no longer wait for send memory: 1 attempt waited, over "
            "5 s"])

    def test_a_stop_ends_the_spell_at_once(self) -> None:
        clock = Clock()
        lines = runner_lines(self)
        budget = SendMemory(1000, clock)
        budget.take(1000)
        budget.take(1)
        clock.advance(7)
        budget.close()
        self.assertEqual(lines[1:], [
            "outbound deliveries no longer wait for send memory: 1 attempt waited, over "
            "7 s"])
        self.assertEqual(clock.getDelayedCalls(), [])


class SettingTests(TestCase):
    def test_the_key_is_read_and_must_be_positive(self) -> None:
        self.assertEqual(QueueSettings().max_send_memory, 1024 ** 3)
        read = QueueSettings.from_config(Config(sections={"queue": {"max_send_memory": 5}}))
        self.assertEqual(read.max_send_memory, 5)
        with self.assertRaises(ConfigError) as e:
            QueueSettings.from_config(Config(sections={"queue": {"max_send_memory": 0}}))
        self.assertIn("max_send_memory must be greater than 0", str(e.exception))


class SlowHopsTestBase(QueueTestCase):
    """Ten served domains whose next hops (10.6.6.1-10) take each message only when the
    test says so; two messages' worth of send memory."""

    settings = {"max_send_memory": 2000}

    def setUp(self) -> None:
        super().setUp()
        self.domains = [done(self.db.run("add", thd_add_domain, f"slow{i}.test",
                                         f"10.6.6.{i}", 25)) for i in range(10)]
        self.stalled: dict[str, list[defer.Deferred[None]]] = {}
        for i in range(10):
            self.stalled[f"10.6.6.{i}"] = self.connector.stalled[f"10.6.6.{i}"] = []

    async def send_to(self, i: int, qid: str, body: bytes = BIG) -> None:
        await self.q.spool.accept(qid, envelope("a@x.test", (f"u@slow{i}.test",
                                                             self.domains[i])), body)

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass as a running daemon sees them: the lease renewals on time."""
        for _ in range(int(seconds // 10)):
            self.clock.advance(10)

    def in_flight(self) -> list[str]:
        """The hosts with a send under way, in the order they began."""
        return [host for host, sends in self.stalled.items() for _ in sends]

    def release(self, host: str) -> None:
        self.stalled[host].pop(0).callback(None)

    def rows(self) -> dict[str, tuple[str, int, str | None]]:
        r = queue_recipients.c
        return done(self.db.read("rows", lambda conn: {
            row.address: (row.state, row.attempts, row.lease_owner)
            for row in conn.execute(select(r.address, r.state, r.attempts, r.lease_owner))
        }))


class BudgetTests(SlowHopsTestBase):
    async def test_many_slow_next_hops_hold_no_more_than_the_budget(self) -> None:
        for i in range(10):
            await self.send_to(i, f"Q{i}")
        # Two sends under way on two connections; the other eight wait for room, with no
        # connection (they held one each before).
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.1"])
        memory = self.runner.send_memory
        self.assertEqual((memory.used, memory.attempts, memory.waiting), (2000, 2, 8))
        self.assertEqual(self.runner.connections, 2)
        # Waiting is no failure: nothing deferred, no attempt counted.
        self.advance(3 * self.q.settings.lease_seconds)
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.1"])
        self.assertEqual({row[:2] for row in self.rows().values()}, {("queued", 0)})
        # A send that ends lets the one that asked first go.
        self.release("10.6.6.1")
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.2"])
        self.assertEqual(memory.used, 2000)
        while any(self.stalled.values()):
            host = self.in_flight()[0]
            self.release(host)
            self.assertLessEqual(memory.used, 2000)
            self.assertLessEqual(len(self.in_flight()), 2)
        self.assertEqual(sorted(self.connector.addresses()),
                         sorted(f"u@slow{i}.test" for i in range(10)))
        self.assertEqual({row[:2] for row in self.rows().values()}, {("delivered", 1)})
        self.assertEqual((memory.used, memory.attempts, memory.waiting), (0, 0, 0))

    def gauges(self) -> tuple[float, float]:
        """The runner's metrics: octets held, attempts waiting."""
        metrics = self.q.metrics
        return (metrics.send_memory.collect()[0].samples[0].value,
                metrics.send_waiting.collect()[0].samples[0].value)

    async def test_the_metrics_and_the_log_show_the_waits(self) -> None:
        lines = runner_lines(self)
        self.assertEqual(self.gauges(), (0, 0))
        for i in range(5):
            await self.send_to(i, f"Q{i}")
        self.assertEqual(self.gauges(), (2000, 3))
        self.release("10.6.6.0")
        self.assertEqual(self.gauges(), (2000, 2))
        for host in ("10.6.6.1", "10.6.6.2", "10.6.6.3"):
            self.release(host)
        self.assertEqual(self.gauges(), (1000, 0))
        self.release("10.6.6.4")
        self.assertEqual(self.gauges(), (0, 0))
        waits = [line for line in lines if "send memory" in line]
        self.assertEqual(len(waits), 1)
        self.assertIn("2000 octets held by 2 attempts", waits[0])
        self.advance(SendMemory.WAIT_QUIET)
        waits = [line for line in lines if "send memory" in line]
        self.assertEqual(waits[1:], ["outbound deliveries no longer wait for send memory: "
                                     "3 attempts waited, over 0 s"])

    async def test_a_message_larger_than_the_budget_goes_alone(self) -> None:
        huge = BIG[:-2] + b"y" * 2998 + b"\r\n"  # 4,000 octets, twice the budget
        await self.send_to(0, "HUGE", huge)
        self.assertEqual(self.in_flight(), ["10.6.6.0"])
        await self.send_to(1, "Q1")
        self.assertEqual(self.in_flight(), ["10.6.6.0"])  # waits while the huge one goes
        self.release("10.6.6.0")
        self.assertEqual(self.in_flight(), ["10.6.6.1"])
        await self.send_to(2, "HUGE2", huge)
        self.assertEqual(self.in_flight(), ["10.6.6.1"])  # waits until it would be alone
        self.release("10.6.6.1")
        self.assertEqual(self.in_flight(), ["10.6.6.2"])
        self.release("10.6.6.2")
        self.assertEqual(sorted(self.connector.addresses()),
                         ["u@slow0.test", "u@slow1.test", "u@slow2.test"])
        self.assertEqual(self.connector.delivered[0][3], huge)

    async def test_room_comes_back_when_an_attempt_fails(self) -> None:
        for i in range(3):
            await self.send_to(i, f"Q{i}")
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.1"])
        self.connector.break_during_send = True  # the connection is cut mid-transaction
        self.release("10.6.6.0")
        self.connector.break_during_send = False
        self.assertEqual(self.in_flight(), ["10.6.6.1", "10.6.6.2"])
        self.assertEqual(self.rows()["u@slow0.test"][:2], ("deferred", 1))
        # A refusal of the recipient frees it too.
        self.connector.replies["u@slow1.test"] = (550, ("5.1.1 no such user",))
        self.release("10.6.6.1")
        self.assertEqual(self.rows()["u@slow1.test"][:2], ("bounced", 1))
        self.assertEqual(self.runner.send_memory.used, 1000)
        self.release("10.6.6.2")
        self.assertEqual(self.runner.send_memory.used, 0)
        self.assertEqual(self.rows()["u@slow2.test"][:2], ("delivered", 1))

    async def test_a_stop_gives_the_waiting_work_back_unsent(self) -> None:
        for i in range(3):
            await self.send_to(i, f"Q{i}")
        self.assertEqual(self.runner.send_memory.waiting, 1)
        stopping = self.q.service.stopService()
        for host in self.in_flight():
            self.release(host)
        self.clock.advance(60)
        await stopping
        self.assertEqual(sorted(self.connector.addresses()), ["u@slow0.test", "u@slow1.test"])
        # Still queued, in the store, leased to nobody: the next start (or another node)
        # sends it, with no attempt counted.
        self.assertEqual(self.rows()["u@slow2.test"], ("queued", 0, None))
        self.assertEqual(self.runner.held, 0)


class ConnectionTests(SlowHopsTestBase):
    """Attempts waiting for room hold no connection: the fast hops get theirs."""

    settings = {"max_send_memory": 2000, "max_connections": 4}

    async def test_a_fast_hop_is_not_starved_by_a_slow_hops_waiting_attempts(self) -> None:
        del self.connector.stalled["10.6.6.9"]  # slow9.test's hop answers at once
        for n in range(10):
            await self.send_to(0, f"S{n}")
        # The slow hop's two sends fill the budget; its next job waits for room with no
        # connection, the rest of its backlog behind it.
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.0"])
        self.assertEqual(self.runner.connections, 2)
        self.assertEqual(self.runner.send_memory.waiting, 1)
        await self.send_to(9, "FAST")
        self.assertEqual(self.runner.connections, 2)  # (it waits for room, not a slot)
        self.release("10.6.6.0")  # room for the slow hop's job that asked first
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.0"])
        self.assertEqual(self.connector.addresses(), ["u@slow0.test"])
        self.release("10.6.6.0")  # then for the fast hop's: it connects and is delivered
        self.assertEqual(self.connector.addresses(), ["u@slow0.test"] * 2 + ["u@slow9.test"])
        self.assertEqual(self.rows()["u@slow9.test"][:2], ("delivered", 1))
        # (Before, the slow hop's waiting attempts held all four connections: the fast
        # hop got one only as the slow sends ended, then waited behind them for room.)
        while any(self.stalled.values()):
            self.release("10.6.6.0")
            self.assertLessEqual(self.runner.connections, 3)
        self.assertEqual(len(self.connector.addresses()), 11)
        self.assertEqual(self.runner.send_memory.used, 0)

    async def test_a_session_whose_next_message_waits_idles_and_sends_it(self) -> None:
        await self.send_to(0, "A1")
        await self.send_to(1, "B1")
        await self.send_to(1, "B2")  # waits for room, asked first
        await self.send_to(0, "A2")  # waits for room, behind B2
        self.assertEqual(self.runner.send_memory.waiting, 2)
        self.release("10.6.6.0")  # A1 ends: its room goes to B2 on a connection of its own
        self.assertEqual(self.in_flight(), ["10.6.6.1", "10.6.6.1"])
        # A's connection idles (A2 waits for room held by B's sends), holding none.
        self.assertEqual(self.runner.send_memory.used, 2000)
        self.release("10.6.6.1")  # B1 ends: A2 goes on A's idle connection
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.1"])
        self.assertEqual([hop.host for hop in self.connector.connects],
                         ["10.6.6.0", "10.6.6.1", "10.6.6.1"])
        self.release("10.6.6.0")
        self.release("10.6.6.1")
        self.assertEqual(sorted(self.connector.addresses()),
                         ["u@slow0.test", "u@slow0.test", "u@slow1.test", "u@slow1.test"])
        self.assertEqual(self.runner.send_memory.used, 0)

    async def test_a_session_takes_its_next_message_with_the_room_it_gave_back(
        self
    ) -> None:
        huge = BIG[:-2] + b"y" * 2998 + b"\r\n"  # twice the budget: it goes alone
        await self.send_to(0, "A1")
        await self.send_to(0, "A2")
        await self.send_to(0, "HUGE", huge)
        await self.send_to(0, "A3")
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.0"])
        for _ in range(4):
            self.release("10.6.6.0")
        self.assertEqual(self.connector.addresses(), ["u@slow0.test"] * 4)
        self.assertEqual(self.connector.delivered[2][3], huge)
        # The huge one and A3 went on the connections that had sent before: no deadlock
        # on room a connection held itself, and no new connection.
        self.assertEqual(len(self.connector.connects), 2)
        self.assertEqual(self.runner.send_memory.used, 0)


    async def test_a_hop_found_down_gives_back_its_room_and_its_wait(self) -> None:
        self.connector.pending["10.6.6.1"] = []
        await self.send_to(0, "A1")  # a slow send: 1000 octets
        await self.send_to(1, "B1")  # room taken, connecting
        await self.send_to(1, "B2")  # waits for room
        await self.send_to(2, "C1")  # waits behind it
        memory = self.runner.send_memory
        self.assertEqual((memory.used, memory.waiting), (2000, 2))
        self.connector.pending["10.6.6.1"].pop().errback(
            ConnectionRefusedError("Connection refused"))
        # Both of B's jobs deferred, no room or wait left of them: C1 goes.
        r = queue_recipients.c
        b_rows = done(self.db.read("rows", lambda conn: conn.execute(
            select(r.state, r.attempts).where(r.address == "u@slow1.test")).all()))
        self.assertEqual([tuple(row) for row in b_rows], [("deferred", 1), ("deferred", 1)])
        self.assertEqual(self.in_flight(), ["10.6.6.0", "10.6.6.2"])
        self.assertEqual((memory.used, memory.waiting), (2000, 0))
        self.release("10.6.6.0")
        self.release("10.6.6.2")
        self.assertEqual(memory.used, 0)


class MemoryReactorTests(QueueTestCase):
    """With the real connector on a MemoryReactor: an attempt waiting for room has not
    connected."""

    settings = {"max_send_memory": 1000, "allow_private": True}

    def setUp(self) -> None:
        super().setUp()
        self.reactor = MemoryReactorClock()
        self.runner.connector = TCPConnector(self.reactor, self.q.settings, "mx.test")
        self.other = done(self.db.run("add", thd_add_domain, "other.test", "10.0.0.2", 2525,
                                      vouched=True))
        self.hops: list[ScriptedHop] = []

    def connected(self, answers: dict[bytes, bytes]) -> ScriptedHop:
        """Let the next connection the runner asked for open, to a hop answering so."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[len(self.hops)]
        protocol: Any = factory.buildProtocol(IPv4Address("TCP", host, port))
        hop = ScriptedHop(answers)
        hop.protocol = protocol  # (the endpoint's wrapper around the SMTP client)
        protocol.makeConnection(hop)
        self.hops.append(hop)
        hop.answer(b"220 hop.test ESMTP\r\n")
        return hop

    def destinations(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    async def test_an_attempt_waiting_for_room_does_not_connect(self) -> None:
        await self.accept("Q1", "b@customer.test", body=BIG)
        slow = self.connected({**ANSWERS, b".": b""})  # reads the data, does not answer
        self.assertEqual(len(slow.bodies), 1)
        env = envelope("a@x.test", ("c@other.test", self.other))
        await self.q.spool.accept("Q2", env, BIG)
        self.assertEqual(self.runner.send_memory.waiting, 1)
        self.assertEqual(self.destinations(), [("10.0.0.1", 2525)])  # no connectTCP for Q2
        slow.answer(b"250 2.0.0 queued\r\n")  # Q1 ends: Q2 has room, and connects
        self.assertEqual(self.destinations(), [("10.0.0.1", 2525), ("10.0.0.2", 2525)])
        fast = self.connected(dict(ANSWERS))
        self.assertEqual(len(fast.bodies), 1)
        r = queue_recipients.c
        states = done(self.db.read("rows", lambda conn: dict(
            conn.execute(select(r.address, r.state)).all())))
        self.assertEqual(states, {"b@customer.test": "delivered", "c@other.test": "delivered"})
        self.assertEqual(self.runner.send_memory.used, 0)


class RealClientTests(QueueTestCase):
    """With the real SMTP client: a next hop that never answers the end of the data holds
    its room until the data timeout, then gives it back; a waiting connection the hop
    closes costs its message nothing."""

    settings = {"max_send_memory": 1000}

    def setUp(self) -> None:
        super().setUp()
        self.hop = ScriptedHopConnector(self.clock)
        self.hop.answers[b"."] = b""  # reads the data, never answers it
        self.runner.connector = self.hop

    async def test_room_comes_back_when_an_attempt_times_out(self) -> None:
        await self.accept("Q1", "b@customer.test", body=BIG)
        await self.accept("Q2", "c@customer.test", body=BIG)
        self.assertEqual([len(h.bodies) for h in self.hop.hops], [1])  # Q2 waits, unconnected
        self.hop.answers[b"."] = b"250 2.0.0 queued\r\n"
        for _ in range(599):  # the lease renewals on time, as a running daemon's
            self.clock.advance(1)
        self.assertEqual(self.runner.send_memory.waiting, 1)
        self.clock.advance(1)  # data_timeout: Q1 is deferred, Q2 goes
        self.assertEqual([len(h.bodies) for h in self.hop.hops], [1, 1])
        self.assertEqual(self.runner.send_memory.used, 0)
        r = queue_recipients.c
        states = done(self.db.read("rows", lambda conn: dict(
            conn.execute(select(r.address, r.state)).all())))
        self.assertEqual(states, {"b@customer.test": "deferred", "c@customer.test": "delivered"})

    async def test_an_idle_connection_the_hop_closed_costs_no_attempt(self) -> None:
        other = done(self.db.run("add", thd_add_domain, "other.test", "10.0.0.2", 2525,
                                 vouched=True))
        await self.accept("Q1", "b@customer.test", body=BIG)
        await self.q.spool.accept("Q2", envelope("a@x.test", ("c@other.test", other)), BIG)
        await self.accept("Q3", "d@customer.test", body=BIG)  # waits behind Q2
        self.hop.hops[0].answer(b"250 2.0.0 queued\r\n")  # Q1 ends: Q2 has room
        self.assertEqual([len(h.bodies) for h in self.hop.hops], [1, 1])
        # Q3 waits for the room Q2 holds; its hop's connection idles meanwhile and the hop
        # closes it (its own idle timeout).
        self.hop.hops[0].loseConnection()
        self.hop.answers[b"."] = b"250 2.0.0 queued\r\n"
        self.hop.hops[1].answer(b"250 2.0.0 queued\r\n")  # Q2 ends: Q3 has room
        self.assertEqual([len(h.bodies) for h in self.hop.hops], [1, 1, 1])  # a new one
        r = queue_recipients.c
        rows = done(self.db.read("rows", lambda conn: {
            row.address: (row.state, row.attempts)
            for row in conn.execute(select(r.address, r.state, r.attempts))}))
        self.assertEqual(rows, {"b@customer.test": ("delivered", 1),
                                "c@other.test": ("delivered", 1),
                                "d@customer.test": ("delivered", 1)})
        self.assertEqual(self.runner.send_memory.used, 0)


class LeaseTests(TestCase):
    """Two nodes on one store: work waiting for send memory on one is renewed with the
    rest of its leases, and the other node never takes it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.db = synchronous_database()
        self.domain = done(self.db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25))
        self.conn_a = ScriptedConnector()
        self.conn_b = ScriptedConnector()
        common: dict[str, Any] = {"lease_seconds": 60.0, "poll_interval": 5.0,
                                  "max_send_memory": 1000}
        self.a = make_queue(self.db, self.clock, self.conn_a, node_id="a", **common)
        self.b = make_queue(self.db, self.clock, self.conn_b, node_id="b", **common)

    def tearDown(self) -> None:
        for q in (self.a, self.b):
            if q.service.running:
                d = q.service.stopService()
                self.clock.advance(30)
                self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_work_keeps_its_lease(self) -> None:
        self.a.service.startService()
        self.b.service.startService()
        self.conn_a.hold = defer.Deferred()  # a slow delivery on node a
        for i in range(3):
            env = envelope("s@x.test", (f"r{i}@c.test", self.domain))
            self.successResultOf(defer.Deferred.fromCoroutine(
                self.a.spool.accept(f"Q{i}", env, BIG)))
        # One waits for room (the next of the hop's asks when it has it).
        self.assertEqual(self.a.runner.send_memory.waiting, 1)
        for _ in range(30):  # five lease lengths
            self.clock.advance(10)
        self.assertEqual(self.conn_b.addresses(), [])
        hold, self.conn_a.hold = self.conn_a.hold, None
        hold.callback(None)
        self.assertEqual(sorted(self.conn_a.addresses()), ["r0@c.test", "r1@c.test",
                                                           "r2@c.test"])
        self.assertEqual(self.a.runner.send_memory.used, 0)

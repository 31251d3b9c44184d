"""The queue runner on a Clock: hand-off from the spool, deferral and the retry schedule,
lifetime expiry, bounces, connection reuse, the TLS policies (verify-if-offered by default,
opportunistic fallback under `may`), stop, and the hop limit on queued mail (5.4.6)."""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

from sqlalchemy import select
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.names import dns
from twisted.trial.unittest import TestCase

from mailcore.queue.model import NewMessage, thd_insert_messages, thd_show
from mailcore.queue.pipeline import Action, Decision, Pipeline, PipelineMessage
from mailcore.queue.retry import backoff, next_attempt
from mailcore.queue.routing import Hop
from mailcore.queue.runner import describe, open_host
from mailcore.queue.settings import QueueSettings
from mailcore.smtp.client import ReplyTimeout
from mailcore.smtp.dotstuff import AcceptedBody
from mailcore.store.schema import queue_messages, queue_recipients
from tests.support.mailsink import FakeSession, ScriptedConnector, done, envelope, thd_add_domain
from tests.support.queuetest import BODY, QueueTestCase

HOP = Hop("10.0.0.1", 2525)  # with the default TLS policy, as the router gives it


class RetryScheduleTests(TestCase):
    def test_backoff_doubles_from_min_to_max(self) -> None:
        s = QueueSettings()
        self.assertEqual(
            [backoff(n, s) for n in range(1, 7)], [300, 600, 1200, 2400, 4000, 4000]
        )

    def test_backoff_is_configurable(self) -> None:
        s = QueueSettings(min_backoff=10, max_backoff=35)
        self.assertEqual([backoff(n, s) for n in range(1, 5)], [10, 20, 35, 35])

    def test_next_attempt_never_after_the_lifetime(self) -> None:
        s = QueueSettings(lifetime=1000)
        self.assertEqual(next_attempt(5, created_at=0, now=900, settings=s), 1000)
        self.assertEqual(next_attempt(1, created_at=0, now=100, settings=s), 400)


class RunnerTestBase(QueueTestCase):
    def rows(self) -> dict[str, tuple[str, int, float, str | None]]:
        r = queue_recipients.c

        def txn(conn):  # type: ignore[no-untyped-def]
            return {
                row.address: (row.state, row.attempts, row.next_attempt_at, row.lease_owner)
                for row in conn.execute(select(r.address, r.state, r.attempts,
                                               r.next_attempt_at, r.lease_owner))
            }

        return done(self.db.read("rows", txn))


class DeliveryTests(RunnerTestBase):
    async def test_accepted_message_is_delivered_without_waiting_for_a_poll(self) -> None:
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])
        self.assertEqual(self.connector.delivered[0][3], BODY)
        self.assertEqual(self.rows()["b@customer.test"][0], "delivered")
        self.assertEqual(self.q.metrics.delivered._value.get(), 1)

    async def test_recipients_of_one_message_share_one_transaction(self) -> None:
        await self.accept("Q1", "b@customer.test", "c@customer.test", "d@customer.test")
        self.assertEqual(len(self.connector.delivered), 1)
        self.assertEqual(
            self.connector.delivered[0][2],
            ["b@customer.test", "c@customer.test", "d@customer.test"],
        )

    async def test_several_messages_reuse_one_connection(self) -> None:
        for i in range(5):
            await self.accept(f"Q{i}", "b@customer.test")
        self.assertEqual(len(self.connector.delivered), 5)
        self.assertEqual(len(self.connector.connects), 1)
        self.clock.advance(self.q.settings.connection_idle + 0.1)
        self.assertEqual(self.connector.quits, 1)

    async def test_an_idle_connection_quits_after_connection_idle_from_its_last_job(
        self
    ) -> None:
        idle = self.q.settings.connection_idle
        await self.accept("Q0", "b@customer.test")
        self.clock.advance(idle * 0.75)
        await self.accept("Q1", "b@customer.test")  # taken by the idle connection
        self.clock.advance(idle * 0.75)  # the first wait's time: this wait is younger
        self.assertEqual((len(self.connector.connects), self.connector.quits), (1, 0))
        self.clock.advance(idle * 0.25)
        self.assertEqual(self.connector.quits, 1)
        self.assertEqual(len(self.connector.delivered), 2)

    async def test_finished_message_drops_its_body_and_keeps_a_log(self) -> None:
        await self.accept("Q1", "b@customer.test")
        view = done(self.db.read("show", thd_show, "Q1"))
        self.assertIsNotNone(view.done_at)
        self.assertEqual(view.recipients[0].state, "delivered")
        self.assertIn("250", view.recipients[0].last_error)
        body = done(self.db.read(
            "b", lambda c: c.execute(select(queue_messages.c.body)).scalar()
        ))
        self.assertIsNone(body)

    async def test_concurrency_per_hop_is_limited(self) -> None:
        self.connector.hold = defer.Deferred()
        for i in range(30):
            await self.accept(f"Q{i}", "b@customer.test")
        self.assertEqual(len(self.connector.connects), self.q.settings.hop_concurrency)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(len(self.connector.delivered), 30)


class HopConcurrencyTests(RunnerTestBase):
    async def test_a_hop_that_refused_an_extra_connection_gets_more_again_later(self) -> None:
        """An extra connection refused lowers the hop's limit to the connections it holds,
        for a while (dead_hop_seconds): a hop that was busy once was held to one
        connection for as long as mail kept coming."""
        self.connector.hold = defer.Deferred()
        await self.accept("Q0", "b@customer.test")  # one connection, busy
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test")  # a second one, refused
        self.assertEqual(len(self.connector.connects), 2)
        self.connector.down.clear()
        await self.accept("Q2", "b@customer.test")
        self.assertEqual(len(self.connector.connects), 2)  # held to one for now
        self.clock.advance(self.q.settings.dead_hop_seconds)
        await self.accept("Q3", "b@customer.test")
        self.assertEqual(len(self.connector.connects), 5)  # Q1, Q2 and Q3 get their own
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(len(self.connector.delivered), 4)


class ConnectionLimitTests(RunnerTestBase):
    """`max_connections` bounds the connections to all hops together."""

    settings = {"max_connections": 5, "messages_per_connection": 2}

    def add_hops(self, count: int) -> list[int]:
        return [done(self.db.run("add", thd_add_domain, f"d{i}.test", f"10.0.1.{i + 1}", 25))
                for i in range(count)]

    async def test_connections_to_many_hops_stay_within_max_connections(self) -> None:
        domains = self.add_hops(20)
        self.connector.hold = defer.Deferred()
        env = envelope("a@x.test", *[(f"u@d{i}.test", d) for i, d in enumerate(domains)])
        await self.q.spool.accept("Q1", env, BODY)
        self.assertEqual(len(self.connector.connects), 5)
        self.assertEqual(self.runner.connections, 5)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.clock.advance(5)
        self.assertEqual(sorted(self.connector.addresses()),
                         sorted(f"u@d{i}.test" for i in range(20)))
        self.assertEqual(len(set(self.connector.connects)), 20)
        self.assertEqual(self.runner.connections, 0)

    async def test_a_busy_hop_gives_its_connection_to_a_waiting_one_in_turn(self) -> None:
        self.runner.settings = QueueSettings(**{**vars(self.runner.settings),
                                                "max_connections": 1})
        (other,) = self.add_hops(1)
        self.connector.hold = defer.Deferred()
        await self.accept("Q0", "b@customer.test")  # takes the one connection
        await self.q.spool.accept("QB", envelope("a@x.test", ("u@d0.test", other)), BODY)
        for i in range(1, 5):
            await self.accept(f"Q{i}", "b@customer.test")
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.clock.advance(1)
        # Two messages on the first connection (messages_per_connection), then the hop
        # that asked for a connection next, then the rest.
        self.assertEqual(self.connector.addresses(), ["b@customer.test"] * 2 + ["u@d0.test"]
                         + ["b@customer.test"] * 3)


class FairShareTests(RunnerTestBase):
    """While hops wait for a connection, none holds more than its fair share."""

    settings = {"max_connections": 4, "messages_per_connection": 100}

    async def test_a_tarpit_hop_gives_connections_back_to_waiting_hops(self) -> None:
        # A customer's redirectTo answers each message after minutes: it took every
        # connection, and kept them while it had mail, so other hops' mail waited behind it.
        tarpit = done(self.db.run("add", thd_add_domain, "tarpit.test", "10.6.6.6", 25))
        stalled = self.connector.stalled["10.6.6.6"] = []
        for i in range(12):
            await self.q.spool.accept(f"T{i}", envelope("a@x.test", ("u@tarpit.test", tarpit)),
                                      BODY)
        self.assertEqual(self.runner.connections, 4)
        await self.accept("G1", "b@customer.test")
        await self.accept("G2", "c@customer.test")
        self.assertEqual(self.connector.addresses(), [])
        stalled.pop(0).callback(None)  # one tarpit message done: its connection ends
        self.assertEqual(self.connector.addresses(), ["u@tarpit.test", "b@customer.test",
                                                      "c@customer.test"])
        # The other hop's connection, idle, ended as soon as the tarpit asked for it again.
        self.assertEqual(self.runner.connections, 4)
        self.assertEqual(self.runner.hops[Hop("10.6.6.6", 25, "verify-if-offered")].active, 4)
        while stalled:
            stalled.pop(0).callback(None)
        self.assertEqual(self.connector.addresses().count("u@tarpit.test"), 12)
        self.clock.advance(self.q.settings.connection_idle)
        self.assertEqual(self.runner.connections, 0)


class SlowResolver:
    """MX answers at once, except for domains named slow…, answered after a minute."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.asked: list[str] = []

    def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
        self.asked.append(name)
        answer: Any = ([dns.RRHeader(name, dns.MX, payload=dns.Record_MX(10, f"mx.{name}"))],
                       [], [])
        if not name.startswith("slow"):
            return defer.succeed(answer)
        return task.deferLater(self.clock, 60, lambda: answer)


class MXRoutingTests(RunnerTestBase):
    settings = {"relayhost": ""}

    async def test_a_slow_mx_lookup_holds_up_no_other_message_claimed_with_it(self) -> None:
        self.runner.router._resolver = SlowResolver(self.clock)
        now = self.clock.seconds()
        msgs = [NewMessage("Q1", envelope("a@x.test", *[(f"u@slow{i}.test", None)
                                                        for i in range(5)]), BODY, False),
                NewMessage("Q2", envelope("a@x.test", ("u@slow5.test", None)), BODY, False),
                NewMessage("Q3", envelope("a@x.test", ("b@fast.test", None)), BODY, False)]
        done(self.db.run("ins", thd_insert_messages, msgs, "", now, now))
        self.clock.advance(self.q.settings.poll_interval)  # one sweep claims all three
        self.assertEqual(self.connector.addresses(), ["b@fast.test"])
        # The lookups of one message are made together: it waits for the slowest only.
        self.clock.advance(60)
        self.assertEqual(sorted(self.connector.addresses()),
                         ["b@fast.test"] + [f"u@slow{i}.test" for i in range(6)])


class MXFallbackTests(RunnerTestBase):
    settings = {"relayhost": ""}

    def setUp(self) -> None:
        super().setUp()
        answer: Any = ([dns.RRHeader("x.test", dns.MX, payload=dns.Record_MX(pref, name))
                        for pref, name in ((10, "mx1.x.test"), (20, "mx2.x.test"))], [], [])

        class Resolver:
            def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
                return defer.succeed(answer)

        self.runner.router._resolver = Resolver()

    async def test_the_next_mx_gets_the_mail_when_the_best_cannot_be_reached(self) -> None:
        self.connector.down.add(Hop("mx1.x.test", 25))
        await self.q.spool.accept("Q1", envelope("a@x.test", ("u@x.test", None)), BODY)
        self.assertEqual([h.host for h in self.connector.connects], ["mx1.x.test", "mx2.x.test"])
        self.assertEqual([(h.host, rcpts) for h, _f, rcpts, _b, _t in self.connector.delivered],
                         [("mx2.x.test", ["u@x.test"])])

    async def test_when_no_mx_can_be_reached_the_best_ones_failure_defers(self) -> None:
        self.connector.down.update({Hop("mx1.x.test", 25), Hop("mx2.x.test", 25)})
        await self.q.spool.accept("Q1", envelope("a@x.test", ("u@x.test", None)), BODY)
        view = done(self.db.read("show", thd_show, "Q1"))
        self.assertEqual(view.recipients[0].state, "deferred")
        self.assertEqual(view.recipients[0].last_error, "4.4.1 mx1.x.test:25: Connection refused")


class DeferralTests(RunnerTestBase):
    settings = {"min_backoff": 300.0, "max_backoff": 4000.0, "lifetime": 5 * 86400.0}

    async def test_next_hop_down_defers_and_retries_on_schedule(self) -> None:
        self.connector.down.add(HOP)
        t0 = self.clock.seconds()
        await self.accept("Q1", "b@customer.test")
        state, attempts, next_at, owner = self.rows()["b@customer.test"]
        self.assertEqual((state, attempts, owner), ("deferred", 1, None))
        self.assertEqual(next_at, t0 + 300)
        self.assertEqual(self.q.metrics.deferred._value.get(), 1)
        # Still down at the next two tries: 600 s, then 1200 s.
        self.clock.advance(300)
        self.assertEqual(self.rows()["b@customer.test"][:3], ("deferred", 2, t0 + 900))
        self.clock.advance(600)
        self.assertEqual(self.rows()["b@customer.test"][:3], ("deferred", 3, t0 + 2100))
        # Nothing is tried early.
        self.clock.advance(1199)
        self.assertEqual(self.rows()["b@customer.test"][1], 3)
        self.connector.down.clear()
        self.clock.advance(1)
        self.assertEqual(self.rows()["b@customer.test"][0], "delivered")
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])

    async def test_a_dead_hop_is_forgotten_once_its_dead_time_has_passed(self) -> None:
        """A hop that failed to connect was kept in runner.hops for ever (only a later good
        connection cleared dead_until), about 2 KB for each distinct dead hop (found by an
        audit). It is dropped once dead_until has passed and it holds no work."""
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.rows()["b@customer.test"][:2], ("deferred", 1))
        self.assertEqual(list(self.runner.hops), [HOP])
        self.clock.advance(60)  # dead_hop_seconds
        self.assertEqual(self.runner.hops, {})
        # The next try finds the hop down again, and forgets it again.
        self.clock.advance(240)
        self.assertEqual(self.rows()["b@customer.test"][:2], ("deferred", 2))
        self.assertEqual(self.connector.connects.count(HOP), 2)
        self.clock.advance(60)
        self.assertEqual(self.runner.hops, {})

    async def test_temporary_reply_defers_only_that_recipient(self) -> None:
        self.connector.replies["c@customer.test"] = (451, ("4.3.0 try later",))
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        rows = self.rows()
        self.assertEqual(rows["b@customer.test"][0], "delivered")
        self.assertEqual(rows["c@customer.test"][:2], ("deferred", 1))
        self.connector.replies.clear()
        self.clock.advance(300)
        self.assertEqual(self.rows()["c@customer.test"][0], "delivered")
        self.assertEqual(self.connector.addresses(), ["b@customer.test", "c@customer.test"])

    async def test_lifetime_passing_bounces_once(self) -> None:
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test", sender="sender@customer.test")
        for _ in range(120):
            self.clock.advance(4000)
        self.assertEqual(self.rows()["b@customer.test"][0], "bounced")
        dsns = self.dsn_rows()
        self.assertEqual(len(dsns), 1)
        report: Any = message_from_bytes(dsns[0])
        status = report.get_payload()[1].get_payload()[1]
        self.assertEqual(status["Status"], "5.4.7")
        self.assertEqual(status["Action"], "failed")

    def dsn_rows(self) -> list[Any]:
        m = queue_messages.c
        # Finished DSNs lose their body; read them from the sink instead when delivered.
        bodies = [b for _h, frm, _r, b, _t in self.connector.delivered if frm == ""]
        pending = done(self.db.read(
            "d", lambda c: [bytes(r[0]) for r in c.execute(
                select(m.body).where(m.kind == "bounce", m.body.is_not(None)))]
        ))
        return bodies + pending


class BounceTests(RunnerTestBase):
    async def test_permanent_failure_gives_exactly_one_dsn_for_all_failed_recipients(
        self,
    ) -> None:
        self.connector.replies["c@customer.test"] = (550, ("5.1.1 <c@customer.test>: unknown",))
        self.connector.replies["d@customer.test"] = (554, ("5.7.1 rejected",))
        await self.accept("Q1", "b@customer.test", "c@customer.test", "d@customer.test",
                          sender="sender@customer.test")
        rows = self.rows()
        self.assertEqual(rows["b@customer.test"][0], "delivered")
        self.assertEqual(rows["c@customer.test"][0], "bounced")
        self.assertEqual(rows["d@customer.test"][0], "bounced")
        dsns = [d for d in self.connector.delivered if d[1] == ""]
        self.assertEqual(len(dsns), 1)
        _hop, _sender, rcpts, body, _tls = dsns[0]
        self.assertEqual(rcpts, ["sender@customer.test"])
        report: Any = message_from_bytes(body)
        self.assertEqual(report.get_content_type(), "multipart/report")
        groups = report.get_payload()[1].get_payload()[1:]
        self.assertEqual(
            [(g["Final-Recipient"], g["Status"]) for g in groups],
            [("rfc822; c@customer.test", "5.1.1"), ("rfc822; d@customer.test", "5.7.1")],
        )
        self.assertEqual(self.q.metrics.bounced._value.get(), 2)

    async def test_dsn_waits_until_every_recipient_is_final(self) -> None:
        self.connector.replies["c@customer.test"] = (550, ("5.1.1 unknown",))
        self.connector.replies["d@customer.test"] = (451, ("4.3.0 later",))
        await self.accept("Q1", "c@customer.test", "d@customer.test",
                          sender="sender@customer.test")
        self.assertEqual([d for d in self.connector.delivered if d[1] == ""], [])
        self.connector.replies["d@customer.test"] = (550, ("5.1.1 gone",))
        self.clock.advance(300)
        dsns = [d for d in self.connector.delivered if d[1] == ""]
        self.assertEqual(len(dsns), 1)
        self.assertIn(b"d@customer.test", dsns[0][3])
        self.assertIn(b"c@customer.test", dsns[0][3])

    async def test_no_dsn_for_the_null_sender(self) -> None:
        self.connector.replies["c@customer.test"] = (550, ("5.1.1 unknown",))
        await self.accept("Q1", "c@customer.test", sender="")
        self.assertEqual(self.rows()["c@customer.test"][0], "bounced")
        self.assertEqual(self.connector.delivered, [])
        kinds = done(self.db.read(
            "k", lambda c: [r[0] for r in c.execute(select(queue_messages.c.kind))]
        ))
        self.assertEqual(kinds, ["relay"])

    async def test_a_failing_bounce_is_not_bounced_again(self) -> None:
        self.connector.replies["c@customer.test"] = (550, ("5.1.1 unknown",))
        self.connector.replies["sender@customer.test"] = (550, ("5.1.1 no such sender",))
        await self.accept("Q1", "c@customer.test", sender="sender@customer.test")
        kinds = done(self.db.read(
            "k", lambda c: sorted(r[0] for r in c.execute(select(queue_messages.c.kind)))
        ))
        self.assertEqual(kinds, ["bounce", "relay"])


class TLSFailureTextTests(RunnerTestBase):
    async def test_no_reply_to_starttls_is_not_called_a_certificate_mismatch(self) -> None:
        self.connector.offer_starttls = True
        self.connector.starttls_error = ReplyTimeout("timed out waiting for the server's reply")
        await self.accept("Q1", "b@customer.test")
        view = done(self.db.read("show", thd_show, "Q1"))
        self.assertEqual((view.recipients[0].state, view.recipients[0].last_error), (
            "deferred", "4.7.5 TLS was offered and failed: timed out waiting for the server's "
            "reply"))


class TLSFallbackTests(RunnerTestBase):
    settings = {"tls": "may"}

    async def test_opportunistic_starttls_failure_delivers_in_cleartext(self) -> None:
        """Pitfall 9: a refused STARTTLS must not QUIT-and-defer forever."""
        self.connector.offer_starttls = True
        self.connector.starttls_fails = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])
        self.assertEqual(self.connector.tls_attempts, 1)
        self.assertEqual(len(self.connector.connects), 2)

    async def test_required_tls_that_fails_defers(self) -> None:
        done(self.db.run("tls", lambda c: c.exec_driver_sql(
            "UPDATE domains SET tls = 'verify'")))
        self.q.runner.router._cache.clear()
        self.connector.offer_starttls = True
        self.connector.starttls_fails = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.delivered, [])
        self.assertEqual(self.rows()["b@customer.test"][0], "deferred")

    async def test_starttls_used_when_offered(self) -> None:
        self.connector.offer_starttls = True
        await self.accept("Q1", "b@customer.test")
        self.assertTrue(self.connector.delivered[0][4])

    async def test_a_failed_starttls_is_remembered_when_the_cleartext_retry_fails(
        self
    ) -> None:
        """The hour in cleartext begins at the failed STARTTLS, not once the cleartext
        connection is had: a hop that refuses that one too is not asked for STARTTLS again
        (and failed again) at every attempt of that hour."""
        self.connector.offer_starttls = True
        self.connector.starttls_fails = True
        pending = self.connector.pending["10.0.0.1"] = []
        await self.accept("Q1", "b@customer.test")
        hop = Hop("10.0.0.1", 2525, "may")
        pending.pop().callback(FakeSession(self.connector, hop))  # STARTTLS fails
        pending.pop().errback(ConnectionRefusedError("Connection refused"))
        self.assertEqual(self.rows()["b@customer.test"][0], "deferred")
        self.assertGreater(self.runner.hops[hop].cleartext_until, self.clock.seconds())


class OpenHostTests(TestCase):
    async def test_a_cancelled_opportunistic_starttls_drops_its_connection(self) -> None:
        """Cancelled in an opportunistic STARTTLS (recipient verification's verify_timeout,
        a stop), the connection is dropped, not left open until the hop closes it."""
        connector = ScriptedConnector()
        connector.offer_starttls = True
        hop = Hop("10.0.0.1", 2525, "may")
        session = FakeSession(connector, hop)
        stalled: defer.Deferred[None] = defer.Deferred()

        async def starttls(creator: Any) -> None:
            await stalled

        session.starttls = starttls  # type: ignore[method-assign]
        connector.connect = lambda hop: defer.succeed(session)  # type: ignore[method-assign]
        opening = defer.Deferred.fromCoroutine(open_host(connector, hop))
        opening.cancel()
        self.failureResultOf(opening, defer.CancelledError)
        self.assertFalse(session.usable)  # aborted


class DefaultTLSPolicyTests(RunnerTestBase):
    """No `[queue] tls` given: verify-if-offered."""

    def test_the_default_policy_is_verify_if_offered(self) -> None:
        self.assertEqual(self.q.settings.tls, "verify-if-offered")

    async def test_offered_starttls_is_verified_and_used(self) -> None:
        self.connector.offer_starttls = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.verified, [True])
        self.assertTrue(self.connector.delivered[0][4])

    async def test_failed_starttls_defers_with_4_7_5_and_never_falls_back(self) -> None:
        self.connector.offer_starttls = True
        self.connector.starttls_fails = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.delivered, [])
        self.assertEqual(len(self.connector.connects), 1)  # no cleartext retry
        self.assertEqual(self.rows()["b@customer.test"][0], "deferred")
        view = done(self.db.read("show", thd_show, "Q1"))
        self.assertIn("4.7.5", view.recipients[0].last_error)

    async def test_a_certificate_naming_someone_else_defers(self) -> None:
        self.connector.offer_starttls = True
        self.connector.peer_name_mismatch = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.delivered, [])
        self.assertEqual(self.rows()["b@customer.test"][0], "deferred")

    async def test_a_hop_without_starttls_gets_cleartext(self) -> None:
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])
        self.assertFalse(self.connector.delivered[0][4])
        self.assertEqual(self.connector.tls_attempts, 0)

    async def test_a_domain_set_to_may_falls_back_to_cleartext(self) -> None:
        done(self.db.run("tls", lambda c: c.exec_driver_sql("UPDATE domains SET tls = 'may'")))
        self.q.runner.router._cache.clear()
        self.connector.offer_starttls = True
        self.connector.starttls_fails = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.verified, [False])
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])


class DescribeTests(TestCase):
    """What a failed connection says in `queue show` and in a DSN."""

    def test_what_the_network_said_is_the_reason(self) -> None:
        refused = ConnectionRefusedError("111: Connection refused")
        self.assertEqual(describe(refused, HOP), f"4.4.1 10.0.0.1:2525: {refused}")

    def test_a_fault_of_ours_is_logged_and_reported_as_a_fixed_text(self) -> None:
        error = KeyError("SELECT * FROM secrets WHERE id = 7")
        self.assertEqual(describe(error, HOP), "4.4.1 10.0.0.1:2525: connection failed")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class PipelineTests(TestCase):
    async def test_empty_pipeline_delivers(self) -> None:
        msg = PipelineMessage("Q", "relay", "a@x", (), b"")
        self.assertEqual((await Pipeline().process(msg)).action, Action.DELIVER)

    async def test_first_non_deliver_decision_wins_and_tags_accumulate(self) -> None:
        class Tag:
            async def process(self, message: PipelineMessage) -> Decision:
                return Decision(Action.TAG, (("X-Spam-Flag", "YES"),))

        class Quarantine:
            async def process(self, message: PipelineMessage) -> Decision:
                return Decision(Action.QUARANTINE, reason="virus")

        msg = PipelineMessage("Q", "relay", "a@x", (), b"")
        tagged = await Pipeline([Tag(), Tag()]).process(msg)
        self.assertEqual(tagged.add_headers, (("X-Spam-Flag", "YES"),) * 2)
        self.assertEqual((await Pipeline([Tag(), Quarantine()]).process(msg)).action,
                         Action.QUARANTINE)


class PipelineDecisionTests(RunnerTestBase):
    async def test_tag_decision_prepends_headers(self) -> None:
        class Tag:
            async def process(self, message: PipelineMessage) -> Decision:
                return Decision(Action.TAG, (("X-Spam-Flag", "YES"),))

        self.q.runner.pipeline = Pipeline([Tag()])
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.delivered[0][3], b"X-Spam-Flag: YES\r\n" + BODY)


class StopTests(RunnerTestBase):
    async def test_stop_finishes_in_flight_and_releases_leases(self) -> None:
        self.connector.hold = defer.Deferred()
        for i in range(15):
            await self.accept(f"Q{i}", "b@customer.test")
        stopping = self.q.service.stopService()
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        await stopping
        rows = self.rows()
        self.assertEqual(len(self.connector.delivered), 10)  # the ones in flight
        self.assertEqual(rows["b@customer.test"][0], "queued")  # the last one, never sent
        owners = done(self.db.read(
            "o", lambda c: {r[0] for r in c.execute(select(queue_recipients.c.lease_owner))}
        ))
        self.assertEqual(owners, {None})


    async def test_stop_cuts_a_connection_still_opening_when_the_grace_period_ends(
        self
    ) -> None:
        """A hop that accepts the TCP connection and never greets held the stop for the
        greeting's timeout (command_timeout, 300 s), not stop_grace."""
        self.connector.stall_connect = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(len(self.connector.connects), 1)
        stopping = self.q.service.stopService()
        self.clock.advance(self.q.settings.stop_grace)
        self.assertTrue(stopping.called)
        await stopping
        self.assertEqual(self.rows()["b@customer.test"][0], "queued")
        self.assertEqual(self.runner.connections, 0)


class MetricsTests(RunnerTestBase):
    async def test_depth_gauge_counts_waiting_recipients_on_each_sweep(self) -> None:
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        await self.accept("Q2", "d@customer.test")
        self.clock.advance(self.q.settings.poll_interval)
        self.assertEqual(self.q.metrics.depth._value.get(), 3)
        self.assertEqual(self.q.metrics.accepted._value.get(), 2)
        self.assertEqual(self.q.metrics.deferred._value.get(), 3)
        self.connector.down.clear()
        self.clock.advance(300)
        self.clock.advance(self.q.settings.poll_interval)
        self.assertEqual(self.q.metrics.depth._value.get(), 0)
        self.assertEqual(self.q.metrics.delivered._value.get(), 3)
        self.assertEqual(self.q.metrics.latency._sum.get() > 0, True)

    async def test_required_tls_with_a_peer_of_another_name_defers(self) -> None:
        done(self.db.run("tls", lambda c: c.exec_driver_sql(
            "UPDATE domains SET tls = 'verify'")))
        self.q.runner.router._cache.clear()
        self.connector.offer_starttls = True
        self.connector.peer_name_mismatch = True
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.delivered, [])
        self.assertEqual(self.rows()["b@customer.test"][0], "deferred")


def looped(hops: int) -> bytes:
    """A message that went round `hops` times: folded Received fields, then the rest."""
    received = b"".join(
        b"Received: from gw.test (gw.test [192.0.2.1])\r\n"
        b"\tby gw.test (Mailcore) with ESMTP id Q%d; Sun, 15 Jun 2025 15:06:40 +0000\r\n"
        % n for n in range(hops)
    )
    return received + BODY


class HopLimitTests(RunnerTestBase):
    """A queued message with more Received fields than `[smtp] max_hops` (50) is in a loop:
    bounced with 5.4.6 (one DSN to its sender), never delivered."""

    async def queue(self, kind: str, sender: str, hops: int) -> None:
        env = envelope(sender, ("b@customer.test", self.domain), kind=kind)
        await self.q.spool.accept("Q1", env, looped(hops))

    async def test_a_looping_released_message_is_bounced_with_5_4_6(self) -> None:
        await self.queue("release", "sender@remote.test", 51)
        self.assertEqual(self.rows()["b@customer.test"][0], "bounced")
        view = done(self.db.read("show", thd_show, "Q1"))
        self.assertEqual(view.recipients[0].last_error,
                         "5.4.6 Too many hops (51 Received header fields, limit 50)")
        # nothing went to the customer's server; the one DSN went to the sender
        [(_hop, sender, rcpts, body, _tls)] = self.connector.delivered
        self.assertEqual((sender, rcpts), ("", ["sender@remote.test"]))
        report: Any = message_from_bytes(body)
        [group] = report.get_payload()[1].get_payload()[1:]
        self.assertEqual((group["Final-Recipient"], group["Status"]),
                         ("rfc822; b@customer.test", "5.4.6"))

    async def test_a_body_the_smtp_server_accepted_is_not_counted_again(self) -> None:
        # An AcceptedBody's Received fields were counted against the same limit by the
        # server as they came in; only a body from elsewhere (or the store) is counted here.
        env = envelope("sender@remote.test", ("b@customer.test", self.domain))
        await self.q.spool.accept("Q1", env, AcceptedBody(looped(51)))
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])

    async def test_a_queued_message_at_the_limit_is_delivered(self) -> None:
        await self.queue("release", "sender@remote.test", 50)
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])
        self.assertEqual(self.connector.delivered[0][3], looped(50))

    async def test_a_looping_bounce_is_dropped_without_another_bounce(self) -> None:
        await self.queue("bounce", "", 60)
        self.assertEqual(self.rows()["b@customer.test"][0], "bounced")
        self.assertEqual(self.connector.delivered, [])

    async def test_the_limit_is_the_smtp_max_hops_setting(self) -> None:
        self.runner.max_hops = 100
        await self.queue("digest", "sender@remote.test", 60)
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])

    def test_build_queue_reads_max_hops_from_the_smtp_table(self) -> None:
        from prometheus_client import CollectorRegistry

        from mailcore.config import Config
        from mailcore.queue.assembly import build_queue
        from mailcore.smtp.hops import DEFAULT_MAX_HOPS

        def runner_of(config: Config) -> Any:
            return build_queue(config, self.db, self.clock, CollectorRegistry(),
                               connector=self.connector, settings=self.q.settings).runner

        self.assertEqual(runner_of(Config()).max_hops, DEFAULT_MAX_HOPS)
        self.assertEqual(runner_of(Config(sections={"smtp": {"max_hops": 7}})).max_hops, 7)

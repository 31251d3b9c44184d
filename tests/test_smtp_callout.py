"""Recipient verification at the next hop (`[smtp] verify_recipients`,
mailcore.gateway.callout): the SMTP server asks a served domain's next hop at RCPT, over the
queue's own client, with MAIL FROM:<> and RCPT TO, never DATA. The next hop is our test
sink joined to the client in memory (iosim); time is a Clock; the store is SQLite."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import insert
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.gateway import callout
from mailcore.gateway.callout import (
    DELIVERABLE,
    PROBE_IDLE,
    UNDELIVERABLE,
    UNKNOWN,
    RecipientVerifier,
    VerdictSweeper,
)
from mailcore.gateway.domains import DomainService
from mailcore.mailapi.delivery import HostedAddresses
from mailcore.queue.routing import Hop, Router
from mailcore.queue.runner import Connector
from mailcore.queue.settings import QueueSettings
from mailcore.smtp.client import SMTPClientProtocol, SMTPSession
from mailcore.smtp.server import SMTPServerFactory
from mailcore.smtp.settings import SMTPSettings
from mailcore.store.schema import mailboxes, recipient_verdicts
from tests.support.db import synchronous_database
from tests.support.mailsink import SinkProtocol, SinkState
from tests.support.smtpsession import RecordingSink, Session, served_domains

NOW = 1_750_000_000.0


class SinkConnector(Connector):
    """Connections to the test sink, in memory: each is a real SMTPClientProtocol joined to
    a SinkProtocol by iosim, pumped by `flush()`. `down`: connections are refused; `stall`:
    they never open."""

    def __init__(self, clock: Clock, state: SinkState) -> None:
        self.clock = clock
        self.state = state
        self.pumps: list[iosim.IOPump] = []
        self.connects: list[Hop] = []
        self.down = False
        self.stall = False

    def connect(self, hop: Hop) -> defer.Deferred[SMTPSession]:
        self.connects.append(hop)
        if self.down:
            return defer.fail(ConnectionRefusedError("Connection refused"))
        if self.stall:
            return defer.Deferred()
        server = SinkProtocol(self.state)
        client = SMTPClientProtocol(self.clock, 30.0)
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client), greet=False)
        self.pumps.append(pump)
        session = SMTPSession(client, helo_name="mx.gateway.test", data_timeout=60.0)
        return defer.Deferred.fromCoroutine(self._handshake(session))

    async def _handshake(self, session: SMTPSession) -> SMTPSession:
        await session.handshake()
        return session

    def tls_creator(self, hop: Hop, verify: bool) -> Any:  # pragma: no cover - no STARTTLS
        raise AssertionError("the sink offers no STARTTLS")

    def check_peer(self, session: SMTPSession, hop: Hop) -> None:  # pragma: no cover
        raise AssertionError("the sink offers no STARTTLS")

    def flush(self) -> None:
        for _ in range(10):
            for pump in self.pumps:
                pump.flush()


# Next hops' RCPT replies by local part: refusals of the recipient itself, and refusals
# that say nothing of it.
REPLIES = {
    "plain": b"550 No such user here",
    "moved": b"551 5.1.6 User has moved; please try <b@example.org>",
    "syntax": b"553 5.1.3 Bad recipient address syntax",
    "disabled": b"550-5.2.1 The email account that you tried to reach is disabled.\r\n"
                b"550 5.2.1 Learn more at the help centre",
    "relay": b"554 5.7.1 <relay@example.com>: Relay access denied",
    "blocked": b"550 5.7.1 Client host rejected: blocked",
    "sender": b"553 5.1.8 <>: Sender address rejected: Domain not found",
    "policy": b"552 5.2.2 Mailbox full",
    "service": b"554 Transaction failed",
}


class CalloutTestCase(TestCase):
    """example.com (no address list: verified) and listed.example (john, postmaster), both
    relayed to mx.example.net; its sink refuses nobody@ and answers later@ 451."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(NOW)
        self.db = synchronous_database()
        self.domains: DomainService = await served_domains(self.db, self.clock)
        self.state = SinkState(rcpt_reply=self.rcpt_reply)
        self.connector = SinkConnector(self.clock, self.state)
        self.registry = CollectorRegistry()
        self.sink = RecordingSink()
        self.sessions: list[Session] = []
        self.verifiers: list[RecipientVerifier] = []
        self.addCleanup(self.no_timers_left)

    @staticmethod
    def rcpt_reply(address: str) -> bytes | None:
        if address.lower().startswith("nobody@"):
            return b"550 5.1.1 <" + address.encode() + b">: no such user here"
        if address.startswith("odd@"):
            return "550 5.1.1 caf\u00e9 \x01gone".encode()
        if address.startswith("later@"):
            return b"451 4.3.0 try again later"
        if address.startswith("Victim@"):  # a next hop that tells Victim from victim
            return b"550 5.1.1 no such user (local parts are case-sensitive here)"
        if address.startswith("long"):
            return b"550 5.1.1 " + b"x" * 600
        return REPLIES.get(address.partition("@")[0])

    def make_factory(self, local: HostedAddresses | None = None,
                     **settings: Any) -> SMTPServerFactory:
        smtp = SMTPSettings(hostname="mx.gateway.test", verify_recipients=True, **settings)
        router = Router(self.db, self.clock, QueueSettings(node_id="node-a"), local=local)
        self.registry = CollectorRegistry()
        self.verifier = RecipientVerifier(smtp, self.db, self.clock, self.domains, router,
                                          self.connector, registry=self.registry)
        self.verifiers.append(self.verifier)
        return SMTPServerFactory(smtp, self.domains, self.sink, self.clock,
                                 verifier=self.verifier)

    def no_timers_left(self) -> None:
        """At the end, as at the daemon's stop: the sessions closed and the verifier stopped
        (its idle probe connections QUIT), nothing is left open or pending."""
        for s in self.sessions:
            s.close()
        for verifier in self.verifiers:
            stopped = verifier.stopService()
            self.connector.flush()
            self.successResultOf(stopped)
            self.assertEqual(verifier._hops, {})
        self.connector.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def session(self, factory: SMTPServerFactory, client_ip: str = "192.0.2.10") -> Session:
        s = Session(factory, client_ip=client_ip)
        self.sessions.append(s)
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<someone@remote.test>\r\n"), ["250"])
        return s

    def rcpt(self, s: Session, address: str) -> list[str]:
        """RCPT TO:<address>, the probe carried through, and the server's reply."""
        replies = s.send(f"RCPT TO:<{address}>\r\n".encode())
        self.connector.flush()
        return replies + s.replies()

    def metric(self, name: str, result: str) -> float:
        value = self.registry.get_sample_value(f"mailcore_smtp_verify_{name}_total",
                                               {"result": result})
        return value or 0.0

    def stored(self) -> list[tuple[str, bool, float]]:
        def txn(conn: Any) -> list[tuple[str, bool, float]]:
            rows = conn.execute(recipient_verdicts.select().order_by("address")).all()
            return [(r.address, r.deliverable, r.expires_at) for r in rows]

        return self.successResultOf(self.db.run("read", txn))


class VerificationTests(CalloutTestCase):
    def test_an_address_the_next_hop_takes_is_accepted_and_no_data_is_sent(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "user@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.state.commands, [
            b"EHLO mx.gateway.test", b"MAIL FROM:<>", b"RCPT TO:<user@example.com>",
            b"RSET"])
        self.assertEqual([h.label for h in self.connector.connects], ["mx.example.net:25"])
        self.clock.advance(PROBE_IDLE)  # kept for the next probe that long, then closed
        self.connector.flush()
        self.assertEqual(self.state.commands[-1], b"QUIT")
        self.assertEqual(self.state.messages, [])
        self.assertEqual(self.metric("probes", DELIVERABLE), 1)
        self.assertEqual(self.stored(), [("user@example.com", True, NOW + 604_800)])
        # The message itself is queued as usual.
        self.assertEqual(s.codes(b"DATA\r\nSubject: hi\r\n\r\nhi\r\n.\r\n"), ["354", "250"])
        self.assertEqual(len(self.sink.messages), 1)

    def test_an_address_the_next_hop_refuses_is_refused_550(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "nobody@example.com"), [
            "550 5.1.1 <nobody@example.com>: Recipient address rejected: undeliverable "
            "address (550 5.1.1 <nobody@example.com>: no such user here)"])
        self.assertEqual(self.metric("probes", UNDELIVERABLE), 1)
        self.assertEqual(self.stored(), [("nobody@example.com", False, NOW + 10_800)])
        self.assertNotIn(b"DATA", self.state.commands)
        self.assertEqual(s.codes(b"DATA\r\n"), ["554"])  # no recipient stands

    def test_only_printable_ascii_of_the_next_hops_reply_is_quoted(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "odd@example.com"), [
            "550 5.1.1 <odd@example.com>: Recipient address rejected: undeliverable address "
            "(550 5.1.1 caf? ?gone)"])

    def test_the_reply_quoting_the_next_hop_stays_within_512_octets(self) -> None:
        s = self.session(self.make_factory())
        address = "long" + "l" * 60 + "@example.com"
        [reply] = self.rcpt(s, address)
        self.assertTrue(reply.startswith(f"550 5.1.1 <{address}>: Recipient address "
                                         "rejected: undeliverable address (550 5.1.1 xxx"),
                        reply)
        # The longest address (64 + 1 + 255 octets) would still fit.
        self.assertLessEqual(len(reply) + 2 + (320 - len(address)), 512)

    def test_only_a_refusal_of_the_recipient_itself_is_undeliverable(self) -> None:
        """A 550, 551 or 553 whose enhanced status code, if any, is about the address
        (RFC 3463 5.1.x but the sender's 5.1.7/5.1.8, or 5.2.1). Any other 5xx (a relay
        refusal, a blocked client, a full mailbox) was taken as undeliverable too and
        kept: every address of the domain refused 550 for verify_negative_ttl."""
        s = self.session(self.make_factory())
        for local in ("plain", "moved", "syntax", "disabled"):
            with self.subTest(local=local):
                [reply] = self.rcpt(s, f"{local}@example.com")
                self.assertTrue(reply.startswith(f"550 5.1.1 <{local}@example.com>: "
                                                 "Recipient address rejected: "
                                                 "undeliverable address"), reply)
        for local in ("relay", "blocked", "sender", "policy", "service"):
            with self.subTest(local=local):
                self.assertEqual(self.rcpt(s, f"{local}@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.metric("probes", UNDELIVERABLE), 4)
        self.assertEqual(self.metric("probes", UNKNOWN), 5)
        self.assertEqual([address for address, _, _ in self.stored()], [
            "disabled@example.com", "moved@example.com", "plain@example.com",
            "syntax@example.com"])

    def test_a_refused_mail_from_is_no_answer(self) -> None:
        self.state.mail_reply = b"550 5.7.1 <>: null sender refused"
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "user@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.metric("probes", UNKNOWN), 1)
        self.assertEqual(self.stored(), [])

    def test_no_answer_accepts_by_default(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "later@example.com"), ["250 2.1.5 Ok"])  # a 4xx
        self.clock.advance(PROBE_IDLE)  # (its connection closed)
        self.connector.flush()
        self.connector.down = True
        self.assertEqual(self.rcpt(s, "user@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.metric("probes", UNKNOWN), 2)
        self.assertEqual(self.stored(), [])  # no answer is kept

    def test_no_answer_is_450_when_verify_unreachable_is_defer(self) -> None:
        s = self.session(self.make_factory(verify_unreachable="defer"))
        self.assertEqual(self.rcpt(s, "later@example.com"), [
            "450 4.1.1 <later@example.com>: Recipient address rejected: unverified address "
            "(451 4.3.0 try again later)"])
        self.clock.advance(PROBE_IDLE)  # (its connection closed)
        self.connector.flush()
        self.connector.down = True
        [reply] = self.rcpt(s, "user@example.com")
        self.assertTrue(reply.startswith("450 4.1.1 <user@example.com>: Recipient address "
                                         "rejected: unverified address ("), reply)

    def test_a_next_hop_that_does_not_answer_in_verify_timeout_is_no_answer(self) -> None:
        for unreachable, expected in (("accept", "250"), ("defer", "450")):
            with self.subTest(unreachable=unreachable):
                self.connector.stall = True
                s = self.session(self.make_factory(verify_unreachable=unreachable,
                                                   verify_timeout=10.0))
                self.assertEqual(self.rcpt(s, "user@example.com"), [])  # waiting
                self.clock.advance(9.9)
                self.assertEqual(s.replies(), [])
                self.clock.advance(0.1)
                [reply] = s.replies()
                self.assertEqual(reply[:3], expected, reply)

    def test_an_answer_is_kept_and_shared_without_another_probe(self) -> None:
        factory = self.make_factory()
        s = self.session(factory)
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")
        self.assertEqual(self.rcpt(s, "user@example.com"), ["250 2.1.5 Ok"])
        # Another session (as on another node: the answers are in the store), any case of
        # the domain.
        self.make_factory()  # a verifier of its own, nothing in memory
        other = self.session(SMTPServerFactory(factory.settings, self.domains, self.sink,
                                               self.clock, verifier=self.verifier))
        [refused] = self.rcpt(other, "nobody@Example.com")
        self.assertTrue(refused.startswith("550 5.1.1 <nobody@Example.com>: Recipient address "
                                           "rejected: undeliverable address (550 5.1.1 "
                                           "<nobody@example.com>: no such user here)"),
                        refused)
        self.assertEqual(self.rcpt(other, "user@EXAMPLE.COM"), ["250 2.1.5 Ok"])
        self.assertEqual(len(self.connector.connects), 1)  # the two probes, one connection
        self.assertEqual(self.state.commands.count(b"MAIL FROM:<>"), 2)
        self.assertEqual(self.metric("cache_hits", UNDELIVERABLE), 1)
        self.assertEqual(self.metric("cache_hits", DELIVERABLE), 1)

    def test_an_answer_is_kept_for_the_local_part_as_written(self) -> None:
        """RFC 5321 2.4: a local part is the next hop's to compare, with or without case,
        as _add_recipient keeps Bob and bob apart. A refusal of Victim@ (by a next hop
        that tells them apart), kept by lower-cased address, had every RCPT for victim@
        refused 550 for verify_negative_ttl; and a RCPT for victim@ while Victim@'s probe
        ran got its answer."""
        factory = self.make_factory()
        first, second = self.session(factory), self.session(factory)
        self.assertEqual(first.send(b"RCPT TO:<Victim@example.com>\r\n"), [])
        self.assertEqual(second.send(b"RCPT TO:<victim@example.com>\r\n"), [])
        self.connector.flush()
        self.assertEqual(first.replies()[0][:3], "550")
        self.assertEqual(second.replies(), ["250 2.1.5 Ok"])
        self.assertEqual(self.rcpt(self.session(factory), "victim@EXAMPLE.com"),
                         ["250 2.1.5 Ok"])  # the domain is compared without case
        self.assertEqual(len(self.connector.connects), 2)
        self.assertEqual(self.stored(), [("Victim@example.com", False, NOW + 10_800),
                                         ("victim@example.com", True, NOW + 604_800)])

    async def test_an_answer_holds_only_for_the_route_that_gave_it(self) -> None:
        """An answer kept by address alone outlived the route that gave it: after `domain
        set --redirect-to` (or the domain removed and added again) the old next hop's
        refusal held for verify_negative_ttl, its acceptance for days."""
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")
        domain = self.domains.lookup("example.com")
        assert domain is not None
        await self.domains.update("example.com", {"redirect_to": "mx2.example.net"})
        s = self.session(self.make_factory())  # a Router that has not cached the old route
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")  # now kept
        self.assertEqual([h.label for h in self.connector.connects],
                         ["mx.example.net:25", "mx2.example.net:25"])
        # Removed and added again, to the same next hop: a new domain id.
        await self.domains.remove("example.com")
        await self.domains.add("example.com", domain.owner_id, "mx2.example.net")
        await self.domains.refresh()
        added = self.domains.lookup("example.com")
        assert added is not None
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")
        self.assertEqual(len(self.connector.connects), 3)
        self.assertEqual(self.metric("probes", UNDELIVERABLE), 1)
        self.assertEqual(self.metric("cache_hits", UNDELIVERABLE), 0)

        def txn(conn: Any) -> list[tuple[str, int, str]]:
            return [(r.address, r.domain_id, r.hop)
                    for r in conn.execute(recipient_verdicts.select()).all()]

        self.assertEqual(await self.db.run("read", txn),
                         [("nobody@example.com", added.id, "mx2.example.net:25")])

    def test_an_answer_expires(self) -> None:
        s = self.session(self.make_factory(verify_negative_ttl=3600.0,
                                           verify_positive_ttl=10_800.0))
        factory = s.protocol.factory
        self.rcpt(s, "nobody@example.com")
        self.rcpt(s, "user@example.com")
        self.clock.advance(3600)  # the refusal's hour is up, the acceptance holds
        s = self.session(factory)
        self.rcpt(s, "nobody@example.com")
        self.rcpt(s, "user@example.com")
        self.assertEqual(len(self.connector.connects), 2)  # (a connection per burst)
        self.assertEqual(self.state.commands.count(b"MAIL FROM:<>"), 3)
        # The sweep deletes what expired, and only that.
        self.clock.advance(3600)
        self.assertEqual(self.successResultOf(self.verifier.sweep()), 1)
        self.assertEqual(self.stored(), [("user@example.com", True, NOW + 10_800)])

    def test_the_sweeper_sweeps(self) -> None:
        self.make_factory(verify_negative_ttl=60.0)
        s = self.session(SMTPServerFactory(self.verifier.settings, self.domains, self.sink,
                                           self.clock, verifier=self.verifier))
        self.rcpt(s, "nobody@example.com")
        sweeper = VerdictSweeper(self.verifier, every=100.0)
        sweeper.startService()
        self.assertEqual(len(self.stored()), 1)  # not expired at the first tick
        self.clock.advance(100)
        self.assertEqual(self.stored(), [])
        self.successResultOf(defer.maybeDeferred(sweeper.stopService))

    def test_concurrent_rcpts_for_one_address_share_one_probe(self) -> None:
        factory = self.make_factory()
        sessions = [self.session(factory) for _ in range(3)]
        for s, address in zip(sessions, ("user@example.com", "user@Example.com",
                                         "user@EXAMPLE.com"), strict=True):
            self.assertEqual(s.send(f"RCPT TO:<{address}>\r\n".encode()), [])
        self.connector.flush()
        self.assertEqual([s.replies() for s in sessions], [["250 2.1.5 Ok"]] * 3)
        self.assertEqual(len(self.connector.connects), 1)
        self.assertEqual(self.metric("probes", DELIVERABLE), 1)

    def test_probes_to_one_next_hop_are_bounded(self) -> None:
        factory = self.make_factory(verify_hop_concurrency=2)
        self.connector.stall = True
        sessions = [self.session(factory, f"192.0.2.{10 + i}") for i in range(3)]
        for i, s in enumerate(sessions):
            s.send(f"RCPT TO:<user{i}@example.com>\r\n".encode())
        self.assertEqual(len(self.connector.connects), 2)  # the third waits its turn
        self.clock.advance(10)  # all three out of time: the waiting one too
        self.assertEqual([s.replies() for s in sessions], [["250 2.1.5 Ok"]] * 3)
        self.assertEqual(self.verifier._hops, {})  # nothing held for the hop

    def test_a_probe_connections_quit_holds_its_slot_of_the_next_hop(self) -> None:
        """The answer is given at once, but the slot is freed only once the connection
        closes, idle and during its QUIT: released at the answer, a next hop that does not
        answer QUIT had QUIT_TIMEOUT (10 s) of closing connections pile up past
        verify_hop_concurrency."""
        factory = self.make_factory(verify_hop_concurrency=1, verify_timeout=15.0)
        self.state.answer_quit = False
        first, second = self.session(factory), self.session(factory, "192.0.2.11")
        self.assertEqual(self.rcpt(first, "user0@example.com"), ["250 2.1.5 Ok"])
        self.clock.advance(PROBE_IDLE)  # idle that long: it says QUIT, not answered
        self.connector.flush()
        self.assertEqual(self.state.commands[-1], b"QUIT")
        self.assertEqual(self.rcpt(second, "user1@example.com"), [])  # waits for the slot
        self.assertEqual(len(self.connector.connects), 1)
        self.clock.advance(10)  # QUIT_TIMEOUT: the first connection is closed
        self.connector.flush()
        self.assertEqual(second.replies(), ["250 2.1.5 Ok"])
        self.assertEqual(len(self.connector.connects), 2)
        self.assertEqual(self.metric("probes", DELIVERABLE), 2)
        for wait in (PROBE_IDLE, 10):  # idle, then not answered QUIT: closed
            self.clock.advance(wait)
            self.connector.flush()
        self.assertEqual(self.verifier._hops, {})

    def test_one_client_has_at_most_two_probes_under_way(self) -> None:
        """MAX_CLIENT_PROBES: one client's 20 sessions, each with a RCPT for a new address,
        held every slot of the next hop (and, per node, flooded it); past two, its RCPT
        takes verify_unreachable's rule without a probe. An IPv6 client is counted by its
        /64."""
        factory = self.make_factory(verify_unreachable="defer")
        self.connector.stall = True
        same = [self.session(factory, f"2001:db8:1:2::{i}") for i in range(1, 4)]
        for i, s in enumerate(same[:2]):
            self.assertEqual(self.rcpt(s, f"user{i}@example.com"), [])  # probing
        self.assertEqual(self.rcpt(same[2], "user2@example.com"), [
            "450 4.1.1 <user2@example.com>: Recipient address rejected: unverified address "
            "(too many verifications for this client at once)"])
        other = self.session(factory, "192.0.2.20")
        self.assertEqual(self.rcpt(other, "user3@example.com"), [])  # probing
        self.assertEqual(len(self.connector.connects), 3)
        self.clock.advance(10)  # out of time: the slots are free again
        self.assertEqual(self.verifier._clients, {})
        self.assertEqual(self.metric("probes", UNKNOWN), 3)  # the refused one was none
        self.connector.stall = False
        self.assertEqual(self.rcpt(same[2], "user2@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(len(self.connector.connects), 4)

    def test_only_served_relayed_domains_without_a_list_are_probed(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "john@listed.example"), ["250 2.1.5 Ok"])  # listed
        self.assertEqual(self.rcpt(s, "jane@listed.example")[0][:3], "550")  # not listed
        self.assertEqual(self.rcpt(s, "victim@elsewhere.test")[0][:3], "550")  # not served
        self.assertEqual(self.rcpt(s, "Postmaster@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.rcpt(s, "<postmaster>".strip("<>")), ["250 2.1.5 Ok"])
        self.assertEqual(self.connector.connects, [])

    def test_a_hosted_mailbox_of_a_relayed_domain_is_not_probed_nor_kept(self) -> None:
        domain = self.domains.lookup("example.com")
        assert domain is not None
        self.successResultOf(self.db.run("box", lambda conn: conn.execute(
            insert(mailboxes).values(address="box@example.com", owner_id=domain.owner_id,
                                     created_at=1.0, domain_id=domain.id))))
        s = self.session(self.make_factory(local=HostedAddresses(self.db, self.clock)))
        self.assertEqual(self.rcpt(s, "box@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual((self.connector.connects, self.stored()), ([], []))

    def test_off_by_default_nothing_is_probed(self) -> None:
        self.assertFalse(SMTPSettings().verify_recipients)
        factory = SMTPServerFactory(SMTPSettings(hostname="mx.gateway.test"), self.domains,
                                    self.sink, self.clock)
        self.assertIsNone(factory.verifier)
        s = self.session(factory)
        self.assertEqual(self.rcpt(s, "nobody@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.connector.connects, [])


class ConnectionReuseTests(CalloutTestCase):
    """A probe connection is kept PROBE_IDLE seconds for the next probe to its next hop, as
    Postfix's verify probes reuse its smtp client's cached connections: a connection per
    probe had a burst of new addresses (a dictionary attack) cost the customer's server a
    connection each."""

    def ehlos(self) -> int:
        return self.state.commands.count(b"EHLO mx.gateway.test")

    def test_probes_to_one_next_hop_in_a_row_share_one_connection(self) -> None:
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "user0@example.com"), ["250 2.1.5 Ok"])
        self.clock.advance(PROBE_IDLE - 0.1)
        self.assertEqual(self.rcpt(s, "nobody@example.com")[0][:3], "550")
        self.assertEqual(self.rcpt(self.session(self.make_factory()), "user1@example.com"),
                         ["250 2.1.5 Ok"])  # (another verifier: connections of its own)
        self.assertEqual(self.rcpt(s, "user2@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.state.commands[:10], [
            b"EHLO mx.gateway.test", b"MAIL FROM:<>", b"RCPT TO:<user0@example.com>",
            b"RSET", b"MAIL FROM:<>", b"RCPT TO:<nobody@example.com>", b"RSET",
            b"EHLO mx.gateway.test", b"MAIL FROM:<>", b"RCPT TO:<user1@example.com>"])
        self.assertEqual(self.state.commands[11:], [
            b"MAIL FROM:<>", b"RCPT TO:<user2@example.com>", b"RSET"])
        self.assertEqual((len(self.connector.connects), self.ehlos()), (2, 2))
        # Idle for PROBE_IDLE, each connection says QUIT and frees its slot.
        self.clock.advance(PROBE_IDLE)
        self.connector.flush()
        self.assertEqual(self.state.commands.count(b"QUIT"), 2)
        self.assertEqual([v._hops for v in self.verifiers], [{}, {}])

    def test_a_probe_waiting_for_the_next_hop_takes_the_connection_given_back(self) -> None:
        factory = self.make_factory(verify_hop_concurrency=1)
        first, second = self.session(factory), self.session(factory, "192.0.2.11")
        self.assertEqual(first.send(b"RCPT TO:<user0@example.com>\r\n"), [])
        self.assertEqual(second.send(b"RCPT TO:<user1@example.com>\r\n"), [])  # waits
        self.connector.flush()
        self.assertEqual([first.replies(), second.replies()], [["250 2.1.5 Ok"]] * 2)
        self.assertEqual((len(self.connector.connects), self.ehlos()), (1, 1))
        self.assertNotIn(b"QUIT", self.state.commands)

    def test_a_connection_carries_a_bounded_number_of_probes(self) -> None:
        """PROBES_PER_CONNECTION (their RSETs are junk commands to the hop), and at most
        REFUSALS_PER_CONNECTION refused RCPTs (errors to the hop, which slows down or cuts
        off a client making too many)."""
        self.patch(callout, "PROBES_PER_CONNECTION", 3)
        self.patch(callout, "REFUSALS_PER_CONNECTION", 2)
        s = self.session(self.make_factory())
        for local in ("user0", "user1", "user2", "user3"):
            self.assertEqual(self.rcpt(s, f"{local}@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.ehlos(), 2)
        self.assertEqual(self.state.commands.count(b"QUIT"), 1)  # after the third
        for local in ("nobody", "Nobody", "NOBODY"):
            self.assertEqual(self.rcpt(s, f"{local}@example.com")[0][:3], "550")
        # The fourth probe's connection took two refusals; the third one opened.
        self.assertEqual((self.ehlos(), self.state.commands.count(b"QUIT")), (3, 2))
        self.assertEqual(self.metric("probes", UNDELIVERABLE), 3)

    def test_a_connection_the_next_hop_closes_while_idle_is_not_used(self) -> None:
        s = self.session(self.make_factory(verify_hop_concurrency=1))  # its slot is reused
        self.assertEqual(self.rcpt(s, "user0@example.com"), ["250 2.1.5 Ok"])
        # The hop gives up on it (a 421 of its own idle timeout): dropped at once.
        self.connector.pumps[0].serverIO.write(b"421 4.4.2 sink.test Error: timeout\r\n")
        self.connector.flush()
        self.assertEqual(self.rcpt(s, "user1@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual((len(self.connector.connects), self.ehlos()), (2, 2))
        self.assertEqual(self.state.commands[-3:], [
            b"MAIL FROM:<>", b"RCPT TO:<user1@example.com>", b"RSET"])
        self.assertEqual(self.metric("probes", DELIVERABLE), 2)

    def test_a_dead_idle_connection_gives_way_to_another_idle_one(self) -> None:
        """The last connection used, closed by the hop while idle, is dropped and the next
        idle one used: no new connection while one is open and idle."""
        factory = self.make_factory()
        first, second = self.session(factory), self.session(factory, "192.0.2.11")
        self.assertEqual(first.send(b"RCPT TO:<user0@example.com>\r\n"), [])
        self.assertEqual(second.send(b"RCPT TO:<user1@example.com>\r\n"), [])
        self.connector.flush()  # two connections, idle
        self.assertEqual([first.replies(), second.replies()], [["250 2.1.5 Ok"]] * 2)
        [pool] = self.verifier._hops.values()
        last = pool.idle[-1].session.protocol
        [pump] = [p for p in self.connector.pumps if p.client is last]
        pump.serverIO.write(b"421 4.4.2 sink.test Error: timeout\r\n")
        self.connector.flush()
        self.assertEqual(self.rcpt(first, "user2@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual((len(self.connector.connects), self.ehlos()), (2, 2))
        self.assertEqual(pool.open, 1)

    def test_a_reused_connection_that_fails_is_no_verdict_a_new_one_is_asked(self) -> None:
        """A hop that has had enough of our connection (its error or junk command limit:
        421, or it hangs up) tells nothing of the recipient: the probe is made again on
        a new connection, as it was before connections were reused. A 421 on a new
        connection is no answer, and no RSET follows it."""
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "user0@example.com"), ["250 2.1.5 Ok"])
        closing = iter([b"421 4.7.0 sink.test Error: too many errors"])
        self.state.rcpt_reply = lambda address: next(closing, None)
        self.assertEqual(self.rcpt(s, "user1@example.com"), ["250 2.1.5 Ok"])
        self.assertEqual(self.state.commands[4:], [
            b"MAIL FROM:<>", b"RCPT TO:<user1@example.com>",  # 421: dropped
            b"EHLO mx.gateway.test", b"MAIL FROM:<>", b"RCPT TO:<user1@example.com>",
            b"RSET"])
        self.assertEqual(self.stored(), [("user0@example.com", True, NOW + 604_800),
                                         ("user1@example.com", True, NOW + 604_800)])
        self.state.rcpt_reply = lambda address: b"421 4.3.2 sink.test going down"
        self.assertEqual(self.rcpt(s, "user2@example.com"), ["250 2.1.5 Ok"])  # UNKNOWN
        self.assertEqual(self.state.commands[10:], [
            b"MAIL FROM:<>", b"RCPT TO:<user2@example.com>",
            b"EHLO mx.gateway.test", b"MAIL FROM:<>", b"RCPT TO:<user2@example.com>",
            b"QUIT"])
        self.assertEqual(self.metric("probes", UNKNOWN), 1)
        self.assertEqual((len(self.connector.connects), self.verifier._hops), (3, {}))

    def test_a_refusal_the_hop_hangs_up_after_stands(self) -> None:
        """A hop that drops the connection right after its answer to RCPT (Exim's `drop`
        ACL: a 550, then the hang-up) has answered: the RSET that finds the connection gone
        costs neither the verdict nor a second RCPT on a new connection."""
        s = self.session(self.make_factory())
        self.assertEqual(self.rcpt(s, "user0@example.com"), ["250 2.1.5 Ok"])

        def drop(address: str) -> bytes:  # the reply, then the hang-up
            transport = self.connector.pumps[-1].serverIO
            write = transport.write

            def write_and_close(data: bytes) -> None:
                write(data)
                transport.loseConnection()

            transport.write = write_and_close  # type: ignore[method-assign]
            return b"550 5.1.1 no such user, goodbye"

        self.state.rcpt_reply = drop
        self.assertEqual(self.rcpt(s, "nobody@example.com"), [
            "550 5.1.1 <nobody@example.com>: Recipient address rejected: undeliverable "
            "address (550 5.1.1 no such user, goodbye)"])
        self.assertEqual(self.state.commands.count(b"RCPT TO:<nobody@example.com>"), 1)
        self.assertEqual((len(self.connector.connects), self.verifier._hops), (1, {}))
        self.assertEqual(self.metric("probes", UNDELIVERABLE), 1)

    def test_the_probe_connections_close_when_the_daemon_stops(self) -> None:
        factory = self.make_factory()
        s, other = self.session(factory), self.session(factory, "192.0.2.11")
        self.assertEqual(s.send(b"RCPT TO:<user0@example.com>\r\n"), [])
        self.assertEqual(other.send(b"RCPT TO:<user1@example.com>\r\n"), [])
        self.connector.flush()  # two connections, idle
        self.assertEqual([s.replies(), other.replies()], [["250 2.1.5 Ok"]] * 2)
        self.assertEqual(s.send(b"RCPT TO:<user2@example.com>\r\n"), [])  # on one of them
        stopped = self.verifier.stopService()
        self.assertNoResult(stopped)  # the idle one says QUIT now...
        self.connector.flush()
        self.successResultOf(stopped)
        # ... and the probe under way has its answer, then its connection says QUIT.
        self.assertEqual(s.replies(), ["250 2.1.5 Ok"])
        self.assertEqual((self.ehlos(), self.state.commands.count(b"QUIT")), (2, 2))
        self.assertEqual(self.state.commands[-3:], [b"RCPT TO:<user2@example.com>", b"RSET",
                                                    b"QUIT"])
        self.assertEqual(self.verifier._hops, {})  # (no timer left: see no_timers_left)


    def test_at_the_daemons_stop_a_waiting_probe_takes_the_connection(self) -> None:
        """A probe waiting for the hop's last slot when the daemon stops is made on the
        connection given back, which then says QUIT: not closed first and a new one
        opened in its slot, a round trip (QUIT, or QUIT_TIMEOUT) more of the probe's
        verify_timeout."""
        factory = self.make_factory(verify_hop_concurrency=1)
        first, second = self.session(factory), self.session(factory, "192.0.2.11")
        self.assertEqual(first.send(b"RCPT TO:<user0@example.com>\r\n"), [])
        self.assertEqual(second.send(b"RCPT TO:<user1@example.com>\r\n"), [])  # waits
        stopped = self.verifier.stopService()
        self.connector.flush()
        self.successResultOf(stopped)
        self.assertEqual([first.replies(), second.replies()], [["250 2.1.5 Ok"]] * 2)
        self.assertEqual((len(self.connector.connects), self.ehlos()), (1, 1))
        self.assertEqual(self.state.commands[-3:], [b"RCPT TO:<user1@example.com>", b"RSET",
                                                    b"QUIT"])
        self.assertEqual(self.verifier._hops, {})


class SettingsTests(TestCase):
    def test_the_verify_keys_are_read_and_checked(self) -> None:
        config = Config(sections={"smtp": {
            "verify_recipients": True, "verify_unreachable": "defer", "verify_timeout": 5,
            "verify_positive_ttl": 86400, "verify_negative_ttl": 600,
            "verify_hop_concurrency": 2}})
        settings = SMTPSettings.from_config(config)
        self.assertEqual((settings.verify_recipients, settings.verify_unreachable,
                          settings.verify_timeout, settings.verify_positive_ttl,
                          settings.verify_negative_ttl, settings.verify_hop_concurrency),
                         (True, "defer", 5, 86400, 600, 2))
        for key, value in (("verify_recipients", "yes"), ("verify_unreachable", "450"),
                           ("verify_timeout", 0), ("verify_hop_concurrency", 1.5)):
            with self.subTest(key=key):
                with self.assertRaises(ConfigError):
                    SMTPSettings.from_config(Config(sections={"smtp": {key: value}}))

    def test_verify_timeout_must_be_less_than_command_timeout(self) -> None:
        """Else the RCPT waiting for the next hop is answered 451 4.3.0 at command_timeout,
        and verify_unreachable = "accept" never accepts."""
        smtp = {"verify_recipients": True, "verify_timeout": 30, "command_timeout": 30}
        with self.assertRaisesRegex(ConfigError, "verify_timeout must be less than "
                                                 "command_timeout"):
            SMTPSettings.from_config(Config(sections={"smtp": smtp}))
        # Off, it is not checked: a short command_timeout of old stays valid.
        smtp["verify_recipients"] = False
        self.assertEqual(SMTPSettings.from_config(Config(sections={"smtp": smtp}))
                         .verify_timeout, 30)

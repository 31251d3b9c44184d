"""The inbound ESMTP server, fed raw bytes over a StringTransport with a Clock.

Covers the protocol (EHLO, sequencing, limits, timeouts), the open-relay and smuggling
batteries, pipelining order while checks wait on Deferreds (pitfall 5), STARTTLS input
discarding (pitfall 2), bare CR/LF refusal (pitfall 6), byte-exactness and the Received
header, the hop limit (mail loops), NUL refusal, a first line folded into our Received
field, and `RCPT TO:<postmaster>`.
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
import socket
import tracemalloc
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from mailcore import connlimits
from mailcore.connlimits import peer_key
from mailcore.gateway.domains import DomainService
from mailcore.mailapi.room import MailboxRoom
from mailcore.queue.spool import SpoolError
from mailcore.smtp.client import data_stream
from mailcore.smtp.dotstuff import AcceptedBody, CRLFBody
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.hops import count_received
from mailcore.smtp.server import (
    RECIPIENT_OVERSHOOT,
    STRESS_MIN_CONNECTIONS,
    SMTPServerFactory,
    stress_gauge,
)
from tests.support.db import synchronous_database
from tests.support.logs import logged, logged_at
from tests.support.smtpsession import (
    RecordingSink,
    SendBufferTransport,
    Session,
    TLSStringTransport,
    make_factory,
    served_domains,
)

NOW = 1_750_000_000  # Sun, 15 Jun 2025 15:06:40 +0000
DATE = email.utils.format_datetime(datetime.datetime.fromtimestamp(NOW, datetime.UTC))


def stuff(content: bytes) -> bytes:
    """What a client puts on the wire for `content` (CRLF lines): dots doubled, then the end."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


class ServerTestCase(TestCase):
    """A served example.com (all local parts) and listed.example (john, postmaster)."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(NOW)
        self.db = synchronous_database()
        self.sink = RecordingSink()
        self.sessions: list[Session] = []
        self.addCleanup(self.no_timers_left)
        self.domains: DomainService = await served_domains(self.db, self.clock)
        self.factory = self.make_factory()

    def make_factory(self, **kwargs: Any) -> SMTPServerFactory:
        return make_factory(self.domains, self.sink, self.clock, **kwargs)

    def session(self, factory: SMTPServerFactory | None = None, **kwargs: Any) -> Session:
        s = Session(factory or self.factory, **kwargs)
        self.sessions.append(s)
        return s

    def no_timers_left(self) -> None:
        for s in self.sessions:
            s.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        if not self.sink.pending:  # (a commit still held counts its message)
            for s in self.sessions:  # every octet counted in max_data_memory let go
                self.assertEqual(s.protocol.factory.memory.buffered, 0)
                self.assertEqual(s.protocol.factory.memory.buffered_by, {})

    def gate_directory(self) -> defer.Deferred[None]:
        """Make the directory unloaded, its next load waiting for the returned Deferred."""
        self.domains = DomainService(self.db, self.clock)
        self.factory = self.make_factory()
        gate: defer.Deferred[None] = defer.Deferred()
        read = self.db.read

        def gated(name: str, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            result: defer.Deferred[Any] = defer.Deferred()
            gate.addCallback(lambda _: read(name, fn, *args, **kwargs).chainDeferred(result))
            return result

        self.db.read = gated  # type: ignore[method-assign]
        self.addCleanup(setattr, self.db, "read", read)
        return gate

    def start(self, s: Session, *rcpts: str, sender: str = "sender@remote.test") -> None:
        """EHLO, MAIL and RCPTs that must all succeed, then DATA's 354."""
        s.hello()
        self.assertEqual(s.codes(f"MAIL FROM:<{sender}>\r\n".encode()), ["250"])
        for rcpt in rcpts or ("user@example.com",):
            self.assertEqual(s.codes(f"RCPT TO:<{rcpt}>\r\n".encode()), ["250"], rcpt)
        self.assertEqual(s.send(b"DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])

    def assert_refused_whole(self, wires: Sequence[bytes], reply: str) -> None:
        """Each of `wires` (a message's data and its end), sent at once or an octet at a
        time, is answered `reply` alone, ends the transaction and is never queued."""
        for wire in wires:
            for chunked in (False, True):
                with self.subTest(wire=wire, chunked=chunked):
                    s = self.session()
                    self.start(s)
                    replies: list[str] = []
                    for piece in ([wire[i:i + 1] for i in range(len(wire))] if chunked
                                  else [wire]):
                        replies += s.send(piece)
                    self.assertEqual(replies, [reply])
                    self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
                    s.close()
        self.assertEqual(self.sink.messages, [])


class GreetingTests(ServerTestCase):
    def test_greeting_and_capabilities(self) -> None:
        s = self.session(self.make_factory(tls=object()), transport=TLSStringTransport())
        self.assertEqual(s.greeting, ["220 mx.gateway.test ESMTP Mailcore"])
        self.assertEqual(s.hello(), [
            "250-mx.gateway.test",
            "250-PIPELINING",
            "250-SIZE 52428800",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250 STARTTLS",
        ])

    def test_no_starttls_without_a_certificate_and_never_auth(self) -> None:
        s = self.session()
        lines = s.hello()
        self.assertEqual(lines[-1], "250 ENHANCEDSTATUSCODES")
        self.assertFalse([line for line in lines if "AUTH" in line or "STARTTLS" in line])
        self.assertEqual(s.send(b"STARTTLS\r\n"), ["454 4.7.0 Error: TLS not available"])
        self.assertEqual(s.codes(b"AUTH PLAIN AGVtAHg=\r\n"), ["502"])

    def test_size_follows_the_setting(self) -> None:
        s = self.session(self.make_factory(max_message_size=1000))
        self.assertIn("250-SIZE 1000", s.hello())

    def test_helo_works_and_is_recorded_as_smtp(self) -> None:
        s = self.session()
        self.assertEqual(s.send(b"HELO old.client\r\n"), ["250 mx.gateway.test"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\n"
                                 b"DATA\r\nhi\r\n.\r\n"), ["250", "250", "354", "250"])
        self.assertIn(b" with SMTP id ", self.sink.messages[0].data)
        self.assertEqual(self.sink.messages[0].envelope.helo, "old.client")

    def test_helo_and_ehlo_need_a_name(self) -> None:
        s = self.session()
        self.assertEqual(s.send(b"EHLO\r\n"), ["501 5.5.4 Syntax: EHLO hostname"])
        self.assertEqual(s.send(b"HELO \r\n"), ["501 5.5.4 Syntax: HELO hostname"])

    def test_a_name_with_a_control_character_is_refused(self) -> None:
        s = self.session()
        for name in (b"a\x00b", b"client\x1b[2J", b"a\x7f", b"a\x85b"):
            self.assertEqual(s.send(b"EHLO " + name + b"\r\n"),
                             ["501 5.5.2 Syntax: EHLO hostname (no control characters)"], name)
        self.assertEqual(s.send(b"HELO a\tb\r\n"),
                         ["501 5.5.2 Syntax: HELO hostname (no control characters)"])
        # Nothing was taken: a mail transaction still needs a greeting.
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["503"])
        self.assertIn("250-PIPELINING", s.hello("client.example"))


class TransactionTests(ServerTestCase):
    def test_message_is_queued_with_a_received_header_and_the_exact_bytes(self) -> None:
        s = self.session()
        s.hello("client.example")
        self.assertEqual(s.send(b"MAIL FROM:<sender@remote.test>\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(s.send(b"RCPT TO:<User@Example.COM>\r\n"), ["250 2.1.5 Ok"])
        self.assertEqual(s.send(b"DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        body = b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n\r\n"
        self.assertIn(b"\r\n..leading dot\r\n", stuff(body))
        [reply] = s.send(stuff(body))
        [accepted] = self.sink.messages
        self.assertEqual(reply, f"250 2.0.0 Ok: queued as {accepted.queue_id}")
        self.assertEqual(len(accepted.queue_id), 14)
        domain = self.domains.lookup("example.com")
        assert domain is not None
        self.assertEqual(accepted.envelope, Envelope(
            mail_from="sender@remote.test",
            recipients=(Recipient("User@Example.COM", domain.id),),
            client_ip="192.0.2.10",
            helo="client.example",
            tls=False,
        ))
        header = (
            "Received: from client.example ([192.0.2.10])\r\n"
            f"\tby mx.gateway.test (Mailcore) with ESMTP id {accepted.queue_id}\r\n"
            f"\tfor <User@Example.COM>; {DATE}\r\n"
        ).encode()
        self.assertEqual(accepted.data, header + body)

    def test_transaction_is_reset_after_data(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b"x\r\n.\r\n"), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<u@example.com>\r\n"),
                         ["503 5.5.1 Error: need MAIL command"])

    def test_null_sender_and_several_recipients(self) -> None:
        s = self.session()
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<>\r\nRCPT TO:<a@example.com>\r\n"
                                 b"RCPT TO:<john@listed.example>\r\nRCPT TO:<a@EXAMPLE.com>\r\n"
                                 b"DATA\r\nx\r\n.\r\n"), ["250", "250", "250", "250", "354", "250"])
        [accepted] = self.sink.messages
        self.assertEqual(accepted.envelope.mail_from, "")
        # the same address twice is one recipient
        self.assertEqual([r.address for r in accepted.envelope.recipients],
                         ["a@example.com", "john@listed.example"])
        self.assertNotIn(b"\tfor <", accepted.data)

    def test_empty_message(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b".\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [b""])

    def test_mail_parameters(self) -> None:
        s = self.session()
        s.hello()
        self.assertEqual(s.send(b"MAIL FROM:<a@remote.test> SIZE=52428801\r\n"),
                         ["552 5.3.4 Message size exceeds fixed limit"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test> SIZE=abc\r\n"), ["501"])
        self.assertEqual(s.send(b"MAIL FROM:<a@remote.test> AUTH=<>\r\n"),
                         ["555 5.5.4 Unsupported parameter AUTH"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test> BODY=BINARYMIME\r\n"), ["501"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test> SIZE=52428800 BODY=8BITMIME\r\n"),
                         ["250"])
        self.assertEqual(s.codes(b"RCPT TO:<a@example.com> NOTIFY=NEVER\r\n"), ["555"])

    def test_parameters_need_ehlo(self) -> None:
        s = self.session()
        s.send(b"HELO c.example\r\n")
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test> SIZE=10\r\n"), ["555"])

    def test_lenient_but_safe_spelling(self) -> None:
        s = self.session()
        s.hello()
        self.assertEqual(s.codes(b"mail from: <a@remote.test>\r\nrcpt to:<u@example.com>\r\n"),
                         ["250", "250"])

    def test_accept_failure_is_451_and_loses_nothing(self) -> None:
        s = self.session()
        self.start(s)
        self.sink.fail = True
        self.assertEqual(s.send(b"body\r\n.\r\n"),
                         ["451 4.3.0 Error: queue file write error, try again later"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.sink.fail = False
        self.start(s)
        self.assertEqual(s.codes(b"body\r\n.\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [b"body\r\n"])

    def test_a_failed_spool_commit_is_451_without_a_traceback_per_message(self) -> None:
        """The spool logs why its commits fail, once for a run of them (a full disk, a
        database down); the server adds no traceback per refused message."""
        s = self.session()
        critical = logged_at(self, LogLevel.critical)
        self.start(s)
        self.sink.fail_with = SpoolError("commit failed: database or disk is full")
        self.assertEqual(s.send(b"body\r\n.\r\n"),
                         ["451 4.3.0 Error: queue file write error, try again later"])
        self.assertEqual(critical, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_no_spool_means_451(self) -> None:
        s = self.session(make_factory(self.domains, None, self.clock))
        self.start(s)
        self.assertEqual(s.codes(b"body\r\n.\r\n"), ["451"])
        self.flushLoggedErrors(RuntimeError)


class SequenceTests(ServerTestCase):
    def test_commands_out_of_sequence(self) -> None:
        s = self.session()
        self.assertEqual(s.send(b"MAIL FROM:<a@remote.test>\r\n"),
                         ["503 5.5.1 Error: send HELO/EHLO first"])
        s.hello()
        self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
        self.assertEqual(s.codes(b"DATA\r\n"), ["503"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"MAIL FROM:<a@remote.test>\r\n"),
                         ["503 5.5.1 Error: nested MAIL command"])
        self.assertEqual(s.send(b"DATA\r\n"), ["554 5.5.1 Error: no valid recipients"])
        self.assertEqual(s.codes(b"DATA extra\r\n"), ["501"])

    def test_rset_noop_vrfy_help_quit(self) -> None:
        s = self.session()
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"RSET\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
        self.assertEqual(s.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(s.codes(b"VRFY john\r\n"), ["252"])
        self.assertEqual(s.codes(b"HELP\r\n"), ["214"])
        self.assertEqual(s.send(b"QUIT\r\nNOOP\r\n"), ["221 2.0.0 Bye"])
        self.assertTrue(s.closing)
        self.assertEqual(s.send(b"NOOP\r\n"), [])

    def test_quit_on_plain_tcp_closes_at_once(self) -> None:
        """On a TCP transport whose replies have all been sent, QUIT closes the connection
        while it is answered: no writability turn, no grace timer, the session counted
        out (mailcore.netwrite.close_now). Pipelined input after QUIT is not answered."""
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.setblocking(False)
        self.addCleanup(peer.close)
        reactor = MemoryReactor()
        protocol = self.factory.buildProtocol(("127.0.0.1", 1))
        transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
        protocol.makeConnection(transport)
        self.assertEqual(self.factory.connections, 1)
        protocol.dataReceived(b"EHLO client.test\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(self.factory.connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        received = b""
        while chunk := peer.recv(65536):
            received += chunk
        self.assertTrue(received.startswith(b"220 mx.gateway.test ESMTP Mailcore\r\n"))
        self.assertTrue(received.endswith(b"250 ENHANCEDSTATUSCODES\r\n221 2.0.0 Bye\r\n"),
                        received)

    def test_unknown_commands(self) -> None:
        s = self.session()
        self.assertEqual(s.send(b"EXPN staff\r\nXYZZY\r\n"),
                         ["502 5.5.2 Error: command not recognized"] * 2)
        self.assertFalse(s.closing)

    def test_http_requests_are_dropped(self) -> None:
        s = self.session()
        self.assertEqual(s.codes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ["421"])
        self.assertTrue(s.closing)

    def test_too_many_errors_disconnects(self) -> None:
        s = self.session(self.make_factory(max_errors=3))
        self.assertEqual(s.codes(b"A\r\nB\r\nC\r\nNOOP\r\n"), ["502", "502", "502", "421"])
        self.assertTrue(s.closing)

    def test_recipients_far_over_the_limit_count_as_errors(self) -> None:
        """A sender pipelining all its recipients expects 452s for those over the limit (and
        sends them later): only RECIPIENT_OVERSHOOT more count, as in Postfix."""
        s = self.session(self.make_factory(max_recipients=1, max_errors=3))
        s.hello()
        s.send(b"MAIL FROM:<a@remote.test>\r\n")
        over = RECIPIENT_OVERSHOOT + 3
        self.assertEqual(s.codes(b"".join(f"RCPT TO:<u{i}@example.com>\r\n".encode()
                                          for i in range(1 + over + 5))),
                         ["250"] + ["452"] * over + ["421"])
        self.assertTrue(s.closing)

    def test_a_pipelined_transaction_over_the_recipient_limit_is_not_cut(self) -> None:
        s = self.session(self.make_factory(max_recipients=100, max_errors=20))
        s.hello()
        rcpts = b"".join(f"RCPT TO:<u{i}@example.com>\r\n".encode() for i in range(500))
        codes = s.codes(b"MAIL FROM:<a@remote.test>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes, ["250"] * 101 + ["452"] * 400 + ["354", "250"])
        # the next transaction starts afresh
        codes = s.codes(b"MAIL FROM:<a@remote.test>\r\n" + rcpts[:40 * 25] + b"RSET\r\n")
        self.assertEqual(codes[0], "250")
        self.assertNotIn("421", codes)

    def test_bare_lf_in_a_command_is_one_bad_line(self) -> None:
        s = self.session()
        s.hello()
        self.assertEqual(s.send(b"NOOP\nRSET\r\nNOOP\r\n"),
                         ["500 5.5.2 Error: bare CR or LF in command", "250 2.0.0 Ok"])


class JunkCommandTests(ServerTestCase):
    """Commands that change nothing are answered `max_junk_commands` times (Postfix's
    smtpd_junk_command_limit), counted afresh after each accepted message but not after
    STARTTLS."""

    def test_a_flood_of_commands_that_change_nothing_ends_the_session(self) -> None:
        s = self.session()
        s.hello()  # counts: 1
        codes = s.codes(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n" * 30)
        self.assertEqual(codes[:99], ["250", "250", "252", "214"] * 24 + ["250", "250", "252"])
        self.assertEqual(codes[99:], ["421"])
        self.assertTrue(s.closing)
        self.assertEqual(s.transport.value(), b"")  # nothing after the 421

    def test_the_421_names_the_reason(self) -> None:
        s = self.session(self.make_factory(max_junk_commands=2))
        self.assertEqual(s.send(b"NOOP\r\nNOOP\r\nNOOP\r\n"),
                         ["250 2.0.0 Ok", "250 2.0.0 Ok",
                          "421 4.7.0 mx.gateway.test Error: too many junk commands"])

    def test_greetings_and_repeated_recipients_count(self) -> None:
        s = self.session(self.make_factory(max_junk_commands=4))
        s.send(b"EHLO a.example\r\nHELO b.example\r\nMAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n" * 4), ["250"] * 3 + ["421"])
        self.assertTrue(s.closing)

    def test_the_count_starts_again_after_an_accepted_message(self) -> None:
        s = self.session(self.make_factory(max_junk_commands=3))
        for _ in range(5):
            self.assertEqual(s.codes(b"EHLO a.example\r\nNOOP\r\nRSET\r\n"
                                     b"MAIL FROM:<a@remote.test>\r\n"
                                     b"RCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n"),
                             ["250", "250", "250", "250", "250", "354", "250"])
        self.assertFalse(s.closing)
        self.assertEqual(len(self.sink.messages), 5)
        # a refused message does not count as mail delivered
        self.assertEqual(s.codes(b"NOOP\r\nMAIL FROM:<a@remote.test>\r\n"
                                 b"RCPT TO:<u@example.com>\r\nDATA\r\nx\0\r\n.\r\n"
                                 b"NOOP\r\nNOOP\r\nNOOP\r\n"),
                         ["250", "250", "250", "354", "554", "250", "250", "421"])

    def test_starttls_does_not_start_the_counts_again(self) -> None:
        """STARTTLS set the junk count back to 0, so a client got the limit's worth of
        junk in the clear and as much again over TLS. RFC 3207 4.2 resets the greeting
        and the transaction, not the server's counts (nor does Postfix): junk commands and
        errors from before STARTTLS still count after it."""
        factory = self.make_factory(tls=object(), max_junk_commands=3, max_errors=2)
        s = self.session(factory, transport=TLSStringTransport())
        self.assertEqual(s.codes(b"NOOP\r\nHELP\r\nEHLO a.example\r\n"),
                         ["250", "214", "250"])
        s.send(b"STARTTLS\r\n")
        self.assertEqual(s.send(b"NOOP\r\n"),
                         ["421 4.7.0 mx.gateway.test Error: too many junk commands"])
        s = self.session(factory, transport=TLSStringTransport())
        self.assertEqual(s.codes(b"EHLO a.example\r\nBOGUS\r\n"), ["250", "502"])
        s.send(b"STARTTLS\r\n")
        self.assertEqual(s.send(b"EHLO a.example\r\nBOGUS\r\n")[-2:],
                         ["502 5.5.2 Error: command not recognized",
                          "421 4.7.0 mx.gateway.test Error: too many errors"])


class RelayTests(ServerTestCase):
    """The open-relay battery: every way of getting mail to a domain we do not serve."""

    RELAY_ATTEMPTS = (
        "<user@foreign.test>",
        "<user@sub.example.com>",
        "<user@example.com.foreign.test>",
        "<user@localhost>",
        "<postmaster@foreign.test>",
        "user@foreign.test",
        "<user%foreign.test@example.com>",
        "<user%foreign.test@listed.example>",
        "<foreign.test!user@example.com>",
        "<a!b!user@example.com>",
        "<@example.com:user@foreign.test>",
        "<@example.com:user@example.com>",
        "<@foreign.test,@example.com:user@example.com>",
        '<"user@foreign.test"@example.com>',
        '<"user%foreign.test"@example.com>',
        '<"user"@example.com>',
        "<user@[192.0.2.1]>",
        "<user@[127.0.0.1]>",
        "<user@[IPv6:2001:db8::1]>",
        "<user@foreign.test@example.com>",
        "<user@example.com.>",
        "<user@example.com%foreign.test>",
        "<user@foreign.test>,<user@example.com>",
        "<>",
        "<postmaster@>",
        "<@foreign.test:postmaster>",
    )
    SENDERS = ("<sender@remote.test>", "<>", "<user@example.com>")

    def test_every_relay_attempt_is_refused(self) -> None:
        for sender in self.SENDERS:
            for rcpt in self.RELAY_ATTEMPTS:
                with self.subTest(sender=sender, rcpt=rcpt):
                    s = self.session()
                    s.hello()
                    self.assertEqual(s.codes(f"MAIL FROM:{sender}\r\n".encode()), ["250"])
                    [reply] = s.send(f"RCPT TO:{rcpt}\r\n".encode())
                    self.assertEqual(reply[0], "5", reply)
                    if reply.startswith("550"):
                        self.assertRegex(reply, r"^550 5\.(7\.1 .*Relaying denied|1\.1 )")
                    self.assertEqual(s.codes(b"DATA\r\n"), ["554"])
                    s.close()
        self.assertEqual(self.sink.messages, [])

    def test_relay_hacks_get_5_7_1(self) -> None:
        s = self.session(self.make_factory(max_errors=100))
        s.hello()
        s.send(b"MAIL FROM:<>\r\n")
        for rcpt in self.RELAY_ATTEMPTS[:19]:
            with self.subTest(rcpt=rcpt):
                [reply] = s.send(f"RCPT TO:{rcpt}\r\n".encode())
                self.assertTrue(reply.startswith("550 5.7.1 "), reply)
                self.assertIn("Relaying denied", reply)

    def test_local_parts_differing_in_case_are_two_recipients(self) -> None:
        s = self.session()
        s.hello()
        s.send(b"MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(s.codes(b"RCPT TO:<Bob@example.com>\r\nRCPT TO:<bob@example.com>\r\n"
                                 b"RCPT TO:<bob@EXAMPLE.com>\r\nRCPT TO:<Bob@Example.Com>\r\n"
                                 b"DATA\r\nx\r\n.\r\n"),
                         ["250", "250", "250", "250", "354", "250"])
        # RFC 5321 2.4: the local part is the next hop's to interpret; the domain is DNS's
        self.assertEqual([r.address for r in self.sink.messages[0].envelope.recipients],
                         ["Bob@example.com", "bob@example.com"])

    def test_served_recipients(self) -> None:
        s = self.session()
        s.hello()
        s.send(b"MAIL FROM:<sender@remote.test>\r\n")
        for rcpt in ("anyone@example.com", "ANYONE@EXAMPLE.COM", "john@listed.example",
                     "JOHN@Listed.Example", "postmaster@listed.example"):
            with self.subTest(rcpt=rcpt):
                self.assertEqual(s.send(f"RCPT TO:<{rcpt}>\r\n".encode()), ["250 2.1.5 Ok"])
        self.assertEqual(
            s.send(b"RCPT TO:<jane@listed.example>\r\n"),
            ["550 5.1.1 <jane@listed.example>: Recipient address rejected: User unknown"],
        )


class SmugglingTests(ServerTestCase):
    """Pitfall 6: only CRLF.CRLF ends DATA, and bare CR or LF refuses the message whole."""

    SMUGGLED = (b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                b"From: ceo@example.com\r\n\r\nsmuggled\r\n")
    CASES = {
        "LF.LF": b"Subject: a\r\n\r\nbody\n.\n" + SMUGGLED + b".\r\n",
        "LF.CRLF": b"Subject: a\r\n\r\nbody\n.\r\n" + SMUGGLED + b".\r\n",
        "CRLF.LF": b"Subject: a\r\n\r\nbody\r\n.\n" + SMUGGLED + b".\r\n",
        "CR.CR": b"Subject: a\r\n\r\nbody\r.\r" + SMUGGLED + b".\r\n",
        "CR.CRLF": b"Subject: a\r\n\r\nbody\r.\r\n" + SMUGGLED + b".\r\n",
        "CRLF.CR": b"Subject: a\r\n\r\nbody\r\n.\r" + SMUGGLED + b".\r\n",
        "bare LF in a line": b"Subject: a\r\n\r\none\ntwo\r\n.\r\n",
        "bare CR in a line": b"Subject: a\r\n\r\none\rtwo\r\n.\r\n",
        "bare LF at the start": b"\nSubject: a\r\n\r\nbody\r\n.\r\n",
        "CR before CRLF": b"Subject: a\r\n\r\nbody\r\r\n.\r\n",
        "LF at the end": b"Subject: a\r\n\r\nbody\n\r\n.\r\n",
    }

    def test_smuggling_battery_is_refused_whole(self) -> None:
        for name, wire in self.CASES.items():
            for chunked in (False, True):
                with self.subTest(case=name, chunked=chunked):
                    s = self.session()
                    self.start(s)
                    if chunked:
                        replies: list[str] = []
                        for i in range(len(wire)):
                            replies += s.send(wire[i:i + 1])
                    else:
                        replies = s.send(wire)
                    self.assertEqual(replies, [
                        "550 5.5.2 Error: bare CR or LF in message data; message refused"
                    ])
                    # the session is back in command state, nothing was smuggled
                    self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
                    s.close()
        self.assertEqual(self.sink.messages, [])

    def test_session_goes_on_after_a_refused_message(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(self.CASES["LF.LF"]), ["550"])
        self.start(s)
        self.assertEqual(s.codes(b"clean\r\n.\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [b"clean\r\n"])


class ByteExactTests(ServerTestCase):
    """What the client meant is what the spool gets, however the bytes arrive."""

    def content_with_dot_line_at_16384(self) -> bytes:
        line = b"x" * 62 + b"\r\n"  # 64 octets
        content = b"Subject: dots\r\n\r\n" + b"y" * 47 + b"\r\n"  # 17 + 49 = 66 octets
        content += line * ((16384 - len(content)) // 64)
        content += b"z" * (16384 - len(content) - 2) + b"\r\n"
        assert len(content) == 16384
        content += b".\r\n..\r\n.x\r\nafter the dots\r\n" + line * 300 + b".\r\n"
        return content

    def test_dot_line_at_offset_16384_in_any_chunking(self) -> None:
        content = self.content_with_dot_line_at_16384()
        self.assertEqual(content[16382:16387], b"\r\n.\r\n")
        wire = stuff(content)
        for size in (len(wire), 16384, 16385, 4096, 1000, 7, 1):
            with self.subTest(chunk=size):
                s = self.session()
                self.start(s)
                replies: list[str] = []
                for i in range(0, len(wire), size):
                    replies += s.send(wire[i:i + size])
                self.assertEqual([r[:3] for r in replies], ["250"])
                self.assertEqual(self.sink.bodies[-1], content)
                s.close()

    def test_end_marker_split_anywhere_with_pipelined_commands(self) -> None:
        content = b"a\r\n.b\r\n\r\n"
        wire = stuff(content) + b"NOOP\r\n"
        for cut in range(len(wire) + 1):
            with self.subTest(cut=cut):
                s = self.session()
                self.start(s)
                codes = [r[:3] for r in s.send(wire[:cut]) + s.send(wire[cut:])]
                self.assertEqual(codes, ["250", "250"])
                self.assertEqual(self.sink.bodies[-1], content)
                s.close()

    def test_the_checks_are_the_same_wherever_the_reads_are_cut(self) -> None:
        # The CRs, LFs, dotted lines and NULs are counted read by read: a CRLF, a "\r\n."
        # or the end marker cut in two, and a one-octet read, count as in one read.
        wires = {
            b"a\r\n.b\r\n..\r\nc\r\n.\r\n": ("250", b"a\r\nb\r\n.\r\nc\r\n"),
            b".\r\n": ("250", b""),
            b"..\r\n.\r\n": ("250", b".\r\n"),
            b"x\r\r\n.\r\n": ("550", None),
            b"x\n\r\n.\r\n": ("550", None),
            b"x\r\n\x00\r\n.\r\n": ("554", None),
            b"\r\n\r\n.\r\n": ("250", b"\r\n\r\n"),
        }
        for wire, (code, body) in wires.items():
            cuts = [[wire[:cut], wire[cut:]] for cut in range(len(wire) + 1)]
            for reads in [*cuts, [wire[i:i + 1] for i in range(len(wire))]]:
                with self.subTest(reads=reads):
                    s = self.session()
                    self.start(s)
                    before = len(self.sink.bodies)
                    codes = [r[:3] for read in reads for r in s.send(read)]
                    self.assertEqual(codes, [code])
                    if body is not None:
                        self.assertEqual(self.sink.bodies[before:], [body])
                        self.assertIs(type(self.sink.messages[-1].data) is AcceptedBody,
                                      b"\r\n." not in b"\r\n" + body)
                    s.close()

    def test_the_spool_is_told_the_line_endings_were_checked(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b"Subject: a\r\n\r\n..dot\r\n.\r\n"), ["250"])
        [accepted] = self.sink.messages
        self.assertIsInstance(accepted.data, CRLFBody)
        # A line still begins with a dot: not an AcceptedBody (whose lines never do).
        self.assertNotIsInstance(accepted.data, AcceptedBody)
        self.assertTrue(accepted.data.endswith(b"\r\n\r\n.dot\r\n"))

    def test_a_body_without_dot_lines_is_told_to_need_no_stuffing(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b"Subject: a\r\n\r\nno dot. here\r\n.\r\n"), ["250"])
        [accepted] = self.sink.messages
        self.assertIs(type(accepted.data), AcceptedBody)
        out: list[bytes] = []
        out.extend(data_stream(accepted.data))
        self.assertEqual(b"".join(out), stuff(bytes(accepted.data)))

    def test_bodies_in_crlf_and_8bit_pass_unchanged(self) -> None:
        content = ("Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\ncafé ☕\r\n\r\n\r\n\tindent\r\n"
                   ).encode() + bytes(range(0x80, 0x100)) + b"\r\n"
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(stuff(content)), ["250"])
        self.assertEqual(self.sink.bodies, [content])


class LimitTests(ServerTestCase):
    def test_recipient_limit(self) -> None:
        s = self.session(self.make_factory(max_recipients=3))
        s.hello()
        s.send(b"MAIL FROM:<a@remote.test>\r\n")
        for i in range(3):
            self.assertEqual(s.codes(f"RCPT TO:<u{i}@example.com>\r\n".encode()), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<u9@example.com>\r\n"),
                         ["452 4.5.3 Error: too many recipients"])
        self.assertEqual(s.codes(b"DATA\r\nx\r\n.\r\n"), ["354", "250"])
        self.assertEqual(len(self.sink.messages[0].envelope.recipients), 3)

    def test_oversized_message_is_refused_after_data_and_not_kept(self) -> None:
        s = self.session(self.make_factory(max_message_size=1000))
        self.start(s)
        line = b"x" * 98 + b"\r\n"
        self.assertEqual(s.send(line * 10), [])  # exactly 1000 octets: still fine
        self.assertEqual(s.send(line * 10), [])
        self.assertLessEqual(len(s.protocol._body), 1000)
        self.assertEqual(s.send(b".\r\n"), ["552 5.3.4 Error: message size exceeds fixed limit"])
        self.assertEqual(self.sink.messages, [])
        self.start(s)
        self.assertEqual(s.codes(line * 10 + b".\r\n"), ["250"])

    def test_messages_held_in_memory_together_are_bounded(self) -> None:
        """Each session held its message whole in memory up to max_message_size, with no
        bound on them all: 10 sessions sending 45 MB each without the final dot took a
        running daemon to 540 MB, and max_connections of them could take 10 GB. A message
        that would take them past max_data_memory is read to its end, not kept, and
        answered 452 4.3.1; its sender tries again later."""
        factory = self.make_factory(max_data_memory=1000)
        factory.memory.data_free = 0  # (DATA_FREE: 1 MiB of each message always has room)
        line = b"x" * 98 + b"\r\n"
        first, second = self.session(factory), self.session(factory, client_ip="192.0.2.11")
        self.start(first)
        self.start(second)
        self.assertEqual(first.send(line * 6), [])
        self.assertEqual(factory.memory.buffered, 600)
        self.assertEqual(second.send(line * 3), [])
        self.assertEqual(second.send(line * 2), [])  # 1,100: past the limit, not kept
        self.assertEqual(len(second.protocol._body), 0)
        self.assertEqual(factory.memory.buffered, 600)
        self.assertEqual(second.send(b".\r\n"),
                         ["452 4.3.1 Error: insufficient system storage, try again later"])
        self.assertEqual(first.codes(b".\r\n"), ["250"])
        self.assertEqual(factory.memory.buffered, 0)
        self.start(second)
        self.assertEqual(second.codes(line * 9 + b".\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [line * 6, line * 9])
        self.assertEqual(factory.memory.buffered, 0)

    def test_a_message_counts_until_the_spool_has_committed_it(self) -> None:
        factory = self.make_factory(max_data_memory=1000)
        factory.memory.data_free = 0  # (DATA_FREE: 1 MiB of each message always has room)
        line = b"x" * 98 + b"\r\n"
        self.sink.hold = True
        first, second = self.session(factory), self.session(factory, client_ip="192.0.2.11")
        self.start(first)
        self.assertEqual(first.codes(line * 6 + b".\r\n"), [])  # committing
        self.assertEqual(factory.memory.buffered, 600)
        self.start(second)
        self.assertEqual(second.codes(line * 5 + b".\r\n"), ["452"])
        self.sink.release()
        self.assertEqual(first.replies()[0][:3], "250")
        self.assertEqual(factory.memory.buffered, 0)
        self.sink.hold = False
        self.start(second)
        self.assertEqual(second.codes(line * 5 + b".\r\n"), ["250"])

    def test_a_message_cut_off_lets_its_octets_go(self) -> None:
        factory = self.make_factory(max_data_memory=1000)
        factory.memory.data_free = 0  # (DATA_FREE: 1 MiB of each message always has room)
        line = b"x" * 98 + b"\r\n"
        s = self.session(factory)
        self.start(s)
        s.send(line * 7)
        self.assertEqual(factory.memory.buffered, 700)
        s.close()
        self.assertEqual(factory.memory.buffered, 0)
        s = self.session(factory)
        self.start(s)
        s.send(line * 7)
        self.clock.advance(301)  # idle_timeout: 421, the message dropped
        self.assertTrue(s.closing)
        self.assertEqual(factory.memory.buffered, 0)

    def test_the_first_octets_of_a_message_always_have_room(self) -> None:
        factory = self.make_factory(max_data_memory=1000)
        factory.memory.data_free = 300
        line = b"x" * 98 + b"\r\n"
        large, small, other = (self.session(factory, client_ip=f"192.0.2.{i}")
                               for i in (11, 12, 13))
        self.start(large)
        large.send(line * 9)
        self.assertEqual(factory.memory.buffered, 900)
        self.start(small)
        self.assertEqual(small.codes(line * 2 + b".\r\n"), ["250"])  # within data_free
        self.start(other)
        self.assertEqual(other.codes(line * 4 + b".\r\n"), ["452"])
        self.assertEqual(large.codes(b".\r\n"), ["250"])

    def test_one_address_holds_at_most_its_share(self) -> None:
        # Its share: max_connections_per_ip / max_connections of the budget (300 here).
        factory = self.make_factory(max_data_memory=1000, max_message_size=200,
                                    max_connections=10, max_connections_per_ip=3)
        factory.memory.data_free = 0
        self.assertEqual(factory.memory.address_share, 300)
        line = b"x" * 98 + b"\r\n"
        first, second = self.session(factory), self.session(factory)
        elsewhere = self.session(factory, client_ip="198.51.100.7")
        for s in (first, second, elsewhere):
            self.start(s)
        first.send(line * 2)
        self.assertEqual(second.codes(line * 2 + b".\r\n"), ["452"])
        self.assertEqual(elsewhere.codes(line * 2 + b".\r\n"), ["250"])
        self.assertEqual(factory.memory.buffered_by, {"192.0.2.10": 200})
        self.assertEqual(first.codes(b".\r\n"), ["250"])

    def test_size_limit_does_not_count_the_stuffed_dots(self) -> None:
        # RFC 1870: SIZE (declared and advertised) is the message's size, without the dots
        # DATA doubles; 1000 octets whose ten lines begin with a dot are 1010 on the wire.
        content = (b"." + b"x" * 97 + b"\r\n") * 10
        self.assertEqual(len(content), 1000)
        factory = self.make_factory(max_message_size=1000)
        for size in (len(stuff(content)), 4096, 7, 1):
            with self.subTest(chunk=size):
                s = self.session(factory)
                s.hello()
                self.assertEqual(s.codes(b"MAIL FROM:<s@remote.test> SIZE=1000\r\n"), ["250"])
                self.assertEqual(s.codes(b"RCPT TO:<user@example.com>\r\nDATA\r\n"),
                                 ["250", "354"])
                wire = stuff(content)
                replies: list[str] = []
                for i in range(0, len(wire), size):
                    replies += s.codes(wire[i:i + size])
                self.assertEqual(replies, ["250"])
                self.assertTrue(self.sink.messages[-1].data.endswith(b"\r\n" + content))
                # one octet more is over the limit, dots or not
                self.start(s)
                self.assertEqual(s.codes(stuff(content + b".\r\n")), ["552"])
                s.close()

    def test_message_sent_in_tiny_reads_is_held_in_about_its_size(self) -> None:
        # A client may send DATA an octet or two per TCP segment (or TLS record); each read
        # used to be kept as its own bytes object in a list, some 40 octets of memory per
        # read: 50 MB (max_message_size) held 1 to 2 GB in one session.
        s = self.session()
        self.start(s)
        s.send(b"Subject: slow\r\n\r\n")
        line = b"y" * 98 + b"\r\n"
        octets = 100_000
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(0, octets, 2):  # two octets a read (one is a cached object)
                s.protocol.dataReceived(line[i % 100:i % 100 + 2])
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertLess(held, 2 * octets)
        self.assertEqual(s.codes(b".\r\n"), ["250"])
        self.assertEqual(self.sink.messages[0].data.count(line), octets // 100)

    def test_text_line_limit_is_1000_octets_with_crlf(self) -> None:
        for length, code in ((998, "250"), (999, "500")):
            for where in ("first", "middle", "last"):
                with self.subTest(length=length, where=where):
                    long_line = b"L" * length + b"\r\n"
                    short = b"short\r\n" * 200
                    body = {"first": long_line + short, "middle": short + long_line + short,
                            "last": short + long_line}[where]
                    s = self.session()
                    self.start(s)
                    replies = s.send(stuff(body))
                    self.assertEqual([r[:3] for r in replies], [code])
                    if code == "500":
                        self.assertEqual(replies, ["500 5.5.2 Error: line too long; "
                                                   "message refused"])
                    s.close()
        self.assertEqual(len(self.sink.messages), 3)

    def test_text_line_limit_does_not_count_the_stuffed_dot(self) -> None:
        # RFC 5321 4.5.3.1.6: 1000 octets with CRLF, "not counting the leading dot
        # duplicated for transparency": 1001 on the wire for a line that begins with a dot.
        for length, code in ((998, "250"), (999, "500")):
            with self.subTest(length=length):
                long_line = b"." + b"L" * (length - 1) + b"\r\n"
                s = self.session()
                self.start(s)
                replies = s.send(stuff(b"Subject: x\r\n\r\n" + long_line + b"end\r\n"))
                self.assertEqual([r[:3] for r in replies], [code])
                s.close()
        self.assertEqual(len(self.sink.messages), 1)
        self.assertIn(b"\r\n." + b"L" * 997 + b"\r\nend\r\n", self.sink.messages[0].data)

    def test_command_line_limit_is_512_octets_with_crlf(self) -> None:
        s = self.session()
        s.hello()
        ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        self.assertEqual(len(ok), 512)
        self.assertEqual(s.codes(ok), ["250"])
        self.assertEqual(s.codes(ok[:-1]), [])  # split between CR and LF: still fits
        self.assertEqual(s.codes(ok[-1:]), ["250"])
        self.assertEqual(s.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n"),
                         ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"])
        # a long line arriving in pieces is one error, and what follows it is in step
        self.assertEqual(s.codes(b"NOOP " + b"x" * 600), ["500"])
        self.assertEqual(s.codes(b"y" * 600 + b"\r"), [])
        self.assertEqual(s.codes(b"\nRSET\r\n"), ["250"])

    def test_connection_limits_total_and_per_address(self) -> None:
        factory = self.make_factory(max_connections=2, max_connections_per_ip=1)
        first = self.session(factory, client_ip="192.0.2.1")
        self.assertEqual([g[:3] for g in first.greeting], ["220"])
        again = self.session(factory, client_ip="192.0.2.1")
        self.assertEqual(again.greeting, [
            "421 4.7.0 mx.gateway.test Error: too many connections from your address"])
        self.assertTrue(again.closing)
        other = self.session(factory, client_ip="2001:db8::5")
        self.assertEqual([g[:3] for g in other.greeting], ["220"])
        third = self.session(factory, client_ip="192.0.2.3")
        self.assertEqual(third.greeting,
                         ["421 4.7.0 mx.gateway.test Error: too many connections"])
        again.close()
        third.close()
        self.assertEqual(factory.connections, 2)
        first.close()
        self.assertEqual(factory.per_ip, {"2001:db8::/64": 1})
        back = self.session(factory, client_ip="192.0.2.1")
        self.assertEqual([g[:3] for g in back.greeting], ["220"])

    def test_ipv4_mapped_addresses_count_as_ipv4(self) -> None:
        factory = self.make_factory(max_connections_per_ip=1)
        self.session(factory, client_ip="192.0.2.1")
        mapped = self.session(factory, client_ip="::ffff:192.0.2.1")
        self.assertEqual([g[:3] for g in mapped.greeting], ["421"])


    def test_a_client_connecting_again_is_not_parsed_again(self) -> None:
        """The peer's address is parsed once (connlimits.peer_key remembers it), not at
        every connection: a sender's server that opens a connection per message cost us
        an ipaddress parse each (3.5-4.6 us of the connection's CPU)."""
        peer_key.cache_clear()
        parsed: list[str] = []
        real = ipaddress.ip_address

        def counting(host: str) -> Any:
            parsed.append(host)
            return real(host)

        self.patch(connlimits.ipaddress, "ip_address", counting)
        factory = self.make_factory(max_connections_per_ip=2)
        for _ in range(3):
            s = self.session(factory, client_ip="198.51.100.7")
            self.assertEqual([g[:3] for g in s.greeting], ["220"])
            s.close()
        self.assertEqual(parsed, ["198.51.100.7"])
        self.assertEqual(factory.per_ip, {})

    def test_ipv6_clients_are_counted_by_their_64(self) -> None:
        """200 connections from 200 addresses of one /64 were all admitted past a cap of 20
        per address, and the next IPv4 client got 421 (found by an audit)."""
        factory = self.make_factory(max_connections=200, max_connections_per_ip=20)
        for i in range(1, 21):
            admitted = self.session(factory, client_ip=f"2001:db8:1:2::{i:x}")
            self.assertEqual([g[:3] for g in admitted.greeting], ["220"])
        refused = self.session(factory, client_ip="2001:db8:1:2:ffff::1")
        self.assertEqual(refused.greeting, [
            "421 4.7.0 mx.gateway.test Error: too many connections from your address"])
        other = self.session(factory, client_ip="2001:db8:1:3::1")
        self.assertEqual([g[:3] for g in other.greeting], ["220"])
        self.assertEqual(factory.per_ip, {"2001:db8:1:2::/64": 20, "2001:db8:1:3::/64": 1})


class TimeoutTests(ServerTestCase):
    def test_idle_timeout(self) -> None:
        s = self.session()
        self.clock.advance(299)
        s.hello()
        self.clock.advance(299)
        self.assertFalse(s.closing)
        self.clock.advance(1)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        self.assertTrue(s.closing)

    def test_idle_timeout_inside_data(self) -> None:
        s = self.session(self.make_factory(idle_timeout=60))
        self.start(s)
        s.send(b"partial line")
        self.clock.advance(59)
        self.assertFalse(s.closing)
        self.clock.advance(1)
        self.assertEqual([r[:3] for r in s.replies()], ["421"])
        self.assertEqual(self.sink.messages, [])

    def test_a_commit_not_confirmed_in_time_is_answered_451_and_the_session_goes_on(
            self) -> None:
        """The store does not answer (a frozen database): at command_timeout the message is
        answered 451 once, the input held behind it is handled, the commit that lands
        late answers nothing more, and the next message on the session is accepted."""
        s = self.session(self.make_factory(idle_timeout=10, command_timeout=120))
        self.sink.hold = True
        self.start(s)
        self.assertEqual(s.send(b"x\r\n.\r\nMAIL FROM:<b@remote.test>\r\n"), [])
        self.clock.advance(119.5)  # the idle timer does not run while we owe a reply
        self.assertEqual(s.replies(), [])
        warnings = logged_at(self, LogLevel.warn)
        self.clock.advance(0.5)
        self.assertEqual(s.replies(), [
            "451 4.3.0 Error: message not confirmed in time, try again later",
            "250 2.1.0 Ok",
        ])
        self.assertEqual(len(warnings), 1)
        self.assertIn("command_timeout (120 s); answered 451", warnings[0])
        self.assertFalse(s.closing)
        self.sink.hold = False
        self.assertEqual(s.codes(b"RCPT TO:<user@example.com>\r\n"), ["250"])
        self.assertEqual(s.codes(b"DATA\r\n"), ["354"])
        self.assertEqual(s.codes(b"y\r\n.\r\n"), ["250"])
        self.sink.release()  # the first commit lands late: delivered, answered no more
        self.assertEqual(s.replies(), [])
        self.assertEqual(self.sink.bodies, [b"y\r\n", b"x\r\n"])
        self.assertEqual(s.codes(b"NOOP\r\n"), ["250"])
        self.clock.advance(9.5)  # the idle time counts from our last answer
        self.assertFalse(s.closing)
        self.clock.advance(0.5)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_a_late_commit_after_the_client_left_is_harmless(self) -> None:
        s = self.session(self.make_factory(command_timeout=60))
        self.sink.hold = True
        self.start(s)
        s.send(b"x\r\n.\r\nQUIT\r\n")
        self.clock.advance(60)
        self.assertEqual([r[:3] for r in s.replies()], ["451", "221"])
        self.assertTrue(s.closing)
        s.close()
        self.sink.release()
        self.assertEqual(s.replies(), [])
        self.assertEqual(len(self.sink.messages), 1)  # committed late: a duplicate, not a loss

    def test_a_recipient_waiting_for_the_domains_first_load_is_451_at_the_deadline(
            self) -> None:
        gate = self.gate_directory()
        s = self.session(self.make_factory(command_timeout=60))
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<x@example.com>\r\nNOOP\r\n"), [])
        self.clock.advance(60)
        self.assertEqual(s.replies(), ["451 4.3.0 <x@example.com>: Temporary lookup failure",
                                       "250 2.0.0 Ok"])
        gate.callback(None)  # the snapshot loads late: no reply for the RCPT given up on
        self.assertEqual(s.replies(), [])
        self.assertEqual(s.codes(b"RCPT TO:<x@example.com>\r\n"), ["250"])

    def test_a_recipient_lookup_not_answered_in_time_is_451(self) -> None:
        """A RCPT whose room lookup (not cached) waits on a store that does not answer: 451
        at command_timeout; the lookup's late answer adds no recipient."""
        reads: list[defer.Deferred[dict[str, int]]] = []

        class HungStore:
            def read(self, name: str, fn: Any, *args: Any) -> defer.Deferred[dict[str, int]]:
                reads.append(defer.Deferred())
                return reads[-1]

        factory = self.make_factory(command_timeout=60)
        factory.room = MailboxRoom(HungStore(), self.clock, None, 1000,  # type: ignore[arg-type]
                                   ttl=1.0)
        s = self.session(factory)
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<user@example.com>\r\nRSET\r\n"), [])
        self.clock.advance(60)
        self.assertEqual(s.replies(), ["451 4.3.0 <user@example.com>: Temporary lookup failure",
                                       "250 2.0.0 Ok"])
        reads[0].callback({})  # the store answers late
        self.assertEqual(s.replies(), [])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<user@example.com>\r\n"), [])  # reads again
        reads[1].callback({})
        self.assertEqual(s.replies(), ["250 2.1.5 Ok"])
        self.assertEqual(s.codes(b"DATA\r\n"), ["354"])
        # Pipelined commands that each wait: each has its own deadline, the session goes on.
        self.assertEqual(s.codes(b"x\r\n.\r\n"), ["250"])
        self.clock.advance(1)  # the room read is no longer cached
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        self.assertEqual(s.send(b"RCPT TO:<user@example.com>\r\nRCPT TO:<u2@example.com>\r\n"),
                         [])
        self.clock.advance(60)
        self.assertEqual(s.replies(), ["451 4.3.0 <user@example.com>: Temporary lookup failure"])
        self.assertFalse(s.closing)
        self.clock.advance(60)
        self.assertEqual(s.replies(), ["451 4.3.0 <u2@example.com>: Temporary lookup failure"])
        self.assertFalse(s.closing)
        self.assertEqual(s.codes(b"NOOP\r\n"), ["250"])

    def test_after_a_slow_command_the_idle_time_counts_from_our_answer(self) -> None:
        s = self.session(self.make_factory(idle_timeout=10, command_timeout=120))
        self.sink.hold = True
        self.start(s)
        timers = len(self.clock.getDelayedCalls())
        s.send(b"x\r\n.\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), timers)  # no timer per command
        self.clock.advance(60)
        self.sink.release()
        self.assertEqual([r[:3] for r in s.replies()], ["250"])
        self.clock.advance(9.5)
        self.assertFalse(s.closing)
        self.clock.advance(0.5)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_a_slow_drip_inside_data_ends_at_the_session_time_limit(self) -> None:
        s = self.session()
        self.start(s)
        for _ in range(3600 // 299):
            self.clock.advance(299)  # within idle_timeout (300) every time
            self.assertEqual(s.send(b"x"), [])
        self.assertFalse(s.closing)
        self.clock.advance(3600 - 3600 // 299 * 299)
        self.assertEqual(s.replies(),
                         ["421 4.4.2 mx.gateway.test Error: session time limit exceeded"])
        self.assertTrue(s.closing)
        self.assertEqual(s.send(b"\r\n.\r\n"), [])
        self.assertEqual(self.sink.messages, [])

    def test_the_session_time_is_a_setting_and_counts_from_the_connection(self) -> None:
        s = self.session(self.make_factory(max_session_time=100, idle_timeout=30))
        for _ in range(4):
            self.clock.advance(24)
            self.assertEqual(s.codes(b"EHLO a.example\r\n"), ["250"])
        self.clock.advance(3.5)
        self.assertFalse(s.closing)
        self.clock.advance(0.5)
        self.assertEqual([r[:9] for r in s.replies()], ["421 4.4.2"])

    def test_a_message_being_committed_at_the_time_limit_is_answered_first(self) -> None:
        s = self.session(self.make_factory(max_session_time=100, command_timeout=60))
        self.sink.hold = True
        self.start(s)
        self.clock.advance(90)
        self.assertEqual(s.send(b"x\r\n.\r\nNOOP\r\n"), [])
        self.clock.advance(30)  # past the session's time, within the command's
        self.assertFalse(s.closing)
        self.sink.release()
        self.assertEqual([r[:9] for r in s.replies()], ["250 2.0.0", "421 4.4.2"])
        self.assertTrue(s.closing)
        self.assertEqual(self.sink.bodies, [b"x\r\n"])

    def test_spool_finishing_after_the_client_left(self) -> None:
        s = self.session()
        self.sink.hold = True
        self.start(s)
        s.send(b"x\r\n.\r\n")
        s.close()
        self.sink.release()
        self.assertEqual(len(self.sink.messages), 1)


class StressTests(ServerTestCase):
    """Postfix's stress mode: from 80 % of max_connections open sessions until fewer than
    60 % are, the idle timeout is stress_idle_timeout (10 s) and max_errors and
    max_junk_commands are 1, so that a slowloris (200 sessions each fed an octet every
    299 s) cannot hold every slot for max_session_time."""

    def crowd(self, factory: SMTPServerFactory, count: int) -> list[Session]:
        """`count` sessions more, each from an address of its own, greeted."""
        opened = []
        for _ in range(count):
            s = self.session(factory, client_ip=f"198.51.100.{len(self.sessions) + 1}")
            self.assertEqual([g[:3] for g in s.greeting], ["220"])
            opened.append(s)
        return opened

    def stressed_factory(self, **kwargs: Any) -> tuple[SMTPServerFactory, list[Session]]:
        """A factory with max_connections=10 under stress: 8 sessions open, just greeted."""
        factory = self.make_factory(max_connections=10, **kwargs)
        crowd = self.crowd(factory, 8)
        self.assertTrue(factory.stressed)
        for s in crowd:
            self.assertEqual(s.codes(b"EHLO a.example\r\n"), ["250"])
        return factory, crowd

    def test_a_slowloris_no_longer_holds_every_slot(self) -> None:
        """10 addresses x 20 connections, each fed an octet every 299 s, held all 200 of
        the default max_connections for max_session_time: a real MTA got 421 for an hour."""
        factory = self.make_factory()
        crowd = [self.session(factory, client_ip=f"198.51.100.{i // 20 + 1}")
                 for i in range(200)]
        self.assertEqual(factory.connections, 200)
        for s in crowd:
            self.assertEqual(s.send(b"E"), [])
        refused = self.session(factory, client_ip="203.0.113.25")
        self.assertEqual([g[:3] for g in refused.greeting], ["421"])
        self.clock.advance(10)
        for s in crowd:
            self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
            s.close()  # (the client's side of the close)
        mta = self.session(factory, client_ip="203.0.113.25")
        self.assertEqual([g[:3] for g in mta.greeting], ["220"])
        mta.hello()
        self.assertEqual(mta.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\n"
                                   b"DATA\r\nx\r\n.\r\nQUIT\r\n"),
                         ["250", "250", "354", "250", "221"])
        self.assertFalse(factory.stressed)

    def test_stress_begins_at_80_percent_and_ends_below_60(self) -> None:
        registry = CollectorRegistry()
        factory = self.make_factory(max_connections=10, stress_gauge=stress_gauge(registry))
        warnings = logged_at(self, LogLevel.warn)
        infos = logged(self, lambda e: e.get("log_level") == LogLevel.info
                       and "stress" in e.get("log_format", ""))

        def gauge() -> float | None:
            return registry.get_sample_value("mailcore_smtp_stress")

        crowd = self.crowd(factory, 7)
        self.assertEqual((factory.stressed, gauge(), warnings), (False, 0, []))
        crowd += self.crowd(factory, 1)
        self.assertEqual((factory.stressed, gauge()), (True, 1))
        self.assertEqual(warnings, [
            "SMTP server under stress: 8 of [smtp] max_connections (10) sessions open; idle "
            "timeout 10 s, 1 error(s) and 1 junk command(s) per session until fewer than 6 "
            "are open"])
        crowd += self.crowd(factory, 2)
        self.clock.advance(5)
        for s in crowd[:4]:  # down to 6, up to 7, down to 6: stress goes on, unlogged
            s.close()
        crowd += self.crowd(factory, 1)
        crowd[-1].close()
        self.assertEqual((factory.stressed, gauge(), len(warnings), infos), (True, 1, 1, []))
        crowd[4].close()  # 5 open: below 60 %
        self.assertEqual((factory.stressed, gauge()), (False, 0))
        self.assertEqual(infos, ["SMTP server no longer under stress, after 5 s: 5 of [smtp] "
                                 "max_connections (10) sessions open"])
        self.assertEqual(len(warnings), 1)

    def test_no_stress_with_few_connections(self) -> None:
        """With max_connections 1 both thresholds were 1 (every session under stress, a
        warning and an info line each connection), with 2 there was no hysteresis: below
        STRESS_MIN_CONNECTIONS (10) there is no stress, and leaving it always takes at
        least two sessions fewer than entering."""
        logs = logged(self, lambda e: "stress" in e.get("log_format", ""))
        for count in (1, 2, 9):
            factory = self.make_factory(max_connections=count)
            for _ in range(2):
                crowd = self.crowd(factory, count)
                self.assertFalse(factory.stressed)
                s = crowd[-1]
                self.assertEqual(s.codes(b"EHLO a.example\r\nNOOP\r\nNOOP\r\nX\r\nY\r\n"),
                                 ["250", "250", "250", "502", "502"])
                self.clock.advance(299)
                self.assertFalse(s.closing)  # idle_timeout 300 s, not 10
                self.clock.advance(1)
                for s in crowd:
                    s.close()
        self.assertEqual(logs, [])
        for count in range(STRESS_MIN_CONNECTIONS, 300):
            factory = self.make_factory(max_connections=count)
            self.assertLessEqual(factory.stress_at, count)
            self.assertLessEqual(factory.calm_below, factory.stress_at - 1)

    def test_idle_sessions_are_cut_after_the_stress_timeout_from_their_last_input(
            self) -> None:
        factory = self.make_factory(max_connections=10)
        crowd = self.crowd(factory, 7)
        for s in crowd:
            s.hello()
        self.clock.advance(200)  # within idle_timeout (300)
        self.assertEqual(crowd[0].codes(b"NOOP\r\n"), ["250"])
        self.clock.advance(5)
        [late] = self.crowd(factory, 1)  # the eighth session: stress
        self.clock.advance(0)  # silent for 205 s, over 10: cut at once
        for s in crowd[1:]:
            self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
            self.assertTrue(s.closing)
        self.clock.advance(4.5)  # crowd[0]'s NOOP came 9.5 s ago
        self.assertFalse(crowd[0].closing)
        self.clock.advance(0.5)
        self.assertEqual(crowd[0].replies(),
                         ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        self.clock.advance(4.5)  # the eighth came 9.5 s ago
        self.assertFalse(late.closing)
        self.clock.advance(0.5)
        self.assertEqual(late.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_a_busy_sender_is_not_cut(self) -> None:
        """Octets flowing in DATA at stress_min_data_rate (500 a second) or more keep a
        session, however long the message takes; a message being committed is answered
        first, and the silence counts from our answer; a sender that starts TLS greets
        again without that counting as junk."""
        factory, crowd = self.stressed_factory(tls=object(), command_timeout=60)
        s = crowd[0]
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\n"
                                 b"DATA\r\n"), ["250", "250", "354"])
        lines = (b"x" * 998 + b"\r\n") * 5  # 5,000 octets every 9 s: 556 a second
        for _ in range(30):
            self.clock.advance(9)
            self.assertEqual(s.send(lines), [])
        self.assertFalse(s.closing)
        self.sink.hold = True
        self.assertEqual(s.send(b".\r\n"), [])
        self.clock.advance(50)  # the spool takes its time: within command_timeout
        self.assertFalse(s.closing)
        self.sink.hold = False
        self.sink.release()
        self.assertEqual([r[:9] for r in s.replies()], ["250 2.0.0"])
        self.assertEqual(self.sink.bodies, [lines * 30])
        self.clock.advance(9.5)
        self.assertFalse(s.closing)
        self.assertEqual(s.codes(b"RSET\r\n"), ["250"])  # counted afresh after a message
        self.clock.advance(9.5)
        self.assertFalse(s.closing)
        self.clock.advance(0.5)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        # (the others, idle since their greeting, went 10 s after it)
        self.assertTrue(all(other.closing for other in crowd))
        transport = TLSStringTransport()
        tls = self.session(factory, client_ip="203.0.113.9", transport=transport)
        self.assertEqual(tls.codes(b"EHLO a.example\r\nSTARTTLS\r\n"), [])
        self.assertTrue(transport.before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n"))
        self.assertTrue(factory.stressed)
        self.assertEqual(tls.codes(b"EHLO a.example\r\nMAIL FROM:<a@remote.test>\r\n"
                                   b"RCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n"),
                         ["250", "250", "250", "354", "250"])

    def test_under_stress_octets_that_end_no_line_do_not_keep_a_session(self) -> None:
        """Postfix's smtpd_per_record_deadline under stress: a slowloris dripping an octet
        every 9 s kept all 200 slots for max_session_time, as each octet moved the 10 s;
        the deadline now counts from the last complete line (or our answer), in DATA too,
        while a sender streaming a big message in chunks goes on."""
        factory = self.make_factory()
        crowd = [self.session(factory, client_ip=f"198.51.100.{i // 20 + 1}")
                 for i in range(200)]
        self.assertTrue(factory.stressed)
        for _ in range(2):
            self.clock.advance(4.5)
            for s in crowd:
                self.assertEqual(s.send(b"E"), [])
        self.clock.advance(1)  # 10 s after the greeting, 1 s after the last octet
        for s in crowd:
            self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
            s.close()
        self.assertEqual(factory.connections, 0)
        # In DATA: octets without a line end are not a record either.
        factory, crowd = self.stressed_factory()
        dripper, sender = crowd[0], crowd[1]
        for s in (dripper, sender):
            self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"
                                     b"RCPT TO:<u@example.com>\r\nDATA\r\n"), ["250", "250", "354"])
        line = b"y" * 998 + b"\r\n"
        body = line * 2000  # ~2 MB, streamed in chunks of 1,400 octets over 100 s
        chunks = [body[i:i + 1400] for i in range(0, len(body), 1400)]
        for n, chunk in enumerate(chunks):
            if n % 15 == 0:
                self.clock.advance(1)
                if n // 15 < 9:
                    self.assertEqual(dripper.send(b"x"), [])  # every 1 s, no line end
            self.assertEqual(sender.send(chunk), [])
        self.assertTrue(dripper.closing)  # 10 s after DATA's 354
        self.assertEqual(dripper.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        self.assertGreater(self.clock.seconds(), 100)
        self.assertFalse(sender.closing)
        self.assertEqual(sender.codes(b".\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [body])

    def in_data(self, *sessions: Session) -> None:
        for s in sessions:
            self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\n"
                                     b"DATA\r\n"), ["250", "250", "354"])

    def test_under_stress_a_line_every_9_s_in_data_no_longer_keeps_a_session(self) -> None:
        """Postfix's smtpd_min_data_rate under stress: a client completing one DATA line
        every 9 s (of 80 octets, or of one) made each line a record, and 200 of them held
        every slot until max_session_time. In DATA the 10 s are now a budget that each
        octet of the message refills by 1/500 s: the drippers are answered the stress
        deadline's 421 10 s and 3/500 or 80/500 s after their 354, and a real MTA is served."""
        factory = self.make_factory()
        crowd = [self.session(factory, client_ip=f"198.51.100.{i // 20 + 1}")
                 for i in range(200)]
        self.assertTrue(factory.stressed)
        for s in crowd:
            self.assertEqual(s.codes(b"EHLO a.example\r\n"), ["250"])
        self.in_data(*crowd)
        short, long = crowd[::2], crowd[1::2]
        self.clock.advance(9)
        for s in short:
            self.assertEqual(s.send(b"y\r\n"), [])
        for s in long:
            self.assertEqual(s.send(b"y" * 78 + b"\r\n"), [])
        self.clock.advance(1)  # 10 s after the 354
        self.assertFalse(any(s.closing for s in crowd))
        self.clock.advance(0.01)  # 10.006 s: the 1-octet lines' budget is spent
        for s in short:
            self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        self.assertFalse(any(s.closing for s in long))
        self.clock.advance(0.15)  # 10.16 s: the 80-octet lines' budget
        for s in long:
            self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        for s in crowd:
            s.close()
        mta = self.session(factory, client_ip="203.0.113.25")
        self.assertEqual([g[:3] for g in mta.greeting], ["220"])
        mta.hello()
        self.in_data(mta)
        self.assertEqual(mta.codes(b"x\r\n.\r\n"), ["250"])

    def test_a_dripper_in_data_when_stress_begins_is_cut(self) -> None:
        """Out of stress a line every 9 s in DATA goes on (idle_timeout counts from the
        last octet, as before); once stress begins, its budget starts at its last read and
        the next lines do not keep it."""
        factory = self.make_factory(max_connections=10)
        [dripper] = self.crowd(factory, 1)
        dripper.hello()
        self.in_data(dripper)
        for _ in range(40):  # 360 s, over idle_timeout (300) in all
            self.clock.advance(9)
            self.assertEqual(dripper.send(b"y" * 78 + b"\r\n"), [])
        self.assertFalse(dripper.closing)
        self.clock.advance(1)
        self.crowd(factory, 7)  # stress, 1 s after the dripper's last line
        self.assertTrue(factory.stressed)
        self.clock.advance(8)
        self.assertEqual(dripper.send(b"y" * 78 + b"\r\n"), [])
        self.clock.advance(1)  # 10 s after its last line before stress
        self.assertFalse(dripper.closing)
        self.clock.advance(0.17)  # and the 80/500 s its line since then gave it
        self.assertEqual(dripper.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_under_stress_a_fast_sender_of_large_messages_is_unaffected(self) -> None:
        _, crowd = self.stressed_factory()
        s = crowd[0]
        body = (b"z" * 998 + b"\r\n") * 1000  # 1 MB, in 1,400-octet reads, 14,000 a second
        chunks = [body[i:i + 1400] for i in range(0, len(body), 1400)]
        for _ in range(2):
            self.in_data(s)
            for n, chunk in enumerate(chunks):
                if n % 10 == 0:
                    self.clock.advance(1)
                self.assertEqual(s.send(chunk), [])
            self.assertEqual(s.codes(b".\r\n"), ["250"])
        self.assertGreater(self.clock.seconds(), NOW + 140)
        self.assertEqual(self.sink.bodies, [body, body])

    def test_under_stress_bursts_and_pauses_go_on_at_the_rate_on_average(self) -> None:
        """Bursts with pauses of up to 9 s averaging 548 octets a second go on for 10
        minutes and the message is accepted; 2,900 octets every 7 s (414 a second) lose
        1.2 s of budget a burst and are cut after the third, 27.4 s after the 354, as with
        Postfix (each read takes its elapsed time from the budget and adds N/500 s, and
        leaves at most 10 s)."""
        _, crowd = self.stressed_factory()
        bursty, slow = crowd[0], crowd[1]
        self.in_data(bursty, slow)
        line = b"b" * 98 + b"\r\n"
        events = [(21 * cycle + at, bursty, lines) for cycle in range(28)
                  for at, lines in ((9, 50), (12, 10), (20, 45), (21, 10))]
        events += [(at, slow, 29) for at in (7, 14, 21, 28)]
        events.sort(key=lambda e: e[0])
        sent = b""
        for at, s, lines in events:
            if s is slow and at == 28:
                self.clock.advance(27.39 - (self.clock.seconds() - NOW))
                self.assertFalse(slow.closing)
                self.clock.advance(0.02)
                self.assertEqual(slow.replies(),
                                 ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
                continue
            self.clock.advance(at - (self.clock.seconds() - NOW))
            self.assertEqual(s.send(line * lines), [])
            if s is bursty:
                sent += line * lines
        self.assertGreater(self.clock.seconds(), NOW + 580)
        self.assertFalse(bursty.closing)
        self.assertEqual(bursty.codes(b".\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [sent])

    def test_normal_mode_keeps_a_slow_sender(self) -> None:
        """Out of stress the rate is no limit: a line every 9 s in DATA for 15 minutes goes
        on (idle_timeout counts from the last octet) and is accepted."""
        s = self.session()
        s.hello()
        self.in_data(s)
        for _ in range(100):
            self.clock.advance(9)
            self.assertEqual(s.send(b"y\r\n"), [])
        self.assertEqual(s.codes(b".\r\n"), ["250"])
        self.assertFalse(self.factory.stressed)

    def test_a_rate_of_0_counts_data_lines_as_records(self) -> None:
        """stress_min_data_rate = 0 turns the rate off: under stress a line every 9 s in
        DATA keeps its session, as a record (and octets that end no line do not)."""
        _, crowd = self.stressed_factory(stress_min_data_rate=0)
        lines, octets = crowd[0], crowd[1]
        self.in_data(lines, octets)
        for _ in range(10):
            self.clock.advance(9)
            self.assertEqual(lines.send(b"y\r\n"), [])
            if not octets.closing:
                self.assertEqual(octets.send(b"y"), [])
        self.assertEqual(octets.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        self.assertEqual(lines.codes(b".\r\n"), ["250"])

    def test_under_stress_recipients_over_the_limit_buy_no_time(self) -> None:
        """RCPTs past max_recipients are answered 452 and, up to RECIPIENT_OVERSHOOT
        (1,000) of them, count as no error: one every 9 s kept a session under stress for
        9,000 s, past max_session_time. Under stress, after a transaction's first 452, they
        no longer move the deadline; a sender pipelining its recipients is not affected."""
        factory, crowd = self.stressed_factory(max_recipients=2)
        s = crowd[0]
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\n"), ["250"])
        for rcpt in (b"a", b"b", b"c", b"d"):
            self.clock.advance(9)
            self.assertFalse(s.closing)
            self.assertEqual(s.codes(b"RCPT TO:<" + rcpt + b"@example.com>\r\n"),
                             ["250"] if rcpt in (b"a", b"b") else ["452"])
        self.clock.advance(0.9)  # 9.9 s after the first 452, 0.9 s after the second
        self.assertFalse(s.closing)
        self.clock.advance(0.1)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])
        [pipelining] = self.crowd(factory, 1)
        self.assertTrue(factory.stressed)
        rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % n for n in range(50))
        self.assertEqual(pipelining.codes(b"EHLO a.example\r\nMAIL FROM:<a@remote.test>\r\n" + rcpts
                                          + b"DATA\r\n"),
                         ["250", "250", "250", "250"] + ["452"] * 48 + ["354"])
        self.clock.advance(9)
        self.assertEqual(pipelining.codes(b"x\r\n.\r\n"), ["250"])

    def test_a_452_from_before_the_stress_does_not_cut_the_session_at_once(self) -> None:
        """A transaction's first 452 came before the stress began, the next under it: the
        deadline goes back to when the stress began, not to that first 452 (which cut the
        session at once, however fast its commands came)."""
        factory = self.make_factory(max_connections=10, max_recipients=1)
        [s] = self.crowd(factory, 1)
        self.assertEqual(s.codes(b"EHLO a.example\r\nMAIL FROM:<a@remote.test>\r\n"
                                 b"RCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"),
                         ["250", "250", "250", "452"])
        self.clock.advance(5)
        self.crowd(factory, 7)
        self.assertTrue(factory.stressed)
        self.clock.advance(1)
        self.assertEqual(s.codes(b"RCPT TO:<c@example.com>\r\n"), ["452"])
        self.clock.advance(4)  # 10 s after the first 452: cut there before
        self.assertFalse(s.closing)
        self.clock.advance(4.9)  # 9.9 s after the stress began
        self.assertFalse(s.closing)
        self.clock.advance(0.1)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_under_stress_one_error_or_one_junk_command_ends_a_session(self) -> None:
        _, crowd = self.stressed_factory()
        self.assertEqual(crowd[0].send(b"MAIL FROM:<a@remote.test>\r\n"
                                       b"RCPT TO:<u@elsewhere.test>\r\nNOOP\r\n"), [
            "250 2.1.0 Ok", "550 5.7.1 <u@elsewhere.test>: Relaying denied",
            "421 4.7.0 mx.gateway.test Error: too many errors"])
        self.assertEqual(crowd[1].send(b"NOOP\r\nNOOP\r\n"), [  # (EHLO is not counted)
            "250 2.0.0 Ok", "421 4.7.0 mx.gateway.test Error: too many junk commands"])
        self.assertTrue(crowd[0].closing and crowd[1].closing)

    def test_under_stress_the_first_greeting_is_not_junk(self) -> None:
        """EHLO then RSET before MAIL (as some MTAs send) ended a session under stress, as
        stress_max_junk_commands (1) counted the EHLO; Postfix counts no HELO/EHLO. The
        session's first greeting, and the first after STARTTLS, are not held against it
        under stress; a second one, or any other junk command, still is."""
        factory, crowd = self.stressed_factory(tls=object())  # each said EHLO
        self.assertEqual(crowd[0].codes(b"RSET\r\nMAIL FROM:<a@remote.test>\r\n"
                                        b"RCPT TO:<u@example.com>\r\nDATA\r\nx\r\n.\r\n"),
                         ["250", "250", "250", "354", "250"])
        self.assertEqual(crowd[1].codes(b"RSET\r\nNOOP\r\n"), ["250", "421"])
        self.assertEqual(crowd[2].codes(b"HELO b.example\r\nEHLO c.example\r\n"),
                         ["250", "421"])
        transport = TLSStringTransport()
        tls = self.session(factory, client_ip="203.0.113.9", transport=transport)
        self.assertEqual(tls.codes(b"EHLO a.example\r\nSTARTTLS\r\n"), [])
        self.assertEqual(tls.codes(b"EHLO a.example\r\nRSET\r\nNOOP\r\n"),
                         ["250", "250", "421"])
        # A junk command before STARTTLS still counts after it.
        tls = self.session(factory, client_ip="203.0.113.10", transport=TLSStringTransport())
        self.assertEqual(tls.codes(b"EHLO a.example\r\nNOOP\r\nSTARTTLS\r\n"), [])
        self.assertEqual(tls.codes(b"EHLO a.example\r\nNOOP\r\n"), ["250", "421"])
        # Out of stress the greeting counts, as before (JunkCommandTests).
        plain = self.make_factory(max_junk_commands=1)
        s = self.session(plain)
        self.assertEqual(s.codes(b"EHLO a.example\r\nRSET\r\n"), ["250", "421"])

    def test_below_the_lower_threshold_the_usual_limits_come_back(self) -> None:
        factory, crowd = self.stressed_factory()
        for s in crowd[:3]:
            s.close()
        self.assertFalse(factory.stressed)
        s = crowd[3]
        self.assertEqual(s.codes(b"A\r\nB\r\nNOOP\r\nNOOP\r\n"), ["502", "502", "250", "250"])
        self.clock.advance(299)  # the timer armed for 10 s finds 300 s again
        self.assertFalse(s.closing)
        self.clock.advance(1)
        self.assertEqual(s.replies(), ["421 4.4.2 mx.gateway.test Error: timeout exceeded"])

    def test_stress_never_lengthens_the_idle_timeout(self) -> None:
        _, crowd = self.stressed_factory(idle_timeout=5)
        self.clock.advance(4.5)
        self.assertFalse(crowd[0].closing)
        self.clock.advance(0.5)
        self.assertTrue(all(s.closing for s in crowd))


class PipeliningTests(ServerTestCase):
    """Pitfall 5: replies stay in order while a command waits on a Deferred."""

    def test_pipelined_rcpts_answered_in_order_while_the_directory_loads(self) -> None:
        gate = self.gate_directory()
        s = self.session()
        replies = s.send(
            b"EHLO client.example\r\nMAIL FROM:<a@remote.test>\r\n"
            b"RCPT TO:<x@example.com>\r\nRCPT TO:<y@foreign.test>\r\n"
            b"RCPT TO:<jane@listed.example>\r\nRCPT TO:<z@example.com>\r\nDATA\r\n"
        )
        self.assertEqual(replies[-1], "250 2.1.0 Ok")  # EHLO and MAIL; the RCPT waits
        gate.callback(None)
        self.assertEqual([r[:9] for r in s.replies()],
                         ["250 2.1.5", "550 5.7.1", "550 5.1.1", "250 2.1.5", "354 End d"])
        self.assertEqual(s.codes(b"x\r\n.\r\n"), ["250"])
        self.assertEqual([r.address for r in self.sink.messages[0].envelope.recipients],
                         ["x@example.com", "z@example.com"])

    def test_directory_that_cannot_load_gives_451_in_order(self) -> None:
        self.domains = DomainService(self.db, self.clock)
        self.factory = self.make_factory()
        read = self.db.read
        self.db.read = lambda *a, **k: defer.fail(RuntimeError("db down"))  # type: ignore
        self.addCleanup(setattr, self.db, "read", read)
        s = self.session()
        s.hello()
        self.assertEqual([r[:9] for r in s.send(b"MAIL FROM:<a@remote.test>\r\n"
                                                b"RCPT TO:<x@example.com>\r\nNOOP\r\n")],
                         ["250 2.1.0", "451 4.3.0", "250 2.0.0"])
        self.flushLoggedErrors(RuntimeError)

    def test_commands_after_end_of_data_wait_for_the_commit(self) -> None:
        self.sink.hold = True
        s = self.session()
        self.start(s)
        self.assertEqual(s.send(b"one\r\n.\r\nMAIL FROM:<b@remote.test>\r\n"
                                b"RCPT TO:<u@example.com>\r\nDATA\r\n"), [])
        self.assertEqual(self.sink.messages, [])
        self.sink.release()
        self.assertEqual([r[:3] for r in s.replies()], ["250", "250", "250", "354"])
        self.assertEqual(s.codes(b"two\r\n.\r\nQUIT\r\n"), [])
        self.sink.release()
        self.assertEqual([r[:3] for r in s.replies()], ["250", "221"])
        self.assertEqual(self.sink.bodies, [b"one\r\n", b"two\r\n"])

    def test_a_large_backlog_pauses_reading(self) -> None:
        self.sink.hold = True
        s = self.session(self.make_factory(max_junk_commands=20_000))
        self.start(s)
        s.send(b"x\r\n.\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(s.transport.producerState, "paused")
        self.sink.release()
        replies = s.replies()
        self.assertEqual(len(replies), 20001)
        self.assertTrue(replies[0].startswith("250 2.0.0 Ok: queued as "))
        self.assertEqual(set(replies[1:]), {"250 2.0.0 Ok"})
        self.assertEqual(s.transport.producerState, "producing")


class FlowControlTests(ServerTestCase):
    """A client that does not read its replies stops being read (the session is its
    transport's streaming producer)."""

    def test_a_client_that_reads_no_replies_is_no_longer_read(self) -> None:
        transport = SendBufferTransport()
        s = self.session(self.make_factory(max_junk_commands=200_000), transport=transport)
        flood = b"HELP\r\n" * 100_000  # 600 kB that would be 7.5 MB of replies
        s.protocol.dataReceived(b"EHLO client.example\r\n" + flood)
        held = len(transport.value())
        # the transport's buffer size, and at most one batch of corked replies beyond it
        self.assertLess(held, 64 * 1024 + 256 * 80)
        self.assertEqual(transport.producerState, "paused")  # the socket is not read
        s.protocol.dataReceived(b"NOOP\r\n")  # a segment already on its way
        self.assertEqual(len(transport.value()), held)
        replies = b""
        while transport.producer_paused:
            replies += transport.client_reads()
        replies += transport.client_reads()
        lines = replies.decode("ascii").split("\r\n")[:-1]
        self.assertEqual(lines[0], "250-mx.gateway.test")
        help_lines = [line for line in lines if line.startswith("214 ")]
        self.assertEqual(len(help_lines), 100_000)
        self.assertEqual(lines[-1], "250 2.0.0 Ok")  # the NOOP, last, in order
        self.assertEqual(transport.producerState, "producing")

    def test_a_client_that_never_reads_is_cut_off_at_the_idle_timeout(self) -> None:
        transport = SendBufferTransport()
        s = self.session(self.make_factory(idle_timeout=60, max_junk_commands=100_000),
                         transport=transport)
        s.protocol.dataReceived(b"EHLO client.example\r\n" + b"HELP\r\n" * 20_000)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(60)
        # aborted: a graceful close would wait for the client to read what is unsent
        self.assertTrue(transport.disconnected)
        s.protocol.connectionLost(Exception("aborted"))  # type: ignore[arg-type]
        self.assertEqual(self.factory.connections, 0)


class StartTLSInjectionTests(ServerTestCase):
    """Pitfall 2: plaintext sent behind STARTTLS is thrown away (CVE-2011-0411)."""

    def test_commands_behind_starttls_never_run(self) -> None:
        context = object()
        transport = TLSStringTransport()
        s = self.session(self.make_factory(tls=context), transport=transport)
        s.hello()
        after = s.send(b"STARTTLS\r\nRSET\r\nEHLO evil\r\nMAIL FROM:<evil@remote.test>\r\n")
        self.assertEqual(transport.before_tls, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(transport.tls_started_with, context)
        self.assertEqual(after, [])  # RSET, EHLO and MAIL were dropped, not answered
        # the injected MAIL did not run, and the session wants a new EHLO
        self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
        self.assertEqual(s.send(b"MAIL FROM:<a@remote.test>\r\n"),
                         ["503 5.5.1 Error: send HELO/EHLO first"])
        lines = s.hello()
        self.assertNotIn("250-STARTTLS", lines)
        self.assertNotIn("250 STARTTLS", lines)
        self.assertEqual(s.codes(b"STARTTLS\r\n"), ["503"])
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\n"
                                 b"DATA\r\nx\r\n.\r\n"), ["250", "250", "354", "250"])
        self.assertTrue(self.sink.messages[0].envelope.tls)
        self.assertIn(b" with ESMTPS id ", self.sink.messages[0].data)

    def test_starttls_takes_no_argument(self) -> None:
        s = self.session(self.make_factory(tls=object()), transport=TLSStringTransport())
        s.hello()
        self.assertEqual(s.codes(b"STARTTLS now\r\n"), ["501"])


def looped(hops: int) -> bytes:
    """The header section of a message that went round `hops` times (folded fields)."""
    return b"".join(
        b"Received: from gw.test (gw.test [192.0.2.1])\r\n"
        b"\tby gw.test (Mailcore) with ESMTP id Q%d\r\n"
        b"\tfor <user@example.com>; Sun, 15 Jun 2025 15:06:40 +0000\r\n" % n
        for n in range(hops)
    )


class HopLimitTests(ServerTestCase):
    """Mail loops: a message may leave with at most `max_hops` (50) Received fields, ours
    included, so one that arrives with 50 (51 with ours) is refused at the end of DATA."""

    REFUSED = ["554 5.4.6 Too many hops (more than 49 Received header fields); "
               "message refused"]

    def send_chunked(self, s: Session, wire: bytes, size: int) -> list[str]:
        replies: list[str] = []
        for i in range(0, len(wire), size):
            replies += s.send(wire[i:i + size])
        return replies

    def test_a_looping_message_is_refused_however_it_is_cut(self) -> None:
        for arriving in (50, 51, 1181):
            wire = stuff(looped(arriving) + b"Subject: loop\r\n\r\nbody\r\n")
            # 1 and 7 cut inside "Received" names and folds; 4096 across field boundaries
            for size in (len(wire), 4096, 100, 7, 1):
                with self.subTest(arriving=arriving, chunk=size):
                    s = self.session()
                    self.start(s)
                    self.assertEqual(self.send_chunked(s, wire, size), self.REFUSED)
                    # back in command state, with nothing kept
                    self.assertEqual(s.protocol._body, b"")
                    self.assertEqual(s.codes(b"RCPT TO:<u@example.com>\r\n"), ["503"])
                    s.close()
        self.assertEqual(self.sink.messages, [])

    def test_one_hop_fewer_passes_and_leaves_with_50(self) -> None:
        content = looped(49) + b"Subject: almost\r\n\r\nbody\r\n"
        wire = stuff(content)
        for size in (len(wire), 7, 1):
            with self.subTest(chunk=size):
                s = self.session()
                self.start(s)
                self.assertEqual([r[:3] for r in self.send_chunked(s, wire, size)], ["250"])
                s.close()
        for accepted in self.sink.messages:
            self.assertEqual(count_received(accepted.data), 50)
        self.assertEqual(self.sink.bodies, [content] * 3)

    def test_received_lines_in_the_body_do_not_count(self) -> None:
        content = b"Subject: a forwarded loop\r\n\r\n" + looped(200)
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(stuff(content)), ["250"])
        self.assertEqual(self.sink.bodies, [content])

    def test_names_in_any_case_with_space_before_the_colon(self) -> None:
        s = self.session(self.make_factory(max_hops=2))
        self.start(s)
        self.assertEqual(s.codes(b"RECEIVED: a\r\nreceived : b\r\n\r\nx\r\n.\r\n"),
                         ["554"])
        self.start(s)
        self.assertEqual(s.codes(b"RECEIVED: a\r\nX-Received: b\r\n\r\nx\r\n.\r\n"),
                         ["250"])

    def test_the_limit_is_the_max_hops_setting(self) -> None:
        s = self.session(self.make_factory(max_hops=100))
        self.start(s)
        self.assertEqual(s.codes(stuff(looped(99) + b"\r\nx\r\n")), ["250"])
        self.start(s)
        self.assertEqual(s.send(stuff(looped(100) + b"\r\nx\r\n")), [
            "554 5.4.6 Too many hops (more than 99 Received header fields); message refused"
        ])


class NulTests(ServerTestCase):
    """Message text holds no NUL (RFC 5322 3.5): one anywhere refuses the message whole."""

    def test_nul_in_the_header_or_the_body_is_refused(self) -> None:
        self.assert_refused_whole(
            (b"Subject: a\x00b\r\n\r\nbody\r\n.\r\n",
             b"Subject: a\r\n\r\nbo\x00dy\r\n.\r\n",
             b"Subject: a\r\n\r\n\x00\r\n.\r\n"),
            "554 5.6.0 Error: NUL character in message data; message refused")

    def test_the_session_goes_on_after_a_nul(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b"a\x00\r\n.\r\n"), ["554"])
        self.start(s)
        self.assertEqual(s.codes(b"clean\r\n.\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [b"clean\r\n"])


class FoldedFirstLineTests(ServerTestCase):
    """A message cannot begin with a continuation line: behind our Received field it would
    become part of it (the client's text in our trace), so it is refused whole."""

    def test_a_first_line_beginning_with_white_space_is_refused(self) -> None:
        self.assert_refused_whole(
            (b"\tby trusted.example with ESMTPSA\r\nSubject: a\r\n\r\nb\r\n.\r\n",
             b" for <ceo@example.com>\r\nSubject: a\r\n\r\nb\r\n.\r\n",
             b". (the dot is stuffing)\r\nSubject: a\r\n\r\nb\r\n.\r\n",
             b" \r\n.\r\n"),
            "554 5.6.0 Error: message begins with a folded line (white space); message refused")

    def test_folded_fields_and_a_first_line_with_a_dot_pass(self) -> None:
        s = self.session()
        self.start(s)
        self.assertEqual(s.codes(b"Subject: a\r\n\tb\r\n\r\n c\r\n.\r\n"), ["250"])
        self.start(s)
        self.assertEqual(s.codes(b".. x\r\n.\r\n"), ["250"])
        self.assertEqual(self.sink.bodies, [b"Subject: a\r\n\tb\r\n\r\n c\r\n", b". x\r\n"])


class FixedRoom:
    """A MailboxRoom whose answers the test sets (address -> room; None: plenty)."""

    def __init__(self, rooms: dict[str, int]) -> None:
        self.rooms = rooms

    async def room(self, address: str) -> int | None:
        return self.rooms.get(address)


class RoomAtDataTests(ServerTestCase):
    """A SIZE is the client's word: a message larger than the room left in every one of its
    recipients' mailboxes is refused at the end of DATA, as at RCPT (552 5.2.2), rather than
    accepted to bounce at delivery, to a sender who may be forged."""

    BIG = b"Subject: big\r\n\r\n" + b"x" * 600 + b"\r\n.\r\n"

    def send_big(self, rooms: dict[str, int], *rcpts: str) -> list[str]:
        """Declare SIZE=100 to `rcpts` (each answered 250), then send some 700 octets."""
        self.rooms = FixedRoom(rooms)
        factory = self.make_factory()
        factory.room = self.rooms
        s = self.session(factory)
        s.hello()
        wire = b"MAIL FROM:<x@remote.test> SIZE=100\r\n" + b"".join(
            b"RCPT TO:<%s>\r\n" % rcpt.encode() for rcpt in rcpts) + b"DATA\r\n"
        self.assertEqual(s.codes(wire), ["250"] * (len(rcpts) + 1) + ["354"])
        replies = s.send(self.BIG)
        self.assertEqual(s.codes(b"NOOP\r\n"), ["250"])  # the session goes on
        return replies

    def test_a_message_that_fits_no_recipients_mailbox_is_refused(self) -> None:
        [reply] = self.send_big({"a@example.com": 500, "b@example.com": 400},
                                "a@example.com", "b@example.com")
        self.assertRegex(reply, r"^552 5\.2\.2 Error: mailbox full \(no room for the \d+ "
                                r"octets of the message\); message refused$")
        self.assertEqual(self.sink.messages, [])

    def test_a_message_that_fits_one_recipients_mailbox_is_accepted(self) -> None:
        for rooms in ({"a@example.com": 500, "b@example.com": 2000},  # fits b's
                      {"a@example.com": 500}):  # b's room is not short
            with self.subTest(rooms=rooms):
                [reply] = self.send_big(rooms, "a@example.com", "b@example.com")
                self.assertTrue(reply.startswith("250 2.0.0 Ok: queued as "), reply)

    def test_the_room_is_asked_again_at_the_end_of_data(self) -> None:
        self.rooms = FixedRoom({"a@example.com": 500})
        factory = self.make_factory()
        factory.room = self.rooms
        s = self.session(factory)
        self.start(s, "a@example.com")
        self.rooms.rooms["a@example.com"] = 5000  # mail deleted meanwhile
        self.assertEqual(s.codes(self.BIG), ["250"])
        self.assertEqual(len(self.sink.messages), 1)


class PostmasterTests(ServerTestCase):
    """RFC 5321 4.5.1: `RCPT TO:<postmaster>` is accepted and goes to `[smtp] postmaster`."""

    def send_to_postmaster(self, factory: SMTPServerFactory, rcpt: bytes = b"<postmaster>"
                           ) -> Envelope:
        s = self.session(factory)
        s.hello()
        s.send(b"MAIL FROM:<someone@remote.test>\r\n")
        self.assertEqual(s.send(b"RCPT TO:" + rcpt + b"\r\n"), ["250 2.1.5 Ok"])
        self.assertEqual(s.codes(b"DATA\r\nSubject: hi\r\n\r\nabuse report\r\n.\r\n"),
                         ["354", "250"])
        return self.sink.messages[-1].envelope

    def test_postmaster_in_any_case_is_one_recipient(self) -> None:
        s = self.session(self.make_factory(postmaster="postmaster@example.com"))
        s.hello()
        s.send(b"MAIL FROM:<someone@remote.test>\r\n")
        self.assertEqual(s.codes(b"RCPT TO:<postmaster>\r\n"
                                 b"RCPT TO:<PostMaster@Example.com>\r\n"
                                 b"DATA\r\nx\r\n.\r\n"), ["250", "250", "354", "250"])
        self.assertEqual([r.address for r in self.sink.messages[0].envelope.recipients],
                         ["postmaster@example.com"])

    def test_a_served_postmaster_address_gets_its_domain(self) -> None:
        factory = self.make_factory(postmaster="hostmaster@listed.example")
        envelope = self.send_to_postmaster(factory)
        listed = self.domains.lookup("listed.example")
        assert listed is not None
        # accepted even though listed.example lists only john and postmaster: the operator
        # chose this address
        self.assertEqual(envelope.recipients,
                         (Recipient("hostmaster@listed.example", listed.id),))

    def test_the_default_is_postmaster_at_the_hostname_routed_as_foreign(self) -> None:
        envelope = self.send_to_postmaster(self.factory, b"<PostMaster>")
        self.assertEqual(envelope.recipients, (Recipient("postmaster@mx.gateway.test", None),))

    def test_postmaster_and_its_address_are_one_recipient(self) -> None:
        s = self.session(self.make_factory(postmaster="abuse@example.com"))
        s.hello()
        s.send(b"MAIL FROM:<someone@remote.test>\r\n")
        self.assertEqual(s.codes(b"RCPT TO:<postmaster>\r\nRCPT TO:<abuse@Example.COM>\r\n"
                                 b"RCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\n"),
                         ["250", "250", "250", "354", "250"])
        self.assertEqual([r.address for r in self.sink.messages[0].envelope.recipients],
                         ["abuse@example.com"])

    def test_postmaster_waits_for_the_directory_like_any_recipient(self) -> None:
        gate = self.gate_directory()
        s = self.session(self.make_factory(postmaster="abuse@example.com"))
        s.hello()
        self.assertEqual(s.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<postmaster>\r\n"),
                         ["250"])
        gate.callback(None)
        self.assertEqual(s.replies(), ["250 2.1.5 Ok"])
        self.assertEqual(s.codes(b"DATA\r\nx\r\n.\r\n"), ["354", "250"])
        example = self.domains.lookup("example.com")
        assert example is not None
        self.assertEqual(self.sink.messages[0].envelope.recipients,
                         (Recipient("abuse@example.com", example.id),))

    def test_an_address_that_could_split_an_smtp_line_is_refused(self) -> None:
        for address in ("a@b.test\r\nRCPT TO:<x@evil.test>", "a@b.test\n", "a\x00@b.test",
                        "a b@b.test", "a%evil.test@b.test", "@x.test:a@b.test", "postmaster",
                        '"a"@b.test', "a@[192.0.2.1]"):
            with self.subTest(address=address):
                with self.assertRaises(ValueError):
                    self.make_factory(postmaster=address)

"""The outbound ESMTP client fed raw bytes: reply parsing, pipelining, per-recipient results,
timeouts on a Clock, failures mid-dialogue, and no address that could split a command line."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.smtp.client import (
    CLOSE_GRACE,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    QUIT_TIMEOUT,
    TURN_BYTES,
    WRITE_CHUNK,
    ConnectionLostError,
    ProtocolError,
    Reply,
    ReplyTimeout,
    SMTPClientError,
    SMTPClientProtocol,
    SMTPSession,
    TLSFailed,
    parse_extensions,
)


class ClientTestBase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = SMTPClientProtocol(self.clock, timeout=30)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.session = SMTPSession(self.proto, helo_name="mx.test", data_timeout=60)

    def server(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def sent(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def handshake(self, extensions: bytes = b"250-PIPELINING\r\n250 SIZE 1000000\r\n") -> None:
        d = defer.Deferred.fromCoroutine(self.session.handshake())
        self.server(b"220 sink.test ESMTP\r\n")
        self.assertEqual(self.sent(), b"EHLO mx.test\r\n")
        self.server(b"250-sink.test hello\r\n" + extensions)
        self.successResultOf(d)


class ReplyParsingTests(ClientTestBase):
    def test_multiline_ehlo_reply_gives_extensions(self) -> None:
        self.handshake(b"250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
        self.assertEqual(
            self.session.extensions,
            {"PIPELINING": "", "SIZE": "1000", "STARTTLS": "", "8BITMIME": ""},
        )

    def test_helo_when_ehlo_is_refused(self) -> None:
        d = defer.Deferred.fromCoroutine(self.session.handshake())
        self.server(b"220 old\r\n")
        self.sent()
        self.server(b"502 5.5.2 what\r\n")
        self.assertEqual(self.sent(), b"HELO mx.test\r\n")
        self.server(b"250 old\r\n")
        self.successResultOf(d)
        self.assertEqual(self.session.extensions, {})

    def test_bad_greeting_fails_the_handshake(self) -> None:
        d = defer.Deferred.fromCoroutine(self.session.handshake())
        self.server(b"554 5.3.2 go away\r\n")
        self.assertEqual(self.failureResultOf(d, SMTPClientError).value.code, 554)

    def test_malformed_reply_aborts(self) -> None:
        d = defer.Deferred.fromCoroutine(self.session.handshake())
        self.server(b"hello there\r\n")
        self.failureResultOf(d, SMTPClientError)
        self.assertTrue(self.transport.disconnecting)

    def test_a_code_of_digits_other_than_ascii_is_malformed(self) -> None:
        """A reply code is three ASCII digits. Superscript ones passed str.isdigit and
        raised out of dataReceived (int() refuses them); Arabic-Indic or fullwidth ones read
        as 250."""
        for code in ("\u00b250", "\u0662\u0665\u0660", "\uff12\uff15\uff10"):
            with self.subTest(code=code):
                self.setUp()
                self.handshake()
                d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
                self.server(f"{code} 2.1.0 ok\r\n".encode())
                error = self.failureResultOf(d, SMTPClientError).value
                self.assertIn("malformed reply", str(error))
                self.assertTrue(self.transport.disconnecting)

    def test_parse_extensions_skips_the_greeting_line(self) -> None:
        reply = Reply(250, ("host says hi", "pipelining", "SIZE 10"))
        self.assertEqual(parse_extensions(reply), {"PIPELINING": "", "SIZE": "10"})


class PipelinedTransactionTests(ClientTestBase):
    def test_commands_go_out_in_one_write_and_replies_map_to_recipients(self) -> None:
        self.handshake()
        body = b"Subject: x\r\n\r\n.leading dot\r\n"
        d = defer.Deferred.fromCoroutine(
            self.session.send("a@x.test", ["b@c.test", "bad@c.test", "d@c.test"], body)
        )
        self.assertEqual(
            self.sent(),
            b"MAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@c.test>\r\n"
            b"RCPT TO:<bad@c.test>\r\nRCPT TO:<d@c.test>\r\nDATA\r\n" % len(body),
        )
        self.server(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.sent(), b"Subject: x\r\n\r\n..leading dot\r\n.\r\n")
        self.server(b"250 2.0.0 queued as X\r\n")
        result = self.successResultOf(d)
        self.assertEqual(
            [result.for_recipient(i).code for i in range(3)], [250, 550, 250]
        )

    def send_one(self, envelope_replies: bytes) -> tuple[bytes, Reply | None]:
        """One transaction to b@c.test: what the client sent first, and the final reply
        (DATA's, or the body's once the envelope replies end with 354)."""
        d = defer.Deferred.fromCoroutine(self.session.send("a@x.test", ["b@c.test"], b"x\r\n"))
        first = self.sent()
        self.server(envelope_replies)
        if envelope_replies.endswith(b"354 go\r\n"):
            self.sent()
            self.server(b"250 queued\r\n")
        return first, self.successResultOf(d).data

    def test_no_rset_after_a_completed_transaction(self) -> None:
        self.handshake()
        self.send_one(b"250 ok\r\n250 ok\r\n354 go\r\n")
        sent, data = self.send_one(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertTrue(sent.startswith(b"MAIL FROM:<a@x.test>"))
        self.assertEqual(data, Reply(250, ("queued",)))

    def test_rset_is_pipelined_before_mail_after_a_transaction_without_data(self) -> None:
        """DATA refused: MAIL may still stand at the server, so the next transaction resets."""
        self.handshake()
        _, data = self.send_one(b"250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n")
        self.assertEqual(data, Reply(451, ("4.3.0 not now",)))
        sent, data = self.send_one(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertTrue(sent.startswith(b"RSET\r\nMAIL FROM:<a@x.test>"))
        self.assertEqual(data, Reply(250, ("queued",)))

    def test_a_group_reply_split_across_reads_fires_once_complete(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "d@c"], b"x\r\n"))
        self.sent()
        self.server(b"250 ok\r\n250-long\r\n")
        self.server(b"250 ok\r\n")
        self.assertEqual(self.sent(), b"")  # DATA's reply has not come yet
        self.clock.advance(29)
        self.server(b"250 ok\r\n354 go\r\n")
        self.assertEqual(self.sent(), b"x\r\n.\r\n")
        self.server(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).rcpts[0], Reply(250, ("long", "ok")))

    def test_connection_lost_mid_group_fails_the_send(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        self.sent()
        self.server(b"250 ok\r\n")
        self.proto.connectionLost(Failure(ConnectionDone("bye")))
        self.failureResultOf(d, ConnectionLostError)

    def test_all_recipients_refused_but_data_accepted_ends_with_a_lone_dot(self) -> None:
        """RFC 2920 3.1: no content may follow when nobody was accepted."""
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"secret\r\n"))
        self.sent()
        self.server(b"250 ok\r\n550 no\r\n354 go\r\n")
        self.assertEqual(self.sent(), b".\r\n")
        self.server(b"554 no valid recipients\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.for_recipient(0).code, 550)

    def test_mail_refused_decides_every_recipient(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "d@c"], b"x\r\n"))
        self.sent()
        self.server(b"452 4.3.1 full\r\n503 need mail\r\n503 need mail\r\n503 need mail\r\n")
        result = self.successResultOf(d)
        self.assertEqual({result.for_recipient(i).code for i in range(2)}, {452})


class EightBitTests(ClientTestBase):
    """RFC 6152: a body holding 8-bit octets is declared BODY=8BITMIME to a server that
    offers 8BITMIME; a 7-bit body is not declared; to a server without 8BITMIME nothing is
    declared (the body goes out as it is)."""

    EIGHT_BIT = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()

    def first_line(self, extensions: bytes, body: bytes) -> bytes:
        self.handshake(extensions)
        defer.Deferred.fromCoroutine(self.session.send("a@x.test", ["b@c.test"], body))
        return self.sent().split(b"\r\n", 1)[0]

    def test_8bit_body_is_declared_to_a_server_with_8bitmime(self) -> None:
        self.assertEqual(
            self.first_line(b"250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
                            self.EIGHT_BIT),
            b"MAIL FROM:<a@x.test> SIZE=%d BODY=8BITMIME" % len(self.EIGHT_BIT))

    def test_a_single_high_octet_is_enough(self) -> None:
        self.assertEqual(self.first_line(b"250-PIPELINING\r\n250 8BITMIME\r\n",
                                         b"x\r\n\r\n" + b"a" * 5000 + b"\xff\r\n"),
                         b"MAIL FROM:<a@x.test> BODY=8BITMIME")

    def test_7bit_body_is_not_declared(self) -> None:
        body = b"Subject: x\r\n\r\nplain\r\n"
        self.assertEqual(
            self.first_line(b"250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n", body),
            b"MAIL FROM:<a@x.test> SIZE=%d" % len(body))

    def test_no_declaration_to_a_server_without_8bitmime(self) -> None:
        self.assertEqual(self.first_line(b"250-PIPELINING\r\n250 SIZE 1000\r\n",
                                         self.EIGHT_BIT),
                         b"MAIL FROM:<a@x.test> SIZE=%d" % len(self.EIGHT_BIT))

    def test_declared_without_pipelining_too(self) -> None:
        self.handshake(b"250 8BITMIME\r\n")
        defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], self.EIGHT_BIT))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@x> BODY=8BITMIME\r\n")


class ControlCharacterTests(ClientTestBase):
    """No address can split a command line: one with CR, LF or another control character
    is never written, and the recipient (or, for the sender, every recipient) gets a 553."""

    def test_a_recipient_with_crlf_is_refused_and_the_others_are_sent(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send(
            "a@x.test", ["b@c.test", "e@c.test>\r\nRCPT TO:<victim@elsewhere.test",
                         "f@c.\ntest", "g@c.test"], b"x\r\n"))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@x.test> SIZE=3\r\nRCPT TO:<b@c.test>\r\n"
                                      b"RCPT TO:<g@c.test>\r\nDATA\r\n")
        self.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.sent()
        self.server(b"250 queued\r\n")
        result = self.successResultOf(d)
        replies = [result.for_recipient(i) for i in range(4)]
        self.assertEqual([r.code for r in replies], [250, 553, 553, 250])
        self.assertFalse(replies[1].temporary)  # bounced, not retried for days

    def test_a_sender_with_a_control_character_sends_nothing(self) -> None:
        self.handshake()
        for sender in ("a@x.test\r\nRSET", "a\x00@x.test", "a@x.test\x7f"):
            with self.subTest(sender=sender):
                result = self.successResultOf(defer.Deferred.fromCoroutine(
                    self.session.send(sender, ["b@c.test", "d@c.test"], b"x\r\n")))
                self.assertEqual(self.sent(), b"")
                self.assertEqual({result.for_recipient(i).code for i in range(2)}, {553})

    def test_when_every_recipient_is_refused_nothing_is_sent(self) -> None:
        self.handshake()
        result = self.successResultOf(defer.Deferred.fromCoroutine(
            self.session.send("a@x.test", ["b@c.test\r\n"], b"x\r\n")))
        self.assertEqual(self.sent(), b"")
        self.assertEqual(result.for_recipient(0).code, 553)

    def test_a_quoted_local_part_with_a_space_still_goes_out(self) -> None:
        self.handshake()
        defer.Deferred.fromCoroutine(self.session.send('"a b"@x.test', ["b@c.test"], b"x\r\n"))
        self.assertTrue(self.sent().startswith(b'MAIL FROM:<"a b"@x.test>'))


class LockstepTransactionTests(ClientTestBase):
    def test_without_pipelining_each_command_waits_for_its_reply(self) -> None:
        self.handshake(b"250 SIZE 100\r\n")
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        self.assertEqual(self.sent(), b"MAIL FROM:<a@x> SIZE=3\r\n")
        self.server(b"250 ok\r\n")
        self.assertEqual(self.sent(), b"RCPT TO:<b@c>\r\n")
        self.server(b"250 ok\r\n")
        self.assertEqual(self.sent(), b"DATA\r\n")
        self.server(b"354 go\r\n")
        self.assertEqual(self.sent(), b"x\r\n.\r\n")
        self.server(b"250 done\r\n")
        self.assertEqual(self.successResultOf(d).for_recipient(0).code, 250)


class FailureTests(ClientTestBase):
    def test_silence_times_out_on_the_clock(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.failureResultOf(d, ReplyTimeout)
        self.assertTrue(self.transport.disconnecting)

    def test_a_command_after_a_data_phase_times_out_on_its_own_timeout(self) -> None:
        """The reply timer is one lazy DelayedCall: once moved to the data phase's deadline
        (it fired during the phase), it went on to time the next command too, which then
        waited until that deadline (t=89 here) instead of its own 30 s (t=61)."""
        self.handshake()
        first = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        self.clock.advance(29)
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.clock.advance(2)  # (the call set for the group fires, and waits for the data's)
        self.server(b"250 queued\r\n")
        self.successResultOf(first)
        self.sent()
        second = defer.Deferred.fromCoroutine(self.session.send("a@x", ["d@c"], b"y\r\n"))
        self.clock.advance(29.9)
        self.assertNoResult(second)
        self.clock.advance(0.1)
        self.failureResultOf(second, ReplyTimeout)

    def test_data_gets_the_longer_timeout(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.clock.advance(45)
        self.assertNoResult(d)
        self.clock.advance(20)
        self.failureResultOf(d, ReplyTimeout)

    def test_connection_lost_fails_every_pending_reply(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "c@c"], b"x\r\n"))
        self.server(b"250 ok\r\n")
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.proto.connectionLost(Failure(ConnectionLost("reset")))
        self.failureResultOf(d, ConnectionLostError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_starttls_refused_raises_tls_failed(self) -> None:
        self.handshake(b"250 STARTTLS\r\n")
        d = defer.Deferred.fromCoroutine(self.session.starttls(object()))  # type: ignore[arg-type]
        self.assertEqual(self.sent(), b"STARTTLS\r\n")
        self.server(b"454 4.7.0 not now\r\n")
        self.assertEqual(self.failureResultOf(d, TLSFailed).value.code, 454)

    def test_bytes_before_the_tls_switch_are_discarded(self) -> None:
        """An injected reply sent in the same packet as 220 must not be read after TLS."""
        self.handshake(b"250 STARTTLS\r\n")
        started: list[Any] = []
        self.transport.startTLS = started.append  # type: ignore[attr-defined]
        d = defer.Deferred.fromCoroutine(self.session.starttls(object()))  # type: ignore[arg-type]
        self.sent()
        self.server(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(len(started), 1)
        self.assertEqual(self.sent(), b"EHLO mx.test\r\n")
        self.assertNoResult(d)
        self.server(b"250-sink.test\r\n250 SIZE 5\r\n")
        self.successResultOf(d)
        self.assertEqual(self.session.extensions, {"SIZE": "5"})


class ReplyCodeTests(ClientTestBase):
    """RFC 5321 4.3.2: each command's success is only the codes it allows (MAIL 250, RCPT
    250/251, DATA 354, the end of the data 2yz). Any other code short of a refusal is the
    next hop breaking the protocol: a temporary failure in our words, no body sent on it,
    the session dropped. Before, every 2yz or 3yz counted as success: a 250 to DATA was a
    delivery of a body never sent."""

    BODY = b"Subject: s\r\n\r\nBODY\r\n"

    def send(self, *rcpts: str) -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(self.session.send("a@x.test", list(rcpts), self.BODY))
        self.sent()
        return d

    def assert_protocol_error(self, reply: Reply, text: str) -> None:
        self.assertFalse(reply.ok)
        self.assertTrue(reply.temporary)
        self.assertEqual(str(reply), text)

    def assert_dropped(self) -> None:
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.session.usable)

    def test_250_to_data_sends_no_body_and_defers(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n250 ok, but I never asked for the body\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.sent(), b"")
        self.assert_protocol_error(result.for_recipient(0),
                                   "4.5.0 protocol error: 250 in reply to DATA")
        self.assert_dropped()

    def test_250_to_data_without_pipelining_sends_no_body(self) -> None:
        self.handshake(b"250 SIZE 100000\r\n")
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], self.BODY))
        self.server(b"250 ok\r\n")
        self.server(b"250 ok\r\n")
        self.assertTrue(self.sent().endswith(b"DATA\r\n"))
        self.server(b"250 ok\r\n")
        self.assert_protocol_error(self.successResultOf(d).for_recipient(0),
                                   "4.5.0 protocol error: 250 in reply to DATA")
        self.assertEqual(self.sent(), b"")
        self.assert_dropped()

    def test_354_after_the_body_defers(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.sent(), self.BODY + b".\r\n")
        self.server(b"354 again?\r\n")
        self.assert_protocol_error(self.successResultOf(d).for_recipient(0),
                                   "4.5.0 protocol error: 354 in reply to the end of the data")
        self.assert_dropped()

    def test_any_2yz_after_the_body_is_delivered(self) -> None:
        """RFC 5321 4.2.5: a 2yz after the data accepts responsibility; sending the message
        again would deliver it twice."""
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.server(b"251 2.0.0 taken\r\n")
        self.assertTrue(self.successResultOf(d).for_recipient(0).ok)
        self.assertTrue(self.session.usable)

    def test_354_to_rcpt_sends_no_body(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n354 rcpt?\r\n354 go\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.sent(), b"")
        self.assert_protocol_error(result.rcpts[0], "4.5.0 protocol error: 354 in reply to RCPT")
        self.assert_protocol_error(result.for_recipient(0),
                                   "4.5.0 protocol error: 354 in reply to RCPT")
        self.assert_dropped()

    def test_rcpt_success_is_250_or_251_not_252(self) -> None:
        """RFC 5321 4.3.2 lists 250 and 251 for RCPT; 252 belongs to VRFY and EXPN."""
        self.handshake()
        d = self.send("b@c.test", "d@c.test", "e@c.test")
        self.server(b"250 ok\r\n250 ok\r\n251 forwarded\r\n252 cannot VRFY\r\n354 go\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.sent(), b"")
        self.assertEqual([r.code for r in result.rcpts[:2]], [250, 251])
        self.assert_protocol_error(result.for_recipient(0),
                                   "4.5.0 protocol error: 252 in reply to RCPT")
        self.assert_protocol_error(result.for_recipient(2),
                                   "4.5.0 protocol error: 252 in reply to RCPT")

    def test_a_refusal_before_the_protocol_error_keeps_its_meaning(self) -> None:
        self.handshake()
        d = self.send("b@c.test", "d@c.test", "e@c.test")
        self.server(b"250 ok\r\n550 5.1.1 unknown\r\n354 what\r\n451 4.3.0 later\r\n354 go\r\n")
        result = self.successResultOf(d)
        self.assertTrue(result.for_recipient(0).permanent)
        self.assertEqual(result.for_recipient(0).code, 550)
        # the 451 came after the stray 354: it cannot be matched to its command any more
        for i in (1, 2):
            self.assert_protocol_error(result.for_recipient(i),
                                       "4.5.0 protocol error: 354 in reply to RCPT")

    def test_a_stray_code_to_mail_fails_every_recipient(self) -> None:
        self.handshake(b"250 SIZE 100000\r\n")
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "d@c"], self.BODY))
        self.sent()
        self.server(b"354 go ahead\r\n")
        result = self.successResultOf(d)
        self.assertEqual(self.sent(), b"")  # no RCPT after it
        for i in (0, 1):
            self.assert_protocol_error(result.for_recipient(i),
                                       "4.5.0 protocol error: 354 in reply to MAIL")
        self.assert_dropped()

    def test_a_stray_code_to_rcpt_without_pipelining_stops_the_transaction(self) -> None:
        self.handshake(b"250 SIZE 100000\r\n")
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "d@c"], self.BODY))
        self.server(b"250 ok\r\n")
        self.server(b"221 what\r\n")
        self.assertEqual(self.sent(),
                         b"MAIL FROM:<a@x> SIZE=%d\r\nRCPT TO:<b@c>\r\n" % len(self.BODY))
        result = self.successResultOf(d)
        for i in (0, 1):
            self.assert_protocol_error(result.for_recipient(i),
                                       "4.5.0 protocol error: 221 in reply to RCPT")
        self.assert_dropped()

    def test_a_code_outside_2_to_5_is_a_protocol_error(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.server(b"650 what\r\n")
        self.assert_protocol_error(self.successResultOf(d).for_recipient(0),
                                   "4.5.0 protocol error: 650 in reply to the end of the data")

    def test_the_text_is_ours_without_the_peers_control_characters(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n250 \x1b[2J\x00 ok\r\n")
        text = str(self.successResultOf(d).for_recipient(0))
        self.assertEqual(text, "4.5.0 protocol error: 250 in reply to DATA")

    def test_a_stray_code_to_the_rset_fails_the_transaction(self) -> None:
        self.handshake()
        d = self.send("b@c.test")
        self.server(b"250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n")
        self.successResultOf(d)
        d = self.send("b@c.test")
        self.server(b"354 reset?\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(self.sent(), b"")
        self.assert_protocol_error(self.successResultOf(d).for_recipient(0),
                                   "4.5.0 protocol error: 354 in reply to RSET")
        self.assert_dropped()

    def test_real_refusals_keep_their_meaning(self) -> None:
        self.handshake()
        d = self.send("b@c.test", "d@c.test")
        self.server(b"250 ok\r\n451 4.3.0 later\r\n250 ok\r\n354 go\r\n")
        self.sent()
        self.server(b"554 5.7.1 refused\r\n")
        result = self.successResultOf(d)
        self.assertEqual(str(result.for_recipient(0)), "451 4.3.0 later")
        self.assertTrue(result.for_recipient(0).temporary)
        self.assertEqual(str(result.for_recipient(1)), "554 5.7.1 refused")
        self.assertTrue(result.for_recipient(1).permanent)
        self.assertTrue(self.session.usable)


class HostileReplyTests(ClientTestBase):
    """A reply has one deadline from its command's send, at most MAX_REPLY_LINES lines and
    MAX_REPLY_BYTES octets; input nobody asked for is not kept and drops the connection.
    Before, each continuation line re-armed the timer and was kept: one 65 KB line every
    29 s held a send open for hours and hundreds of MB in memory."""

    def test_an_endless_reply_times_out_from_its_commands_send(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        for _ in range(3):
            self.clock.advance(9)
            self.server(b"250-still going\r\n")
        self.assertNoResult(d)
        self.clock.advance(3.5)  # 30.5 s since MAIL, RCPT and DATA went out
        self.failureResultOf(d, ReplyTimeout)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proto._lines, [])

    def test_each_reply_of_a_slow_pipelined_group_gets_its_own_deadline(self) -> None:
        """RFC 5321 4.5.3.2's timeouts are per command: a server that takes nearly the
        whole timeout for each reply, and the DATA timeout for the end, still delivers."""
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c", "d@c"], b"x\r\n"))
        self.sent()
        for delay, reply in ((14.5, b"250-sender\r\n"), (14.5, b"250 ok\r\n"),
                             (29, b"250 ok\r\n"), (29, b"250 ok\r\n"), (29, b"354 go\r\n")):
            self.clock.advance(delay)
            self.server(reply)
        self.assertEqual(self.sent(), b"x\r\n.\r\n")
        self.clock.advance(59)
        self.server(b"250-2.0.0 queued\r\n250 as ABC\r\n")
        result = self.successResultOf(d)
        self.assertEqual([result.for_recipient(i).code for i in (0, 1)], [250, 250])

    def test_a_reply_of_more_than_max_lines_is_a_protocol_error(self) -> None:
        d = defer.Deferred.fromCoroutine(self.session.handshake())
        self.server(b"220 hop\r\n")
        self.sent()
        self.server(b"250-hop\r\n" * MAX_REPLY_LINES)
        self.assertNoResult(d)
        self.server(b"250 one line too many\r\n")
        error = self.failureResultOf(d, ProtocolError).value
        self.assertEqual(str(error), "4.5.0 protocol error: a reply of more than 100 lines "
                                     "or 65536 octets")
        self.assertFalse(error.permanent)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proto._lines, [])

    def test_a_reply_of_max_lines_is_read(self) -> None:
        self.handshake(b"".join(b"250-X%d\r\n" % i for i in range(MAX_REPLY_LINES - 2))
                       + b"250 PIPELINING\r\n")
        self.assertEqual(len(self.session.extensions), MAX_REPLY_LINES - 1)

    def test_a_reply_of_more_than_max_bytes_is_a_protocol_error(self) -> None:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], b"x\r\n"))
        line = b"250-" + b"A" * (MAX_REPLY_BYTES // 2) + b"\r\n"
        self.server(line)
        self.assertNoResult(d)
        self.server(line)
        self.failureResultOf(d, ProtocolError)
        self.assertTrue(self.transport.disconnecting)

    def test_input_on_an_idle_connection_is_discarded_and_drops_it(self) -> None:
        self.handshake()
        self.assertTrue(self.session.usable)
        for _ in range(3):
            self.server(b"250-" + b"B" * 1000 + b"\r\n")
        self.assertEqual(self.proto._lines, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.session.usable)
        self.successResultOf(defer.Deferred.fromCoroutine(self.session.quit()))
        self.assertEqual(self.sent(), b"")  # no QUIT on a dropped connection

    def test_the_rest_of_the_read_is_dropped_with_the_connection(self) -> None:
        """As on TCP, aborting does not set `disconnecting`: the lines after the one that
        dropped the connection are not parsed one by one."""
        self.handshake()
        self.transport.abortConnection = lambda: None  # type: ignore[method-assign]
        seen: list[bytes] = []
        receive = self.proto.lineReceived

        def counting(line: bytes) -> None:
            seen.append(line)
            receive(line)

        self.proto.lineReceived = counting  # type: ignore[method-assign]
        self.server(b"250 unasked\r\n" * 1000)
        self.assertFalse(self.session.usable)
        self.assertEqual(len(seen), 1)

    def test_replies_beyond_those_asked_for_drop_the_connection(self) -> None:
        """A hop that answers with more replies than it was asked for, in one read, is out
        of step: the extra ones must not answer the next transaction, which the queue starts
        from the first one's callback while the rest of that read is still unparsed (a
        message the hop refused, or never saw, would be recorded as delivered). The reply
        the message got stands; the connection is dropped and nothing more is written."""
        self.handshake()
        started: list[defer.Deferred[Any]] = []

        def next_transaction(result: Any) -> Any:
            if self.session.usable:  # as the queue runner does
                started.append(defer.Deferred.fromCoroutine(
                    self.session.send("a@x.test", ["e@c.test"], b"never\r\n")))
            return result

        d = defer.Deferred.fromCoroutine(self.session.send("a@x.test", ["b@c.test"], b"x\r\n"))
        d.addCallback(next_transaction)
        self.sent()
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.sent()
        self.server(b"250 queued\r\n250 2.1.0 stale\r\n250 2.1.5 stale\r\n354 stale\r\n")
        self.assertEqual(self.successResultOf(d).data, Reply(250, ("queued",)))
        self.assertEqual(self.sent(), b"")
        self.assertFalse(self.session.usable)
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionDone("dropped")))
        self.failureResultOf(started[0], ConnectionLostError)

    def test_a_partial_line_that_came_unasked_drops_the_connection_at_the_next_write(
        self,
    ) -> None:
        self.handshake()
        self.server(b"250 2.1")  # no reply awaited, not yet a whole line
        d = defer.Deferred.fromCoroutine(self.session.send("a@x.test", ["b@c.test"], b"x\r\n"))
        self.assertEqual(self.sent(), b"")
        self.assertFalse(self.session.usable)
        self.proto.connectionLost(Failure(ConnectionDone("dropped")))
        self.failureResultOf(d, ConnectionLostError)

    def test_an_unsolicited_421_drops_the_connection(self) -> None:
        self.handshake()
        self.server(b"421 4.4.2 idle too long\r\n")
        self.assertFalse(self.session.usable)


class CloseTests(ClientTestBase):
    """After QUIT the connection is closed, and dropped if the next hop does not let it go:
    over TLS, Twisted's close waits for the hop's close_notify, and a hop that neither sent
    one nor closed its end held the socket open for ever (reproduced over real TLS with a
    next hop that answers 221 and then nothing: still connected 30 s later)."""

    def quit(self) -> list[bool]:
        aborted: list[bool] = []
        self.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.quit())
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.server(b"221 2.0.0 Bye\r\n")
        self.successResultOf(d)
        self.assertTrue(self.transport.disconnecting)
        return aborted

    def test_a_next_hop_that_keeps_the_connection_is_dropped(self) -> None:
        aborted = self.quit()
        self.clock.advance(CLOSE_GRACE - 1)
        self.assertEqual(aborted, [])
        self.clock.advance(1)
        self.assertEqual(aborted, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_input_after_quit_is_not_kept(self) -> None:
        """A closing connection still reads (over TLS, until the hop's close_notify, up to
        CLOSE_GRACE); LineReceiver stops after one line of a read once the transport is
        disconnecting, and kept the rest: 300 KB here, whatever the hop sent in all."""
        self.quit()
        for _ in range(5):
            self.server(b"x\r\n" * 20_000)
        self.assertEqual(self.proto.clearLineBuffer(), b"")

    def test_a_next_hop_that_never_answers_quit_is_dropped_after_quit_timeout(self) -> None:
        """Not after command_timeout (30 s here, 300 by default): the connection's slots are
        free QUIT_TIMEOUT after its last message whatever the hop does."""
        aborted: list[bool] = []
        self.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.quit())
        self.assertEqual(self.sent(), b"QUIT\r\n")
        self.clock.advance(QUIT_TIMEOUT - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(aborted, [True])
        self.assertFalse(self.session.usable)

    def test_a_connection_that_closes_leaves_no_timer(self) -> None:
        aborted = self.quit()
        self.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(CLOSE_GRACE)
        self.assertEqual(aborted, [])


class PacedBodyTests(ClientTestBase):
    """A large body is not written in one go on the reactor: its DATA stream goes a chunk at
    a time, under the transport's flow control and with a reactor turn every TURN_BYTES
    (written at once, a 53 MB message held the reactor 300-480 ms)."""

    def start(self, body: bytes) -> defer.Deferred[Any]:
        self.handshake()
        d = defer.Deferred.fromCoroutine(self.session.send("a@x", ["b@c"], body))
        self.sent()
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        return d

    def test_the_stream_gives_the_reactor_a_turn_every_turn_bytes(self) -> None:
        body = b"".join(b"line %07d of the message\r\n" % i for i in range(60_000))  # 1.6 MB
        d = self.start(body)
        first = self.sent()
        self.assertGreaterEqual(len(first), TURN_BYTES)
        self.assertLess(len(first), TURN_BYTES + WRITE_CHUNK + 10)
        written = [first]
        for _ in range(len(body) // TURN_BYTES + 1):
            self.clock.advance(0)
            written.append(self.sent())
        self.assertEqual(b"".join(written), body + b".\r\n")
        self.assertGreater(len(written), len(body) // TURN_BYTES)
        self.server(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).data, Reply(250, ("queued",)))

    def test_a_success_before_the_end_of_the_data_stops_the_stream_and_defers(self) -> None:
        """Between chunks the reactor reads: a 250 read then is no answer to an end the hop
        has not seen. Before, it counted as the message's acceptance and the rest of the
        stream (1.3 MB here) went on to the hop, which read it as commands."""
        body = b"".join(b"line %07d of the message\r\n" % i for i in range(60_000))
        d = self.start(body)
        first = self.sent()
        self.assertLess(len(first), len(body))
        self.server(b"250 2.0.0 queued as 1234\r\n")
        for _ in range(len(body) // TURN_BYTES + 1):
            self.clock.advance(0)
        self.assertEqual(self.sent(), b"")
        reply = self.successResultOf(d).for_recipient(0)
        self.assertFalse(reply.ok)
        self.assertTrue(reply.temporary)
        self.assertEqual(str(reply), "4.5.0 protocol error: 250 before the end of the data")
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.session.usable)

    def test_a_refusal_before_the_end_of_the_data_stands_and_stops_the_stream(self) -> None:
        self.transport = _PausingTransport()
        self.proto = SMTPClientProtocol(self.clock, timeout=30)
        self.proto.makeConnection(self.transport)
        self.session = SMTPSession(self.proto, helo_name="mx.test", data_timeout=60)
        d = self.start((b"x" * 70 + b"\r\n") * (4 * WRITE_CHUNK // 72))
        self.sent()
        self.server(b"552 5.3.4 message too big\r\n")
        producer = self.transport.producer
        assert producer is not None
        producer.resumeProducing()
        self.assertEqual(self.sent(), b"")
        reply = self.successResultOf(d).for_recipient(0)
        self.assertEqual((reply.code, reply.permanent), (552, True))
        self.assertTrue(self.transport.disconnecting)

    def test_the_stream_waits_while_the_transport_is_paused(self) -> None:
        self.transport = _PausingTransport()
        self.proto = SMTPClientProtocol(self.clock, timeout=30)
        self.proto.makeConnection(self.transport)
        self.session = SMTPSession(self.proto, helo_name="mx.test", data_timeout=60)
        body = b"x" * 70 + b"\r\n"
        body *= 3 * WRITE_CHUNK // len(body)
        d = self.start(body)
        written = [self.sent()]
        self.assertLessEqual(len(written[0]), WRITE_CHUNK)  # then the transport paused it
        self.assertEqual(self.sent(), b"")
        producer = self.transport.producer
        assert producer is not None
        while self.transport.producer is not None:
            producer.resumeProducing()
            written.append(self.sent())
        self.assertEqual(b"".join(written), body + b".\r\n")
        self.assertGreater(len(written), 3)
        self.server(b"250 queued\r\n")
        self.assertEqual(self.successResultOf(d).data, Reply(250, ("queued",)))

    def test_a_connection_lost_while_paused_ends_the_stream(self) -> None:
        self.transport = _PausingTransport()
        self.proto = SMTPClientProtocol(self.clock, timeout=30)
        self.proto.makeConnection(self.transport)
        self.session = SMTPSession(self.proto, helo_name="mx.test", data_timeout=60)
        d = self.start(b"z" * (4 * WRITE_CHUNK))
        self.sent()
        producer = self.transport.producer
        assert producer is not None
        producer.stopProducing()
        self.proto.connectionLost(Failure(ConnectionDone("bye")))
        self.failureResultOf(d, ConnectionLostError)
        self.assertEqual(self.sent(), b"")


class _PausingTransport(StringTransport):
    """A transport whose buffer is full after half a chunk: it pauses its producer."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) >= WRITE_CHUNK // 2:
            self.producer.pauseProducing()


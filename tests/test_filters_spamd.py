"""The spamd client: SPAMC/1.5 requests and replies byte for byte (StringTransport), hostile
replies, timeouts by the Clock, and a real spamd (TCP and unix socket)."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from filters._net import parse_address
from filters.builtin import GTUBE
from filters.interface import FilterError, FilterTimeout, MessageTooLarge, Symbol, Verdict
from filters.spamd import SpamdClient, build_request, parse_report
from tests.support import filterd
from tests.support.filterd import FakeEndpoint, message
from tests.support.reactor import get_reactor

SYMBOLS_REPLY = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 55\r\nSpam: True ; 1000.0 / 5.0\r\n"
                 b"\r\nGTUBE,MSGID_SHORT,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO")
REPORT_BODY = (
    b"Spam detection software, running on the system \"vm\",\n"
    b"has identified this incoming email as possible spam.\n\n"
    b"Content analysis details:   (1000.0 points, 5.0 required)\n\n"
    b" pts rule name              description\n"
    b"---- ---------------------- --------------------------------------------------\n"
    b"-0.0 NO_RECEIVED            Informational: message has no Received headers\n"
    b"1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email\n"
    b" 2.5 LONG_RULE              A description that goes on and on and wraps onto\n"
    b"                            a second line\n\n"
)


class SpamdProtocolTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()

    def client(self, **kw: Any) -> SpamdClient:
        return SpamdClient(cast(IStreamClientEndpoint, self.endpoint), self.clock, **kw)

    def start(self, client: SpamdClient, msg: bytes = b"Subject: x\r\n\r\nhi\r\n"
              ) -> defer.Deferred[Verdict]:
        return defer.Deferred.fromCoroutine(client.scan(msg))

    def reply(self, data: bytes, close: bool = True) -> None:
        proto = self.endpoint.protocols[-1]
        proto.dataReceived(data)
        if close:
            proto.connectionLost(Failure(ConnectionDone()))

    def test_request_bytes(self) -> None:
        d = self.start(self.client(user="mail"), b"Subject: x\r\n\r\nhi\r\n")
        self.assertEqual(self.endpoint.transports[0].value(),
                         b"SYMBOLS SPAMC/1.5\r\nContent-length: 18\r\nUser: mail\r\n\r\n"
                         b"Subject: x\r\n\r\nhi\r\n")
        self.reply(SYMBOLS_REPLY)
        self.successResultOf(d)

    def test_symbols_reply(self) -> None:
        d = self.start(self.client())
        self.reply(SYMBOLS_REPLY, close=False)  # complete at Content-length: no close needed
        verdict = self.successResultOf(d)
        self.assertTrue(verdict.spam)
        self.assertEqual((verdict.score, verdict.threshold), (1000.0, 5.0))
        self.assertEqual(verdict.symbol_names,
                         ("GTUBE", "MSGID_SHORT", "NO_RECEIVED", "NO_RELAYS", "TVD_SPACE_RATIO"))
        self.assertTrue(self.endpoint.transports[0].disconnecting)

    def test_reply_in_tiny_pieces(self) -> None:
        d = self.start(self.client())
        proto = self.endpoint.protocols[0]
        for i in range(len(SYMBOLS_REPLY)):
            self.assertNoResult(d)
            proto.dataReceived(SYMBOLS_REPLY[i:i + 1])
        self.assertTrue(self.successResultOf(d).spam)

    def test_check_reply_ends_at_close(self) -> None:
        d = self.start(self.client(command="CHECK"))
        self.assertTrue(self.endpoint.transports[0].value().startswith(b"CHECK SPAMC/1.5\r\n"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.2 / 5.0\r\n\r\n", close=False)
        self.assertNoResult(d)
        self.endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))
        verdict = self.successResultOf(d)
        self.assertFalse(verdict.spam)
        self.assertEqual(verdict.score, 1.2)
        self.assertEqual(verdict.symbols, ())

    def test_a_scan_cut_short_at_the_time_limit_is_no_verdict(self) -> None:
        # A real spamd 4.0.1's reply with time_limit 0.05 (the rules that ran scored 0).
        d = self.start(self.client())
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 31\r\nSpam: False ; 0.0 / 5.0\r\n"
                   b"\r\nNO_RECEIVED,TIME_LIMIT_EXCEEDED")
        failure = self.failureResultOf(d, FilterError)
        self.assertFalse(failure.value.permanent)
        self.assertIn("stopped checking at its time limit (TIME_LIMIT_EXCEEDED, 0 / 5",
                      str(failure.value))
        # The same in a REPORT table; and spam found before the limit is still spam.
        d = self.start(self.client(command="REPORT"))
        body = b"\n---- ----\n 0.0 TIME_LIMIT_EXCEEDED Exceeded time limit / deadline\n"
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; 0.0 / 5.0"
                   b"\r\n\r\n" % len(body) + body)
        self.failureResultOf(d, FilterError)
        d = self.start(self.client())
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 25\r\nSpam: True ; 1000.0 / 5.0"
                   b"\r\n\r\nGTUBE,TIME_LIMIT_EXCEEDED")
        self.assertTrue(self.successResultOf(d).spam)
        # A rule whose name only contains it is not it.
        d = self.start(self.client())
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 22\r\nSpam: False ; 0.0 / 5.0"
                   b"\r\n\r\nX_TIME_LIMIT_EXCEEDED2")
        self.assertTrue(self.successResultOf(d).clean)

    def test_report_reply_gives_points_per_rule(self) -> None:
        d = self.start(self.client(command="REPORT"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 1000.0 / 5.0"
                   b"\r\n\r\n" % len(REPORT_BODY) + REPORT_BODY)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.symbols, (
            Symbol("NO_RECEIVED", -0.0, "Informational: message has no Received headers"),
            Symbol("GTUBE", 1000.0, "BODY: Generic Test for Unsolicited Bulk Email"),
            Symbol("LONG_RULE", 2.5,
                   "A description that goes on and on and wraps onto a second line"),
        ))

    def test_at_most_1000_rules_are_kept(self) -> None:
        # A 256 KiB SYMBOLS reply names 39,000 rules: they all went into the X-Spam-Status
        # added to the relayed mail (272 KB of header), where rspamd's are cut to 1,000.
        names = b",".join(b"R%d" % i for i in range(1500))
        table = b"---- ---\n" + b"".join(b"0.1 R%d x\n" % i for i in range(1500))
        for command, body in (("SYMBOLS", names), ("REPORT", table)):
            d = self.start(self.client(command=command))
            self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 6.0 / 5.0"
                       b"\r\n\r\n" % len(body) + body)
            verdict = self.successResultOf(d)
            self.assertEqual(verdict.symbol_names, tuple(f"R{i}" for i in range(1000)))

    def test_a_rule_description_is_kept_to_200_characters(self) -> None:
        # Each continuation line copied the whole description so far: 87,000 lines of " x"
        # (a 256 KiB reply) made a 174 KB description through n^2 copies, on the reactor.
        body = REPORT_BODY + b"-0.1 WRAPS_ON                 start\n" + b" x\n" * 1000
        d = self.start(self.client(command="REPORT"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: True ; 1000.0 / 5.0"
                   b"\r\n\r\n" % len(body) + body)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.symbol_names,
                         ("NO_RECEIVED", "GTUBE", "LONG_RULE", "WRAPS_ON"))
        self.assertEqual(verdict.symbols[-1].description, ("start" + " x" * 1000)[:200])

    def test_spamd_error_status(self) -> None:
        d = self.start(self.client())
        self.reply(b"SPAMD/1.0 76 Bad header line: GARBAGE\r\n")
        failure = self.failureResultOf(d, FilterError)
        self.assertIn("spamd error 76: Bad header line", str(failure.value))

    def test_garbage_reply(self) -> None:
        d = self.start(self.client())
        self.reply(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertIn("not a SPAMD status line", str(self.failureResultOf(d, FilterError).value))
        self.assertTrue(self.endpoint.transports[0].disconnecting)

    def test_a_repeated_header_is_refused(self) -> None:
        # Which of two Spam headers is the verdict? Neither (the last one was taken).
        d = self.start(self.client(command="CHECK"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 9.0 / 5.0\r\n"
                   b"Spam: False ; 0.0 / 5.0\r\n\r\n")
        self.assertIn("reply header repeated: b'Spam: False",
                      str(self.failureResultOf(d, FilterError).value))

    def test_unparsable_spam_header(self) -> None:
        d = self.start(self.client(command="CHECK"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: maybe\r\n\r\n")
        self.assertIn("cannot parse Spam header", str(self.failureResultOf(d, FilterError).value))

    def test_a_score_too_large_for_a_float_is_refused(self) -> None:
        # 400 digits are inf to float(): the verdict's score was inf (NaN when the threshold
        # was as long), and the tags said "X-Spam-Score: inf".
        huge = b"9" * 400
        for spam in (b"True ; %s / 5.0" % huge, b"False ; -%s / 5.0" % huge,
                     b"True ; %s / %s" % (huge, huge)):
            d = self.start(self.client(command="CHECK"))
            self.reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: " + spam + b"\r\n\r\n")
            self.assertIn("score out of range",
                          str(self.failureResultOf(d, FilterError).value))

    def test_missing_spam_header(self) -> None:
        d = self.start(self.client(command="CHECK"))
        self.reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n")
        self.assertIn("without a Spam header", str(self.failureResultOf(d, FilterError).value))

    def test_huge_reply_is_cut_off(self) -> None:
        d = self.start(self.client(max_reply=1000))
        proto = self.endpoint.protocols[0]
        proto.dataReceived(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 100000000\r\n"
                           b"Spam: True ; 1.0 / 5.0\r\n\r\n")
        proto.dataReceived(b"A," * 600)
        self.assertIn("reply larger than 1000 bytes",
                      str(self.failureResultOf(d, FilterError).value))
        self.assertTrue(self.endpoint.transports[0].disconnecting)

    def test_a_number_int_cannot_read_fails_the_scan_at_once(self) -> None:
        # "²" is a digit to str.isdigit and not to int(); int() refuses over 4,300 digits.
        # The ValueError escaped from dataReceived (and again from connectionLost), and the
        # scan waited for its deadline.
        for reply in (b"SPAMD/1.1 0 EX_OK\r\nContent-length: \xc2\xb2\r\n"
                      b"Spam: True ; 6.0 / 5.0\r\n\r\nGTUBE",
                      b"SPAMD/1.1 " + b"7" * 5000 + b" EX_OK\r\n"):
            d = self.start(self.client(timeout=30))
            self.endpoint.protocols[-1].dataReceived(reply)
            failure = self.failureResultOf(d, FilterError)
            self.assertIn("unreadable reply (ValueError", failure.value.reason)
            self.assertTrue(self.endpoint.transports[-1].disconnecting)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_endless_status_line(self) -> None:
        d = self.start(self.client())
        self.endpoint.protocols[0].dataReceived(b"S" * 600)
        self.assertIn("status line too long", str(self.failureResultOf(d, FilterError).value))

    def test_connection_dropped_mid_reply(self) -> None:
        d = self.start(self.client())
        self.reply(SYMBOLS_REPLY[:-10])
        self.assertIn("connection closed after", str(self.failureResultOf(d, FilterError).value))

    def test_connection_dropped_before_reply(self) -> None:
        d = self.start(self.client())
        self.reply(b"")
        self.assertIn("no status line", str(self.failureResultOf(d, FilterError).value))

    def test_connection_refused(self) -> None:
        self.endpoint.error = ConnectionRefusedError()
        client = self.client(address=parse_address("127.0.0.1:783"))
        failure = self.failureResultOf(self.start(client), FilterError)
        self.assertIn("cannot connect to 127.0.0.1:783", str(failure.value))

    def test_silent_server_times_out(self) -> None:
        d = self.start(self.client(timeout=30))
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIn("no answer within 30 s", str(self.failureResultOf(d, FilterTimeout).value))
        self.assertTrue(self.endpoint.transports[0].disconnecting)  # aborted
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_that_hangs_times_out(self) -> None:
        self.endpoint.hang = True
        d = self.start(self.client(timeout=5))
        self.clock.advance(5)
        self.failureResultOf(d, FilterTimeout)
        self.assertEqual(self.endpoint.cancelled, 1)

    def test_max_size_refuses_without_connecting(self) -> None:
        d = self.start(self.client(max_size=10), b"x" * 11)
        failure = self.failureResultOf(d, MessageTooLarge)
        self.assertTrue(failure.value.permanent)
        self.assertEqual(self.endpoint.transports, [])

    def test_ping(self) -> None:
        d = defer.Deferred.fromCoroutine(self.client().ping())
        self.assertEqual(self.endpoint.transports[0].value(), b"PING SPAMC/1.5\r\n\r\n")
        self.reply(b"SPAMD/1.5 0 PONG\r\n")
        self.assertEqual(self.successResultOf(d), "PONG")

    def test_helpers(self) -> None:
        self.assertEqual(build_request("CHECK", b"ab"),
                         b"CHECK SPAMC/1.5\r\nContent-length: 2\r\n\r\nab")
        self.assertEqual(parse_report("no table here"), ())
        self.assertRaises(ValueError, self.client, command="PROCESS")


class SpamdIntegrationTests(TestCase):
    """A real spamd, started once for this process (see tests/support/filterd.py)."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        self.daemon = await filterd.spamd()

    def client(self, address: str, **kw: Any) -> SpamdClient:
        from filters._net import client_endpoint

        parsed = parse_address(address)
        return SpamdClient(client_endpoint(self.reactor, parsed, 10), self.reactor,
                           address=parsed, timeout=20, **kw)

    async def test_gtube_is_spam_with_1000_points(self) -> None:
        verdict = await self.client(self.daemon.address).scan(message(GTUBE))
        self.assertTrue(verdict.spam)
        self.assertGreaterEqual(verdict.score, 1000.0)
        self.assertEqual(verdict.threshold, 5.0)
        self.assertIn("GTUBE", verdict.symbol_names)

    async def test_clean_message_is_not_spam(self) -> None:
        verdict = await self.client(self.daemon.address).scan(message())
        self.assertFalse(verdict.spam)
        self.assertLess(verdict.score, 5.0)

    async def test_report_over_the_unix_socket(self) -> None:
        verdict = await self.client(self.daemon.socket, command="REPORT").scan(message(GTUBE))
        gtube = [s for s in verdict.symbols if s.name == "GTUBE"]
        self.assertEqual(gtube, [Symbol("GTUBE", 1000.0, gtube[0].description)])

    async def test_ping(self) -> None:
        self.assertEqual(await self.client(self.daemon.address).ping(), "PONG")

    async def test_nothing_listening_is_a_filter_error(self) -> None:
        from tests.support.servers import free_port

        with self.assertRaises(FilterError) as caught:
            await self.client(f"127.0.0.1:{free_port()}").scan(message())
        self.assertIn("cannot connect", str(caught.exception))

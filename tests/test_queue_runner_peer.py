"""The queue runner with the real SMTP client against a next hop that breaks the protocol: a
reply its command does not allow is never a delivery, a dropped connection costs no message
an attempt, and a long reply is cut to the store's length before the journal."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailcore.queue.model import Result
from mailcore.queue.routing import Hop
from mailcore.queue.runner import Connector
from mailcore.smtp.client import SMTPClientProtocol, SMTPSession
from mailcore.smtp.dsn import MAX_DETAIL
from mailcore.store.schema import queue_recipients
from tests.support.mailsink import done
from tests.support.queuetest import QueueTestCase

ANSWERS = {
    b"EHLO": b"250-hop.test\r\n250 PIPELINING\r\n",
    b"MAIL": b"250 2.1.0 ok\r\n",
    b"RCPT": b"250 2.1.5 ok\r\n",
    b"RSET": b"250 2.0.0 ok\r\n",
    b"DATA": b"354 go\r\n",
    b".": b"250 2.0.0 queued\r\n",
    b"QUIT": b"221 2.0.0 bye\r\n",
}


class ScriptedHop(StringTransport):
    """A next hop that answers each command as it is written, from `answers` (a command's
    first word, or "." for the end of the data, to its reply); after a 354 to DATA it reads the
    body up to the lone dot and keeps it in `bodies`."""

    def __init__(self, answers: dict[bytes, bytes]) -> None:
        super().__init__()
        self.answers = answers
        self.protocol: SMTPClientProtocol | None = None
        self.bodies: list[bytes] = []
        self._in_data = False
        self._pending = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        self._pending += data
        while self._pending:
            if self._in_data:
                body, sep, rest = (b"\r\n" + self._pending).partition(b"\r\n.\r\n")
                if not sep:
                    return
                self.bodies.append(body[2:] + b"\r\n")
                self._pending, self._in_data = rest, False
                self.answer(self.answers[b"."])
                continue
            line, sep, rest = self._pending.partition(b"\r\n")
            if not sep:
                return
            self._pending = rest
            verb = line.split(b" ", 1)[0].upper()
            reply = self.answers[verb]
            self._in_data = verb == b"DATA" and reply.startswith(b"354")
            self.answer(reply)

    def answer(self, reply: bytes) -> None:
        assert self.protocol is not None
        if not self.disconnecting:
            self.protocol.dataReceived(reply)

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            assert self.protocol is not None
            self.protocol.connectionLost(Failure(ConnectionDone("closed")))

    abortConnection = loseConnection


class ScriptedHopConnector(Connector):
    """Real SMTPSessions, each on a ScriptedHop answering from `answers` as it is then."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.answers = dict(ANSWERS)
        self.hops: list[ScriptedHop] = []

    def connect(self, hop: Hop) -> defer.Deferred[SMTPSession]:
        return defer.Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> SMTPSession:
        transport = ScriptedHop(dict(self.answers))
        protocol = SMTPClientProtocol(self.clock, 300)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.hops.append(transport)
        session = SMTPSession(protocol, helo_name="mx.test", data_timeout=600)
        handshake = defer.Deferred.fromCoroutine(session.handshake())
        protocol.dataReceived(b"220 hop.test ESMTP\r\n")
        await handshake
        return session

    def tls_creator(self, hop: Hop, verify: bool) -> Any:
        raise AssertionError("the scripted hop offers no STARTTLS")

    def check_peer(self, session: SMTPSession, hop: Hop) -> None:
        raise AssertionError("the scripted hop offers no STARTTLS")


class PeerTestBase(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.hop = ScriptedHopConnector(self.clock)
        self.runner.connector = self.hop

    def rows(self) -> dict[str, tuple[str, int, str | None]]:
        r = queue_recipients.c
        return done(self.db.read("rows", lambda conn: {
            row.address: (row.state, row.attempts, row.last_error)
            for row in conn.execute(select(r.address, r.state, r.attempts, r.last_error))
        }))


class ProtocolErrorTests(PeerTestBase):
    async def test_a_normal_hop_gets_the_message(self) -> None:
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.rows()["b@customer.test"][0], "delivered")
        self.assertEqual(len(self.hop.hops[0].bodies), 1)

    async def test_250_to_data_is_deferred_not_delivered(self) -> None:
        self.hop.answers[b"DATA"] = b"250 2.0.0 ok, no body needed\r\n"
        await self.accept("Q1", "b@customer.test")
        state, attempts, last_error = self.rows()["b@customer.test"]
        self.assertEqual((state, attempts), ("deferred", 1))
        self.assertEqual(last_error, "4.5.0 protocol error: 250 in reply to DATA")
        self.assertEqual(self.hop.hops[0].bodies, [])
        self.assertTrue(self.hop.hops[0].disconnecting)
        self.assertEqual(self.q.metrics.delivered._value.get(), 0)

    async def test_354_to_the_end_of_the_data_is_deferred(self) -> None:
        self.hop.answers[b"."] = b"354 more?\r\n"
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.rows()["b@customer.test"][::2],
                         ("deferred", "4.5.0 protocol error: 354 in reply to the end of the data"))

    async def test_354_to_rcpt_is_deferred(self) -> None:
        self.hop.answers[b"RCPT"] = b"354 go\r\n"
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.rows()["b@customer.test"][::2],
                         ("deferred", "4.5.0 protocol error: 354 in reply to RCPT"))
        self.assertEqual(self.hop.hops[0].bodies, [])

    async def test_the_next_message_goes_on_a_new_connection(self) -> None:
        self.hop.answers[b"DATA"] = b"250 ok\r\n"
        await self.accept("Q1", "b@customer.test")
        self.hop.answers[b"DATA"] = ANSWERS[b"DATA"]
        await self.accept("Q2", "c@customer.test")
        self.assertEqual(len(self.hop.hops), 2)
        self.assertEqual(self.rows()["c@customer.test"][0], "delivered")


class IdleConnectionTests(PeerTestBase):
    """A pooled connection that talks while idle is out of step and dropped; one the hop
    closed while idle is not used either. The next message goes on a new connection,
    without an attempt counted for what was no fault of its own."""

    async def test_a_connection_that_talks_while_idle_is_dropped(self) -> None:
        await self.accept("Q1", "b@customer.test")
        first = self.hop.hops[0]
        first.answer(b"250-" + b"B" * 60000 + b"\r\n")
        self.assertTrue(first.disconnecting)
        self.assertEqual(first.protocol._lines, [])  # type: ignore[union-attr]
        await self.accept("Q2", "c@customer.test")
        self.assertEqual(len(self.hop.hops), 2)
        self.assertEqual(self.rows()["c@customer.test"][:2], ("delivered", 1))  # this one
        self.assertEqual(len(self.hop.hops[1].bodies), 1)

    async def test_a_connection_the_hop_closed_while_idle_costs_no_attempt(self) -> None:
        await self.accept("Q1", "b@customer.test")
        self.hop.hops[0].loseConnection()
        await self.accept("Q2", "c@customer.test")
        self.assertEqual(self.rows()["c@customer.test"][:2], ("delivered", 1))  # this one
        self.assertEqual(len(self.hop.hops), 2)


class LongReplyTests(PeerTestBase):
    async def test_a_reply_without_end_defers_with_a_protocol_error(self) -> None:
        self.hop.answers[b"MAIL"] = b"250-more\r\n" * 200
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(
            self.rows()["b@customer.test"],
            ("deferred", 1,
             "4.5.0 protocol error: a reply of more than 100 lines or 65536 octets"))
        self.assertTrue(self.hop.hops[0].disconnecting)

    async def test_a_long_reply_is_cut_to_the_stores_length_before_the_journal(self) -> None:
        recorded: list[Result] = []
        record = self.runner.spool.record  # type: ignore[union-attr]

        def keep(results: list[Result]) -> None:
            recorded.extend(results)
            record(results)

        self.runner.spool.record = keep  # type: ignore[union-attr,method-assign]
        self.hop.answers[b"RCPT"] = b"450-4.2.0 " + b"busy " * 4000 + b"\r\n450 try later\r\n"
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(len(recorded), 1)
        self.assertEqual(len(recorded[0].detail), MAX_DETAIL)
        self.assertTrue(recorded[0].detail.startswith("450 4.2.0 busy busy"))
        self.assertEqual(self.rows()["b@customer.test"][:2], ("deferred", 1))

"""End to end through a real `twistd mailcore`: smtplib and swaks send to the gateway, the
next hop (a byte-exact sink of ours) receives what was sent plus only our Received header."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from tests.support.mailsink import Daemon, SinkFactory, SinkState
from tests.support.reactor import get_reactor
from tests.support.servers import require_binary, run_command, tempdir_for
from tests.support.smtpsession import strip_received


def dot_at_16384() -> bytes:
    """A body whose line "." starts at byte 16384 (lines within the 1000-octet limit)."""
    head = b"From: a@x.test\r\nTo: b@customer.test\r\nSubject: boundary\r\n\r\n"
    filler = b""
    while len(head) + len(filler) + 900 < 16384:
        filler += b"q" * 898 + b"\r\n"
    filler += b"q" * (16384 - len(head) - len(filler) - 2) + b"\r\n"
    body = head + filler + b".\r\nafter the dot\r\n"
    assert body[16384:16387] == b".\r\n"
    return body


class GatewayRelayTests(TestCase):
    timeout = 60

    async def asyncSetUp(self) -> None:
        pass

    async def start(self) -> None:
        self.state = SinkState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(self.state)
        )
        self.addCleanup(listener.stopListening)
        sink_port = listener.getHost().port
        # Mail accepted before the queue has started (it takes back its old leases first)
        # is left to the sweeper, within poll_interval: 0.5 s, not the 5 s default.
        self.daemon = Daemon(tempdir_for(self), queue={"relayhost": f"127.0.0.1:{sink_port}",
                                                       "poll_interval": 0.5})
        self.daemon.prepare_blocking("customer.test", sink_port)
        await self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def smtplib_send(self, body: bytes, rcpts: list[str]) -> Any:
        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.daemon.smtp_port, timeout=30) as s:
                return s.sendmail("a@x.test", rcpts, body)

        return threads.deferToThread(send)

    async def test_smtplib_bodies_arrive_byte_identical_except_received(self) -> None:
        await self.start()
        bodies = [
            dot_at_16384(),
            b"Subject: crlf\r\n\r\n.\r\n..\r\n. leading\r\nend\r\n",
            b"Subject: long lines\r\n\r\n" + (b"w" * 998 + b"\r\n") * 40,
        ]
        for body in bodies:
            refused = await self.smtplib_send(body, ["b@customer.test"])
            self.assertEqual(refused, {})
        await self.state.wait_for(len(bodies))
        got = sorted(strip_received(m.data) for m in self.state.messages)
        self.assertEqual(len(got), len(bodies))
        for received, sent in zip(got, sorted(bodies), strict=True):
            self.assertTrue(received == sent, f"{len(sent)} bytes sent, {len(received)} got")
        for m in self.state.messages:
            self.assertIn(b"(Mailcore)", m.data.split(b"\r\n\r\n", 1)[0])

    async def test_several_recipients_one_transaction(self) -> None:
        await self.start()
        await self.smtplib_send(b"Subject: two\r\n\r\nhi\r\n",
                                ["b@customer.test", "c@customer.test"])
        await self.state.wait_for(1)
        self.assertEqual(sorted(self.state.messages[0].rcpts),
                         ["b@customer.test", "c@customer.test"])

    async def test_swaks_through_the_gateway(self) -> None:
        swaks = require_binary("swaks", "swaks")
        await self.start()
        result = await run_command(
            [swaks, "--server", f"127.0.0.1:{self.daemon.smtp_port}", "--from", "a@x.test",
             "--to", "b@customer.test", "--header", "Subject: via swaks",
             "--body", "line one\n.\nline after a dot\n", "--pipeline"],
            timeout=30,
        )
        self.assertEqual(result.status, 0, result.out + result.err)
        await self.state.wait_for(1)
        data = strip_received(self.state.messages[0].data)
        self.assertIn(b"Subject: via swaks\r\n", data)
        self.assertIn(b"\r\nline one\r\n.\r\nline after a dot\r\n", data)

    async def test_foreign_domain_is_refused_and_nothing_is_relayed(self) -> None:
        await self.start()
        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            await self.smtplib_send(b"Subject: relay?\r\n\r\nx\r\n", ["victim@elsewhere.test"])
        self.assertEqual(self.state.messages, [])

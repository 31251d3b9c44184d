"""Recipient verification at the next hop through a real `twistd mailcore` (`[smtp]
verify_recipients = true`): smtplib sends to two addresses of a served domain without an
address list, whose next hop (a sink of ours on 127.0.0.1) refuses one of them at RCPT."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from tests.support.mailsink import Daemon, SinkFactory, SinkState
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for


def refuse_nobody(address: str) -> bytes | None:
    if address.startswith("nobody@"):
        return b"550 5.1.1 <" + address.encode() + b">: Recipient address rejected"
    return None


class CalloutIntegrationTests(TestCase):
    timeout = 60

    async def test_an_address_the_next_hop_refuses_is_refused_at_rcpt(self) -> None:
        state = SinkState(rcpt_reply=refuse_nobody)
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(state))
        self.addCleanup(listener.stopListening)
        sink_port = listener.getHost().port
        daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5},
                        smtp={"verify_recipients": True})
        daemon.prepare_blocking("customer.test", sink_port)
        await daemon.start()
        self.addCleanup(daemon.stop)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
                return s.sendmail("a@x.test", ["b@customer.test", "nobody@customer.test"],
                                  b"Subject: verified\r\n\r\nhi\r\n")

        refused = await threads.deferToThread(send)
        self.assertEqual(refused, {"nobody@customer.test": (
            550, b"5.1.1 <nobody@customer.test>: Recipient address rejected: undeliverable "
                 b"address (550 5.1.1 <nobody@customer.test>: Recipient address rejected)")})
        await state.wait_for(1)
        [message] = state.messages
        self.assertEqual((message.mail_from, message.rcpts), ("a@x.test", ["b@customer.test"]))
        # The probes: the null sender and RSET, both on one connection, and no DATA but
        # the message's own (on the queue's connection).
        self.assertTrue(state.commands[0].startswith(b"EHLO "), state.commands)
        self.assertEqual(state.commands[1:7], [
            b"MAIL FROM:<>", b"RCPT TO:<b@customer.test>", b"RSET",
            b"MAIL FROM:<>", b"RCPT TO:<nobody@customer.test>", b"RSET"])
        self.assertEqual(state.commands.count(b"DATA"), 1)
        self.assertEqual(state.connections, 2)

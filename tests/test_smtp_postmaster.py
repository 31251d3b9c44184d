"""`RCPT TO:<postmaster>` through the whole gateway on a Clock: the Core's SMTP server, the
spool, the filtering stage and the queue runner, delivering to a scripted next hop. The
mail goes to `[smtp] postmaster`, is never lost to the filtering stage (no owner to charge
when the address is outside the served domains), and opens no relay."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.queue.routing import Hop
from tests.support.quarantine import GTUBE, Gateway, message, stopper
from tests.support.smtpsession import Session

RELAYHOST = Hop("relay.test", 25)


class PostmasterDeliveryTests(TestCase):
    def gateway(self, postmaster: str) -> Gateway:
        gw = Gateway(Config(hostname="mx.gateway.test", sections={
            "smtp": {"postmaster": postmaster},
            "queue": {"relayhost": "relay.test:25"},  # never a real MX lookup in tests
        }))
        self.addCleanup(stopper(gw))
        return gw

    def smtp(self, gw: Gateway, rcpts: list[bytes], body: bytes) -> list[str]:
        """One SMTP transaction with the gateway's own server; the reply codes."""
        session = Session(gw.core.smtp_factory())
        self.addCleanup(session.close)
        session.hello()
        wire = b"MAIL FROM:<someone@remote.test>\r\n"
        wire += b"".join(b"RCPT TO:" + r + b"\r\n" for r in rcpts)
        wire += b"DATA\r\n" + body + b".\r\n"
        return [line[:3] for line in session.send(wire) if line[3:4] != "-"]

    def hops(self, gw: Gateway) -> list[tuple[Any, list[str]]]:
        return [(hop, rcpts) for hop, _f, rcpts, _b, _t in gw.connector.delivered]

    async def test_postmaster_outside_the_served_domains_goes_through_the_relayhost(
        self,
    ) -> None:
        gw = self.gateway("abuse@operator.test")
        user = await gw.owner()
        tokens = (await gw.core.tokens.tanks(user.id)).total
        body = message("your server sends spam", b"see the logs")
        self.assertEqual(self.smtp(gw, [b"<postmaster>"], body), ["250", "250", "354", "250"])
        [(hop, rcpts)] = self.hops(gw)
        self.assertEqual((hop.host, hop.port, rcpts), ("relay.test", 25, ["abuse@operator.test"]))
        self.assertTrue(gw.connector.delivered[0][3].endswith(body))
        # nobody's filtering tokens were taken for it
        self.assertEqual((await gw.core.tokens.tanks(user.id)).total, tokens)

    async def test_spam_to_an_unowned_postmaster_is_tagged_never_quarantined(self) -> None:
        gw = self.gateway("abuse@operator.test")
        user = await gw.owner()
        await gw.domain(user, "q.test", spam_action=0)
        codes = self.smtp(gw, [b"<Postmaster>", b"<bob@q.test>"], message("win", GTUBE))
        self.assertEqual(codes, ["250", "250", "250", "354", "250"])
        [(hop, rcpts)] = self.hops(gw)
        self.assertEqual((hop, rcpts), (RELAYHOST, ["abuse@operator.test"]))
        self.assertIn(b"X-Spam-Flag: YES\r\n", gw.connector.delivered[0][3])
        self.assertEqual(gw.states(), {"abuse@operator.test": "delivered",
                                       "bob@q.test": "quarantined"})

    async def test_postmaster_in_a_served_domain_goes_to_its_next_hop(self) -> None:
        gw = self.gateway("hostmaster@c.test")
        user = await gw.owner()
        await gw.domain(user, "c.test", spam_action=0)
        tokens = (await gw.core.tokens.tanks(user.id)).total
        self.assertEqual(self.smtp(gw, [b"<postmaster>"], message("hi", b"x")),
                         ["250", "250", "354", "250"])
        [(hop, rcpts)] = self.hops(gw)
        self.assertEqual((hop.host, hop.port, rcpts), ("10.0.0.1", 2525, ["hostmaster@c.test"]))
        # filtered like the domain's other mail: one token
        self.assertEqual((await gw.core.tokens.tanks(user.id)).total, tokens - 1)

    async def test_no_other_foreign_recipient_gets_through(self) -> None:
        gw = self.gateway("abuse@operator.test")
        session = Session(gw.core.smtp_factory())
        self.addCleanup(session.close)
        session.hello()
        session.send(b"MAIL FROM:<someone@remote.test>\r\n")
        for rcpt in (b"<abuse@operator.test>", b"<postmaster@operator.test>",
                     b"<postmaster@mx.gateway.test>", b"<@operator.test:postmaster>"):
            with self.subTest(rcpt=rcpt):
                [reply] = session.send(b"RCPT TO:" + rcpt + b"\r\n")
                self.assertTrue(reply.startswith("5"), reply)
        self.assertEqual(session.codes(b"DATA\r\n"), ["554"])

"""Delivery to real receiving servers on 127.0.0.1: Postfix's smtp-sink, and a byte-exact
sink of ours (for bodies, STARTTLS failures and permanent refusals)."""

from __future__ import annotations

from email import message_from_bytes
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.mail.smtp import ESMTPSenderFactory
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.queue.assembly import Queue, build_queue
from mailcore.queue.settings import QueueSettings
from mailcore.store import Database
from mailcore.store.schema import queue_recipients
from tests.support.db import open_database
from tests.support.mailsink import SinkFactory, SinkState, add_domain, envelope
from tests.support.reactor import get_reactor
from tests.support.servers import (
    ServerProcess,
    free_port,
    require_binary,
    sleep,
    start_smtp_sink,
    tempdir_for,
)


def dot_at_16384() -> bytes:
    head = b"Subject: boundary\r\n\r\n"
    return head + b"y" * (16384 - len(head) - 2) + b"\r\n.\r\nafter\r\n"


class QueueOnReactor(TestCase):
    """A real queue (threaded SQLite, real reactor, TCP connector) per test."""

    timeout = 60

    async def start_queue(self, port: int, **settings: Any) -> tuple[Queue, Database, int]:
        db = await open_database(self, "sqlite")
        domain = await add_domain(db, "customer.test", "127.0.0.1", port)
        settings.setdefault("relayhost", f"127.0.0.1:{port}")
        settings.setdefault("allow_loopback", True)  # the sink is on 127.0.0.1
        qs = QueueSettings(node_id="test-node", **settings)
        q = build_queue(Config(hostname="mx.test"), db, get_reactor(), CollectorRegistry(),
                        reactor=get_reactor(), settings=qs)
        q.service.startService()
        self.addCleanup(q.service.stopService)
        return q, db, domain

    async def accept(self, q: Queue, domain: int, qid: str, body: bytes, *rcpts: str,
                     sender: str = "a@x.test") -> None:
        env = envelope(sender, *[(r, domain) for r in (rcpts or ("b@customer.test",))])
        await q.spool.accept(qid, env, body)

    async def states(self, db: Database) -> dict[str, str]:
        r = queue_recipients.c
        rows = await db.read("s", lambda c: c.execute(select(r.message_id, r.state)).all())
        return {row[0]: row[1] for row in rows}

    async def wait_until(self, predicate: Any, seconds: float = 20.0) -> None:
        reactor = get_reactor()
        deadline = reactor.seconds() + seconds
        while not await predicate():
            if reactor.seconds() > deadline:
                self.fail("condition not reached in time")
            await sleep(0.05)

    def listen_sink(self, state: SinkState, port: int = 0) -> int:
        ep = TCP4ServerEndpoint(get_reactor(), port, interface="127.0.0.1")
        d = ep.listen(SinkFactory(state))
        listener = self.successResultOf(d)
        self.addCleanup(listener.stopListening)
        return int(listener.getHost().port)


class SmtpSinkTests(QueueOnReactor):
    async def test_messages_reach_smtp_sink(self) -> None:
        dump, port = await start_smtp_sink(self)
        q, db, domain = await self.start_queue(port)
        n = 200
        await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.accept(
                q, domain, f"Q{i:04d}", b"Subject: m%d\r\nX-Seq: %d\r\n\r\nhello\r\n" % (i, i)
            ))
            for i in range(n)
        ])

        async def all_delivered() -> bool:
            return list((await self.states(db)).values()).count("delivered") == n

        await self.wait_until(all_delivered)

        async def all_dumped() -> bool:
            return dump.exists() and dump.read_bytes().count(b"X-Seq: ") == n

        await self.wait_until(all_dumped)
        seqs = sorted(int(line.split()[1]) for line in dump.read_bytes().splitlines()
                      if line.startswith(b"X-Seq: "))
        self.assertEqual(seqs, list(range(n)))
        self.assertLess(q.spool.commits, n)  # grouped commits

    async def test_permanent_refusal_by_smtp_sink_gives_one_dsn(self) -> None:
        binary = require_binary("smtp-sink", "postfix")
        directory = tempdir_for(self)
        port = free_port()
        sink = ServerProcess(
            [binary, "-u", "nobody", "-f", "rcpt", f"127.0.0.1:{port}", "100"],
            directory=directory,
        ).start()
        self.addCleanup(sink.stop)
        await sink.wait_for_port(port)
        q, db, domain = await self.start_queue(port)
        await self.accept(q, domain, "Q1", b"Subject: x\r\n\r\nhi\r\n", "b@customer.test",
                          "c@customer.test", sender="s@customer.test")

        r = queue_recipients.c

        async def fetch() -> list[Any]:
            return list(await db.read("x", lambda c: c.execute(
                select(r.message_id, r.address, r.state)).all()))

        async def bounced() -> bool:
            got = await fetch()
            return len(got) == 3 and all(row[2] == "bounced" for row in got)

        await self.wait_until(bounced)
        rows = await fetch()
        dsn_rows = [row for row in rows if row[0] != "Q1"]
        self.assertEqual(len(dsn_rows), 1)  # one DSN for the two failed recipients
        self.assertEqual(dsn_rows[0][1], "s@customer.test")


class ByteExactTests(QueueOnReactor):
    async def test_bodies_arrive_byte_identical(self) -> None:
        state = SinkState()
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port)
        bodies = [
            dot_at_16384(),
            b"Subject: crlf\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
            b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 300 + b".\r\n",
        ]
        for i, body in enumerate(bodies):
            await self.accept(q, domain, f"Q{i}", body)
        await state.wait_for(len(bodies))
        got = sorted(m.data for m in state.messages)
        self.assertEqual(len(got), len(bodies))
        for a, b in zip(got, sorted(bodies), strict=True):
            self.assertTrue(a == b, f"body of {len(b)} bytes arrived as {len(a)} bytes")

    async def test_8bit_body_goes_out_declared_8bitmime_and_intact(self) -> None:
        """RFC 6152: the sink offers 8BITMIME; the 8-bit message is declared, the 7-bit one
        is not, and both arrive byte for byte."""
        state = SinkState()
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port)
        eight = "Subject: caf\u00e9\r\n\r\nna\u00efve \u00fcber\r\n".encode()
        seven = b"Subject: plain\r\n\r\nascii\r\n"
        await self.accept(q, domain, "Q8", eight, sender="eight@x.test")
        await self.accept(q, domain, "Q7", seven, sender="seven@x.test")
        await state.wait_for(2)
        self.assertEqual(sorted(m.data for m in state.messages), sorted([eight, seven]))
        mails = sorted(c for c in state.commands if c.startswith(b"MAIL "))
        self.assertEqual(mails, [
            b"MAIL FROM:<eight@x.test> SIZE=%d BODY=8BITMIME" % len(eight),
            b"MAIL FROM:<seven@x.test> SIZE=%d" % len(seven),
        ])

    async def test_8bit_body_to_a_hop_without_8bitmime_is_made_7bit(self) -> None:
        """RFC 6152 3: a server that does not offer 8BITMIME gets no 8-bit body. The
        message goes out converted (quoted-printable here), undeclared, and reads the same;
        a 7-bit message goes byte for byte."""
        state = SinkState(eight_bit=False)
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port)
        eight = (b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                 + "na\u00efve \u00fcber\r\n".encode() * 3)
        seven = b"Subject: plain\r\n\r\nascii\r\n"
        await self.accept(q, domain, "Q8", eight, sender="eight@x.test")
        await self.accept(q, domain, "Q7", seven, sender="seven@x.test")
        await state.wait_for(2)
        got = {m.mail_from: m.data for m in state.messages}
        self.assertEqual(got["seven@x.test"], seven)
        converted = got["eight@x.test"]
        self.assertTrue(converted.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable\r\n", converted)
        self.assertEqual(message_from_bytes(converted).get_payload(decode=True),
                         eight.split(b"\r\n\r\n", 1)[1])
        self.assertFalse([c for c in state.commands if b"BODY=" in c])

    async def test_opportunistic_starttls_refused_still_delivers(self) -> None:
        """Pitfall 9: the next hop offers STARTTLS and then refuses it (policy `may`)."""
        state = SinkState(starttls="refuse")
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port, tls="may")
        await self.accept(q, domain, "Q1", b"Subject: tls\r\n\r\nhi\r\n")
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)

    async def test_broken_tls_handshake_falls_back_to_cleartext(self) -> None:
        state = SinkState(starttls="broken")
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port, tls="may")
        await self.accept(q, domain, "Q1", b"Subject: tls\r\n\r\nhi\r\n")
        await state.wait_for(1)
        self.assertEqual(state.connections, 2)

    async def test_by_default_a_refused_or_broken_starttls_is_never_retried_in_cleartext(
        self,
    ) -> None:
        """verify-if-offered (the default): a hop that offers STARTTLS gets TLS or nothing."""
        for mode in ("refuse", "broken"):
            state = SinkState(starttls=mode)
            port = self.listen_sink(state)
            q, db, domain = await self.start_queue(port)
            await self.accept(q, domain, "Q1", b"Subject: tls\r\n\r\nsecret\r\n")

            async def deferred(db: Database = db) -> bool:
                return (await self.states(db)).get("Q1") == "deferred"

            await self.wait_until(deferred, seconds=10)
            self.assertEqual(state.messages, [], mode)
            self.assertEqual(state.connections, 1, mode)
            self.assertIn(b"STARTTLS", state.commands, mode)
            self.assertNotIn(b"DATA", state.commands, mode)
            error = await db.read("e", lambda c: c.execute(
                select(queue_recipients.c.last_error)).scalar_one())
            self.assertIn("4.7.5", error, mode)

    async def test_stock_twisted_client_gives_up_when_starttls_is_refused(self) -> None:
        """The stock behaviour pitfall 9 describes (twisted#10334), against the same sink."""
        from twisted.internet import ssl

        state = SinkState(starttls="refuse")
        port = self.listen_sink(state)
        done: defer.Deferred[Any] = defer.Deferred()
        factory = ESMTPSenderFactory(
            None, None, "a@x.test", ["b@customer.test"],
            __import__("io").BytesIO(b"Subject: x\r\n\r\nhi\r\n"), done,
            contextFactory=ssl.CertificateOptions(), requireTransportSecurity=False,
            retries=0,
        )
        connector = get_reactor().connectTCP("127.0.0.1", port, factory)
        try:
            await done
        except Exception as e:
            error = str(e)
        else:
            self.fail("the stock client delivered")
        connector.disconnect()
        await sleep(0.05)
        self.assertEqual(state.messages, [])
        self.assertIn("TLS", error)

    async def test_next_hop_that_comes_up_late_gets_the_message(self) -> None:
        port = free_port()
        q, db, domain = await self.start_queue(
            port, min_backoff=1.0, max_backoff=2.0, dead_hop_seconds=1.0, poll_interval=0.2
        )
        await self.accept(q, domain, "Q1", b"Subject: late\r\n\r\nhi\r\n")

        async def deferred() -> bool:
            return (await self.states(db)).get("Q1") == "deferred"

        await self.wait_until(deferred, seconds=5)
        state = SinkState()
        self.listen_sink(state, port)
        await state.wait_for(1)

        async def delivered() -> bool:
            return (await self.states(db)).get("Q1") == "delivered"

        await self.wait_until(delivered, seconds=5)
        self.assertGreaterEqual(q.metrics.deferred._value.get(), 1)

    async def test_a_250_before_the_end_of_the_data_is_no_delivery(self) -> None:
        """A hop that answers 250 after the first line of a 2 MB message's data and reads
        the rest as commands: the message is deferred as a protocol error, not recorded as
        delivered, and the session is dropped (before, the 250 was the delivery and every
        line of the body went on to the hop as a command)."""
        state = SinkState(early_reply=b"250 2.0.0 Ok: queued early")
        port = self.listen_sink(state)
        q, db, domain = await self.start_queue(port)
        body = b"Subject: big\r\n\r\n" + b"".join(b"MAIL FROM:<x%07d@evil.test>\r\n" % i
                                                   for i in range(70_000))
        await self.accept(q, domain, "Q1", body)

        async def deferred() -> bool:
            return (await self.states(db)).get("Q1") == "deferred"

        await self.wait_until(deferred)
        error = await db.read("e", lambda c: c.execute(
            select(queue_recipients.c.last_error)).scalar_one())
        self.assertEqual(error, "4.5.0 protocol error: 250 before the end of the data")
        self.assertEqual(state.messages, [])
        self.assertLess(len(state.commands), 70_000)

    async def test_permanent_refusal_gives_one_well_formed_dsn(self) -> None:
        state = SinkState()
        state.rcpt_reply = lambda a: b"550 5.1.1 no such user" if a.startswith("x") else None
        port = self.listen_sink(state)
        q, _db, domain = await self.start_queue(port)
        await self.accept(q, domain, "Q1", b"Subject: orig\r\nMessage-ID: <o@x>\r\n\r\nhi\r\n",
                          "x1@customer.test", "ok@customer.test", "x2@customer.test",
                          sender="alice@customer.test")
        await state.wait_for(2)
        await sleep(0.3)
        dsns = [m for m in state.messages if m.mail_from == ""]
        self.assertEqual(len(dsns), 1)
        self.assertEqual(dsns[0].rcpts, ["alice@customer.test"])
        report: Any = message_from_bytes(dsns[0].data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        groups = report.get_payload()[1].get_payload()[1:]
        self.assertEqual(
            sorted(g["Final-Recipient"] for g in groups),
            ["rfc822; x1@customer.test", "rfc822; x2@customer.test"],
        )
        self.assertIn("Message-ID: <o@x>", report.get_payload()[2].get_payload())

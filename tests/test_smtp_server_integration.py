"""The inbound server on a real 127.0.0.1 port with real clients (Python's smtplib, swaks,
raw sockets) and the real durable Spool on a threaded SQLite store.

What the clients meant is what the spool committed, byte for byte: a line "." at offset
16384, CRLF bodies, 8-bit bytes. STARTTLS is verified against a test CA. Relay attempts are
refused, `STARTTLS\\r\\nRSET\\r\\n` in one packet never runs the RSET, pipelined commands get
their replies in order.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Connection
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.gateway.domains import DomainService
from mailcore.identity import Identity
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.model import thd_load_bodies
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool
from mailcore.smtp.envelope import Envelope
from mailcore.smtp.server import SMTPServerFactory
from mailcore.smtp.settings import SMTPSettings
from mailcore.store import Database
from mailcore.tls import server_context
from mailcore.tlslisten import TLSListeners
from mailcore.workers import CpuPool
from tests.support.db import open_database
from tests.support.reactor import get_reactor
from tests.support.servers import require_binary, run_command, sleep, tempdir_for
from tests.support.smtpsession import strip_received
from tests.support.testca import shared_pki

QUEUED = re.compile(r"queued as ([0-9A-Z]{14})")


def content_with_dot_at_16384() -> bytes:
    """A message whose line "." begins exactly at byte 16384 (Twisted's chunk size)."""
    head = b"From: a@remote.test\r\nTo: user@example.com\r\nSubject: dots\r\n\r\n"
    line = b"0123456789" * 7 + b"\r\n"
    body = head + line * ((16384 - len(head)) // len(line))
    body += b"p" * (16384 - len(body) - 2) + b"\r\n"
    assert len(body) == 16384
    return body + b".\r\n..\r\n.hidden\r\nend\r\n"


CRLF_8BIT = ("From: a@remote.test\r\nSubject: caf\u00e9\r\nContent-Type: text/plain; "
             "charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nd\u00e9j\u00e0 vu\r\n"
             "\r\n\tindented\r\n").encode()


class RecordingSpool:
    """The real Spool, plus a note of each queue id it committed (for the test to read)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.committed: list[tuple[str, Envelope]] = []

    async def accept(self, queue_id: str, envelope: Envelope, data: bytes) -> None:
        await self.spool.accept(queue_id, envelope, data)
        self.committed.append((queue_id, envelope))


class RealSocketTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        self.db: Database = await open_database(self, "sqlite")
        identity = Identity(self.db, self.reactor, CpuPool.for_tests())
        owner = (await identity.create_user("owner", "owner@users.test")).id
        setup = DomainService(self.db, self.reactor)
        await setup.add("example.com", owner, "mx.example.net")
        # The server's own directory starts unloaded: its first RCPT waits on a real
        # thread-pool read, which exercises the pipelining guarantee over real sockets.
        self.domains = DomainService(self.db, self.reactor)
        self.spool = RecordingSpool(
            Spool(self.db, self.reactor, QueueSettings(node_id="test"),
                  QueueMetrics(CollectorRegistry()))
        )
        pki = shared_pki()
        directory = tempdir_for(self)
        cert, key = pki.write_server_pair(directory)
        self.ca_file = directory / "ca.pem"
        self.factory = SMTPServerFactory(
            SMTPSettings(hostname="mx.gateway.test"), self.domains, self.spool, self.reactor,
            tls=server_context(cert, key),
        )
        port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(
            self.factory
        )
        self.addCleanup(self.wait_for_sessions_to_end)
        self.addCleanup(port.stopListening)
        self.port: int = port.getHost().port

    async def wait_for_sessions_to_end(self) -> None:
        for _ in range(200):
            if self.factory.connections == 0:
                return
            await sleep(0.01)
        self.fail(f"{self.factory.connections} SMTP sessions still open")

    async def committed_bodies(self) -> dict[str, bytes]:
        ids = [queue_id for queue_id, _ in self.spool.committed]

        def load(conn: Connection) -> dict[str, bytes]:
            return thd_load_bodies(conn, ids)

        return await self.db.read("test_load_bodies", load)

    # -- smtplib ----------------------------------------------------------------------------

    def smtplib_session(self, messages: list[bytes]) -> list[tuple[int, bytes]]:
        """Blocking (runs in a thread): STARTTLS verified against the test CA, then each
        message; returns the DATA replies."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        replies = []
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example",
                          timeout=30) as client:
            client.ehlo()
            assert client.has_extn("starttls") and client.has_extn("pipelining")
            assert int(client.esmtp_features["size"]) == 52428800
            client.starttls(context=context)
            client.ehlo()
            assert not client.has_extn("starttls")
            for message in messages:
                assert client.mail("sender@remote.test")[0] == 250
                assert client.rcpt("user@example.com")[0] == 250
                replies.append(client.data(message))
            refused = client.rcpt("user@foreign.test")
            assert refused[0] == 503, refused  # no MAIL: the transaction was reset
            client.mail("sender@remote.test")
            relay = client.rcpt("user%foreign.test@example.com")
            assert relay[0] == 550 and relay[1].startswith(b"5.7.1"), relay
        return replies

    async def test_smtplib_bodies_arrive_byte_identical(self) -> None:
        messages = [content_with_dot_at_16384(), CRLF_8BIT, b"Subject: short\r\n\r\nhi\r\n"]
        replies = await threads.deferToThread(self.smtplib_session, messages)
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        ids = [QUEUED.search(text.decode()).group(1) for _, text in replies]  # type: ignore
        self.assertEqual(ids, [queue_id for queue_id, _ in self.spool.committed])
        bodies = await self.committed_bodies()
        for queue_id, message in zip(ids, messages, strict=True):
            stored = bodies[queue_id]
            self.assertEqual(strip_received(stored), message)
            self.assertRegex(stored.split(b"\r\n\t")[1].decode(),
                             rf"^by mx\.gateway\.test \(Mailcore\) with ESMTPS id {queue_id}$")
        for _, envelope in self.spool.committed:
            self.assertTrue(envelope.tls)
            self.assertEqual(envelope.client_ip, "127.0.0.1")
            self.assertEqual(envelope.helo, "client.example")

    # -- swaks ------------------------------------------------------------------------------

    async def test_swaks_with_verified_starttls(self) -> None:
        swaks = require_binary("swaks", "swaks")
        content = content_with_dot_at_16384() + CRLF_8BIT
        wire = (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"
        data_file = self.write_file(wire)
        result = await run_command([
            swaks, "--server", "127.0.0.1", "--port", str(self.port),
            "--ehlo", "swaks.example", "--from", "sender@remote.test",
            "--to", "user@example.com", "--tls", "--tls-verify",
            "--tls-ca-path", str(self.ca_file), "--pipeline",
            "--no-data-fixup", "--data", f"@{data_file}",
        ], timeout=30)
        self.assertEqual(result.status, 0, result.out + result.err)
        match = QUEUED.search(result.out)
        assert match is not None, result.out
        bodies = await self.committed_bodies()
        self.assertEqual(strip_received(bodies[match.group(1)]), content)
        [(_, envelope)] = self.spool.committed
        self.assertTrue(envelope.tls)
        self.assertEqual(envelope.helo, "swaks.example")

    def write_file(self, data: bytes) -> Path:
        path = Path(self.mktemp())
        path.write_bytes(data)
        return path

    # -- raw sockets ------------------------------------------------------------------------

    def raw_starttls_injection(self) -> list[bytes]:
        """Blocking: `STARTTLS\\r\\nRSET\\r\\n` in one packet, then HELP over TLS; returns
        the first line read after the handshake."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            reader = raw.makefile("rb")
            reader.readline()  # greeting
            raw.sendall(b"EHLO client.example\r\n")
            while reader.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\nRSET\r\n")
            ready = reader.readline()
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"HELP\r\n")
                tls_reader = tls.makefile("rb")
                first = tls_reader.readline()
                tls.sendall(b"QUIT\r\n")
                tls_reader.readline()
        return [ready, first]

    async def test_starttls_injection_over_a_real_socket(self) -> None:
        ready, first = await threads.deferToThread(self.raw_starttls_injection)
        self.assertEqual(ready, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertTrue(first.startswith(b"214 "), first)  # not the 250 of an injected RSET

    def raw_pipelined(self) -> bytes:
        """Blocking: a whole pipelined transaction (and the next one) in single writes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"EHLO client.example\r\nMAIL FROM:<a@remote.test>\r\n"
                        b"RCPT TO:<one@example.com>\r\nRCPT TO:<x@foreign.test>\r\n"
                        b"RCPT TO:<two@example.com>\r\nDATA\r\n")
            lines = [reader.readline() for _ in range(11)]
            raw.sendall(b"first\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<three@example.com>\r\n"
                        b"DATA\r\n")
            lines += [reader.readline() for _ in range(4)]
            raw.sendall(b"second\r\n.\r\nQUIT\r\n")
            lines += [reader.readline() for _ in range(2)]
        return b"".join(lines)

    async def test_pipelined_replies_in_order(self) -> None:
        self.assertFalse(self.domains.loaded)
        transcript = (await threads.deferToThread(self.raw_pipelined)).decode()
        codes = [line[:9] for line in transcript.split("\r\n") if line[3:4] == " "]
        self.assertEqual(codes, [
            "250 START", "250 2.1.0", "250 2.1.5", "550 5.7.1", "250 2.1.5", "354 End d",
            "250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0", "221 2.0.0",
        ])
        self.assertEqual([[r.address for r in e.recipients] for _, e in self.spool.committed],
                         [["one@example.com", "two@example.com"], ["three@example.com"]])
        bodies = await self.committed_bodies()
        self.assertEqual(sorted(strip_received(b) for b in bodies.values()),
                         [b"first\r\n", b"second\r\n"])

    def smuggle(self) -> bytes:
        """Blocking: a `\\n.\\n` smuggling attempt followed by an injected transaction."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"HELO client.example\r\nMAIL FROM:<a@remote.test>\r\n"
                        b"RCPT TO:<one@example.com>\r\nDATA\r\n")
            lines = [reader.readline() for _ in range(4)]
            raw.sendall(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@remote.test>\r\n"
                        b"RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n")
            lines += [reader.readline() for _ in range(2)]
        return b"".join(lines)

    async def test_smuggling_over_a_real_socket_is_refused(self) -> None:
        transcript = (await threads.deferToThread(self.smuggle)).decode()
        codes = [line[:9] for line in transcript.split("\r\n") if line]
        self.assertEqual(codes, ["250 mx.ga", "250 2.1.0", "250 2.1.5", "354 End d",
                                 "550 5.5.2", "221 2.0.0"], transcript)
        self.assertEqual(self.spool.committed, [])

    # -- mail loops -------------------------------------------------------------------------

    def smtplib_send(self, message: bytes) -> tuple[int, bytes]:
        """Blocking (runs in a thread): one message over a plain session; the DATA reply."""
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example",
                          timeout=30) as client:
            client.ehlo()
            assert client.mail("sender@remote.test")[0] == 250
            assert client.rcpt("user@example.com")[0] == 250
            try:
                return client.data(message)
            except smtplib.SMTPDataError as e:
                error = e.smtp_error
                return e.smtp_code, error if isinstance(error, bytes) else error.encode()

    async def test_a_looping_message_is_refused_over_a_real_socket(self) -> None:
        """A header section of about 200 KB (long folded fields) arrives in many reads."""
        fold = b"\tvia " + b"r" * 900 + b"\r\n"

        def looped(hops: int) -> bytes:
            return b"".join(b"Received: from hop%d.test\r\n" % n + fold * 4
                            for n in range(hops)) + b"Subject: loop\r\n\r\nbody\r\n"

        code, text = await threads.deferToThread(self.smtplib_send, looped(50))
        self.assertEqual((code, text[:24]), (554, b"5.4.6 Too many hops (mor"))
        self.assertEqual(self.spool.committed, [])
        code, _ = await threads.deferToThread(self.smtplib_send, looped(49))
        self.assertEqual(code, 250)
        [body] = (await self.committed_bodies()).values()
        self.assertEqual(strip_received(body), looped(49))


class TLSSessionEndTests(TestCase):
    """The server ends a TLS session itself, over a real socket: after QUIT, after its idle
    timeout, and when a client sends STARTTLS and then nothing. Each read here has a
    deadline of its own; a server that left the connection open fails it (the session
    kept its connection slot for as long as the client kept the socket)."""

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        directory = tempdir_for(self)
        cert, key = shared_pki().write_server_pair(directory)
        self.ca_file = directory / "ca.pem"
        self.factory = SMTPServerFactory(
            SMTPSettings(hostname="mx.gateway.test", idle_timeout=1.0), _NoDomains(), None,
            self.reactor, tls=server_context(cert, key),
        )
        self.factory.close_grace = 1.0
        port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(
            self.factory
        )
        self.addCleanup(port.stopListening)
        self.port: int = port.getHost().port

    def starttls(self) -> socket.socket:
        """Blocking: a connection that has said EHLO and STARTTLS and read the 220."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO client.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
        return raw

    def replies_until_closed(self, quit: bool) -> list[bytes]:
        """Blocking: STARTTLS, then QUIT or silence over TLS; the lines read until the
        server closed (a read that times out raises)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with context.wrap_socket(self.starttls(), server_hostname="localhost") as tls:
            tls.settimeout(5)
            if quit:
                tls.sendall(b"QUIT\r\n")
            return tls.makefile("rb").readlines()

    def silent_after_starttls(self) -> bytes:
        """Blocking: STARTTLS, then no handshake; what is read until the server closes."""
        with self.starttls() as raw:
            raw.settimeout(5)
            try:
                return raw.recv(100)
            except ConnectionResetError:
                return b""

    async def test_quit_over_tls_closes_the_connection(self) -> None:
        lines = await threads.deferToThread(self.replies_until_closed, True)
        self.assertEqual(lines, [b"221 2.0.0 Bye\r\n"])
        await self.connections_released()

    async def test_the_idle_timeout_over_tls_closes_the_connection(self) -> None:
        lines = await threads.deferToThread(self.replies_until_closed, False)
        self.assertEqual(lines, [b"421 4.4.2 mx.gateway.test Error: timeout exceeded\r\n"])
        await self.connections_released()

    async def test_a_client_silent_after_starttls_loses_its_connection(self) -> None:
        # The 421 waits for a handshake that never comes; the connection is dropped.
        self.assertEqual(await threads.deferToThread(self.silent_after_starttls), b"")
        await self.connections_released()

    async def tls_listener(self, **settings: Any) -> tuple[SMTPServerFactory, int]:
        """An implicit-TLS listener (RFC 8314, an `ssl:` endpoint, as the daemon makes
        it) with its own factory."""
        factory = SMTPServerFactory(
            SMTPSettings(hostname="mx.gateway.test", **settings), _NoDomains(), None,
            self.reactor)
        factory.close_grace = 1.0
        cert, key = self.ca_file.parent / "cert.pem", self.ca_file.parent / "key.pem"
        listeners = TLSListeners(Clock(), CpuPool.for_tests())  # (the daemon's endpoints)
        port = await listeners.endpoint(
            self.reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        ).listen(factory)
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port  # type: ignore[attr-defined]

    async def test_an_implicit_tls_listener_serves_a_session(self) -> None:
        """The greeting, written before the handshake, made the TLS transport pause the
        session as its producer, which stopped reading the socket: the handshake never
        finished and no client ever got the greeting."""
        factory, port = await self.tls_listener()

        def session() -> list[bytes]:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                reader = tls.makefile("rb")
                lines = [reader.readline()]
                tls.sendall(b"EHLO client.example\r\nQUIT\r\n")
                return lines + reader.readlines()

        lines = await threads.deferToThread(session)
        self.assertEqual(lines[0], b"220 mx.gateway.test ESMTP Mailcore\r\n")
        self.assertNotIn(b"250-STARTTLS\r\n", lines)  # (already TLS)
        self.assertEqual(lines[-1], b"221 2.0.0 Bye\r\n")
        await self.connections_released(factory)

    async def test_a_connection_over_the_limit_on_a_tls_listener_is_closed(self) -> None:
        """A connection over max_connections_per_ip is answered 421, which on an
        implicit-TLS listener waits for a TLS handshake: a client that never starts one
        kept the connection, counted by no limit, for as long as it liked."""
        factory, port = await self.tls_listener(max_connections_per_ip=1)

        address = ("127.0.0.1", port)

        def second_connection() -> bytes:
            with socket.create_connection(address, timeout=5) as second:
                try:
                    return second.recv(100)
                except ConnectionResetError:
                    return b""

        first = await threads.deferToThread(socket.create_connection, address, 10)
        try:
            for _ in range(100):  # until the first one is counted
                if factory.connections == 1:
                    break
                await sleep(0.02)
            got = await threads.deferToThread(second_connection)
        finally:
            first.close()
        self.assertEqual(got, b"")
        await self.connections_released(factory)

    async def connections_released(self, factory: SMTPServerFactory | None = None) -> None:
        factory = factory or self.factory
        for _ in range(100):
            if factory.connections == 0:
                return
            await sleep(0.02)
        self.fail(f"{factory.connections} SMTP sessions still open")


class _NoDomains:
    """A recipient directory serving nothing (these tests send no mail)."""

    loaded = True

    def when_loaded(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def lookup(self, domain_name: str) -> None:
        return None

    def accepts(self, local_part: str, domain_name: str) -> bool:
        return False

    def postmaster_elsewhere(self, domain_name: str) -> bool:
        return False

    def suspended(self, domain_name: str) -> bool:
        return False

"""STARTTLS to the next hop with real TLS: required-and-verified against a private CA
(`tls_ca_file`), refused when the certificate does not verify, opportunistic under `may`,
and the default (verify-if-offered) with a domain's own override."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from twisted.internet import ssl
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.queue.assembly import Queue, build_queue
from mailcore.queue.settings import QueueSettings
from mailcore.store.schema import domains, queue_recipients
from tests.support.db import open_database
from tests.support.mailsink import SinkFactory, SinkState, add_domain, envelope
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for
from tests.support.testca import shared_pki


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, name: str) -> tuple[Any, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def server_options(ca_key: Any, ca_cert: x509.Certificate, host: str) -> Any:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ssl.PrivateCertificate.loadPEM(pem).options()


async def queue_with_one_message(
    test: TestCase, db: Any, settings: QueueSettings, domain: int
) -> Queue:
    """A started queue on the real reactor that has accepted one message for
    b@customer.test (stopped when `test` ends)."""
    q = build_queue(Config(hostname="mx.test"), db, get_reactor(), CollectorRegistry(),
                    reactor=get_reactor(), settings=settings)
    q.service.startService()
    test.addCleanup(q.service.stopService)
    env = envelope("a@x.test", ("b@customer.test", domain))
    await q.spool.accept("Q1", env, b"Subject: tls\r\n\r\nsecret\r\n")
    return q


class VerifiedTLSTests(TestCase):
    timeout = 60

    async def setup(self, *, require_tls: bool, trusted: bool, host: str = "localhost",
                    policy: str = "may", cert_host: str | None = None,
                    starttls: str | None = "ok") -> tuple[Queue, Any, SinkState]:
        directory = tempdir_for(self)
        ca_key, ca_cert, _ca_path = make_ca(directory, "test-ca")
        _other_key, _other_cert, other_path = make_ca(directory, "other-ca")
        state = SinkState(starttls=starttls,
                          tls_context=server_options(ca_key, ca_cert, cert_host or host))
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(state)
        )
        self.addCleanup(listener.stopListening)
        port = listener.getHost().port
        db = await open_database(self, "sqlite")
        domain = await add_domain(db, "customer.test", host, port, require_tls=require_tls)
        ca_file = str(directory / "test-ca.pem") if trusted else str(other_path)
        settings = QueueSettings(node_id="tls-node", tls_ca_file=ca_file, tls=policy,
                                 relayhost=f"127.0.0.1:{port}", allow_loopback=True)
        q = await queue_with_one_message(self, db, settings, domain)
        return q, db, state

    async def state_of(self, db: Any) -> str:
        return str(await db.read("s", lambda c: c.execute(
            select(queue_recipients.c.state)).scalar_one()))

    async def wait_state(self, db: Any, wanted: str) -> None:
        for _ in range(200):
            if await self.state_of(db) == wanted:
                return
            await sleep(0.05)
        self.fail(f"recipient never became {wanted}: {await self.state_of(db)}")

    async def test_required_tls_verified_against_the_private_ca(self) -> None:
        _q, db, state = await self.setup(require_tls=True, trusted=True)
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)
        await self.wait_state(db, "delivered")

    async def test_large_messages_stream_over_one_tls_connection(self) -> None:
        """A body over TURN_BYTES goes out a chunk at a time under TLS's flow control, and
        the next message on the connection registers its stream's producer afresh (the
        last one was unregistered)."""
        q, db, state = await self.setup(require_tls=True, trusted=True)
        await state.wait_for(1)
        bodies = [b"Subject: big %d\r\n\r\n" % i
                  + b"".join(b"line %07d\r\n" % n for n in range(120_000)) for i in range(2)]
        domain = await db.read("d", lambda c: c.execute(select(domains.c.id)).scalar_one())
        for i, body in enumerate(bodies):
            env = envelope("a@x.test", ("b@customer.test", domain))
            await q.spool.accept(f"Q{i + 2}", env, body)
        await state.wait_for(3)
        self.assertEqual([m.data.endswith(b"line 0119999\r\n") for m in state.messages[1:]],
                         [True, True])

    async def test_required_tls_with_an_untrusted_certificate_is_not_delivered(self) -> None:
        _q, db, state = await self.setup(require_tls=True, trusted=False)
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])

    async def test_required_tls_with_the_wrong_host_name_is_not_delivered(self) -> None:
        _q, db, state = await self.setup(require_tls=True, trusted=True,
                                         cert_host="mx.other.test")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])

    async def test_required_tls_to_a_hop_that_stopped_offering_starttls_is_not_delivered(
        self,
    ) -> None:
        """A man in the middle that strips STARTTLS from the EHLO reply gets no cleartext
        from a hop whose TLS is required."""
        _q, db, state = await self.setup(require_tls=True, trusted=True, starttls=None)
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])
        self.assertNotIn(b"MAIL", b" ".join(state.commands))
        error = await db.read("e", lambda c: c.execute(
            select(queue_recipients.c.last_error)).scalar_one())
        self.assertIn("4.7.5 TLS is required but the server offers no STARTTLS", error)

    async def test_opportunistic_tls_does_not_need_a_trusted_certificate(self) -> None:
        _q, db, state = await self.setup(require_tls=False, trusted=False, policy="may")
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)
        await self.wait_state(db, "delivered")

    async def test_verify_if_offered_refuses_an_untrusted_certificate(self) -> None:
        """`verify-if-offered`: a hop that offers STARTTLS gets verified TLS or nothing."""
        _q, db, state = await self.setup(require_tls=False, trusted=False,
                                         policy="verify-if-offered")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])

    async def test_verify_if_offered_with_a_trusted_certificate_delivers(self) -> None:
        _q, db, state = await self.setup(require_tls=False, trusted=True,
                                         policy="verify-if-offered")
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)
        await self.wait_state(db, "delivered")

    async def test_an_ehlo_reply_injected_before_the_handshake_is_not_read_after_it(
        self,
    ) -> None:
        """The CVE-2011-0411 class on our side: cleartext sent behind the 220 to STARTTLS,
        in the same write, must not be read as the reply to the EHLO we say over TLS (it
        would offer AUTH and drop PIPELINING, and the real reply would then answer MAIL:
        the message deferred as a protocol error, or worse)."""
        _q, db, state = await self.setup(require_tls=False, trusted=True,
                                         policy="verify-if-offered", starttls="inject")
        await self.wait_state(db, "delivered")
        self.assertEqual(state.commands[:3], [b"EHLO mx.test", b"STARTTLS", b"EHLO mx.test"])
        self.assertTrue(state.commands[3].startswith(b"MAIL FROM:<a@x.test>"))

    async def test_verify_if_offered_refused_starttls_sends_nothing_in_clear(self) -> None:
        """A hop (or a man in the middle) that offers STARTTLS and then answers it 454 gets
        no MAIL in cleartext under verify-if-offered: the mail is deferred (4.7.5)."""
        _q, db, state = await self.setup(require_tls=False, trusted=True,
                                         policy="verify-if-offered", starttls="refuse")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])
        self.assertNotIn(b"MAIL", b" ".join(state.commands))
        error = await db.read("e", lambda c: c.execute(
            select(queue_recipients.c.last_error)).scalar_one())
        self.assertIn("4.7.5 TLS was offered and failed", error)

    async def test_a_certificate_with_a_malformed_name_is_refused(self) -> None:
        """Twisted's handshake check only logs a CertificateError (not a VerificationError)
        and lets the connection go on; our own check after the handshake refuses it."""
        from service_identity.exceptions import CertificateError

        _q, db, state = await self.setup(require_tls=True, trusted=True, host="127.0.0.1")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])
        self.flushLoggedErrors(CertificateError)


class DefaultPolicyTests(TestCase):
    """No `[queue] tls` configured (verify-if-offered), against a next hop whose certificate
    comes from a CA the system does not trust (tests.support.testca), and a domain that
    overrides the default."""

    timeout = 60

    async def setup(self, *, domain_tls: str | None = None,
                    ca_file: str = "") -> tuple[Any, SinkState]:
        pki = shared_pki()
        state = SinkState(starttls="ok", tls_context=pki.server_options())
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(state)
        )
        self.addCleanup(listener.stopListening)
        port = listener.getHost().port
        db = await open_database(self, "sqlite")
        domain = await add_domain(db, "customer.test", "localhost", port, tls=domain_tls)
        settings = QueueSettings(node_id="tls-node", tls_ca_file=ca_file,
                                 relayhost=f"127.0.0.1:{port}", allow_loopback=True)
        self.assertEqual(settings.tls, "verify-if-offered")
        await queue_with_one_message(self, db, settings, domain)
        return db, state

    async def recipient(self, db: Any) -> tuple[str, str | None]:
        r = queue_recipients.c
        row = await db.read("r", lambda c: c.execute(select(r.state, r.last_error)).one())
        return str(row[0]), row[1]

    async def wait_state(self, db: Any, wanted: str) -> str | None:
        for _ in range(200):
            state, error = await self.recipient(db)
            if state == wanted:
                return error
            await sleep(0.05)
        self.fail(f"recipient never became {wanted}: {await self.recipient(db)}")

    async def test_a_certificate_from_an_unknown_ca_defers_with_4_7_5(self) -> None:
        db, state = await self.setup()
        error = await self.wait_state(db, "deferred")
        self.assertIn("4.7.5", error or "")
        self.assertIn(b"STARTTLS", state.commands)
        self.assertEqual(state.messages, [])  # and nothing in cleartext either
        self.assertEqual(state.connections, 1)
        self.assertNotIn(b"DATA", state.commands)

    async def test_a_domain_set_to_may_is_delivered_over_unverified_tls(self) -> None:
        db, state = await self.setup(domain_tls="may")
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)
        self.assertEqual(state.messages[0].data, b"Subject: tls\r\n\r\nsecret\r\n")
        await self.wait_state(db, "delivered")

    async def test_a_trusted_certificate_is_delivered_by_default(self) -> None:
        directory = tempdir_for(self)
        ca = directory / "ca.pem"
        ca.write_bytes(shared_pki().ca_pem)
        db, state = await self.setup(ca_file=str(ca))
        await state.wait_for(1)
        self.assertIn(b"STARTTLS", state.commands)
        await self.wait_state(db, "delivered")

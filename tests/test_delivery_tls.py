"""STARTTLS to the next hop with real TLS: required-and-verified against a private CA
(`tls_ca_file`), refused when the certificate does not verify, opportunistic otherwise."""

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
from mailcore.queue import Queue, build_queue
from mailcore.queue.settings import QueueSettings
from mailcore.store.schema import queue_recipients
from tests.support.db import open_database
from tests.support.mailsink import SinkFactory, SinkState, add_domain, envelope
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for


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


class VerifiedTLSTests(TestCase):
    timeout = 60

    async def setup(self, *, require_tls: bool, trusted: bool, host: str = "localhost",
                    policy: str = "may",
                    cert_host: str | None = None) -> tuple[Queue, Any, SinkState]:
        directory = tempdir_for(self)
        ca_key, ca_cert, _ca_path = make_ca(directory, "test-ca")
        _other_key, _other_cert, other_path = make_ca(directory, "other-ca")
        state = SinkState(starttls="ok",
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
                                 relayhost=f"127.0.0.1:{port}")
        q = build_queue(Config(hostname="mx.test"), db, get_reactor(), CollectorRegistry(),
                        reactor=get_reactor(), settings=settings)
        q.service.startService()
        self.addCleanup(q.service.stopService)
        env = envelope("a@x.test", ("b@customer.test", domain))
        await q.spool.accept("Q1", env, b"Subject: tls\r\n\r\nsecret\r\n")
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

    async def test_required_tls_with_an_untrusted_certificate_is_not_delivered(self) -> None:
        _q, db, state = await self.setup(require_tls=True, trusted=False)
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])

    async def test_required_tls_with_the_wrong_host_name_is_not_delivered(self) -> None:
        _q, db, state = await self.setup(require_tls=True, trusted=True,
                                         cert_host="mx.other.test")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])

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

    async def test_a_certificate_with_a_malformed_name_is_refused(self) -> None:
        """Twisted's handshake check only logs a CertificateError (not a VerificationError)
        and lets the connection go on; our own check after the handshake refuses it."""
        from service_identity.exceptions import CertificateError

        _q, db, state = await self.setup(require_tls=True, trusted=True, host="127.0.0.1")
        await self.wait_state(db, "deferred")
        self.assertEqual(state.messages, [])
        self.flushLoggedErrors(CertificateError)

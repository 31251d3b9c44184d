"""The STARTTLS pair is loaded again when its files change (a certbot renewal), without a
restart; a pair that does not load leaves the one before in service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import ssl
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.proto_helpers import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.core import Core
from mailcore.tls import RELOAD_CHECK_INTERVAL, CertificateReloader
from mailcore.workers import CpuPool
from tests.support.db import synchronous_database
from tests.support.testca import PKI, make_pki, shared_pki


def served(options: Any) -> bytes:
    """The DER certificate a CertificateOptions presents."""
    return ssl.Certificate(options.certificate).dump()


def der(pki: PKI) -> bytes:
    return ssl.Certificate.loadPEM(pki.cert_pem).dump()


class ReloaderTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.old, self.new = shared_pki(), make_pki("Renewed CA")
        self.cert, self.key = self.old.write_server_pair(Path(self.mktemp()))
        self.reloader = CertificateReloader(self.cert, self.key, self.clock,
                                            CpuPool.for_tests())
        self.installed: list[Any] = []
        self.reloader.serve(self.installed.append)
        self.assertEqual(served(self.reloader.options()), der(self.old))
        self.reloader.startService()
        self.addCleanup(self.reloader.stopService)
        self.warnings: list[str] = []

        def record(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "mailcore.tls":
                self.warnings.append(formatEvent(event))

        observe: Any = record
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def write(self, path: Path, data: bytes, stamp: int) -> None:
        """Replace a file's content, with a modification time of its own."""
        path.write_bytes(data)
        os.utime(path, ns=(stamp, stamp))

    def test_unchanged_files_are_not_loaded_again(self) -> None:
        self.clock.advance(RELOAD_CHECK_INTERVAL * 3)
        self.assertEqual(self.installed, [])

    def test_a_renewed_pair_is_served_after_the_next_check(self) -> None:
        self.write(self.key, self.new.key_pem, 10**18)
        self.write(self.cert, self.new.cert_pem, 10**18)
        self.assertEqual(self.installed, [])
        self.clock.advance(RELOAD_CHECK_INTERVAL)
        [options] = self.installed
        self.assertEqual(served(options), der(self.new))
        self.assertIs(self.reloader.options(), options)

    def test_a_pair_caught_half_renewed_keeps_the_old_one_until_it_is_whole(self) -> None:
        self.write(self.cert, self.new.cert_pem, 10**18)  # its key not written yet
        self.clock.advance(RELOAD_CHECK_INTERVAL)
        self.clock.advance(RELOAD_CHECK_INTERVAL)
        self.assertEqual(self.installed, [])
        self.assertEqual(served(self.reloader.options()), der(self.old))
        [warning] = [w for w in self.warnings if "could not be loaded" in w]  # logged once
        self.assertIn(str(self.cert), warning)
        self.write(self.key, self.new.key_pem, 10**18)
        self.clock.advance(RELOAD_CHECK_INTERVAL)
        [options] = self.installed
        self.assertEqual(served(options), der(self.new))


class DaemonWiringTests(TestCase):
    def test_the_smtp_factory_takes_the_renewed_pair(self) -> None:
        reactor = MemoryReactorClock()
        cert, key = shared_pki().write_server_pair(Path(self.mktemp()))
        core = Core.build(Config(), synchronous_database(), reactor, tls_cert=cert, tls_key=key,
                          cpu=CpuPool.for_tests())
        factory = core.smtp_factory()
        assert core.certificate is not None
        self.assertIn(core.certificate, core.background_services())
        core.certificate.startService()
        self.addCleanup(core.certificate.stopService)
        renewed = make_pki("Renewed CA")
        key.write_bytes(renewed.key_pem)
        cert.write_bytes(renewed.cert_pem)
        os.utime(cert, ns=(10**18, 10**18))
        self.assertEqual(served(factory.tls), der(shared_pki()))
        reactor.advance(RELOAD_CHECK_INTERVAL)
        self.assertEqual(served(factory.tls), der(renewed))

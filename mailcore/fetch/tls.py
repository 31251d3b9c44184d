"""Client TLS for fetch sessions: always verified, never turned off.

Three ways to trust a server: the platform's CA store with the host name checked (default);
a per-account CA certificate (PEM) with the host name checked, for a private CA; or a pinned
SHA-256 fingerprint of the server's certificate, which identifies it whatever signed it.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS
from zope.interface import implementer

from mailcore.fetch.errors import AccountError

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def normalise_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and spaces dropped)."""
    fp = re.sub(r"[\s:]", "", value).lower()
    if fp.startswith("sha256"):
        fp = fp[6:].lstrip("=")
    if not _FINGERPRINT.match(fp):
        raise AccountError(
            "tls_fingerprint must be the SHA-256 of the server certificate (64 hex digits)",
            "tls_fingerprint",
        )
    return fp


def check_ca_pem(pem: str) -> str:
    """The PEM text if it holds at least one readable certificate."""
    blocks = _PEM_CERT.findall(pem.encode("ascii", "replace"))
    if not blocks:
        raise AccountError("tls_ca_pem must hold a PEM certificate", "tls_ca_pem")
    for block in blocks:
        try:
            x509.load_pem_x509_certificate(block)
        except ValueError:
            raise AccountError("tls_ca_pem holds an unreadable certificate", "tls_ca_pem") from None
    return pem


def certificate_fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificate:
    """Accept exactly the server certificate whose SHA-256 fingerprint is pinned."""

    def __init__(self, hostname: str, fingerprint: str) -> None:
        self.hostname = hostname
        self.fingerprint = normalise_fingerprint(fingerprint)
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            # The chain above the leaf does not matter: the pin names the leaf itself.
            return True
        return certificate_fingerprint(cert.to_cryptography()) == self.fingerprint

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        try:
            conn.set_tlsext_host_name(self.hostname.encode("idna"))
        except (UnicodeError, ValueError):
            pass
        conn.set_connect_state()
        return conn


def client_tls(
    hostname: str, *, ca_pem: str | None = None, fingerprint: str | None = None
) -> IOpenSSLClientConnectionCreator:
    """The verified TLS client settings for one account's server."""
    if fingerprint:
        return PinnedCertificate(hostname, fingerprint)
    if ca_pem:
        roots = [ssl.Certificate.loadPEM(b) for b in _PEM_CERT.findall(ca_pem.encode("ascii"))]
        return optionsForClientTLS(hostname, trustRoot=ssl.trustRootFromCertificates(roots))
    return optionsForClientTLS(hostname, trustRoot=ssl.platformTrust())

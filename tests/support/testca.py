"""A throwaway certificate authority for TLS tests: trust it explicitly, never turn
verification off.

`shared_pki()` makes (once per test process) a CA and a server certificate it signed for
`localhost` and 127.0.0.1, with EC P-256 keys (fast to make). `write_server_pair(dir)` puts
the server pair where `mailcore.tls.server_context` can read it.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator


@dataclass(frozen=True)
class PKI:
    """PEM bytes of the CA certificate and of the server's certificate and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the server certificate, hex (for pinning)."""
        return x509.load_pem_x509_certificate(self.cert_pem).fingerprint(hashes.SHA256()).hex()

    def client_options(self, hostname: str = "localhost") -> IOpenSSLClientConnectionCreator:
        """Client TLS options that trust only this CA and check `hostname`."""
        return ssl.optionsForClientTLS(hostname, trustRoot=ssl.Certificate.loadPEM(self.ca_pem))

    def server_options(self) -> ssl.CertificateOptions:
        """Server TLS options presenting the server certificate."""
        return ssl.PrivateCertificate.loadPEM(self.cert_pem + self.key_pem).options()

    def write_server_pair(self, directory: Path) -> tuple[Path, Path]:
        """Write cert.pem, key.pem (and ca.pem) into `directory`; returns (cert, key)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "cert.pem", directory / "key.pem"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        (directory / "ca.pem").write_bytes(self.ca_pem)
        return cert, key


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@functools.cache
def shared_pki() -> PKI:
    """The process-wide test CA and its `localhost` (and 127.0.0.1) server certificate."""
    return make_pki("Mailcore Test CA", ip_addresses=("127.0.0.1",))


def make_pki(ca_common_name: str, *, ip_addresses: tuple[str, ...] = (),
             dns_names: tuple[str, ...] = ("localhost",)) -> PKI:
    """A fresh CA and a server certificate it signed for `dns_names` (DNS:localhost) plus
    `ip_addresses`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in dns_names]
                + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return PKI(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_pem_key(key),
    )

"""The daemon's TLS identity: load the configured pair, or make a self-signed one once."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.logger import Logger

from mailcore.files import private_directory, write_whole

log = Logger()


def generate_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    """Write a fresh RSA-2048 key and a self-signed certificate for `hostname`. Blocks."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    private_directory(key_path.parent)
    # Each file whole or not at all, the key first: a certificate on disk has its key.
    write_whole(key_path, key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    write_whole(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(
    data_dir: Path, cert: Path | None, key: Path | None, hostname: str
) -> tuple[Path, Path]:
    """The (cert, key) paths to use; generates a self-signed pair in data_dir when none given."""
    if cert is not None and key is not None:
        return cert, key
    cert_path, key_path = data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem"
    # An empty file is what an older version killed while writing the pair left (or a
    # power loss soon after it wrote them unsynced): made again, instead of failing every
    # start.
    if not (_nonempty(cert_path) and _nonempty(key_path)):
        generate_self_signed(cert_path, key_path, hostname)
        log.info(
            "generated a self-signed TLS certificate for {hostname} at {path}",
            hostname=hostname,
            path=str(cert_path),
        )
    return cert_path, key_path


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def server_context(cert: Path, key: Path) -> ssl.CertificateOptions:
    """Server-side TLS options for STARTTLS and TLS listeners. Blocks (reads the files).

    `cert` holds the server's certificate first, then any intermediate certificates
    (certbot's fullchain.pem): all of them are sent, as a client that verifies needs the
    chain up to a root it trusts. OpenSSL's Error when a file is not PEM (ValueError for a
    malformed certificate after the first), VerifyError when the key is not the first
    certificate's."""
    pem = cert.read_bytes()
    certificate = ssl.PrivateCertificate.loadPEM(pem + b"\n" + key.read_bytes())
    chain = [
        crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(pem)[1:]
    ]
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=chain,
    )

"""The daemon's TLS identity: load the configured pair, or make a self-signed one once, and
load it again when its files change."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.files import private_directory, write_whole
from mailcore.periodic import PeriodicService
from mailcore.workers import CpuPool

log = Logger()

# The oldest TLS version any of our TLS contexts speaks (RFC 8996 deprecates 1.0 and 1.1).
# Twisted 26's default is the same, enforced with OP_NO_TLSv1/OP_NO_TLSv1_1 whatever the
# distribution's openssl.cnf says; named here so that no Twisted default decides it.
TLS_FLOOR = ssl.TLSVersion.TLSv1_2


def trust_roots(ca_file: str) -> Any:
    """The roots a peer's certificate is verified against: the PEM file `ca_file` (a
    private CA) when one is given, else the system's (the queue's next hops and MTA-STS
    policy hosts, `[queue] tls_ca_file`)."""
    if ca_file:
        return ssl.Certificate.loadPEM(Path(ca_file).read_bytes())
    return ssl.platformTrust()


def verifying_options(host: str, trust: Any) -> Any:
    """Client TLS options (TLS_FLOOR at the least) whose handshake fails unless the peer's
    certificate verifies against `trust` and names `host`."""
    return ssl.optionsForClientTLS(host, trustRoot=trust,
                                   extraCertificateOptions={"raiseMinimumTo": TLS_FLOOR})


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


def server_context(cert: Path, key: Path, chain: Path | None = None) -> ssl.CertificateOptions:
    """Server-side TLS options for STARTTLS and TLS listeners (TLS 1.2 at least). Blocks
    (reads the files).

    `cert` holds the server's certificate first, then any intermediate certificates
    (certbot's fullchain.pem): all of them are sent, as a client that verifies needs the
    chain up to a root it trusts; so are those of `chain` (an `ssl:` listener's
    extraCertChain=, certbot's chain.pem) that `cert` does not hold already. OpenSSL's
    Error when a file is not PEM (ValueError for a malformed certificate after the first,
    or in `chain`), VerifyError when the key is not the first certificate's."""
    pem = cert.read_bytes()
    certificate = ssl.PrivateCertificate.loadPEM(pem + b"\n" + key.read_bytes())
    extra = x509.load_pem_x509_certificates(pem)[1:]
    if chain is not None:
        extra += [c for c in x509.load_pem_x509_certificates(chain.read_bytes())
                  if c not in extra]
    chain_certs = [crypto.X509.from_cryptography(c) for c in extra]
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        extraCertChain=chain_certs,
        raiseMinimumTo=TLS_FLOOR,
    )


# How often the reloader looks at the certificate files (a stat of each).
RELOAD_CHECK_INTERVAL = 60.0

# What tells one version of the pair from another: (device, inode, size, mtime) of each
# file, after symbolic links (certbot's live/ names link to its archive/ files).
Signature = tuple[tuple[int, int, int, int], ...]


def _signature(cert: Path, key: Path, chain: Path | None = None) -> Signature:
    """Blocks (a stat of each file)."""
    out = []
    for path in (cert, key) if chain is None else (cert, key, chain):
        st = path.stat()
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load_if_changed(
    cert: Path, key: Path, chain: Path | None, seen: Signature | None
) -> tuple[Signature, ssl.CertificateOptions | None]:
    """The files' signature, and the pair loaded again when it differs from `seen` (None
    when it does not). Blocks; raises as server_context does."""
    signature = _signature(cert, key, chain)
    if signature == seen:
        return signature, None
    return signature, server_context(cert, key, chain)


class CertificateReloader(PeriodicService):
    """A certificate and its key (and, for an `ssl:` listener, its extraCertChain= file),
    served renewed without a restart: the STARTTLS pair (--tls-cert) and each `ssl:`
    listener's (mailcore.tlslisten).

    `options()` loads the pair the first time (blocks); then every RELOAD_CHECK_INTERVAL
    seconds the files are looked at (on `pool`) and, when either changed (certbot renews
    a certificate a month before it expires and replaces the files in place or behind its
    symbolic links), loaded again and handed to each `serve` target, the SMTP factory
    (its next STARTTLS uses them; sessions already in TLS keep theirs); an `ssl:` listener
    asks `options()` for each new connection. A pair that does
    not load (a renewal caught half-written, a key that is not the certificate's) is logged
    once and the one loaded before is kept; it is tried again once the files change."""

    name = "tls_certificate_reload"

    def __init__(self, cert: Path, key: Path, clock: IReactorTime, pool: CpuPool,
                 interval: float = RELOAD_CHECK_INTERVAL, chain: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.chain = chain
        self.clock = clock
        self.pool = pool
        self._interval = interval
        self._options: ssl.CertificateOptions | None = None
        self._seen: Signature | None = None  # the files as last loaded or tried
        self._targets: list[Callable[[ssl.CertificateOptions], None]] = []

    def options(self) -> ssl.CertificateOptions:
        """The pair as last loaded; the first call loads it (blocks, raises as
        server_context does)."""
        if self._options is None:
            self._seen, options = _load_if_changed(self.cert, self.key, self.chain, None)
            assert options is not None
            self._options = options
        return self._options

    def serve(self, install: Callable[[ssl.CertificateOptions], None]) -> None:
        """Call `install` with the pair each time it is loaded again."""
        self._targets.append(install)

    def interval(self) -> float:
        return self._interval

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.check())

    async def check(self) -> None:
        """Load the pair again if its files changed (never fails: a failure is logged)."""
        if self._options is None:
            return  # nothing serves it yet
        try:
            signature, options = await self.pool.run(
                _load_if_changed, self.cert, self.key, self.chain, self._seen)
        except Exception as e:
            try:
                signature = await self.pool.run(_signature, self.cert, self.key, self.chain)
            except OSError:
                signature = None
            if signature is None or signature != self._seen:
                log.warn("the TLS certificate {cert} (key {key}) could not be loaded again "
                         "({error}); the one loaded before is still served",
                         cert=str(self.cert), key=str(self.key), error=str(e) or repr(e))
            if signature is not None:
                self._seen = signature
            return
        self._seen = signature
        if options is None:
            return
        self._options = options
        for install in self._targets:
            install(options)
        log.info("loaded the TLS certificate {cert} again (its files changed)",
                 cert=str(self.cert))

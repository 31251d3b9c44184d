"""Implicit-TLS listeners (`ssl:` endpoints, RFC 8314: SMTPS on 465, HTTPS) served with
certificates that are loaded again when their files change.

Twisted's own `ssl:` endpoint loads its files once, when the description is parsed, and
sends only the first certificate of `certKey=`. Here an `ssl:` description is parsed with
Twisted's syntax and parameters (`ssl:PORT:privateKey=…:certKey=…:interface=…:backlog=…:
extraCertChain=…`) into a plain TCP endpoint whose connections are wrapped in TLS
(`TLSMemoryBIOFactory`); each new connection takes the options its `CertificateReloader`
holds at that moment (mailcore.tls), so a renewed certificate is served within the
reloader's check interval, with the chain of `certKey=` (a fullchain.pem) and of
`extraCertChain=`. One reloader per distinct set of files, the STARTTLS one (--tls-cert)
reused when a listener names the same files. `sslmethod=` other than the version-flexible
methods and `dhParameters=` are refused: every listener speaks TLS 1.2 and later
(mailcore.tls.TLS_FLOOR) with ECDHE key exchange. Other descriptions are Twisted's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailcore.tls import CertificateReloader
from mailcore.workers import CpuPool

# sslmethod= values that only let OpenSSL negotiate the best version both sides speak:
# the floor stays TLS_FLOOR. Any other (TLSv1_METHOD, TLSv1_2_METHOD, …) would pin or lower
# it and is refused.
_FLEXIBLE_METHODS = frozenset({"SSLv23_METHOD", "TLS_METHOD", "TLS_SERVER_METHOD"})


class UnsupportedParameter(ValueError):
    """An `ssl:` parameter of Twisted's that mailcore refuses (its message says why)."""


def tokens(description: str) -> tuple[list[str], dict[str, str]]:
    """A description's positional and keyword parameters, split as Twisted's
    `serverFromString` splits them (':' between parameters, the first '=' of one names
    it, '\\' makes the next character plain)."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    parts: list[str] = []
    current = ""
    ops = ":="
    chars = iter(description)
    for char in chars:
        if char in ops:
            parts.append(current)
            current = ""
            if char == ":":
                _add(parts, args, kwargs)
                parts = []
                ops = ":="
            else:
                ops = ":"
        elif char == "\\":
            current += next(chars, "")
        else:
            current += char
    parts.append(current)
    _add(parts, args, kwargs)
    return args, kwargs


def _add(parts: list[str], args: list[str], kwargs: dict[str, str]) -> None:
    if len(parts) == 1:
        args.append(parts[0])
    else:
        kwargs[parts[0]] = parts[1]


@dataclass(frozen=True)
class SSLListener:
    """What an `ssl:` description names."""

    port: int
    interface: str
    backlog: int
    cert: Path
    key: Path
    chain: Path | None


def _ssl_parameters(
    port: str,
    privateKey: str = "server.pem",  # (Twisted's parameter names)
    certKey: str | None = None,
    sslmethod: str | None = None,
    interface: str = "",
    backlog: str = "50",
    extraCertChain: str | None = None,
    dhParameters: str | None = None,
) -> SSLListener:
    """Twisted's `ssl:` parameters and defaults (TypeError and ValueError as its parser
    raises them, read by mailcore.startup)."""
    if sslmethod is not None and sslmethod not in _FLEXIBLE_METHODS:
        raise UnsupportedParameter(
            f"sslmethod={sslmethod} is not supported: TLS listeners speak TLS 1.2 and later "
            "(leave sslmethod= out)")
    if dhParameters is not None:
        raise UnsupportedParameter(
            "dhParameters= is not supported: TLS listeners use ECDHE key exchange "
            "(leave dhParameters= out)")
    return SSLListener(
        port=int(port), interface=interface, backlog=int(backlog),
        cert=Path(certKey if certKey is not None else privateKey).absolute(),
        key=Path(privateKey).absolute(),
        chain=Path(extraCertChain).absolute() if extraCertChain is not None else None,
    )


def parse_ssl(description: str) -> SSLListener | None:
    """What an `ssl:` description names (nothing is read), or None for any other type.
    TypeError or ValueError when it is malformed."""
    args, kwargs = tokens(description)
    if args[0] != "ssl":
        return None
    return _ssl_parameters(*args[1:], **kwargs)


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentOptions:
    """The TLS connection of each new connection, made from the reloader's options of the
    moment."""

    def __init__(self, reloader: CertificateReloader) -> None:
        self.reloader = reloader

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.reloader.options().serverConnectionForTLS(tlsProtocol)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """A TCP server endpoint whose connections speak TLS first, with `reloader`'s pair."""

    def __init__(self, tcp: IStreamServerEndpoint, reloader: CertificateReloader) -> None:
        self.tcp = tcp
        self.reloader = reloader

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        creator = _CurrentOptions(self.reloader)
        return self.tcp.listen(TLSMemoryBIOFactory(creator, False, protocolFactory))


class TLSListeners:
    """Makes the daemon's listener endpoints and owns the reloaders of `ssl:` ones."""

    def __init__(self, clock: IReactorTime, pool: CpuPool,
                 starttls: CertificateReloader | None = None) -> None:
        self.clock = clock
        self.pool = pool
        self._reloaders: dict[tuple[Path, Path, Path | None], CertificateReloader] = {}
        self._starttls = starttls
        if starttls is not None:
            self._reloaders[_files(starttls)] = starttls

    def endpoint(self, reactor: Any, description: str) -> IStreamServerEndpoint:
        """The endpoint `description` names. For `ssl:`, its pair is loaded now (blocks;
        raises as mailcore.tls.server_context does) and from then on by a reloader."""
        listener = parse_ssl(description)
        if listener is None:
            return serverFromString(reactor, description)
        reloader = self.reloader(listener.cert, listener.key, listener.chain)
        reloader.options()  # a file that does not load fails the start
        tcp = TCP4ServerEndpoint(reactor, listener.port, listener.backlog, listener.interface)
        return TLSServerEndpoint(tcp, reloader)

    def reloader(self, cert: Path, key: Path, chain: Path | None) -> CertificateReloader:
        """The one reloader of these files."""
        files = (cert, key, chain)
        found = self._reloaders.get(files)
        if found is None:
            found = self._reloaders[files] = CertificateReloader(
                cert, key, self.clock, self.pool, chain=chain)
            # A name of its own: the daemon's MultiService refuses two of one name.
            found.name = f"{CertificateReloader.name} {cert}"
        return found

    def services(self) -> list[CertificateReloader]:
        """The reloaders of the `ssl:` listeners, but the STARTTLS one (started as
        Core.certificate)."""
        return [r for r in self._reloaders.values() if r is not self._starttls]


def _files(reloader: CertificateReloader) -> tuple[Path, Path, Path | None]:
    chain = reloader.chain.absolute() if reloader.chain is not None else None
    return (reloader.cert.absolute(), reloader.key.absolute(), chain)

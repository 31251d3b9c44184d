"""Which addresses a next hop may have: the operator's network policy and our own listeners.

Every delivery is checked on the address it actually connects to, after resolution: a
served domain's redirect, an MX answer or the relayhost, whether written as a name or an
address. The rules are the four keys of `[queue]` (`mailcore.queue.settings`, the same keys
as `[fetch]` and `[webhooks]`, see `mailcore.netpolicy`): loopback, link-local and private
addresses are refused unless the operator allows them. `[protecmail] forbidden_redirects`
(deprecated: use `[queue] deny_networks`) adds networks refused whatever else says.

A refused address defers the recipient with "4.7.0 next hop … is not allowed: <why>" (the
operator may change the policy; past the queue lifetime it bounces like any deferral), and
no connection to it is opened.

The gateway's own SMTP listeners are never a next hop: mail sent there comes back to us,
and round it goes. An address:port one of them listens on is refused before connecting,
and a connection whose peer turns out to be one of them (a wildcard listener reached
through one of this host's own addresses: the peer address is then our own end's address)
is closed before any SMTP is spoken. Either way the recipient bounces with "5.4.6 mail for
… loops back to myself", as Postfix says: it cannot succeed. The listeners are known from
`Config.smtp_endpoints` (what the CLI sees too) and, in the daemon, from the ports actually
bound (`ListeningEndpoint`), so that `tcp:0` and 0.0.0.0/:: wildcards count as well.

Verdicts are cached per (address, port): the relay's hot path connects to IP-literal hops,
and pooled connections are not checked again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from mailcore.config import Config
from mailcore.netpolicy import AddressPolicy, IPAddress, IPNetwork, parse_networks

# Listener endpoint types that listen on TCP, and their wildcard interface.
_TCP_TYPES = {"tcp": "0.0.0.0", "ssl": "0.0.0.0", "tcp6": "::"}  # noqa: S104
# Cached verdicts kept at most (distinct MX addresses come and go).
_CACHE_LIMIT = 4096


class NextHopRefused(Exception):
    """A next hop the policy refuses; the message starts with its enhanced status code.

    `permanent` is true for a loop back to ourselves (bounce), false for the operator's
    network policy (defer: the policy may change)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Verdict:
    """Why an address:port is refused; `loop` when it is one of our own listeners."""

    reason: str
    loop: bool = False


def _split(description: str) -> list[str]:
    """An endpoint description's fields, split on ':' with backslash escapes undone."""
    fields, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def listener_address(description: str) -> tuple[str, int] | None:
    """(interface, port) a server endpoint description listens on; None for what is not
    TCP (unix sockets, plugins) or cannot be read. A wildcard is "0.0.0.0" or "::"."""
    kind, *rest = _split(description.strip())
    wildcard = _TCP_TYPES.get(kind.lower())
    if wildcard is None:
        return None
    positional = [f for f in rest if "=" not in f]
    keywords = dict(f.split("=", 1) for f in rest if "=" in f)
    port_text = keywords.get("port", positional[0] if positional else "")
    try:
        port = int(port_text)
        interface = str(ipaddress.ip_address(keywords.get("interface") or wildcard))
    except ValueError:
        return None
    return interface, port


def _ip(address: IPAddress | str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Listeners:
    """The addresses this daemon's SMTP listeners listen on.

    From the configured endpoint strings, and from each port actually bound (`bound`).
    A wildcard listener (0.0.0.0, or :: which also takes IPv4 on Linux) owns its port on
    every local address: loopback, the unspecified address, and any address that is our
    own end of a connection (checked after connecting). `version` changes with the set.
    """

    def __init__(self, endpoints: Iterable[str] = ()) -> None:
        self._exact: set[tuple[IPAddress, int]] = set()
        self._wildcard: set[tuple[int, int]] = set()  # (port, IP version; 6 means both)
        self.version = 0
        for description in endpoints:
            found = listener_address(description)
            if found is not None and found[1] != 0:
                self.bound(*found)

    def bound(self, host: str, port: int) -> None:
        """Record an address:port we listen on (a wildcard host for all addresses)."""
        ip = _ip(host)
        if ip is None:
            return
        if ip.is_unspecified:
            self._wildcard.add((port, ip.version))
        else:
            self._exact.add((ip, port))
        self.version += 1

    def _wild(self, ip: IPAddress, port: int) -> bool:
        return (port, 6) in self._wildcard or (port, ip.version) in self._wildcard

    def owns(self, address: IPAddress | str, port: int) -> bool:
        """Whether `address:port` reaches one of our listeners, as far as can be told
        before connecting."""
        ip = _ip(address)
        if ip is None:
            return False
        if (ip, port) in self._exact:
            return True
        return (ip.is_loopback or ip.is_unspecified) and self._wild(ip, port)

    def owns_peer(self, peer: IPAddress | str, port: int, local: IPAddress | str) -> bool:
        """Whether a connection from `local` to `peer:port` reached one of our listeners:
        a peer with our own end's address is this host."""
        ip = _ip(peer)
        if ip is None:
            return False
        return self.owns(ip, port) or (ip == _ip(local) and self._wild(ip, port))

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcard)


@implementer(IStreamServerEndpoint)
class ListeningEndpoint:
    """A server endpoint that records the address it ends up bound to in `listeners`."""

    def __init__(self, endpoint: IStreamServerEndpoint, listeners: Listeners) -> None:
        self.endpoint = endpoint
        self.listeners = listeners

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            address: Any = port.getHost()
            host, number = getattr(address, "host", None), getattr(address, "port", None)
            if isinstance(host, str) and isinstance(number, int):
                self.listeners.bound(host, number)
            return port

        d: Deferred[IListeningPort] = self.endpoint.listen(protocolFactory)
        return d.addCallback(record)


def forbidden_redirects(config: Config) -> tuple[IPNetwork, ...]:
    """`[protecmail] forbidden_redirects` (deprecated), or no networks."""
    value = config.section("protecmail").get("forbidden_redirects")
    if value is None:
        return ()
    return parse_networks("protecmail", "forbidden_redirects", value)


class NextHopPolicy:
    """Decides whether a next hop's address:port may be connected to (module docstring)."""

    def __init__(
        self,
        rules: Any,
        listeners: Listeners | None = None,
        forbidden: Iterable[IPNetwork] = (),
    ) -> None:
        """`rules` holds the four netpolicy keys (QueueSettings does)."""
        self.addresses = AddressPolicy(rules, table="queue")
        self.listeners = listeners if listeners is not None else Listeners()
        self.forbidden = tuple(forbidden)
        self._verdicts: dict[tuple[str, int], Verdict | None] = {}
        self._version = self.listeners.version

    @classmethod
    def from_config(cls, config: Config, rules: Any,
                    listeners: Listeners | None = None) -> NextHopPolicy:
        """`rules` ([queue] settings) plus `[protecmail] forbidden_redirects`."""
        return cls(rules, listeners, forbidden_redirects(config))

    def verdict(self, address: str, port: int) -> Verdict | None:
        """Why `address:port` is refused, or None when it may be connected to (cached)."""
        if self._version != self.listeners.version:
            self._verdicts.clear()
            self._version = self.listeners.version
        key = (address, port)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        found = self._decide(address, port)
        if len(self._verdicts) >= _CACHE_LIMIT:
            self._verdicts.clear()
        self._verdicts[key] = found
        return found

    def _decide(self, address: str, port: int) -> Verdict | None:
        ip = _ip(address)
        if ip is None:
            return Verdict("not an IP address")
        if self.listeners.owns(ip, port):
            return Verdict("it is this gateway's own SMTP listener", loop=True)
        for network in self.forbidden:
            if ip.version == network.version and ip in network:
                return Verdict(f"in [protecmail] forbidden_redirects ({network})")
        reason = self.addresses.refusal(ip)
        return None if reason is None else Verdict(reason)

    def at_port(self, port: int) -> PortCheck:
        """The policy for addresses at `port`, as GuardedEndpoint asks it."""
        return PortCheck(self, port)

    def refused(self, host: str, port: int, verdicts: dict[str, Verdict]) -> NextHopRefused:
        """The delivery error for a hop whose every address was refused."""
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if verdicts and all(v.loop for v in verdicts.values()):
            return NextHopRefused(
                f"5.4.6 mail for {label} loops back to myself (it is one of this gateway's "
                "own SMTP listeners)", permanent=True,
            )
        shown = host if host in verdicts and len(verdicts) == 1 else (
            f"{host} ({', '.join(sorted(verdicts))})"
        )
        reasons = sorted({v.reason for v in verdicts.values()})
        if len(reasons) == 1:
            why = reasons[0]
        else:
            why = "; ".join(f"{a}: {v.reason}" for a, v in sorted(verdicts.items()))
        return NextHopRefused(f"4.7.0 next hop {shown} is not allowed: {why}", permanent=False)

    def check_connected(self, host: str, port: int, transport: Any) -> NextHopRefused | None:
        """After connecting, before any SMTP: a loop error if the peer is one of our own
        listeners (`transport` is the connection's)."""
        if not self.listeners:
            return None
        peer: Any = transport.getPeer()
        local: Any = transport.getHost()
        peer_host, peer_port = getattr(peer, "host", None), getattr(peer, "port", None)
        if not isinstance(peer_host, str) or not isinstance(peer_port, int):
            return None
        if self.listeners.owns_peer(peer_host, peer_port, getattr(local, "host", "")):
            return self.refused(host, port, {peer_host: Verdict("own listener", loop=True)})
        return None


class PortCheck:
    """A NextHopPolicy bound to one port: the `AddressCheck` GuardedEndpoint takes."""

    def __init__(self, policy: NextHopPolicy, port: int) -> None:
        self.policy = policy
        self.port = port

    def refusal(self, address: str) -> str | None:
        found = self.policy.verdict(address, self.port)
        return None if found is None else found.reason


__all__ = [
    "Listeners",
    "ListeningEndpoint",
    "NextHopPolicy",
    "NextHopRefused",
    "PortCheck",
    "Verdict",
    "forbidden_redirects",
    "listener_address",
]

"""Which remote addresses a user-supplied host may reach: the operator's network policy.

Hosts given to the API (webhook URLs, IMAP/POP servers) are data: a user must never make
the daemon connect to what the operator did not allow (its own loopback services, the
private network behind it). Each user of this module has a config table with the same four
keys:

```toml
allow_loopback = false       # 127.0.0.0/8 and ::1 (tests and single-host setups)
allow_private = false        # RFC 1918, CGNAT, ULA, link-local and other non-global ranges
allow_networks = []          # CIDRs allowed even if private ("10.1.2.0/24")
deny_networks = []           # CIDRs refused whatever else says
```

`AddressPolicy.allows` decides for one address (`refusal` says why not, naming the key that
would allow it); `GuardedEndpoint` resolves a host name and connects only to the addresses
the policy allows, so DNS cannot point an accepted name at a forbidden address, and no
connection to a refused address is ever opened.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHostResolution,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from mailcore.config import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Never reachable, whatever the configuration: "this network", broadcast, multicast.
_ALWAYS_DENIED = tuple(
    ipaddress.ip_network(n) for n in ("0.0.0.0/8", "255.255.255.255/32", "224.0.0.0/4",
                                      "::/128", "ff00::/8")
)


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, judged in its place: IPv4-mapped
    (::ffff:a.b.c.d), 6to4 (2002:aabb:ccdd::/48, RFC 3056: 2002:7f00:1:: reaches
    127.0.0.1 through a 6to4 relay) and NAT64 (64:ff9b::a.b.c.d, which Python calls
    reserved: on an IPv6-only host behind DNS64 every IPv4-only server has such an
    address, and a private one must stay refused)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class AddressRefused(Exception):
    """A connection would go to an address the operator does not allow (or nowhere).

    `reasons` maps each refused address to why it was refused (empty when the host did
    not resolve). `public` is the message without the addresses, for users: which
    addresses a name resolves to is the operator's to know (it would map internal names)."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None,
                 public: str | None = None) -> None:
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})
        self.public = message if public is None else public


class AddressCheck(Protocol):
    """What GuardedEndpoint asks of a policy: why an address is refused, or None."""

    def refusal(self, address: str) -> str | None: ...


class NetworkRules(Protocol):
    """The four policy keys, as a settings object (WebhookSettings, FetchSettings) holds them."""

    @property
    def allow_loopback(self) -> bool: ...

    @property
    def allow_private(self) -> bool: ...

    @property
    def allow_networks(self) -> tuple[IPNetwork, ...]: ...

    @property
    def deny_networks(self) -> tuple[IPNetwork, ...]: ...


def parse_networks(table: str, key: str, value: Any) -> tuple[IPNetwork, ...]:
    """The CIDR list of `[table] key` (a string is a list of one); else ConfigError."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[{table}] {key} must be a list of CIDR networks")
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in value)
    except ValueError as e:
        raise ConfigError(f"[{table}] {key}: {e}") from None


class AddressPolicy:
    """Which addresses may be connected to: the operator's rules, checked in order.

    deny_networks, then the never-reachable ranges, refuse; allow_networks allows; loopback
    needs allow_loopback; any other non-global address needs allow_private. The rules are
    read from `settings` on every check (an operator may swap them at run time). `table`,
    when given, is the config table the keys live in, named in the refusals.
    """

    def __init__(self, settings: NetworkRules, table: str | None = None) -> None:
        self.settings = settings
        self.table = table

    def allows(self, address: IPAddress | str) -> bool:
        """Whether a connection to `address` is allowed."""
        return self.refusal(address) is None

    def refusal(self, address: IPAddress | str) -> str | None:
        """Why a connection to `address` is refused ("loopback (allow with [queue]
        allow_loopback = true)"), or None when it is allowed."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return "not an IP address"
        s = self.settings
        key = f"[{self.table}] " if self.table else ""
        # deny_networks may name the IPv6 form itself (64:ff9b::/96) or what it carries.
        as_written = ip
        if isinstance(ip, ipaddress.IPv6Address):
            ip = _carried_ipv4(ip) or ip

        def within(networks: Iterable[IPNetwork], ip: IPAddress = ip) -> IPNetwork | None:
            return next((n for n in networks if ip.version == n.version and ip in n), None)

        denied = within(s.deny_networks) or within(s.deny_networks, as_written)
        if denied is not None:
            return f"in {key}deny_networks ({denied})"
        if within(_ALWAYS_DENIED) is not None:
            return "not a unicast address"
        if within(s.allow_networks) is not None:
            return None
        if ip.is_loopback:
            return None if s.allow_loopback else f"loopback (allow with {key}allow_loopback = true)"
        if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
            return "not a unicast address"
        if not ip.is_global:
            if s.allow_private:
                return None
            kind = "link-local" if ip.is_link_local else "private"
            return (f"{kind} (allow with {key}allow_private = true, or the network in "
                    f"{key}allow_networks)")
        return None


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what a host name resolves to."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    """A TCP client endpoint that connects only to addresses `policy` allows, checked after
    resolution; the allowed addresses are tried in turn. A host with no allowed address
    fails with AddressRefused "<host> (<addresses>) <refusal>" before any connection."""

    def __init__(self, reactor: Any, policy: AddressCheck, host: str, port: int,
                 timeout: float, *,
                 refusal: str = "is not an address this server may connect to",
                 max_addresses: int | None = None) -> None:
        """`max_addresses`: try at most that many of the allowed addresses (each may
        take `timeout`), else all of them."""
        self.reactor = reactor
        self.policy = policy
        self.host = host.strip("[]")
        self.port = port
        self.timeout = timeout
        self.refusal = refusal
        self.max_addresses = max_addresses

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        host = self.host
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            receiver = _Addresses()
            self.reactor.nameResolver.resolveHostName(receiver, host, self.port)
            addresses = await receiver.done
        if not addresses:
            raise AddressRefused(f"{host} does not resolve")
        reasons = {a: self.policy.refusal(a) for a in addresses}
        allowed = [a for a in addresses if reasons[a] is None]
        if not allowed:
            raise AddressRefused(
                f"{host} ({', '.join(sorted(set(addresses)))}) {self.refusal}",
                {a: r for a, r in reasons.items() if r is not None},
                public=f"{host} {self.refusal}",
            )
        last: BaseException | None = None
        for address in allowed[:self.max_addresses]:
            endpoint: IStreamClientEndpoint
            if ":" in address:
                endpoint = TCP6ClientEndpoint(self.reactor, address, self.port, self.timeout)
            else:
                endpoint = TCP4ClientEndpoint(self.reactor, address, self.port, self.timeout)
            try:
                return await endpoint.connect(factory)
            except Exception as e:
                last = e
        assert last is not None
        raise last


__all__ = [
    "AddressCheck",
    "AddressPolicy",
    "AddressRefused",
    "GuardedEndpoint",
    "IPAddress",
    "IPNetwork",
    "NetworkRules",
    "parse_networks",
]

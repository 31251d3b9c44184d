"""Which next hops (`redirectTo`) a customer may give: the operator's forbidden networks.

`[protecmail] forbidden_redirects` is a list of CIDR networks (IPv4 and IPv6). A redirect
to an IP address inside one of them is refused when it is written through the API. The
default forbids only addresses that can never be a mail server: unspecified (0.0.0.0/8,
::/128), link-local (169.254.0.0/16, fe80::/10, where cloud metadata services live),
multicast and broadcast. Loopback and private networks stay allowed by default, since a
gateway on premises relays to hosts on its own network; a shared, multi-tenant gateway
should add them, for instance:

    [protecmail]
    forbidden_redirects = ["0.0.0.0/8", "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12",
                           "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10", "::/128",
                           "::1/128", "fc00::/7", "fe80::/10", "224.0.0.0/4", "ff00::/8"]

An IPv4-mapped IPv6 address is checked as the IPv4 address it maps. The names `localhost`
and `*.localhost` (RFC 6761) are checked as 127.0.0.1 and ::1. Other host names are checked
where they are resolved: the delivery side should call `allows_address` on each address it
is about to connect to, since DNS can change after the API accepted the name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mailcore.config import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_FORBIDDEN = (
    "0.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "fe80::/10",
    "ff00::/8",
)
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


class RedirectForbidden(Exception):
    """A next hop the operator does not allow."""


class RedirectPolicy:
    """The operator's forbidden next-hop networks."""

    def __init__(self, forbidden: Iterable[IPNetwork] | None = None) -> None:
        networks = forbidden if forbidden is not None else _parse(DEFAULT_FORBIDDEN)
        self.forbidden: tuple[IPNetwork, ...] = tuple(networks)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> RedirectPolicy:
        """From `[protecmail] forbidden_redirects` (absent: the default list)."""
        value = section.get("forbidden_redirects")
        if value is None:
            return cls()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("[protecmail] forbidden_redirects must be a list of CIDR strings")
        try:
            return cls(_parse(value))
        except ValueError as e:
            raise ConfigError(f"[protecmail] forbidden_redirects: {e}") from None

    def allows_address(self, address: IPAddress | str) -> bool:
        """Whether a connection to `address` is allowed."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return not any(
            c.version == net.version and c in net for c in candidates for net in self.forbidden
        )

    def check(self, host: str) -> None:
        """Raise RedirectForbidden if `host` (an IP address or a name) is not allowed."""
        try:
            addresses: Sequence[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            name = host.lower().rstrip(".")
            if name != "localhost" and not name.endswith(".localhost"):
                return
            addresses = _LOOPBACK
        for address in addresses:
            if not self.allows_address(address):
                raise RedirectForbidden(
                    f"redirectTo {host}: this server does not relay to {address} "
                    "(a network the operator forbids)."
                )


def _parse(values: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values]

"""Who the client is behind a reverse proxy the operator trusts (`[web] trusted_proxies`).

A proxy that terminates TLS and passes requests on over plain HTTP hides two facts from us:
the client's address (every request comes from the proxy's) and whether the client used
HTTPS. Without them every client shares one budget of each per-address rate, and the page
cookies lose `Secure` and their `__Host-` names. A proxy tells them in `X-Forwarded-For`
(each proxy appends the address it received the request from) and `X-Forwarded-Proto` (the
scheme the client used).

Those headers are believed only from a connection whose peer is in `trusted_proxies`
(empty by default: nobody's): any client can send them. `X-Forwarded-For` is read from its
right end, where the trusted proxy wrote, leftwards past the addresses of trusted proxies
(a chain of them); the first address that is not one is the client. An entry that is not an
IP address ends the walk at the last trusted hop: whoever wrote it is not to be believed.
`X-Forwarded-Proto` is the scheme the nearest proxy states (its last value).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.web.http_headers import Headers

from mailcore.connlimits import client_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# At most this many X-Forwarded-For entries are read: a chain of proxies is short, and a
# client may send a header of thousands.
MAX_HOPS = 16


def _address(text: str) -> IPAddress | None:
    """An X-Forwarded-For entry as an address: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
    `[2001:db8::1]:4711`; an IPv4-mapped IPv6 address as its IPv4 address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    canonical = client_address(text)  # an IPv4-mapped address as its IPv4 address
    return None if canonical is None else ipaddress.ip_address(canonical)


def trusted(host: str | None, proxies: Sequence[IPNetwork]) -> bool:
    """Whether a peer at `host` is one of the trusted proxies."""
    if not proxies or not host:
        return False
    address = _address(host)
    return address is not None and any(address in network for network in proxies)


def _last_values(headers: Headers, name: bytes, limit: int) -> list[str]:
    """The header's comma-separated values, the last `limit` of them, last first."""
    values: list[str] = []
    for line in reversed(headers.getRawHeaders(name) or []):
        for part in reversed(line.decode("latin-1").split(",")):
            values.append(part)
            if len(values) == limit:
                return values
    return values


def forwarded_client(peer: str, headers: Headers, proxies: Sequence[IPNetwork]) -> str:
    """The client's address of a request from the trusted proxy at `peer` (canonical text)."""
    client = peer
    for entry in _last_values(headers, b"x-forwarded-for", MAX_HOPS):
        address = _address(entry)
        if address is None:
            break
        client = str(address)
        if not any(address in network for network in proxies):
            break
    return client


def forwarded_secure(headers: Headers) -> bool | None:
    """Whether the nearest proxy says the client used HTTPS; None when it says nothing."""
    values = _last_values(headers, b"x-forwarded-proto", 1)
    if not values or not values[0].strip():
        return None
    return values[0].strip().lower() == "https"

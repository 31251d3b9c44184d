"""Concurrent-connection caps of a listener: in total and per client address.

A server factory asks `admit(address)` when a connection arrives and calls
`release(address)` once for every admitted connection when it ends. Addresses are
compared as IP addresses (an IPv4-mapped IPv6 address counts as its IPv4 address), and
IPv6 clients by their /64 (`address_key`): one host gets a whole /64, so counting each
address let one customer take every slot. A connection with no IP address (a UNIX socket)
counts against the total only.
"""

from __future__ import annotations

import functools
import ipaddress

TOO_MANY = "too many connections"
TOO_MANY_FROM_ADDRESS = "too many connections from your address"


def client_address(host: str | None) -> str | None:
    """The client's IP address as canonical text, or None when it has none."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# The IPv6 prefix one client is counted by: a subscriber or a server gets at least a /64.
IPV6_CLIENT_PREFIX = 64


def address_key(address: str | None) -> str | None:
    """What per-address limits count `address` (canonical text, as `client_address` gives
    it) under: itself for IPv4, its /64 network for IPv6 ("2001:db8:1:2::/64")."""
    if address is None or ":" not in address:
        return address
    try:
        network = ipaddress.IPv6Network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False)
    except ValueError:
        return address
    return str(network)


# Peer addresses whose key `peer_key` remembers (the most recently seen).
PEER_KEYS = 4096


@functools.lru_cache(maxsize=PEER_KEYS)
def peer_key(host: str) -> str | None:
    """`address_key(client_address(host))` for a connection's peer address as the socket
    gives it, remembered for the last PEER_KEYS addresses: a client that connects again
    (a sending server opens one connection per message or few) is not parsed again
    (`ipaddress.ip_address` and its text: 3.5-4.6 us of an SMTP connection's CPU). Only for
    the socket's own peer text, which is short: a value from the network (a forwarded-for
    header) could fill the cache with long strings."""
    return address_key(client_address(host))


class ConnectionCounter:
    """Open connections, in total and by client address, against two caps."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}

    def admit(self, address: str | None) -> str | None:
        """Count a new connection in; or, over a cap, say why (and count nothing)."""
        address = address_key(address)
        if self.total >= self.max_total:
            return TOO_MANY
        count = self.by_address.get(address, 0) if address is not None else 0
        if address is not None and count >= self.max_per_address:
            return TOO_MANY_FROM_ADDRESS
        self.total += 1
        if address is not None:
            self.by_address[address] = count + 1
        return None

    def release(self, address: str | None) -> None:
        """Count an admitted connection out."""
        address = address_key(address)
        self.total -= 1
        if address is None:
            return
        count = self.by_address.get(address, 0) - 1
        if count > 0:
            self.by_address[address] = count
        else:
            self.by_address.pop(address, None)

"""Concurrent-connection caps of a listener: in total and per client address.

A server factory asks `admit(address)` when a connection arrives and calls
`release(address)` once for every admitted connection when it ends. Addresses are
compared as IP addresses (an IPv4-mapped IPv6 address counts as its IPv4 address); a
connection with no IP address (a UNIX socket) counts against the total only.
"""

from __future__ import annotations

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


class ConnectionCounter:
    """Open connections, in total and by client address, against two caps."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}

    def admit(self, address: str | None) -> str | None:
        """Count a new connection in; or, over a cap, say why (and count nothing)."""
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
        self.total -= 1
        if address is None:
            return
        count = self.by_address.get(address, 0) - 1
        if count > 0:
            self.by_address[address] = count
        else:
            self.by_address.pop(address, None)

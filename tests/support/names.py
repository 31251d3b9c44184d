"""A name resolver for tests: the reactor's `nameResolver` (IReactorPluggableNameResolver)
answering from a table, at once, and telling which names it was asked."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IResolutionReceiver


class FakeNames:
    """Host name -> addresses (IPv4 or IPv6 text); a name not in the table has none."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def resolveHostName(self, receiver: IResolutionReceiver, host: str, port: int = 0,
                        *args: Any, **kwargs: Any) -> Any:
        self.asked.append(host)
        receiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in self.table.get(host, []):
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, port))
        receiver.resolutionComplete()

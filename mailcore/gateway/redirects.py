"""Which next hops (`redirectTo`, `--redirect-to`) may be set: the delivery policy, early.

A served domain's next hop is refused when it is set (through the API or the CLI, both
through DomainService) if delivery to it would be refused anyway: an IP address, or the
names `localhost` and `*.localhost` (RFC 6761, checked as 127.0.0.1 and ::1), that

- is one of the gateway's own SMTP listeners at that port (the address:port of a listener,
  or any loopback address at the port of a 0.0.0.0/:: listener): mail sent there would
  come back to us and go round until a hop limit stops it;
- or is refused by the operator's network policy, `[queue] allow_loopback`,
  `allow_private`, `allow_networks`, `deny_networks` (by default loopback, link-local and
  private addresses are refused), or lies in `[protecmail] forbidden_redirects`
  (deprecated: the same as `[queue] deny_networks`).

Other host names are accepted here and checked where they are used: the queue checks every
address it connects to after resolution (`mailcore.queue.nexthop`), since DNS can change
after the name was accepted. An IPv4-mapped IPv6 address is checked as the IPv4 address it
maps.
"""

from __future__ import annotations

import ipaddress

from mailcore.queue.nexthop import NextHopPolicy

_LOOPBACK = ("127.0.0.1", "::1")


class RedirectForbidden(Exception):
    """A next hop the operator does not allow, or one of our own listeners."""


class RedirectPolicy:
    """The check of a next hop when it is set, by the queue's NextHopPolicy."""

    def __init__(self, next_hops: NextHopPolicy) -> None:
        self.next_hops = next_hops

    def check(self, host: str, port: int) -> None:
        """Raise RedirectForbidden if `host:port` (an IP address or a name) is refused."""
        try:
            addresses: tuple[str, ...] = (str(ipaddress.ip_address(host)),)
        except ValueError:
            name = host.lower().rstrip(".")
            if name != "localhost" and not name.endswith(".localhost"):
                return
            addresses = _LOOPBACK
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for address in addresses:
            verdict = self.next_hops.verdict(address, port)
            if verdict is None:
                continue
            if verdict.loop:
                raise RedirectForbidden(
                    f"{shown} is this gateway's own SMTP listener: mail sent there would "
                    "loop back to it."
                )
            target = host if address == host else f"{host} ({address})"
            raise RedirectForbidden(
                f"this server does not relay to {target}: {verdict.reason}."
            )

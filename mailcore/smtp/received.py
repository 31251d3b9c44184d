"""The `Received:` trace header field the inbound server prepends to each message it accepts
(RFC 5321 4.4), with the `with` protocol keyword of RFC 3848.

Counting the Received fields a message arrives with (mail loops) is mailcore.smtp.hops'.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import ipaddress
import re

from mailcore.smtp.envelope import Recipient

_HELO_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _helo_name(helo: str) -> str:
    """The client's HELO name as our Received field shows it: a domain, or an IPv4 or IPv6
    address literal; anything else is "unknown". A literal is checked as an address, not
    as RFC 5321's general form (any of "();" and more between the brackets): "[x(]" would
    open a comment (RFC 5322 3.2.2) that hid the rest of our field, the client's address
    and our "by" with it, and a ";" would end its tokens early."""
    if len(helo) > 255:
        return "unknown"
    if helo.startswith("[") and helo.endswith("]"):
        inner = helo[1:-1]
        if "%" in inner:  # (an IPv6 scope, which ipaddress takes with any text after it)
            return "unknown"
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            return "unknown"
        return helo
    return helo if _HELO_DOMAIN.fullmatch(helo) else "unknown"


@functools.lru_cache(maxsize=4096)
def _ip_literal(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    return f"[IPv6:{address.compressed}]" if address.version == 6 else f"[{address}]"


@functools.lru_cache(maxsize=4)
def _rfc5322_date(second: int) -> str:
    """`Sun, 15 Jun 2025 15:06:40 +0000` (cached: a busy second formats its date once)."""
    return email.utils.format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def received_protocol(*, esmtp: bool, tls: bool, authenticated: bool = False) -> str:
    """The `with` keyword of RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA."""
    if not (esmtp or tls or authenticated):
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: tuple[Recipient, ...],
    when: float,
) -> bytes:
    """The trace header we prepend (RFC 5321 4.4), folded, CRLF-terminated, ASCII.

    `for <rcpt>` only when there is a single recipient, so as not to disclose the others.
    A HELO name that is not a domain or an IP address literal is written as "unknown".
    """
    name = _helo_name(helo)
    literal = _ip_literal(client_ip)
    source = f"from {name} ({literal})" if literal else f"from {name}"
    date = _rfc5322_date(int(when))
    lines = [f"Received: {source}", f"\tby {hostname} (Mailcore) with {protocol} id {queue_id}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0].address}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")

"""Delivery status notifications (RFC 3464): the one bounce a failed message gets.

A DSN is `multipart/report; report-type=delivery-status` with three parts: a short text for
people, the `message/delivery-status` fields (one block per failed recipient) and the
original headers as `text/rfc822-headers`. It is sent from the null sender `<>`; a message
whose own sender is `<>` never gets one (RFC 5321 6.1), which keeps bounces from looping.

A failure's detail is often a next hop's reply, which says what it likes: it is quoted
without control characters and folded (RFC 3464 fields may be), so no line of a DSN passes
998 octets (RFC 5322 2.1.1) whatever the peer sent. The `message/delivery-status` part is
ASCII (RFC 3464): a reply's non-ASCII characters are written there in RFC 6533's
`\\x{HHHH}` notation (the text for people has them as they are), and a recipient address
that is not ASCII gets RFC 6533's `utf-8` address type in that notation. Original headers
with 8-bit octets go in a `message/global-headers` part (RFC 6533 6.3), as
`text/rfc822-headers` is ASCII.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from email.utils import formatdate

from mailcore.smtp.fold import ascii_escaped, fold, words

_SMTP_REPLY = re.compile(r"^([2-5])\d\d[ -]")
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_LEADING_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s")


@dataclass(frozen=True)
class Failure:
    """One failed recipient: its address, what went wrong, and where we tried."""

    address: str
    detail: str
    remote_mta: str = ""


def should_bounce(mail_from: str) -> bool:
    """A failed message gets a DSN unless its sender is the null sender."""
    return mail_from.strip() not in ("", "<>")


def status_of(detail: str) -> str:
    """The RFC 3463 status for a failure: the reply's enhanced code, else derived (5.0.0)."""
    lead = _LEADING_ENHANCED.match(detail)
    if lead:
        return "5.{}.{}".format(*lead.groups()[1:])
    if _SMTP_REPLY.match(detail):
        enhanced = _ENHANCED.search(detail[4:40])
        if enhanced:
            return "5.{}.{}".format(*enhanced.groups()[1:])
    return "5.0.0"


def diagnostic_code(detail: str) -> str:
    """The Diagnostic-Code value: `smtp; <reply>` for a reply, else our own type; ASCII."""
    text = ascii_escaped(_clean(detail))
    if _SMTP_REPLY.match(text):
        return f"smtp; {text}"
    return f"X-Mailcore; {text}"


def recipient_field(address: str) -> str:
    """A Final-Recipient value: `rfc822; <address>`, or for an address that is not ASCII
    RFC 6533's `utf-8; <address>` with its non-ASCII characters written `\\x{HHHH}`."""
    clean = _clean(address)
    if clean.isascii():
        return f"rfc822; {clean}"
    return f"utf-8; {ascii_escaped(clean)}"


# The most of a failure's detail a DSN quotes; the runner cuts every result's detail to it, so the
# journal and the store keep no more either.
MAX_DETAIL = 2000


def _clean(value: str) -> str:
    """One header-safe line: no CR/LF that could add fields, no other control character
    (NUL, ESC, DEL, C1: a next hop's reply is quoted as it came), whitespace collapsed.
    It may be long: `fold` breaks it into lines."""
    return " ".join(word for word, _joint in words(value[:MAX_DETAIL]))


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    original_headers: bytes,
    arrival_date: float,
    failures: list[Failure],
    now: float,
) -> bytes:
    """The complete DSN message (headers and body, CRLF line endings)."""
    if not failures:
        raise ValueError("a DSN needs at least one failed recipient")
    host = _clean(reporting_mta) or "localhost"
    boundary = f"={secrets.token_hex(12)}/{host}"
    msgid = f"<{queue_id}.{secrets.token_hex(6)}.dsn@{host}>"
    sender = _clean(original_sender)
    lines: list[str] = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for f in failures:
        lines.append(fold(f"<{_clean(f.address)}>", f.detail[:MAX_DETAIL]))
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
        f"X-Mailcore-Queue-ID: {_clean(queue_id)}",
        f"Arrival-Date: {formatdate(arrival_date)}",
    ]
    for f in failures:
        lines += ["", f"Final-Recipient: {recipient_field(f.address)}", "Action: failed",
                  f"Status: {status_of(f.detail)}"]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(f.remote_mta)}")
        lines += [fold("Diagnostic-Code", diagnostic_code(f.detail)),
                  f"Last-Attempt-Date: {formatdate(now)}"]
    original = original_headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    original = original.rstrip(b"\n").replace(b"\n", b"\r\n")
    headers_type = "text/rfc822-headers" if original.isascii() else "message/global-headers"
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: {headers_type}",
        "",
    ]
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    tail = f"\r\n\r\n--{boundary}--\r\n".encode()
    return head + original + tail

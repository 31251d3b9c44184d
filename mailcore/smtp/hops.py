"""Mail loops: counting the `Received:` header fields of a message, as Postfix's
`hopcount_limit` does.

Every MTA a message passes through prepends one `Received:` field (RFC 5321 4.4), so a
message that carries very many has gone round in a loop (a customer's `redirectTo` pointing
back at the gateway, two relays forwarding to each other). RFC 5321 6.3 describes this way
of detecting loops and suggests a threshold of at least 100; the default here is Postfix's
50 (raise `[smtp] max_hops` for the RFC's figure). The reply is 554 5.4.6 (RFC 3463:
routing loop detected).

The rule, shared by the SMTP server and the queue runner: a message may leave us with at
most `[smtp] max_hops` Received fields in its header section, our own included. The server
counts the client's fields while DATA streams in and refuses the message at its end when
that count plus the one it would add exceeds the limit; the runner bounces a queued message
whose stored header section (which holds our own field already) exceeds it. With the
default of 50 a message that arrives with 49 passes and one that arrives with 50 is
refused. Postfix counts the same fields (its cleanup daemon sees the smtpd's own Received
header too) but refuses when the count reaches `hopcount_limit`; its documentation says
"exceeds", as we do.

Only the header section counts: it ends at the first empty line (RFC 5322 2.1), so the
headers quoted in a DSN or a forwarded message are never counted. Field names are
case-insensitive and may be followed by white space before the colon (RFC 5322 4.5, obsolete
syntax); continuation lines of folded fields (starting with a space or tab) are not fields.
"""

from __future__ import annotations

import re

DEFAULT_MAX_HOPS = 50

# How much of a line's start we keep while waiting for its end: enough to tell whether it
# begins a Received field (a longer line was judged by its first octets already).
_HEAD = 64
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# DATA as the client sends it is dot-stuffed: a line's leading dot is not part of it.
_RECEIVED_STUFFED = re.compile(rb"^\.?received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# The start of a line that may still become a Received field.
_PREFIX = re.compile(rb"received[ \t]*", re.IGNORECASE)
_PREFIX_STUFFED = re.compile(rb"\.?received[ \t]*", re.IGNORECASE)


class ReceivedCounter:
    """Counts Received fields in the header section of a message fed in pieces of any size.

    Work is done only while the header section lasts, in C (one search for the empty line
    and one regular-expression scan per piece); the body is never looked at. With
    `stuffed`, the input is SMTP DATA as sent (one leading dot of each line is ignored, as
    the server removes it).
    """

    __slots__ = ("_carry", "_mid_line", "_pattern", "_prefix", "count", "in_header")

    def __init__(self, *, stuffed: bool = False) -> None:
        self._pattern = _RECEIVED_STUFFED if stuffed else _RECEIVED
        self._prefix = _PREFIX_STUFFED if stuffed else _PREFIX
        self.count = 0
        self.in_header = True
        # The start of the current, unfinished line (at most _HEAD octets), or, once that
        # line was judged (_mid_line), a CR that may be the first half of its CRLF.
        self._carry = b""
        self._mid_line = False

    def feed(self, piece: bytes) -> None:
        """Take the next octets of the message."""
        if not self.in_header or not piece:
            return
        data = self._carry + piece if self._carry else piece
        self._carry = b""
        pos = 0
        if self._mid_line:
            end = data.find(b"\r\n")
            if end < 0:
                self._carry = b"\r" if data.endswith(b"\r") else b""
                return
            pos = end + 2
            self._mid_line = False
        # data[pos:] starts at the start of a line.
        if data.startswith(b"\r\n", pos):
            self.in_header = False
            return
        blank = data.find(b"\r\n\r\n", pos)
        if blank >= 0:
            self.count += len(self._pattern.findall(data, pos, blank + 2))
            self.in_header = False
            return
        last = data.rfind(b"\r\n", pos)
        lines_end = pos if last < 0 else last + 2
        if lines_end > pos:
            self.count += len(self._pattern.findall(data, pos, lines_end))
        rest = data[lines_end:]
        if len(rest) <= _HEAD:
            self._carry = rest
            return
        if self._prefix.fullmatch(rest):
            # "Received" and white space so far: the colon may still come; keep the gist.
            self._carry = b"received "
            return
        # A long unfinished line: its start decides, so judge it now and skip to its end.
        if self._pattern.match(rest):
            self.count += 1
        self._mid_line = True
        self._carry = b"\r" if rest.endswith(b"\r") else b""

    def end(self) -> int:
        """The message is complete: judge a last line that had no CRLF; the final count."""
        if self.in_header and not self._mid_line and self._pattern.match(self._carry):
            self.count += 1
        self.in_header = False
        self._carry = b""
        return self.count


def count_received(message: bytes) -> int:
    """The Received fields in the header section of a whole (unstuffed) message."""
    counter = ReceivedCounter()
    counter.feed(message)
    return counter.end()


def too_many_hops(received: int, max_hops: int) -> str | None:
    """The failure text (enhanced status first) when a message leaving us with `received`
    Received fields would exceed `max_hops`, else None."""
    if received <= max_hops:
        return None
    return f"5.4.6 Too many hops ({received} Received header fields, limit {max_hops})"

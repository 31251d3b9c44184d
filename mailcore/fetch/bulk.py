"""The bulk path of an IMAP sync: replies to pipelined UID FETCH commands, read lean.

Twisted's IMAP4Client reads one command at a time and turns every FETCH reply into nested
lists byte by byte (splitQuoted, collapseStrings): for a 4 KiB message that was most of the
reactor's time. `ReplyReader` cuts the byte stream into replies itself (lines and literals,
bounded as IMAPClient bounds them: line length and literal size), and `parse_fetch_reply`
reads the usual FETCH reply (UID, FLAGS, INTERNALDATE, RFC822.SIZE, MODSEQ, BODY[] or
RFC822) with a few regular expressions (the sync's own reply, in the words Dovecot uses, with
one); any other shape goes to the general parser (`mailcore.fetch.imap.parse_fetch`), so the
outcome is the same either way.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field

from mailcore.fetch.errors import LiteralTooLarge, ProtocolFailed


@dataclass
class Reply:
    """One server reply: its lines (CRLF removed; all but the last end with a `{n}` literal
    announcement) and the literals that follow those lines."""

    lines: list[bytes] = field(default_factory=list)
    literals: list[bytes] = field(default_factory=list)

    def joined(self) -> bytes:
        """The reply as Twisted's reader joins it (each literal after its line's CRLF)."""
        parts = [self.lines[0]]
        for literal, line in zip(self.literals, self.lines[1:], strict=False):
            parts += [b"\r\n", literal, line]
        return b"".join(parts)


def ends_line(data: bytes, before: bytes | bytearray) -> bool:
    """Whether a line can end in `data`, read after `before` (what is held of the line):
    a CRLF in it, or an LF after a CR held. An LF alone ends no IMAP line: "no LF in the
    read" let a server put one in each read to have the whole line joined and searched
    again at every read (a 4 MiB line in 1 KiB reads, each with an LF, 12.8 s)."""
    return b"\r\n" in data or (data[:1] == b"\n" and before[-1:] == b"\r")


class ReplyReader:
    """Cuts received bytes into replies. Raises LiteralTooLarge for a literal over
    `max_literal` (before a byte of it is kept), ProtocolFailed for a line over `max_line`
    or a malformed literal announcement."""

    def __init__(self, *, max_line: int, max_literal: int, host: str) -> None:
        self.max_line = max_line
        self.max_literal = max_literal
        self.host = host
        self._buf = b""
        self._chunks: list[bytes] = []   # received while a literal is still incomplete
        self._have = 0                   # bytes in _buf and _chunks
        self._reply = Reply()
        self._literal: int | None = None  # length of the literal being read
        # When feed raised LiteralTooLarge: the replies it had read whole before it.
        self.read_before_failure: list[Reply] = []

    @property
    def at_boundary(self) -> bool:
        """No reply is half read."""
        return not self._reply.lines and self._literal is None

    def rest(self) -> bytes:
        """The bytes received and not yet part of a reply (call at a boundary)."""
        rest = self._buf + b"".join(self._chunks)
        self._buf, self._chunks, self._have = b"", [], 0
        return rest

    def feed(self, data: bytes) -> list[Reply]:
        if not data:
            # Nothing to read (LineReceiver.resumeProducing passes b""). Kept aside, it was
            # the last piece `ends_line` looks at: a CR before it and an LF after it ended no
            # line until another CRLF came.
            return []
        self._have += len(data)
        if self._literal is not None and self._have < self._literal:
            self._chunks.append(data)  # a literal still incomplete: keep, do not join
            return []
        if self._literal is None and not ends_line(
                data, self._chunks[-1] if self._chunks else self._buf):
            # No line ends in this read: keep it, do not join. Joining and searching the
            # whole line again at each read cost 6 s for a line of 16 MiB read 64 KiB at a
            # time (quadratic in the line's length).
            if self._have > self.max_line + 2:
                raise ProtocolFailed(f"{self.host} sent a line longer than {self.max_line} bytes")
            self._chunks.append(data)
            return []
        if self._chunks:
            self._chunks.append(data)
            data = b"".join(self._chunks)
            self._chunks = []
        buf = self._buf + data if self._buf else data
        out: list[Reply] = []
        pos = 0
        end = len(buf)
        while pos < end:
            if self._literal is not None:
                n = self._literal
                if end - pos < n:
                    break
                self._reply.literals.append(buf[pos : pos + n])
                pos += n
                self._literal = None
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0 or eol - pos > self.max_line:
                if end - pos > self.max_line:
                    raise ProtocolFailed(
                        f"{self.host} sent a line longer than {self.max_line} bytes")
                break
            line = buf[pos:eol]
            pos = eol + 2
            self._reply.lines.append(line)
            if line.endswith(b"}"):
                start = line.rfind(b"{")
                if start >= 0:
                    count = line[start + 1 : -1]
                    if not count.isdigit():
                        raise ProtocolFailed(f"malformed reply from {self.host}: "
                                             f"{_show(line)}")
                    n = int(count)
                    if n > self.max_literal:
                        self.read_before_failure = out
                        raise LiteralTooLarge(
                            f"{self.host} announced a {n}-byte literal, over the limit of "
                            f"{self.max_literal} bytes", announced_uid(self._reply.lines[0])
                        )
                    self._literal = n
                    continue
            out.append(self._reply)
            self._reply = Reply()
        self._buf = buf[pos:]
        self._have = len(self._buf)
        return out


_ANNOUNCED_UID = re.compile(rb"(?:\* )?\d+ FETCH \(.*?\bUID (\d{1,10})\b", re.IGNORECASE)


def announced_uid(line: bytes) -> int | None:
    """The UID a FETCH reply's first line names, if it does (before its first literal)."""
    m = _ANNOUNCED_UID.match(line)
    return int(m.group(1)) if m else None


def _show(data: bytes, limit: int = 120) -> str:
    text = data[:limit].decode("ascii", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("..." if len(data) > limit else "")


_HEAD = re.compile(rb"\* (\d+) FETCH \(", re.IGNORECASE)
# The reply to the sync's UID FETCH as Dovecot words it (its items in the order asked):
# read by this one expression, to what the loop of `parse_fetch_reply` reads of it, in a
# third of the time (the loop cost 11 us a message in the reactor). Anything else (another
# order, other items, lower case, a NIL) goes through the loop.
_USUAL = re.compile(
    rb'\* (\d+) FETCH \(UID (\d+) FLAGS \(([^()"{}]*)\) INTERNALDATE "([^"\\\r\n]*)" '
    rb"RFC822\.SIZE (\d+) BODY\[\] \{\d+\}"
)
_NAME = re.compile(rb"([A-Za-z0-9.]+)(\[[^\]\r\n]*\](?:<\d+>)?)? ")
_ATOM = re.compile(rb"[^\s()\"{}\[\]]+")
_PAREN = re.compile(rb"\(([^()\"{}]*)\)")
_QUOTED = re.compile(rb'"([^"\\\r\n]*)"')
_MONTHS = {m: i for i, m in enumerate(
    (b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV",
     b"DEC"), 1)}
_DATE = re.compile(
    rb"\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-]\d{4})\s*$"
)


# A zone's offset from UTC by its "+hhmm" (a few a mailbox; made once each).
_OFFSETS: dict[bytes, datetime.timedelta] = {}
_DAY = datetime.timedelta(days=1)


def parse_internaldate(value: bytes) -> datetime.datetime | None:
    """An IMAP date-time ("02-Dec-2026 11:38:00 +0100") in UTC, or None if it is not one."""
    m = _DATE.match(value)
    if m is None:
        return None
    day, name, year, hour, minute, second, zone = m.groups()
    month = _MONTHS.get(name.upper())
    if month is None:
        return None
    offset = _OFFSETS.get(zone)
    if offset is None:
        offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[3:]))
        if offset >= _DAY:  # no zone (datetime.timezone refuses it)
            return None
        if zone[0] == 0x2D:  # "-"
            offset = -offset
        if len(_OFFSETS) < 1024:
            _OFFSETS[zone] = offset
    try:
        # The wall-clock time in UTC, less the zone's offset: what astimezone(UTC) gives.
        return datetime.datetime(int(year), month, int(day), int(hour), int(minute),
                                 int(second), tzinfo=datetime.UTC) - offset
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class FetchedValues:
    """What `parse_fetch_reply` found, raw: the caller makes its FetchItem of it."""

    seq: int
    values: dict[str, object]


def parse_fetch_reply(reply: Reply) -> FetchedValues | None:
    """The data items of an untagged `* N FETCH (...)` reply in the usual shape, or None
    when the reply needs the general parser (nested lists, quoted escapes, a literal
    anywhere but as a value, anything unexpected)."""
    lines, literals = reply.lines, reply.literals
    s = lines[0]
    m = _USUAL.fullmatch(s)
    if m is not None and len(lines) == 2 and lines[1] == b")" and len(literals) == 1:
        seq, uid, flags, date, size = m.groups()
        return FetchedValues(int(seq), {"UID": uid, "FLAGS": flags.split(),
                                        "INTERNALDATE": date, "RFC822.SIZE": size,
                                        "BODY[]": literals[0]})
    m = _HEAD.match(s)
    if m is None:
        return None
    seq = int(m.group(1))
    p = m.end()
    seg = 0
    values: dict[str, object] = {}
    while True:
        if p < len(s) and s[p] == 0x29:  # ")": the end of the list, and of the reply
            return FetchedValues(seq, values) if (
                p + 1 == len(s) and seg == len(lines) - 1) else None
        m = _NAME.match(s, p)
        if m is None:
            return None
        name = m.group(1).upper()
        section = m.group(2)
        p = m.end()
        if p >= len(s):
            return None
        c = s[p]
        value: object
        if c == 0x7B:  # "{": a literal, announced at the end of this line
            if s.rfind(b"{") != p or seg >= len(literals):
                return None
            value = literals[seg]
            seg += 1
            s = lines[seg]
            p = 0
        elif c == 0x28:  # "("
            m = _PAREN.match(s, p)
            if m is None:
                return None
            value = m.group(1).split()
            p = m.end()
        elif c == 0x22:  # '"'
            m = _QUOTED.match(s, p)
            if m is None:
                return None
            value = m.group(1)
            p = m.end()
        else:
            m = _ATOM.match(s, p)
            if m is None:
                return None
            value = None if m.group(0).upper() == b"NIL" else m.group(0)
            p = m.end()
        if section is not None:
            if name not in (b"BODY", b"BINARY", b"RFC822"):
                return None
            if section in (b"[]", b"[]<0>"):  # from a later octet: part of the message
                values["BODY[]"] = value
        else:
            values[name.decode("ascii")] = value
        if p < len(s) and s[p] == 0x20:
            p += 1

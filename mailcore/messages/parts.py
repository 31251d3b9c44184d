"""An attachment's bytes cut straight from the raw message, a slice at a time.

The email package builds the whole MIME tree as text to cut one part out: several copies of
the message at once. To serve a large attachment holding about one copy (the raw message
itself), `locate` finds the part's body by byte offsets, following the boundaries as the
email package's parser does (RFC 2046 delimiters, the line break before a delimiter belongs
to it), and `decoded_chunks` undoes its transfer encoding a slice at a time.

Only what decodes cleanly is taken this way: base64 without stray characters or early
padding, quoted-printable, and the identity encodings. `Located.check` (run on the CPU pool)
decodes the whole part once, counting, and compares with the size the index recorded when
the message was stored; anything else (uuencode, message/* parts, malformed structure or
base64, a size that differs) answers None, and the caller falls back to the email package.
After that check, the slices are decoded and re-encoded where the reply is written (the
reactor thread): 48 KiB at a time through binascii, tens of microseconds a slice, with the
transport's backpressure between slices.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailcore.messages.parse import MimeLimits

# Decoded bytes per slice: a multiple of 3, so that each slice's base64 needs no padding.
CHUNK = 48 * 1024
UUENCODE = ("x-uuencode", "uuencode", "uue", "x-uue")
_HEADER_LINE = re.compile(rb"(From |[\041-\071\073-\176]*:|[\t ])")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class NotClean(Exception):
    """The part cannot be decoded a slice at a time exactly as the email package would."""


@dataclass(frozen=True)
class Span:
    """A leaf part's body in the raw message: raw[start:end], in `encoding`."""

    start: int
    end: int
    encoding: str
    content_type: str


def _line_end(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    """(end of the line's content, start of the next line) from `pos`, within `end`."""
    m = _LINE_END.search(raw, pos, end)
    if m is None:
        return end, end
    return m.start(), m.end()


def headers_at(raw: bytes, start: int, end: int) -> tuple[Message, int]:
    """The part's header fields and where its body starts (after the blank line, or at the
    first line that is not a header, as the email package's parser decides)."""
    pos = start
    while pos < end:
        content_end, next_line = _line_end(raw, pos, end)
        if content_end == pos:  # the blank line
            body = next_line
            break
        if not _HEADER_LINE.match(raw, pos, content_end):
            body = pos
            break
        pos = next_line
    else:
        body = end
    header = BytesHeaderParser(policy=compat32).parsebytes(raw[start:body])
    return header, body


def _delimiters(raw: bytes, boundary: bytes, start: int, end: int
                ) -> Iterator[tuple[int, int, bool]]:
    """(line start, next line start, is the close delimiter) of each delimiter line of
    `boundary` within raw[start:end]: `--boundary`, maybe `--`, blanks, line end."""
    marker = b"--" + boundary
    pos = start
    while True:
        at = raw.find(marker, pos, end)
        if at < 0:
            return
        pos = at + len(marker)
        if at != start and raw[at - 1] not in b"\r\n":
            continue
        content_end, next_line = _line_end(raw, pos, end)
        rest = raw[pos:content_end]
        close = rest.startswith(b"--")
        if close:
            rest = rest[2:]
        if rest.strip(b" \t"):
            continue
        yield at, next_line, close
        pos = next_line


def _strip_break(raw: bytes, start: int, end: int) -> int:
    """`end` without the one line break before it (it belongs to the delimiter)."""
    if end - start >= 2 and raw[end - 2:end] == b"\r\n":
        return end - 2
    if end > start and raw[end - 1] in b"\r\n":
        return end - 1
    return end


def children_at(raw: bytes, marker: bytes, body: int, end: int, most: int
              ) -> list[tuple[int, int]]:
    """The spans of the first `most` parts of a multipart whose body is raw[body:end], cut
    as `locate` cuts the one it wants."""
    found: list[tuple[int, int]] = []
    previous: int | None = None
    for line_start, next_line, close in _delimiters(raw, marker, body, end):
        if previous is not None:
            found.append((previous, _strip_break(raw, previous, line_start)))
            if len(found) >= most:
                return found
        if close:
            return found
        previous = next_line
    if previous is not None:
        found.append((previous, end))  # no close delimiter: the last part runs to the end
    return found


Children = dict[tuple[int, int], list[tuple[int, int]]]


def locate(raw: bytes, part_path: str, limits: MimeLimits | None = None,
           cache: Children | None = None) -> Span | None:
    """The body of the leaf part at the IMAP-style `part_path` ("1", "2.1"), numbered as
    `mailcore.messages.parse.walk_parts` numbers them; None when not found or not a leaf.
    `cache` (one per `raw`) keeps the parts of each multipart met, so that locating many
    parts of one message walks each multipart once rather than once per part (a part far
    into the message took a scan of all that comes before it)."""
    limits = limits or MimeLimits()
    steps = part_path.split(".")
    if not all(s.isdigit() and len(s) < 7 and 0 < int(s) <= limits.max_parts for s in steps):
        return None
    start, end, depth = 0, len(raw), 0
    remaining = [int(s) for s in steps]
    while True:
        header, body = headers_at(raw, start, end)
        boundary = header.get_boundary() if header.get_content_maintype() == "multipart" \
            else None
        if boundary is None:
            # A leaf: only "1" names a message that is not a multipart.
            if depth == 0 and remaining == [1]:
                remaining = []
            if remaining:
                return None
            cte = str(header.get("content-transfer-encoding", "")).lower()
            return Span(body, end, cte, header.get_content_type())
        if not remaining or depth >= limits.max_depth:
            return None
        try:
            marker = boundary.encode("ascii")
        except UnicodeEncodeError:
            return None
        wanted = remaining.pop(0)
        # Without a cache, the parts up to the wanted one; with one, all of them, once.
        known = cache.get((body, end)) if cache is not None else None
        if known is None:
            known = children_at(raw, marker, body, end,
                              limits.max_parts if cache is not None else wanted)
            if cache is not None:
                cache[(body, end)] = known
        child = known[wanted - 1] if wanted <= len(known) else None
        if child is None:
            return None
        start, end = child
        depth += 1


def _lines(raw: bytes, span: Span, size: int, whole_lines: bool = True
           ) -> Iterator[memoryview]:
    """raw[span] in slices of about `size` bytes, each ending at a line end when there is
    one (quoted-printable lines stay whole); without `whole_lines`, of `size` bytes (a
    body of one long line is not taken whole: base64 carries what a slice cuts)."""
    view = memoryview(raw)
    pos = span.start
    while pos < span.end:
        cut = min(pos + size, span.end)
        if cut < span.end and whole_lines:
            nl = raw.rfind(b"\n", pos, cut)
            if nl >= pos:
                cut = nl + 1
            else:
                nl = raw.find(b"\n", cut, span.end)
                cut = span.end if nl < 0 else nl + 1
        yield view[pos:cut]
        pos = cut


def decoded_chunks(raw: bytes, span: Span, size: int = CHUNK) -> Iterator[bytes]:
    """The part's decoded bytes in slices; NotClean when they cannot be decoded exactly as
    the email package would (the caller then uses the email package)."""
    encoding = span.encoding
    if span.content_type.startswith("message/"):
        raise NotClean(span.content_type)  # the email package re-serialises these
    if encoding == "quoted-printable":
        for piece in _lines(raw, span, size):
            yield binascii.a2b_qp(piece)
        return
    if encoding in UUENCODE:
        raise NotClean(encoding)
    if encoding != "base64":  # 7bit, 8bit, binary and unknown ones: the bytes as they are
        for piece in _lines(raw, span, size, whole_lines=False):
            yield bytes(piece)
        return
    carry = b""
    for piece in _lines(raw, span, size * 4 // 3, whole_lines=False):
        text = carry + bytes(piece).translate(None, b"\r\n")
        whole = len(text) - len(text) % 4
        carry = text[whole:]
        if not whole:
            continue
        if carry and text[whole - 1:whole] == b"=":
            raise NotClean("base64 padding before the end")
        try:
            yield binascii.a2b_base64(text[:whole], strict_mode=True)
        except binascii.Error as e:
            raise NotClean(str(e)) from None
    if carry:
        try:
            yield binascii.a2b_base64(carry + b"==="[: 4 - len(carry)], strict_mode=True)
        except binascii.Error as e:
            raise NotClean(str(e)) from None


def base64_chunks(raw: bytes, span: Span, size: int = CHUNK) -> Iterator[bytes]:
    """The part's decoded bytes, base64-encoded (no line breaks), a slice at a time."""
    carry = b""
    for piece in decoded_chunks(raw, span, size):
        data = carry + piece if carry else piece
        whole = len(data) - len(data) % 3
        carry = data[whole:]
        if whole:
            yield binascii.b2a_base64(data[:whole], newline=False)
    if carry:
        yield binascii.b2a_base64(carry, newline=False)


@dataclass(frozen=True)
class Located:
    """A part found and checked: its span, and its decoded size."""

    span: Span
    size: int


def check(raw: bytes, part_path: str, expected_size: int,
          limits: MimeLimits | None = None) -> Located | None:
    """The part at `part_path` if it decodes cleanly a slice at a time to `expected_size`
    bytes (what the index recorded); None otherwise. CPU-bound: run it on the CPU pool."""
    span = locate(raw, part_path, limits)
    if span is None:
        return None
    total = 0
    try:
        for piece in decoded_chunks(raw, span):
            total += len(piece)
    except NotClean:
        return None
    return Located(span, total) if total == expected_size else None


@dataclass(frozen=True)
class Hollowed:
    """A message with its larger leaf bodies cut out (`hollow`): `raw` holds `marker`
    followed by the body's number where each body was, and `spans[number]` is that body's
    place in the original message."""

    raw: bytes
    marker: str
    spans: list[tuple[int, int]]


def hollow(raw: bytes, marker: str, least: int, most_parts: int) -> Hollowed:
    """`raw` with the body of each leaf part larger than `least` bytes replaced by a marker
    line (`marker` and a number: ASCII, no colon, so never a header line), following the
    parts as the email package's parser does (`locate`): multiparts by their boundary, and
    message/* parts (but delivery-status, whose body is header blocks) as a message. The
    package reads such a skeleton for a fraction of what the whole message costs it (it
    holds the message several times as text, and each part's payload once more). What the
    package decides differently from this walk shows in where the markers end up
    (`mailcore.mailapi.mime` checks)."""
    cuts: list[tuple[int, int]] = []

    def walk(start: int, end: int, default: str) -> None:
        header, body = headers_at(raw, start, end)
        if default != "text/plain" and "content-type" not in header:
            header.set_default_type(default)
        ctype = header.get_content_type()
        maintype = header.get_content_maintype()
        if maintype == "multipart":
            boundary = header.get_boundary()
            if boundary is None:
                return
            try:
                marker_bytes = boundary.encode("ascii")
            except UnicodeEncodeError:
                return
            child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            for child in children_at(raw, marker_bytes, body, end, most_parts):
                walk(*child, child_default)
            return
        if maintype == "message":
            if ctype != "message/delivery-status" and body < end:
                walk(body, end, "text/plain")
            return
        # The line break that ends the body stays: whether the package counts it as the
        # body's (a message/rfc822 part's last) or not (before a delimiter), it then says.
        end = _strip_break(raw, body, end)
        if end - body > least:
            cuts.append((body, end))

    walk(0, len(raw), "text/plain")
    pieces: list[bytes] = []
    at = 0
    for number, (start, end) in enumerate(cuts):
        pieces += [raw[at:start], f"{marker}{number}".encode("ascii")]
        at = end
    pieces.append(raw[at:])
    return Hollowed(b"".join(pieces) if cuts else raw, marker, cuts)


def holds_line(raw: bytes, prefix: bytes, start: int, end: int) -> bool:
    """Whether a line of raw[start:end] begins with `prefix` (a line begins after CR or LF,
    as the email package's parser splits lines)."""
    pos = start
    while (at := raw.find(prefix, pos, end)) >= 0:
        if at == start or raw[at - 1] in b"\r\n":
            return True
        pos = at + 1
    return False

"""A bounded MIME walker: the leaf parts of a message, decoded, within fixed limits.

Python's `email` parser builds the whole tree with no bound on parts or depth; a hostile
message can make it spend a lot of time and memory. Filters only need the leaves (their
type, file name and decoded bytes) and the top-level header fields, so this walker splits
on boundaries itself and stops at `MimeLimits`: too many parts, nesting too deep, a header
block too large. What it could not walk is reported in `ParsedMessage.problems` so that the
caller can treat "exceeded a limit" as a finding in its own right.

Structure that parsers may read differently is reported apart, in
`ParsedMessage.ambiguities`, each with the symbol the filter scores it under: a multipart
without a usable boundary (missing, none of its lines in the body: MIME_NO_PARTS; longer
than RFC 2046 allows: MIME_LONG_BOUNDARY), a part with two Content-Type,
Content-Transfer-Encoding or Content-Disposition fields (MIME_DUPLICATE_FIELD) and base64
broken by padding too often (MIME_BROKEN_BASE64). Such a part is still walked the way most
readers take it (the boundary decoded from RFC 2231, the first of each field): unlike a
limit, nothing went unread, so these are points towards spam rather than a verdict.

It is plain CPU work on bytes: call it through a CpuPool for large messages.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from typing import NamedTuple

_HEADER_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
_MAX_BOUNDARY = 70  # RFC 2046 5.1.1; a longer one is walked all the same, and noted
_TAIL = rb"(--)?[ \t]*\r?$"  # what may follow "--boundary" on a delimiter line
_DELIMITER_TAIL = re.compile(rb"(?m)" + _TAIL)
_LOOKALIKES = 1000  # lines like a delimiter that are none, before the regex scan
_DECODED = ("base64", "quoted-printable")
_MIN_COPY_BUDGET = 1024 * 1024
_BASE64_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_CHAR = re.compile(b"[" + re.escape(_BASE64_LETTERS) + b"]")
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_LETTERS + b"=")))  # translate deletes
_PAD_RUN = re.compile(b"=+")
_PAD_FREE = 16  # padding breaks in a base64 body decoded chunk by chunk, whatever its size,
_PAD_SPACING = 256  # and one more per this many characters
_BROKEN_BASE64 = (f"base64 broken by padding more often than once in {_PAD_SPACING} "
                  "characters")


@dataclass(frozen=True)
class MimeLimits:
    """Bounds on the walk. Exceeding one is reported, never silently ignored."""

    max_parts: int = 1000
    max_depth: int = 20
    max_header_bytes: int = 256 * 1024
    # Bytes the walk may materialise (leaf bodies, decoded message/rfc822 parts), as a
    # multiple of the message's size (at least 1 MiB): nesting copies nothing, but each
    # encoded message/rfc822 level is decoded anew.
    max_copy_ratio: float = 3.0


class HeaderField(NamedTuple):
    """One header field: name as written, value unfolded and decoded from bytes (UTF-8,
    invalid bytes replaced), and the size in bytes of the field as it appeared.

    A named tuple, as every field of every message makes one: a frozen dataclass took
    1.5 us to make, a third of the walk of a small message's header."""

    name: str
    value: str
    size: int


@dataclass(frozen=True)
class Part:
    """A leaf part: its content type (lower case), file name, transfer encoding, decoded
    body, nesting depth and position (like "2.1": second part, its first subpart)."""

    content_type: str
    filename: str
    encoding: str
    body: bytes
    depth: int
    position: str

    @property
    def label(self) -> str:
        """How a reason names this part: its file name, else its position and type."""
        return self.filename or f"part {self.position or '1'} ({self.content_type})"


@dataclass
class ParsedMessage:
    """The top-level header fields, the leaf parts, and what the walk could not do."""

    headers: list[HeaderField] = field(default_factory=list)
    header_bytes: int = 0
    header_complete: bool = True
    malformed_header_lines: int = 0
    parts: list[Part] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ambiguities: list[tuple[str, str]] = field(default_factory=list)  # (symbol, detail)
    part_count: int = 0
    copied_bytes: int = 0  # leaf bodies and decoded nested messages, in bytes

    def header(self, name: str) -> list[str]:
        """Values of every top-level field called `name` (case-insensitive)."""
        lowered = name.lower()
        return [h.value for h in self.headers if h.name.lower() == lowered]


def parse(message: bytes, limits: MimeLimits | None = None) -> ParsedMessage:
    """Walk `message` within `limits`; never raises on malformed input."""
    limits = limits or MimeLimits()
    result = ParsedMessage()
    head_end, body_start, complete = _header_end(message, 0, len(message),
                                                 limits.max_header_bytes)
    header_block = message[:head_end]
    result.header_bytes = len(header_block)
    result.header_complete = complete
    if not complete:
        result.problems.append(
            f"header block larger than {limits.max_header_bytes} bytes")
    fields, malformed = parse_fields(header_block)
    result.headers = fields
    result.malformed_header_lines = malformed
    if complete:
        budget = max(_MIN_COPY_BUDGET, int(limits.max_copy_ratio * len(message)))
        _Walker(limits, result, budget).entity(
            message, fields, body_start, len(message), 0, "", "text/plain")
    return result


def split_header(data: bytes, limit: int) -> tuple[bytes, bytes, bool]:
    """Split an entity at its first empty line: (header block, body, complete).

    `complete` is False when no empty line appears within `limit` bytes although the entity
    is longer: the header block is then cut at the limit and the body is empty.
    """
    head_end, body_start, complete = _header_end(data, 0, len(data), limit)
    return data[:head_end], data[body_start:], complete


def _header_end(data: bytes, start: int, end: int, limit: int) -> tuple[int, int, bool]:
    """`split_header` of data[start:end] as offsets: (header end, body start, complete)."""
    if data.startswith((b"\r\n", b"\n"), start, end):
        return start, start + (2 if data[start] == 13 else 1), True
    window = min(end, start + limit + 4)
    pos = data.find(b"\r\n\r\n", start, window)
    size = 4
    if pos >= 0:
        # Another separator can only come first within the octets before this one.
        window = pos + 4
    lf = data.find(b"\n\n", start, window)
    if lf >= 0 and (pos < 0 or lf < pos):
        pos, size = lf, 2
    lf = data.find(b"\n\r\n", start, window)
    if lf >= 0 and (pos < 0 or lf < pos):
        pos, size = lf, 3
    if pos >= 0 and pos - start <= limit:
        return pos, pos + size, True
    if end - start <= limit:
        return end, end, True
    return start + limit, end, False


def parse_fields(block: bytes) -> tuple[list[HeaderField], int]:
    """Header fields of a block (unfolded) and the count of lines that are not fields.

    A line's CR before its LF is not removed on its own: `strip` takes it off each value
    line (with the other white space around it), and a line with no colon is malformed
    either way."""
    fields: list[HeaderField] = []
    append = fields.append
    match = _HEADER_NAME.match
    malformed = 0
    name = b""
    value: list[bytes] = []
    size = 0
    for raw in block.split(b"\n"):
        first = raw[:1]
        if first == b" " or first == b"\t":
            if name:
                value.append(raw)
                size += len(raw) + 1
            else:
                malformed += 1
            continue
        if name:
            text = value[0].strip() if len(value) == 1 else b" ".join([v.strip() for v in value])
            append(HeaderField(name.decode("ascii"), text.decode("utf-8", "replace"), size))
            name = b""
        if not raw or raw == b"\r":
            continue
        head, colon, rest = raw.partition(b":")
        head = head.rstrip(b" \t")  # "Subject :" is obsolete syntax but seen
        if not colon or not match(head):
            malformed += 1
            continue
        name, value, size = head, [rest], len(raw) + 1
    if name:
        text = value[0].strip() if len(value) == 1 else b" ".join([v.strip() for v in value])
        append(HeaderField(name.decode("ascii"), text.decode("utf-8", "replace"), size))
    return fields, malformed


_MIME_FIELDS = ("content-type", "content-disposition", "content-transfer-encoding")


def _content_info(
    fields: list[HeaderField], default: str, result: ParsedMessage,
) -> tuple[Message | None, str, str]:
    """A compat32 Message holding the MIME headers (None when there are none: a plain
    message), the content type and the encoding. A MIME field given twice is a problem
    (readers differ on which one counts); the first is used."""
    mime = [f for f in fields if f.name.lower() in _MIME_FIELDS]
    if not mime:
        return None, default, ""
    holder = Message()
    for f in mime:
        if f.name.lower() not in holder:
            holder[f.name] = f.value
        else:
            _ambiguous(result, "MIME_DUPLICATE_FIELD",
                       f"more than one {f.name.title()} field in a MIME part")
    if "content-type" in holder:
        ctype = holder.get_content_type()
        if ctype == "text/plain" and "/" not in holder.get("content-type", ""):
            ctype = default  # a garbled type means the default, as RFC 2045 says
    else:
        ctype = default
    encoding = str(holder.get("content-transfer-encoding", "")).strip().lower()
    return holder, ctype, encoding


class _Walker:
    """One message's walk. Entities are offsets into a buffer (the message, or a decoded
    message/rfc822 part), so that nesting copies nothing; what is materialised counts
    against `budget`, and the walk stops (a problem) once it is spent."""

    def __init__(self, limits: MimeLimits, result: ParsedMessage, budget: int) -> None:
        self.limits = limits
        self.result = result
        self.budget = budget
        self.stopped = False

    def entity(
        self, buf: bytes, fields: list[HeaderField], start: int, end: int, depth: int,
        position: str, default: str,
    ) -> None:
        """Walk the entity whose header `fields` were read and whose body is buf[start:end]
        (which starts at a line start)."""
        limits, result = self.limits, self.result
        if self.stopped:
            return
        result.part_count += 1
        if result.part_count > limits.max_parts:
            _problem(result, f"more than {limits.max_parts} MIME parts")
            return
        holder, ctype, encoding = _content_info(fields, default, result)
        if holder is not None and ctype.startswith("multipart/"):
            if self.multipart(buf, holder, ctype, start, end, depth, position):
                return
            # A multipart that cannot be split is also scanned as one opaque leaf.
        if ctype == "message/rfc822":
            if _too_deep(depth, limits, result):
                return
            if encoding in _DECODED:
                decoded = self.take(buf, start, end, encoding)
                if decoded is None:
                    return
                buf, start, end = decoded, 0, len(decoded)
            inner = self.split_entity(buf, start, end)
            if inner is None:
                return
            inner_fields, body_start = inner
            self.entity(buf, inner_fields, body_start, end, depth + 1, _join(position, 1),
                        "text/plain")
            return
        body = self.take(buf, start, end, encoding)
        if body is None:
            return
        result.parts.append(Part(
            content_type=ctype, filename=_filename(holder), encoding=encoding, body=body,
            depth=depth, position=position,
        ))

    def multipart(
        self, buf: bytes, holder: Message, ctype: str, start: int, end: int, depth: int,
        position: str,
    ) -> bool:
        """Walk a multipart's body parts; False (a problem noted) when it has none to walk,
        so that the caller scans it as one leaf."""
        limits, result = self.limits, self.result
        # get_boundary undoes RFC 2231 (boundary*=, boundary*0*=), which get_param leaves
        # as a tuple.
        boundary = holder.get_boundary()
        if not boundary:
            _ambiguous(result, "MIME_NO_PARTS", f"{ctype} without a boundary")
            return False
        if len(boundary) > _MAX_BOUNDARY:
            _ambiguous(result, "MIME_LONG_BOUNDARY",
                       f"{ctype} boundary longer than {_MAX_BOUNDARY} characters")
        if _too_deep(depth, limits, result):
            return True
        child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        walked = False
        for index, (sub_start, sub_end) in enumerate(
                _split_multipart(buf, start, end, boundary), start=1):
            walked = True
            if self.stopped:
                return True
            if result.part_count >= limits.max_parts:
                _problem(result, f"more than {limits.max_parts} MIME parts")
                return True
            entity = self.split_entity(buf, sub_start, sub_end)
            if entity is None:
                continue
            sub_fields, body_start = entity
            self.entity(buf, sub_fields, body_start, sub_end, depth + 1,
                        _join(position, index), child_default)
        if not walked:
            _ambiguous(result, "MIME_NO_PARTS", f"{ctype} with no body part after its boundary")
        return walked

    def split_entity(
        self, buf: bytes, start: int, end: int,
    ) -> tuple[list[HeaderField], int] | None:
        """The header fields of the nested entity buf[start:end] and where its body
        starts; None (the problem noted) when its header is larger than the limit."""
        limit = self.limits.max_header_bytes
        head_end, body_start, complete = _header_end(buf, start, end, limit)
        if not complete:
            _problem(self.result, f"part header larger than {limit} bytes")
            return None
        fields, _ = parse_fields(buf[start:head_end])
        return fields, body_start

    def take(self, buf: bytes, start: int, end: int, encoding: str) -> bytes | None:
        """buf[start:end] with its transfer encoding undone, counted against the budget;
        None once the budget is spent (the walk stops)."""
        if self.stopped:
            return None
        if encoding in _DECODED:
            data, broken = _decode_range(buf, start, end, encoding)
            if broken:
                _ambiguous(self.result, "MIME_BROKEN_BASE64", _BROKEN_BASE64)
        else:
            data = buf[start:end]
        self.result.copied_bytes += len(data)
        if self.result.copied_bytes > self.budget:
            _problem(self.result, "more bytes decoded than the walk allows "
                     f"({self.limits.max_copy_ratio:g} times the message)")
            self.stopped = True
            return None
        return data


def _too_deep(depth: int, limits: MimeLimits, result: ParsedMessage) -> bool:
    """Whether an entity at `depth` may not have children (the problem is noted)."""
    if depth + 1 > limits.max_depth:
        _problem(result, f"MIME nesting deeper than {limits.max_depth}")
        return True
    return False


def _problem(result: ParsedMessage, text: str) -> None:
    if text not in result.problems:
        result.problems.append(text)


def _ambiguous(result: ParsedMessage, symbol: str, text: str) -> None:
    if (symbol, text) not in result.ambiguities:
        result.ambiguities.append((symbol, text))


def _join(position: str, index: int) -> str:
    return f"{position}.{index}" if position else str(index)


def _split_multipart(
    buf: bytes, start: int, end: int, boundary: str,
) -> Iterator[tuple[int, int]]:
    """The body parts of the multipart body buf[start:end] between `--boundary` lines
    (preamble and epilogue dropped) as (start, end) offsets, lazily.

    Without a closing delimiter the last part runs to the end, as mail readers do.
    """
    part_start: int | None = None
    for line_start, line_end, closing in _delimiters(buf, start, end, boundary):
        if part_start is not None:
            part_end = line_start - 1  # the line feed before the delimiter
            if part_end > part_start and buf[part_end - 1] == 13:  # CR
                part_end -= 1
            yield part_start, max(part_start, part_end)
        if closing:
            return
        part_start = line_end + 1 if line_end < end else end
    if part_start is not None and part_start < end:
        yield part_start, end


def _delimiters(buf: bytes, start: int, end: int, boundary: str) -> Iterator[tuple[int, int, bool]]:
    """Each delimiter line of the multipart body buf[start:end] (which starts at a line
    start): where it starts, where its line ends (before the LF), and whether it closes.

    A plain search for "LF--boundary" costs no regex compilation (a pattern per boundary
    took 0.4 ms, and most messages have their own boundary); once many lines start like a
    delimiter without being one, the rest is scanned by one regex, in C.
    """
    dash = b"--" + boundary.encode("utf-8", "replace")
    tail = _DELIMITER_TAIL.match
    if buf.startswith(dash, start, end) and (found := tail(buf, start + len(dash), end)):
        yield start, found.end(), found.group(1) is not None
    needle = b"\n" + dash
    pos = start
    misses = 0
    while misses < _LOOKALIKES:
        at = buf.find(needle, pos, end)
        if at < 0:
            return
        pos = at + 1
        found = tail(buf, at + len(needle), end)
        if found is None:
            misses += 1
        else:
            yield pos, found.end(), found.group(1) is not None
    pattern = re.compile(b"(?m)\n" + re.escape(dash) + _TAIL)
    for found in pattern.finditer(buf, pos, end):
        yield found.start() + 1, found.end(), found.group(1) is not None


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo the transfer encoding leniently, as mail clients do (base64, quoted-printable)."""
    return _decode_range(body, 0, len(body), encoding)[0]


def _decode_range(buf: bytes, start: int, end: int, encoding: str) -> tuple[bytes, bool]:
    """`decode_body` of buf[start:end], and whether it was base64 broken by padding more
    often than `_decode_base64` follows."""
    if encoding == "base64":
        return _decode_base64(buf, start, end)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(memoryview(buf)[start:end]), False
    return buf[start:end], False


def decode_base64(data: bytes) -> bytes:
    """Base64 with junk characters ignored and broken padding repaired.

    Padding in the middle (chunks encoded separately and glued together, or bytes hidden
    after a premature end) does not end the data: each chunk is decoded on its own.
    """
    return _decode_base64(data, 0, len(data))[0]


def _decode_base64(buf: bytes, start: int, end: int) -> tuple[bytes, bool]:
    """`decode_base64` of buf[start:end], and whether padding broke it in the middle more
    often than once per `_PAD_SPACING` characters (past `_PAD_FREE` breaks): the rest is
    then decoded as one chunk, its "=" ignored, so that the work stays linear and in C."""
    first = buf.find(b"=", start, end)
    if first < 0 or _BASE64_CHAR.search(buf, first, end) is None:
        # No data after padding: binascii skips junk characters itself.
        try:
            return binascii.a2b_base64(memoryview(buf)[start:end]), False
        except binascii.Error:
            pass  # broken padding: cleaned and repaired below
    cleaned = buf[start:end].translate(None, _NOT_BASE64).rstrip(b"=")
    allowed = _PAD_FREE + len(cleaned) // _PAD_SPACING
    chunks = []
    pos = 0
    for count, run in enumerate(_PAD_RUN.finditer(cleaned)):
        if count == allowed:
            chunks.append(_decode_chunk(cleaned[pos:].replace(b"=", b"")))
            return b"".join(chunks), True
        chunks.append(_decode_chunk(cleaned[pos:run.start()]))
        pos = run.end()
    chunks.append(_decode_chunk(cleaned[pos:]))
    return b"".join(chunks), False


def _decode_chunk(chunk: bytes) -> bytes:
    """Base64 letters (no padding, no junk) decoded, the padding they lack supplied and a
    lone trailing letter (six bits, no octet) dropped."""
    extra = len(chunk) % 4
    if extra == 1:
        chunk = chunk[:-1]
    elif extra:
        chunk += b"=" * (4 - extra)
    return binascii.a2b_base64(chunk)


# A file name is kept to its last MAX_FILENAME characters, an ellipsis in front when cut:
# its end is what a mail client keeps when it shortens a name to save it (the extension),
# and what the dangerous-attachment check reads. Only the last MAX_RAW_FILENAME characters
# of the raw name are decoded: email.header.decode_header takes time quadratic in its input
# (0.4 s for one 248 KB field of encoded words, a part header's limit), and a name that
# fills a filesystem's 255 octets is under 1,200 characters even in Q-encoded words.
MAX_FILENAME = 1024
MAX_RAW_FILENAME = 4096


def _filename(holder: Message | None) -> str:
    """The part's file name (Content-Disposition filename, else Content-Type name; RFC 2231
    and RFC 2047 encodings undone), its end kept when it is long (MAX_FILENAME)."""
    if holder is None:
        return ""
    raw = holder.get_filename()
    if not raw:
        return ""
    text = str(raw)
    cut = len(text) > MAX_RAW_FILENAME
    if cut:
        text = text[-MAX_RAW_FILENAME:]  # a word cut in two stays undecoded, in front
    name = decode_words(text).strip()
    if cut or len(name) > MAX_FILENAME:
        name = "\u2026" + name[-(MAX_FILENAME - 1):]
    return name


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words (`=?utf-8?b?...?=`); text without them is unchanged."""
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text

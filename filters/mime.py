"""A bounded MIME walker: the leaf parts of a message, decoded, within fixed limits.

Python's `email` parser builds the whole tree with no bound on parts or depth; a hostile
message can make it spend a lot of time and memory. Filters only need the leaves (their
type, file name and decoded bytes) and the top-level header fields, so this walker splits
on boundaries itself and stops at `MimeLimits`: too many parts, nesting too deep, a header
block too large. What it could not walk is reported in `ParsedMessage.problems` so that the
caller can treat "exceeded a limit" as a finding in its own right.

Structure that parsers may read differently is a problem too: a multipart without a usable
boundary (missing, none of its lines in the body, longer than RFC 2046 allows) and a part with
two Content-Type, Content-Transfer-Encoding or Content-Disposition fields. Such a part is
still walked the way most readers take it (the boundary decoded from RFC 2231, the first of
each field), but the caller is told.

It is plain CPU work on bytes: call it through a CpuPool for large messages.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message

_HEADER_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
_MAX_BOUNDARY = 70  # RFC 2046 5.1.1; a longer one is walked all the same, and noted


@dataclass(frozen=True)
class MimeLimits:
    """Bounds on the walk. Exceeding one is reported, never silently ignored."""

    max_parts: int = 1000
    max_depth: int = 20
    max_header_bytes: int = 256 * 1024


@dataclass(frozen=True)
class HeaderField:
    """One header field: name as written, value unfolded and decoded from bytes (UTF-8,
    invalid bytes replaced), and the size in bytes of the field as it appeared."""

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
    part_count: int = 0

    def header(self, name: str) -> list[str]:
        """Values of every top-level field called `name` (case-insensitive)."""
        lowered = name.lower()
        return [h.value for h in self.headers if h.name.lower() == lowered]


def parse(message: bytes, limits: MimeLimits | None = None) -> ParsedMessage:
    """Walk `message` within `limits`; never raises on malformed input."""
    limits = limits or MimeLimits()
    result = ParsedMessage()
    header_block, body, complete = split_header(message, limits.max_header_bytes)
    result.header_bytes = len(header_block)
    result.header_complete = complete
    if not complete:
        result.problems.append(
            f"header block larger than {limits.max_header_bytes} bytes")
    fields, malformed = parse_fields(header_block)
    result.headers = fields
    result.malformed_header_lines = malformed
    if complete:
        _walk_entity(fields, body, 0, "", limits, result)
    return result


def split_header(data: bytes, limit: int) -> tuple[bytes, bytes, bool]:
    """Split an entity at its first empty line: (header block, body, complete).

    `complete` is False when no empty line appears within `limit` bytes although the entity
    is longer: the header block is then cut at the limit and the body is empty.
    """
    if data.startswith((b"\r\n", b"\n")):
        return b"", data[2:] if data.startswith(b"\r\n") else data[1:], True
    window = data[: limit + 4]
    crlf = window.find(b"\r\n\r\n")
    if crlf >= 0:
        # Another separator can only come first within the octets before this one.
        window = window[: crlf + 4]
    candidates = [
        (pos, sep) for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n")
        if (pos := window.find(sep)) >= 0
    ]
    if candidates:
        pos, sep = min(candidates)
        if pos <= limit:
            return data[:pos], data[pos + len(sep):], True
    if len(data) <= limit:
        return data, b"", True
    return data[:limit], b"", False


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
            _problem(result, f"more than one {f.name.title()} field in a MIME part")
    if "content-type" in holder:
        ctype = holder.get_content_type()
        if ctype == "text/plain" and "/" not in holder.get("content-type", ""):
            ctype = default  # a garbled type means the default, as RFC 2045 says
    else:
        ctype = default
    encoding = str(holder.get("content-transfer-encoding", "")).strip().lower()
    return holder, ctype, encoding


def _walk_entity(
    fields: list[HeaderField], body: bytes, depth: int, position: str,
    limits: MimeLimits, result: ParsedMessage, default: str = "text/plain",
) -> None:
    result.part_count += 1
    if result.part_count > limits.max_parts:
        _problem(result, f"more than {limits.max_parts} MIME parts")
        return
    holder, ctype, encoding = _content_info(fields, default, result)
    if holder is not None and ctype.startswith("multipart/"):
        # get_boundary undoes RFC 2231 (boundary*=, boundary*0*=), which get_param leaves
        # as a tuple.
        boundary = holder.get_boundary()
        if not boundary:
            _problem(result, f"{ctype} without a boundary")
        else:
            if len(boundary) > _MAX_BOUNDARY:
                _problem(result, f"{ctype} boundary longer than {_MAX_BOUNDARY} characters")
            if _too_deep(depth, limits, result):
                return
            child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            walked = False
            for index, sub in enumerate(_split_multipart(body, boundary), start=1):
                walked = True
                if result.part_count >= limits.max_parts:
                    _problem(result, f"more than {limits.max_parts} MIME parts")
                    return
                entity = _split_entity(sub, limits, result)
                if entity is None:
                    continue
                sub_fields, sub_body = entity
                _walk_entity(sub_fields, sub_body, depth + 1, _join(position, index),
                             limits, result, child_default)
            if walked:
                return
            _problem(result, f"{ctype} with no body part after its boundary")
        # A multipart that cannot be split is also scanned as one opaque leaf.
    decoded = decode_body(body, encoding)
    if ctype == "message/rfc822":
        if _too_deep(depth, limits, result):
            return
        entity = _split_entity(decoded, limits, result)
        if entity is None:
            return
        inner_fields, inner_body = entity
        _walk_entity(inner_fields, inner_body, depth + 1, _join(position, 1), limits, result)
        return
    result.parts.append(Part(
        content_type=ctype, filename=_filename(holder), encoding=encoding, body=decoded,
        depth=depth, position=position,
    ))


def _too_deep(depth: int, limits: MimeLimits, result: ParsedMessage) -> bool:
    """Whether an entity at `depth` may not have children (the problem is noted)."""
    if depth + 1 > limits.max_depth:
        _problem(result, f"MIME nesting deeper than {limits.max_depth}")
        return True
    return False


def _split_entity(
    raw: bytes, limits: MimeLimits, result: ParsedMessage
) -> tuple[list[HeaderField], bytes] | None:
    """The header fields and body of a nested entity; None (the problem noted) when its
    header is larger than the limit."""
    header_block, body, complete = split_header(raw, limits.max_header_bytes)
    if not complete:
        _problem(result, f"part header larger than {limits.max_header_bytes} bytes")
        return None
    fields, _ = parse_fields(header_block)
    return fields, body


def _problem(result: ParsedMessage, text: str) -> None:
    if text not in result.problems:
        result.problems.append(text)


def _join(position: str, index: int) -> str:
    return f"{position}.{index}" if position else str(index)


def _split_multipart(body: bytes, boundary: str) -> Iterator[bytes]:
    """The body parts between `--boundary` lines (preamble and epilogue dropped), lazily.

    Without a closing delimiter the last part runs to the end, as mail readers do.
    """
    delimiter = re.compile(
        rb"(?m)^--" + re.escape(boundary.encode("utf-8", "replace")) + rb"(--)?[ \t]*\r?$")
    start: int | None = None
    for match in delimiter.finditer(body):
        if start is not None:
            end = match.start()
            if body[end - 2:end] == b"\r\n":
                end -= 2
            elif body[end - 1:end] == b"\n":
                end -= 1
            yield body[start:max(start, end)]
        if match.group(1):
            return
        nl = body.find(b"\n", match.end())
        start = len(body) if nl < 0 else nl + 1
    if start is not None and start < len(body):
        yield body[start:]


def decode_body(body: bytes, encoding: str) -> bytes:
    """Undo the transfer encoding leniently, as mail clients do (base64, quoted-printable)."""
    if encoding == "base64":
        return decode_base64(body)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def decode_base64(data: bytes) -> bytes:
    """Base64 with junk characters ignored and broken padding repaired.

    Padding in the middle (chunks encoded separately and glued together, or bytes hidden
    after a premature end) does not end the data: each chunk is decoded on its own.
    """
    body = data.rstrip(b" \t\r\n=")
    if b"=" in body:
        return b"".join(decode_base64(chunk) for chunk in body.split(b"=") if chunk.strip())
    try:
        return binascii.a2b_base64(data)  # skips junk characters itself
    except binascii.Error:
        pass  # broken padding: clean up and repair below
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4] if len(cleaned) % 4 == 1 else cleaned
    cleaned += b"=" * (-len(cleaned) % 4)
    try:
        return binascii.a2b_base64(cleaned)
    except binascii.Error:
        return b""


def _filename(holder: Message | None) -> str:
    """The part's file name (Content-Disposition filename, else Content-Type name; RFC 2231
    and RFC 2047 encodings undone)."""
    if holder is None:
        return ""
    raw = holder.get_filename()
    if not raw:
        return ""
    return decode_words(str(raw)).strip()[:1024]


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words (`=?utf-8?b?...?=`); text without them is unchanged."""
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text

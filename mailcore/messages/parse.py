"""Parsing a raw message into the fields the store indexes, with bounds against hostile MIME.

Pure functions on bytes, safe to run on the CpuPool. The raw bytes are never changed: parsing
only reads them. Headers are decoded once here (RFC 2047 encoded-words, RFC 2231 parameters,
8-bit headers as UTF-8 or Windows-1252), bodies are decoded from their transfer encoding and
charset. A message that breaks a bound (header block size, number of parts, nesting depth) is
still stored; what could not be parsed is listed in `problems`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.utils
import hashlib
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from email.parser import BytesFeedParser
from email.policy import Policy, compat32

from mailcore.messages.headerblock import blank_line, header_fields
from mailcore.text import storable

# Transfer and charset decoding of a whole body is bounded by the message size, which the
# fetch engine bounds; these bound the work and storage for structure and for indexed text.
MAX_HEADER_BYTES = 256 * 1024
MAX_PARTS = 1000
MAX_DEPTH = 20
MAX_MULTIPARTS = 100
MAX_BODY_CHARS = 2 * 1024 * 1024
# The most UTF-8 bytes of a header's text that goes into a btree index (a Message-ID, a
# reference, a thread's subject key). PostgreSQL refuses an index entry over 2,704 bytes,
# the whole batch with it: 998 characters of 4 bytes each made 3,944. Every ASCII value
# within the character bounds (998 for an id, 2,000 for a subject key) is within this.
MAX_INDEXED_BYTES = 2000


@dataclass(frozen=True)
class MimeLimits:
    """Bounds on what parsing one message may cost."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_parts: int = MAX_PARTS
    max_depth: int = MAX_DEPTH
    max_multiparts: int = MAX_MULTIPARTS
    max_body_chars: int = MAX_BODY_CHARS


@dataclass(frozen=True)
class AttachmentInfo:
    """One attachment: where it sits in the MIME tree and what it is."""

    part_path: str
    filename: str
    mime_type: str
    size: int
    content_id: str | None = None


@dataclass
class ParsedMessage:
    """The indexed view of one raw message."""

    sha256: str
    size: int
    message_id: str = ""
    subject: str = ""
    sender: str = ""
    sender_address: str = ""
    recipient: str = ""
    cc: str = ""
    date: datetime.datetime | None = None
    body_text: str = ""
    body_html: str = ""
    headers: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    has_attachments: bool = False
    attachments: list[AttachmentInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def thread_refs(self) -> list[str]:
        """Message-IDs this message points at, oldest first, without duplicates."""
        refs = dict.fromkeys(self.references)  # in order, each once
        refs[self.in_reply_to] = None
        refs.pop("", None)
        refs.pop(self.message_id, None)
        return list(refs)


def sha256_hex(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def indexed_text(value: str, max_bytes: int = MAX_INDEXED_BYTES) -> str:
    """`value` cut to at most `max_bytes` bytes of UTF-8, on a character boundary: what an
    indexed column holds of it, and what a lookup of it compares with."""
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return value
    cut = max_bytes
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte: back to the lead
        cut -= 1
    return data[:cut].decode("utf-8", "surrogatepass")


# -- text decoding -----------------------------------------------------------------------

_CHARSET_ALIASES = {"x-unknown": "windows-1252", "unknown-8bit": "windows-1252"}


def _codec(charset: str | None) -> str | None:
    """A Python codec name for a MIME charset, or None when unknown."""
    if not charset:
        return None
    name = charset.strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Bytes in a declared charset to str; unknown or ASCII labels try UTF-8, then cp1252,
    as do labels of codecs that are no text encoding ("hex", "zlib", "rot13": str.decode
    refuses them) or that take no `errors="replace"` ("idna"). Never raises: the label is
    the sender's, and one such encoded word in a Subject made the whole message
    unreadable."""
    codec = _codec(charset)
    if codec is not None and codec != "ascii":
        if codec == "iso8859-1":
            # Mail labelled Latin-1 is very often Windows-1252 (curly quotes, euro sign).
            codec = "windows-1252"
        try:
            return data.decode(codec, errors="replace")
        except (LookupError, UnicodeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("windows-1252", errors="replace")


_ESCAPED_8BIT = re.compile("[\udc80-\udcff]")


def _fix_8bit(value: str) -> str:
    """Header text with raw 8-bit bytes (surrogate-escaped by the parser) made readable."""
    if _ESCAPED_8BIT.search(value):
        return decode_bytes(value.encode("ascii", "surrogateescape"), None)
    return value


_ENCODED_WORD = re.compile(
    r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=",
)
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(?==\?)")


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, text = match.group(1), match.group(2).lower(), match.group(3)
    try:
        if encoding == "b":
            pad = (-len(text)) % 4
            data = base64.b64decode(text + "=" * pad)
        else:
            data = quopri.decodestring(text.replace("_", " ").encode("ascii"), header=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return match.group(0)
    return decode_bytes(data, charset)


def decode_header_value(value: str | None) -> str:
    """A header value unfolded, with RFC 2047 encoded-words and 8-bit bytes decoded."""
    if value is None:
        return ""
    text = _fix_8bit(str(value))
    text = re.sub(r"\r?\n[ \t]", " ", text).replace("\r", "").replace("\n", "")
    if "=?" in text:
        text = _BETWEEN_WORDS.sub(r"\1", text)
        text = _ENCODED_WORD.sub(_decode_word, text)
    return text.strip()


# One address in the plainest forms, `Some Name <local@domain>` or `local@domain`: plain
# words of ASCII letters and digits, a dot-atom local part and a domain of labels.
_PLAIN_ADDRESS = re.compile(
    r"[ \t]*(?:((?:[A-Za-z0-9]+[ \t]+)*[A-Za-z0-9]+)[ \t]*<([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>|([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))[ \t]*"
)


def _plain_address(values: list[str]) -> tuple[str, str] | None:
    """`_addresses` of a header holding one address in a plain form, without the email
    package's general address parser (the usual From and To); None for anything else."""
    if len(values) != 1:
        return None
    m = _PLAIN_ADDRESS.fullmatch(values[0])
    if m is None:
        return None
    name, addr, bare = m.groups()
    if bare is not None:
        return bare, bare.lower()
    name = " ".join(name.split())
    return f"{name} <{addr}>", addr.lower()


def _addresses(values: list[str]) -> tuple[str, str]:
    """(display text, first bare address) of address headers, names decoded."""
    plain = _plain_address(values)
    return plain if plain is not None else _parsed_addresses(values)


def _parsed_addresses(values: list[str]) -> tuple[str, str]:
    """`_addresses` through the email package's address parser (any form)."""
    shown: list[str] = []
    first = ""
    raw = [_fix_8bit(v) for v in values]
    for name, addr in email.utils.getaddresses(raw):
        name = decode_header_value(name)
        if not first and addr:
            first = addr.lower()
        if name and addr:
            shown.append(f"{name} <{addr}>")
        elif addr:
            shown.append(addr)
        elif name:
            shown.append(name)
    return ", ".join(shown), first


_MSGID = re.compile(r"<[^<>\s]+>")


def _msgids(value: str | None) -> list[str]:
    if not value:
        return []
    return _MSGID.findall(_fix_8bit(str(value)))


def _first_msgid(value: str | None) -> str:
    ids = _msgids(value)
    if ids:
        return ids[0][:998]
    text = (str(value) if value else "").strip()
    return text[:998]


def _date(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(_fix_8bit(str(value)).strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    try:
        return parsed.astimezone(datetime.UTC)
    except (OverflowError, ValueError):
        return None


_SUBJECT_PREFIX = re.compile(
    r"^\s*((re|fwd?|aw|sv|vs|antw|tr|wg|rif|r)\s*(\[\d+\]|\(\d+\))?\s*:\s*)+", re.IGNORECASE
)
_LIST_TAG = re.compile(r"^\s*\[[^\]]{1,40}\]\s*")


def subject_key(subject: str) -> tuple[str, bool]:
    """The subject normalised for threading, and whether it was marked as a reply/forward."""
    text = subject
    is_reply = False
    for _ in range(10):
        stripped = _LIST_TAG.sub("", text, count=1)
        m = _SUBJECT_PREFIX.match(stripped)
        if m:
            is_reply = True
            stripped = stripped[m.end():]
        if stripped == text:
            break
        text = stripped
    return " ".join(text.lower().split()), is_reply


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.IGNORECASE | re.DOTALL)


def html_to_text(html: str) -> str:
    """Rough text of an HTML body, for the search index only."""
    import html as _html

    return " ".join(_html.unescape(_TAG.sub(" ", html)).split())


# -- structure ---------------------------------------------------------------------------

_MULTIPART_LINE = re.compile(rb"(?im)^content-type:[ \t]*multipart/")
_CONTENT_TYPE_LINE = re.compile(rb"(?im)^content-type:")


def _header_block_end(raw: bytes, limit: int) -> int | None:
    """Offset where the top-level header block ends, or None if it is longer than `limit`."""
    span = blank_line(raw, limit + 4)
    if span is None:
        return None if len(raw) > limit else len(raw)
    return span[0]


def _payload_bytes(part: Message) -> bytes:
    """The decoded content of a leaf part (transfer encoding undone)."""
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _filename(part: Message) -> str:
    names = f"{part.get('content-disposition', '')} {part.get('content-type', '')}"
    if "name" not in names.lower():
        return ""  # neither filename= nor name= (nor their RFC 2231 pieces): nothing to read
    try:
        name = part.get_filename()
    except (LookupError, UnicodeError, ValueError, TypeError):
        name = None
    if not name:
        try:
            name = part.get_param("name")  # type: ignore[assignment]
        except (LookupError, UnicodeError, ValueError, TypeError):
            name = None
        if isinstance(name, tuple):
            name = email.utils.collapse_rfc2231_value(name)
    if not name or not isinstance(name, str):
        return ""
    return decode_header_value(name)[:1024]


def _is_attachment(part: Message, filename: str) -> bool:
    disposition = (part.get_content_disposition() or "").lower()
    if disposition == "attachment" or filename:
        return True
    maintype = part.get_content_maintype()
    return maintype not in ("text", "multipart")


def walk_parts(
    msg: Message, limits: MimeLimits, problems: list[str]
) -> list[tuple[str, Message]]:
    """Leaf parts with IMAP-style part paths ("1", "2.1"), bounded in count and depth."""
    out: list[tuple[str, Message]] = []
    stack: list[tuple[str, Message, int]] = [("", msg, 0)]
    seen = 0
    while stack:
        path, part, depth = stack.pop()
        seen += 1
        if seen > limits.max_parts:
            problems.append(f"more than {limits.max_parts} MIME parts; the rest not indexed")
            break
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            if depth >= limits.max_depth:
                problems.append(f"MIME nesting deeper than {limits.max_depth}; not indexed")
                continue
            children = part.get_payload()
            if not isinstance(children, list):
                continue
            prefix = f"{path}." if path else ""
            for i in range(len(children) - 1, -1, -1):
                child = children[i]
                if isinstance(child, Message):
                    stack.append((f"{prefix}{i + 1}", child, depth + 1))
            continue
        out.append((path or "1", part))
    return out


def _parse_tree(raw: bytes, limits: MimeLimits, problems: list[str]) -> Message:
    """The email package's tree for `raw`, or a headers-only tree when a bound is broken."""
    return _tree(raw, _header_block_end(raw, limits.max_header_bytes), limits, problems)


def _tree(raw: bytes, end: int | None, limits: MimeLimits, problems: list[str]) -> Message:
    """`_parse_tree` with the end of the header block known (None: over the bound)."""
    if end is None:
        problems.append(f"header block over {limits.max_header_bytes} bytes; truncated")
        cut = raw.rfind(b"\n", 0, limits.max_header_bytes)
        return message_from_bytes(raw[: max(cut, 0)] + b"\n\n")
    # Each bound below counts "Content-Type:" lines: a message with fewer such strings in
    # all than either bound cannot break it, and most messages have one or two (the scan
    # for lines is some 40 us on a 4 KiB message, the count of strings 3 us).
    lines = raw.lower().count(b"content-type:")
    if lines + 1 <= limits.max_multiparts and lines <= limits.max_parts * 2:
        pass
    elif len(_MULTIPART_LINE.findall(raw, end)) + 1 > limits.max_multiparts:
        problems.append(f"more than {limits.max_multiparts} multipart containers; not parsed")
        return message_from_bytes(raw[:end] + b"\n\n")
    if lines > limits.max_parts * 2 and \
            len(_CONTENT_TYPE_LINE.findall(raw)) > limits.max_parts * 2:
        problems.append(f"more than {limits.max_parts} MIME parts; not parsed")
        return message_from_bytes(raw[:end] + b"\n\n")
    # A part needs no Content-Type line (an empty header block will do), but each needs a
    # line of its own starting "--": with more of those than the bound, the parts are counted.
    if raw.count(b"\n--") + raw.count(b"\r--") > limits.max_parts * 2 and parts_over(
        raw, end, limits.max_parts * 2
    ):
        problems.append(f"more than {limits.max_parts} MIME parts; not parsed")
        return message_from_bytes(raw[:end] + b"\n\n")
    try:
        return _single_part(raw) or message_from_bytes(raw)
    except (RecursionError, ValueError, LookupError, TypeError) as e:
        problems.append(f"MIME structure unreadable ({type(e).__name__}); headers only")
        return message_from_bytes(raw[:end] + b"\n\n")


class _TooManyParts(Exception):
    """The email package's parser built more parts than `parts_over` allows."""


def parts_over(raw: bytes, end: int, bound: int) -> bool:
    """Whether the email package's tree of `raw` holds more than `bound` parts (messages
    included). Its parser is fed slice by slice and stopped at the part over the bound, so
    no more than `bound` parts are ever built; a top level that is no container (not
    multipart/*, not message/*) has no parts to build."""
    if message_from_bytes(raw[:end] + b"\n\n").get_content_maintype() not in (
        "multipart", "message"
    ):
        return False
    built = -1  # the parser calls its factory once to try its arguments

    def counted(policy: Policy = compat32) -> Message:
        nonlocal built
        built += 1
        if built > bound:
            raise _TooManyParts
        return Message(policy)

    parser = BytesFeedParser(_factory=counted)
    try:
        for start in range(0, len(raw), 65536):
            parser.feed(raw[start : start + 65536])
        parser.close()
    except _TooManyParts:
        return True
    except (RecursionError, ValueError, LookupError, TypeError):
        return False  # the parse proper meets it too, and says so
    return False


def _single_part(raw: bytes) -> Message | None:
    """The email package's tree of a message whose top level is one leaf (not multipart/*,
    not message/*), built without its parser: the header fields are read by
    `headerblock.header_fields` and stored as the parser stores them, then the body is set
    as the payload, as the parser sets it (the rest of the message, decoded as ASCII with
    surrogate escapes). None when the full parser is needed: no blank line ends the headers,
    the parser would read them another way (`header_fields` says None), or the top level is
    a container."""
    span = blank_line(raw)
    if span is None:
        return None
    fields = header_fields(raw[: span[1]])
    if fields is None:
        return None
    msg = Message()
    for name, value in fields:
        msg.set_raw(name, value)
    if msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(raw[span[1] :].decode("ascii", "surrogateescape"))
    return msg


def _all_headers(msg: Message, name: str) -> list[str]:
    """Raw values (8-bit bytes surrogate-escaped) of every `name` header of `msg`."""
    wanted = name.lower()
    return [str(v) for k, v in msg.raw_items() if k.lower() == wanted]


def _header(msg: Message, name: str) -> str | None:
    values = _all_headers(msg, name)
    return values[0] if values else None


def _headers_by_name(msg: Message) -> dict[str, list[str]]:
    """Every header of `msg` by lower-case name (raw values, in order): one pass."""
    out: dict[str, list[str]] = {}
    for k, v in msg.raw_items():
        out.setdefault(k.lower(), []).append(str(v))
    return out


def parse_message(raw: bytes, limits: MimeLimits | None = None) -> ParsedMessage:
    """Every indexed field of one raw message. Never raises on bad input; CPU-bound.

    Whatever the email package raises on hostile input that the bounds and the handlers
    below do not foresee, the message is kept with its raw header block only and the
    exception named in `problems`: one message must never fail the batch it came in."""
    limits = limits or MimeLimits()
    try:
        return _parse_message(raw, limits)
    except Exception as e:
        end = _header_block_end(raw, limits.max_header_bytes)
        result = ParsedMessage(
            sha256=sha256_hex(raw), size=len(raw),
            headers=decode_bytes(raw[: end if end is not None else limits.max_header_bytes],
                                 None),
            problems=[f"message unreadable ({type(e).__name__}); raw headers only"],
        )
        _storable_text(result)
        return result


def _fields(result: ParsedMessage, name: str, values: list[str]) -> tuple[str, str]:
    """`_addresses` of one address header, ("", "") with a problem recorded when the email
    package's address parser fails on it: its comment and quoted-string parsers recurse
    once per nested "(", so a From of 2,000 "(" overflowed the stack."""
    try:
        return _addresses(values)
    except (RecursionError, ValueError, LookupError, TypeError, IndexError) as e:
        result.problems.append(f"{name} header unreadable ({type(e).__name__}); left empty")
        return "", ""


def _parse_message(raw: bytes, limits: MimeLimits) -> ParsedMessage:
    problems: list[str] = []
    end = _header_block_end(raw, limits.max_header_bytes)
    msg = _tree(raw, end, limits, problems)
    result = ParsedMessage(sha256=sha256_hex(raw), size=len(raw), problems=problems)

    header_bytes = raw[: end if end is not None else limits.max_header_bytes]
    result.headers = decode_bytes(header_bytes, None)

    headers = _headers_by_name(msg)

    def first(name: str) -> str | None:
        values = headers.get(name)
        return values[0] if values else None

    result.message_id = _first_msgid(first("message-id"))
    result.subject = decode_header_value(first("subject"))[:4096]
    result.sender, result.sender_address = _fields(result, "From", headers.get("from", []))
    result.sender_address = result.sender_address[:320]
    result.recipient, _ = _fields(result, "To", headers.get("to", []))
    result.cc, _ = _fields(result, "Cc", headers.get("cc", []))
    result.date = _date(first("date"))
    in_reply_to = first("in-reply-to")
    result.in_reply_to = _first_msgid(in_reply_to) if _msgids(in_reply_to) else ""
    result.references = [r[:998] for r in _msgids(first("references"))][-200:]

    for path, part in walk_parts(msg, limits, problems):
        try:
            _index_part(result, path, part, limits)
        except (LookupError, UnicodeError, ValueError, TypeError, AssertionError,
                RecursionError) as e:
            problems.append(f"part {path} unreadable ({type(e).__name__})")
    result.has_attachments = bool(result.attachments)
    _storable_text(result)
    _indexed_ids(result)
    return result


def _indexed_ids(result: ParsedMessage) -> None:
    """The Message-IDs (own, In-Reply-To, References) cut to what their indexes hold
    (`indexed_text`), after `_storable_text` (its U+FFFD for a NUL is 3 bytes): threading
    compares the cut values, so a long id still finds its thread."""
    result.message_id = indexed_text(result.message_id)
    result.in_reply_to = indexed_text(result.in_reply_to)
    if any(len(r) * 4 > MAX_INDEXED_BYTES for r in result.references):
        result.references = [indexed_text(r) for r in result.references]


def parse_messages(raws: list[bytes], limits: MimeLimits | None = None) -> list[ParsedMessage]:
    """`parse_message` of each; a module-level function, so that a worker process can run
    it (`CpuPool.run_in_process`)."""
    return [parse_message(raw, limits) for raw in raws]


_TEXT_FIELDS = ("message_id", "subject", "sender", "sender_address", "recipient", "cc",
                "body_text", "body_html", "headers", "in_reply_to")


def _storable_text(result: ParsedMessage) -> None:
    """NUL (from a body, an encoded word or a file name) and lone surrogates become U+FFFD
    in every indexed text (`text.storable`): PostgreSQL's text columns refuse NUL, so one
    such message failed the whole batch of a backup. Lists are rebuilt only when a value
    changes (the usual message is left as it is)."""
    for name in _TEXT_FIELDS:
        setattr(result, name, storable(getattr(result, name)))
    references = [storable(r) for r in result.references]
    if references != result.references:
        result.references = references
    for i, a in enumerate(result.attachments):
        cid = None if a.content_id is None else storable(a.content_id)
        name, media = storable(a.filename), storable(a.mime_type)
        if (name, media, cid) != (a.filename, a.mime_type, a.content_id):
            result.attachments[i] = AttachmentInfo(a.part_path, name, media, a.size, cid)


def _index_part(result: ParsedMessage, path: str, part: Message, limits: MimeLimits) -> None:
    content_type = part.get_content_type()
    filename = _filename(part)
    if content_type == "message/rfc822" or _is_attachment(part, filename):
        if content_type == "message/rfc822":
            size = _attached_message_size(result, path, part, limits)
        else:
            size = len(_payload_bytes(part))
        cid = _header(part, "Content-ID")
        result.attachments.append(
            AttachmentInfo(
                part_path=path,
                filename=filename,
                mime_type=content_type[:255],
                size=size,
                content_id=cid.strip()[:998] if cid else None,
            )
        )
        return
    if content_type == "text/plain" and not result.body_text:
        result.body_text = decode_bytes(_payload_bytes(part), part.get_content_charset())[
            : limits.max_body_chars
        ]
    elif content_type == "text/html" and not result.body_html:
        result.body_html = decode_bytes(_payload_bytes(part), part.get_content_charset())[
            : limits.max_body_chars
        ]


def _nesting(msg: Message, bound: int) -> int:
    """How deep the parts below `msg` nest (attached messages and multiparts), counted
    without recursion and only up to `bound` + 1."""
    deepest = 0
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > bound:
            break
        children = part.get_payload()
        if isinstance(children, list):
            stack.extend((c, depth + 1) for c in children if isinstance(c, Message))
    return deepest


def _attached_message_size(result: ParsedMessage, path: str, part: Message,
                           limits: MimeLimits) -> int:
    """The size of the message a message/rfc822 part holds, as the email package writes it
    out; 0, with a problem recorded, when it nests deeper than `limits.max_depth`: writing
    it out recurses once per level (400 levels overflowed the stack)."""
    inner = part.get_payload()
    inner_msg = inner[0] if isinstance(inner, list) and inner else None
    if not isinstance(inner_msg, Message):
        return 0
    if _nesting(inner_msg, limits.max_depth) > limits.max_depth:
        result.problems.append(
            f"part {path}: attached message nested deeper than {limits.max_depth}; "
            "its size not known"
        )
        return 0
    return len(inner_msg.as_bytes())


def extract_part(raw: bytes, part_path: str, limits: MimeLimits | None = None) -> bytes | None:
    """The decoded content of the leaf part at `part_path`, or None. CPU-bound.

    An attached message is written out by the email package, which recurses once per level:
    one nested deeper than `limits.max_depth` (listed with size 0 by `parse_message`) is
    its bytes as they stand in `raw` instead, cut by `mailcore.messages.parts.locate`."""
    for _, content in extract_parts(raw, [part_path], limits):
        return content
    return None


def extract_parts(raw: bytes, part_paths: Iterable[str], limits: MimeLimits | None = None
                  ) -> Iterator[tuple[str, bytes | None]]:
    """(part path, decoded content) of each leaf part of `part_paths` found, as
    `extract_part` cuts it, from one parse of the message, one part at a time. CPU-bound.
    (Parsing the message once per part cost its whole parse a thousand times over for a
    message of a thousand attached messages.)"""
    limits = limits or MimeLimits()
    wanted = set(part_paths)
    problems: list[str] = []
    msg = _parse_tree(raw, limits, problems)
    for path, part in walk_parts(msg, limits, problems):
        if path not in wanted:
            continue
        wanted.discard(path)
        yield path, _content(raw, path, part, limits)
        if not wanted:
            return


def _content(raw: bytes, part_path: str, part: Message, limits: MimeLimits) -> bytes | None:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            if _nesting(inner[0], limits.max_depth) > limits.max_depth:
                return _raw_part(raw, part_path, limits)
            return inner[0].as_bytes()
        return b""
    return _payload_bytes(part)


def _raw_part(raw: bytes, part_path: str, limits: MimeLimits) -> bytes | None:
    """The body of the part at `part_path` as it stands in `raw` (no transfer decoding),
    found by byte offsets without building its tree; None when it cannot be found so."""
    from mailcore.messages.parts import locate  # it builds on this module

    span = locate(raw, part_path, limits)
    return None if span is None else raw[span.start:span.end]


def search_extra(parsed: ParsedMessage) -> str:
    """The indexed text beyond the plain-text body (`messages.search_extra`): the HTML
    body's text and the attachments' file names; "" for the usual plain-text message."""
    html = html_to_text(parsed.body_html) if parsed.body_html else ""
    names = " ".join(a.filename for a in parsed.attachments if a.filename)
    return storable(f"{html}\n{names}".strip())


def search_document(parsed: ParsedMessage) -> tuple[str, str, str, str]:
    """(subject, sender, recipient, body) as indexed for full-text search (PostgreSQL; the
    SQLite index reads the same text from the message row's columns)."""
    recipient = f"{parsed.recipient} {parsed.cc}".strip()
    body = f"{parsed.body_text}\n{search_extra(parsed)}".strip()
    return parsed.subject, parsed.sender, recipient, body

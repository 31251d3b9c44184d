"""Messages in and out of the Mail API (blocking: run on a thread pool).

In: a received message is parsed with Python's `email` package; header fields come back
decoded (RFC 2047) and the body is the first text/plain part (else text/html, else empty).
Attachments are the parts `iter_attachments` names, with their decoded bytes. The package
has no bounds of its own and a message may be as large as the SMTP server takes (50 MB), so
what it is given is bounded first (`MimeBounds`): a header section over 256 KiB is read up
to that size only; a field over 16 KiB is decoded by a plain RFC 2047 decoder instead of the
package's header parser (whose time and memory grow with the square of a field's encoded
words: a 256 KiB Subject took 2 GB), and a part's field (its Content-Type or
Content-Disposition) is cut to 16 KiB before that parser reads it (a 64 KiB file name took
143 MiB); a message with more than a million lines (the parser keeps an object per line:
a 50 MB quoted-printable body of soft line breaks took 1.3 GB), 2,000 parts or 100
multipart and message/rfc822 parts (nesting deep enough for a RecursionError) has its
header fields read and no body or attachments taken out: it is still delivered, the
message as received stored whole.

Within them, the package reads the message with the bodies of its leaf parts over 8 KiB cut
out (`mailcore.messages.parts.hollow`: a marker in their place), and those bodies are then
decoded from the message itself, a slice at a time: an attachment straight into its file
(`Attachment.chunks`), the text body up to its bound. Read whole, the package held the
message as text (twice its size with one 8-bit octet), as lines, each part's payload once
more and its decoded bytes: 411 MB for a 53 MB message with one base64 attachment, 539 MB
for one line of 52 MB; a few such deliveries at once took a small node's memory. A body
that does not decode cleanly so (base64 with stray characters, uuencode) is decoded by the
package, that part alone (`Attachment.whole`). The text body is stored up to
`max_body_chars` (1 Mi characters: an inbox mail's body, in the database and in every reply
that shows the mail, was as large as the message, 50 MB); a longer text is cut there and
the whole part is added as an attachment (`body.txt`, `body.html`), so nothing is lost.

Out: `build_message` makes the message a mail is sent as, with the `email` package: header
fields from checked values (no Bcc field; From, To, Cc and Reply-To with the display names
and groups the client wrote, quoted or RFC 2047-encoded as they need), Date, Message-ID,
the body as text/plain, and each attachment as a base64 part of a multipart/mixed. An
attachment's bytes are read from its file a chunk at a time and encoded as they are read,
so the message is the only copy held in memory.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import copy
import itertools
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.parser import BytesHeaderParser, BytesParser
from email.policy import EmailPolicy
from email.utils import formatdate, make_msgid
from io import BytesIO
from typing import Any, BinaryIO, cast

from mailcore.emailpolicy import SMTP, HeaderClasses, filename_breaks
from mailcore.mailapi.addresses import header_text
from mailcore.mailapi.files import file_name
from mailcore.messages.parse import decode_bytes, decode_header_value, parts_over
from mailcore.messages.parts import (
    NotClean,
    Span,
    children_at,
    decoded_chunks,
    headers_at,
    holds_line,
    hollow,
)
from mailcore.text import has_control, storable

# Base64 of 57 bytes is one 76-character line (RFC 2045 §6.8); a chunk is whole lines.
_LINE = 57
_CHUNK = _LINE * 1024


class Attachment:
    """An attachment of a received message: its name, type, and decoded bytes, which
    `chunks` yields a slice at a time from the message (NotClean when they do not decode
    that way exactly as the email package decodes them: `whole` then does). An attached
    message (message/rfc822: mail forwarded as an attachment) is its bytes as they stand
    in the message (`_encapsulated`), else as the email package writes it out."""

    def __init__(self, name: str, content_type: str, raw: bytes, part: MIMEPart,
                 span: tuple[int, int] | None) -> None:
        self.name = name
        self.content_type = content_type
        self._raw = raw
        self._part = part
        self._span = span

    def chunks(self) -> Iterator[bytes]:
        if self._span is None:
            yield self.whole()
            return
        span = _span(self._part, self._span)
        if span.content_type.startswith("message/"):
            # An attached message's bytes as they stand (decoded_chunks leaves message/*
            # parts to the package, which writes them out anew), its transfer encoding
            # undone when it has one.
            span = Span(span.start, span.end, span.encoding, "application/octet-stream")
        yield from decoded_chunks(self._raw, span)

    def whole(self) -> bytes:
        """The decoded bytes at once, by the email package."""
        part = _payload(self._raw, self._part, self._span)
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload
        inner = part.get_payload()
        if isinstance(inner, list) and len(inner) == 1 and isinstance(inner[0], EmailMessage):
            return inner[0].as_bytes()  # an attached message found nowhere in `raw`
        return b""

    @property
    def data(self) -> bytes:
        try:
            return b"".join(self.chunks())
        except NotClean:
            return self.whole()


@dataclass
class Parsed:
    mail_from: str = ""
    to: str = ""
    cc: str = ""
    reply_to: str = ""
    subject: str = ""
    body: str = ""
    attachments: list[Attachment] = field(default_factory=list)


@dataclass(frozen=True)
class MimeBounds:
    """What `parse_message` hands the `email` package (see the module docstring)."""

    max_header_bytes: int = 256 * 1024
    max_field_bytes: int = 16 * 1024
    max_lines: int = 1_000_000
    max_delimiters: int = 2_000
    max_containers: int = 100
    hollow_above: int = 8 * 1024
    max_body_chars: int = 1024 * 1024


class _Received(EmailPolicy):
    """The default policy (mailcore.emailpolicy.DEFAULT) for received mail: a field read
    through the header parser (a part's Content-Type and Content-Disposition as well as the
    message's own fields) is cut to `max_field_bytes` first. The parser's time and memory
    grow with the square of a field's RFC 2047 words: a 64 KiB file name took 143 MiB."""

    max_field_bytes = 16 * 1024

    def header_fetch_parse(self, name: str, value: str) -> str:
        return super().header_fetch_parse(name, value[:self.max_field_bytes])


_RECEIVED = _Received(header_factory=HeaderClasses())


_CONTAINER = re.compile(rb"(?im)^content-type:[ \t]*(?:multipart|message)/")


def _header_end(raw: bytes, limit: int) -> int | None:
    """Where the header section ends (after its empty line, or the end of `raw`); None
    when it is larger than `limit`."""
    ends = [i + n for i, n in ((raw.find(b"\n\n", 0, limit + 2), 2),
                               (raw.find(b"\n\r\n", 0, limit + 3), 3)) if i >= 0]
    if ends:
        return min(ends)
    return len(raw) if len(raw) <= limit else None


def _walkable(raw: bytes, head_end: int, bounds: MimeBounds) -> bool:
    """Whether the `email` package may parse `raw` whole (counts, no copies; with more
    lines like a delimiter than the bound, which text such as an SQL file's comments may
    have, the parts the package builds are counted, up to the bound)."""
    if raw.count(b"\n") > bounds.max_lines:
        return False
    for count, _ in enumerate(_CONTAINER.finditer(raw), 1):
        if count > bounds.max_containers:
            return False
    return not (raw.count(b"\n--") > bounds.max_delimiters
                and parts_over(raw, head_end, bounds.max_delimiters))


def _header(message: EmailMessage, name: str, max_bytes: int) -> str:
    try:
        raw = next((v for k, v in message.raw_items() if k.lower() == name.lower()), None)
        if raw is None:
            return ""
        # The package's header parser takes time and memory with the square of a long
        # field's encoded words; a long one is decoded plainly.
        value = str(message.get(name)) if len(raw) <= max_bytes else decode_header_value(raw)
    except Exception:  # a malformed field: keep the rest of the message
        return ""
    return storable(" ".join(value.split()))


def parse_message(raw: bytes, bounds: MimeBounds | None = None) -> Parsed:
    """The API's view of `raw`; a part that cannot be decoded is left out, never an error.
    A message past `bounds` gives its header fields only (the module docstring)."""
    bounds = bounds or MimeBounds()
    head_end = _header_end(raw, bounds.max_header_bytes)
    whole = head_end is not None and _walkable(raw, head_end, bounds)
    received: EmailPolicy = cast(Any, _RECEIVED).clone(max_field_bytes=bounds.max_field_bytes)
    spans: dict[int, tuple[int, int]] = {}
    if whole:
        message, spans = _read_hollowed(raw, received, bounds)
    else:
        head = raw[:head_end] if head_end is not None else raw[:bounds.max_header_bytes]
        if head_end is None:
            head = head[:head.rfind(b"\n") + 1]  # whole lines only
        header = BytesHeaderParser(policy=received).parsebytes(head)
        assert isinstance(header, EmailMessage)
        message = header
    limit = bounds.max_field_bytes
    parsed = Parsed(
        mail_from=_header(message, "From", limit), to=_header(message, "To", limit),
        cc=_header(message, "Cc", limit), reply_to=_header(message, "Reply-To", limit),
        subject=_header(message, "Subject", limit),
    )
    if not whole:
        return parsed
    part = None
    try:
        part = message.get_body(preferencelist=("plain", "html"))
        if part is not None:
            parsed.body, cut = _body_text(raw, part, spans.get(id(part)), bounds.max_body_chars)
            if cut:  # the whole text as an attachment: nothing of it is lost
                kind = "html" if part.get_content_subtype() == "html" else "txt"
                name = file_name(_filename(part), f"body.{kind}")
                parsed.attachments.append(Attachment(
                    name, _text_type(part)[:255], raw, part, spans.get(id(part))))
    except Exception:
        parsed.body = ""
    try:
        found = list(_attached(message, part))
        attached = _encapsulated(raw, message) if any(
            a.get_content_maintype() == "message" for a in found) else {}
        if spans and any(a.is_multipart() and id(a) not in attached for a in found
                         if a.get_content_maintype() == "message"):
            # An attached message not found in `raw`: the package writes it out, which it
            # can only do from the whole message (this one holds markers in its bodies).
            message = _read_whole(raw, received)
            part = message.get_body(preferencelist=("plain", "html"))
            spans, found = {}, list(_attached(message, part))
            attached = _encapsulated(raw, message)
        for index, attachment in enumerate(found, 1):
            name = file_name(_filename(attachment), f"attachment-{index}")
            parsed.attachments.append(Attachment(
                name, attachment.get_content_type()[:255], raw, attachment,
                spans.get(id(attachment)) or attached.get(id(attachment))))
    except Exception:
        return parsed  # a broken MIME structure: what was read so far (all is in `raw`)
    return parsed


def _attached(container: MIMEPart, body: MIMEPart | None) -> Iterator[MIMEPart]:
    """The parts `container.iter_attachments` names, but a multipart among them (the signed
    part of an S/MIME or PGP/MIME signed mail, a mixed part within a mixed one) given as
    its own: its text, unless it is the mail's `body`, then its attachments, each so. The
    package names such a part as one attachment, and it has no bytes of its own: the files
    of every signed mail were one empty attachment, `multipart/mixed`."""
    if container.get_content_maintype() == "message" and container.is_multipart():
        # A message that is itself an attached one (Content-Type: message/rfc822 at its
        # top): that message is its attachment (iter_attachments names nothing in it).
        yield container
        return
    for part in container.iter_attachments():
        if part.get_content_maintype() != "multipart":
            yield part
            continue
        text = part.get_body(preferencelist=("plain", "html"))
        if text is not None and text is not body:
            yield text
        yield from _attached(part, body)


def _filename(part: MIMEPart) -> str | None:
    """The file name a part came with, as a column stores it."""
    name = part.get_filename()
    return storable(name) if name else None


def _encapsulated(raw: bytes, message: EmailMessage) -> dict[int, tuple[int, int]]:
    """Where the body of each message/* part the package made a message of (an attached
    message) stands in `raw`, by the part's id: the raw message's parts followed along the
    package's tree (mailcore.messages.parts, as `hollow` follows them); a multipart whose
    parts do not match the package's in number or type is not followed. The package
    itself gives such a part no bytes (get_payload(decode=True) is None): a mail forwarded
    as an attachment was stored as an empty file."""
    found: dict[int, tuple[int, int]] = {}

    def walk(part: Any, start: int, end: int) -> None:
        header, body = headers_at(raw, start, end)
        if "content-type" in header and header.get_content_type() != part.get_content_type():
            return
        payload = part.get_payload()
        if not isinstance(payload, list):
            return
        if part.get_content_maintype() == "message":
            found[id(part)] = (body, end)
            if len(payload) == 1 and body < end:
                walk(payload[0], body, end)
            return
        boundary = header.get_boundary()
        if part.get_content_maintype() != "multipart" or boundary is None:
            return
        try:
            marker = boundary.encode("ascii")
        except UnicodeEncodeError:
            return
        children = children_at(raw, marker, body, end, len(payload) + 1)
        if len(children) == len(payload):
            for child, (child_start, child_end) in zip(payload, children, strict=True):
                walk(child, child_start, child_end)

    # A part the walk cannot read leaves those found so far; the package writes the rest.
    with contextlib.suppress(Exception):
        walk(message, 0, len(raw))
    return found


def _read_hollowed(raw: bytes, policy: EmailPolicy, bounds: MimeBounds
                   ) -> tuple[EmailMessage, dict[int, tuple[int, int]]]:
    """The message as the email package reads it, with the bodies of its larger leaf parts
    left in `raw` (`mailcore.messages.parts.hollow`): the package reads the skeleton, and
    each such part's body is then known by its place in `raw` (by the part's id). The
    package would read the whole message the same way unless a body cut out holds a line
    that starts a delimiter of one of its multiparts: then (and whenever a marker is not
    where the walk put it) it reads the whole message, as it always did."""
    nonce = "=mailcore-hollow-" + secrets.token_hex(12) + "-"
    hollowed = hollow(raw, nonce, bounds.hollow_above, bounds.max_delimiters)
    message = BytesParser(policy=policy).parsebytes(hollowed.raw)
    assert isinstance(message, EmailMessage)
    if not hollowed.spans:
        return message, {}
    spans: dict[int, tuple[int, int]] = {}
    boundaries: set[bytes] = set()
    for part in message.walk():
        if part.is_multipart():
            boundary = part.get_boundary()
            if boundary is not None:
                # (as the package matches lines: ASCII, other octets as surrogates; one
                # it decoded to other characters matches no line)
                with contextlib.suppress(UnicodeEncodeError):
                    boundaries.add(b"--" + boundary.encode("ascii", "surrogateescape"))
            continue
        payload = part.get_payload()  # the text the package read (undecoded)
        if not isinstance(payload, str) or nonce not in payload:
            continue
        found = _MARKED.fullmatch(payload[len(nonce):]) if payload.startswith(nonce) else None
        if found is None or int(found[1]) >= len(hollowed.spans):
            return _read_whole(raw, policy), {}
        start, end = hollowed.spans[int(found[1])]
        suffix = found[2].encode("ascii")
        if raw[end:end + len(suffix)] != suffix:
            return _read_whole(raw, policy), {}
        spans[id(part)] = (start, end + len(suffix))
    if len(spans) != len(hollowed.spans) or any(
            holds_line(raw, b, start, end) for b in boundaries
            for start, end in hollowed.spans):
        return _read_whole(raw, policy), {}
    return message, spans


# A marker's number, and the line break the package left after it (that of the last part
# of a message/rfc822 part: the email package strips none there).
_MARKED = re.compile(r"([0-9]{1,9})(\r\n|\n|\r|)")


def _read_whole(raw: bytes, policy: EmailPolicy) -> EmailMessage:
    message = BytesParser(policy=policy).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def _span(part: MIMEPart, span: tuple[int, int]) -> Span:
    cte = str(part.get("content-transfer-encoding", "")).lower()
    return Span(span[0], span[1], cte, part.get_content_type())


def _payload(raw: bytes, part: MIMEPart, span: tuple[int, int] | None) -> MIMEPart:
    """`part` with its payload back as the package would have read it (a copy of the part,
    so that the message keeps its skeleton)."""
    if span is None:
        return part
    whole = copy.copy(part)
    whole.set_payload(raw[span[0]:span[1]].decode("ascii", "surrogateescape"))
    return whole


def _text_type(part: MIMEPart) -> str:
    charset = part.get_param("charset")
    ctype = part.get_content_type()
    return f"{ctype}; charset={charset}" if isinstance(charset, str) and charset.isascii() \
        and not has_control(charset) else ctype


def _body_text(raw: bytes, part: MIMEPart, span: tuple[int, int] | None, most: int
               ) -> tuple[str, bool]:
    """The text of the body part (as `get_content` decodes it, CRLF made LF, storable) and
    whether it was cut to `most` characters. A part left in `raw` is decoded a slice at a
    time up to a little more than `most` characters (its charset decoded incrementally
    gives the same text as decoded at once)."""
    if span is not None:
        try:
            return _text_from(raw, part, span, most)
        except NotClean:
            pass
    whole = _payload(raw, part, span)
    try:
        content = whole.get_content()
    except LookupError:
        # A charset Python does not know ("unknown-8bit", a misspelt one): read as IMAP2API
        # reads it (UTF-8, else Windows-1252) rather than dropping the text.
        data = whole.get_payload(decode=True)
        data = data if isinstance(data, bytes) else b""
        content = decode_bytes(data, str(part.get_param("charset", "")))
    if not isinstance(content, str):
        return "", False
    text = storable(content.replace("\r\n", "\n"))
    return (text[:most], True) if len(text) > most else (text, False)


def _text_from(raw: bytes, part: MIMEPart, span: tuple[int, int], most: int
               ) -> tuple[str, bool]:
    charset = part.get_param("charset", "ASCII")
    try:
        if not getattr(codecs.lookup(cast(str, charset)), "_is_text_encoding", True):
            raise LookupError(charset)  # "hex", "base64": no text comes out of them
        decoder = codecs.getincrementaldecoder(cast(str, charset))(errors="replace")
    except (LookupError, TypeError):
        raise NotClean(f"charset {charset!r}") from None  # read whole, by _body_text
    pieces: list[str] = []
    held = 0
    cr = ""  # a CR that ended the last piece: maybe half of a CRLF
    for chunk in itertools.chain(decoded_chunks(raw, _span(part, span)), [None]):
        piece = cr + (decoder.decode(chunk) if chunk is not None
                      else decoder.decode(b"", final=True))
        cr = "\r" if chunk is not None and piece.endswith("\r") else ""
        piece = piece[:-1] if cr else piece
        piece = piece.replace("\r\n", "\n")
        pieces.append(piece)
        held += len(piece)
        if held > most:  # what follows changes none of the first `most`
            return storable("".join(pieces)[:most]), True
    return storable("".join(pieces)), False


@dataclass(frozen=True)
class OutgoingPart:
    """An attachment to send: its name, type, and how to open its bytes."""

    name: str
    content_type: str
    open: Callable[[], BinaryIO]


def build_message(values: dict[str, str], attachments: Sequence[OutgoingPart],
                  hostname: str, now: float) -> bytes:
    """The message as it goes out (see the module docstring): `values` are a mail's checked
    fields (mailcore.mailapi.mail: `from` the bare address, `from_name` its display name,
    `to`, `cc` and `reply-to` as the client wrote them)."""
    message = EmailMessage(policy=SMTP)
    name = values.get("from_name", "")
    local, _, domain = values["from"].rpartition("@")
    # The display name the client gave, quoted or RFC 2047-encoded as it needs (it holds
    # no control character: the field was refused with one).
    message["From"] = Address(name, local, domain) if name else values["from"]
    # To, Cc and Reply-To as the client wrote them: each address's display name and the
    # groups they are in, the addresses in their stored form (the envelope's recipients
    # are the bare addresses). A field written blank is left out. Set as text, the field
    # is parsed and folded once for all messages that repeat it (emailpolicy.Outgoing).
    for key, header in (("to", "To"), ("cc", "Cc"), ("reply-to", "Reply-To")):
        written = header_text(values.get(key, ""), key)
        if written:
            message[header] = written
    message["Subject"] = values.get("subject", "")
    message["Date"] = formatdate(now, usegmt=True)
    message["Message-ID"] = make_msgid(domain=hostname)
    content = values.get("body", "") or ""
    if not attachments:
        message.set_content(content)
        return message.as_bytes(policy=SMTP)
    text = EmailMessage(policy=SMTP)
    text.set_content(content)
    body = _part_bytes(text, content.endswith("\n"))
    boundary = "=_" + secrets.token_hex(16)
    while boundary.encode() in body:  # pragma: no cover - 128 random bits
        boundary = "=_" + secrets.token_hex(16)
    message["MIME-Version"] = "1.0"
    message["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    delimiter = b"\r\n--" + boundary.encode("ascii")
    out = BytesIO()
    out.write(_head(message))
    out.write(b"This is a multi-part message in MIME format." + delimiter + b"\r\n")
    out.write(body)
    for attachment in attachments:
        out.write(delimiter + b"\r\n")
        out.write(_head(_attachment_head(attachment)))
        with attachment.open() as source:
            _write_base64(source, out)
    out.write(delimiter + b"--\r\n")
    return out.getvalue()


def _head(message: EmailMessage) -> bytes:
    """The header section of `message` and the empty line that ends it."""
    return b"".join(SMTP.fold_binary(k, v) for k, v in message.items()) + b"\r\n"


def _part_bytes(part: EmailMessage, ends_in_newline: bool) -> bytes:
    """The part as it goes before a boundary delimiter, whose leading CRLF belongs to the
    delimiter (RFC 2046 5.1.1): the CRLF `set_content` ends the text with is dropped,
    unless the text ended in a line break of its own."""
    del part["MIME-Version"]  # only the message as a whole carries it
    data = part.as_bytes(policy=SMTP)
    return data[:-2] if data.endswith(b"\r\n") and not ends_in_newline else data


def _attachment_head(attachment: OutgoingPart) -> EmailMessage:
    """The header fields of an attachment's part (its payload is written separately)."""
    maintype, _, subtype = attachment.content_type.partition("/")
    if not maintype or not subtype or has_control(attachment.content_type) \
            or maintype.lower() in ("multipart", "message"):
        maintype, subtype = "application", "octet-stream"
    # A name whose RFC 2047 words decode to a line break would end the part's header
    # (uploads refuse it; a name kept from before is not sent).
    name = "attachment" if filename_breaks(attachment.name) else attachment.name
    head = EmailMessage(policy=SMTP)
    try:
        head.set_content(b"", maintype, subtype, filename=name)
    except (ValueError, TypeError):
        head = EmailMessage(policy=SMTP)
        head.set_content(b"", "application", "octet-stream", filename=name)
    del head["MIME-Version"]
    return head


def _write_base64(source: BinaryIO, out: BytesIO) -> None:
    """`source` as base64 lines of 76 characters, each ending in CRLF."""
    pending = b""
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
        whole = len(pending) - len(pending) % _LINE
        for start in range(0, whole, _LINE):
            out.write(base64.b64encode(pending[start:start + _LINE]) + b"\r\n")
        pending = pending[whole:]
    if pending:
        out.write(base64.b64encode(pending) + b"\r\n")

"""8-bit mail for a next hop that does not offer 8BITMIME, made 7-bit (RFC 6152 3).

A message whose body holds octets above 127 may only go to a server that announced 8BITMIME;
to any other, RFC 6152 leaves the client two choices: convert it to 7 bit or return it. We
convert, as Postfix does (its `disable_mime_output_conversion = no`): each leaf part whose
body holds 8-bit octets under an identity encoding (7bit, 8bit, binary, or none) is encoded
as quoted-printable (text) or base64 (anything else), its Content-Transfer-Encoding field
replaced; multiparts and message/rfc822 parts are walked into (RFC 2046 allows them only
identity encodings), everything else is kept byte for byte: headers, delimiters, preambles,
parts already 7-bit or already encoded. A message that is not MIME gets `MIME-Version: 1.0`
so that its new encoding means something. Header fields with raw 8-bit text (allowed only
with SMTPUTF8) cannot be converted without rewriting them and go out as they are, as
Postfix sends them. A signature over the body (DKIM) no longer verifies after a conversion:
that is the price RFC 6152 sets, and why hops without 8BITMIME are rare.

Parts are found by byte offsets as mailcore.messages.parts finds them (the email package's
rules), within the parser's bounds on depth and parts: past them the rest is encoded whole.
"""

from __future__ import annotations

import base64
import binascii
import re

from mailcore.messages.parse import MimeLimits
from mailcore.messages.parts import children_at, headers_at

IDENTITY = ("", "7bit", "8bit", "binary")
_CTE_FIELD = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n?")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def seven_bit(raw: bytes, limits: MimeLimits | None = None) -> bytes:
    """`raw` with each 8-bit part encoded (see the module docstring); `raw` itself when it is
    ASCII. Blocking CPU work: call it on the CPU pool for a large message."""
    if raw.isascii():
        return raw
    out: list[bytes] = []
    _part(raw, 0, len(raw), out, limits or MimeLimits(), depth=0, budget=[0])
    return b"".join(out)


def _part(raw: bytes, start: int, end: int, out: list[bytes], limits: MimeLimits,
          depth: int, budget: list[int]) -> None:
    if raw[start:end].isascii():
        out.append(raw[start:end])
        return
    header, body = headers_at(raw, start, end)
    cte = str(header.get("content-transfer-encoding", "")).strip().lower()
    if cte not in IDENTITY:  # already encoded: 8-bit octets there are the sender's error
        out.append(raw[start:end])
        return
    budget[0] += 1
    walk = depth < limits.max_depth and budget[0] < limits.max_parts
    kind = header.get_content_type()
    if header.get_content_maintype() == "multipart" or kind == "message/rfc822":
        # Containers keep identity encodings (RFC 2046 5.1.1, 5.2.1): walked into, or,
        # past the bounds or without a usable boundary, sent as they are.
        boundary = header.get_boundary()
        if not walk or (kind != "message/rfc822" and (boundary is None
                                                      or not boundary.isascii())):
            out.append(raw[start:end])
            return
        out.append(raw[start:body])
        if kind == "message/rfc822":
            _part(raw, body, end, out, limits, depth + 1, budget)
            return
        assert boundary is not None
        pos = body
        for child_start, child_end in children_at(raw, boundary.encode("ascii"), body, end,
                                                  limits.max_parts):
            out.append(raw[pos:child_start])
            _part(raw, child_start, child_end, out, limits, depth + 1, budget)
            pos = child_end
        out.append(raw[pos:end])  # the close delimiter and the epilogue
        return
    if raw[body:end].isascii():  # only its header fields are 8-bit
        out.append(raw[start:end])
        return
    head = _CTE_FIELD.sub(b"", raw[start:body])
    blank = _blank_line(head)
    if depth == 0 and header.get("mime-version") is None:
        head = _add_field(head, blank, b"MIME-Version: 1.0")
    if header.get_content_maintype() == "text":
        field, encoded = b"quoted-printable", _quoted_printable(raw[body:end])
    else:
        field, encoded = b"base64", _base64(raw[body:end])
    out.append(_add_field(head, blank, b"Content-Transfer-Encoding: " + field))
    out.append(encoded)


def _blank_line(head: bytes) -> bytes:
    """The line break the part's header block uses (CRLF unless it uses bare LF)."""
    m = _LINE_BREAK.search(head)
    return m.group() if m is not None else b"\r\n"


def _add_field(head: bytes, eol: bytes, field: bytes) -> bytes:
    """`head` (a part's header fields, with or without the blank line after them) with
    `field` as its last field, and the blank line."""
    fields = head[: -len(eol)] if head.endswith(eol + eol) or head == eol else head
    if fields and not fields.endswith(eol):
        fields += eol  # the fields ended with the part
    return fields + field + eol + eol


def _quoted_printable(text: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks, lines of at most 76 characters; the
    original line breaks are kept as breaks, a lone CR or LF inside a CRLF text encoded."""
    lines = re.split(rb"\r\n", text)
    encoded = [binascii.b2a_qp(line, quotetabs=False, istext=False) for line in lines]
    # istext=False escapes a lone CR/LF; its soft breaks are bare "=\n": make them CRLF.
    return b"\r\n".join(e.replace(b"=\n", b"=\r\n") for e in encoded)


def _base64(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines; ending with a line break only where the part's
    body did (a multipart's child ends before the break its delimiter owns)."""
    encoded = base64.encodebytes(data).rstrip(b"\n").replace(b"\n", b"\r\n")
    return encoded + b"\r\n" if data.endswith((b"\r\n", b"\n")) else encoded

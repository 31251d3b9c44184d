"""Reading a stored message into the Mail API's fields (blocking: run on the DB pool).

The message is parsed with Python's `email` package; header fields come back decoded
(RFC 2047) and the body is the first text/plain part (else text/html, else empty).
Attachments are the parts `iter_attachments` names, with their decoded bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes


@dataclass
class Parsed:
    mail_from: str = ""
    to: str = ""
    cc: str = ""
    reply_to: str = ""
    subject: str = ""
    body: str = ""
    attachments: list[Attachment] = field(default_factory=list)


def _header(message: EmailMessage, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:  # a malformed field: keep the rest of the message
        return ""
    return " ".join(str(value).split()) if value is not None else ""


def parse_message(raw: bytes) -> Parsed:
    """The API's view of `raw`; a part that cannot be decoded is left out, never an error."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    parsed = Parsed(
        mail_from=_header(message, "From"), to=_header(message, "To"),
        cc=_header(message, "Cc"), reply_to=_header(message, "Reply-To"),
        subject=_header(message, "Subject"),
    )
    try:
        part = message.get_body(preferencelist=("plain", "html"))
        if part is not None:
            content = part.get_content()
            parsed.body = content.replace("\r\n", "\n") if isinstance(content, str) else ""
    except Exception:
        parsed.body = ""
    try:
        for index, attachment in enumerate(message.iter_attachments(), 1):
            payload = attachment.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            name = attachment.get_filename() or f"attachment-{index}"
            parsed.attachments.append(
                Attachment(name[:255], attachment.get_content_type()[:255], data))
    except Exception:
        return parsed  # a broken MIME structure: what was read so far (all is in `raw`)
    return parsed

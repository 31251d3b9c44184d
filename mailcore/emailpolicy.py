"""The `email` package's policies as every message we build or parse uses them.

The stock policies' header registry makes a new class (with `type()`) for every header
field set or read: a fifth of the time it takes to build a small message. Ours make each
field's class once; the fields are parsed, checked and folded exactly as the stock ones do.

A value set on a message we build is parsed by the header registry, which decodes its RFC 2047
encoded words; Python before 3.11.10 and 3.12.5 (CVE-2024-6923) then writes a decoded CR LF
out as it is, so "=?utf-8?b?DQpGcm9tOiB4QHk=?=" in a subject adds a From field. The policy we
send with refuses such a value when it is set (HeaderBreak), and checks that every field it
writes is one field: a first line `Name:` and fold lines that start with white space.
`header_breaks` and `filename_breaks` tell beforehand whether a value would be refused.
"""

from __future__ import annotations

import re
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy
from functools import lru_cache
from typing import Any, cast

from mailcore.text import has_bidi_control, has_control

# What ends a line in a header field as a mail reader or SMTP server splits it (CR, LF), or
# as the email package does when it folds (str.splitlines: VT, FF, FS-RS, NEL, U+2028-9), or
# cuts it (NUL).
_LINE_BREAK = re.compile(r"[\x00\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


class HeaderClasses(HeaderRegistry):
    """A header registry that makes each field's header class once."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


class HeaderBreak(ValueError):
    """A header field value that would not be written as one field (see the docstring)."""


class Outgoing(EmailPolicy):
    """The policy of messages we build: SMTP's, refusing what would not stay one field.

    A field set with a value of up to MEMO_CHARS characters is parsed once for each name
    and value (the header object is kept, MEMO_FIELDS of them, and shared: it is never
    changed once made), and a header object is folded once for each policy: the fields
    every message repeats (its From, its To, the Date of one second, the body's
    Content-Type and Content-Transfer-Encoding, MIME-Version) cost nothing after the first
    message. Parsing and folding took four fifths of the time a small message took to
    build; both are functions of the name and the value alone, so the bytes are the same."""

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if isinstance(value, str) and len(value) <= MEMO_CHARS:
            return name, _stored_field(self, name, value)
        return self._parsed(name, value)

    def _parsed(self, name: str, value: Any) -> tuple[str, Any]:
        name, header = super().header_store_parse(name, value)
        if _LINE_BREAK.search(str(header)):
            raise HeaderBreak(f"the {name} field would hold a line break once decoded")
        return name, header

    def fold(self, name: str, value: Any) -> str:
        folded = super().fold(name, value)
        _check_folded(name, folded.encode("utf-8", "surrogateescape"), self.linesep)
        return folded

    def fold_binary(self, name: str, value: Any) -> bytes:
        # A header object's own fold ignores `name`; the check below does not.
        kept = getattr(value, "__dict__", {}).get(_FOLDED)
        if kept is not None and kept[0] is self and kept[1] == name:
            return cast(bytes, kept[2])
        folded = super().fold_binary(name, value)
        _check_folded(name, folded, self.linesep)
        if hasattr(value, "__dict__"):
            value.__dict__[_FOLDED] = (self, name, folded)
        return folded


# See Outgoing.
MEMO_CHARS = 512
MEMO_FIELDS = 1024
_FOLDED = "_mailcore_folded"


@lru_cache(maxsize=MEMO_FIELDS)
def _stored_field(policy: Outgoing, name: str, value: str) -> Any:
    """The header object `policy` stores for field `name` set to `value` (lru_cache keeps
    no exception: a refused value is refused each time)."""
    return policy._parsed(name, value)[1]


def _check_folded(name: str, folded: bytes, linesep: str) -> None:
    """HeaderBreak unless `folded` is one field `name`: its first line starts `name:`, the
    others with white space, and no line holds a CR or LF of its own."""
    end = linesep.encode("ascii")
    lines = folded.split(end)
    if lines[-1] == b"":
        lines.pop()
    if not lines or not lines[0].lower().startswith(name.lower().encode("ascii") + b":") \
            or any(line[:1] not in (b" ", b"\t") for line in lines[1:]) \
            or any(b"\r" in line or b"\n" in line for line in lines):
        raise HeaderBreak(f"the {name} field was not written as one field")


# Messages we send (CRLF line ends, RFC 2047 words, lines folded at 78).
SMTP = Outgoing(linesep="\r\n", header_factory=HeaderClasses())
# Messages we read (Python's default policy).
DEFAULT = policy.default.clone(header_factory=HeaderClasses())


def header_breaks(name: str, value: str) -> bool:
    """Whether `value`, set as header field `name` of a message we build, holds a control
    character (CR, LF, TAB...) as it is or once its RFC 2047 encoded words are decoded."""
    if has_control(value):
        return True
    decoded = _decoded(name, value)
    return decoded is None or has_control(decoded)


def header_reorders(name: str, value: str) -> bool:
    """Whether `value`, set as header field `name` of a message we build, holds a
    bidirectional control (mailcore.text) once its RFC 2047 encoded words are decoded: a
    mail reader would show the text after it reordered ("Pay <U+202E>fdp.exe" reads "Pay
    exe.pdf"). A value `shown` holds none as it is written; one of its encoded words may."""
    decoded = _decoded(name, value)
    return decoded is None or has_bidi_control(decoded)


def _decoded(name: str, value: str) -> str | None:
    """`value` as header field `name` reads once its RFC 2047 encoded words are decoded;
    None when the email package cannot read it (a field we must not write)."""
    try:
        return str(SMTP.header_factory(name, value))
    except Exception:
        return None


def header_as_written(name: str, value: str) -> bool:
    """Whether `value`, set as header field `name` of a message we build, is read back as
    it is written: no control character, and no RFC 2047 encoded word that the email package
    (and a mail reader) would decode. A value taken from mail (a recipient's local part
    spelling `=?utf-8?b?DQpCY2M6...?=`) would otherwise be refused (a line break once
    decoded) or show what the word encodes rather than the address."""
    if has_control(value):
        return False
    try:
        return str(SMTP.header_factory(name, value)) == value
    except Exception:
        return False


# The To of a message we build for one recipient whose address would not be read as written.
NO_TO = "undisclosed-recipients:;"


def to_field(address: str) -> str:
    """The To field of a message we build for `address` alone (the envelope names it): the
    address as written, else NO_TO (`header_as_written`: one spelling an RFC 2047 word would
    be refused, a line break once decoded, or show the text it encodes)."""
    return address if header_as_written("To", address) else NO_TO


def filename_breaks(name: str) -> bool:
    """Whether an attachment named `name` would be refused by the policy we send with (its
    `filename` parameter decodes to a line break), or holds a control character itself."""
    if has_control(name):
        return True
    try:
        EmailMessage(policy=SMTP).add_header("Content-Disposition", "attachment", filename=name)
    except ValueError:
        return True
    return False

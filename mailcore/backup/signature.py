"""The telephone number a sender gives in the signature block of a message's text.

Where the block is: after the signature delimiter (`-- `, RFC 3676 §4.3; a bare `--` too),
else the last few lines of the sender's own text. The sender's own text ends where the
quoted message begins: a `>` quote, "On … wrote:", Outlook's "-----Original Message-----" or
its "From: … Sent: …" header block; nothing below that is the sender's.

Which numbers count: libphonenumber (the `phonenumbers` package) must find a valid number.
After a delimiter, a number counts on a labelled line ("Tel:", "Phone:", "Mobile:", "M:",
"Telefon:", "Tél.", "Handy", …) or when written internationally ("+49 …", "0049 …"); in a
trailing block without a delimiter, only on a labelled line or alone on its line in the
international form. Fax lines never count. A number without a country code is read in the
country of the sender's domain (".de" → Germany), or of the North American numbering plan
when the domain names no country (.com). This
keeps dates, times, order and invoice numbers, postcodes and IP addresses out. A mobile or
phone line wins over other labelled lines; the first such number is taken.
"""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import Leniency, PhoneNumberFormat, PhoneNumberMatcher

# How much of a text is read: the sender's own part of it is near the top (replies quote
# below), and signatures are short.
MAX_TEXT = 16_000
# The country a labelled number without a country code is read in when the sender's domain
# names none (.com, .org, …): the North American numbering plan, the commonest such case.
FALLBACK_REGION = "US"
MAX_BLOCK_LINES = 12
TRAILING_LINES = 8

_DELIMITER = re.compile(r"^--[ \t]?$")
_QUOTE_START = re.compile(
    r"^(?:-{2,}\s*(?:Original Message|Ursprüngliche Nachricht|Message d'origine|"
    r"Forwarded message|Weitergeleitete Nachricht)\s*-{2,}"
    r"|(?:On|Am|Le|El|Il|Op)\b.{0,200}\b(?:wrote|schrieb|a écrit|escribió|ha scritto|"
    r"schreef)\s*:"
    r"|_{10,})",
    re.IGNORECASE,
)
_OUTLOOK_FROM = re.compile(r"^(?:From|Von|De)\s*:\s*\S", re.IGNORECASE)
_OUTLOOK_NEXT = re.compile(r"^(?:Sent|Gesendet|Envoyé|Date|To|An|À)\s*:", re.IGNORECASE)
_LABEL = re.compile(
    r"^\W*(?:(?P<fax>fax|telefax|télécopie)\b"
    r"|(?P<mobile>mobile|mobil|mob|cell|cellphone|handy|portable|móvil|cellulare)\b"
    r"|(?P<phone>tel|tél|telephone|téléphone|telefon|telefono|teléfono|phone|ph|fon|"
    r"direct|office|work|voice)\b"
    r"|(?P<short>[tmp])\s*[:.])",
    re.IGNORECASE,
)
_INTERNATIONAL = re.compile(r"(?:^|[\s:(])(?:\+|00)[1-9]")


def _own_lines(text: str) -> list[str]:
    """The sender's own lines: up to the quoted message, without quoted lines."""
    lines = text[:MAX_TEXT].splitlines()
    own: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if _QUOTE_START.match(stripped):
            break
        if _OUTLOOK_FROM.match(stripped) and i + 1 < len(lines) and any(
            _OUTLOOK_NEXT.match(n.strip()) for n in lines[i + 1:i + 4]
        ):
            break
        if stripped.startswith(">"):
            continue
        own.append(line.rstrip("\r"))
    return own


def signature_block(text: str) -> tuple[list[str], bool]:
    """(the signature block's lines, whether a delimiter introduced it)."""
    own = _own_lines(text)
    for i in range(len(own) - 1, -1, -1):
        if _DELIMITER.match(own[i]):
            return [s for s in own[i + 1:i + 1 + MAX_BLOCK_LINES] if s.strip()], True
    trailing = [s for s in own if s.strip()][-TRAILING_LINES:]
    return trailing, False


def _region(sender_address: str) -> str | None:
    """The country of the sender's domain (its country-code TLD), if it is one."""
    tld = sender_address.rpartition(".")[2].upper()
    if tld == "UK":
        tld = "GB"
    return tld if len(tld) == 2 and tld in phonenumbers.SUPPORTED_REGIONS else None


def _numbers(line: str, region: str | None) -> list[str]:
    found = []
    for match in PhoneNumberMatcher(line, region, leniency=Leniency.VALID):
        found.append(phonenumbers.format_number(match.number,
                                                PhoneNumberFormat.INTERNATIONAL))
    return found


def signature_phone(text: str, sender_address: str = "") -> str:
    """The sender's telephone number from the signature block of `text`, or ""."""
    block, delimited = signature_block(text)
    region = _region(sender_address)
    labelled: list[tuple[int, str]] = []
    for line in block:
        label = _LABEL.match(line)
        if label and label.group("fax"):
            continue
        international = bool(_INTERNATIONAL.search(line))
        if label is None:
            if not international:
                continue
            if not delimited and not _alone(line):
                continue
        numbers = _numbers(line, (region or FALLBACK_REGION) if label else None)
        if not numbers:
            continue
        rank = 0 if label and (label.group("mobile") or label.group("phone")
                               or label.group("short")) else 1
        labelled.append((rank, numbers[0]))
    if not labelled:
        return ""
    return min(labelled, key=lambda item: item[0])[1][:64]


def _alone(line: str) -> bool:
    """The line holds a number and little else (a trailing "+49 30 1234567")."""
    return len(re.sub(r"[\d\s()+./-]", "", line)) <= 3

"""Header sanity: required fields present once, addresses and dates that parse, sane sizes.

The stdlib's RFC 5322 header parser recurses on nested comments and is slow or raises on
some hostile inputs, so addresses are checked here with a small linear scanner instead. It
accepts what mail clients accept (display names with dots or `@`, RFC 2047 words, UTF-8
per RFC 6532, groups such as `undisclosed-recipients:;`) and rejects what none can use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_tz

from filters.mime import ParsedMessage

# What each finding is called (a Symbol name) and what it scores by default.
DEFAULT_HEADER_SCORES: dict[str, float] = {
    "MISSING_FROM": 2.0,
    "MISSING_DATE": 1.0,
    "MISSING_MESSAGE_ID": 0.5,
    "DUPLICATE_FROM": 3.0,
    "DUPLICATE_DATE": 1.5,
    "DUPLICATE_MESSAGE_ID": 1.5,
    "MALFORMED_FROM": 2.5,
    "MALFORMED_ADDRESS": 1.0,
    "MALFORMED_DATE": 1.0,
    "MALFORMED_MESSAGE_ID": 0.5,
    "MALFORMED_HEADER": 1.0,
    "HEADER_TOO_LONG": 1.5,
    "HEADERS_TOO_LARGE": 3.0,
}

ADDRESS_FIELDS = ("to", "cc", "bcc", "reply-to", "sender")

# atext (RFC 5322) and letters-digits(-hyphens) of a domain label, and every non-ASCII
# character (RFC 6531/6532), each written as the ASCII it is not: a class spelled with the
# range \u0080-\U0010ffff took 30 ms to compile, at every import of this module (each
# `mailcore` command's and daemon's start); this spelling, the same set, well under 1 ms.
_ATEXT = r'[^\x00-\x20\x7f"(),.:;<>@\[\\\]]'
_LOCAL = re.compile(rf'^(?:{_ATEXT}+(?:\.{_ATEXT}+)*|"(?:[^"\\\r\n]|\\.)*")$')
_LETDIG = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
_LDH = r"[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"
_LABEL = rf"{_LETDIG}(?:{_LDH}*{_LETDIG})?"
_DOMAIN = re.compile(rf"^(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[^\[\]\\\s]+\])$")
_MESSAGE_ID = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")
_MAX_DATE = 200
# The RFC 5322 date almost every message carries ("Wed, 2 Dec 2026 11:54:33 +0000", an
# optional comment after it): a string this matches is one `parsedate_tz` parses, so the
# stdlib parser only sees the rest.
_COMMON_DATE = re.compile(
    r"[ \t]*(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),[ \t]*)?[0-9]{1,2}[ \t]+"
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[ \t]+[0-9]{4}[ \t]+"
    r"[0-9]{2}:[0-9]{2}(?::[0-9]{2})?[ \t]+[+-][0-9]{4}(?:[ \t]+\([A-Za-z0-9 +-]*\))?[ \t]*")
# Characters that make an address list need the careful scanners below.
_STRUCTURE = frozenset('"\\(:;')


@dataclass(frozen=True)
class HeaderFinding:
    """One header problem: the symbol name and what exactly was wrong."""

    symbol: str
    detail: str


def check_headers(parsed: ParsedMessage, max_field: int) -> list[HeaderFinding]:
    """Every header problem of the top-level header, at most one finding per symbol."""
    found: dict[str, HeaderFinding] = {}

    def add(symbol: str, detail: str) -> None:
        found.setdefault(symbol, HeaderFinding(symbol, detail))

    if not parsed.header_complete:
        add("HEADERS_TOO_LARGE", f"header block over {parsed.header_bytes} bytes")
    if parsed.malformed_header_lines:
        add("MALFORMED_HEADER", f"{parsed.malformed_header_lines} header lines are not fields")
    # Every field's values by lower-case name, gathered once (not one walk per name), and
    # the names of the fields over the size limit.
    oversized: set[str] = set()
    by_name: dict[str, list[str]] = {}
    for h in parsed.headers:
        lowered = h.name.lower()
        values = by_name.get(lowered)
        if values is None:
            by_name[lowered] = [h.value]
        else:
            values.append(h.value)
        if h.size > max_field:
            if not oversized:
                add("HEADER_TOO_LONG", f"{h.name} field is {h.size} bytes (limit {max_field})")
            oversized.add(lowered)

    for field, key in (("from", "FROM"), ("date", "DATE"), ("message-id", "MESSAGE_ID")):
        values = by_name.get(field, [])
        if not values:
            add(f"MISSING_{key}", f"no {field.title()} field")
        elif len(values) > 1:
            add(f"DUPLICATE_{key}", f"{len(values)} {field.title()} fields")

    if "from" not in oversized:
        for value in by_name.get("from", ()):
            problem = address_list_problem(value, allow_empty=False)
            if problem:
                add("MALFORMED_FROM", f"From: {problem}")
    for field in ADDRESS_FIELDS:
        if field in oversized:
            continue
        for value in by_name.get(field, ()):
            problem = address_list_problem(value, allow_empty=field != "sender")
            if problem:
                add("MALFORMED_ADDRESS", f"{field.title()}: {problem}")
    for value in by_name.get("date", ()):
        if not date_ok(value):
            add("MALFORMED_DATE", f"Date: {value[:60]!r}")
    for value in by_name.get("message-id", ()):
        if len(value) > max_field or not _MESSAGE_ID.match(value.strip()):
            add("MALFORMED_MESSAGE_ID", f"Message-ID: {value[:60]!r}")
    return list(found.values())


def date_ok(value: str) -> bool:
    """Whether a Date field parses as an RFC 5322 date (obsolete forms included)."""
    if len(value) > _MAX_DATE:
        return False
    if _COMMON_DATE.fullmatch(value):
        return True
    try:
        return parsedate_tz(value) is not None
    except Exception:  # the stdlib date parser raises on some garbage
        return False


def address_list_problem(value: str, *, allow_empty: bool) -> str | None:
    """What is wrong with an address-list field, or None when every address is usable."""
    items = _plain_split(value)
    if items is None:
        try:
            items = _split_top_level(_strip_comments(value), ",")
        except ValueError as e:
            return str(e)
    addresses = 0
    for item in items:
        text = item.strip()
        if not text:
            continue
        group = _group_members(text)
        members = [text] if group is None else _split_top_level(group, ",")
        for member in members:
            member = member.strip()
            if not member:
                continue
            problem = _mailbox_problem(member)
            if problem:
                return problem
            addresses += 1
    if addresses == 0 and not allow_empty:
        return "no address"
    return None


def _mailbox_problem(text: str) -> str | None:
    """`addr-spec` or `[display name] <addr-spec>`; None when usable."""
    if "<" in text or ">" in text:
        if text.count("<") != 1 or text.count(">") != 1 or not text.endswith(">"):
            return f"unbalanced angle brackets in {text[:60]!r}"
        spec = text[text.index("<") + 1:-1].strip()
    else:
        spec = text
    return _addr_spec_problem(spec)


def _addr_spec_problem(spec: str) -> str | None:
    if not spec:
        return "empty address <>"
    at = spec.rfind("@")
    if at < 0:
        return f"no @ in {spec[:60]!r}"
    local, domain = spec[:at].strip(), spec[at + 1:].strip()
    if not local or not _LOCAL.match(local):
        return f"bad local part in {spec[:60]!r}"
    if not domain or not _DOMAIN.match(domain):
        return f"bad domain in {spec[:60]!r}"
    return None


def _plain_split(value: str) -> list[str] | None:
    """`_split_top_level(_strip_comments(value), ",")` for the usual list without quotes,
    escapes, comments or groups and with no comma inside <>: plain `str.split`. None when
    the value needs the careful scanners."""
    if not _STRUCTURE.isdisjoint(value):
        return None
    items = value.split(",")
    for item in items[:-1]:
        if item.rfind("<") > item.rfind(">"):
            return None  # a comma inside <...>
    return items


def _group_members(text: str) -> str | None:
    """For `name: a, b;` the member list; None when `text` is not a group."""
    colon = _find_top_level(text, ":") if ":" in text else None
    if colon is None:
        return None
    rest = text[colon + 1:].strip()
    if rest.endswith(";"):
        rest = rest[:-1]
    return rest


def _strip_comments(value: str) -> str:
    """Remove (comments), which may nest, outside quoted strings; linear time."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            out.append(ch)
            if ch == '"':
                quoted = False
            continue
        if ch == "(":
            depth += 1
            continue
        if ch == ")" and depth:
            depth -= 1
            continue
        if depth == 0:
            if ch == '"':
                quoted = True
            out.append(ch)
    if depth or quoted:
        raise ValueError("unbalanced comment or quote")
    return "".join(out)


def _unquoted(value: str) -> Iterator[tuple[int, str, bool]]:
    """(index, character, inside <>) of each character that may be structure: outside
    quotes, not escaped, and not itself a quote, backslash or angle bracket."""
    quoted = False
    angle = False
    escaped = False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "<":
            angle = True
        elif ch == ">":
            angle = False
        else:
            yield i, ch, angle


def _split_top_level(value: str, sep: str) -> list[str]:
    """Split at `sep` outside quotes, angle brackets and groups (`name: a, b;`)."""
    parts: list[str] = []
    begin = 0
    group = False
    for i, ch, angle in _unquoted(value):
        if angle:
            continue
        if ch == ":":
            group = True
        elif ch == ";":
            group = False
        elif ch == sep and not group:
            parts.append(value[begin:i])
            begin = i + 1
    parts.append(value[begin:])
    return parts


def _find_top_level(value: str, target: str) -> int | None:
    """The index of the first `target` outside quotes and angle brackets, or None."""
    for i, ch, angle in _unquoted(value):
        if ch == target and not angle:
            return i
    return None

"""The top-level header block of a raw message, found and read as the email package reads it.

`blank_line` finds where the header block ends (the first empty line) with a pattern that
the regular expression engine can skip ahead through (rb"\r?\n\r?\n" could not).
`header_fields` reads the header lines of the usual message into the (name, value) pairs the
email package's parser stores (`email.policy.compat32`): a field is its name up to the first
":", its value the rest with leading blanks stripped, continuation lines joined as they
stand and the last line end stripped. Anything that parser reads otherwise (a line end that
is a lone CR, a leading "From " envelope line, a continuation line first, a line that is no
header field) is None: the caller hands the message to the email package instead. Pure
functions.
"""

from __future__ import annotations

import re

# The LF that ends the line before the first empty line, and that empty line: a pattern
# that starts with a fixed byte, which the regular expression engine skips ahead to (the
# CR before it, if any, is looked at afterwards).
_EMPTY_LINE = re.compile(rb"\n\r?\n")
# A header field's first line: a name of printable ASCII but ":" (the email package's
# parser allows an empty name; that is a defect it skips, so it is not read here) and ":".
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+:")


def blank_line(raw: bytes, endpos: int | None = None) -> tuple[int, int] | None:
    """(start, end) of the first match of rb"\\r?\\n\\r?\\n" in `raw[:endpos]`: the line end
    before the first empty line, and the empty line; None when there is none."""
    m = _EMPTY_LINE.search(raw, 0, len(raw) if endpos is None else endpos)
    if m is None:
        return None
    start = m.start()
    return (start - 1 if start > 0 and raw[start - 1] == 0x0D else start), m.end()


def header_fields(block: bytes) -> list[tuple[str, str]] | None:
    """The header fields of `block` (a message's header lines up to and including the empty
    line that ends them, as `blank_line` finds it), as the email package's parser stores
    them (8-bit bytes surrogate-escaped); None for any block it reads another way."""
    text = block.decode("ascii", "surrogateescape")
    if text.count("\r") != text.count("\r\n"):
        return None  # a lone CR ends a line for the email package
    lines = text.split("\n")
    # The last two pieces: the empty line (with its CR, if any) and "" after its LF.
    if len(lines) < 2 or lines[-1] != "" or lines[-2] not in ("", "\r"):
        return None
    fields: list[tuple[str, str]] = []
    name = ""
    value: list[str] = []
    for line in lines[:-2]:
        if line[:1] in (" ", "\t"):
            if not name:
                return None  # a continuation line first: a defect the parser skips
            value.append(line)
            value.append("\n")
            continue
        if line.startswith("From ") or (m := _FIELD_NAME.match(line)) is None:
            return None  # an envelope line, or no header field: the body starts early
        if name:
            fields.append((name, "".join(value).rstrip("\r\n")))
        name = m.group()[:-1]
        value = [line[m.end():].lstrip(" \t"), "\n"]
    if name:
        fields.append((name, "".join(value).rstrip("\r\n")))
    return fields

"""Checks of user-given text shared by every layer: control characters and lone surrogates.

A name, a username, a description or a folder name is one line of text: a control character
in it (CR and LF above all), or a line or paragraph separator (U+2028, U+2029), could split a
log line, a header or a protocol command (POP3 `USER`, IMAP, SMTP). A lone surrogate
("\\ud800", which JSON and `os.fsdecode` can produce) is not text at all: no database, file
or reply can encode it. Nor is NUL, in any field: PostgreSQL's text columns refuse it, and no
header or protocol line carries it; every API refuses both at its input (`not_text`).

A bidirectional formatting control (U+202A-U+202E embeddings and overrides, U+2066-U+2069
isolates, the marks U+200E, U+200F and U+061C) reorders the text after it when it is shown:
"invoice\u202efdp.exe" reads as "invoiceexe.pdf". A name or subject shown to someone other
than who wrote it (a safedrop file name, a drop's subject on the recipient's page and in its
mails) is shown without them (`strip_bidi_controls`). They are not refused with the other
format characters (Unicode's Cf): U+200D ZERO WIDTH JOINER is part of many emoji.

A message (a safedrop's message, its secure message) is multi-line text: TAB, CR and LF
belong in it, any other control character does not (NUL above all, which a PostgreSQL text
column refuses).
"""

from __future__ import annotations

import re

CONTROL_CHARACTER = "Control characters (NUL, CR, LF, TAB...) are not allowed."
NOT_TEXT = "The value holds a lone surrogate, which is not text."
HOLDS_NUL = "The value holds NUL (U+0000), which no text field takes."
CONTROL_IN_TEXT = (
    "Control characters other than TAB, CR and LF (NUL, ESC, DEL...) are not allowed."
)

# Unicode's Cc: C0 controls, DEL and C1 controls.
_CC = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Cc and the line and paragraph separators U+2028 and U+2029: str.splitlines and Python's
# email package end a line at them (a header holding one cannot be written).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Cc less TAB, LF and CR: what multi-line text may not hold.
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# What may never go into a protocol command line, whatever else the line allows.
_LINE_BREAKING = re.compile(r"[\x00\r\n]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Unicode's Bidi_Control characters.
_BIDI_CONTROL = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


# Cc (but TAB and LF) and U+2028/U+2029: what a log line may not hold as it is.
_LOG_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# What `escape_controls` writes as an escape for a terminal: the controls above and the
# bidirectional controls, which would reorder what follows them on the operator's screen.
_SHOWN_ESCAPED = re.compile(f"{_CONTROL.pattern}|{_BIDI_CONTROL.pattern}")
_LOG_SHOWN_ESCAPED = re.compile(f"{_LOG_CONTROL.pattern}|{_BIDI_CONTROL.pattern}")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_lines: bool = False) -> str:
    """`text` with each control character written as `\\xNN` (`\\u2028` ...): for what an
    operator reads in a terminal (the log, the CLI's tables), where a remote party's ESC
    sequence, CR or BEL would otherwise act, and each bidirectional control too
    (`\\u202e`): an OAuth app named "invoice\\u202efdp.exe" is listed as written, not
    reordered to read "invoiceexe.pdf". With `keep_lines`, TAB and LF stay as they are (the
    log writer indents a continued line)."""
    if text.isprintable():
        return text
    return (_LOG_SHOWN_ESCAPED if keep_lines else _SHOWN_ESCAPED).sub(_escaped, text)


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (NUL, CR, LF, TAB, DEL, C1...) or a line or
    paragraph separator (U+2028, U+2029): whether it is not one line of text."""
    return _CONTROL.search(text) is not None


def has_control_multiline(text: str) -> bool:
    """Whether multi-line `text` (a message someone reads, mailed or shown on a page) holds a
    control character other than TAB, CR and LF: NUL, which a PostgreSQL text column refuses,
    or ESC, DEL, C1... which no reader's text holds. Line and paragraph separators are text
    here, as are the line breaks `has_control` refuses in one line."""
    return _TEXT_CONTROL.search(text) is not None


def has_cc(text: str) -> bool:
    """Whether `text` holds a control character (Unicode's Cc only). For names read from a
    protocol where U+2028 is text to be carried (a remote folder's name), not refused."""
    return _CC.search(text) is not None


def replace_cc(text: str, replacement: str = "\ufffd") -> str:
    """`text` with each control character (Unicode's Cc, as `has_cc`) replaced: for text
    read out of mail and shown as one line, where refusing is not an option."""
    return _CC.sub(replacement, text) if _CC.search(text) else text


def has_bidi_control(text: str) -> bool:
    """Whether `text` holds a bidirectional formatting control (U+202A-U+202E,
    U+2066-U+2069, U+200E, U+200F, U+061C), which makes it read otherwise than it is."""
    return not text.isascii() and _BIDI_CONTROL.search(text) is not None


def strip_bidi_controls(text: str) -> str:
    """`text` without bidirectional formatting controls: what a name or subject someone
    else wrote is shown as, so that it reads in the order its characters are in."""
    return _BIDI_CONTROL.sub("", text) if has_bidi_control(text) else text


def shown(text: str) -> str:
    """A name or subject as someone other than who wrote it is shown it, in a page or a
    mail: one line, without bidirectional controls (text that reads otherwise than it is)."""
    return " ".join(strip_bidi_controls(text).split())


def first_line(text: str) -> str:
    """The first line of `text` that is not blank, stripped ("" when there is none): an
    error's message as one line (a database error's first, not the SQL that follows)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def breaks_line(text: str) -> bool:
    """Whether `text` holds NUL, CR or LF, which would end or cut a protocol command line."""
    return _LINE_BREAKING.search(text) is not None


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (it cannot be encoded, stored or sent)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def not_text(text: str) -> str | None:
    """Why `text` is not text any field takes (`NOT_TEXT`: a lone surrogate; `HOLDS_NUL`:
    NUL, which PostgreSQL's text columns refuse and no protocol line or header carries), or
    None. What every API refuses at its input boundary, whatever the field."""
    if "\x00" in text:
        return HOLDS_NUL
    return NOT_TEXT if has_surrogate(text) else None


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD: what a text column of every
    store accepts (PostgreSQL refuses NUL; neither encodes a lone surrogate as UTF-8). For
    text read out of mail, where refusing is not an option."""
    if text.isascii():  # no surrogate: only NUL to look for, without the regex engine
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    return _UNSTORABLE.sub("\ufffd", text) if _UNSTORABLE.search(text) else text

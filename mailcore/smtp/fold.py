"""Folding the header fields we write ourselves from text we do not control.

A DSN's Diagnostic-Code quotes a next hop's reply, an X-Spam-Status lists a filter's
symbols: either can be longer than any line may be (RFC 5322 2.1.1: 998 octets at most, 78
should; RFC 5321 4.5.3.1.6: 1000 with CRLF) and can hold control characters no message may
carry (NUL above all). `fold` makes one field of such a value: control characters dropped,
whitespace collapsed, lines broken before whitespace at 78 octets where a break can be had,
and a word too long for any line cut so no line ever passes 998.

Fields that must stay ASCII (a DSN's `message/delivery-status` part, RFC 3464; fields we
add to a message that did not say SMTPUTF8) take such text through `ascii_escaped`, which
writes each non-ASCII character in RFC 6533's `\\x{HHHH}` notation instead of raw UTF-8.
"""

from __future__ import annotations

import re

# The width lines are folded at when they can be, and the hard limit (RFC 5322 2.1.1).
WIDTH = 78
MAX_LINE = 998
# A word longer than this (in UTF-8 octets) is cut into pieces of CUT characters: a piece
# of at most 4 * CUT octets fits a continuation line whatever the script.
_LONGEST_WORD = 900
_CUT = 200

# Unicode's Cc less TAB, LF and CR (which are whitespace: they separate words), and the
# line and paragraph separators U+2028 and U+2029, which would end a line for a reader.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def ascii_escaped(value: str) -> str:
    """`value` with each non-ASCII character written `\\x{HHHH}` (RFC 6533 3,
    EmbeddedUnicodeChar: upper-case hex without leading zeros, so U+00E9 is `\\x{E9}`):
    readable, lossless, ASCII."""
    if value.isascii():
        return value
    return _NON_ASCII.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", value)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def words(value: str, *, commas: bool = False) -> list[tuple[str, str]]:
    """`value`'s words, each with what joined it to the one before (" ", or "" after a comma
    when `commas`: a list like `tests=A,B,C` may then break after each comma, as
    SpamAssassin's X-Spam-Status does). Control characters are dropped."""
    out: list[tuple[str, str]] = []
    for word in _CONTROL.sub("", value).split():
        parts = re.findall(r"[^,]*,|[^,]+", word) if commas and "," in word else [word]
        for index, part in enumerate(parts):
            pieces = [part]
            if len(part.encode("utf-8")) > _LONGEST_WORD:
                pieces = [part[i:i + _CUT] for i in range(0, len(part), _CUT)]
            for n, piece in enumerate(pieces):
                out.append((piece, " " if index == 0 and n == 0 else ""))
    return out


def fold(name: str, value: str, *, commas: bool = False, width: int = WIDTH) -> str:
    """`name: value` as one field, folded (CRLF and a space between lines, no final CRLF);
    see the module docstring. `name` may be any prefix (`<address>:` in a DSN's text)."""
    lines: list[str] = []
    line = f"{name}:"
    size = len(line.encode("utf-8"))
    empty = True  # no word on the field's first line yet
    for word, joint in words(value, commas=commas):
        joint = " " if empty else joint
        octets = len(word.encode("utf-8"))
        grown = size + len(joint) + octets
        if (grown > width and not empty) or grown > MAX_LINE:
            lines.append(line)
            line, size = " " + word, 1 + octets
        else:
            line += joint + word
            size = grown
        empty = False
    lines.append(line)
    return "\r\n".join(lines)

"""Random raw messages for differential tests of the message parser: hostile header blocks
(folded, encoded words in many charsets, duplicate and odd fields, 8-bit bytes, bad or
missing dates, lone CRs, envelope lines, huge fields) over single-part bodies and random
MIME trees (nesting, digests, attached messages, missing close delimiters, bad base64).
Deterministic for a given `random.Random`."""

from __future__ import annotations

import base64
import quopri
import random

_CHARSETS = ["utf-8", "UTF-8", "iso-8859-1", "iso-8859-2", "iso-8859-15", "windows-1252",
             "windows-1251", "koi8-r", "shift_jis", "euc-jp", "iso-2022-jp", "gb2312", "big5",
             "utf-16", "us-ascii", "x-unknown", "unknown-8bit", "bogus-charset", "latin1"]
_TEXTS = ["Zoë Lefèvre", "Jürgen Groß", "Алексей", "李雷", "plain words", "日本語のテキスト",
          "café ☕", "a_b=c?d", "", " spaced  out ", "x" * 80]
_NAMES = ["Subject", "From", "To", "Cc", "Date", "Message-ID", "In-Reply-To", "References",
          "Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Content-ID",
          "MIME-Version", "X-Mailer", "Received", "subject", "FROM", "content-type",
          "Reply-To", "X-Weird.Name!#"]
_CTYPES = ["text/plain", "text/html", "TEXT/PLAIN", "text/plain; charset=utf-8",
           'text/plain; charset="iso-8859-1"', "text/plain; charset=windows-1252; format=flowed",
           "text/plain;charset=UTF-8", "text/html; charset=koi8-r", "text", "text/plain/x",
           "text/plain; charset=\"utf-8", "text/plain; charset*=utf-8''x", "text/csv",
           "application/pdf", "application/octet-stream; name=a.bin", "image/png",
           'text/plain; name="n.txt"', "multipart/mixed", "multipart/alternative; boundary=zz",
           "message/rfc822", "message/delivery-status", "text/plain; charset=bogus",
           " text/plain ; charset = utf-8 ", "text/plain;\r\n charset=utf-8", "", ";;",
           "text/plain; charset=\xe9"]
_CTES = ["7bit", "8bit", "binary", "base64", "BASE64", "quoted-printable", "Quoted-Printable",
         "x-uuencode", "base64 ", "garbage", ""]
_DISPOSITIONS = ["inline", "attachment", 'attachment; filename="f.pdf"', "INLINE",
                 "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf", "", "inline; name=x"]
_DATES = ["Mon, 06 Nov 2023 10:00:00 +0000", "6 Nov 2023 10:00 +0100", "Tue, 1 Jan 1970 00:00:00",
          "31 Feb 2023 25:61:61 +9999", "yesterday", "", "Mon, 06 Nov 99999 10:00:00 +0000",
          "Thu, 01 Jan 1 00:00:00 -1200", "Sun, 31 Dec 9999 23:59:59 -1200",
          "Mon, 6 Nov 2023 10:00:00 GMT", "Mon, 6 Nov 2023 10:00:00 EST", "\xe9t\xe9 2023"]


def _encoded_word(rng: random.Random) -> str:
    charset = rng.choice(_CHARSETS)
    text = rng.choice(_TEXTS)
    try:
        data = text.encode(charset)
    except (LookupError, UnicodeError):
        data = text.encode("utf-8")
    if rng.random() < 0.5:
        body = base64.b64encode(data).decode("ascii")
        if rng.random() < 0.1:
            body = body[:-1]  # bad padding
        return f"=?{charset}?{rng.choice('bB')}?{body}?="
    quoted = quopri.encodestring(data, header=True).decode("ascii")
    return f"=?{charset}?{rng.choice('qQ')}?{quoted}?="


def _value(rng: random.Random, name: str) -> str:
    lower = name.lower()
    if lower == "content-type":
        return rng.choice(_CTYPES)
    if lower == "content-transfer-encoding":
        return rng.choice(_CTES)
    if lower == "content-disposition":
        return rng.choice(_DISPOSITIONS)
    if lower == "date":
        return rng.choice(_DATES)
    if lower in ("message-id", "in-reply-to", "references", "content-id"):
        ids = [f"<id{rng.randrange(1000)}@{rng.choice(['x.test', 'é.test', 'a b'])}>"
               for _ in range(rng.randrange(0, 4))]
        return rng.choice([" ".join(ids), "\r\n ".join(ids), "no brackets", ""])
    if lower in ("from", "to", "cc", "reply-to"):
        forms = ["a@b.test", "Some Name <s.n@x.test>", '"Q, N" <q@x.test>',
                 f"{_encoded_word(rng)} <e@x.test>", "a@b, c@d", "<a@b>", "undisclosed:;",
                 "J\xfcrgen <j@x.test>", "(((((nested", "N <a@b> (c)", "Name\r\n <f@x.test>"]
        return rng.choice(forms)
    parts = []
    for _ in range(rng.randrange(0, 5)):
        r = rng.random()
        if r < 0.35:
            parts.append(_encoded_word(rng))
        elif r < 0.5:
            parts.append(rng.choice(["caf\xe9", "Gr\xc3\xb6\xc3\x9fe", "\x00nul", "\x85\xff"]))
        else:
            parts.append(rng.choice(_TEXTS))
    return rng.choice([" ", "  ", "\r\n ", "\r\n\t", "\n "]).join(parts)


def header_block(rng: random.Random, eol: str) -> str:
    """Header lines (no empty line after them), hostile now and then."""
    lines: list[str] = []
    if rng.random() < 0.03:
        lines.append("From sender@x.test Mon Nov  6 10:00:00 2023")
    if rng.random() < 0.03:
        lines.append(" continuation first")
    for _ in range(rng.randrange(0, 14)):
        name = rng.choice(_NAMES)
        value = _value(rng, name)
        sep = rng.choice([": ", ":", ":  ", ":\t", " : "]) if rng.random() < 0.1 else ": "
        lines.append(f"{name}{sep}{value}")
        r = rng.random()
        if r < 0.02:
            lines.append("not a header line")
        elif r < 0.03:
            lines.append(": empty name")
        elif r < 0.04:
            lines.append("From inside the headers")
        elif r < 0.05:
            lines.append("X-Huge: " + "h" * rng.choice([1000, 5000, 70000]))
        elif r < 0.06:
            lines.append("X-Trailing:   ")
        elif r < 0.07:
            lines.append("  ")
    text = eol.join(lines)
    if rng.random() < 0.03:
        text = text.replace(eol, "\r", 1)  # a lone CR
    return text


def _body(rng: random.Random, cte: str, eol: str) -> str:
    words = rng.choice(["Hello world.", "D\xe9j\xe0 vu", "line\r\n--b\r\ncontent-type: x",
                        "\x00\x01binary", "=E9t=E9 soft=\r\nbreak", "", "From me\r\n"])
    data = (words + eol) * rng.randrange(0, 6)
    if cte.strip().lower() == "base64" and rng.random() < 0.8:
        encoded = base64.encodebytes(data.encode("utf-8", "surrogateescape")).decode()
        data = encoded.replace("\n", eol) + ("!!" if rng.random() < 0.1 else "")
    return data


def leaf_message(rng: random.Random) -> bytes:
    """One message: a (hostile) header block over a single-part body."""
    eol = rng.choice(["\r\n", "\r\n", "\r\n", "\n"])
    head = header_block(rng, eol)
    cte = next((ln.split(":", 1)[1] for ln in head.split(eol)
                if ln.lower().startswith("content-transfer-encoding:")), "")
    end = rng.choice([eol + eol, eol + eol, eol, "\n\r\n", "\r\n\n", ""])
    text = head + end + _body(rng, cte, eol)
    return text.encode("utf-8", "surrogateescape") if rng.random() < 0.5 else \
        text.encode("latin-1", "replace")


def tree_message(rng: random.Random, depth: int = 0) -> bytes:
    """One message whose body is a random MIME tree."""
    eol = rng.choice(["\r\n", "\n"])
    head = header_block(rng, eol)
    head = "\n".join(ln for ln in head.split("\n") if not ln.lower().startswith("content-type"))
    boundary = rng.choice(["b", "bb", "=_x", "b1", "simple boundary"])
    kind = rng.choice(["mixed", "alternative", "digest", "related"])
    out = [head + f"{eol}Content-Type: multipart/{kind}; boundary=\"{boundary}\"{eol}{eol}"]
    if rng.random() < 0.3:
        out.append("preamble" + eol)
    for _ in range(rng.randrange(0, 5)):
        out.append(f"--{boundary}{eol}")
        r = rng.random()
        if r < 0.2 and depth < 3:
            out.append(tree_message(rng, depth + 1).decode("latin-1"))
        elif r < 0.3 and depth < 3:
            out.append(f"Content-Type: message/rfc822{eol}{eol}")
            out.append(leaf_message(rng).decode("latin-1"))
        else:
            out.append(leaf_message(rng).decode("latin-1"))
        out.append(eol)
    if rng.random() < 0.8:
        out.append(f"--{boundary}--{eol}")
    if rng.random() < 0.2:
        out.append("epilogue" + eol)
    return "".join(out).encode("latin-1", "replace")


def corpus(seed: int, count: int) -> list[bytes]:
    """`count` messages: about two in three single-part, one in three a MIME tree."""
    rng = random.Random(seed)
    return [leaf_message(rng) if rng.random() < 0.66 else tree_message(rng)
            for _ in range(count)]

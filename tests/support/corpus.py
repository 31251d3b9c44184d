"""A deterministic test mailbox: threads, attachments, non-ASCII headers, 8-bit bodies.

Every message is unique (its Message-ID and number are in it) and has CRLF line ends, so the
bytes an IMAP or POP3 server hands back are the bytes written here.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

_NAMES = ["Zoë Lefèvre", "Jürgen Groß", "Алексей", "李雷", "Ann Smith", "Bob"]


def _b(text: str) -> str:
    """RFC 2047 B-encoding in UTF-8."""
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def _q(text: str) -> str:
    """RFC 2047 Q-encoding in ISO-8859-1."""
    out = []
    for ch in text.encode("iso-8859-1"):
        if ch == 0x20:
            out.append("_")
        elif 0x30 <= ch <= 0x39 or 0x41 <= ch <= 0x5A or 0x61 <= ch <= 0x7A:
            out.append(chr(ch))
        else:
            out.append(f"={ch:02X}")
    return "=?iso-8859-1?q?" + "".join(out) + "?="


@dataclass(frozen=True)
class Made:
    raw: bytes
    message_id: str
    subject: str
    thread_root: str
    attachment: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def make_message(n: int, tag: str = "corpus", day: int = 1) -> Made:
    """Message number `n`: every 5th starts a thread the next four answer; every 7th has an
    attachment; every 3rd has an encoded subject; every 11th an 8-bit Latin-1 body."""
    root_n = n - (n % 5)
    msgid = f"<{tag}-{n}@corpus.test>"
    root = f"<{tag}-{root_n}@corpus.test>"
    topic = f"Topic {root_n} réunion ☕"
    name = _NAMES[n % len(_NAMES)]
    is_reply = n != root_n
    subject = ("Re: " if is_reply else "") + topic
    subject_header = _b(subject) if n % 3 == 0 else (
        _q(subject.replace("☕", "cafe")) if n % 3 == 1 else None
    )
    if subject_header is None:
        subject = subject.replace("☕", "tea").replace("é", "e")
        subject_header = subject
    elif n % 3 == 1:
        subject = subject.replace("☕", "cafe")
    headers = [
        f"From: {_b(name)} <user{n % 6}@example.test>",
        "To: Backup Owner <owner@example.test>",
        f"Subject: {subject_header}",
        f"Message-ID: {msgid}",
        f"Date: {1 + (day + n) % 28} Oct 2024 10:{n % 60:02d}:00 +0200",
        "MIME-Version: 1.0",
    ]
    if is_reply:
        parents = [f"<{tag}-{k}@corpus.test>" for k in range(root_n, n)]
        headers.append(f"In-Reply-To: {parents[-1]}")
        headers.append("References: " + " ".join(parents))
    body_words = f"Message number {n} of {tag}. Word{n}x appears only here.\r\n"
    attachment = None
    if n % 11 == 0:
        headers.append("Content-Type: text/plain; charset=iso-8859-1")
        headers.append("Content-Transfer-Encoding: 8bit")
        body = body_words.encode("ascii") + "Déjà vu, garçon.\r\n".encode("iso-8859-1")
    elif n % 7 == 0:
        attachment = f"résumé-{n}.pdf"
        encoded_name = "utf-8''" + "".join(
            c if (c.isascii() and c.isalnum()) or c in "-." else "%" + "%".join(
                f"{b:02X}" for b in c.encode("utf-8"))
            for c in attachment
        )
        boundary = f"b{n}x"
        headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
        payload = base64.encodebytes(b"%PDF-1.4 fake " + str(n).encode() * 50).decode()
        body = (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"{body_words}Voilà ✓\r\n"
            f"--{boundary}\r\nContent-Type: application/pdf\r\n"
            f"Content-Disposition: attachment; filename*={encoded_name}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
            + payload.replace("\n", "\r\n")
            + f"--{boundary}--\r\n"
        ).encode("utf-8")
    else:
        headers.append("Content-Type: text/plain; charset=utf-8")
        headers.append("Content-Transfer-Encoding: 8bit")
        body = (body_words + "Ünïcödé body ✓\r\n").encode("utf-8")
    raw = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body
    return Made(raw=raw, message_id=msgid, subject=subject, thread_root=root,
                attachment=attachment)


def make_corpus(start: int, count: int, tag: str = "corpus") -> list[Made]:
    return [make_message(n, tag) for n in range(start, start + count)]

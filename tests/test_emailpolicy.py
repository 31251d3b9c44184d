"""The `email` policies every message we build or parse uses (mailcore.emailpolicy)."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.emailpolicy import (
    DEFAULT,
    MEMO_CHARS,
    SMTP,
    HeaderBreak,
    HeaderClasses,
    _stored_field,
    filename_breaks,
    header_breaks,
)


class HeaderClassTests(TestCase):
    def test_each_fields_header_class_is_made_once(self) -> None:
        # The stock registry makes a new class (type()) for every field set or read.
        for policy in (SMTP, DEFAULT):
            registry: Any = policy.header_factory
            self.assertIs(registry["Subject"], registry["subject"])
            self.assertIs(registry["X-Own"], registry["x-own"])
            self.assertIsNot(registry["To"], registry["Subject"])
            self.assertEqual(registry["To"].max_count, 1)  # still the address class


def encoded(text: str) -> str:
    """`text` as one RFC 2047 encoded word (UTF-8, base64)."""
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


class OneFieldTests(TestCase):
    """A value set on a message we build is one header field once written, whatever its
    RFC 2047 encoded words decode to (CVE-2024-6923: Python 3.11.7 writes a decoded CR LF
    out as it is)."""

    injection = "Hello " + encoded("\r\nFrom: ceo@bank.example\r\nX-Injected: yes")

    def test_a_value_decoding_to_a_line_break_is_refused_when_set(self) -> None:
        for name, value in [("Subject", self.injection),
                            ("Subject", encoded("a\nb")), ("X-Own", encoded("a\rb")),
                            ("Subject", encoded("a\u2028b")), ("Subject", encoded("a\x00b"))]:
            message = EmailMessage(policy=SMTP)
            with self.assertRaises(HeaderBreak, msg=value):
                message[name] = value
            self.assertTrue(header_breaks(name, value))
        message = EmailMessage(policy=SMTP)
        with self.assertRaises(HeaderBreak):
            message.set_content(b"", "text", "plain",
                                filename=encoded('a.txt"\r\nContent-Type: text/html\r\n'))
        self.assertTrue(filename_breaks(encoded('a.txt"\r\nContent-Type: text/html\r\n')))

    def test_plain_and_harmless_encoded_values_are_written_as_before(self) -> None:
        message = EmailMessage(policy=SMTP)
        message["From"] = "bob@hosted.test"
        message["Subject"] = "caf\u00e9 " + encoded("d\u00e9j\u00e0 vu") + " word" * 40
        message.set_content(b"x", "application", "pdf", filename="r\u00e9port " * 20)
        raw = message.as_bytes()
        parsed: Any = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(parsed["Subject"], "caf\u00e9 d\u00e9j\u00e0 vu" + " word" * 40)
        self.assertEqual(parsed.get_filename(), ("r\u00e9port " * 20).strip())
        self.assertFalse(header_breaks("Subject", "caf\u00e9 " + encoded("d\u00e9j\u00e0")))
        self.assertFalse(filename_breaks("r\u00e9port.pdf"))
        self.assertTrue(header_breaks("Subject", "a\tb"))  # a control character as it is

    def test_a_field_written_as_more_than_one_is_refused(self) -> None:
        """The check of what is written, for a value that reached the message otherwise
        than by being set (the header object the stock policy makes)."""
        header = email.policy.SMTP.header_factory("Subject", self.injection)
        message = EmailMessage(policy=SMTP)
        message["From"] = "bob@hosted.test"
        message._headers.append(("Subject", header))  # type: ignore[attr-defined]
        with self.assertRaises(HeaderBreak):
            message.as_bytes()
        with self.assertRaises(HeaderBreak):
            message.as_string()


class MemoTests(TestCase):
    """A field is parsed once for each name and value, a header object folded once: the
    bytes are those the stock SMTP policy writes."""

    values = [
        ("From", "bob@hosted.test"),
        ("From", "B\u00f6b <bob@hosted.test>"),
        ("To", ", ".join(f"Someone Long {n} <someone.long.{n}@customer.test>"
                         for n in range(12))),
        ("Subject", "plain"),
        ("Subject", "caf\u00e9 " + encoded("d\u00e9j\u00e0 vu") + " word" * 40),
        ("Subject", encoded("caf\u00e9")),
        ("Subject", "caf\u00e9"),
        ("Subject", ""),
        ("Date", "Sun, 06 Dec 2026 23:43:01 +0000"),
        ("Message-ID", "<1.2.3@mx.test>"),
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("X-Own", "x" * 600),  # over MEMO_CHARS: parsed each time
    ]

    def setUp(self) -> None:
        _stored_field.cache_clear()
        self.addCleanup(_stored_field.cache_clear)

    def written(self, policy: Any, name: str, value: str) -> bytes:
        message = EmailMessage(policy=policy)
        message[name] = value
        message.set_content("body\n")
        return message.as_bytes()

    def test_the_bytes_are_the_stock_policys(self) -> None:
        for name, value in self.values:
            stock = self.written(email.policy.SMTP, name, value)
            for _ in range(3):  # parsed, then from the memo, folded, then kept
                self.assertEqual(self.written(SMTP, name, value), stock, (name, value))
        # A header object shared by two names (as `Message.__setitem__` never does): each
        # name is checked and written for itself.
        message = EmailMessage(policy=SMTP)
        message["Subject"] = "same"
        header = message["Subject"]
        self.assertEqual(SMTP.fold_binary("Subject", header), b"Subject: same\r\n")
        self.assertEqual(SMTP.fold_binary("Subject", header), b"Subject: same\r\n")
        with self.assertRaises(HeaderBreak):
            SMTP.fold_binary("Comments", header)

    def test_a_field_is_parsed_once_and_a_refused_one_each_time(self) -> None:
        made: list[tuple[str, str]] = []
        call = HeaderClasses.__call__

        def counted(registry: Any, name: str, value: str) -> Any:
            made.append((name, value))
            return call(registry, name, value)

        self.patch(HeaderClasses, "__call__", counted)
        for _ in range(3):
            message = EmailMessage(policy=SMTP)
            message["From"] = "bob@hosted.test"
            message["X-Own"] = "y" * (MEMO_CHARS + 1)
            message.set_content("body\n")
            message.as_bytes()
            with self.assertRaises(HeaderBreak):
                EmailMessage(policy=SMTP)["Subject"] = OneFieldTests.injection
        self.assertEqual(made.count(("From", "bob@hosted.test")), 1)
        self.assertEqual(made.count(("Content-Type", "text/plain")), 1)
        self.assertEqual(made.count(("X-Own", "y" * (MEMO_CHARS + 1))), 3)
        self.assertEqual(made.count(("Subject", OneFieldTests.injection)), 3)

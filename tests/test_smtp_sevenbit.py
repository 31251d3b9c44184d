"""8-bit mail made 7-bit for a next hop without 8BITMIME (RFC 6152 3)."""

from __future__ import annotations

from email import message_from_bytes
from email.message import Message
from email.policy import compat32

from twisted.trial.unittest import SynchronousTestCase

from mailcore.messages.parse import MimeLimits
from mailcore.smtp.sevenbit import seven_bit


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded body) of each leaf part, as a receiver reads them."""
    found = []
    for part in message_from_bytes(raw, policy=compat32).walk():
        if not part.is_multipart() and not isinstance(part.get_payload(), list):
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_content_type(), payload))
    return found


def cte_fields(raw: bytes) -> list[list[str]]:
    """The Content-Transfer-Encoding fields of each part (to see none is left twice)."""
    parts: list[Message] = list(message_from_bytes(raw, policy=compat32).walk())
    return [p.get_all("content-transfer-encoding") or [] for p in parts]


MIXED = (
    b"From: a@x.test\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
    b"preamble\r\n"
    b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding:\r\n 8bit\r\n\r\n"
    b"caf\xc3\xa9 au lait \r\n" + b"l" * 100 + b"\xc3\xa9\r\n=3D stays\r\n"
    b"--B\r\nContent-Type: application/octet-stream\r\n\r\n\x00\xff\xfe\r\nbin\xf0\r\n"
    b"--B\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"iVBORw0KGgo=\r\n"
    b"--B\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\xc3\xafve\r\n"
    b"--B--\r\nepilogue\r\n"
)


class SevenBitTests(SynchronousTestCase):
    def test_ascii_goes_out_untouched(self) -> None:
        raw = b"Subject: s\r\n\r\nplain\r\n"
        self.assertIs(seven_bit(raw), raw)

    def test_a_message_that_is_not_mime_becomes_quoted_printable_mime(self) -> None:
        raw = b"From: a@x.test\r\nSubject: s\r\n\r\ncaf\xc3\xa9 \r\n.dot\r\n" + \
            b"z" * 90 + b"\xc3\xa9\r\n"
        out = seven_bit(raw)
        self.assertTrue(out.isascii())
        self.assertTrue(out.startswith(
            b"From: a@x.test\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"))
        self.assertEqual(leaves(out), [("text/plain", raw.split(b"\r\n\r\n", 1)[1])])
        self.assertTrue(all(len(line) <= 76 for line in out.split(b"\r\n")))
        self.assertNotIn(b"\n", out.replace(b"\r\n", b""))  # CRLF line breaks only

    def test_each_part_keeps_its_bytes_and_only_8bit_leaves_are_encoded(self) -> None:
        out = seven_bit(MIXED)
        self.assertTrue(out.isascii())
        self.assertEqual(leaves(out), leaves(MIXED))
        # Headers, delimiters, preamble, epilogue and the part already in base64 are kept.
        for kept in (b"preamble\r\n--B\r\n", b"\r\n--B--\r\nepilogue\r\n",
                     b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--B\r\n",
                     b"--B\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n"):
            self.assertIn(kept, out)
        self.assertEqual(cte_fields(out), [
            [], ["quoted-printable"], ["base64"], ["base64"], [], ["quoted-printable"]])
        self.assertNotIn(b"MIME-Version: 1.0\r\nMIME-Version", out)

    def test_only_header_fields_8bit_goes_out_as_it_is(self) -> None:
        """Raw UTF-8 in a header field cannot be made 7-bit without rewriting the field."""
        raw = "Subject: caf\u00e9\r\n\r\nascii body\r\n".encode()
        self.assertEqual(seven_bit(raw), raw)

    def test_an_encoded_part_with_stray_8bit_octets_is_not_touched(self) -> None:
        raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\r\n"
        self.assertEqual(seven_bit(raw), raw)

    def test_bare_lf_lines_and_a_part_without_header_fields(self) -> None:
        raw = (b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nh\xc3\xa9\n--b--\n")
        out = seven_bit(raw)
        self.assertTrue(out.isascii())
        self.assertEqual(leaves(out), leaves(raw))

    def test_nesting_past_the_bounds_is_sent_as_it_is_not_encoded_as_a_leaf(self) -> None:
        """A multipart must keep an identity encoding (RFC 2046 5.1.1): past the parser's
        depth bound it goes out unconverted rather than base64 of its delimiters."""
        raw = b"Subject: deep\r\n"
        for i in range(6):
            raw += b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        raw += b"Content-Type: text/plain\r\n\r\n\xc3\xa9\r\n"
        out = seven_bit(raw, MimeLimits(max_depth=3))
        self.assertNotIn(b"base64", out)
        self.assertIn(b"\xc3\xa9", out)

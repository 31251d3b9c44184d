"""The Mail API's message building and parsing (mailcore.mailapi.mime) on their own."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import itertools
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from io import BytesIO
from unittest import mock
from urllib.parse import quote

from twisted.trial.unittest import TestCase

from mailcore.mailapi import mime
from mailcore.mailapi.mime import (
    MimeBounds,
    OutgoingPart,
    Parsed,
    build_message,
    parse_message,
)

RECIPIENTS = [f"rcpt{i}@customer.example.test" for i in range(12)]


class _Fixed:
    """`secrets` with one boundary."""

    @staticmethod
    def token_hex(n: int) -> str:
        return "ab" * n


class RoundTripTests(TestCase):
    def test_the_bytes_are_the_stock_policys(self) -> None:
        """Built with mailcore.emailpolicy.SMTP (its fields parsed and folded once) or with
        the stock SMTP policy, each message is the same bytes, the first time and again."""
        from mailcore.emailpolicy import SMTP, HeaderClasses, _stored_field
        from mailcore.mailapi import mime

        _stored_field.cache_clear()
        self.patch(mime, "make_msgid", lambda domain: f"<1.2.3@{domain}>")
        self.patch(mime, "secrets", _Fixed)
        stock = email.policy.SMTP.clone(header_factory=HeaderClasses())
        with_file = [OutgoingPart("r\u00c9port.pdf", "application/pdf",
                                  lambda: BytesIO(b"%PDF-1.4"))]
        built = []
        for _, policy in itertools.product(range(2), (SMTP, stock)):
            self.patch(mime, "SMTP", policy)
            for subject, to, parts in itertools.product(
                    ("hello", "Gr\u00fc\u00dfe " + "long " * 30, "=?utf-8?q?caf=C3=A9?="),
                    (RECIPIENTS, ["B\u00f6b <bob@far.test>"]), ([], with_file)):
                values = {"from": "bob@hosted.test", "subject": subject, "to": ", ".join(to),
                          "cc": "", "reply-to": "",
                          "body": "Gr\u00fc\u00dfe\n" + "a line of text\n" * 3}
                built.append(build_message(values, parts, "mx.test", 1.7e9))
        self.assertEqual(len(set(built)), 12)
        self.assertEqual(built[:12], built[12:24])
        self.assertEqual(built[:24], built[24:])

    def test_a_built_message_reads_back_as_written(self) -> None:
        values = {"from": "bob@hosted.test", "subject": "Gr\u00fc\u00dfe \u2013 " + "long " * 30,
                  "body": "Grüße\n" + "a line of text\n" * 20, "to": ", ".join(RECIPIENTS),
                  "cc": RECIPIENTS[0], "bcc": "hidden@far.test", "reply-to": "bob@hosted.test"}
        with_file = [OutgoingPart("rÉport.pdf", "application/pdf", lambda: BytesIO(b"%PDF-1.4"))]
        for parts, ending in itertools.product(([], with_file), ("\n", "", "\n\n")):
            values["body"] = values["body"].rstrip("\n") + ending
            raw = build_message(values, parts, "mx.hosted.test", 1.7e9)
            self.assertTrue(raw.split(b"\r\n\r\n", 1)[0].isascii())  # RFC 2047 words
            self.assertFalse([line for line in raw.split(b"\r\n") if len(line) > 78])
            self.assertNotIn(b"hidden@far.test", raw)
            parsed = parse_message(raw)
            self.assertEqual((parsed.subject, parsed.to, parsed.cc, parsed.reply_to),
                             (" ".join(values["subject"].split()), ", ".join(RECIPIENTS),
                              RECIPIENTS[0], "bob@hosted.test"))
            # A part before a boundary keeps the text's ending; a message's text ends
            # in a line break either way.
            self.assertEqual(parsed.body, values["body"] + ("" if parts or ending else "\n"))
            self.assertEqual([(a.name, a.data) for a in parsed.attachments],
                             [("rÉport.pdf", b"%PDF-1.4")] if parts else [])
            message = email.message_from_bytes(raw, policy=email.policy.default)
            self.assertEqual(message["Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
            self.assertTrue(message["Message-ID"].endswith("@mx.hosted.test>"))


def _peak(fn: Callable[[], object]) -> int:
    """The most memory (bytes) Python held above what it held before, while `fn` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HEAD = b"From: a@sender.test\r\nTo: bob@hosted.test\r\nSubject: hello\r\nMIME-Version: 1.0\r\n"


class HostileTests(TestCase):
    """Received mail (up to 50 MB from anyone) is bounded before the `email` package."""

    def test_a_long_field_of_encoded_words_is_decoded_plainly(self) -> None:
        word = b"=?utf-8?q?ab=C3=A9?= "
        raw = (b"From: a@sender.test\r\nSubject: " + word * (64 * 1024 // len(word))
               + b"\r\n\r\nbody\r\n")
        box: list[Parsed] = []
        peak = _peak(lambda: box.append(parse_message(raw)))
        self.assertLess(peak, 16 << 20)  # the package's header parser took 135 MiB (2 GB
        # for 256 KiB)
        self.assertTrue(box[0].subject.startswith("abéabé"))
        self.assertEqual((box[0].mail_from, box[0].body), ("a@sender.test", "body\n"))

    def test_a_long_field_of_a_part_is_cut_before_it_is_parsed(self) -> None:
        word = b"=?utf-8?q?ab=C3=A9?= "
        raw = (HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n'
               b"--zz\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
               b'--zz\r\nContent-Disposition: attachment; filename="'
               + word * (64 * 1024 // len(word)) + b'"\r\n\r\nxx\r\n--zz--\r\n')
        box: list[Parsed] = []
        peak = _peak(lambda: box.append(parse_message(raw)))
        self.assertLess(peak, 24 << 20)  # the header parser read it whole: 143 MiB
        [attachment] = box[0].attachments
        self.assertTrue(attachment.name.startswith("abéabé"))
        self.assertEqual((box[0].body, attachment.data), ("hi", b"xx"))

    def test_a_body_of_a_million_short_lines_is_not_walked(self) -> None:
        raw = (HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: "
               b"quoted-printable\r\n\r\n" + b"a=\r\n" * 1_100_000)
        box: list[Parsed] = []
        peak = _peak(lambda: box.append(parse_message(raw)))
        self.assertLess(peak, 16 << 20)  # an object per line: 100 MiB and more
        self.assertEqual((box[0].subject, box[0].to, box[0].body, box[0].attachments),
                         ("hello", "bob@hosted.test", "", []))

    def test_too_many_parts_or_too_deep_gives_the_header_fields_only(self) -> None:
        parts = b"".join(b"--zz\r\nContent-Disposition: attachment; filename=a%d\r\n\r\nx\r\n"
                         % i for i in range(3000))
        many = (HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n' + parts
                + b"--zz--\r\n")
        deep = HEAD + b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
                               % (i, i) for i in range(1000)) + b"\r\nx\r\n"
        nested = HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 1000 + b"\r\nx\r\n"
        for raw in (many, deep, nested):
            # 3,000 parts took 1.4 s of CPU; 1,000 levels raised RecursionError (delivery
            # failed, deferred until the queue's lifetime bounced it)
            parsed = parse_message(raw)
            self.assertEqual((parsed.subject, parsed.to, parsed.body, parsed.attachments),
                             ("hello", "bob@hosted.test", "", []))
        # Within the bounds, the parts are taken out as before.
        fewer = HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n' + b"".join(
            b"--zz\r\nContent-Disposition: attachment; filename=a%d\r\n\r\nx\r\n" % i
            for i in range(50)) + b"--zz--\r\n"
        self.assertEqual(len(parse_message(fewer).attachments), 50)
        # Lines starting "--" that are no delimiters (an SQL file's comments) are no parts.
        sql = b"".join(b"-- step %d\r\nselect %d;\r\n" % (i, i) for i in range(3000))
        text = (HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
                b"Content-Type: text/plain\r\n\r\nsee the file\r\n--zz\r\n"
                b"Content-Disposition: attachment; filename=steps.sql\r\n\r\n" + sql
                + b"--zz--\r\n")
        parsed = parse_message(text)
        self.assertEqual((parsed.body, [(a.name, a.data) for a in parsed.attachments]),
                         ("see the file", [("steps.sql", sql[:-2])]))

    def test_a_header_section_past_its_bound_is_read_up_to_it(self) -> None:
        raw = HEAD + b"X-Filler: " + b"f" * 70 + b"\r\n" * 1 + (
            b"X-Filler: " + b"f" * 70 + b"\r\n") * 200_000 + b"Cc: late@x.test\r\n\r\nbody\r\n"
        parsed = parse_message(raw)
        self.assertEqual((parsed.subject, parsed.cc, parsed.body), ("hello", "", ""))


def _with_attachment(data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
            b"Content-Type: text/plain\r\n\r\nsee the file\r\n--zz\r\n"
            b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=big.pdf\r\n\r\n" + encoded
            + b"--zz--\r\n")


class LargeMessageTests(TestCase):
    """A message as large as the SMTP server takes is read holding about itself: the email
    package reads it with its larger bodies cut out (mailcore.messages.parts.hollow), and
    those are decoded from the message a slice at a time."""

    def test_a_large_attachment_is_decoded_a_slice_at_a_time(self) -> None:
        data = bytes(range(256)) * (6 * 4096)  # 6 MiB, 8 MiB as base64
        raw = _with_attachment(data)
        sizes: list[int] = []
        digest = hashlib.sha256()

        def read() -> None:
            parsed = parse_message(raw)
            for attachment in parsed.attachments:
                for chunk in attachment.chunks():
                    digest.update(chunk)
                    sizes.append(len(chunk))
            self.assertEqual(parsed.body, "see the file")

        peak = _peak(read)
        # The package held the message as text, its lines, the part's payload and the
        # decoded bytes: 63 MiB for this 8 MiB one (411 MB for 53 MB).
        self.assertLess(peak, 2 << 20)
        self.assertEqual((sum(sizes), digest.digest()), (len(data), hashlib.sha256(data).digest()))
        self.assertLess(max(sizes), 1 << 20)

    def test_a_long_text_is_cut_and_kept_whole_as_an_attachment(self) -> None:
        line = "Grüße, line {} of a long letter\r\n"
        text = "".join(line.format(i) for i in range(60_000))
        raw = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
        box: list[Parsed] = []
        peak = _peak(lambda: box.append(parse_message(raw)))
        self.assertLess(peak, 8 << 20)  # the package's copies: 26 MiB for 2 MiB
        parsed = box[0]
        bound = MimeBounds().max_body_chars
        self.assertEqual(parsed.body, text.replace("\r\n", "\n")[:bound])
        [whole] = parsed.attachments
        self.assertEqual((whole.name, whole.content_type, whole.data),
                         ("body.txt", "text/plain; charset=utf-8", text.encode()))

    def test_one_long_line_is_not_held_several_times(self) -> None:
        raw = HEAD + b"\r\n" + b"x" * (8 << 20) + b"\r\n"
        box: list[Parsed] = []
        peak = _peak(lambda: box.append(parse_message(raw)))
        self.assertLess(peak, 8 << 20)  # 10 times the line: 80 MiB (539 MB for 50 MB)
        self.assertEqual(box[0].body, "x" * MimeBounds().max_body_chars)

    def test_a_part_read_otherwise_by_the_package_falls_back_to_reading_it_whole(self) -> None:
        # A line of an attachment that starts like a delimiter of the message ("--zz" then
        # more): no delimiter, but the cut-out bodies are read whole rather than guessed.
        data = b"--zzlike a delimiter\r\n" + b"y" * 20_000 + b"\r\n"
        raw = (HEAD + b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--zz\r\n'
               b"Content-Type: text/plain\r\n\r\nhi\r\n--zz\r\n"
               b"Content-Disposition: attachment; filename=a.txt\r\n\r\n" + data
               + b"--zz--\r\n")
        parsed = parse_message(raw)
        self.assertEqual([(a.name, a.data) for a in parsed.attachments],
                         [("a.txt", data[:-2])])
        # Base64 that does not decode cleanly is decoded by the package, as before.
        broken = _with_attachment(b"q" * 30_000).replace(b"cXFx", b"cX=x", 1)
        [attachment] = parse_message(broken).attachments
        whole = email.message_from_bytes(broken, policy=email.policy.default)
        parts = list(whole.walk())
        self.assertEqual(attachment.data, parts[-1].get_payload(decode=True))


def _forwarded(inner: bytes, head: bytes = b"") -> bytes:
    """A message with `inner` attached as a message/rfc822 part (forward as attachment)."""
    return (HEAD + b'Content-Type: multipart/mixed; boundary="fw"\r\n\r\n--fw\r\n'
            b"Content-Type: text/plain\r\n\r\nforwarded, see below\r\n--fw\r\n"
            b'Content-Type: message/rfc822; name="original.eml"\r\n' + head
            + b'Content-Disposition: attachment; filename="original.eml"\r\n\r\n' + inner
            + b"\r\n--fw--\r\n")


class AttachedMessageTests(TestCase):
    """A mail forwarded as an attachment (message/rfc822) is its bytes as they stand in the
    message: the email package makes a message of such a part and gives it no bytes
    (get_payload(decode=True) is None), so it was stored as an empty file."""

    INNER = (b"From: Carol <carol@far.test>\r\nTo: a@far.test\r\nSubject: original\r\n"
             b"Message-ID: <o@far.test>\r\n\r\nThe original text.\r\n")

    def test_an_attached_message_is_its_bytes(self) -> None:
        parsed = parse_message(_forwarded(self.INNER))
        [attachment] = parsed.attachments
        self.assertEqual((attachment.name, attachment.content_type, attachment.data),
                         ("original.eml", "message/rfc822", self.INNER))
        self.assertEqual(b"".join(attachment.chunks()), self.INNER)  # b"" on the old code
        self.assertEqual(parsed.body, "forwarded, see below")

    def test_one_whose_parts_were_cut_out_is_whole(self) -> None:
        # Its large bodies are markers in what the package read: the bytes come from the
        # message itself, with them.
        data = base64.encodebytes(bytes(range(256)) * 100).replace(b"\n", b"\r\n")
        inner = (b"From: c@far.test\r\nSubject: with a file\r\n"
                 b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n--in\r\n'
                 b"Content-Type: text/plain\r\n\r\n" + b"x" * 20_000 + b"\r\n--in\r\n"
                 b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
                 b"\r\n" + data + b"--in--\r\n")
        for bounds in (MimeBounds(), MimeBounds(hollow_above=16)):
            [attachment] = parse_message(_forwarded(inner), bounds).attachments
            self.assertEqual(b"".join(attachment.chunks()), inner)

    def test_a_transfer_encoded_one_is_decoded(self) -> None:
        encoded = base64.encodebytes(self.INNER).replace(b"\n", b"\r\n")
        raw = _forwarded(encoded, b"Content-Transfer-Encoding: base64\r\n")
        [attachment] = parse_message(raw).attachments
        self.assertEqual(attachment.data, self.INNER)

    def test_one_not_found_in_the_message_is_written_out_by_the_package(self) -> None:
        # Where the walk of the raw message does not match the package's tree, the
        # package writes the attached message out, from the message read whole (the one it
        # read first holds markers in place of its large bodies).
        big = b"y" * 20_000
        raw = _forwarded(b"From: c@far.test\r\nSubject: big\r\n\r\n" + big + b"\r\n")
        with mock.patch.object(mime, "_encapsulated", return_value={}):
            [attachment] = parse_message(raw, MimeBounds(hollow_above=16)).attachments
        whole = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(whole, EmailMessage)
        [attached] = whole.iter_attachments()
        payload = attached.get_payload()
        assert isinstance(payload, list)
        [inner] = payload
        assert isinstance(inner, EmailMessage)
        self.assertEqual(attachment.data, inner.as_bytes())
        self.assertIn(big, attachment.data)

    def test_a_bounces_delivery_status_is_its_bytes(self) -> None:
        # The package reads its body as header blocks: an empty file on the old code, in
        # every bounce that comes back to a sender's inbox.
        status = (b"Reporting-MTA: dns; mx.far.test\r\n\r\nFinal-Recipient: rfc822; "
                  b"x@far.test\r\nAction: failed\r\nStatus: 5.1.1\r\n")
        raw = (HEAD + b'Content-Type: multipart/report; report-type=delivery-status; '
               b'boundary="r"\r\n\r\n--r\r\nContent-Type: text/plain\r\n\r\nnot delivered\r\n'
               b"--r\r\nContent-Type: message/delivery-status\r\n\r\n" + status
               + b"\r\n--r\r\nContent-Type: message/rfc822\r\n\r\n" + self.INNER
               + b"\r\n--r--\r\n")
        self.assertEqual([(a.content_type, a.data) for a in parse_message(raw).attachments],
                         [("message/delivery-status", status),
                          ("message/rfc822", self.INNER)])


class ReceivedNameTests(TestCase):
    def test_a_received_name_loses_its_path_and_bidirectional_controls(self) -> None:
        # RFC 2183 2.3: no directory information is taken from a file name; and
        # "invoice\u202efdp.exe" reads as "invoiceexe.pdf" (both kept on the old code).
        def named(filename: str) -> str:
            raw = (HEAD + b'Content-Type: multipart/mixed; boundary="n"\r\n\r\n--n\r\n'
                   b"Content-Type: text/plain\r\n\r\nhi\r\n--n\r\n"
                   b"Content-Type: application/octet-stream\r\nContent-Disposition: "
                   b"attachment; filename*=utf-8''" + quote(filename, safe="").encode()
                   + b"\r\n\r\nx\r\n--n--\r\n")
            [attachment] = parse_message(raw).attachments
            return attachment.name

        self.assertEqual(named("../../etc/passwd"), "passwd")
        self.assertEqual(named("invoice\u202efdp.exe"), "invoicefdp.exe")
        self.assertEqual(named("dir\\"), "attachment-1")
        self.assertEqual(named("r\u00e9sum\u00e9.pdf"), "r\u00e9sum\u00e9.pdf")


class UnknownCharsetTests(TestCase):
    def test_a_text_in_a_charset_python_does_not_know_is_read_not_dropped(self) -> None:
        # "unknown-8bit" (RFC 1428) and misspelt labels: the email package raises
        # LookupError and the mail was stored with no body at all.
        for label in (b"unknown-8bit", b"x-nonexistent", b"hex"):
            for text in (b"caf\xe9 ol\xe9", b"caf\xe9 " + b"z" * 20_000):  # read whole, cut out
                raw = (HEAD + b"Content-Type: text/plain; charset=" + label + b"\r\n\r\n"
                       + text + b"\r\n")
                self.assertEqual(parse_message(raw).body,
                                 text.decode("windows-1252") + "\n", label)
        raw = HEAD + b"Content-Type: text/plain; charset=x-nonexistent\r\n\r\nna\xc3\xafve\r\n"
        self.assertEqual(parse_message(raw).body, "na\u00efve\n")  # UTF-8 when it is


def _multipart(content_type: bytes, boundary: bytes, *parts: bytes) -> bytes:
    return (b"Content-Type: " + content_type + b'; boundary="' + boundary + b'"\r\n\r\n'
            + b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
            + b"--" + boundary + b"--\r\n")


class NestedPartsTests(TestCase):
    """A multipart the package names as an attachment (the signed part of an S/MIME or
    PGP/MIME signed mail, a mixed part within a mixed one) is given as its parts: it was
    one attachment of no bytes, `multipart/mixed`, and the files in it were nowhere."""

    TEXT = b"Content-Type: text/plain\r\n\r\nhello"
    SIGNATURE = (b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
                 b"Content-Disposition: attachment; filename=smime.p7s\r\n\r\nMIAGCSqG")

    @staticmethod
    def pdf(data: bytes) -> bytes:
        return (b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
                b"Content-Disposition: attachment; filename=report.pdf\r\n\r\n"
                + base64.encodebytes(data).replace(b"\n", b"\r\n"))

    def test_a_signed_mails_files_are_its_attachments(self) -> None:
        for data in (b"%PDF-1.4 small", bytes(range(256)) * 400):  # read whole, cut out
            signed = _multipart(b'multipart/signed; protocol="application/pkcs7-signature"',
                                b"s", _multipart(b"multipart/mixed", b"m", self.TEXT,
                                                 self.pdf(data)), self.SIGNATURE)
            parsed = parse_message(HEAD + signed)
            self.assertEqual(parsed.body, "hello")
            self.assertEqual([(a.name, a.content_type, a.data) for a in parsed.attachments],
                             [("report.pdf", "application/pdf", data),
                              ("smime.p7s", "application/pkcs7-signature", b"MIAGCSqG")])

    def test_a_digests_messages_are_its_attachments(self) -> None:
        # One empty attachment, multipart/digest, on the old code.
        one = b"From: c@far.test\r\nSubject: one\r\n\r\nfirst\r\n"
        two = b"From: d@far.test\r\nSubject: two\r\n\r\nsecond\r\n"
        raw = HEAD + _multipart(b"multipart/mixed", b"o", self.TEXT, _multipart(
            b"multipart/digest", b"d", b"\r\n" + one, b"\r\n" + two))
        self.assertEqual([(a.content_type, a.data) for a in parse_message(raw).attachments],
                         [("message/rfc822", one), ("message/rfc822", two)])

    def test_a_mixed_part_within_a_mixed_one_gives_its_text_and_files(self) -> None:
        raw = HEAD + _multipart(b"multipart/mixed", b"o", self.TEXT, _multipart(
            b"multipart/mixed", b"i", self.pdf(b"one"),
            b"Content-Type: text/plain\r\n\r\nsecond text"))
        parsed = parse_message(raw)
        self.assertEqual(parsed.body, "hello")
        self.assertEqual([(a.name, a.content_type, a.data) for a in parsed.attachments],
                         [("attachment-1", "text/plain", b"second text"),
                          ("report.pdf", "application/pdf", b"one")])

    def test_a_message_that_is_an_attached_one_has_it_as_its_attachment(self) -> None:
        # Content-Type: message/rfc822 at its top: no body, no attachment on the old code.
        inner = b"From: c@far.test\r\nSubject: inner\r\n\r\ninner body\r\n"
        parsed = parse_message(HEAD + b"Content-Type: message/rfc822\r\n\r\n" + inner)
        self.assertEqual([(a.name, a.content_type, a.data) for a in parsed.attachments],
                         [("attachment-1", "message/rfc822", inner)])

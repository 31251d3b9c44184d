"""Parsing raw messages: RFC 2047/2231, charsets, addresses, dates, attachments, and bounds
that keep hostile MIME cheap."""

from __future__ import annotations

import datetime
import time
import tracemalloc
from dataclasses import asdict
from email.message import Message

from twisted.trial.unittest import TestCase

from mailcore.messages.parse import (
    MimeLimits,
    ParsedMessage,
    decode_header_value,
    extract_part,
    parse_message,
    subject_key,
)


def msg(headers: str, body: bytes = b"body\r\n") -> bytes:
    return headers.replace("\n", "\r\n").encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


class HeaderDecodingTests(TestCase):
    def test_rfc2047_b_and_q_words_adjacent_words_joined(self) -> None:
        self.assertEqual(
            decode_header_value("=?utf-8?b?Q2Fmw6k=?= =?iso-8859-1?q?_cr=E8me?= au lait"),
            "Café crème au lait",
        )

    def test_folded_header_and_unknown_charset_fall_back(self) -> None:
        self.assertEqual(decode_header_value("Hello\r\n  =?x-bogus?q?w=C3=B6rld?="),
                         "Hello  wörld")

    def test_a_word_in_a_codec_that_is_no_text_encoding_is_read_as_text(self) -> None:
        # codecs knows "hex", "zlib", "rot13", "uu" (bytes to bytes: str.decode refuses
        # them) and "idna" (no errors="replace"): a sender's word labelled so raised, and
        # the whole message was stored "unreadable", with its raw headers only.
        for label in ("hex", "zlib", "rot13", "uu", "idna", "base64"):
            self.assertEqual(decode_header_value(f"=?{label}?q?abc?= x"), "abc x", label)
        parsed = parse_message(msg("Subject: =?hex?q?win?= a prize\nFrom: s@x.test"))
        self.assertEqual((parsed.subject, parsed.sender, parsed.problems),
                         ("win a prize", "s@x.test", []))

    def test_eight_bit_headers_as_utf8_or_cp1252(self) -> None:
        raw = b"Subject: r\xc3\xa9sum\xc3\xa9\r\nFrom: Fran\xe7ois <f@x.test>\r\n\r\nx\r\n"
        parsed = parse_message(raw)
        self.assertEqual(parsed.subject, "résumé")
        self.assertEqual(parsed.sender, "François <f@x.test>")
        self.assertEqual(parsed.sender_address, "f@x.test")

    def test_addresses_dates_ids(self) -> None:
        raw = msg(
            "From: =?utf-8?q?Zo=C3=AB?= <Zoe@Example.TEST>\n"
            "To: a@x.test, \"B, C\" <b@x.test>\nCc: c@x.test\n"
            "Date: Tue, 1 Oct 2024 10:00:00 +0200\n"
            "Message-ID:  <id-1@x.test> \nIn-Reply-To: <p@x> (comment)\n"
            "References: <a@x>\n <b@x> <p@x>"
        )
        p = parse_message(raw)
        self.assertEqual(p.sender, "Zoë <Zoe@Example.TEST>")
        self.assertEqual(p.sender_address, "zoe@example.test")
        self.assertEqual(p.recipient, "a@x.test, B, C <b@x.test>")
        self.assertEqual(p.cc, "c@x.test")
        self.assertEqual(p.date, datetime.datetime(2024, 10, 1, 8, 0, tzinfo=datetime.UTC))
        self.assertEqual(p.message_id, "<id-1@x.test>")
        self.assertEqual(p.in_reply_to, "<p@x>")
        self.assertEqual(p.references, ["<a@x>", "<b@x>", "<p@x>"])
        self.assertEqual(p.thread_refs, ["<a@x>", "<b@x>", "<p@x>"])

    def test_bad_date_is_none(self) -> None:
        self.assertIsNone(parse_message(msg("Date: the day after tomorrow")).date)

    def test_subject_key_strips_reply_prefixes_and_list_tags(self) -> None:
        self.assertEqual(subject_key("Re: [list] AW: Fwd:  Hello  World"), ("hello world", True))
        self.assertEqual(subject_key("Hello"), ("hello", False))
        self.assertEqual(subject_key("Re[2]: Hello"), ("hello", True))


class BodyAndAttachmentTests(TestCase):
    def test_charsets_of_bodies(self) -> None:
        cases = [
            ("iso-8859-1", "Garçon déjà".encode("iso-8859-1"), "Garçon déjà"),
            ("windows-1252", "“quoted” €".encode("windows-1252"), "“quoted” €"),
            ("koi8-r", "Привет".encode("koi8-r"), "Привет"),
            ("shift_jis", "日本語".encode("shift_jis"), "日本語"),
            ("x-unknown-thing", "naïve".encode(), "naïve"),
            ("us-ascii", "naïve".encode(), "naïve"),
        ]
        for charset, body, text in cases:
            raw = msg(f"Content-Type: text/plain; charset={charset}\n"
                      "Content-Transfer-Encoding: 8bit", body)
            self.assertEqual(parse_message(raw).body_text, text, charset)

    def test_quoted_printable_and_base64_bodies(self) -> None:
        raw = msg("Content-Type: text/plain; charset=utf-8\n"
                  "Content-Transfer-Encoding: quoted-printable", b"caf=C3=A9 =\r\nau lait\r\n")
        self.assertEqual(parse_message(raw).body_text, "café au lait\r\n")

    def test_multipart_alternative_with_attachments(self) -> None:
        raw = msg(
            'Content-Type: multipart/mixed; boundary="outer"',
            b"--outer\r\n"
            b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
            b"--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain \xe2\x9c\x93\r\n"
            b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n"
            b"--inner--\r\n"
            b"--outer\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment;\r\n"
            b" filename*0*=utf-8''%E6%97%A5%E6%9C%AC;\r\n filename*1*=%E8%AA%9E.bin\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n"
            b"--outer\r\nContent-Type: image/png\r\nContent-ID: <img1>\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\niVBORw==\r\n"
            b"--outer\r\nContent-Type: application/pdf;\r\n"
            b" name=\"=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\"\r\n"
            b"\r\nPDF\r\n"
            b"--outer--\r\n",
        )
        p = parse_message(raw)
        self.assertEqual(p.body_text, "plain ✓")
        self.assertEqual(p.body_html, "<p>html</p>")
        self.assertTrue(p.has_attachments)
        self.assertEqual(
            [(a.part_path, a.filename, a.mime_type, a.size) for a in p.attachments],
            [("2", "日本語.bin", "application/octet-stream", 4),
             ("3", "", "image/png", 4),
             ("4", "résumé.pdf", "application/pdf", 3)],
        )
        self.assertEqual(p.attachments[1].content_id, "<img1>")
        self.assertEqual(extract_part(raw, "2"), b"\x00\x01\x02\x03")
        self.assertIsNone(extract_part(raw, "9"))

    def test_attached_message_is_an_attachment(self) -> None:
        inner = b"Subject: inner\r\n\r\ninner body\r\n"
        raw = msg('Content-Type: multipart/mixed; boundary="b"',
                  b"--b\r\nContent-Type: text/plain\r\n\r\nouter\r\n"
                  b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"--b--\r\n")
        p = parse_message(raw)
        self.assertEqual(p.body_text, "outer")
        self.assertEqual([a.mime_type for a in p.attachments], ["message/rfc822"])
        self.assertIn(b"inner body", extract_part(raw, "2") or b"")


class HostileMimeTests(TestCase):
    def assertQuick(self, started: float, limit: float = 5.0) -> None:
        self.assertLess(time.monotonic() - started, limit)

    def test_too_many_parts_is_bounded(self) -> None:
        parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\np%d\r\n" % i
                         for i in range(5000))
        raw = msg('Content-Type: multipart/mixed; boundary="b"', parts + b"--b--\r\n")
        started = time.monotonic()
        p = parse_message(raw, MimeLimits(max_parts=200))
        self.assertQuick(started)
        self.assertTrue(any("MIME parts" in problem for problem in p.problems))
        self.assertLessEqual(len(p.attachments), 200)

    def test_parts_without_content_type_are_counted_before_they_are_built(self) -> None:
        # an empty header block makes a part: 300,000 such (3.3 MB) took 38.7 s of CPU
        for eol in (b"\r\n", b"\n", b"\r"):
            raw = msg('Content-Type: multipart/mixed; boundary="zz"',
                      (b"--zz" + eol + eol + b"x" + eol) * 40_000 + b"--zz--\r\n")
            tracemalloc.start()
            try:
                p = parse_message(raw)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertEqual(p.problems, ["more than 1000 MIME parts; not parsed"], eol)
            self.assertEqual((p.attachments, p.body_text), ([], ""))
            self.assertLess(peak, 6 << 20)  # building the 40,000 parts took 15 MiB
        raw = msg('Content-Type: multipart/digest; boundary="zz"',
                  b"--zz\r\n\r\nSubject: s\r\n\r\nx\r\n" * 15 + b"--zz--\r\n")
        p = parse_message(raw, MimeLimits(max_parts=5))
        self.assertEqual(p.problems, ["more than 5 MIME parts; not parsed"])

    def test_lines_starting_with_dashes_are_not_parts(self) -> None:
        sql = b"".join(b"-- step %d\r\nselect %d;\r\n" % (i, i) for i in range(3000))
        raw = msg('Content-Type: multipart/mixed; boundary="zz"',
                  b"--zz\r\nContent-Type: text/plain\r\n\r\n" + sql
                  + b"--zz\r\n\r\nsecond\r\n--zz--\r\n")
        p = parse_message(raw)
        self.assertEqual(p.problems, [])
        self.assertIn("select 2999;", p.body_text)
        self.assertEqual(extract_part(raw, "2"), b"second")
        leaf = msg("Subject: dump", sql)
        self.assertEqual(parse_message(leaf).problems, [])

    def test_deep_nesting_is_bounded(self) -> None:
        depth = 3000
        opening = b"".join(
            b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
            for i in range(depth)
        )
        raw = msg('Content-Type: multipart/mixed; boundary="b0"', opening + b"leaf\r\n")
        started = time.monotonic()
        p = parse_message(raw)
        self.assertQuick(started)
        self.assertTrue(p.problems)
        self.assertEqual(p.size, len(raw))

    def test_nesting_within_container_bound_but_over_depth_bound(self) -> None:
        depth = 40
        opening = b"".join(
            b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
            for i in range(depth)
        )
        raw = msg('Content-Type: multipart/mixed; boundary="b0"', opening + b"leaf\r\n")
        p = parse_message(raw, MimeLimits(max_depth=10))
        self.assertTrue(any("nesting deeper than 10" in problem for problem in p.problems))

    def test_huge_header_block_is_truncated(self) -> None:
        raw = b"Subject: big\r\n" + b"X-Junk: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\nbody\r\n"
        started = time.monotonic()
        p = parse_message(raw, MimeLimits(max_header_bytes=64 * 1024))
        self.assertQuick(started)
        self.assertEqual(p.subject, "big")
        self.assertTrue(any("header block" in problem for problem in p.problems))
        self.assertLessEqual(len(p.headers), 64 * 1024)

    def test_address_parser_overflow_leaves_the_field_empty(self) -> None:
        """The email package's address parser recurses once per "(": a From of 2,000 (or
        100,000) of them raised RecursionError out of parse_message."""
        for n in (2000, 100_000):
            raw = msg("From: " + "(" * n + "\nTo: bob@y.test\nSubject: parens")
            p = parse_message(raw)
            self.assertEqual((p.subject, p.sender, p.recipient), ("parens", "", "bob@y.test"))
            self.assertIn("From header unreadable (RecursionError); left empty", p.problems)

    def test_deeply_attached_message_is_kept_without_its_size(self) -> None:
        """A message/rfc822 nested 400 deep: writing it out to size it recursed once per
        level and raised RecursionError out of parse_message."""
        nested = b"Content-Type: text/plain\r\n\r\nhello\r\n"
        for _ in range(400):
            nested = b"Content-Type: message/rfc822\r\n\r\n" + nested
        p = parse_message(b"From: a@b.test\r\nSubject: deep\r\n" + nested)
        self.assertEqual((p.subject, p.sender), ("deep", "a@b.test"))
        self.assertEqual([(a.mime_type, a.size) for a in p.attachments],
                         [("message/rfc822", 0)])
        self.assertIn("part 1: attached message nested deeper than 20; its size not known",
                      p.problems)

    def test_a_deeply_attached_message_is_cut_as_it_stands_in_the_raw_message(self) -> None:
        """Writing a message/rfc822 nested 400 deep out recursed once per level: its
        download raised RecursionError. It is its bytes in the raw message now; one within
        the depth bound is still written out by the email package."""
        nested = b"Content-Type: text/plain\r\n\r\nhello\r\n"
        for _ in range(400):
            nested = b"Content-Type: message/rfc822\r\n\r\n" + nested
        alone = b"From: a@b.test\r\nSubject: deep\r\n" + nested
        self.assertEqual(extract_part(alone, "1"), nested.split(b"\r\n\r\n", 1)[1])
        inside = (b"From: a@b.test\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
                  b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                  b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
                  b"--b\r\n" + nested + b"--b--\r\n")
        self.assertEqual(extract_part(inside, "2"), nested.split(b"\r\n\r\n", 1)[1][:-2])
        shallow = b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nhello\r\n"
        self.assertEqual(extract_part(b"From: a@b.test\r\n" + shallow, "1"),
                         b"Subject: x\n\nhello\n")

    def test_an_unforeseen_error_keeps_the_raw_headers(self) -> None:
        """Whatever else the email package raises on a message, it is kept with its raw
        header block and the error named, and never fails its batch."""
        import mailcore.messages.parse as parse

        def broken(raw: bytes) -> None:
            raise RuntimeError("unforeseen")

        self.patch(parse, "_single_part", broken)
        raw = msg("Subject: kept\nFrom: a@b.test")
        p = parse_message(raw)
        self.assertEqual(p.problems, ["message unreadable (RuntimeError); raw headers only"])
        self.assertEqual(p.headers, "Subject: kept\r\nFrom: a@b.test")
        self.assertEqual(p.size, len(raw))

    def test_garbage_never_raises(self) -> None:
        for raw in (b"", b"\x00\xff" * 1000, b"no headers at all", b"\r\n\r\n\r\n",
                    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
                    b"Content-Type: text/plain; charset=\"\r\n\r\nx"):
            p = parse_message(raw)
            self.assertEqual(p.size, len(raw))


class FastPathTests(TestCase):
    """The shortcuts for the usual message (one leaf part; plain From/To) give what the email
    package's general parsers give, and step aside for anything else."""

    def test_single_leaf_tree_matches_the_full_parser(self) -> None:
        from email import message_from_bytes

        from mailcore.messages.parse import _single_part

        for raw in [
            msg("Subject: x\nContent-Type: text/plain", b"a\r\nb\rc\nd\x00\xe9"),
            msg("Subject: x\nContent-Transfer-Encoding: base64", b"aGk=\r\n"),
            msg("Content-Type: application/pdf; name=x.pdf", b"%PDF"),
            b"Subject: x\n\nbody without CR\n",
        ]:
            fast, full = _single_part(raw), message_from_bytes(raw)
            assert fast is not None
            self.assertEqual(fast.items(), full.items())
            self.assertEqual(fast.get_payload(), full.get_payload())
            self.assertEqual(fast.get_payload(decode=True), full.get_payload(decode=True))

    def test_single_leaf_steps_aside(self) -> None:
        from mailcore.messages.parse import _single_part

        for raw in [
            msg("Content-Type: multipart/mixed; boundary=b", b"--b\r\n\r\nx\r\n--b--\r\n"),
            msg("Content-Type: message/rfc822", b"Subject: inner\r\n\r\nx\r\n"),
            b"Subject: no blank line\r\n",  # headers only
            b"Subject: x\r\nnot a header\r\n\r\nbody",  # the parser ends the headers early
            b"Subject: x\rY: z\r\rbody\r\n\r\n",  # a bare CR blank line ends them too
        ]:
            self.assertIsNone(_single_part(raw), raw)

    def test_plain_addresses_match_the_general_parser(self) -> None:
        from mailcore.messages import parse

        for value in ["Sender 5 <s5@example.test>", "  A  B\t<a.b+c@x-y.z> ", "s@EX.test",
                      "123 <A@B.COM>"]:
            fast = parse._plain_address([value])
            self.assertIsNotNone(fast, value)
            self.assertEqual(fast, parse._parsed_addresses([value]), value)
        for value in ['"Q, N" <q@x>', "=?utf-8?q?J=C3=BC?= <j@x>", "J. Smith <j@x>",
                      "a@b, c@d", "N <a@b> (c)", "N\r\n <a@b>", "<a@b>", "a..b@c"]:
            self.assertIsNone(parse._plain_address([value]), value)
        self.assertIsNone(parse._plain_address(["a@b", "c@d"]))


class HeaderReaderTests(TestCase):
    """The usual single-part message is read without the email package's parser
    (mailcore.messages.headerblock), and every field comes out as the email package's full
    parse gives it; anything that parser reads another way goes to it."""

    def full_parse(self, raw: bytes) -> ParsedMessage:
        """`parse_message` with every shortcut off: the email package parses it all."""
        from mailcore.messages import parse

        single = parse._single_part
        parse._single_part = lambda raw: None  # type: ignore[assignment]
        try:
            return parse_message(raw)
        finally:
            parse._single_part = single

    def test_every_field_equals_the_full_parse_on_a_generated_corpus(self) -> None:
        from mailcore.messages.parse import _single_part
        from tests.support import mimegen
        from tests.support.corpus import make_corpus

        bench_like = [msg(f"From: Sender {n} <sender{n}@example.test>\nTo: Bench Owner "
                          f"<owner@example.test>\nSubject: Re: Topic {n} kalo mine\n"
                          f"Message-ID: <bench-{n}@bench.test>\nDate: 0{1 + n % 9} Oct 2024 "
                          f"10:00:00 +0000\nMIME-Version: 1.0\nContent-Type: text/plain; "
                          f"charset=utf-8\nIn-Reply-To: <bench-{n - 1}@bench.test>\n"
                          f"References: <bench-0@bench.test> <bench-{n - 1}@bench.test>",
                          b"Message %d token.\r\n" % n * 40) for n in range(1, 50)]
        raws = bench_like + [m.raw for m in make_corpus(0, 200)] + mimegen.corpus(17, 2500)
        read = 0
        for raw in raws:
            if _single_part(raw) is not None:
                read += 1
            self.assertEqual(asdict(parse_message(raw)), asdict(self.full_parse(raw)), raw)
        self.assertGreater(read, len(raws) // 4)
        self.assertLess(read, len(raws) - len(raws) // 4)

    def test_headers_that_end_early_keep_an_8bit_body_with_an_rfc2231_charset(self) -> None:
        """A header block that ends at a line that is no header field (here "X-Mailer :"),
        8-bit bytes after it and a charset given as an RFC 2231 parameter: the old shortcut
        asked the email package for the payload it had parsed from the header block alone,
        which raised TypeError (the charset a tuple), so the message was stored as "MIME
        structure unreadable", headers only, though the email package reads it."""
        raw = msg("Subject: kept\nContent-Type: text/plain; charset*=utf-8''x\n"
                  "X-Mailer : odd\nFrom: caf\udcc3\udca9 <a@b.test>", b"caf\xc3\xa9 \x00\r\n")
        p = parse_message(raw)
        self.assertEqual(p.problems, [])
        self.assertEqual(p.subject, "kept")
        self.assertIn("caf", p.body_text)
        self.assertEqual(asdict(p), asdict(self.full_parse(raw)))

    def test_the_usual_message_is_not_handed_to_the_email_packages_parser(self) -> None:
        """The header block is read by `header_fields`, and the scan for "Content-Type:"
        lines runs only when the cheap count says the bound could be broken: the parser's
        header pass and that scan were together about half of parsing a 4 KiB message."""
        from mailcore.messages import parse

        calls: list[str] = []
        real_parse, real_lines = parse.message_from_bytes, parse._CONTENT_TYPE_LINE

        class CountedLines:
            def findall(self, raw: bytes) -> list[bytes]:
                calls.append("scan")
                return real_lines.findall(raw)

        def counted_parse(raw: bytes) -> Message:
            calls.append("parser")
            return real_parse(raw)

        self.patch(parse, "message_from_bytes", counted_parse)
        self.patch(parse, "_CONTENT_TYPE_LINE", CountedLines())
        raw = msg("From: A <a@x.test>\nSubject: hi\nContent-Type: text/plain; charset=utf-8\n"
                  "Content-Transfer-Encoding: quoted-printable", b"caf=C3=A9\r\n")
        p = parse_message(raw)
        self.assertEqual((p.subject, p.body_text, p.sender), ("hi", "café\r\n", "A <a@x.test>"))
        self.assertEqual(calls, [])
        parse_message(msg("Subject: x\nContent-Type: multipart/mixed; boundary=b",
                          b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n"))
        self.assertEqual(calls, ["parser"])  # a tree: the parser, still no scan
        many = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\n{i}\r\n" for i in range(2001))
        p = parse_message(msg("Content-Type: multipart/mixed; boundary=b", many.encode()))
        self.assertIn("scan", calls)
        self.assertIn("more than 1000 MIME parts; not parsed", p.problems)

    def test_blank_line_is_the_first_match_of_the_old_pattern(self) -> None:
        """`blank_line` gives the span rb"\\r?\\n\\r?\\n" finds, on every string of up to 7
        of CR, LF and "x", with and without an end bound."""
        import itertools
        import re

        from mailcore.messages.headerblock import blank_line

        pattern = re.compile(rb"\r?\n\r?\n")
        for length in range(8):
            for chars in itertools.product(b"\r\nx", repeat=length):
                raw = bytes(chars)
                for endpos in (None, 0, 3, 5):
                    m = pattern.search(raw, 0, len(raw) if endpos is None else endpos)
                    self.assertEqual(blank_line(raw, endpos),
                                     None if m is None else m.span(), (raw, endpos))

    def test_header_fields_are_stored_as_the_email_package_stores_them(self) -> None:
        import random
        from email import message_from_bytes

        from mailcore.messages.headerblock import blank_line, header_fields
        from tests.support import mimegen

        rng = random.Random(3)
        read = 0
        for _ in range(1500):
            eol = rng.choice(["\r\n", "\n"])
            raw = (mimegen.header_block(rng, eol) + eol + eol).encode("utf-8", "surrogateescape")
            span = blank_line(raw)
            assert span is not None
            fields = header_fields(raw[: span[1]])
            if fields is None:
                continue
            read += 1
            parsed = message_from_bytes(raw[: span[1]])
            self.assertEqual(fields, list(parsed.raw_items()), raw)
            if not parsed.is_multipart():  # the body did not start early
                self.assertEqual(parsed.get_payload(), "")
        self.assertGreater(read, 500)
        for block in [b"From a@b Mon Nov  6 10:00:00 2023\r\nSubject: x\r\n\r\n",
                      b" first\r\nSubject: x\r\n\r\n", b"Subject: x\rTo: y\r\n\r\n",
                      b"Subject: x\r\nno field\r\n\r\n", b": x\r\n\r\n",
                      b"Subject: x\r\nFrom y\r\n\r\n", b"Sub\xe9: x\r\n\r\n"]:
            self.assertIsNone(header_fields(block), block)

"""The bounded MIME walker and the header sanity checks."""

from __future__ import annotations

import base64
import re
import time
import tracemalloc
from email.utils import parsedate_tz

from twisted.trial.unittest import TestCase

from filters import mime
from filters.builtin import BuiltinSettings, analyse
from filters.headers import (
    _ATEXT,
    _LDH,
    _LETDIG,
    _plain_split,
    _split_top_level,
    _strip_comments,
    address_list_problem,
    check_headers,
    date_ok,
)
from filters.mime import MimeLimits, decode_base64, parse, split_header
from tests.support.filterd import attachment, message, multipart, multipart_body, text_part


class SplitHeaderTests(TestCase):
    def test_crlf_and_lf_messages(self) -> None:
        self.assertEqual(split_header(b"A: 1\r\nB: 2\r\n\r\nbody", 100),
                         (b"A: 1\r\nB: 2", b"body", True))
        self.assertEqual(split_header(b"A: 1\n\nbody", 100), (b"A: 1", b"body", True))

    def test_no_body(self) -> None:
        self.assertEqual(split_header(b"A: 1\r\n", 100), (b"A: 1\r\n", b"", True))

    def test_header_block_over_the_limit(self) -> None:
        block, body, complete = split_header(b"A: " + b"x" * 500 + b"\r\n\r\nbody", 100)
        self.assertFalse(complete)
        self.assertEqual(len(block), 100)
        self.assertEqual(body, b"")


class ParseTests(TestCase):
    def test_header_fields_unfolded(self) -> None:
        parsed = parse(b"Subject: a long\r\n  folded subject\r\nFrom: a@b.c\r\n\r\nx")
        self.assertEqual(parsed.header("subject"), ["a long folded subject"])
        self.assertEqual(parsed.header("FROM"), ["a@b.c"])

    def test_leaves_of_a_multipart(self) -> None:
        data = multipart([text_part(b"hello"), attachment("a.bin", b"\x00\x01\x02")])
        parsed = parse(data)
        self.assertEqual([(p.content_type, p.filename, p.body) for p in parsed.parts], [
            ("text/plain", "", b"hello"),
            ("application/octet-stream", "a.bin", b"\x00\x01\x02"),
        ])
        self.assertEqual([p.position for p in parsed.parts], ["1", "2"])
        self.assertEqual(parsed.problems, [])

    def test_missing_close_delimiter_runs_to_the_end(self) -> None:
        body = b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n--b\r\n\r\ntwo, never closed"
        parsed = parse(message(body, headers=[("Content-Type", 'multipart/mixed; boundary="b"')]))
        self.assertEqual([p.body for p in parsed.parts], [b"one", b"two, never closed\r\n"])

    def test_preamble_and_epilogue_are_not_parts(self) -> None:
        body = b"preamble\r\n--b\r\n\r\nonly\r\n--b--\r\nepilogue"
        parsed = parse(message(body, headers=[("Content-Type", "multipart/mixed; boundary=b")]))
        self.assertEqual([p.body for p in parsed.parts], [b"only"])

    def test_boundary_lookalike_inside_a_line_does_not_split(self) -> None:
        body = b"--b\r\n\r\ntext with --b inside\r\n--b--\r\n"
        parsed = parse(message(body, headers=[("Content-Type", "multipart/mixed; boundary=b")]))
        self.assertEqual([p.body for p in parsed.parts], [b"text with --b inside"])

    def test_message_rfc822_is_walked(self) -> None:
        inner = b"From: x@y.z\r\nContent-Type: text/html\r\n\r\n<p>hi</p>"
        data = multipart([([("Content-Type", "message/rfc822")], inner)])
        parsed = parse(data)
        self.assertEqual([(p.content_type, p.body, p.position) for p in parsed.parts],
                         [("text/html", b"<p>hi</p>", "1.1")])

    def test_multipart_without_boundary_is_one_leaf_and_a_problem(self) -> None:
        data = message(b"opaque", headers=[("Content-Type", "multipart/mixed")])
        parsed = parse(data)
        self.assertEqual([p.body for p in parsed.parts], [b"opaque\r\n"])
        self.assertEqual(parsed.ambiguities,
                         [("MIME_NO_PARTS", "multipart/mixed without a boundary")])
        self.assertEqual(parsed.problems, [])  # nothing went unread: not a limit

    def test_boundary_never_in_the_body_is_one_leaf_and_a_problem(self) -> None:
        data = message(b"--other\r\n\r\nx\r\n--other--\r\n",
                       headers=[("Content-Type", "multipart/mixed; boundary=b")])
        parsed = parse(data)
        self.assertEqual([p.content_type for p in parsed.parts], ["multipart/mixed"])
        self.assertEqual(parsed.ambiguities, [
            ("MIME_NO_PARTS", "multipart/mixed with no body part after its boundary")])

    def test_rfc2231_boundaries_are_decoded(self) -> None:
        body = multipart_body([text_part(b"hi"), attachment("a.bin", b"\x00\x01")], "frontier")
        for param in ("boundary*=us-ascii''frontier", "boundary*=''frontier",
                      "boundary*0*=us-ascii''fron; boundary*1*=tier",
                      "boundary*0=fron; boundary*1=tier"):
            parsed = parse(message(body, headers=[("Content-Type", f"multipart/mixed; {param}")]))
            self.assertEqual([(p.filename, p.body) for p in parsed.parts],
                             [("", b"hi"), ("a.bin", b"\x00\x01")], param)
            self.assertEqual((parsed.problems, parsed.ambiguities), ([], []), param)

    def test_boundary_longer_than_rfc_2046_allows_is_walked_and_a_problem(self) -> None:
        for length in (71, 201):
            boundary = "f" * length
            data = message(multipart_body([attachment("a.bin", b"\x00")], boundary),
                           headers=[("Content-Type", f'multipart/mixed; boundary="{boundary}"')])
            parsed = parse(data)
            self.assertEqual([p.filename for p in parsed.parts], ["a.bin"])
            self.assertEqual(parsed.ambiguities, [
                ("MIME_LONG_BOUNDARY", "multipart/mixed boundary longer than 70 characters")])
        data = message(multipart_body([attachment("a.bin", b"\x00")], "f" * 70),
                       headers=[("Content-Type", f'multipart/mixed; boundary="{"f" * 70}"')])
        self.assertEqual(parse(data).ambiguities, [])

    def test_a_mime_field_twice_in_one_part_is_a_problem(self) -> None:
        for name, first, second in (
            ("Content-Type", "text/plain", "multipart/mixed; boundary=b"),
            ("Content-Transfer-Encoding", "7bit", "base64"),
            ("Content-Disposition", "inline", 'attachment; filename="a.exe"'),
        ):
            part = ([(name, first), (name, second)], b"x")
            parsed = parse(multipart([text_part(b"hi"), part]))
            self.assertEqual(parsed.ambiguities, [
                ("MIME_DUPLICATE_FIELD", f"more than one {name} field in a MIME part")])
        top = message(b"x", headers=[("From", "a@example.com"), ("Content-Type", "text/plain"),
                                     ("content-type", "multipart/mixed; boundary=b")])
        self.assertEqual(parse(top).ambiguities, [
            ("MIME_DUPLICATE_FIELD", "more than one Content-Type field in a MIME part")])

    def test_garbled_content_type_means_text_plain(self) -> None:
        data = message(b"x", headers=[("Content-Type", "garbage")])
        self.assertEqual(parse(data).parts[0].content_type, "text/plain")

    def test_part_limit_reported_once(self) -> None:
        data = multipart([text_part(b"%d" % i) for i in range(50)])
        parsed = parse(data, MimeLimits(max_parts=5))
        self.assertEqual(parsed.problems, ["more than 5 MIME parts"])
        self.assertLessEqual(len(parsed.parts), 5)

    def test_depth_limit(self) -> None:
        body = b"leaf"
        ctype = "text/plain"
        for level in range(10):
            body = multipart_body([([("Content-Type", ctype)], body)], f"b{level}")
            ctype = f'multipart/mixed; boundary="b{level}"'
        parsed = parse(message(body, headers=[("Content-Type", ctype)]), MimeLimits(max_depth=4))
        self.assertEqual(parsed.problems, ["MIME nesting deeper than 4"])

    def test_huge_part_header_is_a_problem(self) -> None:
        part = ([("X-Junk", "j" * 5000)], b"body")
        parsed = parse(multipart([part]), MimeLimits(max_header_bytes=1000))
        self.assertTrue(any("part header larger" in p for p in parsed.problems))

    def test_nesting_copies_nothing(self) -> None:
        # 19 multiparts, one inside the other, around a 1 MB leaf: each level used to slice
        # (copy) nearly the whole body and keep it while its children were walked.
        head = b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
            for i in range(19))
        leaf = (b"x" * 998 + b"\r\n") * 1000
        data = b"From: a@example.com\r\n" + head + b"\r\n" + leaf
        tracemalloc.start()
        try:
            parsed = parse(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * len(data))  # was about 20 times
        self.assertEqual([len(p.body) for p in parsed.parts], [len(leaf)])
        self.assertEqual(parsed.problems, [])
        self.assertEqual(parsed.copied_bytes, len(leaf))

    def test_decoding_stops_at_the_copy_budget(self) -> None:
        # Each quoted-printable message/rfc822 level is decoded anew (plain text is its own
        # quoted-printable encoding): 10 levels of 400 KB would materialise 4 MB.
        inner = b"Subject: leaf\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400
        for _ in range(10):
            inner = (b"Content-Type: message/rfc822\r\n"
                     b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + inner)
        data = b"From: a@example.com\r\n" + inner
        parsed = parse(data)
        self.assertEqual(parsed.problems,
                         ["more bytes decoded than the walk allows (3 times the message)"])
        self.assertEqual(parsed.parts, [])
        self.assertLess(parsed.copied_bytes, 3 * len(data) + len(data))
        whole = parse(data, MimeLimits(max_copy_ratio=20))
        self.assertEqual(whole.problems, [])
        self.assertEqual([p.position for p in whole.parts], [".".join("1" * 10)])

    def test_many_delimiter_lookalikes_then_real_parts(self) -> None:
        # Past 1000 lines that start like a delimiter, the rest is scanned by one regex.
        body = (b"--b\r\n\r\nfirst\r\n" + b"--bx\r\n" * 1500 + b"--b \r\n\r\nsecond\n"
                b"--b\n\n--b--\r\nepilogue\r\n--b\r\n\r\nnot a part\r\n")
        parsed = parse(message(body, headers=[("Content-Type", "multipart/mixed; boundary=b")]))
        self.assertEqual([p.body for p in parsed.parts],
                         [b"first\r\n" + b"--bx\r\n" * 1499 + b"--bx", b"second", b""])

    def test_delimiters_at_the_edges(self) -> None:
        for body, parts in (
            (b"--b\n\n--b\n\n--b--", [b"", b""]),  # LF only, empty parts
            (b"--b\r\n\r\nx\r\n--b--\r\n", [b"x"]),
            (b"--b\r\n\r\nx\r\n--b  \t\r\n\r\ny\r\n--b--  ", [b"x", b"y"]),
            (b"--b\r\n\r\nx\r\n--b--x\r\n--b", [b"x\r\n--b--x"]),
        ):
            data = message(body, headers=[("Content-Type", "multipart/mixed; boundary=b")])
            self.assertEqual([p.body for p in parse(data).parts], parts, body)

    def test_decode_base64_tolerates_junk(self) -> None:
        self.assertEqual(decode_base64(b"aGVs\r\nbG8*"), b"hello")
        self.assertEqual(decode_base64(b"aGVsbG8"), b"hello")  # missing padding
        self.assertEqual(decode_base64(b"!!!"), b"")
        # Separately padded chunks glued together all come out (nothing hides after "=").
        self.assertEqual(decode_base64(b"aGVsbG8=\r\nIHdvcmxk\r\n"), b"hello world")
        self.assertEqual(decode_base64(b"QQ==" + base64.b64encode(b"hidden")), b"Ahidden")

    def test_decode_base64_repairs_each_chunk(self) -> None:
        self.assertEqual(decode_base64(b"QUJDR"), b"ABC")  # a lone last letter is dropped
        self.assertEqual(decode_base64(b"QQ=*=QUI=\r\n=QUJD\r\n==\r\n"), b"AABABC")
        self.assertEqual(decode_base64(b"QQ==\r\n"), b"A")
        self.assertEqual(decode_base64(b"=QQ"), b"A")

    def test_padding_in_the_middle_is_followed_a_bounded_number_of_times(self) -> None:
        # Chunk by chunk up to 16 breaks plus one per 256 characters; "QQ=" a million times
        # made a million decodes (and regex substitutions) in Python, 0.7 s per MB.
        chunks: list[bytes] = []
        calls = mime._decode_chunk

        def counted(chunk: bytes) -> bytes:
            chunks.append(chunk)
            return calls(chunk)

        self.patch(mime, "_decode_chunk", counted)
        body = b"QQ=" * 100_000
        decoded, broken = mime._decode_base64(body, 0, len(body))
        self.assertTrue(broken)
        allowed = 16 + (len(body) - 1) // 256  # the last "=" is trailing padding
        self.assertEqual(len(chunks), allowed + 1)
        self.assertEqual(chunks[-1], b"QQ" * (100_000 - allowed))  # the rest in one piece
        self.assertEqual(decoded[:allowed], b"A" * allowed)

        chunks.clear()
        # Chunks encoded separately and glued together, padded now and then: all decoded.
        pieces = [bytes([65 + n]) * (n * 100 + n % 3) for n in range(40)]
        glued = b"".join(base64.encodebytes(p) for p in pieces)
        self.assertEqual(mime._decode_base64(glued, 0, len(glued)), (b"".join(pieces), False))

    def test_base64_broken_by_padding_too_often_is_a_problem(self) -> None:
        hidden = base64.encodebytes(b"MZ hidden after a run of padded chunks")
        part = ([("Content-Type", "application/octet-stream"),
                 ("Content-Transfer-Encoding", "base64")], b"QQ=" * 1000 + b"Q\r\n" + hidden)
        parsed = parse(multipart([text_part(b"hi"), part]))
        self.assertEqual(parsed.ambiguities, [(
            "MIME_BROKEN_BASE64",
            "base64 broken by padding more often than once in 256 characters")])
        self.assertEqual(len(parsed.parts), 2)

    def test_many_boundaries_parse_in_bounded_time(self) -> None:
        body = b"--b\r\n\r\nx\r\n" * 300_000
        data = message(body, headers=[("Content-Type", "multipart/mixed; boundary=b")])
        started = time.perf_counter()
        parsed = parse(data)
        self.assertLess(time.perf_counter() - started, 2.0)
        self.assertEqual(len(parsed.parts), 999)  # the container counts as a part
        self.assertTrue(parsed.problems)


class HeaderCheckTests(TestCase):
    def findings(self, data: bytes) -> dict[str, str]:
        return {f.symbol: f.detail for f in check_headers(parse(data), 16 * 1024)}

    def test_well_formed_message_has_no_findings(self) -> None:
        self.assertEqual(self.findings(message()), {})

    def test_missing_fields(self) -> None:
        found = self.findings(message(headers=[("Subject", "x")]))
        self.assertEqual(set(found), {"MISSING_FROM", "MISSING_DATE", "MISSING_MESSAGE_ID"})

    def test_duplicate_fields(self) -> None:
        headers = [("From", "a@example.com"), ("From", "b@example.com"),
                   ("Date", "Mon, 24 Nov 2025 10:00:00 +0000"),
                   ("Date", "Mon, 24 Nov 2025 10:00:01 +0000"),
                   ("Message-ID", "<1@x>"), ("Message-ID", "<2@x>")]
        found = self.findings(message(headers=headers))
        self.assertEqual(set(found), {"DUPLICATE_FROM", "DUPLICATE_DATE", "DUPLICATE_MESSAGE_ID"})
        self.assertEqual(found["DUPLICATE_FROM"], "2 From fields")

    def test_malformed_fields(self) -> None:
        headers = [("From", "Alice <alice@exa mple.com>"), ("To", "bob"),
                   ("Date", "yesterday"), ("Message-ID", "no-angle-brackets")]
        found = self.findings(message(headers=headers))
        self.assertEqual(set(found), {"MALFORMED_FROM", "MALFORMED_ADDRESS", "MALFORMED_DATE",
                                      "MALFORMED_MESSAGE_ID"})

    def test_oversized_field_and_header_block(self) -> None:
        headers = [("From", "a@example.com"), ("Date", "Mon, 24 Nov 2025 10:00:00 +0000"),
                   ("Message-ID", "<1@x>"), ("X-Long", "y" * 20_000)]
        self.assertIn("HEADER_TOO_LONG", self.findings(message(headers=headers)))
        huge = message(headers=[(f"X-{i}", "z" * 900) for i in range(400)])
        self.assertIn("HEADERS_TOO_LARGE", self.findings(huge))

    def test_lines_that_are_not_fields(self) -> None:
        data = message().replace(b"Subject:", b"Subject without colon\r\nSubject:", 1)
        self.assertIn("MALFORMED_HEADER", self.findings(data))

    def test_points_add_up_to_spam(self) -> None:
        verdict = analyse(message(b"hi", headers=[("Subject", "no from, no date, no id"),
                                                  ("To", "<>")]), BuiltinSettings())
        self.assertEqual(verdict.score, 2.0 + 1.0 + 0.5 + 1.0)
        self.assertFalse(verdict.spam)
        verdict = analyse(message(b"hi", headers=[("From", "a@b.c"), ("From", "<bad")]),
                          BuiltinSettings())
        # DUPLICATE_FROM 3 + MALFORMED_FROM 2.5 + MISSING_DATE 1 + MISSING_MESSAGE_ID 0.5
        self.assertEqual(verdict.score, 7.0)
        self.assertTrue(verdict.spam)

    def test_scores_are_configurable_and_zero_turns_a_check_off(self) -> None:
        scores = {"MISSING_FROM": 9.0, "MISSING_DATE": 0.0, "MISSING_MESSAGE_ID": 0.0}
        verdict = analyse(message(b"hi", headers=[("Subject", "x")]),
                          BuiltinSettings(scores=scores))
        self.assertEqual(verdict.symbol_names, ("MISSING_FROM",))
        self.assertTrue(verdict.spam)


class AddressTests(TestCase):
    def test_character_classes_are_the_rfc_sets(self) -> None:
        """The classes are spelled as the ASCII they exclude (cheap to compile); each must
        still be its RFC 5322/5321 ASCII set plus every non-ASCII character (RFC 6532)."""
        letdig = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
        sets = {_ATEXT: letdig | set("!#$%&'*+/=?^_`{|}~-"), _LETDIG: letdig,
                _LDH: letdig | {"-"}}
        for pattern, ascii_set in sets.items():
            compiled = re.compile(pattern)
            wrong = [c for c in map(chr, range(0x110000))
                     if bool(compiled.fullmatch(c)) != (c in ascii_set or ord(c) >= 0x80)]
            self.assertEqual(wrong, [], pattern)

    def test_usable_addresses(self) -> None:
        for value in ("alice@example.com", "Alice <alice@example.com>",
                      '"Smith, Bob" <bob@example.org>, carol@example.net',
                      "=?utf-8?q?Al=C3=AFce?= <a@example.com>", "Ålice <å@exämple.com>",
                      "alice@[127.0.0.1]", "x (comment (nested)) <a@b.c>",
                      "friends: a@b.c, d@e.f;, g@h.i", "john@x.com <john@x.com>"):
            self.assertIsNone(address_list_problem(value, allow_empty=False), value)

    def test_unusable_addresses(self) -> None:
        for value in ("foo", "a@", "@b", "<>", "a@b@c", "<a@b.c", "a..b@c.d",
                      "Alice <alice@exa mple.com>", "Eve <eve@example.com> trailing", "(((("):
            self.assertIsNotNone(address_list_problem(value, allow_empty=False), value)

    def test_empty_groups_only_where_allowed(self) -> None:
        self.assertIsNone(address_list_problem("undisclosed-recipients:;", allow_empty=True))
        self.assertEqual(address_list_problem("undisclosed-recipients:;", allow_empty=False),
                         "no address")

    def test_hostile_values_are_linear(self) -> None:
        started = time.perf_counter()
        for value in ("(" * 16000, "\\" * 16000, '"' + "a" * 16000, "<" * 16000,
                      ", ".join(["a@b.c"] * 3000)):
            address_list_problem(value, allow_empty=False)
        self.assertLess(time.perf_counter() - started, 1.0)

    def test_dates(self) -> None:
        self.assertTrue(date_ok("Mon, 24 Nov 2025 10:00:00 +0000"))
        self.assertTrue(date_ok("24 Nov 2025 10:00 GMT"))
        self.assertFalse(date_ok("yesterday"))
        self.assertFalse(date_ok("Mon, 24 Nov 2025 10:00:00 +0000" * 20))

    def test_the_common_date_shortcut_agrees_with_the_stdlib_parser(self) -> None:
        # date_ok takes the usual RFC 5322 form without the stdlib parser; whatever it
        # accepts that way the stdlib accepts too, and the rest still goes to the stdlib.
        for value in ("Wed,  2 Dec 2026 11:54:33 +0000 (UTC)", "2 Dec 2026 11:54 -0500",
                      "Wed,2 Dec 2026 11:54:33 +0000", " Sun, 31 Dec 1999 23:59:59 -0000 ",
                      "Mon, 24 Nov 2025 10:00:00 +0100 (CET)", "24 Nov 2025 10:00 GMT",
                      "Mon, 24 Nov 2025", "Mon, 24 Foo 2025 10:00:00 +0000", "yesterday",
                      "Mon, 24 Nov 2025 10:00:00 +0000 (UTC) trailing", "٢ Dec 2026 11:54 +0000"):
            self.assertEqual(date_ok(value), parsedate_tz(value) is not None, value)

    def test_plain_address_lists_split_as_the_careful_scanner_does(self) -> None:
        for value in ("a@b.c, d@e.f", "Alice <a@b.c>,Bob <d@e.f>", "<a,b@c.d>, e@f.g",
                      "a@b.c,", ",", "x <a@b.c> , y <d@e.f>, <g@h.i>", "<a@b.c>>, d@e.f",
                      "a@b.c) , d@e.f", "<<a@b.c>, d@e.f"):
            self.assertEqual(_plain_split(value) or _split_top_level(_strip_comments(value), ","),
                             _split_top_level(_strip_comments(value), ","), value)
        self.assertIsNone(_plain_split("<a,b@c.d>, e@f.g"))  # the comma inside <> counts
        for value in ('"Smith, Bob" <b@c.d>', "(c) a@b.c", "g: a@b.c;", "a\\,b@c.d"):
            self.assertIsNone(_plain_split(value), value)

    def test_base64_attachment_names_do_not_confuse_headers(self) -> None:
        data = multipart([attachment("a.pdf", base64.b64encode(b"x"))])
        self.assertEqual(self.check(data), [])

    def check(self, data: bytes) -> list[str]:
        return [f.symbol for f in check_headers(parse(data), 16 * 1024)]

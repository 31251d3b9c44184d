"""Counting Received header fields (the hop limit): the header section only, folded fields,
any case, dot-stuffed DATA, and the same count however the message is cut into pieces."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from mailcore.smtp.hops import ReceivedCounter, count_received, too_many_hops


def reference_count(message: bytes) -> int:
    """Line by line, the slow and obvious way: fields named Received until the empty line."""
    count = 0
    for line in message.split(b"\r\n"):
        if line == b"":
            break
        if re.match(rb"received[ \t]*:", line, re.IGNORECASE):
            count += 1
    return count


def fed(message: bytes, cuts: list[int], *, stuffed: bool = False) -> int:
    counter = ReceivedCounter(stuffed=stuffed)
    start = 0
    for cut in [*sorted(cuts), len(message)]:
        counter.feed(message[start:cut])
        start = cut
    return counter.end()


LOOPED = b"".join(
    b"Received: from hop%d.test (hop%d.test [192.0.2.%d])\r\n"
    b"\tby gw.test (Mailcore) with ESMTP id Q%d;\r\n"
    b"\tSun, 15 Jun 2025 15:06:40 +0000\r\n" % (n, n, n, n) for n in range(51)
)


class CountTests(TestCase):
    def test_folded_fields_count_once(self) -> None:
        self.assertEqual(count_received(LOOPED + b"Subject: x\r\n\r\nbody\r\n"), 51)

    def test_only_the_header_section_counts(self) -> None:
        message = (b"Received: from a\r\nSubject: fwd\r\n\r\n"
                   b"Received: from quoted.test\r\nReceived: from b\r\n")
        self.assertEqual(count_received(message), 1)

    def test_a_message_that_starts_with_its_body_has_none(self) -> None:
        self.assertEqual(count_received(b"\r\nReceived: from a\r\n"), 0)

    def test_names_are_case_insensitive_and_may_have_space_before_the_colon(self) -> None:
        message = (b"RECEIVED: a\r\nreceived : b\r\nReceived\t: c\r\n"
                   b"X-Received: no\r\nReceived-SPF: no\r\nReceivedx: no\r\n"
                   b" Received: folded, no\r\n\r\n")
        self.assertEqual(count_received(message), 3)

    def test_a_long_line_is_judged_by_its_start(self) -> None:
        long_received = b"Received: " + b"x" * 5000 + b"\r\n"
        long_other = b"Subject: " + b"Received: " * 500 + b"\r\n"
        message = long_received + long_other + long_received + b"\r\n"
        for size in (1, 7, 63, 64, 65, 100, 4096, len(message)):
            with self.subTest(size=size):
                self.assertEqual(fed(message, list(range(size, len(message), size))), 2)

    def test_dot_stuffed_lines_are_counted_as_the_server_unstuffs_them(self) -> None:
        message = b".Received: a\r\n..Received: b\r\nReceived: c\r\n\r\n"
        self.assertEqual(fed(message, [], stuffed=True), 2)  # "Received: a" and c
        self.assertEqual(fed(message, [], stuffed=False), 1)

    def test_the_empty_line_split_across_pieces(self) -> None:
        message = b"Received: a\r\n\r\nReceived: body\r\n"
        for cut in range(len(message) + 1):
            for second in range(cut, len(message) + 1):
                with self.subTest(cut=cut, second=second):
                    self.assertEqual(fed(message, [cut, second]), 1)

    @settings(max_examples=300, deadline=None)
    @given(
        lines=st.lists(st.sampled_from([
            b"Received: from x", b"received :y", b"RECEIVED:\tz", b"\tby folded",
            b" Received: folded", b"Subject: Received: no", b"X-Received: no", b"",
            b"Received" + b" " * 70 + b": long", b"Received" + b" " * 700 + b"x",
            b"Subject: " + b"q" * 90, b"Rec",
        ]), max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    )
    def test_any_cutting_gives_the_line_by_line_count(
        self, lines: list[bytes], cuts: list[int]
    ) -> None:
        message = b"".join(line + b"\r\n" for line in lines)
        expected = reference_count(message)
        self.assertEqual(fed(message, [c for c in cuts if c <= len(message)]), expected)

    def test_the_limit_counts_every_field_the_message_leaves_with(self) -> None:
        self.assertIsNone(too_many_hops(50, 50))
        failure = too_many_hops(51, 50)
        assert failure is not None
        self.assertTrue(failure.startswith("5.4.6 Too many hops"), failure)

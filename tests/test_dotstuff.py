"""The outbound dot-stuffer (pitfall 1): right across chunk boundaries, CRLF never doubled."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.mail.smtp import SMTPClient
from twisted.trial.unittest import TestCase

from mailcore.smtp.client import data_stream
from mailcore.smtp.dotstuff import AcceptedBody, CRLFBody, DotStuffer, normalise, stuff, unstuff

# FileSender, which Twisted's SMTPClient sends bodies with, reads 2**14 bytes at a time.
TWISTED_CHUNK = 2**14


def dot_line_at_16384(eol: bytes = b"\r\n") -> bytes:
    """A message whose line "." starts exactly at byte 16384 (a chunk boundary)."""
    head = b"Subject: boundary" + eol + eol
    filler = b"x" * (TWISTED_CHUNK - len(head) - len(eol)) + eol
    body = head + filler + b"." + eol + b"after the dot" + eol
    assert body[TWISTED_CHUNK : TWISTED_CHUNK + 1 + len(eol)] == b"." + eol
    return body


def stock_twisted_stream(message: bytes) -> bytes:
    """What SMTPClient sends for `message`: transformChunk per 16 KiB chunk, then ".\\r\\n"."""
    client = SMTPClient(b"localhost")
    client.resetTimeout = lambda: None  # type: ignore[method-assign]
    out = b"".join(
        client.transformChunk(message[i : i + TWISTED_CHUNK])
        for i in range(0, len(message), TWISTED_CHUNK)
    )
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


class ChunkBoundaryTests(TestCase):
    def test_dot_line_at_offset_16384_is_escaped(self) -> None:
        for eol in (b"\r\n", b"\n"):
            message = dot_line_at_16384(eol)
            stream = stuff(message, chunk_size=TWISTED_CHUNK)
            self.assertEqual(stream.count(b"\r\n.\r\n"), 1)
            self.assertTrue(stream.endswith(b"\r\n.\r\n"))
            self.assertEqual(unstuff(stream), normalise(message))

    def test_stock_twisted_ends_the_message_early_at_offset_16384(self) -> None:
        """The regression this module exists for: stock transformChunk leaves the "." line
        at a chunk start bare, so the next hop would end DATA there and read the rest as
        commands."""
        stream = stock_twisted_stream(dot_line_at_16384(b"\n"))
        with self.assertRaisesRegex(ValueError, "ends early"):
            unstuff(stream)

    def test_stock_twisted_turns_crlf_into_cr_cr_lf(self) -> None:
        self.assertIn(b"\r\r\n", stock_twisted_stream(b"a\r\nb\r\n"))
        self.assertNotIn(b"\r\r\n", stuff(b"a\r\nb\r\n"))

    def test_crlf_split_across_chunks_stays_one_crlf(self) -> None:
        s = DotStuffer()
        out = s.feed(b"line one\r") + s.feed(b"\n.dot\r") + s.feed(b"\n") + s.finish()
        self.assertEqual(out, b"line one\r\n..dot\r\n.\r\n")

    def test_bare_lf_and_cr_become_crlf(self) -> None:
        self.assertEqual(stuff(b"a\nb\rc"), b"a\r\nb\r\nc\r\n.\r\n")

    def test_terminator_added_after_a_missing_final_newline(self) -> None:
        self.assertEqual(stuff(b"no newline"), b"no newline\r\n.\r\n")
        self.assertEqual(stuff(b"ends\r\n"), b"ends\r\n.\r\n")
        self.assertEqual(stuff(b""), b".\r\n")

    def test_leading_dot_of_the_first_line_is_doubled(self) -> None:
        self.assertEqual(stuff(b".hidden\r\n"), b"..hidden\r\n.\r\n")


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


line_bytes = st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"a", b"x.y", b" ", b"\x00", b"\xff"]),
    max_size=60,
).map(b"".join)
cut_points = st.lists(st.integers(min_value=0, max_value=400), max_size=12)


def stream_of(stuffer: DotStuffer, message: bytes, cuts: list[int]) -> bytes:
    """The DATA stream `stuffer` makes of `message` fed in the pieces `cuts` gives."""
    return b"".join(stuffer.feed(c) for c in chunked(message, cuts)) + stuffer.finish()


class PropertyTests(TestCase):
    @settings(max_examples=400, deadline=None)
    @given(message=line_bytes, cuts=cut_points)
    def test_stuff_then_unstuff_gives_the_normalised_message(
        self, message: bytes, cuts: list[int]
    ) -> None:
        stream = stream_of(DotStuffer(), message, cuts)
        self.assertEqual(unstuff(stream), normalise(message))
        self.assertNotIn(b"\r\r", stream)
        self.assertEqual(stream, stuff(message))

    @settings(max_examples=200, deadline=None)
    @given(message=line_bytes, cuts=cut_points)
    def test_line_endings_in_the_stream_are_all_crlf(
        self, message: bytes, cuts: list[int]
    ) -> None:
        stream = stream_of(DotStuffer(), message, cuts)
        self.assertEqual(stream.count(b"\n"), stream.count(b"\r\n"))
        self.assertEqual(stream.count(b"\r"), stream.count(b"\r\n"))

    @settings(max_examples=300, deadline=None)
    @given(message=line_bytes, cuts=cut_points)
    def test_crlf_only_skips_nothing_but_the_normalising(
        self, message: bytes, cuts: list[int]
    ) -> None:
        """For a message with CRLF line endings only, the fast path gives the same stream
        in any chunking (a CRLF split across chunks included)."""
        clean = normalise(message)
        self.assertEqual(stream_of(DotStuffer(crlf_only=True), clean, cuts), stuff(clean))

    def test_data_stream_takes_the_fast_path_only_for_a_crlf_body(self) -> None:
        out: list[bytes] = []
        out.extend(data_stream(b"a\nb\r\n.c\r\n"))
        self.assertEqual(b"".join(out), b"a\r\nb\r\n..c\r\n.\r\n")
        big = CRLFBody(b"x" * 70000 + b"\r\n.\r\n" + b"y" * 70000 + b"\r\n")
        out = []
        out.extend(data_stream(big))
        self.assertEqual(b"".join(out), stuff(bytes(big)))
        self.assertGreater(len(out), 2)  # written in chunks

    def test_an_accepted_body_goes_as_it_is(self) -> None:
        for body in (b"Received: x\r\n\r\nhello\r\n", b"a\r\n", b"x" * 70000 + b"\r\n"):
            out: list[bytes] = []
            out.extend(data_stream(AcceptedBody(body)))
            self.assertEqual(b"".join(out), stuff(body))

    @settings(max_examples=50, deadline=None)
    @given(offset=st.integers(min_value=0, max_value=40), chunk=st.sampled_from([1, 7, 4096]))
    def test_dot_line_at_any_chunk_boundary(self, offset: int, chunk: int) -> None:
        message = b"a" * offset + b"\r\n.\r\n" + b"b\r\n"
        self.assertEqual(unstuff(stuff(message, chunk_size=chunk)), message)

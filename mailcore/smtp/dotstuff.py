"""Outbound DATA encoding: CRLF line endings and dot-stuffing that hold across chunk boundaries.

Twisted's `SMTPClient.transformChunk` escapes leading dots one file-reader chunk at a time, so
a line "." that starts exactly at a chunk boundary (byte 16384) goes out bare and ends the
message early at the next hop; it also turns an existing CRLF into CR CR LF. `DotStuffer`
keeps the two facts that cross a boundary (are we at the start of a line; did the last chunk
end in CR) and so gives the same bytes whatever the chunking.
"""

from __future__ import annotations

TERMINATOR = b".\r\n"


class CRLFBody(bytes):
    """Message bytes known to hold no bare CR and no bare LF: our SMTP server checked them
    before it accepted the message (it refuses bare CR or LF, pitfall 6). Outbound, a
    `DotStuffer(crlf_only=True)` then skips normalising the line endings (three passes over
    the message); the dot-stuffing still runs. Anything built from such bytes (a slice, a
    tagged copy) is plain `bytes` again. Only wrap bytes whose line endings were checked:
    a bare LF let through here would reach the next hop as it is."""

    __slots__ = ()


class AcceptedBody(CRLFBody):
    """A `CRLFBody` as our SMTP server accepted it, two more facts checked on the way in:
    no line of it begins with "." (the DATA stream held no CRLF "." to undo), so it goes
    out as it is, followed by ".\\r\\n" (`mailcore.smtp.client.data_stream` skips the
    stuffing scan); and its Received fields, ours included, are within `[smtp] max_hops`
    (the queue runner, which reads the same limit, does not count them again). As with
    CRLFBody, anything built from it is plain `bytes` again; a body loaded from the store is
    plain bytes and checked afresh."""

    __slots__ = ()


class DotStuffer:
    """Turns message bytes into the DATA stream: CRLF everywhere, leading dots doubled.

    Feed the message in chunks of any size with `feed`; `finish` returns the tail: a CRLF if
    the message did not end with a line ending, then the ".\\r\\n" that ends DATA.
    Bare CR and bare LF both become CRLF; an existing CRLF stays one CRLF.
    """

    __slots__ = ("_at_line_start", "_crlf_only", "_pending_cr")

    def __init__(self, *, crlf_only: bool = False) -> None:
        self._at_line_start = True
        self._pending_cr = False
        self._crlf_only = crlf_only  # every line ending is CRLF already (see CRLFBody)

    def feed(self, data: bytes) -> bytes:
        """The stuffed form of the next chunk (possibly holding back one trailing CR)."""
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            # It may be the first half of a CRLF split across chunks: decide on the next feed.
            data = data[:-1]
            self._pending_cr = True
        if not data:
            return b""
        if not self._crlf_only:
            crlf = data.count(b"\r\n")
            if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
                # Some bare CR or LF: normalise every line ending to CRLF.
                data = (data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                        .replace(b"\n", b"\r\n"))
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data[:1] == b".":
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The end of the DATA stream: close the last line if needed, then ".\\r\\n"."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        self._at_line_start = True
        return tail + TERMINATOR


def stuff(message: bytes, chunk_size: int = 0) -> bytes:
    """The whole DATA stream for `message` (chunked when chunk_size > 0, for tests)."""
    stuffer = DotStuffer()
    if chunk_size <= 0:
        return stuffer.feed(message) + stuffer.finish()
    parts = [stuffer.feed(message[i : i + chunk_size]) for i in range(0, len(message), chunk_size)]
    return b"".join(parts) + stuffer.finish()


def unstuff(stream: bytes) -> bytes:
    """What a receiving server stores for a DATA stream (for tests and the sink)."""
    if stream.startswith(TERMINATOR):
        end = 0
    else:
        found = stream.find(b"\r\n" + TERMINATOR)
        if found < 0:
            raise ValueError("DATA stream does not end with CRLF.CRLF")
        end = found + 2
    if end + len(TERMINATOR) != len(stream):
        raise ValueError(f"DATA stream ends early, at offset {end}")
    body = stream[:end]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def normalise(message: bytes) -> bytes:
    """`message` with every line ending as CRLF and a final CRLF (what `unstuff` gives back)."""
    out = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out

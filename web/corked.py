"""An HTTP channel that sends a response's bytes together, at once, when the response ends.

Twisted's `HTTPChannel` hands each piece of a response to the transport as it comes: the
status line and headers (`writeHeaders`), the body (`write`), the last chunk of a chunked
body. The transport buffers them, registers the socket for writability and sends on the
next reactor turn: two `epoll_ctl` calls and a turn of the reactor for every response, more
than the `send` itself costs for the small JSON replies our APIs mostly give (measured: the
write path was about a tenth of the reactor thread's time under the list benchmark).

`CorkedChannel` keeps the pieces of a response instead ("corks" them) and sends them in one
`mailcore.netwrite.write_now` (a `send` at once on plain TCP; the transport's own write
otherwise, one TLS record instead of several) when:

- the response ends (`requestDone`, before Twisted moves on to the next request or closes
  a connection that is not kept alive);
- it has kept `CORK_LIMIT` bytes (a large body streams as before, in the transport's
  buffer, with its flow control);
- a producer is registered for the response (a streamed download, paced by the transport:
  from then on the response's bytes go through unkept);
- the channel closes the connection (`loseConnection`).

A response written in parts with waits between them and no producer would reach the client
only at one of those points; none of our handlers writes that way (they return the body,
or stream it with a producer).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from mailcore.netwrite import write_now

# Bytes of a response kept before they go to the transport without waiting for its end.
CORK_LIMIT = 64 * 1024


class CorkedChannel(http.HTTPChannel):
    """An `HTTPChannel` whose responses go out in one send; see the module docstring."""

    _cork: list[bytes] | None = None
    _corked = 0

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # Twisted's legacy form: its own path
            self.flush()
            super().writeHeaders(version, code, reason, headers)
            return
        # As Twisted writes them; a Headers object has already refused CR, LF and NUL in
        # names and values.
        lines = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        self._keep(lines)

    def write(self, data: bytes) -> None:
        self._keep([data])

    def writeSequence(self, iovec: list[bytes]) -> None:
        self._keep(list(iovec))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.flush()
        super().registerProducer(producer, streaming)

    def requestDone(self, request: http.Request) -> None:
        self.flush()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self.flush()
        super().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cork, self._corked = None, 0
        super().connectionLost(reason)

    def flush(self) -> None:
        """Send what the cork holds (nothing when it holds nothing)."""
        cork, self._cork = self._cork, None
        self._corked = 0
        if cork and self.transport is not None:
            write_now(self.transport, b"".join(cork))

    def _keep(self, pieces: list[bytes]) -> None:
        if self._requestProducer is not None or self.transport is None:
            # A streamed response (the transport paces its producer), or a connection
            # already gone: Twisted's own path.
            self.flush()
            if self.transport is not None:
                self.transport.writeSequence(pieces)
            return
        if self._cork is None:
            self._cork = pieces
        else:
            self._cork.extend(pieces)
        self._corked += sum(map(len, pieces))
        if self._corked >= CORK_LIMIT:
            self.flush()

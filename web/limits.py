"""The request-size limit, enforced while the body arrives rather than after.

`LimitedRequest` is the site's request class. A body declared larger than the limit
(`Content-Length`) is refused as soon as the headers are in: no `100 Continue` is sent, no
byte of the body is stored, and the 413 goes out at once on a connection that then closes.
A chunked body is counted as it arrives; past the limit nothing more is stored and the 413
goes out at once too. The reply itself comes from the root resource, in the shape of the API
the path belongs to (`body_too_large` tells it to answer 413).

After such a 413 the connection closes "lingering" (as nginx does): our side stops writing,
and what the client still sends is read and dropped, for at most `LINGER_SECONDS` or until
the declared body has arrived. A client that writes its whole body before it reads (Python's
http.client, requests) then sees the 413 instead of a connection reset.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web import http, server
from twisted.web.iweb import IRequest

DEFAULT_MAX_BODY = 25 * 1024 * 1024
LINGER_SECONDS = 10.0


def _discard(*args: Any) -> None:
    """Swallow what is left of a refused body."""


class _LingeringClose:
    """Replaces a channel's close after a refused body: half-close, drain, then close."""

    def __init__(self, channel: http.HTTPChannel, budget: int | None) -> None:
        self.channel = channel
        self.budget = budget
        self.timer: Any = None
        self.closing = False
        self._connection_lost = channel.connectionLost
        self._lose_connection = channel.loseConnection
        channel.loseConnection = self.lose_connection  # type: ignore[method-assign]
        channel.connectionLost = self.connection_lost  # type: ignore[method-assign]

    def lose_connection(self) -> None:
        """Called by the channel once the 413 is written: stop writing, keep draining."""
        if self.closing:
            return
        self.closing = True
        transport = self.channel.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None or (self.budget is not None and self.budget <= 0):
            self.close()
            return
        # Whatever arrives from now on, through either entry point, is dropped; reading
        # resumes in case the channel paused it while the request was handled.
        self.channel.dataReceived = self.drain  # type: ignore[method-assign]
        self.channel.rawDataReceived = self.drain  # type: ignore[method-assign]
        resume = getattr(transport, "resumeProducing", None)
        if resume is not None:
            resume()
        half_close()
        self.timer = self.channel.callLater(LINGER_SECONDS, self.close)

    def drain(self, data: bytes) -> None:
        if self.budget is None:
            return
        self.budget -= len(data)
        if self.budget <= 0:
            self.close()

    def close(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.channel.transport is not None:
            self._lose_connection()  # the channel's own: unregisters it as producer first

    def connection_lost(self, reason: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self._connection_lost(reason)


class LimitedRequest(server.Request):
    """A Request that refuses bodies larger than its site's `max_body`."""

    body_too_large = False
    _received = 0

    def _max_body(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body", DEFAULT_MAX_BODY))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self.body_too_large = True
            # We will not read the body: do not invite it with "100 Continue".
            self.requestHeaders.removeHeader(b"expect")
            super().gotLength(0)
            channel = self.channel
            if isinstance(channel, http.HTTPChannel):
                # Process the request now, as if it had no body; the connection closes
                # after the reply, so the unread body is never parsed as a next request.
                channel.persistent = False
                channel.length = 0
                _LingeringClose(channel, length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received <= self._max_body():
            super().handleContentChunk(data)
            return
        self.body_too_large = True
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        self._answer_now()

    def _answer_now(self) -> None:
        """Stop reading a chunked body that went over the limit and reply 413 at once."""
        channel = self.channel
        decoder = getattr(channel, "_transferDecoder", None)
        if not isinstance(channel, http.HTTPChannel) or decoder is None:
            return  # the rest is discarded as it comes; the 413 goes out at its end
        if not (hasattr(decoder, "dataCallback") and hasattr(decoder, "finishCallback")):
            return
        decoder.dataCallback = _discard
        decoder.finishCallback = _discard
        channel.persistent = False
        _LingeringClose(channel, None)
        channel.allContentReceived()


def body_exceeds(request: IRequest, max_body: int) -> bool:
    """Whether the request's body is (or was declared) over `max_body` bytes.

    True for a `LimitedRequest` that refused its body, and also for any other request (as
    in tests through StubTreq) whose `Content-Length` or received body is over the limit.
    """
    if getattr(request, "body_too_large", False):
        return True
    declared = request.getHeader(b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_body:
        return True
    content = request.content
    if content is None:
        return False
    position = content.tell()
    content.seek(0, io.SEEK_END)
    size = content.tell()
    content.seek(position)
    return size > max_body

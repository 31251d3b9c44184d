"""Limits of the HTTP listener: request size, connections, and how slow a client may be.

Connections (`LimitedChannel`, counted by the site with `mailcore.connlimits`):

- At most `[web] max_connections` open connections, and `max_connections_per_ip` from one
  client address (an IPv6 client is its /64). A connection over either cap is answered at
  once with `503 Service Unavailable`, `Retry-After: 10` and `Connection: close` (a short
  text body says which cap), and closed; nothing it sends is read as a request.
- A request's headers must be complete within `header_timeout` seconds of its first byte,
  and its body within `body_timeout` seconds of its headers, however the bytes trickle in
  (slowloris). Past the deadline the client gets `408 Request Timeout` and the connection
  closes.
- An HTTP/1.1 request without a `Host` field, or any request with two (or one that names no
  host), is answered `400 Bad Request` and the connection closes (RFC 9112 3.2). A request
  whose target is in absolute form (`GET http://host/path`, RFC 9112 3.2.2) is served as
  the request for its path, on the host it names.
- Pipelined requests (HTTP/1.1: several sent before the first reply) are read one at a
  time, each in a turn of the reactor of its own, and only while the client reads the
  replies: one whose replies fill the send buffer gets no more answered until it reads
  them. (Twisted answered every pipelined request of a read at once: a few KiB of
  `GET /openapi.json` kept the reactor for a minute and 1 GiB of replies in memory.)
- A client that reads nothing for `idle_timeout` seconds while a reply waits in our send
  buffer is dropped (aborted): a streamed reply (a file, a long JSON array) has no other
  deadline, and a client that stopped reading one held its connection, its slot under
  `max_connections`, an open file and the request's coroutine for ever.
- A connection with no request in progress (a fresh one, or keep-alive between requests)
  closes after `idle_timeout` seconds of silence. Idle closes are routine and logged at
  debug level; refusals and deadlines at info, one line each (the daemon limits repeated
  lines, see mailcore.logfilter).

The request-size limit, enforced while the body arrives rather than after:

`LimitedRequest` is the site's request class. The limit is `[web] json_max_body` (1 MiB) on
every path but the upload paths, which take `[web] max_body` (25 MiB) or more (below): a
path that reads only JSON, a form or text fields never buffers more. A body declared larger
than the limit (`Content-Length`) is refused as soon as the headers are in: no `100
Continue` is sent, no byte of the body is stored, and the 413 goes out at once on a
connection that then closes. A chunked body is counted as it arrives; past the limit nothing
more is stored and the 413 goes out at once too. The reply itself comes from the root
resource, in the shape of the API the path belongs to (`body_too_large` tells it to answer
413).

An upload path (a safedrop file, a Mail API message with attachments) takes bodies larger
than every other path's limit, and larger than `[web] max_body`, but only from a client its
API would serve: when a body over `json_max_body` is announced (or comes chunked) on such a
path, reading stops once the headers are in (the connection is paused, nothing of the body is
stored) while `BodyLimits.gate` checks the request's credential (in its headers or query:
the credential a JSON or form body may carry is never in a body that large). A request
without a good one is answered at once without its body (the API's own 401) and closes
lingering, as below; anyone else's upload is read on. Without the gate, anyone could make the
daemon read and write `max_file_size` (2 GiB) to disk per connection, or 25 MiB before its
401. A good credential is resolved from memory after its first use (Identity.resolve), and
a bad one is looked up once for the gate and the API's own 401 (CredentialResolver), so the
gate adds no SQL query to a request. For a body over `max_body` (or chunked) the gate also asks
the path's API what it would refuse anyway (a safedrop bundle not the caller's, already
sent, or without room for the declared length; too many uploads under way): such a request
is answered at once with that reply, its body unread, as well. The gate answers within `[web]
reply_timeout`: a store that does not answer it (frozen, hung) gets the request its API's 503
with Retry-After, its body unread (web.root.upload_gate).

After such a 413 the connection closes "lingering" (as nginx does): our side stops writing,
and what the client still sends is read and dropped, for at most `LINGER_SECONDS` or until
the declared body has arrived. A client that writes its whole body before it reads (Python's
http.client, requests) then sees the 413 instead of a connection reset.
"""

from __future__ import annotations

import io
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IDelayedCall,
    INegotiated,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest

from web.corked import CorkedChannel
from web.forwarded import forwarded_client, forwarded_secure, trusted

DEFAULT_MAX_BODY = 25 * 1024 * 1024
LINGER_SECONDS = 10.0
# What a refused connection is told, and how long it may still send before we close.
RETRY_AFTER_SECONDS = 10
REFUSED_LINGER_SECONDS = 2.0

log = Logger(namespace="mailcore.web.connections")


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
    """A Request that refuses bodies larger than its site's `max_body` (and, behind a proxy
    of `[web] trusted_proxies`, names the client the proxy names: web.forwarded)."""

    body_too_large = False
    # The upload gate refused the request: its body is not read (see the module docstring).
    body_refused = False
    # The reply the upload path's API refused it with (web.root.upload_gate), if not a 401.
    upload_refusal: Exception | None = None
    # The gated body is over `[web] max_body` (or chunked): the gate asks the path's API
    # what else it would refuse, not only the credential.
    over_max_body = False
    _continue = False
    _received = 0

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # The site's `[web] trusted_proxies` when the peer is one of them (asked now: the
        # access log asks for the client once the request has let go of its channel).
        settings = getattr(getattr(channel, "site", None), "settings", None)
        proxies = getattr(settings, "trusted_proxies", ())
        peer = getattr(self.client, "host", None)
        self._proxies: tuple[Any, ...] = proxies if trusted(peer, proxies) else ()

    def getClientAddress(self) -> Any:
        """The client's address: the peer's, or behind a trusted proxy the one its
        X-Forwarded-For names (web.forwarded)."""
        if not self._proxies:
            return self.client
        host = forwarded_client(self.client.host, self.requestHeaders, self._proxies)
        kind = IPv6Address if ":" in host else IPv4Address
        return kind("TCP", host, 0)

    def isSecure(self) -> bool:
        """Whether the client used TLS: the connection's answer, or behind a trusted proxy
        its X-Forwarded-Proto's (web.forwarded)."""
        if self._proxies:
            said = forwarded_secure(self.requestHeaders)
            if said is not None:
                return said
        return bool(super().isSecure())

    def _max_body(self) -> int:
        site = getattr(self.channel, "site", None)
        limit_for = getattr(site, "max_body_for", None)
        if limit_for is not None:
            # The target of the request being received (the Request learns its own only
            # once the whole body is in).
            return int(limit_for(getattr(self.channel, "_path", b"") or b""))
        return int(getattr(site, "max_body", DEFAULT_MAX_BODY))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self.body_too_large = True
            self._read_no_body(length)
            return
        site = getattr(self.channel, "site", None)
        gate = getattr(site, "upload_gate", None)
        default = int(getattr(site, "max_body", DEFAULT_MAX_BODY))
        # Bodies over the limit of every other path (`[web] json_max_body`) are gated.
        above = int(getattr(site, "gate_above", default))
        channel = self.channel
        if gate is None or self._max_body() <= above \
                or (length is not None and length <= above) \
                or not isinstance(channel, http.HTTPChannel) or channel.transport is None:
            super().gotLength(length)
            return
        self.over_max_body = length is None or length > default
        # A body only some may send (module docstring): ask the gate before reading it. It
        # reads the target (the Request sets its own only once the body is in).
        self.uri = channel._path  # type: ignore[attr-defined]
        self.method = channel._command  # type: ignore[attr-defined]
        expect = self.requestHeaders.getRawHeaders(b"expect") or []
        self._continue = any(v.lower() == b"100-continue" for v in expect)
        self.requestHeaders.removeHeader(b"expect")  # "100 Continue" only once let in
        answers: list[bool] = []
        asked = defer.Deferred.fromCoroutine(_ask(gate, self))
        asked.addCallback(answers.append)
        if answers:  # answered at once (no credential at all, or a store without threads)
            self._let_in(length) if answers[0] else self._refuse_now(length)
            return
        super().gotLength(length)
        channel.paused = True  # LineReceiver keeps what arrives in its buffer
        IPushProducer(channel.transport).pauseProducing()
        asked.addCallback(lambda _: self._gate_answered(answers[0]))

    def _read_no_body(self, length: int | None) -> None:
        """Process the request now, as if it had no body; the connection closes after the
        reply (lingering), so the unread body is never parsed as a next request."""
        # We will not read the body: do not invite it with "100 Continue".
        self.requestHeaders.removeHeader(b"expect")
        super().gotLength(0)
        channel = self.channel
        if isinstance(channel, http.HTTPChannel):
            channel.persistent = False
            channel.length = 0
            _LingeringClose(channel, length)

    def _let_in(self, length: int | None) -> None:
        super().gotLength(length)
        self._send_continue()

    def _refuse_now(self, length: int | None) -> None:
        self.body_refused = True
        self._read_no_body(length)

    def _send_continue(self) -> None:
        channel = self.channel
        if self._continue and channel is not None and channel.transport is not None \
                and getattr(channel, "_version", None) == b"HTTP/1.1":
            channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _gate_answered(self, allowed: bool) -> None:
        """The gate's later answer: read on, or answer now without the body."""
        channel = self.channel
        if self._disconnected or not isinstance(channel, http.HTTPChannel) \
                or channel.transport is None:
            return
        if not allowed:
            self.body_refused = True
            self._drop_body()
            return
        self._send_continue()
        channel.paused = False
        IPushProducer(channel.transport).resumeProducing()
        channel.dataReceived(b"")  # what arrived while held

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large or self.body_refused:
            return
        self._received += len(data)
        if self._received <= self._max_body():
            super().handleContentChunk(data)
            return
        self.body_too_large = True
        self._drop_body()

    def _drop_body(self) -> None:
        """Throw away what was kept of the body and answer at once (`_answer_now`)."""
        if self.content is not None:
            self.content.close()
        self.content = io.BytesIO()
        self._answer_now()

    def _answer_now(self) -> None:
        """Stop reading a body (a chunked one over the limit, or one the upload gate refused
        while it was held) and answer the request at once."""
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


async def _ask(gate: Callable[[IRequest], Awaitable[bool]], request: IRequest) -> bool:
    """The gate's answer; an error in it is a refusal (logged), never a read body."""
    try:
        return bool(await gate(request))
    except Exception:
        log.failure("the upload gate failed; the body is not read")
        return False


@dataclass(frozen=True)
class BodyLimits:
    """The largest request body: `default` ([web] json_max_body), or more on the paths that
    take uploads (a regular expression over the path, and its limit). `gate`, when set, is
    asked before a body over `default` is read on an upload path (module docstring)."""

    default: int
    uploads: tuple[tuple[re.Pattern[str], int], ...] = ()
    gate: Callable[[IRequest], Awaitable[bool]] | None = None

    def for_path(self, target: bytes) -> int:
        path = target.split(b"?", 1)[0].decode("latin-1")
        for pattern, limit in self.uploads:
            if pattern.fullmatch(path):
                return max(limit, self.default)
        return self.default


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


# -- connections -----------------------------------------------------------------------------


class _RoutineLogger(Logger):
    """HTTPChannel's logger: it reports every idle timeout at info level ("Timing out
    client"); an idle connection ending is routine, so those lines go out at debug."""

    def info(self, format: str | None = None, **kwargs: object) -> None:
        self.debug(format, **kwargs)


_IDLE, _HEADERS, _BODY, _HANDLING, _CLOSED = range(5)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


def _closing_reply(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: " + str(len(text)).encode() + b"\r\n\r\n" + text)


# A request line or a header line longer than the channel's MAX_LENGTH (16 KiB): Twisted's
# LineReceiver only closes the connection, which a client cannot tell from a crash.
_URI_TOO_LONG = _closing_reply(b"414 URI Too Long", b"The request line is too long.\n")
_HEADER_TOO_LONG = _closing_reply(b"431 Request Header Fields Too Large",
                                  b"A header line is too long.\n")
# RFC 9112 3.2: an HTTP/1.1 request without a Host field, or any request with more than one
# (or with one we cannot read), is a 400. Twisted served them.
_NO_HOST = _closing_reply(b"400 Bad Request", b"An HTTP/1.1 request needs a Host header.\n")
_HOSTS = _closing_reply(b"400 Bad Request", b"A request has one Host header at most.\n")
_BAD_TARGET = _closing_reply(b"400 Bad Request", b"The request target is not valid.\n")
# An absolute-form request target (RFC 9112 3.2.2): scheme, authority, the rest.
_ABSOLUTE = re.compile(rb"(?i:https?)://([^/?#]*)([^#]*)")
# A Host value (or an absolute target's authority): a name, an IPv4 or a bracketed IPv6
# address, and an optional port (no userinfo, no space).
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)(?::[0-9]*)?")


def _unsent(transport: Any) -> int | None:
    """Bytes a TCP transport holds for the client (under TLS, the TCP transport below
    it), or None when that cannot be told.

    Read from Twisted's private FileDescriptor attributes (`dataBuffer`, `offset`,
    `_tempDataLen`): no public interface tells how much of what it holds a paused
    transport sent (IPushProducer says only "full" and "drained"). tests.test_web_limits
    UnsentTests fails if a Twisted upgrade renames them; None would make `_stalled` drop a
    slow reader like a stopped one."""
    for _ in range(3):
        if transport is None:
            return None
        buffered = getattr(transport, "dataBuffer", None)
        if isinstance(buffered, bytes | bytearray | memoryview):
            offset = getattr(transport, "offset", 0)
            return len(buffered) - int(offset) + int(getattr(transport, "_tempDataLen", 0))
        transport = getattr(transport, "transport", None)
    return None


class LimitedChannel(CorkedChannel):
    """An HTTP/1.1 channel with deadlines for each request's headers and body (its
    responses go out corked, see `web.corked`).

    The site sets `header_timeout`, `body_timeout` and `send_timeout` (seconds, None for
    none) and `on_close`, called once when the connection ends. The deadlines run on the
    channel's `callLater`, which the site points at its reactor (a Clock in tests).
    """

    header_timeout: float | None = None
    body_timeout: float | None = None
    on_close: Callable[[], None] | None = None
    _log = _RoutineLogger()
    _phase = _IDLE
    _lines = 0
    _deadline: IDelayedCall | None = None
    # Pipelined bytes held after a reply (requestDone), and the call that reads them.
    _holding = False
    _pipelined: IDelayedCall | None = None
    # Seconds a client may read nothing while a reply waits in our send buffer (the site
    # sets `[web] idle_timeout`), and the deadline running while it does.
    send_timeout: float | None = None
    _stall: IDelayedCall | None = None
    _unsent: int | None = None  # bytes held for the client when the deadline started
    _secure: bool | None = None
    _host: Any = None

    def getHost(self) -> Any:
        """Our address on the connection. Twisted's Request asks it once a request, and the
        transport answers with a new `getsockname` each time."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        """Whether the connection is TLS. Asked several times a request (Klein's URL, the
        page links' scheme) and the same for the connection's whole life, so the transport
        is asked once: each time, Twisted adapts it to ISSLTransport through zope's
        registry."""
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def dataReceived(self, data: bytes) -> None:
        if self._phase == _CLOSED:
            return  # timed out: nothing more is parsed
        if self._phase == _IDLE and data:
            self._enter(_HEADERS)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._phase == _IDLE:  # a pipelined request, replayed after the previous reply
            self._enter(_HEADERS)
        self._lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over MAX_LENGTH: 414 for the request line, 431 for a header, then close
        (Twisted's LineReceiver closes without a word)."""
        if self._phase == _CLOSED or self.transport is None:
            return
        self._refuse(_URI_TOO_LONG if self._lines == 0 else _HEADER_TOO_LONG)

    def allHeadersReceived(self) -> None:
        refusal = self._check_target()
        if refusal is not None:
            self._refuse(refusal)
            return
        super().allHeadersReceived()
        if self.length != 0 and self._phase == _HEADERS:
            self._enter(_BODY)

    def _check_target(self) -> bytes | None:
        """The 400 a request's Host fields or absolute-form target earn (RFC 9112 3.2), or
        None. An absolute-form target (`GET http://host/path`, which a server must accept)
        becomes its path and query, and its authority the Host (3.2.2: the Host field sent
        is ignored); Twisted read the whole URL as the path, and every such request was a
        404."""
        request = self.requests[-1]
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) > 1:
            return _HOSTS
        if not hosts and self._version == b"HTTP/1.1":
            return _NO_HOST
        if hosts and hosts[0] and not _AUTHORITY.fullmatch(hosts[0]):
            return _HOSTS
        absolute = _ABSOLUTE.fullmatch(self._path)
        if absolute is None:
            return None
        authority, rest = absolute.groups()
        if not _AUTHORITY.fullmatch(authority):
            return _BAD_TARGET
        if not rest.startswith(b"/"):
            rest = b"/" + rest
        self._path = rest
        request.requestHeaders.setRawHeaders(b"host", [authority])
        return None

    def _refuse(self, reply: bytes) -> None:
        """Answer a request we will not serve at once, and close: nothing more of the
        connection is read (its body neither)."""
        self.length = 0  # the channel's lineReceived goes on to allContentReceived: a no-op
        self._enter(_CLOSED)
        if self.transport is None:
            return
        self.transport.write(reply)
        self.loseConnection()

    def allContentReceived(self) -> None:
        if self._phase == _CLOSED:
            return  # refused (_refuse)
        self._enter(_HANDLING)
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self._enter(_IDLE)
        # Twisted parses the pipelined requests already read (up to a read's 64 KiB: some
        # thousands of short GETs) as soon as this one is done, and answers each one that
        # answers at once in the same turn of the reactor, even while the client reads
        # none of the replies. The channel holds them instead (LineReceiver keeps them in
        # its buffer while paused) and reads the next one in a later turn, once the
        # transport is not waiting for the client to read: `_read_pipelined`.
        self.paused = True
        self._holding = True
        super().requestDone(request)  # a persistent channel hands its held bytes back
        if not self.persistent or self._phase == _CLOSED or self.transport is None:
            return
        if self._buffer:
            if self._phase == _IDLE:
                self._enter(_HEADERS)  # part of the next request is already here
            if not self._waitingForTransport:
                self._read_pipelined_soon()
            return  # else resumeProducing reads on once the client has read
        self._holding = False
        self.paused = False

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: the client is not reading. It has
        `send_timeout` seconds to read some of it (`_stalled`)."""
        super().pauseProducing()
        if self._stall is None and self.send_timeout is not None and self._phase != _CLOSED:
            self._unsent = _unsent(self.transport)
            self._stall = self.callLater(self.send_timeout, self._stalled)

    def resumeProducing(self) -> None:
        """The transport sent what it held: read a pipelined request held for it."""
        self._cancel_stall()
        super().resumeProducing()
        if self._holding:
            self._read_pipelined_soon()

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        """The client read nothing of a reply for `send_timeout` seconds: drop it (a reply
        streamed by a producer has no other deadline; nothing would be sent to it anyway).
        One that read some (what we hold for it shrank) gets another `send_timeout`."""
        self._stall = None
        unsent = _unsent(self.transport)
        if unsent is not None and self._unsent is not None and unsent < self._unsent \
                and self.send_timeout is not None:
            self._unsent = unsent
            self._stall = self.callLater(self.send_timeout, self._stalled)
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "closed an HTTP connection from {client}: it read nothing of a reply for "
            "{seconds:g} s",
            client=getattr(peer, "host", "-"),
            seconds=self.send_timeout,
        )
        self._enter(_CLOSED)
        if self.transport is not None:
            self.forceAbortClient()

    def _read_pipelined_soon(self) -> None:
        if self._pipelined is None:
            self._pipelined = self.callLater(0, self._read_pipelined)

    def _read_pipelined(self) -> None:
        """Parse the held pipelined bytes (in a turn of the reactor of their own)."""
        self._pipelined = None
        if not self._holding or self._phase == _CLOSED or self.transport is None:
            return
        self._holding = False
        self.paused = False
        self.dataReceived(b"")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._enter(_CLOSED)
        if self._pipelined is not None and self._pipelined.active():
            self._pipelined.cancel()
        self._pipelined = None
        self._cancel_stall()
        try:
            super().connectionLost(reason)
        finally:
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                on_close()

    def _enter(self, phase: int) -> None:
        """Move to `phase`, starting its deadline (headers, body) or none."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._phase = phase
        if phase == _HEADERS:
            self._lines = 0  # the request's lines so far: none is the request line
        timeout = {_HEADERS: self.header_timeout, _BODY: self.body_timeout}.get(phase)
        if timeout is not None:
            self._deadline = self.callLater(timeout, partial(self._too_slow, phase, timeout))

    def _too_slow(self, phase: int, timeout: float) -> None:
        """A deadline passed: 408, then close (abort if the client does not let us)."""
        self._deadline = None
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info(
            "closed an HTTP connection from {client}: request {part} not received "
            "within {seconds:g} s",
            client=getattr(peer, "host", "-"),
            part="headers" if phase == _HEADERS else "body",
            seconds=timeout,
        )
        self._enter(_CLOSED)
        if self.transport is None:
            return
        self.transport.write(_TIMED_OUT)
        self.loseConnection()
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)


class RefusedConnection(Protocol):
    """A connection over a cap: `503` with `Retry-After` at once, then close.

    Our side stops writing at once; what the client still sends (its request) is read
    and dropped for at most `REFUSED_LINGER_SECONDS`, so that it reads the 503 rather than
    a connection reset.
    """

    def __init__(self, reason: str, clock: IReactorTime) -> None:
        self.reason = reason
        self.clock = clock
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        body = f"{self.reason[:1].upper()}{self.reason[1:]}; try again later.\n".encode()
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Retry-After: %d\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
            % (RETRY_AFTER_SECONDS, len(body)) + body
        )
        # Under TLS the reply waits for the handshake, which a half-closed TCP connection
        # could not finish (the TLS wrapper would hand us the TCP transport's method).
        tls = INegotiated.providedBy(self.transport) or ISSLTransport.providedBy(self.transport)
        half_close = None if tls else getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._timer = self.clock.callLater(REFUSED_LINGER_SECONDS, self._close)

    def dataReceived(self, data: bytes) -> None:
        """Dropped: a refused connection serves nothing."""

    def _close(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

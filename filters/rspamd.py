"""rspamd's normal worker: `POST /checkv2` with the raw message.

The envelope goes in request headers (`From`, one `Rcpt` per recipient, `IP`, `Helo`,
`Hostname`, `Queue-Id`, `User`); the JSON reply carries `action`, `score`,
`required_score` and `symbols`. The message is spam when rspamd's action is one of the
configured spam actions (by default `reject`, `rewrite subject`, `add header`) or the score
reaches the threshold (by default rspamd's own `required_score`). A `soft reject` is
rspamd's "try again later" (a task that ran past its task_timeout gets it, with the score of
whatever rules ran, and so do greylisting and rate limits): it is no verdict, the scan fails
as temporary (FilterError), unless the operator lists it among the spam actions.

rspamd's normal worker answers every request with `Connection: close` (3.4, with or without
a keep-alive header), so there is no connection to reuse: the daemon talks to it with
`OneShotHTTP`, one connection, one write and one reply per scan, like the spamd and clamd
clients (`filters._net.Exchange`). A general HTTP client (treq, Agent, its pool) cost more
CPU per scan than rspamd spent scanning: URL parsing with IDNA checks, agent wrappers and
a class built per request, a body producer on a cooperator, a pool that never had a
connection to give back. `RspamdClient` takes any object with treq's `request` (tests give
it StubTreq); with `OneShotHTTP` it asks `fetch` instead: one Deferred from the connection
to the reply's (code, body), the envelope written as ready header lines, no response
object, Headers or coroutine layer per scan. rspamd at an IP literal (the usual
`127.0.0.1:11333`) is reached through `filters._net.DirectTCPEndpoint`: the connection a
scan pays for is a socket the reactor watches, not connectTCP's connector and transport.
"""

from __future__ import annotations

import math
import re
from itertools import islice
from typing import Any
from urllib.parse import urlsplit

import orjson
from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from filters._net import (
    Address,
    ProtocolViolation,
    RequestExchange,
    client_endpoint,
    deadline,
    direct_endpoint,
    parse_address,
    run_exchange,
    with_deadline,
)
from filters.interface import FilterError, ScanContext, Symbol, Verdict, refuse_oversized

DEFAULT_PORT = 11333
DEFAULT_SPAM_ACTIONS = ("reject", "rewrite subject", "add header")
SOFT_REJECT = "soft reject"
KNOWN_ACTIONS = (
    "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject",
)
MAX_REPLY = 1024 * 1024
_MAX_SYMBOLS = 1000
# A chunk's size: hex digits only (int(text, 16) also takes a sign, "0x" and "_").
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _TooLarge(Exception):
    pass


def target(value: str) -> tuple[str, Address]:
    """The base URL and the address to connect to, from `host:port`, `[v6]:port`,
    `http(s)://host[:port]` or a unix socket path (the URL's host is then a placeholder).
    Raises ValueError on anything else."""
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        if not parts.hostname or parts.path.strip("/") or parts.query:
            raise ValueError(f"bad rspamd URL {value!r}: want http(s)://host[:port]")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return value.rstrip("/"), Address(host=parts.hostname, port=port)
    address = parse_address(value, DEFAULT_PORT)
    if address.path:
        return "http://rspamd", address
    return f"http://{address}", address


def make_http_client(
    reactor: Any, address: Address, connect_timeout: float, *, tls: bool = False,
    max_reply: int = MAX_REPLY,
) -> tuple[OneShotHTTP, None]:
    """The daemon's HTTP client for rspamd at `address` (TLS, verified against the system's
    trust roots, for an https URL); it holds no pool (see the module docstring). An IP
    literal without TLS is reached through `filters._net.DirectTCPEndpoint`: a connection
    per scan is then a socket and little more."""
    if tls:
        endpoint = wrapClientTLS(optionsForClientTLS(address.host),
                                 client_endpoint(reactor, address, connect_timeout))
    else:
        endpoint = direct_endpoint(reactor, address, connect_timeout)
    # Room for the status line and header fields above the body's own limit.
    return OneShotHTTP(endpoint, address, max_reply + 64 * 1024), None


class OneShotHTTP:
    """treq's `request(method, url, data=, headers=)` as one HTTP/1.1 exchange on a fresh
    connection to one endpoint (the URL's path is sent; its host only names the Host
    header). The reply (status, then a body by Content-Length, chunked, or up to the close)
    is read whole, at most `max_reply` bytes, and handed back as a response whose
    `deliverBody` gives it at once."""

    def __init__(self, endpoint: IStreamClientEndpoint, address: Address,
                 max_reply: int) -> None:
        self.endpoint = endpoint
        self.address = address
        self.max_reply = max_reply

    async def request(self, method: str, url: str, *, data: bytes | None = None,
                      headers: Headers | None = None) -> _Reply:
        fields = b"".join(
            name + b": " + value + b"\r\n"
            for name, values in (headers or Headers()).getAllRawHeaders() for value in values)
        code, body = await self.fetch(method, url, data, fields)
        return _Reply(code, body)

    def fetch(self, method: str, url: str, data: bytes | None,
              fields: bytes) -> defer.Deferred[tuple[int, bytes]]:
        """`request` without the response object, for `RspamdClient`: one Deferred firing
        with (code, body), or failing with ConnectionError as `request` does. `fields` are
        the request's header lines, ready to send (`header_lines`)."""
        parts = urlsplit(url)
        head = f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n" \
               "Connection: close\r\n".encode("ascii")
        if data is not None:
            head += b"Content-Length: %d\r\n" % len(data)
        request = head + fields + b"\r\n" + (data or b"")
        d = run_exchange("rspamd", self.endpoint, self.address,
                           lambda: _HTTPExchange(request, self.max_reply))
        d.addErrback(_unreachable)
        return d


def _unreachable(failure: Failure) -> Failure:
    """A FilterError of the exchange as the ConnectionError an HTTP client raises."""
    error = failure.value
    if isinstance(error, FilterError):
        raise ConnectionError(error.reason)
    return failure


class _HTTPExchange(RequestExchange):
    """Writes one request; the reply is complete at its Content-Length, at the end of its
    chunks, or (with neither) when rspamd closes. The buffer only grows, so the header is
    parsed once and each chunk once, however finely the reply arrives."""

    def __init__(self, request: bytes, max_reply: int) -> None:
        super().__init__(request, max_reply)
        self.head: tuple[int, int, int | None] | None = None  # code, body start, length
        self.chunks: _Chunks | None = None

    def reply_complete(self, buffer: bytes, closed: bool) -> tuple[int, bytes] | None:
        if self.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if closed:
                    raise ProtocolViolation("connection closed in the reply's header")
                return None
            self.head = self._parse_head(buffer[:end], end + 4)
        code, start, length = self.head
        if self.chunks is not None:
            body = self.chunks.feed(buffer, closed)
            return None if body is None else (code, body)
        if length is not None:
            if len(buffer) - start < length:
                if closed:
                    raise ProtocolViolation("connection closed in the middle of the body")
                return None
            return code, buffer[start:start + length]
        return (code, buffer[start:]) if closed else None

    def _parse_head(self, head: bytes, start: int) -> tuple[int, int, int | None]:
        """(code, where the body starts, Content-Length); sets up `chunks` when chunked."""
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or not status[1].isdigit():
            raise ProtocolViolation(f"not an HTTP status line: {lines[0][:80]!r}")
        fields: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolViolation(f"bad header line {line[:80]!r}")
            fields[name.strip().lower()] = value.strip()
        code = int(status[1])
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            self.chunks = _Chunks(start)
            return code, start, None
        length = fields.get(b"content-length")
        if length is not None and not length.isdigit():
            raise ProtocolViolation(f"bad Content-Length {length[:40]!r}")
        return code, start, None if length is None else int(length)


class _Chunks:
    """A chunked body read as it comes: `feed` takes the reply so far and goes on from the
    chunk it stopped at (the buffer only grows), so each chunk is parsed once."""

    def __init__(self, start: int) -> None:
        self.pos = start  # where the next chunk's size line starts
        self.out: list[bytes] = []

    def feed(self, data: bytes, closed: bool) -> bytes | None:
        """The body once its last chunk has come (None before)."""
        pos = self.pos
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            size_text = data[pos:eol].split(b";", 1)[0].strip()
            if _CHUNK_SIZE.fullmatch(size_text) is None:
                raise ProtocolViolation(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                return b"".join(self.out)
            if len(data) < eol + 2 + size + 2:
                break
            self.out.append(data[eol + 2: eol + 2 + size])
            pos = self.pos = eol + 2 + size + 2
        if closed:
            raise ProtocolViolation("connection closed in the middle of the chunks")
        return None


class _Reply:
    """What `RspamdClient` reads of a response: its code, length and body."""

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body
        self.length = len(body)

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(None)  # type: ignore[arg-type]
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


def request_headers(context: ScanContext | None) -> Headers:
    """rspamd's envelope headers from the scan context (only the fields that are known)."""
    headers = Headers()
    if context is None:
        return headers
    for name, value in _envelope(context):
        if value:
            headers.setRawHeaders(name, [_header_value(value)])
    if context.recipients:
        headers.setRawHeaders(b"Rcpt", [_header_value(r) for r in context.recipients])
    return headers


def header_lines(context: ScanContext | None) -> bytes:
    """`request_headers` as the header lines OneShotHTTP sends (the same names, in the same
    order), without a Headers object to build and read back per scan."""
    if context is None:
        return b""
    lines = [b"%s: %s\r\n" % (_SENT_NAMES[name], _header_value(value))
             for name, value in _envelope(context) if value]
    lines.extend(b"Rcpt: %s\r\n" % _header_value(r) for r in context.recipients)
    return b"".join(lines)


def _envelope(context: ScanContext) -> tuple[tuple[bytes, str], ...]:
    return ((b"From", context.mail_from), (b"IP", context.client_ip), (b"Helo", context.helo),
            (b"Hostname", context.hostname), (b"Queue-Id", context.queue_id),
            (b"User", context.user))


# The names as Headers writes them (its canonical capitalisation: "IP" goes out as "Ip").
_SENT_NAMES = {name: name.title() for name in (
    b"From", b"IP", b"Helo", b"Hostname", b"Queue-Id", b"User")}


def _header_value(value: str) -> bytes:
    """A header value that cannot split the request (no CR, LF or NUL)."""
    if "\r" in value or "\n" in value or "\0" in value:
        value = value.replace("\r", "").replace("\n", "").replace("\0", "")
    return value.encode("utf-8")


def parse_reply(
    name: str, body: bytes, *, spam_actions: tuple[str, ...], threshold: float | None,
) -> Verdict:
    """Turn rspamd's checkv2 JSON into a Verdict; FilterError on anything malformed."""
    try:
        # orjson: a reply is about 1 KiB per message and the standard library's parser
        # took several times longer; both refuse what is not strict JSON.
        data = orjson.loads(body)
    except (ValueError, RecursionError):
        raise FilterError(name, f"rspamd reply is not JSON: {body[:80]!r}") from None
    if not isinstance(data, dict):
        raise FilterError(name, "rspamd reply is not a JSON object")
    if "error" in data and "action" not in data:
        raise FilterError(name, f"rspamd error: {str(data['error'])[:200]}")
    action = data.get("action")
    score = _number(data.get("score"))
    required = _number(data.get("required_score"))
    if not isinstance(action, str) or score is None:
        raise FilterError(name, "rspamd reply lacks action or score")
    limit = threshold if threshold is not None else required
    if limit is None or limit <= 0:
        raise FilterError(name, "rspamd reply lacks required_score and no threshold is set")
    symbols = _symbols(data.get("symbols"))
    reasons = [f"rspamd: {action} ({score:g} / {limit:g})"]
    messages = data.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
    if isinstance(smtp_message, str) and smtp_message:
        reasons.append(f"rspamd: {smtp_message[:200]}")
    if action == SOFT_REJECT and SOFT_REJECT not in spam_actions:
        # rspamd's "try again later": its own failures (a task past task_timeout, "timeout
        # processing message", with the score of the rules that ran so far), greylisting,
        # rate limits. Not a verdict: the message is scanned again when retried.
        said = f": {smtp_message[:200]}" if isinstance(smtp_message, str) else ""
        raise FilterError(name, f"rspamd asked to try again later (soft reject{said})")
    spam = action in spam_actions or score >= limit
    return Verdict(
        filter=name, score=score, threshold=limit, spam=spam,
        symbols=symbols, reasons=tuple(reasons),
    )


def _number(value: Any) -> float | None:
    if type(value) is float:  # (what a JSON number with a fraction is: rspamd's scores)
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _symbols(raw: Any) -> tuple[Symbol, ...]:
    if not isinstance(raw, dict):
        return ()
    found: list[Symbol] = []
    for key, value in islice(raw.items(), _MAX_SYMBOLS):
        if not isinstance(key, str) or not key:
            continue
        score: float | None = None
        description = ""
        if isinstance(value, dict):
            score = _number(value.get("score"))
            desc = value.get("description")
            if isinstance(desc, str):
                description = desc[:200]
        found.append(Symbol(key[:128], score, description))
    return tuple(found)


class RspamdClient:
    """A Filter asking rspamd over HTTP (treq). Give it an HTTPClient (or StubTreq)."""

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        *,
        url: str = f"http://127.0.0.1:{DEFAULT_PORT}",
        name: str = "rspamd",
        timeout: float = 30.0,
        threshold: float | None = None,
        spam_actions: tuple[str, ...] = DEFAULT_SPAM_ACTIONS,
        max_size: int = 0,
        max_reply: int = MAX_REPLY,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"rspamd url must be http(s)://host[:port], not {url!r}")
        self.name = name
        self.http = http
        self.clock = clock
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.threshold = threshold
        self.spam_actions = spam_actions
        self.max_size = max_size
        self.max_reply = max_reply
        self._pool = pool

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """POST the message to /checkv2 and read rspamd's decision."""
        refuse_oversized(self.name, message, self.max_size)
        if isinstance(self.http, OneShotHTTP):
            # The daemon's client: one Deferred from the connection to the checked body,
            # no response object, Headers or coroutine per scan (what `_request` does).
            fetched = self.http.fetch(
                "POST", self.url + "/checkv2", message, header_lines(context))
            checked: defer.Deferred[bytes] = fetched.addCallbacks(
                self._checked, self._unreached)
            body = await deadline(self.name, self.clock, self.timeout, checked)
        else:
            body = await with_deadline(
                self.name, self.clock, self.timeout,
                self._request("POST", "/checkv2", message, request_headers(context)))
        return parse_reply(
            self.name, body, spam_actions=self.spam_actions, threshold=self.threshold)

    async def ping(self) -> str:
        """`GET /ping`; returns the body ("pong") or raises FilterError."""
        body = await with_deadline(
            self.name, self.clock, self.timeout, self._request("GET", "/ping", None, Headers()))
        text = body.decode("utf-8", "replace").strip()
        if text != "pong":
            raise FilterError(self.name, f"unexpected /ping reply {text[:80]!r}")
        return text

    async def close(self) -> None:
        """Close idle keep-alive connections of the pool this client owns."""
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def _request(
        self, method: str, path: str, data: bytes | None, headers: Headers,
    ) -> bytes:
        try:
            response = await self.http.request(
                method, self.url + path, data=data, headers=headers)
        except defer.CancelledError:
            raise
        except Exception as e:
            raise self._cannot_reach(e) from None
        return self._answered(response.code, await self._read_body(response))

    def _answered(self, code: int, body: bytes) -> bytes:
        """The body of a reply read whole (at most max_reply bytes), if its code is 200."""
        if code != 200:
            detail = body[:200].decode("utf-8", "replace").strip()
            raise FilterError(self.name, f"rspamd answered HTTP {code}: {detail!r}")
        return body

    def _cannot_reach(self, error: Any) -> FilterError:
        return FilterError(self.name, f"cannot reach {self.url}: {_why(error)}")

    def _too_large(self) -> FilterError:
        return FilterError(self.name, f"reply larger than {self.max_reply} bytes")

    def _checked(self, reply: tuple[int, bytes]) -> bytes:
        """`_request`'s checks of a reply OneShotHTTP read whole: its size, then its code."""
        code, body = reply
        if len(body) > self.max_reply:
            raise self._too_large()
        return self._answered(code, body)

    def _unreached(self, failure: Failure) -> Failure:
        """`_request`'s treatment of a failed request (the deadline's cancellation passes)."""
        if failure.check(defer.CancelledError) or not failure.check(Exception):
            return failure
        raise self._cannot_reach(failure.value)

    async def _read_body(self, response: Any) -> bytes:
        """The response body, at most max_reply bytes (else the connection is dropped)."""
        declared = response.length if isinstance(response.length, int) else None
        if declared is not None and declared > self.max_reply:
            reader = _BoundedBody(0)
        else:
            reader = _BoundedBody(self.max_reply)
        response.deliverBody(reader)
        try:
            return await reader.done
        except _TooLarge:
            raise self._too_large() from None
        except defer.CancelledError:
            raise
        except Exception as e:
            raise FilterError(self.name, f"reply cut short: {_why(e)}") from None


class _BoundedBody(Protocol):
    """Reads a response body up to `limit` bytes; beyond that, or when cancelled, it stops
    the transport so a hostile or hung server cannot hold the connection or our memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        if self.limit == 0:
            self._stop(_TooLarge())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._stop(_TooLarge())
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)

    def _stop(self, error: Exception) -> None:
        if not self.done.called:
            self.done.errback(error)
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _cancel(self, d: defer.Deferred[bytes]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def _why(e: BaseException) -> str:
    text = str(e).strip()
    if hasattr(e, "reasons"):  # ResponseFailed and friends carry a list of Failures
        text = "; ".join(str(r.value) for r in e.reasons) or text
    return text or type(e).__name__

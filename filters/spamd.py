"""SpamAssassin's spamd, spoken to in SPAMC/1.5 over TCP or a unix socket.

One connection per message: `SYMBOLS SPAMC/1.5` (default), `CHECK` or `REPORT` with a
`Content-length` header and the raw message; spamd answers with a status line
(`SPAMD/1.1 0 EX_OK`), a `Spam: True ; 1000.0 / 5.0` header and, for SYMBOLS, the matched
rule names (for REPORT, a table with each rule's points). `PING` checks health.

A scan that SpamAssassin cut short at its time limit comes back as an ordinary reply with the
score of the rules that ran and the rule TIME_LIMIT_EXCEEDED: when that is not spam, it is no
verdict, and the scan fails as temporary (FilterError). Only SYMBOLS and REPORT name the
rules: with CHECK such a reply cannot be told from a clean one.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from filters._net import (
    Address,
    ProtocolViolation,
    RequestExchange,
    run_exchange,
    with_deadline,
)
from filters.interface import FilterError, ScanContext, Symbol, Verdict, refuse_oversized

COMMANDS = ("SYMBOLS", "CHECK", "REPORT")
DEFAULT_PORT = 783
MAX_REPLY = 256 * 1024  # a REPORT for a message hitting hundreds of rules fits easily

_STATUS = re.compile(rb"^SPAMD/(\d+)\.(\d+) +(-?\d+) *([^\r\n]*)$")
_SPAM = re.compile(
    r"^\s*(true|false|yes|no)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*$", re.I
)
_SYMBOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_REPORT_LINE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Za-z0-9_.\-]{1,128})\s*(.*)$")
_MAX_HEADERS = 64
_MAX_SYMBOLS = 1000  # rules kept from one reply, as rspamd's symbols
_MAX_DESCRIPTION = 200  # characters of a rule's description kept, as rspamd's
# The rule SpamAssassin hits when it stopped checking at its time limit (time_limit, or
# spamd's --timeout-child): the score is that of the rules that ran before.
TIME_LIMIT_RULE = "TIME_LIMIT_EXCEEDED"
_TIME_LIMIT = re.compile(r"(?<![A-Za-z0-9_.\-])TIME_LIMIT_EXCEEDED(?![A-Za-z0-9_.\-])")


@dataclass(frozen=True)
class SpamdReply:
    """A parsed spamd reply: status code and message, headers, body."""

    code: int
    message: str
    headers: dict[str, str]
    body: bytes


def build_request(command: str, message: bytes, user: str = "") -> bytes:
    """The SPAMC/1.5 request for `command` carrying `message`."""
    lines = [f"{command} SPAMC/1.5", f"Content-length: {len(message)}"]
    if user:
        lines.append(f"User: {user}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + message


def parse_reply(data: bytes, closed: bool) -> SpamdReply | None:
    """Parse a spamd reply once it is complete; None while more bytes are due.

    A reply is complete when its body reached Content-length, or, without that header,
    when spamd closed the connection. Raises ProtocolViolation on anything malformed.
    """
    eol = data.find(b"\n")
    if eol < 0:
        if closed:
            raise ProtocolViolation(_short("no status line", data))
        if len(data) > 512:
            raise ProtocolViolation("status line too long")
        return None
    match = _STATUS.match(data[:eol].rstrip(b"\r"))
    if match is None:
        raise ProtocolViolation(_short("not a SPAMD status line", data[:eol]))
    code = int(match.group(3))
    status_message = match.group(4).decode("utf-8", "replace").strip()
    if code != 0:
        # Errors come as a bare status line; there is nothing more to read.
        return SpamdReply(code, status_message, {}, b"")
    end = data.find(b"\r\n\r\n", eol - 1)
    sep = 4
    if end < 0:
        end, sep = data.find(b"\n\n", eol), 2
    if end < 0:
        if closed:
            if data[eol + 1:].strip() == b"":
                # PING's reply, or a bare status line: no headers at all.
                return SpamdReply(code, status_message, {}, b"")
            raise ProtocolViolation("connection closed inside the reply headers")
        return None
    headers = _parse_headers(data[eol + 1:end])
    body = data[end + sep:]
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise ProtocolViolation(f"bad Content-length {length_text[:40]!r}")
        length = int(length_text)
        if len(body) < length:
            if closed:
                raise ProtocolViolation(
                    f"connection closed after {len(body)} of {length} body bytes")
            return None
        body = body[:length]
    elif not closed:
        return None
    return SpamdReply(code, status_message, headers, body)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    lines = [ln for ln in block.replace(b"\r\n", b"\n").split(b"\n") if ln.strip()]
    if len(lines) > _MAX_HEADERS:
        raise ProtocolViolation(f"more than {_MAX_HEADERS} reply headers")
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise ProtocolViolation(_short("bad reply header", line))
        key = name.strip().decode("ascii", "replace").lower()
        if key in headers:
            # Two Spam (or Content-length) headers: two replies run together, or a broken
            # daemon; neither is the verdict (the last one was taken as it).
            raise ProtocolViolation(_short("reply header repeated", line))
        headers[key] = value.strip().decode("utf-8", "replace")
    return headers


def verdict_from_reply(name: str, command: str, reply: SpamdReply) -> Verdict:
    """Turn a successful spamd reply into a Verdict; FilterError for error replies."""
    if reply.code != 0:
        raise FilterError(name, f"spamd error {reply.code}: {reply.message[:200]}")
    spam_header = reply.headers.get("spam")
    if spam_header is None:
        raise FilterError(name, "spamd reply without a Spam header")
    match = _SPAM.match(spam_header)
    if match is None:
        raise FilterError(name, f"cannot parse Spam header {spam_header[:80]!r}")
    is_spam = match.group(1).lower() in ("true", "yes")
    score, threshold = float(match.group(2)), float(match.group(3))
    if not (math.isfinite(score) and math.isfinite(threshold)):  # 309 digits make inf
        raise FilterError(name, f"score out of range in Spam header {spam_header[:80]!r}")
    text = reply.body.decode("utf-8", "replace")
    if not is_spam and _TIME_LIMIT.search(text) is not None:
        raise FilterError(name, f"spamd stopped checking at its time limit ({TIME_LIMIT_RULE}, "
                          f"{score:g} / {threshold:g} from the rules that ran)")
    symbols: tuple[Symbol, ...] = ()
    if command == "SYMBOLS":
        symbols = parse_symbols(text)
    elif command == "REPORT":
        symbols = parse_report(text)
    return Verdict(
        filter=name, score=score, threshold=threshold, spam=is_spam, symbols=symbols,
        reasons=(f"spamd: {score:g} / {threshold:g}",),
    )


def parse_symbols(text: str) -> tuple[Symbol, ...]:
    """Rule names from a SYMBOLS body (comma separated), the first 1,000; anything not
    name-shaped is dropped."""
    names = (part.strip() for part in text.replace("\n", ",").split(","))
    return tuple(itertools.islice(
        (Symbol(n) for n in dict.fromkeys(names) if _SYMBOL_NAME.match(n)), _MAX_SYMBOLS))


def parse_report(text: str) -> tuple[Symbol, ...]:
    """Rules with their points from a REPORT body (the table after the `---- ---` rule), the
    first 1,000."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("---- ")), None)
    if start is None:
        return ()
    found: list[list[Any]] = []
    for line in lines[start + 1:]:
        match = _REPORT_LINE.match(line)
        if match is not None:
            if len(found) == _MAX_SYMBOLS:
                break
            found.append([match.group(2), float(match.group(1)), match.group(3).strip()])
        elif found and line.startswith(" ") and line.strip():
            if len(found[-1][2]) < _MAX_DESCRIPTION:  # (each line copied it whole)
                found[-1][2] = f"{found[-1][2]} {line.strip()}"
    return tuple(Symbol(n, s, d[:_MAX_DESCRIPTION]) for n, s, d in found)


def _short(what: str, data: bytes) -> str:
    return f"{what}: {bytes(data[:80])!r}"


class SpamcExchange(RequestExchange):
    """One SPAMC request and its reply."""

    def send(self) -> None:
        super().send()
        transport: Any = self.transport
        # Like spamc: half-close, or spamd waits for a final newline the message may lack.
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()

    def reply_complete(self, buffer: bytes, closed: bool) -> SpamdReply | None:
        return parse_reply(buffer, closed)


class SpamdClient:
    """A Filter asking spamd. One connection per scan, closed by spamd after the reply."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        address: Address | None = None,
        name: str = "spamd",
        timeout: float = 30.0,
        command: str = "SYMBOLS",
        user: str = "",
        max_size: int = 0,
        max_reply: int = MAX_REPLY,
    ) -> None:
        if command not in COMMANDS:
            raise ValueError(f"spamd command must be one of {', '.join(COMMANDS)}")
        self.name = name
        self.endpoint = endpoint
        self.clock = clock
        self.address = address or Address(host="spamd")
        self.timeout = timeout
        self.command = command
        self.user = user
        self.max_size = max_size
        self.max_reply = max_reply

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """Send the message to spamd; its Spam header decides."""
        refuse_oversized(self.name, message, self.max_size)
        request = build_request(self.command, message, self.user)
        reply = await with_deadline(self.name, self.clock, self.timeout, self._ask(request))
        return verdict_from_reply(self.name, self.command, reply)

    async def ping(self) -> str:
        """spamd's PING; returns the status message (PONG) or raises FilterError."""
        reply = await with_deadline(
            self.name, self.clock, self.timeout, self._ask(b"PING SPAMC/1.5\r\n\r\n"))
        if reply.code != 0:
            raise FilterError(self.name, f"spamd error {reply.code}: {reply.message[:200]}")
        return reply.message

    async def _ask(self, request: bytes) -> SpamdReply:
        reply: SpamdReply = await run_exchange(
            self.name, self.endpoint, self.address,
            lambda: SpamcExchange(request, self.max_reply))
        return reply

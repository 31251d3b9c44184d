"""ClamAV's clamd, over TCP or a unix socket, with the null-terminated `z` commands.

A scan is `zINSTREAM\\0` followed by the message in chunks, each prefixed with its length as
4 big-endian bytes, ended by a zero-length chunk. clamd answers `stream: OK`,
`stream: <signature> FOUND`, or an error such as `INSTREAM size limit exceeded. ERROR`
(the message is larger than clamd's StreamMaxLength), then closes the connection.
`zPING` and `zVERSION` check health. clamd scans only once it has the last chunk: a clean
answer that comes sooner is refused as a protocol violation (the filter failed, it did not
say clean).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IPullProducer, IReactorTime, IStreamClientEndpoint
from zope.interface import implementer

from filters._net import Address, Exchange, ProtocolViolation, run_exchange, with_deadline
from filters.interface import FilterError, MessageTooLarge, ScanContext, Verdict, refuse_oversized

DEFAULT_PORT = 3310
DEFAULT_CHUNK = 64 * 1024
DEFAULT_MAX_SIZE = 25 * 1024 * 1024  # Debian's clamd.conf StreamMaxLength
MAX_REPLY = 64 * 1024
_MAX_NAME = 200
SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"


@dataclass(frozen=True)
class ClamdReply:
    """clamd's reply lines (without the terminating NUL), decoded."""

    lines: tuple[str, ...]


def parse_reply(data: bytes, closed: bool) -> ClamdReply | None:
    """A complete reply ends with NUL (z commands); None while more bytes are due.

    clamd's error for an oversized stream may arrive just before it closes the socket; a
    reply cut short without its NUL is a protocol violation unless it is a whole line.
    """
    end = data.find(b"\0")
    if end < 0:
        if not closed:
            return None
        text = data.strip()
        if not text:
            return None
        if not data.endswith(b"\n"):
            raise ProtocolViolation(f"reply cut short: {bytes(data[:80])!r}")
        end = len(data)
    raw = data[:end]
    lines = tuple(
        ln.decode("utf-8", "replace").strip() for ln in raw.split(b"\n") if ln.strip()
    )
    if not lines:
        raise ProtocolViolation("empty reply")
    return ClamdReply(lines)


def verdict_from_reply(name: str, reply: ClamdReply) -> Verdict:
    """Turn an INSTREAM reply into a Verdict; FilterError for errors and garbage."""
    viruses: list[str] = []
    for line in reply.lines:
        if line.startswith(SIZE_LIMIT_REPLY):
            raise MessageTooLarge(
                name, "clamd refused the stream: INSTREAM size limit exceeded "
                "(message larger than clamd's StreamMaxLength)")
        if line.endswith(" ERROR"):
            raise FilterError(name, f"clamd error: {line[:200]}")
        if not line.startswith("stream: "):
            raise FilterError(name, f"unexpected clamd reply: {line[:200]!r}")
        rest = line[len("stream: "):]
        if rest == "OK":
            continue
        if rest.endswith(" FOUND"):
            signature = rest[: -len(" FOUND")].strip()
            if not signature or len(signature) > _MAX_NAME or not signature.isprintable():
                raise FilterError(name, f"bad signature name in clamd reply: {line[:200]!r}")
            viruses.append(signature)
            continue
        raise FilterError(name, f"unexpected clamd reply: {line[:200]!r}")
    unique = tuple(dict.fromkeys(viruses))
    return Verdict(
        filter=name, viruses=unique,
        reasons=tuple(f"clamd found {v}" for v in unique),
    )


def early_reply(reply: ClamdReply) -> None:
    """Check a reply that came before the whole stream was written. clamd scans only once it
    has the terminating chunk, so a clean answer sooner cannot be genuine (a broken or
    hostile daemon, a reply meant for another stream): it is a ProtocolViolation, never a
    clean verdict. An error (the size limit, sent as soon as the stream passes
    StreamMaxLength), a FOUND (a virus either way) or garbage is left to
    `verdict_from_reply`, which never makes those clean."""
    if all(line == "stream: OK" for line in reply.lines):
        raise ProtocolViolation(
            f"answered {reply.lines[0][:80]!r} before the whole message was sent")


@implementer(IPullProducer)
class _ChunkProducer:
    """Writes the message as INSTREAM chunks as fast as the transport drains."""

    def __init__(self, transport: Any, message: bytes, chunk_size: int) -> None:
        self.transport = transport
        self.view = memoryview(message)
        self.chunk_size = chunk_size
        self.offset = 0
        self.finished = False
        self.sent = False  # the whole message and the terminating chunk were written

    def resumeProducing(self) -> None:
        if self.finished:
            return
        chunk = bytes(self.view[self.offset:self.offset + self.chunk_size])
        self.offset += len(chunk)
        if chunk:
            self.transport.write(struct.pack(">I", len(chunk)) + chunk)
        if self.offset >= len(self.view):
            self.transport.write(struct.pack(">I", 0))
            self.sent = True
            self.stop()

    def stopProducing(self) -> None:
        self.finished = True

    def stop(self) -> None:
        if not self.finished:
            self.finished = True
            self.transport.unregisterProducer()


class ClamdExchange(Exchange):
    """One clamd command (a `z` command, optionally streaming a message) and its reply."""

    def __init__(
        self, command: bytes, max_reply: int, payload: bytes | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__(max_reply)
        self.command = command
        self.payload = payload
        self.chunk_size = chunk_size
        self.producer: _ChunkProducer | None = None

    def send(self) -> None:
        transport: Any = self.transport
        transport.write(self.command)
        if self.payload is not None:
            self.producer = _ChunkProducer(transport, self.payload, self.chunk_size)
            transport.registerProducer(self.producer, False)

    def stopped(self) -> None:
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stop()

    def reply_complete(self, buffer: bytes, closed: bool) -> ClamdReply | None:
        reply = parse_reply(buffer, closed)
        if reply is not None and self.payload is not None and not (
                self.producer is not None and self.producer.sent):
            early_reply(reply)  # (the exchange is still running: `stopped` not yet called)
        return reply


class ClamdClient:
    """A Filter asking clamd with INSTREAM; also `ping()` and `version()` for health."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        address: Address | None = None,
        name: str = "clamd",
        timeout: float = 60.0,
        chunk_size: int = DEFAULT_CHUNK,
        max_size: int = DEFAULT_MAX_SIZE,
        max_reply: int = MAX_REPLY,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("clamd chunk_size must be positive")
        self.name = name
        self.endpoint = endpoint
        self.clock = clock
        self.address = address or Address(host="clamd")
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.max_size = max_size
        self.max_reply = max_reply

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """Stream the message to clamd; a FOUND line makes it a virus."""
        refuse_oversized(self.name, message, self.max_size, " (clamd's StreamMaxLength)")
        reply = await self._ask(b"zINSTREAM\0", message)
        return verdict_from_reply(self.name, reply)

    async def ping(self) -> str:
        """`zPING`; returns "PONG" or raises FilterError."""
        reply = await self._ask(b"zPING\0")
        if reply.lines != ("PONG",):
            raise FilterError(self.name, f"unexpected PING reply {reply.lines[0][:80]!r}")
        return "PONG"

    async def version(self) -> str:
        """`zVERSION`: e.g. "ClamAV 1.4.6/27000/...", or raises FilterError."""
        reply = await self._ask(b"zVERSION\0")
        if not reply.lines[0].startswith("ClamAV "):
            raise FilterError(self.name, f"unexpected VERSION reply {reply.lines[0][:80]!r}")
        return reply.lines[0]

    async def _ask(self, command: bytes, payload: bytes | None = None) -> ClamdReply:
        async def exchange() -> ClamdReply:
            reply: ClamdReply = await run_exchange(
                self.name, self.endpoint, self.address,
                lambda: ClamdExchange(command, self.max_reply, payload, self.chunk_size))
            return reply

        return await with_deadline(self.name, self.clock, self.timeout, exchange())

"""The web layer under test: a Core on an in-memory store and a Clock, its root resource
behind StubTreq, and a few helpers to read replies.

Deprecation warnings raised from our own web modules are errors here (those from Klein,
Werkzeug or Twisted stay warnings: we cannot fix them, see notes/twisted-pitfalls.md #12).
"""

from __future__ import annotations

import json
import tracemalloc
import warnings
from dataclasses import dataclass, field
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from mailcore.config import Config
from mailcore.core import Core
from mailcore.identity import User
from mailcore.workers import CpuPool
from tests.support.db import synchronous_database
from web.root import MailcoreSite, RootResource, build_root
from web.settings import WebSettings

warnings.filterwarnings("error", category=DeprecationWarning, module=r"web(\.|$)")

BASE = "http://127.0.0.1"
START = 1_700_000_000.0
PASSWORD = "s3cret-Pa55"


def make_core(config: Config | None = None, url: str | None = None) -> tuple[Core, Clock]:
    """A Core on a synchronous database (in memory, or the one `url` names), a synchronous
    CPU pool and a Clock."""
    clock = Clock()
    clock.advance(START)
    # Servers in tests listen on 127.0.0.1, which the default fetch address policy refuses.
    config = config or Config(sections={"fetch": {"allow_loopback": True}})
    db = synchronous_database(url or "sqlite://")
    core = Core.build(config, db, clock, cpu=CpuPool.for_tests())
    return core, clock


@dataclass
class Web:
    """A root resource over a fresh Core, and StubTreq in front of it."""

    core: Core
    clock: Clock
    root: RootResource
    http: Any  # StubTreq: its request methods are made at run time
    secrets: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, config: Config | None = None, settings: WebSettings | None = None,
              url: str | None = None) -> Web:
        """On an in-memory SQLite store, or (`url`: `tests.support.pg.create_test_database`)
        a real PostgreSQL database, closed by the caller (`web.core.db.close`)."""
        core, clock = make_core(config, url)
        root = build_root(core, settings)
        return cls(core, clock, root, StubTreq(root))

    async def user(
        self, username: str = "alice", email: str | None = None, password: str = PASSWORD
    ) -> User:
        user = await self.core.identity.create_user(
            username, email or f"{username}@example.test", password
        )
        self.secrets.append(password)
        return user

    async def credential(self, user: User, kind: str = "apikey", **kwargs: Any) -> str:
        secret, _ = await self.core.identity.create_credential(user.id, kind, **kwargs)
        self.secrets.append(secret)
        return secret

    async def call(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, dict[str, list[str]], Any]:
        """(status, headers by lower-case name, body as JSON or bytes) of one request."""
        response = await self.http.request(method, BASE + path, **kwargs)
        raw = await response.content()
        headers = {
            name.decode().lower(): [v.decode() for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        body: Any = raw
        if raw and headers.get("content-type", [""])[0].startswith("application/json"):
            body = json.loads(raw)
        return response.code, headers, body


class _Transport(StringTransport):
    """A StringTransport that, like a TCP transport, ignores being resumed once it is
    closing (the channel resumes it when a request ends)."""

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            super().resumeProducing()


@dataclass
class Wire:
    """The web root served by the real site and HTTP channel on a StringTransport: what a
    client on the connection would read, byte for byte (pipelining, a dropped connection)."""

    transport: StringTransport
    channel: Any

    @classmethod
    def open(cls, web: Web) -> Wire:
        settings = WebSettings.from_config(web.core.config)
        site = MailcoreSite(web.root, settings, web.clock)
        transport = _Transport()
        channel = site.buildProtocol(None)
        channel.makeConnection(transport)
        return cls(transport, channel)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def close(self) -> None:
        if self.channel.transport is not None:
            self.channel.connectionLost(None)

    def responses(self) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        """(status line, headers by lower-case name, body) of each response written, read
        as a client does: each body as long as its Content-Length or its chunks say."""
        data = self.transport.value()
        found = []
        while data:
            head, _, data = data.partition(b"\r\n\r\n")
            status, *lines = head.split(b"\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(b":") for line in lines)}
            if headers.get(b"transfer-encoding") == b"chunked":
                body = b""
                while True:
                    size, _, data = data.partition(b"\r\n")
                    n = int(size, 16)
                    body, data = body + data[:n], data[n + 2:]
                    if n == 0:
                        break
                found.append((status, headers, body))
                continue
            length = int(headers.get(b"content-length", b"0"))
            found.append((status, headers, data[:length]))
            data = data[length:]
        return found


def header(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name.lower())
    return values[0] if values else None


def traced_get(web: Web, path: str, token: str, transport: StringTransport) -> int:
    """GET `path` (with `Authorization: Bearer token`) over one whole HTTP/1.0 connection to
    the web root, written to `transport`; the peak of memory traced while it was served
    (the transport keeps what it wants of the reply: a hash, not the body)."""
    site = Site(web.root, reactor=web.clock)  # type: ignore[arg-type]
    site.timeOut = None
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(transport)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        protocol.dataReceived(
            f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode())
        return int(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()

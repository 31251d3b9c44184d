"""The Simple IMAP2API under test: a Web (StubTreq over the root, Clock, in-memory store) with a
fetch key and test webhook rules, a client that carries a user's token, and mail to store.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mailcore.config import Config
from mailcore.identity import User
from mailcore.messages.models import FetchedMessage, Location
from tests.support.web import Web

FETCH_KEY = Fernet.generate_key().decode("ascii")


def config(web: dict[str, Any] | None = None, webhooks: dict[str, Any] | None = None,
           **sections: dict[str, Any]) -> Config:
    """A Config with a fixed fetch key (nothing written to disk) and the given tables."""
    tables: dict[str, dict[str, Any]] = {**sections, "fetch": fetch_section(sections)}
    if web is not None:
        tables["web"] = web
    if webhooks is not None:
        tables["webhooks"] = webhooks
    return Config(sections=tables)


def fetch_section(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`[fetch]` with the test key and loopback allowed (the test servers are on 127.0.0.1),
    under what the test gives in `sections["fetch"]`."""
    return {"secret_key": FETCH_KEY, "allow_loopback": True, **sections.get("fetch", {})}


@dataclass
class Client:
    """Requests as one user, with `Authorization: Token`."""

    web: Web
    user: User
    token: str

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[
            int, dict[str, list[str]], Any]:
        headers = dict(kwargs.pop("headers", {}) or {})
        headers.setdefault("Authorization", f"Token {self.token}")
        return await self.web.call(method, path, headers=headers, **kwargs)

    async def ok(self, method: str, path: str, status: int = 200, **kwargs: Any) -> Any:
        code, _, body = await self.call(method, path, **kwargs)
        assert code == status, f"{method} {path}: {code} {body!r}"
        return body


async def client(web: Web, username: str = "alice") -> Client:
    """A new user and a token obtained the seed's way (POST /api-token-auth/)."""
    user = await web.user(username)
    status, _, body = await web.call(
        "POST", "/api-token-auth/", json={"username": username, "password": web.secrets[-1]}
    )
    assert status == 200, body
    return Client(web, user, body["token"])


def mail(
    n: int,
    *,
    subject: str | None = None,
    body: str | None = None,
    sender: str = "Ann Sender <ann@example.test>",
    recipient: str = "Owner <owner@example.test>",
    day: datetime.date = datetime.date(2024, 11, 1),
    reply_to: int | None = None,
    tag: str = "m",
) -> bytes:
    """Message number `n` (unique Message-ID <tag-n@test>), replying to `reply_to` if given."""
    when = datetime.datetime(day.year, day.month, day.day, 12, n % 60, tzinfo=datetime.UTC)
    headers = [
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: {subject if subject is not None else f'Message {n}'}",
        f"Message-ID: <{tag}-{n}@test>",
        f"Date: {when.strftime('%a, %d %b %Y %H:%M:%S +0000')}",
    ]
    if reply_to is not None:
        headers.append(f"In-Reply-To: <{tag}-{reply_to}@test>")
        headers.append(f"References: <{tag}-{reply_to}@test>")
    text = body if body is not None else f"Body of message {n}."
    return ("\r\n".join(headers) + "\r\n\r\n" + text + "\r\n").encode("utf-8")


async def store(web: Web, user_id: int, raws: list[bytes], *, folder: str = "INBOX",
                account_id: int | None = None) -> list[int]:
    """Store messages as a sync of `account_id` would (no folder state); returns row ids."""
    result = await web.core.messages.store_batch(
        Location(user_id=user_id, account_id=account_id, folder_id=None, folder=folder),
        [FetchedMessage(raw=r) for r in raws],
    )
    return result.created


# -- a real daemon-like stack for integration tests ------------------------------------------


@dataclass
class LiveApi:
    """A Core on a threaded SQLite behind a real HTTP listener on 127.0.0.1."""

    core: Any
    base: str
    http: Any

    async def call(self, method: str, path: str, token: str | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        """(status, JSON body or bytes) of one real HTTP request."""
        import json

        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Token {token}"
        response = await self.http.request(method, self.base + path, headers=headers, **kwargs)
        raw = await response.content()
        kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
        return response.code, json.loads(raw) if kind.startswith(b"application/json") else raw


async def live_api(test: Any, sections: dict[str, dict[str, Any]],
                   backend: str = "sqlite") -> LiveApi:
    """Core + site on the trial reactor (a threaded store of `backend`: sqlite or
    postgresql), torn down with `test`."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from mailcore.config import Config
    from mailcore.core import Core
    from tests.support.db import open_database
    from tests.support.reactor import get_reactor
    from tests.support.servers import tempdir_for
    from web.root import build_site

    reactor = get_reactor()
    data_dir = tempdir_for(test, "mailcore-imap2api-")
    db = await open_database(test, backend)
    tables = {**sections, "fetch": fetch_section(sections)}
    core = Core.build(Config(data_dir=data_dir, sections=tables), db, reactor)
    test.addCleanup(core.cpu.stop)
    port = reactor.listenTCP(0, build_site(core), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    return LiveApi(core, f"http://127.0.0.1:{port.getHost().port}", http)


class Receiver(Resource):
    """A webhook receiver: records each POST (headers by lower-case name, raw body), answers
    the queued status codes (then 200), or never answers while `hang` is set (or, for
    paths in `hang_paths`, always)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.codes: list[int] = []
        self.hang = False
        self.hang_paths: set[bytes] = set()
        self.hanging: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((headers, request.content.read()))
        if self.hang or request.path in self.hang_paths:
            self.hanging.append(request)
            return NOT_DONE_YET
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        return b"ok" if code < 300 else b"boom " * 300


class _Silent(Protocol):
    """Accepts a connection and never says a word (a dead receiver or server)."""


def black_hole() -> Factory:
    return Factory.forProtocol(_Silent)

"""The web layer under test: a Core on an in-memory store and a Clock, its root resource
behind StubTreq, and a few helpers to read replies.

Deprecation warnings raised from our own web modules are errors here (those from Klein,
Werkzeug or Twisted stay warnings: we cannot fix them, see notes/twisted-pitfalls.md #12).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock

from mailcore.config import Config
from mailcore.core import Core
from mailcore.identity import User
from mailcore.store import Database
from mailcore.workers import CpuPool
from web.root import RootResource, build_root
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
    db = Database.for_tests(url or "sqlite://")
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


def header(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name.lower())
    return values[0] if values else None

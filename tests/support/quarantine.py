"""A Core on a Clock whose queue delivers to a scripted connector: for the filtering
pipeline, quarantine and digest tests. Domains use IP next hops, so nothing is resolved."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import select
from twisted.internet import defer

from filters import FilterUnavailable, ScanContext, Verdict
from mailcore.config import Config
from mailcore.gateway.domains import Domain
from mailcore.identity import User
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store.schema import queue_recipients
from tests.support.mailsink import ScriptedConnector
from tests.support.web import Web

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
HOP = "10.0.0.1:2525"


def message(subject: str, text: bytes, sender: str = "spammer@x.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: someone@customer.test\r\nSubject: {subject}\r\n"
        "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <m1@x.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode() + text + b"\r\n"


def eicar_attachment(subject: str = "invoice") -> bytes:
    import base64

    b64 = base64.b64encode(EICAR).decode()
    return (
        "From: v@x.test\r\nTo: someone@customer.test\r\n"
        f"Subject: {subject}\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        "Message-ID: <m2@x.test>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n'
        "--BB\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        '--BB\r\nContent-Type: application/octet-stream; name="e.txt"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{b64}\r\n--BB--\r\n"
    ).encode()


class DownChain:
    """A filter chain of one daemon filter that is down (it never judges inline)."""

    def inline(self, message: bytes) -> bool:
        return False

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        raise FilterUnavailable("spamd", "connection refused")


class Gateway:
    """A Web (Core + StubTreq) with its queue started on the scripted connector."""

    def __init__(self, config: Config | None = None) -> None:
        # These tests are about the filtering stage: on even if a config turns it off.
        # Domains go to HOP, a private address: the operator allows it.
        config = config or Config()
        pipeline = {"filtering": True, **config.section("pipeline")}
        queue = {"allow_private": True, **config.section("queue")}
        config = replace(config, sections={**config.sections, "pipeline": pipeline,
                                           "queue": queue})
        self.web = Web.build(config)
        self.core = self.web.core
        self.clock = self.web.clock
        self.connector = ScriptedConnector()
        self.core.queue.runner.connector = self.connector
        self.core.queue.service.startService()
        self.seq = 0

    async def owner(self, name: str = "alice", tokens: int = 1000) -> User:
        user = await self.web.user(name)
        if tokens:
            await self.core.tokens.credit(user.id, tokens)
        return user

    async def domain(self, user: User, name: str, **options: Any) -> Domain:
        dom = await self.core.domains.add(name, user.id, HOP, **options)
        await self.core.domains.refresh()
        return dom

    async def send(self, body: bytes, *rcpts: str, sender: str = "spammer@x.test",
                   kind: str = "relay") -> str:
        self.seq += 1
        qid = f"Q{self.seq:04d}"
        recipients = []
        for r in rcpts:
            dom = self.core.domains.lookup(r.rpartition("@")[2])
            assert dom is not None
            recipients.append(Recipient(r, dom.id))
        await self.core.spool.accept(qid, Envelope(sender, tuple(recipients), kind=kind), body)
        return qid

    def states(self) -> dict[str, str]:
        r = queue_recipients.c

        def txn(conn: Any) -> dict[str, str]:
            return {row.address: row.state
                    for row in conn.execute(select(r.address, r.state).order_by(r.id))}

        d = self.core.db.read("states", txn)
        out: list[dict[str, str]] = []
        d.addCallback(out.append)
        return out[0]

    def last_errors(self) -> dict[str, str | None]:
        """Each recipient's last error: what `queue show` shows and a DSN quotes."""
        r = queue_recipients.c

        def txn(conn: Any) -> dict[str, str | None]:
            return dict(conn.execute(select(r.address, r.last_error)).tuples().all())

        d = self.core.db.read("errors", txn)
        out: list[dict[str, str | None]] = []
        d.addCallback(out.append)
        return out[0]

    def delivered(self) -> list[tuple[str, list[str], bytes]]:
        return [(f, rcpts, body) for _h, f, rcpts, body, _t in self.connector.delivered]

    async def stop(self) -> None:
        svc = self.core.queue.service
        if svc.running:
            d = svc.stopService()
            self.clock.advance(60)
            await d
        if self.core.quarantine.running:
            self.core.quarantine.stopService()


def stopper(gw: Gateway) -> Any:
    return lambda: defer.Deferred.fromCoroutine(gw.stop())

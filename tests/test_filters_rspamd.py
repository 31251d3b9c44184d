"""The rspamd client: the /checkv2 request it makes and how it reads replies (StubTreq),
hostile replies, timeouts by the Clock, and a real rspamd."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from filters.builtin import GTUBE
from filters.config import build_chain
from filters.interface import FilterError, FilterTimeout, MessageTooLarge, ScanContext, Verdict
from filters.rspamd import RspamdClient
from mailcore.workers import CpuPool
from tests.support import filterd
from tests.support.filterd import message
from tests.support.reactor import get_reactor

GTUBE_REPLY = {
    "is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
    "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0}},
    "messages": {"smtp_message": "Gtube pattern"}, "message-id": "1@example.com",
}
CLEAN_REPLY = {
    "is_skipped": False, "score": 1.0, "required_score": 15.0, "action": "no action",
    "symbols": {
        "DATE_IN_PAST": {"name": "DATE_IN_PAST", "score": 1.0, "metric_score": 1.0,
                         "description": "Message date is in past", "options": ["8762"]},
        "ARC_NA": {"name": "ARC_NA", "score": 0.0, "description": "ARC signature absent"},
    },
}


class FakeRspamd(Resource):
    """Answers /checkv2 with `reply` (bytes, or a dict sent as JSON); records requests.
    With `hang`, it never answers."""

    isLeaf = True

    def __init__(self, reply: Any = None, code: int = 200, hang: bool = False) -> None:
        super().__init__()
        self.reply = CLEAN_REPLY if reply is None else reply
        self.code = code
        self.hang = hang
        self.requests: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []

    def render(self, request: Request) -> Any:
        assert request.content is not None
        headers = {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((request.method, request.path, headers))
        self.bodies = getattr(self, "bodies", [])
        self.bodies.append(request.content.read())
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        if isinstance(self.reply, bytes):
            return self.reply
        return json.dumps(self.reply).encode()


class RspamdClientTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def client(self, resource: FakeRspamd, **kw: Any) -> RspamdClient:
        return RspamdClient(StubTreq(resource), self.clock, url="http://rspamd.test:11333",
                            **kw)

    async def scan(self, resource: FakeRspamd, msg: bytes = b"msg",
                   context: ScanContext | None = None, **kw: Any) -> Verdict:
        return await self.client(resource, **kw).scan(msg, context)

    async def test_request_carries_message_and_envelope(self) -> None:
        fake = FakeRspamd()
        context = ScanContext(mail_from="alice@example.com",
                              recipients=("bob@example.org", "carol@example.net"),
                              client_ip="192.0.2.1", helo="mail.example.com",
                              hostname="mail.example.com", queue_id="Q123", user="alice")
        await self.scan(fake, b"raw message bytes", context)
        method, path, headers = fake.requests[0]
        self.assertEqual((method, path), (b"POST", b"/checkv2"))
        self.assertEqual(fake.bodies, [b"raw message bytes"])
        self.assertEqual(headers[b"From"], [b"alice@example.com"])
        self.assertEqual(headers[b"Rcpt"], [b"bob@example.org", b"carol@example.net"])
        self.assertEqual(headers[b"Ip"], [b"192.0.2.1"])
        self.assertEqual(headers[b"Helo"], [b"mail.example.com"])
        self.assertEqual(headers[b"Hostname"], [b"mail.example.com"])
        self.assertEqual(headers[b"Queue-Id"], [b"Q123"])
        self.assertEqual(headers[b"User"], [b"alice"])

    async def test_unknown_envelope_fields_are_not_sent(self) -> None:
        fake = FakeRspamd()
        await self.scan(fake, context=ScanContext(mail_from="a\r\nX-Evil: 1@b.c"))
        headers = fake.requests[0][2]
        self.assertEqual(headers[b"From"], [b"aX-Evil: 1@b.c"])
        for name in (b"Rcpt", b"Ip", b"Helo", b"Queue-Id", b"X-Evil"):
            self.assertNotIn(name, headers)

    async def test_reject_is_spam(self) -> None:
        verdict = await self.scan(FakeRspamd(GTUBE_REPLY))
        self.assertTrue(verdict.spam)
        self.assertEqual((verdict.score, verdict.threshold), (15.0, 15.0))
        self.assertEqual(verdict.symbol_names, ("GTUBE",))
        self.assertIn("rspamd: Gtube pattern", verdict.reasons)

    async def test_no_action_is_not_spam(self) -> None:
        verdict = await self.scan(FakeRspamd(CLEAN_REPLY))
        self.assertFalse(verdict.spam)
        self.assertEqual(verdict.score, 1.0)
        self.assertEqual(verdict.symbols[0].score, 1.0)
        self.assertEqual(verdict.symbols[0].description, "Message date is in past")

    async def test_spam_actions_decide(self) -> None:
        reply = dict(CLEAN_REPLY, action="add header", score=7.0)
        self.assertTrue((await self.scan(FakeRspamd(reply))).spam)
        self.assertFalse((await self.scan(FakeRspamd(reply), spam_actions=("reject",))).spam)
        reply = dict(CLEAN_REPLY, action="greylist", score=4.0)
        self.assertFalse((await self.scan(FakeRspamd(reply))).spam)

    async def test_a_soft_reject_is_no_verdict(self) -> None:
        # What rspamd answers when a task runs past its task_timeout: a soft reject with
        # the score of the rules that ran so far. Not clean: the scan failed.
        reply = dict(CLEAN_REPLY, action="soft reject", score=1.99,
                     messages={"smtp_message": "timeout processing message"})
        with self.assertRaises(FilterError) as caught:
            await self.scan(FakeRspamd(reply))
        self.assertFalse(caught.exception.permanent)
        self.assertIn("try again later (soft reject: timeout processing message)",
                      str(caught.exception))
        # Unless the operator counts it as spam.
        actions = ("reject", "soft reject")
        self.assertTrue((await self.scan(FakeRspamd(reply), spam_actions=actions)).spam)

    async def test_threshold_override(self) -> None:
        reply = dict(CLEAN_REPLY, score=6.0)
        verdict = await self.scan(FakeRspamd(reply), threshold=6.0)
        self.assertTrue(verdict.spam)
        self.assertEqual(verdict.threshold, 6.0)

    async def test_malformed_replies(self) -> None:
        cases: list[tuple[Any, str]] = [
            (b"<html>oops</html>", "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            ({"score": 1.0}, "lacks action or score"),
            ({"action": "reject", "score": "high"}, "lacks action or score"),
            # NaN is not JSON (RFC 8259), whatever Python's json module accepts.
            (b'{"action": "reject", "score": NaN, "required_score": 15}', "not JSON"),
            (b'{"action": "reject", "score": 1e400, "required_score": 15}', "not JSON"),
            ({"action": "reject", "score": 1.0}, "lacks required_score"),
            ({"error": "Message has been rejected"}, "rspamd error"),
            (b"[" * 100_000, "not JSON"),
        ]
        for reply, expected in cases:
            with self.assertRaises(FilterError) as caught:
                await self.scan(FakeRspamd(reply))
            self.assertIn(expected, str(caught.exception), reply)

    async def test_hostile_symbols_are_bounded(self) -> None:
        symbols: dict[str, Any] = {f"S{i}": {"score": 0.1} for i in range(5000)}
        symbols["x" * 1000] = "not a dict"
        reply = dict(CLEAN_REPLY, symbols=symbols)
        verdict = await self.scan(FakeRspamd(reply))
        self.assertEqual(len(verdict.symbols), 1000)

    async def test_http_error(self) -> None:
        with self.assertRaises(FilterError) as caught:
            await self.scan(FakeRspamd(b"Internal error", code=500))
        self.assertIn("HTTP 500", str(caught.exception))

    async def test_huge_reply_is_refused(self) -> None:
        reply = dict(CLEAN_REPLY, padding="p" * 5000)
        with self.assertRaises(FilterError) as caught:
            await self.scan(FakeRspamd(reply), max_reply=1000)
        self.assertIn("reply larger than 1000 bytes", str(caught.exception))

    def test_silent_server_times_out(self) -> None:
        fake = FakeRspamd(hang=True)
        d = defer.Deferred.fromCoroutine(self.client(fake, timeout=15).scan(b"msg"))
        self.clock.advance(14)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIn("no answer within 15 s",
                      str(self.failureResultOf(d, FilterTimeout).value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_unreachable(self) -> None:
        class Refusing:
            def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
                return defer.fail(ConnectionRefusedError("refused"))

        client = RspamdClient(Refusing(), self.clock, url="http://127.0.0.1:1")
        with self.assertRaises(FilterError) as caught:
            await client.scan(b"msg")
        self.assertIn("cannot reach http://127.0.0.1:1", str(caught.exception))

    async def test_max_size(self) -> None:
        fake = FakeRspamd()
        with self.assertRaises(MessageTooLarge):
            await self.scan(fake, b"x" * 11, max_size=10)
        self.assertEqual(fake.requests, [])

    async def test_ping(self) -> None:
        self.assertEqual(await self.client(FakeRspamd(b"pong\r\n")).ping(), "pong")
        with self.assertRaises(FilterError):
            await self.client(FakeRspamd(b"nope")).ping()

    def test_url_must_be_http(self) -> None:
        self.assertRaises(ValueError, RspamdClient, None, self.clock, url="ftp://x")


class RspamdIntegrationTests(TestCase):
    """A real rspamd (one normal worker, offline), started once for this process."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        self.daemon = await filterd.rspamd()
        self.chain = build_chain(
            {"enabled": ["rspamd"], "rspamd": {"address": self.daemon.address, "timeout": 20}},
            reactor=self.reactor, runner=CpuPool.for_tests())
        self.addCleanup(self.chain.close)

    async def test_gtube_is_rejected(self) -> None:
        verdict = await self.chain.scan(message(GTUBE))
        rspamd = verdict.result("rspamd")
        assert rspamd is not None
        self.assertTrue(rspamd.spam)
        self.assertIn("rspamd: reject", rspamd.reasons[0])
        self.assertIn("GTUBE", rspamd.symbol_names)
        self.assertTrue(verdict.spam)

    async def test_clean_message_is_not_spam(self) -> None:
        context = ScanContext(mail_from="alice@example.com", recipients=("bob@example.org",),
                              client_ip="127.0.0.1", helo="localhost", queue_id="T1")
        verdict = await self.chain.scan(message(), context)
        rspamd = verdict.result("rspamd")
        assert rspamd is not None
        self.assertFalse(rspamd.spam, rspamd.reasons)
        self.assertLess(rspamd.score, 6.0)
        self.assertTrue(any(r.startswith(("rspamd: no action", "rspamd: greylist"))
                            for r in rspamd.reasons), rspamd.reasons)

    async def test_ping(self) -> None:
        self.assertEqual(await self.chain.health(), {"rspamd": "ok: pong"})

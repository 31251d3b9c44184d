"""The reply deadline of HTTP requests (web.deadline): a request whose store does not answer
(a frozen database) gets the API's 503 with Retry-After at `[web] reply_timeout`; its work
not begun is dropped (a write so answered never lands), and the late result of work begun
is dropped. (The real store's dropping: tests.test_store_database.)"""

from __future__ import annotations

from typing import Any

from klein import Klein
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.iweb import IRequest

from mailcore.config import Config, ConfigError
from tests.support.logs import logged_at
from tests.support.web import BASE, Web, header
from web import deadline
from web.api import ApiApp
from web.errors import PlainErrors
from web.metrics import HttpMetrics
from web.openapi import RouteTable
from web.root import Dispatcher, RootResource, build_apps
from web.settings import WebSettings


class HungStore:
    """Makes `db`'s transactions (or the one called `only`) wait until `release`, queued as
    on a frozen database server: each runs then, in the order it was asked for, unless its
    caller gave up meanwhile (cancelled its Deferred: the store drops work not begun)."""

    METHODS = ("run", "read", "read_long", "run_prepared", "run_relaxed")

    def __init__(self, db: Any, only: str | None = None) -> None:
        self.db = db
        self.only = only  # the one transaction (by name) held, or None: all
        methods = self.METHODS
        self.held: list[tuple[defer.Deferred[Any], Any]] = []
        self.real = {name: getattr(db, name) for name in methods}
        for name in methods:
            setattr(db, name, self._holding(name))

    def _holding(self, name: str) -> Any:
        def held(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if self.only is not None and args[0] != self.only:
                return self.real[name](*args, **kwargs)  # type: ignore[no-any-return]
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((d, lambda: self.real[name](*args, **kwargs)))
            return d
        return held

    def release(self) -> None:
        for name, method in self.real.items():
            setattr(self.db, name, method)
        held, self.held = self.held, []
        for d, work in held:
            if not d.called:
                work().chainDeferred(d)


def _deadline_timers(web: Web) -> list[Any]:
    return [c for c in web.clock.getDelayedCalls()
            if getattr(c, "func", None) is deadline._fire]


class ReplyDeadlineTests(TestCase):
    async def asyncSetUp(self) -> tuple[Web, str]:
        web = Web.build(settings=WebSettings(reply_timeout=30))
        user = await web.user()
        self.user_id = user.id
        return web, await web.credential(user)

    async def test_a_read_the_store_does_not_answer_is_503_with_retry_after(self) -> None:
        web, key = await self.asyncSetUp()
        status, _, _ = await web.call("GET", "/api/v1/domain/all", headers={"Api-Key": key})
        self.assertEqual(status, 200)
        self.assertEqual(_deadline_timers(web), [])  # a request answered in time: no timer
        store = HungStore(web.core.db)
        warnings = logged_at(self, LogLevel.warn)
        d = defer.ensureDeferred(
            web.call("GET", "/api/v1/domain/all", headers={"Api-Key": key}))
        web.clock.advance(29.5)
        self.assertNoResult(d)
        self.assertTrue(store.held)
        web.clock.advance(0.5)
        web.http.flush()
        status, headers, body = self.successResultOf(d)
        self.assertEqual(status, 503)
        self.assertEqual(header(headers, "Retry-After"), "30")
        self.assertEqual(body["success"], False)  # Protecmail's envelope
        self.assertEqual(body["msg"], "Try again later: the database did not answer in time.")
        self.assertEqual(warnings, ["answering 503 while the database did not answer in time"])
        [(held, _)] = store.held
        self.assertTrue(held.called)  # cancelled: the handler stopped waiting
        store.release()  # the late answer is dropped: no second reply, nothing logged
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(warnings), 1)
        status, _, _ = await web.call("GET", "/api/v1/domain/all", headers={"Api-Key": key})
        self.assertEqual(status, 200)

    async def test_a_write_answered_503_before_it_began_never_lands(self) -> None:
        """Its client, told the write failed, may send it again: it is not applied
        twice (before, it ran when the store came back)."""
        web, key = await self.asyncSetUp()
        store = HungStore(web.core.db, "update_profile")  # the write hangs
        d = defer.ensureDeferred(web.call(
            "PUT", "/api/v1/user", json={"first_name": "Late"}, headers={"Api-Key": key}))
        web.clock.advance(30)
        web.http.flush()
        status, _, _ = self.successResultOf(d)
        self.assertEqual(status, 503)
        [(held, _)] = store.held
        self.assertTrue(held.called)  # cancelled: the store drops it, never begun
        store.release()
        self.assertEqual(self.flushLoggedErrors(), [])
        user = await web.core.identity.get_user(self.user_id)
        assert user is not None
        self.assertNotEqual(user.first_name, "Late")

    async def test_a_client_that_leaves_cancels_the_work_as_before(self) -> None:
        web, key = await self.asyncSetUp()
        store = HungStore(web.core.db)
        d = defer.ensureDeferred(
            web.call("GET", "/api/v1/domain/all", headers={"Api-Key": key}))
        self.assertNoResult(d)
        d.cancel()
        web.http.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        [(held, _)] = store.held
        self.assertTrue(held.called)  # cancelled: the handler's work stopped
        store.release()
        self.assertEqual(self.flushLoggedErrors(), [])


class _Streaming(ApiApp):
    """An app whose reply begins, then waits (a streamed list whose next page hangs)."""

    name = "streaming"
    title = "streaming"
    shape = PlainErrors()
    app = Klein()
    routes = RouteTable(app, "streaming")

    def __init__(self, settings: WebSettings) -> None:
        super().__init__(settings)
        self.rest: defer.Deferred[None] = defer.Deferred()

    @routes.route("/stream", "GET", summary="stream")
    async def stream(self, request: IRequest) -> bytes:
        request.write(b"first part, ")
        await self.rest
        return b"last part"


class BegunReplyTests(TestCase):
    async def test_a_reply_that_has_begun_is_left_to_finish(self) -> None:
        web = Web.build()
        settings = WebSettings(reply_timeout=30)
        app = _Streaming(settings)
        root = RootResource(
            {**build_apps(web.core, settings), "streaming": app}, settings=settings,
            clock=web.clock, metrics=HttpMetrics.for_registry(web.core.metrics),
            dispatcher=Dispatcher(routes=[("/stream", "streaming")], exact=(),
                                  not_found=[("/", "meta")]))
        http: Any = StubTreq(root)
        d = http.get(BASE + "/stream")
        web.clock.advance(60)
        http.flush()
        app.rest.callback(None)
        http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(response.content()), b"first part, last part")


class SettingTests(TestCase):
    def test_reply_timeout_is_a_positive_number_of_seconds(self) -> None:
        self.assertEqual(WebSettings.from_config(Config()).reply_timeout, 120.0)
        config = Config(sections={"web": {"reply_timeout": 2.5}})
        self.assertEqual(WebSettings.from_config(config).reply_timeout, 2.5)
        for bad in (0, -1, "60", True, float("nan"), float("inf")):
            with self.assertRaisesRegex(ConfigError, r"\[web\] reply_timeout must be a "
                                        "positive number"):
                WebSettings.from_config(Config(sections={"web": {"reply_timeout": bad}}))

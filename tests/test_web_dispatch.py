"""The root resource: which app serves which path, and what every API answers when a path,
a method or a handler goes wrong (404, 405, 500), each in its own shape."""

from __future__ import annotations

import errno
import re

from klein import Klein
from sqlalchemy.exc import OperationalError
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest

from tests.support.logs import logged_at
from tests.support.oauth import access_token
from tests.support.web import Web, header
from web.api import ApiApp
from web.errors import ApiError, PlainErrors
from web.metrics import HttpMetrics
from web.openapi import RouteTable
from web.root import Dispatcher, RootResource, build_apps
from web.settings import WebSettings


class DispatcherTests(TestCase):
    def check(self, path: str, expected: tuple[str, bool]) -> None:
        segments = path.split("/")[1:]
        self.assertEqual(Dispatcher().dispatch(segments), expected, path)

    def test_each_seed_prefix_goes_to_its_api(self) -> None:
        for path, api in [
            ("/api-token-auth/", "imap2api"),
            ("/api/v1/api-token-auth/", "imap2api"),  # "the same under /api/v1/" (API-MAP)
            ("/api/imap-servers/3/sync/", "imap2api"),
            ("/api/emails/threads/", "imap2api"),
            ("/api/v1/emails/7/thread/", "imap2api"),
            ("/api/v1/imap-servers/", "imap2api"),
            ("/api/v1/auth/", "mailapi"),
            ("/api/v1/mail/e2ac585", "mailapi"),
            ("/api/v1/mailboxes/bob@example.test/access/joe", "mailapi"),
            ("/api/v1/ping", "protecmail"),
            ("/api/v1/user", "protecmail"),
            ("/api/v1/invoices/26589", "protecmail"),
            ("/api/v1/tanks", "protecmail"),
            ("/api/v1/tolens", "protecmail"),
            ("/api/v1/token/daily-average", "protecmail"),
            ("/api/v1/domain/example.tld/addresses", "protecmail"),
            ("/api/v1/domains/example.tld", "protecmail"),
            ("/api/v1/quarantine/example.tld/0/3", "protecmail"),
            ("/oauth/authorize", "oauth_pages"),
            ("/oauth/token", "dropmyemail"),
            ("/v1/accounts/4/mailboxes/2/messages", "dropmyemail"),
            ("/", "safedrop"),
            ("/auth", "safedrop"),
            ("/dropbundles/5740/dropfiles", "safedrop"),
            ("/metrics", "meta"),
            ("/openapi.json", "meta"),
        ]:
            self.check(path, (api, True))

    def test_prefixes_match_whole_segments(self) -> None:
        self.check("/api/v1/users", ("protecmail", False))
        self.check("/api/v1/mailx", ("protecmail", False))
        self.check("/authx", ("meta", False))

    def test_unknown_paths_get_the_closest_api(self) -> None:
        self.check("/api/v1/nothing", ("protecmail", False))  # its envelope on every reply
        self.check("/api/nothing", ("imap2api", False))
        self.check("/favicon.ico", ("meta", False))

    def test_root_is_exact(self) -> None:
        self.check("/", ("safedrop", True))
        self.check("//", ("safedrop", True))

    def test_every_declared_route_dispatches_to_its_own_app(self) -> None:
        web = Web.build()
        dispatcher = Dispatcher()
        for app in web.root.apps.values():
            for rule in app.app.url_map.iter_rules():
                path = re.sub(r"<[^>]+>", "x", rule.rule)
                name, served = dispatcher.dispatch(path.split("/")[1:])
                self.assertEqual((name, served), (app.name, True), rule.rule)


class _Probe(ApiApp):
    """An app that shows what Klein saw, and fails on demand."""

    name = "probe"
    title = "probe"
    shape = PlainErrors()
    app = Klein()
    routes = RouteTable(app, "probe")

    @routes.route("/deep/<path:rest>", "GET", summary="echo")
    def echo(self, request: IRequest, rest: str) -> bytes:
        if rest == "boom":
            raise RuntimeError("handler exploded with a secret 0123456789abcdef")
        if rest == "dbdown":
            raise OperationalError("SELECT 1", {}, Exception("connection failed: refused"))
        if rest == "diskfull":
            raise OSError(errno.ENOSPC, "No space left on device")
        if rest == "apierror":
            raise ApiError(409, "conflict here", headers={"X-Why": "test"})
        if rest == "refused":
            raise ApiError(405, "not in this state")
        if rest == "refused-all-but-get":
            raise ApiError(405, "not in this state", headers={"Allow": "GET"})
        if rest == "refused-but-more":
            raise ApiError(405, "not in this state", headers={"allow": "GET, PUT"})
        return self.reply(request, {"path": request.path.decode(), "rest": rest})


def _probe_web() -> Web:
    web = Web.build()
    settings = WebSettings()
    apps = dict(build_apps(web.core, settings))
    apps["probe"] = _Probe(settings)
    root = RootResource(
        apps,
        settings=settings,
        clock=web.clock,
        metrics=HttpMetrics.for_registry(web.core.metrics),
        dispatcher=Dispatcher(routes=[("/deep", "probe")], exact=(), not_found=[("/", "meta")]),
    )
    from treq.testing import StubTreq

    return Web(web.core, web.clock, root, StubTreq(root))


class RootBehaviourTests(TestCase):
    async def test_klein_routes_on_the_full_path(self) -> None:
        web = _probe_web()
        status, _, body = await web.call("GET", "/deep/a/b/c")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"path": "/deep/a/b/c", "rest": "a/b/c"})

    async def test_an_unexpected_error_is_a_logged_500_in_the_apps_shape(self) -> None:
        web = _probe_web()
        status, headers, body = await web.call("GET", "/deep/boom")
        self.assertEqual(status, 500)
        self.assertEqual(body, {"error": "Internal server error.", "status": 500})
        self.assertNotIn("Traceback", str(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(header(headers, "X-Request-Id"))

    async def test_a_database_out_of_reach_is_503_with_retry_after(self) -> None:
        """Each request during a database outage was a 500 and a traceback in the log."""
        web = _probe_web()
        warnings = logged_at(self, LogLevel.warn)
        for _ in range(2):
            status, headers, body = await web.call("GET", "/deep/dbdown")
            self.assertEqual(status, 503)
            self.assertEqual(header(headers, "Retry-After"), "30")
            self.assertEqual(body["error"],
                             "Try again later: the database cannot be reached.")
        self.assertEqual(self.flushLoggedErrors(), [])
        # The same words for every request: the repeat limiter holds a flood back.
        self.assertEqual(warnings, ["answering 503 while the database cannot be reached"] * 2)

    async def test_a_full_disk_is_507_with_retry_after(self) -> None:
        web = _probe_web()
        status, headers, body = await web.call("GET", "/deep/diskfull")
        self.assertEqual(status, 507)
        self.assertEqual(header(headers, "Retry-After"), "30")
        self.assertEqual(body["error"], "Try again later: no room left on the server's storage.")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_an_api_error_keeps_its_status_and_headers(self) -> None:
        web = _probe_web()
        status, headers, body = await web.call("GET", "/deep/apierror")
        self.assertEqual(status, 409)
        self.assertEqual(header(headers, "X-Why"), "test")
        self.assertEqual(body["error"], "conflict here")

    async def test_every_reply_has_its_own_request_id(self) -> None:
        web = Web.build()
        seen = set()
        for path in ("/api/v1/ping", "/api/v1/ping", "/nothing", "/metrics"):
            _, headers, _ = await web.call("GET", path)
            seen.add(header(headers, "X-Request-Id"))
        self.assertEqual(len(seen), 4)

    async def test_a_path_that_is_not_utf8_is_a_400(self) -> None:
        web = Web.build()
        status, _, body = await web.call("GET", "/api/v1/user/%ff")
        self.assertEqual(status, 400)
        self.assertFalse(body["success"])


class CacheControlTests(TestCase):
    """The APIs' replies carry account data, mostly to credentials that are no
    `Authorization` header (X-Auth-Token, Api-Key, Auth-Key, query parameters), which
    RFC 9111 3.5 does not keep from shared caches: one could store a reply and hand it to
    another client. Every reply of the five APIs, errors and HEADs included, says
    `Cache-Control: no-store` (only the login and webhook-secret replies did); the
    stylesheet keeps its year, the service's own endpoints set none."""

    async def test_every_api_reply_says_no_store(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        _, _, reply = await web.call("POST", "/api-token-auth/", json={
            "username": "alice", "password": web.secrets[0]})
        imap2api = {"Authorization": f"Token {reply['token']}"}
        _, _, reply = await web.call("POST", "/api/v1/auth/", json={
            "username": "alice", "password": web.secrets[0]})
        mailapi = {"Auth-Key": reply["auth_key"]}
        _, headers, _ = await web.call("GET", "/auth", headers={
            "X-Auth-User": "alice@example.test", "X-Auth-Key": key})
        safedrop = {"X-Auth-Token": header(headers, "X-Auth-Token") or ""}
        oauth = {"Authorization": "Bearer " + await access_token(web.core.oauth, alice.id)}
        for path, credential, says in [
            ("/api/imap-servers/", imap2api, "no-store"),
            ("/api/v1/emails/", imap2api, "no-store"),
            ("/api/v1/mailboxes/", mailapi, "no-store"),
            ("/api/v1/user", {"Api-Key": key}, "no-store"),
            ("/api/v1/domain/all", {"Api-Key": key}, "no-store"),
            ("/dropbundles", safedrop, "no-store"),  # streamed
            # Its own, once the token is taken (RFC 6750 2.3: private).
            ("/v1/accounts", oauth, "private, no-store"),
        ]:
            for method in ("GET", "HEAD"):
                status, headers, _ = await web.call(method, path, headers=credential)
                self.assertEqual((status, header(headers, "Cache-Control")),
                                 (200, says), (method, path))
            # An error reply, a refused credential among them, says it too.
            for sent in ({}, {name: "0" * 40 for name in credential}):
                status, headers, _ = await web.call("GET", path, headers=sent)
                self.assertEqual((status, header(headers, "Cache-Control")),
                                 (401, "no-store"), (path, sent))
        for path in ("/api/v1/nothing", "/dropbundles/1/nothing", "/v1/nothing"):
            status, headers, _ = await web.call("GET", path)
            self.assertEqual((status, header(headers, "Cache-Control")), (404, "no-store"))

    async def test_the_stylesheet_and_the_service_endpoints_keep_their_own(self) -> None:
        web = Web.build()
        status, headers, _ = await web.call("GET", "/static/mailcore.css")
        self.assertEqual((status, header(headers, "Cache-Control")),
                         (200, "public, max-age=31536000, immutable"))
        for path in ("/openapi.json", "/metrics"):
            status, headers, _ = await web.call("GET", path)
            self.assertEqual((status, header(headers, "Cache-Control")), (200, None), path)


class ChallengeTests(TestCase):
    """RFC 9110 11.6.1: a 401 MUST carry WWW-Authenticate. IMAP2API's said `Token` and
    Dropmyemail's `Bearer`; the Mail API's, Protecmail's and safedrop's said nothing. Each
    API names the credential its document defines (ApiApp.challenge), whichever part of it
    refused the request."""

    async def test_every_api_401_carries_its_challenge(self) -> None:
        web = Web.build()
        alice = await web.user()
        mailapi = 'Auth-Key realm="mailapi"'
        for method, path, sent, challenge in [
            ("GET", "/api/imap-servers/", {}, "Token"),
            ("GET", "/api/imap-servers/", {"Authorization": "Token " + "0" * 40}, "Token"),
            ("GET", "/api/v1/mailboxes/", {}, mailapi),
            ("HEAD", "/api/v1/mailboxes/", {"Auth-Key": "0" * 40}, mailapi),
            ("GET", "/api/v1/user", {}, 'Api-Key realm="protecmail"'),
            ("GET", "/api/v1/domain/all", {"Api-Key": "0" * 40}, 'Api-Key realm="protecmail"'),
            ("GET", "/dropbundles", {}, 'X-Auth-Token realm="safedrop"'),
            ("GET", "/dropbundles", {"X-Auth-Token": "0" * 40}, 'X-Auth-Token realm="safedrop"'),
            # The auth server takes the user and an API key.
            ("GET", "/auth", {"X-Auth-User": "alice@example.test", "X-Auth-Key": "0" * 40},
             'X-Auth-Key realm="safedrop"'),
            ("GET", "/v1/accounts", {}, 'Bearer realm="dropmyemail"'),
            ("GET", "/v1/accounts", {"Authorization": "Bearer " + "0" * 40},
             'Bearer realm="dropmyemail", error="invalid_token"'),
        ]:
            status, headers, _ = await web.call(method, path, headers=sent)
            self.assertEqual((status, header(headers, "WWW-Authenticate")),
                             (401, challenge), (method, path, sent))
        # A wrong password at the Mail API's login is its 401 too.
        status, headers, _ = await web.call("POST", "/api/v1/auth/", json={
            "username": alice.username, "password": "wrong"})
        self.assertEqual((status, header(headers, "WWW-Authenticate")), (401, mailapi))
        # Other statuses carry none.
        status, headers, _ = await web.call("GET", "/api/v1/nothing")
        self.assertEqual((status, header(headers, "WWW-Authenticate")), (404, None))


class NotFoundShapeTests(TestCase):
    async def test_each_api_answers_unknown_paths_in_its_shape(self) -> None:
        web = Web.build()
        cases = [
            ("/api/nothing", {"detail": "Not found."}),
            ("/api/emails/no/such/route/", {"detail": "Not found."}),  # IMAP2API prefix
            ("/api/v1/mail/e2ac585/nothing", {"message": "not found"}),
            ("/v1/nothing", {"error": "not_found", "error_description": "Not found."}),
            ("/dropbundles/12/nothing", {"error": "Not found."}),
            ("/nothing", {"error": "Not found.", "status": 404}),
            ("/api/v1/mailboxes/nothing/at/all", {"message": "not found"}),
            ("/api/v1/emails/no/such/route/", {"detail": "Not found."}),
        ]
        for path, expected in cases:
            status, _, body = await web.call("GET", path)
            self.assertEqual((status, body), (404, expected), path)

    async def test_unknown_api_v1_paths_are_protecmail_envelopes(self) -> None:
        # /api/v1 is shared; what no API there routes answers in Protecmail's envelope
        # (it was the plain {"error", "status"} that no seed client parses).
        web = Web.build()
        for path in ("/api/v1/nothing", "/api/v1/mailx", "/api/v1/users/1", "/api/v1/"):
            status, headers, body = await web.call("GET", path)
            self.assertEqual(status, 404, path)
            self.assertEqual(set(body), {"request_id", "success", "msg"}, path)
            self.assertIs(body["success"], False)
            self.assertEqual(body["request_id"], header(headers, "X-Request-Id"))

    async def test_protecmail_404_is_an_envelope(self) -> None:
        web = Web.build()
        status, _, body = await web.call("GET", "/api/v1/domain/example.tld/no/such/path")
        self.assertEqual(status, 404)
        self.assertEqual(set(body), {"request_id", "success", "msg"})
        self.assertIs(body["success"], False)


class MethodNotAllowedTests(TestCase):
    async def test_each_api_answers_405_in_its_shape_with_allow(self) -> None:
        web = Web.build()
        cases = [
            ("GET", "/api-token-auth/", {"detail": 'Method "GET" not allowed.'}, "POST"),
            ("GET", "/api/v1/auth/", {"error": "Method GET not allowed."}, "HEAD, POST"),
            ("POST", "/auth", {"error": "Method POST not allowed."}, "GET, HEAD"),
            ("DELETE", "/metrics", {"error": "Method DELETE not allowed.", "status": 405},
             "GET, HEAD"),
        ]
        for method, path, expected, allow in cases:
            status, headers, body = await web.call(method, path)
            self.assertEqual((status, body), (405, expected), path)
            self.assertEqual(header(headers, "Allow"), allow, path)

    async def test_every_405_of_every_route_carries_allow(self) -> None:
        """RFC 9110 15.5.6: a 405 MUST carry Allow. Every method a route does not take, on
        every route of every app: each 405 names the route's methods and not the one
        refused."""
        web = Web.build()
        seen = 0
        for app in web.root.apps.values():
            for rule in app.app.url_map.iter_rules():
                path = re.sub(r"<(?:int:)?[^>]*>", "1", rule.rule)
                taken = set(rule.methods or ())
                for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - taken):
                    status, headers, _ = await web.call(method, path)
                    if status != 405:
                        continue
                    seen += 1
                    allow = set((header(headers, "Allow") or "").split(", "))
                    self.assertLessEqual(taken - {"OPTIONS"}, allow, (method, path))
                    self.assertNotIn(method, allow, (method, path))
        self.assertGreater(seen, 300)

    async def test_a_handlers_405_carries_the_methods_of_its_path(self) -> None:
        """A handler's 405 (a method its object's state refuses) went out without Allow."""
        web = _probe_web()
        status, headers, body = await web.call("GET", "/deep/refused")
        self.assertEqual((status, body["error"]), (405, "not in this state"))
        self.assertEqual(header(headers, "Allow"), "GET, HEAD")
        # One that names what its state leaves keeps it, with HEAD where it names GET (the
        # router answers a HEAD wherever a GET is: it said GET alone), and without what the
        # path does not answer at all.
        for rest in ("refused-all-but-get", "refused-but-more"):
            status, headers, _ = await web.call("GET", f"/deep/{rest}")
            self.assertEqual((status, header(headers, "Allow")), (405, "GET, HEAD"), rest)
            status, _, _ = await web.call("HEAD", "/deep/anything")
            self.assertEqual(status, 200)

    async def test_protecmail_405_is_an_envelope(self) -> None:
        web = Web.build()
        status, headers, body = await web.call("POST", "/api/v1/ping")
        self.assertEqual(status, 405)
        self.assertIs(body["success"], False)
        self.assertEqual(body["msg"], "Method POST not allowed.")
        self.assertEqual(header(headers, "Allow"), "GET, HEAD")


class SlashTests(TestCase):
    async def test_trailing_slash_is_optional(self) -> None:
        web = Web.build()
        await web.user()
        status, _, _ = await web.call(
            "POST", "/api-token-auth", json={"username": "alice", "password": "s3cret-Pa55"}
        )
        self.assertEqual(status, 200)
        status, _, body = await web.call("GET", "/api/v1/ping/")
        self.assertEqual(status, 401)  # reached Protecmail's ping, which wants a key
        self.assertEqual(body["msg"], "missing Api-Key header")

    async def test_head_is_served_where_get_is(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        status, _, body = await web.call("HEAD", "/api/v1/ping", headers={"Api-Key": key})
        self.assertEqual((status, body), (200, b""))

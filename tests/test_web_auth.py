"""One resolver, every credential form of API-MAP.md, each API's own 401."""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.oauth import register
from tests.support.web import PASSWORD, Web
from web.api import ApiApp
from web.auth import DROPMYEMAIL, PROTECMAIL, CredentialResolver
from web.dropmyemail import DropmyemailApp
from web.errors import ApiError
from web.imap2api import Imap2ApiApp
from web.mailapi import MailApiApp
from web.ratelimit import RateLimited


def request(headers: dict[str, str] | None = None, uri: str = "/") -> Any:
    req: Any = DummyRequest([b""])
    req.uri = uri.encode()
    req.client = IPv4Address("TCP", "127.0.0.9", 40000)
    for name, value in (headers or {}).items():
        req.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    return req


def rendered(app: ApiApp, error: ApiError) -> tuple[int, dict[str, Any], Any]:
    req = request()
    body = app.error_reply(req, error)
    headers = {k.decode(): v[0].decode() for k, v in req.responseHeaders.getAllRawHeaders()}
    return req.responseCode, headers, json.loads(body)


class Imap2ApiTokenTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.app = cast(Imap2ApiApp, self.web.root.apps["imap2api"])
        status, _, body = await self.web.call(
            "POST", "/api-token-auth/", json={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(status, 200)
        self.token = body["token"]

    async def test_the_token_from_api_token_auth_works_as_authorization_token(self) -> None:
        principal = await self.app.principal(request({"Authorization": f"Token {self.token}"}))
        self.assertEqual(principal.user.username, "alice")
        self.assertEqual(principal.kind, "token")

    async def test_the_same_login_is_served_under_api_v1(self) -> None:
        status, _, body = await self.web.call(
            "POST", "/api/v1/api-token-auth/", json={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(status, 200, body)
        principal = await self.app.principal(request({"Authorization": f"Token {body['token']}"}))
        self.assertEqual(principal.user.id, self.alice.id)

    async def test_the_scheme_is_case_insensitive(self) -> None:
        principal = await self.app.principal(request({"Authorization": f"token {self.token}"}))
        self.assertEqual(principal.user.id, self.alice.id)

    async def drf_401(self, headers: dict[str, str]) -> tuple[dict[str, str], Any]:
        req = request(headers)
        try:
            await self.app.principal(req)
        except ApiError as e:
            status, reply_headers, body = rendered(self.app, e)
            self.assertEqual(status, 401)
            return reply_headers, body
        self.fail("no 401")

    async def test_drf_messages(self) -> None:
        for headers, detail in [
            ({}, "Authentication credentials were not provided."),
            ({"Authorization": "Bearer abc"}, "Authentication credentials were not provided."),
            ({"Authorization": "Token " + "0" * 40}, "Invalid token."),
            ({"Authorization": "Token"}, "Invalid token header. No credentials provided."),
            ({"Authorization": "Token a b"},
             "Invalid token header. Token string should not contain spaces."),
        ]:
            reply_headers, body = await self.drf_401(headers)
            self.assertEqual(body, {"detail": detail}, headers)
            self.assertEqual(reply_headers["WWW-Authenticate"], "Token")

    async def test_an_api_key_is_not_a_token(self) -> None:
        key = await self.web.credential(self.alice, "apikey")
        _, body = await self.drf_401({"Authorization": f"Token {key}"})
        self.assertEqual(body, {"detail": "Invalid token."})

    async def test_authenticated_requests_carry_the_per_user_limit(self) -> None:
        req = request({"Authorization": f"Token {self.token}"})
        await self.app.principal(req)
        self.assertEqual(req.responseHeaders.getRawHeaders(b"X-RateLimit-Limit"), [b"1000"])
        self.assertEqual(req.responseHeaders.getRawHeaders(b"X-RateLimit-Remaining"), [b"999"])

    async def test_unauthenticated_requests_count_against_the_anonymous_limit(self) -> None:
        for _ in range(100):
            await self.drf_401({})
        req = request()
        error = None
        try:
            await self.app.principal(req)
        except ApiError as e:
            error = e
        self.assertIsInstance(error, RateLimited)
        assert error is not None
        status, headers, body = rendered(self.app, error)
        self.assertEqual(status, 429)
        self.assertTrue(body["detail"].startswith("Request was throttled."))
        self.assertEqual(headers["Retry-After"], "36")


class MailApiKeyTests(TestCase):
    async def test_every_mail_api_credential_form(self) -> None:
        web = Web.build()
        await web.user()
        status, _, body = await web.call(
            "POST", "/api/v1/auth/", data={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(status, 200)
        key = body["auth_key"]
        app = cast(MailApiApp, web.root.apps["mailapi"])
        for req in [
            request({"Auth-Key": key}),
            request({"auth_key": key}),
            request(uri=f"/api/v1/mail/?count=4&auth_key={key}"),
            request({"Authorization": f"Token {key}"}),
        ]:
            principal = await app.principal(req)
            self.assertEqual(principal.user.username, "alice")

    async def test_mail_api_401_is_unauthorized(self) -> None:
        web = Web.build()
        app = cast(MailApiApp, web.root.apps["mailapi"])
        for headers in ({}, {"Auth-Key": "f" * 40}, {"Auth-Key": "not hex at all"}):
            try:
                await app.principal(request(headers))
            except ApiError as e:
                self.assertEqual(rendered(app, e)[::2], (401, {"message": "unauthorized"}))
            else:
                self.fail("no 401")


class ProtecmailKeyTests(TestCase):
    async def test_ping_with_a_key_and_without(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        status, _, body = await web.call("GET", "/api/v1/ping", headers={"Api-Key": key})
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"request_id", "success", "msg"})
        self.assertEqual((body["success"], body["msg"]), (True, "pong"))
        status, _, body = await web.call("GET", "/api/v1/ping")
        self.assertEqual((status, body["success"], body["msg"]),
                         (401, False, "missing Api-Key header"))
        status, _, body = await web.call("GET", "/api/v1/ping", headers={"Api-Key": "0" * 40})
        self.assertEqual((status, body["success"], body["msg"]), (401, False, "invalid Api-Key"))

    async def test_a_token_or_session_is_not_an_api_key(self) -> None:
        web = Web.build()
        alice = await web.user()
        for kind in ("token", "session"):
            secret = await web.credential(alice, kind)
            status, _, _ = await web.call("GET", "/api/v1/ping", headers={"Api-Key": secret})
            self.assertEqual(status, 401, kind)

    async def test_a_revoked_key_stops_working(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        await web.core.identity.revoke_credential(alice.id, key[:8])
        status, _, body = await web.call("GET", "/api/v1/ping", headers={"Api-Key": key})
        self.assertEqual((status, body["msg"]), (401, "invalid Api-Key"))

    async def test_optional_gives_none_without_a_credential(self) -> None:
        web = Web.build()
        resolver = CredentialResolver(web.core.identity)
        self.assertIsNone(await resolver.optional(request(), PROTECMAIL))


class DropmyemailTokenTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.app = cast(DropmyemailApp, self.web.root.apps["dropmyemail"])
        self.client = await register(self.web, self.alice)

    async def access_token(self, scope: str = "read") -> str:
        return str((await self.client.token(scope=scope))["access_token"])

    async def test_bearer_and_access_token_parameter(self) -> None:
        token = await self.access_token()
        for req in (request({"Authorization": f"Bearer {token}"}),
                    request(uri=f"/v1/accounts?access_token={token}")):
            principal = await self.app.principal(req, "read")
            self.assertEqual(principal.user.id, self.alice.id)

    async def test_two_different_tokens_are_a_400_invalid_request(self) -> None:
        """RFC 6750 §2, §3.1: one method per request. Which of two tokens was meant cannot be
        told (before, the header's was served); the same token both ways still works."""
        token = await self.access_token()
        other = await self.access_token()
        both = request({"Authorization": f"Bearer {token}"},
                       uri=f"/v1/accounts?access_token={token}")
        self.assertEqual((await self.app.principal(both, "read")).user.id, self.alice.id)
        for header, query in ((token, other), (other, token), (token, "0" * 40)):
            req = request({"Authorization": f"Bearer {header}"},
                          uri=f"/v1/accounts?access_token={query}")
            with self.assertRaises(ApiError) as caught:
                await self.app.principal(req, "read")
            status, headers, body = rendered(self.app, caught.exception)
            self.assertEqual((status, body["error"]), (400, "invalid_request"))
            self.assertIn("send one", body["error_description"])
            self.assertEqual(headers["WWW-Authenticate"],
                             'Bearer realm="dropmyemail", error="invalid_request"')

    async def test_read_implies_email_attachment_contact(self) -> None:
        token = await self.access_token()
        for scope in ("email", "attachment", "contact"):
            await self.app.principal(request({"Authorization": f"Bearer {token}"}), scope)

    async def test_a_missing_scope_is_a_403_insufficient_scope(self) -> None:
        token = await self.access_token()
        try:
            await self.app.principal(request({"Authorization": f"Bearer {token}"}), "write")
        except ApiError as e:
            status, headers, body = rendered(self.app, e)
        else:
            self.fail("no 403")
        self.assertEqual(status, 403)
        self.assertEqual(body["error"], "insufficient_scope")
        self.assertIn('error="insufficient_scope"', headers["WWW-Authenticate"])
        self.assertIn('scope="write"', headers["WWW-Authenticate"])

    async def test_401s_are_oauth_shaped_with_a_bearer_challenge(self) -> None:
        for headers, code in [({}, "invalid_token"), ({"Authorization": "Bearer " + "0" * 40},
                                                      "invalid_token")]:
            try:
                await self.app.principal(request(headers), "read")
            except ApiError as e:
                status, reply_headers, body = rendered(self.app, e)
            else:
                self.fail("no 401")
            self.assertEqual((status, body["error"]), (401, code))
            self.assertTrue(reply_headers["WWW-Authenticate"].startswith('Bearer realm='))
            self.assertEqual('error="invalid_token"' in reply_headers["WWW-Authenticate"],
                             "Authorization" in headers)
            self.assertTrue(body["error_description"])

    async def test_twenty_requests_per_second_per_token(self) -> None:
        token = await self.access_token()
        for _ in range(20):
            await self.app.principal(request({"Authorization": f"Bearer {token}"}), "read")
        req = request({"Authorization": f"Bearer {token}"})
        with self.assertRaises(RateLimited) as caught:
            await self.app.principal(req, "read")
        self.assertEqual(caught.exception.headers["Retry-After"], "1")
        self.web.clock.advance(1)
        await self.app.principal(request({"Authorization": f"Bearer {token}"}), "read")

    async def test_other_credentials_are_not_access_tokens(self) -> None:
        for kind in ("token", "apikey"):
            secret = await self.web.credential(self.alice, kind)
            with self.assertRaises(ApiError) as caught:
                await self.app.principal(request({"Authorization": f"Bearer {secret}"}), "read")
            self.assertEqual(caught.exception.status, 401)

    def test_access_tokens_come_from_the_oauth_provider(self) -> None:
        self.assertEqual(DROPMYEMAIL.kinds, ("oauth",))
        self.assertIsNotNone(self.app.policy.lookup)
        self.assertEqual(DROPMYEMAIL.schemes, ("Bearer",))
        self.assertEqual(DROPMYEMAIL.query, ("access_token",))

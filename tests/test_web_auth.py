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


class OneCredentialPerRequestTests(TestCase):
    """A request presenting two different credentials of its API (two of the places it
    reads one, or a header or parameter given twice) is refused in its API's shape, not
    served as the first one found (a proxy or a client's default header adding its own
    would act for someone else). The same one given twice is served; an Authorization of a
    scheme the API does not take is left alone. No seed says which of two wins: IMAP2API
    answers DRF's 401 for a malformed header, the others 400, Dropmyemail's RFC 6750
    invalid_request."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.bob = await self.web.user("bob")
        self.token = await self.web.credential(self.alice, "token")
        self.other = await self.web.credential(self.bob, "token")
        self.key = await self.web.credential(self.alice)
        self.bob_key = await self.web.credential(self.bob)

    async def call(self, method: str, path: str, headers: dict[str, Any],
                   **kwargs: Any) -> tuple[int, Any]:
        status, _, body = await self.web.call(method, path, headers=headers, **kwargs)
        return status, body

    async def test_imap2api_two_tokens_are_drfs_401(self) -> None:
        for tokens in ([self.token, self.other], [self.other, self.token]):
            status, body = await self.call("GET", "/api/emails/folders/", {
                "Authorization": [f"Token {t}" for t in tokens]})
            self.assertEqual((status, body), (401, {
                "detail": "Invalid token header. Two different tokens were sent; send one."}))
        status, _ = await self.call("GET", "/api/emails/folders/", {
            "Authorization": [f"Token {self.token}", f"token {self.token}"]})
        self.assertEqual(status, 200)

    async def test_mail_api_two_auth_keys_are_a_400(self) -> None:
        message = ("two different auth_keys were sent (in Auth-Key, auth_key, auth_token, "
                   "token, Authorization: Token, the query or the body); send one")
        for headers, query in (
                ({"Auth-Key": self.token, "Authorization": f"Token {self.other}"}, ""),
                ({"Auth-Key": [self.other, self.token]}, ""),
                ({"Auth-Key": self.token, "token": self.other}, ""),
                ({"Auth-Key": self.token}, f"?auth_key={self.other}"),
                ({}, f"?auth_key={self.token}&auth_token={self.other}"),
                ({}, f"?auth_key={self.token}&auth_key=0{self.token}")):
            status, body = await self.call("GET", "/api/v1/mailboxes/" + query, headers)
            self.assertEqual((status, body), (400, {"message": message}), (headers, query))
        # A body's auth_key beside another in a header, or auth_key and auth_token apart.
        for headers, fields in (({"Auth-Key": self.token}, {"auth_key": self.other}),
                                ({}, {"auth_key": self.token, "auth_token": self.other})):
            status, body = await self.call("POST", "/api/v1/mail/", headers,
                                           json={"status": "draft", **fields})
            self.assertEqual((status, body), (400, {"message": message}), fields)
        # The same key in every place is served; a proxy's Basic is not a Mail API key.
        status, body = await self.call(
            "GET", f"/api/v1/mailboxes/?auth_key={self.token}",
            {"Auth-Key": [self.token, self.token], "Authorization": f"Token {self.token}"})
        self.assertEqual(status, 200, body)
        status, body = await self.call(
            "GET", "/api/v1/mailboxes/",
            {"Auth-Key": self.token, "Authorization": "Basic cHJveHk6c2VjcmV0"})
        self.assertEqual(status, 200, body)
        status, body = await self.call("POST", "/api/v1/mail/", {"Auth-Key": self.token},
                                       json={"status": "draft", "auth_key": self.token})
        self.assertEqual((status, body["message"]),  # alice's: she has no mailbox
                         (401, "unauthorized from/reply-to - no mailbox of yours can keep "
                          "this email"))

    async def test_mail_api_login_with_two_api_keys_is_a_400(self) -> None:
        login = {"username": "alice", "password": PASSWORD}
        for headers, query in (({"Api-Key": self.key}, f"?api_key={self.bob_key}"),
                               ({"Api-Key": [self.key, self.bob_key]}, "")):
            status, body = await self.call("POST", "/api/v1/auth/" + query, headers,
                                           json=login)
            self.assertEqual((status, body), (400, {
                "error": "Two different API keys were sent (the query's api_key, the "
                         "form's or the Api-Key header); send one."}))
        status, body = await self.call("POST", f"/api/v1/auth/?api_key={self.key}",
                                       {"Api-Key": self.key}, json=login)
        self.assertEqual(status, 200, body)

    async def test_protecmail_two_api_keys_are_a_400_envelope(self) -> None:
        for keys in ([self.key, self.bob_key], [self.key, "0" * 40]):
            status, body = await self.call("GET", "/api/v1/ping", {"Api-Key": keys})
            self.assertEqual((status, body["success"], body["msg"]),
                             (400, False, "two different Api-Key headers were sent; send one"))
        status, body = await self.call("GET", "/api/v1/ping", {"Api-Key": [self.key] * 2})
        self.assertEqual((status, body["msg"]), (200, "pong"))

    async def test_safedrop_two_tokens_or_accounts_are_a_400(self) -> None:
        session = await self.web.credential(self.alice, "session")
        bob_session = await self.web.credential(self.bob, "session")
        tokens: list[dict[str, Any]] = [{"X-Auth-Token": session, "Auth-Token": bob_session},
                                        {"X-Auth-Token": [bob_session, session]}]
        for headers in tokens:
            status, body = await self.call("GET", "/dropbundles", headers)
            self.assertEqual((status, body), (400, {
                "error": "Two different authentication tokens were sent (X-Auth-Token, "
                         "Auth-Token); send one."}))
            status, body = await self.call("GET", "/auth", headers)
            self.assertEqual(status, 400, body)
        status, body = await self.call("GET", "/dropbundles",
                                       {"X-Auth-Token": session, "Auth-Token": session})
        self.assertEqual((status, body), (200, []))
        # The auth server: one account and one key.
        keys: list[dict[str, Any]] = [
            {"X-Auth-User": ["alice@example.test", "bob@example.test"], "X-Auth-Key": self.key},
            {"X-Auth-User": "alice@example.test", "X-Auth-Key": [self.key, self.bob_key]}]
        for headers in keys:
            status, body = await self.call("GET", "/auth", headers)
            self.assertEqual((status, body), (400, {
                "error": "Two different X-Auth-User or X-Auth-Key values were sent; "
                         "send one."}))
        status, body = await self.call("GET", "/auth", {
            "X-Auth-User": ["alice@example.test"] * 2, "X-Auth-Key": [self.key] * 2})
        self.assertEqual(status, 204, body)

    async def test_dropmyemail_a_repeated_header_or_parameter_is_invalid_request(
            self) -> None:
        client = await register(self.web, self.alice)
        token = str((await client.token(scope="read"))["access_token"])
        other = str((await client.token(scope="read"))["access_token"])
        for headers, query in (({"Authorization": [f"Bearer {token}", f"Bearer {other}"]}, ""),
                               ({}, f"?access_token={token}&access_token={other}")):
            status, body = await self.call("GET", "/v1/accounts" + query, headers)
            self.assertEqual((status, body["error"]), (400, "invalid_request"))
        status, body = await self.call(
            "GET", f"/v1/accounts?access_token={token}&access_token={token}",
            {"Authorization": [f"Bearer {token}"] * 2})
        self.assertEqual((status, body), (200, []))

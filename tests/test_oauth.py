"""The OAuth 2 provider of Dropmyemail (mailcore.oauth behind POST /oauth/token): the
seed's token reply, and a battery of RFC 6749 / RFC 9700 attacks, one test each."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any, cast
from unittest import mock
from urllib.parse import quote, urlencode

from sqlalchemy import delete, func, select, update
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailcore.config import Config, ConfigError
from mailcore.oauth import (
    CODE_TTL,
    AuthorizationRedirect,
    AuthorizationRefused,
    OAuthError,
    OAuthProvider,
    OAuthPruner,
    provider,
)
from mailcore.oauth.settings import OAuthSettings
from mailcore.store import Database
from mailcore.store.schema import oauth_apps, oauth_codes, oauth_tokens
from tests.support.db import engine_query_plans
from tests.support.oauth import (
    REDIRECT,
    Client,
    authorize_uri,
    pkce_pair,
    query_of,
    register,
)
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.web import Web
from web.dropmyemail import DropmyemailApp
from web.errors import ApiError
from web.ratelimit import Rate
from web.settings import WebSettings


class Base(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)
        self.app = cast(DropmyemailApp, self.web.root.apps["dropmyemail"])

    async def who(self, access_token: str, scope: str = "read") -> Any:
        """The user id the token acts for, or the status of the refusal."""
        req: Any = DummyRequest([b""])
        req.requestHeaders.addRawHeader(b"authorization", f"Bearer {access_token}".encode())
        try:
            return (await self.app.principal(req, scope)).user.id
        except ApiError as e:
            return e.status


class TokenReplyTests(Base):
    async def test_the_code_exchange_answers_exactly_the_seed_reply(self) -> None:
        code = await self.client.code()
        status, headers, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT
        )
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"access_token", "token_type", "expires_in", "refresh_token"})
        self.assertEqual((body["token_type"], body["expires_in"]), ("bearer", 7200))
        self.assertEqual(len(body["access_token"]), 64)
        self.assertEqual(headers["cache-control"], ["no-store"])
        self.assertEqual(await self.who(body["access_token"]), self.alice.id)

    async def test_our_own_refusals_say_no_store_as_oauthlibs_do(self) -> None:
        # RFC 6749 5.1/5.2: the token endpoint's replies are not cached. oauthlib's carry
        # Cache-Control: no-store and Pragma: no-cache; those the endpoint refuses itself
        # (a body that is not UTF-8, a JSON value that is no string, an Authorization
        # header that is not ASCII, a body of another type) carry the same.
        cases: list[tuple[int, dict[str, Any]]] = [
            (400, {"data": b"grant_type=\xff", "headers": {
                "Content-Type": "application/x-www-form-urlencoded"}}),
            (400, {"json": {"grant_type": 5}}),
            (401, {"data": {"grant_type": "refresh_token"},
                   "headers": {"Authorization": b"Basic \xff"}}),
            (400, {"data": b"x", "headers": {"Content-Type": "text/plain"}}),
            (400, {"data": {"grant_type": "refresh_token"}}),  # oauthlib's own
        ]
        for status, kwargs in cases:
            got, headers, body = await self.web.call("POST", "/oauth/token", **kwargs)
            self.assertEqual((got, headers.get("cache-control"), headers.get("pragma")),
                             (status, ["no-store"], ["no-cache"]), (kwargs, body))

    async def test_client_credentials_in_http_basic(self) -> None:
        code = await self.client.code()
        basic = base64.b64encode(
            f"{quote(self.client.uid)}:{quote(self.client.secret)}".encode()
        ).decode()
        status, _, body = await self.web.call(
            "POST", "/oauth/token", headers={"Authorization": f"Basic {basic}"},
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT},
        )
        self.assertEqual(status, 200, body)

    async def test_json_body_is_accepted(self) -> None:
        code = await self.client.code()
        status, _, body = await self.web.call("POST", "/oauth/token", json={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "client_id": self.client.uid, "client_secret": self.client.secret,
        })
        self.assertEqual(status, 200, body)

    async def test_secrets_are_stored_hashed(self) -> None:
        token = await self.client.token()

        def dump(conn: Any) -> str:
            rows = [*conn.execute(select(oauth_apps)), *conn.execute(select(oauth_codes)),
                    *conn.execute(select(oauth_tokens))]
            return repr(rows)

        stored = await self.web.core.db.read("dump", dump)
        for secret in (self.client.secret, token["access_token"], token["refresh_token"]):
            self.assertNotIn(secret, stored)
            self.assertNotIn(secret.encode().hex(), stored)

    async def test_access_tokens_expire_after_the_configured_ttl(self) -> None:
        token = await self.client.token()
        self.web.clock.advance(7199)
        self.assertEqual(await self.who(token["access_token"]), self.alice.id)
        self.web.clock.advance(1)
        self.assertEqual(await self.who(token["access_token"]), 401)


class BatteryTests(Base):
    """One attack (or mistake) each; every one ends in an RFC 6749 §5.2 error."""

    async def test_code_reuse_is_refused_and_revokes_what_it_issued(self) -> None:
        code = await self.client.code()
        first = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual(first[0], 200)
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertEqual(await self.who(first[2]["access_token"]), 401)
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first[2]["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))

    async def test_an_expired_code_is_refused(self) -> None:
        code = await self.client.code()
        self.web.clock.advance(CODE_TTL)
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))

    async def test_a_code_just_inside_five_minutes_is_good(self) -> None:
        code = await self.client.code()
        self.web.clock.advance(CODE_TTL - 1)
        status, _, _ = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual(status, 200)

    async def test_redirect_uri_variants_are_refused_at_authorization(self) -> None:
        for variant in (REDIRECT + "x", REDIRECT[:-1], REDIRECT.upper(),
                        REDIRECT.replace("callback", "Callback"), REDIRECT + "?a=b",
                        REDIRECT + "/", "https://client.example.evil/callback"):
            with self.assertRaises(AuthorizationRefused, msg=variant):
                await self.web.core.oauth.consent(authorize_uri(self.client.uid,
                                                                redirect_uri=variant))

    async def test_redirect_uri_variants_are_refused_at_the_token_endpoint(self) -> None:
        for variant in (REDIRECT + "x", REDIRECT[:-1], REDIRECT.upper(), REDIRECT + "?a=b"):
            code = await self.client.code()
            status, _, body = await self.client.exchange(
                grant_type="authorization_code", code=code, redirect_uri=variant)
            self.assertEqual(status, 400, variant)
            self.assertIn(body["error"], ("invalid_request", "invalid_grant"))

    async def test_the_redirect_uri_of_the_request_is_required_at_exchange(self) -> None:
        code = await self.client.code()
        status, _, body = await self.client.exchange(grant_type="authorization_code", code=code)
        self.assertEqual((status, body["error"]), (400, "invalid_request"))

    async def test_an_unknown_client_is_an_error_page_not_a_redirect(self) -> None:
        with self.assertRaises(AuthorizationRefused):
            await self.web.core.oauth.consent(authorize_uri("0" * 64))

    async def test_a_wrong_secret_is_invalid_client(self) -> None:
        code = await self.client.code()
        status, _, body = await self.web.call("POST", "/oauth/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
            "client_id": self.client.uid, "client_secret": "0" * 64,
        })
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        # The code is still good for its rightful client.
        status, _, _ = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual(status, 200)

    async def test_another_clients_code_is_invalid_grant(self) -> None:
        other = await register(self.web, self.alice)
        code = await self.client.code()
        status, _, body = await other.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))

    async def test_pkce_mismatch_and_missing_verifier(self) -> None:
        verifier, challenge = pkce_pair()
        for fields in ({"code_verifier": "w" * 43}, {}):
            code = await self.client.code(code_challenge=challenge,
                                          code_challenge_method="S256")
            status, _, body = await self.client.exchange(
                grant_type="authorization_code", code=code, redirect_uri=REDIRECT, **fields)
            self.assertEqual(status, 400, fields)
            self.assertIn(body["error"], ("invalid_grant", "invalid_request"))
        code = await self.client.code(code_challenge=challenge, code_challenge_method="S256")
        status, _, _ = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT,
            code_verifier=verifier)
        self.assertEqual(status, 200)

    async def test_a_verifier_for_a_code_issued_without_a_challenge_is_invalid_grant(
        self
    ) -> None:
        # PKCE downgrade (RFC 9700 §2.1.1): a code obtained without a challenge (an
        # attacker's, injected into the victim's client) must not pass for the client's own,
        # which it sends with its verifier.
        verifier, _challenge = pkce_pair()
        code = await self.client.code()
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT,
            code_verifier=verifier)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual(status, 200, body)  # the refusal did not use the code up

    async def test_pkce_plain_is_refused(self) -> None:
        with self.assertRaises(AuthorizationRedirect) as caught:
            await self.web.core.oauth.consent(authorize_uri(
                self.client.uid, code_challenge="x" * 43, code_challenge_method="plain"))
        self.assertEqual(query_of(caught.exception.location)["error"], "invalid_request")

    async def test_a_challenge_no_verifier_can_match_is_refused_before_consent(self) -> None:
        # RFC 7636 4.2: an S256 challenge is BASE64URL(SHA256(verifier)), 43 characters.
        # Another value made a code no verifier could exchange, after the user allowed it.
        _, challenge = pkce_pair()
        for bad in ("", "short", challenge + "=", challenge[:-1] + "+", challenge + "A",
                    "\x00" * 43, "a" * 129):
            with self.assertRaises(AuthorizationRedirect, msg=repr(bad)) as caught:
                await self.web.core.oauth.consent(authorize_uri(
                    self.client.uid, code_challenge=bad, code_challenge_method="S256",
                    state="s"))
            query = query_of(caught.exception.location)
            self.assertEqual((query["error"], query["state"]), ("invalid_request", "s"))
            self.assertIn("code_challenge", query["error_description"])
        consent = await self.web.core.oauth.consent(authorize_uri(
            self.client.uid, code_challenge=challenge, code_challenge_method="S256"))
        self.assertEqual(consent.scopes, ("read", "write"))

    async def test_refresh_rotates_and_the_old_refresh_token_dies(self) -> None:
        first = await self.client.token()
        status, _, second = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first["refresh_token"])
        self.assertEqual(status, 200, second)
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])
        self.assertEqual(await self.who(first["access_token"]), 401)
        self.assertEqual(await self.who(second["access_token"]), self.alice.id)
        # The old refresh token again: refused, and the family it came from is revoked.
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertEqual(await self.who(second["access_token"]), 401)

    async def test_a_removed_app_can_neither_exchange_nor_call(self) -> None:
        token = await self.client.token()
        code = await self.client.code()
        await self.web.core.oauth.remove_app(self.client.uid)
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        self.assertEqual(await self.who(token["access_token"]), 401)

    async def test_a_revoked_grant_ends_access_and_refresh(self) -> None:
        token = await self.client.token()
        self.assertEqual(await self.web.core.oauth.revoke(self.alice.id, self.client.uid), 1)
        self.assertEqual(await self.who(token["access_token"]), 401)
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertEqual(await self.web.core.oauth.grants(self.alice.id), [])

    async def test_scope_escalation_on_refresh_is_invalid_scope(self) -> None:
        token = await self.client.token(scope="read")
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"],
            scope="read write")
        self.assertEqual((status, body["error"]), (400, "invalid_scope"))
        self.assertEqual(await self.who(token["access_token"], "write"), 403)

    async def test_scopes_joined_by_an_encoded_plus_are_the_scopes(self) -> None:
        # Seed 000: "Multiple scopes can be added together by using + as a separator";
        # a client that URL-encodes scope=read+write sends read%2Bwrite.
        uri = authorize_uri(self.client.uid, scope="read+write")
        self.assertIn("scope=read%2Bwrite", uri)
        consent = await self.web.core.oauth.consent(uri)
        self.assertEqual(consent.scopes, ("read", "write"))
        token = await self.client.token(scope="read+write+email")
        self.assertEqual(await self.who(token["access_token"], "write"), self.alice.id)
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"], scope="read+email")
        self.assertEqual(status, 200, body)
        self.assertEqual(await self.who(body["access_token"], "write"), 403)
        self.assertEqual(await self.who(body["access_token"], "email"), self.alice.id)

    async def test_an_unknown_scope_is_told_to_the_client(self) -> None:
        with self.assertRaises(AuthorizationRedirect) as caught:
            await self.web.core.oauth.consent(authorize_uri(self.client.uid, scope="admin"))
        self.assertEqual(query_of(caught.exception.location)["error"], "invalid_scope")

    async def test_deny_redirects_with_access_denied_and_state(self) -> None:
        location = await self.web.core.oauth.decide(
            authorize_uri(self.client.uid, state="xyz"), self.alice.id, False)
        self.assertTrue(location.startswith(REDIRECT + "?"))
        query = query_of(location)
        self.assertEqual((query["error"], query["state"]), ("access_denied", "xyz"))
        self.assertNotIn("code", query)

    def after_consent(self, change: Any) -> None:
        """Run `change` (a store transaction) each time the provider's consent check has
        passed: what another request may do between the check and the Allow's transaction."""
        oauth = self.web.core.oauth
        checked = oauth.consent

        async def consent(uri: str) -> Any:
            found = await checked(uri)
            await self.web.core.db.run("race", change)
            return found

        oauth.consent = consent  # type: ignore[method-assign]

    async def test_an_app_removed_or_changed_during_the_decision_is_refused(self) -> None:
        # Between the consent check and the Allow's transaction the app was deleted, or its
        # redirect URIs changed: oauthlib's InvalidClientIdError (MismatchingRedirectURIError)
        # went unhandled, a 500. Now the refusal the consent check gives, no redirect.
        def change(conn: Any) -> None:
            conn.execute(update(oauth_apps).where(oauth_apps.c.uid == self.client.uid)
                         .values(redirect_uris="https://client.example/other"))

        self.after_consent(change)
        for allow in (True, False):
            with self.assertRaises(AuthorizationRefused):
                await self.web.core.oauth.decide(
                    authorize_uri(self.client.uid, state="s"), self.alice.id, allow)
        self.after_consent(lambda conn: conn.execute(
            delete(oauth_apps).where(oauth_apps.c.uid == self.client.uid)))
        with self.assertRaises(AuthorizationRefused):
            await self.web.core.oauth.decide(
                authorize_uri(self.client.uid, state="s"), self.alice.id, True)
        self.assertEqual(await self.web.core.db.read(
            "codes", lambda conn: conn.execute(select(oauth_codes)).all()), [])

    async def test_token_errors_are_those_of_rfc_6749_5_2(self) -> None:
        """A failed client authentication was challenged with Bearer (a resource server's
        scheme), a missing grant_type was unsupported_grant_type and a repeated code
        invalid_grant."""
        code = await self.client.code()
        grant = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
        basic = base64.b64encode(f"{self.client.uid}:nope".encode()).decode()
        status, headers, body = await self.web.call(
            "POST", "/oauth/token", data=grant, headers={"Authorization": f"Basic {basic}"})
        self.assertEqual((status, body["error"], headers["www-authenticate"]),
                         (401, "invalid_client", ['Basic realm="oauth"']))
        status, headers, body = await self.web.call("POST", "/oauth/token", data={
            **grant, "client_id": self.client.uid, "client_secret": "0" * 64})
        self.assertEqual((status, body["error"], headers["www-authenticate"]),
                         (401, "invalid_client", ['Basic realm="oauth"']))
        status, headers, body = await self.web.call(
            "POST", "/oauth/token", data=grant,
            headers={b"Authorization": [b"Basic \xff"]})  # no ASCII: refused by the web
        self.assertEqual((status, body["error"], headers["www-authenticate"]),
                         (401, "invalid_client", ['Basic realm="oauth"']))
        status, _, body = await self.client.exchange(code=code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertIn("grant_type", body["error_description"])
        data = [("client_id", self.client.uid), ("client_secret", self.client.secret),
                *grant.items(), ("code", "another")]
        status, _, body = await self.web.call("POST", "/oauth/token", data=data)
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertIn("code", body["error_description"])
        # None of these used the code.
        status, _, _ = await self.client.exchange(**grant)
        self.assertEqual(status, 200)

    async def test_bad_token_requests_are_4xx_never_5xx(self) -> None:
        cases: list[dict[str, Any]] = [
            {"data": {}},
            {"data": {"grant_type": "password", "username": "a", "password": "b"}},
            {"data": {"grant_type": "authorization_code"}},
            {"json": {"grant_type": ["authorization_code"]}},
            {"data": b"\xff\xfe", "headers": {"Content-Type":
                                               "application/x-www-form-urlencoded"}},
            {"data": {"grant_type": "authorization_code", "code": "x"},
             "headers": {"Authorization": "Basic !!!"}},
            {"data": {"grant_type": "refresh_token", "refresh_token": "x" * 5000}},
        ]
        for case in cases:
            status, _, body = await self.web.call("POST", "/oauth/token", **case)
            self.assertTrue(400 <= status < 500, (case, status, body))
            self.assertIn("error", body)

    async def test_grants_list_the_apps_a_user_let_in(self) -> None:
        await self.client.token(scope="read")
        grants = await self.web.core.oauth.grants(self.alice.id)
        self.assertEqual([(g.app.uid, g.scopes) for g in grants], [(self.client.uid, ("read",))])


class GrantCapTests(Base):
    """Refresh tokens never expire, so each Allow exchanged for tokens added a live family
    for ever: a user keeps [oauth] max_grants_per_user_app per app, the families used last
    (as Google keeps 100 refresh tokens per account and client)."""

    async def refresh(self, token: dict[str, Any]) -> tuple[int, Any]:
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        if status == 200:
            self.web.secrets.extend([body["access_token"], body["refresh_token"]])
        return status, body

    async def live(self) -> int:
        def txn(conn: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(oauth_tokens)
                                    .where(oauth_tokens.c.revoked_at.is_(None))).scalar())
        return await self.web.core.db.read("t", txn)

    async def test_one_more_grant_deletes_the_one_used_longest_ago(self) -> None:
        oauth = self.web.core.oauth
        self.assertEqual(oauth.settings.max_grants_per_user_app, 100)
        oauth.settings = dataclasses.replace(oauth.settings, max_grants_per_user_app=2)
        bob = await self.web.user("bob")
        bobs = await Client(self.web, self.client.uid, self.client.secret, bob).token()
        first, second = await self.client.token(), await self.client.token()
        status, first = await self.refresh(first)  # used last now: second is the oldest
        self.assertEqual(status, 200, first)
        third = await self.client.token()
        self.assertEqual(await self.who(second["access_token"]), 401)
        status, body = await self.refresh(second)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        for kept in (first, third):
            self.assertEqual(await self.who(kept["access_token"]), self.alice.id)
        # Bob's grant to the same app is his own.
        self.assertEqual(await self.who(bobs["access_token"]), bob.id)
        self.assertEqual(await self.live(), 3)
        # Twenty more: alice still has two.
        for _ in range(20):
            self.web.clock.advance(1)  # within the token endpoint's rate
            await self.client.token()
        self.assertEqual(await self.live(), 3)

    async def test_a_user_keeps_the_newest_unused_codes(self) -> None:
        # Each Allow made a code that lived a day past its five minutes (until the prune),
        # however many a script allowing in a loop made.
        used = await self.client.code()
        status, _, _ = await self.client.exchange(
            grant_type="authorization_code", code=used, redirect_uri=REDIRECT)
        self.assertEqual(status, 200)
        with mock.patch("mailcore.oauth.validator.CODES_KEPT", 3):
            codes = [await self.client.code() for _ in range(5)]

        def count(conn: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(oauth_codes)).scalar())

        self.assertEqual(await self.web.core.db.read("t", count), 4)  # 3 unused, the used
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=codes[0], redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.web.clock.advance(1)
        status, _, body = await self.client.exchange(
            grant_type="authorization_code", code=codes[-1], redirect_uri=REDIRECT)
        self.assertEqual(status, 200, body)
        self.web.secrets.extend([body["access_token"], body["refresh_token"]])

    def test_the_setting_is_read(self) -> None:
        self.assertEqual(OAuthSettings.from_section({"max_grants_per_user_app": 5})
                         .max_grants_per_user_app, 5)
        for bad in (0, "5", True):
            with self.assertRaises(ConfigError):
                OAuthSettings.from_section({"max_grants_per_user_app": bad})


class AppTests(Base):
    async def test_redirect_uris_must_be_absolute_http_without_fragment(self) -> None:
        for uri in ("/callback", "ftp://x/cb", "https://x/cb#frag", "https://x/c b",
                    "javascript:alert(1)"):
            with self.assertRaises(OAuthError, msg=uri):
                await self.web.core.oauth.add_app(self.alice.id, "x", [uri])

    async def test_a_redirect_uris_host_is_a_host_name_or_an_ip_address(self) -> None:
        for uri in ("https://a.example;sandbox/cb", "https://a.example,b.example/cb",
                    "https://a\"b.example/cb", "https://a'b.example/cb",
                    "https://user:pw@a.example/cb", "https://user@a.example/cb",
                    "https://a.example:0/cb", "https://a.example:x/cb", "https://a.example:/cb",
                    "https://[::1%25eth0]/cb", "https://[nope]/cb", "https://a_b.example/cb",
                    "https://-a.example/cb", "https://1.2.3/cb", "https://a..example/cb",
                    # http only to a loopback host (the code would cross the network in
                    # the clear)
                    "http://client.example/cb", "http://192.0.2.1/cb", "http://[2001:db8::1]/cb",
                    "http://localhost.example/cb"):
            with self.assertRaises(OAuthError, msg=uri):
                await self.web.core.oauth.add_app(self.alice.id, "x", [uri])
        app, _ = await self.web.core.oauth.add_app(self.alice.id, "x", [
            "HTTPS://Bücher.Example/cb/ü?q=ä", "http://127.0.0.1:8080/cb",
            "http://[0:0::1]:9/cb", "http://localhost/cb", "https://a.example:443/cb"])
        self.assertEqual(app.redirect_uris, (
            "https://xn--bcher-kva.example/cb/%C3%BC?q=%C3%A4", "http://127.0.0.1:8080/cb",
            "http://[::1]:9/cb", "http://localhost/cb", "https://a.example:443/cb"))

    async def test_an_idn_redirect_uri_authorizes_in_either_spelling(self) -> None:
        registered = "https://bücher.example/cb"
        client = await register(self.web, self.alice, registered)
        ascii_form = "https://xn--bcher-kva.example/cb"
        for spelling in (registered, "https://BÜCHER.example/cb", ascii_form):
            consent = await self.web.core.oauth.consent(authorize_uri(
                client.uid, redirect_uri=spelling))
            self.assertEqual(consent.redirect_uri, ascii_form)
            code = await client.code(redirect_uri=spelling)
            status, _, body = await client.exchange(
                grant_type="authorization_code", code=code, redirect_uri=registered)
            self.assertEqual(status, 200, body)
        location = await self.web.core.oauth.decide(
            authorize_uri(client.uid, redirect_uri=registered), self.alice.id, True)
        self.assertTrue(location.startswith(ascii_form + "?code="), location)

    async def test_an_unfit_redirect_uri_registered_before_the_check_is_never_used(
        self
    ) -> None:
        bad = "https://a.example;sandbox/cb"
        await self.web.core.db.run("test", lambda conn: conn.execute(
            oauth_apps.update().where(oauth_apps.c.uid == self.client.uid)
            .values(redirect_uris=bad)))
        with self.assertRaises(AuthorizationRefused):
            await self.web.core.oauth.consent(authorize_uri(self.client.uid, redirect_uri=bad))
        with self.assertRaises(AuthorizationRefused):  # nor as the default (one registered)
            await self.web.core.oauth.consent(authorize_uri(self.client.uid, redirect_uri=None))

    async def test_remove_app_of_another_owner_is_no_such_app(self) -> None:
        bob = await self.web.user("bob")
        with self.assertRaises(OAuthError):
            await self.web.core.oauth.remove_app(self.client.uid, owner_id=bob.id)
        self.assertIsNotNone(await self.web.core.oauth.get_app(self.client.uid))



class TokenRateTests(Base):
    """POST /oauth/token is limited per client (its id and the secret it presents):
    [web] oauth_token_rate, 20 at once and then 10 a second by default. Before, a client
    could refresh in a loop as fast as it asked, a token row stored each time."""

    async def refresh(self, token: dict[str, Any]) -> tuple[int, dict[str, list[str]], Any]:
        return await self.client.exchange(grant_type="refresh_token",
                                          refresh_token=token["refresh_token"])

    async def test_a_client_refreshing_in_a_loop_is_slowed_down(self) -> None:
        token = await self.client.token()  # the exchange is the first request of the 20
        for i in range(19):
            status, _, body = await self.refresh(token)
            self.assertEqual(status, 200, (i, body))
            token = body
        status, headers, body = await self.refresh(token)
        self.assertEqual(status, 429)
        self.assertEqual(body["error"], "slow_down")
        self.assertIn("try again in 1 s", body["error_description"])
        self.assertEqual((headers["retry-after"], headers["cache-control"]), (["1"], ["no-store"]))
        self.assertEqual(headers["x-ratelimit-limit"], ["20"])
        # The refused request stored nothing: its refresh token is still good. After the
        # Retry-After's second, 10 more (10 a second), then 429 again.
        self.web.clock.advance(1)
        for i in range(10):
            status, _, body = await self.refresh(token)
            self.assertEqual(status, 200, (i, body))
            token = body
        self.assertEqual((await self.refresh(token))[0], 429)
        rows = await self.web.core.db.read(
            "rows", lambda conn: len(conn.execute(select(oauth_tokens.c.id)).all()))
        self.assertEqual(rows, 30)

    async def test_the_budget_is_the_clients_own(self) -> None:
        for _ in range(20):
            await self.client.exchange(grant_type="refresh_token", refresh_token="x")
        self.assertEqual((await self.client.exchange(
            grant_type="refresh_token", refresh_token="x"))[0], 429)
        # Another client, and one naming this client's (public) id with a wrong secret, in
        # the form or in HTTP Basic, each have a budget of their own: the client's is not
        # spent by whoever knows its id.
        other = await register(self.web, self.alice)
        code = await other.code()
        status, _, body = await other.exchange(
            grant_type="authorization_code", code=code, redirect_uri=REDIRECT)
        self.assertEqual(status, 200, body)
        status, _, body = await self.web.call("POST", "/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": "x",
            "client_id": self.client.uid, "client_secret": "wrong"})
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        basic = base64.b64encode(f"{self.client.uid}:{self.client.secret}".encode()).decode()
        status, _, body = await self.web.call(
            "POST", "/oauth/token", headers={"Authorization": f"Basic {basic}"},
            data={"grant_type": "refresh_token", "refresh_token": "x"})
        self.assertEqual(status, 429, body)  # the same client, in Basic: the same bucket


class RevocationTests(Base):
    """POST /oauth/revoke (RFC 7009): a client ends one of its tokens and the family it
    belongs to. Before, there was no such route (a 404): a client could not end a grant,
    only the user through the CLI."""

    async def revoke(self, token: str, client: Client | None = None,
                     **fields: str) -> tuple[int, dict[str, list[str]], Any]:
        client = client or self.client
        return await self.web.call("POST", "/oauth/revoke", data={
            "client_id": client.uid, "client_secret": client.secret, "token": token,
            **fields})

    async def refresh(self, token: dict[str, Any]) -> tuple[int, Any]:
        status, _, body = await self.client.exchange(grant_type="refresh_token",
                                                     refresh_token=token["refresh_token"])
        return status, body

    async def test_revoking_a_refresh_token_ends_its_access_tokens(self) -> None:
        first = await self.client.token()
        status, second = await self.refresh(first)
        self.assertEqual(status, 200, second)
        other = await self.client.token()  # another authorization: a family of its own
        status, headers, body = await self.revoke(second["refresh_token"],
                                                  token_type_hint="refresh_token")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual((headers["cache-control"], headers["pragma"]),
                         (["no-store"], ["no-cache"]))
        self.assertEqual(await self.who(second["access_token"]), 401)
        status, body = await self.refresh(second)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertEqual(await self.who(other["access_token"]), self.alice.id)
        self.assertEqual((await self.refresh(other))[0], 200)

    async def test_revoking_an_access_token_ends_its_refresh_token(self) -> None:
        token = await self.client.token()
        # A wrong hint is only where to look first (RFC 7009 2.1).
        status, _, _ = await self.revoke(token["access_token"], token_type_hint="refresh_token")
        self.assertEqual(status, 200)
        self.assertEqual(await self.who(token["access_token"]), 401)
        self.assertEqual((await self.refresh(token))[0], 400)

    async def test_a_rotated_refresh_token_revokes_the_live_one_it_led_to(self) -> None:
        first = await self.client.token()
        status, second = await self.refresh(first)
        self.assertEqual(status, 200)
        self.assertEqual((await self.revoke(first["refresh_token"]))[0], 200)
        self.assertEqual(await self.who(second["access_token"]), 401)

    async def test_unknown_and_other_clients_tokens_are_200_and_left_alone(self) -> None:
        status, _, body = await self.revoke("no-such-token")
        self.assertEqual((status, body), (200, b""))
        mine = await self.client.token()
        other = await register(self.web, self.alice)
        status, _, _ = await self.revoke(mine["access_token"], other)
        self.assertEqual(status, 200)
        self.assertEqual(await self.who(mine["access_token"]), self.alice.id)
        self.assertEqual((await self.refresh(mine))[0], 200)

    async def test_the_client_authenticates_as_at_the_token_endpoint(self) -> None:
        token = await self.client.token()
        status, headers, body = await self.web.call("POST", "/oauth/revoke", data={
            "client_id": self.client.uid, "client_secret": "wrong",
            "token": token["access_token"]})
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        self.assertEqual(headers["www-authenticate"], ['Basic realm="oauth"'])
        status, _, body = await self.web.call("POST", "/oauth/revoke", data={
            "token": token["access_token"]})
        self.assertEqual((status, body["error"]), (401, "invalid_client"))
        self.assertEqual(await self.who(token["access_token"]), self.alice.id)
        status, _, body = await self.web.call("POST", "/oauth/revoke", data=[
            ("client_id", self.client.uid), ("client_secret", self.client.secret),
            ("token", token["access_token"]), ("token", "another")])
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        status, _, body = await self.web.call("POST", "/oauth/revoke", data={
            "client_id": self.client.uid, "client_secret": self.client.secret})
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        basic = base64.b64encode(f"{self.client.uid}:{self.client.secret}".encode()).decode()
        status, _, _ = await self.web.call(
            "POST", "/oauth/revoke", headers={"Authorization": f"Basic {basic}"},
            data={"token": token["access_token"]})
        self.assertEqual(status, 200)
        self.assertEqual(await self.who(token["access_token"]), 401)
        self.assertEqual(await self.web.core.oauth.grants(self.alice.id), [])


class ClientFailureTests(TestCase):
    """Failed client authentications at POST /oauth/token are limited per client address:
    [web] oauth_client_failure_rate. Before, oauth_token_rate counted each guessed secret
    apart (its key is the client id and the secret presented), so one address could guess a
    client's secret as fast as it asked."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(Config(sections={"web": {"oauth_client_failure_rate": "3/hour"}}))
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)

    async def guess(self, secret: str, client_id: str | None = None,
                    basic: bool = False) -> tuple[int, dict[str, list[str]], Any]:
        client_id = client_id or self.client.uid
        form = {"grant_type": "refresh_token", "refresh_token": "x"}
        if basic:
            pair = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
            return await self.web.call("POST", "/oauth/token", data=form,
                                       headers={"Authorization": f"Basic {pair}"})
        return await self.web.call("POST", "/oauth/token", data={
            **form, "client_id": client_id, "client_secret": secret})

    async def test_an_address_guessing_secrets_is_refused_then_let_in_again(self) -> None:
        self.assertEqual(WebSettings().oauth_client_failure_rate, Rate(100, 3600))
        other = await register(self.web, self.alice)
        # Three wrong secrets, each a new one, in the form, in Basic and for another
        # client: each its own oauth_token_rate bucket, one address's failures.
        statuses = [(await self.guess("wrong-1"))[0], (await self.guess("wrong-2", basic=True))[0],
                    (await self.guess("wrong-3", other.uid))[0]]
        self.assertEqual(statuses, [401, 401, 401])
        status, headers, body = await self.guess("wrong-4")
        self.assertEqual((status, body["error"]), (429, "slow_down"), body)
        self.assertIn("failed client authentications", body["error_description"])
        self.assertEqual((headers["retry-after"], headers["cache-control"]),
                         (["1200"], ["no-store"]))
        # The right secret is refused too: a guess that hits past the budget learns nothing.
        status, _, body = await self.guess(self.client.secret)
        self.assertEqual((status, body["error"]), (429, "slow_down"))
        # A request that authenticates does not spend the budget; a refusal of the spent
        # address takes nothing more than the failure would have.
        self.web.clock.advance(1200)
        status, _, body = await self.guess(self.client.secret)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))  # the client passed
        self.assertEqual((await self.guess("wrong-5"))[0], 401)
        self.assertEqual((await self.guess(self.client.secret))[0], 429)

    async def test_the_revocation_endpoint_counts_and_is_refused_alike(self) -> None:
        form = {"client_id": self.client.uid, "token": "x"}
        for _ in range(2):
            status, _, _ = await self.web.call("POST", "/oauth/revoke",
                                               data={**form, "client_secret": "wrong"})
            self.assertEqual(status, 401)
        self.assertEqual((await self.guess("wrong"))[0], 401)
        status, headers, body = await self.web.call(
            "POST", "/oauth/revoke", data={**form, "client_secret": self.client.secret})
        self.assertEqual((status, body["error"], headers["retry-after"]),
                         (429, "slow_down", ["1200"]))

    async def test_zero_turns_it_off(self) -> None:
        web = Web.build(Config(sections={"web": {"oauth_client_failure_rate": 0}}))
        alice = await web.user()
        client = await register(web, alice)
        for _ in range(5):
            status, _, _ = await web.call("POST", "/oauth/token", data={
                "grant_type": "refresh_token", "refresh_token": "x",
                "client_id": client.uid, "client_secret": "wrong"})
            self.assertEqual(status, 401)


class PruneTests(Base):
    """Codes and token rows no request can use are deleted (OAuthProvider.prune, run by
    OAuthPruner, on one node of those sharing a store); before, they stayed until their app
    or user was deleted."""

    async def rows(self) -> tuple[list[int], list[int]]:
        def txn(conn: Any) -> tuple[list[int], list[int]]:
            return ([r.id for r in conn.execute(select(oauth_codes.c.id).order_by("id"))],
                    [r.id for r in conn.execute(select(oauth_tokens.c.id).order_by("id"))])

        return await self.web.core.db.read("rows", txn)

    async def test_rotated_tokens_go_after_the_retention_and_live_ones_stay(self) -> None:
        oauth = self.web.core.oauth
        first = await self.client.token()
        status, _, second = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first["refresh_token"])
        self.assertEqual(status, 200, second)
        await self.client.code()  # allowed, never exchanged
        self.assertEqual(await oauth.prune(), (0, 0))
        codes, tokens = await self.rows()
        self.assertEqual((len(codes), len(tokens)), (2, 2))

        # Within 30 days of its rotation the first refresh token still gives the replay
        # away: presented again, it revokes its family (the live second token too).
        self.web.clock.advance(30 * 86400 - 1)
        self.assertEqual(await oauth.prune(), (1, 0))  # the unused code, a day expired
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        self.assertEqual(await self.who(second["access_token"]), 401)
        self.assertEqual(await self.rows(), ([codes[0]], tokens))
        # 30 days after its revocation the second goes too, and then their code.
        self.web.clock.advance(1)
        self.assertEqual(await oauth.prune(), (0, 1))
        self.web.clock.advance(30 * 86400 - 1)
        self.assertEqual(await oauth.prune(), (1, 1))
        self.assertEqual(await self.rows(), ([], []))
        self.assertEqual(await oauth.prune(), (0, 0))

    async def test_a_live_familys_code_and_newest_token_stay(self) -> None:
        oauth = self.web.core.oauth
        token = await self.client.token()
        for _ in range(3):
            self.web.clock.advance(7200)
            status, _, token = await self.client.exchange(
                grant_type="refresh_token", refresh_token=token["refresh_token"])
            self.assertEqual(status, 200, token)
        self.web.clock.advance(400 * 86400)  # the live refresh token does not expire
        self.assertEqual(await oauth.prune(), (0, 3))
        codes, tokens = await self.rows()
        self.assertEqual((len(codes), len(tokens)), (1, 1))
        status, _, token = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        self.assertEqual(status, 200, token)
        self.assertEqual(await self.who(token["access_token"]), self.alice.id)

    async def test_the_pruner_runs_every_hour_in_batches(self) -> None:
        oauth = self.web.core.oauth
        self.patch(provider, "PRUNE_BATCH", 2)
        for _ in range(5):
            await self.client.code()
        pruner = OAuthPruner(oauth)
        pruner.startService()
        self.addCleanup(pruner.stopService)
        self.assertEqual(len((await self.rows())[0]), 5)  # at start: nothing expired
        self.web.clock.advance(86400 + 300 - 3600)
        self.assertEqual(len((await self.rows())[0]), 5)
        self.web.clock.advance(3600)
        await self.web.core.db.read("wait", lambda conn: None)
        self.assertEqual(await self.rows(), ([], []))


    async def test_the_prune_reads_no_whole_table(self) -> None:
        """Each of the prune's statements finds its rows through an index (migration 0060):
        without one it read all of oauth_tokens and oauth_codes every hour."""
        await self.client.code()
        with engine_query_plans(self.web.core.db.engine) as plans:
            await self.web.core.oauth.prune()
        self.assertTrue(plans)
        self.assertEqual([p for p in plans if re.match(r"SCAN oauth_(tokens|codes)\b", p)], [])

    def test_revoked_token_days_is_read(self) -> None:
        self.assertEqual(OAuthSettings().revoked_token_retention, 30 * 86400)
        self.assertEqual(OAuthSettings.from_section(
            {"revoked_token_days": 7}).revoked_token_retention, 7 * 86400)
        for bad in ({"revoked_token_days": 0}, {"revoked_token_days": "7"}, {"retention": 1}):
            with self.assertRaises(ConfigError):
                OAuthSettings.from_section(bad)


class PostgreSQLStorageTests(TestCase):
    """What a client may name is stored within its columns on PostgreSQL, which refuses a
    value longer than its column or holding NUL (SQLite stores either)."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self))
        self.addCleanup(self.web.core.db.close)
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)

    async def test_a_scope_named_again_and_again_counts_once(self) -> None:
        # 60 times "read" is 299 characters, past the codes' and tokens' String(255):
        # the Allow and the refresh were 500s.
        many = " ".join(["read"] * 60 + ["email"] * 2)
        consent = await self.web.core.oauth.consent(authorize_uri(self.client.uid,
                                                                  scope=many))
        self.assertEqual(consent.scopes, ("read", "email"))
        token = await self.client.token(scope=many)
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"], scope=many)
        self.assertEqual(status, 200, body)
        stored = await self.web.core.db.read("dump", lambda c: (
            c.execute(select(oauth_codes.c.scopes)).scalars().all(),
            c.execute(select(oauth_tokens.c.scopes).order_by(oauth_tokens.c.id))
            .scalars().all()))
        self.assertEqual(stored, (["read email"], ["read email", "read email"]))

    async def test_a_revocation_ends_the_family_and_a_nul_token_is_200(self) -> None:
        first = await self.client.token()
        status, _, second = await self.client.exchange(
            grant_type="refresh_token", refresh_token=first["refresh_token"])
        self.assertEqual(status, 200, second)
        form = {"client_id": self.client.uid, "client_secret": self.client.secret}
        for token in ("\x00" * 3, second["refresh_token"]):
            status, _, body = await self.web.call("POST", "/oauth/revoke",
                                                  data={**form, "token": token})
            self.assertEqual((status, body), (200, b""))
        self.assertIsNone(await self.web.core.oauth.resolve(second["access_token"]))
        self.assertEqual(await self.web.core.oauth.grants(self.alice.id), [])

    async def test_a_challenge_past_its_column_is_refused_not_a_500(self) -> None:
        # oauth_codes.code_challenge is String(128): the Allow of a longer one, or of one
        # holding NUL, failed to store the code.
        for bad in ("a" * 129, "\x00" * 43):
            with self.assertRaises(AuthorizationRedirect):
                await self.web.core.oauth.decide(authorize_uri(
                    self.client.uid, code_challenge=bad, code_challenge_method="S256"),
                    self.alice.id, True)


class PostgreSQLPruneAndCapTests(TestCase):
    """The prune's deletes (a correlated NOT EXISTS under a LIMITed IN) and the apps
    cap's count on PostgreSQL."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self))
        self.addCleanup(self.web.core.db.close)
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)

    async def test_prune_keeps_a_live_family_and_deletes_the_rest(self) -> None:
        oauth = self.web.core.oauth
        token = await self.client.token()
        status, _, token = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        self.assertEqual(status, 200, token)
        await self.client.code()  # never exchanged
        self.web.clock.advance(31 * 86400)
        self.assertEqual(await oauth.prune(), (1, 1))
        status, _, token = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        self.assertEqual(status, 200, token)

    async def test_registrations_at_once_stop_at_the_cap(self) -> None:
        oauth = self.web.core.oauth
        oauth.settings = OAuthSettings(max_apps_per_user=3)  # setUp's client is one
        results = await defer.DeferredList([
            defer.Deferred.fromCoroutine(oauth.add_app(self.alice.id, f"a{n}", [REDIRECT]))
            for n in range(6)], consumeErrors=True)
        self.assertEqual(sorted(ok for ok, _ in results), [False] * 4 + [True] * 2)
        self.assertEqual(len(await oauth.list_apps(self.alice.id)), 3)


class ConcurrencyPostgreSQLTests(TestCase):
    """Requests racing with one code or refresh token on a real PostgreSQL, through a
    threaded Database as the daemon runs it (a synchronous one runs them one by one). Plain
    reads under READ COMMITTED let 2 to 8 of 8 concurrent exchanges of one code succeed."""

    timeout = 240
    racers = 8

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self))
        self.addCleanup(self.web.core.db.close)
        self.db = Database(self.web.core.db.url, get_reactor(), max_threads=self.racers)
        await self.db.open()
        self.addCleanup(self.db.close)
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)
        self.oauth = OAuthProvider(self.db, self.web.clock, self.web.core.identity,
                                   OAuthSettings())

    async def race(self, **fields: str) -> list[tuple[int, Any]]:
        """(status, JSON body) of `racers` concurrent token requests with `fields`."""
        body = urlencode({"client_id": self.client.uid, "client_secret": self.client.secret,
                          **fields})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        replies = await defer.gatherResults([
            defer.ensureDeferred(self.oauth.token("https://x/oauth/token", body, headers))
            for _ in range(self.racers)
        ])
        return [(status, json.loads(text)) for _, text, status in replies]

    async def test_concurrent_exchanges_of_one_code_issue_one_token(self) -> None:
        for _ in range(5):
            code = await self.client.code()
            replies = await self.race(grant_type="authorization_code", code=code,
                                      redirect_uri=REDIRECT)
            statuses = sorted(status for status, _ in replies)
            self.assertEqual(statuses, [200] + [400] * (self.racers - 1))
            self.assertEqual({b["error"] for s, b in replies if s != 200}, {"invalid_grant"})
            # The others were reuses: what the code issued is revoked (RFC 6749 §10.5).
            issued = next(b for s, b in replies if s == 200)
            self.assertIsNone(await self.oauth.resolve(issued["access_token"]))

    async def test_concurrent_refreshes_of_one_refresh_token_issue_one_token(self) -> None:
        for _ in range(5):
            token = await self.client.token()
            replies = await self.race(grant_type="refresh_token",
                                      refresh_token=token["refresh_token"])
            statuses = sorted(status for status, _ in replies)
            self.assertEqual(statuses, [200] + [400] * (self.racers - 1))
            issued = next(b for s, b in replies if s == 200)
            self.assertIsNone(await self.oauth.resolve(issued["access_token"]))

    async def test_a_revocation_racing_refreshes_leaves_no_live_token(self) -> None:
        for _ in range(5):
            token = await self.client.token()
            body = urlencode({"client_id": self.client.uid,
                              "client_secret": self.client.secret,
                              "grant_type": "refresh_token",
                              "refresh_token": token["refresh_token"]})
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            refresh = defer.ensureDeferred(
                self.oauth.token("https://x/oauth/token", body, headers))
            revoke = defer.ensureDeferred(self.oauth.revoke(self.alice.id, self.client.uid))
            _, text, status = await refresh
            await revoke
            if status == 200:
                self.assertIsNone(await self.oauth.resolve(json.loads(text)["access_token"]))
            self.assertEqual(await self.oauth.grants(self.alice.id), [])

    async def test_a_client_revocation_racing_a_refresh_leaves_no_live_token(self) -> None:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        for _ in range(5):
            token = await self.client.token()
            client = {"client_id": self.client.uid, "client_secret": self.client.secret}
            refresh = defer.ensureDeferred(self.oauth.token(
                "https://x/oauth/token", urlencode({
                    **client, "grant_type": "refresh_token",
                    "refresh_token": token["refresh_token"]}), headers))
            revoke = defer.ensureDeferred(self.oauth.revoke_token(
                "https://x/oauth/revoke", urlencode({
                    **client, "token": token["refresh_token"]}), headers))
            _, text, status = await refresh
            self.assertEqual((await revoke)[2], 200)
            if status == 200:
                self.assertIsNone(await self.oauth.resolve(json.loads(text)["access_token"]))
            self.assertIsNone(await self.oauth.resolve(token["access_token"]))
            self.assertEqual(await self.oauth.grants(self.alice.id), [])

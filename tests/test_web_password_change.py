"""A password change ends what was handed out for the old password, on every API.

The only route that changes a password is `mailcore user set-password` (no seed API has
one), which calls `Identity.set_password`; these tests drive that call and then present
every kind of credential to the API that reads it, through StubTreq.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailcore.identity import Identity
from mailcore.oauth import OAuthProvider, SessionEnded
from mailcore.oauth.settings import OAuthSettings
from mailcore.store import Database
from mailcore.workers import CpuPool
from tests.support.oauth import REDIRECT, authorize_uri, query_of, register
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.web import PASSWORD, Web
from web.login import PasswordLogin

CREDENTIALS = {"username": "alice", "password": PASSWORD}


class PasswordChangeTests(TestCase):
    url: str | None = None

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self) if self.url else None)
        if self.url:
            self.addCleanup(self.web.core.db.close)
        self.alice = await self.web.user("alice")
        self.bob = await self.web.user("bob")

    async def login_token(self, path: str = "/api-token-auth/",
                          user: str = "alice") -> str:
        status, _, body = await self.web.call(
            "POST", path, json={"username": user, "password": PASSWORD})
        self.assertEqual(status, 200, body)
        return str(body.get("token") or body["auth_key"])

    async def imap2api(self, token: str) -> int:
        return (await self.web.call(
            "GET", "/api/imap-servers/", headers={"Authorization": f"Token {token}"}))[0]

    async def mailapi(self, key: str) -> int:
        return (await self.web.call("GET", "/api/v1/mailboxes/", headers={"Auth-Key": key}))[0]

    async def dropmyemail(self, access_token: str) -> int:
        return (await self.web.call(
            "GET", "/v1/accounts", headers={"Authorization": f"Bearer {access_token}"}))[0]

    async def protecmail(self, key: str) -> int:
        return (await self.web.call("GET", "/api/v1/user", headers={"Api-Key": key}))[0]

    async def safedrop(self, token: str) -> int:
        return (await self.web.call(
            "GET", "/dropbundles", headers={"X-Auth-Token": token}))[0]

    async def test_login_tokens_page_sessions_and_oauth_grants_end_the_rest_stays(
            self) -> None:
        identity = self.web.core.identity
        imap_token = await self.login_token("/api-token-auth/")
        mail_key = await self.login_token("/api/v1/auth/")
        page = await self.web.credential(self.alice, "page", scopes=("pages",))
        client = await register(self.web, self.alice)
        granted = await client.token()
        unused_code = await client.code()
        # What the operator made stays: an API key, the safedrop session made with it,
        # and a token `mailcore token create` printed.
        key = await self.web.credential(self.alice, "apikey")
        status, headers, _ = await self.web.call(
            "GET", "/", headers={"X-Auth-User": "alice@example.test", "X-Auth-Key": key})
        self.assertEqual(status, 204)
        session = headers["x-auth-token"][0]
        printed = await self.web.credential(self.alice, "token", label="api-token-auth")
        # Bob's login token is no business of Alice's password.
        bobs = await self.login_token("/api-token-auth/", "bob")

        self.assertEqual(await self.imap2api(imap_token), 200)
        self.assertEqual(await self.mailapi(mail_key), 200)
        self.assertEqual(await self.dropmyemail(granted["access_token"]), 200)

        await identity.set_password(self.alice.id, "a-new-password")

        self.assertEqual(await self.imap2api(imap_token), 401)
        self.assertEqual(await self.mailapi(mail_key), 401)
        self.assertEqual(await self.imap2api(mail_key), 401)
        self.assertIsNone(await identity.resolve(page, ("page",)))
        self.assertEqual(await self.dropmyemail(granted["access_token"]), 401)
        status, _, body = await client.exchange(
            grant_type="refresh_token", refresh_token=granted["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))
        status, _, body = await client.exchange(
            grant_type="authorization_code", code=unused_code, redirect_uri=REDIRECT)
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))

        self.assertEqual(await self.protecmail(key), 200)
        self.assertEqual(await self.safedrop(session), 200)
        self.assertEqual(await self.imap2api(printed), 200)
        self.assertEqual(await self.imap2api(bobs), 200)
        # The new password logs in and its token works.
        status, _, body = await self.web.call(
            "POST", "/api-token-auth/",
            json={"username": "alice", "password": "a-new-password"})
        self.assertEqual(status, 200)
        self.assertEqual(await self.imap2api(body["token"]), 200)
        # The app may ask again: a new grant works.
        self.assertEqual(await self.dropmyemail((await client.token())["access_token"]), 200)

    async def test_the_login_tokens_are_told_from_the_printed_ones(self) -> None:
        await self.login_token("/api-token-auth/")
        await self.login_token("/api/v1/auth/")
        await self.web.credential(self.alice, "token", label="ci")
        listed: Any = await self.web.core.identity.list_credentials(self.alice.id, "token")
        self.assertEqual([c.label for c in listed], ["api-token-auth", "mailapi-auth", "ci"])
        await self.web.core.identity.set_password(self.alice.id, "another")
        listed = await self.web.core.identity.list_credentials(self.alice.id, "token")
        self.assertEqual([c.revoked for c in listed], [True, True, False])

    async def test_a_login_that_checked_the_old_password_makes_nothing_after_it(
            self) -> None:
        """The password is checked, then the credential made: a change committed in
        between (a login in a loop with a leaked password, while the owner changes it)
        must not leave the login a token or page session made after the change."""
        login: PasswordLogin = self.web.root.apps["imap2api"].login  # type: ignore[attr-defined]
        request: Any = DummyRequest([b""])
        request.client = IPv4Address("TCP", "192.0.2.1", 40000)
        checked = await login.check(request, "alice", PASSWORD)
        assert checked is not None
        await self.web.core.identity.set_password(self.alice.id, "a-new-password")
        self.assertIsNone(await login.issue_token(checked, "api-token-auth"))
        self.assertIsNone(await login.issue(checked, "page", scopes=("pages",)))
        self.assertEqual(await self.web.core.identity.list_credentials(self.alice.id), [])
        # A login that checked the new password is served.
        fresh = await login.check(request, "alice", "a-new-password")
        assert fresh is not None
        token = await login.issue_token(fresh, "api-token-auth")
        assert token is not None
        self.assertEqual(await self.imap2api(token), 200)

    async def test_a_consent_on_a_session_the_change_ended_makes_no_code(self) -> None:
        """The consent page resolves its session, then the code is made: a change that
        ended the session in between must not leave a code (and tokens) behind."""
        client = await register(self.web, self.alice)
        oauth = self.web.core.oauth
        session = await self.web.credential(self.alice, "page", scopes=("pages",))
        principal = await self.web.core.identity.resolve(session, ("page",))
        assert principal is not None and principal.credential_id is not None
        uri = authorize_uri(client.uid)
        location = await oauth.decide(uri, self.alice.id, True,
                                      session_id=principal.credential_id)
        self.assertIn("code", query_of(location))
        await self.web.core.identity.set_password(self.alice.id, "a-new-password")
        with self.assertRaises(SessionEnded):
            await oauth.decide(uri, self.alice.id, True, session_id=principal.credential_id)
        self.assertEqual(await oauth.grants(self.alice.id), [])


class PostgresPasswordChangeTests(PasswordChangeTests):
    url = "postgresql"


class PasswordChangeRacePostgreSQLTests(TestCase):
    """A password change racing the OAuth token endpoint, on a real PostgreSQL through a
    threaded Database as the daemon runs it: no token issued meanwhile may outlive it."""

    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self))
        self.addCleanup(self.web.core.db.close)
        self.db = Database(self.web.core.db.url, get_reactor(), max_threads=8)
        await self.db.open()
        self.addCleanup(self.db.close)
        self.alice = await self.web.user()
        self.client = await register(self.web, self.alice)
        self.oauth = OAuthProvider(self.db, self.web.clock, self.web.core.identity,
                                   OAuthSettings())
        self.identity = Identity(self.db, self.web.clock, CpuPool.for_tests())

    async def token_request(self, **fields: str) -> tuple[int, Any]:
        body = urlencode({"client_id": self.client.uid, "client_secret": self.client.secret,
                          **fields})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        _, text, status = await self.oauth.token("https://x/oauth/token", body, headers)
        return status, json.loads(text)

    async def test_refreshes_and_exchanges_racing_a_change_leave_no_live_token(self) -> None:
        survivors = 0
        for i in range(20):
            token = await self.client.token()
            code = await self.client.code()
            # The change hashes first (on the test's synchronous CPU pool) and then runs its
            # transaction on the pool, alongside the two requests.
            change = defer.ensureDeferred(self.identity.set_password(self.alice.id, f"p{i}"))
            requests = [
                defer.ensureDeferred(self.token_request(
                    grant_type="refresh_token", refresh_token=token["refresh_token"])),
                defer.ensureDeferred(self.token_request(
                    grant_type="authorization_code", code=code, redirect_uri=REDIRECT)),
            ]
            replies = await defer.gatherResults(requests)
            await change
            for status, body in replies:
                if status == 200 and await self.oauth.resolve(body["access_token"]):
                    survivors += 1
        self.assertEqual(survivors, 0)

"""Input the store cannot hold is a 4xx on every backend, never a 500.

SQLite takes NUL in text and any 64-bit integer; PostgreSQL's text columns refuse NUL and its
INTEGER ids stop at 2^31-1. Each request below answered 500 on PostgreSQL (and stored the NUL,
or answered 200, on SQLite) before the input boundary refused it: NUL in a JSON string, a form
or multipart field, the query string or a path segment (`web.parsing`: `not_text`,
`TextConverter`), in an OAuth client id oauthlib decoded, ids of 2^31 in paths, queries and
bodies (`IdConverter`, `ID_MAX`). The same requests run on both backends, and their answers
must agree.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from tests.support.oauth import REDIRECT, access_token, register
from tests.support.pg import create_test_database
from tests.support.web import Web

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TOO_BIG = 2**31
BOX = "bob@hosted.test"


class NotTextSQLiteTests(TestCase):
    """On SQLite (the store `PostgreSQL` below swaps in)."""

    async def web(self) -> Web:
        return Web.build()

    async def setUp(self) -> None:  # type: ignore[override]
        web = self.site = await self.web()
        bob = await web.user("bob", BOX)
        await web.core.domains.add("hosted.test", bob.id, "mx.hosted.test")
        await web.core.mailboxes.add(BOX, bob.id)
        token = await web.credential(bob, "token")
        key = await web.credential(bob)
        self.account = await web.core.fetch.accounts.create(
            bob.id, name="b", email="b@x.test", host="127.0.0.1", port=143, password="pw",
            allow_cleartext=True)
        self.client = await register(web, bob)
        self.token = {"Authorization": f"Token {token}"}
        self.auth_key = {"Auth-Key": token}
        self.api_key = {"Api-Key": key}
        self.bearer = {"Authorization": f"Bearer {await access_token(web.core.oauth, bob.id)}"}
        _, headers, _ = await web.call("GET", "/", headers={"X-Auth-User": BOX, "X-Auth-Key": key})
        self.drop = {"X-Auth-Token": headers["x-auth-token"][0]}

    async def answer(self, method: str, path: str, headers: dict[str, str],
                     data: bytes | None = None) -> tuple[int, Any]:
        self.site.clock.advance(1)  # past any per-second rate
        kwargs: dict[str, Any] = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
        status, _, body = await self.site.call(method, path, **kwargs)
        return status, body

    async def assert_answers(self, cases: list[tuple[str, str, dict[str, str], bytes | None,
                                                     int]]) -> None:
        for method, path, headers, data, expected in cases:
            status, body = await self.answer(method, path, headers, data)
            self.assertEqual(status, expected, (method, path, data, body))

    async def test_nul_in_json_forms_queries_and_paths(self) -> None:
        mail = b'{"mailbox": "%s", "%s": "a\\u0000b"}'
        await self.assert_answers([
            *[("POST", "/api/v1/mail/", {**self.auth_key, **JSON},
               mail % (BOX.encode(), field), 400)
              for field in (b"subject", b"body", b"to", b"from", b"cc", b"bcc")],
            ("POST", "/api/v1/mail/", {**self.auth_key, **FORM}, b"subject=a%00b", 400),
            ("GET", "/api/v1/mail/?cursor=a%00b", self.auth_key, None, 400),
            ("GET", "/api/v1/mail/a%00b", self.auth_key, None, 404),
            ("DELETE", "/api/v1/mail/a%00b", self.auth_key, None, 404),
            ("GET", "/api/v1/mail/a%00b/attachments/0", self.auth_key, None, 404),
            ("GET", f"/api/v1/mailboxes/{BOX}/access/j%00oe", self.auth_key, None, 404),
            ("POST", "/api/v1/auth/", FORM, b"username=a%00&password=x", 400),
            ("GET", "/api/emails/?folder=a%00b", self.token, None, 400),
            ("GET", "/api/emails/threads/?folder=a%00b&q=x", self.token, None, 400),
            ("GET", f"/v1/accounts/{self.account.id}/attachments_search?query=a%00b",
             self.bearer, None, 400),
            ("GET", "/api/v1/quarantine/a%00b@hosted.test/0/10", self.api_key, None, 404),
            ("PUT", "/api/v1/domain/hosted.test", {**self.api_key, **JSON},
             b'{"resumeTemplateSubject": "x\\u0000y"}', 400),
            # Bytes that are not UTF-8 in the query string: a 400, no longer U+FFFD.
            ("GET", "/api/emails/?q=caf%E9", self.token, None, 400),
        ])

    async def test_nul_in_an_oauth_client_id_names_no_app(self) -> None:
        await self.assert_answers([
            ("POST", "/oauth/token", FORM,
             b"grant_type=authorization_code&code=abc&client_id=a%00b&client_secret=x", 401),
            ("GET", "/oauth/authorize?client_id=a%00b&response_type=code&redirect_uri="
             + REDIRECT, {}, None, 400),
        ])
        status, body = await self.answer(
            "POST", "/oauth/token", {**FORM, "Authorization": "Basic YQBiOng="},  # "a\0b:x"
            b"grant_type=authorization_code&code=abc")
        self.assertEqual((status, body), (401, {"error": "invalid_client"}))

    async def test_ids_past_an_integer_column(self) -> None:
        account = self.account.id
        await self.assert_answers([
            *[("GET", path, self.token, None, 404) for path in (
                f"/api/imap-servers/{TOO_BIG}/", f"/api/emails/{TOO_BIG}/",
                f"/api/emails/{TOO_BIG}/thread/", f"/api/webhooks/{TOO_BIG}/",
                f"/api/webhooks/{TOO_BIG}/deliveries/")],
            ("DELETE", f"/api/imap-servers/{TOO_BIG}/", self.token, None, 404),
            ("POST", f"/api/imap-servers/{TOO_BIG}/sync/", self.token, None, 404),
            *[("GET", f"{path}?imap_server={value}", self.token, None, 400)
              for path in ("/api/emails/", "/api/emails/folders/", "/api/emails/statistics/")
              for value in (TOO_BIG, -TOO_BIG - 1)],
            ("GET", f"/v1/accounts/{TOO_BIG}", self.bearer, None, 404),
            ("GET", f"/v1/accounts/{account}/messages/{TOO_BIG}", self.bearer, None, 404),
            ("GET", f"/dropbundles/{TOO_BIG}", self.drop, None, 404),
            ("GET", f"/dropbundles/{TOO_BIG}/dropfiles", self.drop, None, 404),
            ("POST", "/api/imap-servers/", {**self.token, **JSON},
             json.dumps({"host": "imap.example.test", "username": "a", "password": "p",
                         "sync_interval": TOO_BIG}).encode(), 400),
            ("PATCH", f"/api/imap-servers/{account}/", {**self.token, **JSON},
             json.dumps({"sync_interval": TOO_BIG}).encode(), 400),
        ])
        # The largest id an INTEGER holds is an unknown one, as ever.
        status, _ = await self.answer("GET", f"/api/imap-servers/{TOO_BIG - 1}/", self.token)
        self.assertEqual(status, 404)


class NotTextPostgreSQLTests(NotTextSQLiteTests):
    """The same requests on a real PostgreSQL, where they were 500s."""

    timeout = 240

    async def web(self) -> Web:
        web = Web.build(url=await create_test_database(self))
        self.addCleanup(web.core.db.close)
        return web

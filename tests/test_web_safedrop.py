"""safedrop's auth server: X-Auth-User + X-Auth-Key → 204 with a temporary X-Auth-Token,
which works until it expires."""

from __future__ import annotations

import datetime

from twisted.trial.unittest import TestCase

from mailcore.config import Config
from tests.support.web import START, Web, header


class SafedropAuthTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(Config(session_token_ttl=600))
        self.alice = await self.web.user()
        self.key = await self.web.credential(self.alice)

    async def login(self, path: str = "/", user: str = "alice@example.test",
                    key: str | None = None) -> tuple[int, dict[str, list[str]], object]:
        return await self.web.call(
            "GET", path, headers={"X-Auth-User": user, "X-Auth-Key": key or self.key}
        )

    async def test_both_auth_paths_answer_204_with_a_session_token(self) -> None:
        for path in ("/", "/auth"):
            status, headers, body = await self.login(path)
            self.assertEqual((status, body), (204, b""), path)
            token = header(headers, "X-Auth-Token")
            assert token is not None
            self.assertEqual(header(headers, "Cache-Control"), "no-store")
            principal = await self.web.core.identity.resolve(token, ("session",))
            assert principal is not None
            self.assertEqual(principal.user.id, self.alice.id)
        sessions = await self.web.core.identity.list_credentials(self.alice.id, "session")
        self.assertEqual([s.label for s in sessions], ["safedrop", "safedrop"])

    async def test_a_head_checks_the_key_and_makes_no_token(self) -> None:
        """HEAD is safe (RFC 9110 9.2.1): a HEAD of the auth server with X-Auth-User and
        X-Auth-Key (`curl -I`, a monitor) made a session token as the GET does, each one
        live and held by nobody, one more of the 1,000 an account keeps."""
        for path in ("/", "/auth"):
            status, headers, body = await self.web.call(
                "HEAD", path, headers={"X-Auth-User": "alice@example.test",
                                       "X-Auth-Key": self.key})
            self.assertEqual((status, body), (204, b""), path)
            self.assertIsNone(header(headers, "X-Auth-Token"))
            self.assertIsNone(header(headers, "X-Auth-Token-Expires"))
            self.assertEqual(header(headers, "Cache-Control"), "no-store")
        self.assertEqual(await self.web.core.identity.list_credentials(self.alice.id,
                                                                       "session"), [])
        status, _, _ = await self.web.call("HEAD", "/auth", headers={
            "X-Auth-User": "alice@example.test", "X-Auth-Key": "0" * 40})
        self.assertEqual(status, 401)
        # The GET still makes one; a HEAD with only that token checks it, as a GET does.
        _, headers, _ = await self.login()
        token = header(headers, "X-Auth-Token")
        status, check, _ = await self.web.call("HEAD", "/auth", headers={"X-Auth-Token": token})
        self.assertEqual((status, header(check, "X-Auth-Token")), (204, token))
        sessions = await self.web.core.identity.list_credentials(self.alice.id, "session")
        self.assertEqual(len(sessions), 1)

    async def test_the_token_expires_after_the_configured_ttl(self) -> None:
        _, headers, _ = await self.login()
        expected = datetime.datetime.fromtimestamp(START + 600, datetime.UTC)
        self.assertEqual(
            header(headers, "X-Auth-Token-Expires"),
            expected.isoformat(timespec="seconds").replace("+00:00", "Z"),
        )
        token = header(headers, "X-Auth-Token")
        assert token is not None
        for name in ("X-Auth-Token", "Auth-Token"):
            status, check, _ = await self.web.call("GET", "/auth", headers={name: token})
            self.assertEqual(status, 204, name)
            self.assertEqual(header(check, "X-Auth-Token"), token)
        self.web.clock.advance(599)
        status, _, _ = await self.web.call("GET", "/auth", headers={"X-Auth-Token": token})
        self.assertEqual(status, 204)
        self.web.clock.advance(1)
        status, _, body = await self.web.call("GET", "/auth", headers={"X-Auth-Token": token})
        self.assertEqual(status, 401)
        self.assertEqual(body, {"error": "The authentication token is invalid or has expired."})

    async def test_the_email_is_compared_without_case(self) -> None:
        status, _, _ = await self.login(user="ALICE@Example.TEST")
        self.assertEqual(status, 204)

    async def test_a_non_ascii_address_matches_in_any_case_and_unicode_form(self) -> None:
        """X-Auth-User is compared as the user's address is stored and looked up elsewhere
        (trimmed, NFC, lower case): a client sending it decomposed or in capitals is the
        same user (it compared lower case only, so the decomposed form was a 401)."""
        jose = await self.web.user("jose", email="jos\u00e9@example.test")
        key = await self.web.credential(jose)
        for typed in ("jos\u00e9@example.test", "jose\u0301@example.test",
                      "JOS\u00c9@EXAMPLE.TEST", " JOSE\u0301@example.test "):
            status, _, _ = await self.web.call("GET", "/", headers={
                b"X-Auth-User": typed.encode("utf-8"), b"X-Auth-Key": key.encode()})
            self.assertEqual(status, 204, ascii(typed))

    async def test_wrong_or_missing_credentials_are_401(self) -> None:
        bob = await self.web.user("bob")
        bob_key = await self.web.credential(bob)
        alice_token = await self.web.credential(self.alice, "token")
        bad = {"error": "Invalid X-Auth-User or X-Auth-Key."}
        missing = {"error": "X-Auth-User and X-Auth-Key headers are required."}
        for headers, expected in [
            ({"X-Auth-User": "alice@example.test", "X-Auth-Key": bob_key}, bad),
            ({"X-Auth-User": "alice@example.test", "X-Auth-Key": "0" * 40}, bad),
            ({"X-Auth-User": "alice@example.test", "X-Auth-Key": alice_token}, bad),
            ({"X-Auth-User": "alice", "X-Auth-Key": self.key}, bad),  # the e-mail, not the name
            ({"X-Auth-User": "alice@example.test"}, missing),
            ({"X-Auth-Key": self.key}, missing),
            ({}, missing),
        ]:
            status, reply_headers, body = await self.web.call("GET", "/", headers=headers)
            self.assertEqual((status, body), (401, expected), headers)
            self.assertIsNone(header(reply_headers, "X-Auth-Token"))

    async def test_revoking_the_api_key_ends_its_sessions_at_once(self) -> None:
        _, headers, _ = await self.login()
        token = header(headers, "X-Auth-Token")
        assert token is not None
        status, _, _ = await self.web.call("GET", "/auth", headers={"X-Auth-Token": token})
        self.assertEqual(status, 204)
        # The one revocation path: `mailcore apikey revoke` and any API route call it.
        revoked = await self.web.core.identity.revoke_credential(self.alice.id, self.key[:8])
        self.assertEqual(revoked, 1)
        status, _, body = await self.web.call("GET", "/auth", headers={"X-Auth-Token": token})
        self.assertEqual(status, 401)
        self.assertEqual(body, {"error": "The authentication token is invalid or has expired."})

    async def test_an_unknown_token_is_401(self) -> None:
        status, _, _ = await self.web.call("GET", "/auth", headers={"X-Auth-Token": "a" * 40})
        self.assertEqual(status, 401)

    async def test_a_session_token_is_not_an_api_key_elsewhere(self) -> None:
        _, headers, _ = await self.login()
        token = header(headers, "X-Auth-Token")
        assert token is not None
        status, _, _ = await self.web.call("GET", "/api/v1/ping", headers={"Api-Key": token})
        self.assertEqual(status, 401)

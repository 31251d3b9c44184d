"""Password logins: IMAP2API `POST /api-token-auth/` and Mail API `POST /api/v1/auth/`,
and the limits that slow password guessing on both: per client address, and failures per
account name."""

from __future__ import annotations

import datetime
from typing import Any
from unittest import mock

import sqlalchemy as sa
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailcore.config import Config
from mailcore.store.schema import rate_buckets
from tests.support.web import PASSWORD, Web, header
from web.login import KNOWN_SOURCE_DAYS, PasswordLogin
from web.ratelimit import RateLimited
from web.root import build_root

CREDENTIALS = {"username": "alice", "password": PASSWORD}
LOGIN_FAILED = {"non_field_errors": ["Unable to log in with provided credentials."]}


class ApiTokenAuthTests(TestCase):
    async def test_json_login_gives_a_token_that_resolves_to_the_user(self) -> None:
        web = Web.build()
        alice = await web.user()
        status, headers, body = await web.call("POST", "/api-token-auth/", json=CREDENTIALS)
        self.assertEqual(status, 200)
        self.assertEqual(set(body), {"token"})
        self.assertEqual(header(headers, "Cache-Control"), "no-store")
        principal = await web.core.identity.resolve(body["token"], ("token",))
        assert principal is not None
        self.assertEqual(principal.user.id, alice.id)

    async def test_form_and_multipart_logins_work_too(self) -> None:
        web = Web.build()
        await web.user()
        status, _, body = await web.call("POST", "/api-token-auth/", data=CREDENTIALS)
        self.assertEqual(status, 200, body)
        multipart = (
            b"--b0undary\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\n"
            b"alice\r\n--b0undary\r\nContent-Disposition: form-data; name=\"password\"\r\n"
            b"\r\n" + PASSWORD.encode() + b"\r\n--b0undary--\r\n"
        )
        status, _, body = await web.call(
            "POST", "/api-token-auth/", data=multipart,
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        )
        self.assertEqual(status, 200, body)

    async def test_each_login_makes_a_new_labelled_token(self) -> None:
        web = Web.build()
        alice = await web.user()
        first = (await web.call("POST", "/api-token-auth/", json=CREDENTIALS))[2]["token"]
        second = (await web.call("POST", "/api-token-auth/", json=CREDENTIALS))[2]["token"]
        self.assertNotEqual(first, second)
        infos = await web.core.identity.list_credentials(alice.id, "token")
        self.assertEqual([i.label for i in infos], ["api-token-auth", "api-token-auth"])

    async def test_a_login_loop_keeps_the_newest_tokens_only(self) -> None:
        web = Web.build(Config(login_tokens_per_user=3, login_token_ttl=86400))
        alice = await web.user()
        tokens = []
        for path in ("/api-token-auth/", "/api/v1/auth/") * 4:
            body = (await web.call("POST", path, json=CREDENTIALS))[2]
            tokens.append(body.get("token") or body["auth_key"])
        infos = await web.core.identity.list_credentials(alice.id, "token")
        self.assertEqual(len(infos), 3)
        live = [t for t in tokens if await web.core.identity.resolve(t, ("token",))]
        self.assertEqual(live, tokens[-3:])
        # Each lives a day from its login.
        self.assertEqual({i.expires_at - i.created_at for i in infos},  # type: ignore[operator]
                         {datetime.timedelta(days=1)})
        web.clock.advance(86400)
        status, _, _ = await web.call("GET", "/api/imap-servers/",
                                      headers={"Authorization": f"Token {tokens[-2]}"})
        self.assertEqual(status, 401)

    async def test_the_email_address_works_as_username(self) -> None:
        web = Web.build()
        await web.user()
        status, _, _ = await web.call(
            "POST", "/api-token-auth/",
            json={"username": "alice@example.test", "password": PASSWORD},
        )
        self.assertEqual(status, 200)

    async def test_a_wrong_password_or_user_is_a_non_field_error(self) -> None:
        web = Web.build()
        await web.user()
        for credentials in ({"username": "alice", "password": "wrong"},
                            {"username": "nobody", "password": PASSWORD}):
            status, _, body = await web.call("POST", "/api-token-auth/", json=credentials)
            self.assertEqual((status, body), (400, LOGIN_FAILED))

    async def test_missing_fields_are_field_errors(self) -> None:
        web = Web.build()
        status, _, body = await web.call("POST", "/api-token-auth/", json={"password": "x"})
        self.assertEqual((status, body), (400, {"username": ["This field is required."]}))
        status, _, body = await web.call(
            "POST", "/api-token-auth/", json={"username": "alice", "password": ""}
        )
        self.assertEqual((status, body), (400, {"password": ["This field may not be blank."]}))


class MailApiAuthTests(TestCase):
    async def test_form_and_json_logins_give_an_auth_key(self) -> None:
        web = Web.build()
        alice = await web.user()
        for kwargs in ({"data": CREDENTIALS}, {"json": CREDENTIALS}):
            status, headers, body = await web.call("POST", "/api/v1/auth/", **kwargs)
            self.assertEqual(status, 200)
            self.assertEqual(set(body), {"auth_key"})
            self.assertEqual(header(headers, "Cache-Control"), "no-store")
            principal = await web.core.identity.resolve(body["auth_key"], ("token",))
            assert principal is not None
            self.assertEqual(principal.user.id, alice.id)

    async def test_the_seeds_input_errors(self) -> None:
        web = Web.build()
        for data, expected in [
            ({"password": "x"}, {"error": "Please provide username."}),
            ({"username": "", "password": "x"}, {"error": "Please provide username."}),
            ({"username": "alice"}, {"error": "Please provide password."}),
            ({}, {"error": "Please provide username."}),
        ]:
            status, _, body = await web.call("POST", "/api/v1/auth/", data=data)
            self.assertEqual((status, body), (400, expected), data)

    async def test_wrong_credentials_are_401_in_the_seeds_error_shape(self) -> None:
        # Seed 002 shows the auth endpoint's errors as {"error": ...} only (400, 403): a
        # client written against it reads that key when a login fails.
        web = Web.build()
        await web.user()
        for credentials in ({"username": "alice", "password": "nope"},
                            {"username": "nobody", "password": PASSWORD}):
            status, _, body = await web.call("POST", "/api/v1/auth/", data=credentials)
            self.assertEqual((status, body), (401, {"error": "Invalid username or password."}))

    async def test_every_error_of_the_auth_endpoint_has_the_error_key(self) -> None:
        web = Web.build()
        cases: list[tuple[dict[str, Any], int]] = [
            ({"data": b"{", "headers": {"Content-Type": "application/json"}}, 400),
            ({"data": {"username": "a", "password": "b", "api_key": "guess"}}, 403),
        ]
        for kwargs, status in cases:
            code, _, body = await web.call("POST", "/api/v1/auth/", **kwargs)
            self.assertEqual(code, status, body)
            self.assertEqual(list(body), ["error"], body)
        # The other Mail API routes keep {"message": ...}.
        status, _, body = await web.call("GET", "/api/v1/mail/", headers={"Auth-Key": "x"})
        self.assertEqual((status, body), (401, {"message": "unauthorized"}))


class LoginRateLimitTests(TestCase):
    async def test_both_endpoints_share_one_limit_per_address(self) -> None:
        web = Web.build(Config(sections={"web": {"login_rate": "3/minute"}}))
        await web.user()
        wrong = {"username": "alice", "password": "wrong"}
        remaining = []
        for path in ("/api-token-auth/", "/api/v1/auth/", "/api-token-auth/"):
            status, headers, _ = await web.call("POST", path, data=wrong)
            self.assertIn(status, (400, 401))
            self.assertEqual(header(headers, "X-RateLimit-Limit"), "3")
            remaining.append(header(headers, "X-RateLimit-Remaining"))
        self.assertEqual(remaining, ["2", "1", "0"])
        # Even the right password is refused now: guesses cannot continue.
        status, headers, body = await web.call("POST", "/api/v1/auth/", data=CREDENTIALS)
        self.assertEqual(status, 429)
        self.assertEqual(header(headers, "Retry-After"), "20")
        self.assertTrue(body["error"].startswith("Request was throttled."))
        self.assertEqual(
            int(header(headers, "X-RateLimit-Reset") or 0), int(web.clock.seconds()) + 60
        )
        status, _, body = await web.call("POST", "/api-token-auth/", data=CREDENTIALS)
        self.assertEqual(status, 429)
        self.assertEqual(body, {"detail": "Request was throttled. Expected available in 20 "
                                          "seconds."})
        web.clock.advance(20)
        status, _, _ = await web.call("POST", "/api-token-auth/", data=CREDENTIALS)
        self.assertEqual(status, 200)

    async def test_the_default_is_100_per_hour(self) -> None:
        web = Web.build()
        _, headers, _ = await web.call("POST", "/api/v1/auth/", data={"username": "a",
                                                                     "password": "b"})
        self.assertEqual(header(headers, "X-RateLimit-Limit"), "100")
        self.assertEqual(header(headers, "X-RateLimit-Remaining"), "99")

    async def test_zero_turns_the_login_limit_off(self) -> None:
        web = Web.build(Config(sections={"web": {"login_rate": 0}}))
        for _ in range(3):
            status, _, _ = await web.call("POST", "/api/v1/auth/", data={"username": "a",
                                                                         "password": "b"})
            self.assertEqual(status, 401)


class AccountFailureLimitTests(TestCase):
    """Failed logins per account name from one address (`login_failure_rate`) and from all
    addresses together (`login_account_failure_rate`), which spares the addresses that
    logged in to the account lately."""

    def build(self) -> tuple[Web, PasswordLogin]:
        web = Web.build(Config(sections={"web": {
            "login_rate": 0, "login_failure_rate": "3/hour",
            "login_account_failure_rate": "6/hour"}}))
        login: PasswordLogin = web.root.apps["imap2api"].login  # type: ignore[attr-defined]
        return web, login

    async def attempt(self, login: PasswordLogin, host: str, username: str,
                      password: str) -> str:
        request: Any = DummyRequest([b""])
        request.client = IPv4Address("TCP", host, 40000)
        try:
            user = await login.check(request, username, password)
        except RateLimited:
            return "429"
        return "ok" if user is not None else "wrong"

    async def test_wrong_passwords_from_one_address_do_not_lock_the_owner_out(self) -> None:
        web, login = self.build()
        await web.user("alice")
        results = [await self.attempt(login, "192.0.2.1", name, "guess")
                   for name in ["alice", "ALICE ", "alice", "alice", "alice"]]
        self.assertEqual(results, ["wrong", "wrong", "wrong", "429", "429"])
        # That address waits, even with the right password ...
        self.assertEqual(await self.attempt(login, "192.0.2.1", "alice", PASSWORD), "429")
        # ... and the owner, elsewhere, logs in (never seen before: the account's own
        # budget of 6 is not spent by one address's 3).
        self.assertEqual(await self.attempt(login, "198.51.100.1", "alice", PASSWORD), "ok")
        web.clock.advance(1200)  # one failure back
        self.assertEqual(await self.attempt(login, "192.0.2.1", "alice", PASSWORD), "ok")

    async def test_guesses_from_many_addresses_at_one_account_are_limited(self) -> None:
        web, login = self.build()
        await web.user("alice")
        await web.user("bob")
        # The owner logged in from home before the guessing began.
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "ok")
        results = [await self.attempt(login, f"192.0.2.{i}", "alice", "guess")
                   for i in range(1, 8)]
        self.assertEqual(results, ["wrong"] * 6 + ["429"])
        # A new address waits, even with the right password; another account does not;
        # the owner's usual address still logs in.
        self.assertEqual(await self.attempt(login, "198.51.100.1", "alice", PASSWORD), "429")
        self.assertEqual(await self.attempt(login, "198.51.100.1", "bob", PASSWORD), "ok")
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "ok")
        # ... but guesses from it are still counted and limited as its own.
        results = [await self.attempt(login, "198.51.100.7", "alice", "guess")
                   for _ in range(4)]
        self.assertEqual(results, ["wrong", "wrong", "wrong", "429"])
        # A name nobody has is limited alike: the 429 tells nothing of who exists.
        results = [await self.attempt(login, f"203.0.113.{i}", "nobody", "guess")
                   for i in range(1, 9)]
        self.assertEqual(results, ["wrong"] * 6 + ["429", "429"])
        # A name as long as a body is remembered by its digest, not whole.
        self.assertEqual(await self.attempt(login, "203.0.113.9", "n" * 500_000, "x"), "wrong")
        names = await web.core.db.read("names", lambda c: [r[0] for r in c.execute(
            sa.select(rate_buckets.c.name))])
        self.assertTrue(names)
        self.assertEqual({len(name) for name in names}, {64})  # digests
        web.clock.advance(600)  # one failure back
        self.assertEqual(await self.attempt(login, "198.51.100.1", "alice", PASSWORD), "ok")

    async def test_failures_count_across_nodes(self) -> None:
        """Two nodes over one store (each its own apps and limiters) allow together the
        failures one allows, per address and per account."""
        web, login = self.build()
        await web.user("alice")
        other: PasswordLogin = build_root(web.core).apps["imap2api"].login  # type: ignore
        results = [await self.attempt(node, "192.0.2.1", "alice", "guess")
                   for node in (login, other, login, other)]
        self.assertEqual(results, ["wrong", "wrong", "wrong", "429"])
        results = [await self.attempt(node, f"198.51.100.{i}", "alice", "guess")
                   for i, node in enumerate((other, login, other, login), 1)]
        self.assertEqual(results, ["wrong", "wrong", "wrong", "429"])  # 6 per account

    async def test_an_address_is_known_for_30_days_after_its_last_login(self) -> None:
        web, login = self.build()
        await web.user("alice")
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "ok")
        web.clock.advance(KNOWN_SOURCE_DAYS * 86400 - 3600)
        for i in range(1, 7):
            self.assertEqual(await self.attempt(login, f"192.0.2.{i}", "alice", "x"), "wrong")
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "ok")
        web.clock.advance(KNOWN_SOURCE_DAYS * 86400 - 1)  # renewed by that login
        for i in range(1, 7):
            self.assertEqual(await self.attempt(login, f"192.0.2.{i}", "alice", "x"), "wrong")
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "ok")
        web.clock.advance(KNOWN_SOURCE_DAYS * 86400)
        for i in range(1, 7):
            self.assertEqual(await self.attempt(login, f"192.0.2.{i}", "alice", "x"), "wrong")
        self.assertEqual(await self.attempt(login, "198.51.100.7", "alice", PASSWORD), "429")

    async def test_the_known_addresses_kept_are_bounded(self) -> None:
        web, login = self.build()
        await web.user("alice")
        with mock.patch("web.login.KNOWN_SOURCES_KEPT", 10):
            for i in range(25):
                self.assertEqual(
                    await self.attempt(login, f"10.0.0.{i}", "alice", PASSWORD), "ok")
                self.assertLessEqual(len(login._known), 10)
        # The latest logins are the ones kept.
        self.assertIn("10.0.0.24", [client for _, client in login._known])

    async def test_only_failures_count_and_the_429_is_the_apis_own(self) -> None:
        web, _ = self.build()
        await web.user("alice")
        for _ in range(5):
            status, _, _ = await web.call("POST", "/api-token-auth/", json=CREDENTIALS)
            self.assertEqual(status, 200)
        wrong = {"username": "alice", "password": "wrong"}
        for path in ("/api-token-auth/", "/api/v1/auth/", "/api-token-auth/"):
            self.assertIn((await web.call("POST", path, json=wrong))[0], (400, 401))
        status, headers, body = await web.call("POST", "/api/v1/auth/", json=CREDENTIALS)
        self.assertEqual(status, 429)
        self.assertEqual(header(headers, "Retry-After"), "1200")
        self.assertEqual(header(headers, "X-RateLimit-Limit"), "3")
        self.assertTrue(body["error"].startswith("Request was throttled."))

    async def test_the_defaults_are_20_and_100_failures_per_hour_and_zero_turns_off(
            self) -> None:
        web = Web.build()
        login: PasswordLogin = web.root.apps["imap2api"].login  # type: ignore[attr-defined]
        assert login.failures is not None and login.account_failures is not None
        self.assertEqual((login.failures.rate.limit, login.failures.rate.period), (20, 3600))
        self.assertEqual(
            (login.account_failures.rate.limit, login.account_failures.rate.period),
            (100, 3600))
        web = Web.build(Config(sections={"web": {"login_failure_rate": 0,
                                                 "login_account_failure_rate": 0}}))
        login = web.root.apps["imap2api"].login  # type: ignore[attr-defined]
        self.assertIsNone(login.failures)
        self.assertIsNone(login.account_failures)

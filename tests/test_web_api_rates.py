"""Request rates of Protecmail, the Mail API and safedrop: per user, and per client address
for requests whose credential is missing or bad (the three APIs share that budget)."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailcore.config import Config
from tests.support.web import Web, header
from web.errors import ApiError
from web.protecmail import ProtecmailApp
from web.ratelimit import RateLimited

THROTTLED = "Request was throttled. Expected available in 1 second."


async def build(**web: Any) -> tuple[Web, dict[str, str]]:
    """A Web with alice and bob, and for each an API key, a Mail API token and a safedrop
    session token."""
    site = Web.build(Config(sections={"web": web}) if web else None)
    creds = {}
    for name in ("alice", "bob"):
        user = await site.user(name)
        creds[f"{name}_key"] = await site.credential(user)
        creds[f"{name}_token"] = await site.credential(user, "token")
        creds[f"{name}_session"] = await site.credential(user, "session", ttl=3600)
    return site, creds


def limit_headers(headers: dict[str, list[str]]) -> tuple[str | None, ...]:
    return tuple(header(headers, name) for name in (
        "X-RateLimit-Limit", "X-RateLimit-Remaining", "Retry-After"))


class UserRateTests(TestCase):
    """Each API: a burst of 20 per user, then 20 a second; 429 in the API's own shape."""

    async def spend(self, web: Web, method: str, path: str, headers: dict[str, str],
                    ok: int = 200) -> tuple[int, dict[str, list[str]], Any]:
        """Make the 20 requests the bucket holds; the reply of a 21st."""
        status, first, _ = await web.call(method, path, headers=headers)
        self.assertEqual(status, ok)
        self.assertEqual(limit_headers(first), ("20", "19", None))
        self.assertGreater(int(header(first, "X-RateLimit-Reset") or 0), web.clock.seconds())
        for _ in range(19):
            self.assertEqual((await web.call(method, path, headers=headers))[0], ok)
        return await web.call(method, path, headers=headers)

    async def test_protecmail_per_user(self) -> None:
        web, c = await build()
        alice = {"Api-Key": c["alice_key"]}
        status, headers, body = await self.spend(web, "GET", "/api/v1/ping", alice)
        self.assertEqual(status, 429)
        self.assertEqual(limit_headers(headers), ("20", "0", "1"))
        self.assertEqual((body["success"], body["msg"]), (False, THROTTLED))
        self.assertIn("request_id", body)
        # A refused write changes nothing.
        status, _, _ = await web.call("POST", "/api/v1/domain/late.test", headers=alice,
                                      json={"redirectTo": "mx.example.com"})
        self.assertEqual(status, 429)
        self.assertEqual(await web.core.domains.list(), [])
        # Bob has a bucket of his own; another key of alice's shares hers.
        bob = {"Api-Key": c["bob_key"]}
        self.assertEqual((await web.call("GET", "/api/v1/ping", headers=bob))[0], 200)
        alice_user = await web.core.identity.find_user("alice")
        assert alice_user is not None
        second = await web.credential(alice_user)
        self.assertEqual(
            (await web.call("GET", "/api/v1/ping", headers={"Api-Key": second}))[0], 429)
        web.clock.advance(1)
        self.assertEqual((await web.call("GET", "/api/v1/ping", headers=alice))[0], 200)

    async def test_mail_api_per_user(self) -> None:
        web, c = await build()
        alice = {"Auth-Key": c["alice_token"]}
        status, headers, body = await self.spend(web, "GET", "/api/v1/mailboxes/", alice)
        self.assertEqual((status, body), (429, {"message": THROTTLED}))
        self.assertEqual(limit_headers(headers), ("20", "0", "1"))
        bob = {"Auth-Key": c["bob_token"]}
        self.assertEqual((await web.call("GET", "/api/v1/mailboxes/", headers=bob))[0], 200)
        web.clock.advance(1)
        self.assertEqual((await web.call("GET", "/api/v1/mailboxes/", headers=alice))[0], 200)

    async def test_safedrop_per_user(self) -> None:
        web, c = await build()
        alice = {"X-Auth-Token": c["alice_session"]}
        status, headers, body = await self.spend(web, "GET", "/dropbundles", alice)
        self.assertEqual((status, body), (429, {"error": THROTTLED}))
        self.assertEqual(limit_headers(headers), ("20", "0", "1"))
        # Trading the API key for a token counts against the same user.
        status, _, _ = await web.call("GET", "/", headers={
            "X-Auth-User": "alice@example.test", "X-Auth-Key": c["alice_key"]})
        self.assertEqual(status, 429)
        bob = {"X-Auth-Token": c["bob_session"]}
        self.assertEqual((await web.call("GET", "/dropbundles", headers=bob))[0], 200)
        web.clock.advance(1)
        self.assertEqual((await web.call("GET", "/dropbundles", headers=alice))[0], 200)

    async def test_the_rates_are_configurable(self) -> None:
        web, c = await build(protecmail_user_rate="2/minute", mailapi_user_rate="1/minute",
                             safedrop_user_rate="3/minute")
        for path, headers, allowed in (
            ("/api/v1/ping", {"Api-Key": c["alice_key"]}, 2),
            ("/api/v1/mailboxes/", {"Auth-Key": c["alice_token"]}, 1),
            ("/dropbundles", {"X-Auth-Token": c["alice_session"]}, 3),
        ):
            statuses = [(await web.call("GET", path, headers=headers))[0]
                        for _ in range(allowed + 1)]
            self.assertEqual(statuses, [200] * allowed + [429], path)


class BadCredentialTests(TestCase):
    """100 an hour per client address, across the three APIs; good credentials still work."""

    async def test_guesses_get_401_then_429_in_each_apis_shape(self) -> None:
        web, c = await build()
        guesses = [
            ("GET", "/api/v1/ping", {"Api-Key": "guess"}),
            ("GET", "/api/v1/ping", {}),
            ("GET", "/api/v1/mailboxes/", {"Auth-Key": "guess"}),
            ("HEAD", "/api/v1/auth/?api_key=guess", {}),
            ("GET", "/dropbundles", {"X-Auth-Token": "guess"}),
            ("GET", "/", {"X-Auth-User": "alice@example.test", "X-Auth-Key": "guess"}),
            # alice's key with bob's address is a guess too
            ("GET", "/", {"X-Auth-User": "bob@example.test", "X-Auth-Key": c["alice_key"]}),
        ]
        for i in range(100):
            method, path, headers = guesses[i % len(guesses)]
            status, replied, _ = await web.call(method, path, headers=headers)
            self.assertIn(status, (401, 403), (method, path))
            self.assertEqual(header(replied, "X-RateLimit-Limit"), "100")
        status, replied, body = await web.call("GET", "/api/v1/ping",
                                               headers={"Api-Key": "guess"})
        self.assertEqual(status, 429)
        self.assertEqual((body["success"], header(replied, "Retry-After")), (False, "36"))
        self.assertEqual(header(replied, "X-RateLimit-Remaining"), "0")
        status, _, body = await web.call("GET", "/api/v1/mailboxes/",
                                         headers={"Auth-Key": "guess"})
        self.assertEqual(status, 429)
        self.assertEqual(body, {"message": "Request was throttled. Expected available in 36 "
                                           "seconds."})
        status, _, body = await web.call("GET", "/dropbundles", headers={"X-Auth-Token": "x"})
        self.assertEqual(status, 429)
        self.assertIn("throttled", body["error"])
        status, _, _ = await web.call("HEAD", "/api/v1/auth/?api_key=guess")
        self.assertEqual(status, 429)
        # Good credentials from the same address are served.
        for method, path, good in (
            ("GET", "/api/v1/ping", {"Api-Key": c["alice_key"]}),
            ("GET", "/api/v1/mailboxes/", {"Auth-Key": c["alice_token"]}),
            ("GET", "/dropbundles", {"X-Auth-Token": c["alice_session"]}),
        ):
            self.assertEqual((await web.call(method, path, headers=good))[0], 200, path)
        web.clock.advance(36)
        status, _, _ = await web.call("GET", "/api/v1/ping", headers={"Api-Key": "guess"})
        self.assertEqual(status, 401)

    async def test_each_client_address_has_its_own_budget(self) -> None:
        web, _ = await build(bad_credential_rate="2/hour")
        app = cast(ProtecmailApp, web.root.apps["protecmail"])

        async def status(host: str) -> int:
            req: Any = DummyRequest([b""])
            req.client = IPv4Address("TCP", host, 40000)
            req.requestHeaders.setRawHeaders(b"api-key", [b"guess"])
            try:
                await app.principal(req)
            except RateLimited:
                return 429
            except ApiError as e:
                return e.status
            return 200

        self.assertEqual([await status("192.0.2.1") for _ in range(3)], [401, 401, 429])
        self.assertEqual(await status("192.0.2.2"), 401)

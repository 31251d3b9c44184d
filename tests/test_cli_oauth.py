"""`mailcore oauth …`: apps registered from the shell, their secret shown once and kept
hashed; a user's grants listed and revoked."""

from __future__ import annotations

import re

from tests.support.cli import CliTestCase

REDIRECT = "https://client.example/callback"


class OAuthCliTests(CliTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        await self.ok("user", "add", "alice", "--email", "alice@example.test",
                      "--password", "pw")

    async def add(self, *uris: str) -> tuple[str, str]:
        args = [a for u in (uris or (REDIRECT,)) for a in ("--redirect-uri", u)]
        out = await self.ok("oauth", "app", "add", "Backup Buddy", "--owner", "alice", *args)
        uid = re.search(r"^uid: ([0-9a-f]{64})$", out, re.M)
        secret = re.search(r"^secret: ([0-9a-f]{64})$", out, re.M)
        assert uid and secret, out
        return uid.group(1), secret.group(1)

    async def test_add_prints_uid_and_secret_once_and_list_shows_no_secret(self) -> None:
        uid, secret = await self.add(REDIRECT, "http://localhost:8000/cb")
        out = await self.ok("oauth", "app", "list", "--owner", "alice")
        self.assertIn(uid, out)
        self.assertIn("Backup Buddy", out)
        self.assertIn("http://localhost:8000/cb", out)
        self.assertNotIn(secret, out)

    async def test_remove_deletes_the_app(self) -> None:
        uid, _ = await self.add()
        out = await self.ok("oauth", "app", "remove", uid)
        self.assertIn(f"removed app {uid}", out)
        self.assertNotIn(uid, await self.ok("oauth", "app", "list"))
        await self.refused("oauth", "app", "remove", uid, fragment="no such app")

    async def test_bad_redirect_uri_and_unknown_owner_are_one_line(self) -> None:
        await self.refused("oauth", "app", "add", "x", "--owner", "alice",
                           "--redirect-uri", "https://x/cb#f", fragment="fragment")
        await self.refused("oauth", "app", "add", "x", "--owner", "nobody",
                           "--redirect-uri", REDIRECT, fragment="no such user")

    async def test_one_app_past_the_cap_is_one_line(self) -> None:
        config = self.base / "cap.toml"
        config.write_text("[oauth]\nmax_apps_per_user = 1\n")
        await self.ok("-c", str(config), "oauth", "app", "add", "one", "--owner", "alice",
                      "--redirect-uri", REDIRECT)
        await self.refused("-c", str(config), "oauth", "app", "add", "two", "--owner",
                           "alice", "--redirect-uri", REDIRECT,
                           fragment="a user may have at most 1 OAuth apps")
        self.assertNotIn("two", await self.ok("oauth", "app", "list"))

    async def test_grants_and_revoke(self) -> None:
        uid, _ = await self.add()
        out = await self.ok("oauth", "grants", "alice")
        self.assertNotIn(uid, out)
        out = await self.ok("oauth", "revoke", "alice", uid)
        self.assertIn("revoked 0 token(s)", out)
        await self.refused("oauth", "revoke", "alice", "0" * 64, fragment="no such app")

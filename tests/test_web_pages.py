"""The HTML pages (web.pages) through the quarantine release page: security headers on every
page and error page, autoescaped values, the CSRF token a form must carry (a POST without
it, or with another's, is a 403 page and releases nothing), the cookie's attributes, the
stylesheet, and the CSRF key file."""

from __future__ import annotations

import base64
import email
import re
import stat
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.support.pages import csrf_cookie, csrf_field
from tests.support.quarantine import GTUBE, Gateway, message, stopper
from tests.support.web import BASE
from web.pages import CSP, PageApp, Pages

LINK = re.compile(r"https://[^/\s]+(/quarantine/release/\S+)")
SUBJECT = "<script>alert('x')</script> & <b>bold</b>"

EXPECTED_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "content-type": "text/html; charset=utf-8",
}


async def fetch(
    http: Any, method: str, path: str, base: str = BASE, **kwargs: Any
) -> tuple[int, dict[str, list[str]], bytes]:
    response = await http.request(method, base + path, **kwargs)
    body = await response.content()
    headers = {
        name.decode().lower(): [v.decode() for v in values]
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, headers, body


class ReleasePageTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.gw = Gateway()
        self.addCleanup(stopper(self.gw))
        user = await self.gw.owner("alice")
        await self.gw.core.identity.set_plan(user.id, "standard")
        await self.gw.domain(user, "q.test", spam_action=0, send_resume=True)
        await self.gw.send(message(SUBJECT, GTUBE), "joe@q.test")
        self.gw.core.quarantine.startService()
        self.gw.clock.advance(self.gw.core.quarantine.settings.digest_interval)
        [(_sender, _rcpts, digest)] = self.gw.delivered()
        text = email.message_from_bytes(digest).get_payload(decode=True)
        assert isinstance(text, bytes)
        [path] = LINK.findall(text.decode())
        self.path = path
        self.bind = "release:" + path.rsplit("/", 1)[1]
        self.before = len(self.gw.delivered())

    def browser(self) -> Any:
        """A new client with no cookies (another browser)."""
        return StubTreq(self.gw.web.root)

    async def page(self, http: Any) -> tuple[str, str]:
        """(cookie, form token) a browser gets from the release page."""
        status, headers, body = await fetch(http, "GET", self.path)
        self.assertEqual(status, 200)
        cookie = csrf_cookie(headers)
        assert cookie is not None
        return cookie, csrf_field(body)

    def released(self) -> int:
        return len(self.gw.delivered()) - self.before

    def assertPageHeaders(self, headers: dict[str, list[str]], what: str) -> None:
        for name, value in EXPECTED_HEADERS.items():
            self.assertEqual(headers.get(name), [value], f"{what}: {name}")

    async def test_every_page_and_error_page_carries_the_security_headers(self) -> None:
        http = self.browser()
        invalid = self.path[:-3] + ("AAA" if not self.path.endswith("AAA") else "BBB")
        for method, path, status in [
            ("GET", self.path, 200),
            ("GET", invalid, 404),
            ("POST", invalid, 404),
            ("POST", self.path, 403),  # no CSRF token
            ("GET", "/quarantine/elsewhere", 404),
            ("PUT", self.path, 405),
        ]:
            got, headers, body = await fetch(http, method, path)
            self.assertEqual(got, status, (method, path))
            self.assertPageHeaders(headers, f"{method} {path}")
            self.assertTrue(body.startswith(b"<!DOCTYPE html>"), body[:80])
        self.assertEqual(self.released(), 0)

    async def test_the_405_page_says_which_methods_are_allowed(self) -> None:
        status, headers, body = await fetch(self.browser(), "PUT", self.path)
        self.assertEqual(status, 405)
        self.assertIn("POST", headers["allow"][0])
        self.assertIn(b"Method PUT not allowed.", body)

    async def test_values_from_the_message_are_escaped(self) -> None:
        _status, _headers, body = await fetch(self.browser(), "GET", self.path)
        self.assertNotIn(b"<script>", body)
        self.assertNotIn(b"<b>bold", body)
        self.assertIn(b"&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;", body)

    async def test_a_subject_is_shown_without_bidirectional_controls(self) -> None:
        # "Invoice \u202efdp.exe" reads "Invoice exe.pdf" where it is shown as it came.
        subject = "Invoice \u202efdp.exe"
        encoded = "=?utf-8?b?" + base64.b64encode(subject.encode()).decode() + "?="
        await self.gw.send(message(encoded, GTUBE), "joe@q.test", sender="billing@x.test")
        self.gw.clock.advance(self.gw.core.quarantine.settings.digest_interval)
        digest = email.message_from_bytes(self.gw.delivered()[-1][2])
        text = digest.get_payload(decode=True)
        assert isinstance(text, bytes)
        self.assertIn("Subject: Invoice fdp.exe\r\n", text.decode())
        [path] = LINK.findall(text.decode())
        _status, _headers, body = await fetch(self.browser(), "GET", path)
        self.assertIn(b"<dd>Invoice fdp.exe</dd>", body)
        self.assertNotIn("\u202e".encode(), body)

    async def test_the_csrf_cookie_is_http_only_same_site_lax_and_not_secure_over_http(
        self
    ) -> None:
        _status, headers, _body = await fetch(self.browser(), "GET", self.path)
        [line] = [c for c in headers["set-cookie"] if c.startswith("mc_csrf=")]
        attributes = {a.strip().lower() for a in line.split(";")[1:]}
        self.assertEqual(attributes, {"path=/", "httponly", "samesite=lax"})

    async def test_over_tls_the_csrf_cookie_is_a_secure_host_cookie(self) -> None:
        _status, headers, _body = await fetch(self.browser(), "GET", self.path,
                                              base="https://127.0.0.1")
        [line] = headers["set-cookie"]
        self.assertTrue(line.startswith("__Host-mc_csrf="), line)
        attributes = {a.strip().lower() for a in line.split(";")[1:]}
        self.assertEqual(attributes, {"path=/", "httponly", "samesite=lax", "secure"})

    async def test_a_post_without_the_right_csrf_token_is_refused_and_releases_nothing(
        self
    ) -> None:
        cookie, token = await self.page(self.browser())
        other_cookie, other_token = await self.page(self.browser())
        forged = Pages(b"k" * 32, self.gw.clock).csrf_token
        cases: list[tuple[str, dict[str, str], dict[str, str]]] = [
            ("no token, no cookie", {}, {}),
            ("no token", {"Cookie": f"mc_csrf={cookie}"}, {}),
            ("token, no cookie", {}, {"csrf_token": token}),
            ("empty token", {"Cookie": f"mc_csrf={cookie}"}, {"csrf_token": ""}),
            ("another browser's token", {"Cookie": f"mc_csrf={cookie}"},
             {"csrf_token": other_token}),
            ("another browser's cookie", {"Cookie": f"mc_csrf={other_cookie}"},
             {"csrf_token": token}),
            ("a token under another key", {"Cookie": f"mc_csrf={cookie}"},
             {"csrf_token": _token_of(forged, cookie, "release", self.bind)}),
        ]
        for what, headers, form in cases:
            status, _headers, body = await fetch(
                self.browser(), "POST", self.path, headers=headers, data=form
            )
            self.assertEqual(status, 403, what)
            self.assertIn(b"did not come from this site", body, what)
        self.assertEqual(self.released(), 0)
        # The page still works for the person it was sent to.
        status, _headers, body = await fetch(
            self.browser(), "POST", self.path,
            headers={"Cookie": f"mc_csrf={cookie}"}, data={"csrf_token": token},
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(self.released(), 1)

    async def test_a_csrf_token_in_the_query_string_releases_nothing(self) -> None:
        # A token in an address ends up in logs, Referers and link scanners' fetches: only
        # the form's body carries it, and a GET with one is the page, nothing released.
        cookie, token = await self.page(self.browser())
        query = f"{self.path}?csrf_token={token}"
        for method, form in [("POST", {}), ("POST", {"csrf_token": ""}), ("GET", None)]:
            status, _headers, _body = await fetch(
                self.browser(), method, query, headers={"Cookie": f"mc_csrf={cookie}"},
                data=form)
            self.assertEqual(status, 403 if method == "POST" else 200, (method, form))
        self.assertEqual(self.released(), 0)
        self.assertEqual(await self.post(cookie, token), 200)
        self.assertEqual(self.released(), 1)

    async def test_a_disabled_owners_message_stays_held_until_it_is_enabled(self) -> None:
        # `mailcore user disable`: nothing of the account is delivered, and a link of an
        # earlier digest released its mail all the same.
        owner = await self.gw.core.identity.find_user("alice")
        assert owner is not None
        await self.gw.core.identity.set_active(owner.id, False)
        cookie, token = await self.page(self.browser())
        status, headers, body = await fetch(
            self.browser(), "POST", self.path,
            headers={"Cookie": f"mc_csrf={cookie}"}, data={"csrf_token": token})
        self.assertEqual(status, 403, body)
        self.assertIn(b"suspended", body)
        self.assertPageHeaders(headers, "suspended")
        self.assertEqual(self.released(), 0)
        await self.gw.core.identity.set_active(owner.id, True)
        self.assertEqual(await self.post(cookie, token), 200)
        self.assertEqual(self.released(), 1)

    async def post(self, cookie: str, token: str, base: str = BASE,
                   cookie_name: str = "mc_csrf", **headers: str) -> int:
        status, _headers, _body = await fetch(
            self.browser(), "POST", self.path, base=base,
            headers={"Cookie": f"{cookie_name}={cookie}", **headers},
            data={"csrf_token": token})
        return status

    async def test_a_token_is_good_for_a_day(self) -> None:
        cookie, token = await self.page(self.browser())
        self.gw.clock.advance(24 * 3600 + 1)
        self.assertEqual(await self.post(cookie, token), 403)
        cookie, token = await self.page(self.browser())
        self.gw.clock.advance(24 * 3600 - 1)
        self.assertEqual(await self.post(cookie, token), 200)
        self.assertEqual(self.released(), 1)

    async def test_a_token_is_good_for_its_own_link_and_form_only(self) -> None:
        cookie, _token = await self.page(self.browser())
        app = self.gw.web.root.apps["quarantine"]
        assert isinstance(app, PageApp)
        pages = app.pages
        for what, purpose, bind in [
            ("another link", "release", "release:" + "A" * 40),
            ("another form", "login", self.bind),
            ("no binding", "release", ""),
        ]:
            token = _token_of(pages.csrf_token, cookie, purpose, bind)
            self.assertEqual(await self.post(cookie, token), 403, what)
        self.assertEqual(self.released(), 0)
        right = _token_of(pages.csrf_token, cookie, "release", self.bind)
        self.assertEqual(await self.post(cookie, right), 200)

    async def test_a_post_from_another_origin_is_refused(self) -> None:
        cookie, token = await self.page(self.browser())
        for what, headers in [
            ("foreign Origin", {"Origin": "https://evil.example"}),
            ("sibling Origin", {"Origin": "http://evil.127.0.0.1"}),
            ("other port", {"Origin": "http://127.0.0.1:8081"}),
            ("cross-site fetch", {"Sec-Fetch-Site": "cross-site"}),
            ("same-site fetch (a sibling domain)", {"Sec-Fetch-Site": "same-site"}),
            ("garbage Origin", {"Origin": "evil"}),
            # Another site's page with no-referrer (or a sandboxed frame) over plain HTTP,
            # where browsers send no Sec-Fetch-Site: a login CSRF from a sibling otherwise.
            ("null Origin without fetch metadata", {"Origin": "null"}),
            ("null Origin, cross-site", {"Origin": "null", "Sec-Fetch-Site": "cross-site"}),
        ]:
            self.assertEqual(await self.post(cookie, token, **headers), 403, what)
        self.assertEqual(self.released(), 0)
        # Our own forms: our Origin (our pages' Referrer-Policy: same-origin), or null with
        # Sec-Fetch-Site: same-origin (a browser's privacy setting).
        for headers in [{"Origin": "null", "Sec-Fetch-Site": "same-origin"},
                        {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"},
                        {"Origin": "HTTP://127.0.0.1:80"}]:
            self.assertIn(await self.post(cookie, token, **headers), (200, 409), headers)
        self.assertEqual(self.released(), 1)

    async def test_over_tls_only_the_host_cookie_counts_and_origin_must_be_https(
        self
    ) -> None:
        tls = "https://127.0.0.1"
        status, headers, body = await fetch(self.browser(), "GET", self.path, base=tls)
        self.assertEqual(status, 200)
        [line] = headers["set-cookie"]
        cookie = line.split(";", 1)[0].partition("=")[2]
        token = csrf_field(body)
        # A cookie without the prefix (which a plain-HTTP reply or a sibling could plant)
        # is not the CSRF cookie under TLS.
        self.assertEqual(await self.post(cookie, token, base=tls), 403)
        self.assertEqual(await self.post(cookie, token, base=tls, cookie_name="__Host-mc_csrf",
                                         Origin="http://127.0.0.1"), 403)
        self.assertEqual(self.released(), 0)
        self.assertEqual(await self.post(cookie, token, base=tls, cookie_name="__Host-mc_csrf",
                                         Origin="https://127.0.0.1"), 200)

    async def test_the_stylesheet_is_served_and_cached_long(self) -> None:
        _status, _headers, body = await fetch(self.browser(), "GET", self.path)
        match = re.search(rb'<link rel="stylesheet" href="([^"]+)">', body)
        assert match is not None
        status, headers, css = await fetch(self.browser(), "GET", match.group(1).decode())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["text/css; charset=utf-8"])
        self.assertEqual(headers["cache-control"], ["public, max-age=31536000, immutable"])
        self.assertIn(b"font", css)


class FakeRequest:
    """Just enough of a plain-HTTP request carrying the CSRF cookie `cookie`."""

    def __init__(self, cookie: str) -> None:
        self.cookie = cookie

    def isSecure(self) -> bool:
        return False

    def getCookie(self, name: bytes) -> bytes | None:
        return self.cookie.encode() if name == b"mc_csrf" else None


def _token_of(make: Any, cookie: str, purpose: str = "release", bind: str = "") -> str:
    """The CSRF token `make` (a Pages.csrf_token) gives a request carrying `cookie`."""
    return str(make(FakeRequest(cookie), purpose, bind))


class KeyFileTests(TestCase):
    def test_the_csrf_key_is_made_private_and_reused(self) -> None:
        data_dir = Path(self.mktemp())
        first = Pages.from_data_dir(data_dir, Clock())
        self.assertEqual(stat.S_IMODE((data_dir / "pages.key").stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(data_dir.stat().st_mode), 0o700)
        again = Pages.from_data_dir(data_dir, Clock())
        self.assertEqual(_token_of(first.csrf_token, "c" * 43),
                         _token_of(again.csrf_token, "c" * 43))

    def test_a_short_key_file_is_refused(self) -> None:
        data_dir = Path(self.mktemp())
        data_dir.mkdir()
        (data_dir / "pages.key").write_bytes(b"short")
        with self.assertRaises(ValueError) as caught:
            Pages.from_data_dir(data_dir, Clock())
        self.assertIn("pages.key: the key is too short", str(caught.exception))

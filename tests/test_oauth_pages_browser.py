"""A person authorizes an app in headless Chromium (JavaScript off): the authorize URL shows
the login form, then the consent page; Allow lands on the app's redirect URI with a code,
which the app exchanges for a token that GET /v1/accounts accepts. Deny lands there with
error=access_denied. The Authorized applications page revokes what Allow gave. Both sites
listen on loopback; screenshots of the login and consent
pages are kept in the test's temp dir."""

from __future__ import annotations

import html
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support.browser import Browser, host_map, serve
from tests.support.oauth import Client, authorize_uri, query_of, register
from tests.support.pages import csrf_cookie, csrf_field
from tests.support.web import PASSWORD, Web
from web.root import build_site


class Callback(Resource):
    """The app's redirect URI: a page that says it got the answer."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return b"<!DOCTYPE html><html><head><title>Callback</title></head><body>ok</body></html>"


class AuthorizeInChromiumTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        self.base = serve(self, build_site(self.web.core))
        # "localhost" is another site than "127.0.0.1" for the browser.
        callback = serve(self, Site(Callback())).replace("127.0.0.1", "localhost")
        self.redirect = callback + "/callback"
        self.client: Client = await register(self.web, self.alice, self.redirect)
        self.browser = await Browser.start(self)

    async def log_in(self, state: str) -> None:
        from selenium.webdriver.common.by import By

        url = authorize_uri(self.client.uid, redirect_uri=self.redirect, state=state)
        await self.browser.get(url.replace("http://127.0.0.1", self.base))
        self.assertEqual(await self.browser.title(), "Log in · Mailcore")
        await self.browser.screenshot(f"{state}-1-login")
        driver = self.browser.driver

        def fill() -> None:
            driver.find_element(By.NAME, "username").send_keys("alice")
            driver.find_element(By.NAME, "password").send_keys(PASSWORD)

        await self.browser.run(fill)
        await self.browser.click_button("Log in")
        self.assertEqual(await self.browser.title(), "Authorize Test client · Mailcore")
        page = await self.browser.text()
        self.assertIn("Test client (registered by alice)", page)
        self.assertIn("read:", page)
        self.assertIn("write:", page)
        await self.browser.screenshot(f"{state}-2-consent")

    async def landed(self) -> dict[str, str]:
        """The query the browser brought to the redirect URI (once it got there)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def arrive() -> str:
            try:
                WebDriverWait(self.browser.driver, 10).until(
                    lambda d: d.current_url.startswith(self.redirect))
            except TimeoutException:
                pass
            return str(self.browser.driver.current_url)

        url = await self.browser.run(arrive)
        self.assertTrue(url.startswith(self.redirect + "?"), url)
        return query_of(url)

    async def test_allow_lands_on_the_redirect_with_a_code_that_buys_a_token(self) -> None:
        await self.log_in("allow")
        await self.browser.click_button("Allow")
        query = await self.landed()
        self.assertEqual(query["state"], "allow")
        status, _, token = await self.client.exchange(
            grant_type="authorization_code", code=query["code"], redirect_uri=self.redirect)
        self.assertEqual(status, 200, token)
        status, _, accounts = await self.web.call(
            "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token['access_token']}"})
        self.assertEqual((status, accounts), (200, []))

    async def test_deny_lands_on_the_redirect_with_access_denied(self) -> None:
        await self.log_in("deny")
        await self.browser.click_button("Deny")
        query = await self.landed()
        self.assertEqual((query["error"], query["state"]), ("access_denied", "deny"))
        self.assertNotIn("code", query)

    async def test_log_out_shows_the_login_form_again(self) -> None:
        await self.log_in("logout")
        await self.browser.click_button("Log out")
        self.assertEqual(await self.browser.title(), "Log in · Mailcore")
        await self.browser.screenshot("logout-3-login")
        [ended] = await self.web.core.identity.list_credentials(self.alice.id, "page")
        self.assertTrue(ended.revoked)


    async def test_the_authorized_apps_page_revokes_an_app(self) -> None:
        await self.log_in("revoke")
        await self.browser.click_button("Allow")
        query = await self.landed()
        status, _, token = await self.client.exchange(
            grant_type="authorization_code", code=query["code"], redirect_uri=self.redirect)
        self.assertEqual(status, 200, token)
        # The same browser, its session still on: the page lists the app it let in.
        await self.browser.get(self.base + "/oauth/authorized_applications")
        self.assertEqual(await self.browser.title(), "Authorized applications · Mailcore")
        page = await self.browser.text()
        self.assertIn("Test client", page)
        self.assertIn("read, write", page)
        await self.browser.screenshot("revoke-3-authorized")
        await self.browser.click_button("Revoke Test client")
        self.assertEqual(await self.browser.title(), "Authorized applications · Mailcore")
        page = await self.browser.text()
        self.assertIn("Revoked the access of Test client.", page)
        self.assertIn("No application may act for you.", page)
        await self.browser.screenshot("revoke-4-revoked")
        status, _, _ = await self.web.call(
            "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token['access_token']}"})
        self.assertEqual(status, 401)
        status, _, body = await self.client.exchange(
            grant_type="refresh_token", refresh_token=token["refresh_token"])
        self.assertEqual((status, body["error"]), (400, "invalid_grant"))


class SiblingPrize(Resource):
    """Mallory's page on a sibling subdomain (evil.example.test, same site as the pages at
    pages.example.test): it plants her CSRF cookie for the parent domain and posts her login
    form, with her cookie's token, from a page whose referrer policy makes the browser send
    `Origin: null` (a login CSRF)."""

    isLeaf = True

    def __init__(self, target: str, cookie: str, token: str) -> None:
        super().__init__()
        self.target, self.cookie, self.token = target, cookie, token

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Set-Cookie",
                          f"mc_csrf={self.cookie}; Domain=example.test; Path=/".encode())
        fields = {"csrf_token": self.token, "action": "login", "username": "mallory",
                  "password": PASSWORD}
        inputs = "".join(f'<input type="hidden" name="{k}" value="{html.escape(v)}">'
                         for k, v in fields.items())
        return (
            '<!DOCTYPE html><html><head><meta name="referrer" content="no-referrer">'
            "<title>Prize</title></head><body>"
            f'<form method="post" action="{html.escape(self.target, quote=True)}">'
            f"{inputs}<button>Claim your prize</button></form></body></html>"
        ).encode()


class PlainHttpLoginCsrfTests(TestCase):
    """Over plain HTTP under a host name (no `Sec-Fetch-Site` from the browser there), a
    sibling subdomain's form cannot log the visitor in to its own account, and the person's
    own login still works (the browser sends our pages' own origin with their forms)."""

    async def test_a_sibling_cannot_log_the_visitor_in_to_its_account(self) -> None:
        web = Web.build()
        alice = await web.user()
        await web.user("mallory")
        client = await register(web, alice)
        pages = serve(self, build_site(web.core)).replace("127.0.0.1", "pages.example.test")
        path = authorize_uri(client.uid).removeprefix("http://127.0.0.1")
        # Mallory's own browser gets the login form: a CSRF cookie and its token.
        status, headers, body = await web.call("GET", path)
        self.assertEqual(status, 200)
        cookie = csrf_cookie(headers)
        assert cookie is not None
        evil = serve(self, Site(SiblingPrize(pages + path, cookie, csrf_field(body, "login"))))
        evil = evil.replace("127.0.0.1", "evil.example.test")
        browser = await Browser.start(
            self, arguments=[host_map("pages.example.test", "evil.example.test")])

        await browser.get(evil + "/prize")
        await browser.click_button("Claim your prize")
        await browser.screenshot("1-refused")
        self.assertEqual(await browser.title(), "Form expired · Mailcore")
        await browser.get(pages + path)
        self.assertEqual(await browser.title(), "Log in · Mailcore")  # not Mallory's session

        from selenium.webdriver.common.by import By

        driver = browser.driver

        def fill() -> None:
            driver.find_element(By.NAME, "username").send_keys("alice")
            driver.find_element(By.NAME, "password").send_keys(PASSWORD)

        await browser.run(fill)
        await browser.click_button("Log in")
        await browser.screenshot("2-own-login")
        self.assertEqual(await browser.title(), "Authorize Test client · Mailcore")
        self.assertIn("act for you, alice", await browser.text())

"""The authorization page (GET/POST /oauth/authorize) through StubTreq: login form, consent
page, Allow and Deny, CSRF, the session cookie, error pages that never redirect."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.oauth import OAuthSettings
from tests.support.oauth import REDIRECT, authorize_uri, query_of, register
from tests.support.pages import csrf_cookie, csrf_field
from tests.support.web import PASSWORD, Web, header


def path_of(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.path}?{parts.query}"


def cookie(headers: dict[str, list[str]], name: str) -> tuple[str, str] | None:
    """(value, the whole Set-Cookie line) of cookie `name`, if the reply sets it."""
    for line in headers.get("set-cookie", []):
        key, _, rest = line.partition("=")
        if key.strip() == name:
            return rest.split(";", 1)[0], line
    return None


def new_browser(web: Web) -> Any:
    """A client of its own (StubTreq keeps cookies): another browser."""
    return StubTreq(web.root)


class PageClient(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.alice = await self.web.user()
        bob = await self.web.user("bob")
        self.client = await register(self.web, self.alice, owner=bob)
        await self.web.core.oauth.list_apps()
        self.cookies: dict[str, str] = {}

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        """A request from one browser: it keeps the cookies it is given."""
        status, headers, body = await self.web.call(method, path, cookies=dict(self.cookies),
                                                    allow_redirects=False,
                                                    **kwargs)
        for name in ("mc_csrf", "mc_session"):
            found = cookie(headers, name)
            if found:
                self.cookies[name] = found[0]
        return status, headers, body

    async def form(self, path: str, **fields: str) -> tuple[int, Any, Any]:
        """Load the page at `path` and post its form with `fields`."""
        status, _, body = await self.call("GET", path)
        self.assertEqual(status, 200, body)
        token = csrf_field(body, fields.get("action"))
        return await self.call("POST", path, data={"csrf_token": token, **fields})

    async def log_in(self, path: str) -> None:
        status, headers, _ = await self.form(path, action="login", username="alice",
                                             password=PASSWORD)
        self.assertEqual(status, 303)
        self.assertEqual(header(headers, "location"), path)



class AuthorizePageTests(PageClient):
    async def test_login_then_consent_then_allow_redirects_with_code_and_state(self) -> None:
        path = path_of(authorize_uri(self.client.uid, state="s-1"))
        status, headers, body = await self.call("GET", path)
        self.assertEqual(status, 200)
        self.assertIn(b"Log in", body)
        self.assertEqual(header(headers, "x-frame-options"), "DENY")
        self.assertIn("frame-ancestors 'none'", header(headers, "content-security-policy") or "")
        await self.log_in(path)
        status, headers, body = await self.call("GET", path)
        self.assertEqual(status, 200)
        for shown in (b"Test client", b"registered by bob", b"<strong>read</strong>",
                      b"<strong>write</strong>", b"Allow", b"Deny"):
            self.assertIn(shown, body)
        self.assertIn("form-action 'self' https://client.example",
                      header(headers, "content-security-policy") or "")
        status, headers, _ = await self.call(
            "POST", path, data={"csrf_token": csrf_field(body), "decision": "allow"})
        self.assertEqual(status, 302)
        location = header(headers, "location") or ""
        self.assertTrue(location.startswith(REDIRECT + "?"), location)
        # The redirect carries the code: not stored, no Referer onwards, no framing (it had
        # none of the page headers).
        self.assertEqual((header(headers, "cache-control"), header(headers, "referrer-policy"),
                          header(headers, "x-frame-options")),
                         ("no-store", "same-origin", "DENY"))
        query = query_of(location)
        self.assertEqual(query["state"], "s-1")
        status, _, token = await self.client.exchange(
            grant_type="authorization_code", code=query["code"], redirect_uri=REDIRECT)
        self.assertEqual(status, 200, token)

    async def test_deny_redirects_with_access_denied(self) -> None:
        path = path_of(authorize_uri(self.client.uid, state="s-2"))
        await self.log_in(path)
        status, headers, _ = await self.form(path, decision="deny")
        self.assertEqual(status, 302)
        query = query_of(header(headers, "location") or "")
        self.assertEqual((query["error"], query["state"]), ("access_denied", "s-2"))
        self.assertNotIn("code", query)

    async def test_an_app_removed_while_the_consent_page_is_open_is_an_error_page(
        self,
    ) -> None:
        # The app is deleted after the Allow's consent checks have passed: the page is the
        # refusal of an unknown client, no redirect (was a 500: oauthlib's error unhandled).
        path = path_of(authorize_uri(self.client.uid, state="s-3"))
        await self.log_in(path)
        status, _, body = await self.call("GET", path)
        self.assertEqual(status, 200)
        oauth = self.web.core.oauth
        checked = oauth.consent
        calls: list[str] = []

        async def consent(uri: str) -> Any:
            found = await checked(uri)
            calls.append(uri)
            if len(calls) == 2:  # the page's check, then OAuthProvider.decide's
                await oauth.remove_app(self.client.uid)
            return found

        oauth.consent = consent  # type: ignore[method-assign]
        status, headers, body = await self.call(
            "POST", path, data={"csrf_token": csrf_field(body), "decision": "allow"})
        self.assertEqual(status, 400, body)
        self.assertIsNone(header(headers, "location"))
        self.assertIn(b"Authorization refused", body)

    async def test_the_session_cookie_is_httponly_samesite_lax_and_hashed(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        status, headers, _ = await self.form(path, action="login", username="alice@example.test",
                                             password=PASSWORD)
        self.assertEqual(status, 303)
        self.assertEqual(header(headers, "cache-control"), "no-store")
        found = cookie(headers, "mc_session")
        assert found is not None
        line = found[1].lower()
        self.assertIn("httponly", line)
        self.assertIn("samesite=lax", line)
        self.assertNotIn("secure", line)  # plain HTTP here; Secure under TLS
        sessions = await self.web.core.identity.list_credentials(self.alice.id, "page")
        self.assertEqual([s.scopes for s in sessions], [("pages",)])

    async def test_under_tls_the_session_is_a_host_cookie_a_sibling_cannot_plant(
        self
    ) -> None:
        tls = "https://127.0.0.1"
        path = path_of(authorize_uri(self.client.uid))
        # Mallory's session, planted by her sibling subdomain as `mc_session; Domain=`
        # the parent (it reaches this host under that name): not a session here.
        mallory = await self.web.user("mallory")
        planted, _ = await self.web.core.identity.create_credential(
            mallory.id, "page", label="authorization page", scopes=("pages",))
        response = await new_browser(self.web).request(
            "GET", tls + path, cookies={"mc_session": planted})
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertIn(b"Log in to\ncontinue", body)
        self.assertNotIn(b"mallory", body)
        # Alice's own login over TLS sets the host cookie, which is her session.
        response = await new_browser(self.web).request("GET", tls + path)
        login_page = await response.content()
        [csrf_line] = response.headers.getRawHeaders("set-cookie")
        csrf = csrf_line.split(";", 1)[0].partition("=")[2]
        response = await new_browser(self.web).request(
            "POST", tls + path, allow_redirects=False, cookies={"__Host-mc_csrf": csrf},
            data={"csrf_token": csrf_field(login_page), "action": "login",
                  "username": "alice", "password": PASSWORD})
        self.assertEqual(response.code, 303)
        [line] = [c for c in response.headers.getRawHeaders("set-cookie")
                  if c.startswith("__Host-mc_session=")]
        attributes = [a.strip().lower() for a in line.split(";")[1:]]
        self.assertIn("secure", attributes)
        self.assertIn("path=/", attributes)
        self.assertFalse([a for a in attributes if a.startswith("domain")])
        session = line.split(";", 1)[0].partition("=")[2]
        response = await new_browser(self.web).request(
            "GET", tls + path, cookies={"__Host-mc_session": session})
        self.assertIn(b"act for you, <strong>alice</strong>", await response.content())

    async def test_a_wrong_password_is_the_login_form_again(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        status, headers, body = await self.form(path, action="login", username="alice",
                                                password="wrong")
        self.assertEqual(status, 401)
        self.assertIn(b"not right", body)
        self.assertIsNone(cookie(headers, "mc_session"))

    async def test_a_post_without_the_csrf_token_does_nothing(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        await self.log_in(path)
        status, headers, _ = await self.call("POST", path, data={"decision": "allow"})
        self.assertEqual(status, 403)
        self.assertIsNone(header(headers, "location"))
        status, _, _ = await self.call("POST", path, data={"decision": "allow",
                                                           "csrf_token": "forged"})
        self.assertEqual(status, 403)

    async def test_allow_after_the_session_ended_is_the_login_form(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        await self.log_in(path)
        status, _, page = await self.call("GET", path)
        self.assertIn(b"Allow", page)
        self.web.clock.advance(self.web.core.identity.session_ttl + 1)
        status, headers, body = await self.call(
            "POST", path, data={"csrf_token": csrf_field(page), "decision": "allow"})
        self.assertEqual(status, 200)
        self.assertIn(b"Log in", body)
        self.assertIsNone(header(headers, "location"))

    async def test_log_out_ends_the_session_everywhere(self) -> None:
        """Log out revokes the session in the store (a copy of the cookie dies with it),
        clears the cookie and the CSRF tokens, and shows the login form again."""
        path = path_of(authorize_uri(self.client.uid))
        await self.log_in(path)
        session = self.cookies["mc_session"]
        status, _, page = await self.call("GET", path)
        self.assertIn(b"Not alice?", page)
        status, headers, _ = await self.call(
            "POST", path, data={"csrf_token": csrf_field(page, "logout"), "action": "logout"})
        self.assertEqual(status, 303)
        self.assertEqual(header(headers, "location"), path)
        cleared = cookie(headers, "mc_session")
        assert cleared is not None
        self.assertEqual(cleared[0], "")
        self.assertIn("max-age=0", cleared[1].lower())
        self.assertIsNotNone(cookie(headers, "mc_csrf"))  # renewed: old tokens are dead
        [ended] = await self.web.core.identity.list_credentials(self.alice.id, "page")
        self.assertTrue(ended.revoked)
        status, _, body = await self.call("GET", path)
        self.assertIn(b"Log in", body)
        self.cookies["mc_session"] = session  # the old cookie, replayed
        status, headers, body = await self.call(
            "POST", path, data={"csrf_token": csrf_field(page), "decision": "allow"})
        self.assertNotEqual(status, 302)
        self.assertIsNone(header(headers, "location"))

    async def test_back_to_the_page_is_a_path_not_another_host(self) -> None:
        # `//oauth/...` reaches the pages too; a Location of `//oauth/...` would be the
        # host "oauth" (a network-path reference), not this page.
        for path in ("//oauth/applications", "///oauth/authorize?" + path_of(
                authorize_uri(self.client.uid)).partition("?")[2]):
            self.cookies.clear()
            for action in ("login", "logout"):
                fields = {"username": "alice", "password": PASSWORD} if action == "login" \
                    else {}
                status, headers, _ = await self.form(path, action=action, **fields)
                self.assertEqual(status, 303, (path, action))
                self.assertEqual(header(headers, "location"), "/" + path.lstrip("/"))

    async def test_log_out_needs_its_csrf_token(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        await self.log_in(path)
        status, _, page = await self.call("GET", path)
        status, _, _ = await self.call(
            "POST", path, data={"csrf_token": csrf_field(page), "action": "logout"})
        self.assertEqual(status, 403)  # the consent form's token is not the logout form's
        [live] = await self.web.core.identity.list_credentials(self.alice.id, "page")
        self.assertFalse(live.revoked)

    async def test_unknown_client_or_unregistered_redirect_is_a_page_not_a_redirect(
        self,
    ) -> None:
        for uri in (authorize_uri("0" * 64),
                    authorize_uri(self.client.uid, redirect_uri="https://evil.example/cb"),
                    authorize_uri(self.client.uid, redirect_uri=REDIRECT + "/x")):
            status, headers, body = await self.call("GET", path_of(uri))
            self.assertEqual(status, 400, uri)
            self.assertIsNone(header(headers, "location"))
            self.assertIn(b"Authorization refused", body)

    async def test_a_bad_scope_is_told_to_the_client_by_redirect(self) -> None:
        status, headers, _ = await self.call(
            "GET", path_of(authorize_uri(self.client.uid, scope="admin", state="z")))
        self.assertEqual(status, 302)
        query = query_of(header(headers, "location") or "")
        self.assertEqual((query["error"], query["state"]), ("invalid_scope", "z"))

    async def test_the_app_name_is_escaped(self) -> None:
        app, _ = await self.web.core.oauth.add_app(self.alice.id, "<script>x</script>",
                                                   [REDIRECT])
        status, _, body = await self.call("GET", path_of(authorize_uri(app.uid)))
        self.assertEqual(status, 200)
        self.assertNotIn(b"<script>x", body)
        self.assertIn(b"&lt;script&gt;x", body)

    async def test_the_app_name_is_shown_without_bidirectional_controls(self) -> None:
        # An app's name is written by its owner and read by another user: a right-to-left
        # override in it would reverse it and the consent page's words after it.
        app, secret = await self.web.core.oauth.add_app(
            self.alice.id, "Backup \u202epukcab", [REDIRECT])
        self.web.secrets.append(secret)
        path = path_of(authorize_uri(app.uid))
        _, _, login_page = await self.call("GET", path)
        await self.log_in(path)
        _, _, consent_page = await self.call("GET", path)
        for body in (login_page, consent_page):
            self.assertNotIn("\u202e".encode(), body)
            self.assertIn(b"<strong>Backup pukcab</strong>", body)
        self.assertIn(b"<title>Authorize Backup pukcab", consent_page)

    async def test_an_idn_redirect_uri_is_named_in_a_labels_in_the_csp(self) -> None:
        uri = "https://bücher.example/cb"
        app, _ = await self.web.core.oauth.add_app(self.alice.id, "Shop", [uri])
        path = path_of(authorize_uri(app.uid, redirect_uri=uri))
        await self.log_in(path)
        status, headers, body = await self.call("GET", path)
        self.assertEqual(status, 200, body)
        csp = header(headers, "content-security-policy") or ""
        self.assertIn("form-action 'self' https://xn--bcher-kva.example;", csp)
        status, headers, _ = await self.form(path, decision="allow")
        self.assertEqual(status, 302)
        self.assertTrue((header(headers, "location") or "").startswith(
            "https://xn--bcher-kva.example/cb?code="))

    async def test_csrf_cookie_is_set_with_the_login_form(self) -> None:
        status, headers, _ = await self.web.call("GET", path_of(authorize_uri(self.client.uid)))
        self.assertEqual(status, 200)
        self.assertIsNotNone(csrf_cookie(headers))


class CsrfBindingTests(PageClient):
    """A form's CSRF token is bound to the browser's session and to the form: a cookie and
    token pair minted elsewhere (and planted in the victim's browser) does nothing."""

    async def victim_session(self, path: str) -> str:
        await self.log_in(path)
        return self.cookies["mc_session"]

    async def test_an_attackers_cookie_and_token_do_not_approve_for_the_victims_session(
        self
    ) -> None:
        path = path_of(authorize_uri(self.client.uid, state="x"))
        # Mallory's own browser (a client of its own, its own cookies): the login form of
        # the same page, then her own consent page.
        mallory = Web(self.web.core, self.web.clock, self.web.root, StubTreq(self.web.root))
        await self.web.user("mallory")
        _, headers, login_page = await mallory.call("GET", path)
        planted = csrf_cookie(headers)
        assert planted is not None
        status, headers, _ = await mallory.call(
            "POST", path, cookies={"mc_csrf": planted}, allow_redirects=False, data={
                "csrf_token": csrf_field(login_page), "action": "login",
                "username": "mallory", "password": PASSWORD})
        self.assertEqual(status, 303)
        mallory_cookies = {"mc_csrf": planted}
        mallory_cookies.update((name, found[0]) for name in ("mc_csrf", "mc_session")
                               if (found := cookie(headers, name)))
        _, _, consent_page = await mallory.call("GET", path, cookies=mallory_cookies)
        self.assertIn(b"Allow", consent_page)
        pairs = [(planted, csrf_field(login_page)),
                 (mallory_cookies["mc_csrf"], csrf_field(consent_page))]
        session = await self.victim_session(path)
        for cookie_value, token in pairs:
            status, headers, _ = await self.web.call(
                "POST", path, allow_redirects=False,
                cookies={"mc_session": session, "mc_csrf": cookie_value},
                data={"csrf_token": token, "decision": "allow"})
            self.assertEqual(status, 403)
            self.assertIsNone(header(headers, "location"))
        # Alice's own form still works.
        status, headers, _ = await self.form(path, decision="allow")
        self.assertEqual(status, 302)

    async def test_a_login_renews_the_csrf_cookie(self) -> None:
        path = path_of(authorize_uri(self.client.uid))
        _, _, login_page = await self.call("GET", path)
        before = self.cookies["mc_csrf"]
        status, headers, _ = await self.call("POST", path, data={
            "csrf_token": csrf_field(login_page), "action": "login", "username": "alice",
            "password": PASSWORD})
        self.assertEqual(status, 303)
        after = cookie(headers, "mc_csrf")
        assert after is not None
        self.assertNotEqual(after[0], before)
        # The login form's token (of the old cookie, without a session) no longer passes.
        status, _, _ = await self.call("POST", path, data={
            "csrf_token": csrf_field(login_page), "action": "login", "username": "alice",
            "password": PASSWORD})
        self.assertEqual(status, 403)

    async def test_a_token_is_good_for_its_own_form_only(self) -> None:
        await self.form("/oauth/applications", action="login", username="alice",
                        password=PASSWORD)
        await self.web.core.oauth.add_app(self.alice.id, "Mine", [REDIRECT])
        _, _, page = await self.call("GET", "/oauth/applications")
        [mine] = await self.web.core.oauth.list_apps(self.alice.id)
        status, _, _ = await self.call("POST", "/oauth/applications", data={
            "csrf_token": csrf_field(page, "register"), "action": "delete", "uid": mine.uid})
        self.assertEqual(status, 403)
        self.assertEqual(len(await self.web.core.oauth.list_apps(self.alice.id)), 1)
        # The consent page's token does not log in either (nor a login token allow).
        path = path_of(authorize_uri(self.client.uid))
        _, _, consent_page = await self.call("GET", path)
        status, _, _ = await self.call("POST", path, data={
            "csrf_token": csrf_field(consent_page), "action": "login", "username": "alice",
            "password": PASSWORD})
        self.assertEqual(status, 403)


class ApplicationsPageTests(PageClient):
    """The Applications page (/oauth/applications): a logged-in user's own apps."""

    async def enter(self) -> bytes:
        status, _, body = await self.form("/oauth/applications", action="login",
                                          username="alice", password=PASSWORD)
        self.assertEqual(status, 303)
        status, _, body = await self.call("GET", "/oauth/applications")
        self.assertEqual(status, 200)
        return bytes(body)

    async def test_register_shows_the_secret_once_then_delete(self) -> None:
        status, _, body = await self.call("GET", "/oauth/applications")
        self.assertIn(b"Log in to manage your applications", body)
        page = await self.enter()
        self.assertIn(b"No applications yet.", page)
        status, _, body = await self.call("POST", "/oauth/applications", data={
            "csrf_token": csrf_field(page, "register"), "action": "register",
            "name": "My <b>app</b>",
            "redirect_uris": "https://mine.example/cb\r\nhttp://localhost:9/cb"})
        self.assertEqual(status, 200, body)
        self.assertIn(b"My &lt;b&gt;app&lt;/b&gt;", body)
        [app] = await self.web.core.oauth.list_apps(self.alice.id)
        self.assertEqual(app.redirect_uris, ("https://mine.example/cb", "http://localhost:9/cb"))
        secret = re.search(rb"<dt>secret</dt><dd><code>([0-9a-f]{64})</code>", body)
        assert secret is not None
        status, _, again = await self.call("GET", "/oauth/applications")
        self.assertIn(app.uid.encode(), again)
        self.assertNotIn(secret.group(1), again)
        status, _, body = await self.call("POST", "/oauth/applications", data={
            "csrf_token": csrf_field(again, "delete"), "action": "delete", "uid": app.uid})
        self.assertEqual(status, 200)
        self.assertEqual(await self.web.core.oauth.list_apps(self.alice.id), [])

    async def test_one_app_past_the_cap_is_said_and_not_registered(self) -> None:
        # [oauth] max_apps_per_user (20 by default): before, a user could register apps
        # without end, each holding the codes and tokens of its grants.
        self.assertEqual(self.web.core.oauth.settings.max_apps_per_user, 20)
        self.web.core.oauth.settings = OAuthSettings(max_apps_per_user=2)
        page = await self.enter()
        for n in range(3):
            status, _, page = await self.call("POST", "/oauth/applications", data={
                "csrf_token": csrf_field(page, "register"), "action": "register",
                "name": f"app {n}", "redirect_uris": "https://mine.example/cb"})
            self.assertEqual(status, 400 if n == 2 else 200, page)
        self.assertIn(b"a user may have at most 2 OAuth apps: delete one first", page)
        self.assertEqual([a.name for a in await self.web.core.oauth.list_apps(self.alice.id)],
                         ["app 0", "app 1"])
        # Another user's apps are their own count: bob owns setUp's client and one more.
        bob = (await self.web.core.oauth.get_app(self.client.uid)).owner_id  # type: ignore[union-attr]
        await self.web.core.oauth.add_app(bob, "bob's", ["https://b.example/cb"])

    async def test_log_out_from_the_applications_page(self) -> None:
        await self.log_in("/oauth/applications")
        status, headers, _ = await self.form("/oauth/applications", action="logout")
        self.assertEqual((status, header(headers, "location")), (303, "/oauth/applications"))
        status, _, body = await self.call("GET", "/oauth/applications")
        self.assertIn(b"Log in", body)
        [ended] = await self.web.core.identity.list_credentials(self.alice.id, "page")
        self.assertTrue(ended.revoked)

    async def test_another_users_app_cannot_be_deleted(self) -> None:
        await self.web.core.oauth.add_app(self.alice.id, "Mine", [REDIRECT])
        page = await self.enter()  # a Delete button (alice's own app) to take a token from
        status, _, _ = await self.call("POST", "/oauth/applications", data={
            "csrf_token": csrf_field(page, "delete"), "action": "delete",
            "uid": self.client.uid})
        self.assertEqual(status, 404)  # the client of setUp belongs to bob
        self.assertIsNotNone(await self.web.core.oauth.get_app(self.client.uid))

    async def test_a_bad_redirect_uri_is_said_and_nothing_registered(self) -> None:
        page = await self.enter()
        status, _, body = await self.call("POST", "/oauth/applications", data={
            "csrf_token": csrf_field(page, "register"), "action": "register", "name": "x",
            "redirect_uris": "javascript:alert(1)"})
        self.assertEqual(status, 400)
        self.assertIn(b"absolute http", body)
        self.assertEqual(await self.web.core.oauth.list_apps(self.alice.id), [])

    async def test_posts_need_the_csrf_token(self) -> None:
        await self.enter()
        status, _, _ = await self.call("POST", "/oauth/applications", data={
            "action": "register", "name": "x", "redirect_uris": "https://x.example/cb"})
        self.assertEqual(status, 403)
        self.assertEqual(await self.web.core.oauth.list_apps(self.alice.id), [])


class AuthorizedPageTests(PageClient):
    """The Authorized applications page (/oauth/authorized_applications): the apps a
    logged-in user let in, each with Revoke. Before, only the CLI could end a grant."""

    PATH = "/oauth/authorized_applications"

    async def enter(self) -> bytes:
        status, _, _ = await self.form(self.PATH, action="login", username="alice",
                                       password=PASSWORD)
        self.assertEqual(status, 303)
        status, headers, body = await self.call("GET", self.PATH)
        self.assertEqual(status, 200)
        self.assertEqual(header(headers, "x-frame-options"), "DENY")
        self.assertIn("frame-ancestors 'none'", header(headers, "content-security-policy"))
        return bytes(body)

    async def live(self, token: dict[str, Any]) -> bool:
        return await self.web.core.oauth.resolve(token["access_token"]) is not None

    async def test_lists_the_apps_let_in_and_revokes_one(self) -> None:
        status, _, body = await self.call("GET", self.PATH)
        self.assertIn(b"Log in", body)
        token = await self.client.token(scope="read email")
        mine = await register(self.web, self.alice)
        kept = await mine.token()
        page = await self.enter()
        self.assertEqual(page.count(b"Revoke Test client"), 2)
        self.assertIn(b"<td>read, email</td>", page)
        self.assertIn(b"<td>bob</td>", page)  # who registered it
        status, _, body = await self.call("POST", self.PATH, data={
            "csrf_token": csrf_field(page, "revoke"), "action": "revoke",
            "uid": self.client.uid})
        self.assertEqual(status, 200, body)
        self.assertIn(b"Revoked the access of <strong>Test client</strong>", body)
        self.assertFalse(await self.live(token))
        self.assertTrue(await self.live(kept))
        self.assertEqual([g.app.uid for g in await self.web.core.oauth.grants(self.alice.id)],
                         [mine.uid])
        self.assertEqual(body.count(b"Revoke Test client"), 1)

    async def test_revoke_needs_the_csrf_token(self) -> None:
        token = await self.client.token()
        await self.enter()
        status, _, _ = await self.call("POST", self.PATH, data={
            "action": "revoke", "uid": self.client.uid})
        self.assertEqual(status, 403)
        self.assertTrue(await self.live(token))

    async def test_an_app_not_let_in_is_404_and_anothers_grant_stays(self) -> None:
        await self.client.token()
        carol = await self.web.user("carol")
        theirs = await register(self.web, carol)  # carol's own app, carol's grant
        their_token = await theirs.token()
        page = await self.enter()
        status, _, body = await self.call("POST", self.PATH, data={
            "csrf_token": csrf_field(page, "revoke"), "action": "revoke",
            "uid": theirs.uid})
        self.assertEqual(status, 404)
        self.assertIn(b"That application has no access.", body)
        self.assertTrue(await self.live(their_token))

    async def test_log_out(self) -> None:
        await self.enter()
        status, headers, _ = await self.form(self.PATH, action="logout")
        self.assertEqual((status, header(headers, "location")), (303, self.PATH))
        status, _, body = await self.call("GET", self.PATH)
        self.assertIn(b"Log in", body)


class LoginThrottleTests(TestCase):
    async def test_the_login_form_shares_the_password_login_limit(self) -> None:
        config = Config(sections={"web": {"login_rate": "2/minute"},
                                  "fetch": {"allow_loopback": True}})
        web = Web.build(config)
        alice = await web.user()
        client = await register(web, alice)
        path = path_of(authorize_uri(client.uid))
        # One guess through the IMAP2API login, one through the page: the third is refused.
        status, _, _ = await web.call("POST", "/api-token-auth/",
                                      json={"username": "alice", "password": "wrong"})
        self.assertEqual(status, 400)
        statuses = []
        for _ in range(2):
            status, headers, body = await web.call("GET", path)
            fresh = csrf_cookie(headers)  # the client keeps the cookie it got before
            cookies = {"mc_csrf": fresh} if fresh else {}
            status, headers, _ = await web.call(
                "POST", path, cookies=cookies, allow_redirects=False,
                data={"csrf_token": csrf_field(body), "action": "login", "username": "alice",
                      "password": "wrong"})
            statuses.append(status)
        self.assertEqual(statuses, [401, 429])
        self.assertIsNotNone(header(headers, "retry-after"))

"""Dropmyemail's authorization page: `GET/POST /oauth/authorize` (RFC 6749 §4.1.1).

A person sees a login form when their browser has no session (username or e-mail and
password, throttled with the other password logins), then a consent page naming the app,
its owner and the scopes, with Allow and Deny. Every form posts back to the same URL (the
authorization request) with the CSRF token of web.pages. Allow answers 302 to
`redirect_uri?code=…&state=…`, Deny to `redirect_uri?error=access_denied&state=…`. An
unknown client or a redirect_uri that is not registered exactly is an error page, never a
redirect. The rules are mailcore.oauth's; this module only translates.

`/oauth/applications` is the "Applications" page of the seed's flow: a logged-in user lists,
registers (the secret is shown once) and deletes their own apps.

`/oauth/authorized_applications` lists the apps a logged-in user has let act for them (those
holding live tokens of theirs, with the scopes) and revokes one: every token and unused
code the user gave it (OAuthProvider.revoke, as `mailcore oauth revoke` does).

Every page has a "Log out" form (action=logout): the session's credential is revoked, its
cookie cleared and the CSRF cookie renewed, and the browser is sent back to the page.

The session is a "page" credential (hashed, expiring; the session TTL) whose only scope is
"pages" (a kind of its own, so it is never a safedrop X-Auth-Token), in the HttpOnly,
SameSite=Lax cookie `mc_session`, `__Host-mc_session` under TLS (Secure, Path=/, no Domain:
a sibling domain cannot plant its own session in a visitor's browser). Every form's CSRF
token is bound to the session cookie the page was rendered for (none: the login form) and
to the form's action, and a login renews the CSRF cookie: a token made in another browser,
or before the login, does not pass.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Identity, Principal, User
from mailcore.oauth import (
    App,
    AuthorizationRedirect,
    AuthorizationRefused,
    Consent,
    OAuthError,
    OAuthProvider,
    SessionEnded,
)
from mailcore.oauth.redirects import redirect_origin
from mailcore.text import shown
from web.auth import DROPMYEMAIL_SCOPES
from web.login import PasswordLogin
from web.openapi import RouteTable
from web.pages import (
    PageApp,
    PageError,
    Pages,
    clear_cookie,
    form_body,
    get_cookie,
    host_cookie_name,
    page_replies,
    redirect,
    set_cookie,
)
from web.settings import WebSettings

# `__Host-mc_session` over TLS (session_cookie_name).
SESSION_COOKIE = "mc_session"
SESSION_SCOPE = "pages"
# oauthlib wants an absolute URI; only its path and query matter.
_BASE = "https://dropmyemail.invalid"


def _request_uri(request: IRequest) -> str:
    try:
        return _BASE + bytes(request.uri).decode("ascii")
    except UnicodeDecodeError:
        raise PageError(400, "Bad request", "The address is not valid.") from None


def session_cookie_name(request: IRequest) -> str:
    """The session cookie's name for this request: `__Host-mc_session` over TLS."""
    return host_cookie_name(request, SESSION_COOKIE)


def _this_page(request: IRequest) -> bytes:
    """The Location that sends the browser back to this page: its path and query with one
    leading slash. `//oauth/authorize` reaches this page too, and a Location of
    `//oauth/...` is a network-path reference: the browser would go to the host "oauth"."""
    return b"/" + bytes(request.uri).lstrip(b"/")


class OAuthPagesApp(PageApp):
    name = "oauth_pages"
    title = "Dropmyemail authorization page (OAuth 2 login and consent)"
    app = Klein()
    routes = RouteTable(app, "oauth_pages")

    def __init__(
        self,
        settings: WebSettings,
        *,
        pages: Pages,
        oauth: OAuthProvider,
        identity: Identity,
        login: PasswordLogin,
    ) -> None:
        super().__init__(settings, pages=pages)
        self.oauth = oauth
        self.identity = identity
        self.login = login

    async def _consent(self, request: IRequest) -> Consent | None:
        """The checked authorization request; None when the answer is a redirect (set)."""
        try:
            return await self.oauth.consent(_request_uri(request))
        except AuthorizationRefused as e:
            raise PageError(400, "Authorization refused", e.message) from None
        except AuthorizationRedirect as e:
            redirect(request, 302, e.location)
            return None

    @staticmethod
    def _csrf_bind(request: IRequest) -> str:
        """What this browser's CSRF tokens are bound to: its session cookie, if any."""
        return "session:" + (get_cookie(request, session_cookie_name(request)) or "")

    async def _session_user(self, request: IRequest) -> User | None:
        session = await self._session(request)
        return None if session is None else session.user

    async def _session(self, request: IRequest) -> Principal | None:
        secret = get_cookie(request, session_cookie_name(request))
        if secret is None:
            return None
        principal = await self.identity.resolve(secret, ("page",))
        if principal is None or principal.scopes != (SESSION_SCOPE,):
            return None
        return principal

    async def _log_out(self, request: IRequest) -> bytes:
        """End this browser's session (revoked in the store, so a copied cookie dies too),
        forget its cookie and CSRF tokens, and go back to the page: its login form."""
        session = await self._session(request)
        if session is not None and session.credential_id is not None:
            await self.identity.end_credential(session.user.id, session.credential_id)
        clear_cookie(request, session_cookie_name(request))
        self.pages.renew_csrf(request)
        return redirect(request, 303, _this_page(request))

    def _login_page(self, request: IRequest, consent: Consent | None, status: int = 200,
                    error: str = "", username: str = "") -> bytes:
        return self.pages.render(request, "oauth_login.html", status, title="Log in",
                                 csrf_bind=self._csrf_bind(request),
                                 consent=consent, error=error, username=username)

    def _consent_page(self, request: IRequest, consent: Consent, user: User) -> bytes:
        scopes = [(s, DROPMYEMAIL_SCOPES.get(s, s)) for s in consent.scopes]
        return self.pages.render(
            request, "oauth_consent.html", title=f"Authorize {shown(consent.app.name)}",
            csrf_bind=self._csrf_bind(request),
            consent=consent, user=user, scopes=scopes,
            redirect_host=urlsplit(consent.redirect_uri).netloc,
            # Browsers apply form-action to the redirect that answers the form.
            form_action=[redirect_origin(consent.redirect_uri)],
        )

    @routes.route(
        "/oauth/authorize",
        "GET",
        summary="The authorization page: log in, then allow or deny the app",
        description="Query: client_id, redirect_uri (exactly as registered), "
        "response_type=code, scope (read, write, email, attachment, contact; `+`-separated), "
        "state, code_challenge and code_challenge_method=S256 (PKCE: the challenge is the "
        "43 characters of base64url RFC 7636 makes; another, or another method, is "
        "redirected with error=invalid_request).",
        replies=page_replies({
            200: "HTML page: the login form, or the consent page",
            302: "Redirect to redirect_uri with error=… (a bad scope or response_type)",
            400: "HTML page: unknown client or unregistered redirect_uri (no redirect)",
        }),
    )
    async def show(self, request: IRequest) -> bytes:
        consent = await self._consent(request)
        if consent is None:
            return b""
        user = await self._session_user(request)
        if user is None:
            return self._login_page(request, consent)
        return self._consent_page(request, consent, user)

    @routes.route(
        "/oauth/authorize",
        "POST",
        summary="Log in, or allow or deny the app (the forms of the authorization page)",
        body=form_body({
            "action": {"type": "string", "enum": ["login", "logout"]},
            "username": {"type": "string"},
            "password": {"type": "string"},
            "decision": {"type": "string", "enum": ["allow", "deny"]},
        }),
        body_types=("application/x-www-form-urlencoded",),
        replies=page_replies({
            200: "HTML page: the consent page (after a login) or the login form",
            302: "Redirect to redirect_uri with code and state (Allow) or "
            "error=access_denied (Deny)",
            303: "Logged in or out: back to the authorization page",
            400: "HTML page: unknown client or unregistered redirect_uri, also when the app "
            "was deleted or its redirect URIs changed since the page was shown (no redirect)",
            401: "HTML page: the login form, saying the password was wrong",
            429: "HTML page: too many login attempts",
        }, form=True),
    )
    async def decide(self, request: IRequest) -> bytes:
        fields = self.pages.form(request)
        action = fields.get("action")
        self.pages.check_csrf(
            request, fields, purpose=action if action in ("login", "logout") else "consent",
            bind=self._csrf_bind(request))
        consent = await self._consent(request)
        if consent is None:
            return b""
        if action == "login":
            return await self._log_in(request, consent, fields)
        if action == "logout":
            return await self._log_out(request)
        session = await self._session(request)
        if session is None:
            return self._login_page(request, consent)
        decision = fields.get("decision")
        if decision not in ("allow", "deny"):
            raise PageError(400, "Bad request", "Choose Allow or Deny.")
        try:
            location = await self.oauth.decide(
                _request_uri(request), session.user.id, allow=decision == "allow",
                session_id=session.credential_id,
            )
        except SessionEnded:
            # Ended meanwhile (a password change, a logout elsewhere): log in again.
            return self._login_page(request, consent)
        except AuthorizationRefused as e:
            # The app was removed, or its redirect URIs changed, since the check above.
            raise PageError(400, "Authorization refused", e.message) from None
        except AuthorizationRedirect as e:
            return redirect(request, 302, e.location)
        return redirect(request, 302, location)

    async def _log_in(self, request: IRequest, consent: Consent | None,
                      fields: dict[str, object]
                      ) -> bytes:
        username, password = fields.get("username"), fields.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            return self._login_page(request, consent, 400, "Enter your username and password.")
        user = await self.login.check(request, username, password)
        secret = await self.login.issue(
            user, "page", label="authorization page", scopes=(SESSION_SCOPE,)
        ) if user else None
        if secret is None:
            return self._login_page(request, consent, 401,
                                    "That username or password is not right.", username)
        set_cookie(request, session_cookie_name(request), secret)
        self.pages.renew_csrf(request)
        return redirect(request, 303, _this_page(request))

    # -- the pages of a logged-in user's apps --------------------------------------------

    async def _user_form(self, request: IRequest) -> tuple[dict[str, Any], User] | bytes:
        """A form posted to the Applications or Authorized applications page, its CSRF
        token checked for its action: its fields and the session's user, or the reply
        itself when it logged in or out, or when there is no session (the login form)."""
        fields = self.pages.form(request)
        action = fields.get("action")
        self.pages.check_csrf(request, fields, purpose=str(action),
                              bind=self._csrf_bind(request))
        if action == "login":
            return await self._log_in(request, None, fields)
        if action == "logout":
            return await self._log_out(request)
        user = await self._session_user(request)
        if user is None:
            return self._login_page(request, None)
        return fields, user

    # -- the Applications page ----------------------------------------------------------

    async def _apps_page(self, request: IRequest, user: User, status: int = 200, *,
                         error: str = "", created: App | None = None, secret: str = ""
                         ) -> bytes:
        apps = await self.oauth.list_apps(user.id)
        return self.pages.render(request, "oauth_apps.html", status, title="Applications",
                                 csrf_bind=self._csrf_bind(request),
                                 user=user, apps=apps, error=error, created=created,
                                 secret=secret)

    @routes.route(
        "/oauth/applications",
        "GET",
        summary="The Applications page: a logged-in user's OAuth 2 apps",
        replies=page_replies({200: "HTML page: the login form, or the user's apps and a "
                                   "form to register one"}),
    )
    async def applications(self, request: IRequest) -> bytes:
        user = await self._session_user(request)
        if user is None:
            return self._login_page(request, None)
        return await self._apps_page(request, user)

    @routes.route(
        "/oauth/applications",
        "POST",
        summary="Log in or out, register an app (its secret is shown once) or delete one",
        body=form_body({
            "action": {"type": "string", "enum": ["login", "logout", "register", "delete"]},
            "username": {"type": "string"}, "password": {"type": "string"},
            "name": {"type": "string"}, "redirect_uris": {"type": "string"},
            "uid": {"type": "string"},
        }),
        body_types=("application/x-www-form-urlencoded",),
        replies=page_replies({
            200: "HTML page: the apps (with a new app's uid and secret, once)",
            303: "Logged in or out: back to the Applications page",
            401: "HTML page: the login form, saying the password was wrong",
            429: "HTML page: too many login attempts",
        }, form=True),
    )
    async def change_applications(self, request: IRequest) -> bytes:
        form = await self._user_form(request)
        if isinstance(form, bytes):
            return form
        fields, user = form
        action = fields.get("action")
        if action == "register":
            name, uris = fields.get("name"), fields.get("redirect_uris")
            if not isinstance(name, str) or not isinstance(uris, str):
                return await self._apps_page(request, user, 400,
                                             error="Give a name and redirect URIs.")
            try:
                app, secret = await self.oauth.add_app(
                    user.id, name, [u.strip() for u in uris.splitlines() if u.strip()])
            except OAuthError as e:
                return await self._apps_page(request, user, 400, error=e.message)
            return await self._apps_page(request, user, created=app, secret=secret)
        if action == "delete":
            uid = fields.get("uid")
            try:
                await self.oauth.remove_app(str(uid or ""), owner_id=user.id)
            except OAuthError:
                return await self._apps_page(request, user, 404, error="No such app.")
            return await self._apps_page(request, user)
        raise PageError(400, "Bad request", "Unknown action.")

    # -- the Authorized applications page -----------------------------------------------

    async def _authorized_page(self, request: IRequest, user: User, status: int = 200, *,
                               error: str = "", revoked: str = "") -> bytes:
        grants = await self.oauth.grants(user.id)
        return self.pages.render(request, "oauth_authorized.html", status,
                                 title="Authorized applications",
                                 csrf_bind=self._csrf_bind(request),
                                 user=user, grants=grants, error=error, revoked=revoked)

    @routes.route(
        "/oauth/authorized_applications",
        "GET",
        summary="The apps a logged-in user has authorized, each with a Revoke button",
        replies=page_replies({200: "HTML page: the login form, or the apps holding live "
                                   "tokens of the user, with their scopes"}),
    )
    async def authorized(self, request: IRequest) -> bytes:
        user = await self._session_user(request)
        if user is None:
            return self._login_page(request, None)
        return await self._authorized_page(request, user)

    @routes.route(
        "/oauth/authorized_applications",
        "POST",
        summary="Log in or out, or revoke an app's access (every token and unused code "
        "the user gave it)",
        body=form_body({
            "action": {"type": "string", "enum": ["login", "logout", "revoke"]},
            "username": {"type": "string"}, "password": {"type": "string"},
            "uid": {"type": "string"},
        }),
        body_types=("application/x-www-form-urlencoded",),
        replies=page_replies({
            200: "HTML page: the apps left, saying which was revoked",
            303: "Logged in or out: back to the page",
            401: "HTML page: the login form, saying the password was wrong",
            404: "HTML page: the apps, saying that one is not among them",
            429: "HTML page: too many login attempts",
        }, form=True),
    )
    async def change_authorized(self, request: IRequest) -> bytes:
        form = await self._user_form(request)
        if isinstance(form, bytes):
            return form
        fields, user = form
        if fields.get("action") != "revoke":
            raise PageError(400, "Bad request", "Unknown action.")
        uid = fields.get("uid")
        granted = {g.app.uid: g.app for g in await self.oauth.grants(user.id)}
        app = granted.get(uid) if isinstance(uid, str) else None
        if app is None:
            # Not one of the user's grants (revoked meanwhile, or another's app): nothing
            # is said of it.
            return await self._authorized_page(request, user, 404,
                                               error="That application has no access.")
        try:
            await self.oauth.revoke(user.id, app.uid)
        except OAuthError:  # the app was deleted meanwhile, with its tokens
            pass
        return await self._authorized_page(request, user, revoked=app.name)

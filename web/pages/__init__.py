"""Server-rendered pages a person uses: quarantine release, OAuth consent, drop download.

Every page is a Jinja2 template under `web/pages/templates/` (autoescaped: a value is text
unless a template marks it safe; `| shown` for names and subjects others wrote), extending
`base.html` and its one stylesheet, served at `/static/mailcore.css?v=<hash>` (cached for a
year; the hash changes with the file). Pages work without JavaScript, and none may be
framed.

- `Pages.render(request, template, status, **context)` renders a page and sets its status,
  Content-Type and the security headers (`SECURITY_HEADERS`, the CSP).
- Forms carry a CSRF token: `{{ csrf_field("purpose") }}` in a template puts a hidden field
  holding the time it was issued and an HMAC, under the key in `{data_dir}/pages.key`, of
  that time, the form's purpose (the action it performs: "login", "consent", "release"…),
  what the page binds it to (`render(csrf_bind=…)`: the login session, the drop link and its
  grant cookie, the release link) and a random cookie: `__Host-mc_csrf` over TLS (Secure,
  Path=/, no Domain, so neither a sibling domain nor a plain-HTTP reply can set it), plain
  `mc_csrf` over HTTP (local use), HttpOnly and SameSite=Lax either way; the cookie is set
  the first time a page needs it and renewed at login (`renew_csrf`).
  `Pages.check_csrf(request, fields, purpose, bind)` in a POST handler raises
  `PageError(403)` unless the request comes from one of our own pages (no foreign `Origin`,
  no cross-site or same-site `Sec-Fetch-Site`) and the form's token matches the cookie, the
  purpose and the binding and is at most a day old (`CSRF_MAX_AGE`).
  A page on another site can neither read the cookie nor make the HMAC. Someone who manages
  to plant their own cookie in a victim's browser (a site served over plain HTTP) holds a
  valid token only for what the token is bound to: not for the victim's session nor another
  link, not for another form, and not for long; pages with no session (the login form)
  rely on the `Origin`/`Sec-Fetch-Site` check there (`same_origin`: a foreign or `null`
  Origin is refused unless the browser says `Sec-Fetch-Site: same-origin`).
- A page app subclasses `PageApp`: its errors (`ApiError`, `PageError`, unknown paths, wrong
  methods, 500s) are HTML pages with the same headers. `page_replies` documents a page
  route's replies (all HTML) for the OpenAPI document.
- `set_cookie`/`get_cookie`/`clear_cookie`: cookies with safe defaults, for login sessions;
  `host_cookie_name` names a cookie for path / that only this host may set under TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import weakref
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from klein import Klein
from markupsafe import Markup
from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.iweb import IRequest

from mailcore.files import secret_key_file
from mailcore.text import shown
from web.api import ApiApp
from web.errors import ApiError, PlainErrors
from web.openapi import Reply, RouteTable
from web.parsing import read_fields
from web.settings import WebSettings

# `__Host-mc_csrf` over TLS (host_cookie_name).
CSRF_COOKIE = "mc_csrf"
CSRF_FIELD = "csrf_token"
# How long a form's token is accepted after the page was rendered.
CSRF_MAX_AGE = 24 * 3600
# A token issued this far in our future is still taken (nodes' clocks differ a little).
_CSRF_SKEW = 300
# A page's form is small: a larger urlencoded body is refused (413) before it is parsed.
FORM_LIMIT = 64 * 1024
KEY_FILE = "pages.key"

STYLESHEET_PATH = "/static/mailcore.css"
STYLESHEET = resources.files(__name__).joinpath("static/mailcore.css").read_bytes()
STYLESHEET_URL = f"{STYLESHEET_PATH}?v={hashlib.sha256(STYLESHEET).hexdigest()[:12]}"

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# Every page (and every page's error) carries these.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    # Our own origin with our forms' POSTs (same_origin), no Referer to any other site (the
    # links' tokens are in their paths).
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

# Titles of the error pages, by status.
_ERROR_TITLES = {
    400: "Bad request",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "Conflict",
    413: "Too large",
    415: "Bad request",
    429: "Too many requests",
    500: "Something went wrong",
    503: "Try again later",
}

CSRF_REFUSED = (
    "This form has expired or did not come from this site, so nothing was done. "
    "Go back, reload the page and try again."
)


class PageError(ApiError):
    """An error a page handler raises: the page app answers with an HTML page saying it."""

    def __init__(self, status: int, title: str, message: str, **kwargs: Any) -> None:
        super().__init__(status, message, **kwargs)
        self.title = title


def environment() -> Environment:
    """The Jinja2 environment of the page templates: autoescaped, strict about undefined
    names (a misspelt variable is an error, not an empty string)."""
    env = Environment(
        loader=PackageLoader("web.pages", "templates"),
        autoescape=select_autoescape(("html",), default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["stylesheet"] = STYLESHEET_URL
    # `{{ name | shown }}`: a name or subject someone else wrote (a spammer's subject on the
    # release page, an app's name on the consent page) as one line without bidirectional
    # controls, which would make it, and the page's text after it, read otherwise.
    env.filters["shown"] = shown
    return env


# -- headers and cookies -------------------------------------------------------------------


def set_security_headers(request: IRequest, form_action: Sequence[str] = ()) -> None:
    """The headers every page carries. `form_action` adds origins a form may post to (or be
    redirected to after posting: browsers apply form-action to redirects, so a page whose
    POST answers with a redirect to another site must name that site)."""
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    if form_action:
        extra = " ".join(form_action)
        csp = CSP.replace("form-action 'self'", f"form-action 'self' {extra}")
        request.setHeader(b"Content-Security-Policy", csp.encode("ascii"))


def redirect(request: IRequest, status: int, location: str | bytes) -> bytes:
    """A page's redirect (302, 303), with the headers every page carries: among them
    `Cache-Control: no-store` (an OAuth redirect carries a code) and the Referrer-Policy,
    which browsers apply to the request they are sent on with."""
    set_security_headers(request)
    request.setResponseCode(status)
    request.setHeader(b"Location",
                      location if isinstance(location, bytes) else location.encode("ascii"))
    return b""


def set_cookie(
    request: IRequest,
    name: str,
    value: str,
    max_age: int | None = None,
    *,
    path: str = "/",
    same_site: str = "Lax",
) -> None:
    """Set a cookie a script cannot read (HttpOnly), not sent on cross-site POSTs
    (SameSite=Lax), and Secure when the request came over TLS. `max_age` None: a session
    cookie (gone when the browser closes)."""
    # IRequest declares fewer of addCookie's arguments than twisted.web.http.Request has.
    cast(http.Request, request).addCookie(
        name.encode("ascii"),
        value.encode("ascii"),
        path=path.encode("ascii"),
        max_age=None if max_age is None else str(int(max_age)).encode("ascii"),
        secure=bool(request.isSecure()),
        httpOnly=True,
        sameSite=same_site.lower(),
    )


def get_cookie(request: IRequest, name: str) -> str | None:
    """The value of cookie `name` the client sent, or None (also when it is not ASCII)."""
    raw = request.getCookie(name.encode("ascii"))
    if raw is None:
        return None
    try:
        return bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        return None


def clear_cookie(request: IRequest, name: str, *, path: str = "/") -> None:
    """Tell the client to forget cookie `name` (logout)."""
    set_cookie(request, name, "", 0, path=path)


# -- pages ---------------------------------------------------------------------------------


class Pages:
    """Renders pages and checks their forms' CSRF tokens; one per site, shared by the page
    apps. `key` signs the CSRF tokens (keep it secret; `from_data_dir` keeps it in a file);
    `clock` dates them."""

    def __init__(self, key: bytes, clock: IReactorTime, env: Environment | None = None
                 ) -> None:
        if len(key) < 32:
            raise ValueError("the pages key must be at least 32 bytes")
        self._key = key
        self._clock = clock
        self.env = env or environment()
        # The CSRF cookie a reply sets, for the forms rendered into that same reply.
        self._issued: weakref.WeakKeyDictionary[IRequest, str] = weakref.WeakKeyDictionary()

    @classmethod
    def from_data_dir(cls, data_dir: Path, clock: IReactorTime) -> Pages:
        """Pages whose key is `{data_dir}/pages.key` (made, mode 0600, if absent). Blocks:
        call before the reactor runs."""
        return cls(secret_key_file(data_dir / KEY_FILE), clock)

    def render(
        self,
        request: IRequest,
        template: str,
        status: int = 200,
        *,
        form_action: Sequence[str] = (),
        csrf_bind: str = "",
        **context: Any,
    ) -> bytes:
        """`template` rendered with `context` (plus `csrf_field(purpose)` and `stylesheet`),
        as the reply: status, `text/html; charset=utf-8` and the security headers set. The
        forms' CSRF tokens are bound to `csrf_bind` (see `check_csrf`)."""
        tokens: dict[str, str] = {}

        def csrf_field(purpose: str) -> Markup:
            if purpose not in tokens:
                tokens[purpose] = self.csrf_token(request, purpose, csrf_bind)
            return Markup('<input type="hidden" name="{}" value="{}">').format(
                CSRF_FIELD, tokens[purpose]
            )

        body = self.env.get_template(template).render(csrf_field=csrf_field, **context)
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        set_security_headers(request, form_action)
        return body.encode("utf-8")

    def message(
        self, request: IRequest, status: int, title: str, message: str, kind: str = "notice"
    ) -> bytes:
        """A page that says one thing (`kind` "notice" or "error" picks its look)."""
        return self.render(request, "message.html", status, title=title, message=message,
                           kind=kind)

    def error_page(self, request: IRequest, error: ApiError) -> bytes:
        """The page of an error: its status, its headers (Allow, Retry-After), its words."""
        title = error.title if isinstance(error, PageError) else _ERROR_TITLES.get(
            error.status, "Error")
        for name, value in error.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return self.message(request, error.status, title, error.message, kind="error")

    # -- CSRF ------------------------------------------------------------------------------

    def _mac(self, cookie: str, purpose: str, bind: str, issued: int) -> str:
        # Each part is hashed or of a fixed alphabet, and "\n" separates them: no two
        # different tuples make the same message.
        message = "\n".join((
            "csrf-v2", cookie, purpose,
            hashlib.sha256(bind.encode("utf-8")).hexdigest(), str(issued),
        ))
        digest = hmac.new(self._key, message.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def _cookie(self, request: IRequest) -> str | None:
        """The well-formed CSRF cookie of this request (the one its reply sets, if any)."""
        cookie = self._issued.get(request)
        if cookie is None:
            cookie = get_cookie(request, csrf_cookie_name(request))
        return cookie if cookie is not None and _well_formed(cookie) else None

    def renew_csrf(self, request: IRequest) -> None:
        """Give the client a new CSRF cookie (at login and logout): the tokens of the old
        one, whoever made them, no longer pass."""
        cookie = secrets.token_urlsafe(32)
        set_cookie(request, csrf_cookie_name(request), cookie)
        self._issued[request] = cookie

    def csrf_token(self, request: IRequest, purpose: str, bind: str = "") -> str:
        """The value of the CSRF field of a form doing `purpose` for this client, bound to
        `bind`; sets the CSRF cookie when the client has none (or one we did not make)."""
        cookie = self._cookie(request)
        if cookie is None:
            self.renew_csrf(request)
            cookie = self._issued[request]
        issued = int(self._clock.seconds())
        return f"{issued}.{self._mac(cookie, purpose, bind, issued)}"

    def csrf_valid(self, request: IRequest, submitted: str | None, purpose: str,
                   bind: str = "") -> bool:
        """Whether `submitted` is a CSRF token, made at most `CSRF_MAX_AGE` ago, of this
        request's cookie for `purpose` and `bind`."""
        cookie = self._cookie(request)
        if cookie is None or not submitted or not submitted.isascii():
            return False
        issued_text, _, mac = submitted.partition(".")
        if not issued_text.isdigit() or len(issued_text) > 12:
            return False
        issued = int(issued_text)
        age = self._clock.seconds() - issued
        if not -_CSRF_SKEW <= age <= CSRF_MAX_AGE:
            return False
        return hmac.compare_digest(self._mac(cookie, purpose, bind, issued), mac)

    def check_csrf(self, request: IRequest, fields: Mapping[str, Any] | None = None, *,
                   purpose: str, bind: str = "") -> None:
        """Raise `PageError(403)` unless the request comes from our own page and the form
        carries this client's CSRF token for `purpose` and `bind` (those its page was
        rendered with). `fields`: the form's fields when the handler parsed them already,
        else the urlencoded body is read (`form`)."""
        if not same_origin(request):
            raise PageError(403, "Form expired", CSRF_REFUSED)
        if fields is None:
            fields = self.form(request)
        submitted = fields.get(CSRF_FIELD)
        if not isinstance(submitted, str) or not self.csrf_valid(request, submitted, purpose,
                                                                 bind):
            raise PageError(403, "Form expired", CSRF_REFUSED)

    def form(self, request: IRequest) -> dict[str, Any]:
        """The fields of an urlencoded form body (none when the body is empty)."""
        return read_fields(request, FORM_LIMIT, accept_json=False, accept_multipart=False)


def host_cookie_name(request: IRequest, name: str) -> str:
    """`__Host-{name}` over TLS, `name` over plain HTTP. Browsers take a `__Host-` cookie
    only from a secure reply of this very host for path / (RFC 6265bis 4.1.3.2), so neither
    a sibling domain (`Domain=` the parent) nor a forged plain-HTTP reply can plant one; a
    cookie of the plain name is not read under TLS."""
    return f"__Host-{name}" if request.isSecure() else name


def csrf_cookie_name(request: IRequest) -> str:
    """`__Host-mc_csrf` over TLS (the prefix needs Secure), `mc_csrf` over plain HTTP."""
    return host_cookie_name(request, CSRF_COOKIE)


def _well_formed(cookie: str) -> bool:
    return 20 <= len(cookie) <= 100 and all(c.isalnum() or c in "-_" for c in cookie)


def _authority(host: str, scheme: str) -> str:
    """host[:port] lower case, without the scheme's default port."""
    host = host.strip().lower()
    default = ":443" if scheme == "https" else ":80"
    return host[: -len(default)] if host.endswith(default) else host


def same_origin(request: IRequest) -> bool:
    """False when the browser says the request does not come from our own page: a
    `Sec-Fetch-Site` of cross-site or same-site (a sibling domain; our forms post
    same-origin), or an `Origin` naming another host. Our pages' `Referrer-Policy:
    same-origin` has browsers send our own origin with our forms; `Origin: null` (what a
    page with `no-referrer`, a sandboxed frame or a data: URL sends from anywhere) passes
    only with `Sec-Fetch-Site: same-origin`, which browsers send over TLS and to loopback
    but not to a plain-HTTP host name. Over TLS the origin must be https; over plain HTTP
    either scheme is ours (a TLS-terminating proxy may be in front)."""
    raw_fetch_site = request.getHeader(b"sec-fetch-site")
    fetch_site = None if raw_fetch_site is None else raw_fetch_site.strip().lower()
    if fetch_site in (b"cross-site", b"same-site"):
        return False
    raw_origin = request.getHeader(b"origin")
    if raw_origin is None:
        return True
    origin = raw_origin.decode("latin-1").strip().lower()
    if origin == "null":
        return fetch_site == b"same-origin"
    scheme, sep, host = origin.partition("://")
    if not sep or scheme not in ("http", "https") or (request.isSecure() and scheme != "https"):
        return False
    raw_host = request.getHeader(b"host")
    if raw_host is None:
        return False
    return _authority(host, scheme) == _authority(raw_host.decode("latin-1"), scheme)


# -- apps ----------------------------------------------------------------------------------

_HTML = {"type": "string"}
# The statuses any page route may answer (bad input, unknown path, wrong method, too large,
# a crash): HTML pages, not the JSON errors of the APIs.
_COMMON = {
    400: "HTML page: bad request",
    404: "HTML page: not found",
    405: "HTML page: method not allowed",
    413: "HTML page: request too large",
    500: "HTML page: internal error",
}


def html_reply(description: str) -> Reply:
    """A documented reply that is an HTML page."""
    return Reply(description, _HTML, content_type="text/html")


def page_replies(replies: Mapping[int, str], *, form: bool = False) -> dict[int, Reply]:
    """A page route's documented replies: `replies` (status: description) plus the error
    pages every page route may answer (and 403, a refused CSRF token, when `form`)."""
    every = dict(_COMMON)
    if form:
        every[403] = "HTML page: the form's CSRF token is missing or wrong"
    every.update(replies)
    return {status: html_reply(text) for status, text in sorted(every.items())}


def form_body(
    properties: Mapping[str, Any] | None = None, *, required: Sequence[str] = ()
) -> dict[str, Any]:
    """A page form's documented body: the form's `csrf_token` (always required, see
    `Pages.check_csrf`), then `properties`; `required` names those that must be given too."""
    return {
        "type": "object",
        "properties": {"csrf_token": {"type": "string"}, **(properties or {})},
        "required": ["csrf_token", *required],
    }


class PageApp(ApiApp):
    """The base of an app of pages: its errors are HTML pages, not JSON."""

    shape = PlainErrors()  # unused by replies; the OpenAPI document names it
    unsupported_media_status = 400  # a page's form is a browser's

    def __init__(self, settings: WebSettings, *, pages: Pages) -> None:
        super().__init__(settings)
        self.pages = pages

    def render_error(self, request: IRequest, error: ApiError) -> bytes:
        return self.pages.error_page(request, error)


class StaticApp(PageApp):
    """The pages' stylesheet, at a URL that changes with it (so it may be cached long)."""

    name = "static"
    title = "Stylesheet of the HTML pages"
    app = Klein()
    routes = RouteTable(app, "static")

    @routes.route(
        STYLESHEET_PATH,
        "GET",
        summary="The stylesheet of the HTML pages",
        replies={
            200: Reply("CSS", _HTML, content_type="text/css"),
            **page_replies({}),
        },
    )
    async def stylesheet(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/css; charset=utf-8")
        request.setHeader(b"Cache-Control", b"public, max-age=31536000, immutable")
        return STYLESHEET

"""The root of the HTTP tree: one listener, five seed APIs, dispatched by path prefix.

The seeds' paths collide under `/api/v1/` and `/` (API-MAP.md), so no resource tree can
separate them: the root is a leaf resource that picks the app from the table below and hands
it the request with its full path, which the app's Klein router then matches. The root also
does what every request needs whichever API serves it: a request id, the size limit (413 in
the API's shape), the access log, the metrics, and a JSON 500 if anything escapes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from mailcore.connlimits import ConnectionCounter, client_address
from mailcore.core import Core
from mailcore.identity import Principal
from mailcore.outages import DATABASE_SLOW
from mailcore.uploads import encoded_bound
from web import deadline, mailapi
from web.accesslog import AccessLog
from web.api import ApiApp
from web.auth import MAIL_API, SAFEDROP, AuthPolicy, CredentialResolver
from web.context import context_of
from web.drop_page import DropPageApp
from web.dropmyemail import DropmyemailApp
from web.errors import ApiError, outage_error, too_large
from web.forwarded import trusted
from web.imap2api import Imap2ApiApp
from web.limits import (
    BodyLimits,
    LimitedChannel,
    LimitedRequest,
    RefusedConnection,
    body_exceeds,
)
from web.login import PasswordLogin
from web.mailapi import MailApiApp
from web.meta import MetaApp
from web.metrics import HttpMetrics
from web.oauth_pages import OAuthPagesApp
from web.openapi import document
from web.pages import Pages, StaticApp
from web.parsing import coded_body, content_codings
from web.protecmail import ProtecmailApp
from web.quarantine_page import QuarantinePageApp
from web.ratelimit import Rate, RateLimiter, SharedRateLimiter
from web.safedrop import UPLOAD_OVERHEAD, UPLOAD_PATH, SafedropApp
from web.settings import WebSettings

log = Logger(namespace="mailcore.web")

# Which app serves a path: the longest matching prefix of path segments wins. A prefix
# matches itself and everything below it ("/api/v1/user" does not match "/api/v1/users").
ROUTES: tuple[tuple[str, str], ...] = (
    # Simple IMAP2API (seed 001), also under /api/v1/
    ("/api-token-auth", "imap2api"),
    ("/api/v1/api-token-auth", "imap2api"),
    ("/api/imap-servers", "imap2api"),
    ("/api/emails", "imap2api"),
    ("/api/v1/imap-servers", "imap2api"),
    ("/api/v1/emails", "imap2api"),
    ("/api/webhooks", "imap2api"),
    ("/api/v1/webhooks", "imap2api"),
    # Mail API (seed 002)
    ("/api/v1/auth", "mailapi"),
    ("/api/v1/mail", "mailapi"),
    ("/api/v1/mailboxes", "mailapi"),
    # Protecmail (seed 004)
    ("/api/v1/ping", "protecmail"),
    ("/api/v1/user", "protecmail"),
    ("/api/v1/invoices", "protecmail"),
    ("/api/v1/tanks", "protecmail"),
    ("/api/v1/tolens", "protecmail"),
    ("/api/v1/token", "protecmail"),
    ("/api/v1/domain", "protecmail"),
    ("/api/v1/domains", "protecmail"),
    ("/api/v1/domais", "protecmail"),  # seed 004's "Add a domain" example posts here
    ("/api/v1/quarantine", "protecmail"),
    # Dropmyemail (seed 000 + dropmyemail-v1.md)
    ("/oauth", "dropmyemail"),
    ("/oauth/authorize", "oauth_pages"),  # the HTML login and consent page
    ("/oauth/applications", "oauth_pages"),  # a user's apps (HTML)
    ("/oauth/authorized_applications", "oauth_pages"),  # the apps a user let in (HTML)
    ("/v1", "dropmyemail"),
    # safedrop (seed 003): the auth server at / and /auth, the API at /dropbundles
    ("/auth", "safedrop"),
    ("/dropbundles", "safedrop"),
    # the release page of quarantine digest links
    ("/quarantine", "quarantine"),
    # the pages safedrop recipients open from their notification (web.drop_page)
    ("/drop", "drop"),
    # the stylesheet of the HTML pages (web.pages)
    ("/static", "static"),
    # the service itself
    ("/metrics", "meta"),
    ("/openapi.json", "meta"),
)
# Paths served only as themselves, not as a prefix.
EXACT: tuple[tuple[str, str], ...] = (("/", "safedrop"),)
# Whose 404 an unknown path gets: the API its prefix most resembles, else plain JSON.
NOT_FOUND: tuple[tuple[str, str], ...] = (
    # Shared by three APIs, whose paths under it are all routed above (a Mail API or
    # IMAP2API path keeps its own 404): the rest answer as Protecmail, whose map promises
    # its envelope on every reply, errors included (seed 004).
    ("/api/v1", "protecmail"),
    ("/api", "imap2api"),
    ("/", "meta"),
)


def _is_utf8(segment: bytes) -> bool:
    try:
        segment.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


class Dispatcher:
    """Maps a request path to the name of the app that serves it (or that answers 404)."""

    def __init__(
        self,
        routes: Sequence[tuple[str, str]] = ROUTES,
        exact: Sequence[tuple[str, str]] = EXACT,
        not_found: Sequence[tuple[str, str]] = NOT_FOUND,
    ) -> None:
        by_length = sorted(routes, key=lambda r: len(_segments(r[0])), reverse=True)
        self._routes = [(_segments(p), name) for p, name in by_length]
        self._exact = {_segments(p): name for p, name in exact}
        fallback = sorted(not_found, key=lambda r: len(_segments(r[0])), reverse=True)
        self._not_found = [(_segments(p), name) for p, name in fallback]

    def dispatch(self, segments: Sequence[str]) -> tuple[str, bool]:
        """(app name, True) for a served prefix, or (app name, False) for its 404."""
        key = tuple(s for s in segments if s)
        if key in self._exact:
            return self._exact[key], True
        for prefix, name in self._routes:
            if key[: len(prefix)] == prefix:
                return name, True
        for prefix, name in self._not_found:
            if key[: len(prefix)] == prefix:
                return name, False
        return "meta", False


class RootResource(Resource):
    """A leaf resource in front of every app: dispatch, limits, log, metrics, last-resort 500."""

    isLeaf = True

    def __init__(
        self,
        apps: Mapping[str, ApiApp],
        *,
        settings: WebSettings,
        clock: IReactorTime,
        metrics: HttpMetrics,
        access_log: AccessLog | None = None,
        dispatcher: Dispatcher | None = None,
        body_limits: BodyLimits | None = None,
    ) -> None:
        super().__init__()
        self.apps = dict(apps)
        self.settings = settings
        # [web] json_max_body, and the larger limits of upload paths (safedrop files).
        self.body_limits = body_limits or BodyLimits(body_limit(settings))
        self.clock = clock
        self.metrics = metrics
        self.access_log = access_log or AccessLog()
        self.dispatcher = dispatcher or Dispatcher()

    def render(self, request: IRequest) -> Any:
        ctx = context_of(request)
        ctx.started = self.clock.seconds()
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        valid_path = all(_is_utf8(s) for s in request.postpath)
        name, served = self.dispatcher.dispatch(segments)
        app = self.apps[name]
        ctx.api = app.name
        request.setHeader(b"Server", b"mailcore")
        request.setHeader(b"X-Request-Id", ctx.request_id.encode("ascii"))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        if app.cache_control is not None:
            request.setHeader(b"Cache-Control", app.cache_control)
        ctx.challenge = app.challenge
        cast(server.Request, request).notifyFinish().addBoth(self._finished, request)
        try:
            if not valid_path:
                return app.error_reply(request, ApiError(400, "The path is not valid UTF-8."))
            if getattr(request, "body_refused", False):  # the upload gate's: no body read
                request.setHeader(b"Connection", b"close")
                refusal = getattr(request, "upload_refusal", None)
                if refusal is not None:  # the upload path's API refused it (upload_gate)
                    return app.error_reply(request, refusal)
            limit = self.body_limits.for_path(request.path)
            if body_exceeds(request, limit):
                request.setHeader(b"Connection", b"close")
                return app.error_reply(request, too_large(limit))
            if not served:
                return app.error_reply(request, ApiError(404, app.shape.not_found()))
            deadline.arm(request, self.clock, self.settings.reply_timeout)
            return app.render(request)
        except Exception:
            return app.handle_failure(request, Failure())

    def _finished(self, result: object, request: IRequest) -> None:
        ctx = context_of(request)
        seconds = self.clock.seconds() - ctx.started
        status = int(getattr(request, "code", 200))
        aborted = isinstance(result, Failure)
        try:
            self.metrics.observe(ctx.api, request.method.decode("latin-1", "replace"), status,
                                 seconds)
            self.access_log.record(request, ctx, status, seconds, aborted=aborted)
        except Exception:
            log.failure("could not record a finished request")


class MailcoreSite(server.Site):
    """The Site: our channel, request class and limits (web.limits); Twisted's own access
    log turned off.

    Each connection is counted against `[web] max_connections` and
    `max_connections_per_ip` when it arrives; one over a cap gets a `RefusedConnection`
    (503, Retry-After) instead of a channel. Channels are plain HTTP/1.1 `LimitedChannel`s
    (no HTTP/2: no listener offers it).
    """

    protocol = LimitedChannel  # type: ignore[assignment]

    def __init__(self, root: RootResource, settings: WebSettings, reactor: Any) -> None:
        super().__init__(
            root,
            requestFactory=LimitedRequest,
            reactor=reactor,
            timeout=settings.idle_timeout,
            parsePOSTFormSubmission=False,
        )
        self.max_body = settings.max_body
        self.max_body_for = root.body_limits.for_path
        self.upload_gate = root.body_limits.gate
        self.gate_above = root.body_limits.default
        self.settings = settings
        self.connections = ConnectionCounter(
            settings.max_connections, settings.max_connections_per_ip
        )
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        """A channel for an admitted connection, a 503 for one over a cap."""
        address = client_address(getattr(addr, "host", None))
        if trusted(address, self.settings.trusted_proxies):
            address = None  # a trusted proxy's connections count against the total only
        refusal = self.connections.admit(address)
        if refusal is not None:
            log.info("refused an HTTP connection from {client}: {reason}",
                     client=address or "-", reason=refusal)
            return RefusedConnection(refusal, self.reactor)
        channel = super().buildProtocol(addr)
        channel.header_timeout = self.settings.header_timeout
        channel.body_timeout = self.settings.body_timeout
        channel.send_timeout = self.settings.idle_timeout
        channel.on_close = partial(self.connections.release, address)
        return channel

    def startFactory(self) -> None:
        """Nothing to open: the root resource writes the access log (Twisted's would show
        query strings, tokens included, and ticks a timer every second)."""

    def stopFactory(self) -> None:
        """Nothing to close (see startFactory)."""

    def log(self, request: Any) -> None:
        """Twisted's access log is replaced by the root resource's (see AccessLog)."""


def build_apps(core: Core, settings: WebSettings) -> dict[str, ApiApp]:
    """Every app, built from the Core's services; keyed by name."""
    clock = core.clock
    identity = core.identity
    resolver = CredentialResolver(identity)
    # Password logins share one limiter, so /api-token-auth/ and /api/v1/auth/ together
    # allow a client no more guesses than either alone. A huge rate stands for "off".
    login_rate = settings.login_rate or Rate(10**9, 1)
    failures = settings.login_failure_rate
    account_failures = settings.login_account_failure_rate
    # Kept in the store: nodes sharing it allow together the guesses one node allows.
    shared = core.rate_buckets
    login = PasswordLogin(
        identity,
        SharedRateLimiter(shared, "login", settings.login_rate) if settings.login_rate
        else RateLimiter(clock, login_rate),
        failures=SharedRateLimiter(shared, "login-failures", failures) if failures else None,
        account_failures=SharedRateLimiter(shared, "login-account-failures", account_failures)
        if account_failures else None,
    )
    # Protecmail, the Mail API and safedrop share one budget of bad credentials per client
    # address: an API key opens all three, so guesses spread over them count once.
    bad_credentials = RateLimiter(clock, settings.bad_credential_rate)
    # The HTML pages' templates and CSRF key (read or made now, before the reactor runs).
    pages = Pages.from_data_dir(core.config.data_dir, clock)
    apps: list[ApiApp] = [
        Imap2ApiApp(
            settings,
            resolver=resolver,
            login=login,
            user_limiter=RateLimiter(clock, settings.imap2api_user_rate),
            anonymous_limiter=RateLimiter(clock, settings.imap2api_anonymous_rate),
            accounts=core.fetch.accounts,
            engine=core.fetch.engine,
            messages=core.messages,
            webhooks=core.webhooks,
            clock=clock,
        ),
        MailApiApp(settings, resolver=resolver, login=login, mailboxes=core.mailboxes,
                   mail=core.mail,
                   user_limiter=RateLimiter(clock, settings.mailapi_user_rate),
                   anonymous_limiter=bad_credentials,
                   require_api_key=core.mailapi_settings.require_api_key),
        ProtecmailApp(
            settings,
            resolver=resolver,
            identity=identity,
            domains=core.domains,
            plans=core.plans,
            tokens=core.tokens,
            invoices=core.invoices,
            redirects=core.redirects,
            user_limiter=RateLimiter(clock, settings.protecmail_user_rate),
            anonymous_limiter=bad_credentials,
            quarantine=core.quarantine,
        ),
        SafedropApp(settings, resolver=resolver, identity=identity, drops=core.safedrop,
                    user_limiter=RateLimiter(clock, settings.safedrop_user_rate),
                    anonymous_limiter=bad_credentials),
        QuarantinePageApp(settings, pages=pages, quarantine=core.quarantine),
        DropPageApp(settings, pages=pages, drops=core.safedrop),
        StaticApp(settings, pages=pages),
        OAuthPagesApp(settings, pages=pages, oauth=core.oauth, identity=identity, login=login),
        DropmyemailApp(
            settings,
            resolver=resolver,
            token_limiter=RateLimiter(clock, settings.dropmyemail_token_rate),
            client_limiter=RateLimiter(clock, settings.oauth_token_rate),
            client_failures=SharedRateLimiter(shared, "oauth-client-failures",
                                              settings.oauth_client_failure_rate)
            if settings.oauth_client_failure_rate else None,
            oauth=core.oauth,
            backup=core.backup,
            mail=core.backup_mail,
        ).with_jobs(core.jobs),
    ]
    meta = MetaApp(
        settings,
        registry=core.metrics,
        openapi=lambda: document(
            [*apps, meta], title="Mailcore HTTP APIs", version=_version()
        ),
    )
    return {app.name: app for app in [*apps, meta]}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailcore")
    except Exception:
        return "0"


# What an upload path asks once the credential is known good, before the body is read: the
# API's reply refusing the upload, or None to read it.
Admission = Callable[[IRequest, Principal], Awaitable[ApiError | None]]


def upload_gate(resolver: CredentialResolver,
                uploads: Sequence[tuple[re.Pattern[str], AuthPolicy, Admission | None]],
                clock: IReactorTime, timeout: float,
                ) -> Callable[[IRequest], Awaitable[bool]]:
    """Whether a request may send an upload path a body over `[web] json_max_body`: whether
    it carries a credential of the path's API (`uploads`: each path, its API's policy and its
    admission; web.limits reads no such body before it knows), and, for a body over `[web]
    max_body` (or chunked), the path's admission lets it in. A bad or missing credential is
    refused here and the API itself then answers the request (401); what the admission
    refuses is answered with its reply (`upload_refusal`, see RootResource.render).

    A body with a transforming Content-Encoding (gzip, ...) is refused here too, with the
    415 (or the API's 400) web.parsing.body_file would answer once it was read: up to
    `max_file_size` of it would be written to disk first.

    The answer comes within `timeout` seconds (`[web] reply_timeout`): past it, what the
    gate waits on (the store's credential lookup or the admission's reads: a frozen or hung
    database) is cancelled and the request is answered as web.deadline answers one, the
    API's 503 with Retry-After (DATABASE_SLOW), its body unread. (The client was held until
    `[web] body_timeout`, then got a 408.)"""

    async def may_upload(request: IRequest) -> bool:
        asked = defer.Deferred.fromCoroutine(decide(request))
        asked.addTimeout(timeout, clock)
        try:
            return await asked
        except defer.TimeoutError:
            cast(Any, request).upload_refusal = outage_error(DATABASE_SLOW)
            return False

    async def decide(request: IRequest) -> bool:
        path = request.uri.split(b"?", 1)[0].decode("latin-1")
        for pattern, policy, admission in uploads:
            if pattern.fullmatch(path):
                try:
                    principal = await resolver.optional(request, policy)
                except ApiError:
                    return False
                if principal is None:
                    return False
                codings = content_codings(request)
                if codings:  # refused once read (web.parsing.body_file): not worth reading
                    cast(Any, request).upload_refusal = coded_body(codings)
                    return False
                if admission is None or not getattr(request, "over_max_body", True):
                    return True
                refusal = await admission(request, principal)
                if refusal is not None:
                    cast(Any, request).upload_refusal = refusal
                    return False
                return True
        return False

    return may_upload


def body_limit(settings: WebSettings) -> int:
    """The largest body of a path that takes no upload: `[web] json_max_body` (a JSON,
    form or multipart body of text fields), never more than `max_body`. Only the upload
    paths (`upload_paths`) take bodies up to `max_body` and beyond."""
    return min(settings.json_max_body, settings.max_body)


def upload_paths(core: Core, apps: Mapping[str, ApiApp]
                 ) -> tuple[tuple[re.Pattern[str], int, AuthPolicy, Admission | None], ...]:
    """The paths that take bodies over [web] max_body: how large, whose credential opens
    them, and what else their API checks before such a body is read (the upload gate). How
    large counts a body's bytes, so its limit is what the largest file takes once encoded
    (mailcore.uploads.encoded_bound: a base64 part is 11/8 of its file at most) plus the
    framing: the file limits themselves count decoded bytes, as the body is parsed."""
    drops = cast(SafedropApp, apps[SafedropApp.name])
    return (
        (UPLOAD_PATH, encoded_bound(core.safedrop.settings.max_file_size) + UPLOAD_OVERHEAD,
         SAFEDROP, drops.admit_upload),
        (mailapi.UPLOAD_PATH,
         encoded_bound(core.mailapi_settings.max_message_bytes) + mailapi.UPLOAD_OVERHEAD,
         MAIL_API, None),
    )


def build_root(core: Core, settings: WebSettings | None = None) -> RootResource:
    """The root resource over every app (tests drive it through StubTreq)."""
    settings = settings or WebSettings.from_config(core.config)
    apps = build_apps(core, settings)
    uploads = upload_paths(core, apps)
    return RootResource(
        apps,
        settings=settings,
        clock=core.clock,
        metrics=HttpMetrics.for_registry(core.metrics),
        body_limits=BodyLimits(
            body_limit(settings),
            tuple((pattern, max(limit, settings.max_body)) for pattern, limit, _, _ in uploads),
            upload_gate(CredentialResolver(core.identity),
                        [(pattern, policy, admission)
                         for pattern, _, policy, admission in uploads],
                        core.clock, settings.reply_timeout),
        ),
    )


def build_site(core: Core) -> server.Site:
    """The HTTP site every listener serves (called by mailcore.service)."""
    settings = WebSettings.from_config(core.config)
    return MailcoreSite(build_root(core, settings), settings, core.clock)

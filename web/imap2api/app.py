"""The Simple IMAP2API's Klein app: its routes and their handlers.

Handlers check the caller, parse with `queries` (query strings) and `inputs` (bodies), call
the fetch, message and webhook services, and reply with `serializers`' shapes (lists as
`pages`); `schemas` documents each route in the OpenAPI document. The API itself is
described in the package's docstring.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from mailcore.fetch import Account, AccountError, AccountNotFound, Accounts, SyncEngine
from mailcore.fetch.engine import BUSY, SyncResult
from mailcore.identity import Principal
from mailcore.messages import MessageDetail, MessageNotFound, MessageQuery, MessageStore, QueryError
from mailcore.messages import Page as StorePage
from mailcore.messages.counts import StampedCache
from mailcore.webhooks import (
    Delivery,
    Webhook,
    WebhookError,
    WebhookNotFound,
    Webhooks,
    email_json,
)
from web.api import ApiApp
from web.auth import IMAP2API, CredentialResolver
from web.errors import ApiError, DrfErrors, field_error
from web.imap2api.inputs import (
    credentials_input,
    new_webhook_input,
    server_input,
    webhook_changes,
)
from web.imap2api.pages import list_page, paginate, request_base, request_path
from web.imap2api.queries import drf_query, message_query, search_terms, server_param
from web.imap2api.schemas import (
    CREDENTIALS_SCHEMA,
    DELIVERIES_QUERY,
    DELIVERY_SCHEMA,
    EMAIL_DETAIL_SCHEMA,
    EMAIL_SCHEMA,
    EMAILS_QUERY,
    FOLDERS_SCHEMA,
    PAGE_QUERY,
    SERVER_FILTER_QUERY,
    SERVER_INPUT_SCHEMA,
    SERVER_SCHEMA,
    SERVERS_QUERY,
    STATISTICS_SCHEMA,
    SYNC_SCHEMA,
    THREAD_SCHEMA,
    THREADS_QUERY,
    TOKEN_SCHEMA,
    WEBHOOK_INPUT_SCHEMA,
    WEBHOOK_SCHEMA,
    page_schema,
)
from web.imap2api.serializers import (
    delivery_json,
    email_detail_head,
    server_json,
    statistics_json,
    thread_email_json,
    webhook_json,
)
from web.jsonstream import stream_json_array
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.parsing import FORM_TYPE, MULTIPART_TYPE
from web.ratelimit import RateLimiter, admit
from web.replies import empty_reply, encoded_json_reply, set_headers
from web.settings import WebSettings

LOGIN_FAILED = "Unable to log in with provided credentials."
NOT_FOUND = "Not found."
SYNC_DONE = "Email sync completed"
NO_STORE: Mapping[str, str] = {"Cache-Control": "no-store"}
BODY_TYPES = ("application/json", FORM_TYPE, MULTIPART_TYPE)
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Accept, X-Requested-With"
CORS_EXPOSE_HEADERS = (
    "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After, X-Request-Id"
)
CORS_MAX_AGE = "86400"
# How many rendered e-mail list pages are kept (a 50-e-mail page is about 20 KB).
PAGE_BODIES = 256


def both(path: str) -> tuple[str, str]:
    """A seed path under /api/ and under /api/v1/."""
    return f"/api{path}", f"/api/v1{path}"


async def _thread_emails(details: AsyncIterable[MessageDetail]) -> AsyncGenerator[Any]:
    """Seed 001's thread items (`thread_email_json`) of details as they are read."""
    async for detail in details:
        yield thread_email_json(detail)


def _holds_each(terms: list[str], fields: tuple[str, ...]) -> bool:
    """Whether each of the (case-folded) terms is in one of `fields`, in any case."""
    folded = [f.casefold() for f in fields]
    return all(any(term in field for field in folded) for term in terms)


@contextmanager
def refusals() -> Iterator[None]:
    """Turn a service's refusal into DRF's error: 404 for what the user does not have (or
    is another user's), else 400 naming the field (`non_field_errors` when none is named)."""
    try:
        yield
    except (AccountNotFound, WebhookNotFound, MessageNotFound):
        raise ApiError(404, NOT_FOUND) from None
    except (AccountError, WebhookError) as e:
        field = e.field or "non_field_errors"
        raise ApiError(400, e.message, fields={field: [e.message]}) from None
    except QueryError as e:
        raise field_error(e.field, str(e)) from None


class _Unchanged(Exception):
    """The kept page of a request still stands (`Imap2ApiApp._page_of_messages`)."""


class Imap2ApiApp(ApiApp):
    name = "imap2api"
    challenge = "Token"
    title = "Simple IMAP2API (seed 001): IMAP accounts, emails and threads; Token auth"
    shape = DrfErrors()
    app = Klein()
    # DRF's parsers answer a body of another type 415 {"detail": "Unsupported media type
    # \"text/plain\" in request."}.
    routes = RouteTable(app, "imap2api", body_errors=(415,))

    def __init__(
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        login: PasswordLogin,
        user_limiter: RateLimiter,
        anonymous_limiter: RateLimiter,
        accounts: Accounts,
        engine: SyncEngine,
        messages: MessageStore,
        webhooks: Webhooks,
        clock: IReactorTime,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.login = login
        self.user_limiter = user_limiter
        self.anonymous_limiter = anonymous_limiter
        self.accounts = accounts
        self.engine = engine
        self.messages = messages
        # Rendered e-mail list pages, each kept with the change stamp it was read at: a
        # client polling its newest mail gets the same bytes while nothing changed, after
        # one short read that checks the stamp (`_page_of_messages`).
        self.page_bodies: StampedCache[bytes] = StampedCache(PAGE_BODIES)
        self.webhooks = webhooks
        self.clock = clock

    async def principal(self, request: IRequest) -> Principal:
        """The token's user, within the per-user limit; a request without a valid token
        counts against its address's anonymous limit before it gets its 401."""
        return await admit(request, self.resolver.require(request, IMAP2API),
                           users=self.user_limiter, anonymous=self.anonymous_limiter)

    async def user_id(self, request: IRequest) -> int:
        return (await self.principal(request)).user.id

    # -- CORS and OPTIONS --------------------------------------------------------------------

    def cors_origin(self, request: IRequest) -> str | None:
        """The Access-Control-Allow-Origin value for this request, or None."""
        raw = request.getHeader(b"origin")
        allowed = self.settings.cors_origins
        if raw is None or not allowed:
            return None
        origin = raw.decode("latin-1").strip()
        if "*" in allowed:
            return "*"
        return origin if origin.rstrip("/").lower() in allowed else None

    def render(self, request: IRequest) -> Any:
        origin = self.cors_origin(request)
        if origin is not None:
            set_headers(request, {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
            })
        if self.settings.cors_origins:
            request.setHeader(b"Vary", b"Origin")
        if request.method == b"OPTIONS":
            try:
                return self.options(request, origin)
            except ApiError as e:
                return self.error_reply(request, e)
        return super().render(request)

    def options(self, request: IRequest, origin: str | None) -> bytes:
        """OPTIONS, preflight or not: the methods of the path; no credential needed."""
        path = request.path.decode("utf-8", "replace")
        adapter = self.app.url_map.bind("localhost")
        methods = set(adapter.allowed_methods(path)) or set(
            adapter.allowed_methods(path.rstrip("/") + "/")
        )
        if not methods:
            raise ApiError(404, self.shape.not_found())
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        headers = {"Allow": allow}
        preflight = request.getHeader(b"access-control-request-method") is not None
        if preflight and origin is not None:
            headers.update({
                "Access-Control-Allow-Methods": allow,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            })
        body = {
            "name": self.title,
            "renders": ["application/json"],
            "parses": list(BODY_TYPES),
        }
        return self.reply(request, body, headers=headers)

    # -- token -------------------------------------------------------------------------------

    @routes.route(
        ("/api-token-auth/", "/api/v1/api-token-auth/"),
        "POST",
        summary="Obtain a token from a username and password",
        body=CREDENTIALS_SCHEMA,
        body_types=BODY_TYPES,
        replies={200: Reply("A new token for `Authorization: Token <token>`", TOKEN_SCHEMA)},
        errors=(400, 429),
    )
    async def obtain_token(self, request: IRequest) -> bytes:
        """Each call creates a new token (only digests are stored, so an existing token
        cannot be shown again); a user keeps `login_tokens_per_user` (100): a login past
        them ends the one unused the longest, so a token in use outlives the logins of a
        script that logs in for every run. They never expire unless the operator sets
        `login_token_ttl` or `login_token_idle`.
        A password change ends them. Limited per client address like every password
        login."""
        username, password = credentials_input(self.fields(request))
        user = await self.login.check(request, username, password)
        token = await self.login.issue_token(user, "api-token-auth") if user else None
        if token is None:
            raise ApiError(400, LOGIN_FAILED, fields={"non_field_errors": [LOGIN_FAILED]})
        return self.reply(request, {"token": token}, headers=NO_STORE)

    # -- IMAP servers ------------------------------------------------------------------------

    async def _account(self, user_id: int, server_id: int) -> Account:
        """The user's IMAP account, or 404 (another user's, or a POP3 account)."""
        with refusals():
            account = await self.accounts.get(user_id, server_id)
        if account.protocol != "imap":
            raise ApiError(404, NOT_FOUND)
        return account

    @routes.route(
        both("/imap-servers/"),
        "GET",
        summary="List IMAP servers",
        auth=IMAP2API,
        query=SERVERS_QUERY,
        replies={200: Reply("A page of IMAP servers", page_schema(SERVER_SCHEMA))},
        errors=(429,),
    )
    async def list_servers(self, request: IRequest) -> bytes:
        """`q` keeps the servers whose name, host or username holds each of its words
        (any case), as the seed's service searches them (DRF's SearchFilter)."""
        user_id = await self.user_id(request)
        params = drf_query(request)
        terms = [t.casefold() for t in search_terms(params)]
        found = [a for a in await self.accounts.list_accounts(user_id, protocol="imap")
                 if _holds_each(terms, (a.name, a.host, a.username))]
        return self.reply(request,
                          await paginate(request, list_page(found), server_json, params))

    @routes.route(
        both("/imap-servers/"),
        "POST",
        summary="Create an IMAP server",
        auth=IMAP2API,
        body=SERVER_INPUT_SCHEMA,
        body_types=BODY_TYPES,
        replies={201: Reply("The new IMAP server", SERVER_SCHEMA)},
        errors=(429,),
    )
    async def create_server(self, request: IRequest) -> bytes:
        user_id = await self.user_id(request)
        values = server_input(self.fields(request), create=True)
        with refusals():
            account = await self.accounts.create(user_id, protocol="imap", **values)
        location = f"{request_base(request)}{request_path(request).rstrip('/')}/{account.id}/"
        return self.reply(request, server_json(account), 201, headers={"Location": location})

    @routes.route(
        both("/imap-servers/<int:server_id>/"),
        "GET",
        summary="Retrieve an IMAP server (with its sync status and progress)",
        auth=IMAP2API,
        replies={200: Reply("The IMAP server", SERVER_SCHEMA)},
        errors=(429,),
    )
    async def get_server(self, request: IRequest, server_id: int) -> bytes:
        user_id = await self.user_id(request)
        return self.reply(request, server_json(await self._account(user_id, server_id)))

    @routes.route(
        both("/imap-servers/<int:server_id>/"),
        ["PUT", "PATCH"],
        summary="Update an IMAP server (only the fields given)",
        description="A change of where or how the password is sent (`host`, `port`, "
        "`username`, `tls_ca_pem`, `tls_fingerprint`, or `use_ssl`, `start_tls` and "
        "`allow_cleartext` so that cleartext becomes possible) needs `password` in the same "
        "request, else it is a 400 on `password` and nothing changes: the stored password "
        "goes only where it was given for. A value sent as it is stored is no change.",
        auth=IMAP2API,
        body=SERVER_INPUT_SCHEMA,
        body_types=BODY_TYPES,
        replies={200: Reply("The updated IMAP server", SERVER_SCHEMA)},
        errors=(429,),
    )
    async def update_server(self, request: IRequest, server_id: int) -> bytes:
        user_id = await self.user_id(request)
        await self._account(user_id, server_id)
        values = server_input(self.fields(request), create=False)
        with refusals():
            account = await self.accounts.update(user_id, server_id, **values)
        return self.reply(request, server_json(account))

    @routes.route(
        both("/imap-servers/<int:server_id>/"),
        "DELETE",
        summary="Delete an IMAP server and the e-mails fetched through it",
        auth=IMAP2API,
        replies={204: Reply("Deleted")},
        errors=(429,),
    )
    async def delete_server(self, request: IRequest, server_id: int) -> bytes:
        user_id = await self.user_id(request)
        await self._account(user_id, server_id)
        with refusals():
            await self.accounts.delete(user_id, server_id)
        return empty_reply(request, 204)

    @routes.route(
        both("/imap-servers/<int:server_id>/sync/"),
        "POST",
        summary="Sync an IMAP server now",
        description="Waits for the sync (joining one already running) up to "
        "`[web] imap2api_sync_wait` seconds: 200 when it completed, 502 when it failed, 202 "
        "while it still runs (its progress then shows in the IMAP server).",
        auth=IMAP2API,
        replies={
            200: Reply("The sync completed", SYNC_SCHEMA),
            202: Reply("The sync is still running", SYNC_SCHEMA),
        },
        errors=(429, 502, 503),
    )
    async def sync_server(self, request: IRequest, server_id: int) -> bytes:
        user_id = await self.user_id(request)
        account = await self._account(user_id, server_id)
        outcome = await self._wait(self.engine.sync(account.id),
                                   self.settings.imap2api_sync_wait)
        if outcome is None or (isinstance(outcome, SyncResult) and outcome.status == BUSY):
            # Still running here, or on another node sharing the store.
            account = await self._account(user_id, server_id)
            return self.reply(request, {
                "status": "running",
                "message": "Email sync is still running; its progress shows in the IMAP "
                "server.",
                "imap_server": server_json(account),
            }, 202, headers={"Location": request_base(request) + request_path(request).rsplit(
                "/sync", 1)[0] + "/"})
        if isinstance(outcome, Failure):
            if outcome.check(CancelledError):
                raise ApiError(503, "The sync was interrupted (the service is stopping); "
                               "try again.", extra={"status": "error"})
            message = f"Email sync failed: {outcome.getErrorMessage()}"
            raise ApiError(502, message, extra={"status": "error", "message": message})
        if not outcome.ok:
            reason = outcome.problems() or "unknown error"
            message = f"Email sync failed: {reason}"
            raise ApiError(502, message, extra={"status": "error", "message": message,
                                                "new_messages": outcome.new_messages})
        return self.reply(request, {"status": "success", "message": SYNC_DONE,
                                    "new_messages": outcome.new_messages})

    async def _wait(self, sync: Deferred[SyncResult], budget: float) -> (
            SyncResult | Failure | None):
        """The sync's result, its failure, or None once `budget` seconds have passed. The
        sync itself is never cancelled here (a client going away does not stop it)."""
        # The outcome travels in a list: a Failure given to callback() would be raised.
        waiter: Deferred[list[SyncResult | Failure | None]] = Deferred()

        def forward(outcome: SyncResult | Failure) -> None:
            if not waiter.called:
                waiter.callback([outcome])

        def expire() -> None:
            if not waiter.called:
                waiter.callback([None])

        sync.addBoth(forward)
        timer = self.clock.callLater(budget, expire)
        try:
            [outcome] = await waiter
            return outcome
        finally:
            if timer.active():
                timer.cancel()

    # -- emails ------------------------------------------------------------------------------

    async def _page_of_messages(self, request: IRequest, threads: bool) -> bytes:
        """A page of e-mails. The reply's bytes are kept with the user's change stamp the
        page was read at (when the query's rows change only with it); the same request
        (user, host and URL) is answered with them while that stamp stands, which the
        store checks in one short read instead of reading and writing the page again."""
        user_id = await self.user_id(request)
        params = drf_query(request)
        query = message_query(params)
        if threads:
            query = MessageQuery(**{**query.__dict__, "threads_only": True})
        key = (user_id, threads, request_base(request), request.uri)
        kept = self.page_bodies.peek(key)
        stamps: list[int | None] = []

        async def fetch(offset: int, limit: int) -> StorePage[Any]:
            window = MessageQuery(**{**query.__dict__, "offset": offset, "limit": limit})
            unless = kept[0] if kept is not None and not stamps else None
            with refusals():
                page = await self.messages.list_messages(user_id, window, unless, as_json=True)
            if page.unchanged:
                raise _Unchanged()
            stamps.append(page.stamp)
            return page

        try:
            body = self.reply(request, await paginate(request, fetch, email_json, params))
        except _Unchanged:
            assert kept is not None
            return encoded_json_reply(request, kept[1])
        read_at = set(stamps)  # one stamp for every read the page took
        if len(read_at) == 1 and (stamp := read_at.pop()) is not None:
            self.page_bodies.put(key, stamp, body)
        return body

    @routes.route(
        both("/emails/"),
        "GET",
        summary="List emails (search, filters, ordering, threaded view)",
        auth=IMAP2API,
        query=EMAILS_QUERY,
        replies={200: Reply("A page of emails", page_schema(EMAIL_SCHEMA))},
        errors=(400, 429),
    )
    async def list_emails(self, request: IRequest) -> bytes:
        """`q` finds every word (as a prefix) in subject, sender, recipient or body;
        `thread=true` shows one e-mail per thread, the first (oldest) matching one, as the
        seed's thread list does."""
        return await self._page_of_messages(request, threads=False)

    @routes.route(
        both("/emails/threads/"),
        "GET",
        summary="List email threads (one row per thread, its first email)",
        auth=IMAP2API,
        query=THREADS_QUERY,
        replies={200: Reply("A page of threads", page_schema(EMAIL_SCHEMA))},
        errors=(400, 429),
    )
    async def list_threads(self, request: IRequest) -> bytes:
        return await self._page_of_messages(request, threads=True)

    @routes.route(
        both("/emails/folders/"),
        "GET",
        summary="List the folders that hold emails",
        auth=IMAP2API,
        query=SERVER_FILTER_QUERY,
        replies={200: Reply("Folder names", FOLDERS_SCHEMA)},
        errors=(400, 429),
    )
    async def list_folders(self, request: IRequest) -> bytes:
        user_id = await self.user_id(request)
        names = await self.messages.folder_names(user_id, server_param(request),
                                                 without_pop=True)
        return self.reply(request, names)

    @routes.route(
        both("/emails/statistics/"),
        "GET",
        summary="Email statistics: totals and emails per folder",
        auth=IMAP2API,
        query=SERVER_FILTER_QUERY,
        replies={200: Reply("Statistics", STATISTICS_SCHEMA)},
        errors=(400, 429),
    )
    async def statistics(self, request: IRequest) -> bytes:
        user_id = await self.user_id(request)
        stats = await self.messages.statistics(user_id, server_param(request),
                                               without_pop=True)
        return self.reply(request, statistics_json(stats))

    @routes.route(
        both("/emails/<int:email_id>/"),
        "GET",
        summary="Get an email with its bodies and the other emails of its thread",
        auth=IMAP2API,
        replies={200: Reply("The email", EMAIL_DETAIL_SCHEMA)},
        errors=(429,),
    )
    async def get_email(self, request: IRequest, email_id: int) -> bytes:
        user_id = await self.user_id(request)
        with refusals():
            detail, thread = await self.messages.message_and_thread(user_id, email_id,
                                                                      without_pop=True)
        # Written as read, a batch of the thread's e-mails at a time (see web.jsonstream).
        others = [row_id for row_id in thread if row_id != email_id]
        emails = self.messages.details_of(user_id, others, without_pop=True)
        await stream_json_array(request, _thread_emails(emails), email_detail_head(detail),
                                "thread_emails")
        return b""

    @routes.route(
        both("/emails/<int:email_id>/thread/"),
        "GET",
        summary="Get the whole thread of an email, oldest first",
        auth=IMAP2API,
        replies={200: Reply("The thread", THREAD_SCHEMA)},
        errors=(429,),
    )
    async def get_thread(self, request: IRequest, email_id: int) -> bytes:
        user_id = await self.user_id(request)
        with refusals():
            thread = await self.messages.thread_ids(user_id, email_id, without_pop=True)
        emails = self.messages.details_of(user_id, thread, without_pop=True)
        await stream_json_array(request, _thread_emails(emails))
        return b""

    # -- webhooks ----------------------------------------------------------------------------

    @routes.route(
        both("/webhooks/"),
        "GET",
        summary="List webhooks",
        auth=IMAP2API,
        query=PAGE_QUERY,
        replies={200: Reply("A page of webhooks", page_schema(WEBHOOK_SCHEMA))},
        errors=(429,),
    )
    async def list_webhooks(self, request: IRequest) -> bytes:
        user_id = await self.user_id(request)

        async def fetch(offset: int, limit: int) -> StorePage[Webhook]:
            return await self.webhooks.list_webhooks(user_id, offset=offset, limit=limit)

        return self.reply(request, await paginate(request, fetch, webhook_json))

    @routes.route(
        both("/webhooks/"),
        "POST",
        summary="Create a webhook (its signing secret is shown in this reply only)",
        auth=IMAP2API,
        body=WEBHOOK_INPUT_SCHEMA,
        body_types=BODY_TYPES,
        replies={201: Reply("The new webhook, with its secret", WEBHOOK_SCHEMA)},
        errors=(429,),
    )
    async def create_webhook(self, request: IRequest) -> bytes:
        """Deliveries are POSTs signed with `X-Mailcore-Signature: sha256=<hex HMAC-SHA256
        over "<X-Mailcore-Timestamp>.<raw body>">`."""
        user_id = await self.user_id(request)
        values = new_webhook_input(self.fields(request))
        with refusals():
            hook, secret = await self.webhooks.create(user_id, **values)
        return self.reply(request, webhook_json(hook, secret), 201, headers=NO_STORE)

    @routes.route(
        both("/webhooks/<int:webhook_id>/"),
        "GET",
        summary="Retrieve a webhook",
        auth=IMAP2API,
        replies={200: Reply("The webhook", WEBHOOK_SCHEMA)},
        errors=(429,),
    )
    async def get_webhook(self, request: IRequest, webhook_id: int) -> bytes:
        user_id = await self.user_id(request)
        with refusals():
            hook = await self.webhooks.get(user_id, webhook_id)
        return self.reply(request, webhook_json(hook))

    @routes.route(
        both("/webhooks/<int:webhook_id>/"),
        ["PUT", "PATCH"],
        summary="Update a webhook (only the fields given)",
        auth=IMAP2API,
        body=WEBHOOK_INPUT_SCHEMA,
        body_types=BODY_TYPES,
        replies={200: Reply("The webhook (with its new secret if it changed)",
                            WEBHOOK_SCHEMA)},
        errors=(429,),
    )
    async def update_webhook(self, request: IRequest, webhook_id: int) -> bytes:
        user_id = await self.user_id(request)
        changes = webhook_changes(self.fields(request))
        with refusals():
            hook, secret = await self.webhooks.update(user_id, webhook_id, **changes)
        return self.reply(request, webhook_json(hook, secret), headers=NO_STORE)

    @routes.route(
        both("/webhooks/<int:webhook_id>/"),
        "DELETE",
        summary="Delete a webhook and its delivery log",
        auth=IMAP2API,
        replies={204: Reply("Deleted")},
        errors=(429,),
    )
    async def delete_webhook(self, request: IRequest, webhook_id: int) -> bytes:
        user_id = await self.user_id(request)
        with refusals():
            await self.webhooks.delete(user_id, webhook_id)
        return empty_reply(request, 204)

    @routes.route(
        both("/webhooks/<int:webhook_id>/deliveries/"),
        "GET",
        summary="The delivery log of a webhook, newest first",
        auth=IMAP2API,
        query=DELIVERIES_QUERY,
        replies={200: Reply("A page of deliveries", page_schema(DELIVERY_SCHEMA))},
        errors=(400, 429),
    )
    async def list_deliveries(self, request: IRequest, webhook_id: int) -> bytes:
        user_id = await self.user_id(request)
        params = drf_query(request)
        status = params.get("status") or None

        async def fetch(offset: int, limit: int) -> StorePage[Delivery]:
            with refusals():
                return await self.webhooks.deliveries(
                    user_id, webhook_id, status=status, offset=offset, limit=limit
                )

        return self.reply(request, await paginate(request, fetch, delivery_json, params))

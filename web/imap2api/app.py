"""Simple IMAP2API (seed 001): a Django REST framework service, `Authorization: Token`.

Served at `/api-token-auth/` and under both `/api/` and `/api/v1/` (API-MAP.md):

- `imap-servers/`: list, create; `imap-servers/{id}/`: retrieve, update (PUT and PATCH are
  both partial, as the seed's PUT example is), delete; `imap-servers/{id}/sync/`: sync now.
- `emails/` (filters `q`, `folder`, `imap_server`, `date_from`, `date_to`, `thread`,
  `has_attachments`, `ordering`), `emails/{id}/` with `thread_emails`, `emails/{id}/thread/`,
  `emails/threads/`, `emails/folders/`, `emails/statistics/`.
- `webhooks/` and `webhooks/{id}/` (the seed's webhooks, given an API here), and
  `webhooks/{id}/deliveries/`, the delivery log. See mailcore.webhooks for the events and
  the signature.

Errors are DRF's: `{"detail": ...}` or `{"field": ["message"]}`. Lists are DRF pages
`{count, next, previous, results}` (`page`, `page_size` default 50, at most 100; a page
past the end is 404 "Invalid page.") with absolute `next`/`previous` URLs built from the
request's Host and scheme. Authenticated requests are limited per user (1000/h),
unauthenticated ones per client address (100/h); every reply of a limited request carries
the X-RateLimit-* headers. CORS: `[web] cors_origins` lists the origins browsers may call
from (none by default; "*" for any); preflight OPTIONS requests are answered without a
credential. Another user's objects are 404, and no password or secret is ever returned
(a webhook's secret is shown once, when it is made or rotated).

A sync waits for the sync to end up to `[web] imap2api_sync_wait` seconds (25 by default):
200 `{"status": "success", "message": "Email sync completed"}`; 502 with the reason when
the sync failed; 202 `{"status": "running", ...}` when it is still running, whose progress
then shows in the IMAP server object (`sync_status`, `sync_progress`).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from mailcore.fetch import Account, AccountError, AccountNotFound, Accounts, SyncEngine
from mailcore.fetch.accounts import SYNC_LIMIT_TYPES
from mailcore.fetch.engine import SyncResult
from mailcore.identity import Principal
from mailcore.messages import MessageDetail, MessageNotFound, MessageQuery, MessageStore, QueryError
from mailcore.messages import Page as StorePage
from mailcore.webhooks import (
    EVENTS,
    Delivery,
    Webhook,
    WebhookError,
    WebhookNotFound,
    Webhooks,
    email_json,
    iso,
    thread_ref,
)
from web.api import ApiApp
from web.auth import IMAP2API, CredentialResolver
from web.errors import ApiError, DrfErrors, field_error
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
    STATISTICS_SCHEMA,
    SYNC_SCHEMA,
    THREAD_SCHEMA,
    THREADS_QUERY,
    TOKEN_SCHEMA,
    WEBHOOK_INPUT_SCHEMA,
    WEBHOOK_SCHEMA,
    page_schema,
)
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.parsing import (
    FORM_TYPE,
    MULTIPART_TYPE,
    bool_field,
    collect_fields,
    int_field,
    query_params,
    string_field,
)
from web.ratelimit import RateLimiter, client_key, enforce
from web.replies import empty_reply, set_headers
from web.settings import WebSettings

T = TypeVar("T")

LOGIN_FAILED = "Unable to log in with provided credentials."
INVALID_PAGE = "Invalid page."
INVALID_DATE = "Enter a valid date."
SYNC_DONE = "Email sync completed"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
BODY_TYPES = ("application/json", FORM_TYPE, MULTIPART_TYPE)
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Accept, X-Requested-With"
CORS_EXPOSE_HEADERS = (
    "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After, X-Request-Id"
)
CORS_MAX_AGE = "86400"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


def both(path: str) -> tuple[str, str]:
    """A seed path under /api/ and under /api/v1/."""
    return f"/api{path}", f"/api/v1{path}"


# -- representations -------------------------------------------------------------------------


def server_json(a: Account) -> dict[str, Any]:
    """An IMAP server as the API shows it: never its password."""
    return {
        "id": a.id,
        "name": a.name,
        "email": a.email,
        "host": a.host,
        "port": a.port,
        "username": a.username,
        "use_ssl": a.use_ssl,
        "start_tls": a.start_tls,
        "allow_cleartext": a.allow_cleartext,
        "tls_fingerprint": a.tls_fingerprint,
        "has_tls_ca": bool(a.tls_ca_pem),
        "sync_limit_type": a.sync_limit_type,
        "sync_limit_value": a.sync_limit_value,
        "folders_to_sync": a.folders_to_sync,
        "exclude_trash": a.exclude_trash,
        "sync_interval": a.sync_interval,
        "enabled": a.enabled,
        "last_sync": iso(a.last_sync),
        "sync_status": a.sync_status,
        "sync_error": a.sync_error,
        "sync_started_at": iso(a.sync_started_at),
        "sync_progress": {
            "folder": a.progress_folder,
            "done": a.progress_done,
            "total": a.progress_total,
        },
        "created_at": iso(a.created_at),
        "updated_at": iso(a.updated_at),
    }


def thread_email_json(d: MessageDetail) -> dict[str, Any]:
    """One e-mail of a thread, with its bodies (seed 001's `thread_emails` items)."""
    m = d.summary
    return {
        "id": m.id,
        "message_id": m.message_id,
        "subject": m.subject,
        "sender": m.sender,
        "recipient": m.recipient,
        "date": iso(m.date),
        "body_text": d.body_text,
        "body_html": d.body_html,
        "folder": m.folder,
    }


def email_detail_json(d: MessageDetail, thread: list[MessageDetail]) -> dict[str, Any]:
    m = d.summary
    return {
        **email_json(m),
        "cc": d.cc,
        "body_text": d.body_text,
        "body_html": d.body_html,
        "in_reply_to": d.in_reply_to,
        "references": list(d.references),
        "size": m.size,
        "flags": list(m.flags),
        "attachments": [
            {"id": a.id, "filename": a.filename, "mime_type": a.mime_type, "size": a.size}
            for a in d.attachments
        ],
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "thread_id": thread_ref(m.thread_id),
        "thread_emails": [thread_email_json(t) for t in thread if t.summary.id != m.id],
    }


def webhook_json(w: Webhook, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": w.id,
        "url": w.url,
        "events": list(w.events),
        "description": w.description,
        "active": w.active,
        "created_at": iso(w.created_at),
        "updated_at": iso(w.updated_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def _epoch(value: float | None) -> str | None:
    if value is None:
        return None
    return iso(datetime.datetime.fromtimestamp(value, datetime.UTC))


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "delivery_id": d.delivery_id,
        "event": d.event,
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": _epoch(d.created_at),
        "last_attempt_at": _epoch(d.last_attempt_at),
        "next_attempt_at": _epoch(d.next_attempt_at),
        "completed_at": _epoch(d.completed_at),
        "payload": json.loads(d.payload),
    }


# -- input -----------------------------------------------------------------------------------


def _nullable_string(data: Mapping[str, Any], name: str) -> str | None:
    if data.get(name) is None or data.get(name) == "":
        return None
    return string_field(data, name, required=False, trim=False, max_length=65536)


def _folders(data: Mapping[str, Any]) -> str | list[str] | None:
    value = data.get("folders_to_sync")
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise field_error("folders_to_sync", "Expected a list of folder names.")
        return value
    return string_field(data, "folders_to_sync", allow_blank=True, max_length=65536)


def server_input(data: Mapping[str, Any], *, create: bool) -> dict[str, Any]:
    """Checked account fields from a request body; unknown and read-only keys are ignored
    (as DRF does)."""
    checks: dict[str, Callable[[], Any]] = {
        "name": lambda: string_field(data, "name", required=False, allow_blank=True,
                                     max_length=255),
        "email": lambda: string_field(data, "email", required=False, allow_blank=True,
                                      max_length=254),
        "host": lambda: string_field(data, "host", required=create, max_length=255),
        "port": lambda: int_field(data, "port", minimum=1, maximum=65535),
        "username": lambda: string_field(data, "username", required=create, max_length=255),
        "password": lambda: string_field(data, "password", required=create, trim=False,
                                         max_length=1024),
        "use_ssl": lambda: bool_field(data, "use_ssl"),
        "start_tls": lambda: bool_field(data, "start_tls"),
        "allow_cleartext": lambda: bool_field(data, "allow_cleartext"),
        "exclude_trash": lambda: bool_field(data, "exclude_trash"),
        "enabled": lambda: bool_field(data, "enabled"),
        "sync_limit_type": lambda: string_field(data, "sync_limit_type", required=False),
        "sync_limit_value": lambda: int_field(data, "sync_limit_value", minimum=0),
        "folders_to_sync": lambda: _folders(data),
        "tls_ca_pem": lambda: _nullable_string(data, "tls_ca_pem"),
        "tls_fingerprint": lambda: _nullable_string(data, "tls_fingerprint"),
        "sync_interval": lambda: int_field(data, "sync_interval", minimum=1),
    }
    values = collect_fields(checks)
    clearable = {"tls_ca_pem", "tls_fingerprint", "sync_interval"}
    out = {k: v for k, v in values.items() if v is not None or (k in clearable and k in data)}
    limit = out.get("sync_limit_type")
    if limit is not None and limit not in SYNC_LIMIT_TYPES:
        raise field_error("sync_limit_type", f'"{limit}" is not a valid choice.')
    if create and "use_ssl" not in out:
        out["use_ssl"] = not out.get("start_tls", False)
    return out


def _refusal(error: AccountError | WebhookError, *, not_found: bool) -> ApiError:
    """A service's refusal as a DRF error: 404, or 400 naming the field (else
    `non_field_errors`)."""
    if not_found:
        return ApiError(404, "Not found.")
    field = error.field or "non_field_errors"
    return ApiError(400, error.message, fields={field: [error.message]})


def account_error(error: AccountError) -> ApiError:
    """An account refused by the fetch service, as a DRF error."""
    return _refusal(error, not_found=isinstance(error, AccountNotFound))


def webhook_error(error: WebhookError) -> ApiError:
    """A webhook refused by the webhook service, as a DRF error."""
    return _refusal(error, not_found=isinstance(error, WebhookNotFound))


def _day(params: Mapping[str, str], name: str) -> datetime.date | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if not _DATE.match(value):
        raise field_error(name, INVALID_DATE)
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise field_error(name, INVALID_DATE) from None


def _flag(params: Mapping[str, str], name: str) -> bool | None:
    if not params.get(name, "").strip():
        return None
    return bool_field(params, name)


def _server_filter(params: Mapping[str, str]) -> int | None:
    if not params.get("imap_server", "").strip():
        return None
    return int_field(params, "imap_server")


def server_param(request: IRequest) -> int | None:
    """The `imap_server` query parameter of a request (None: every server); 400 if bad."""
    values = collect_fields({"imap_server": lambda: _server_filter(query_params(request))})
    return values["imap_server"]


def message_query(params: Mapping[str, str]) -> MessageQuery:
    """The filters and ordering of an emails list request (without the page window)."""
    values = collect_fields({
        "q": lambda: (params.get("q") or "").strip() or None,
        "folder": lambda: params.get("folder") or None,
        "imap_server": lambda: _server_filter(params),
        "date_from": lambda: _day(params, "date_from"),
        "date_to": lambda: _day(params, "date_to"),
        "thread": lambda: _flag(params, "thread"),
        "has_attachments": lambda: _flag(params, "has_attachments"),
        "ordering": lambda: (params.get("ordering") or "").strip() or "-date",
    })
    return MessageQuery(
        q=values["q"], folder=values["folder"], account_id=values["imap_server"],
        date_from=values["date_from"], date_to=values["date_to"],
        has_attachments=values["has_attachments"], threads_only=bool(values["thread"]),
        ordering=values["ordering"],
    )


# -- pagination ------------------------------------------------------------------------------


def page_size(params: Mapping[str, str]) -> int:
    """`page_size` as DRF reads it: a positive integer, at most 100; anything else is 50."""
    raw = params.get("page_size", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return min(int(raw), MAX_PAGE_SIZE)
    return DEFAULT_PAGE_SIZE


def page_number(params: Mapping[str, str]) -> int | None:
    """`page` (default 1); None for "last"; 404 "Invalid page." for anything else."""
    raw = params.get("page", "").strip() or "1"
    if raw == "last":
        return None
    if not raw.isdigit() or int(raw) < 1 or len(raw) > 9:
        raise ApiError(404, INVALID_PAGE)
    return int(raw)


def request_base(request: IRequest) -> str:
    """scheme://host[:port] of the request, from its Host header (else the listener)."""
    scheme = "https" if request.isSecure() else "http"
    raw = request.getHeader(b"host")
    host = raw.decode("latin-1").strip() if raw else ""
    if not host or not _HOST.match(host):
        address = request.getHost()
        name = getattr(address, "host", "localhost")
        port = getattr(address, "port", None)
        default = 443 if scheme == "https" else 80
        host = name if port in (None, default) else f"{name}:{port}"
    return f"{scheme}://{host}"


def _path(request: IRequest) -> str:
    return str(request.path.decode("latin-1"))


def page_url(request: IRequest, page: int | None) -> str:
    """The request's absolute URL with `page` replaced (removed for None), as DRF's
    replace_query_param/remove_query_param write it (parameters sorted)."""
    path = _path(request)
    _, _, query = request.uri.partition(b"?")
    pairs = [(k, v) for k, v in parse_qsl(query.decode("utf-8", "replace"),
                                          keep_blank_values=True) if k != "page"]
    if page is not None:
        pairs.append(("page", str(page)))
    encoded = urlencode(sorted(pairs))
    return f"{request_base(request)}{path}" + (f"?{encoded}" if encoded else "")


async def paginate(
    request: IRequest, fetch: Callable[[int, int], Awaitable[StorePage[T]]],
    show: Callable[[T], Any],
) -> dict[str, Any]:
    """A DRF page of what `fetch(offset, limit)` returns."""
    params = query_params(request)
    size = page_size(params)
    number = page_number(params)
    if number is None:  # "last": the count says which page that is
        total = (await fetch(0, 0)).count
        number = max(1, -(-total // size))
    found = await fetch((number - 1) * size, size)
    pages = max(1, -(-found.count // size))
    if number > pages:
        raise ApiError(404, INVALID_PAGE)
    return {
        "count": found.count,
        "next": page_url(request, number + 1) if number < pages else None,
        "previous": (page_url(request, number - 1 if number > 2 else None)
                     if number > 1 else None),
        "results": [show(item) for item in found.items],
    }


def _list_page(items: list[T]) -> Callable[[int, int], Awaitable[StorePage[T]]]:
    async def fetch(offset: int, limit: int) -> StorePage[T]:
        return StorePage(count=len(items), items=items[offset:offset + limit])

    return fetch


# -- the app ---------------------------------------------------------------------------------


class Imap2ApiApp(ApiApp):
    name = "imap2api"
    title = "Simple IMAP2API (seed 001): IMAP accounts, emails and threads; Token auth"
    shape = DrfErrors()
    app = Klein()
    routes = RouteTable(app, "imap2api")

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
        self.webhooks = webhooks
        self.clock = clock

    async def principal(self, request: IRequest) -> Principal:
        """The token's user, within the per-user limit; a request without a valid token
        counts against its address's anonymous limit before it gets its 401."""
        try:
            principal = await self.resolver.require(request, IMAP2API)
        except ApiError:
            enforce(request, self.anonymous_limiter, ("anonymous", client_key(request)))
            raise
        enforce(request, self.user_limiter, ("user", principal.user.id))
        return principal

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
        "/api-token-auth/",
        "POST",
        summary="Obtain a token from a username and password",
        body=CREDENTIALS_SCHEMA,
        body_types=BODY_TYPES,
        replies={200: Reply("A new token for `Authorization: Token <token>`", TOKEN_SCHEMA)},
        errors=(400, 429),
    )
    async def obtain_token(self, request: IRequest) -> bytes:
        """Each call creates a new token (only digests are stored, so an existing token
        cannot be shown again). Limited per client address like every password login."""
        data = self.fields(request)
        values = collect_fields(
            {
                "username": lambda: string_field(data, "username", max_length=254),
                "password": lambda: string_field(data, "password", trim=False, max_length=1024),
            }
        )
        user = await self.login.check(request, values["username"], values["password"])
        if user is None:
            raise ApiError(400, LOGIN_FAILED, fields={"non_field_errors": [LOGIN_FAILED]})
        token = await self.login.issue_token(user, "api-token-auth")
        return self.reply(request, {"token": token}, headers={"Cache-Control": "no-store"})

    # -- IMAP servers ------------------------------------------------------------------------

    async def _account(self, user_id: int, server_id: int) -> Account:
        """The user's IMAP account, or 404 (another user's, or a POP3 account)."""
        try:
            account = await self.accounts.get(user_id, server_id)
        except AccountError as e:
            raise account_error(e) from None
        if account.protocol != "imap":
            raise ApiError(404, "Not found.")
        return account

    @routes.route(
        both("/imap-servers/"),
        "GET",
        summary="List IMAP servers",
        auth=IMAP2API,
        query=PAGE_QUERY,
        replies={200: Reply("A page of IMAP servers", page_schema(SERVER_SCHEMA))},
        errors=(429,),
    )
    async def list_servers(self, request: IRequest) -> bytes:
        user_id = await self.user_id(request)
        found = await self.accounts.list_accounts(user_id, protocol="imap")
        return self.reply(request, await paginate(request, _list_page(found), server_json))

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
        try:
            account = await self.accounts.create(user_id, protocol="imap", **values)
        except AccountError as e:
            raise account_error(e) from None
        location = f"{request_base(request)}{_path(request).rstrip('/')}/{account.id}/"
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
        try:
            account = await self.accounts.update(user_id, server_id, **values)
        except AccountError as e:
            raise account_error(e) from None
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
        try:
            await self.accounts.delete(user_id, server_id)
        except AccountError as e:
            raise account_error(e) from None
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
        if outcome is None:
            account = await self._account(user_id, server_id)
            return self.reply(request, {
                "status": "running",
                "message": "Email sync is still running; its progress shows in the IMAP "
                "server.",
                "imap_server": server_json(account),
            }, 202, headers={"Location": request_base(request) + _path(request).rsplit(
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
        user_id = await self.user_id(request)
        query = message_query(query_params(request))
        if threads:
            query = MessageQuery(**{**query.__dict__, "threads_only": True})

        async def fetch(offset: int, limit: int) -> StorePage[Any]:
            window = MessageQuery(**{**query.__dict__, "offset": offset, "limit": limit})
            try:
                return await self.messages.list_messages(user_id, window)
            except QueryError as e:
                raise field_error(e.field, str(e)) from None

        return self.reply(request, await paginate(request, fetch, email_json))

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
        `thread=true` shows one e-mail per thread, the newest matching one."""
        return await self._page_of_messages(request, threads=False)

    @routes.route(
        both("/emails/threads/"),
        "GET",
        summary="List email threads (one row per thread, its newest email)",
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
        names = await self.messages.folder_names(user_id, server_param(request))
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
        stats = await self.messages.statistics(user_id, server_param(request))
        return self.reply(request, {
            "total_emails": stats.total_emails,
            "total_threads": stats.total_threads,
            "folders": stats.folders,
        })

    async def _thread(self, user_id: int, email_id: int) -> list[MessageDetail]:
        try:
            return await self.messages.thread_of(user_id, email_id)
        except MessageNotFound:
            raise ApiError(404, "Not found.") from None

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
        try:
            detail = await self.messages.get_message(user_id, email_id)
        except MessageNotFound:
            raise ApiError(404, "Not found.") from None
        thread = await self._thread(user_id, email_id)
        return self.reply(request, email_detail_json(detail, thread))

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
        thread = await self._thread(user_id, email_id)
        return self.reply(request, [thread_email_json(d) for d in thread])

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
        data = self.fields(request)
        if "url" not in data or data["url"] in (None, ""):
            raise field_error("url", "This field is required.")
        try:
            hook, secret = await self.webhooks.create(
                user_id, url=data["url"], events=data.get("events", list(EVENTS)),
                description=data.get("description", ""), secret=data.get("secret"),
                active=self._active(data, default=True),
            )
        except WebhookError as e:
            raise webhook_error(e) from None
        return self.reply(request, webhook_json(hook, secret), 201,
                          headers={"Cache-Control": "no-store"})

    @staticmethod
    def _active(data: Mapping[str, Any], *, default: bool) -> bool:
        value = bool_field(data, "active")
        return default if value is None else value

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
        try:
            hook = await self.webhooks.get(user_id, webhook_id)
        except WebhookError as e:
            raise webhook_error(e) from None
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
        data = self.fields(request)
        changes: dict[str, Any] = {}
        for key in ("url", "events", "description", "secret"):
            if key in data:
                changes[key] = data[key]
        if "active" in data:
            changes["active"] = self._active(data, default=True)
        if "rotate_secret" in data:
            changes["rotate_secret"] = bool_field(data, "rotate_secret")
        try:
            hook, secret = await self.webhooks.update(user_id, webhook_id, **changes)
        except WebhookError as e:
            raise webhook_error(e) from None
        return self.reply(request, webhook_json(hook, secret),
                          headers={"Cache-Control": "no-store"})

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
        try:
            await self.webhooks.delete(user_id, webhook_id)
        except WebhookError as e:
            raise webhook_error(e) from None
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
        status = query_params(request).get("status") or None

        async def fetch(offset: int, limit: int) -> StorePage[Delivery]:
            try:
                return await self.webhooks.deliveries(
                    user_id, webhook_id, status=status, offset=offset, limit=limit
                )
            except WebhookError as e:
                raise webhook_error(e) from None

        return self.reply(request, await paginate(request, fetch, delivery_json))

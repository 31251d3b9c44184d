"""Dropmyemail (seed 000 + dropmyemail-v1.md): OAuth 2 at `/oauth/…`, the API under `/v1/`.

JSON only; every call carries `access_token` (query) or `Authorization: Bearer` (one in
the body is a 400 `invalid_request`: `_no_body_token`); 20
requests per second per token (X-RateLimit-* headers, 429 with Retry-After). Errors are
OAuth-style `{"error": code, "error_description": ...}` with `WWW-Authenticate: Bearer` on
401/403 (`POST /oauth/token` challenges a client with Basic, RFC 6749 §5.2).

The OAuth 2 provider is `mailcore.oauth.OAuthProvider` (oauthlib underneath); this module
only translates HTTP to it and back. `POST /oauth/token` exchanges a code or rotates a
refresh token; `POST /oauth/revoke` (RFC 7009) ends a token and its family. Both
authenticate the client, within `[web] oauth_token_rate` per client and `[web]
oauth_client_failure_rate` failures per client address. Handlers of `/v1/` authenticate
with `await self.principal(request, scope)`, which resolves the access token through the
provider, checks the scope (read implies email, attachment and contact) and the per-token rate.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.backup import (
    MAX_PER_PAGE,
    Attachment,
    BackupAccount,
    BackupAccounts,
    BackupAttachments,
    BackupContacts,
    BackupError,
    BackupMail,
    Contact,
    NotFound,
    Window,
    known_size,
)
from mailcore.backup.accounts import iso, login_check_deadline
from mailcore.backup.contacts import MAX_CONTACT_ID
from mailcore.fetch.errors import MailboxTaken
from mailcore.identity import Identity, Principal
from mailcore.messages.models import MessageSummary
from mailcore.oauth import CLIENT_CHALLENGE, OAuthProvider, token_client
from mailcore.oauth.provider import Reply as OAuthReply
from web.api import ApiApp, is_head
from web.auth import DROPMYEMAIL, AuthPolicy, CredentialResolver
from web.dropmyemail_jobs import JobRoutes, choice, refuse_unknown_fields
from web.dropmyemail_jobs import install as install_job_routes
from web.errors import ApiError, OAuthErrors
from web.jsonstream import base64_of, stream_base64_member
from web.openapi import Reply, RouteTable
from web.parsing import (
    FORM_TYPE,
    UNSUPPORTED_MEDIA_STATUS,
    bool_field,
    collect_fields,
    int_field,
    media_type,
    parse_int,
    query_params,
    read_body,
    read_fields,
    string_field,
)
from web.ratelimit import Limiter, RateLimiter, client_key, enforce, refuse_spent
from web.replies import set_headers
from web.settings import WebSettings

# The 429 of an address that has spent `[web] oauth_client_failure_rate`.
_FAILURES_SPENT = ("Too many failed client authentications from this address: try again in "
                   "{wait} s.")

TOKEN_REPLY = {
    "type": "object",
    "properties": {
        "access_token": {"type": "string"},
        "token_type": {"type": "string", "enum": ["bearer"]},
        "expires_in": {"type": "integer"},
        "refresh_token": {"type": "string"},
    },
    "required": ["access_token", "token_type", "expires_in", "refresh_token"],
}
TOKEN_INPUT = {
    "type": "object",
    "properties": {
        "grant_type": {"type": "string", "enum": ["authorization_code", "refresh_token"]},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string"},
        "code": {"type": "string"},
        "redirect_uri": {"type": "string"},
        "code_verifier": {"type": "string"},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string"},
    },
    "required": ["grant_type"],
}

REVOKE_INPUT = {
    "type": "object",
    "properties": {
        "token": {"type": "string"},
        "token_type_hint": {"type": "string", "enum": ["access_token", "refresh_token"]},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string"},
    },
    "required": ["token"],
}
# What the routes a client authenticates at (token, revoke) take and answer.
CLIENT_ROUTE: dict[str, Any] = {
    "body_types": (FORM_TYPE, "application/json"),
    "errors": (400, 401, 429),
    "body_errors": (),  # a body of another type is RFC 6749 5.2's 400 invalid_request
}


ACCOUNT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": "string"},
        "host": {"type": "string"},
        "protocol": {"type": "string", "enum": ["imap", "pop"]},
        "start_tls": {"type": "boolean"},
        "ssl": {"type": "boolean"},
        "port": {"type": "integer"},
        "msg_count": {"type": "integer"},
        "storage": {"type": "integer", "description": "bytes backed up"},
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
    "required": ["id", "email", "host", "protocol", "start_tls", "ssl", "port", "msg_count",
                 "storage", "created_at", "updated_at"],
}
ACCOUNT_INPUT = {
    "type": "object",
    "properties": {
        "email": {"type": "string"},
        "password": {"type": "string"},
        "host": {"type": "string", "description": "default: derived from the address "
                 "(imap.<domain> or pop.<domain>, or [dropmyemail] providers)"},
        "protocol": {"type": "string", "enum": ["imap", "pop"]},
        "start_tls": {"type": "boolean"},
        "ssl": {"type": "boolean"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    },
}
ACCOUNT_QUERY = {
    "type": {"type": "string", "enum": ["all", "imap", "pop"]},
    "sort": {"type": "string", "enum": ["email", "message_count", "storage", "created_at",
                                        "updated_at"]},
    "direction": {"type": "string", "enum": ["asc", "desc"]},
}


def account_json(found: BackupAccount) -> dict[str, Any]:
    """An account as the documentation shows it; never the password."""
    a = found.account
    return {
        "id": a.id, "email": a.email, "host": a.host, "protocol": a.protocol,
        "start_tls": a.start_tls, "ssl": a.use_ssl, "port": a.port,
        "msg_count": found.msg_count, "storage": found.storage,
        "created_at": iso(a.created_at), "updated_at": iso(a.updated_at),
    }


def _refused(e: BackupError) -> ApiError:
    return ApiError(400, e.message, code="invalid_request")


def _taken(e: MailboxTaken) -> ApiError:
    """409: the user's account `e.account_id` already backs that mailbox up."""
    return ApiError(409, e.message, extra={"account_id": e.account_id})


def _not_found() -> ApiError:
    return ApiError(404, "No such account.")


# The last page a list may be asked for (`page`); a window past the rows is empty.
MAX_PAGE = 2**31
PAGE_QUERY = {
    "page": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1},
    "per_page": {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE, "default": 20},
}
MAILBOX = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "user_id": {"type": "integer"},
        "account_id": {"type": "integer"}, "name": {"type": "string"},
        "message_count": {"type": "integer"},
    },
    "required": ["id", "user_id", "account_id", "name", "message_count"],
}
MESSAGE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "mailbox_id": {"type": ["integer", "null"]},
        "from": {"type": "string"}, "to": {"type": "string"}, "subject": {"type": "string"},
        "has_attachments": {"type": "boolean"},
        "date": {"type": ["string", "null"], "format": "date-time"},
        "size": {"type": "integer"},
    },
    "required": ["id", "mailbox_id", "from", "to", "subject", "has_attachments", "date",
                 "size"],
}
EML = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "mailbox_id": {"type": "integer"},
        "filename": {"type": "string"},
        "content_type": {"type": "string", "enum": ["message/rfc822"]},
        "size": {"type": "integer"},
        "content": {"type": "string", "contentEncoding": "base64",
                    "description": "the byte-exact .eml, base64"},
    },
    "required": ["id", "mailbox_id", "filename", "content_type", "size", "content"],
}
SEARCH = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "start": {"type": "integer", "description": "index of the first item (from 0)"},
        "messages": {"type": "array", "items": MESSAGE},
    },
    "required": ["count", "start", "messages"],
}

ATTACHMENT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "account_id": {"type": "integer"},
        "message_id": {"type": "integer"}, "sender": {"type": "string"},
        "filename": {"type": "string"}, "mime_type": {"type": "string"},
        "meta_data": {"type": "string", "description": "libmagic's description (file(1))"},
        "date": {"type": ["string", "null"], "format": "date-time"},
        "size": {"type": "integer"},
    },
    "required": ["id", "account_id", "message_id", "sender", "filename", "mime_type",
                 "meta_data", "date", "size"],
}
ATTACHMENTS = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"}, "start": {"type": "integer"},
        "attachments": {"type": "array", "items": ATTACHMENT},
    },
    "required": ["count", "start", "attachments"],
}
FILE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "filename": {"type": "string"},
        "mime_type": {"type": "string"}, "size": {"type": "integer"},
        "content": {"type": "string", "contentEncoding": "base64"},
    },
    "required": ["id", "filename", "mime_type", "size", "content"],
}

CONTACT_ID = {"type": "integer", "minimum": 0, "maximum": MAX_CONTACT_ID,
              "description": "Derived from the address, stable across backups; at most "
              "2^53 - 1, which a JSON number read as a double holds exactly"}
CONTACT = {
    "type": "object",
    "properties": {
        "id": CONTACT_ID, "account_id": {"type": "integer"},
        "name": {"type": "string"}, "filename": {"type": "string"},
        "email": {"type": "string"}, "phone": {"type": "string"},
        "backup_date": {"type": ["string", "null"], "format": "date-time"},
    },
    "required": ["id", "account_id", "name", "filename", "email", "phone", "backup_date"],
}
CONTACTS = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"}, "start": {"type": "integer"},
        "contacts": {"type": "array", "items": CONTACT},
    },
    "required": ["count", "start", "contacts"],
}
VCARD = {
    "type": "object",
    "properties": {
        "id": CONTACT_ID, "filename": {"type": "string"},
        "content_type": {"type": "string", "enum": ["text/vcard"]},
        "content": {"type": "string", "contentEncoding": "base64"},
    },
    "required": ["id", "filename", "content_type", "content"],
}


def contact_json(account_id: int, c: Contact) -> dict[str, Any]:
    return {"id": c.id, "account_id": account_id, "name": c.name, "filename": c.filename,
            "email": c.email, "phone": c.phone, "backup_date": iso(c.backup_date)}


def attachment_json(account_id: int, a: Attachment) -> dict[str, Any]:
    s = a.summary
    return {"id": s.id, "account_id": account_id, "message_id": s.message_row_id,
            "sender": s.sender, "filename": s.filename, "mime_type": s.mime_type,
            "meta_data": a.meta_data, "date": iso(s.date), "size": s.size}


def message_json(m: MessageSummary) -> dict[str, Any]:
    return {"id": m.id, "mailbox_id": m.folder_id, "from": m.sender, "to": m.recipient,
            "subject": m.subject, "has_attachments": m.has_attachments, "date": iso(m.date),
            "size": m.size}


def window(params: Mapping[str, str]) -> Window:
    """page (from 1) and per_page (1 to 40) from the query; 400 otherwise."""
    values: dict[str, int] = {}
    for name, low, high, default in (("page", 1, MAX_PAGE, 1),
                                     ("per_page", 1, MAX_PER_PAGE, 20)):
        text = params.get(name, "")
        if text == "":
            values[name] = default
            continue
        value = parse_int(text)
        if value is None or not low <= value <= high:
            raise ApiError(400, f"{name} must be a whole number from {low} to {high}.")
        values[name] = value
    return Window(values["page"], values["per_page"])


class DropmyemailApp(JobRoutes, ApiApp):
    name = "dropmyemail"
    challenge = 'Bearer realm="dropmyemail"'
    title = "Dropmyemail (seed 000): mailbox backup, migrate and restore; OAuth 2"
    shape = OAuthErrors()
    app = Klein()
    # "We only offer our endpoints in JSON. Please make your requests in JSON.": another
    # type is a 415 (RFC 9110 15.5.16), but at /oauth/token (RFC 6749 5.2's 400).
    routes = RouteTable(app, "dropmyemail", body_errors=(415,))

    def __init__(
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        token_limiter: RateLimiter,
        oauth: OAuthProvider,
        client_limiter: RateLimiter,
        client_failures: Limiter | None = None,
        backup: BackupAccounts,
        mail: BackupMail,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.token_limiter = token_limiter
        self.client_limiter = client_limiter
        self.client_failures = client_failures
        self.oauth = oauth
        self.backup = backup
        self.mail = mail
        self.attachments = BackupAttachments(mail)
        self.contacts = BackupContacts(mail)
        self.policy: AuthPolicy = dataclasses.replace(DROPMYEMAIL, lookup=self._lookup)

    async def _lookup(
        self, identity: Identity, secret: str, policy: AuthPolicy
    ) -> Principal | None:
        return await self.oauth.resolve(secret)

    async def principal(self, request: IRequest, scope: str) -> Principal:
        """The access token's user if it grants `scope`, within the per-token rate."""
        if request.method not in (b"GET", b"HEAD"):
            self._no_body_token(request)
        principal = await self.resolver.require(request, self.policy, scope=scope)
        enforce(request, self.token_limiter, ("token", principal.credential_id))
        # One user's mail and accounts: no cache keeps a reply, a shared one least of all
        # (RFC 6750 §2.3: the reply to a request with access_token in its URL SHOULD be
        # private; a proxy keyed on that URL would serve it past the token's revocation).
        request.setHeader(b"Cache-Control", b"private, no-store")
        return principal

    def _no_body_token(self, request: IRequest) -> None:
        """A 400 `invalid_request` for an `access_token` in the body. The documentation
        takes the token in the query or the Authorization header only, and RFC 6750 2.2's
        body form (which it SHOULD NOT be used beside a usable header, and one method per
        request, 3.1) was neither used nor refused: alone it was a 401 as if nothing were
        sent, beside a header's token ignored even when another one. A body that does not
        parse is left to the route, which answers it after the credential."""
        try:
            data = self.fields(request)
        except ApiError:
            return
        if "access_token" in data:
            raise self.policy.error("body_token", 400, code="invalid_request")

    # -- OAuth 2 ------------------------------------------------------------------------

    @routes.route(
        "/oauth/token",
        "POST",
        summary="Exchange an authorization code, or a refresh token, for an access token",
        description="RFC 6749 §4.1.3 and §6. The client authenticates with client_id and "
        "client_secret in the form, or with HTTP Basic. Codes are single-use and live 5 "
        "minutes; a reused code revokes what was issued from it. A code issued with a PKCE "
        "challenge needs its code_verifier (S256), and one issued without a challenge takes no "
        "code_verifier (invalid_grant; RFC 9700 §2.1.1). A refresh token is good once: the reply "
        "carries the next one. Errors are RFC 6749 §5.2 (`invalid_grant`, "
        "`invalid_client` with 401 and `WWW-Authenticate: Basic`, `invalid_request` for a "
        "missing grant_type or a parameter given twice, ...). Each client (its client_id "
        "and the secret it presents) may make `[web] oauth_token_rate` requests (20 at once, "
        "then 10 a second); past it `429` `{\"error\": \"slow_down\", ...}` with "
        "`Retry-After`. A client address may fail client authentication (a wrong secret, "
        "whatever client it names) `[web] oauth_client_failure_rate` times (100 an hour); "
        "past it every request from it is that `429` until the budget refills.",
        body=TOKEN_INPUT,
        replies={200: Reply("The access token", TOKEN_REPLY)},
        **CLIENT_ROUTE,
    )
    async def token(self, request: IRequest) -> bytes:
        body, headers = await self._client_request(request)
        uri = "https://dropmyemail.invalid/oauth/token"
        return await self._client_reply(request, await self.oauth.token(uri, body, headers))

    @routes.route(
        "/oauth/revoke",
        "POST",
        summary="Revoke an access or refresh token (RFC 7009)",
        description="The client authenticates as at `/oauth/token` (client_id and "
        "client_secret in the form, or HTTP Basic) and names one of its tokens in `token` "
        "(`token_type_hint`, access_token or refresh_token, says where to look first). "
        "The token ends with every token issued from the same authorization code: a "
        "refresh token's access tokens, an access token's refresh token. `200` with an "
        "empty body whether or not the token was live, or the client's (RFC 7009 2.2: a "
        "token of another client is left alone, and nobody learns whether it exists). "
        "Errors are RFC 6749 §5.2's as at `/oauth/token` (`invalid_request` for a missing "
        "token or a parameter given twice, `invalid_client` with 401 and "
        "`WWW-Authenticate: Basic`), and so are the limits: the client's `[web] "
        "oauth_token_rate` budget is the one its token requests take from, and a failed "
        "client authentication counts against the address's `oauth_client_failure_rate`.",
        body=REVOKE_INPUT,
        replies={200: Reply("Revoked, or nothing to revoke: an empty body", None)},
        **CLIENT_ROUTE,
    )
    async def revoke(self, request: IRequest) -> bytes:
        body, headers = await self._client_request(request)
        uri = "https://dropmyemail.invalid/oauth/revoke"
        return await self._client_reply(
            request, await self.oauth.revoke_token(uri, body, headers))

    async def _client_request(self, request: IRequest) -> tuple[str, dict[str, str]]:
        """The form body and headers oauthlib reads of a request a client authenticates
        (the token and revocation endpoints), once its address and the client are within
        their limits: `[web] oauth_client_failure_rate` (refused before the secret is
        checked) and `oauth_token_rate`. Every reply, the refusals of our own before
        oauthlib's among them, is kept from caches as oauthlib's are (RFC 6749 5.1, 5.2)."""
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Pragma", b"no-cache")
        if self.client_failures is not None:
            await refuse_spent(self.client_failures, ("address", client_key(request)),
                               message=_FAILURES_SPENT, code="slow_down")
        body = self._token_body(request)
        headers = {"Content-Type": FORM_TYPE}
        auth = request.getHeader(b"authorization")
        if auth is not None:
            try:
                headers["Authorization"] = auth.decode("ascii")
            except UnicodeDecodeError:
                await self._client_failed(request)
                raise ApiError(401, "Client authentication failed.", code="invalid_client",
                               headers={"WWW-Authenticate": CLIENT_CHALLENGE}) from None
        enforce(request, self.client_limiter,
                token_client(body, headers.get("Authorization"))
                or ("address", client_key(request)),
                message="Too many token requests from this client: try again in "
                "{wait} s.", code="slow_down")
        return body, headers

    async def _client_reply(self, request: IRequest, reply: OAuthReply) -> bytes:
        """oauthlib's reply to a client as the HTTP reply; a failed client authentication
        (401 invalid_client) counted against the address."""
        reply_headers, reply_body, status = reply
        if status == 401:
            await self._client_failed(request)
        set_headers(request, {k: v for k, v in reply_headers.items()
                              if k.lower() != "content-type"})
        request.setResponseCode(status)
        if not reply_body:
            return b""
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return reply_body.encode("utf-8")

    async def _client_failed(self, request: IRequest) -> None:
        if self.client_failures is not None:
            await self.client_failures.take(("address", client_key(request)))

    def _token_body(self, request: IRequest) -> str:
        """The token request as the form body oauthlib reads (JSON is accepted too)."""
        try:
            if media_type(request) == FORM_TYPE:
                raw = read_body(request, self.settings.json_max_body)
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ApiError(400, "The form is not valid UTF-8.") from None
            fields: dict[str, Any] = read_fields(
                request, self.settings.json_max_body, accept_multipart=False
            )
        except ApiError as e:
            if e.status != UNSUPPORTED_MEDIA_STATUS:
                raise
            # RFC 6749 5.2: a malformed token request (a body of another type, or coded:
            # gzip) is a 400 invalid_request.
            raise ApiError(400, e.message, code="invalid_request",
                           headers=e.headers) from None
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(400, f"Parameter {key} must be a string.")
        return urlencode(fields)

    # -- accounts -----------------------------------------------------------------------

    def _account_input(self, request: IRequest, *, create: bool) -> dict[str, Any]:
        data = self.fields(request)
        checks = {
            "email": lambda: string_field(data, "email", required=create, max_length=254,
                                          line=True),
            "password": lambda: string_field(data, "password", required=create, trim=False,
                                             max_length=1024, line=True),
            "host": lambda: string_field(data, "host", required=False, max_length=255,
                                         line=True),
            "protocol": lambda: string_field(data, "protocol", required=False),
            "start_tls": lambda: bool_field(data, "start_tls"),
            "ssl": lambda: bool_field(data, "ssl"),
            "port": lambda: int_field(data, "port", minimum=1, maximum=65535),
        }
        values = collect_fields(checks)
        # What the account reads as may come back (a client putting back what it read; the
        # fields input does not take are left as they are); any other name is a mistake
        # the client must hear of (a misspelt "pasword" would change nothing).
        refuse_unknown_fields(data, ACCOUNT_INPUT["properties"], ACCOUNT["properties"])
        return {k: v for k, v in values.items() if v is not None}

    @routes.route(
        "/v1/accounts",
        "GET",
        summary="List the accounts backed up",
        auth=DROPMYEMAIL,
        scope="read",
        query=ACCOUNT_QUERY,
        replies={200: Reply("The accounts", {"type": "array", "items": ACCOUNT})},
        errors=(401, 403, 429),
    )
    async def list_accounts(self, request: IRequest) -> bytes:
        principal = await self.principal(request, "read")
        params = query_params(request)
        kind = choice(params, "type", ("all", "imap", "pop"), "all")
        sort = choice(params, "sort", ("email", "message_count", "storage", "created_at",
                                        "updated_at"), "email")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        try:
            found = await self.backup.list(principal.user.id, kind=kind, sort=sort,
                                           direction=direction)
        except BackupError as e:
            raise _refused(e) from None
        return self.reply(request, [account_json(a) for a in found])

    @routes.route(
        "/v1/accounts/<int:account_id>",
        "GET",
        summary="Show an account",
        auth=DROPMYEMAIL,
        scope="read",
        replies={200: Reply("The account", ACCOUNT)},
        errors=(401, 403, 429),
    )
    async def show_account(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "read")
        found = await self.backup.get(principal.user.id, account_id)
        if found is None:
            raise _not_found()
        return self.reply(request, account_json(found))

    @routes.route(
        "/v1/accounts",
        "POST",
        summary="Add an account to back up (logs in first, then starts the first backup)",
        description="Gmail/Google addresses are refused (400): the server has no Google "
        "OAuth client credentials to ask for the user's consent. With neither ssl nor "
        "start_tls, the session still upgrades with STARTTLS when the server offers it; a "
        "server that offers neither TLS nor STARTTLS is refused (400) unless the operator "
        "allows cleartext logins ([dropmyemail] allow_cleartext_login). A mailbox (host, in "
        "any case, port and user) that one of the user's accounts already backs up is a 409 "
        "conflict naming that account (its id also as account_id), before any login: one "
        "account per mailbox.",
        auth=DROPMYEMAIL,
        scope="write",
        body={**ACCOUNT_INPUT, "required": ["email", "password"]},
        body_types=("application/json", FORM_TYPE),
        replies={201: Reply("The account", ACCOUNT)},
        errors=(401, 403, 409, 429),
    )
    async def create_account(self, request: IRequest) -> bytes:
        principal = await self.principal(request, "write")
        values = self._account_input(request, create=True)
        try:
            found = await self.backup.create(
                principal.user.id, values,
                deadline=login_check_deadline(self.settings.reply_timeout))
        except BackupError as e:
            raise _refused(e) from None
        except MailboxTaken as e:
            raise _taken(e) from None
        return self.reply(request, account_json(found), 201)

    @routes.route(
        "/v1/accounts/<int:account_id>",
        "PUT",
        summary="Change an account (password, host, protocol, start_tls, ssl, port)",
        description="A change of how to log in (password, host, port, protocol, ssl, "
        "start_tls) logs in again first, as create does: a refusal is a 400 with the "
        "server's reason, and nothing changes. A change of host, port or protocol, or of "
        "ssl and start_tls that lets the password go in cleartext, must carry `password` "
        "(else a 400, before any login, and nothing changes): the stored password is only "
        "sent to the server it was given for. The account as read may be sent back: fields "
        "PUT does not change are left as they are; a field the account does not have is a "
        "400. A host or port that would make the account name the mailbox of another of "
        "the user's accounts is a 409 conflict naming it, as for create.",
        auth=DROPMYEMAIL,
        scope="write",
        body=ACCOUNT_INPUT,
        body_types=("application/json", FORM_TYPE),
        replies={200: Reply("The account", ACCOUNT)},
        errors=(401, 403, 409, 429),
    )
    async def update_account(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "write")
        values = self._account_input(request, create=False)  # the body, read once
        try:
            found = await self.backup.update(
                principal.user.id, account_id, values,
                deadline=login_check_deadline(self.settings.reply_timeout))
        except BackupError as e:
            raise _refused(e) from None
        except MailboxTaken as e:
            raise _taken(e) from None
        if found is None:
            raise _not_found()
        return self.reply(request, account_json(found))

    @routes.route(
        "/v1/accounts/<int:account_id>",
        "DELETE",
        summary="Stop backing up an account and delete its backup; returns the account",
        auth=DROPMYEMAIL,
        scope="write",
        replies={200: Reply("The deleted account", ACCOUNT)},
        errors=(401, 403, 429),
    )
    async def delete_account(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "write")
        found = await self.backup.delete(principal.user.id, account_id)
        if found is None:
            raise _not_found()
        return self.reply(request, account_json(found))

    # -- mailboxes and messages ---------------------------------------------------------

    @routes.route(
        "/v1/accounts/<int:account_id>/mailboxes",
        "GET",
        summary="List an account's mailboxes with how many messages are backed up of each",
        auth=DROPMYEMAIL,
        scope="email",
        query={**PAGE_QUERY,
               "sort": {"type": "string", "enum": ["name", "message_count"]},
               "direction": {"type": "string", "enum": ["asc", "desc"]}},
        replies={200: Reply("The mailboxes", {"type": "array", "items": MAILBOX})},
        errors=(401, 403, 429),
    )
    async def list_mailboxes(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "email")
        params = query_params(request)
        page = window(params)
        sort = choice(params, "sort", ("name", "message_count"), "name")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        user_id = principal.user.id
        try:
            found = await self.mail.mailboxes(user_id, account_id, sort=sort,
                                              direction=direction, window=page)
        except NotFound:
            raise _not_found() from None
        return self.reply(request, [
            {"id": f.id, "user_id": user_id, "account_id": account_id, "name": f.name,
             "message_count": f.message_count} for f in found.items])

    @routes.route(
        "/v1/accounts/<int:account_id>/mailboxes/<int:mailbox_id>/messages",
        "GET",
        summary="List the backed-up messages of a mailbox",
        auth=DROPMYEMAIL,
        scope="email",
        query={**PAGE_QUERY,
               "type": {"type": "string", "enum": ["all", "has_attachments"]},
               "sort": {"type": "string", "enum": ["date"]},
               "direction": {"type": "string", "enum": ["asc", "desc"]}},
        replies={200: Reply("The messages", {"type": "array", "items": MESSAGE})},
        errors=(401, 403, 429),
    )
    async def list_messages(self, request: IRequest, account_id: int, mailbox_id: int
                            ) -> bytes:
        principal = await self.principal(request, "email")
        params = query_params(request)
        page = window(params)
        kind = choice(params, "type", ("all", "has_attachments"), "all")
        choice(params, "sort", ("date",), "date")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        try:
            found = await self.mail.messages(
                principal.user.id, account_id, mailbox_id,
                attachments_only=kind == "has_attachments", direction=direction, window=page)
        except NotFound:
            raise ApiError(404, "No such mailbox.") from None
        return self.reply(request, [message_json(m) for m in found.items])

    @routes.route(
        "/v1/accounts/<int:account_id>/mailboxes/<int:mailbox_id>/messages/<int:message_id>",
        "GET",
        summary="A backed-up message as its byte-exact .eml, base64-encoded",
        description="The reply is streamed: the stored message is read and base64-encoded "
        "a chunk at a time.",
        auth=DROPMYEMAIL,
        scope="email",
        replies={200: Reply("The message", EML)},
        errors=(401, 403, 429),
    )
    async def show_message(self, request: IRequest, account_id: int, mailbox_id: int,
                           message_id: int) -> bytes:
        principal = await self.principal(request, "email")
        try:
            eml = await self.mail.eml(principal.user.id, account_id, mailbox_id, message_id)
        except NotFound:
            raise ApiError(404, "No such message.") from None
        # Streamed: the stored bytes read a chunk at a time and base64-encoded as they
        # come, never the whole message in memory nor encoded at once on this thread.
        await stream_base64_member(
            request, {"id": message_id, "mailbox_id": mailbox_id,
                      "filename": f"{message_id}.eml", "content_type": "message/rfc822",
                      "size": eml.size},
            "content", eml.size, base64_of(self.mail.eml_chunks(eml)))
        return b""

    @routes.route(
        "/v1/accounts/<int:account_id>/messages/search",
        "GET",
        summary="Search an account's backed-up messages (full text: headers and bodies)",
        auth=DROPMYEMAIL,
        scope="email",
        query={**PAGE_QUERY, "query": {"type": "string"}},
        replies={200: Reply("The matches, newest first", SEARCH)},
        errors=(401, 403, 429),
    )
    async def search_messages(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "email")
        params = query_params(request)
        page = window(params)
        query = params.get("query", "").strip()
        if not query:
            raise ApiError(400, "query is required.")
        if len(query) > 1000:
            raise ApiError(400, "query is longer than 1000 characters.")
        try:
            found = await self.mail.search(principal.user.id, account_id, query, page)
        except NotFound:
            raise _not_found() from None
        return self.reply(request, {"count": found.count, "start": page.offset,
                                    "messages": [message_json(m) for m in found.items]})

    # -- attachments --------------------------------------------------------------------

    async def _attachment_page(self, request: IRequest, account_id: int, *,
                               search: bool) -> bytes:
        principal = await self.principal(request, "attachment")
        params = query_params(request)
        page = window(params)
        query: str | None = None
        if search:
            query = params.get("query", "").strip()
            if not query:
                raise ApiError(400, "query is required.")
            if len(query) > 1000:
                raise ApiError(400, "query is longer than 1000 characters.")
        sort = choice(params, "sort", ("date", "filename", "sender"), "date")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        try:
            found = await self.attachments.list(principal.user.id, account_id, query=query,
                                                sort=sort, direction=direction, window=page)
        except NotFound:
            raise _not_found() from None
        return self.reply(request, {
            "count": found.count, "start": page.offset,
            "attachments": [attachment_json(account_id, a) for a in found.items]})

    @routes.route(
        "/v1/accounts/<int:account_id>/attachments",
        "GET",
        summary="List the attachments of an account's backed-up mail",
        description="Every MIME attachment, with its decoded file name (RFC 2231/2047), "
        "type, size, sender and date, and meta_data: what libmagic (file(1)) says of it. "
        "Read from the backup's index: each attachment is described once (after the sync "
        "that stored it, or by the first page that shows it).",
        auth=DROPMYEMAIL,
        scope="attachment",
        query={**PAGE_QUERY,
               "sort": {"type": "string", "enum": ["date", "filename", "sender"]},
               "direction": {"type": "string", "enum": ["asc", "desc"]}},
        replies={200: Reply("The attachments", ATTACHMENTS)},
        errors=(401, 403, 429),
    )
    async def list_attachments(self, request: IRequest, account_id: int) -> bytes:
        return await self._attachment_page(request, account_id, search=False)

    @routes.route(
        "/v1/accounts/<int:account_id>/attachments_search",
        "GET",
        summary="Search an account's attachments by file name, type or libmagic's "
        "description (substring, case-insensitive)",
        auth=DROPMYEMAIL,
        scope="attachment",
        query={**PAGE_QUERY, "query": {"type": "string"},
               "sort": {"type": "string", "enum": ["date", "filename", "sender"]},
               "direction": {"type": "string", "enum": ["asc", "desc"]}},
        replies={200: Reply("The matching attachments", ATTACHMENTS)},
        errors=(401, 403, 429),
    )
    async def search_attachments(self, request: IRequest, account_id: int) -> bytes:
        return await self._attachment_page(request, account_id, search=True)

    @routes.route(
        "/v1/accounts/<int:account_id>/attachments/<int:attachment_id>",
        "GET",
        summary="An attachment's file, base64-encoded",
        description="The reply is streamed: the base64 is encoded from the stored message "
        "a slice at a time as the part is decoded. A HEAD answers from the backup's index "
        "without reading the message (no Content-Length for an attached message the index "
        "lists with size 0: its size may not be known).",
        auth=DROPMYEMAIL,
        scope="attachment",
        replies={200: Reply("The file", FILE)},
        errors=(401, 403, 429),
    )
    async def show_attachment(self, request: IRequest, account_id: int,
                              attachment_id: int) -> bytes:
        principal = await self.principal(request, "attachment")
        user_id = principal.user.id
        chunks: Iterable[bytes] = ()
        try:
            if is_head(request):
                # The headers from the index alone: no message read, no part decoded.
                info = await self.attachments.entry(user_id, account_id, attachment_id)
                size = known_size(info)
            else:
                found = await self.attachments.open(user_id, account_id, attachment_id)
                info, size, chunks = found.summary, found.size, found.base64_chunks()
        except NotFound:
            raise ApiError(404, "No such attachment.") from None
        # Streamed: base64 made from the message's bytes as they are decoded, so the reply
        # holds about one copy of the message, not four of the file.
        await stream_base64_member(
            request, {"id": info.id, "filename": info.filename,
                      "mime_type": info.mime_type, "size": size},
            "content", size, chunks)
        return b""

    # -- contacts -----------------------------------------------------------------------

    @routes.route(
        "/v1/accounts/<int:account_id>/contacts",
        "GET",
        summary="List the correspondents found in an account's backed-up mail",
        description="From, To and Cc addresses of the account's messages, completed by the "
        "vCards attached to them (name, telephone) and, failing a vCard's number, the "
        "telephone number of the signature block of the newest message from the contact "
        "(after '-- ' or in the trailing lines: Tel:, Phone:, Mobile:, +49 …; validated "
        "with libphonenumber). backup_date: when a message naming the contact was last "
        "backed up. The contacts are worked out from the whole backup once per change of "
        "it (a sync that stores or removes mail, a signature read by the indexer); pages "
        "and single contacts read that result.",
        auth=DROPMYEMAIL,
        scope="contact",
        query={**PAGE_QUERY,
               "sort": {"type": "string", "enum": ["name", "email"]},
               "direction": {"type": "string", "enum": ["asc", "desc"]}},
        replies={200: Reply("The contacts", CONTACTS)},
        errors=(401, 403, 429),
    )
    async def list_contacts(self, request: IRequest, account_id: int) -> bytes:
        principal = await self.principal(request, "contact")
        params = query_params(request)
        page = window(params)
        sort = choice(params, "sort", ("name", "email"), "name")
        direction = choice(params, "direction", ("asc", "desc"), "asc")
        try:
            found = await self.contacts.list(principal.user.id, account_id, sort=sort,
                                             direction=direction, window=page)
        except NotFound:
            raise _not_found() from None
        return self.reply(request, {
            "count": found.count, "start": page.offset,
            "contacts": [contact_json(account_id, c) for c in found.items]})

    @routes.route(
        "/v1/accounts/<int:account_id>/contacts/<bigint:contact_id>",
        "GET",
        summary="A contact as a vCard, base64-encoded",
        description="contact_id is the id the contacts list gives (at most 2^53 - 1). An "
        "id handed out before ids were limited so (up to 2^56) still names its contact, "
        "written exactly or as a double rounded it; the reply gives the contact's id now.",
        auth=DROPMYEMAIL,
        scope="contact",
        replies={200: Reply("The vCard", VCARD)},
        errors=(401, 403, 429),
    )
    async def show_contact(self, request: IRequest, account_id: int, contact_id: int
                           ) -> bytes:
        principal = await self.principal(request, "contact")
        try:
            contact = await self.contacts.get(principal.user.id, account_id, contact_id)
        except NotFound:
            raise ApiError(404, "No such contact.") from None
        card = contact.vcard().encode("utf-8")
        return self.reply(request, {
            "id": contact.id, "filename": contact.filename, "content_type": "text/vcard",
            "content": base64.b64encode(card).decode("ascii")})


# Migrates and restores: handlers in web/dropmyemail_jobs.py, on this app's route table.
install_job_routes(DropmyemailApp.routes)

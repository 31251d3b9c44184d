"""Simple IMAP2API (seed 001): a Django REST framework service, `Authorization: Token`.

Served at `/api-token-auth/` and under both `/api/` and `/api/v1/` (API-MAP.md). Errors
are DRF's: `{"detail": ...}` or `{"field": ["message"]}`. Authenticated requests are limited
per user (1000/h), unauthenticated ones per client address (100/h); every reply of a limited
request carries the X-RateLimit-* headers.

Working now: `POST /api-token-auth/`. The IMAP-server and email routes come with their own
issue; they authenticate with `await self.principal(request)`.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Principal
from web.api import ApiApp
from web.auth import IMAP2API, CredentialResolver
from web.errors import ApiError, DrfErrors
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.parsing import FORM_TYPE, MULTIPART_TYPE, collect_fields, string_field
from web.ratelimit import RateLimiter, client_key, enforce
from web.settings import WebSettings

LOGIN_FAILED = "Unable to log in with provided credentials."

CREDENTIALS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "user name or e-mail address"},
        "password": {"type": "string", "format": "password"},
    },
    "required": ["username", "password"],
}
TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"token": {"type": "string"}},
    "required": ["token"],
}


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
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.login = login
        self.user_limiter = user_limiter
        self.anonymous_limiter = anonymous_limiter

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

    @routes.route(
        "/api-token-auth/",
        "POST",
        summary="Obtain a token from a username and password",
        body=CREDENTIALS_SCHEMA,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
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

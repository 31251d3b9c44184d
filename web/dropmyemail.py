"""Dropmyemail (seed 000 + dropmyemail-v1.md): OAuth 2 at `/oauth/…`, the API under `/v1/`.

JSON only; every call carries `access_token` (query) or `Authorization: Bearer`; 20
requests per second per token (X-RateLimit-* headers, 429 with Retry-After). Errors are
OAuth-style `{"error": code, "error_description": ...}` with `WWW-Authenticate: Bearer` on
401/403.

No route is served yet: the OAuth flow and the accounts, mailboxes, messages, attachments,
contacts, migrates and restores come with their own issues. Their handlers authenticate with
`await self.principal(request, scope)`, which checks the scope (read implies email,
attachment and contact) and the per-token rate. Until the OAuth issue adds its own
credential kind, access tokens are "token" credentials (see `web.auth.DROPMYEMAIL`).
"""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Principal
from web.api import ApiApp
from web.auth import DROPMYEMAIL, CredentialResolver
from web.errors import OAuthErrors
from web.openapi import RouteTable
from web.ratelimit import RateLimiter, enforce
from web.settings import WebSettings


class DropmyemailApp(ApiApp):
    name = "dropmyemail"
    title = "Dropmyemail (seed 000): mailbox backup, migrate and restore; OAuth 2"
    shape = OAuthErrors()
    app = Klein()
    routes = RouteTable(app, "dropmyemail")

    def __init__(
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        token_limiter: RateLimiter,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.token_limiter = token_limiter

    async def principal(self, request: IRequest, scope: str) -> Principal:
        """The access token's user if it grants `scope`, within the per-token rate."""
        principal = await self.resolver.require(request, DROPMYEMAIL, scope=scope)
        enforce(request, self.token_limiter, ("token", principal.credential_id))
        return principal

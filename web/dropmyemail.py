"""Dropmyemail (seed 000 + dropmyemail-v1.md): OAuth 2 at `/oauth/…`, the API under `/v1/`.

JSON only; every call carries `access_token` (query) or `Authorization: Bearer`; 20
requests per second per token (X-RateLimit-* headers, 429 with Retry-After). Errors are
OAuth-style `{"error": code, "error_description": ...}` with `WWW-Authenticate: Bearer` on
401/403.

The OAuth 2 provider is `mailcore.oauth.OAuthProvider` (oauthlib underneath); this module
only translates HTTP to it and back. `POST /oauth/token` exchanges a code or rotates a
refresh token. Handlers of `/v1/` authenticate with `await self.principal(request, scope)`,
which resolves the access token through the provider, checks the scope (read implies email,
attachment and contact) and the per-token rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import urlencode

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Identity, Principal
from mailcore.oauth import OAuthProvider
from web.api import ApiApp
from web.auth import DROPMYEMAIL, AuthPolicy, CredentialResolver
from web.errors import ApiError, OAuthErrors
from web.openapi import Reply, RouteTable
from web.parsing import FORM_TYPE, media_type, read_body, read_fields
from web.ratelimit import RateLimiter, enforce
from web.replies import set_headers
from web.settings import WebSettings

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
        oauth: OAuthProvider,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.token_limiter = token_limiter
        self.oauth = oauth
        self.policy: AuthPolicy = dataclasses.replace(DROPMYEMAIL, lookup=self._lookup)

    async def _lookup(
        self, identity: Identity, secret: str, policy: AuthPolicy
    ) -> Principal | None:
        return await self.oauth.resolve(secret)

    async def principal(self, request: IRequest, scope: str) -> Principal:
        """The access token's user if it grants `scope`, within the per-token rate."""
        principal = await self.resolver.require(request, self.policy, scope=scope)
        enforce(request, self.token_limiter, ("token", principal.credential_id))
        return principal

    # -- OAuth 2 ------------------------------------------------------------------------

    @routes.route(
        "/oauth/token",
        "POST",
        summary="Exchange an authorization code, or a refresh token, for an access token",
        description="RFC 6749 §4.1.3 and §6. The client authenticates with client_id and "
        "client_secret in the form, or with HTTP Basic. Codes are single-use and live 5 "
        "minutes; a reused code revokes what was issued from it. A code issued with a PKCE "
        "challenge needs its code_verifier (S256). A refresh token is good once: the reply "
        "carries the next one. Errors are RFC 6749 §5.2 (`invalid_grant`, "
        "`invalid_client` with 401, ...).",
        body=TOKEN_INPUT,
        body_types=(FORM_TYPE, "application/json"),
        replies={200: Reply("The access token", TOKEN_REPLY)},
        errors=(400, 401),
    )
    async def token(self, request: IRequest) -> bytes:
        body = self._token_body(request)
        headers = {"Content-Type": FORM_TYPE}
        auth = request.getHeader(b"authorization")
        if auth is not None:
            try:
                headers["Authorization"] = auth.decode("ascii")
            except UnicodeDecodeError:
                raise ApiError(401, "Client authentication failed.",
                               code="invalid_client") from None
        uri = "https://dropmyemail.invalid/oauth/token"
        reply_headers, reply_body, status = await self.oauth.token(uri, body, headers)
        set_headers(request, {k: v for k, v in reply_headers.items()
                              if k.lower() != "content-type"})
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return reply_body.encode("utf-8")

    def _token_body(self, request: IRequest) -> str:
        """The token request as the form body oauthlib reads (JSON is accepted too)."""
        if media_type(request) == FORM_TYPE:
            raw = read_body(request, self.settings.json_max_body)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "The form is not valid UTF-8.") from None
        fields: dict[str, Any] = read_fields(
            request, self.settings.json_max_body, accept_multipart=False
        )
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(400, f"Parameter {key} must be a string.")
        return urlencode(fields)

"""safedrop (seed 003): the auth server at `/` and `/auth`, the API at `/dropbundles`.

Authentication: `GET /` (or `/auth`) with `X-Auth-User` (the account's e-mail address) and
`X-Auth-Key` (one of its API keys) answers 204 with a temporary `X-Auth-Token` (kind
"session", `session_token_ttl` seconds, 1 h by default). Every API call carries it as
`X-Auth-Token` (or `Auth-Token`); an expired or unknown token is a 401, and so is one whose
API key has been revoked since (the session is linked to its key: `parent_id`).

Input is form-encoded or multipart (JSON is accepted too), booleans are 0/1, dates RFC 3339,
output JSON; a resource that does not allow a method in its current state answers 405.

Working now: the auth server, which also answers a request carrying only an X-Auth-Token:
204 while that token is valid, 401 after. The drop bundle routes come with
their own issue; they authenticate with `await self.principal(request)`.
"""

from __future__ import annotations

import datetime

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Identity, Principal
from web.api import ApiApp
from web.auth import SAFEDROP, SAFEDROP_KEY, CredentialResolver
from web.errors import SafedropErrors
from web.openapi import Reply, RouteTable
from web.replies import empty_reply
from web.settings import WebSettings

TOKEN_HEADERS = {
    "X-Auth-Token": "The temporary token (new, or the one presented)",
    "X-Auth-Token-Expires": "When a new token expires (RFC 3339)",
}


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class SafedropApp(ApiApp):
    name = "safedrop"
    title = "safedrop (seed 003): secure file drops; X-Auth-User/X-Auth-Key, X-Auth-Token"
    shape = SafedropErrors()
    app = Klein()
    routes = RouteTable(app, "safedrop")

    def __init__(
        self, settings: WebSettings, *, resolver: CredentialResolver, identity: Identity
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.identity = identity

    async def principal(self, request: IRequest) -> Principal:
        """The token's user, or 401 (the token is unknown or has expired)."""
        return await self.resolver.require(request, SAFEDROP)

    @routes.route(
        ["/", "/auth"],
        "GET",
        summary="Obtain a temporary X-Auth-Token (or check one)",
        description="With `X-Auth-User` (the account's e-mail address) and `X-Auth-Key` "
        "(an API key): 204 with a new `X-Auth-Token`. With only `X-Auth-Token`: 204 while "
        "it is valid, 401 once it has expired.",
        auth=(SAFEDROP_KEY, SAFEDROP),
        replies={204: Reply("Authenticated", None, headers=TOKEN_HEADERS)},
    )
    async def authenticate(self, request: IRequest) -> bytes:
        user = request.getHeader(b"x-auth-user")
        key = request.getHeader(b"x-auth-key")
        if user is None and key is None and self.resolver.presented(request, SAFEDROP):
            await self.principal(request)
            return self._token_reply(request, self.resolver.presented(request, SAFEDROP), None)
        if not user or not user.strip():
            raise SAFEDROP_KEY.error("missing")
        principal = await self.resolver.require(request, SAFEDROP_KEY)
        if user.decode("utf-8", "replace").strip().lower() != principal.user.email.lower():
            raise SAFEDROP_KEY.error("invalid")
        token, info = await self.identity.create_credential(
            principal.user.id,
            "session",
            label="safedrop",
            scopes=principal.scopes,
            ttl=self.settings.session_token_ttl,
            parent_id=principal.credential_id,
        )
        return self._token_reply(request, token, info.expires_at)

    def _token_reply(
        self, request: IRequest, token: str | None, expires: datetime.datetime | None
    ) -> bytes:
        headers = {"X-Auth-Token": token or "", "Cache-Control": "no-store"}
        if expires is not None:
            headers["X-Auth-Token-Expires"] = rfc3339(expires)
        return empty_reply(request, 204, headers)

"""Mail API (seed 002): `/api/v1/auth/`, `/api/v1/mail/`, `/api/v1/mailboxes/`.

Replies are `{"message": ...}` with the seed's status codes (the auth endpoint's input
errors are `{"error": ...}`, as the seed shows). The credential is the `auth_key` from
`POST /api/v1/auth/`, in the `Auth-Key` header (also `auth_key` as header or query
parameter, or `Authorization: Token <key>`).

The seed's auth endpoint also names an application `api_key` ("403 API key is missing");
one identity serves every API here, so it is accepted and not required.

Working now: `POST /api/v1/auth/`. Mail and mailbox routes come with their own issue; they
authenticate with `await self.principal(request)`.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Principal
from web.api import ApiApp
from web.auth import MAIL_API, CredentialResolver
from web.errors import ApiError, MailApiErrors
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.parsing import FORM_TYPE, MULTIPART_TYPE
from web.settings import WebSettings

AUTH_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string"},
        "password": {"type": "string", "format": "password"},
    },
    "required": ["username", "password"],
}
AUTH_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {"auth_key": {"type": "string"}},
    "required": ["auth_key"],
}


def _given(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if isinstance(value, str) and value != "" else None


class MailApiApp(ApiApp):
    name = "mailapi"
    title = "Mail API (seed 002): drafts, outbox, mailboxes and access grants"
    shape = MailApiErrors()
    app = Klein()
    routes = RouteTable(app, "mailapi")

    def __init__(
        self, settings: WebSettings, *, resolver: CredentialResolver, login: PasswordLogin
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.login = login

    async def principal(self, request: IRequest) -> Principal:
        """The auth_key's user, or 401 `{"message": "unauthorized"}`."""
        return await self.resolver.require(request, MAIL_API)

    @routes.route(
        "/api/v1/auth/",
        "POST",
        summary="Authenticate and obtain an auth_key",
        body=AUTH_BODY,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        replies={200: Reply("The auth_key for every further call", AUTH_REPLY)},
        errors=(400, 401, 429),
    )
    async def authenticate(self, request: IRequest) -> bytes:
        """Each call creates a new auth_key; limited per client address."""
        data = self.fields(request)
        username = _given(data, "username")
        if username is None:
            raise ApiError(400, "Please provide username.", key="error")
        password = _given(data, "password")
        if password is None:
            raise ApiError(400, "Please provide password.", key="error")
        user = await self.login.check(request, username, password)
        if user is None:
            raise ApiError(401, "unauthorized")
        key = await self.login.issue_token(user, "mailapi-auth")
        return self.reply(request, {"auth_key": key}, headers={"Cache-Control": "no-store"})

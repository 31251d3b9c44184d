"""Mail API (seed 002): `/api/v1/auth/`, `/api/v1/mail/`, `/api/v1/mailboxes/`.

Replies are `{"message": ...}` with the seed's status codes (the auth endpoint's input
errors are `{"error": ...}`, as the seed shows). The credential is the `auth_key` from
`POST /api/v1/auth/`, in the `Auth-Key` header (also `auth_key` as header or query
parameter, or `Authorization: Token <key>`).

The seed's auth endpoint also names an application `api_key` ("403 API key is missing");
one identity serves every API here, so it is accepted and not required.

Mailboxes and grants: `/api/v1/mailboxes/…` (model in mailcore.mailapi). A refusal of the
model answers 400 (bad input), 401 (a right the caller does not hold, as the seed's "you
may not delete this email"), 404 (unknown or invisible) or 409 (already there).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Principal
from mailcore.mailapi import (
    CONFLICT,
    DENIED,
    INVALID,
    NOT_FOUND,
    RIGHTS,
    Access,
    Grant,
    MailApiError,
    MailboxService,
)
from web.api import ApiApp
from web.auth import MAIL_API, CredentialResolver
from web.errors import ApiError, MailApiErrors
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.parsing import FORM_TYPE, MULTIPART_TYPE, bool_field, collect_fields
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

RIGHTS_SCHEMA: dict[str, Any] = {r: {"type": "boolean"} for r in RIGHTS}
MAILBOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "email": {"type": "string"},
        "owner": {"type": "string", "description": "the owner's username"},
        "is_owner": {"type": "boolean"},
        **RIGHTS_SCHEMA,
    },
}
MAILBOXES_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {"mailboxes": {"type": "array", "items": MAILBOX_SCHEMA}},
}
GRANT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"username": {"type": "string"}, "is_owner": {"type": "boolean"},
                   **RIGHTS_SCHEMA},
}
ACCESS_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {"email": {"type": "string"},
                   "access": {"type": "array", "items": GRANT_SCHEMA}},
}
GRANT_BODY: dict[str, Any] = {
    "type": "object",
    "description": "JSON booleans, or 0/1 in a form; rights not given keep their value",
    "properties": RIGHTS_SCHEMA,
}
MESSAGE_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {"message": {"type": "string"}},
}
STATUS_OF_KIND = {INVALID: 400, DENIED: 401, NOT_FOUND: 404, CONFLICT: 409}


def model_error(error: MailApiError) -> ApiError:
    """A refusal of the model as the seed's `{"message": ...}` reply."""
    return ApiError(STATUS_OF_KIND.get(error.kind, 400), error.message)


def mailbox_object(access: Access) -> dict[str, Any]:
    box = access.mailbox
    return {"email": box.address, "owner": box.owner, "is_owner": access.is_owner,
            **access.rights.as_dict()}


def grant_object(grant: Grant) -> dict[str, Any]:
    return {"username": grant.username, "is_owner": grant.is_owner, **grant.rights.as_dict()}


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
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        login: PasswordLogin,
        mailboxes: MailboxService,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.login = login
        self.mailboxes = mailboxes

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

    # -- mailboxes and grants ------------------------------------------------------------

    @routes.route(
        "/api/v1/mailboxes/",
        "GET",
        summary="The mailboxes the caller may use, with its rights on each",
        auth=MAIL_API,
        replies={200: Reply("Owned and granted mailboxes, by address", MAILBOXES_REPLY)},
        errors=(401,),
    )
    async def list_mailboxes(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        found = await self.mailboxes.visible(principal.user.id)
        return self.reply(request, {"mailboxes": [mailbox_object(a) for a in found]})

    @routes.route(
        "/api/v1/mailboxes/<email>",
        "GET",
        summary="One mailbox and the caller's rights on it",
        auth=MAIL_API,
        replies={200: Reply("The mailbox", MAILBOX_SCHEMA)},
        errors=(401, 404),
    )
    async def get_mailbox(self, request: IRequest, email: str) -> bytes:
        principal = await self.principal(request)
        try:
            access = await self.mailboxes.access(principal.user.id, email)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, mailbox_object(access))

    @routes.route(
        "/api/v1/mailboxes/<email>",
        "DELETE",
        summary="Delete a mailbox with its mail and grants (owner only)",
        auth=MAIL_API,
        replies={200: Reply('`{"message": "mailbox deleted"}`', MESSAGE_REPLY)},
        errors=(401, 404),
    )
    async def delete_mailbox(self, request: IRequest, email: str) -> bytes:
        principal = await self.principal(request)
        try:
            await self.mailboxes.delete(principal.user.id, email)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, {"message": "mailbox deleted"},
                          headers={"Location": "/api/v1/mailboxes/"})

    @routes.route(
        "/api/v1/mailboxes/<email>/access/",
        "GET",
        summary="Who may use the mailbox (owner or allow_modify)",
        auth=MAIL_API,
        replies={200: Reply("The owner, then every grant by username", ACCESS_REPLY)},
        errors=(401, 404),
    )
    async def list_access(self, request: IRequest, email: str) -> bytes:
        principal = await self.principal(request)
        try:
            grants = await self.mailboxes.grants(principal.user.id, email)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, {"email": email.strip().lower(),
                                    "access": [grant_object(g) for g in grants]})

    @routes.route(
        "/api/v1/mailboxes/<email>/access/<username>",
        "GET",
        summary="View a user's access to the mailbox",
        auth=MAIL_API,
        replies={200: Reply("The user's rights", GRANT_SCHEMA)},
        errors=(401, 404),
    )
    async def get_access(self, request: IRequest, email: str, username: str) -> bytes:
        principal = await self.principal(request)
        try:
            grant = await self.mailboxes.grant_of(principal.user.id, email, username)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, grant_object(grant))

    @routes.route(
        "/api/v1/mailboxes/<email>/access/<username>",
        "PUT",
        summary="Grant mailbox access to a user",
        description="Only the owner or a holder of allow_modify; nobody grants a right it "
        "does not hold (401).",
        auth=MAIL_API,
        body=GRANT_BODY,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        replies={200: Reply("The user's rights now", GRANT_SCHEMA)},
        errors=(400, 401, 404),
    )
    async def put_access(self, request: IRequest, email: str, username: str) -> bytes:
        principal = await self.principal(request)
        data = self.fields(request)
        unknown = sorted(set(data) - set(RIGHTS) - {"auth_key", "api_key"})
        if unknown:
            raise ApiError(400, f"unknown field: {unknown[0]}")
        try:
            values = collect_fields({r: partial(bool_field, data, r) for r in RIGHTS})
        except ApiError as e:
            raise ApiError(400, e.message) from None
        changes = {k: v for k, v in values.items() if v is not None}
        try:
            grant = await self.mailboxes.set_grant(principal.user.id, email, username, changes)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, {"message": "access updated", **grant_object(grant)})

    @routes.route(
        "/api/v1/mailboxes/<email>/access/<username>",
        "DELETE",
        summary="Remove a user from the mailbox's access list",
        auth=MAIL_API,
        replies={200: Reply('`{"message": "access removed"}`', MESSAGE_REPLY)},
        errors=(400, 401, 404),
    )
    async def delete_access(self, request: IRequest, email: str, username: str) -> bytes:
        principal = await self.principal(request)
        try:
            await self.mailboxes.revoke(principal.user.id, email, username)
        except MailApiError as e:
            raise model_error(e) from None
        return self.reply(request, {"message": "access removed"})

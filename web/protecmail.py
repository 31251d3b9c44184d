"""Protecmail (seed 004): the filtering gateway's API, `Api-Key` header, envelope replies.

Every reply, errors included, is the envelope `{"request_id", "success", "msg", "data"}`
with a fresh request id (the one the access log shows); `msg` and `data` appear only when
there is something to say.

Working now: `GET /api/v1/ping`, `GET`/`PUT /api/v1/user`. Domains, addresses, quarantine,
token tanks and invoices come with their own issues.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import PROFILE_FIELDS, Identity, IdentityError, Principal
from web.api import ApiApp
from web.auth import PROTECMAIL, CredentialResolver
from web.context import context_of
from web.errors import ApiError, EnvelopeErrors, envelope_schema
from web.openapi import Reply, RouteTable
from web.settings import WebSettings

_ABSENT: Any = object()

USER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in PROFILE_FIELDS},
    "additionalProperties": False,
}
USER_EDIT_SCHEMA: dict[str, Any] = {
    **USER_SCHEMA,
    "description": "The edited User object; fields left out keep their value, nic cannot "
    "be changed.",
}


class ProtecmailApp(ApiApp):
    name = "protecmail"
    title = "Protecmail (seed 004): domains, quarantine, token tanks, account, invoices"
    shape = EnvelopeErrors()
    app = Klein()
    routes = RouteTable(app, "protecmail")

    def __init__(
        self, settings: WebSettings, *, resolver: CredentialResolver, identity: Identity
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.identity = identity

    async def principal(self, request: IRequest) -> Principal:
        """The API key's user, or a 401 envelope."""
        return await self.resolver.require(request, PROTECMAIL)

    def envelope(
        self,
        request: IRequest,
        *,
        data: Any = _ABSENT,
        msg: str | None = None,
        status: int = 200,
    ) -> bytes:
        """A successful reply in the envelope."""
        body: dict[str, Any] = {"request_id": context_of(request).request_id, "success": True}
        if msg is not None:
            body["msg"] = msg
        if data is not _ABSENT:
            body["data"] = data
        return self.reply(request, body, status)

    @routes.route(
        "/api/v1/ping",
        "GET",
        summary="Check that the API key works",
        auth=PROTECMAIL,
        replies={200: Reply('`msg` is "pong"', envelope_schema(None))},
    )
    async def ping(self, request: IRequest) -> bytes:
        await self.principal(request)
        return self.envelope(request, msg="pong")

    @routes.route(
        "/api/v1/user",
        "GET",
        summary="Account info",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the User object", envelope_schema(USER_SCHEMA))},
    )
    async def get_user(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        return self.envelope(request, data=principal.user.profile())

    @routes.route(
        "/api/v1/user",
        "PUT",
        summary="Edit account",
        auth=PROTECMAIL,
        body=USER_EDIT_SCHEMA,
        replies={200: Reply("Saved", envelope_schema(None))},
        errors=(409,),
    )
    async def put_user(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        changes = self.json_object(request)
        for key, value in changes.items():
            if key not in PROFILE_FIELDS:
                raise ApiError(400, f"unknown field: {key}", fields={key: ["Unknown field."]})
            if not isinstance(value, str):
                raise ApiError(
                    400, f"{key} must be a string", fields={key: ["Must be a string."]}
                )
        try:
            await self.identity.update_profile(principal.user.id, changes)
        except IdentityError as e:
            # Identity words a taken e-mail address "A user with that email already exists."
            conflict = e.field == "email" and "already exists" in e.message
            fields = {e.field: [e.message]} if e.field else None
            raise ApiError(409 if conflict else 400, e.message, fields=fields) from None
        return self.envelope(request)

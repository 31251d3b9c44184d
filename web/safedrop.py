"""safedrop (seed 003): the auth server at `/` and `/auth`, the API at `/dropbundles`.

Authentication: `GET /` (or `/auth`) with `X-Auth-User` (the account's e-mail address) and
`X-Auth-Key` (one of its API keys) answers 204 with a temporary `X-Auth-Token` (kind
"session", `session_token_ttl` seconds, 1 h by default). Every API call carries it as
`X-Auth-Token` (or `Auth-Token`); an expired or unknown token is a 401, and so is one whose
API key has been revoked since (the session is linked to its key: `parent_id`). A user
makes `[web] safedrop_user_rate` requests (20 a second); a client address `[web]
bad_credential_rate` ones with a missing or bad key or token (100 an hour, shared with
Protecmail and the Mail API): 429 beyond, with Retry-After and the X-RateLimit-* headers.

Input is form-encoded or multipart (JSON is accepted too), booleans are 0/1, dates RFC 3339,
output JSON; a resource that does not allow a method in its current state answers 405.

The auth server also answers a request carrying only an X-Auth-Token: 204 while that token
is valid, 401 after. Bundles, recipients and files are `mailcore.safedrop`'s; this module
only translates the wire format: fields are checked here (unknown ones, wrong types, bad
dates are 400s naming the field), what the service refuses becomes the seed's status (400
bad input, 404 not yours or unknown, 405 once sent, 413 too large; a send past the user's
`[limits]` cap on recipients, mailcore.sendcaps, is a 429 with Retry-After, the bundle
unsent), and replies carry no secret: `secure_message` reads back as a boolean, `password`
not at all.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.identity import Identity, Principal
from mailcore.identity.passwords import MAX_PASSWORD_LENGTH
from mailcore.identity.service import name_key
from mailcore.safedrop.model import (
    MAX_TEXT,
    MAX_VALID_FOR,
    RECEIPT_VALUES,
    Bundle,
    DropError,
    DropFile,
    DropNotFound,
    DropRecipient,
    DropSent,
    TooLarge,
    check_email,
    check_expiry,
    check_subject,
    check_telephone,
)
from mailcore.safedrop.service import SafedropService
from mailcore.sendcaps import SendCapped, http_refusal
from mailcore.uploads import decoded_least
from web.api import ApiApp, is_head
from web.auth import SAFEDROP, SAFEDROP_KEY, CredentialResolver
from web.errors import ApiError, SafedropErrors, field_error
from web.jsonstream import stream_json_array
from web.openapi import Reply, RouteTable
from web.parsing import (
    FORM_TYPE,
    MULTIPART_TYPE,
    body_file,
    bool_field,
    collect_fields,
    int_field,
    media_type,
    query_params,
    string_field,
)
from web.ratelimit import InFlight, RateLimiter, admit
from web.replies import empty_reply
from web.settings import WebSettings

T = TypeVar("T")

TOKEN_HEADERS = {
    "X-Auth-Token": "The temporary token (new, or the one presented)",
    "X-Auth-Token-Expires": "When a new token expires (RFC 3339)",
}


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- the drop bundles ------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
BAD_DATE = 'Enter an RFC 3339 date and time with a zone, like "2010-12-19T16:39:57-08:00".'
UNKNOWN_FIELD = "Unknown field."
SENT = "The safedrop has been sent; it can no longer be changed."
MAX_SUBJECT = 1000

# Where files are uploaded: allowed a body up to `[safedrop] max_file_size` (as base64 may
# encode it: mailcore.uploads.encoded_bound) plus room for the multipart framing, instead of
# `[web] max_body`.
UPLOAD_PATH = re.compile(r"/dropbundles/([0-9]+)/dropfiles/?")
UPLOAD_OVERHEAD = 1024 * 1024
# The largest bundle id a path may name (a longer one names nothing: a 404).
MAX_ID_DIGITS = 18
UPLOADS_UNDER_WAY = "uploads"

BUNDLE_FIELDS = (
    "subject", "message", "secure_message", "expiry_date", "email_receipt_when", "password",
    "read_remove", "allow_comments", "require_token_auth",
)
RECIPIENT_FIELDS = ("email", "telephone", "valid_for")

_BOOL = {"type": "boolean"}
BUNDLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "read_remove": _BOOL,
        "allow_comments": _BOOL,
        "secure_message": {**_BOOL, "description": "Whether a secure message is set"},
        "expiry_date": {"type": ["string", "null"], "format": "date-time"},
        "require_token_auth": _BOOL,
        "message": {"type": "string"},
        "id": {"type": "integer"},
        "email_receipt_when": {"type": "integer", "enum": list(RECEIPT_VALUES)},
        "subject": {"type": "string"},
    },
    "required": ["id"],
}
_FLAG = {"type": "integer", "enum": [0, 1], "description": "0 or 1 (true/false accepted)"}
ONE_VALUE = ("A form or multipart field, or a JSON key, given twice with different values "
             "is a 400 (one value each).")
BUNDLE_BODY: dict[str, Any] = {
    "type": "object",
    "description": ONE_VALUE,
    "properties": {
        "subject": {"type": "string", "description": "One line: no control character, "
                    "its RFC 2047 encoded words decoded too (else a 400)"},
        "message": {"type": "string"},
        "secure_message": {"type": "string", "description": "Write-only; encrypted at rest"},
        "expiry_date": {"type": ["string", "null"], "format": "date-time",
                        "description": "RFC 3339, still to come (a date passed is a 400); "
                        "empty or null: never expires"},
        "email_receipt_when": {
            "type": "integer", "enum": list(RECEIPT_VALUES),
            "description": "0 never; 1 each open; 2 first open per recipient; 3 each "
            "download; 4 (default) once every recipient has downloaded every file",
        },
        "password": {"type": "string", "format": "password",
                     "description": "Write-only; stored hashed; empty removes it"},
        "read_remove": {**_FLAG, "default": 1},
        "allow_comments": {**_FLAG, "default": 0},
        "require_token_auth": {**_FLAG, "default": 0},
    },
    "additionalProperties": False,
}
RECIPIENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "telephone": {"type": "string"},
        "valid_for": {"type": "integer"},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["id", "email"],
}
RECIPIENT_BODY: dict[str, Any] = {
    "type": "object",
    "description": ONE_VALUE,
    "properties": {
        "email": {"type": "string", "format": "email"},
        "telephone": {"type": "string", "pattern": "^([1-9][0-9]{6,14})?$",
                      "description": "International digits without '+'"},
        "valid_for": {"type": "integer", "minimum": 0, "maximum": MAX_VALID_FOR,
                      "description": "Deprecated: seconds of access after sending"},
    },
    "additionalProperties": False,
}
FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "the_file": {"type": "string"}},
    "required": ["id", "the_file"],
}
FILE_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {"the_file": {"type": "string", "format": "binary"}},
    "required": ["the_file"],
}
INPUT_TYPES = (FORM_TYPE, MULTIPART_TYPE, "application/json")


def parse_rfc3339(name: str, value: Any) -> datetime.datetime | None:
    """An RFC 3339 date-time with its zone ("" or null: None), or a 400 naming `name`."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise field_error(name, BAD_DATE)
    m = _RFC3339.fullmatch(value.strip())
    if m is None:
        raise field_error(name, BAD_DATE)
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    fraction = m.group(7) or ""
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    zone = m.group(8)
    try:
        if zone in ("Z", "z"):
            tz = datetime.UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            hours, minutes = int(zone[1:3]), int(zone[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError(zone)
            tz = datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))
        moment = datetime.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        return moment.astimezone(datetime.UTC)
    except (ValueError, OverflowError):
        raise field_error(name, BAD_DATE) from None


def _refuse_unknown(data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ApiError(
            400, "; ".join(f"{k}: {UNKNOWN_FIELD}" for k in unknown),
            fields={k: [UNKNOWN_FIELD] for k in unknown},
        )


def _given(data: Mapping[str, Any], name: str) -> bool:
    return name in data


def bundle_changes(data: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """The bundle fields given in `data`, checked and typed (all bad fields at once); an
    expiry date must be after `now`."""
    _refuse_unknown(data, BUNDLE_FIELDS)
    checks: dict[str, Callable[[], Any]] = {}
    if _given(data, "subject"):
        checks["subject"] = lambda: _checked(check_subject, string_field(
            data, "subject", required=False, allow_blank=True, max_length=MAX_SUBJECT,
            line=True) or "")
    for name in ("message", "secure_message"):
        if _given(data, name):
            checks[name] = lambda name=name: string_field(  # type: ignore[misc]
                data, name, required=False, allow_blank=True, trim=False,
                max_length=MAX_TEXT, multiline=True) or ""
    if _given(data, "password"):
        checks["password"] = lambda: string_field(
            data, "password", required=False, allow_blank=True, trim=False,
            max_length=MAX_PASSWORD_LENGTH) or ""
    if _given(data, "expiry_date"):
        checks["expiry_date"] = lambda: _checked(
            check_expiry, parse_rfc3339("expiry_date", data["expiry_date"]), now)
    if _given(data, "email_receipt_when"):
        checks["email_receipt_when"] = lambda: _receipt_when(data)
    for name in ("read_remove", "allow_comments", "require_token_auth"):
        if _given(data, name):
            checks[name] = lambda name=name: _flag(data, name)  # type: ignore[misc]
    return collect_fields(checks)


def _flag(data: Mapping[str, Any], name: str) -> bool:
    value = bool_field(data, name, required=True)
    assert value is not None
    return value


def _receipt_when(data: Mapping[str, Any]) -> int:
    value = int_field(data, "email_receipt_when", required=True, minimum=0,
                      maximum=max(RECEIPT_VALUES))
    assert value is not None
    return value


def recipient_changes(data: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    """The recipient fields given in `data`, checked (email is required when creating)."""
    _refuse_unknown(data, RECIPIENT_FIELDS)
    checks: dict[str, Callable[[], Any]] = {}
    if creating or _given(data, "email"):
        checks["email"] = lambda: _checked(
            check_email, string_field(data, "email", max_length=320, line=True) or ""
        )
    if _given(data, "telephone"):
        checks["telephone"] = lambda: _checked(
            check_telephone,
            string_field(data, "telephone", required=False, allow_blank=True, max_length=32,
                         line=True) or "",
        )
    if _given(data, "valid_for"):
        checks["valid_for"] = lambda: int_field(data, "valid_for", required=True, minimum=0,
                                                maximum=MAX_VALID_FOR)
    return collect_fields(checks)


def send_asked(params: Mapping[str, str]) -> bool:
    """Whether the query asks for the bundle to be sent: `send` present without a value, as
    the seed writes it (`?send`), or a true boolean. A false one (`send=0`: the seed's
    booleans are 0 and 1) shows the bundle; any other value is a 400 naming `send`, never
    a guess that mails every recipient."""
    if "send" not in params:
        return False
    if not params["send"].strip():
        return True
    return bool(bool_field(params, "send", required=True))


def _checked(check: Callable[..., T], *args: Any) -> T:
    """`check(*args)`, a DropError of the model being the 400 of the field it names."""
    try:
        return check(*args)
    except DropError as e:
        raise field_error(e.field or "", e.message) from None


def bundle_json(bundle: Bundle) -> dict[str, Any]:
    """A bundle as seed 003 shows it (its key order); no secret, only whether one is set."""
    return {
        "read_remove": bundle.read_remove,
        "allow_comments": bundle.allow_comments,
        "secure_message": bundle.has_secure_message,
        "expiry_date": rfc3339(bundle.expiry_date) if bundle.expiry_date else None,
        "require_token_auth": bundle.require_token_auth,
        "message": bundle.message,
        "id": bundle.id,
        "email_receipt_when": bundle.email_receipt_when,
        "subject": bundle.subject,
    }


async def _bundles_json(bundles: AsyncIterable[Bundle]) -> AsyncGenerator[dict[str, Any]]:
    """Seed 003's bundles (`bundle_json`) as they are read."""
    async for bundle in bundles:
        yield bundle_json(bundle)


def recipient_json(recipient: DropRecipient) -> dict[str, Any]:
    return {
        "id": recipient.id,
        "telephone": recipient.telephone,
        "valid_for": recipient.valid_for,
        "email": recipient.email,
    }


def file_json(drop_file: DropFile) -> dict[str, Any]:
    return {"id": drop_file.id, "the_file": drop_file.name}


def drop_error(error: Exception) -> ApiError:
    """The reply for what the drop service refused."""
    if isinstance(error, DropNotFound):
        return ApiError(404, SafedropErrors().not_found())
    if isinstance(error, SendCapped):  # [limits]: the bundle stays unsent
        status, why, headers = http_refusal(error.verdict)
        return ApiError(status, why, headers=headers)
    if isinstance(error, DropSent):
        # What the sent state leaves: reading (ApiApp.with_allow adds the HEAD it answers).
        return ApiError(405, SENT, headers={"Allow": "GET"})
    if isinstance(error, DropError):
        status = 413 if isinstance(error, TooLarge) else 400
        if error.field:
            return ApiError(status, f"{error.field}: {error.message}",
                            fields={error.field: [error.message]})
        return ApiError(status, error.message)
    raise error


class SafedropApp(ApiApp):
    name = "safedrop"
    challenge = 'X-Auth-Token realm="safedrop"'
    title = "safedrop (seed 003): secure file drops; X-Auth-User/X-Auth-Key, X-Auth-Token"
    shape = SafedropErrors()
    app = Klein()
    routes = RouteTable(app, "safedrop", errors=(429,))
    # "A 400 'Bad Request' will be returned in response to a PUT or POST request on a
    # resource when the form encoded properties do not meet requirements" (the seed).
    unsupported_media_status = 400
    one_value_fields = True  # email=a&email=b added b only

    def __init__(
        self, settings: WebSettings, *, resolver: CredentialResolver, identity: Identity,
        drops: SafedropService, user_limiter: RateLimiter, anonymous_limiter: RateLimiter,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.user_limiter = user_limiter
        self.anonymous_limiter = anonymous_limiter
        self.identity = identity
        self.drops = drops
        # Each user's uploads under way in this process ([safedrop] max_concurrent_uploads).
        self.uploads = InFlight(drops.settings.max_concurrent_uploads)

    async def principal(self, request: IRequest) -> Principal:
        """The token's user within `[web] safedrop_user_rate`, or 401 (the token is unknown
        or has expired; 429 once the client's address has spent `[web]
        bad_credential_rate`)."""
        return await admit(request, self.resolver.require(request, SAFEDROP),
                           users=self.user_limiter, anonymous=self.anonymous_limiter)

    async def key_principal(self, request: IRequest, user: bytes | None) -> Principal:
        """The user whose e-mail address is `user` (X-Auth-User) if the X-Auth-Key is one of
        its API keys, within the same rates as `principal`."""
        return await admit(request, self._key_owner(request, user),
                           users=self.user_limiter, anonymous=self.anonymous_limiter)

    async def _key_owner(self, request: IRequest, user: bytes | None) -> Principal:
        if not user or not user.strip():
            raise SAFEDROP_KEY.error("missing")
        if len({u.strip() for u in request.requestHeaders.getRawHeaders(b"x-auth-user")
                or ()} - {b""}) > 1:
            raise SAFEDROP_KEY.ambiguous()  # two accounts named: which one cannot be told
        principal = await self.resolver.require(request, SAFEDROP_KEY)
        if name_key(user.decode("utf-8", "replace")) != name_key(principal.user.email):
            raise SAFEDROP_KEY.error("invalid")
        return principal

    @routes.route(
        ["/", "/auth"],
        "GET",
        summary="Obtain a temporary X-Auth-Token (or check one)",
        description="With `X-Auth-User` (the account's e-mail address) and `X-Auth-Key` "
        "(an API key): 204 with a new `X-Auth-Token` (an account keeps its newest 1,000: "
        "one more ends the oldest). With only `X-Auth-Token`: 204 while it is valid, 401 "
        "once it has expired. A HEAD checks the key as the GET does (204 or 401) and "
        "makes no token: its 204 has no `X-Auth-Token`.",
        auth=(SAFEDROP_KEY, SAFEDROP),
        replies={204: Reply("Authenticated", None, headers=TOKEN_HEADERS)},
    )
    async def authenticate(self, request: IRequest) -> bytes:
        user = request.getHeader(b"x-auth-user")
        key = request.getHeader(b"x-auth-key")
        if user is None and key is None and self.resolver.presented(request, SAFEDROP):
            await self.principal(request)
            return self._token_reply(request, self.resolver.presented(request, SAFEDROP), None)
        principal = await self.key_principal(request, user)
        if is_head(request):
            # A probe of the auth server (`curl -I`, a monitor) makes no session: each one
            # would be a live token nobody holds, and one more of the 1,000 ends the oldest.
            return self._token_reply(request, None, None)
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
        headers = {"Cache-Control": "no-store"}
        if token is not None:
            headers["X-Auth-Token"] = token
        if expires is not None:
            headers["X-Auth-Token-Expires"] = rfc3339(expires)
        return empty_reply(request, 204, headers)

    # -- drop bundles ----------------------------------------------------------------------

    async def _do(self, work: Awaitable[T]) -> T:
        """Await the service; what it refused becomes the seed's 400/404/405/413."""
        try:
            return await work
        except (DropError, DropNotFound, DropSent, SendCapped) as e:
            raise drop_error(e) from None

    def _input(self, request: IRequest) -> dict[str, Any]:
        # The seed's requests send form bodies with no Content-Type (`POST /dropbundles`
        # ... `message=Lorem+ipsum...&subject=Lorem+Ipsum`): such a body is read as one.
        return self.fields(request, untyped_form=True)

    @routes.route(
        "/dropbundles",
        "GET",
        summary="List your safedrops",
        auth=SAFEDROP,
        description="Every bundle of the user, oldest first, sent ones included. The array "
        "is written as it is read (chunked, no Content-Length).",
        replies={200: Reply("Every bundle of the user", {"type": "array", "items": BUNDLE_SCHEMA})},
    )
    async def list_bundles(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        # Written as read, a batch of bundles at a time (see web.jsonstream).
        await stream_json_array(request, _bundles_json(self.drops.bundles(principal.user.id)))
        return b""

    @routes.route(
        "/dropbundles",
        "POST",
        summary="Create a safedrop",
        description="Defaults: read_remove=1, allow_comments=0, require_token_auth=0, "
        "email_receipt_when=4, no expiry. read_remove and allow_comments together are a 400. "
        "`password` and `secure_message` are write-only. A user has at most `[safedrop] "
        "max_bundles_per_user` bundles not yet sent (10,000; 0: no limit): one more is a 400 "
        "naming the cap, and nothing is stored.",
        auth=SAFEDROP,
        body=BUNDLE_BODY,
        body_types=INPUT_TYPES,
        replies={200: Reply("The new bundle", BUNDLE_SCHEMA)},
    )
    async def create_bundle(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        changes = bundle_changes(self._input(request), self.drops.now())
        bundle = await self._do(self.drops.create_bundle(principal.user.id, changes))
        return self.reply(request, bundle_json(bundle))

    @routes.route(
        "/dropbundles/<int:bundle_id>",
        "GET",
        summary="Show a safedrop, or send it (`?send`)",
        description="With `?send`: notify every recipient (one mail each, with a link of "
        "its own) and answer `200 text/plain` `OK`; afterwards the bundle, its recipients "
        "and files can no longer be changed (405). Sending with no recipient or no file is "
        "a 400. A send past the user's `[limits]` caps on recipients "
        "(`user_recipients_per_hour`, `user_recipients_per_day`: the recipients of all the "
        "user's safedrop and Mail API mail in any 60 minutes, any 24 hours) leaves the "
        "bundle unsent: 429 with Retry-After (when it would pass), or 400 when the bundle "
        "alone has more recipients than a cap. A HEAD with `?send` answers what the send "
        "would and sends nothing.",
        auth=SAFEDROP,
        query={"send": {"type": "string",
                        "description": "Present without a value (the seed's `?send`), or "
                        "a true boolean (1, true, yes, on): send the bundle. A false one "
                        "(0, false, no, off): show it, as without `send`. Any other "
                        "value, or two different ones, is a 400 naming `send`, nothing "
                        "sent"}},
        replies={200: Reply("The bundle (or `OK` after sending)", BUNDLE_SCHEMA,
                            alternatives={"text/plain": {"type": "string", "enum": ["OK"]}}),
                 429: Reply(
                     "Rate limited: the user's requests (`[web] safedrop_user_rate`), or "
                     "(`?send`) its cap on recipients, `{\"error\": \"sending limit "
                     "reached: ...\"}`, the bundle unsent",
                     SafedropErrors().schema(),
                     headers={"Retry-After": "Seconds until the request, or the send, "
                              "would pass",
                              "X-RateLimit-Limit": "Requests the user's bucket holds",
                              "X-RateLimit-Remaining": "Requests left now",
                              "X-RateLimit-Reset": "Epoch seconds when the bucket is full "
                              "again"})},
    )
    async def show_bundle(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        if send_asked(query_params(request)):
            # A HEAD answers what the send would, and sends nothing (is_head).
            if is_head(request):
                await self._do(self.drops.check_send(principal.user.id, bundle_id))
            else:
                await self._do(self.drops.send(principal.user.id, bundle_id))
            request.setResponseCode(200)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"OK"
        bundle = await self._do(self.drops.bundle(principal.user.id, bundle_id))
        return self.reply(request, bundle_json(bundle))

    @routes.route(
        "/dropbundles/<int:bundle_id>",
        "PUT",
        summary="Update a safedrop (before it is sent)",
        auth=SAFEDROP,
        body=BUNDLE_BODY,
        body_types=INPUT_TYPES,
        replies={200: Reply("The bundle", BUNDLE_SCHEMA)},
    )
    async def update_bundle(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        changes = bundle_changes(self._input(request), self.drops.now())
        bundle = await self._do(self.drops.update_bundle(principal.user.id, bundle_id, changes))
        return self.reply(request, bundle_json(bundle))

    # -- recipients ------------------------------------------------------------------------

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropbundlerecipients",
        "GET",
        summary="List the recipients of a safedrop",
        auth=SAFEDROP,
        replies={200: Reply("The recipients", {"type": "array", "items": RECIPIENT_SCHEMA})},
    )
    async def list_recipients(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        found = await self._do(self.drops.recipients(principal.user.id, bundle_id))
        return self.reply(request, [recipient_json(r) for r in found])

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropbundlerecipients",
        "POST",
        summary="Add a recipient to a safedrop",
        description="`telephone`: international digits without '+' (recipients with one get "
        "their one-time code by SMS when `[safedrop] sms_gateway` is set, else by mail). "
        "`valid_for` is deprecated: seconds of access after sending. An address is a "
        "recipient of a bundle once (in any case): adding it again is a 400 naming `email`.",
        auth=SAFEDROP,
        body={**RECIPIENT_BODY, "required": ["email"]},
        body_types=INPUT_TYPES,
        replies={200: Reply("The new recipient", RECIPIENT_SCHEMA)},
    )
    async def add_recipient(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        values = recipient_changes(self._input(request), creating=True)
        found = await self._do(self.drops.add_recipient(principal.user.id, bundle_id, values))
        return self.reply(request, recipient_json(found))

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropbundlerecipients/<int:recipient_id>",
        "GET",
        summary="Show a recipient",
        auth=SAFEDROP,
        replies={200: Reply("The recipient", RECIPIENT_SCHEMA)},
    )
    async def show_recipient(self, request: IRequest, bundle_id: int, recipient_id: int) -> bytes:
        principal = await self.principal(request)
        found = await self._do(self.drops.recipient(principal.user.id, bundle_id, recipient_id))
        return self.reply(request, recipient_json(found))

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropbundlerecipients/<int:recipient_id>",
        "PUT",
        summary="Update a recipient (before the safedrop is sent)",
        description="An `email` another recipient of the bundle has is a 400.",
        auth=SAFEDROP,
        body=RECIPIENT_BODY,
        body_types=INPUT_TYPES,
        replies={200: Reply("The recipient", RECIPIENT_SCHEMA)},
    )
    async def update_recipient(
        self, request: IRequest, bundle_id: int, recipient_id: int
    ) -> bytes:
        principal = await self.principal(request)
        changes = recipient_changes(self._input(request), creating=False)
        found = await self._do(
            self.drops.update_recipient(principal.user.id, bundle_id, recipient_id, changes)
        )
        return self.reply(request, recipient_json(found))

    # -- files -----------------------------------------------------------------------------

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropfiles",
        "GET",
        summary="List the files of a safedrop (names only)",
        auth=SAFEDROP,
        replies={200: Reply("The files", {"type": "array", "items": FILE_SCHEMA})},
    )
    async def list_files(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        found = await self._do(self.drops.file_list(principal.user.id, bundle_id))
        return self.reply(request, [file_json(f) for f in found])

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropfiles",
        "POST",
        summary="Add a file to a safedrop (multipart/form-data, field `the_file`)",
        description="The upload is written to disk as it is parsed, never held in memory; "
        "it is bounded by `[safedrop] max_file_size` (413) and the bundle's total "
        "`max_bundle_size`, counting the file's own bytes (a part's "
        "Content-Transfer-Encoding, base64 or quoted-printable, is undone; the body may be "
        "the largest file as base64, 11/8 of it, plus 1 MiB); a bundle holds at most "
        "`max_files` files (400). A failed upload leaves no file and no row. A user has "
        "at most `[safedrop] max_concurrent_uploads` uploads under way at once (429). A "
        "body over `[web] json_max_body` is read only once its token is known good (401 "
        "before it, else); one over `[web] max_body` is also refused before it is read when "
        "the bundle is not the caller's (404), is sent (405) or has no room for the file "
        "its declared length holds at least (413; as base64, 8/11 of what is left once 1 "
        "MiB of framing is taken off).",
        auth=SAFEDROP,
        body=FILE_BODY,
        body_types=(MULTIPART_TYPE,),
        replies={200: Reply("The new file", FILE_SCHEMA)},
        errors=(404, 405, 413),
    )
    async def add_file(self, request: IRequest, bundle_id: int) -> bytes:
        principal = await self.principal(request)
        bundle = await self._do(self.drops.bundle(principal.user.id, bundle_id))
        if bundle.sent_at is not None:
            raise drop_error(DropSent())
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        content = body_file(request)
        if media_type(request) != MULTIPART_TYPE or content is None:
            raise ApiError(
                400, "Send the file as multipart/form-data, in the field the_file.",
                fields={"the_file": ["This field is required."]},
            )
        refusal = self._upload_slot(request, principal.user.id)
        if refusal is not None:
            raise refusal
        found = await self._do(
            self.drops.add_file(principal.user.id, bundle_id, content_type, content)
        )
        return self.reply(request, file_json(found))

    async def admit_upload(self, request: IRequest, principal: Principal) -> ApiError | None:
        """The upload gate's question for a file upload whose body is not read yet: the
        reply that would refuse it (404 not the user's bundle, 405 sent, 400 `max_files`,
        413 no room for the declared length, 429 `max_concurrent_uploads` under way), or
        None once it has taken one of the user's upload slots (given back when the request
        ends)."""
        path = request.uri.split(b"?", 1)[0].decode("latin-1")
        match = UPLOAD_PATH.fullmatch(path)
        if match is None or len(match.group(1)) > MAX_ID_DIGITS:
            return drop_error(DropNotFound())
        declared = (request.getHeader(b"content-length") or b"").strip()
        # The fewest bytes the file decodes to (a base64 part is up to 11/8 of it): the
        # limits count the file's own bytes.
        least = decoded_least(int(declared) - UPLOAD_OVERHEAD) if declared.isdigit() else 0
        user_id = principal.user.id
        try:
            await self.drops.check_upload(user_id, int(match.group(1)), least)
        except (DropError, DropNotFound, DropSent) as e:
            return drop_error(e)
        return self._upload_slot(request, user_id)

    def _upload_slot(self, request: IRequest, user_id: int) -> ApiError | None:
        """Take one of the user's upload slots for this request, held until it ends (a body
        over [web] max_body took it before it was read: `admit_upload`); the 429 when the
        user has every slot under way."""
        if getattr(request, "upload_slot", False):
            return None
        if not self.uploads.take(user_id):
            return self.uploads.refusal(UPLOADS_UNDER_WAY)
        cast(Any, request).upload_slot = True
        cast(Any, request).notifyFinish().addBoth(lambda _: self.uploads.give_back(user_id))
        return None

    @routes.route(
        "/dropbundles/<int:bundle_id>/dropfiles/<int:file_id>",
        "GET",
        summary="Show a file (its name; contents are not served by the API)",
        auth=SAFEDROP,
        replies={200: Reply("The file", FILE_SCHEMA)},
    )
    async def show_file(self, request: IRequest, bundle_id: int, file_id: int) -> bytes:
        principal = await self.principal(request)
        found = await self._do(self.drops.file(principal.user.id, bundle_id, file_id))
        return self.reply(request, file_json(found))

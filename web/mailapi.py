"""Mail API (seed 002): `/api/v1/auth/`, `/api/v1/mail/`, `/api/v1/mailboxes/`.

Replies are `{"message": ...}` with the seed's status codes; every error of the auth
endpoint is `{"error": ...}` instead (a wrong password, bad input, a limit), as the seed
shows its errors there. The credential is the `auth_key` from
`POST /api/v1/auth/`, in the `Auth-Key` header (also `auth_key` or `auth_token` as header
or query parameter, header `token`, or `Authorization: Token <key>`), or, in none of those,
as field `auth_key` or `auth_token` of a JSON or form-encoded body: the seed lists
`auth_token` among the parameters of `POST /api/v1/mail/` and "HEADERS: token" for
`GET /api/v1/mailboxes/`. A multipart body is streamed after the caller is
known, so its fields carry no credential. A user makes `[web] mailapi_user_rate`
requests (20 a second); a client address `[web] bad_credential_rate` ones with a missing or
bad auth_key or api_key (100 an hour, shared with Protecmail and safedrop): 429 beyond, with
Retry-After and the X-RateLimit-* headers.

The seed's auth endpoint also names an application `api_key` (query or form parameter
`api_key`, or header `Api-Key`): any user's API key (the kind Protecmail's `Api-Key` takes).
`HEAD /api/v1/auth/` checks one (200, or 403); `POST /api/v1/auth/` requires one only with
`[mailapi] require_api_key = true` (403 `{"error": "API key is missing."}`), and refuses a
wrong one either way.

Mail: `/api/v1/mail/` (GET a keyset page, POST a draft or outbox mail) and
`/api/v1/mail/{id}` (GET, PUT, DELETE), with the seed's status codes and messages; the
model is mailcore.mailapi.mail. A multipart POST or PUT is not parsed here: its body goes to
MailService.receive, which streams the file parts to disk within the `[mailapi]` limits
(413 beyond), and `/api/v1/mail/{id}/attachments/{n}` streams a file back a chunk at a time.
A write that would take its mailbox past its quota (its own, set by the operator, else
`[mailapi] mailbox_quota_bytes`) stores nothing and
answers 507 `{"message": "mailbox full: ..."}`; a mailbox shows its `used_bytes` and
`quota_bytes`. So does a new mail kept as a draft in a mailbox holding `[mailapi]
max_drafts_per_mailbox` drafts (an empty draft takes no byte of the quota); a mail sent at
once, and an edit of a draft, are not refused by it.
A send past the caller's `[limits]` cap on recipients (mailcore.sendcaps) keeps the mail a
draft and answers 429 `{"message": "sending limit reached: ... - stored email as draft",
"id": ...}` with Retry-After (400, no Retry-After, when the mail alone is over a cap).

Mailboxes and grants: `/api/v1/mailboxes/…` (model in mailcore.mailapi). A refusal of the
model answers 400 (bad input), 401 (a right the caller does not hold, as the seed's "you
may not delete this email"), 404 (unknown or invisible) or 409 (already there; a mailbox
whose outbox holds mail; a change, other than `read`, of a mail that is no draft).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mailcore.identity import Principal
from mailcore.mailapi import (
    CONFLICT,
    DENIED,
    INVALID,
    NOT_FOUND,
    QUOTA,
    RIGHTS,
    Access,
    Grant,
    MailApiError,
    MailboxService,
)
from mailcore.mailapi.counts import effective_quota
from mailcore.mailapi.files import TOO_LARGE, StoredFile
from mailcore.mailapi.listing import GONE_KEEP, PAGE_CHARS
from mailcore.mailapi.mail import (
    DEFAULT_COUNT,
    FIELDS,
    MAX_COUNT,
    MAX_RECIPIENTS,
    MAX_SUBJECT,
    Download,
    Edit,
    Mail,
    MailService,
    Outcome,
    Written,
)
from mailcore.outages import outage
from mailcore.sendcaps import http_refusal
from mailcore.store.schema.mailapi import DRAFT, INBOX
from mailcore.uploads import CHUNK, shielded
from web.api import ApiApp, is_head
from web.auth import MAIL_API, CredentialResolver
from web.errors import ApiError, MailApiErrors, outage_error
from web.login import PasswordLogin
from web.openapi import Reply, RouteTable
from web.pacing import paced
from web.parsing import (
    FORM_TYPE,
    MULTIPART_TYPE,
    body_file,
    bool_field,
    collect_fields,
    is_json_type,
    media_type,
    parse_int,
    query_lists,
    query_params,
    string_field,
)
from web.ratelimit import RateLimiter, admit, count_bad_credential
from web.replies import content_disposition
from web.settings import WebSettings

log = Logger(namespace="mailcore.web")

# Where mail is written: a body may be `[mailapi] max_message_bytes` (as base64 may encode
# it: mailcore.uploads.encoded_bound) plus this room for the multipart framing and the text
# fields, instead of `[web] max_body`.
UPLOAD_PATH = re.compile(r"/api/v1/mail/(?:[^/]+)?")
UPLOAD_OVERHEAD = 1024 * 1024
AUTH_PATH = b"/api/v1/auth/"
# The body fields that may carry the auth_key (the seed's POST /api/v1/mail/ names
# `auth_token`); they are no mail or grant field.
CREDENTIAL_FIELDS = ("auth_key", "auth_token")

AUTH_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string"},
        "password": {"type": "string", "format": "password"},
        "api_key": {"type": "string", "description": "the application's API key (also the "
                    "query parameter `api_key` or the header `Api-Key`): required with "
                    "`[mailapi] require_api_key`, and checked whenever it is given"},
    },
    "required": ["username", "password"],
}
# Where an application's api_key may also come from (check_api_key).
API_KEY_QUERY: dict[str, dict[str, Any]] = {"api_key": {"type": "string"}}
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
        "active": {"type": "boolean", "description": (
            "false once the mailbox's domain is removed: nothing is delivered to it or sent "
            "from it any more (nor when the domain name is claimed again); its mail stays "
            "readable until the owner deletes it")},
        "used_bytes": {"type": "integer", "description": (
            "the bytes its mail takes: text fields, attachments, messages as sent or "
            "received")},
        "quota_bytes": {"type": ["integer", "null"], "description": (
            "the bytes its mail may take (null: no limit): the mailbox's own quota when the "
            "operator set one (`mailcore mailbox quota`), else [mailapi] "
            "mailbox_quota_bytes; a draft or upload past it is refused 507, mail for it "
            "without room is refused at RCPT 552 5.2.2 (or bounces 5.2.2)")},
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
# 507 Insufficient Storage (RFC 4918 11.5): the mailbox has no room for the mail (its quota).
# A change of a mail that is no draft is CONFLICT (409, RFC 9110 15.5.10): PUT is the
# mail's method (its `read` flag changes on any mail), only its state refuses the edit.
STATUS_OF_KIND = {INVALID: 400, DENIED: 401, NOT_FOUND: 404, CONFLICT: 409, TOO_LARGE: 413,
                  QUOTA: 507}
MAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "mailbox": {"type": "string"},
        "read": {"type": "boolean"},
        "status": {"type": "string", "enum": ["draft", "outbox", "sent", "inbox"]},
        **{name: {"type": "string"} for name in FIELDS},
        "body": {"type": "string", "description": (
            "an inbox mail's: its message's first text/plain part (else text/html), up to "
            "1,048,576 characters; a longer text is cut there and the whole part is among "
            "its attachments (body.txt or body.html)")},
        "attachments": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "type": {"type": "string"},
            "size": {"type": "integer"}, "url": {"type": "string"}}}},
    },
}
PAGE_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "emails": {"type": "array", "items": MAIL_SCHEMA},
        "count": {"type": "integer", "description": "every mail the caller may read"},
        "previous_page_id": {"type": ["string", "null"]},
        "next_page_id": {"type": ["string", "null"]},
        "next_email_id": {"type": ["string", "null"]},
    },
}
MAIL_BODY: dict[str, Any] = {
    "type": "object",
    "description": "Any other field is a 400 (`unknown field: ...`), but the mail's own "
    "read-only keys (id, mailbox, attachments), which change nothing; so is a form or "
    "multipart text field, or a JSON key, given twice with different values (one value "
    "each).",
    "properties": {
        "status": {"type": "string", "enum": ["draft", "outbox"]},
        **{name: {"type": ["string", "null"], "description": "null (JSON) is the empty "
                  "string: on a PUT it clears the field"} for name in FIELDS},
        "reply_to": {"type": ["string", "null"], "description": "`reply-to` spelled so"},
        "attachment": {"type": "string", "format": "binary",
                       "description": "multipart file part(s), any field name; each within "
                       "[mailapi] max_attachment_bytes, all within max_message_bytes, "
                       "with those a draft keeps, and at most 256 (413), counting decoded "
                       "bytes (a part's Content-Transfer-Encoding, base64 or "
                       "quoted-printable, is undone; the body may be max_message_bytes "
                       "as base64, 11/8 of it, plus 1 MiB)"},
    },
}
WRITTEN_REPLY: dict[str, Any] = {
    "type": "object",
    "properties": {"message": {"type": "string"}, "id": {"type": "string"}},
}
# The seed's reply to each outcome: (status on POST, status on PUT, message).
WRITTEN: dict[Outcome, tuple[int, int, str]] = {
    Outcome.SAVED: (201, 200, ""),
    Outcome.ENQUEUED: (202, 202, "email enqueued to be sent"),
    Outcome.MISSING: (400, 400, "missing to / status - stored email as draft"),
    Outcome.INVALID: (400, 400, "invalid to/from/cc/bcc/reply-to - stored email as draft"),
    Outcome.BAD_HEADER: (400, 400, "invalid subject (a line break or control character) "
                         "- stored email as draft"),
    Outcome.LONG_SUBJECT: (400, 400, f"invalid subject (over {MAX_SUBJECT} characters) - "
                           "stored email as draft"),
    Outcome.TOO_MANY: (400, 400, f"too many recipients (over {MAX_RECIPIENTS} in to, cc and "
                       "bcc) - stored email as draft"),
    Outcome.BAD_BODY: (400, 400, "invalid body (a control character other than TAB, CR and "
                       "LF) - stored email as draft"),
    Outcome.UNAUTHORIZED: (401, 401, "unauthorized from/reply-to - stored email as draft"),
    # The message and the status (400 when the mail alone is over a cap) are the verdict's.
    Outcome.CAPPED: (429, 429, "sending limit reached - stored email as draft"),
}
NOT_STORED = "mail not sent / draft not saved"
# A send past the caller's cap on recipients ([limits]: mailcore.sendcaps), in the document.
CAPPED_TEXT = (
    "Mail sent to more recipients than the caller's `[limits]` caps leave "
    "(`user_recipients_per_hour`, `user_recipients_per_day`: the recipients of all the "
    "user's Mail API and safedrop mail in any 60 minutes, any 24 hours) is kept as a draft "
    "too: 429 with Retry-After (when it would pass), or 400 when the mail alone has more "
    "recipients than a cap.")
CAPPED_REPLY = Reply(
    "Rate limited: the caller's requests (`[web] mailapi_user_rate`: `{\"message\": "
    "\"Request was throttled. ...\"}`), or its cap on recipients (the mail kept as a "
    "draft: `{\"message\": \"sending limit reached: ... - stored email as draft\", "
    "\"id\": ...}`)", WRITTEN_REPLY,
    headers={"Retry-After": "Seconds until the request, or the mail, would pass",
             "X-RateLimit-Limit": "Requests the caller's bucket holds",
             "X-RateLimit-Remaining": "Requests left now",
             "X-RateLimit-Reset": "Epoch seconds when the bucket is full again"})
# Other spellings of the seed's mail fields a client may send.
FIELD_ALIASES = {"reply_to": "reply-to"}
# The fields a POST or PUT of a mail may carry: the seed's, `read` (PUT), the credential
# and the application api_key the seed has every request send, and the mail object's own
# read-only keys (a client may PUT back what it read; they change nothing, as `read` on a
# POST).
MAIL_INPUT = frozenset({*FIELDS, "status", "read", *CREDENTIAL_FIELDS, "api_key", "id",
                        "mailbox", "attachments"})


def model_error(error: MailApiError) -> ApiError:
    """A refusal of the model as the seed's `{"message": ...}` reply."""
    return ApiError(STATUS_OF_KIND.get(error.kind, 400), error.message)


@contextmanager
def refusals(failure: str | None = None, reply: str = NOT_STORED) -> Iterator[None]:
    """Turn a refusal of the model into the seed's reply (model_error). With `failure`, any
    other error is logged under that text and answers 500 `reply`."""
    try:
        yield
    except MailApiError as e:
        raise model_error(e) from None
    except ApiError:
        raise  # bad input the web layer found: its own reply
    except Exception as e:
        if failure is None:
            raise
        found = outage(e)
        if found is not None:
            raise outage_error(found) from None
        log.failure(failure)
        raise ApiError(500, reply) from None


def mail_object(mail: Mail) -> dict[str, Any]:
    """A mail as the seed shows it; Bcc only on the sender's side (not on inbox mail)."""
    body: dict[str, Any] = {"id": mail.public_id, "mailbox": mail.mailbox, "read": mail.read,
                            "status": mail.status}
    for name in FIELDS:
        if name == "bcc" and mail.status == INBOX:
            continue
        body[name] = mail.fields[name]
    body["attachments"] = [
        {"name": a.name, "type": a.content_type, "size": a.size,
         "url": f"/api/v1/mail/{mail.public_id}/attachments/{a.index}"}
        for a in mail.attachments
    ]
    return body


def mail_edit(data: dict[str, Any], files: list[StoredFile]) -> Edit:
    """The fields of a POST or PUT: strings (any text; checked when sent), and the file parts
    already on disk as attachments. A JSON null is the empty string (on a PUT it clears the
    field, as "" does: the seed's mail shows an unset field as ""); a value of another type
    is refused before anything is stored, and so is a field the mail has not (a client's
    misspelling must not be dropped unseen: a reply address it meant to set, say). The seed's
    `reply-to` may also be spelled `reply_to` (the seed's own right is `allow_reply_to`)."""
    data = _with_aliases(data)
    if "attachment" in data:
        raise ApiError(400, "attachment: a file part of a multipart/form-data body (with a "
                       "filename), not a text field")
    unknown = sorted(set(data) - MAIL_INPUT)
    if unknown:
        raise ApiError(400, f"unknown field: {unknown[0]}")
    values: dict[str, str] = {}
    for name in FIELDS:
        if name in data and data[name] is None:
            values[name] = ""
            continue
        value = string_field(data, name, required=False, allow_blank=True, trim=False)
        if value is not None:
            values[name] = value
    # Any text is taken (one other than draft or outbox keeps the mail a draft, 400 "missing
    # to / status", as the seed has it); another type is refused as any field's is.
    status = None if data.get("status") is None else string_field(
        data, "status", required=False, allow_blank=True, trim=False)
    return Edit(status or None, values, files)


def _with_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each FIELD_ALIASES spelling under the seed's name (400 when both are given
    with different values)."""
    if not FIELD_ALIASES.keys() & data.keys():
        return data
    data = dict(data)
    for alias, name in FIELD_ALIASES.items():
        if alias in data:
            value = data.pop(alias)
            if name in data and data[name] != value:
                raise ApiError(400, f"{alias}: given twice, as {alias} and {name}, with "
                               "different values")
            data[name] = value
    return data


def mailbox_object(access: Access, quota_bytes: int | None = None) -> dict[str, Any]:
    """A mailbox as the API shows it; `quota_bytes` is the configured quota, which the
    mailbox's own (set by the operator) overrides."""
    box = access.mailbox
    return {"email": box.address, "owner": box.owner, "is_owner": access.is_owner,
            "active": box.active, "used_bytes": box.used_bytes,
            "quota_bytes": effective_quota(box.quota_bytes, quota_bytes),
            **access.rights.as_dict()}


def grant_object(grant: Grant) -> dict[str, Any]:
    return {"username": grant.username, "is_owner": grant.is_owner, **grant.rights.as_dict()}


def _given(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if isinstance(value, str) and value != "" else None


class MailApiApp(ApiApp):
    name = "mailapi"
    challenge = 'Auth-Key realm="mailapi"'
    title = "Mail API (seed 002): drafts, outbox, mailboxes and access grants"
    shape = MailApiErrors()
    app = Klein()
    routes = RouteTable(app, "mailapi", errors=(429,))
    unsupported_media_status = 400  # the seed's tables list what a client may get
    one_value_fields = True  # to=a&to=b sent to b only

    def __init__(
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        login: PasswordLogin,
        mailboxes: MailboxService,
        mail: MailService,
        user_limiter: RateLimiter,
        anonymous_limiter: RateLimiter,
        require_api_key: bool = False,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.user_limiter = user_limiter
        self.anonymous_limiter = anonymous_limiter
        self.login = login
        self.mailboxes = mailboxes
        self.mail = mail
        self.require_api_key = require_api_key

    def error_reply(self, request: IRequest, error: ApiError) -> bytes:
        """`error` as `{"message": ...}`, but as `{"error": ...}` on the auth endpoint: seed
        002 shows only that key for its errors there ("Please provide username.", "API key
        is missing."), so a client written against it reads that key for every failure."""
        if error.key is None and getattr(request, "path", None) == AUTH_PATH:
            error = ApiError(error.status, error.message, fields=error.fields,
                             code=error.code, key="error", extra=error.extra,
                             headers=error.headers)
        return super().error_reply(request, error)

    async def principal(self, request: IRequest) -> Principal:
        """The auth_key's user within `[web] mailapi_user_rate`, or 401 `{"message":
        "unauthorized"}` (429 once the client's address has spent `[web]
        bad_credential_rate`)."""
        return await admit(request, self._resolve(request),
                           users=self.user_limiter, anonymous=self.anonymous_limiter)

    async def _resolve(self, request: IRequest) -> Principal:
        presented = self.resolver.presented(request, MAIL_API)
        in_body = self.body_credential(request)
        if presented is not None and in_body is not None and in_body != presented:
            raise MAIL_API.ambiguous()  # a header's or the query's, and another in the body
        if presented is None and in_body is not None:
            return await self.resolver.authenticate(request, in_body, MAIL_API)
        return await self.resolver.require(request, MAIL_API)

    def body_credential(self, request: IRequest) -> str | None:
        """The `auth_key` or `auth_token` field of a JSON or form-encoded body (a body that
        does not parse carries none: the reply is then the 401); the two fields with
        different values are refused as two credentials (400)."""
        if not (is_json_type(media_type(request)) or media_type(request) == FORM_TYPE):
            return None
        try:
            data = self.fields(request)
        except ApiError:
            return None
        found = set()
        for name in CREDENTIAL_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and value.strip():
                found.add(value.strip())
            elif value not in (None, ""):
                raise MAIL_API.error("invalid")
        if len(found) > 1:
            raise MAIL_API.ambiguous()
        return found.pop() if found else None

    @routes.route(
        "/api/v1/auth/",
        "POST",
        summary="Authenticate and obtain an auth_key",
        description='Every error here is `{"error": "..."}` (400 a missing username or '
        'password, 401 a wrong one, 403 a missing or bad api_key, 429), as the seed shows '
        'them; the other Mail API routes answer `{"message": "..."}`.',
        body=AUTH_BODY,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        query=API_KEY_QUERY,
        replies={200: Reply("The auth_key for every further call", AUTH_REPLY)},
        errors=(400, 401, 403, 413, 429),
    )
    async def authenticate(self, request: IRequest) -> bytes:
        """Each call creates a new auth_key; a user keeps `login_tokens_per_user` (100),
        a login past them ending the one unused the longest; they never expire unless the
        operator sets `login_token_ttl` or `login_token_idle`. A password change ends them.
        Limited per client address."""
        data = self.fields(request)
        await self.check_api_key(request, data, required=self.require_api_key)
        username = _given(data, "username")
        if username is None:
            raise ApiError(400, "Please provide username.", key="error")
        password = _given(data, "password")
        if password is None:
            raise ApiError(400, "Please provide password.", key="error")
        user = await self.login.check(request, username, password)
        key = await self.login.issue_token(user, "mailapi-auth") if user else None
        if key is None:
            raise ApiError(401, "Invalid username or password.")
        return self.reply(request, {"auth_key": key}, headers={"Cache-Control": "no-store"})

    async def check_api_key(self, request: IRequest, data: dict[str, Any], *,
                            required: bool) -> None:
        """The application api_key (query, form or `Api-Key` header): 403 when missing and
        `required`, or when it is not a live API key; two different ones a 400 (which
        was meant cannot be told)."""
        in_body = data.get("api_key")
        keys = {*query_lists(request).get("api_key", ()),
                *((in_body,) if isinstance(in_body, str) else ()),
                *(header.decode("latin-1").strip() for header in
                  request.requestHeaders.getRawHeaders(b"api-key") or ())} - {""}
        if len(keys) > 1:
            raise ApiError(400, "Two different API keys were sent (the query's api_key, "
                           "the form's or the Api-Key header); send one.", key="error")
        key: Any = keys.pop() if keys else in_body
        if not key:
            if required:
                raise ApiError(403, "API key is missing.", key="error")
            return
        if not isinstance(key, str) or len(key) > 256 \
                or await self.resolver.identity.resolve(key, ("apikey",)) is None:
            # An API key opens Protecmail and safedrop too: a wrong one is a guess like theirs.
            count_bad_credential(request, self.anonymous_limiter)
            raise ApiError(403, "API key is invalid.", key="error")

    @routes.route(
        "/api/v1/auth/",
        "HEAD",
        summary="Check an application api_key",
        description="The key is the query parameter `api_key` or the header `Api-Key`: "
        "200 when it is a live API key, 403 when it is missing or not.",
        query=API_KEY_QUERY,
        replies={200: Reply("The api_key is valid")},
        errors=(403,),
    )
    async def check_key(self, request: IRequest) -> bytes:
        await self.check_api_key(request, {}, required=True)
        return b""

    # -- mail -----------------------------------------------------------------------------

    @routes.route(
        "/api/v1/mail/",
        "GET",
        summary="List the mail the caller may read, newest first",
        description="A keyset page: `cursor` is a mail id (the page starts there, "
        "inclusive); `next_page_id` starts the next page, `previous_page_id` the one "
        "before. Stable while new mail arrives. A page holds at most `count` mails, fewer "
        f"when their fields (bodies, subjects, addresses) are over {PAGE_CHARS >> 20} MiB "
        "of text in all (the first mail always): `next_page_id` names the first one left "
        "out. A cursor naming mail that left a mailbox the caller may read (deleted, or "
        f"sent from another mailbox) within {int(GONE_KEEP) // 86400} days starts where "
        "it stood; any other unknown cursor is a 400 'invalid cursor'.",
        auth=MAIL_API,
        query={"count": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT,
                         "default": DEFAULT_COUNT},
               "cursor": {"type": "string"}},
        replies={200: Reply("A page of mail", PAGE_REPLY)},
        errors=(400, 401),
    )
    async def list_mail(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        params = query_params(request)
        count = DEFAULT_COUNT
        if params.get("count", "") != "":
            parsed = parse_int(params["count"].strip())
            if parsed is None or not 1 <= parsed <= MAX_COUNT:
                raise ApiError(400, "invalid count")
            count = parsed
        cursor = params.get("cursor") or None
        with refusals():
            page = await self.mail.page(principal.user.id, count, cursor)
        return self.reply(request, {
            "emails": [mail_object(m) for m in page.emails], "count": page.count,
            "previous_page_id": page.previous_id, "next_page_id": page.next_id,
            "next_email_id": page.next_id,
        })

    def written(self, request: IRequest, written: Written, *, put: bool) -> bytes:
        outcome = written.outcome
        post_status, put_status, message = WRITTEN[outcome]
        status = put_status if put else post_status
        headers: dict[str, str] = {}
        if outcome is Outcome.SAVED:
            message = "updated email" if put else "draft saved"
        elif written.capped is not None:  # [limits]: mailcore.sendcaps
            status, why, headers = http_refusal(written.capped)
            message = f"{why} - stored email as draft"
        return self.reply(request, {"message": message, "id": written.public_id}, status,
                          headers=headers)

    @routes.route(
        "/api/v1/mail/",
        "POST",
        summary="Create an email (a draft, or outbox to send it)",
        description="Fields are checked only for status outbox; mail that cannot be sent "
        "is kept as a draft and the reply says why (with its id). A mail past the "
        "mailbox's quota, or a new draft (one kept as a draft) in a mailbox that holds "
        "`[mailapi] max_drafts_per_mailbox` drafts (10,000), is a 507 and nothing is "
        "stored; a mail sent at once is not refused for the drafts. " + CAPPED_TEXT,
        auth=MAIL_API,
        body=MAIL_BODY,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        replies={201: Reply("Draft saved", WRITTEN_REPLY),
                 202: Reply("Enqueued to be sent", WRITTEN_REPLY),
                 429: CAPPED_REPLY},
        errors=(400, 401, 413, 500, 507),
    )
    async def create_mail(self, request: IRequest) -> bytes:
        principal = await self.principal(request)

        def create(data: dict[str, Any], edit: Edit) -> Awaitable[Written]:
            return self.mail.create(principal.user.id, principal.user.email, edit)

        with refusals("storing a Mail API mail failed"):
            written = await shielded(self.write_mail(request, create))
        return self.written(request, written, put=False)

    async def write_mail(self, request: IRequest,
                         write: Callable[[dict[str, Any], Edit], Awaitable[Written]]
                         ) -> Written:
        """Read a POST or PUT body and `write` it: a multipart body's files are streamed to
        disk first (MailService.receive); when no mail is stored they are taken back."""
        files: list[StoredFile] = []
        content = body_file(request)
        if media_type(request) == MULTIPART_TYPE and content is not None:
            content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
            received = await self.mail.receive(content_type, content,
                                               self.settings.json_max_body)
            data: dict[str, Any] = dict(received.fields)
            files = received.files
        else:
            data = self.fields(request)
        try:
            edit = mail_edit(data, files)
        except BaseException:
            await self.mail.discard(files)
            raise
        return await write(data, edit)

    @routes.route(
        "/api/v1/mail/<mail_id>",
        "GET",
        summary="One email (reading inbox mail marks it read; a HEAD does not)",
        auth=MAIL_API,
        replies={200: Reply("The email", MAIL_SCHEMA)},
        errors=(401, 404),
    )
    async def get_mail(self, request: IRequest, mail_id: str) -> bytes:
        principal = await self.principal(request)
        with refusals():
            # A HEAD (a link checker, a proxy's probe) must not mark the mail read (is_head).
            mail = await self.mail.get(principal.user.id, mail_id,
                                       mark_read=not is_head(request))
        return self.reply(request, mail_object(mail))

    @routes.route(
        "/api/v1/mail/<mail_id>/attachments/<int:index>",
        "GET",
        summary="Download an attachment",
        description="A HEAD answers from the mail's record (Content-Length: the "
        "attachment's size) and reads no byte of the file.",
        auth=MAIL_API,
        replies={200: Reply("The attachment's bytes (its type is the mail's `attachments` "
                            "entry's `type`)", {"type": "string", "format": "binary"},
                            "application/octet-stream")},
        errors=(401, 404),
    )
    async def get_attachment(self, request: IRequest, mail_id: str, index: int) -> bytes:
        principal = await self.principal(request)
        head = is_head(request)
        with refusals():
            download = await self.mail.attachment(principal.user.id, mail_id, index,
                                                  with_data=not head)
            if head:  # answered from the row: the file is not opened, no byte is read
                await self.mail.check(download)
                self._attachment_headers(request, download)
                return b""
            source = await self.mail.open(download)
        try:
            self._attachment_headers(request, download)
            await self.stream(request, source)
        finally:
            await self.mail.io.run(source.close)
        return b""

    def _attachment_headers(self, request: IRequest, download: Download) -> None:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Length", str(download.size).encode("ascii"))
        request.setHeader(b"Content-Disposition",
                          content_disposition(download.name or "attachment").encode("ascii"))

    async def stream(self, request: IRequest, source: BinaryIO) -> None:
        """Write `source` a chunk at a time, read on the mail service's thread pool, pausing
        while the client's transport is full (the file is never held whole)."""
        with paced(request) as pacer:
            while not pacer.stopped:
                await pacer.ready()
                data = await self.mail.io.run(source.read, CHUNK)
                if not data:
                    break
                request.write(data)

    @routes.route(
        "/api/v1/mail/<mail_id>",
        "PUT",
        summary="Update a draft, send it (status outbox), or set read",
        description="Only drafts change; sent, outbox and inbox mail take only `read` "
        "(409 otherwise). " + CAPPED_TEXT,
        auth=MAIL_API,
        body={**MAIL_BODY, "properties": {**MAIL_BODY["properties"],
                                          "read": {"type": "boolean"}}},
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        replies={200: Reply("Updated", WRITTEN_REPLY),
                 202: Reply("Enqueued to be sent", WRITTEN_REPLY),
                 429: CAPPED_REPLY},
        errors=(400, 401, 404, 409, 413, 500, 507),
    )
    async def put_mail(self, request: IRequest, mail_id: str) -> bytes:
        principal = await self.principal(request)

        async def update(data: dict[str, Any], edit: Edit) -> Written:
            try:
                read = bool_field(data, "read")
            except BaseException:
                await self.mail.discard(edit.attachments)
                raise
            if edit.status is None and (edit.values or edit.attachments):
                edit.status = DRAFT
            return await self.mail.update(principal.user.id, mail_id, edit, read)

        with refusals("updating a Mail API mail failed"):
            written = await shielded(self.write_mail(request, update))
        return self.written(request, written, put=True)

    @routes.route(
        "/api/v1/mail/<mail_id>",
        "DELETE",
        summary="Delete an email (one still in the outbox is then never sent)",
        auth=MAIL_API,
        replies={202: Reply('`{"message": "mail deleted"}`', MESSAGE_REPLY,
                            headers={"Location": "/api/v1/mail/"})},
        errors=(401, 404, 500),
    )
    async def delete_mail(self, request: IRequest, mail_id: str) -> bytes:
        principal = await self.principal(request)
        with refusals("deleting a Mail API mail failed",
                      "we could not delete this email, please try again later"):
            await self.mail.delete(principal.user.id, mail_id)
        return self.reply(request, {"message": "mail deleted"}, 202,
                          headers={"Location": "/api/v1/mail/"})

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
        return self.reply(request, {"mailboxes": [mailbox_object(a, self.mail.quota_bytes)
                                                  for a in found]})

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
        with refusals():
            access = await self.mailboxes.access(principal.user.id, email)
        return self.reply(request, mailbox_object(access, self.mail.quota_bytes))

    @routes.route(
        "/api/v1/mailboxes/<email>",
        "DELETE",
        summary="Delete a mailbox with its mail and grants (owner only); 409 while its "
                "outbox holds mail not yet handed to the queue",
        auth=MAIL_API,
        replies={200: Reply('`{"message": "mailbox deleted"}`', MESSAGE_REPLY)},
        errors=(401, 404, 409),
    )
    async def delete_mailbox(self, request: IRequest, email: str) -> bytes:
        principal = await self.principal(request)
        with refusals():
            await self.mailboxes.delete(principal.user.id, email)
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
        with refusals():
            box, grants = await self.mailboxes.grants(principal.user.id, email)
        return self.reply(request, {"email": box.address,
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
        with refusals():
            grant = await self.mailboxes.grant_of(principal.user.id, email, username)
        return self.reply(request, grant_object(grant))

    @routes.route(
        "/api/v1/mailboxes/<email>/access/<username>",
        "PUT",
        summary="Grant mailbox access to a user",
        description="Only the owner or a holder of allow_modify; nobody grants a right it "
        "does not hold (401). Rights not named keep their value; a user left holding no "
        "right is removed from the access list (an empty body stores nothing for a user "
        "holding none).",
        auth=MAIL_API,
        body=GRANT_BODY,
        body_types=("application/json", FORM_TYPE, MULTIPART_TYPE),
        replies={200: Reply("The user's rights now", GRANT_SCHEMA)},
        errors=(400, 401, 404),
    )
    async def put_access(self, request: IRequest, email: str, username: str) -> bytes:
        principal = await self.principal(request)
        data = self.fields(request)
        unknown = sorted(set(data) - set(RIGHTS) - {*CREDENTIAL_FIELDS, "api_key"})
        if unknown:
            raise ApiError(400, f"unknown field: {unknown[0]}")
        try:
            values = collect_fields({r: partial(bool_field, data, r) for r in RIGHTS})
        except ApiError as e:
            raise ApiError(400, e.message) from None
        changes = {k: v for k, v in values.items() if v is not None}
        with refusals():
            grant = await self.mailboxes.set_grant(principal.user.id, email, username, changes)
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
        with refusals():
            await self.mailboxes.revoke(principal.user.id, email, username)
        return self.reply(request, {"message": "access removed"})

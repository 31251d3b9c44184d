"""Protecmail (seed 004): the filtering gateway's API, `Api-Key` header, envelope replies.

Every reply, errors included, is the envelope `{"request_id", "success", "msg", "data"}`
with a fresh request id (the one the access log shows); `msg` and `data` appear only when
there is something to say. The one exception is the invoice download, a PDF.

Rates: a user makes `[web] protecmail_user_rate` requests (20 a second, all its API keys
together); a client address `[web] bad_credential_rate` ones with a missing or bad Api-Key
(100 an hour, shared with the Mail API and safedrop). Beyond: 429 in the envelope, with
Retry-After; every limited reply carries X-RateLimit-Limit, -Remaining and -Reset.

Served: ping, user (GET/PUT), domains (`domain/all`, GET/POST/PUT/DELETE `domain/{d}`, also
DELETE `domains/{d}`), address lists, token tanks (`tanks`, also `tolens`), the daily token
average, invoices (list, PDF), the quarantine (list, release).

Paths the seed prints in its curl examples are served as printed, typos included: POST
`/api/v1/domais/{d}` adds a domain and DELETE `/api/v1/domain/{d}/{address}` removes an
address, beside the documented `/api/v1/domain/{d}` and `…/addresses/{address}`.

Decisions (the seed leaves them open):
- The Domain object always has domain, redirectTo, spamAction, virusAction and sendResume;
  the agency-only fields (resumeTemplate*, resumeLinkHostname, resumeReplyTo) appear only
  when set, as in the seed's example. In a body, null or "" clears one of them.
- PUT is partial: fields left out keep their value. A `domain` in a body must name the
  domain of the path. Unknown fields, wrong types (spamAction/virusAction only 0 or 1,
  sendResume only true/false) and bad redirectTo values are 400 with the field named.
- A domain the operator hosts here (`mailcore domain add --local`: its mail kept in Mail
  API mailboxes) reads with `"hosted": true` and an empty redirectTo. Both may be sent back
  as read (a client PUTs back the object it got); `hosted` is not set through the API
  (a value other than the domain's own is 400), and a redirectTo makes it relayed.
- A setting the account's plan does not allow is 403 (an envelope whose msg names the
  plans: sendResume is not on Free, the agency fields only on Agency; its data is
  `{"plan": <the account's plan>}`). Nothing is changed then. Sending back the
  stored value unchanged is allowed, so that an account moved to a smaller plan can still
  edit its other settings with the object it read.
- A redirectTo the queue would refuse to deliver to is 400: an address (or `localhost`)
  the operator's `[queue]` network policy refuses (loopback, link-local and private ones by
  default) or `[protecmail] forbidden_redirects` lists, or one of the gateway's own SMTP
  listeners (`mailcore.gateway.redirects`). Host names are checked at delivery. Only a
  new next hop is checked: a PUT sending back the one stored (the object as read) leaves it
  alone, though the policy may have come to refuse it since it was set.
- A user sees only its own domains: another user's domain is 404 (as an unknown one),
  except on POST, where any served name is 409.
- Adding an address already listed is 200 with a msg saying so; removing one that is not
  listed is 404. An address may be given as `local` or `local@domain`.
- A user has at most `[domains] max_per_user` domains (1,000) and a domain lists at most
  `max_addresses` addresses (10,000); one more is 409 with a msg naming the cap, and nothing
  is stored. 409, not 400: the request is well formed and would succeed once a domain or
  address is deleted (the state refuses it, as for a name already served); not 403, which
  here means the plan (the seed states no plan limit on either count).
- Quarantine listing: `{start}` is an offset into the newest-first list and `{count}` the
  page size (1 to 1000); `current_page` is start // count + 1 and `nb_pages` is
  ceil(total / count), as the seed's example (0/3 → page 1 of 575 for 1724 mails). The
  target is one of the user's domains or an address of one; others are 404. Dates are
  RFC 3339 in UTC. A release (`GET /api/v1/quarantine/{ident}`) queues the message once; a
  second one is 409 with success false and msg "already released" and sends nothing; an
  unknown ident or another user's is 404.
- Invoice dates are RFC 3339 with the offset of `[billing] timezone`; totals are numbers
  (60, 724.8). Another user's or an unknown invoice is 404.
- With `[protecmail] verify_domains` on, an added domain is served only once its owner
  proves it in DNS (`mailcore.gateway.verification`). The reply to POST then has a `msg`
  saying so and `data` `{"domain", "verified": false, "verification": {"name", "type":
  "TXT", "value"}}`, the record to publish; until it is found, Domain info says it in
  `msg` (its `data` stays the Domain object, so that a client may PUT back what it read).
  The envelope's `msg` and `data` are optional in the seed, so clients that ignore them
  lose nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.billing.invoices import InvoiceService, money_number
from mailcore.billing.plans import PlanError, Plans
from mailcore.billing.tokens import TokenService
from mailcore.gateway.domains import (
    Domain,
    DomainError,
    DomainLimitReached,
    DomainService,
    normalise_domain,
    parse_redirect,
)
from mailcore.gateway.quarantine import (
    ALREADY,
    MAX_PAGE,
    MISSING,
    SUSPENDED,
    QuarantineError,
    QuarantineService,
    rfc3339,
)
from mailcore.gateway.redirects import RedirectForbidden, RedirectPolicy
from mailcore.gateway.verification import verification_record
from mailcore.identity import PROFILE_FIELDS, Identity, IdentityError, Principal
from web.api import ApiApp, is_head
from web.auth import PROTECMAIL, CredentialResolver
from web.context import context_of
from web.errors import ApiError, EnvelopeErrors, envelope_schema, field_error
from web.openapi import Reply, RouteTable
from web.parsing import collect_fields
from web.ratelimit import RateLimiter, admit
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

# The Domain object's fields (seed spelling) and the DomainService options they set.
DOMAIN_OPTIONS: dict[str, str] = {
    "redirectTo": "redirect_to",
    "spamAction": "spam_action",
    "virusAction": "virus_action",
    "sendResume": "send_resume",
    "resumeTemplateSubject": "resume_template_subject",
    "resumeTemplateBody": "resume_template_body",
    "resumeTemplateResume": "resume_template_resume",
    "resumeLinkHostname": "resume_link_hostname",
    "resumeReplyTo": "resume_reply_to",
}
SEED_NAME = {option: name for name, option in DOMAIN_OPTIONS.items()}
OPTIONAL_FIELDS = (
    "resumeTemplateSubject",
    "resumeTemplateBody",
    "resumeTemplateResume",
    "resumeLinkHostname",
    "resumeReplyTo",
)
_ACTION_TEXT = "must be 0 (quarantine) or 1 (tag and deliver)."

_ACTION_SCHEMA = {"type": "integer", "enum": [0, 1]}
DOMAIN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "domain": {"type": "string", "description": "The domain name (A-labels)."},
        "redirectTo": {
            "type": "string",
            "description": "Next hop: host, host:port, IP, [IPv6]:port; port 25 by default.",
        },
        "spamAction": {**_ACTION_SCHEMA, "description": "0 quarantine, 1 tag and deliver."},
        "virusAction": {**_ACTION_SCHEMA, "description": "0 quarantine, 1 tag and deliver."},
        "sendResume": {"type": "boolean", "description": "Quarantine summaries (not on Free)."},
        "hosted": {
            "type": "boolean",
            "description": "Only on a domain the operator hosts here (its mail kept in Mail "
            "API mailboxes; redirectTo is \"\"). May be sent back as read; not set here.",
        },
        **{
            name: {"type": ["string", "null"], "description": "Agency plan only."}
            for name in OPTIONAL_FIELDS
        },
    },
    "additionalProperties": False,
}
DOMAIN_EDIT_SCHEMA: dict[str, Any] = {
    **DOMAIN_SCHEMA,
    "description": "A Domain object. POST needs redirectTo; PUT changes only the fields "
    "given; null or \"\" clears an agency-only field.",
}
NAMES_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
VERIFICATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Only when [protecmail] verify_domains is on: the DNS record that proves "
    "the domain is yours; the domain is served once it is found.",
    "properties": {
        "domain": {"type": "string"},
        "verified": {"type": "boolean"},
        "verification": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "_mailcore-verify.<domain>"},
                "type": {"type": "string", "enum": ["TXT"]},
                "value": {"type": "string", "description": "mailcore-verify=<token>"},
            },
            "required": ["name", "type", "value"],
        },
    },
    "required": ["domain", "verified", "verification"],
}
TANKS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {k: {"type": "integer"} for k in ("monthly", "perm", "total")},
}
INVOICES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "ref": {"type": "integer"},
            "date": {"type": "string", "format": "date-time"},
            "total": {"type": "number"},
        },
    },
}

QUARANTINE_PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "emails": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "date": {"type": "string", "format": "date-time"},
                    **{k: {"type": "string"} for k in ("email", "domain", "mailfrom",
                                                       "subject", "ident")},
                },
            },
        },
        "count": {"type": "integer"},
        "nb_pages": {"type": "integer"},
        "current_page": {"type": "integer"},
    },
}


def domain_object(domain: Domain) -> dict[str, Any]:
    """Seed 004's Domain object; the agency-only fields only when set."""
    data: dict[str, Any] = {
        "domain": domain.name,
        "redirectTo": domain.redirect_to,
        "spamAction": domain.spam_action,
        "virusAction": domain.virus_action,
        "sendResume": domain.send_resume,
    }
    for name in OPTIONAL_FIELDS:
        value = getattr(domain, DOMAIN_OPTIONS[name])
        if value is not None:
            data[name] = value
    if domain.hosted:
        data["hosted"] = True  # mail kept in its Mail API mailboxes: no redirectTo
    return data


def pending_message(domain: Domain) -> str | None:
    """What the owner of a domain waiting for its proof of ownership must do, or None."""
    record = verification_record(domain)
    if record is None or not domain.pending:
        return None
    return (f"{domain.name} is not served until it is verified: publish the DNS record "
            f'{record.name} TXT "{record.value}".')


def _seed_message(error: DomainError) -> str:
    """A DomainService message with its option names in the seed's spelling."""
    message = error.message
    for option, name in SEED_NAME.items():
        message = message.replace(option, name)
    return message


def _bad_domain_input(error: DomainError) -> ApiError:
    field = SEED_NAME.get(error.field or "", error.field or "")
    message = _seed_message(error)
    return ApiError(400, message, fields={field: [message]} if field else None)


def _no_such_domain(name: str) -> ApiError:
    """The 404 envelope of a domain the caller does not have (unknown or another's)."""
    return ApiError(404, f"No such domain: {name}.")


def _domain_refusal(error: DomainError, name: str) -> ApiError:
    """A DomainService refusal on the caller's domain `name`: 404 when it is gone (removed
    meanwhile), 409 at a `[domains]` cap, else 400 naming the field."""
    if isinstance(error, DomainLimitReached):
        return ApiError(409, error.message)
    if error.message.startswith("No such domain"):
        return _no_such_domain(name)
    return _bad_domain_input(error)


class ProtecmailApp(ApiApp):
    name = "protecmail"
    challenge = 'Api-Key realm="protecmail"'
    title = "Protecmail (seed 004): domains, quarantine, token tanks, account, invoices"
    shape = EnvelopeErrors()
    app = Klein()
    # "it uses the HTTP-related convenience, including verbs ... and response codes".
    routes = RouteTable(app, "protecmail", errors=(429,), body_errors=(415,))

    def __init__(
        self,
        settings: WebSettings,
        *,
        resolver: CredentialResolver,
        identity: Identity,
        domains: DomainService,
        plans: Plans,
        tokens: TokenService,
        invoices: InvoiceService,
        redirects: RedirectPolicy,
        user_limiter: RateLimiter,
        anonymous_limiter: RateLimiter,
        quarantine: QuarantineService | None = None,
    ) -> None:
        super().__init__(settings)
        self.resolver = resolver
        self.user_limiter = user_limiter
        self.anonymous_limiter = anonymous_limiter
        self.identity = identity
        self.domains = domains
        self.plans = plans
        self.tokens = tokens
        self.invoices = invoices
        self.redirects = redirects
        self.quarantine = quarantine

    async def principal(self, request: IRequest) -> Principal:
        """The API key's user within `[web] protecmail_user_rate`, or a 401 envelope (a 429
        one once the client's address has spent `[web] bad_credential_rate`)."""
        return await admit(request, self.resolver.require(request, PROTECMAIL),
                           users=self.user_limiter, anonymous=self.anonymous_limiter)

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

    # -- account ---------------------------------------------------------------------------

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

    # -- domains ---------------------------------------------------------------------------

    async def owned_domain(self, principal: Principal, name: str) -> Domain:
        """The principal's domain called `name`, or a 404 envelope (also for others')."""
        domain = await self.domains.get(name, owner_id=principal.user.id)
        if domain is None:
            raise _no_such_domain(name)
        return domain

    async def caller_domain(self, request: IRequest, name: str) -> tuple[Principal, Domain]:
        """The caller and its domain called `name`: a 401 or 404 envelope otherwise."""
        principal = await self.principal(request)
        return principal, await self.owned_domain(principal, name)

    def domain_options(
        self, body: Mapping[str, Any], path_name: str, current: Domain | None
    ) -> dict[str, Any]:
        """The DomainService options a Domain object body asks for, to add a domain
        (`current` None) or change `current`; 400 on bad input."""
        for key in body:
            if key not in ("domain", "hosted") and key not in DOMAIN_OPTIONS:
                raise ApiError(400, f"unknown field: {key}", fields={key: ["Unknown field."]})
        hosted = current is not None and current.hosted
        checks: dict[str, Callable[[], Any]] = {}
        if "domain" in body:
            checks["domain"] = lambda: self._check_same_domain(body["domain"], path_name)
        if "hosted" in body:
            checks["hosted"] = lambda: _check_hosted(body["hosted"], hosted)
        for name, option in DOMAIN_OPTIONS.items():
            if name in body and not (name == "redirectTo" and (
                    (hosted and body[name] == "") or _same_redirect(body[name], current))):
                checks[option] = _checker(name, body[name], self._check_redirect)
        if current is None and "redirectTo" not in body:
            checks["redirect_to"] = _missing("redirectTo")
        values = collect_fields(checks)
        values.pop("domain", None)
        values.pop("hosted", None)
        return values

    @staticmethod
    def _check_same_domain(value: Any, path_name: str) -> None:
        if not isinstance(value, str):
            raise field_error("domain", "must be a string.")
        try:
            same = normalise_domain(value) == normalise_domain(path_name)
        except DomainError:
            same = False
        if not same:
            raise field_error(
                "domain", f"{value!r} is not the domain of the path ({path_name})."
            )

    def _check_redirect(self, value: Any) -> str:
        if not isinstance(value, str):
            raise field_error("redirectTo", "must be a string.")
        try:
            host, port = parse_redirect(value)
            self.redirects.check(host, port)
        except DomainError as e:
            raise field_error("redirectTo", _seed_message(e)) from None
        except RedirectForbidden as e:
            raise field_error("redirectTo", str(e)) from None
        return value

    def check_plan(
        self, principal: Principal, options: Mapping[str, Any], current: Domain | None
    ) -> None:
        """403 when the account's plan does not allow one of `options`."""
        stored = None
        if current is not None:
            stored = {option: getattr(current, option) for option in options
                      if hasattr(current, option)}
        try:
            self.plans.check_domain_options(principal.user.plan, options, stored)
        except PlanError as e:
            name = SEED_NAME.get(e.option, e.option)
            raise ApiError(403, e.describe(name), extra={"plan": e.plan.name}) from None

    @routes.route(
        "/api/v1/domain/all",
        "GET",
        summary="Get domains list",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the account's domain names", envelope_schema(
            NAMES_SCHEMA))},
    )
    async def list_domains(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        found = await self.domains.list(principal.user.id)
        return self.envelope(request, data=[d.name for d in found])

    @routes.route(
        "/api/v1/domain/<domain>",
        "GET",
        summary="Domain info",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the Domain object", envelope_schema(DOMAIN_SCHEMA))},
    )
    async def get_domain(self, request: IRequest, domain: str) -> bytes:
        _, found = await self.caller_domain(request, domain)
        return self.envelope(request, data=domain_object(found), msg=pending_message(found))

    @routes.route(
        ["/api/v1/domain/<domain>", "/api/v1/domais/<domain>"],
        "POST",
        summary="Add a domain",
        description="The body is a Domain object with at least redirectTo. The seed's "
        "example posts to /api/v1/domais/{domain}, which is served too.",
        auth=PROTECMAIL,
        body=DOMAIN_EDIT_SCHEMA,
        replies={200: Reply("Added (`data` when it waits for proof of ownership)",
                            envelope_schema(VERIFICATION_SCHEMA))},
        errors=(403, 409),
    )
    async def add_domain(self, request: IRequest, domain: str) -> bytes:
        principal = await self.principal(request)
        options = self.domain_options(self.json_object(request), domain, None)
        self.check_plan(principal, options, None)
        redirect_to = options.pop("redirect_to")
        try:
            added = await self.domains.add(domain, principal.user.id, redirect_to, **options)
        except DomainError as e:
            # 409: the state refuses it (the name is served, or the user is at the cap).
            if isinstance(e, DomainLimitReached) or "already served" in e.message:
                raise ApiError(409, e.message) from None
            raise _bad_domain_input(e) from None
        record = verification_record(added)
        if record is None:
            return self.envelope(request)
        data = {"domain": added.name, "verified": False, "verification": record.as_json()}
        return self.envelope(request, msg=pending_message(added), data=data)

    @routes.route(
        "/api/v1/domain/<domain>",
        "PUT",
        summary="Update a domain",
        description="The body is a Domain object; fields left out keep their value.",
        auth=PROTECMAIL,
        body=DOMAIN_EDIT_SCHEMA,
        replies={200: Reply("Saved", envelope_schema(None))},
        errors=(403,),
    )
    async def update_domain(self, request: IRequest, domain: str) -> bytes:
        principal, current = await self.caller_domain(request, domain)
        options = self.domain_options(self.json_object(request), domain, current)
        self.check_plan(principal, options, current)
        try:
            await self.domains.update(current.name, options, owner_id=principal.user.id)
        except DomainError as e:
            raise _domain_refusal(e, domain) from None
        return self.envelope(request)

    @routes.route(
        ["/api/v1/domain/<domain>", "/api/v1/domains/<domain>"],
        "DELETE",
        summary="Delete a domain",
        description="Stops serving the domain; its address list goes with it.",
        auth=PROTECMAIL,
        replies={200: Reply("Deleted", envelope_schema(None))},
    )
    async def delete_domain(self, request: IRequest, domain: str) -> bytes:
        principal, current = await self.caller_domain(request, domain)
        try:
            await self.domains.remove(current.name, owner_id=principal.user.id)
        except DomainError:
            raise _no_such_domain(domain) from None
        return self.envelope(request)

    # -- addresses -------------------------------------------------------------------------

    @staticmethod
    def local_part(address: str, domain: Domain) -> str:
        """The local part of `address` (`local` or `local@domain` of this domain)."""
        local, at, rest = address.rpartition("@")
        if not at:
            return address
        try:
            same = normalise_domain(rest) == domain.name
        except DomainError:
            same = False
        if not same:
            raise field_error("address", f"{address!r} is not an address of {domain.name}.")
        return local

    @routes.route(
        "/api/v1/domain/<domain>/addresses",
        "GET",
        summary="List domain addresses",
        description="The local parts the domain accepts; empty: it accepts every one.",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the list of local parts", envelope_schema(
            NAMES_SCHEMA))},
    )
    async def list_addresses(self, request: IRequest, domain: str) -> bytes:
        principal, found = await self.caller_domain(request, domain)
        try:
            names = await self.domains.list_addresses(found.name, owner_id=principal.user.id)
        except DomainError:
            raise _no_such_domain(domain) from None
        return self.envelope(request, data=names)

    @routes.route(
        "/api/v1/domain/<domain>/addresses/<address>",
        "PUT",
        summary="Add an address",
        auth=PROTECMAIL,
        replies={200: Reply("Listed (msg says so when it already was)", envelope_schema(
            None))},
        errors=(409,),
    )
    async def add_address(self, request: IRequest, domain: str, address: str) -> bytes:
        principal, found = await self.caller_domain(request, domain)
        local = self.local_part(address, found)
        try:
            added = await self.domains.add_address(
                found.name, local, owner_id=principal.user.id
            )
        except DomainError as e:
            raise _domain_refusal(e, domain) from None
        if not added:
            return self.envelope(request, msg=f"{local}@{found.name} was already listed.")
        return self.envelope(request)

    @routes.route(
        ["/api/v1/domain/<domain>/addresses/<address>", "/api/v1/domain/<domain>/<address>"],
        "DELETE",
        summary="Remove an address",
        description="The seed's example omits `addresses/`; both paths are served.",
        auth=PROTECMAIL,
        replies={200: Reply("Removed", envelope_schema(None))},
    )
    async def remove_address(self, request: IRequest, domain: str, address: str) -> bytes:
        principal, found = await self.caller_domain(request, domain)
        local = self.local_part(address, found)
        try:
            await self.domains.remove_address(found.name, local, owner_id=principal.user.id)
        except DomainError as e:
            if e.message.startswith("No such domain") or "not in the address list" in e.message:
                raise ApiError(404, _seed_message(e)) from None
            raise _bad_domain_input(e) from None
        return self.envelope(request)

    # -- tokens ----------------------------------------------------------------------------

    @routes.route(
        ["/api/v1/tanks", "/api/v1/tolens"],
        "GET",
        summary="Filtering token tanks",
        description="`monthly` (this month's remaining tokens), `perm` (unused monthly "
        "tokens of earlier months and purchased tokens), `total`.",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the tanks", envelope_schema(TANKS_SCHEMA))},
    )
    async def tanks(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        found = await self.tokens.tanks(principal.user.id)
        return self.envelope(request, data=found.as_dict())

    @routes.route(
        "/api/v1/token/daily-average",
        "GET",
        summary="Daily consumption",
        description="Tokens used per day, averaged over the last 30 days (today included), "
        "rounded down.",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is an integer", envelope_schema({"type": "integer"}))},
    )
    async def daily_average(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        average = await self.tokens.daily_average(principal.user.id)
        return self.envelope(request, data=average)

    # -- invoices --------------------------------------------------------------------------

    @routes.route(
        "/api/v1/invoices",
        "GET",
        summary="List invoices",
        description="Newest first; dates are RFC 3339 with an offset.",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is `[{ref, date, total}]`", envelope_schema(
            INVOICES_SCHEMA))},
    )
    async def list_invoices(self, request: IRequest) -> bytes:
        principal = await self.principal(request)
        found = await self.invoices.list(principal.user.id)
        data = [
            {
                "ref": invoice.ref,
                "date": self.invoices.date_text(invoice.issued_at),
                "total": money_number(invoice.total_cents),
            }
            for invoice in found
        ]
        return self.envelope(request, data=data)

    @routes.route(
        "/api/v1/invoices/<ref>",
        "GET",
        summary="Download an invoice",
        description="Exceptionally the reply is a PDF file (errors are envelopes). A HEAD "
        "renders no PDF: it carries Content-Length only when the PDF was rendered before.",
        auth=PROTECMAIL,
        replies={200: Reply("The invoice", {"type": "string", "format": "binary"},
                            content_type="application/pdf")},
    )
    async def get_invoice(self, request: IRequest, ref: str) -> bytes:
        principal = await self.principal(request)
        invoice = None
        if ref.isascii() and ref.isdigit() and len(ref) <= 18:
            invoice = await self.invoices.get(int(ref), user_id=principal.user.id)
        if invoice is None:
            raise ApiError(404, f"No such invoice: {ref}.")
        # A HEAD renders nothing (a PDF is ~0.13 s of the CPU pool): it gives the length of
        # a PDF rendered before and kept, and otherwise none, which RFC 9110 9.3.2 allows
        # for a field known only once the content is made (a wrong one it forbids, 8.6).
        if is_head(request):
            pdf, size = b"", self.invoices.kept_size(invoice.ref)
        else:
            pdf = await self.invoices.rendered(invoice)
            size = len(pdf)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/pdf")
        if size is not None:
            request.setHeader(b"Content-Length", str(size).encode("ascii"))
        request.setHeader(
            b"Content-Disposition", f'inline; filename="invoice-{int(ref)}.pdf"'.encode("ascii")
        )
        return pdf


    # -- quarantine ------------------------------------------------------------------------

    def _quarantine(self) -> QuarantineService:
        if self.quarantine is None:
            raise ApiError(503, "The quarantine is not available.")
        return self.quarantine

    @routes.route(
        "/api/v1/quarantine/<target>/<start>/<count>",
        "GET",
        summary="List quarantined emails",
        description="Newest first, from offset `start`, `count` of them, for one of your "
        "domains or an address of one.",
        auth=PROTECMAIL,
        replies={200: Reply("`data` is the page", envelope_schema(QUARANTINE_PAGE_SCHEMA))},
    )
    async def list_quarantine(
        self, request: IRequest, target: str, start: str, count: str
    ) -> bytes:
        principal = await self.principal(request)
        service = self._quarantine()
        first = _bounded_int(start, "start", 0, 10**9)
        size = _bounded_int(count, "count", 1, MAX_PAGE)
        local, at, name = target.rpartition("@")
        domain = await self.owned_domain(principal, name if at else target)
        address = None
        if at:
            if not local:
                raise field_error("address", f"{target!r} is not an address.")
            address = f"{local}@{domain.name}"
        page = await service.page(domain.id, address, first, size)
        return self.envelope(request, data={
            "emails": [
                {"date": rfc3339(h.date), "email": h.email, "domain": h.domain,
                 "mailfrom": h.mailfrom, "subject": h.subject, "ident": h.ident}
                for h in page.emails
            ],
            "count": page.count,
            "nb_pages": page.nb_pages,
            "current_page": page.current_page,
        })

    @routes.route(
        "/api/v1/quarantine/<ident>",
        "GET",
        summary="Resend a quarantined mail",
        description="Queues the message for its recipient, once. A second release is 409 "
        "(msg \"already released\") and sends nothing; 403 while the account is disabled "
        "(its mail waits), 503 when the message could not be queued now (try again). A "
        "HEAD answers what the release would (200, 404, 409, 403) and releases nothing.",
        auth=PROTECMAIL,
        replies={200: Reply("Queued for delivery", envelope_schema(None))},
        errors=(403, 409, 503),
    )
    async def release_quarantine(self, request: IRequest, ident: str) -> bytes:
        principal = await self.principal(request)
        service = self._quarantine()
        # A HEAD (a link checker, a proxy's probe) answers what the release would (is_head).
        release = service.check_release if is_head(request) else service.release
        try:
            status = await release(ident, owner_id=principal.user.id)
        except QuarantineError as e:
            raise ApiError(503, str(e)) from None
        if status == MISSING:
            raise ApiError(404, f"No such quarantined mail: {ident}.")
        if status == ALREADY:
            raise ApiError(409, "already released")
        if status == SUSPENDED:  # (a disabled user's key no longer opens the API)
            raise ApiError(403, "this account is disabled")
        return self.envelope(request)


def _bounded_int(text: str, name: str, low: int, high: int) -> int:
    """A path segment as an integer within [low, high], or a 400 envelope naming it."""
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or not (
        low <= int(text) <= high
    ):
        raise field_error(name, f"must be an integer from {low} to {high}.")
    return int(text)


def _check_hosted(value: Any, hosted: bool) -> None:
    """`hosted` sent back: only the domain's own value (the operator hosts a domain)."""
    if value is not hosted:
        what = "hosts this domain" if hosted else "does not host this domain"
        raise field_error("hosted", f"must be {str(hosted).lower()}: the operator {what} "
                          "(mailcore domain add --local); it is not set through the API.")


def _missing(name: str) -> Callable[[], Any]:
    def check() -> Any:
        raise field_error(name, "This field is required.")

    return check


def _same_redirect(value: Any, current: Domain | None) -> bool:
    """Whether redirectTo `value` names the next hop `current` already has: a PUT sending
    back what it read leaves it alone, and it is not checked again (the operator's policy
    may have come to refuse it since; only a change is refused)."""
    if current is None or current.hosted or not isinstance(value, str):
        return False
    try:
        return parse_redirect(value) == (current.redirect_host, current.redirect_port)
    except DomainError:
        return False


def _checker(name: str, value: Any, redirect: Callable[[Any], str]) -> Callable[[], Any]:
    """The check of one Domain object field (seed name `name`)."""

    def check() -> Any:
        if name == "redirectTo":
            if value is None:
                raise field_error(name, "may not be null.")
            return redirect(value)
        if name in ("spamAction", "virusAction"):
            if type(value) is not int or value not in (0, 1):
                raise field_error(name, _ACTION_TEXT)
            return int(value)
        if name == "sendResume":
            if not isinstance(value, bool):
                raise field_error(name, "must be true or false.")
            return value
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise field_error(name, "must be a string or null.")
        return value

    return check

"""One credential resolver for every API: find the secret a request presents, resolve it.

Each API reads credentials its own way (API-MAP.md); an `AuthPolicy` says where to look
(headers, an `Authorization` scheme, query parameters), which credential kinds count, and how
the API words its 401. `CredentialResolver.require` yields the `Principal` or raises that
API's own 401 as an `ApiError`, which the app renders in its shape.

| policy | reads | kinds |
|---|---|---|
| IMAP2API | `Authorization: Token <t>` | token |
| MAIL_API | `Auth-Key`, `token`, `auth_key`/`auth_token` (+query), `Authorization: Token` | token |
| PROTECMAIL | `Api-Key` | apikey |
| SAFEDROP_KEY | `X-Auth-Key` (the auth server, with `X-Auth-User`) | apikey |
| SAFEDROP | `X-Auth-Token`, `Auth-Token` | session |
| DROPMYEMAIL | `Authorization: Bearer <t>`, `?access_token=` | OAuth token, scoped |

A request presenting two different secrets of its API (two of those places, or a header or
parameter given twice) is refused (`AuthPolicy.ambiguous`: 401 for IMAP2API, as DRF answers
a malformed header, else 400; Dropmyemail's `invalid_request`, RFC 6750 3.1); the same
secret given twice is served. An `Authorization` header of a scheme the API does not take
is not its credential and is left alone. The secret is never logged, never put in an error,
and only its digest is looked up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.web.iweb import IRequest

from mailcore.identity import Identity, Principal
from web.context import context_of
from web.errors import ApiError
from web.parsing import query_lists

# A custom lookup: (identity, secret, policy) -> the principal, or None when not live.
Lookup = Callable[[Identity, str, "AuthPolicy"], Awaitable[Principal | None]]


@dataclass(frozen=True)
class AuthPolicy:
    """Where one API reads its credential, which kinds it accepts, how it says 401.

    `messages` keys: "missing" (nothing presented), "invalid" (presented, not live),
    "header_empty" and "header_spaces" (a malformed `Authorization` header; DRF words those
    apart). `lookup` replaces the default `identity.resolve(secret, kinds)`; it is the
    extension point for credentials that do not live in the credentials table.
    """

    name: str
    kinds: tuple[str, ...]
    headers: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    messages: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None
    challenge: str | None = None
    error_code: str | None = None
    lookup: Lookup | None = None
    security_schemes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # True when every scheme above must be presented together (safedrop user + key).
    all_required: bool = False
    # A request presenting two different secrets (in two of the places above, or one
    # header or query parameter given twice) is refused with this status and `code`
    # (message "two_secrets"): which was meant cannot be told, and serving the first one
    # found would act for whoever put it there. The same secret twice is served.
    ambiguous_status: int = 400
    ambiguous_code: str | None = None

    def ambiguous(self) -> ApiError:
        """The refusal of a request that presents two different secrets."""
        return self.error("two_secrets", self.ambiguous_status, code=self.ambiguous_code)

    def security(self, scopes: list[str]) -> list[dict[str, list[str]]]:
        """OpenAPI security requirements: one of the schemes, or all of them together."""
        if self.all_required:
            return [{name: list(scopes) for name in self.security_schemes}]
        return [{name: list(scopes)} for name in self.security_schemes]

    def error(self, reason: str, status: int = 401, *, code: str | None = None,
              scope: str | None = None) -> ApiError:
        """The API's error for `reason`; `code` (the policy's `error_code` unless given) goes
        in the body and the challenge, with the `scope` a 403 lacks (RFC 6750 §3)."""
        message = self.messages.get(reason) or self.messages.get("invalid") or "Unauthorized."
        code = code or self.error_code
        headers = {}
        if self.challenge:
            challenge = self.challenge
            if code and reason != "missing":  # RFC 6750 §3: no code when absent
                challenge += f', error="{code}"'
            if scope is not None:
                challenge += f', scope="{scope}"'
            headers["WWW-Authenticate"] = challenge
        return ApiError(status, message, key=self.key, code=code, headers=headers)


def api_key_scheme(
    name: str, description: str | None = None, *, where: str = "header"
) -> dict[str, str]:
    """An OpenAPI `apiKey` security scheme: the secret travels in the header (or query
    parameter, `where="query"`) called `name`."""
    scheme = {"type": "apiKey", "in": where, "name": name}
    if description is not None:
        scheme["description"] = description
    return scheme


IMAP2API = AuthPolicy(
    name="imap2api",
    kinds=("token",),
    schemes=("Token",),
    messages={
        "missing": "Authentication credentials were not provided.",
        "invalid": "Invalid token.",
        "header_empty": "Invalid token header. No credentials provided.",
        "header_spaces": "Invalid token header. Token string should not contain spaces.",
        "two_secrets": "Invalid token header. Two different tokens were sent; send one.",
    },
    challenge="Token",
    # A malformed Authorization header is DRF's 401 (two joined by a proxy are one with
    # spaces in it, "Token string should not contain spaces").
    ambiguous_status=401,
    security_schemes={
        "imap2apiToken": api_key_scheme(
            "Authorization",
            "`Authorization: Token <token>`; the token comes from POST /api-token-auth/. "
            "Two different tokens (the header twice) are a 401.",
        )
    },
)

MAIL_API = AuthPolicy(
    name="mailapi",
    kinds=("token",),
    headers=("Auth-Key", "auth_key", "auth_token", "token"),
    schemes=("Token",),
    query=("auth_key", "auth_token"),
    messages={"missing": "unauthorized", "invalid": "unauthorized",
              "two_secrets": "two different auth_keys were sent (in Auth-Key, auth_key, "
                             "auth_token, token, Authorization: Token, the query or the "
                             "body); send one"},
    security_schemes={
        "mailapiAuthKey": api_key_scheme(
            "Auth-Key",
            "The auth_key from POST /api/v1/auth/ (also accepted as header "
            "or query parameter `auth_key` or `auth_token`, as header `token`, as field "
            "`auth_key` or `auth_token` of a JSON or form-encoded body, or "
            "`Authorization: Token <key>`). Two different keys in one request are a 400.",
        )
    },
)

PROTECMAIL = AuthPolicy(
    name="protecmail",
    kinds=("apikey",),
    headers=("Api-Key",),
    messages={"missing": "missing Api-Key header", "invalid": "invalid Api-Key",
              "two_secrets": "two different Api-Key headers were sent; send one"},
    security_schemes={
        "protecmailApiKey": api_key_scheme(
            "Api-Key", "An API key (`mailcore apikey create NAME`); two different ones (the "
            "header twice) are a 400."
        )
    },
)

SAFEDROP_KEY = AuthPolicy(
    name="safedrop-key",
    kinds=("apikey",),
    headers=("X-Auth-Key",),
    messages={
        "missing": "X-Auth-User and X-Auth-Key headers are required.",
        "invalid": "Invalid X-Auth-User or X-Auth-Key.",
        "two_secrets": "Two different X-Auth-User or X-Auth-Key values were sent; send one.",
    },
    challenge='X-Auth-Key realm="safedrop"',
    security_schemes={
        "safedropUser": api_key_scheme("X-Auth-User", "The e-mail address of the account "
                                       "(two different ones: a 400)."),
        "safedropApiKey": api_key_scheme("X-Auth-Key", "An API key of that account (two "
                                         "different ones: a 400)."),
    },
    all_required=True,
)

SAFEDROP = AuthPolicy(
    name="safedrop",
    kinds=("session",),
    headers=("X-Auth-Token", "Auth-Token"),
    messages={
        "missing": "An X-Auth-Token header is required.",
        "invalid": "The authentication token is invalid or has expired.",
        "two_secrets": "Two different authentication tokens were sent (X-Auth-Token, "
                       "Auth-Token); send one.",
    },
    security_schemes={
        "safedropToken": api_key_scheme(
            "X-Auth-Token",
            "A temporary token from GET / (or /auth) with X-Auth-User and "
            "X-Auth-Key; `Auth-Token` is accepted too (two different tokens: a 400).",
        )
    },
)

# Dropmyemail's access tokens come from its OAuth provider (mailcore.oauth), not from the
# credentials table: the app sets `lookup` to the provider's resolve, and no other kind of
# credential counts.
DROPMYEMAIL_SCOPES = {
    "read": "Read accounts, migrates and restores.",
    "write": "Create, change and delete accounts; start migrates and restores.",
    "email": "Read backed-up mailboxes and messages (implied by read).",
    "attachment": "Read backed-up attachments (implied by read).",
    "contact": "Read backed-up contacts (implied by read).",
}
DROPMYEMAIL = AuthPolicy(
    name="dropmyemail",
    kinds=("oauth",),
    schemes=("Bearer",),
    query=("access_token",),
    messages={
        "missing": "An access token is required (access_token or Authorization: Bearer).",
        "invalid": "The access token is invalid.",
        "scope": "The access token does not grant this scope.",
        "two_secrets": "Two different access tokens were sent (access_token, "
                       "Authorization: Bearer, or one of them twice); send one.",
        "body_token": "The access token is not taken from the body: send it as "
                      "Authorization: Bearer or the access_token query parameter.",
    },
    challenge='Bearer realm="dropmyemail"',
    error_code="invalid_token",
    ambiguous_code="invalid_request",  # RFC 6750 3.1: one method per request
    security_schemes={
        "dropmyemailOAuth": {
            "type": "oauth2",
            "flows": {
                "authorizationCode": {
                    "authorizationUrl": "/oauth/authorize",
                    "tokenUrl": "/oauth/token",
                    "scopes": DROPMYEMAIL_SCOPES,
                }
            },
        },
        "dropmyemailAccessToken": api_key_scheme(
            "access_token", "The access token as a query parameter (not in the body: a 400 "
            "invalid_request; so are two different tokens, this and Authorization: Bearer "
            "or either twice).", where="query"),
    },
)

# Scopes that "read" implies (dropmyemail-v1.md).
IMPLIED_SCOPES: dict[str, tuple[str, ...]] = {"read": ("email", "attachment", "contact")}


def grants(principal: Principal, scope: str) -> bool:
    """Whether the principal's scopes cover `scope`, counting scopes that `read` implies."""
    if principal.allows(scope):
        return True
    return any(
        scope in implied and principal.allows(parent)
        for parent, implied in IMPLIED_SCOPES.items()
    )


class CredentialResolver:
    """Reads the credential a request presents under a policy and resolves it."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def presented(self, request: IRequest, policy: AuthPolicy) -> str | None:
        """The secret the request presents under `policy`, or None; bad headers raise 401,
        and two different secrets (in two of the places the policy reads, or one header
        or query parameter given twice) the policy's `ambiguous` refusal: serving one of
        them, as the first found was, would act for whoever put it there."""
        found = {*self._header_secrets(request, policy), *self._query_secrets(request, policy)}
        if len(found) > 1:
            raise policy.ambiguous()
        return found.pop() if found else None

    @staticmethod
    def _header_secrets(request: IRequest, policy: AuthPolicy) -> list[str]:
        """Every secret the policy's headers carry (an `Authorization` of another scheme
        is not this API's credential: a proxy's Basic, say)."""
        found = []
        schemes = {scheme.lower().encode() for scheme in policy.schemes}
        for header in request.requestHeaders.getRawHeaders(b"authorization") or ():
            parts = header.split() if schemes else ()
            if not parts or parts[0].lower() not in schemes:
                continue
            if len(parts) == 1:
                raise policy.error("header_empty")
            if len(parts) > 2:
                raise policy.error("header_spaces")
            found.append(_text(parts[1], policy))
        for name in policy.headers:
            for value in request.requestHeaders.getRawHeaders(name.encode("latin-1")) or ():
                if value.strip():
                    found.append(_text(value.strip(), policy))
        return found

    @staticmethod
    def _query_secrets(request: IRequest, policy: AuthPolicy) -> list[str]:
        if not policy.query:
            return []
        params = query_lists(request)
        return [value.strip() for name in policy.query for value in params.get(name, ())
                if value.strip()]

    async def resolve(self, secret: str, policy: AuthPolicy) -> Principal | None:
        if policy.lookup is not None:
            return await policy.lookup(self.identity, secret, policy)
        return await self.identity.resolve(secret, policy.kinds)

    async def optional(self, request: IRequest, policy: AuthPolicy) -> Principal | None:
        """The principal, None when no credential is presented; a bad one is still a 401."""
        secret = self.presented(request, policy)
        if secret is None:
            return None
        return await self.authenticate(request, secret, policy)

    async def authenticate(self, request: IRequest, secret: str,
                           policy: AuthPolicy) -> Principal:
        """The principal `secret` (found by the caller, wherever its API lets it travel)
        opens for `request`, or the API's 401. A secret found dead is not looked up again
        for the same request (the upload gate asks before the body is read, the API again
        once it is; a live one comes from Identity's memory, where a revocation made
        meanwhile shows)."""
        context = context_of(request)
        key = (policy.name, secret)
        principal = None
        if key not in context.refused:
            principal = await self.resolve(secret, policy)
        if principal is None:
            context.refused.add(key)
            raise policy.error("invalid")
        context_of(request).authenticated(principal)
        return principal

    async def require(
        self, request: IRequest, policy: AuthPolicy, *, scope: str | None = None
    ) -> Principal:
        """The principal, or the API's own 401 (403 when a scope is missing)."""
        principal = await self.optional(request, policy)
        if principal is None:
            raise policy.error("missing")
        if scope is not None and not grants(principal, scope):
            raise policy.error("scope", 403, code="insufficient_scope", scope=scope)
        return principal


def _text(raw: bytes, policy: AuthPolicy) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise policy.error("invalid") from None

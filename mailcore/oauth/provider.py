"""The OAuth 2 authorization server: apps, consent, codes and tokens (RFC 6749, RFC 9700).

oauthlib's `WebApplicationServer` does the protocol; `StoreValidator` holds our rules. Each
oauthlib call runs in one store transaction on the pool (the validator is synchronous), so
that checking a code and marking it used, or issuing a token and revoking the one it
replaces, happen together or not at all. Every secret (app secret, code, access and refresh
token) is stored as its SHA-256 only.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets as _random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from oauthlib.oauth2 import FatalClientError, OAuth2Error, WebApplicationServer
from oauthlib.oauth2.rfc6749.errors import (
    AccessDeniedError,
    InvalidGrantError,
    InvalidRequestError,
)
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.identity import Identity, Principal, User
from mailcore.identity import secrets as creds
from mailcore.identity.service import thd_get_user, thd_hold_live_credential, utc
from mailcore.oauth.redirects import is_loopback_redirect, normal_redirect_uri
from mailcore.oauth.settings import CODE_RETENTION, OAuthSettings
from mailcore.oauth.validator import (
    SCOPES,
    GrantLost,
    StoreValidator,
    basic_credentials,
    redirect_uris,
)
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.store import Database
from mailcore.store.schema import oauth_apps, oauth_codes, oauth_tokens, users
from mailcore.text import has_control, not_text

log = Logger()

# oauthlib's reply headers and body, and its status.
Reply = tuple[dict[str, str], str, int]

# The challenge of a 401 invalid_client at the token endpoint (RFC 6749 §5.2: the scheme
# the client authenticates with, HTTP Basic; oauthlib's Bearer is a resource server's).
CLIENT_CHALLENGE = 'Basic realm="oauth"'
_REPLY_HEADERS = {"Content-Type": "application/json", "Cache-Control": "no-store",
                  "Pragma": "no-cache"}


class OAuthError(Exception):
    """An app operation was refused; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class AuthorizationRefused(Exception):
    """An authorization request that must not redirect (unknown client, unregistered
    redirect_uri): show `message` on an error page."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class App:
    """A registered client, as it may be shown (never its secret)."""

    id: int
    uid: str
    name: str
    owner_id: int
    owner: str
    redirect_uris: tuple[str, ...]
    created_at: datetime.datetime


@dataclass(frozen=True)
class Grant:
    """What a user has let an app do: the scopes of its live tokens."""

    app: App
    scopes: tuple[str, ...]
    since: datetime.datetime
    tokens: int


@dataclass(frozen=True)
class Consent:
    """A valid authorization request, waiting for the user's Allow or Deny."""

    app: App
    scopes: tuple[str, ...]
    redirect_uri: str
    state: str | None


def _app(row: Any) -> App:
    m = row._mapping
    return App(
        id=m["id"], uid=m["uid"], name=m["name"], owner_id=m["owner_id"], owner=m["owner"],
        redirect_uris=tuple(redirect_uris(row)),
        created_at=utc(m["created_at"]),  # type: ignore[arg-type]
    )


def check_redirect_uri(uri: str) -> str:
    """A redirect URI fit to register (RFC 6749 §3.1.2) in the normal form it is stored and
    compared in (mailcore.oauth.redirects): absolute https, no fragment, no userinfo, a
    host name or IP address for host; http only to a loopback host (a native app's own
    listener, RFC 8252 §7.3): over the network, a code sent in the clear can be read on the
    way and exchanged by anyone who has the client's secret or none is needed (OAuth 2.1
    §2.3.1)."""
    try:
        normal = normal_redirect_uri(uri)
    except ValueError as e:
        raise OAuthError(str(e), "redirect_uri") from None
    if normal.startswith("http:") and not is_loopback_redirect(normal):
        raise OAuthError(f"redirect URI {uri!r} must be https:// (http:// only to a loopback "
                         f"host: 127.0.0.1, [::1], localhost)", "redirect_uri")
    return normal


def _apps_query() -> Any:
    return select(oauth_apps, users.c.username.label("owner")).join(
        users, users.c.id == oauth_apps.c.owner_id
    )


class OAuthProvider:
    """Apps, grants and the oauthlib endpoints, over the store."""

    def __init__(
        self, db: Database, clock: IReactorTime, identity: Identity, settings: OAuthSettings
    ) -> None:
        self.db = db
        self.clock = clock
        self.identity = identity
        self.settings = settings

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def _server(self, conn: Connection, now: datetime.datetime) -> WebApplicationServer:
        return WebApplicationServer(
            StoreValidator(conn, now, self.settings.max_grants_per_user_app),
            token_expires_in=self.settings.access_token_ttl,
            token_generator=lambda request: _random.token_hex(32),
        )

    # -- apps ---------------------------------------------------------------------------

    async def add_app(self, owner_id: int, name: str, uris: list[str]) -> tuple[App, str]:
        """Register an app; returns it and its secret (shown once, stored hashed). A user
        may own at most `max_apps_per_user` apps (each holds the codes and tokens of its
        grants): one more is OAuthError, nothing stored."""
        name = name.strip() if isinstance(name, str) else ""
        if not 1 <= len(name) <= 255 or has_control(name):
            raise OAuthError("name must be 1 to 255 characters of one line", "name")
        if not uris:
            raise OAuthError("at least one redirect URI is required", "redirect_uri")
        checked = [check_redirect_uri(u) for u in uris]
        uid = _random.token_hex(32)
        secret = _random.token_hex(32)
        now = self.now()
        limit = self.settings.max_apps_per_user

        def txn(conn: Connection) -> App:
            # The owner's row locked first, so that two registrations at once count one
            # after the other (SQLite serialises writers anyway and ignores FOR UPDATE).
            if conn.execute(select(users.c.id).where(users.c.id == owner_id)
                            .with_for_update()).first() is None:
                raise OAuthError("no such user", "owner")
            owned = conn.execute(select(func.count()).select_from(oauth_apps)
                                 .where(oauth_apps.c.owner_id == owner_id)).scalar() or 0
            if owned >= limit:
                raise OAuthError(f"a user may have at most {limit} OAuth apps: delete one "
                                 "first", "owner")
            conn.execute(insert(oauth_apps).values(
                uid=uid, name=name, owner_id=owner_id, secret_digest=creds.digest(secret),
                redirect_uris="\n".join(dict.fromkeys(checked)), created_at=now,
            ))
            return _app(conn.execute(_apps_query().where(oauth_apps.c.uid == uid)).one())

        return await self.db.run("oauth_add_app", txn), secret

    async def list_apps(self, owner_id: int | None = None) -> list[App]:
        def txn(conn: Connection) -> list[App]:
            q = _apps_query().order_by(oauth_apps.c.id)
            if owner_id is not None:
                q = q.where(oauth_apps.c.owner_id == owner_id)
            return [_app(r) for r in conn.execute(q)]

        return await self.db.read("oauth_list_apps", txn)

    async def get_app(self, uid: str) -> App | None:
        if not_text(uid):
            return None  # no app's: PostgreSQL would refuse the lookup

        def txn(conn: Connection) -> App | None:
            row = conn.execute(_apps_query().where(oauth_apps.c.uid == uid)).first()
            return _app(row) if row else None

        return await self.db.read("oauth_get_app", txn)

    async def remove_app(self, uid: str, owner_id: int | None = None) -> App:
        """Delete an app with its codes and tokens (`owner_id`: only if it owns it)."""
        if not_text(uid):
            raise OAuthError("no such app", "uid")

        def txn(conn: Connection) -> App:
            q = _apps_query().where(oauth_apps.c.uid == uid)
            if owner_id is not None:
                q = q.where(oauth_apps.c.owner_id == owner_id)
            row = conn.execute(q).first()
            if row is None:
                raise OAuthError("no such app", "uid")
            app_id = row._mapping["id"]
            conn.execute(delete(oauth_tokens).where(oauth_tokens.c.app_id == app_id))
            conn.execute(delete(oauth_codes).where(oauth_codes.c.app_id == app_id))
            conn.execute(delete(oauth_apps).where(oauth_apps.c.id == app_id))
            return _app(row)

        return await self.db.run("oauth_remove_app", txn)

    async def forget_user(self, user_id: int) -> int:
        """Delete every code and token `user_id` gave any app (a deleted user's grants;
        its own apps go with `remove_app`); how many tokens went."""

        def txn(conn: Connection) -> int:
            gone = conn.execute(delete(oauth_tokens).where(oauth_tokens.c.user_id == user_id))
            conn.execute(delete(oauth_codes).where(oauth_codes.c.user_id == user_id))
            return int(gone.rowcount or 0)

        return await self.db.run("oauth_forget_user", txn)

    # -- grants -------------------------------------------------------------------------

    async def grants(self, user_id: int) -> list[Grant]:
        """The apps holding live tokens of `user_id` (an expired access token still counts
        while its refresh token is live)."""

        def txn(conn: Connection) -> list[Grant]:
            t = oauth_tokens.c
            rows = conn.execute(
                select(oauth_tokens, func.count().over(partition_by=t.app_id).label("n"))
                .where(t.user_id == user_id, t.revoked_at.is_(None))
                .order_by(t.app_id, t.created_at)
            ).all()
            apps = {r._mapping["id"]: _app(r) for r in conn.execute(
                _apps_query().where(oauth_apps.c.id.in_({r._mapping["app_id"] for r in rows}))
            )}
            found: dict[int, Grant] = {}
            for r in rows:
                m = r._mapping
                g = found.get(m["app_id"])
                scopes = tuple(dict.fromkeys((*(g.scopes if g else ()), *m["scopes"].split())))
                since = g.since if g else utc(m["created_at"])
                found[m["app_id"]] = Grant(apps[m["app_id"]], scopes, since,  # type: ignore[arg-type]
                                           int(m["n"]))
            return list(found.values())

        return await self.db.read("oauth_grants", txn)

    async def revoke(self, user_id: int, uid: str) -> int:
        """Revoke every token and unused code `user_id` gave app `uid`; how many tokens."""
        now = self.now()

        def txn(conn: Connection) -> int:
            # Exclusively: a token being issued to the app holds its row shared
            # (StoreValidator.hold_app), and one issued after this must not outlive it.
            app = conn.execute(
                select(oauth_apps.c.id).where(oauth_apps.c.uid == uid).with_for_update()
            ).first()
            if app is None:
                raise OAuthError("no such app", "uid")
            conn.execute(
                update(oauth_codes)
                .where(oauth_codes.c.app_id == app.id, oauth_codes.c.user_id == user_id,
                       oauth_codes.c.used_at.is_(None))
                .values(used_at=now)
            )
            return int(conn.execute(
                update(oauth_tokens)
                .where(oauth_tokens.c.app_id == app.id, oauth_tokens.c.user_id == user_id,
                       oauth_tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount or 0)

        return await self.db.run("oauth_revoke", txn)

    # -- the authorization endpoint -----------------------------------------------------

    async def consent(self, uri: str) -> Consent:
        """Check the authorization request in `uri` (GET /oauth/authorize?...).

        Raises AuthorizationRefused when no redirect may happen (unknown client,
        unregistered redirect_uri), or returns a `redirect` error Location through
        `AuthorizationRedirect` when the client should be told (bad scope, response_type).
        """
        now = self.now()
        uri = _request_uri(uri)

        def txn(conn: Connection) -> Consent:
            return _thd_checked(self._server(conn, now), uri)[0]

        return await self.db.read("oauth_consent", txn)

    async def decide(self, uri: str, user_id: int, allow: bool,
                     session_id: int | None = None) -> str:
        """The Location the user's decision on the request in `uri` sends them to: the
        redirect_uri with a new `code` (and `state`), or with `error=access_denied`.

        `session_id` is the page session the decision came with: it must still be live when
        the code is made (SessionEnded otherwise), so that no code is made on the strength
        of a session a password change ended meanwhile.

        The request is checked again, as `consent` checks it (`_thd_checked`), in the
        transaction that makes the code: an app removed, or its redirect URIs changed, since
        `consent` passed is AuthorizationRefused (or AuthorizationRedirect) as `consent`
        would have said, never oauthlib's error."""
        await self.consent(uri)  # a request refused already is not held up by the write lane
        now = self.now()
        uri = _request_uri(uri)

        def txn(conn: Connection) -> str:
            server = self._server(conn, now)
            consent, request = _thd_checked(server, uri)
            if session_id is not None and not thd_hold_live_credential(
                    conn, session_id, user_id, now):
                raise SessionEnded()
            if not allow:
                return str(_access_denied(request).in_uri(consent.redirect_uri))
            headers, _, _ = server.create_authorization_response(
                uri, scopes=list(consent.scopes), credentials={"user": user_id}
            )
            return str(headers["Location"])

        return await self.db.run("oauth_decide", txn)

    # -- the token endpoint -------------------------------------------------------------

    async def token(self, uri: str, body: str, headers: dict[str, str]) -> Reply:
        """POST /oauth/token: (headers, JSON body, status), the success body exactly the
        seed's `{access_token, token_type: "bearer", expires_in, refresh_token}`. Errors
        are RFC 6749 §5.2's: a repeated parameter (§3.2) or a missing grant_type is
        invalid_request, and invalid_client is challenged with `CLIENT_CHALLENGE`."""
        malformed = _repeated(body)
        if malformed is None and not dict(parse_qsl(body)).get("grant_type"):
            malformed = "Missing grant_type parameter."  # oauthlib: unsupported_grant_type
        if malformed is not None:
            return _error_reply(InvalidRequestError(description=malformed))
        now = self.now()
        body = _normal_redirect(_normal_scopes(body))

        def txn(conn: Connection) -> Reply:
            server = self._server(conn, now)
            out_headers, out_body, status = server.create_token_response(
                uri, "POST", body, headers
            )
            return dict(out_headers), out_body, status

        try:
            reply_headers, reply_body, status = _challenged(
                await self.db.run("oauth_token", txn))
        except GrantLost as e:
            return _error_reply(InvalidGrantError(description=str(e)))
        if status == 200:
            token = json.loads(reply_body)
            reply_body = json.dumps({
                "access_token": token["access_token"],
                "token_type": "bearer",
                "expires_in": token["expires_in"],
                "refresh_token": token["refresh_token"],
            })
        return reply_headers, reply_body, status

    # -- the revocation endpoint --------------------------------------------------------

    async def revoke_token(self, uri: str, body: str, headers: dict[str, str]) -> Reply:
        """POST /oauth/revoke (RFC 7009): (headers, body, status). The client authenticates
        as at the token endpoint; the token it names (`token`, an access or a refresh token;
        `token_type_hint` says which to look for first) ends with its whole family: every
        token issued from the same authorization code, the access tokens of a refresh
        token among them (StoreValidator.revoke_token). 200 with an empty body whether or
        not the token was live or the client's (RFC 7009 2.2: an invalid token is no
        error); a missing `token` or a parameter given twice is invalid_request, a failed
        client authentication invalid_client with `CLIENT_CHALLENGE`."""
        repeated = _repeated(body)
        if repeated is not None:
            return _error_reply(InvalidRequestError(description=repeated))
        now = self.now()

        def txn(conn: Connection) -> Reply:
            out_headers, out_body, status = self._server(conn, now).create_revocation_response(
                uri, "POST", body, headers)
            return dict(out_headers), out_body, status

        return _challenged(await self.db.run("oauth_revoke_token", txn))

    # -- pruning ------------------------------------------------------------------------

    async def prune(self) -> tuple[int, int]:
        """Delete the rows no request can use any more; how many (codes, tokens).

        A token row rotated or revoked more than `revoked_token_days` ago (whether or not
        its family is still live: a client refreshing in a loop writes a row each time and
        revokes the one before, so its family's dead rows would grow without bound). Until
        then a rotated refresh token presented again still revokes its family; after, it is
        invalid_grant only. An authorization code CODE_RETENTION past its expiry that no
        token row names (a live family's rows keep their code, which a replayed code
        revokes). Rows go in batches of PRUNE_BATCH, a transaction each; idempotent, so two
        nodes meeting (OAuthPruner's lease lapsed under one) do no harm."""
        now = self.now()
        token_before = now - datetime.timedelta(seconds=self.settings.revoked_token_retention)
        code_before = now - datetime.timedelta(seconds=CODE_RETENTION)
        tokens = await delete_in_batches(self.db, "oauth_prune_tokens", _thd_prune_tokens,
                                         token_before, batch=PRUNE_BATCH)
        codes = await delete_in_batches(self.db, "oauth_prune_codes", _thd_prune_codes,
                                        code_before, batch=PRUNE_BATCH)
        return codes, tokens

    # -- resource access ----------------------------------------------------------------

    async def resolve(self, access_token: str) -> Principal | None:
        """Who a live access token acts for, with its scopes; None if not live."""
        if not 1 <= len(access_token) <= 256:
            return None
        now = self.now()

        def txn(conn: Connection) -> tuple[int, User, str] | None:
            row = conn.execute(_LIVE_TOKEN, {"digest": creds.digest(access_token)}).first()
            if row is None or row.revoked_at is not None or utc(row.expires_at) <= now:  # type: ignore[operator]
                return None
            # The user in the same read: every request of an API client comes through here.
            user = thd_get_user(conn, row.user_id)
            return (row.id, user, row.scopes) if user is not None else None

        found = await self.db.read("oauth_resolve", txn)
        if found is None:
            return None
        token_id, user, scopes = found
        if not user.is_active:
            return None
        return Principal(user=user, credential_id=token_id, kind="oauth",
                         scopes=tuple(scopes.split()))


# Every request of an API client reads its token: built once (SQLAlchemy would build, key
# and look up a statement made in the call every time).
_LIVE_TOKEN = select(oauth_tokens.c.id, oauth_tokens.c.user_id, oauth_tokens.c.scopes,
                     oauth_tokens.c.expires_at, oauth_tokens.c.revoked_at) \
    .where(oauth_tokens.c.access_digest == bindparam("digest"))


# Rows deleted by one transaction of `OAuthProvider.prune`.
PRUNE_BATCH = 5000
# How often OAuthPruner prunes.
PRUNE_INTERVAL = 3600.0


def _thd_checked(server: WebApplicationServer, uri: str) -> tuple[Consent, Any]:
    """Blocking, in a transaction: the authorization request in `uri` checked as the consent
    page and the decision both check it (oauthlib's validation, then the PKCE challenge),
    and oauthlib's request. Raises AuthorizationRefused when no redirect may happen, or
    AuthorizationRedirect with the error's Location."""
    try:
        scopes, credentials = server.validate_authorization_request(uri)
    except FatalClientError as e:
        raise AuthorizationRefused(_describe(e)) from None
    except OAuth2Error as e:
        raise AuthorizationRedirect(e.in_uri(e.redirect_uri)) from None
    request = credentials["request"]
    refusal = _challenge_refusal(request.code_challenge, request.code_challenge_method)
    if refusal is not None:
        error = _invalid_request(refusal, request)
        raise AuthorizationRedirect(error.in_uri(credentials["redirect_uri"]))
    consent = Consent(
        app=_app(request.client.row), scopes=tuple(scopes),
        redirect_uri=credentials["redirect_uri"], state=credentials.get("state"),
    )
    return consent, request


def _thd_prune_tokens(conn: Connection, before: datetime.datetime, batch: int) -> int:
    """Delete up to `batch` token rows revoked at or before `before`; how many."""
    t = oauth_tokens.c
    ids = select(t.id).where(t.revoked_at <= before).limit(batch).scalar_subquery()
    return int(conn.execute(delete(oauth_tokens).where(t.id.in_(ids))).rowcount or 0)


def _thd_prune_codes(conn: Connection, before: datetime.datetime, batch: int) -> int:
    """Delete up to `batch` codes expired at or before `before` that no token row
    names; how many."""
    c = oauth_codes.c
    named = select(oauth_tokens.c.id).where(oauth_tokens.c.code_id == c.id)
    ids = select(c.id).where(c.expires_at <= before, ~named.exists()) \
        .limit(batch).scalar_subquery()
    return int(conn.execute(delete(oauth_codes).where(c.id.in_(ids))).rowcount or 0)


class OAuthPruner(Sweeper[tuple[int, int]]):
    """Runs `OAuthProvider.prune` every PRUNE_INTERVAL seconds. Its deletes are idempotent,
    but the Core gives it the store's job leases: one node of those sharing a PostgreSQL
    store prunes each period, so no two nodes' batched deletes meet on the same rows (they
    could deadlock: retried, but the work of both wasted)."""

    name = "oauth-pruner"
    failed = "pruning the OAuth codes and tokens failed"

    def __init__(self, oauth: OAuthProvider, every: float = PRUNE_INTERVAL) -> None:
        super().__init__(oauth.clock, every)
        self.oauth = oauth

    def sweep(self) -> Awaitable[tuple[int, int]]:
        return self.oauth.prune()

    def swept(self, pruned: tuple[int, int]) -> None:
        codes, tokens = pruned
        if codes or tokens:
            log.info("pruned {codes} OAuth codes and {tokens} tokens no request can use",
                     codes=codes, tokens=tokens)


class SessionEnded(Exception):
    """The page session a decision came with ended before the code was made."""


class AuthorizationRedirect(Exception):
    """An authorization error the client is told about: redirect the user to `location`."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


def _normal_redirect(form: str) -> str:
    """`form` (form-encoded) with its redirect_uri in normal form, so that it compares equal
    to the registered one however the client spelt its host; unchanged when it has none or
    one that cannot be normalised (oauthlib then refuses it as unregistered)."""
    if "redirect_uri" not in form:
        return form
    pairs = parse_qsl(form, keep_blank_values=True)
    changed = False
    for i, (key, value) in enumerate(pairs):
        if key == "redirect_uri":
            try:
                normal = normal_redirect_uri(value)
            except ValueError:
                continue
            if normal != value:
                pairs[i], changed = (key, normal), True
    return urlencode(pairs) if changed else form


def _normal_scopes(form: str) -> str:
    """`form` (form-encoded) with its `scope` in normal form. The scopes of a `scope` joined
    by a literal "+" are spaced as RFC 6749 joins them: seed 000 tells clients to join scopes
    with "+" (scope=read+write, which decodes to "read write"); a client that encodes its
    parameters as it should sends that "+" as %2B, which decodes to "read+write", one unknown
    scope. And a scope named more than once is named once ("read write read" is "read
    write": RFC 6749 3.3's scope is a list whose order does not matter, a set), so that what
    is shown, stored and granted names each at most once, never more characters than the
    scopes there are (the codes' and tokens' columns hold 255). Unchanged otherwise."""
    if "scope" not in form:
        return form
    pairs = parse_qsl(form, keep_blank_values=True)
    normal = [(key, " ".join(dict.fromkeys(value.replace("+", " ").split(" ")))
               if key == "scope" else value) for key, value in pairs]
    return urlencode(normal) if normal != pairs else form


def token_client(form: str, authorization: str | None) -> tuple[str, str] | None:
    """Which client token request `form` (form-encoded) with header `authorization` comes
    from, as the rate limit of the token endpoint counts it: its client_id and the digest
    of the secret it presents (HTTP Basic, else the form's), so that one who knows a
    client's id (it is public: it is in every authorization request) but not its secret
    cannot spend the client's budget. None when it names no client."""
    fields = dict(parse_qsl(form, keep_blank_values=True))
    client_id, secret = fields.get("client_id"), fields.get("client_secret")
    try:
        basic = basic_credentials(authorization)
    except ValueError:
        basic = None  # refused by the validator; counted as the form's client
    if basic is not None:
        client_id, secret = basic
    if not client_id:
        return None
    return client_id, creds.digest(secret or "").hex()


def _repeated(form: str) -> str | None:
    """What makes request `form` (form-encoded) invalid_request before oauthlib reads it: a
    parameter given more than once (RFC 6749 §3.2; oauthlib checks only some, and takes the
    last of the others). None when none is."""
    seen: set[str] = set()
    for key, _ in parse_qsl(form, keep_blank_values=True):
        if key in seen:
            return f"Parameter {key} is repeated."
        seen.add(key)
    return None


def _challenged(reply: Reply) -> Reply:
    """oauthlib's `reply` with a 401 invalid_client challenged with `CLIENT_CHALLENGE`
    (oauthlib's Bearer is a resource server's)."""
    headers, body, status = reply
    if status == 401:
        headers = {k: v for k, v in headers.items() if k.lower() != "www-authenticate"}
        headers["WWW-Authenticate"] = CLIENT_CHALLENGE
    return headers, body, status


def _error_reply(error: OAuth2Error) -> Reply:
    """The reply of `error` at the token or revocation endpoint (RFC 6749 §5.2), as
    oauthlib makes one."""
    return {**_REPLY_HEADERS, **error.headers}, str(error.json), int(error.status_code)


def _request_uri(uri: str) -> str:
    """`uri` with its query's scope as `_normal_scopes` has it and its redirect_uri as
    `_normal_redirect` has it."""
    base, mark, query = uri.partition("?")
    return base + mark + _normal_redirect(_normal_scopes(query)) if mark else uri


def _challenge_refusal(challenge: str | None, method: str | None) -> str | None:
    """Why a PKCE `challenge` (None: the request has none) cannot be taken, or None. The
    method must be S256 (plain would send the verifier itself through the browser), and the
    challenge one S256 makes: BASE64URL(SHA256(code_verifier)) with no padding, 43
    characters (RFC 7636 4.2). No verifier matches any other value: its code, made once the
    user allowed it, could never be exchanged (and one past 128 characters or holding NUL
    would not even be stored on PostgreSQL)."""
    if challenge is None:
        return None
    if method != "S256":
        return "code_challenge_method must be S256"
    if _S256_CHALLENGE.fullmatch(challenge) is None:
        return ("code_challenge must be an S256 challenge: 43 characters of base64url "
                "(RFC 7636 4.2)")
    return None


_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


def _describe(error: OAuth2Error) -> str:
    return str(error.description or error.error)


def _invalid_request(description: str, request: Any) -> OAuth2Error:
    return InvalidRequestError(description=description, request=request)


def _access_denied(request: Any) -> OAuth2Error:
    return AccessDeniedError(description="The user denied the request.", request=request)


__all__ = [
    "CLIENT_CHALLENGE",
    "SCOPES",
    "App",
    "AuthorizationRedirect",
    "AuthorizationRefused",
    "Consent",
    "Grant",
    "OAuthError",
    "OAuthProvider",
    "OAuthPruner",
    "SessionEnded",
    "token_client",
]

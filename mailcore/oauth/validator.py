"""Our rules for oauthlib: a `RequestValidator` over one open store transaction.

oauthlib calls its validator synchronously, so the provider runs each oauthlib call inside
one transaction on the store's pool and hands this validator that connection. Every method
here is therefore blocking (`thd`-style) and must only be called from there.

The rules: clients authenticate with their secret (form fields or HTTP Basic, never both;
only its SHA-256 is stored); a redirect_uri must equal a registered one character for
character; codes are single-use, bound to the client and to the redirect_uri of the
authorization request, live `CODE_TTL` seconds, and a reused code revokes every token issued
from it (RFC 6749 §4.1.2, RFC 9700 §4.2); PKCE is checked when the code carries a challenge
(S256 only), and a code_verifier sent with a code that carries none is refused (RFC 9700
§2.1.1: a code issued without PKCE cannot pass as one issued with it); a refresh token is
good once (rotated), never for more scopes than granted, and a rotated one presented again
revokes its family, as a client's revocation (RFC 7009) of any token of the family does.

Concurrent requests with one code or refresh token are settled by locking its row as it is
read (FOR UPDATE; SQLite serialises writers anyway): the second waits for the first and then
sees it used, a reuse. The app's row is held shared meanwhile, so that a user's revocation
of the grant (which takes it exclusively) waits for a token being issued and is never
overtaken by one. Marking a code used or a refresh token rotated is conditional, and a grant
that finds it done already is `GrantLost` (invalid_grant, nothing issued).

A user keeps at most `grants_kept` live grants (token families, each from one code) per app:
a code exchanged for one more deletes the rows of the families used longest ago (by their
newest token), as Google keeps 100 refresh tokens per account and client. Refresh tokens
never expire, so without it every Allow exchanged added a live family for ever.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
from typing import Any
from urllib.parse import unquote

from oauthlib.common import Request
from oauthlib.oauth2 import RequestValidator
from sqlalchemy import Connection, delete, func, insert, select, update

from mailcore.identity import secrets as creds
from mailcore.oauth.redirects import normal_redirect_uri
from mailcore.oauth.settings import CODE_TTL
from mailcore.store.schema import oauth_apps, oauth_codes, oauth_tokens, users
from mailcore.text import not_text

# Unused authorization codes a user keeps per app (a code lives CODE_TTL, 5 minutes: a
# client waits on one at a time); making one more deletes the oldest.
CODES_KEPT = 100
# Every scope a token may carry (dropmyemail-v1.md); `read` implies the last three.
SCOPES = ("read", "write", "email", "attachment", "contact")
GRANT_TYPES = ("authorization_code", "refresh_token")


def redirect_uris(row: Any) -> list[str]:
    """An app's registered redirect URIs, in normal form (mailcore.oauth.redirects; one
    registered before it was stored so, and that has none, as it is)."""
    return [_normal_or_none(u) or u for u in row._mapping["redirect_uris"].split("\n") if u]


def usable_redirect_uris(row: Any) -> list[str]:
    """The redirect URIs a request may name: those of `redirect_uris` in normal form (one
    registered before the check that has no normal form is never redirected to)."""
    return [n for u in row._mapping["redirect_uris"].split("\n") if (n := _normal_or_none(u))]


def _normal_or_none(uri: str) -> str | None:
    try:
        return normal_redirect_uri(uri)
    except ValueError:
        return None


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The client id and secret of an HTTP Basic `authorization` header (RFC 6749 §2.3.1:
    each form-urlencoded, then joined by a colon); None when it is of another scheme or
    there is none. A Basic header that does not decode to `id:secret` is ValueError."""
    if authorization is None or authorization[:6].lower() != "basic ":
        return None
    try:
        pair = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not HTTP Basic credentials") from None
    client_id, sep, secret = pair.partition(":")
    if not sep:
        raise ValueError("not HTTP Basic credentials")
    return unquote(client_id), unquote(secret)


class GrantLost(Exception):
    """The code or refresh token of a grant was used by another request meanwhile: the
    transaction is rolled back (no token issued) and the client told invalid_grant."""


class Client:
    """The app a request comes from, as oauthlib wants it (`client_id`), and its row."""

    def __init__(self, row: Any) -> None:
        self.row = row
        self.id: int = row._mapping["id"]
        self.client_id: str = row._mapping["uid"]


class StoreValidator(RequestValidator):  # type: ignore[misc]
    """oauthlib's questions answered from one open transaction `conn` at time `now`."""

    def __init__(self, conn: Connection, now: datetime.datetime,
                 grants_kept: int | None = None) -> None:
        self.conn = conn
        self.now = now
        self.grants_kept = grants_kept  # live grants a user keeps per app (None: all)
        self._apps: dict[str, Any] = {}

    # -- clients ------------------------------------------------------------------------

    def app(self, client_id: str | None) -> Any:
        """The app row whose uid is `client_id` (with its owner's username), or None. A
        client id that is not text (NUL, from a form or a Basic header oauthlib decoded)
        names no app: PostgreSQL would refuse the lookup."""
        if not client_id or not_text(client_id):
            return None
        if client_id not in self._apps:
            self._apps[client_id] = self.conn.execute(
                select(oauth_apps, users.c.username.label("owner"))
                .join(users, users.c.id == oauth_apps.c.owner_id)
                .where(oauth_apps.c.uid == client_id, users.c.is_active.is_(True))
            ).first()
        return self._apps[client_id]

    def client_authentication_required(self, request: Request, *args: Any, **kwargs: Any) -> bool:
        return True

    def authenticate_client(self, request: Request, *args: Any, **kwargs: Any) -> bool:
        client_id, secret = request.client_id, request.client_secret
        try:
            basic = basic_credentials((request.headers or {}).get("Authorization"))
        except ValueError:
            return False
        if basic is not None:
            if secret is not None:
                return False  # RFC 6749 §2.3: one authentication method per request
            basic_id, basic_secret = basic
            if client_id is not None and client_id != basic_id:
                return False
            client_id, secret = basic_id, basic_secret
        row = self.app(client_id)
        if row is None or not secret:
            return False
        if not hmac.compare_digest(row._mapping["secret_digest"], creds.digest(secret)):
            return False
        request.client = Client(row)
        request.client_id = client_id
        return True

    def authenticate_client_id(
        self, client_id: str, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        return False  # every client is confidential: no public clients

    def validate_client_id(
        self, client_id: str, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        row = self.app(client_id)
        if row is None:
            return False
        request.client = Client(row)
        return True

    def validate_redirect_uri(
        self, client_id: str, redirect_uri: str, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        row = self.app(client_id)
        return row is not None and redirect_uri in usable_redirect_uris(row)

    def get_default_redirect_uri(
        self, client_id: str, request: Request, *args: Any, **kwargs: Any
    ) -> str | None:
        row = self.app(client_id)
        if row is None or len(redirect_uris(row)) != 1:
            return None
        usable = usable_redirect_uris(row)
        return usable[0] if usable else None

    def validate_response_type(
        self, client_id: str, response_type: str, client: Any, request: Request,
        *args: Any, **kwargs: Any,
    ) -> bool:
        return response_type == "code"

    def validate_grant_type(
        self, client_id: str, grant_type: str, client: Any, request: Request,
        *args: Any, **kwargs: Any,
    ) -> bool:
        return grant_type in GRANT_TYPES

    def validate_scopes(
        self, client_id: str, scopes: list[str], client: Any, request: Request,
        *args: Any, **kwargs: Any,
    ) -> bool:
        return bool(scopes) and all(s in SCOPES for s in scopes)

    def get_default_scopes(
        self, client_id: str, request: Request, *args: Any, **kwargs: Any
    ) -> list[str]:
        return ["read"]

    def is_pkce_required(self, client_id: str, request: Request) -> bool:
        return False

    # -- codes --------------------------------------------------------------------------

    def save_authorization_code(
        self, client_id: str, code: dict[str, str], request: Request, *args: Any, **kwargs: Any
    ) -> None:
        row = self.app(client_id)
        explicit = not getattr(request, "using_default_redirect_uri", False)
        self.conn.execute(
            insert(oauth_codes).values(
                app_id=row._mapping["id"],
                user_id=int(request.user),
                digest=creds.digest(code["code"]),
                redirect_uri=request.redirect_uri if explicit else None,
                scopes=" ".join(request.scopes),
                code_challenge=request.code_challenge,
                code_challenge_method=request.code_challenge_method
                if request.code_challenge
                else None,
                created_at=self.now,
                expires_at=self.now + datetime.timedelta(seconds=CODE_TTL),
            )
        )
        self.keep_codes(row._mapping["id"], int(request.user))

    def _code(self, code: str, request: Request) -> Any:
        found = getattr(request, "mailcore_code", None)
        if found is None:
            digest = creds.digest(code)
            self.hold_user(self.conn.execute(
                select(oauth_codes.c.user_id).where(oauth_codes.c.digest == digest)
            ).scalar())
            found = self.conn.execute(
                select(oauth_codes).where(oauth_codes.c.digest == digest).with_for_update()
            ).first()
            request.mailcore_code = found
        return found

    def validate_code(
        self, client_id: str, code: str, client: Any, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        self.hold_app(client.id)
        row = self._code(code, request)
        if row is None or row._mapping["app_id"] != client.id:
            return False
        m = row._mapping
        if m["used_at"] is not None:
            # A second use: whoever holds the code may not be who used it first.
            self.revoke_family(m["id"])
            return False
        if _utc(m["expires_at"]) <= self.now:
            return False
        if m["code_challenge"] is None and request.code_verifier is not None:
            # PKCE downgrade (RFC 9700 §2.1.1): a client that sends a verifier asked for
            # its code with a challenge, so a code issued without one was not issued to it.
            return False
        request.user = m["user_id"]
        request.scopes = m["scopes"].split()
        return True

    def get_code_challenge(self, code: str, request: Request) -> str | None:
        row = self._code(code, request)
        return row._mapping["code_challenge"] if row is not None else None

    def get_code_challenge_method(self, code: str, request: Request) -> str | None:
        row = self._code(code, request)
        return row._mapping["code_challenge_method"] if row is not None else None

    def confirm_redirect_uri(
        self, client_id: str, code: str, redirect_uri: str | None, client: Any,
        request: Request, *args: Any, **kwargs: Any,
    ) -> bool:
        row = self._code(code, request)
        if row is None:
            return False
        stored = row._mapping["redirect_uri"]
        if getattr(request, "using_default_redirect_uri", False):
            return stored is None  # named at authorization: required here (RFC 6749 §4.1.3)
        expected = stored if stored is not None else self.get_default_redirect_uri(
            client_id, request
        )
        return redirect_uri == expected

    def invalidate_authorization_code(
        self, client_id: str, code: str, request: Request, *args: Any, **kwargs: Any
    ) -> None:
        row = self._code(code, request)
        done = self.conn.execute(
            update(oauth_codes)
            .where(oauth_codes.c.id == row._mapping["id"], oauth_codes.c.used_at.is_(None))
            .values(used_at=self.now)
        )
        if done.rowcount != 1:
            raise GrantLost("the code was used meanwhile")

    # -- tokens -------------------------------------------------------------------------

    def save_bearer_token(
        self, token: dict[str, Any], request: Request, *args: Any, **kwargs: Any
    ) -> str | None:
        code = getattr(request, "mailcore_code", None)
        previous = getattr(request, "mailcore_refresh", None)
        if code is not None:
            code_id = code._mapping["id"]
        elif previous is not None:
            code_id = previous._mapping["code_id"]
        else:
            code_id = None
        refresh = token.get("refresh_token")
        self.conn.execute(
            insert(oauth_tokens).values(
                app_id=request.client.id,
                user_id=int(request.user),
                code_id=code_id,
                access_digest=creds.digest(token["access_token"]),
                refresh_digest=creds.digest(refresh) if refresh else None,
                scopes=" ".join(request.scopes),
                created_at=self.now,
                expires_at=self.now + datetime.timedelta(seconds=int(token["expires_in"])),
            )
        )
        if code is not None and self.grants_kept is not None:
            self.keep_grants(request.client.id, int(request.user), self.grants_kept)
        if previous is not None:
            done = self.conn.execute(
                update(oauth_tokens)
                .where(oauth_tokens.c.id == previous._mapping["id"],
                       oauth_tokens.c.revoked_at.is_(None))
                .values(revoked_at=self.now)
            )
            if done.rowcount != 1:
                raise GrantLost("the refresh token was used meanwhile")
        return None

    def validate_refresh_token(
        self, refresh_token: str, client: Any, request: Request, *args: Any, **kwargs: Any
    ) -> bool:
        self.hold_app(client.id)
        digest = creds.digest(refresh_token)
        self.hold_user(self.conn.execute(
            select(oauth_tokens.c.user_id).where(oauth_tokens.c.refresh_digest == digest)
        ).scalar())
        row = self.conn.execute(
            select(oauth_tokens).where(oauth_tokens.c.refresh_digest == digest)
            .with_for_update()
        ).first()
        if row is None or row._mapping["app_id"] != client.id:
            return False
        m = row._mapping
        if m["revoked_at"] is not None:
            # A rotated refresh token comes back: revoke what descends from its grant.
            if m["code_id"] is not None:
                self.revoke_family(m["code_id"])
            return False
        request.user = m["user_id"]
        request.mailcore_refresh = row
        return True

    def get_original_scopes(
        self, refresh_token: str, request: Request, *args: Any, **kwargs: Any
    ) -> list[str]:
        return str(request.mailcore_refresh._mapping["scopes"]).split()

    def rotate_refresh_token(self, request: Request) -> bool:
        return True

    def revoke_token(self, token: str, token_type_hint: str | None, request: Request,
                     *args: Any, **kwargs: Any) -> None:
        """RFC 7009: revoke the family of `token` (an access or refresh token of the client
        that authenticated; the hint says which column to look in first): every token
        issued from its authorization code, the row itself included (one row holds an
        access token and the refresh token issued with it, so either ends both). A token
        of another client, or none, is left alone and answered as one revoked (RFC 7009
        2.2), so that nobody learns whether another client's token exists. The rows are
        locked as a refresh locks them (the app shared, the user, then the token row), so
        a refresh of the token at the same time either finishes first, its new token in the
        family revoked here, or comes after and finds it revoked."""
        self.hold_app(request.client.id)
        digest = creds.digest(token)
        t = oauth_tokens.c
        columns = (t.access_digest, t.refresh_digest)
        if token_type_hint == "refresh_token":  # noqa: S105 (a hint's name, no secret)
            columns = columns[::-1]
        row = None
        for column in columns:
            self.hold_user(self.conn.execute(
                select(t.user_id).where(column == digest)).scalar())
            row = self.conn.execute(
                select(oauth_tokens).where(column == digest).with_for_update()).first()
            if row is not None:
                break
        if row is None or row._mapping["app_id"] != request.client.id:
            return
        if row._mapping["code_id"] is not None:
            self.revoke_family(row._mapping["code_id"])  # this row among them
        else:
            self.conn.execute(update(oauth_tokens).where(t.id == row._mapping["id"],
                                                         t.revoked_at.is_(None))
                              .values(revoked_at=self.now))

    def hold_app(self, app_id: int) -> None:
        """Hold app `app_id`'s row shared until the transaction ends: `OAuthProvider.revoke`
        takes it exclusively, so a grant being issued and a revocation never overlap."""
        self.conn.execute(
            select(oauth_apps.c.id).where(oauth_apps.c.id == app_id).with_for_update(read=True)
        )

    def hold_user(self, user_id: int | None) -> None:
        """Hold user `user_id`'s row shared until the transaction ends, before the code or
        token row is locked: a password change updates that row first and then revokes
        the user's codes and tokens, so on PostgreSQL the two take turns. Without it a
        refresh or exchange holding its row made the change's revocation wait for it and
        then miss the token it had just issued, which outlived the change."""
        if user_id is not None:
            self.conn.execute(
                select(users.c.id).where(users.c.id == user_id).with_for_update(read=True)
            )

    def keep_codes(self, app_id: int, user_id: int) -> None:
        """Delete the user's unused codes for the app but the newest CODES_KEPT: each Allow
        makes one, which lived a day past its 5 minutes before the prune took it, however
        many a script allowing in a loop made. A deleted code is invalid_grant, as an
        expired one; a used one is kept (a replay of it revokes its family)."""
        c = oauth_codes.c
        unused = (c.app_id == app_id, c.user_id == user_id, c.used_at.is_(None))
        oldest_kept = self.conn.execute(
            select(c.id).where(*unused).order_by(c.id.desc()).offset(CODES_KEPT - 1).limit(1)
        ).scalar()
        if oldest_kept is not None:
            self.conn.execute(delete(oauth_codes).where(*unused, c.id < oldest_kept))

    def keep_grants(self, app_id: int, user_id: int, kept: int) -> None:
        """Delete the rows of the user's live grants to the app (token families, by code)
        but the `kept` whose newest token is newest: the one just issued is among them.
        Their refresh tokens are then invalid_grant, as a pruned family's are. Two
        exchanges at once may each miss the other's new family (PostgreSQL: neither sees
        the other's uncommitted row), leaving one over for the next exchange to delete."""
        t = oauth_tokens.c
        mine = (t.app_id == app_id, t.user_id == user_id)
        beyond = (
            select(t.code_id)
            .where(*mine, t.code_id.is_not(None), t.revoked_at.is_(None))
            .group_by(t.code_id)
            .order_by(func.max(t.id).desc())
            .offset(kept)
        )
        stale = [row[0] for row in self.conn.execute(beyond)]
        if stale:
            self.conn.execute(delete(oauth_tokens).where(*mine, t.code_id.in_(stale)))

    def revoke_family(self, code_id: int) -> None:
        """Revoke every live token issued from code `code_id` (and their refreshes)."""
        self.conn.execute(
            update(oauth_tokens)
            .where(oauth_tokens.c.code_id == code_id, oauth_tokens.c.revoked_at.is_(None))
            .values(revoked_at=self.now)
        )


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value

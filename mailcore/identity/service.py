"""Identity: users, their profiles, passwords and credentials of every kind.

One mechanism serves every API: a credential row has a kind ("apikey", "token", "session",
"page"), scopes, and optionally an expiry. "session" is safedrop's X-Auth-Token and "page"
a person's login on the HTML pages: both expire, and neither counts where the other does.
`resolve` turns a presented secret into a Principal, or
None; the web layer turns None into each API's own 401.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import re
import secrets as _random
import unicodedata
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import idna
from sqlalchemy import Connection, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.emailpolicy import header_as_written
from mailcore.gateway.domains import DomainError, normalise_host_name, thd_owner_changed
from mailcore.identity import passwords
from mailcore.identity import secrets as creds
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.store import Database
from mailcore.store.schema import credentials, oauth_codes, oauth_tokens, users
from mailcore.text import has_bidi_control, has_control, has_surrogate, not_text
from mailcore.workers import CpuPool

log = Logger()

KINDS = ("apikey", "token", "session", "page")
PROFILE_FIELDS = (
    "nic",
    "first_name",
    "last_name",
    "email",
    "organisation",
    "tva_intra",
    "address",
    "city",
    "zip",
    "country",
    "phone",
)
EDITABLE_PROFILE_FIELDS = tuple(f for f in PROFILE_FIELDS if f != "nic")
PLANS = ("free", "standard", "agency")
# \Z, not $: "$" also matches before a final newline ("alice\n").
_USERNAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,150}\Z")
_EMAIL = re.compile(r"^[^@\s\x00-\x1f\x7f-\x9f]{1,64}@[^@\s\x00-\x1f\x7f-\x9f]{1,253}\Z")
# Expired credentials stay this long (for "expired" rather than "unknown" in logs).
EXPIRED_KEPT_SECONDS = 86400.0
# Expired credentials (and idle login tokens) the purge deletes a transaction.
PURGE_BATCH = 1000
# Safedrop sessions (X-Auth-Token) one user keeps: each GET /auth makes one (up to 20 a
# second), each lives `session_ttl`; past this many, making one deletes the oldest. As many
# page sessions (each login on the OAuth pages makes one) are kept the same way.
SESSIONS_KEPT = 1000
# last_used_at is refreshed at most this often, so that reads do not become writes.
_LAST_USED_GRANULARITY = 300
# How long a resolved secret is believed without the store (seconds), and how many such
# secrets are kept before the memory starts again.
RESOLVED_TTL = 1.0
RESOLVED_KEPT = 10_000


class IdentityError(Exception):
    """A user or credential operation was refused; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class User:
    id: int
    username: str
    email: str
    nic: str
    first_name: str
    last_name: str
    organisation: str
    tva_intra: str
    address: str
    city: str
    zip: str
    country: str
    phone: str
    plan: str
    is_active: bool
    created_at: datetime.datetime
    # When `mailcore user delete` began to delete the user (None: it is not being deleted).
    deleting_at: datetime.datetime | None = None
    # A digest of the password hash as read with the user: a credential made for a password
    # login names it, and is refused if the password changed meanwhile (`create_credential`).
    password_stamp: bytes = field(default=b"", repr=False, compare=False)

    def profile(self) -> dict[str, str]:
        """Seed 004's User object."""
        return {f: getattr(self, f) for f in PROFILE_FIELDS}


@dataclass(frozen=True)
class CredentialInfo:
    """A credential as it may be shown: never the secret, never the digest."""

    id: int
    kind: str
    prefix: str
    label: str
    scopes: tuple[str, ...]
    created_at: datetime.datetime
    expires_at: datetime.datetime | None
    last_used_at: datetime.datetime | None
    revoked: bool


@dataclass(frozen=True)
class Principal:
    """Who a request acts as, and through which credential."""

    user: User
    credential_id: int | None
    kind: str
    scopes: tuple[str, ...]

    def allows(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


def utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value


# Read with every access token (built once: see mailcore.oauth.provider._LIVE_TOKEN).
_USER_BY_ID = select(users).where(users.c.id == bindparam("user_id"))


def thd_get_user(conn: Connection, user_id: int) -> User | None:
    """Blocking: the user `user_id`, None when there is none (for a caller's transaction
    that reads the user with what it stands for, such as an access token)."""
    row = conn.execute(_USER_BY_ID, {"user_id": user_id}).first()
    return _user(row) if row else None


def name_key(name_or_email: str) -> str:
    """What a user name or e-mail address is compared as: trimmed, NFC, lower case, and the
    domain after its last "@" in A-labels (xn--, as domains are stored:
    `mailcore.gateway.domains.normalise_domain`) when it is a valid host name, so that
    "bücher.example" and "xn--bcher-kva.example" name one user. The database's lower()
    folds ASCII only (SQLite), so an address with other letters is stored in this form
    already (`normalise_email`) and compares equal however it is typed."""
    key = unicodedata.normalize("NFC", name_or_email.strip()).lower()
    local, at, domain = key.rpartition("@")
    return f"{local}@{_ascii_domain(domain) or domain}" if at else key


def _ascii_domain(domain: str) -> str | None:
    """`domain` in lower-case A-labels (as `normalise_host_name` spells host names), or
    None when it is no valid host name."""
    try:
        return normalise_host_name(domain)
    except DomainError:
        return None


def _stored_spellings(key: str) -> tuple[str, ...]:
    """The lower-case values a `name_key` may be stored as: itself, and for an address
    whose domain has A-labels the same with U-labels, as addresses were stored before
    `normalise_email` spelled every domain in A-labels."""
    local, at, domain = key.rpartition("@")
    if not at or "xn--" not in domain:
        return (key,)
    try:
        unicode_domain = idna.decode(domain)
    except (idna.IDNAError, UnicodeError):
        return (key,)
    other = unicodedata.normalize("NFC", f"{local}@{unicode_domain}").lower()
    return (key,) if other == key else (key, other)


def thd_hold_live_credential(conn: Connection, credential_id: int, user_id: int,
                             now: datetime.datetime) -> bool:
    """Blocking: whether credential `credential_id` of active user `user_id` is live (not
    revoked nor expired), its row held shared until the transaction ends: what a caller
    then writes on its strength (an OAuth code made on a page session) commits before a
    revocation of it (`set_password`) or is refused after it, never in between."""
    c = credentials.c
    row = conn.execute(
        select(c.revoked_at, c.expires_at, users.c.is_active)
        .join(users, users.c.id == c.user_id)
        .where(c.id == credential_id, c.user_id == user_id)
        .with_for_update(read=True, of=credentials)
    ).first()
    if row is None or row.revoked_at is not None or not row.is_active:
        return False
    expires = utc(row.expires_at)
    return expires is None or expires > now


def thd_user_row_by_name(conn: Connection, name_or_email: str) -> Any:
    """Blocking: the users row whose username, or else email, is `name_or_email`
    (case-insensitive), or None. Text that is not text (NUL) names nobody: PostgreSQL would
    refuse the lookup."""
    key = name_key(name_or_email)
    if not_text(key):
        return None
    spellings = _stored_spellings(key)
    for column in (users.c.username, users.c.email):
        row = conn.execute(
            select(users).where(func.lower(column).in_(spellings)).order_by(users.c.id)
        ).first()
        if row:
            return row
    return None


def _user(row: Any) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        username=m["username"],
        **{k: m[k] for k in PROFILE_FIELDS},
        plan=m["plan"],
        is_active=bool(m["is_active"]),
        created_at=utc(m["created_at"]),  # type: ignore[arg-type]
        deleting_at=utc(m["deleting_at"]),
        password_stamp=_password_stamp(m["password_hash"]),
    )


def _password_stamp(password_hash: str | None) -> bytes:
    """What `User.password_stamp` holds for `password_hash` (the hash itself stays here)."""
    return hashlib.sha256((password_hash or "").encode("utf-8")).digest()


def _credential(row: Any) -> CredentialInfo:
    m = row._mapping
    return CredentialInfo(
        id=m["id"],
        kind=m["kind"],
        prefix=m["prefix"],
        label=m["label"],
        scopes=tuple(m["scopes"].split()),
        created_at=utc(m["created_at"]),  # type: ignore[arg-type]
        expires_at=utc(m["expires_at"]),
        last_used_at=utc(m["last_used_at"]),
        revoked=m["revoked_at"] is not None,
    )


def normalise_email(email: str) -> str:
    """The address as stored: NFC, its domain in lower case and in A-labels when it is a
    valid host name, and its local part in lower case too when that is not ASCII (see
    `name_key`: such an address must be stored as it is compared). A local part spelling an
    RFC 2047 encoded word is refused (`header_as_written`), and so is an address holding a
    bidirectional control (mailcore.text: no address needs one, and safedrop's pages and
    mails name the user to others, where it would read otherwise than it is)."""
    email = unicodedata.normalize("NFC", email.strip())
    if not _EMAIL.match(email) or has_bidi_control(email):
        raise IdentityError("Enter a valid email address.", "email")
    local, _, domain = email.rpartition("@")
    if not local.isascii():
        local = local.lower()
    email = f"{local}@{_ascii_domain(domain) or domain.lower()}"
    if len(email) > _max_length("email"):
        raise IdentityError("Enter a valid email address.", "email")
    if "=?" in local and not header_as_written("To", email):
        # A local part spelling an RFC 2047 word: mail to or naming the user (safedrop's
        # notifications and receipts) would show what it decodes to, or (a line break)
        # could not be written.
        raise IdentityError("Enter a valid email address.", "email")
    return email


# PostgreSQL: the key of the advisory lock that makes `_thd_name_taken` and the write after
# it one step (any constant bigint; this one spells "usrnames").
_PG_NAMES_LOCK = 0x7573726E616D6573


def _thd_name_taken(conn: Connection, value: str, but: int | None = None) -> bool:
    """Blocking: whether another user (not `but`) has `value` as username or as email.
    A login or a grant names a user by either: one user's email must not be another's
    username, or that name would find the wrong user. The unique indexes see one column
    each, so the check and the caller's write are one step: on PostgreSQL the
    transaction holds an advisory lock until it ends (READ COMMITTED: a writer that waited
    for it then reads what the other committed), SQLite's writers take turns anyway."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_PG_NAMES_LOCK)))
    spellings = _stored_spellings(name_key(value))
    for column in (users.c.username, users.c.email):
        q = select(users.c.id).where(func.lower(column).in_(spellings))
        if but is not None:
            q = q.where(users.c.id != but)
        if conn.execute(q).first() is not None:
            return True
    return False


def _new_id(result: Any) -> int:
    """The primary key of the row an INSERT just made."""
    return int(result.inserted_primary_key[0])


def _max_length(column: str) -> int:
    """The users column's declared length: longer values fail on PostgreSQL."""
    return int(users.c[column].type.length)  # type: ignore[attr-defined]


def _check_profile_values(values: dict[str, str]) -> None:
    """Each profile field fits its column and is one line of text."""
    for key, value in values.items():
        if has_surrogate(value):
            raise IdentityError(f"Field {key} holds a lone surrogate, which is not text.", key)
        if has_control(value):
            raise IdentityError(f"Field {key} may not hold control characters.", key)
        if key != "email" and len(value) > _max_length(key):
            raise IdentityError(
                f"Field {key} is too long ({_max_length(key)} at most).", key
            )


class Identity:
    """Users and credentials. Hashing runs on `cpu`, SQL on the store's pool."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        cpu: CpuPool,
        *,
        session_ttl: int = 3600,
        login_ttl: float | None = None,
        login_idle: float | None = None,
        logins_kept: int = 100,
    ) -> None:
        self.db = db
        self.clock = clock
        self.cpu = cpu
        self.session_ttl = session_ttl
        # The credentials password logins make (`login=True`): their lifetime from the
        # login and from their last use (None: none), and how many one user keeps.
        self.login_ttl = login_ttl
        self.login_idle = login_idle
        self.logins_kept = logins_kept
        # Secrets resolved in the last RESOLVED_TTL seconds: their digest -> (when,
        # when the credential or its parent expires, the principal). Cleared by every
        # change this Identity makes to users or credentials.
        self._resolved: dict[bytes, tuple[float, datetime.datetime | None, Principal]] = {}

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- users ----------------------------------------------------------------------------

    async def create_user(
        self,
        username: str,
        email: str,
        password: str | None = None,
        *,
        plan: str = "free",
        **profile: str,
    ) -> User:
        """A new active user. Raises IdentityError on bad input or a taken name/email."""
        if not _USERNAME.match(username):
            raise IdentityError(
                "Username may contain only letters, digits and @.+-_ (150 at most).", "username"
            )
        email = normalise_email(email)
        if plan not in PLANS:
            raise IdentityError(f"Plan must be one of {', '.join(PLANS)}.", "plan")
        unknown = set(profile) - set(EDITABLE_PROFILE_FIELDS)
        if unknown:
            raise IdentityError(f"Unknown profile field: {sorted(unknown)[0]}.", sorted(unknown)[0])
        password_hash = None
        if password is not None:
            self._check_password(password)
            password_hash = await self.cpu.run(passwords.hash_password, password)
        values: dict[str, Any] = {f: "" for f in EDITABLE_PROFILE_FIELDS}
        values.update({k: str(v) for k, v in profile.items()})
        _check_profile_values(values)
        values.update(
            username=username,
            email=email,
            password_hash=password_hash,
            nic="MC-" + _random.token_hex(4).upper(),
            plan=plan,
            is_active=True,
            created_at=self.now(),
        )

        def txn(conn: Connection) -> int:
            for column, value in (("username", username), ("email", email)):
                if _thd_name_taken(conn, value):
                    raise IdentityError(f"A user with that {column} already exists.", column)
            try:
                return _new_id(conn.execute(insert(users).values(**values)))
            except IntegrityError:
                raise IdentityError("A user with that username or email already exists.") from None

        user_id = await self.db.run("create_user", txn)
        user = await self.get_user(user_id)
        assert user is not None
        return user

    @staticmethod
    def _check_password(password: str) -> None:
        if not 1 <= len(password) <= passwords.MAX_PASSWORD_LENGTH:
            raise IdentityError("Password must be 1 to 1024 characters.", "password")

    async def get_user(self, user_id: int) -> User | None:
        return await self.db.read("get_user", thd_get_user, user_id)

    async def find_user(self, name_or_email: str) -> User | None:
        """The user whose username, or else email, is `name_or_email` (case-insensitive)."""
        def txn(conn: Connection) -> User | None:
            row = thd_user_row_by_name(conn, name_or_email)
            return _user(row) if row else None

        return await self.db.read("find_user", txn)

    async def list_users(self) -> list[User]:
        def txn(conn: Connection) -> list[User]:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.id))]

        return await self.db.read("list_users", txn)

    async def update_profile(self, user_id: int, changes: dict[str, Any]) -> User:
        """Apply seed 004 profile edits. Unknown fields and non-strings are refused."""
        values: dict[str, str] = {}
        for key, value in changes.items():
            if key == "nic":
                continue  # the nic is ours to assign; clients echo it back unchanged
            if key not in EDITABLE_PROFILE_FIELDS:
                raise IdentityError(f"Unknown field: {key}.", key)
            if not isinstance(value, str):
                raise IdentityError(f"Field {key} must be a string.", key)
            values[key] = value
        if "email" in values:
            values["email"] = await self._profile_email(user_id, values["email"])
        _check_profile_values(values)

        def txn(conn: Connection) -> None:
            if "email" in values and _thd_name_taken(conn, values["email"], but=user_id):
                raise IdentityError("A user with that email already exists.", "email")
            if values:
                try:
                    conn.execute(update(users).where(users.c.id == user_id).values(**values))
                except IntegrityError:
                    # PostgreSQL (READ COMMITTED): another user took the address since the
                    # check above, and committed first.
                    raise IdentityError(
                        "A user with that email already exists.", "email") from None

        await self.db.run("update_profile", txn)
        self.forget_resolved()
        user = await self.get_user(user_id)
        if user is None:
            raise IdentityError("No such user.")
        return user

    async def _profile_email(self, user_id: int, email: str) -> str:
        """`email` as a profile edit stores it (`normalise_email`), or as stored when it is
        the user's stored email unchanged: a client echoes the whole profile back, and an
        address stored before a spelling was refused (an RFC 2047 word in its local part)
        must not make every edit of the user's other fields a 400."""
        try:
            return normalise_email(email)
        except IdentityError:
            user = await self.get_user(user_id)
            if user is not None and user.email == email:
                return email
            raise

    async def set_password(self, user_id: int, password: str) -> None:
        """A new password. Everything handed out for the old one ends with it: the page
        sessions (browser logins), the tokens the password logins made (`/api-token-auth/`,
        `/api/v1/auth/`) and the user's OAuth access and refresh tokens and unused codes
        (Dropmyemail's, granted on the consent page after a password login). What the
        operator made stays, each revoked on its own: API keys (and the safedrop sessions
        made with them) and the tokens `mailcore token create` printed."""
        self._check_password(password)
        hashed = await self.cpu.run(passwords.hash_password, password)
        now = self.now()

        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.id == user_id).values(password_hash=hashed))
            c = credentials.c
            conn.execute(update(credentials).where(
                c.user_id == user_id, or_(c.kind == "page", c.login.is_(True)),
                c.revoked_at.is_(None),
            ).values(revoked_at=now))
            # The OAuth tables are written here rather than through mailcore.oauth, which
            # builds on this module: one transaction, so no grant outlives the change.
            conn.execute(update(oauth_tokens).where(
                oauth_tokens.c.user_id == user_id, oauth_tokens.c.revoked_at.is_(None),
            ).values(revoked_at=now))
            conn.execute(update(oauth_codes).where(
                oauth_codes.c.user_id == user_id, oauth_codes.c.used_at.is_(None),
            ).values(used_at=now))

        await self.db.run("set_password", txn)
        self.forget_resolved()

    async def set_active(self, user_id: int, active: bool) -> None:
        """Enable or disable a user. A disabled user's password, keys, tokens, sessions and
        OAuth grants all stop resolving (they are kept, and work again once enabled), and
        its domains' mail is refused for now (every node's RCPT snapshot hears of it:
        `mailcore.gateway.domains.thd_owner_changed`). A user being deleted is not enabled
        again (IdentityError): its deletion is to be finished."""
        def txn(conn: Connection) -> None:
            if active and conn.execute(select(users.c.deleting_at).where(
                    users.c.id == user_id).with_for_update()).scalar() is not None:
                raise IdentityError("The user is being deleted: finish it with "
                                    "`mailcore user delete`.")
            conn.execute(update(users).where(users.c.id == user_id).values(is_active=active))
            thd_owner_changed(conn, user_id)

        await self.db.run("set_active", txn)
        self.forget_resolved()

    async def begin_deletion(self, user_id: int) -> User:
        """The first step of deleting a user (`mailcore.deletion`): disable it as
        `set_active` does and mark it being deleted (`deleting_at`, kept from an earlier
        start), in one commit, so that nothing of its acts any more while what it owns is
        removed, and a deletion cut short is seen and finished. Returns the user so marked
        (IdentityError when there is none)."""
        now = self.now()

        def txn(conn: Connection) -> User:
            conn.execute(update(users).where(users.c.id == user_id).values(
                is_active=False, deleting_at=func.coalesce(users.c.deleting_at, now)))
            thd_owner_changed(conn, user_id)
            found = thd_get_user(conn, user_id)
            if found is None:
                raise IdentityError("No such user.")
            return found

        marked = await self.db.run("begin_user_deletion", txn)
        self.forget_resolved()
        return marked

    async def finish_deletion(self, user_id: int) -> bool:
        """The last step of deleting a user: its credentials of every kind (API keys,
        tokens, login tokens, safedrop and page sessions) and its row go, in one commit.
        Only a user `begin_deletion` marked; False when there is no such user (left).
        What other services keep of it is theirs to remove first (`mailcore.deletion`);
        the foreign keys' cascade takes only the counters kept beside it."""

        def txn(conn: Connection) -> bool:
            marked = conn.execute(select(users.c.id).where(
                users.c.id == user_id, users.c.deleting_at.is_not(None)).with_for_update()
            ).first()
            if marked is None:
                return False
            c = credentials.c
            # Those made from another first (a safedrop session from its API key).
            conn.execute(delete(credentials).where(c.user_id == user_id,
                                                   c.parent_id.is_not(None)))
            conn.execute(delete(credentials).where(c.user_id == user_id))
            conn.execute(delete(users).where(users.c.id == user_id))
            return True

        done = await self.db.run("finish_user_deletion", txn)
        self.forget_resolved()
        return done

    async def set_plan(self, user_id: int, plan: str) -> None:
        if plan not in PLANS:
            raise IdentityError(f"Plan must be one of {', '.join(PLANS)}.", "plan")

        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.id == user_id).values(plan=plan))

        await self.db.run("set_plan", txn)
        self.forget_resolved()

    async def authenticate_password(self, name_or_email: str, password: str) -> User | None:
        """The active user whose password this is, else None (same cost either way)."""

        def txn(conn: Connection) -> tuple[User, str | None] | None:
            row = thd_user_row_by_name(conn, name_or_email)
            return (_user(row), row._mapping["password_hash"]) if row else None

        found = await self.db.read("authenticate_password", txn)
        stored = found[1] if found else None
        ok = await self.cpu.run(passwords.verify_password, stored, password)
        if not ok or found is None or stored is None or not found[0].is_active:
            return None
        user = found[0]
        if passwords.needs_rehash(stored):
            user = await self._rehash(user, stored, password)
        return user

    async def _rehash(self, user: User, stored: str, password: str) -> User:
        """`user`, whose right `password` was just checked against `stored`, a hash made
        with other parameters than passwords.py's now: the password hashed again and
        stored, but only while `stored` is still the user's hash (a password change that
        committed meanwhile wins). The user comes back with the stamp of the hash now
        stored, so that a credential made for this login (`create_credential`) is not
        taken for one made across a password change; unchanged when nothing was written."""
        hashed = await self.cpu.run(passwords.hash_password, password)

        def txn(conn: Connection) -> bool:
            return bool(conn.execute(update(users).where(
                users.c.id == user.id, users.c.password_hash == stored,
            ).values(password_hash=hashed)).rowcount)

        if not await self.db.run("rehash_password", txn):
            return user
        return dataclasses.replace(user, password_stamp=_password_stamp(hashed))

    # -- credentials ----------------------------------------------------------------------

    async def create_credential(
        self,
        user_id: int,
        kind: str,
        *,
        label: str = "",
        scopes: tuple[str, ...] = ("*",),
        ttl: float | None = None,
        parent_id: int | None = None,
        login: bool = False,
        password_stamp: bytes | None = None,
    ) -> tuple[str, CredentialInfo]:
        """A new credential; returns the secret (shown once, never stored) and its info.

        `parent_id` names the credential this one was made with (a safedrop session's API
        key): the new one resolves only while that parent does, so revoking the key, its
        expiry or its deletion ends it too. `login` marks a credential a password login
        made: it ends when the password changes, lives `login_ttl` seconds (unless `ttl` is
        given) and `login_idle` seconds unused, and the user keeps `logins_kept` of them:
        making one more removes the one unused the longest (`_thd_keep_used`); a user keeps
        SESSIONS_KEPT safedrop sessions and as many page sessions (the OAuth pages' login),
        making one more of either removes the oldest of its kind.
        `password_stamp` (the `User.password_stamp` of the user a password login found)
        refuses it with an IdentityError on "password" when the password has changed
        since: `set_password` ends what exists when it commits, and this makes sure a
        login that checked the old password just before cannot add one after (the user's
        row is read FOR SHARE, so the two take turns).
        """
        if kind not in KINDS:
            raise IdentityError(f"Unknown credential kind {kind!r}.")
        if len(label) > 255:
            raise IdentityError("Label is too long (255 at most).", "label")
        if kind in ("session", "page") and ttl is None:
            ttl = self.session_ttl
        if login and ttl is None:
            ttl = self.login_ttl
        now = self.now()
        expires = now + datetime.timedelta(seconds=ttl) if ttl is not None else None
        secret = creds.new_secret()

        def txn(conn: Connection) -> CredentialInfo:
            query = select(users.c.id, users.c.password_hash).where(users.c.id == user_id)
            if password_stamp is not None:
                query = query.with_for_update(read=True)
            found = conn.execute(query).first()
            if found is None:
                raise IdentityError("No such user.")
            if password_stamp is not None and not hmac.compare_digest(
                    _password_stamp(found.password_hash), password_stamp):
                raise IdentityError("The password was changed meanwhile.", "password")
            if parent_id is not None and conn.execute(
                select(credentials.c.id).where(
                    credentials.c.id == parent_id, credentials.c.user_id == user_id
                )
            ).first() is None:
                raise IdentityError("No such credential of this user to make it from.")
            new_id = _new_id(conn.execute(
                insert(credentials).values(
                    user_id=user_id,
                    kind=kind,
                    prefix=creds.prefix_of(secret),
                    digest=creds.digest(secret),
                    label=label,
                    scopes=" ".join(scopes),
                    created_at=now,
                    expires_at=expires,
                    parent_id=parent_id,
                    login=login,
                )
            ))
            if login:
                _thd_keep_used(conn, user_id, self.logins_kept, credentials.c.login.is_(True),
                               new_id)
            elif kind in ("session", "page"):
                _thd_keep_newest(conn, user_id, SESSIONS_KEPT, credentials.c.kind == kind)
            row = conn.execute(select(credentials).where(credentials.c.id == new_id)).one()
            return _credential(row)

        info = await self.db.run("create_credential", txn)
        return secret, info

    async def list_credentials(self, user_id: int, kind: str | None = None) -> list[CredentialInfo]:
        def txn(conn: Connection) -> list[CredentialInfo]:
            q = select(credentials).where(credentials.c.user_id == user_id)
            if kind is not None:
                q = q.where(credentials.c.kind == kind)
            return [_credential(r) for r in conn.execute(q.order_by(credentials.c.id))]

        return await self.db.read("list_credentials", txn)

    async def revoke_credential(self, user_id: int, prefix: str, kind: str | None = None) -> int:
        """Revoke the user's live credentials whose prefix starts with `prefix`; the count."""
        if len(prefix) < 4:
            raise IdentityError("Give at least 4 characters of the key prefix.", "prefix")
        now = self.now()

        def txn(conn: Connection) -> int:
            q = update(credentials).where(
                credentials.c.user_id == user_id,
                credentials.c.prefix == prefix[: creds.PREFIX_LEN]
                if len(prefix) >= creds.PREFIX_LEN
                else credentials.c.prefix.startswith(prefix, autoescape=True),
                credentials.c.revoked_at.is_(None),
            )
            if kind is not None:
                q = q.where(credentials.c.kind == kind)
            return int(conn.execute(q.values(revoked_at=now)).rowcount)

        revoked = await self.db.run("revoke_credential", txn)
        self.forget_resolved()
        return revoked

    async def end_credential(self, user_id: int, credential_id: int) -> None:
        """Revoke one of the user's credentials by its id (a page session at logout)."""
        now = self.now()

        def txn(conn: Connection) -> None:
            conn.execute(update(credentials).where(
                credentials.c.id == credential_id, credentials.c.user_id == user_id,
                credentials.c.revoked_at.is_(None),
            ).values(revoked_at=now))

        await self.db.run("end_credential", txn)
        self.forget_resolved()

    async def purge_expired(self, grace: float = EXPIRED_KEPT_SECONDS) -> int:
        """Delete credentials (safedrop sessions, mostly) that expired more than `grace`
        seconds ago, and login tokens unused `login_idle` seconds longer than that,
        PURGE_BATCH a transaction; how many. Neither resolves, so this only keeps the table
        from growing with every login."""
        cutoff = self.now() - datetime.timedelta(seconds=grace)
        purged = await delete_in_batches(self.db, "purge_expired_credentials",
                                         thd_purge_expired, cutoff, batch=PURGE_BATCH)
        if self.login_idle is not None:
            purged += await delete_in_batches(
                self.db, "purge_idle_logins", thd_purge_idle_logins,
                cutoff - datetime.timedelta(seconds=self.login_idle), batch=PURGE_BATCH)
        self.forget_resolved()
        return purged

    def forget_resolved(self) -> None:
        """Drop the secrets resolved lately: the next use of each reads the store again."""
        self._resolved.clear()

    async def resolve(self, secret: str, kinds: tuple[str, ...]) -> Principal | None:
        """The principal a presented secret stands for, or None if it is not live.

        A secret that resolved in the last RESOLVED_TTL seconds resolves again from memory
        (an API client sends the same token with every request): a revocation made by
        this process takes effect at once, one made by another node or the CLI within
        RESOLVED_TTL seconds. Expiry is checked at every use."""
        if not creds.well_formed(secret):
            return None
        now = self.now()
        key = hashlib.sha256(" ".join(kinds).encode() + b"\0" + secret.encode()).digest()
        seen = self._resolved.get(key)
        if seen is not None:
            at, expires, principal = seen
            if 0 <= self.clock.seconds() - at < RESOLVED_TTL and (
                    expires is None or expires > now):
                return principal
            del self._resolved[key]

        def txn(conn: Connection) -> tuple[Principal, bool, datetime.datetime | None] | None:
            # The parent (if any) comes in the same statement: a primary-key probe per row.
            rows = conn.execute(
                select(
                    credentials,
                    _parent.c.id.label("parent_found"),
                    _parent.c.expires_at.label("parent_expires_at"),
                    _parent.c.revoked_at.label("parent_revoked_at"),
                )
                .select_from(
                    credentials.outerjoin(_parent, _parent.c.id == credentials.c.parent_id)
                )
                .where(
                    credentials.c.prefix == creds.prefix_of(secret),
                    credentials.c.kind.in_(kinds),
                )
            ).all()
            match = None
            for row in rows:  # check every candidate: the time does not depend on which matched
                if creds.matches(row._mapping["digest"], secret):
                    match = row
            if match is None:
                return None
            m = match._mapping
            expires = utc(m["expires_at"])
            if m["revoked_at"] is not None or (expires is not None and expires <= now):
                return None
            if m["parent_id"] is not None and not _parent_live(m, now):
                return None
            idle_end = None
            if m["login"] and self.login_idle is not None:
                used = utc(m["last_used_at"]) or utc(m["created_at"])
                assert used is not None
                idle_end = used + datetime.timedelta(seconds=self.login_idle)
                if idle_end <= now:
                    return None
            user = thd_get_user(conn, m["user_id"])
            if user is None or not user.is_active:
                return None
            last = utc(m["last_used_at"])
            stale = last is None or (now - last).total_seconds() > _LAST_USED_GRANULARITY
            principal = Principal(
                user=user,
                credential_id=m["id"],
                kind=m["kind"],
                scopes=tuple(m["scopes"].split()),
            )
            ends = [t for t in (expires, utc(m["parent_expires_at"]), idle_end)
                    if t is not None]
            return principal, stale, min(ends) if ends else None

        found = await self.db.read("resolve_credential", txn)
        if found is None:
            return None
        principal, stale, expires = found
        if stale:
            await self.db.run("touch_credential", _touch, principal.credential_id, now)
        if len(self._resolved) >= RESOLVED_KEPT:
            self._resolved.clear()
        self._resolved[key] = (self.clock.seconds(), expires, principal)
        return principal


# The credential another one was made with (see `create_credential`'s `parent_id`).
_parent = credentials.alias("parent")


def _parent_live(m: Any, now: datetime.datetime) -> bool:
    """Whether the parent joined into row mapping `m` exists, is not revoked nor expired."""
    if m["parent_found"] is None or m["parent_revoked_at"] is not None:
        return False
    expires = utc(m["parent_expires_at"])
    return expires is None or expires > now


def _thd_keep_newest(conn: Connection, user_id: int, kept: int, which: Any) -> None:
    """Blocking: delete the user's credentials that match `which` but the newest `kept`
    (live or not: a script logging in for every run must not grow the table without
    bound)."""
    c = credentials.c
    mine = (c.user_id == user_id, which)
    oldest_kept = conn.execute(
        select(c.id).where(*mine).order_by(c.id.desc()).offset(kept - 1).limit(1)
    ).scalar()
    if oldest_kept is not None:
        conn.execute(delete(credentials).where(*mine, c.id < oldest_kept))


def _thd_keep_used(
    conn: Connection, user_id: int, kept: int, which: Any, new_id: int
) -> None:
    """Blocking: delete the user's credentials that match `which` but `new_id` (the one
    just made) and the `kept` - 1 others used last (by `last_used_at`, else `created_at`;
    live or not). The seed's token login (DRF) hands out one token that lives for ever, so
    its clients log in again whenever they like: a script doing so for every run must
    neither grow the table without bound nor end the token a long-running client holds
    and uses."""
    c = credentials.c
    others = (c.user_id == user_id, which, c.id != new_id)
    beyond = (
        select(c.id).where(*others)
        .order_by(func.coalesce(c.last_used_at, c.created_at).desc(), c.id.desc())
        .offset(kept - 1)
    )
    conn.execute(delete(credentials).where(*others, c.id.in_(beyond)))


def _touch(conn: Connection, credential_id: int | None, now: datetime.datetime) -> None:
    conn.execute(
        update(credentials).where(credentials.c.id == credential_id).values(last_used_at=now)
    )


def thd_purge_expired(conn: Connection, before: datetime.datetime, batch: int) -> int:
    """Delete up to `batch` credentials that expired before `before`
    (ix_credentials_expires_at finds them); how many."""
    c = credentials.c
    ids = (select(c.id).where(c.expires_at.is_not(None), c.expires_at < before)
           .limit(batch).with_for_update().scalar_subquery())
    return int(conn.execute(delete(credentials).where(c.id.in_(ids))).rowcount or 0)


def thd_purge_idle_logins(conn: Connection, before: datetime.datetime, batch: int) -> int:
    """Delete up to `batch` login tokens last used (or, never used, made) before `before`
    (ix_credentials_login_idle finds them); how many. PostgreSQL locks each chosen row
    and asks again whether it is idle (FOR UPDATE), as a use may have been written since."""
    c = credentials.c
    ids = (select(c.id)
           .where(c.login.is_(True), func.coalesce(c.last_used_at, c.created_at) < before)
           .limit(batch).with_for_update().scalar_subquery())
    return int(conn.execute(delete(credentials).where(c.id.in_(ids))).rowcount or 0)


class CredentialSweeper(Sweeper[int]):
    """Purges expired credentials every `every` seconds on `clock`, PURGE_BATCH a
    transaction. The Core gives it the store's job leases: one node of those sharing the
    store purges per period (the delete is idempotent, should two meet in one). Failures
    are logged and tried again next time."""

    name = "credential-sweeper"
    failed = "purging expired credentials failed"

    def __init__(self, identity: Identity, clock: IReactorTime, every: float = 3600.0) -> None:
        super().__init__(clock, every)
        self.identity = identity

    def sweep(self) -> Awaitable[int]:
        return self.identity.purge_expired()

    def swept(self, purged: int) -> None:
        if purged:
            log.info("purged {n} expired credentials", n=purged)

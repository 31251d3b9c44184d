"""Fetch accounts: the remote IMAP/POP3 mailboxes a user backs up, and their sync status.

One model serves seed 001 (imap-servers: name, host, port, username, use_ssl, sync limits,
folders_to_sync, exclude_trash, last_sync) and Dropmyemail (accounts: email, protocol
imap|pop, ssl, start_tls, port). The password is stored encrypted and never leaves this module
except to the sync engine, through `credentials`.

A caller may ask for one account per mailbox (`create_one_per_mailbox`,
`update_one_per_mailbox`: Dropmyemail does): an account of the user naming the same host (in
any case), port and user name already backs that mailbox up, and a second one would back it
up again into the same store, twice the work and every migrate or restore of it doubled; its
create, or an update that would make it, is refused (MailboxTaken). The check and the write
are one transaction that first locks the user's row, as the count of accounts does, so two
at once cannot both pass it.

An update that changes where or how that password would be sent (the server, its port, the
protocol, the user name, the certificate trusted for it, or TLS so that cleartext becomes
possible) must give the password again (`check_password_given`): otherwise whoever may
change the account could point it at a server of theirs and have the next sync hand them the
password, which no endpoint ever returns.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update
from twisted.internet.interfaces import IReactorTime

from mailcore.fetch.errors import AccountError, AccountNotFound, MailboxTaken
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.tls import check_ca_pem, normalise_fingerprint
from mailcore.messages.sql import new_id, utc
from mailcore.messages.store import thd_delete_account_messages
from mailcore.store import Database
from mailcore.store.owners import thd_lock_owner
from mailcore.store.schema import fetch_accounts, fetch_folders, messages, users
from mailcore.text import breaks_line, has_control, has_surrogate

PROTOCOLS = ("imap", "pop")
SYNC_LIMIT_TYPES = ("all", "last_n", "days", "weeks", "months")
SYNC_STATUSES = ("never", "running", "success", "error")
# The error an account shows when the process that ran its sync died mid-sync.
INTERRUPTED = "the sync was interrupted: the process running it stopped"
DEFAULT_PORTS = {("imap", True): 993, ("imap", False): 143, ("pop", True): 995,
                 ("pop", False): 110}
MIN_SYNC_INTERVAL = 60
# A year: longer means "never" (turn the account off); the column is an INTEGER.
MAX_SYNC_INTERVAL = 366 * 86400
# Where the stored password is sent, and which certificate is trusted to receive it: a change
# of any of them needs the password given again (module docstring).
DESTINATION_FIELDS = ("protocol", "host", "port", "username", "tls_ca_pem", "tls_fingerprint")
DESTINATION_REFUSAL = ("Give the password again when the server, port, protocol, user name "
                       "or TLS settings change.")
# The columns that name an account's mailbox (one account per mailbox: module docstring).
MAILBOX_FIELDS = ("host", "port", "username")
_HOST = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")

# Fields a caller may set on create or update, and their types.
EDITABLE: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "email": str,
    "protocol": str,
    "host": str,
    "port": int,
    "username": str,
    "password": str,
    "use_ssl": bool,
    "start_tls": bool,
    "allow_cleartext": bool,
    "tls_ca_pem": (str, type(None)),
    "tls_fingerprint": (str, type(None)),
    "sync_limit_type": str,
    "sync_limit_value": int,
    "folders_to_sync": (str, list),
    "exclude_trash": bool,
    "sync_interval": (int, type(None)),
    "enabled": bool,
}


@dataclass(frozen=True)
class Account:
    """An account as it may be shown: never the password."""

    id: int
    user_id: int
    name: str
    email: str
    protocol: str
    host: str
    port: int
    username: str
    use_ssl: bool
    start_tls: bool
    allow_cleartext: bool
    tls_ca_pem: str | None
    tls_fingerprint: str | None
    sync_limit_type: str
    sync_limit_value: int
    folders_to_sync: str
    exclude_trash: bool
    sync_interval: int | None
    enabled: bool
    last_sync: datetime.datetime | None
    sync_status: str
    sync_error: str | None
    sync_started_at: datetime.datetime | None
    progress_folder: str | None
    progress_done: int
    progress_total: int
    created_at: datetime.datetime
    updated_at: datetime.datetime

    @property
    def folder_list(self) -> list[str]:
        """The folders to sync, or [] for every folder."""
        return [f.strip() for f in self.folders_to_sync.split(",") if f.strip()]


_ACCOUNT_FIELDS = [f.name for f in fields(Account)]
_DATETIME_FIELDS = {"last_sync", "sync_started_at", "created_at", "updated_at"}


def _account(row: Any) -> Account:
    m = row._mapping
    values = {k: (utc(m[k]) if k in _DATETIME_FIELDS else m[k]) for k in _ACCOUNT_FIELDS}
    return Account(**values)  # type: ignore[arg-type]


def _check_types(values: dict[str, Any]) -> None:
    for key, value in values.items():
        expected = EDITABLE.get(key)
        if expected is None:
            raise AccountError(f"unknown field {key!r}", key)
        types = expected if isinstance(expected, tuple) else (expected,)
        if isinstance(value, bool) and bool not in types:
            raise AccountError(f"{key} has the wrong type", key)
        if not isinstance(value, types):
            raise AccountError(f"{key} has the wrong type", key)


# One line of text each: they go into protocol commands (USER, LOGIN, SELECT) and logs.
_LINE_FIELDS = ("name", "email", "host", "username", "folders_to_sync")


def _check_text(values: dict[str, Any]) -> None:
    """No lone surrogate anywhere; no control character in a one-line field; no NUL, CR
    or LF in the password, which goes into a command line too."""
    for key, value in values.items():
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            if has_surrogate(text):
                raise AccountError(f"{key} holds a lone surrogate, which is not text", key)
            if key in _LINE_FIELDS and has_control(text):
                raise AccountError(f"{key} may not hold control characters", key)
            if key == "password" and breaks_line(text):
                raise AccountError("password may not hold NUL, CR or LF", key)


def validate(values: dict[str, Any], current: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checked and normalised column values from create/update input.

    `current` holds the stored values on update, so that cross-field rules (port defaults,
    ssl vs start_tls, limits) are checked on the result.
    """
    _check_types(values)
    _check_text(values)
    merged = {**(current or {}), **values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and key not in ("password", "tls_ca_pem"):
            value = value.strip()
        out[key] = value

    protocol = merged.get("protocol", "imap")
    if protocol not in PROTOCOLS:
        raise AccountError("protocol must be imap or pop", "protocol")
    host = (merged.get("host") or "").strip()
    if not host or not _HOST.match(host):
        raise AccountError("host must be a host name or an IP address", "host")
    username = (merged.get("username") or merged.get("email") or "").strip()
    if not username or len(username) > 255:
        raise AccountError("username (or email) is required", "username")
    if current is None or "username" in values or "email" in values:
        if not (merged.get("username") or "").strip():
            out["username"] = username
    if current is None and not values.get("password"):
        raise AccountError("password is required", "password")
    if "password" in values and not values["password"]:
        raise AccountError("password must not be empty", "password")
    if merged.get("use_ssl") and merged.get("start_tls"):
        raise AccountError("ssl and start_tls exclude each other", "start_tls")
    port = merged.get("port")
    if port is None:
        if current is None or "use_ssl" in values or "protocol" in values:
            out["port"] = DEFAULT_PORTS[(protocol, bool(merged.get("use_ssl")))]
    elif not 1 <= int(port) <= 65535:
        raise AccountError("port must be between 1 and 65535", "port")
    limit_type = merged.get("sync_limit_type", "all")
    if limit_type not in SYNC_LIMIT_TYPES:
        raise AccountError(
            "sync_limit_type must be one of " + ", ".join(SYNC_LIMIT_TYPES), "sync_limit_type"
        )
    limit_value = merged.get("sync_limit_value", 0)
    if limit_value < 0 or limit_value > 1_000_000:
        raise AccountError("sync_limit_value must be between 0 and 1000000", "sync_limit_value")
    if limit_type != "all" and limit_value == 0:
        raise AccountError(
            f"sync_limit_value must be positive with sync_limit_type {limit_type}",
            "sync_limit_value",
        )
    if "folders_to_sync" in out and isinstance(out["folders_to_sync"], list):
        if not all(isinstance(f, str) for f in out["folders_to_sync"]):
            raise AccountError("folders_to_sync must list folder names", "folders_to_sync")
        out["folders_to_sync"] = ",".join(f.strip() for f in out["folders_to_sync"] if f.strip())
    if out.get("tls_fingerprint"):
        out["tls_fingerprint"] = normalise_fingerprint(out["tls_fingerprint"])
    elif "tls_fingerprint" in out:
        out["tls_fingerprint"] = None
    if out.get("tls_ca_pem"):
        out["tls_ca_pem"] = check_ca_pem(out["tls_ca_pem"])
    elif "tls_ca_pem" in out:
        out["tls_ca_pem"] = None
    interval = merged.get("sync_interval")
    if interval is not None and not MIN_SYNC_INTERVAL <= interval <= MAX_SYNC_INTERVAL:
        raise AccountError(
            f"sync_interval must be between {MIN_SYNC_INTERVAL} and {MAX_SYNC_INTERVAL} "
            "seconds", "sync_interval"
        )
    for key, limit in (("name", 255), ("email", 254)):
        if len(out.get(key) or "") > limit:
            raise AccountError(f"{key} is longer than {limit} characters", key)
    if current is not None:
        check_password_given(out, current)
    return out


def _cleartext_possible(values: dict[str, Any]) -> bool:
    """Whether a session may log in without TLS (`mailcore.fetch.imap.open_session`): no
    TLS from the start, STARTTLS not demanded, and cleartext allowed."""
    return (not values.get("use_ssl") and not values.get("start_tls")
            and bool(values.get("allow_cleartext")))


def check_password_given(changes: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (AccountError on "password") `changes` (checked, normalised columns) to the
    stored account `current` that would send its stored password somewhere else or less
    protected, unless they carry a new password. A value given as it is stored is no change,
    so an account read and put back as it was needs no password; TLS made stronger needs
    none either."""
    if "password" in changes:
        return
    moved = any(key in changes and changes[key] != current.get(key)
                for key in DESTINATION_FIELDS)
    if moved or (_cleartext_possible({**current, **changes})
                 and not _cleartext_possible(current)):
        raise AccountError(DESTINATION_REFUSAL, "password")


def thd_check_room(conn: Connection, user_id: int, limit: int) -> None:
    """Blocking: AccountError (naming no field) when `user_id` has `limit` accounts."""
    count = conn.execute(select(func.count()).select_from(fetch_accounts).where(
        fetch_accounts.c.user_id == user_id)).scalar() or 0
    if count >= limit:
        raise AccountError(f"A user may have at most {limit} accounts; delete one to add "
                           "another.")


def thd_same_mailbox(conn: Connection, user_id: int, values: dict[str, Any],
                     other_than: int | None = None) -> None:
    """Blocking: MailboxTaken when an account of `user_id` (but `other_than`) names the
    mailbox that `values` (checked columns: host, port, username) names (module
    docstring)."""
    a = fetch_accounts.c
    query = select(a.id).where(a.user_id == user_id,
                               func.lower(a.host) == values["host"].lower(),
                               a.port == values["port"], a.username == values["username"])
    if other_than is not None:
        query = query.where(a.id != other_than)
    found = conn.execute(query.order_by(a.id).limit(1)).scalar()
    if found is not None:
        raise MailboxTaken(int(found), values["host"], values["port"], values["username"])


def moves_mailbox(changes: dict[str, Any], current: Account) -> bool:
    """Whether `changes` (checked columns) name another mailbox than `current` does: an
    account made before one per mailbox was asked for may share its mailbox with another,
    and may still be changed otherwise (its password, say)."""
    return any(key in changes and changes[key] != getattr(current, key)
               for key in MAILBOX_FIELDS)


class Accounts:
    """Create, read, update and delete fetch accounts; keep their sync status."""

    def __init__(self, db: Database, clock: IReactorTime, secrets: SecretBox,
                 max_per_user: int = 1000) -> None:
        self.db = db
        self.clock = clock
        self.secrets = secrets
        self.max_per_user = max_per_user  # [fetch] max_accounts_per_user

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(
            self.clock.seconds(), datetime.UTC  # type: ignore[misc]
        )

    async def create(self, user_id: int, **values: Any) -> Account:
        """A new account for `user_id`; raises AccountError naming the bad field, or naming
        none when the user already has `max_per_user` accounts."""
        return await self._create(user_id, values, one_per_mailbox=False)

    async def create_one_per_mailbox(self, user_id: int, **values: Any) -> Account:
        """As `create`, and MailboxTaken when an account of the user names the mailbox
        (module docstring)."""
        return await self._create(user_id, values, one_per_mailbox=True)

    async def _create(self, user_id: int, values: dict[str, Any], *,
                      one_per_mailbox: bool) -> Account:
        clean = validate(values)
        password = clean.pop("password")
        now = self.now()
        clean.update(
            user_id=user_id,
            password_enc=self.secrets.encrypt(password),
            created_at=now,
            updated_at=now,
        )
        limit = self.max_per_user

        def txn(conn: Connection) -> Account:
            # The user's row is locked first, so that concurrent creates for one user count
            # (and look for the mailbox) one after another.
            thd_lock_owner(conn, user_id)
            thd_check_room(conn, user_id, limit)
            if one_per_mailbox:
                thd_same_mailbox(conn, user_id, clean)
            account_id = new_id(conn.execute(insert(fetch_accounts).values(**clean)))
            return thd_get_account(conn, user_id, account_id)

        return await self.db.run("create_fetch_account", txn)

    async def check_room(self, user_id: int) -> None:
        """AccountError when `user_id` already has `max_per_user` accounts: for a caller
        with work to do before `create` (a login to check), which checks again."""
        await self.db.read("fetch_account_room", thd_check_room, user_id, self.max_per_user)

    async def mailbox_taken(self, user_id: int, values: dict[str, Any],
                            other_than: int | None = None) -> None:
        """MailboxTaken when an account of `user_id` (but `other_than`) names the mailbox
        of `values` (checked host, port, username): for a caller with work to do before
        `create` or `update` (a login to check), which check again."""
        await self.db.read("fetch_account_mailbox", thd_same_mailbox, user_id, values,
                           other_than)

    async def update(self, user_id: int, account_id: int, **values: Any) -> Account:
        """Change some fields (a partial update, as the seed's PUT). A change of where or
        how the password is sent needs the password again (`check_password_given`); the
        check reads the stored account in the transaction that writes the change."""
        return await self._update(user_id, account_id, values, one_per_mailbox=False)

    async def update_one_per_mailbox(self, user_id: int, account_id: int,
                                     **values: Any) -> Account:
        """As `update`, and MailboxTaken when the change would make the account name the
        mailbox of another account of the user (module docstring)."""
        return await self._update(user_id, account_id, values, one_per_mailbox=True)

    async def _update(self, user_id: int, account_id: int, values: dict[str, Any], *,
                      one_per_mailbox: bool) -> Account:
        now = self.now()
        secrets = self.secrets

        def txn(conn: Connection) -> Account:
            if one_per_mailbox:
                thd_lock_owner(conn, user_id)
            current = thd_get_account(conn, user_id, account_id)
            clean = validate(values, current.__dict__)
            if one_per_mailbox and moves_mailbox(clean, current):
                thd_same_mailbox(conn, user_id, {**current.__dict__, **clean}, account_id)
            if "password" in clean:
                clean["password_enc"] = secrets.encrypt(clean.pop("password"))
            clean["updated_at"] = now
            conn.execute(
                update(fetch_accounts).where(fetch_accounts.c.id == account_id).values(**clean)
            )
            return thd_get_account(conn, user_id, account_id)

        return await self.db.run("update_fetch_account", txn)

    async def delete(self, user_id: int, account_id: int) -> Account:
        """Delete the account and every message fetched through it; returns what it was."""

        def txn(conn: Connection) -> Account:
            account = thd_get_account(conn, user_id, account_id)
            # Its messages first, with the blobs and threads only they used (the cascade
            # would leave those, and looking for them afterwards reads the whole store).
            thd_delete_account_messages(conn, user_id, account_id)
            conn.execute(delete(fetch_accounts).where(fetch_accounts.c.id == account_id))
            return account

        return await self.db.run("delete_fetch_account", txn)

    async def get(self, user_id: int, account_id: int) -> Account:
        return await self.db.read("get_fetch_account", thd_get_account, user_id, account_id)

    async def list_accounts(
        self, user_id: int, *, protocol: str | None = None, sort: str = "id",
        direction: str = "asc",
    ) -> list[Account]:
        """The user's accounts. `sort`: id, name, email, host, created_at, updated_at,
        last_sync, message_count or storage."""
        if protocol not in (None, "all", *PROTOCOLS):
            raise AccountError("type must be all, imap or pop", "type")
        if direction not in ("asc", "desc"):
            raise AccountError("direction must be asc or desc", "direction")
        simple = {"id", "name", "email", "host", "created_at", "updated_at", "last_sync"}
        if sort not in simple | {"message_count", "storage"}:
            raise AccountError(f"cannot sort by {sort!r}", "sort")

        def txn(conn: Connection) -> list[Account]:
            usage = (
                select(
                    messages.c.account_id,
                    func.count().label("message_count"),
                    func.coalesce(func.sum(messages.c.size), 0).label("storage"),
                )
                .where(messages.c.user_id == user_id)
                .group_by(messages.c.account_id)
                .subquery()
            )
            key: Any = (
                fetch_accounts.c[sort] if sort in simple
                else func.coalesce(usage.c[sort], 0)
            )
            q = (
                select(fetch_accounts)
                .select_from(fetch_accounts.outerjoin(
                    usage, usage.c.account_id == fetch_accounts.c.id
                ))
                .where(fetch_accounts.c.user_id == user_id)
            )
            if protocol in PROTOCOLS:
                q = q.where(fetch_accounts.c.protocol == protocol)
            q = q.order_by(key.desc() if direction == "desc" else key.asc(),
                           fetch_accounts.c.id)
            return [_account(r) for r in conn.execute(q)]

        return await self.db.read("list_fetch_accounts", txn)

    # -- for the sync engine -------------------------------------------------------------

    async def credentials(self, account_id: int) -> tuple[Account, str]:
        """The account and its clear password, for a session about to log in."""

        def txn(conn: Connection) -> tuple[Account, bytes]:
            row = conn.execute(
                select(fetch_accounts).where(fetch_accounts.c.id == account_id)
            ).first()
            if row is None:
                raise AccountNotFound("no such account", "id")
            return _account(row), row.password_enc

        account, token = await self.db.read("get_fetch_credentials", txn)
        return account, self.secrets.decrypt(token)

    async def owner_of(self, account_id: int) -> int:
        def txn(conn: Connection) -> int | None:
            return conn.execute(
                select(fetch_accounts.c.user_id).where(fetch_accounts.c.id == account_id)
            ).scalar()

        owner = await self.db.read("get_fetch_account_owner", txn)
        if owner is None:
            raise AccountNotFound("no such account", "id")
        return int(owner)

    async def set_status(self, account_id: int, *, holder: str | None = None,
                         also: Callable[[Connection], None] | None = None,
                         **values: Any) -> bool:
        """Record sync status/progress fields (sync_status, sync_error, progress_*, ...);
        with `holder`, only while that node holds the account's sync lease (a sync ending on
        a node that stalled past its lease leaves the outcome of the node that took it
        over). `also` runs in the same transaction when they are recorded. Whether they
        were recorded."""
        allowed = {"sync_status", "sync_error", "sync_started_at", "last_sync",
                   "progress_folder", "progress_done", "progress_total"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"not status fields: {sorted(unknown)}")

        def txn(conn: Connection) -> bool:
            stmt = update(fetch_accounts).where(fetch_accounts.c.id == account_id)
            if holder is not None:
                stmt = stmt.where(fetch_accounts.c.lease_owner == holder)
            recorded = bool(conn.execute(stmt.values(**values)).rowcount)
            if recorded and also is not None:
                also(conn)
            return recorded

        return bool(await self.db.run("set_fetch_status", txn))

    async def all_enabled(self) -> list[Account]:
        """Every enabled account of every active user (for the scheduler: a disabled user's
        mailboxes are not synced, `mailcore user disable`)."""

        def txn(conn: Connection) -> list[Account]:
            return [
                _account(r)
                for r in conn.execute(
                    select(fetch_accounts)
                    .join(users, users.c.id == fetch_accounts.c.user_id)
                    .where(fetch_accounts.c.enabled.is_(True), users.c.is_active.is_(True))
                    .order_by(fetch_accounts.c.id)
                )
            ]

        return await self.db.read("list_enabled_fetch_accounts", txn)

    async def folders(self, account_id: int) -> list[dict[str, Any]]:
        """The folder state rows of an account (name, uidvalidity, uidnext, errors ...)."""

        def txn(conn: Connection) -> list[dict[str, Any]]:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    select(fetch_folders)
                    .where(fetch_folders.c.account_id == account_id)
                    .order_by(fetch_folders.c.name)
                )
            ]

        return await self.db.read("list_fetch_folders", txn)


def thd_get_account(conn: Connection, user_id: int, account_id: int) -> Account:
    row = conn.execute(
        select(fetch_accounts)
        .where(fetch_accounts.c.id == account_id)
        .where(fetch_accounts.c.user_id == user_id)
    ).first()
    if row is None:
        raise AccountNotFound("no such account", "id")
    return _account(row)


# -- sync leases: one node syncs an account at a time ------------------------------------------

_f = fetch_accounts.c


def thd_claim_sync(
    conn: Connection, account_id: int, owner: str, now: float, until: float,
    started: datetime.datetime, due_before: datetime.datetime | None = None,
) -> bool | None:
    """Blocking: lease the account's sync to `owner` until `until` and record `started` as
    its start, unless another node holds a live lease (at `now`) or, with `due_before`, the
    account's last attempt is later than that (another node synced it meanwhile). Whether
    `owner` holds it now; None when there is no such account.

    One conditional UPDATE: on PostgreSQL a concurrent claimer waits for the row lock and
    re-checks the condition on the committed row; SQLite serialises writers."""
    free = or_(_f.lease_owner.is_(None), _f.lease_owner == owner, _f.lease_until <= now)
    where = [_f.id == account_id, free]
    if due_before is not None:
        last = func.coalesce(_f.sync_started_at, _f.last_sync)
        where.append(or_(last.is_(None), last <= due_before))
    taken = conn.execute(
        update(fetch_accounts).where(*where)
        .values(lease_owner=owner, lease_until=until, sync_started_at=started)
    )
    if taken.rowcount:
        return True
    found = conn.execute(select(_f.id).where(_f.id == account_id)).first()
    return False if found is not None else None


def thd_renew_syncs(
    conn: Connection, owner: str, account_ids: list[int], until: float
) -> list[int]:
    """Blocking: extend `owner`'s sync leases on `account_ids` to `until`; the ids it still
    holds. A renewal never shortens a lease: two renewals of one node may commit out of
    order (the timer's and an explicit one, on two pool threads), and the older `until`
    committing last would otherwise let the lease lapse under a running sync."""
    if not account_ids:
        return []
    conn.execute(
        update(fetch_accounts)
        .where(_f.id.in_(account_ids), _f.lease_owner == owner,
               or_(_f.lease_until.is_(None), _f.lease_until < until))
        .values(lease_until=until)
    )
    return sorted(int(r.id) for r in conn.execute(
        select(_f.id).where(_f.id.in_(account_ids), _f.lease_owner == owner)
    ))


def _interrupted(owner: str, now: float, running: list[int]) -> Any:
    """The syncs that show running but run nowhere: this node's that it does not run
    (`running`: a run of this node killed mid-sync) and any whose lease has lapsed (its node
    died, or stalls: one that comes back still records its own outcome, set_status with its
    holder)."""
    return and_(_f.sync_status == "running", or_(
        _f.lease_owner.is_(None), _f.lease_until.is_(None), _f.lease_until <= now,
        and_(_f.lease_owner == owner, _f.id.not_in(running))))


def thd_any_interrupted(conn: Connection, owner: str, now: float, running: list[int]) -> bool:
    """Blocking: whether a sync shows running but runs nowhere (`_interrupted`): a read,
    so that the scheduler's tick writes only when there is one to settle."""
    found = conn.execute(select(_f.id).where(_interrupted(owner, now, running)).limit(1))
    return found.first() is not None


def thd_settle_interrupted(
    conn: Connection, owner: str, now: float, running: list[int], message: str
) -> list[tuple[int, int, datetime.datetime | None]]:
    """Blocking: show as failed (`message`) the syncs that show running but run nowhere
    (`_interrupted`); (account id, user id, sync started at) of each, each settled by one
    transaction only (PostgreSQL's row locks, SQLite's one writer). The lease is left
    alone: the next claim takes it over as any lapsed lease."""
    rows = conn.execute(
        update(fetch_accounts).where(_interrupted(owner, now, running))
        .values(sync_status="error", sync_error=message, progress_folder=None)
        .returning(_f.id, _f.user_id, _f.sync_started_at)
    ).all()
    return sorted((int(r.id), int(r.user_id), utc(r.sync_started_at)) for r in rows)


def thd_release_sync(conn: Connection, account_id: int, owner: str) -> None:
    """Blocking: give the account's sync lease up, if `owner` still holds it."""
    conn.execute(
        update(fetch_accounts).where(_f.id == account_id, _f.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )

"""Dropmyemail's accounts: fetch-engine accounts created only after a successful login, with
the host derived from the address when none is given, and their backed-up totals.

Host rule (documented in the README): without `host`, an account of `user@example.com` uses
`[dropmyemail] providers."example.com"` when configured (a host name, or a table with `imap`
and `pop` host names), else `imap.example.com` (protocol imap) or `pop.example.com` (pop).
Gmail and Google accounts need the user's OAuth consent at Google, for which this server has
no client credentials: they are refused with `GOOGLE_REFUSAL`, and nothing is stored.

Create logs in first with the given credentials (over the same guarded connection the sync
engine uses); a refusal is reported with the server's reason and nothing is stored. Then the
account is stored and its first backup starts at once. An update that changes how to log in
(password, host, port, protocol, ssl, start_tls) logs in again first, the same way: refused,
nothing changes. One that changes where or how the password is sent (host, port, protocol,
TLS weakened) must carry the password too (`mailcore.fetch.accounts.check_password_given`),
checked before that login: the stored password is never sent to a server the update names.

One account per mailbox: an account naming the host (in any case), port and user of one
the user already has is refused with MailboxTaken (409), its create before the login and
again, atomically, where it is stored (`mailcore.fetch.accounts`); so is an update that
would make an account name another's mailbox. Two accounts of one mailbox back it up twice
into the one store, and every migrate of the account's mail would hold each message twice.
Accounts that shared a mailbox before this rule stay as they are (deleting one would delete
its backup), and may still be changed in other ways.

Cleartext: with neither `ssl` nor `start_tls` (the seed's defaults) the session still
upgrades with STARTTLS whenever the server offers it. A server that offers neither TLS nor
STARTTLS is refused (400, nothing stored), as the fetch engine refuses any account not
explicitly allowed cleartext, unless the operator sets `[dropmyemail] allow_cleartext_login =
true`: Dropmyemail's clients have no per-account switch (the IMAP2API's `allow_cleartext`),
so the operator decides for all of them. The setting applies to accounts created while it is
in force, and to those updated with their password; an update without one may turn cleartext
off, never on.
"""

from __future__ import annotations

import datetime
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, func, select
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.config import ConfigError, unknown_key
from mailcore.fetch.accounts import (
    DEFAULT_PORTS,
    Account,
    Accounts,
    moves_mailbox,
    validate,
)
from mailcore.fetch.engine import SyncEngine
from mailcore.fetch.errors import (
    AccountError,
    AccountNotFound,
    CleartextRefused,
    FetchError,
    FetchTimeout,
)
from mailcore.fetch.imap import ServerSpec, open_session
from mailcore.fetch.pop3 import open_pop3
from mailcore.fetch.settings import FetchSettings
from mailcore.store import Database
from mailcore.store.schema import messages

log = Logger()

GOOGLE_DOMAINS = ("gmail.com", "googlemail.com", "google.com")
GOOGLE_REFUSAL = (
    "Gmail/Google accounts need the user's consent at Google (OAuth 2), and this server has "
    "no Google OAuth client credentials (client id and secret) to ask for it: such accounts "
    "cannot be backed up here."
)
SORTS = ("email", "message_count", "storage", "created_at", "updated_at")
# Account fields whose change needs a new login before it is stored.
LOGIN_FIELDS = ("password", "host", "port", "protocol", "use_ssl", "start_tls")


# Seconds a server has to answer each command of a login check made while an HTTP client
# waits (at most; `[fetch] command_timeout` when shorter): a server that trickles untagged
# lines held the request until the client gave up.
LOGIN_CHECK_COMMAND_TIMEOUT = 60.0


def login_check_timeout(settings: FetchSettings) -> float:
    """The command deadline of a login check under the `[fetch]` settings (0: none)."""
    configured = settings.command_timeout
    return min(configured, LOGIN_CHECK_COMMAND_TIMEOUT) if configured > 0 \
        else LOGIN_CHECK_COMMAND_TIMEOUT


# What a login check made while an HTTP client waits keeps of `[web] reply_timeout` for
# itself, in all: that less this margin (less a fifth of it when that is smaller), so that
# the route answers its own 400 before the reply deadline answers 503.
LOGIN_CHECK_MARGIN = 5.0

T = TypeVar("T")


def login_check_deadline(reply_timeout: float) -> float:
    """The whole deadline of a login check under `[web] reply_timeout` (seconds)."""
    return reply_timeout - min(LOGIN_CHECK_MARGIN, reply_timeout / 5)


async def login_within(clock: IReactorTime, deadline: float | None,
                       opening: Coroutine[Any, Any, T]) -> T:
    """The session `opening` opens for a login check, within `deadline` seconds (None: no
    deadline but the command deadline's); past them the opening is cancelled (its
    connection closed) and FetchTimeout raised."""
    d = defer.Deferred.fromCoroutine(opening)
    if deadline is not None:
        d.addTimeout(deadline, clock, onTimeoutCancel=_no_login_within)
    return await d


def _no_login_within(result: Any, timeout: float) -> Any:
    """`Deferred.addTimeout`'s answer for an opening cancelled at its deadline: whatever
    the opening made of the cancel (a connect: ConnectFailed), FetchTimeout."""
    if isinstance(result, Failure):
        raise FetchTimeout(f"no login within {timeout:g} s")
    return result


class BackupError(Exception):
    """A refused account operation (400); `field` names the input at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class BackupSettings:
    """`[dropmyemail]`: `providers` maps a mail domain to its server (a host name for both
    protocols, or `{imap = "…", pop = "…"}`); `allow_cleartext_login` (default false) lets
    accounts log in to servers that offer neither TLS nor STARTTLS; `max_queued_jobs_per_user`
    (100) bounds the migrates and restores one user has queued or running at once (a
    migrate into another destination is not refused as the same one is, so without it a
    user could queue them without end); `jobs_kept_per_account` (100) bounds the finished
    migrates, and the finished restores, an account keeps (each a row, and a row per
    message it dealt with): a new job deletes the oldest beyond that have no such row,
    and OldJobsSweeper (mailcore.backup.jobs) the others, a batch of rows a transaction."""

    providers: dict[str, dict[str, str]] = field(default_factory=dict)
    allow_cleartext_login: bool = False
    max_queued_jobs_per_user: int = 100
    jobs_kept_per_account: int = 100

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> BackupSettings:
        providers: dict[str, dict[str, str]] = {}
        cleartext = section.get("allow_cleartext_login", False)
        if not isinstance(cleartext, bool):
            raise ConfigError("[dropmyemail] allow_cleartext_login must be true or false")
        counts = []
        for name in ("max_queued_jobs_per_user", "jobs_kept_per_account"):
            count = section.get(name, 100)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"[dropmyemail] {name} must be a positive integer")
            counts.append(count)
        for key, value in section.items():
            if key in ("allow_cleartext_login", "max_queued_jobs_per_user",
                       "jobs_kept_per_account"):
                continue
            if key != "providers":
                raise unknown_key("dropmyemail", key)
            if not isinstance(value, dict):
                raise ConfigError("[dropmyemail] providers must be a table")
            for domain, hosts in value.items():
                if isinstance(hosts, str):
                    hosts = {"imap": hosts, "pop": hosts}
                if not isinstance(hosts, dict) or not all(
                    k in ("imap", "pop") and isinstance(v, str) and v for k, v in hosts.items()
                ):
                    raise ConfigError(
                        f"[dropmyemail] providers.{domain} must be a host name or a table "
                        "with imap and pop host names"
                    )
                providers[str(domain).lower()] = dict(hosts)
        return cls(providers, cleartext, *counts)


def derive_host(email: str, protocol: str, settings: BackupSettings) -> str:
    """The server of `email` for `protocol` when the client named none (module docstring).
    BackupError when `email` is no address (name@domain): there is no domain to ask, and
    "imap.<whatever it is>" would be looked up and dialled for nothing."""
    local, at, domain = email.rpartition("@")
    domain = domain.strip().lower()
    if not (at and local.strip() and domain):
        raise BackupError("email must be an address (name@domain) when no host is given: "
                          "the server is found from its domain", "email")
    configured = settings.providers.get(domain, {}).get(protocol)
    return configured or f"{'imap' if protocol == 'imap' else 'pop'}.{domain}"


def is_google(email: str, host: str | None) -> bool:
    domain = email.rpartition("@")[2].strip().lower()
    hosts = [domain, (host or "").strip().lower().rstrip(".")]
    return any(h == g or h.endswith("." + g) for h in hosts for g in GOOGLE_DOMAINS)


@dataclass(frozen=True)
class BackupAccount:
    """An account with what is backed up of it."""

    account: Account
    msg_count: int
    storage: int


class BackupAccounts:
    """Dropmyemail's view of the fetch accounts of a user."""

    def __init__(self, db: Database, accounts: Accounts, engine: SyncEngine,
                 settings: BackupSettings) -> None:
        self.db = db
        self.accounts = accounts
        self.engine = engine
        self.settings = settings

    async def _usage(self, user_id: int, ids: list[int]) -> dict[int, tuple[int, int]]:
        def txn(conn: Connection) -> dict[int, tuple[int, int]]:
            rows = conn.execute(
                select(messages.c.account_id, func.count(),
                       func.coalesce(func.sum(messages.c.size), 0))
                .where(messages.c.user_id == user_id, messages.c.account_id.in_(ids))
                .group_by(messages.c.account_id)
            )
            return {r[0]: (int(r[1]), int(r[2])) for r in rows}

        return await self.db.read("backup_usage", txn) if ids else {}

    async def _with_usage(self, user_id: int, accounts: list[Account]) -> list[BackupAccount]:
        usage = await self._usage(user_id, [a.id for a in accounts])
        return [BackupAccount(a, *usage.get(a.id, (0, 0))) for a in accounts]

    async def list(self, user_id: int, *, kind: str = "all", sort: str = "email",
                   direction: str = "asc") -> list[BackupAccount]:
        if sort not in SORTS:
            raise BackupError(f"sort must be one of {', '.join(SORTS)}", "sort")
        try:
            found = await self.accounts.list_accounts(user_id, protocol=kind, sort=sort,
                                                      direction=direction)
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        return await self._with_usage(user_id, found)

    async def get(self, user_id: int, account_id: int) -> BackupAccount | None:
        try:
            account = await self.accounts.get(user_id, account_id)
        except AccountNotFound:
            return None
        return (await self._with_usage(user_id, [account]))[0]

    def _values(self, values: dict[str, Any], current: Account | None) -> dict[str, Any]:
        """Fetch-account fields from Dropmyemail's (email, password, host, protocol,
        start_tls, ssl, port). An account's email is fixed: on a change it may be given as it
        is (a client puts back the account it read), not otherwise."""
        if current is not None and "email" in values:
            if values["email"] != current.email:
                raise BackupError("The email of an account cannot change.", "email")
            values = {k: v for k, v in values.items() if k != "email"}
        email = values.get("email", current.email if current else "")
        protocol = values.get("protocol") or (current.protocol if current else "imap")
        if protocol not in ("imap", "pop"):
            raise BackupError("protocol must be imap or pop", "protocol")
        host = values.get("host")
        if is_google(email, host if host is not None else (current.host if current else None)):
            raise BackupError(GOOGLE_REFUSAL, "email")
        out: dict[str, Any] = {k: v for k, v in values.items()
                               if k in ("email", "password", "host", "port", "start_tls")}
        if "ssl" in values:
            out["use_ssl"] = values["ssl"]
        if current is None:
            out.update(name=email, username=email, protocol=protocol)
            if not host:
                out["host"] = derive_host(email, protocol, self.settings)
        elif "protocol" in values:
            out["protocol"] = protocol
        use_ssl = out.get("use_ssl", current.use_ssl if current else False)
        # Without ssl or start_tls, STARTTLS is still used when offered; cleartext only if
        # the operator allows it (module docstring). A change without a new password may
        # only narrow it: the stored password goes in cleartext only where it was given so.
        allowed = self.settings.allow_cleartext_login
        if current is not None and "password" not in values:
            allowed = allowed and current.allow_cleartext
        out["allow_cleartext"] = allowed
        # A change of protocol or ssl without a port takes that protocol's default port;
        # restating the account's own (a client sending what it knows with a new password)
        # keeps its port.
        if "port" not in out and current is not None and (
                protocol != current.protocol or bool(use_ssl) != current.use_ssl):
            out["port"] = DEFAULT_PORTS[(protocol, bool(use_ssl))]
        return out

    async def _check_login(self, values: dict[str, Any], *, ca_pem: str | None = None,
                           fingerprint: str | None = None,
                           deadline: float | None = None) -> None:
        """Log in with `values` (checked fetch-account columns), within `deadline` seconds
        (`login_within`); BackupError if refused or past it."""
        engine = self.engine
        s = engine.settings
        spec = ServerSpec(
            host=values["host"], port=values["port"], use_ssl=bool(values.get("use_ssl")),
            start_tls=bool(values.get("start_tls")),
            allow_cleartext=bool(values.get("allow_cleartext")),
            username=values["username"], password=values["password"],
        )
        creator = engine.tls_factory(values["host"], ca_pem=ca_pem, fingerprint=fingerprint)
        try:
            if values.get("protocol", "imap") == "pop":
                pop = await login_within(engine.reactor, deadline, open_pop3(
                    engine.reactor, spec, creator, max_message=s.max_message_bytes,
                    connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
                    command_timeout=login_check_timeout(s), policy=s.address_policy()))
                await pop.close_session()
            else:
                imap = await login_within(engine.reactor, deadline, open_session(
                    engine.reactor, spec, creator, max_literal=s.max_message_bytes,
                    connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
                    command_timeout=login_check_timeout(s), policy=s.address_policy()))
                await imap.close_session()
        except CleartextRefused:
            raise BackupError(
                f"could not log in to {spec.host}:{spec.port}: the server offers neither TLS "
                "nor STARTTLS, and this service does not send passwords in cleartext; use "
                "ssl (ports 993/995) or a server that offers STARTTLS", "ssl") from None
        except FetchError as e:
            raise BackupError(f"could not log in to {spec.host}: {e}", "password") from None

    async def create(self, user_id: int, values: dict[str, Any], *,
                     deadline: float | None = None) -> BackupAccount:
        """Log in (within `deadline` seconds: `login_check_deadline`), store the account,
        start its first backup."""
        fields = self._values(values, None)
        try:
            checked = validate(dict(fields))
            await self.accounts.check_room(user_id)  # before a login to a server
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        await self.accounts.mailbox_taken(user_id, {**fields, **checked})
        await self._check_login({**fields, **checked}, deadline=deadline)
        try:
            account = await self.accounts.create_one_per_mailbox(user_id, **fields)
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        self.engine.sync(account.id).addErrback(
            lambda f: log.failure("first backup of account {id} failed", f, id=account.id))
        return (await self._with_usage(user_id, [account]))[0]

    async def update(self, user_id: int, account_id: int, values: dict[str, Any], *,
                     deadline: float | None = None) -> BackupAccount | None:
        """Change the account; when how to log in changes, log in first (module docstring;
        within `deadline` seconds). None when the account is not the user's."""
        try:
            current = await self.accounts.get(user_id, account_id)
        except AccountNotFound:
            return None
        fields = self._values(values, current)
        stored = current.__dict__
        try:
            checked = {**fields, **validate(dict(fields), stored)}
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        if moves_mailbox(checked, current):
            await self.accounts.mailbox_taken(user_id, {**stored, **checked}, account_id)
        if any(k in checked and checked[k] != stored[k] for k in LOGIN_FIELDS if k in stored) \
                or "password" in checked:
            password = checked.get("password")
            if password is None:
                _, password = await self.accounts.credentials(account_id)
            await self._check_login({**stored, **checked, "password": password},
                                    ca_pem=current.tls_ca_pem,
                                    fingerprint=current.tls_fingerprint, deadline=deadline)
        try:
            account = await self.accounts.update_one_per_mailbox(user_id, account_id,
                                                                 **fields)
        except AccountNotFound:
            return None
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        return (await self._with_usage(user_id, [account]))[0]

    async def delete(self, user_id: int, account_id: int) -> BackupAccount | None:
        found = await self.get(user_id, account_id)
        if found is None:
            return None
        try:
            await self.accounts.delete(user_id, account_id)
        except AccountNotFound:
            return None
        return found


def iso(value: datetime.datetime | None) -> str | None:
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z") if value else None

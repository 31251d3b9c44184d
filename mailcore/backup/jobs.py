"""Dropmyemail's migrates and restores: jobs of `mailcore.fetch.jobs` made for an account.

A migrate names its destination (`email`, `password`, and optionally `host`, `protocol`,
`start_tls`, `ssl`, `port`, derived as for accounts when missing, and `tls_ca_pem` or
`tls_fingerprint` to trust a private server as accounts may): the destination must be an
IMAP server (POP3 cannot receive mail); the login is checked first (a refusal is a
BackupError with the server's reason, and nothing is stored); the password is stored
encrypted with the fetch engine's key and never shown. A restore has no input; the account
must be an IMAP account. Both are queued and run in the background by the job runner.

One job at a time writes to a mailbox: while a restore of an account is queued or running,
another is refused (JobConflict), and so is a migrate of an account into a destination (host,
port, user) that an active migrate of it already writes to. Two such jobs run at once would
each find the same messages missing and each append them (every message twice). The check
and the insert are one transaction that first locks the account's row (SQLite: the write
lock of BEGIN IMMEDIATE), so two requests at once cannot both pass it. Jobs of other
accounts (or users) writing to the same mailbox (two accounts naming it, a migrate into an
account that is restored) are not refused: the runner starts them one after the other
(`mailcore.fetch.jobs.thd_mailbox_busy`).

A user has at most `[dropmyemail] max_queued_jobs_per_user` migrates and restores queued or
running at once: one more is JobLimitReached (409), nothing stored. The count and the insert
are one transaction that first locks the user's row, so two requests at once (on nodes
sharing PostgreSQL too) count one after the other. An account keeps its newest
`jobs_kept_per_account` finished migrates, and as many finished restores: the transaction
that makes a job deletes the oldest beyond that have no items (`thd_forget_old_jobs`), and
OldJobsSweeper the others, FORGET_BATCH items a transaction (a migrate has an item per
message: the cascade of one job's could hold SQLite's only write lock for seconds).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from sqlalchemy import Connection, delete, exists, func, select
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.backup.accounts import (
    GOOGLE_REFUSAL,
    BackupError,
    BackupSettings,
    derive_host,
    is_google,
    login_check_timeout,
    login_within,
)
from mailcore.fetch.accounts import DEFAULT_PORTS, Accounts, validate
from mailcore.fetch.engine import SyncEngine
from mailcore.fetch.errors import AccountError, AccountNotFound, FetchError
from mailcore.fetch.imap import ServerSpec, open_session
from mailcore.fetch.jobs import (
    ACTIVE,
    STATUSES,
    Job,
    JobRunner,
    thd_create_job,
    thd_get_job,
    thd_list_jobs,
    thd_message_id_chunk,
)
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.store import Database
from mailcore.store.owners import thd_lock_owner
from mailcore.store.schema import fetch_accounts, mailbox_job_items, mailbox_jobs

log = Logger()

JOB_SORTS = ("start_time", "end_time")
# How many of a job's message ids one read of the store gives.
MESSAGE_ID_CHUNK = 5000
FINISHED = tuple(s for s in STATUSES if s not in ACTIVE)
# OldJobsSweeper: seconds between its runs, items of an old job deleted a transaction (each
# a short hold of SQLite's write lock), and old jobs looked up at a time.
FORGET_INTERVAL = 600.0
FORGET_BATCH = 2000
FORGET_JOBS = 100


class JobConflict(Exception):
    """A job of the account that writes to the same mailbox is queued or running (409)."""

    def __init__(self, message: str, job_id: int) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id


class JobLimitReached(Exception):
    """The user has `[dropmyemail] max_queued_jobs_per_user` jobs queued or running (409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def thd_job_room(conn: Connection, user_id: int, limit: int, *, lock: bool = True) -> None:
    """Blocking: JobLimitReached when `user_id` has `limit` jobs queued or running, after
    locking the user's row (PostgreSQL's READ COMMITTED would let two requests at once
    count the same rows; SQLite serialises writers anyway). FOR NO KEY UPDATE: it takes
    turns with itself, not with inserts of rows naming the user (their FOR KEY SHARE: sync
    batches, api_sends), which FOR UPDATE held up until the create committed. Without
    `lock`, for a check before work the create checks again."""
    if lock:
        thd_lock_owner(conn, user_id)
    j = mailbox_jobs.c
    queued = conn.execute(select(func.count()).select_from(mailbox_jobs).where(
        j.user_id == user_id, j.status.in_(ACTIVE))).scalar() or 0
    if queued >= limit:
        raise JobLimitReached(f"a user may have at most {limit} migrates and restores "
                              "queued or running; wait for one to end")


def _beyond_kept(kept: int) -> Any:
    """The finished jobs of each account and kind but the newest `kept`: (id) rows."""
    j = mailbox_jobs.c
    place = func.row_number().over(partition_by=(j.account_id, j.kind),
                                   order_by=j.id.desc()).label("place")
    ranked = select(j.id, place).where(j.status.in_(FINISHED)).subquery()
    return select(ranked.c.id).where(ranked.c.place > kept)


def thd_forget_old_jobs(conn: Connection, account_id: int, kind: str, kept: int) -> int:
    """Blocking: delete the account's finished jobs of `kind` but the newest `kept` that
    hold no item (a restore's, a migrate that copied nothing); how many. Without it every
    restore of an intact account, quick to end, left a row for ever. It runs in the
    create's transaction, which on SQLite holds the only write lock (the spool's group
    commit waits on it), so it deletes no job with items: a migrate has one a message,
    and their ON DELETE CASCADE took 0.63 s for 200,000. Those are left to
    OldJobsSweeper (thd_forget_job_items), a batch a transaction."""
    j = mailbox_jobs.c
    i = mailbox_job_items.c
    beyond = [row[0] for row in conn.execute(
        select(j.id).where(j.account_id == account_id, j.kind == kind,
                           j.status.in_(FINISHED))
        .order_by(j.id.desc()).offset(kept))]
    if not beyond:
        return 0
    return int(conn.execute(delete(mailbox_jobs).where(
        j.id.in_(beyond), ~exists().where(i.job_id == j.id))).rowcount or 0)


def thd_jobs_beyond_kept(conn: Connection, kept: int, limit: int) -> list[int]:
    """Blocking: up to `limit` ids (oldest first) of finished jobs beyond the newest `kept`
    of their account and kind, whose items OldJobsSweeper deletes."""
    found = _beyond_kept(kept).subquery()
    return [int(row[0]) for row in conn.execute(
        select(found.c.id).order_by(found.c.id).limit(limit))]


def thd_forget_job_items(conn: Connection, job_id: int, batch: int) -> int:
    """Blocking: delete up to `batch` items of the finished job `job_id` (by its primary
    key's order), and the job itself once it has none left; how many items went."""
    i = mailbox_job_items.c
    j = mailbox_jobs.c
    first = select(i.message_row_id).where(i.job_id == job_id) \
        .order_by(i.message_row_id).limit(batch).scalar_subquery()
    gone = int(conn.execute(delete(mailbox_job_items).where(
        i.job_id == job_id, i.message_row_id.in_(first))).rowcount or 0)
    if gone < batch:
        conn.execute(delete(mailbox_jobs).where(
            j.id == job_id, j.status.in_(FINISHED), ~exists().where(i.job_id == job_id)))
    return gone


def thd_active_job(conn: Connection, values: dict[str, Any]) -> int | None:
    """Blocking: the id of a queued or running job that would write to the same mailbox as
    the job `values` describes (module docstring), after locking the account's row; None
    if there is none."""
    conn.execute(select(fetch_accounts.c.id)
                 .where(fetch_accounts.c.id == values["account_id"]).with_for_update())
    j = mailbox_jobs.c
    query = select(j.id).where(j.account_id == values["account_id"], j.kind == values["kind"],
                               j.status.in_(ACTIVE))
    if values["kind"] == "migrate":
        query = query.where(func.lower(j.host) == values["host"].lower(),
                            j.port == values["port"], j.username == values["username"])
    found = conn.execute(query.order_by(j.id).limit(1)).scalar()
    return None if found is None else int(found)


class BackupJobs:
    """Make, list and show the migrates and restores of a user's accounts."""

    def __init__(self, db: Database, accounts: Accounts, engine: SyncEngine,
                 settings: BackupSettings, runner: JobRunner | None = None) -> None:
        self.db = db
        self.accounts = accounts
        self.engine = engine
        self.settings = settings
        self.runner = runner

    def now(self) -> datetime.datetime:
        return self.accounts.now()

    async def _account(self, user_id: int, account_id: int) -> Any:
        try:
            return await self.accounts.get(user_id, account_id)
        except AccountNotFound:
            return None

    def destination(self, values: dict[str, Any]) -> dict[str, Any]:
        """Checked destination columns from the migrate's input (BackupError if bad)."""
        email = values.get("email") or ""
        if not email:
            raise BackupError("email is required", "email")
        if not values.get("password"):
            raise BackupError("password is required", "password")
        protocol = values.get("protocol") or "imap"
        if protocol != "imap":
            raise BackupError("a migrate's destination must be an IMAP server (POP3 cannot "
                              "receive mail)", "protocol")
        host = values.get("host") or derive_host(email, "imap", self.settings)
        if is_google(email, host):
            raise BackupError(GOOGLE_REFUSAL, "email")
        use_ssl = bool(values.get("ssl", False))
        start_tls = bool(values.get("start_tls", False))
        fields = {"email": email, "username": email, "password": values["password"],
                  "host": host, "protocol": "imap", "use_ssl": use_ssl,
                  "start_tls": start_tls,
                  # No password in cleartext to a server without TLS or STARTTLS unless the
                  # operator allows it, as for accounts ([dropmyemail] allow_cleartext_login).
                  "allow_cleartext": self.settings.allow_cleartext_login,
                  "port": values.get("port") or DEFAULT_PORTS[("imap", use_ssl)],
                  "tls_ca_pem": values.get("tls_ca_pem"),
                  "tls_fingerprint": values.get("tls_fingerprint")}
        try:
            checked = validate(dict(fields))
        except AccountError as e:
            raise BackupError(e.message, e.field) from None
        return {**fields, **checked}

    async def check_login(self, fields: dict[str, Any], *,
                          deadline: float | None = None) -> None:
        """Log in to the destination (the guarded connection the sync engine uses), within
        `deadline` seconds (`login_within`)."""
        engine = self.engine
        s = engine.settings
        spec = ServerSpec(
            host=fields["host"], port=fields["port"], use_ssl=fields["use_ssl"],
            start_tls=fields["start_tls"], allow_cleartext=fields["allow_cleartext"],
            username=fields["username"], password=fields["password"],
        )
        creator = engine.tls_factory(fields["host"], ca_pem=fields["tls_ca_pem"],
                                     fingerprint=fields["tls_fingerprint"])
        try:
            session = await login_within(engine.reactor, deadline, open_session(
                engine.reactor, spec, creator, max_literal=s.max_message_bytes,
                connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
                command_timeout=login_check_timeout(s), policy=s.address_policy()))
        except FetchError as e:
            raise BackupError(f"could not log in to {spec.host}: {e}", "password") from None
        await session.close_session()

    async def _create(self, values: dict[str, Any]) -> Job:
        """A new queued job; JobConflict if one writing to the same mailbox is active,
        JobLimitReached if the user has `max_queued_jobs_per_user` active."""
        limit = self.settings.max_queued_jobs_per_user
        kept = self.settings.jobs_kept_per_account

        def txn(conn: Connection) -> Job | int:
            thd_job_room(conn, values["user_id"], limit)
            active = thd_active_job(conn, values)
            if active is not None:
                return active
            thd_forget_old_jobs(conn, values["account_id"], values["kind"], kept)
            job = thd_get_job(conn, thd_create_job(conn, values))
            assert job is not None
            return job

        job = await self.db.run("create_mailbox_job", txn)
        if isinstance(job, int):
            if values["kind"] == "restore":
                raise JobConflict(f"restore {job} of this account is still queued or "
                                  "running; wait for it to end", job)
            raise JobConflict(f"migrate {job} of this account into the same mailbox is "
                              "still queued or running; wait for it to end", job)
        if self.runner is not None:
            self.runner.kick()
        return job

    async def migrate(self, user_id: int, account_id: int, values: dict[str, Any], *,
                      deadline: float | None = None) -> Job | None:
        """A queued migrate of the account into the destination `values` (its login
        checked within `deadline` seconds); None if the account is not the user's."""
        if await self._account(user_id, account_id) is None:
            return None
        fields = self.destination(values)
        # At the cap, no login to the destination for nothing (_create checks again).
        await self.db.read("mailbox_job_room", thd_job_room, user_id,
                           self.settings.max_queued_jobs_per_user, lock=False)
        await self.check_login(fields, deadline=deadline)
        now = self.now()
        return await self._create({
            "kind": "migrate", "user_id": user_id, "account_id": account_id,
            "status": "queued", "email": fields["email"], "host": fields["host"],
            "protocol": "imap", "port": fields["port"], "use_ssl": fields["use_ssl"],
            "start_tls": fields["start_tls"], "allow_cleartext": fields["allow_cleartext"],
            "username": fields["username"], "tls_ca_pem": fields["tls_ca_pem"],
            "tls_fingerprint": fields["tls_fingerprint"],
            "password_enc": self.accounts.secrets.encrypt(fields["password"]),
            "created_at": now, "updated_at": now,
        })

    async def restore(self, user_id: int, account_id: int) -> Job | None:
        """A queued restore of the account's backup into it; None if not the user's."""
        account = await self._account(user_id, account_id)
        if account is None:
            return None
        if account.protocol != "imap":
            raise BackupError("a POP3 account cannot be restored: POP3 cannot put mail "
                              "back", "protocol")
        now = self.now()
        return await self._create({
            "kind": "restore", "user_id": user_id, "account_id": account_id,
            "status": "queued", "email": account.email, "created_at": now, "updated_at": now,
        })

    async def list(self, user_id: int, account_id: int, kind: str, *,
                   sort: str = "start_time", direction: str = "asc",
                   with_message_ids: bool = True) -> list[Job] | None:
        """The account's jobs of `kind`; None if the account is not the user's. Without
        `with_message_ids`, their `message_ids` are left empty (`message_ids` reads them)."""
        if sort not in JOB_SORTS:
            raise BackupError(f"sort must be one of {', '.join(JOB_SORTS)}", "sort")
        if direction not in ("asc", "desc"):
            raise BackupError("direction must be asc or desc", "direction")
        if await self._account(user_id, account_id) is None:
            return None
        return await self.db.read("list_mailbox_jobs", thd_list_jobs, user_id=user_id,
                                  account_id=account_id, kind=kind, sort=sort,
                                  direction=direction, with_message_ids=with_message_ids)

    async def get(self, user_id: int, account_id: int, kind: str, job_id: int, *,
                  with_message_ids: bool = True) -> Job | None:
        return await self.db.read("get_mailbox_job", thd_get_job, job_id, user_id=user_id,
                                  account_id=account_id, kind=kind,
                                  with_message_ids=with_message_ids)

    async def forget_old_jobs(self, batch: int = FORGET_BATCH) -> int:
        """Delete the finished jobs beyond each account's newest `jobs_kept_per_account` of
        a kind with their items, `batch` items a transaction (the create deletes only
        those without items: thd_forget_old_jobs); how many items went."""
        kept = self.settings.jobs_kept_per_account
        gone = 0
        done: set[int] = set()
        while True:
            found = [job for job in await self.db.read(
                "mailbox_jobs_beyond_kept", thd_jobs_beyond_kept, kept, FORGET_JOBS)
                if job not in done]
            if not found:
                return gone
            for job in found:
                gone += await delete_in_batches(self.db, "forget_old_job",
                                                thd_forget_job_items, job, batch=batch)
                done.add(job)

    async def message_ids(self, job_id: int) -> AsyncIterator[Sequence[int]]:
        """The backed-up messages job `job_id` copied or found, in order, a chunk of
        `MESSAGE_ID_CHUNK` at a time, each read on its own: the store's read lane is never
        held for all of them, nor are they all in memory at once."""
        after = 0
        while True:
            chunk = await self.db.read("mailbox_job_message_ids", thd_message_id_chunk,
                                       job_id, after, MESSAGE_ID_CHUNK)
            if chunk:
                yield chunk
            if len(chunk) < MESSAGE_ID_CHUNK:
                return
            after = chunk[-1]


def build_jobs(
    reactor: Any, db: Database, fetch: Any, settings: BackupSettings, *, node_id: str,
    registry: Any = None, webhooks: Any = None,
) -> tuple[JobRunner, BackupJobs]:
    """The job runner (a background service) and Dropmyemail's migrates and restores over
    the fetch services `fetch`; a finished job wakes the webhook sender of `webhooks`."""
    from mailcore.fetch.jobs import JobMetrics
    from mailcore.fetch.migrate import MailboxCopier

    metrics = JobMetrics(registry) if registry is not None else None
    copier = MailboxCopier(db, fetch.accounts, fetch.engine, fetch.secrets, metrics=metrics)

    def finished(_job: Job) -> None:
        sender = getattr(webhooks, "sender", None)
        if sender is not None:
            sender.kick()

    runner = JobRunner(reactor, db, node_id, copier.bodies(), metrics=metrics,
                       on_finished=finished)
    return runner, BackupJobs(db, fetch.accounts, fetch.engine, settings, runner)


class OldJobsSweeper(Sweeper[int]):
    """Deletes the finished migrates and restores beyond each account's newest `[dropmyemail]
    jobs_kept_per_account` of a kind that hold items (a migrate's, one a message), every
    FORGET_INTERVAL seconds, FORGET_BATCH items a transaction: a job's create deletes only
    those with none, since its transaction holds SQLite's only write lock. The Core gives
    it the store's job leases: one node of those sharing the store sweeps per period."""

    name = "old-jobs-sweeper"
    failed = "deleting old migrates and restores failed"

    def __init__(self, jobs: BackupJobs, clock: IReactorTime,
                 every: float = FORGET_INTERVAL) -> None:
        super().__init__(clock, every)
        self.jobs = jobs

    def sweep(self) -> Awaitable[int]:
        return defer.Deferred.fromCoroutine(self.jobs.forget_old_jobs())

    def swept(self, gone: int) -> None:
        if gone:
            log.info("deleted {n} items of old migrates and restores", n=gone)

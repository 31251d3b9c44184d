"""The sync engine: bring our copy of an account up to date with its server.

IMAP: the folders the last sync opened are EXAMINEd first and LIST runs after them, to find
the new folders and those gone (a resync with nothing new is one EXAMINE per folder and a LIST).
Per folder: EXAMINE (with CONDSTORE/QRESYNC when offered), find the UIDs we do not hold
(server-side SEARCH with the account's limits), learn their sizes, then fetch them in
pipelined UID FETCH batches of BODY.PEEK[], FLAGS, INTERNALDATE and RFC822.SIZE (a listed
folder whose EXAMINE is refused NO [NONEXISTENT], or a plain NO as Dovecot answers for one
deleted while it had subfolders, holds no mail: passed over as a \\Noselect one,
`refused_as_deleted`; the result names such a plain NO of a folder an earlier sync opened,
`FolderResult.unsure`, which may be a refusal for a moment too). The batches
flow through three stages at once: `pipeline_depth` fetches on the wire, each fetched batch
parsed on the CPU pool as soon as it arrives, and one batch at a time stored. Each batch is
committed with its (folder, uidvalidity, uid) in one transaction and batches commit in UID
order; the folder's state (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) is saved only after its last
batch committed, so a sync killed at any moment and run again stores exactly the source set
(the UIDs it skipped are kept on the folder before any higher one is committed, so that the
next sync tries them again; a folder's first UIDVALIDITY before its first batch, so that a
first sync cut short and a UIDVALIDITY changed meanwhile rescan rather than store twice).
A changed UIDVALIDITY rescans the folder and matches our copies by content hash; nothing of
ours is ever deleted. POP3: UIDL says what is new, and a UIDL we hold that LIST gives
another size than when we fetched it (a server may give a new message the UIDL of one deleted)
is fetched again: stored when its bytes are not those of our copy, which stays under no UIDL;
nothing is ever deleted on the server.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol

from sqlalchemy import Connection
from twisted.internet import defer, task
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.fetch.accounts import (
    INTERRUPTED,
    Account,
    Accounts,
    thd_claim_sync,
    thd_release_sync,
    thd_renew_syncs,
    thd_settle_interrupted,
)
from mailcore.fetch.errors import (
    ACCOUNT_DELETED,
    INTERNAL_ERROR,
    AccountNotFound,
    CommandTimeout,
    FetchError,
    LiteralTooLarge,
    ProtocolFailed,
)
from mailcore.fetch.imap import (
    ARRIVING,
    FetchItem,
    IMAPClient,
    RemoteFolder,
    SelectInfo,
    ServerSpec,
    TooManyReplies,
    compress_set,
    open_session,
    runs,
    set_range,
)
from mailcore.fetch.pop3 import MessageTooLarge, OutOfStep, POP3Session, open_pop3
from mailcore.fetch.secrets import SecretError
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.state import (
    FolderState,
    thd_created_since,
    thd_folder,
    thd_held_span,
    thd_held_uids,
    thd_known_folders,
    thd_mark_gone,
    thd_mark_stale,
    thd_max_uid,
    thd_note_pop_sizes,
    thd_note_skipped,
    thd_save_folder_state,
    thd_set_folder_error,
    thd_stored_uidls,
    thd_stored_uids,
    thd_update_flags,
    thd_upsert_folders,
)
from mailcore.fetch.tls import client_tls
from mailcore.fetch.writer import refusal_codes, refused_as_deleted
from mailcore.messages.models import FetchedMessage, Location, StoreResult
from mailcore.messages.parse import ParsedMessage, parse_messages
from mailcore.messages.store import MessageStore, pop_size_changed
from mailcore.store import Database

log = Logger()

_P = ParamSpec("_P")
_Parsed = tuple[list[FetchedMessage], list[ParsedMessage]]

TRASH_NAMES = {"trash", "deleted items", "deleted messages", "deleted", "bin"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SIZE_CHUNK = 2000
# The UIDs held of a folder read at once when their flags are asked by lists.
_HELD_PAGE = 50_000
# The longest list of UIDs (as a set: "1:3,7") one UID FETCH of their flags or sizes sends:
# RFC 7162 4 asks clients to keep command lines within about 8,192 bytes (2,000 sparse UIDs
# were 22 KB).
_LIST_BYTES = 8000
_BODY_ITEMS = b"UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]"
# A fetched batch of at least this many messages is parsed in a CPU worker process.
_PROCESS_PARSE_MIN = 50
# A sync's progress is written at most this often (seconds), and once when a folder that
# fetched anything is done.
PROGRESS_INTERVAL = 1.0
# Messages whose headers (POP3 TOP n 0) are read and parsed at once for a date limit.
_TOP_CHUNK = 200
# How many new POP3 sessions one sync may open after messages that ended the session (ran far
# over the size limit, or their reply went on after its end).
POP_REOPENS = 5

# A folder's sync starts again (in a new session when the old one died) at most this many
# times, each after a message whose body came back over the size limit though its
# RFC822.SIZE was within it; that message is skipped the next time.
MAX_OVERSIZED_RESTARTS = 20

# An account's sync lease (fetch_accounts.lease_owner/lease_until) lasts this long and is
# renewed every third of it while the sync runs; a node that died mid-sync holds the account
# at most this long.
SYNC_LEASE = 300.0
BUSY = "busy"


class SyncRecorder(Protocol):
    """Told, inside a sync's own transactions, what each commits (`SyncEngine.recorders`):
    so that what it records is durable with the data it describes (the webhooks' pending
    events, `mailcore.webhooks.events`), whatever becomes of the process after the commit.
    Both run on the store's pool and may not block on anything but the transaction."""

    def thd_batch(self, conn: Connection, where: Location, stored: StoreResult,
                  now: float) -> None: ...

    def thd_outcome(self, conn: Connection, result: SyncResult, now: float) -> None: ...


class TLSFactory(Protocol):
    def __call__(
        self, hostname: str, *, ca_pem: str | None = None, fingerprint: str | None = None
    ) -> IOpenSSLClientConnectionCreator: ...


@dataclass
class FolderResult:
    """What a sync did to one folder."""

    new: int = 0
    relinked: int = 0
    skipped: list[str] = field(default_factory=list)
    flags_updated: int = 0
    error: str | None = None
    # Passed over on a plain NO to its EXAMINE (listed \HasChildren: `refused_as_deleted`)
    # though an earlier sync opened it: the refusal. Dovecot's answer for a folder deleted
    # while it had subfolders, or one for a moment (Office 365's "Server Unavailable"),
    # which the sync cannot tell apart: a migrate does not end done on it the first time
    # (`mailcore.fetch.migrate.MailboxCopier.bring_backup_up_to_date`).
    unsure: str | None = None


@dataclass
class _Oversized:
    """A folder's messages whose body came back over the size limit in this sync, skipped
    when the folder starts again; `one_by_one` once a reply did not name its message (the
    folder's messages are then fetched one per command, so the next one will be known)."""

    skipped: dict[int, str] = field(default_factory=dict)
    one_by_one: bool = False
    restarts: int = 0
    progress: tuple[int, int] | None = None  # the sync's (done, total) before the folder


@dataclass
class SyncResult:
    """What a sync of one account did. `status` is "success" or "error", or "busy" when
    nothing was done because another node is syncing the account (or, for a scheduled
    sync, synced it since the scheduler looked)."""

    account_id: int
    user_id: int
    started_at: datetime.datetime
    finished_at: datetime.datetime | None = None
    status: str = "running"
    error: str | None = None
    new_messages: int = 0
    relinked: int = 0
    new_message_ids: list[int] = field(default_factory=list)
    thread_ids: set[int] = field(default_factory=set)
    folders: dict[str, FolderResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def problems(self) -> str | None:
        """One line naming what went wrong, or None."""
        parts = [self.error] if self.error else []
        parts += [f"{name}: {fr.error}" for name, fr in self.folders.items() if fr.error]
        return "; ".join(parts) if parts else None

    def unsure(self) -> dict[str, str]:
        """The folders passed over that the sync cannot tell deleted (`FolderResult.unsure`),
        with their refusals."""
        return {name: fr.unsure for name, fr in self.folders.items() if fr.unsure}


def imap_date(day: datetime.date) -> str:
    """A date as IMAP SEARCH wants it (1-Feb-2024), independent of the locale."""
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}"


# The earliest first day a limit may name: an IMAP date has a four-digit year (RFC 3501
# date-year), and a datetime none before year 1. A limit that reaches further back (the API
# takes up to 1,000,000 days, weeks or months) takes in every message, as no limit does.
EARLIEST_SINCE = datetime.date(1000, 1, 1)


def limit_since(account: Account, now: datetime.datetime) -> datetime.date | None:
    """The first day to sync for days/weeks/months limits, else None (also for a limit
    reaching back before EARLIEST_SINCE)."""
    n = account.sync_limit_value
    try:
        if account.sync_limit_type == "days":
            first = (now - datetime.timedelta(days=n)).date()
        elif account.sync_limit_type == "weeks":
            first = (now - datetime.timedelta(weeks=n)).date()
        elif account.sync_limit_type == "months":
            month_index = now.year * 12 + (now.month - 1) - n
            year, month = divmod(month_index, 12)
            first = datetime.date(year, month + 1, min(now.day, 28))
        else:
            return None
    except (OverflowError, ValueError):  # before year 1
        return None
    return first if first >= EARLIEST_SINCE else None


def is_trash(folder: RemoteFolder) -> bool:
    if folder.special_use == "\\Trash":
        return True
    last = folder.name
    if folder.delimiter:
        last = folder.name.rsplit(folder.delimiter, 1)[-1]
    return last.strip().lower() in TRASH_NAMES


def choose_folders(account: Account, remote: list[RemoteFolder]) -> tuple[list[RemoteFolder],
                                                                         list[str]]:
    """The folders to sync, and the wanted names the server does not have."""
    usable = [f for f in remote if f.selectable]
    if account.exclude_trash:
        usable = [f for f in usable if not is_trash(f)]
    wanted = account.folder_list
    if not wanted:
        return usable, []
    by_name = {f.name: f for f in usable}
    by_name.update({f.name.upper(): f for f in usable if f.name.upper() == "INBOX"})
    chosen: list[RemoteFolder] = []
    missing: list[str] = []
    for name in wanted:
        folder = by_name.get(name) or (by_name.get("INBOX") if name.upper() == "INBOX" else None)
        if folder is None:
            missing.append(name)
        elif folder not in chosen:
            chosen.append(folder)
    return chosen, missing


def batches(uids: list[int], sizes: dict[int, int], max_count: int,
            max_bytes: int) -> list[list[int]]:
    """UIDs in ascending order cut into batches bounded in count and declared bytes."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if current and (len(current) >= max_count or total + size > max_bytes):
            out.append(current)
            current, total = [], 0
        current.append(uid)
        total += size
    if current:
        out.append(current)
    return out


class _BodyTooLarge(Exception):
    """A message's body came back over the size limit (its RFC822.SIZE lied); `uid` is
    None when the reply did not say which message of a batch it was."""

    def __init__(self, uid: int | None, error: FetchError) -> None:
        super().__init__(str(error))
        self.uid = uid
        self.error = error


def _with(again: set[int], wanted: list[int]) -> list[int]:
    """`wanted` (the server's order) with the UIDs to try `again`, in UID order; sorted only
    when there are some (a first sync's search may name a million UIDs)."""
    return sorted(again.union(wanted)) if again else wanted


def _by_line(uids: list[int], limit: int) -> Iterator[list[int]]:
    """Sorted `uids` cut into lists each written as a set (compress_set) in at most `limit`
    bytes (a range longer than `limit` alone stays whole)."""
    line: list[int] = []
    size = 0
    for first, last in runs(uids):
        piece = len(set_range(first, last))
        if line and size + 1 + piece > limit:
            yield line
            line, size = [], 0
        size += piece + (1 if line else 0)
        line.extend(range(first, last + 1))
    if line:
        yield line


def _swallow(d: defer.Deferred[Any]) -> None:
    """Consume the outcome of a pipelined request we no longer wait for."""
    d.addErrback(lambda _f: None)


class SyncEngine:
    """Runs account syncs: one at a time per account, at most `max_concurrent` at once.

    Nodes sharing the store share the accounts: a sync first leases the account in the
    store for this node (`node_id`), so no two nodes ever sync one account at once; the
    lease is renewed while the sync runs and given up when it ends."""

    def __init__(
        self,
        reactor: Any,
        db: Database,
        accounts: Accounts,
        store: MessageStore,
        settings: FetchSettings | None = None,
        *,
        tls_factory: TLSFactory = client_tls,
        node_id: str = "local",
    ) -> None:
        self.reactor = reactor
        self.node_id = node_id
        self.db = db
        self.accounts = accounts
        self.store = store
        self.settings = settings or FetchSettings()
        self.tls_factory = tls_factory
        self._limit = defer.DeferredSemaphore(self.settings.max_concurrent)
        # One semaphore per user with a sync waiting or running (max_concurrent_per_user):
        # taken before the engine's, so a user's syncs beyond it wait holding no slot.
        self._per_user: dict[int, defer.DeferredSemaphore] = {}
        self._stopping = False
        self._running: dict[int, defer.Deferred[SyncResult]] = {}
        self._waiters: dict[int, list[defer.Deferred[SyncResult]]] = {}
        # Called once a sync's outcome is committed (not for a cancelled sync); what must
        # not be lost if the process dies before they run is written by `recorders`.
        self.listeners: list[Callable[[SyncResult], object]] = []
        self.recorders: list[SyncRecorder] = []
        # Accounts whose sync lease this node holds, and the timer that renews them.
        self._leased: set[int] = set()
        self._renewal: task.LoopingCall | None = None
        # When each running sync last wrote its progress (reactor seconds).
        self._shown: dict[int, float] = {}

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.UTC)

    # -- public --------------------------------------------------------------------------

    def is_running(self, account_id: int) -> bool:
        return account_id in self._running

    def running(self) -> list[int]:
        return sorted(self._running)

    def sync(
        self, account_id: int, *, due_before: datetime.datetime | None = None,
        user_id: int | None = None,
    ) -> defer.Deferred[SyncResult]:
        """Sync an account now (or join the sync already running); fires with the result.
        With `due_before` (the scheduler's due check) it syncs only if the account's last
        attempt is not later than that when its lease is taken (else: "busy"). At most
        `max_concurrent_per_user` syncs of one user (`user_id`, the account's owner; looked
        up when not given) take slots at once: the others wait for one of the user's to end,
        holding none of the `max_concurrent`.

        Cancelling the returned Deferred of the sync that started it stops that sync: what
        was committed stays, and the account shows the sync as cancelled.
        """
        if account_id in self._running:
            waiter: defer.Deferred[SyncResult] = defer.Deferred()
            self._waiters[account_id].append(waiter)
            return waiter
        main = defer.Deferred.fromCoroutine(self._queued(account_id, due_before, user_id))
        self._running[account_id] = main
        self._waiters[account_id] = []

        def done(outcome: SyncResult | Failure) -> SyncResult | Failure:
            self._running.pop(account_id, None)
            for w in self._waiters.pop(account_id, []):
                if isinstance(outcome, Failure):
                    w.errback(outcome)
                else:
                    w.callback(outcome)
            return outcome

        main.addBoth(done)
        return main

    async def _queued(self, account_id: int, due_before: datetime.datetime | None,
                      user_id: int | None) -> SyncResult:
        """`_leased_sync` once the user's semaphore, then the engine's, gives it a slot."""

        def start() -> defer.Deferred[SyncResult]:
            if self._stopping:  # a slot freed by a sync `stop` cancelled: not this one's
                return defer.fail(defer.CancelledError())
            return defer.Deferred.fromCoroutine(self._leased_sync(account_id, due_before))

        def leased() -> defer.Deferred[SyncResult]:
            return self._limit.run(start)

        if user_id is None:
            try:
                user_id = await self.accounts.owner_of(account_id)
            except AccountNotFound:
                return await leased()  # _sync says so, as before
        mine = self._per_user.get(user_id)
        if mine is None:
            mine = self._per_user[user_id] = defer.DeferredSemaphore(
                self.settings.max_concurrent_per_user)
        try:
            return await mine.run(leased)
        finally:
            if mine.tokens == mine.limit and not mine.waiting:
                self._per_user.pop(user_id, None)

    async def sync_now(self, account_id: int) -> SyncResult:
        """`sync` for callers that await."""
        return await self.sync(account_id)

    async def stop(self) -> None:
        """Cancel every running sync and wait for them to record their state."""
        pending = list(self._running.values())
        self._stopping = True  # a sync waiting for a slot starts no more
        try:
            for d in pending:
                d.cancel()
            for d in pending:
                try:
                    await d
                except Exception as e:  # cancelled or failed: the account shows it
                    log.debug("sync ended on stop: {e!r}", e=e)
        finally:
            self._stopping = False

    # -- leases ----------------------------------------------------------------------------

    async def _leased_sync(
        self, account_id: int, due_before: datetime.datetime | None
    ) -> SyncResult:
        """`_sync` while this node holds the account's lease; "busy" if it cannot."""
        now = self.now()
        seconds = self.reactor.seconds()
        claimed = await self.db.run(
            "claim_fetch_sync", thd_claim_sync, account_id, self.node_id, seconds,
            seconds + SYNC_LEASE, now, due_before,
        )
        if claimed is False:
            owner = await self.accounts.owner_of(account_id)
            return SyncResult(account_id=account_id, user_id=owner, started_at=now,
                              finished_at=now, status=BUSY)
        if claimed is None:
            return await self._sync(account_id)  # no such account: say so as before
        self._leased.add(account_id)
        self._renew_soon()
        try:
            return await self._sync(account_id)
        finally:
            self._leased.discard(account_id)
            if not self._leased and self._renewal is not None:
                if self._renewal.running:
                    self._renewal.stop()
                self._renewal = None
            await self.db.run("release_fetch_sync", thd_release_sync, account_id,
                              self.node_id)

    def _renew_soon(self) -> None:
        if self._renewal is None:
            self._renewal = task.LoopingCall(self._renew)
            self._renewal.clock = self.reactor
            self._renewal.start(SYNC_LEASE / 3, now=False).addErrback(
                lambda f: log.failure("renewing sync leases stopped", f)
            )

    def _renew(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.renew_leases())

    async def renew_leases(self) -> None:
        """Extend this node's sync leases; a sync whose lease another node took over (this
        node stalled past it) is cancelled."""
        mine = sorted(self._leased)
        try:
            held = set(await self.db.run(
                "renew_fetch_syncs", thd_renew_syncs, self.node_id, mine,
                self.reactor.seconds() + SYNC_LEASE,
            ))
        except Exception:
            log.failure("renewing sync leases failed")
            return
        for account_id in mine:
            if account_id not in held and account_id in self._leased:
                log.warn("account {account}: another node took its sync over; stopping ours",
                         account=account_id)
                running = self._running.get(account_id)
                if running is not None:
                    running.cancel()

    # -- one account ---------------------------------------------------------------------

    async def _sync(self, account_id: int) -> SyncResult:
        try:
            account, password = await self.accounts.credentials(account_id)
        except SecretError as e:
            owner = await self.accounts.owner_of(account_id)
            await self.accounts.set_status(account_id, sync_status="error", sync_error=str(e))
            return SyncResult(account_id=account_id, user_id=owner, started_at=self.now(),
                              finished_at=self.now(), status="error", error=str(e))
        result = SyncResult(account_id=account.id, user_id=account.user_id,
                            started_at=self.now())
        await self.accounts.set_status(
            account.id, sync_status="running", sync_started_at=result.started_at,
            sync_error=None, progress_folder=None, progress_done=0, progress_total=0,
        )
        self._shown[account.id] = self.reactor.seconds()
        cancelled = False
        try:
            if account.protocol == "pop":
                await self._sync_pop(account, password, result)
            else:
                await self._sync_imap(account, password, result)
        except FetchError as e:
            result.error = str(e)
        except defer.CancelledError:
            result.error = "sync cancelled"
            cancelled = True
        except Exception:
            if await self._deleted(account.id):
                # Its owner deleted it meanwhile: its folders and copies went with it, and
                # the next write of this sync failed on them. Nothing to record or tell.
                log.info("account {account} was deleted during its sync; stopped",
                         account=account.id)
                self._shown.pop(account.id, None)
                result.error, result.status = ACCOUNT_DELETED, "error"
                result.finished_at = self.now()
                return result
            log.failure("sync of account {account} failed", account=account.id)
            result.error = INTERNAL_ERROR
        self._shown.pop(account.id, None)
        result.finished_at = self.now()
        problems = result.problems()
        result.status = "error" if problems else "success"
        status: dict[str, Any] = {
            "sync_status": result.status, "sync_error": problems, "progress_folder": None,
        }
        if result.ok:
            status["last_sync"] = result.finished_at
        # A cancelled sync (a stop) tells no outcome, as before; its batches' are recorded.
        held = await self.accounts.set_status(
            account.id, holder=self.node_id,
            also=None if cancelled else self._record_outcome(result), **status)
        if cancelled:
            raise defer.CancelledError()
        if not held and await self._deleted(account.id):
            log.info("account {account} was deleted during its sync", account=account.id)
            return result
        if not held:
            # This node stalled past its lease and another took the sync over: that one's
            # outcome is recorded and told (no second sync.completed for one sync).
            log.warn("account {account}: another node took its sync over; this sync's "
                     "outcome is dropped", account=account.id)
            return result
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception:
                log.failure("sync listener failed")
        return result

    def thd_settle_interrupted(self, conn: Connection, now: float, running: list[int]) -> int:
        """Blocking: show as failed the syncs that show running but run nowhere (a process
        killed mid-sync: `accounts.thd_settle_interrupted`), each one's outcome recorded in
        the same transaction, as a sync's own is (a client told of its e-mails is told it
        ended: its sync.completed, status "error", with what it had stored); how many."""
        settled = thd_settle_interrupted(conn, self.node_id, now, running, INTERRUPTED)
        finished = self.now()
        for account_id, user_id, started_at in settled:
            result = SyncResult(account_id=account_id, user_id=user_id,
                                started_at=started_at or finished, finished_at=finished,
                                status="error", error=INTERRUPTED)
            record = self._record_outcome(result)
            if record is None:
                break
            result.new_messages = thd_created_since(conn, account_id, result.started_at)
            record(conn)
        return len(settled)

    async def _deleted(self, account_id: int) -> bool:
        """Whether the account is gone (deleted by its owner while it synced); False when
        the store cannot say."""
        try:
            await self.accounts.owner_of(account_id)
        except AccountNotFound:
            return True
        except Exception:
            return False
        return False

    def _recording(
        self, tell: Callable[Concatenate[SyncRecorder, float, _P], None]
    ) -> Callable[_P, None] | None:
        """What a sync's transaction runs to tell each of the recorders (`tell`: one, the
        moment, and what the transaction passes); None when there are none."""
        if not self.recorders:
            return None
        recorders, now = list(self.recorders), self.reactor.seconds()

        def record(*args: _P.args, **kwargs: _P.kwargs) -> None:
            for recorder in recorders:
                tell(recorder, now, *args, **kwargs)

        return record

    def _record(self, where: Location) -> Callable[[Connection, StoreResult], None] | None:
        """What a batch's transaction runs after storing it: the recorders."""

        def batch(recorder: SyncRecorder, now: float, conn: Connection,
                  stored: StoreResult) -> None:
            recorder.thd_batch(conn, where, stored, now)

        return self._recording(batch)

    def _record_outcome(self, result: SyncResult) -> Callable[[Connection], None] | None:
        """What the transaction recording a sync's outcome runs: the recorders."""

        def outcome(recorder: SyncRecorder, now: float, conn: Connection) -> None:
            recorder.thd_outcome(conn, result, now)

        return self._recording(outcome)

    def _spec(self, account: Account, password: str) -> ServerSpec:
        return ServerSpec(
            host=account.host, port=account.port, use_ssl=account.use_ssl,
            start_tls=account.start_tls, allow_cleartext=account.allow_cleartext,
            username=account.username, password=password,
        )

    def _creator(self, account: Account) -> IOpenSSLClientConnectionCreator:
        return self.tls_factory(
            account.host, ca_pem=account.tls_ca_pem, fingerprint=account.tls_fingerprint
        )

    async def _progress(self, account: Account, folder: str | None, done: int,
                        total: int, *, now: bool = False) -> None:
        """Show the sync's progress: at most every PROGRESS_INTERVAL seconds (a write
        transaction each), unless `now`."""
        at = self.reactor.seconds()
        if not now and at - self._shown.get(account.id, -PROGRESS_INTERVAL) < PROGRESS_INTERVAL:
            return
        self._shown[account.id] = at
        await self.accounts.set_status(
            account.id, progress_folder=folder, progress_done=done, progress_total=total
        )

    # -- IMAP ----------------------------------------------------------------------------

    async def _open_imap(self, account: Account, password: str) -> IMAPClient:
        s = self.settings
        session = await open_session(
            self.reactor, self._spec(account, password), self._creator(account),
            max_literal=s.max_message_bytes, connect_timeout=s.connect_timeout,
            idle_timeout=s.idle_timeout, command_timeout=s.command_timeout,
            policy=s.address_policy(),
        )
        if "QRESYNC" in session.capabilities and "ENABLE" in session.capabilities:
            await session.enable(b"QRESYNC")
            session.qresync_enabled = True  # type: ignore[attr-defined]
        return session

    async def _sync_imap(self, account: Account, password: str, result: SyncResult) -> None:
        session = await self._open_imap(account, password)
        progress = [0, 0]
        try:
            # The folders synced before are opened before LIST, which then finds the new
            # ones and those gone. Dovecot rescans every Maildir opened after a LIST in the
            # same session (0.4-0.9 s per 20,000 messages), so a resync with nothing new would
            # cost that for each folder.
            known = {state.name: state for state in await self.db.read(
                "fetch_known_folders", thd_known_folders, account.id)}
            first, _ = choose_folders(account, [
                RemoteFolder(state.name, state.delimiter,
                             frozenset({state.special_use.upper()} if state.special_use else ()))
                for state in known.values()
            ])
            opened: set[str] = set()
            for folder in first:
                state = known[folder.name]
                try:
                    info = await self._open_folder(session, account, state, progress)
                except FetchError:
                    # Gone or changed since the last sync: LIST below decides.
                    session = await self._alive(session, account, password)
                    continue
                opened.add(folder.name)
                session = await self._sync_guarded(session, account, password, state, info,
                                                   result, progress)

            listing = await session.list_all()
            remote = listing.folders
            for shown, why in listing.refused:
                result.folders[shown] = FolderResult(error=why)
            chosen, missing = choose_folders(account, remote)
            states = await self.db.run(
                "upsert_fetch_folders", thd_upsert_folders, account.id,
                [(f.name, f.delimiter, f.special_use) for f in remote],
            )
            for name in missing:
                result.folders[name] = FolderResult(error="folder not found on the server")
            for folder in chosen:
                if folder.name not in opened:
                    session = await self._sync_guarded(
                        session, account, password, states[folder.name], None, result,
                        progress, with_children="\\HASCHILDREN" in folder.flags)
        finally:
            await session.close_session()

    async def _sync_guarded(
        self,
        session: IMAPClient,
        account: Account,
        password: str,
        state: FolderState,
        info: SelectInfo | None,
        result: SyncResult,
        progress: list[int],
        *,
        with_children: bool = False,
    ) -> IMAPClient:
        """Sync one folder (EXAMINEd unless `info` says it is open), its failure recorded as
        the folder's error; the session to go on with (a new one when this one died).
        `with_children`: the LIST just run named it \\HasChildren, so a plain NO to its
        EXAMINE is Dovecot's for a folder deleted with subfolders (passed over; `unsure`
        when an earlier sync opened it, for it may also be a refusal for a moment)."""
        folder_result = result.folders.setdefault(state.name, FolderResult())
        oversized = _Oversized()
        while True:
            try:
                if info is None:
                    try:
                        info = await self._open_folder(session, account, state, progress)
                    except FetchError as e:
                        # Any other refusal stays the folder's error: passed over, what
                        # it holds would be left out of the backup without a word (a sync
                        # passing it over is a success, and a migrate after it ends done
                        # without its new mail).
                        if not refused_as_deleted(session, e, state.name, with_children):
                            raise
                        # Listed but holding no mail (Dovecot lists a folder deleted while
                        # it had subfolders and answers its EXAMINE NO): passed over as a
                        # \Noselect one is.
                        log.info("account {account}: folder {folder!r} is listed but not "
                                 "to be opened ({e}); passed over", account=account.id,
                                 folder=state.name, e=e)
                        if state.uidvalidity is not None and not refusal_codes(e):
                            folder_result.unsure = str(e)
                        await self.db.run("set_fetch_folder_error", thd_set_folder_error,
                                          state.id, None)
                        return session
                await self._sync_imap_folder(session, account, state, info, result,
                                             folder_result, progress, oversized)
            except _BodyTooLarge as e:
                if oversized.restarts >= MAX_OVERSIZED_RESTARTS or e.uid in oversized.skipped or (
                    e.uid is None and oversized.one_by_one
                ):
                    await self._folder_failed(state, folder_result, e.error)
                else:
                    # Skipped as the size check skips an honest size; what was stored stays,
                    # and the folder starts again (in a new session if this one died).
                    oversized.restarts += 1
                    if e.uid is None:
                        oversized.one_by_one = True
                    else:
                        oversized.skipped[e.uid] = f"UID {e.uid}: {e.error}; not fetched"
                    info = None
                    session = await self._alive(session, account, password)
                    continue
            except FetchError as e:
                await self._folder_failed(state, folder_result, e)
            else:
                return session
            return await self._alive(session, account, password)

    async def _folder_failed(self, state: FolderState, folder_result: FolderResult,
                             error: FetchError) -> None:
        folder_result.error = str(error)
        await self.db.run("set_fetch_folder_error", thd_set_folder_error, state.id, str(error))

    async def _alive(self, session: IMAPClient, account: Account,
                     password: str) -> IMAPClient:
        """`session`, or a new one when it died (with the folder it failed on). A server that
        let a command wait past the command deadline gets no new session: the sync stops
        (each folder would hold the sync, and its slot, as long again)."""
        if session.error is None:
            return session
        session.abort()
        if isinstance(session.error, CommandTimeout):
            raise CommandTimeout("the sync stopped at a command the server left unanswered; "
                                 "the other folders are synced next time")
        return await self._open_imap(account, password)

    def _resync_modes(self, session: IMAPClient,
                      state: FolderState) -> tuple[bool, tuple[int, int] | None]:
        """(CONDSTORE, QRESYNC (uidvalidity, modseq) or None) for EXAMINE of `state`."""
        caps = session.capabilities
        condstore = "CONDSTORE" in caps or "QRESYNC" in caps
        qresync = None
        if getattr(session, "qresync_enabled", False) and state.uidvalidity and (
            state.highestmodseq
        ):
            qresync = (state.uidvalidity, state.highestmodseq)
        return condstore, qresync

    async def _open_folder(self, session: IMAPClient, account: Account, state: FolderState,
                           progress: list[int]) -> SelectInfo:
        """Show the folder as the one in progress and EXAMINE it."""
        await self._progress(account, state.name, progress[0], progress[1])
        condstore, qresync = self._resync_modes(session, state)
        held = 0
        if qresync is not None:  # VANISHED can only name UIDs we hold
            held = await self.db.read("fetch_max_uid", thd_max_uid, state.id, qresync[0])
        return await session.examine(state.name, condstore=condstore, qresync=qresync,
                                     held=held)

    async def _sync_imap_folder(
        self,
        session: IMAPClient,
        account: Account,
        state: FolderState,
        info: SelectInfo,
        result: SyncResult,
        folder_result: FolderResult,
        progress: list[int],
        oversized: _Oversized,
    ) -> None:
        s = self.settings
        condstore, qresync = self._resync_modes(session, state)
        uidvalidity = info.uidvalidity
        assert uidvalidity is not None
        rescan = state.uidvalidity is not None and state.uidvalidity != uidvalidity
        now = self.now()

        # What the last sync could not fetch is tried again (the search below looks only
        # above the highest UID held), and the folder keeps its error while one is left.
        retry = state.skipped_uids if state.uidvalidity == uidvalidity else ()
        unchanged = (
            not rescan and not retry and info.highestmodseq is not None
            and state.highestmodseq == info.highestmodseq
            and state.uidnext is not None and state.uidnext == info.uidnext
        )
        if unchanged:
            await self.db.run(
                "save_fetch_folder_state", thd_save_folder_state, state.id,
                uidvalidity=uidvalidity, uidnext=info.uidnext,
                highestmodseq=info.highestmodseq, now=now, error=None,
            )
            return

        # The search resumes above the highest UID held below the server's UIDNEXT: a UID
        # at or above it, which no message has yet (RFC 3501 2.3.1.1), that a server listed
        # all the same is stored, but hid every message numbered below it from then on.
        max_uid = await self.db.read("fetch_max_uid", thd_max_uid, state.id, uidvalidity,
                                     info.uidnext)
        if not rescan:
            # The flags QRESYNC said changed, of the UIDs we hold (those of others would
            # change no row, and be written all the same).
            changes = await self._held_only(state.id, uidvalidity, info.changed_flags)
            # A HIGHESTMODSEQ lower than the one we saw (RFC 7162 3.1.2.1 says never while
            # UIDVALIDITY stays; a server restored from a backup of its own): the changes
            # since ours were not asked for, and ours may never come again: every flag.
            went_back = info.highestmodseq is not None and state.highestmodseq is not None \
                and info.highestmodseq < state.highestmodseq
            # QRESYNC told more changes than an EXAMINE keeps: they are asked for too.
            if max_uid and (went_back or info.flags_beyond or (
                qresync is None and condstore and state.highestmodseq
                and info.highestmodseq != state.highestmodseq
            )):
                changes.update(await self._held_flags(
                    session, state.id, uidvalidity, max_uid,
                    b"" if went_back else b"CHANGEDSINCE %d" % (state.highestmodseq or 0)))
            if changes:
                folder_result.flags_updated = await self.db.run(
                    "update_fetch_flags", thd_update_flags, state.id, uidvalidity, changes, now
                )
            if info.vanished:
                await self.db.run("mark_fetch_gone", thd_mark_gone, state.id, uidvalidity,
                                  info.vanished)

        uids = await self._wanted_uids(session, account, info.exists, uidvalidity, state,
                                       max_uid, rescan, now, retry, uidnext=info.uidnext)
        skipped: dict[int, str] = {}  # by UID
        sizes: dict[int, int] = {}
        # Pipelined, _SIZE_CHUNK UIDs a command, each cut to lines of at most _LIST_BYTES
        # (2,000 sparse UIDs, left after deletions, made a line of ~22 KB).
        asked = [session.uid_fetch(line, b"UID RFC822.SIZE")
                 for i in range(0, len(uids), _SIZE_CHUNK)
                 for line in _by_line(sorted(uids[i : i + _SIZE_CHUNK]), _LIST_BYTES)]
        try:
            for answer in asked:
                for item in await answer:
                    if item.uid is not None:
                        sizes[item.uid] = item.size or 0
        finally:
            for answer in asked:
                _swallow(answer)
        todo = []
        for uid in uids:
            # A UID the size fetch left out is fetched all the same (expunged since the
            # search, its body will be missing too; else the literal's bound applies).
            if uid in oversized.skipped:
                skipped[uid] = oversized.skipped[uid]
                continue
            if sizes.get(uid, 0) > s.max_message_bytes:
                skipped[uid] = (f"UID {uid} is {sizes[uid]} bytes, over the limit of "
                                f"{s.max_message_bytes}; not fetched")
                continue
            todo.append(uid)
        noted = len(skipped)
        if skipped or (state.uidvalidity is None and todo):
            # Before any batch: a first sync cut short leaves the UIDVALIDITY it stored
            # under, so that the next one rescans if the server changed it meanwhile.
            await self._note_skipped(state, uidvalidity, skipped)
        if oversized.progress is None:
            oversized.progress = (progress[0], progress[1])
        done, total = oversized.progress
        # A restart counts the folder's messages once: those stored, and those still to fetch.
        progress[1] = total + (progress[0] - done) + len(todo)
        await self._progress(account, state.name, progress[0], progress[1])

        where = Location(user_id=account.user_id, account_id=account.id, folder_id=state.id,
                         folder=state.name, uidvalidity=uidvalidity)
        pending: deque[tuple[list[int], defer.Deferred[_Parsed]]] = deque()
        queue = deque(batches(todo, sizes, 1 if oversized.one_by_one else s.batch_messages,
                              s.batch_bytes))
        try:
            while queue or pending:
                while queue and len(pending) < s.pipeline_depth:
                    batch = queue.popleft()
                    pending.append((batch, self._fetch_and_parse(session, batch)))
                batch, d = pending.popleft()
                try:
                    fetched, parsed = await d
                except LiteralTooLarge as e:
                    # Which message: the reply named it, or the batch holds only one.
                    over = e.uid if e.uid in todo else batch[0] if len(batch) == 1 else None
                    raise _BodyTooLarge(over, e) from None
                if queue:  # the next fetch goes out before this batch is stored
                    nxt = queue.popleft()
                    pending.append((nxt, self._fetch_and_parse(session, nxt)))
                got = {f.uid for f in fetched}
                missing = [uid for uid in batch if uid not in got]
                if missing:
                    more, more_parsed = await self._missing(session, missing, skipped)
                    fetched, parsed = [*fetched, *more], [*parsed, *more_parsed]
                    if len(skipped) > noted:  # noted before this batch's higher UIDs
                        noted = len(skipped)
                        await self._note_skipped(state, uidvalidity, skipped)
                # Durable once the folder state is saved after the last batch (a FULL
                # commit fsyncs the WAL with every batch before it).
                stored = await self.store.store_batch(where, fetched, rescan=rescan,
                                                      parsed=parsed, relaxed=True,
                                                      also=self._record(where))
                folder_result.new += len(stored.created)
                folder_result.relinked += stored.relinked
                result.new_messages += len(stored.created)
                result.relinked += stored.relinked
                result.new_message_ids.extend(stored.created)
                result.thread_ids.update(stored.thread_ids)
                progress[0] += len(batch)
                await self._progress(account, state.name, progress[0], progress[1])
        finally:
            for _batch, d in pending:
                _swallow(d)
        await self._progress(account, state.name, progress[0], progress[1], now=True)
        folder_result.skipped = list(skipped.values())
        error = "; ".join(skipped.values()) or None
        if error:
            folder_result.error = error
        if rescan and account.sync_limit_type == "all" and not skipped:
            # Copies under the old UIDVALIDITY that matched nothing are gone from the
            # server; they stay ours, marked as such.
            await self.db.run("mark_fetch_stale", thd_mark_stale, state.id, uidvalidity)
        await self.db.run(
            "save_fetch_folder_state", thd_save_folder_state, state.id,
            uidvalidity=uidvalidity, uidnext=info.uidnext, highestmodseq=info.highestmodseq,
            now=self.now(), error=error, skipped_uids=list(skipped),
        )

    async def _held_flags(self, session: IMAPClient, folder_id: int, uidvalidity: int,
                          max_uid: int, modifiers: bytes) -> dict[int, tuple[str, ...]]:
        """The flags the server gives the messages we hold of the folder up to `max_uid`:
        those changed since a mod-sequence when `modifiers` say CHANGEDSINCE, else all.

        The changes are asked by one UID FETCH of the UIDs from the lowest held to
        `max_uid` (the server answers for the messages changed alone): its replies naming
        a UID outside them are not kept, those kept are bounded by the UIDs held (two a
        UID, and ARRIVING for messages among them we do not hold: skipped, or outside the
        account's limits), not by the folder's EXISTS, and only the flags of UIDs held are
        taken. Asked by lists of the UIDs held, the changes of a folder of 300,000 took
        150 commands and every UID held read from the store, each sync with new mail.
        Every flag (a HIGHESTMODSEQ gone back: each message held answers), and the changes
        when they take more replies than that, are asked by lists of the UIDs held, read a
        page at a time, each list a line of at most _LIST_BYTES: a list takes at most two
        replies a UID, and a reply naming a UID we do not hold is not kept."""
        if modifiers:
            count, lowest = await self.db.read("fetch_held_span", thd_held_span, folder_id,
                                               uidvalidity, max_uid)
            if not count:
                return {}
            span = set_range(lowest, max_uid)
            try:
                changed = await session.uid_fetch(span, b"UID FLAGS", modifiers,
                                                  max_items=2 * count + ARRIVING,
                                                  within=(lowest, max_uid))
            except TooManyReplies:
                # Changes of more messages we do not hold among them (or a server flooding
                # the command): they are asked by the lists, whose replies bound themselves.
                return await self._held_lists(session, folder_id, uidvalidity, max_uid,
                                              modifiers)
            return await self._held_only(folder_id, uidvalidity, {
                item.uid: item.flags for item in changed
                if item.uid is not None and item.flags is not None})
        return await self._held_lists(session, folder_id, uidvalidity, max_uid, modifiers)

    async def _held_lists(self, session: IMAPClient, folder_id: int, uidvalidity: int,
                          max_uid: int, modifiers: bytes) -> dict[int, tuple[str, ...]]:
        """The flags the server gives the UIDs we hold up to `max_uid`, asked by lists of
        them (see _held_flags)."""
        changes: dict[int, tuple[str, ...]] = {}
        after = 0
        while True:
            page = await self.db.read("fetch_held_uids", thd_held_uids, folder_id,
                                      uidvalidity, after, max_uid, _HELD_PAGE)
            if not page:
                return changes
            held = set(page)
            asked = [session.uid_fetch(uids, b"UID FLAGS", modifiers)
                     for uids in _by_line(page, _LIST_BYTES)]  # pipelined
            try:
                for answer in asked:
                    changes.update((item.uid, item.flags) for item in await answer
                                   if item.uid in held and item.flags is not None)
            finally:
                for answer in asked:
                    _swallow(answer)
            if len(page) < _HELD_PAGE:
                return changes
            after = page[-1]

    async def _held_only(self, folder_id: int, uidvalidity: int,
                         flags: dict[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
        """`flags` of the UIDs we hold of the folder (one read, its lists chunked)."""
        if not flags:
            return {}
        held = await self.db.read("fetch_stored_uids", thd_stored_uids, folder_id,
                                  uidvalidity, list(flags))
        return {uid: values for uid, values in flags.items() if uid in held}

    async def _note_skipped(self, state: FolderState, uidvalidity: int,
                            skipped: dict[int, str]) -> None:
        """Keep the UIDs skipped so far on the folder before any higher one is committed:
        the next sync searches only above the highest UID held, so a skip this sync does
        not live to record at its end would never be tried again nor told. A folder first
        opened takes `uidvalidity` with them (none skipped or not): copies of a first sync
        cut short are then rescanned, not stored twice, when the server changes it."""
        await self.db.run("note_fetch_skipped", thd_note_skipped, state.id, uidvalidity,
                          sorted(skipped))

    async def _wanted_uids(
        self, session: IMAPClient, account: Account, exists: int, uidvalidity: int,
        state: FolderState, max_uid: int, rescan: bool, now: datetime.datetime,
        retry: Sequence[int] = (), uidnext: int | None = None,
    ) -> list[int]:
        """UIDs on the server, within the account's limits, that we do not hold yet, and
        those the last sync skipped (`retry`: if gone meanwhile, their FETCH finds them
        gone). `max_uid` is the highest held below `uidnext`: those held at or above it
        are looked up."""
        again = set(retry) - await self.db.read(
            "fetch_stored_uids", thd_stored_uids, state.id, uidvalidity, retry
        ) if retry else set()
        if exists == 0:
            return sorted(again)
        criteria: list[bytes] = []
        if account.sync_limit_type == "last_n":
            first = max(1, exists - account.sync_limit_value + 1)
            criteria.append(b"%d:*" % first)
        since = limit_since(account, now)
        if since is not None:
            criteria.append(b"SINCE " + imap_date(since).encode("ascii"))
        # The folder holds EXISTS messages, and a few more may arrive meanwhile.
        bound = exists + ARRIVING
        if rescan or max_uid == 0:
            if not criteria:
                criteria.append(b"ALL")
            found = await session.uid_search(b" ".join(criteria), max_uids=bound)
            held = await self.db.read("fetch_stored_uids", thd_stored_uids, state.id,
                                      uidvalidity)
            return _with(again, [u for u in found if u not in held])
        criteria.append(b"UID %d:*" % (max_uid + 1))
        found = [u for u in await session.uid_search(b" ".join(criteria), max_uids=bound)
                 if u > max_uid]
        beyond = [u for u in found if uidnext is not None and u >= uidnext]
        if beyond:  # arrived since EXAMINE, or listed by a server beyond its own UIDNEXT
            held = await self.db.read("fetch_stored_uids", thd_stored_uids, state.id,
                                      uidvalidity, beyond)
            found = [u for u in found if u not in held]
        return _with(again, found)

    async def _missing(self, session: IMAPClient, missing: list[int],
                       skipped: dict[int, str]) -> _Parsed:
        """The messages of a batch whose FETCH reply held no body: those expunged since the
        search are dropped; those still in the folder are fetched once more, before the
        batch is stored (the next sync looks only above the highest UID held, so a message
        passed over here would never be fetched). One whose body is missing again is
        skipped with an error on the folder."""
        present = set(await session.uid_search(b"UID " + compress_set(missing)))
        again = [uid for uid in missing if uid in present]
        if not again:
            return [], []
        try:
            fetched, parsed = await self._fetch_and_parse(session, again)
        except LiteralTooLarge as e:
            over = e.uid if e.uid in again else again[0] if len(again) == 1 else None
            raise _BodyTooLarge(over, e) from None
        got = {f.uid for f in fetched}
        skipped.update((uid, f"UID {uid}: {session.host} sent no body for it, twice; not "
                             "fetched") for uid in again if uid not in got)
        return fetched, parsed

    def _fetch_and_parse(self, session: IMAPClient, batch: list[int]) -> defer.Deferred[_Parsed]:
        """Fetch a batch (queued on the wire now) and parse it on the CPU pool as soon as it
        arrives, whatever the store is doing meanwhile."""

        async def parse(items: list[FetchItem]) -> _Parsed:
            fetched = self._fetched(batch, items)
            return fetched, await self._parse([f.raw for f in fetched])

        return session.uid_fetch(batch, _BODY_ITEMS).addCallback(
            lambda items: defer.Deferred.fromCoroutine(parse(items))
        )

    def _parse(self, raws: list[bytes]) -> defer.Deferred[list[ParsedMessage]]:
        """Parse a fetched batch; a big one in a CPU worker process: parsing holds Python's
        lock throughout, and in the daemon it kept the reactor (reading the next batches)
        and the store thread (writing the last) waiting for it. A few messages (the usual
        periodic sync) are parsed on a thread, without starting the workers for them."""
        if len(raws) < _PROCESS_PARSE_MIN:
            return defer.Deferred.fromCoroutine(self.store.parse(raws))
        return self.store.cpu.run_in_process(parse_messages, raws, self.store.limits)

    def _fetched(self, batch: list[int], items: list[FetchItem]) -> list[FetchedMessage]:
        by_uid = {i.uid: i for i in items if i.uid is not None and i.body is not None}
        out = []
        for uid in batch:
            item = by_uid.get(uid)
            if item is None or item.body is None:
                continue  # expunged since the search, or left out: see _missing
            if len(item.body) > self.settings.max_message_bytes:
                raise _BodyTooLarge(uid, LiteralTooLarge(
                    f"its body came back over the limit of {self.settings.max_message_bytes} "
                    "bytes"))
            out.append(FetchedMessage(raw=item.body, uid=uid, flags=item.flags or (),
                                      internal_date=item.internal_date))
        return out

    # -- POP3 ----------------------------------------------------------------------------

    async def _sync_pop(self, account: Account, password: str, result: SyncResult) -> None:
        session = await self._open_pop(account, password)
        folder_result = result.folders.setdefault("INBOX", FolderResult())
        try:
            state = await self.db.run("fetch_pop_folder", thd_folder, account.id, "INBOX")
            passed: set[str] = set()  # UIDLs skipped as over the limit in this sync
            reopened = 0
            # A message that ran far over the limit (its LIST size lied), or whose reply went
            # on after its end, ends the session; the others are fetched in a new one, a few
            # times a sync at most.
            while not await self._sync_pop_pass(session, account, state, result,
                                                folder_result, passed):
                if reopened == POP_REOPENS:
                    raise ProtocolFailed(
                        f"{reopened + 1} messages ran far over the size limit or went on "
                        "after their end, each ending the session; the others are fetched "
                        "next time"
                    )
                reopened += 1
                session = await self._open_pop(account, password)
            if folder_result.skipped:
                folder_result.error = "; ".join(folder_result.skipped)
            await self.db.run(
                "save_fetch_folder_state", thd_save_folder_state, state.id,
                uidvalidity=None, uidnext=None, highestmodseq=None, now=self.now(),
                error=folder_result.error,
            )
        except FetchError as e:
            folder_result.error = "; ".join([*folder_result.skipped, str(e)])
        except defer.CancelledError:
            session.abort()  # stopping: no QUIT to wait for
            raise
        finally:
            await session.close_session()

    async def _open_pop(self, account: Account, password: str) -> POP3Session:
        s = self.settings
        return await open_pop3(
            self.reactor, self._spec(account, password), self._creator(account),
            max_message=s.max_message_bytes, connect_timeout=s.connect_timeout,
            idle_timeout=s.idle_timeout, command_timeout=s.command_timeout,
            policy=s.address_policy(),
        )

    async def _sync_pop_pass(
        self, session: POP3Session, account: Account, state: FolderState, result: SyncResult,
        folder_result: FolderResult, passed: set[str],
    ) -> bool:
        """Fetch the new messages of the mailbox but those in `passed`, adding the ones
        skipped as over the limit; False when a message over the limit ended the session
        (what was fetched before it is stored)."""
        s = self.settings
        found = await session.listing()
        if found.unlisted:
            first, more = found.unlisted[0], len(found.unlisted) - 1
            note = f"message {first}" + (f" and {more} more" if more else "")
            note += " without a UIDL; not fetched"
            if note not in folder_result.skipped:
                folder_result.skipped.append(note)
        listing = found.messages
        held = await self.db.read("fetch_stored_uidls", thd_stored_uidls, state.id)
        # A UIDL held with another LIST size is another message: a server may give a new
        # message the UIDL of one deleted (fetched; our copy of the other is kept).
        new = [(i, u, size) for i, u, size in listing if u not in passed and (
            u not in held or pop_size_changed(held[u], size))]
        unsized = {u: size for _i, u, size in listing
                   if size is not None and u in held and held[u] is None}
        if unsized:
            await self.db.run("note_fetch_pop_sizes", thd_note_pop_sizes, state.id, unsized)
        if account.sync_limit_type == "last_n":
            keep = {u for _, u, _ in listing[-account.sync_limit_value:]}
            new = [(i, u, size) for i, u, size in new if u in keep]
        since = limit_since(account, self.now())
        todo = []
        for index, uidl, size in new:
            # A size LIST left out is unknown: RETR stops at the limit anyway.
            if size is not None and size > s.max_message_bytes:
                folder_result.skipped.append(
                    f"message {uidl} is {size} bytes, over the limit; not fetched"
                )
                passed.add(uidl)
                continue
            todo.append((index, uidl, size))
        if since is not None and todo:
            dated = await self._pop_dated(session, todo, since)
            if dated is not None:  # else the server has no TOP: RETR, then the Date
                todo, since = dated, None
        await self._progress(account, "INBOX", 0, len(todo))
        where = Location(user_id=account.user_id, account_id=account.id,
                         folder_id=state.id, folder="INBOX")
        # A batch is bounded in count and in bytes, as an IMAP one: by the size LIST gives
        # before a message is fetched, by the bytes fetched after (LIST may lie).
        fetched: list[FetchedMessage] = []
        batch_bytes = 0
        done = 0

        async def store(*, confirm: bool = True) -> None:
            nonlocal fetched, batch_bytes
            if not fetched:
                return
            if confirm:  # the last message's reply ended where the server said (OutOfStep)
                await session.confirm()
            batch, fetched, batch_bytes = fetched, [], 0
            if since is not None:
                batch = await self._within(batch, since)
            stored = await self.store.store_batch(where, batch, relaxed=True,
                                                  also=self._record(where))
            folder_result.new += len(stored.created)
            result.new_messages += len(stored.created)
            result.new_message_ids.extend(stored.created)
            result.thread_ids.update(stored.thread_ids)

        try:
            for index, uidl, size in todo:
                if fetched and (len(fetched) >= s.batch_messages
                                or batch_bytes + (size or 0) > s.batch_bytes):
                    await store()
                    await self._progress(account, "INBOX", done, len(todo))
                try:
                    raw = await session.retrieve_bytes(index)
                except MessageTooLarge:
                    listed = "no size" if size is None else f"{size} bytes"
                    folder_result.skipped.append(
                        f"message {uidl} came back over the limit of {s.max_message_bytes} "
                        f"bytes (LIST said {listed}); not fetched"
                    )
                    passed.add(uidl)
                    if session.error is not None:
                        await store(confirm=False)  # this RETR's +OK confirmed the last
                        return False
                    done += 1
                    continue
                fetched.append(FetchedMessage(raw=raw, uidl=uidl, listed_size=size))
                batch_bytes += len(raw)
                done += 1
                if batch_bytes >= s.batch_bytes:
                    await store()
                    await self._progress(account, "INBOX", done, len(todo))
            await store()
        except OutOfStep as e:
            # A message whose RETR reply went on after its end is cut: skipped, and the
            # others are fetched in a new session (this one is out of step).
            cut = next((u for i, u, _size in todo if i == e.index), None)
            if cut is None:
                await store(confirm=False)
                raise
            fetched = [f for f in fetched if f.uidl != cut]
            folder_result.skipped.append(f"message {cut}: {e}; not stored")
            passed.add(cut)
            await store(confirm=False)
            return False
        except FetchError:
            # The session failed (dropped, timed out, refused a RETR): what was fetched
            # before is stored, so that the next sync does not fetch it again.
            await store(confirm=False)
            raise
        if todo:
            await self._progress(account, "INBOX", done, len(todo), now=True)
        return True

    async def _pop_dated(
        self, session: POP3Session, todo: list[tuple[int, str, int | None]],
        since: datetime.date,
    ) -> list[tuple[int, str, int | None]] | None:
        """The messages of `todo` whose Date, read from the header alone (TOP n 0), is on or
        after `since` or unknown; None when the server refuses TOP. Fetching every message
        to read its Date fetched each one out of range again at every sync."""
        kept = []
        for start in range(0, len(todo), _TOP_CHUNK):
            chunk = todo[start : start + _TOP_CHUNK]
            headers = []
            for index, _uidl, _size in chunk:
                try:
                    headers.append(await session.header(index))
                except MessageTooLarge:
                    if session.error is not None:
                        raise
                    headers.append(b"")  # no Date known: fetched
                except ProtocolFailed:
                    if session.error is not None:
                        raise
                    return None  # -ERR: TOP is optional (RFC 1939)
            parsed = await self._parse(headers)
            kept += [item for item, p in zip(chunk, parsed, strict=True) if _since(p, since)]
        return kept

    async def _within(self, fetched: list[FetchedMessage],
                      since: datetime.date) -> list[FetchedMessage]:
        """POP3 has no SEARCH: keep messages whose Date is on or after `since`."""
        parsed = await self._parse([f.raw for f in fetched])
        return [f for f, p in zip(fetched, parsed, strict=True) if _since(p, since)]


def _since(parsed: ParsedMessage, since: datetime.date) -> bool:
    """Whether a message is dated on or after `since` (or not dated)."""
    first = datetime.datetime(since.year, since.month, since.day, tzinfo=datetime.UTC)
    return parsed.date is None or parsed.date >= first

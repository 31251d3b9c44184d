"""Copy backed-up mail into an IMAP mailbox exactly once: the body of migrate and restore jobs.

A migrate first brings the account's backup up to date (a sync, once per job; when it fails,
what is backed up is copied all the same, then the job is retried from the sync by the
runner's rules, its reason saying why, and ends failed if it never succeeds; a sync that
passed over a folder an earlier sync opened, listed with subfolders and refused a plain NO
(Dovecot's folder deleted while it had subfolders, or a refusal for a moment), counts as one
that failed, once: the next run's sync takes such a folder as deleted), then copies
every backed-up message into the destination, folder by folder (the folder is made there when
missing, named as in the backup, hierarchy mapped to the destination's separator), with its
flags and INTERNALDATE. A restore (`mailcore.fetch.restore`) plans which messages are no
longer in the account and copies those back the same way.

Exactly once, per (job, backed-up message), in `mailbox_job_items`:

1. Before a batch is sent, its messages are recorded `inflight` (committed), in the same
   transaction that checks the job is still running and this node still holds its lease.
2. The batch goes out as pipelined APPENDs. Each message the server answered OK is recorded
   `done` (with the APPENDUID where the server has UIDPLUS) as soon as the batch's answers
   are in; a message it refused stays `inflight` and the job retries or fails.
3. On every (re)start, before anything is appended to a folder, the messages left `inflight`
   (the window between an OK and its record, e.g. a crash) are looked for at the destination
   (`MailboxWriter.find`: Message-ID, else size, date and a body hash); so is every message
   whose size and INTERNALDATE match one the destination already holds that no item of this
   job accounts for. A message found is recorded `present` (or `done` if it was in flight)
   and is not appended again. Past MAX_LOOKALIKES look-alikes compared without a Message-ID,
   a message is taken as not there (a warning): sent again, at worst a duplicate; past
   MAX_LOOKALIKE_FETCHES bodies compared in the folder that were not it (a match is not
   counted), the rest of the run takes every message with look-alikes there so without
   comparing (the writer, one a run, keeps the count per folder; one warning a folder).
4. Each record holds the folder's UIDVALIDITY at the time (an APPENDUID naming another is
   not taken: the message is recorded without a UID). On a restart, a folder a run copied
   into that is gone (no longer listed; or still listed, \\Noselect or not, as one deleted
   while it had subfolders, and its EXAMINE refused other than for now: NO [NONEXISTENT],
   Dovecot's plain NO) or has another UIDVALIDITY (deleted and made again) is not the one
   recorded: it is made if needed, and its recorded messages are looked for as in 3 and
   copied again if missing, at worst a duplicate, never a message skipped. Each folder is
   EXAMINEd once a run for this (and once more after it is made).

So a message counts as copied only after the server's OK, and never twice, whatever the
moment the daemon dies. Transient failures (connection lost, timeouts, an APPEND answered NO
that the server says may succeed later) put the job back in the queue with a backoff; a
refused message, a refused login or a certificate that does not verify fail it with a reason.
A folder the destination will never take (its CREATE refused with a permanent code, e.g.
CANNOT; or, listed but not to be opened, refused at all) is passed over: the other folders
are copied, then the job fails naming it.

Memory is bounded per message: a batch holds messages up to `JobSettings.stream_bytes`
(1 MiB) read whole; a larger message is a batch alone, APPENDed as a `Streamed` source that
reads its stored bytes a chunk at a time (`mailcore.messages.store.raw_chunks`), with the
size announced from `message_blobs.size`.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select, update
from twisted.internet import defer
from twisted.logger import Logger

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.engine import BUSY, SyncEngine
from mailcore.fetch.errors import (
    AuthFailed,
    CleartextRefused,
    ConnectFailed,
    FetchError,
    FetchTimeout,
    ProtocolFailed,
    TLSFailed,
)
from mailcore.fetch.imap import (
    ARRIVING,
    LIST_SLACK,
    MAX_EXISTS,
    FetchItem,
    IMAPClient,
    ServerSpec,
    examined_exists,
    number,
    open_session,
)
from mailcore.fetch.jobs import (
    Job,
    JobFailed,
    JobMetrics,
    JobRunner,
    JobSettings,
    TransientJobError,
)
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.writer import (
    LATER_CODES,
    Append,
    Appended,
    AppendInterrupted,
    BadFolderName,
    MailboxWriter,
    Streamed,
    encode_folder,
    open_writer,
    refusal_codes,
    refused_as_gone,
    refused_for_good,
)
from mailcore.messages.sql import dialect_insert, utc
from mailcore.messages.store import raw_chunks
from mailcore.store import Database
from mailcore.store.schema import (
    fetch_folders,
    mailbox_job_items,
    mailbox_jobs,
    message_blobs,
    messages,
)

log = Logger()

_m = messages.c
_i = mailbox_job_items.c
# Flags that belong to a session, not to a message: never sent with an APPEND.
_SESSION_FLAGS = {"\\RECENT"}


@dataclass
class Source:
    """A backed-up message as the copy needs it (its bytes are read per batch)."""

    id: int
    size: int
    internal_date: datetime.datetime | None
    message_id: str
    sha256: str
    flags: tuple[str, ...]
    uidvalidity: int | None = None
    uid: int | None = None

    @property
    def key(self) -> tuple[int, datetime.datetime | None]:
        return self.size, self.internal_date


@dataclass
class FolderPlan:
    """One backed-up folder: where it goes and which of its messages the job copies."""

    folder_id: int
    name: str
    path: tuple[str, ...]
    candidates: list[Source] = field(default_factory=list)
    # UIDs of the destination folder that stand for messages the plan does not copy (a
    # restore: the backed-up messages still in the account).
    present_uids: set[int] = field(default_factory=set)


@dataclass
class ItemState:
    state: str
    dest_uid: int | None
    dest_uidvalidity: int | None = None


def folder_path(name: str, delimiter: str | None) -> tuple[str, ...]:
    """A backed-up folder name as a path of names, whatever the destination's separator."""
    if name.upper() == "INBOX":
        return ("INBOX",)
    if delimiter:
        return tuple(p for p in name.split(delimiter) if p) or (name,)
    return (name,)


def message_flags(text: str) -> tuple[str, ...]:
    return tuple(f for f in text.split() if f.upper() not in _SESSION_FLAGS)


# -- SQL --------------------------------------------------------------------------------------


def thd_backup_folders(conn: Connection, account_id: int) -> list[FolderPlan]:
    """Blocking: the account's backed-up folders (those holding messages), in name order,
    each with every backed-up message, oldest first."""
    folders = {
        r.id: FolderPlan(r.id, r.name, folder_path(r.name, r.delimiter))
        for r in conn.execute(
            select(fetch_folders.c.id, fetch_folders.c.name, fetch_folders.c.delimiter)
            .where(fetch_folders.c.account_id == account_id)
        )
    }
    rows = conn.execute(
        select(_m.id, _m.folder_id, _m.size, _m.internal_date, _m.message_id, _m.sha256,
               _m.flags, _m.uidvalidity, _m.uid)
        .where(_m.account_id == account_id)
        .order_by(_m.folder_id, _m.uid, _m.id)
    )
    for r in rows:
        plan = folders.get(r.folder_id)
        if plan is None:
            continue
        plan.candidates.append(Source(
            id=r.id, size=int(r.size), internal_date=utc(r.internal_date),
            message_id=r.message_id or "", sha256=r.sha256, flags=message_flags(r.flags),
            uidvalidity=r.uidvalidity, uid=r.uid,
        ))
    return sorted((p for p in folders.values() if p.candidates),
                  key=lambda p: (p.path != ("INBOX",), p.name))


def thd_item_states(conn: Connection, job_id: int) -> dict[int, ItemState]:
    """Blocking: what the job recorded of each message so far."""
    return {
        int(r.message_row_id): ItemState(r.state, r.dest_uid, r.dest_uidvalidity)
        for r in conn.execute(
            select(_i.message_row_id, _i.state, _i.dest_uid, _i.dest_uidvalidity)
            .where(_i.job_id == job_id)
        )
    }


def thd_read_bodies(conn: Connection, ids: list[int]) -> dict[int, bytes]:
    """Blocking: the exact bytes of these backed-up messages."""
    rows = conn.execute(
        select(_m.id, message_blobs.c.raw)
        .select_from(messages.join(message_blobs, message_blobs.c.sha256 == _m.sha256))
        .where(_m.id.in_(ids))
    )
    return {int(r.id): bytes(r.raw) for r in rows}


def thd_blob_sizes(conn: Connection, ids: list[int]) -> dict[int, int]:
    """Blocking: the exact size of these backed-up messages' bytes (those still stored),
    without reading them: what a streamed APPEND announces."""
    rows = conn.execute(
        select(_m.id, message_blobs.c.size)
        .select_from(messages.join(message_blobs, message_blobs.c.sha256 == _m.sha256))
        .where(_m.id.in_(ids))
    )
    return {int(r.id): int(r.size) for r in rows}


def _upsert_items(conn: Connection, job_id: int,
                  rows: Sequence[tuple[int, str, int | None, int | None]]) -> None:
    """(message id, state, dest uidvalidity, dest uid) rows of the job, replacing any."""
    if not rows:
        return
    ins = dialect_insert(conn)(mailbox_job_items)
    stmt = ins.on_conflict_do_update(
        index_elements=["job_id", "message_row_id"],
        set_={"state": ins.excluded.state, "dest_uidvalidity": ins.excluded.dest_uidvalidity,
              "dest_uid": ins.excluded.dest_uid},
    )
    conn.execute(stmt, [
        {"job_id": job_id, "message_row_id": m, "state": s, "dest_uidvalidity": v,
         "dest_uid": u} for m, s, v, u in rows
    ])


def thd_progress(conn: Connection, job_id: int) -> tuple[int, int]:
    """Blocking: (messages dealt with, messages appended) of the job, from its items."""
    done = conn.execute(
        select(func.count()).select_from(mailbox_job_items)
        .where(_i.job_id == job_id, _i.state.in_(("done", "present")))
    ).scalar()
    appended = conn.execute(
        select(func.count()).select_from(mailbox_job_items)
        .where(_i.job_id == job_id, _i.state == "done")
    ).scalar()
    return int(done or 0), int(appended or 0)


# -- the copy -----------------------------------------------------------------------------------


TRANSIENT = (ConnectFailed, FetchTimeout)
# The phase of a migrate whose last backup sync passed over a folder it could not tell
# deleted (`MailboxCopier.bring_backup_up_to_date`): its next run syncs again first.
RECHECK = "recheck"
FATAL = (AuthFailed, TLSFailed, CleartextRefused)


class MailboxCopier:
    """The bodies of migrate and restore jobs (`migrate`, `restore`) for a `JobRunner`."""

    def __init__(self, db: Database, accounts: Accounts, engine: SyncEngine,
                 secrets: SecretBox, *, settings: JobSettings | None = None,
                 metrics: JobMetrics | None = None) -> None:
        self.db = db
        self.accounts = accounts
        self.engine = engine
        self.secrets = secrets
        self.settings = settings or JobSettings()
        self.metrics = metrics

    def bodies(self) -> dict[str, Any]:
        from mailcore.fetch.restore import restore

        async def run_restore(runner: JobRunner, job: Job) -> None:
            await restore(self, runner, job)

        return {"migrate": self.migrate, "restore": run_restore}

    # -- sessions ------------------------------------------------------------------------

    def creator(self, host: str, ca_pem: str | None = None,
                fingerprint: str | None = None) -> Any:
        return self.engine.tls_factory(host, ca_pem=ca_pem, fingerprint=fingerprint)

    async def open_reader(self, spec: ServerSpec, creator: Any) -> IMAPClient:
        """A reading session (LIST, EXAMINE, SEARCH, FETCH) on a server."""
        s = self.engine.settings
        return await guarded(open_session(
            self.engine.reactor, spec, creator, max_literal=s.max_message_bytes,
            connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
            command_timeout=s.command_timeout, policy=s.address_policy()))

    async def open_writer(self, spec: ServerSpec, creator: Any) -> MailboxWriter:
        """A writing session on the destination (`mailcore.fetch.writer`)."""
        return await guarded(open_writer(
            self.engine.reactor, spec, spec.username, spec.password, tls=creator,
            settings=self.engine.settings, cpu=self.engine.store.cpu))

    # -- the migrate body ------------------------------------------------------------------

    async def bring_backup_up_to_date(self, runner: JobRunner, job: Job) -> str | None:
        """Sync the account once per run of the job that finds it in its "backup" or
        "recheck" phase (a job resumed in its copy does not again; `backup_synced` puts it
        back). A migrate (not a restore): a folder the sync passed over that it cannot tell
        deleted (`SyncResult.unsure`: Dovecot's plain NO for a folder deleted while it had
        subfolders, or Office 365's "Server Unavailable" for a moment, the folder's new mail
        then not backed up) is not taken as deleted the first time: the job goes to its
        "recheck" phase, and what is returned (why) has `backup_synced` retry it. The sync
        of its next run, passing such folders over again, takes them as deleted."""
        if job.phase not in ("backup", RECHECK):
            return None
        result = await self.engine.sync(job.account_id)
        if result.status == BUSY:
            raise TransientJobError("the account's backup is being updated on another node")
        if not result.ok:
            log.info("job {id}: the backup sync before the copy failed ({why}); copying "
                     "what is backed up", id=job.id, why=result.problems())
        unsure = result.unsure() if job.kind == "migrate" else {}
        doubt = None
        if unsure and job.phase == RECHECK:
            log.info("job {id}: the backup sync passed over {folders} again, listed but not "
                     "to be opened; taken as deleted", id=job.id, folders=sorted(unsure))
        elif unsure:
            doubt = ("the backup sync passed over " + ", ".join(
                f"{name!r} ({why})" for name, why in sorted(unsure.items()))
                + ", listed with subfolders and opened by an earlier sync: deleted, or "
                "refused for a moment (its new mail not backed up); synced again, and taken "
                "as deleted if passed over again")
        await self._set_phase(runner, job, RECHECK if doubt else "copy")
        return doubt

    async def backup_synced(self, runner: JobRunner, job: Job,
                            doubt: str | None = None) -> None:
        """After the copy: if the account's last sync failed (the job's own, unless one ran
        since), the job goes back to its backup phase and is retried by the runner's rules,
        its reason saying why, and ends failed when they are spent. What was backed up is
        copied meanwhile: a source gone for good still has its backup migrated. A restore
        (`mailcore.fetch.restore`) ends the same way. So does a migrate whose sync passed
        over a folder it could not tell deleted (`doubt`, from `bring_backup_up_to_date`),
        left in its "recheck" phase."""
        account = await self.accounts.get(job.user_id, job.account_id)
        if account.sync_status == "error":
            await self._set_phase(runner, job, RECHECK if doubt else "backup")
            raise TransientJobError(f"the backup sync before the copy failed "
                                    f"({account.sync_error}); what was backed up is copied"
                                    + (f"; {doubt}" if doubt else ""))
        if doubt:
            raise TransientJobError(f"{doubt}; what was backed up is copied")

    async def _set_phase(self, runner: JobRunner, job: Job, phase: str) -> None:
        now = runner.now()

        def txn(conn: Connection) -> None:
            conn.execute(update(mailbox_jobs).where(mailbox_jobs.c.id == job.id)
                         .values(phase=phase, updated_at=now))

        await self.db.run("mailbox_job_phase", txn)

    async def migrate(self, runner: JobRunner, job: Job) -> None:
        doubt = await self.bring_backup_up_to_date(runner, job)

        def secret(conn: Connection) -> bytes | None:
            return conn.execute(select(mailbox_jobs.c.password_enc)
                                .where(mailbox_jobs.c.id == job.id)).scalar()

        token = await self.db.read("mailbox_job_secret", secret)
        if token is None or not job.host or not job.port or not job.username:
            raise JobFailed("the migrate has no destination")
        spec = ServerSpec(host=job.host, port=job.port, use_ssl=job.use_ssl,
                          start_tls=job.start_tls, allow_cleartext=job.allow_cleartext,
                          username=job.username, password=self.secrets.decrypt(token))
        plans = await self.db.read("mailbox_job_folders", thd_backup_folders, job.account_id)
        await self.copy(runner, job, spec,
                        self.creator(job.host, job.tls_ca_pem, job.tls_fingerprint), plans)
        await self.backup_synced(runner, job, doubt)

    # -- shared by migrate and restore -------------------------------------------------------

    async def copy(self, runner: JobRunner, job: Job, spec: ServerSpec, creator: Any,
                   plans: list[FolderPlan], *, reader: IMAPClient | None = None) -> None:
        """Copy each plan's candidates into the destination `spec`, exactly once (module
        docstring). `reader` is an open reading session on the destination, if the caller
        has one."""
        states = await self.db.read("mailbox_job_items", thd_item_states, job.id)
        total = sum(len(p.candidates) for p in plans)
        size = sum(s.size for p in plans for s in p.candidates)
        handled, appended = await self.db.read("mailbox_job_progress", thd_progress, job.id)
        await self._set_counts(job.id, messages=total, restore_size=size,
                               downloaded=handled, appended=appended)
        # Nothing to copy, and nothing recorded whose folder could have changed since.
        if all(s.id in states and states[s.id].state != "inflight"
               and states[s.id].dest_uidvalidity is None
               for p in plans for s in p.candidates):
            return
        own_reader = reader is None
        writer: MailboxWriter | None = None
        try:
            if reader is None:
                reader = await self.open_reader(spec, creator)
            writer = await self.open_writer(spec, creator)
            existing = {tuple(p) for p in await guarded(writer.folders())}
            cannot: list[str] = []
            later: list[str] = []
            for plan in plans:
                try:
                    await self._copy_folder(runner, job, writer, reader, plan, states,
                                            existing)
                except _FolderRefused as e:
                    cannot.append(f"{'/'.join(plan.path)!r} ({e})")
                except _FolderLater as e:
                    # The session is alive: the other folders are copied meanwhile (one
                    # never opening would otherwise hold back every folder after it).
                    later.append(str(e))
            if later:
                raise TransientJobError("; ".join(later + [
                    f"cannot take {c}" for c in cannot]) + "; every other folder was copied")
            if cannot:
                raise JobFailed(f"the destination cannot take the folder{'s' * (len(cannot) > 1)} "
                                f"{', '.join(cannot)}; every other folder was copied")
        finally:
            if writer is not None:
                try:
                    await writer.logout()
                except Exception:
                    log.debug("logout from the destination failed")
            if own_reader and reader is not None:
                await reader.close_session()

    async def _set_counts(self, job_id: int, **values: int) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(update(mailbox_jobs).where(mailbox_jobs.c.id == job_id)
                         .values(**values))

        await self.db.run("mailbox_job_counts", txn)

    async def _examine(self, reader: IMAPClient, mailbox: bytes
                       ) -> tuple[int | None, int] | None:
        """(UIDVALIDITY, EXISTS) of a destination folder (`mailbox`: its argument as the
        writer names it, modified UTF-7), left selected for `_held`; None when the server
        refuses to open it (on a live session) other than for now (`refused_as_gone`): NO
        [NONEXISTENT] (RFC 5530), or Dovecot's plain NO for a folder deleted while it had
        subfolders, which it still lists."""
        try:
            lines, _ = await reader.send(b"EXAMINE", mailbox)
        except FetchError as e:
            if refused_as_gone(reader, e):
                return None
            raise _classify(e) from None
        uidvalidity: int | None = None
        try:
            exists = examined_exists(lines, reader.host, mailbox.decode("ascii", "replace"))
            for line in lines:
                words = line.split()
                if line.upper().startswith(b"OK [UIDVALIDITY ") and len(words) >= 3:
                    value = words[2].rstrip(b"]")
                    uidvalidity = (number(value, "UIDVALIDITY", lowest=0) if value.isdigit()
                                   else None)
        except FetchError as e:
            raise _classify(e) from None
        return uidvalidity, exists

    async def _held(self, reader: IMAPClient, exists: int, index: DestinationIndex
                    ) -> DestinationIndex:
        """`index` given the messages of the folder `_examine` left selected, which counted
        `exists` messages, each as its FETCH reply is read."""
        if exists == 0:
            return index
        # One FETCH reply a message: those EXAMINE counted, and a margin for mail arriving.
        index.highest_seq = exists + ARRIVING
        await guarded(reader.uid_fetch(b"1:*", b"UID RFC822.SIZE INTERNALDATE",
                                       max_items=exists + ARRIVING, sink=index.add))
        return index

    async def _copy_folder(self, runner: JobRunner, job: Job, writer: MailboxWriter,
                           reader: IMAPClient, plan: FolderPlan, states: dict[int, ItemState],
                           existing: set[tuple[str, ...]]) -> None:
        todo = [s for s in plan.candidates
                if s.id not in states or states[s.id].state == "inflight"]
        # Copied (or found) by an earlier run, at a (UIDVALIDITY, UID) of the folder then.
        placed = [s.id for s in plan.candidates if s.id in states
                  and states[s.id].state != "inflight"
                  and states[s.id].dest_uidvalidity is not None]
        if not todo and not placed:
            return
        path = plan.path
        try:
            dest = writer.destination_path(path)
            # As the reader names it (modified UTF-7, no ENABLE), inside the personal
            # namespace as the writer made it (dest: "INBOX.Archive" on Courier, Cyrus).
            mailbox = encode_folder(dest, writer.separator, utf8=False)
        except BadFolderName as e:
            # A name no command can carry (a control character a source listed): this
            # folder alone is refused, the others are copied.
            raise _FolderRefused(str(e)) from None
        listed = dest in existing or dest == ("INBOX",)
        # Listed \Noselect (deleted while it had subfolders, RFC 3501 6.3.4) or its
        # EXAMINE refused (NO [NONEXISTENT]; Dovecot lists such a folder and answers NO):
        # gone, as a folder no longer listed. Its EXAMINE (once a run) gives the
        # UIDVALIDITY and EXISTS that what is there is listed by.
        opened = None
        held: DestinationIndex | None = None
        if listed and dest not in writer.noselect:
            opened = await self._examine(reader, mailbox)
        exists = opened is not None
        uidvalidity = opened[0] if opened is not None else None
        # A folder gone, or made again (another UIDVALIDITY), since an earlier run put
        # messages there: what that run recorded says nothing of what is there now. Those
        # messages are looked for and copied again if missing (at worst a duplicate, never
        # a message skipped), and their old UIDs stand for nothing.
        again = {sid: states[sid].state for sid in placed
                 if not exists or states[sid].dest_uidvalidity != uidvalidity}
        if again:
            log.warn("job {id}: {folder} at the destination is {what} since {n} of its "
                     "messages were copied; they are looked for and copied again",
                     id=job.id, folder=plan.name, n=len(again),
                     what="another folder (its UIDVALIDITY changed)" if exists else "gone")
            pending = {s.id for s in todo} | again.keys()
            todo = [s for s in plan.candidates if s.id in pending]
        if not todo:
            return
        if not exists:
            try:
                # Listed but not to be opened: LISTed again, CREATEd over the name.
                await writer.ensure_folder(path, reopen=listed)
            except FetchError as e:
                # Refused for good; or, listed and not to be opened, refused other than
                # for now (LATER_CODES): a rerun meets the same name it can neither open nor make.
                if isinstance(e, BadFolderName) or (
                    writer.session.error is None and (
                        refused_for_good(e) or (listed and not refusal_codes(e) & LATER_CODES))
                ):
                    await self._uncount(runner, job, plan, again)
                    raise _FolderRefused(str(e)) from None
                raise _classify(e) from None
            existing.add(dest)
            # The folder's UIDVALIDITY (a new one's): an APPENDUID naming another is not
            # taken, and the next run sees whether the folder is still this one.
            opened = await self._examine(reader, mailbox)
            if opened is None:
                # Listed, its EXAMINE refused again after a CREATE that failed or said
                # nothing: a NO naming no code may be for a moment (Office 365's "Server
                # Unavailable"), and the folder with what was copied into it may be there.
                # Tried again later, the counts left as they are: refusing it for good
                # would end the job, and a new job would send again what it cannot tell
                # apart (a destination that rewrites messages).
                what = ("lists it but will not open it, nor make it again" if listed
                        else "does not have it right after it was made")
                raise _FolderLater(f"the destination {what}: {'/'.join(path)!r}")
            # Mail there already (someone made it meanwhile): looked for as in one listed.
            uidvalidity, exists = opened[0], opened[1] > 0
            if listed and again:
                # Refused a moment ago, open now: a message recorded under this UIDVALIDITY
                # whose UID it still holds is the one copied (UIDs are never reused within a
                # UIDVALIDITY), not looked for again (a destination that rewrote it, or one
                # of many look-alikes, would be sent again: a duplicate each).
                watched = {st.dest_uid for sid, st in states.items() if sid in again
                           and st.dest_uidvalidity == uidvalidity and st.dest_uid is not None}
                held = await self._held(reader, opened[1], DestinationIndex(
                    {s.key for s in todo}, self._used(plan, states, again), watched))
                kept = {sid for sid in again if states[sid].dest_uidvalidity == uidvalidity
                        and states[sid].dest_uid in held.seen}
                if kept:
                    log.info("job {id}: {folder} at the destination opens again with {n} of "
                             "its copied messages still there; they are not sent again",
                             id=job.id, folder=plan.name, n=len(kept))
                    again = {sid: st for sid, st in again.items() if sid not in kept}
                    todo = [s for s in todo if s.id not in kept]
                    if not todo:
                        return
        # What the destination holds that nothing of this plan accounts for.
        used = self._used(plan, states, again)
        assert opened is not None
        if held is None:  # in the folder EXAMINEd last
            held = await self._held(reader, opened[1], DestinationIndex(
                {s.key for s in todo}, used, set()))
        index = held.settle(used)
        # Messages in flight at the last stop, and look-alikes of what is there: look first.
        found: list[tuple[int, str, int | None, int | None]] = []
        to_send: list[Source] = []
        for source in todo:
            inflight = source.id in states
            looks_there = held.others > 0 and (source.internal_date is None
                                               or index[source.key] > 0)
            if exists and (inflight or looks_there):
                uid = await guarded(writer.find(
                    path, message_id=source.message_id or None, size=source.size,
                    internaldate=source.internal_date, sha256=source.sha256, exclude=used))
                if uid is not None:
                    used.add(uid)
                    if index[source.key] > 0:
                        index[source.key] -= 1
                    state = again.get(source.id) or ("done" if inflight else "present")
                    found.append((source.id, state, uidvalidity, uid))
                    continue
            to_send.append(source)
        in_flight = sum(1 for source in todo if source.id in states and source.id not in again)
        if in_flight:
            landed = sum(1 for f in found if f[1] == "done" and f[0] not in again)
            log.info("job {id}: {landed} of {n} messages in flight at its last stop "
                     "were at the destination already (not sent again) in {folder}",
                     id=job.id, landed=landed, n=in_flight, folder=plan.name)
        if found:
            # One copied again and found is counted once, as before.
            await self._record(
                runner, job, found,
                appended=sum(1 for f in found if f[1] == "done" and f[0] not in again),
                handled=sum(1 for f in found if f[0] not in again))
        await self._append_all(runner, job, writer, plan, to_send, uidvalidity, again)

    @staticmethod
    def _used(plan: FolderPlan, states: dict[int, ItemState], again: dict[int, str]
              ) -> set[int]:
        """The UIDs of the destination folder that stand for messages of `plan` this run
        does not look for (recorded there, not to be copied `again`), or that it does not
        copy (`present_uids`)."""
        mine = {c.id for c in plan.candidates}
        used = {st.dest_uid for sid, st in states.items()
                if st.dest_uid is not None and st.state != "inflight" and sid in mine
                and sid not in again}
        return used | plan.present_uids

    async def _uncount(self, runner: JobRunner, job: Job, plan: FolderPlan,
                       again: dict[int, str]) -> None:
        """The messages an earlier run copied into a folder gone since, which this run
        cannot make: in flight again (looked for when it is back), no longer counted."""
        if again:
            await self._mark_inflight(
                runner, job, [s for s in plan.candidates if s.id in again], again)

    def _batches(self, sources: list[Source]) -> list[list[Source]]:
        """Batches in the folder's order; a message over `stream_bytes` is a batch alone."""
        out: list[list[Source]] = []
        current: list[Source] = []
        total = 0
        s = self.settings
        for source in sources:
            if self._streamed(source):
                if current:
                    out.append(current)
                    current, total = [], 0
                out.append([source])
                continue
            if current and (len(current) >= s.batch_messages
                            or total + source.size > s.batch_bytes):
                out.append(current)
                current, total = [], 0
            current.append(source)
            total += source.size
        if current:
            out.append(current)
        return out

    def _streamed(self, source: Source) -> bool:
        return source.size > self.settings.stream_bytes

    async def _append_all(self, runner: JobRunner, job: Job, writer: MailboxWriter,
                          plan: FolderPlan, sources: list[Source], uidvalidity: int | None,
                          again: dict[int, str]) -> None:
        """Append `sources` in batches; `uidvalidity` is the folder's, `again` the prior
        state of those an earlier run copied into a folder since gone or made again."""
        batches = self._batches(sources)
        if not batches:
            return
        reads: list[defer.Deferred[dict[int, bytes | int]]] = []

        def thd_read(conn: Connection, batch: list[Source]) -> dict[int, bytes | int]:
            # bytes: the message itself; int: the size of a message to stream.
            ids = [s.id for s in batch]
            if len(batch) == 1 and self._streamed(batch[0]):
                return dict(thd_blob_sizes(conn, ids))
            return dict(thd_read_bodies(conn, ids))

        def read(batch: list[Source]) -> defer.Deferred[dict[int, bytes | int]]:
            return self.db.read("mailbox_job_bodies", thd_read, batch)

        reads.append(read(batches[0]))
        try:
            for n, batch in enumerate(batches):
                bodies = await reads.pop(0)
                if n + 1 < len(batches):
                    reads.append(read(batches[n + 1]))  # read ahead while this one goes out
                await self._mark_inflight(runner, job, batch, again)
                await self._append_batch(runner, job, writer, plan, batch, bodies,
                                         uidvalidity)
        finally:
            for d in reads:
                d.addErrback(lambda _f: None)

    async def _mark_inflight(self, runner: JobRunner, job: Job, batch: list[Source],
                             again: dict[int, str]) -> None:
        seconds = runner.reactor.seconds()
        # Counted when an earlier run copied them into a folder since gone or made again:
        # no longer, until the destination takes them again (a run that ends before, e.g.
        # refused for good, counts only what is there).
        was = [again[s.id] for s in batch if s.id in again]

        def txn(conn: Connection) -> None:
            runner.check_txn(conn, job.id, seconds)
            _upsert_items(conn, job.id, [(s.id, "inflight", None, None) for s in batch])
            if was:
                conn.execute(update(mailbox_jobs).where(mailbox_jobs.c.id == job.id).values(
                    downloaded=mailbox_jobs.c.downloaded - len(was),
                    appended=mailbox_jobs.c.appended - was.count("done")))

        await self.db.run("mailbox_job_inflight", txn)

    async def _append_batch(self, runner: JobRunner, job: Job, writer: MailboxWriter,
                            plan: FolderPlan, batch: list[Source],
                            bodies: dict[int, bytes | int], uidvalidity: int | None) -> None:
        sendable = [s for s in batch if s.id in bodies]  # a message deleted meanwhile: skip
        items = [self._item(s, bodies[s.id]) for s in sendable]
        interrupted: AppendInterrupted | None = None
        try:
            answers: list[Appended] = await writer.append(plan.path, items)
        except AppendInterrupted as e:
            answers, interrupted = list(e.answered), e
        except FetchError as e:
            raise _classify(e) from None
        written = [(s.id, "done", *self._place(job, plan, a, uidvalidity))
                   for s, a in zip(sendable, answers, strict=False) if a.ok]
        if written:
            await self._record(runner, job, written, appended=len(written))
        refused = [(s, a) for s, a in zip(sendable, answers, strict=False) if not a.ok]
        if refused:
            source, answer = refused[0]
            where = "/".join(plan.path)
            reason = answer.reason or "no reason given"
            if answer.retryable:
                raise TransientJobError(
                    f"the destination did not take a message into {where} for now: {reason}")
            raise JobFailed(f"the destination refused message {source.id} (folder {where}, "
                            f"{source.size} bytes): {reason}")
        if interrupted is not None:
            raise TransientJobError(f"the destination's connection broke during APPEND: "
                                    f"{interrupted}")
        if len(answers) < len(sendable):
            raise TransientJobError("the destination answered fewer APPENDs than were sent")

    @staticmethod
    def _place(job: Job, plan: FolderPlan, answer: Appended, uidvalidity: int | None
               ) -> tuple[int | None, int | None]:
        """(UIDVALIDITY, UID) recorded for a message the destination took: the folder's
        UIDVALIDITY, with the APPENDUID's UID only when it names that UIDVALIDITY (another is
        a lying or broken server, or a folder made again meanwhile: no UID is better than
        one of another folder)."""
        if uidvalidity is None:
            return answer.uidvalidity, answer.uid
        if answer.uidvalidity is not None and answer.uidvalidity != uidvalidity:
            log.warn("job {id}: the destination answered APPENDUID {got} in {folder}, whose "
                     "UIDVALIDITY is {want}; its UID is not kept", id=job.id,
                     got=answer.uidvalidity, folder=plan.name, want=uidvalidity)
            return uidvalidity, None
        return uidvalidity, answer.uid

    def _item(self, source: Source, body: bytes | int) -> Append:
        if isinstance(body, bytes):
            return Append(data=body, flags=source.flags, internaldate=source.internal_date)
        db, sha256 = self.db, source.sha256
        return Append(data=b"", flags=source.flags, internaldate=source.internal_date,
                      stream=Streamed(body, lambda: raw_chunks(db, sha256)))

    async def _record(self, runner: JobRunner, job: Job,
                      rows: list[tuple[int, str, int | None, int | None]],
                      *, appended: int, handled: int | None = None) -> None:
        """Commit the messages the destination took (or held already). `handled` of
        them are dealt with for the first time (default: all), `appended` newly appended."""
        now = runner.now()
        new = len(rows) if handled is None else handled

        def txn(conn: Connection) -> None:
            _upsert_items(conn, job.id, rows)
            conn.execute(update(mailbox_jobs).where(mailbox_jobs.c.id == job.id).values(
                downloaded=mailbox_jobs.c.downloaded + new,
                appended=mailbox_jobs.c.appended + appended, updated_at=now))

        await self.db.run("mailbox_job_record", txn)
        if self.metrics is not None:
            kind = job.kind
            if appended:
                self.metrics.messages.labels(kind=kind, outcome="appended").inc(appended)
            if new - appended > 0:
                self.metrics.messages.labels(kind=kind, outcome="present").inc(
                    new - appended)


class DestinationIndex:
    """What a copy keeps of the messages a destination folder holds, its look-alike index,
    given each as its FETCH reply is read (`add`, the sink of a UID FETCH 1:*): how many
    messages there no UID in `used` accounts for (`others`), and of those how many have
    each (size, INTERNALDATE) of the messages to copy (`wanted`, their Source.key). The
    UIDs `watched` (maybe not used: see `settle`) are kept with their keys as seen.

    A folder's FETCH replies were all kept, as FetchItems, then as tuples, then counted
    by every key: 400 MB for a destination of 2 million small messages (the reply bound,
    144 MB, lets in that many), whatever the copy holds. Now only what a lookup can ask
    is kept: a count per key of the messages to copy, and the watched UIDs."""

    def __init__(self, wanted: set[tuple[int, datetime.datetime | None]], used: set[int],
                 watched: set[int]) -> None:
        self.wanted, self.used, self.watched = wanted, used, watched
        self.counts: Counter[tuple[int, datetime.datetime | None]] = Counter()
        self.others = 0
        self.seen: dict[int, list[tuple[int, datetime.datetime | None]]] = {}
        self.repeats = 0  # FETCH replies naming a watched UID
        self.highest_seq = MAX_EXISTS  # the highest message number a reply may name

    def add(self, item: FetchItem) -> None:
        if item.seq > self.highest_seq:
            # No folder of the EXISTS it counted (and ARRIVING more) holds that message.
            raise ProtocolFailed(f"a FETCH reply names message {item.seq} of a folder of at "
                                 f"most {self.highest_seq}")
        uid = item.uid
        if uid is None:
            return
        if uid in self.watched:  # before `used`: a UID may be both (see settle)
            self.seen.setdefault(uid, []).append((item.size or 0, utc(item.internal_date)))
            self.repeats += 1
            if self.repeats > 2 * len(self.watched) + LIST_SLACK:
                raise ProtocolFailed(
                    f"{self.repeats} FETCH replies for {len(self.watched)} UIDs copied there, "
                    f"more than two a UID and {LIST_SLACK}")
        elif uid not in self.used:
            self._count((item.size or 0, utc(item.internal_date)))

    def _count(self, key: tuple[int, datetime.datetime | None]) -> None:
        self.others += 1
        if key in self.wanted:
            self.counts[key] += 1

    def settle(self, used: set[int]) -> Counter[tuple[int, datetime.datetime | None]]:
        """The count by key, once the watched UIDs seen are known to be `used` or not."""
        for uid, keys in self.seen.items():
            if uid not in used:
                for key in keys:
                    self._count(key)
        self.seen = {}
        return self.counts


class _FolderRefused(Exception):
    """A folder the destination will never take: its CREATE refused with a code that says
    so, or a name no command can carry (BadFolderName)."""


class _FolderLater(Exception):
    """A folder the destination lists but will not open for now, on a live session: tried
    again in the job's next run, once the other folders were copied."""


def _classify(e: FetchError) -> Exception:
    """A session failure as a job outcome: retry later, or fail with the reason."""
    if isinstance(e, FATAL):
        return JobFailed(str(e))
    return TransientJobError(str(e))


async def guarded(d: Any) -> Any:
    """Await a session call; its FetchError becomes a job outcome (retry or fail)."""
    try:
        return await d
    except AppendInterrupted:
        raise
    except FetchError as e:
        raise _classify(e) from None

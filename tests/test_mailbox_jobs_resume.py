"""A migrate resumed against a destination whose folder changed under it, or that lies in its
APPENDUIDs: what a run recorded of a folder is trusted only while the folder is the same
(its UIDVALIDITY), so a folder deleted or made again between a run and its resume gets its
messages back (at worst a duplicate, never a message skipped), and an APPENDUID naming
another UIDVALIDITY than the folder's leaves no UID recorded.

The destination is a fake IMAP server (tests.test_fetch_writer_hostile's command reader)
over an in-memory loopback, the store a real database; `MailboxCopier.copy` runs as a job's
run does."""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, cast

from cryptography.fernet import Fernet
from sqlalchemy import Connection, delete, insert, select
from twisted.protocols.loopback import loopbackAsync
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.engine import FolderResult, SyncResult
from mailcore.fetch.imap import IMAPClient, ServerSpec
from mailcore.fetch.jobs import JobFailed, TransientJobError, thd_create_job
from mailcore.fetch.migrate import MailboxCopier, thd_backup_folders
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.writer import MailboxWriter, WriterSession, writer_for
from mailcore.messages.sql import new_id
from mailcore.store import Database
from mailcore.store.schema import (
    fetch_folders,
    mailbox_job_items,
    mailbox_jobs,
    message_blobs,
    messages,
)
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user
from tests.support.reactor import get_reactor
from tests.test_fetch_writer_hostile import Msg, Script, ScriptedIMAP, unquote

UTC = datetime.UTC
FOLDERS = {"INBOX": 3, "Archive": 4, "Later": 2}


@dataclass
class Box:
    uidvalidity: int
    messages: dict[int, Msg] = field(default_factory=dict)
    next_uid: int = 1


@dataclass
class Destination:
    """The account the fake serves, shared by its sessions."""

    boxes: dict[str, Box] = field(default_factory=lambda: {"INBOX": Box(1)})
    validities: int = 1
    # Folder -> a tagged reply refusing every APPEND there.
    refuse: dict[str, bytes] = field(default_factory=dict)
    # The UIDVALIDITY every APPENDUID names (None: the folder's).
    appenduid_validity: int | None = None
    # Every session's commands: (name, arguments).
    commands: list[tuple[bytes, bytes]] = field(default_factory=list)
    separator: bytes = b"/"
    # The NAMESPACE reply (None: no NAMESPACE capability).
    namespace: bytes | None = None
    # Names deleted while they had subfolders: listed with `noselect_flags` (RFC 3501:
    # \Noselect; Dovecot: \HasChildren alone), no box, EXAMINE refused.
    noselect: set[str] = field(default_factory=set)
    noselect_flags: bytes = b"\\Noselect \\HasChildren"
    # Folder -> a tagged reply refusing its EXAMINE.
    refuse_examine: dict[str, bytes] = field(default_factory=dict)
    # Folders of refuse_examine refused once only (a refusal for a moment).
    refuse_examine_once: set[str] = field(default_factory=set)
    # Folder -> a tagged reply refusing its CREATE.
    refuse_create: dict[str, bytes] = field(default_factory=dict)
    # Folders deleted right after a LIST of every folder named them (by another client).
    gone_after_list: set[str] = field(default_factory=set)

    def make(self, name: str) -> None:
        self.validities += 1
        self.boxes[name] = Box(self.validities * 1000)

    def bodies(self, name: str) -> list[bytes]:
        return sorted(m.data for m in self.boxes[name].messages.values())


class FakeDestination(ScriptedIMAP):
    def __init__(self, dest: Destination) -> None:
        super().__init__(Script(
            capabilities="IMAP4rev1 UIDPLUS LITERAL+" + " NAMESPACE" * bool(dest.namespace),
            folders=[], append_reply=self.appended, namespace=dest.namespace or b""))
        self.dest = dest
        self.box: Box | None = None

    def command(self, parts: list[bytes]) -> None:
        super().command(parts)
        self.dest.commands.append(self.commands[-1])

    def do_LIST(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        sep = b'"' + self.dest.separator + b'"'
        if args == b'"" ""':
            self.send(b"* LIST (\\Noselect) " + sep + b' ""\r\n')
        else:
            for name in self.dest.boxes:
                self.send(b"* LIST () " + sep + b' "' + name.encode() + b'"\r\n')
            for name in self.dest.noselect:
                self.send(b"* LIST (" + self.dest.noselect_flags + b") " + sep + b' "'
                          + name.encode() + b'"\r\n')
            for name in self.dest.gone_after_list:
                del self.dest.boxes[name]
            self.dest.gone_after_list.clear()
        self.send(tag + b" OK listed\r\n")

    def do_CREATE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        name = unquote(args)
        if name in self.dest.refuse_create:
            self.send(tag + b" " + self.dest.refuse_create[name] + b"\r\n")
            return
        self.dest.noselect.discard(name)
        self.dest.make(name)
        self.send(tag + b" OK created\r\n")

    def do_EXAMINE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.box = self.dest.boxes.get(unquote(args))
        if unquote(args) in self.dest.noselect:
            self.send(tag + b" NO Mailbox doesn't exist: " + unquote(args).encode() + b"\r\n")
            return
        if unquote(args) in self.dest.refuse_examine:
            self.send(tag + b" " + self.dest.refuse_examine[unquote(args)] + b"\r\n")
            if unquote(args) in self.dest.refuse_examine_once:
                del self.dest.refuse_examine[unquote(args)]
            return
        if self.box is None:
            self.send(tag + b" NO [NONEXISTENT] no such folder\r\n")
            return
        self.send(b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] v\r\n%s OK [READ-ONLY] done\r\n"
                  % (len(self.box.messages), self.box.uidvalidity, tag))

    def do_UID_SEARCH(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        assert self.box is not None
        uids = sorted(self.box.messages)
        m = re.match(rb'HEADER Message-ID "(.*)"$', args)
        if m:
            uids = [u for u in uids
                    if b"Message-ID: " + m.group(1) + b"\r\n" in self.box.messages[u].data]
        self.send(b"* SEARCH " + b" ".join(b"%d" % u for u in uids) + b"\r\n"
                  + tag + b" OK searched\r\n")

    def do_UID_FETCH(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        assert self.box is not None
        wanted, _, items = args.partition(b" ")
        if wanted == b"1:*":
            uids = sorted(self.box.messages)
        else:
            uids = [int(u) for u in wanted.split(b",") if b":" not in u]
            for lo, hi in (u.split(b":") for u in wanted.split(b",") if b":" in u):
                uids += range(int(lo), int(hi) + 1)
        out = []
        for uid in uids:
            msg = self.box.messages.get(uid)
            if msg is None:
                continue
            if b"BODY.PEEK[]" in items:
                out.append(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n"
                           % (uid, uid, len(msg.data), msg.data))
            else:
                out.append(b'* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE "%s")\r\n'
                           % (uid, uid, len(msg.data), msg.date or b""))
        self.send(b"".join(out) + tag + b" OK fetched\r\n")

    def appended(self, number: int, name: str, msgs: list[Msg]) -> bytes | None:
        if name in self.dest.refuse:
            return self.dest.refuse[name]
        box = self.dest.boxes.get(name)
        if box is None:
            return b"NO [TRYCREATE] no such folder"
        uids = []
        for msg in msgs:
            box.messages[box.next_uid] = msg
            uids.append(box.next_uid)
            box.next_uid += 1
        validity = self.dest.appenduid_validity or box.uidvalidity
        return b"OK [APPENDUID %d %d] appended" % (validity, uids[0])


class Copier(MailboxCopier):
    """Sessions to the fake destination instead of the network."""

    dest: Destination

    async def connect(self, session: IMAPClient) -> None:
        loopbackAsync(FakeDestination(self.dest), session)
        await session.ask_capabilities()

    async def open_reader(self, spec: ServerSpec, creator: Any) -> IMAPClient:
        session = IMAPClient(get_reactor(), host="fake", command_timeout=60)
        await self.connect(session)
        return session

    async def open_writer(self, spec: ServerSpec, creator: Any) -> MailboxWriter:
        session = WriterSession(get_reactor(), host="fake", command_timeout=60)
        await self.connect(session)
        return await writer_for(session)


def body(folder: str, n: int) -> bytes:
    return (f"Message-ID: <{folder}.{n}@source.test>\r\nSubject: {folder} {n}\r\n\r\n"
            + "x" * (100 + n)).encode()


def thd_backed_up(conn: Connection, user_id: int, account_id: int,
                  folders: dict[str, int] = FOLDERS) -> None:
    """Blocking: the account's backup: `folders` (name -> messages), each message of its
    own bytes."""
    now = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    for folder, count in folders.items():
        folder_id = new_id(conn.execute(insert(fetch_folders).values(
            account_id=account_id, name=folder, delimiter="/")))
        for n in range(1, count + 1):
            raw = body(folder, n)
            sha = hashlib.sha256(raw).hexdigest()
            conn.execute(insert(message_blobs).values(sha256=sha, size=len(raw), raw=raw,
                                                      created_at=now))
            conn.execute(insert(messages).values(
                user_id=user_id, account_id=account_id, folder_id=folder_id, folder=folder,
                uid=n, uidvalidity=1, sha256=sha, size=len(raw), flags="\\Seen",
                message_id=f"<{folder}.{n}@source.test>",
                internal_date=now + datetime.timedelta(hours=n), created_at=now,
                updated_at=now))


class ResumeMixin(DatabaseMixin):
    timeout = 60

    async def copier(self) -> tuple[Copier, Any, Any]:
        """A copier to a new Destination, a run's stand-in and the migrate job."""
        db: Database = await self.open_database()
        reactor = get_reactor()
        owner = await db.run("owner", thd_make_user, "owner")
        account = await Accounts(db, reactor, SecretBox(Fernet.generate_key())).create(
            owner, host="127.0.0.1", port=143, username="u", password="pw",
            allow_cleartext=True)
        await db.run("backup", thd_backed_up, owner, account.id)
        now = datetime.datetime.now(UTC)
        job_id = await db.run("job", thd_create_job, {
            "kind": "migrate", "user_id": owner, "account_id": account.id,
            "status": "running", "created_at": now, "updated_at": now,
            "host": "127.0.0.1", "port": 143, "username": "d"})
        engine = SimpleNamespace(settings=FetchSettings(), reactor=reactor,
                                 store=SimpleNamespace(cpu=None))
        copier = Copier(db, cast(Any, None), cast(Any, engine), cast(Any, None))
        copier.dest = Destination()
        runner = SimpleNamespace(now=lambda: datetime.datetime.now(UTC), reactor=reactor,
                                 check_txn=lambda conn, job_id, seconds: None)
        job = SimpleNamespace(id=job_id, kind="migrate", account_id=account.id,
                              user_id=owner)
        return copier, runner, job

    async def one_run(self, copier: Copier, runner: Any, job: Any) -> None:
        """One run of the job's copy (as `MailboxCopier.migrate` after its sync)."""
        plans = await copier.db.read("plans", thd_backup_folders, job.account_id)
        spec = ServerSpec(host="127.0.0.1", port=143, use_ssl=False, start_tls=False,
                          allow_cleartext=True, username="d", password="pw")
        await copier.copy(cast(Any, runner), cast(Any, job), spec, None, plans)

    async def items(self, copier: Copier, job: Any) -> dict[str, list[tuple[Any, ...]]]:
        """Folder -> the job's (state, dest UIDVALIDITY, dest UID) of its messages."""
        def txn(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
            out: dict[str, list[tuple[Any, ...]]] = {}
            for r in conn.execute(
                select(messages.c.folder, mailbox_job_items.c.state,
                       mailbox_job_items.c.dest_uidvalidity, mailbox_job_items.c.dest_uid)
                .select_from(mailbox_job_items.join(
                    messages, messages.c.id == mailbox_job_items.c.message_row_id))
                .where(mailbox_job_items.c.job_id == job.id)
                .order_by(messages.c.folder, messages.c.uid)
            ):
                out.setdefault(r.folder, []).append((r.state, r.dest_uidvalidity, r.dest_uid))
            return out

        return await copier.db.read("items", txn)

    async def counts(self, copier: Copier, job: Any) -> tuple[int, int]:
        def txn(conn: Connection) -> tuple[int, int]:
            row = conn.execute(select(mailbox_jobs.c.downloaded, mailbox_jobs.c.appended)
                               .where(mailbox_jobs.c.id == job.id)).one()
            return int(row.downloaded), int(row.appended)

        return await copier.db.read("counts", txn)

    def assert_copied(self, dest: Destination) -> None:
        for folder, count in FOLDERS.items():
            self.assertEqual(dest.bodies(folder),
                             sorted(body(folder, n) for n in range(1, count + 1)), folder)

    async def assert_archive_done_in_its_folder_now(self, copier: Copier, job: Any) -> None:
        """Archive's 4 items done under the UIDVALIDITY its folder has now, and the job's
        counts 9 and 9: each message counted once."""
        validity = copier.dest.boxes["Archive"].uidvalidity
        self.assertEqual((await self.items(copier, job))["Archive"],
                         [("done", validity, uid) for uid in (1, 2, 3, 4)])
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def assert_examine_refusal_retried(self, answer: bytes) -> None:
        """Archive's EXAMINE answered `answer` at the resume: a transient failure of the
        job, nothing CREATEd or sent, Archive's 4 messages as they were."""
        copier, runner, job = await self.stopped_after_archive()
        copier.dest.refuse_examine["Archive"] = answer
        copier.dest.commands.clear()
        with self.assertRaises(TransientJobError):
            await self.one_run(copier, runner, job)
        self.assertNotIn(b"CREATE", [n for n, _ in copier.dest.commands])
        self.assertNotIn(b"APPEND", [n for n, _ in copier.dest.commands])
        self.assertEqual(len(copier.dest.boxes["Archive"].messages), 4)

    async def stopped_after_archive(self) -> tuple[Copier, Any, Any]:
        """A job whose first run copied INBOX and Archive, then stopped at Later (the
        destination refusing it for now)."""
        copier, runner, job = await self.copier()
        copier.dest.refuse["Later"] = b"NO [SERVERBUG] try later"
        with self.assertRaises(TransientJobError):
            await self.one_run(copier, runner, job)
        del copier.dest.refuse["Later"]
        self.assertEqual(len(copier.dest.boxes["Archive"].messages), 4)
        return copier, runner, job

    async def test_a_folder_made_again_before_the_resume_gets_its_messages_back(
        self,
    ) -> None:
        """Archive deleted and made again at the destination between the runs (another
        UIDVALIDITY, empty): the resume took what the first run recorded as copied there
        and skipped its messages, lost to the migrate for good."""
        copier, runner, job = await self.stopped_after_archive()
        old = copier.dest.boxes["Archive"].uidvalidity
        copier.dest.make("Archive")
        copier.dest.boxes["Archive"].messages[1] = Msg(b"\\Seen", b"01-Mar-2024 13:00:00 "
                                                       b"+0000", body("Archive", 1))
        copier.dest.boxes["Archive"].next_uid = 2
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)  # the one there found, not sent again
        validity = copier.dest.boxes["Archive"].uidvalidity
        self.assertNotEqual(validity, old)
        self.assertEqual((await self.items(copier, job))["Archive"],
                         [("done", validity, uid) for uid in (1, 2, 3, 4)])
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def test_a_folder_made_again_that_takes_nothing_counts_nothing_there(
        self,
    ) -> None:
        """Archive made again and its copies refused for good (over quota): the job failed
        still counting Archive's 4 messages downloaded and appended, none of them there."""
        copier, runner, job = await self.stopped_after_archive()
        copier.dest.make("Archive")
        copier.dest.refuse["Archive"] = b"NO [OVERQUOTA] mailbox full"
        with self.assertRaises(JobFailed):
            await self.one_run(copier, runner, job)
        self.assertEqual(copier.dest.bodies("Archive"), [])
        self.assertEqual([s for s, _v, _u in (await self.items(copier, job))["Archive"]],
                         ["inflight"] * 4)
        self.assertEqual(await self.counts(copier, job), (3, 3))

    async def test_a_folder_deleted_before_the_resume_is_made_again_and_filled(
        self,
    ) -> None:
        copier, runner, job = await self.stopped_after_archive()
        del copier.dest.boxes["Archive"]
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        await self.assert_archive_done_in_its_folder_now(copier, job)

    async def test_a_folder_deleted_with_subfolders_is_made_again_and_filled(
        self,
    ) -> None:
        """Archive deleted at the destination while it had a subfolder stays listed
        \\Noselect (RFC 3501 6.3.4): the resume EXAMINEd it, was refused, and failed as
        for now; every run the same, Later never copied. It is now gone: CREATEd over the
        \\Noselect name and filled again."""
        copier, runner, job = await self.stopped_after_archive()
        del copier.dest.boxes["Archive"]
        copier.dest.noselect.add("Archive")
        copier.dest.commands.clear()
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        self.assertNotIn((b"EXAMINE", b'"Archive"'), copier.dest.commands[:5])
        self.assertIn((b"CREATE", b'"Archive"'), copier.dest.commands)
        await self.assert_archive_done_in_its_folder_now(copier, job)

    async def test_a_folder_deleted_with_subfolders_on_dovecot_is_made_again_and_filled(
        self,
    ) -> None:
        """Dovecot lists a folder deleted while it had subfolders as \\HasChildren alone and
        answers its EXAMINE with a plain NO: the resume failed as for now, every run."""
        copier, runner, job = await self.stopped_after_archive()
        del copier.dest.boxes["Archive"]
        copier.dest.noselect.add("Archive")
        copier.dest.noselect_flags = b"\\HasChildren"
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        await self.assert_archive_done_in_its_folder_now(copier, job)

    async def test_a_folder_not_to_be_opened_for_now_is_retried(self) -> None:
        """An EXAMINE refused with a code that says for now (UNAVAILABLE, INUSE,
        SERVERBUG) is a transient failure of the job: nothing CREATEd, nothing sent."""
        await self.assert_examine_refusal_retried(b"NO [UNAVAILABLE] try later")

    async def test_a_folder_whose_examine_is_answered_bad_is_retried(self) -> None:
        """A BAD does not say the folder is gone (the session told it from a NO by its
        text alone, so it was taken as a plain NO, and the job failed on a CREATE over the
        name): a transient failure, nothing CREATEd or sent."""
        await self.assert_examine_refusal_retried(b"BAD Mailbox doesn't exist")

    async def test_a_folder_refused_a_moment_and_still_there_is_not_filled_again(
        self,
    ) -> None:
        """Archive's EXAMINE refused once with a NO naming no code (Office 365's "Server
        Unavailable"), its CREATE then refused as it exists, and it opens under the
        UIDVALIDITY recorded, every recorded UID in it: it was there all along. Its 4
        messages were taken as gone and looked for again, and the destination had rewritten
        them (another size, as Exchange and Gmail do): each was appended a second time."""
        copier, runner, job = await self.stopped_after_archive()
        archive = copier.dest.boxes["Archive"]
        validity = archive.uidvalidity
        for uid, msg in list(archive.messages.items()):
            archive.messages[uid] = replace(msg, data=b"X-Stored: yes\r\n" + msg.data)
        copier.dest.refuse_examine["Archive"] = b"NO Server Unavailable. 15"
        copier.dest.refuse_examine_once.add("Archive")
        copier.dest.refuse_create["Archive"] = b"NO [ALREADYEXISTS] Mailbox already exists"
        await self.one_run(copier, runner, job)
        self.assertEqual(len(copier.dest.boxes["Archive"].messages), 4)
        self.assertEqual(copier.dest.bodies("Later"), sorted(body("Later", n) for n in (1, 2)))
        self.assertEqual((await self.items(copier, job))["Archive"],
                         [("done", validity, uid) for uid in (1, 2, 3, 4)])
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def test_a_folder_refused_twice_and_there_is_retried_counts_kept(self) -> None:
        """Archive's EXAMINE refused with a NO naming no code, its CREATE refused as it
        exists, and its EXAMINE refused again: it may be there with its 4 messages (Office
        365 says "Server Unavailable" for a moment). The run is tried again later, nothing
        uncounted or marked in flight; refused alone, the job ended for good (R7)."""
        copier, runner, job = await self.stopped_after_archive()
        validity = copier.dest.boxes["Archive"].uidvalidity
        before = await self.counts(copier, job)
        copier.dest.refuse_examine["Archive"] = b"NO Server Unavailable. 15"
        copier.dest.refuse_create["Archive"] = b"NO [ALREADYEXISTS] Mailbox already exists"
        with self.assertRaises(TransientJobError) as caught:
            await self.one_run(copier, runner, job)
        self.assertIn("lists it but will not open it", str(caught.exception))
        self.assertEqual(len(copier.dest.boxes["Archive"].messages), 4)
        self.assertEqual((await self.items(copier, job))["Archive"],
                         [("done", validity, uid) for uid in (1, 2, 3, 4)])
        # Archive's counts as they were; the folders after it are copied meanwhile (Later's
        # 2): one never opening held them all back.
        self.assertEqual(await self.counts(copier, job), (before[0] + 2, before[1] + 2))
        self.assertEqual(copier.dest.bodies("Later"), sorted(body("Later", n) for n in (1, 2)))
        self.assertIn("every other folder was copied", str(caught.exception))
        # Open again: nothing of Archive is sent a second time.
        del copier.dest.refuse_examine["Archive"]
        await self.one_run(copier, runner, job)
        self.assertEqual(len(copier.dest.boxes["Archive"].messages), 4)
        self.assertEqual(copier.dest.bodies("Later"), sorted(body("Later", n) for n in (1, 2)))

    async def test_a_noselect_folder_that_cannot_be_made_is_refused_alone(self) -> None:
        """Archive listed \\Noselect and its CREATE refused: that folder alone is refused
        (the job fails naming it once the others are copied), Later is copied."""
        copier, runner, job = await self.stopped_after_archive()
        del copier.dest.boxes["Archive"]
        copier.dest.noselect.add("Archive")
        copier.dest.refuse_create["Archive"] = b"NO [ALREADYEXISTS] Mailbox already exists"
        with self.assertRaises(JobFailed) as caught:
            await self.one_run(copier, runner, job)
        self.assertIn("cannot take the folder 'Archive' (cannot create folder 'Archive' "
                      "(listed \\Noselect)", str(caught.exception))
        self.assertIn("[ALREADYEXISTS]", str(caught.exception))
        self.assertEqual(copier.dest.bodies("Later"), [body("Later", 1), body("Later", 2)])
        # Not there, not counted: looked for once Archive can be opened again.
        self.assertEqual([s for s, _v, _u in (await self.items(copier, job))["Archive"]],
                         ["inflight"] * 4)
        self.assertEqual(await self.counts(copier, job), (5, 5))

    async def test_a_noselect_folder_not_to_be_made_for_now_is_retried(self) -> None:
        """Archive listed \\Noselect and its CREATE refused with a code that says for now
        (UNAVAILABLE): a transient failure of the job, retried, not the folder refused for
        good (a failed job, ended) with its messages uncounted."""
        copier, runner, job = await self.stopped_after_archive()
        del copier.dest.boxes["Archive"]
        copier.dest.noselect.add("Archive")
        copier.dest.refuse_create["Archive"] = b"NO [UNAVAILABLE] try later"
        with self.assertRaises(TransientJobError):
            await self.one_run(copier, runner, job)
        self.assertEqual([s for s, _v, _u in (await self.items(copier, job))["Archive"]],
                         ["done"] * 4)
        del copier.dest.refuse_create["Archive"]
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def test_a_folder_examine_says_does_not_exist_is_made_again(self) -> None:
        """Archive deleted by another client after the run's LIST: its EXAMINE answered NO
        [NONEXISTENT] and the job failed as for now. It is gone: LISTed again, made and
        filled again."""
        copier, runner, job = await self.stopped_after_archive()
        copier.dest.gone_after_list.add("Archive")
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        await self.assert_archive_done_in_its_folder_now(copier, job)

    async def test_a_folder_with_copied_and_new_messages_is_examined_once(self) -> None:
        """Archive with two messages copied and two not yet: EXAMINEd twice, once for its
        UIDVALIDITY and once to list what it holds. One answer serves both."""
        copier, runner, job = await self.copier()
        await self.one_run(copier, runner, job)
        box = copier.dest.boxes["Archive"]
        later = [r for r in box.messages.values() if r.data in (body("Archive", 3),
                                                                 body("Archive", 4))]
        for uid in (3, 4):
            del box.messages[uid]

        def forget(conn: Connection) -> None:
            ids = select(messages.c.id).where(messages.c.folder == "Archive",
                                              messages.c.uid.in_((3, 4)))
            conn.execute(delete(mailbox_job_items).where(
                mailbox_job_items.c.message_row_id.in_(ids)))

        await copier.db.run("forget", forget)
        self.assertEqual(len(later), 2)
        copier.dest.commands.clear()
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        self.assertEqual([a for n, a in copier.dest.commands if n == b"EXAMINE"].count(
            b'"Archive"'), 1)
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def test_a_job_with_everything_copied_still_checks_its_folders(self) -> None:
        """A job run again once every message was recorded (a migrate whose backup sync
        failed is retried from it) returned before opening the destination: a folder
        made again meanwhile stayed empty."""
        copier, runner, job = await self.copier()
        await self.one_run(copier, runner, job)
        copier.dest.make("Later")
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        self.assertEqual(await self.counts(copier, job), (9, 9))
        copier.dest.commands.clear()
        await self.one_run(copier, runner, job)
        # Run again, unchanged: one EXAMINE a folder, nothing sent.
        self.assertEqual(sorted(a for n, a in copier.dest.commands if n == b"EXAMINE"),
                         [b'"Archive"', b'"INBOX"', b'"Later"'])
        self.assertNotIn(b"APPEND", [n for n, _ in copier.dest.commands])

    async def test_a_folder_unchanged_is_not_looked_at_again(self) -> None:
        copier, runner, job = await self.stopped_after_archive()
        copier.dest.commands.clear()
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        # One EXAMINE of each folder copied before (its UIDVALIDITY), nothing searched
        # there; Later's two messages in flight at the stop are looked for, as before.
        examined = [a for n, a in copier.dest.commands if n == b"EXAMINE"]
        self.assertEqual(sorted(examined), [b'"Archive"', b'"INBOX"', b'"Later"', b'"Later"'])
        searched = [a for n, a in copier.dest.commands if n == b"UID SEARCH"]
        self.assertEqual(searched, [b'HEADER Message-ID "<Later.1@source.test>"',
                                    b'HEADER Message-ID "<Later.2@source.test>"'])
        self.assertEqual(await self.counts(copier, job), (9, 9))

    async def test_an_appenduid_of_another_uidvalidity_records_no_uid(self) -> None:
        """An APPENDUID naming a UIDVALIDITY other than the folder's was recorded as where
        the message is, and its UID used to rule out what a resume looks for."""
        copier, runner, job = await self.copier()
        copier.dest.appenduid_validity = 424242
        await self.one_run(copier, runner, job)
        self.assert_copied(copier.dest)
        items = await self.items(copier, job)
        for folder in FOLDERS:
            validity = copier.dest.boxes[folder].uidvalidity
            self.assertEqual(items[folder], [("done", validity, None)] * FOLDERS[folder])


    async def test_a_folder_name_no_command_can_carry_is_refused_alone(self) -> None:
        """A backed-up folder whose name holds a control character (a source may list
        one, e.g. "&AAE-") raised BadFolderName out of the copy before any folder after it:
        the job failed as an internal error, Later never copied."""
        copier, runner, job = await self.copier()
        await copier.db.run("backup", thd_backed_up, job.user_id, job.account_id,
                            {"Bad\x01": 1})
        with self.assertRaises(JobFailed) as caught:
            await self.one_run(copier, runner, job)
        self.assertIn("cannot take the folder 'Bad\\x01' (folder name 'Bad\\x01' holds a "
                      "control character", str(caught.exception))
        self.assertIn("every other folder was copied", str(caught.exception))
        self.assert_copied(copier.dest)
        self.assertEqual(await self.counts(copier, job), (9, 9))


    async def test_folders_inside_a_namespace_prefix_are_examined_there(self) -> None:
        """On a destination whose folders live under "INBOX." (Courier, Cyrus) the copy
        EXAMINEd "Archive" where the writer had made and filled "INBOX.Archive": the
        destination answered NO, and every run of the job failed."""
        copier, runner, job = await self.copier()
        copier.dest.separator = b"."
        copier.dest.namespace = b'(("INBOX." ".")) NIL NIL'
        await self.one_run(copier, runner, job)
        self.assertEqual(sorted(copier.dest.boxes), ["INBOX", "INBOX.Archive", "INBOX.Later"])
        for folder in ("Archive", "Later"):
            self.assertEqual(copier.dest.bodies("INBOX." + folder),
                             sorted(body(folder, n) for n in range(1, FOLDERS[folder] + 1)))
        self.assertEqual(await self.counts(copier, job), (9, 9))
        copier.dest.commands.clear()
        await self.one_run(copier, runner, job)  # run again: each folder checked, unchanged
        self.assertEqual(sorted(a for n, a in copier.dest.commands if n == b"EXAMINE"),
                         [b'"INBOX"', b'"INBOX.Archive"', b'"INBOX.Later"'])
        self.assertNotIn(b"APPEND", [n for n, _ in copier.dest.commands])

    async def test_a_sync_passing_over_a_folder_it_opened_is_not_trusted_at_once(
        self,
    ) -> None:
        """A sync passed over Archive, which an earlier sync opened, on a plain NO
        (`SyncResult.unsure`: Dovecot's folder deleted with subfolders, or Office 365's
        "Server Unavailable" for a moment): the migrate took it as deleted and ended done
        without Archive's new mail. The job is retried in its "recheck" phase, kept through
        a failed sync and a resume after a crash in the copy, whose sync takes Archive as
        deleted when it passes it over again. A restore does not doubt."""
        copier, runner, job = await self.copier()
        refusal = "EXAMINE refused by source.test:143: Server Unavailable. 15"
        status = SimpleNamespace(sync_status="success", sync_error=None)
        synced: list[SyncResult] = []

        async def sync(account_id: int) -> SyncResult:
            return synced.pop(0)

        async def account(user_id: int, account_id: int) -> Any:
            return status

        cast(Any, copier.engine).sync = sync
        copier.accounts = cast(Any, SimpleNamespace(get=account))

        def passing_over(unsure: str | None) -> SyncResult:
            result = SyncResult(account_id=job.account_id, user_id=job.user_id,
                                started_at=datetime.datetime.now(UTC), status="success")
            result.folders["Archive"] = FolderResult(unsure=unsure)
            return result

        async def phase() -> str:
            return await copier.db.read("phase", lambda c: c.execute(
                select(mailbox_jobs.c.phase).where(mailbox_jobs.c.id == job.id)).scalar_one())

        job.phase = "backup"
        synced.append(passing_over(refusal))
        doubt = await copier.bring_backup_up_to_date(runner, job)
        assert doubt is not None
        self.assertIn(f"'Archive' ({refusal})", doubt)
        self.assertEqual(await phase(), "recheck")
        with self.assertRaises(TransientJobError) as raised:
            await copier.backup_synced(runner, job, doubt)
        self.assertIn(doubt, str(raised.exception))
        self.assertEqual(await phase(), "recheck")
        # The account's sync failed too: still "recheck", the reason saying both.
        status.sync_status, status.sync_error = "error", "INBOX: connection lost"
        with self.assertRaises(TransientJobError) as raised:
            await copier.backup_synced(runner, job, doubt)
        self.assertIn("connection lost", str(raised.exception))
        self.assertIn(doubt, str(raised.exception))
        self.assertEqual(await phase(), "recheck")
        status.sync_status, status.sync_error = "success", None
        # The next run (or one resumed after a crash in its copy) syncs again, and Archive
        # passed over again is taken as deleted: the job ends done.
        job.phase = "recheck"
        synced.append(passing_over(refusal))
        self.assertIsNone(await copier.bring_backup_up_to_date(runner, job))
        self.assertEqual(await phase(), "copy")
        await copier.backup_synced(runner, job, None)
        # Nor is a folder passed over that no earlier sync opened, nor any for a restore.
        for unsure, kind in ((None, "migrate"), (refusal, "restore")):
            job.phase, job.kind = "backup", kind
            synced.append(passing_over(unsure))
            self.assertIsNone(await copier.bring_backup_up_to_date(runner, job))
            self.assertEqual(await phase(), "copy")


class SQLiteResumeTests(ResumeMixin, TestCase):
    pass


class PostgresResumeTests(ResumeMixin, TestCase):
    backend = "postgresql"


"""Migrates and restores against a real Dovecot (issue 13).

Two users: the source holds 1,050 messages in nested folders with non-ASCII names, flags and
dates, backed up through the Dropmyemail API. A migrate into the second user leaves there
every message once, byte-exact, with the same flags, INTERNALDATE and folders; a second
migrate appends nothing. A restore after 50 messages and one folder were deleted at the
source puts them all back (the folder made again), without a duplicate; a restore of the
intact account appends nothing. Two restores (or two migrates into one mailbox) asked at once
make one job and a 409; a restored account is backed up, then migrated, once. A destination
over quota fails the job with the server's reason, and every message the job counts as
copied is there; a destination whose connection
is cut in the middle of the APPENDs (a proxy that drops it twice) is retried, and in the end
holds every message once. A folder with subfolders whose EXAMINE a source refuses for a
moment is migrated with its new mail, after a retry; one deleted there for good ends done
after one too. Messages over 1 MiB go streamed from the store: a 24 MiB one lands
byte-exact while Python's traced memory peaks at a few MiB (about three copies, over 70 MiB,
when it is read whole), and a cut in the middle of one is retried and lands once. Bad input is
a 4xx in the OAuth shape; another user's ids are 404.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import tracemalloc
from collections import Counter
from typing import Any

from sqlalchemy import Connection, insert, select, update
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols import portforward
from twisted.trial.unittest import TestCase

from mailcore.fetch.errors import FetchError
from mailcore.fetch.imap import ServerSpec, open_session
from mailcore.fetch.jobs import JobSettings
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.tls import client_tls
from mailcore.fetch.writer import mutf7_encode, refused_as_gone
from mailcore.store.schema import (
    fetch_accounts,
    fetch_folders,
    mailbox_job_items,
    mailbox_jobs,
    messages,
)
from tests.support.corpus import make_message
from tests.support.dovecot import DovecotClassMixin, DovecotServer
from tests.support.imap2api import LiveApi, live_api
from tests.support.oauth import access_token
from tests.support.reactor import get_reactor
from tests.support.servers import free_port

ADDRESS_LOGINS = """
passdb {
  driver = static
  args = password=secret
}
"""
QUOTA = """
mail_plugins = $mail_plugins quota
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=10K
}
"""

# Folder -> how many messages; nested, non-ASCII names (Dovecot's separator is "/").
FOLDERS = {"INBOX": 400, "Archiv/Größe": 250, "Archiv/Größe/2023": 150, "Проекты": 150,
           "Sent": 100}
FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "$Label1")

Entry = tuple[str, str, tuple[str, ...], Any]


def maildir_name(folder: str) -> str:
    """The folder as Dovecot names it on disk (modified UTF-7; doveadm takes UTF-8)."""
    return "/".join(mutf7_encode(p).decode("ascii") for p in folder.split("/"))


# Maildir info letters of the flags, and the keyword as Dovecot's first custom flag ("a").
_LETTERS = {"\\Seen": "S", "\\Flagged": "F", "\\Answered": "R", "$Label1": "a"}


def fill(server: DovecotServer, user: str, folders: dict[str, int], tag: str) -> int:
    """Write the corpus into `user`'s folders as Maildir files (fast: no doveadm per
    message or flag), with dates a day apart in the past and every fifth message from the
    k-th flagged with FLAGS[k]; then index each folder so UIDs follow the file order."""
    n = 0
    for folder, count in folders.items():
        box = server.folder_dir(user, maildir_name(folder))
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        if folder != "INBOX":
            (box / "maildirfolder").touch()
        (box / "dovecot-keywords").write_text("0 $Label1\n")
        for i in range(count):
            k = i % (len(FLAGS) + 1)
            letters = _LETTERS[FLAGS[k]] if k < len(FLAGS) else ""
            path = box / "cur" / f"{1_700_000_000 + n + i}.M{n + i}P{os.getpid()}.test:2,{letters}"
            path.write_bytes(make_message(n + i, tag).raw)
            # In the past (a server sets an INTERNALDATE in the future to now), a day apart.
            when = 1_200_000_000.0 + (n + i) * 86_399
            os.utime(path, (when, when))
        n += count
    for root, _dirs, files in os.walk(server.dir / "mail" / user):
        os.chown(root, server.uid, server.gid)
        for name in files:
            os.chown(os.path.join(root, name), server.uid, server.gid)
    for folder in folders:
        server.index(user, folder)  # doveadm takes names in UTF-8
    return n


def trusting(ca: str) -> Any:
    def factory(host: str, *, ca_pem: str | None = None,
                fingerprint: str | None = None) -> IOpenSSLClientConnectionCreator:
        return client_tls(host, ca_pem=ca_pem or ca, fingerprint=fingerprint)

    return factory


async def mailbox(server: DovecotServer, user: str, port: int | None = None) -> Counter[Entry]:
    """Every message of the user as (folder, SHA-256 of its bytes, flags, INTERNALDATE)."""
    spec = ServerSpec(host="localhost", port=port or server.imap, use_ssl=False,
                      start_tls=False, allow_cleartext=True, username=user,
                      password=server.PASSWORD)
    session = await open_session(
        get_reactor(), spec, client_tls("localhost", ca_pem=server.pki.ca_pem.decode()),
        policy=FetchSettings(allow_loopback=True).address_policy())
    out: Counter[Entry] = Counter()
    try:
        for folder in await session.list_folders():
            if not folder.selectable:
                continue
            try:
                info = await session.examine(folder.name)
            except FetchError as e:  # listed, deleted while it had subfolders
                if refused_as_gone(session, e):
                    continue
                raise
            if not info.exists:
                continue
            for item in await session.uid_fetch(b"1:*", b"UID FLAGS INTERNALDATE BODY.PEEK[]"):
                assert item.body is not None
                out[(folder.name, hashlib.sha256(item.body).hexdigest(),
                     tuple(sorted(item.flags or ())), item.internal_date)] += 1
    finally:
        await session.close_session()
    return out


async def bearer(api: LiveApi, token: str, method: str, path: str,
                 **kwargs: Any) -> tuple[int, Any]:
    return await api.call(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


class Setup:
    """A live API with the job runner started, a user with a token, and a backed-up
    source account."""

    api: LiveApi
    token: str
    account_id: int
    source: str


class JobsAgainstDovecotTests(DovecotClassMixin, TestCase):
    timeout = 240
    extra_config = ADDRESS_LOGINS

    async def setup(self, folders: dict[str, int], *, tag: str = "jobs") -> Setup:
        server = await self.dovecot()
        source = f"{server.new_user()}@example.test"
        fill(server, source, folders, tag)
        api = await live_api(self, {})
        api.core.fetch.engine.tls_factory = trusting(server.pki.ca_pem.decode())
        runner = api.core.job_runner
        runner.settings = JobSettings(retry_base=0.2, retry_max=0.5, poll=0.5)
        runner.startService()
        self.addCleanup(runner.stopService)
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": source, "password": server.PASSWORD, "host": "localhost",
            "port": server.imap, "protocol": "imap"})
        self.assertEqual(status, 201, created)
        result = await api.core.fetch.engine.sync(created["id"])
        self.assertEqual(result.status, "success", result.error)
        s = Setup()
        s.api, s.token, s.account_id, s.source = api, token, created["id"], source
        return s

    async def finished(self, s: Setup, kind: str, job_id: int) -> dict[str, Any]:
        """Wait for the job to end; its JSON."""
        for _ in range(2400):
            await s.api.core.job_runner.settle()
            status, job = await bearer(s.api, s.token, "GET",
                                       f"/v1/accounts/{s.account_id}/{kind}s/{job_id}")
            self.assertEqual(status, 200, job)
            if job["status"] in ("done", "failed"):
                return job  # type: ignore[no-any-return]
            d: defer.Deferred[None] = defer.Deferred()
            get_reactor().callLater(0.05, d.callback, None)
            await d
        self.fail(f"{kind} {job_id} did not end")

    async def migrate(self, s: Setup, destination: str, port: int | None = None
                      ) -> dict[str, Any]:
        server = await self.dovecot()
        status, job = await bearer(s.api, s.token, "POST",
                                   f"/v1/accounts/{s.account_id}/migrates", json={
                                       "email": destination, "password": server.PASSWORD,
                                       "host": "localhost", "port": port or server.imap})
        self.assertEqual(status, 201, job)
        self.assertNotIn("password", job)
        self.assertEqual((job["status"], job["email"], job["backup_id"]),
                         ("queued", destination, s.account_id))
        return await self.finished(s, "migrate", job["id"])

    async def migrate_through_cuts(self, s: Setup, threshold: int, cuts: int
                                   ) -> tuple[dict[str, Any], str, CuttingProxy]:
        """A migrate of `s` to a new user, through a proxy that cuts the connection
        `cuts` times past `threshold` bytes: (the finished job, the destination, the
        proxy)."""
        server = await self.dovecot()
        destination = f"{server.new_user()}@example.test"
        proxy = CuttingProxy(server.imap, threshold=threshold, cuts=cuts)
        port = get_reactor().listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        job = await self.migrate(s, destination, port.getHost().port)
        return job, destination, proxy

    async def test_migrate_copies_everything_once_and_a_second_appends_nothing(self) -> None:
        server = await self.dovecot()
        s = await self.setup(FOLDERS)
        total = sum(FOLDERS.values())
        destination = f"{server.new_user()}@example.test"
        before = await mailbox(server, s.source)
        self.assertEqual(sum(before.values()), total)

        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["reason"]), ("done", None), job)
        self.assertEqual((job["messages"], job["downloaded"], job["appended"]),
                         (total, total, total))
        self.assertEqual(len(job["message_ids"]), total)
        self.assertIsNotNone(job["end_time"])
        # Every message once, byte-exact, same flags, INTERNALDATE and folder.
        self.assertEqual(await mailbox(server, destination), before)

        again = await self.migrate(s, destination)
        self.assertEqual((again["status"], again["downloaded"], again["appended"]),
                         ("done", total, 0), again)
        self.assertEqual(await mailbox(server, destination), before)

        status, listed = await bearer(s.api, s.token, "GET",
                                      f"/v1/accounts/{s.account_id}/migrates"
                                      "?sort=end_time&direction=desc")
        self.assertEqual(status, 200, listed)
        self.assertEqual([m["id"] for m in listed], [again["id"], job["id"]])
        # /metrics counts the jobs and the messages.
        status, metrics = await s.api.call("GET", "/metrics")
        text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
        self.assertIn('mailcore_mailbox_job_messages_total{kind="migrate",outcome="appended"} '
                      f"{float(total)}", text)
        self.assertIn('mailcore_mailbox_jobs_finished_total{kind="migrate",status="done"} 2.0',
                      text)

    async def test_a_pop3_backup_migrates_into_an_imap_inbox_once(self) -> None:
        server = await self.dovecot()
        s = await self.setup({}, tag="pop-none")
        source = f"{server.new_user()}@example.test"
        fill(server, source, {"INBOX": 40}, "pop")
        status, created = await bearer(s.api, s.token, "POST", "/v1/accounts", json={
            "email": source, "password": server.PASSWORD, "host": "localhost",
            "port": server.pop3, "protocol": "pop"})
        self.assertEqual(status, 201, created)
        result = await s.api.core.fetch.engine.sync(created["id"])
        self.assertEqual((result.status, result.new_messages), ("success", 40), result.error)
        s.account_id = created["id"]
        status, refused = await bearer(s.api, s.token, "POST",
                                       f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual((status, refused["error"]), (400, "invalid_request"))
        self.assertIn("POP3", refused["error_description"])
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["appended"]), ("done", 40), job)
        bodies = Counter(h for _f, h, _fl, _d in await mailbox(server, source))
        landed = await mailbox(server, destination)
        self.assertEqual(Counter(h for _f, h, _fl, _d in landed), bodies)
        self.assertEqual({f for f, _h, _fl, _d in landed}, {"INBOX"})
        # POP3 keeps no dates: the second migrate finds each message by its Message-ID.
        again = await self.migrate(s, destination)
        self.assertEqual((again["status"], again["downloaded"], again["appended"]),
                         ("done", 40, 0), again)
        self.assertEqual(sum((await mailbox(server, destination)).values()), 40)

    async def test_restore_puts_back_deleted_messages_and_folders_once(self) -> None:
        server = await self.dovecot()
        folders = {"INBOX": 120, "Archiv/Größe": 60, "Проекты": 40}
        s = await self.setup(folders, tag="restore")
        before = await mailbox(server, s.source)
        user = s.source
        # 50 messages go: 30 from INBOX, 20 from Archiv/Größe; and the folder Проекты.
        server.expunge(user, "INBOX", "1:30")
        server.expunge(user, "Archiv/Größe", "11:30")
        server.doveadm_run("mailbox", "delete", "-u", user, "Проекты")
        self.assertEqual(sum((await mailbox(server, user)).values()),
                         sum(folders.values()) - 50 - 40)

        status, job = await bearer(s.api, s.token, "POST",
                                   f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual(status, 201, job)
        self.assertEqual((job["status"], job["user_id"]), ("queued", job["user_id"]))
        job = await self.finished(s, "restore", job["id"])
        self.assertEqual((job["status"], job["messages"], job["appended"]), ("done", 90, 90),
                         job)
        self.assertGreater(job["restore_size"], 0)
        self.assertEqual(await mailbox(server, user), before)

        # The account is whole again: a second restore appends nothing.
        status, second = await bearer(s.api, s.token, "POST",
                                      f"/v1/accounts/{s.account_id}/restores")
        second = await self.finished(s, "restore", second["id"])
        self.assertEqual((second["status"], second["messages"], second["appended"]),
                         ("done", 0, 0), second)
        self.assertEqual(await mailbox(server, user), before)
        status, listed = await bearer(s.api, s.token, "GET",
                                      f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual([r["id"] for r in listed], [job["id"], second["id"]])

    async def test_a_place_an_earlier_restore_was_told_wrongly_does_not_hide_a_loss(
        self,
    ) -> None:
        """An earlier restore recorded where each message went back from the server's
        APPENDUID; one that named another message's UID (a lying server) made a later
        restore take the message for there while that UID held the other one: it was
        never put back, and the restore said done."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3}, tag="appenduid")
        before = await mailbox(server, s.source)
        rows = await s.api.core.db.read("rows", lambda c: c.execute(
            select(messages.c.id, messages.c.uidvalidity, messages.c.uid)
            .where(messages.c.account_id == s.account_id).order_by(messages.c.uid)).all())
        (first, validity, _uid), (_second, _v, second_uid) = rows[0], rows[1]
        server.expunge(s.source, "INBOX", "1")
        alice = await s.api.core.identity.find_user("alice")
        assert alice is not None

        def told(conn: Connection) -> None:  # a done restore whose APPENDUID lied
            now = datetime.datetime.now(datetime.UTC)
            job = conn.execute(insert(mailbox_jobs).values(
                kind="restore", user_id=alice.id, account_id=s.account_id, status="done",
                phase="copy", created_at=now, updated_at=now, end_time=now)
                .returning(mailbox_jobs.c.id)).scalar_one()
            conn.execute(insert(mailbox_job_items).values(
                job_id=job, message_row_id=first, state="done", dest_uidvalidity=validity,
                dest_uid=second_uid))

        await s.api.core.db.run("told", told)
        status, job = await bearer(s.api, s.token, "POST",
                                   f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual(status, 201, job)
        job = await self.finished(s, "restore", job["id"])
        self.assertEqual((job["status"], job["messages"], job["appended"]), ("done", 1, 1), job)
        self.assertEqual(await mailbox(server, s.source), before)

    async def test_a_folder_the_destination_cannot_take_fails_alone_at_once(self) -> None:
        """Dovecot (Maildir++) refuses a '.' in a folder name with NO [CANNOT]: the CREATE's
        refusal was a transient error, retried 8 times over some 20 minutes, and the folders
        after it in name order were never copied; the job ended 'gave up after 8 attempts'."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3, "Archive": 2, "Sent": 2}, tag="cannot")
        source = await mailbox(server, s.source)

        def rename(conn: Connection) -> None:  # backed up from a server that takes '.'
            folder = fetch_folders.c
            conn.execute(update(fetch_folders).where(folder.account_id == s.account_id,
                                                     folder.name == "Archive")
                         .values(name="Arch.ive"))
            conn.execute(update(messages).where(messages.c.account_id == s.account_id,
                                                messages.c.folder == "Archive")
                         .values(folder="Arch.ive"))

        await s.api.core.db.run("rename", rename)
        server.doveadm_run("mailbox", "delete", "-u", s.source, "Archive")  # not synced again
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["attempts"], job["downloaded"], job["appended"]),
                         ("failed", 1, 5, 5), job)
        self.assertRegex(job["reason"], r"^the destination cannot take the folder 'Arch\.ive' "
                         r"\(.*\[CANNOT\].*\); every other folder was copied$")
        landed = await mailbox(server, destination)
        self.assertEqual(landed, Counter({e: n for e, n in source.items()
                                          if e[0] != "Archive"}))

    async def test_a_folder_deleted_with_subfolders_at_the_destination_is_filled_again(
        self,
    ) -> None:
        """Dovecot still lists a folder deleted while it had subfolders (\\HasChildren, not
        \\Noselect) and answers its EXAMINE with a plain NO: a migrate into that mailbox
        failed on the EXAMINE as for now, every run until the job failed."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3, "Archive": 2, "Archive/2023": 2}, tag="parent")
        source = await mailbox(server, s.source)
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["appended"]), ("done", 7), job)
        server.doveadm_run("mailbox", "delete", "-u", destination, "Archive")
        again = await self.migrate(s, destination)
        self.assertEqual((again["status"], again["downloaded"], again["appended"]),
                         ("done", 7, 2), again)
        self.assertEqual(await mailbox(server, destination), source)

    async def test_an_account_with_a_folder_deleted_with_subfolders_is_backed_up_and_restored(
        self,
    ) -> None:
        """Dovecot still lists a folder deleted while it had subfolders (\\HasChildren, not
        \\Noselect) and answers its EXAMINE with a plain NO: every backup sync of such an
        account failed on it, and a restore retried on it until it failed."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3, "Archive": 2, "Archive/2023": 2}, tag="gone")
        server.doveadm_run("mailbox", "delete", "-u", s.source, "Archive")
        left = await mailbox(server, s.source)
        self.assertEqual(Counter(e[0] for e in left), {"INBOX": 3, "Archive/2023": 2})
        server.expunge(s.source, "Archive/2023", "1")

        result = await s.api.core.fetch.engine.sync(s.account_id)
        self.assertEqual((result.status, result.problems()), ("success", None))
        self.assertEqual(result.folders["Archive"].error, None)
        # Nothing failed, for the account nor for a folder.
        self.assertEqual(await s.api.core.db.read("errors", lambda c: (
            c.execute(select(fetch_accounts.c.sync_status, fetch_accounts.c.sync_error)
                      .where(fetch_accounts.c.id == s.account_id)).one()._tuple(),
            c.execute(select(fetch_folders.c.sync_error)
                      .where(fetch_folders.c.account_id == s.account_id)).scalars().all(),
        )), (("success", None), [None, None, None]))

        status, job = await bearer(s.api, s.token, "POST",
                                   f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual(status, 201, job)
        job = await self.finished(s, "restore", job["id"])
        # Archive's two come back (the folder made again), and the one expunged from 2023.
        self.assertEqual((job["status"], job["messages"], job["appended"]), ("done", 3, 3),
                         job)
        restored = await mailbox(server, s.source)
        self.assertEqual(Counter(e[0] for e in restored),
                         {"INBOX": 3, "Archive": 2, "Archive/2023": 2})
        self.assertEqual(sum(restored.values()), len(set(restored)))

    async def test_a_folder_refused_for_a_moment_is_migrated_with_its_new_mail(self) -> None:
        """A folder listed \\HasChildren that an earlier sync opened, its EXAMINE answered a
        plain NO (Office 365's momentary "Server Unavailable"; Dovecot's for a folder
        deleted while it had subfolders): the migrate's sync passed it over and the job
        ended done without the mail that had come into it since the last sync. The job is
        retried and its next sync gets that mail; a folder deleted with subfolders for good
        is passed over again by that sync and the job ends done."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3, "Archive": 2, "Archive/2023": 2}, tag="moment")
        server.add_messages(s.source, "Archive",
                            [make_message(100 + n, "moment").raw for n in range(2)])
        source = await mailbox(server, s.source)
        self.assertEqual(Counter(e[0] for e in source),
                         {"INBOX": 3, "Archive": 4, "Archive/2023": 2})
        # Both EXAMINEs of Archive in the first sync (the one of a folder synced before,
        # and the one after LIST) are refused.
        proxy = RefusingProxy(server.imap, b"Archive", b"NO Server Unavailable. 15", times=2)
        listening = get_reactor().listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

        def through_proxy(conn: Connection) -> None:
            # In cleartext, for the proxy to read the commands.
            conn.execute(update(fetch_accounts).where(fetch_accounts.c.id == s.account_id)
                         .values(port=listening.getHost().port, use_ssl=False,
                                 start_tls=False, allow_cleartext=True))

        await s.api.core.db.run("through_proxy", through_proxy)
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual(proxy.times, 0)
        self.assertEqual((job["status"], job["attempts"], job["downloaded"], job["appended"]),
                         ("done", 2, 9, 9), job)
        self.assertEqual(await mailbox(server, destination), source)

        # Deleted for good: Dovecot answers the same NO at every sync.
        server.doveadm_run("mailbox", "delete", "-u", s.source, "Archive")
        other = f"{server.new_user()}@example.test"
        job = await self.migrate(s, other)
        self.assertEqual((job["status"], job["attempts"], job["downloaded"], job["appended"]),
                         ("done", 2, 9, 9), job)
        self.assertEqual(await mailbox(server, other), source)  # what was backed up

    async def test_jobs_asked_twice_at_once_write_each_message_once(self) -> None:
        """Two restores (or two migrates into one mailbox) asked at once ran at once: each
        found the same messages missing and each appended them, 300 deleted messages came
        back as 600 (found by an audit). The second is a 409 naming the first."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 300}, tag="twice")
        before = await mailbox(server, s.source)
        destination = f"{server.new_user()}@example.test"
        base = f"/v1/accounts/{s.account_id}"
        target = {"email": destination, "password": server.PASSWORD, "host": "localhost",
                  "port": server.imap}
        for kind, body in (("migrate", target), ("restore", None)):
            if kind == "restore":
                server.expunge(s.source, "INBOX", "1:300")
            replies = await defer.gatherResults([defer.Deferred.fromCoroutine(
                bearer(s.api, s.token, "POST", f"{base}/{kind}s", json=body))
                for _ in range(2)])
            self.assertEqual(sorted(status for status, _ in replies), [201, 409], replies)
            job = next(reply for status, reply in replies if status == 201)
            refused = next(reply for status, reply in replies if status == 409)
            self.assertEqual(refused["error"], "conflict")
            self.assertIn(f"{kind} {job['id']} ", refused["error_description"])
            job = await self.finished(s, kind, job["id"])
            self.assertEqual((job["status"], job["appended"]), ("done", 300), job)
        self.assertEqual(await mailbox(server, destination), before)
        self.assertEqual(await mailbox(server, s.source), before)
        # Ended, a restore may be asked again (and finds nothing to write).
        status, again = await bearer(s.api, s.token, "POST", f"{base}/restores")
        self.assertEqual(status, 201, again)
        again = await self.finished(s, "restore", again["id"])
        self.assertEqual(again["appended"], 0, again)

    async def test_a_restored_account_is_backed_up_and_migrated_once(self) -> None:
        """The messages a restore put back were backed up again under their new UIDs: the
        account counted 100 messages for 50 and a migrate then wrote each twice (found by
        an audit)."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 50}, tag="again")
        before = await mailbox(server, s.source)
        server.expunge(s.source, "INBOX", "1:50")
        base = f"/v1/accounts/{s.account_id}"
        status, job = await bearer(s.api, s.token, "POST", f"{base}/restores")
        self.assertEqual(status, 201, job)
        job = await self.finished(s, "restore", job["id"])
        self.assertEqual((job["status"], job["appended"]), ("done", 50), job)
        result = await s.api.core.fetch.engine.sync(s.account_id)
        self.assertEqual(result.status, "success", result.error)
        status, account = await bearer(s.api, s.token, "GET", base)
        self.assertEqual((status, account["msg_count"]), (200, 50), account)
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["appended"]), ("done", 50), job)
        self.assertEqual(await mailbox(server, destination), before)

    async def test_a_failed_backup_sync_copies_the_backup_then_fails_the_job(self) -> None:
        """The sync before the copy failed (the source unreachable): the job copied what was
        backed up and ended "done", the failure in a log line only (found by an audit)."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 4, "Archive": 2}, tag="unsynced")
        before = await mailbox(server, s.source)
        s.api.core.job_runner.settings = JobSettings(retry_base=0.2, retry_max=0.5, poll=0.5,
                                                     max_attempts=2)
        closed = free_port()

        def unreachable(conn: Connection) -> None:
            conn.execute(update(fetch_accounts).where(fetch_accounts.c.id == s.account_id)
                         .values(port=closed))

        await s.api.core.db.run("unreachable", unreachable)
        destination = f"{server.new_user()}@example.test"
        job = await self.migrate(s, destination)
        self.assertEqual((job["status"], job["attempts"], job["appended"]), ("failed", 2, 6),
                         job)
        self.assertRegex(job["reason"], r"^gave up after 2 attempts: the backup sync before "
                         rf"the copy failed \(cannot connect to localhost:{closed}: .*\); "
                         r"what was backed up is copied$")
        self.assertEqual(await mailbox(server, destination), before)  # each message once

    async def test_a_failed_backup_sync_restores_the_backup_then_fails_the_job(self) -> None:
        """The sync before a restore failed (a folder the account is to sync is not on the
        server, the account reachable): the restore put back what was backed up and ended
        "done", the failure in a log line only, where a migrate is retried and fails."""
        server = await self.dovecot()
        s = await self.setup({"INBOX": 4, "Archive": 2}, tag="restore-unsynced")
        before = await mailbox(server, s.source)
        server.expunge(s.source, "INBOX", "1:2")
        s.api.core.job_runner.settings = JobSettings(retry_base=0.2, retry_max=0.5, poll=0.5,
                                                     max_attempts=2)

        def vanished(conn: Connection) -> None:
            conn.execute(update(fetch_accounts).where(fetch_accounts.c.id == s.account_id)
                         .values(folders_to_sync="INBOX,Archive,Vanished"))

        await s.api.core.db.run("vanished", vanished)
        status, job = await bearer(s.api, s.token, "POST",
                                   f"/v1/accounts/{s.account_id}/restores")
        self.assertEqual(status, 201, job)
        job = await self.finished(s, "restore", job["id"])
        self.assertEqual((job["status"], job["attempts"], job["appended"]), ("failed", 2, 2),
                         job)
        self.assertEqual(job["reason"], "gave up after 2 attempts: the backup sync before the "
                         "copy failed (Vanished: folder not found on the server); what was "
                         "backed up is copied")
        self.assertEqual(await mailbox(server, s.source), before)  # each message once

    async def test_a_cut_connection_is_retried_and_every_message_lands_once(self) -> None:
        server = await self.dovecot()
        folders = {"INBOX": 300, "Archiv/Größe": 200}
        s = await self.setup(folders, tag="cut")
        before = await mailbox(server, s.source)
        job, destination, _ = await self.migrate_through_cuts(s, 150_000, cuts=2)
        self.assertEqual(job["status"], "done", job)
        self.assertGreaterEqual(job["attempts"], 3)  # two cuts, then the run that finished
        self.assertEqual(job["downloaded"], sum(folders.values()))
        self.assertEqual(await mailbox(server, destination), before)

    async def test_bad_input_is_4xx_and_other_users_see_nothing(self) -> None:
        server = await self.dovecot()
        s = await self.setup({"INBOX": 3}, tag="bad")
        base = f"/v1/accounts/{s.account_id}"
        checks: list[tuple[str, str, dict[str, Any], int]] = [
            ("POST", f"{base}/migrates", {"email": "x@example.test"}, 400),
            ("POST", f"{base}/migrates", {"password": "p"}, 400),
            ("POST", f"{base}/migrates", {"email": "x@example.test", "password": "p",
                                          "protocol": "pop", "host": "localhost"}, 400),
            ("POST", f"{base}/migrates", {"email": "x@example.test", "password": "p",
                                          "port": 70000, "host": "localhost"}, 400),
            ("POST", f"{base}/migrates", {"email": "x@example.test", "password": "p",
                                          "ssl": "maybe", "host": "localhost"}, 400),
            ("POST", f"{base}/migrates", {"email": "x@gmail.com", "password": "p"}, 400),
            ("POST", f"{base}/migrates", {"email": "nobody", "password": "p"}, 400),
            ("POST", f"{base}/migrates", {"email": "u2@example.test", "password": "wrong",
                                          "host": "localhost", "port": server.imap}, 400),
            ("POST", f"{base}/migrates", {"email": "u2@example.test", "password": "p",
                                          "bogus": 1}, 400),
            ("GET", f"{base}/migrates?sort=size", {}, 400),
            ("GET", f"{base}/restores?direction=up", {}, 400),
            ("GET", f"{base}/migrates/{2**63}", {}, 404),
            ("GET", f"{base}/migrates/x", {}, 404),
            ("GET", f"/v1/accounts/{s.account_id + 1}/migrates", {}, 404),
            ("POST", f"/v1/accounts/{s.account_id + 1}/restores", {}, 404),
            ("POST", f"/v1/accounts/{s.account_id + 1}/migrates",
             {"email": "u2@example.test", "password": "secret", "host": "localhost",
              "port": server.imap}, 404),
        ]
        for method, path, body, expected in checks:
            kwargs = {"json": body} if method == "POST" else {}
            status, reply = await bearer(s.api, s.token, method, path, **kwargs)
            self.assertEqual(status, expected, (method, path, body, reply))
            self.assertIn("error", reply, (path, reply))
            self.assertIn("error_description", reply, (path, reply))
        status, reply = await bearer(s.api, s.token, "POST", f"{base}/migrates", json={
            "email": "u2@example.test", "password": "wrong", "host": "localhost",
            "port": server.imap})
        self.assertIn("could not log in to localhost", reply["error_description"])
        self.assertEqual(await s.api.core.db.read(
            "n", lambda c: c.exec_driver_sql("select count(*) from mailbox_jobs").scalar()), 0)
        # A read-only token cannot start jobs.
        alice = await s.api.core.identity.find_user("alice")
        reader = await access_token(s.api.core.oauth, alice.id, scope="read")
        status, reply = await bearer(s.api, reader, "POST", f"{base}/restores")
        self.assertEqual((status, reply["error"]), (403, "insufficient_scope"))
        # Bob sees none of Alice's jobs, and cannot make any on her account.
        status, job = await bearer(s.api, s.token, "POST", f"{base}/restores")
        self.assertEqual(status, 201)
        await self.finished(s, "restore", job["id"])
        bob = await s.api.core.identity.create_user("bob", "bob@example.test", "pw")
        bob_token = await access_token(s.api.core.oauth, bob.id)
        for method, path in (("GET", f"{base}/restores"), ("GET", f"{base}/restores/{job['id']}"),
                             ("POST", f"{base}/restores"), ("GET", f"{base}/migrates")):
            status, reply = await bearer(s.api, bob_token, method, path)
            self.assertEqual((status, reply["error"]), (404, "not_found"), (path, reply))


    async def test_large_messages_are_streamed_byte_exact_in_bounded_memory(self) -> None:
        server = await self.dovecot()
        s = await self.setup({"INBOX": 30, "Sent": 10}, tag="large")
        big = add_large(server, s.source, [1_500_000, 24 * 1024 * 1024])
        result = await s.api.core.fetch.engine.sync(s.account_id)
        self.assertEqual(result.status, "success", result.error)
        before = await mailbox(server, s.source)
        destination = f"{server.new_user()}@example.test"
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            job = await self.migrate(s, destination)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        self.assertEqual((job["status"], job["appended"]), ("done", 42), job)
        after = await mailbox(server, destination)
        self.assertEqual(after, before)
        hashes = {h for _f, h, _fl, _d in after}
        for raw in big:
            self.assertIn(hashlib.sha256(raw).hexdigest(), hashes)
        # The 24 MiB message was never held whole (nor several times): a chunk or two.
        self.assertLess(peak, 8 * 1024 * 1024, f"peak {peak} bytes during the migrate")

    async def test_a_cut_in_a_streamed_message_is_retried_and_lands_once(self) -> None:
        server = await self.dovecot()
        s = await self.setup({"INBOX": 20}, tag="large-cut")
        add_large(server, s.source, [6 * 1024 * 1024])
        result = await s.api.core.fetch.engine.sync(s.account_id)
        self.assertEqual(result.status, "success", result.error)
        before = await mailbox(server, s.source)
        job, destination, proxy = await self.migrate_through_cuts(s, 3_000_000, cuts=1)
        self.assertEqual(job["status"], "done", job)
        self.assertGreaterEqual(job["attempts"], 2)
        self.assertEqual(proxy.cuts, 0)
        self.assertEqual(await mailbox(server, destination), before)


def large_message(n: int, size: int) -> bytes:
    """A message of `size` bytes: text lines of every printable byte, 8-bit ones too."""
    head = (f"Message-ID: <large-{n}@example.test>\r\nSubject: large {n}\r\n"
            "From: big@example.test\r\nContent-Type: application/octet-stream\r\n"
            "\r\n").encode()
    unit = bytes(range(32, 256)) + b"\r\n"
    body = unit * ((size - len(head)) // len(unit) + 1)
    return head + body[:size - len(head) - 2] + b"\r\n"


def add_large(server: DovecotServer, user: str, sizes: list[int]) -> list[bytes]:
    """Large messages put into the user's INBOX (after what `fill` wrote), indexed."""
    box = server.folder_dir(user, "INBOX")
    out = []
    for k, size in enumerate(sizes):
        raw = large_message(k, size)
        path = box / "cur" / f"1800000000.L{k}P{os.getpid()}.test:2,S"
        path.write_bytes(raw)
        when = 1_100_000_000.0 + k * 3600
        os.utime(path, (when, when))
        os.chown(path, server.uid, server.gid)
        out.append(raw)
    server.index(user, "INBOX")
    return out


class QuotaDestinationTests(DovecotClassMixin, TestCase):
    """A destination that refuses APPENDs (over quota) fails the job with its reason; what
    the job counts as copied is exactly what is there."""

    timeout = 120
    extra_config = ADDRESS_LOGINS + QUOTA

    async def test_over_quota_fails_with_the_reason_and_counts_only_what_landed(self) -> None:
        server = await self.dovecot()
        # Every user may hold 10 KiB (about twenty of the messages); the source's messages are
        # written to its Maildir directly, which the quota does not stop, and only read.
        source = f"{server.new_user()}@example.test"
        fill(server, source, {"INBOX": 60}, "quota")
        api = await live_api(self, {})
        api.core.fetch.engine.tls_factory = trusting(server.pki.ca_pem.decode())
        runner = api.core.job_runner
        runner.settings = JobSettings(retry_base=0.2, retry_max=0.5, poll=0.5)
        runner.startService()
        self.addCleanup(runner.stopService)
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": source, "password": server.PASSWORD, "host": "localhost",
            "port": server.imap})
        self.assertEqual(status, 201, created)
        await api.core.fetch.engine.sync(created["id"])
        destination = f"{server.new_user()}@example.test"
        status, job = await bearer(api, token, "POST",
                                   f"/v1/accounts/{created['id']}/migrates", json={
                                       "email": destination, "password": server.PASSWORD,
                                       "host": "localhost", "port": server.imap})
        self.assertEqual(status, 201, job)
        for _ in range(600):
            await runner.settle()
            status, job = await bearer(api, token, "GET",
                                       f"/v1/accounts/{created['id']}/migrates/{job['id']}")
            if job["status"] in ("done", "failed"):
                break
            d: defer.Deferred[None] = defer.Deferred()
            get_reactor().callLater(0.05, d.callback, None)
            await d
        self.assertEqual(job["status"], "failed", job)
        self.assertIn("refused", job["reason"])
        self.assertIn("quota", job["reason"].lower())
        landed = await mailbox(server, destination)
        self.assertEqual(sum(landed.values()), job["appended"])
        self.assertEqual(job["downloaded"], job["appended"])
        self.assertLess(job["appended"], 60)


class _Forwarding(portforward.ProxyServer):
    """A connection to a proxy (its factory has the `port` forwarded to), read once the
    proxy's own to the server is made by a `clients` factory."""

    clients: type[portforward.ProxyClientFactory] = portforward.ProxyClientFactory

    def connectionMade(self) -> None:
        mine: Any = self.transport
        mine.pauseProducing()
        client = self.clients()
        client.setServer(self)
        get_reactor().connectTCP("127.0.0.1", self.factory.port, client)  # type: ignore[attr-defined]


class _NoStartTLS(portforward.ProxyClient):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data.replace(b" STARTTLS", b""))


class _NoStartTLSFactory(portforward.ProxyClientFactory):
    protocol = _NoStartTLS


class _Refusing(_Forwarding):
    clients = _NoStartTLSFactory
    pending = b""

    def dataReceived(self, data: bytes) -> None:
        owner: RefusingProxy = self.factory  # type: ignore[assignment]
        self.pending += data
        while b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
            words = line.split()
            if (owner.times > 0 and len(words) >= 3 and words[1].upper() == b"EXAMINE"
                    and words[2].strip(b'"') == owner.folder):
                owner.times -= 1
                mine: Any = self.transport
                mine.write(words[0] + b" " + owner.answer + b"\r\n")
                continue
            super().dataReceived(line + b"\n")


class RefusingProxy(protocol.Factory):
    """A TCP proxy to 127.0.0.1:`port` that answers the EXAMINE of `folder` itself with
    `answer`, `times` times in all; every other line passes untouched, but for STARTTLS
    left out of the server's capabilities (the proxy reads the commands in cleartext)."""

    protocol = _Refusing  # type: ignore[assignment]

    def __init__(self, port: int, folder: bytes, answer: bytes, *, times: int) -> None:
        self.port = port
        self.folder = folder
        self.answer = answer
        self.times = times


class _Cutting(_Forwarding):
    seen = 0

    def dataReceived(self, data: bytes) -> None:
        owner: CuttingProxy = self.factory  # type: ignore[assignment]
        self.seen += len(data)
        if owner.cuts > 0 and self.seen > owner.threshold:
            owner.cuts -= 1
            keep = len(data) - (self.seen - owner.threshold)
            peer: Any = self.peer
            mine: Any = self.transport
            if keep > 0 and peer is not None:
                peer.transport.write(data[:keep])
            mine.abortConnection()
            if peer is not None:
                peer.transport.abortConnection()
            return
        super().dataReceived(data)


class CuttingProxy(protocol.Factory):
    """A TCP proxy to 127.0.0.1:`port` that drops a connection (both sides, at once) when
    the client has sent more than `threshold` bytes on it, `cuts` times in all; sessions
    that send little (logins, reads) pass untouched."""

    protocol = _Cutting  # type: ignore[assignment]

    def __init__(self, port: int, *, threshold: int, cuts: int) -> None:
        self.port = port
        self.threshold = threshold
        self.cuts = cuts

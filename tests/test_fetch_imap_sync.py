"""IMAP sync against a real Dovecot: complete, incremental, kill-safe, UIDVALIDITY-safe.

One Dovecot serves the whole class; each test takes a fresh user and fills its mailbox with
500 messages in INBOX, Archive and Sent (threads, attachments, non-ASCII headers, 8-bit
bodies) plus a Trash folder the account excludes.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

from sqlalchemy import Connection, select
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import INTERRUPTED
from mailcore.fetch.engine import SyncResult
from mailcore.fetch.imap import IMAPClient
from mailcore.fetch.secrets import SecretBox
from mailcore.messages.models import MessageQuery
from mailcore.messages.parse import sha256_hex
from mailcore.store.schema import messages, webhook_deliveries
from mailcore.webhooks import Webhooks
from tests.support.corpus import make_corpus
from tests.support.dovecot import DovecotClassMixin, DovecotServer
from tests.support.fetchenv import FetchEnv, expected, make_env, thread_of
from tests.support.reactor import get_reactor

FOLDERS = {"INBOX": (0, 300), "Archive": (300, 150), "Sent": (450, 50)}
SYNCED = sorted(FOLDERS)


def fill(server: DovecotServer, user: str) -> None:
    for folder, (start, count) in FOLDERS.items():
        server.add_messages(user, folder, [m.raw for m in make_corpus(start, count)])
    server.add_messages(user, "Trash", [m.raw for m in make_corpus(900, 10, "trash")])


class IMAPSyncTests(DovecotClassMixin, TestCase):
    timeout = 120

    async def setup(self, **settings: Any) -> tuple[DovecotServer, str, FetchEnv]:
        server = await self.dovecot()
        user = server.new_user()
        fill(server, user)
        env = await make_env(self, **settings)
        return server, user, env

    def count_fetched(self, env: FetchEnv) -> list[int]:
        """Counts how many message bodies each store_batch call received."""
        seen: list[int] = []
        original = env.store.store_batch

        async def counting(where: Any, fetched: Any, **kw: Any) -> Any:
            seen.append(len(fetched))
            return await original(where, fetched, **kw)

        env.store.store_batch = counting  # type: ignore[method-assign]
        return seen

    async def test_first_sync_stores_all_second_adds_nothing(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)

        first = await env.engine.sync(account.id)
        self.assertEqual(first.status, "success", first.problems())
        self.assertEqual(first.new_messages, 500)
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))
        self.assertNotIn("Trash", first.folders)
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertEqual((stored.progress_done, stored.progress_total), (500, 500))

        fetched = self.count_fetched(env)
        second = await env.engine.sync(account.id)
        self.assertEqual(second.status, "success", second.problems())
        self.assertEqual(second.new_messages, 0)
        self.assertEqual(sum(fetched), 0)
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

        stored = await env.accounts.get(env.user_id, account.id)
        self.assertEqual(stored.sync_status, "success")
        self.assertIsNotNone(stored.last_sync)
        folders = {f["name"]: f for f in await env.accounts.folders(account.id)}
        self.assertIsNotNone(folders["INBOX"]["uidvalidity"])
        self.assertIsNotNone(folders["INBOX"]["highestmodseq"])

    async def test_parsed_fields_threads_attachments_and_search(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())

        page = await env.store.list_messages(
            env.user_id, MessageQuery(q="word7x", account_id=account.id)
        )
        self.assertEqual(page.count, 1)
        detail = await env.store.get_message(env.user_id, page.items[0].id)
        self.assertEqual(detail.summary.subject, "Re: Topic 5 réunion cafe")
        self.assertEqual(detail.summary.sender, "Jürgen Groß <user1@example.test>")
        self.assertEqual([a.filename for a in detail.attachments], ["résumé-7.pdf"])
        thread = await thread_of(env.store, env.user_id, detail.summary.id)
        self.assertEqual(
            sorted(m.summary.message_id for m in thread),
            [f"<corpus-{n}@corpus.test>" for n in range(5, 10)],
        )
        # 8-bit Latin-1 bodies come back byte-exact and decoded.
        latin = await env.store.list_messages(env.user_id, MessageQuery(q="word11x"))
        raw = await env.store.raw_message(env.user_id, latin.items[0].id)
        self.assertIn("Déjà vu".encode("iso-8859-1"), raw)
        self.assertIn("Déjà vu", (await env.store.get_message(
            env.user_id, latin.items[0].id)).body_text)
        stats = await env.store.statistics(env.user_id)
        self.assertEqual(stats.total_emails, 500)
        self.assertEqual(stats.total_threads, 100)
        self.assertEqual(stats.folders, {"INBOX": 300, "Archive": 150, "Sent": 50})
        self.assertEqual(await env.store.folder_names(env.user_id), ["Archive", "INBOX", "Sent"])

    async def test_new_messages_only_are_fetched(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)
        await env.engine.sync(account.id)
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(1000, 7, "new")])
        server.add_messages(user, "Archive", [m.raw for m in make_corpus(1100, 3, "new")])

        fetched = self.count_fetched(env)
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(result.new_messages, 10)
        self.assertEqual(sum(fetched), 10)
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

    def record_commands(self) -> list[tuple[bytes, bytes]]:
        """(command, first argument unquoted) of every IMAP command sessions send from now on."""
        sent: list[tuple[bytes, bytes]] = []
        original = IMAPClient.send

        def recording(client: IMAPClient, name: bytes, args: bytes | None = None,
                      continuation: Any = None, **kw: Any) -> Any:
            sent.append((name, (args or b"").split(b" ")[0].strip(b'"')))
            return original(client, name, args, continuation, **kw)

        self.patch(IMAPClient, "send", recording)
        return sent

    async def test_a_resync_opens_the_folders_it_knows_before_list(self) -> None:
        # Dovecot rescans a Maildir opened after a LIST in the same session, so the folders
        # of the last sync are EXAMINEd first; LIST comes after them.
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)
        sent = self.record_commands()
        await env.engine.sync(account.id)
        opened = [(name, arg) for name, arg in sent if name in (b"LIST", b"EXAMINE")]
        self.assertEqual(opened[0], (b"LIST", b""))
        self.assertEqual(sorted(arg for _, arg in opened[1:]), [b"Archive", b"INBOX", b"Sent"])

        del sent[:]
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        opened = [(name, arg) for name, arg in sent if name in (b"LIST", b"EXAMINE")]
        self.assertEqual(opened, [(b"EXAMINE", b"Archive"), (b"EXAMINE", b"INBOX"),
                                  (b"EXAMINE", b"Sent"), (b"LIST", b"")])
        self.assertEqual(sorted(result.folders), SYNCED)

    async def test_list_after_the_known_folders_finds_new_and_gone_ones(self) -> None:
        server, user, env = await self.setup()
        every = await env.imap_account(server, user)
        named = await env.imap_account(server, user, name="named", folders_to_sync="INBOX,Archive")
        for account in (every, named):
            await env.engine.sync(account.id)
        server.doveadm_run("mailbox", "delete", "-u", user, "Archive")
        server.add_messages(user, "Projects", [m.raw for m in make_corpus(1200, 5, "new")])

        result = await env.engine.sync(every.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(sorted(result.folders), ["INBOX", "Projects", "Sent"])
        self.assertEqual(result.folders["Projects"].new, 5)
        self.assertEqual(await env.count(every.id), 505)  # Archive's copies stay ours
        folders = {f["name"]: f for f in await env.accounts.folders(every.id)}
        self.assertFalse(folders["Archive"]["exists_on_server"])
        self.assertIsNone(folders["Archive"]["sync_error"])

        result = await env.engine.sync(named.id)
        self.assertEqual(result.folders["Archive"].error, "folder not found on the server")
        self.assertIsNone(result.folders["INBOX"].error)
        self.assertEqual(await env.count(named.id), 450)

    async def test_imaps_with_pinned_fingerprint(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(
            server, user, host="127.0.0.1", port=server.imaps, use_ssl=True, start_tls=False,
            tls_ca_pem=None, tls_fingerprint=server.pki.fingerprint,
        )
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

    async def test_cancelled_at_random_points_then_rerun_gives_exact_set(self) -> None:
        server, user, env = await self.setup(batch_messages=25)
        account = await env.imap_account(server, user)
        rng = random.Random(5)
        original = env.store.store_batch
        cancelled_rounds = 0
        for _round in range(3):
            stop_after = rng.randint(1, 12)
            calls = [0]
            running: list[defer.Deferred[SyncResult]] = []

            async def store_then_cancel(
                where: Any, fetched: Any, calls: list[int] = calls, stop_after: int = stop_after,
                running: list[Any] = running, **kw: Any,
            ) -> Any:
                result = await original(where, fetched, **kw)
                calls[0] += 1
                if calls[0] == stop_after:
                    get_reactor().callLater(0, running[0].cancel)
                return result

            env.store.store_batch = store_then_cancel  # type: ignore[method-assign]
            d = env.engine.sync(account.id)
            running.append(d)
            cancelled = False
            try:
                await d
            except defer.CancelledError:
                cancelled = True
            status = await env.accounts.get(env.user_id, account.id)
            if cancelled:
                cancelled_rounds += 1
                self.assertEqual(status.sync_status, "error")
                self.assertEqual(status.sync_error, "sync cancelled")
            held = await env.held(account.id)
            self.assertEqual(len(held), len(set(held)), "a message stored twice")
            self.assertTrue(set(held) <= set(expected(server, user, SYNCED)))
        self.assertGreater(cancelled_rounds, 0)
        env.store.store_batch = original  # type: ignore[method-assign]
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

    async def test_webhook_events_of_batches_committed_before_a_stop_are_told_once(
            self) -> None:
        """A sync stopped mid-way (a daemon's stop cancels it: no listener runs, as in a
        crash) committed some batches: their e-mails are told (email.new) by the sweep, and
        the rerun tells the rest and its sync.completed; each e-mail once. The old code
        told nothing of the stopped sync, and the rerun did not see its e-mails as new."""
        server, user, env = await self.setup(batch_messages=25)
        account = await env.imap_account(server, user)
        hooks = Webhooks(env.db, get_reactor(), SecretBox(env.key.encode("ascii")))
        hooks.attach(env.engine)
        await hooks.create(env.user_id, url="https://hooks.example.com/in",
                           events=["email.new", "sync.completed"])
        original = env.store.store_batch
        calls = [0]
        running: list[defer.Deferred[SyncResult]] = []

        async def store_then_cancel(where: Any, fetched: Any, **kw: Any) -> Any:
            result = await original(where, fetched, **kw)
            calls[0] += 1
            if calls[0] == 5:
                get_reactor().callLater(0, running[0].cancel)
            return result

        env.store.store_batch = store_then_cancel  # type: ignore[method-assign]
        running.append(env.engine.sync(account.id))
        with self.assertRaises(defer.CancelledError):
            await running[0]
        env.store.store_batch = original  # type: ignore[method-assign]
        await hooks.settle()
        stored = await self.message_ids(env, account.id)
        self.assertTrue(0 < len(stored) < 500)
        self.assertEqual(await self.told(env), [])
        self.assertGreater(await hooks.tell_left(), 0)
        told = await self.told(env)
        self.assertEqual({event for event, _ in told}, {"email.new"})
        self.assertEqual(sorted(e["id"] for _, data in told for e in data["emails"]), stored)

        rerun = await env.engine.sync(account.id)
        self.assertEqual(rerun.status, "success", rerun.problems())
        await hooks.settle()
        self.assertEqual(await hooks.tell_left(), 0)
        told = await self.told(env)
        everything = await self.message_ids(env, account.id)
        self.assertEqual(len(everything), 500)
        self.assertEqual(sorted(e["id"] for event, data in told if event == "email.new"
                                for e in data["emails"]), everything)
        [completed] = [data for event, data in told if event == "sync.completed"]
        self.assertEqual(completed["new_messages"], 500 - len(stored))

    async def message_ids(self, env: FetchEnv, account_id: int) -> list[int]:
        def txn(conn: Connection) -> list[int]:
            return sorted(conn.execute(select(messages.c.id).where(
                messages.c.account_id == account_id)).scalars())

        return await env.db.read("test_message_ids", txn)

    async def told(self, env: FetchEnv) -> list[tuple[str, Any]]:
        def txn(conn: Connection) -> list[tuple[str, Any]]:
            return [(r.event, json.loads(r.payload)["data"]) for r in conn.execute(
                select(webhook_deliveries).order_by(webhook_deliveries.c.id))]

        return await env.db.read("test_told", txn)

    async def test_connection_dropped_mid_fetch_then_rerun_gives_exact_set(self) -> None:
        server, user, env = await self.setup(batch_messages=30)
        account = await env.imap_account(server, user)
        original = env.store.store_batch
        calls = [0]
        sessions: list[Any] = []
        from mailcore.fetch import engine as engine_module

        real_open = engine_module.open_session

        async def remember(*a: Any, **kw: Any) -> Any:
            session = await real_open(*a, **kw)
            sessions.append(session)
            return session

        async def store_then_drop(where: Any, fetched: Any, **kw: Any) -> Any:
            result = await original(where, fetched, **kw)
            calls[0] += 1
            if calls[0] == 4:
                sessions[-1].transport.abortConnection()
            return result

        self.patch(engine_module, "open_session", remember)
        env.store.store_batch = store_then_drop  # type: ignore[method-assign]
        broken = await env.engine.sync(account.id)
        self.assertEqual(broken.status, "error")
        self.assertIn("closed", broken.problems() or "")
        env.store.store_batch = original  # type: ignore[method-assign]
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

    async def test_uidvalidity_reset_relinks_without_duplicates_or_loss(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)
        await env.engine.sync(account.id)
        before = {f["name"]: f["uidvalidity"] for f in await env.accounts.folders(account.id)}

        server.expunge(user, "INBOX", "300")
        server.reset_uidvalidity(user, "INBOX")
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(2000, 2, "after")])
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(result.folders["INBOX"].relinked, 299)
        self.assertEqual(result.folders["INBOX"].new, 2)
        # The message expunged meanwhile is still ours, marked as gone from the server.
        gone = make_corpus(299, 1)[0].raw
        held = await env.held(account.id)
        self.assertEqual(sorted(set(held) - {("INBOX", sha256_hex(gone))}),
                         expected(server, user, SYNCED))
        self.assertEqual(len(held), 502)
        self.assertEqual(await env.count(account.id, on_server=False), 1)
        after = {f["name"]: f["uidvalidity"] for f in await env.accounts.folders(account.id)}
        self.assertNotEqual(before["INBOX"], after["INBOX"])
        again = await env.engine.sync(account.id)
        self.assertEqual((again.new_messages, again.relinked), (0, 0))

    async def test_flag_changes_and_expunges_reach_our_copies_which_stay(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(server, user)
        await env.engine.sync(account.id)
        server.add_flag(user, "INBOX", "1:3", "\\Flagged")
        server.expunge(user, "INBOX", "4")
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(result.new_messages, 0)
        self.assertGreaterEqual(result.folders["INBOX"].flags_updated, 3)
        copies = await env.copies(account.id, "INBOX")
        self.assertEqual(len(copies), 300)
        for uid in (1, 2, 3):
            self.assertIn("\\Flagged", copies[uid][0])
        self.assertEqual(copies[4][1], False)
        self.assertEqual(copies[5], ("", True))
        self.assertEqual(await env.count(account.id), 500)

    async def test_sync_limits_last_n_and_folders_to_sync(self) -> None:
        server, user, env = await self.setup()
        account = await env.imap_account(
            server, user, sync_limit_type="last_n", sync_limit_value=20,
            folders_to_sync="INBOX,Sent,Nowhere",
        )
        result = await env.engine.sync(account.id)
        self.assertEqual(result.folders["INBOX"].new, 20)
        self.assertEqual(result.folders["Sent"].new, 20)
        self.assertNotIn("Archive", result.folders)
        self.assertEqual(result.folders["Nowhere"].error, "folder not found on the server")
        self.assertEqual(result.status, "error")
        inbox = server.source_hashes(user, "INBOX")
        held = {h for f, h in await env.held(account.id) if f == "INBOX"}
        newest = {sha256_hex(m.raw) for m in make_corpus(280, 20)}
        self.assertEqual(held, newest)
        self.assertTrue(held <= set(inbox))


    async def test_days_limit_is_a_server_side_search_since(self) -> None:
        server = await self.dovecot()
        user = server.new_user()
        now = get_reactor().seconds()
        old, recent = make_corpus(0, 10, "old"), make_corpus(10, 10, "recent")
        server.add_messages(user, "INBOX", [m.raw for m in old + recent],
                            mtimes=[now - 60 * 86400] * 10 + [now - 2 * 86400] * 10)
        env = await make_env(self)
        account = await env.imap_account(server, user, sync_limit_type="days",
                                          sync_limit_value=7)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 10))
        self.assertEqual({h for _f, h in await env.held(account.id)},
                         {sha256_hex(m.raw) for m in recent})

    async def test_a_days_limit_past_any_date_syncs_everything(self) -> None:
        # The API takes up to 1,000,000 days: that reaches back before year 1 (every sync of
        # the account failed with OverflowError), and 400,000 before year 1000, which an
        # IMAP date cannot write. Both mean every message.
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(0, 5)])
        env = await make_env(self)
        for n in (1_000_000, 400_000):
            account = await env.imap_account(server, user, sync_limit_type="days",
                                              sync_limit_value=n)
            result = await env.engine.sync(account.id)
            self.assertEqual((result.status, result.new_messages), ("success", 5),
                             (n, result.problems()))

    async def test_message_over_the_size_bound_is_skipped_with_a_clear_error(self) -> None:
        server = await self.dovecot()
        user = server.new_user()
        big = b"Subject: big\r\nMessage-ID: <big@x>\r\n\r\n" + b"x" * 50_000 + b"\r\n"
        small = [m.raw for m in make_corpus(0, 5)]
        server.add_messages(user, "INBOX", [*small[:2], big, *small[2:]])
        env = await make_env(self, max_message_bytes=20_000)
        account = await env.imap_account(server, user)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("error", 5))
        self.assertIn("UID 3 is", result.problems())
        self.assertIn("over the limit of 20000", result.problems())
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertIn("over the limit", stored.sync_error)

    async def test_kill_9_of_a_syncing_process_then_rerun_gives_exact_set(self) -> None:
        """A sync process killed (SIGKILL) in the middle of the first sync, and of a resync
        with 200 new messages: each next sync stores exactly what the server holds, nothing
        lost and nothing twice (batches commit with their UIDs; a folder's UIDNEXT only
        after its last batch)."""
        import os
        import signal
        import subprocess

        from tests.support.servers import sleep

        server, user, env = await self.setup()
        account = await env.imap_account(server, user)

        async def kill_at(count: int) -> int:
            """Sync in a child process, killed once `count` messages are stored; how many
            are stored then."""
            child = subprocess.Popen(  # noqa: ASYNC220 (a child to kill -9; never waited on)
                [sys.executable, "-m", "tests.support.fetch_child", env.db.url,
                 str(account.id)],
                env={**os.environ, "FETCH_CHILD_KEY": env.key},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            try:
                for _ in range(600):
                    if await env.count(account.id) >= count or child.poll() is not None:
                        break
                    await sleep(0.01)
                os.kill(child.pid, signal.SIGKILL)
            finally:
                child.wait()
            partial = await env.count(account.id)
            self.assertGreaterEqual(partial, count,
                                    child.stderr.read().decode() if child.stderr else "")
            return partial

        self.assertLess(await kill_at(60), 500, "the child finished before it was killed")
        # The next start of this node's scheduler shows the killed sync as failed, not
        # running forever (its account may never be due again: turned off, or far apart).
        killed = await env.accounts.get(env.user_id, account.id)
        self.assertEqual(killed.sync_status, "running")
        from mailcore.fetch.scheduler import FetchScheduler
        await FetchScheduler(env.engine).settle_interrupted()
        shown = await env.accounts.get(env.user_id, account.id)
        self.assertEqual((shown.sync_status, shown.sync_error, shown.progress_folder),
                         ("error", INTERRUPTED, None))
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))

        # A resync killed in the middle of the new mail.
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(1000, 200, "new")])
        self.assertLess(await kill_at(540), 700, "the child finished before it was killed")
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, SYNCED))


    async def test_an_account_deleted_during_its_sync_stops_it_quietly(self) -> None:
        """Its owner deletes the account (DELETE /v1/accounts/:id) while the first sync runs:
        the next batch's insert fails (the account's row is gone), which was logged as a
        critical "sync of account N failed" with the SQL traceback, and then as "another
        node took its sync over". Now the sync ends with the reason, nothing of the account
        is left, and no failure is logged (trial fails a test that logs one)."""
        server, user, env = await self.setup(batch_messages=50)
        account = await env.imap_account(server, user, folders_to_sync=SYNCED)
        original = env.store.store_batch
        batches = 0

        async def deleting(where: Any, fetched: Any, **kw: Any) -> Any:
            nonlocal batches
            batches += 1
            if batches == 2:
                await env.accounts.delete(env.user_id, account.id)
            return await original(where, fetched, **kw)

        env.store.store_batch = deleting  # type: ignore[method-assign]
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.error), ("error", "the account was deleted"))
        self.assertEqual(await env.count(account.id), 0)
        self.assertFalse(env.engine.is_running(account.id))


class CondstoreOnlyTests(DovecotClassMixin, TestCase):
    """A server offering CONDSTORE without QRESYNC: flag changes come from CHANGEDSINCE."""

    timeout = 60
    extra_config = (
        "imap_capability = IMAP4rev1 SASL-IR LITERAL+ ENABLE UIDPLUS CONDSTORE SPECIAL-USE"
    )

    async def test_flags_updated_through_changedsince(self) -> None:
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(0, 40)])
        env = await make_env(self)
        from mailcore.fetch.imap import IMAPClient

        enabled: list[Any] = []

        async def record(client: IMAPClient, *extensions: bytes) -> None:
            enabled.append(extensions)

        self.patch(IMAPClient, "enable", record)
        account = await env.imap_account(server, user)
        first = await env.engine.sync(account.id)
        self.assertEqual((first.status, first.new_messages), ("success", 40), first.problems())
        self.assertEqual(enabled, [], "QRESYNC was offered: this test needs CONDSTORE only")
        server.add_flag(user, "INBOX", "7", "\\Answered")
        second = await env.engine.sync(account.id)
        self.assertEqual(second.folders["INBOX"].flags_updated, 1)
        self.assertIn("\\Answered", (await env.copies(account.id, "INBOX"))[7][0])
        third = await env.engine.sync(account.id)
        self.assertEqual((third.new_messages, third.folders["INBOX"].flags_updated), (0, 0))

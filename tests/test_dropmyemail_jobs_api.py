"""Dropmyemail's /v1/accounts/:id/restores and /migrates without a mail server: what a
restore request may carry; lists and shows of jobs that dealt with many messages."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import OperationalError
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailcore.backup.jobs import FORGET_INTERVAL, OldJobsSweeper, thd_job_room
from mailcore.config import Config
from mailcore.fetch.jobs import thd_cancel_job, thd_create_job
from mailcore.safedrop.service import BUNDLE_DEFAULTS
from mailcore.safedrop.store import create_bundle_txn
from mailcore.store.owners import thd_lock_owner
from mailcore.store.schema import (
    api_sends,
    mailbox_job_items,
    mailbox_jobs,
    message_blobs,
    messages,
)
from tests.support.db import transaction_answers
from tests.support.oauth import access_token
from tests.support.pg import create_test_database
from tests.support.web import BASE, Web, traced_get


def thd_backed_up(conn: Any, user_id: int, account_id: int, count: int,
                  now: datetime.datetime) -> list[int]:
    """Blocking: `count` backed-up messages of the account (INBOX, uids 1 to `count`, one
    shared one-octet blob); their ids, in order."""
    conn.execute(insert(message_blobs).values(sha256="0" * 64, size=1, raw=b"x",
                                              created_at=now))
    conn.execute(insert(messages), [dict(
        user_id=user_id, account_id=account_id, folder="INBOX", uid=n, uidvalidity=1,
        sha256="0" * 64, size=1, created_at=now, updated_at=now)
        for n in range(1, count + 1)])
    return sorted(conn.execute(select(messages.c.id)).scalars())


class JobsApiBase(TestCase):
    postgres = False

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(Config(sections={"fetch": {"allow_loopback": True}}),
                             url=await create_test_database(self) if self.postgres else None)
        if self.postgres:
            self.addCleanup(self.web.core.db.close)
        self.alice = await self.web.user()
        self.token = await access_token(self.web.core.oauth, self.alice.id)
        self.web.secrets.append(self.token)
        account = await self.web.core.fetch.accounts.create(
            self.alice.id, name="a", email="a@x.test", host="127.0.0.1", port=993,
            use_ssl=True, password="pw")
        self.base = f"/v1/accounts/{account.id}"

    async def bobs_account(self) -> tuple[str, Any]:
        """Another user, bob, his Dropmyemail token and an account of his."""
        bob = await self.web.user("bob")
        token = await access_token(self.web.core.oauth, bob.id)
        account = await self.web.core.fetch.accounts.create(
            bob.id, name="b", email="b@x.test", host="127.0.0.1", port=993, use_ssl=True,
            password="pw")
        return token, account

    async def call(self, method: str, path: str, token: str | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}", **kwargs.pop("headers", {})}
        status, _, body = await self.web.call(method, path, headers=headers, **kwargs)
        return status, body

    async def jobs(self) -> int:
        def txn(conn: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(mailbox_jobs)).scalar())
        return await self.web.core.db.read("t", txn)


class RestoreInputTests(JobsApiBase):
    """A restore takes no input (dropmyemail-v1.md). Any body was ignored: a client that
    asked for three messages back ({"message_ids": [1, 2, 3]}) got a 201 and a restore of
    every missing message, and a body that was no JSON at all was a 201 too."""

    async def test_a_field_is_a_400_naming_it_and_no_job_is_made(self) -> None:
        attempts: list[dict[str, Any]] = [
            {"json": {"message_ids": [1, 2, 3]}},
            {"json": {"message_ids": list(range(9_000))}},
            {"json": {"folder": "INBOX"}},
            {"data": b"message_ids=1", "headers": {
                "Content-Type": "application/x-www-form-urlencoded"}},
        ]
        for kwargs in attempts:
            status, body = await self.call("POST", f"{self.base}/restores", **kwargs)
            self.assertEqual(status, 400, (kwargs.get("json", kwargs.get("data")), body))
            self.assertEqual(body["error"], "invalid_request")
            self.assertTrue(body["error_description"].startswith("Unknown field: "), body)
        # A document of more values than any of ours holds is refused before it is decoded
        # (web.parsing.MAX_JSON_VALUES).
        status, body = await self.call("POST", f"{self.base}/restores",
                                       json={"message_ids": list(range(100_000))})
        self.assertEqual((status, body["error"]), (400, "invalid_request"))
        self.assertEqual(body["error_description"],
                         "JSON parse error - more than 10000 values.")
        self.assertEqual(await self.jobs(), 0)

    async def test_a_body_that_is_no_object_is_a_400(self) -> None:
        for data in (b"not json", b"[1, 2]", b'"x"', b'{"a": '):
            status, body = await self.call("POST", f"{self.base}/restores", data=data,
                                           headers={"Content-Type": "application/json"})
            self.assertEqual(status, 400, (data, body))
            self.assertEqual(body["error"], "invalid_request", data)
        self.assertEqual(await self.jobs(), 0)

    async def test_no_input_makes_a_restore(self) -> None:
        """Nothing, `{}`, JSON null, or an empty body of either type (the token in the header or the
        query)."""
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        bodies: list[tuple[str | None, dict[str, Any]]] = [
            (self.token, {}), (self.token, {"json": {}}),
            (self.token, {"data": b"", "headers": {"Content-Type": "application/json"}}),
            (self.token, {"data": b"null", "headers": {"Content-Type": "application/json"}}),
            (self.token, {"data": b"", "headers": form}),
            ("", {"data": b"", "headers": form}),
        ]
        for token, kwargs in bodies:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            query = "" if token else f"?access_token={self.token}"
            status, _, body = await self.web.call(
                "POST", f"{self.base}/restores{query}",
                headers={**headers, **kwargs.pop("headers", {})}, **kwargs)
            self.assertEqual(status, 201, (kwargs, body))
            await self.web.core.db.run("t", thd_cancel_job, body["id"],
                                      self.web.core.jobs.now())
        self.assertEqual(await self.jobs(), len(bodies))


class QueuedJobCapTests(JobsApiBase):
    """A migrate into another destination is not refused as one into the same is, and each
    account may have its restore queued: a user could queue jobs without end (each holds
    a row, a password, and runner time). [dropmyemail] max_queued_jobs_per_user bounds
    those queued or running; one more is a 409 naming the cap, nothing stored."""

    async def test_one_more_queued_job_is_a_409_and_stores_nothing(self) -> None:
        jobs = self.web.core.jobs
        self.assertEqual(jobs.settings.max_queued_jobs_per_user, 100)
        jobs.settings = dataclasses.replace(jobs.settings, max_queued_jobs_per_user=2)
        bases = [self.base]
        for n in (2, 3):
            account = await self.web.core.fetch.accounts.create(
                self.alice.id, name=f"a{n}", email=f"a{n}@x.test", host="127.0.0.1",
                port=993, use_ssl=True, password="pw")
            bases.append(f"/v1/accounts/{account.id}")
        made = []
        for base in bases[:2]:
            status, body = await self.call("POST", f"{base}/restores")
            self.assertEqual(status, 201, body)
            made.append(body["id"])
        capped = {"error": "conflict",
                  "error_description": "a user may have at most 2 migrates and restores "
                                       "queued or running; wait for one to end"}
        status, body = await self.call("POST", f"{bases[2]}/restores")
        self.assertEqual((status, body), (409, capped))
        # A migrate is refused before its login to the destination (none listens there).
        status, body = await self.call("POST", f"{bases[2]}/migrates",
                                       json={"email": "d@x.test", "password": "pw",
                                             "host": "127.0.0.1", "port": 1, "ssl": True})
        self.assertEqual((status, body), (409, capped))
        self.assertEqual(await self.jobs(), 2)
        # Another user's count is their own; a job that ended frees its place.
        token, account = await self.bobs_account()
        status, _ = await self.call("POST", f"/v1/accounts/{account.id}/restores", token)
        self.assertEqual(status, 201)
        await self.web.core.db.run("t", thd_cancel_job, made[0], jobs.now())
        status, body = await self.call("POST", f"{bases[2]}/restores")
        self.assertEqual(status, 201, body)


    async def test_an_account_keeps_its_newest_finished_jobs(self) -> None:
        # A restore of an intact account ends at once, and every finished job was kept
        # for ever (a migrate's with a row per message): [dropmyemail]
        # jobs_kept_per_account bounds those of each kind.
        jobs = self.web.core.jobs
        self.assertEqual(jobs.settings.jobs_kept_per_account, 100)
        jobs.settings = dataclasses.replace(jobs.settings, jobs_kept_per_account=2)
        made = []
        for _ in range(4):
            status, body = await self.call("POST", f"{self.base}/restores")
            self.assertEqual(status, 201, body)
            made.append(body["id"])
            await self.web.core.db.run("t", thd_cancel_job, body["id"], jobs.now())
        status, body = await self.call("POST", f"{self.base}/restores")
        self.assertEqual(status, 201, body)
        status, listed = await self.call("GET", f"{self.base}/restores")
        self.assertEqual(status, 200, listed)
        # The two newest finished ones and the queued one.
        self.assertEqual(sorted(j["id"] for j in listed), [*made[2:], body["id"]])
        self.assertEqual(await self.jobs(), 3)


class OldJobItemsTests(JobsApiBase):
    """A job's create deleted the old finished jobs beyond jobs_kept_per_account in its own
    transaction, and with them, by ON DELETE CASCADE, their items (a migrate's one a
    message: 200,000 rows took 0.63 s), holding SQLite's only write lock, which the spool's
    group commit waits on. The create now deletes only old jobs with no items; the others
    go by OldJobsSweeper, a batch of items a transaction."""

    async def test_the_create_deletes_no_items_and_the_sweep_does_in_batches(self) -> None:
        jobs = self.web.core.jobs
        jobs.settings = dataclasses.replace(jobs.settings, jobs_kept_per_account=1)
        account_id = int(self.base.rsplit("/", 1)[1])
        now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

        def make(conn: Any) -> list[int]:
            ids = thd_backed_up(conn, self.alice.id, account_id, 5, now)
            made = []
            # Oldest first: one without items, then three with five each.
            for items in (0, 5, 5, 5):
                job = thd_create_job(conn, dict(
                    kind="restore", user_id=self.alice.id, account_id=account_id,
                    status="done", email="a@x.test", created_at=now, updated_at=now))
                if items:
                    conn.execute(insert(mailbox_job_items), [dict(
                        job_id=job, message_row_id=m, state="done") for m in ids[:items]])
                made.append(job)
            return made

        made = await self.web.core.db.run("t", make)

        def left(conn: Any) -> tuple[list[int], int]:
            return (sorted(conn.execute(select(mailbox_jobs.c.id)).scalars()),
                    int(conn.execute(select(func.count())
                                     .select_from(mailbox_job_items)).scalar()))

        answers = transaction_answers(self, self.web.core.db,
                                      lambda name: name == "forget_old_job")
        status, body = await self.call("POST", f"{self.base}/restores")
        self.assertEqual(status, 201, body)
        # The old job without items went in the create; those with items and all 15
        # items are still there.
        self.assertEqual(await self.web.core.db.read("t", left),
                         ([*made[1:], body["id"]], 15))
        self.assertEqual(answers, [])
        self.assertEqual(await jobs.forget_old_jobs(batch=2), 10)
        # The two oldest with items, two items a transaction; the newest finished is kept.
        self.assertEqual([n for _, n in answers], [2, 2, 1, 2, 2, 1])
        self.assertEqual(await self.web.core.db.read("t", left), ([made[3], body["id"]], 5))
        self.assertEqual(await jobs.forget_old_jobs(batch=2), 0)

    def test_the_sweeper_runs_on_one_node(self) -> None:
        [sweeper] = [s for s in self.web.core.background_services()
                     if isinstance(s, OldJobsSweeper)]
        self.assertIs(sweeper.leases, self.web.core.leases)
        self.assertEqual(sweeper.interval(), FORGET_INTERVAL)


class OldJobItemsPostgreSQLTests(OldJobItemsTests):
    postgres = True


class QueuedJobCapPostgreSQLTests(QueuedJobCapTests):
    postgres = True

    def assert_lets_rows_naming_the_user_in(self, lock: Callable[[Any], object]) -> None:
        """`lock(conn)` (a create's lock of alice's row) lets an insert of a row naming her
        in at once, and holds up another `lock` of hers (at most 200 ms: it fails)."""
        engine = self.web.core.db.engine
        with engine.begin() as creating:
            lock(creating)
            with engine.begin() as sending:
                sending.execute(text("SET LOCAL lock_timeout = '2s'"))
                sending.execute(insert(api_sends).values(user_id=self.alice.id, at=0.0,
                                                         recipients=1))
            with self.assertRaises(OperationalError), engine.begin() as other:
                other.execute(text("SET LOCAL lock_timeout = '200ms'"))
                lock(other)

    def test_the_users_row_lock_lets_rows_naming_the_user_in(self) -> None:
        """The create's lock of the user's row (thd_job_room) was FOR UPDATE, which on
        PostgreSQL held up every insert of a row naming the user (its FOR KEY SHARE: sync
        batches, api_sends) until the create committed. FOR NO KEY UPDATE lets them in,
        and two creates still take turns. (Blocking calls on the test's thread: each
        waits at most lock_timeout.)"""
        self.assert_lets_rows_naming_the_user_in(
            lambda conn: thd_job_room(conn, self.alice.id, 100))

    def test_the_owner_lock_lets_rows_naming_the_user_in(self) -> None:
        """The same for mailcore.store.owners' lock itself, which the creates and updates
        of fetch accounts (their max_accounts_per_user count) and of webhooks take: they
        took FOR UPDATE of the user's row, and a sync's message batches for the user's
        other accounts waited for them."""
        self.assert_lets_rows_naming_the_user_in(
            lambda conn: thd_lock_owner(conn, self.alice.id))

    def test_the_safedrop_creates_lock_lets_rows_naming_the_user_in(self) -> None:
        """The same for a safedrop bundle's create (create_bundle_txn, its
        max_bundles_per_user count), which locks the same row."""
        values = {**BUNDLE_DEFAULTS, "created_at": datetime.datetime.now(datetime.UTC)}
        self.assert_lets_rows_naming_the_user_in(
            lambda conn: create_bundle_txn(conn, self.alice.id, values, 100))


class JobIdTests(JobsApiBase):
    async def test_a_deleted_jobs_id_is_never_given_again(self) -> None:
        # On SQLite a job deleted with its account gave its id to the next job made, by any
        # user (the highest id in use plus one): a client holding the old id
        # (/restores/:id, `mailcore jobs show ID`) reached another job. Found by deleting
        # and creating objects against the daemon.
        status, first = await self.call("POST", f"{self.base}/restores")
        self.assertEqual(status, 201, first)
        status, _ = await self.call("DELETE", self.base)
        self.assertEqual(status, 200)
        token, account = await self.bobs_account()
        status, theirs = await self.call("POST", f"/v1/accounts/{account.id}/restores", token)
        self.assertEqual(status, 201, theirs)
        self.assertNotEqual(theirs["id"], first["id"])


class ManyMessageIdsTests(JobsApiBase):
    """A job's `message_ids` name every message it dealt with. A list of an account's
    restores or migrates read them all in one read of the store and held them, their JSON
    and the reply at once: 10 restores of a 50,000-message account took one 2 s read
    (SQLite's one read lane held, every read of the daemon behind it) and a 3.4 MB reply
    built whole, and a token may ask 20 times a second. They are read 5,000 at a time and
    written as they come."""

    MESSAGES = 12_000
    JOBS = 4

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        account_id = int(self.base.rsplit("/", 1)[1])
        now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

        def txn(conn: Any) -> list[int]:
            ids = thd_backed_up(conn, self.alice.id, account_id, self.MESSAGES, now)
            jobs = []
            for kind in ("restore",) * (self.JOBS - 1) + ("migrate",):
                job = thd_create_job(conn, dict(
                    kind=kind, user_id=self.alice.id, account_id=account_id, status="done",
                    email="a@x.test", host="imap.x.test", port=993, created_at=now,
                    updated_at=now))
                conn.execute(insert(mailbox_job_items), [dict(
                    job_id=job, message_row_id=m,
                    state="done" if m % 3 else "present" if m % 2 else "sending")
                    for m in ids])
                jobs.append(job)
            return ids

        ids = await self.web.core.db.run("t", txn)
        self.expected = [m for m in ids if m % 3 or m % 2]

    async def test_every_id_is_listed_and_shown(self) -> None:
        status, restores = await self.call("GET", f"{self.base}/restores")
        self.assertEqual((status, len(restores)), (200, self.JOBS - 1))
        for job in restores:
            self.assertEqual(job["message_ids"], self.expected)
            self.assertEqual((job["status"], job["backup_id"]), ("done", job["account_id"]))
            status, shown = await self.call("GET", f"{self.base}/restores/{job['id']}")
            self.assertEqual((status, shown), (200, job))
        status, migrates = await self.call("GET", f"{self.base}/migrates?direction=desc")
        self.assertEqual([m["message_ids"] for m in migrates], [self.expected])
        self.assertEqual(migrates[0]["host"], "imap.x.test")

    async def test_a_list_holds_a_chunk_of_them_at_a_time(self) -> None:
        response = await self.web.http.get(
            f"{BASE}{self.base}/restores", headers={"Authorization": f"Bearer {self.token}"})
        whole = await response.content()
        self.assertEqual(len(json.loads(whole)), self.JOBS - 1)
        transport = HashingTransport()
        peak = traced_get(self.web, f"{self.base}/restores", self.token, transport)
        self.assertEqual(transport.body(), hashlib.sha256(whole).hexdigest())
        # 30,000 ids, a 150 kB reply: read whole, 3.5 MB; a chunk at a time, 0.6 MB, what
        # reading and writing one chunk takes, whatever the number of ids.
        self.assertLess(peak, 1_500_000)


class ManyMessageIdsPostgreSQLTests(ManyMessageIdsTests):
    postgres = True
    timeout = 240


class HashingTransport(StringTransport):
    """Keeps the reply's head and a hash of its body, not the body."""

    def __init__(self) -> None:
        super().__init__()
        self.head = b""
        self.digest: Any = None

    def write(self, data: bytes) -> None:
        if self.digest is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data, self.head = self.head[end + 4:], self.head[:end]
            self.digest = hashlib.sha256()
        self.digest.update(data)

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            self.write(data)

    def body(self) -> str:
        return self.digest.hexdigest() if self.digest is not None else ""

"""The job runner of migrates and restores: leased per job, so on two nodes sharing one store
(PostgreSQL, and one SQLite file) a job runs once; a dead node's job is taken over once its
lease lapsed; an operator's cancel stops the run; transient failures are retried with a
backoff on the injected clock, then given up; a finished job queues its webhook event in the
transaction that ends it, and shows in the metrics. The bodies here are recorders: what a
real body does is tests.test_dropmyemail_jobs_dovecot's subject."""

from __future__ import annotations

import datetime
from typing import Any

from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, insert, select, update
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.errors import INTERNAL_ERROR, AccountNotFound
from mailcore.fetch.jobs import (
    CANCELLED,
    LEASE,
    PAUSED,
    Job,
    JobFailed,
    JobMetrics,
    JobRunner,
    JobSettings,
    TransientJobError,
    thd_cancel_job,
    thd_create_job,
    thd_get_job,
)
from mailcore.fetch.secrets import SecretBox, SecretError
from mailcore.messages.sql import new_id
from mailcore.store import Database
from mailcore.store.schema import (
    fetch_accounts,
    mailbox_jobs,
    users,
    webhook_deliveries,
    webhooks,
)
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

START = 1_800_000_000.0


def gather(*ds: Any) -> defer.Deferred[list[Any]]:
    return defer.gatherResults(
        [d if isinstance(d, defer.Deferred) else defer.Deferred.fromCoroutine(d) for d in ds],
        consumeErrors=True)



async def queued_restore(db: Any, clock: Any, owner: int, username: str) -> int:
    """A queued restore of a new account of `owner` (`username` on 127.0.0.1:143)."""
    account = await Accounts(db, clock, SecretBox(Fernet.generate_key())).create(
        owner, host="127.0.0.1", port=143, username=username, password="pw",
        allow_cleartext=True)
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
    return int(await db.run("job", thd_create_job, {
        "kind": "restore", "user_id": owner, "account_id": account.id,
        "status": "queued", "created_at": now, "updated_at": now}))

class Recorder:
    """A job body that records which node ran which job and waits until released (or
    raises what the test set)."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, int]] = []
        self.release: dict[int, defer.Deferred[None]] = {}
        self.outcome: Exception | None = None

    def body(self, node: str) -> Any:
        async def run(runner: JobRunner, job: Job) -> None:
            self.runs.append((node, job.id))
            if self.outcome is not None:
                raise self.outcome
            d: defer.Deferred[None] = defer.Deferred()
            self.release[job.id] = d
            await d

        return run


class JobRunnerMixin(DatabaseMixin):
    timeout = 60

    async def nodes(self, recorder: Recorder, settings: JobSettings | None = None
                    ) -> tuple[JobRunner, JobRunner, Clock, int]:
        a = await self.open_database()
        b = await self.open_database_at(a.url)
        clock = Clock()
        clock.advance(START)
        runners = []
        for db, node in ((a, "node-a"), (b, "node-b")):
            body = recorder.body(node)
            runners.append(JobRunner(clock, db, node, {"migrate": body, "restore": body},
                                     settings=settings,
                                     metrics=JobMetrics(CollectorRegistry())))
        job_id = await self.make_job(a, clock)
        return runners[0], runners[1], clock, job_id

    async def make_job(self, db: Database, clock: Clock, kind: str = "restore", *,
                       host: str = "127.0.0.1", dest: tuple[str, int, str] | None = None
                       ) -> int:
        """A queued job of a new user's account at `host` (user u, port 143); a migrate
        writes to `dest` (host, port, user)."""
        owner = await db.run("owner", thd_make_user, f"owner{int(clock.seconds())}")
        accounts = Accounts(db, clock, SecretBox(Fernet.generate_key()))
        account = await accounts.create(owner, host=host, port=143, username="u",
                                        password="pw", allow_cleartext=True)
        target: dict[str, Any] = {}
        if dest is not None:
            target = {"host": dest[0], "port": dest[1], "username": dest[2]}
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)

        def txn(conn: Connection) -> int:
            conn.execute(insert(webhooks).values(
                user_id=owner, url="https://hooks.example.test/", secret_enc=b"x",
                events="sync.completed,restore.completed,migrate.completed", active=True,
                created_at=now, updated_at=now))
            return thd_create_job(conn, {"kind": kind, "user_id": owner,
                                         "account_id": account.id, "status": "queued",
                                         "created_at": now, "updated_at": now, **target})

        return int(await db.run("job", txn))

    async def job(self, runner: JobRunner, job_id: int) -> Job:
        job = await runner.db.read("get", thd_get_job, job_id)
        assert job is not None
        return job

    async def events(self, db: Database) -> list[str]:
        def txn(conn: Connection) -> list[str]:
            return [r.event for r in conn.execute(select(webhook_deliveries.c.event))]

        return await db.read("events", txn)

    async def test_two_nodes_run_a_job_once(self) -> None:
        recorder = Recorder()
        a, b, clock, job_id = await self.nodes(recorder)
        started = await gather(*(r.tick() for r in (a, b, a, b)))
        self.assertEqual(sum(started), 1)
        self.assertEqual(len(recorder.runs), 1)
        winner = a if recorder.runs[0][0] == "node-a" else b
        self.assertEqual(winner.running_jobs(), [job_id])
        running = await self.job(a, job_id)
        self.assertEqual((running.status, running.attempts, running.lease_owner),
                         ("running", 1, winner.node_id))
        # While it runs, and for as long as its lease is renewed, nobody else takes it.
        for _ in range(4):
            clock.advance(LEASE / 3)
            await winner.renew_leases()
            self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])
        recorder.release[job_id].callback(None)
        await winner.settle()
        done = await self.job(a, job_id)
        self.assertEqual((done.status, done.reason), ("done", None))
        self.assertIsNotNone(done.end_time)
        # Ended: neither node runs it again, even once the lease lapsed.
        clock.advance(2 * LEASE)
        self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])
        self.assertEqual(len(recorder.runs), 1)
        self.assertEqual(await self.events(a.db), ["restore.completed"])
        metrics = winner.metrics
        assert metrics is not None
        self.assertEqual(metrics.finished.labels(kind="restore", status="done")._value.get(), 1)

    async def test_a_dead_nodes_job_is_taken_over_once_its_lease_lapsed(self) -> None:
        recorder = Recorder()
        a, b, clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        # Node a dies: no more renewals. Until its lease lapses, b does not take the job.
        clock.advance(LEASE - 1)
        self.assertEqual(await b.tick(), 0)
        clock.advance(1)
        self.assertEqual(await b.tick(), 1)
        self.assertEqual(recorder.runs, [("node-a", job_id), ("node-b", job_id)])
        self.assertEqual((await self.job(b, job_id)).attempts, 2)
        # Were node a only stalled, its next renewal finds the job gone and stops its run.
        await a.renew_leases()
        await a.settle()
        self.assertEqual(a.running_jobs(), [])
        self.assertEqual(b.running_jobs(), [job_id])
        recorder.release[job_id].callback(None)
        await b.settle()
        self.assertEqual((await self.job(b, job_id)).status, "done")

    async def test_a_cancel_stops_the_run_and_fails_the_job(self) -> None:
        recorder = Recorder()
        a, b, clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
        cancelled = await b.db.run("cancel", thd_cancel_job, job_id, now)
        assert cancelled is not None
        self.assertEqual((cancelled.status, cancelled.reason), ("failed", CANCELLED))
        await a.renew_leases()
        await a.settle()
        self.assertEqual(a.running_jobs(), [])
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason), ("failed", CANCELLED))
        self.assertEqual(await self.events(a.db), ["restore.completed"])
        self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])

    async def set_active(self, db: Database, job_id: int, active: bool) -> None:
        """`mailcore user disable/enable` of the job's owner, as another node's CLI does."""

        def txn(conn: Connection) -> None:
            owner = conn.execute(select(mailbox_jobs.c.user_id)
                                 .where(mailbox_jobs.c.id == job_id)).scalar()
            conn.execute(update(users).where(users.c.id == owner).values(is_active=active))

        await db.run("set_active", txn)

    async def test_a_disabled_users_queued_job_waits_until_it_is_enabled(self) -> None:
        """`mailcore user disable` stops the user's migrates and restores: neither node
        starts its queued job (nothing is failed), and `enable` lets it run."""
        recorder = Recorder()
        a, b, clock, job_id = await self.nodes(recorder)
        await self.set_active(b.db, job_id, False)
        for _ in range(3):
            self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])
            clock.advance(LEASE)
        self.assertEqual(recorder.runs, [])
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.attempts), ("queued", 0))
        await self.set_active(b.db, job_id, True)
        self.assertEqual(sum(await gather(a.tick(), b.tick())), 1)
        winner = a if recorder.runs[0][0] == "node-a" else b
        recorder.release[job_id].callback(None)
        await winner.settle()
        self.assertEqual((await self.job(a, job_id)).status, "done")

    async def test_a_running_job_of_a_disabled_user_is_paused_then_resumed(self) -> None:
        """A run under way when its user is disabled stops at the node's next lease renewal
        and is queued again as it stood (the run not counted); neither node takes it up
        until the user is enabled, then one does."""
        recorder = Recorder()
        a, b, clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        await self.set_active(b.db, job_id, False)
        clock.advance(LEASE / 3)
        await a.renew_leases()
        await a.settle()
        self.assertEqual(a.running_jobs(), [])
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason, job.attempts), ("queued", PAUSED, 0))
        self.assertEqual(await self.events(a.db), [])  # not ended: no webhook event
        clock.advance(2 * LEASE)
        self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])
        await self.set_active(a.db, job_id, True)
        self.assertEqual(await b.tick(), 1)
        self.assertEqual(recorder.runs, [("node-a", job_id), ("node-b", job_id)])
        self.assertEqual((await self.job(b, job_id)).attempts, 1)
        recorder.release[job_id].callback(None)
        await b.settle()
        self.assertEqual((await self.job(b, job_id)).status, "done")

    async def test_a_job_body_finding_its_user_disabled_is_paused(self) -> None:
        """A body's own transactions (`check_txn`, before each batch it sends) stop it as
        soon as the user is disabled, without waiting for the lease renewal."""
        a_db = await self.open_database()
        clock = Clock()
        clock.advance(START)
        job_id = await self.make_job(a_db, clock)
        checked: list[int] = []

        async def body(runner: JobRunner, job: Job) -> None:
            await self.set_active(runner.db, job.id, False)
            seconds = clock.seconds()
            await runner.db.run("batch", runner.check_txn, job.id, seconds)
            checked.append(job.id)

        a = JobRunner(clock, a_db, "node-a", {"migrate": body, "restore": body})
        self.assertEqual(await a.tick(), 1)
        await a.settle()
        self.assertEqual(checked, [])
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason, job.attempts), ("queued", PAUSED, 0))

    async def test_transient_failures_are_retried_with_backoff_then_given_up(self) -> None:
        recorder = Recorder()
        recorder.outcome = TransientJobError("connection to imap.example.test closed")
        settings = JobSettings(retry_base=10.0, retry_max=40.0, max_attempts=4)
        a, b, clock, job_id = await self.nodes(recorder, settings)
        waits = []
        for attempt in range(1, 4):
            self.assertEqual(await a.tick(), 1)
            await a.settle()
            job = await self.job(a, job_id)
            self.assertEqual((job.status, job.attempts), ("queued", attempt))
            self.assertIn("connection to imap.example.test closed", job.reason or "")
            waits.append(job.next_attempt_at - clock.seconds())
            self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])  # not due yet
            clock.advance(waits[-1])
        self.assertEqual(waits, [10.0, 20.0, 40.0])
        self.assertEqual(await b.tick(), 1)
        await b.settle()
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.attempts), ("failed", 4))
        self.assertTrue((job.reason or "").startswith("gave up after 4 attempts"), job.reason)

    async def test_a_failure_ends_the_job_with_its_reason(self) -> None:
        recorder = Recorder()
        recorder.outcome = JobFailed("the destination refused message 7: NO [OVERQUOTA]")
        a, _b, _clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        await a.settle()
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason),
                         ("failed", "the destination refused message 7: NO [OVERQUOTA]"))

    async def test_a_password_no_key_opens_fails_the_job_saying_so(self) -> None:
        """A destination password given up with a lost fetch key (`mailcore secrets
        forget`): the user must give it again, which no retry does."""
        recorder = Recorder()
        recorder.outcome = SecretError("the stored secret was given up with a lost fetch key "
                                       "(mailcore secrets forget): set it again")
        a, _b, _clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        await a.settle()
        job = await self.job(a, job_id)
        self.assertEqual(job.status, "failed")
        self.assertIn("set it again", job.reason or "")
        self.assertEqual(self.flushLoggedErrors(SecretError), [])

    async def test_a_fault_of_ours_fails_the_job_with_a_fixed_text(self) -> None:
        """The exception's text (on PostgreSQL: SQL with its parameters, a message's
        headers and body) goes to the log only, never to the job its user reads."""
        recorder = Recorder()
        recorder.outcome = RuntimeError("INSERT INTO messages ... parameters: secret body")
        a, _b, _clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        await a.settle()
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason), ("failed", INTERNAL_ERROR))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_job_whose_account_was_deleted_fails_saying_so(self) -> None:
        """The user deleted the account while its job waited (the HTTP fuzz test found a
        restore that then logged a critical traceback)."""
        recorder = Recorder()
        recorder.outcome = AccountNotFound("no such account", "id")
        a, _b, _clock, job_id = await self.nodes(recorder)
        self.assertEqual(await a.tick(), 1)
        await a.settle()
        job = await self.job(a, job_id)
        self.assertEqual((job.status, job.reason), ("failed", "the account was deleted"))


    async def test_jobs_writing_to_one_mailbox_run_one_after_the_other(self) -> None:
        """Two restores of two accounts naming one mailbox (here two users'), a migrate
        into it: run at once, each found the same messages missing and appended them (found
        live: 20 expunged messages came back as 40). The runner starts one; the others wait,
        queued, on both nodes, until it ended; a stalled node does not take its job back
        beside one started meanwhile."""
        recorder = Recorder()
        a, b, clock, first = await self.nodes(recorder)  # an account at 127.0.0.1:143, u
        clock.advance(1)
        second = await self.make_job(a.db, clock)
        clock.advance(1)
        into = await self.make_job(a.db, clock, kind="migrate", host="Mail.Example.Test",
                                   dest=("127.0.0.1", 143, "u"))
        clock.advance(1)
        elsewhere = await self.make_job(a.db, clock, kind="migrate",
                                        dest=("127.0.0.1", 143, "v"))
        clock.advance(1)
        # A restore of that migrate's source, written by nothing else: it runs too.
        source = await self.make_job(a.db, clock, host="mail.example.test")
        started = await gather(*(r.tick() for r in (a, b, a, b)))
        self.assertEqual(sum(started), 3)
        ran = sorted(job for _, job in recorder.runs)
        # Of the two restores of the mailbox, the one claimed first (nodes race) runs.
        self.assertIn(ran, (sorted([first, elsewhere, source]),
                            sorted([second, elsewhere, source])))
        one = first if first in ran else second
        waiting = [second if one == first else first, into]
        for job_id in waiting:
            self.assertEqual((await self.job(a, job_id)).status, "queued")
        self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])

        # It ends (the others too); the waiting restore is in a retry's backoff: the
        # migrate starts, on node a.
        [restore, _] = waiting
        for job_id in (one, elsewhere, source):
            recorder.release[job_id].callback(None)
        await gather(a.settle(), b.settle())
        await a.db.run("backoff", lambda conn: conn.execute(
            update(mailbox_jobs).where(mailbox_jobs.c.id == restore)
            .values(next_attempt_at=clock.seconds() + 60)))
        self.assertEqual(await a.tick(), 1)
        self.assertEqual(recorder.runs[-1], ("node-a", into))

        # Node a stalls (no renewals): once the lease lapsed, node b starts the restore,
        # and not the migrate beside it; the stalled node's next renewal finds the mailbox
        # taken and stops its run (which resumes once the restore ended).
        clock.advance(LEASE)
        self.assertEqual(await b.tick(), 1)
        self.assertEqual(recorder.runs[-1], ("node-b", restore))
        self.assertEqual(await b.tick(), 0)
        await a.renew_leases()
        await a.settle()
        self.assertEqual((a.running_jobs(), b.running_jobs()), ([], [restore]))
        self.assertEqual(await gather(a.tick(), b.tick()), [0, 0])
        recorder.release[restore].callback(None)
        await b.settle()
        self.assertEqual((await self.job(a, restore)).status, "done")
        self.assertEqual(await b.tick(), 1)
        self.assertEqual(recorder.runs[-1], ("node-b", into))


    async def test_one_users_jobs_leave_slots_to_the_others(self) -> None:
        """A user's jobs take at most `max_per_user` of a node's slots: before, mallory's
        first four restores (each of its own mailbox) took all four, and bob's waited for
        them, hours if mallory's servers hold each run to the command deadline."""
        recorder = Recorder()
        a, _b, clock, first = await self.nodes(recorder)
        db = a.db
        mallory = (await self.job(a, first)).user_id
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)

        model = await queued_restore(db, clock, mallory, "m")

        def many(conn: Connection) -> list[int]:
            """150 more of hers, each of its own account (a mailbox of its own)."""
            job = conn.execute(select(mailbox_jobs).where(mailbox_jobs.c.id == model)).one()
            row = conn.execute(select(fetch_accounts).where(
                fetch_accounts.c.id == job.account_id)).one()._asdict()
            made = []
            for i in range(150):
                account = new_id(conn.execute(insert(fetch_accounts).values(
                    {**{k: v for k, v in row.items() if k != "id"}, "username": f"m{i}"})))
                made.append(thd_create_job(conn, {
                    "kind": "restore", "user_id": mallory, "account_id": account,
                    "status": "queued", "created_at": now, "updated_at": now}))
            return made

        hers = [first, model, *await db.run("many", many)]
        bob = await db.run("bob", thd_make_user, "bob")
        his = await queued_restore(db, clock, bob, "bob")
        self.assertEqual(await a.tick(), 2)  # a hundred of hers looked at, none of his
        self.assertEqual(await a.tick(), 1)  # hers no longer looked at: his is
        self.assertEqual(sorted(a.running_jobs()), sorted([*hers[:2], his]))
        self.assertEqual(await a.tick(), 0)
        recorder.release[hers[0]].callback(None)
        recorder.release[his].callback(None)
        await a.wait(hers[0])
        await a.wait(his)
        self.assertEqual(await a.tick(), 1)
        self.assertEqual(sorted(a.running_jobs()), sorted(hers[1:3]))  # one more of hers
        self.assertEqual([job for _node, job in recorder.runs],
                         [hers[0], hers[1], his, hers[2]])
        for job_id in hers[1:3]:
            recorder.release[job_id].callback(None)
        await a.settle()
        self.assertEqual(a._owners, {})

    async def test_one_users_jobs_on_one_busy_mailbox_hide_no_one(self) -> None:
        """Mallory's 151 restores of one account: one runs and the others wait for its
        mailbox, so she never has max_per_user running; they are not looked at (before,
        they were the hundred looked at every poll, a claim each, and bob's never ran)."""
        recorder = Recorder()
        a, _b, clock, first = await self.nodes(recorder)
        db = a.db
        mallory = (await self.job(a, first)).user_id
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)

        def many(conn: Connection) -> list[int]:
            job = conn.execute(select(mailbox_jobs).where(mailbox_jobs.c.id == first)).one()
            return [thd_create_job(conn, {
                "kind": "restore", "user_id": mallory, "account_id": job.account_id,
                "status": "queued", "created_at": now, "updated_at": now})
                for _ in range(150)]

        hers = [first, *await db.run("many", many)]
        bob = await db.run("bob", thd_make_user, "bob")
        his = await queued_restore(db, clock, bob, "bob")
        self.assertEqual(await a.tick(), 1)  # hers, the hundred of hers looked at
        self.assertEqual(await a.tick(), 1)  # his (before: 0, at every poll)
        self.assertEqual(sorted(a.running_jobs()), sorted([first, his]))
        recorder.release[first].callback(None)
        await a.wait(first)
        self.assertEqual(await a.tick(), 1)  # the next of hers, its mailbox free
        self.assertEqual(sorted(a.running_jobs()), sorted([hers[1], his]))
        for job_id in list(a.running_jobs()):
            recorder.release[job_id].callback(None)
        await a.stop()


class SQLiteJobRunnerTests(JobRunnerMixin, TestCase):
    backend = "sqlite"


class PostgresJobRunnerTests(JobRunnerMixin, TestCase):
    backend = "postgresql"


class JobConflictMixin(DatabaseMixin):
    """One restore of an account at a time: two run at once each found the same messages
    missing and each appended them (300 deleted messages came back as 600, found by an
    audit). Requests on two nodes at once make one job; the others are refused."""

    timeout = 60

    async def test_restores_asked_at_once_on_two_nodes_make_one_job(self) -> None:
        from mailcore.backup import BackupSettings
        from mailcore.backup.jobs import BackupJobs, JobConflict

        a = await self.open_database()
        b = await self.open_database_at(a.url)
        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")
        box = SecretBox(Fernet.generate_key())
        services = []
        for db in (a, b):
            accounts = Accounts(db, clock, box)
            services.append(BackupJobs(db, accounts, None, BackupSettings()))  # type: ignore[arg-type]
        account = await services[0].accounts.create(
            owner, host="127.0.0.1", port=143, username="u", password="pw",
            allow_cleartext=True)
        outcomes: list[tuple[bool, Any]] = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(services[n % 2].restore(owner, account.id))
             for n in range(8)], consumeErrors=True)
        made = [value for ok, value in outcomes if ok]
        refused = [value for ok, value in outcomes if not ok]
        self.assertEqual(len(made), 1, outcomes)
        self.assertEqual(len(refused), 7)
        first = made[0].id
        for failure in refused:
            failure.trap(JobConflict)
            self.assertEqual(failure.value.job_id, first)
        listed = await services[1].list(owner, account.id, "restore")
        self.assertEqual([j.id for j in listed or []], [first])

        # Once it ended, the next one is made.
        await a.run("end", lambda conn: conn.execute(
            update(mailbox_jobs).where(mailbox_jobs.c.id == first)
            .values(status="done")))
        second = await services[1].restore(owner, account.id)
        assert second is not None
        self.assertEqual(second.status, "queued")
        self.assertNotEqual(second.id, first)


class SQLiteJobConflictTests(JobConflictMixin, TestCase):
    backend = "sqlite"


class PostgresJobConflictTests(JobConflictMixin, TestCase):
    backend = "postgresql"

"""Migrations 0062 and 0063: a deleted fetch account's, job's or webhook's id is never given
to another one; rows survive.

On SQLite the table is rebuilt with AUTOINCREMENT, and its sequence starts above every
account id a pending webhook event still names; PostgreSQL's sequence already never gives
an id twice. Both backends: the next account created after the migration gets an id no row
named before, and the folders, messages and jobs of the accounts kept still point at them.
0063 does the same for jobs (whose leases name them, `mailbox-job-N`) and webhooks.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, select, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import (
    fetch_accounts,
    fetch_folders,
    job_leases,
    mailbox_jobs,
    users,
    webhook_events,
    webhooks,
)
from tests.support.db import DatabaseMixin

BEFORE = "0061_pop_sizes"  # the revision 0062_account_ids_never_reused builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def thd_add_account(conn: Connection, user: int, host: str) -> int:
    """Blocking: an account row (the columns are the same at both ends)."""
    return int(conn.execute(
        insert(fetch_accounts).values(user_id=user, host=host, port=993, username="u",
                                      password_enc=b"x", created_at=NOW, updated_at=NOW)
        .returning(fetch_accounts.c.id)
    ).scalar_one())


def thd_setup(conn: Connection) -> tuple[int, int]:
    """Blocking, at 0061: two accounts (the first with a folder), a pending sync.completed
    of a third, deleted account; the newest account is then deleted. (kept id, gone id)"""
    user = int(conn.execute(
        insert(users).values(username="alice", email="alice@example.test", nic="N1",
                             created_at=NOW).returning(users.c.id)
    ).scalar_one())
    kept = thd_add_account(conn, user, "kept.example")
    conn.execute(insert(fetch_folders).values(account_id=kept, name="INBOX"))
    newest = thd_add_account(conn, user, "newest.example")
    conn.execute(insert(webhook_events).values(
        user_id=user, account_id=newest + 5, event="sync.completed", ref_id=None, data="{}",
        created_at=0.0))
    conn.execute(text("DELETE FROM fetch_accounts WHERE id = :id"), {"id": newest})
    return kept, newest + 5


def thd_rows(conn: Connection) -> list[tuple[int, str, list[str]]]:
    return [
        (row.id, row.host, list(conn.execute(
            select(fetch_folders.c.name).where(fetch_folders.c.account_id == row.id)
        ).scalars()))
        for row in conn.execute(
            select(fetch_accounts.c.id, fetch_accounts.c.host).order_by(fetch_accounts.c.id))
    ]


class FetchAccountIdMigrationMixin(DatabaseMixin):
    async def at_0061(self) -> tuple[Database, int, int]:
        db = await self.open_database_before(BEFORE)
        kept, named = await db.run("setup", thd_setup)
        return db, kept, named

    async def test_an_id_still_named_is_not_given_again(self) -> None:
        db, kept, named = await self.at_0061()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("rows", thd_rows), [(kept, "kept.example", ["INBOX"])])
        user = await db.read("user", lambda c: c.execute(select(users.c.id)).scalar_one())
        added = await db.run("add", thd_add_account, user, "new.example")
        if self.backend == "sqlite":  # PostgreSQL's sequence is past the deleted one only
            self.assertGreater(added, named)
        self.assertGreater(added, kept + 1)
        await db.run("delete", lambda c: c.execute(
            text("DELETE FROM fetch_accounts WHERE id = :id"), {"id": added}))
        self.assertGreater(await db.run("add again", thd_add_account, user, "again.example"),
                           added)

    async def test_rows_survive_the_way_down(self) -> None:
        db, kept, _ = await self.at_0061()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertEqual(await db.read("rows", thd_rows), [(kept, "kept.example", ["INBOX"])])


class SQLiteFetchAccountIdMigrationTests(FetchAccountIdMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresFetchAccountIdMigrationTests(FetchAccountIdMigrationMixin, TestCase):
    backend = "postgresql"
    timeout = 240


JOBS_BEFORE = "0062_account_ids_never_reused"  # the revision 0063_job_webhook_ids builds on


def thd_add_job(conn: Connection, user: int, account: int) -> int:
    return int(conn.execute(
        insert(mailbox_jobs).values(kind="restore", user_id=user, account_id=account,
                                    created_at=NOW, updated_at=NOW)
        .returning(mailbox_jobs.c.id)
    ).scalar_one())


def thd_add_webhook(conn: Connection, user: int) -> int:
    return int(conn.execute(
        insert(webhooks).values(user_id=user, url="https://hooks.example.com/in",
                                events="sync.completed", secret_enc=b"x", created_at=NOW,
                                updated_at=NOW)
        .returning(webhooks.c.id)
    ).scalar_one())


def thd_setup_jobs(conn: Connection) -> tuple[int, int, int]:
    """Blocking, at 0062: an account with a job kept, and one deleted whose lease is left
    naming an id three past it; a webhook. (kept job, the job id named, the webhook)"""
    kept_account, _ = thd_setup(conn)
    user = int(conn.execute(select(users.c.id)).scalar_one())
    kept = thd_add_job(conn, user, kept_account)
    gone = thd_add_job(conn, user, kept_account)
    conn.execute(insert(job_leases).values(name=f"mailbox-job-{gone + 3}", owner="n1",
                                           until=0.0))
    conn.execute(text("DELETE FROM mailbox_jobs WHERE id = :id"), {"id": gone})
    return kept, gone + 3, thd_add_webhook(conn, user)


class JobWebhookIdMigrationMixin(DatabaseMixin):
    async def test_an_id_still_named_is_not_given_again(self) -> None:
        db = await self.open_database_before(JOBS_BEFORE)
        kept, named, first_hook = await db.run("setup", thd_setup_jobs)
        await threads.deferToThread(db.migrate_blocking)
        user, account = await db.read("ids", lambda c: c.execute(
            select(users.c.id, fetch_accounts.c.id)).one())
        self.assertEqual(await db.read("jobs", lambda c: list(c.execute(
            select(mailbox_jobs.c.id)).scalars())), [kept])
        job = await db.run("add job", thd_add_job, user, account)
        hook = await db.run("add hook", thd_add_webhook, user)
        if self.backend == "sqlite":  # PostgreSQL's sequence is past the deleted one only
            self.assertGreater(job, named)
        self.assertGreater(job, kept + 1)
        self.assertGreater(hook, first_hook)
        # A webhook deleted after the migration: its id is not given again either.
        await db.run("delete hook", lambda c: c.execute(
            text("DELETE FROM webhooks WHERE id = :id"), {"id": hook}))
        self.assertGreater(await db.run("add hook", thd_add_webhook, user), hook)
        await threads.deferToThread(downgrade_to, db.engine, JOBS_BEFORE)
        self.assertEqual(len(await db.read("jobs", lambda c: list(c.execute(
            select(mailbox_jobs.c.id)).scalars()))), 2)


class SQLiteJobWebhookIdMigrationTests(JobWebhookIdMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresJobWebhookIdMigrationTests(JobWebhookIdMigrationMixin, TestCase):
    backend = "postgresql"
    timeout = 240

"""Exactly once through crashes: a real `twistd mailcore` migrates 5,000 messages from one
Dovecot user to another and is killed with SIGKILL at random moments of the copy (5 times),
and restarted each time. The job resumes by itself at each start; at the end the destination
holds every message of the source exactly once (0 missing, 0 duplicates), with its flags,
INTERNALDATE and folder. The test prints the kills and how far the job was at each.
"""

from __future__ import annotations

import datetime
import random
import re
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import Connection, select
from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.jobs import thd_create_job
from mailcore.fetch.secrets import SecretBox
from mailcore.store import Database
from mailcore.store.schema import mailbox_jobs
from tests.support.dovecot import DovecotClassMixin
from tests.support.fetchenv import thd_make_user
from tests.support.mailsink import Daemon, done
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for
from tests.test_dropmyemail_jobs_dovecot import ADDRESS_LOGINS, fill, mailbox
from tests.test_gateway_crash import kill_from_outside

KILLS = 5
MESSAGES = {"INBOX": 2500, "Archiv/Größe": 1500, "Проекты": 1000}
KEY = Fernet.generate_key().decode("ascii")

log = Logger()


class MigrateKillNineTests(DovecotClassMixin, TestCase):
    timeout = 300
    extra_config = ADDRESS_LOGINS

    def prepare(self, daemon: Daemon, port: int, source: str, destination: str,
                ca_pem: str) -> int:
        """Migrate the store, add the owner, the source account and a queued migrate
        (blocks; before the first start)."""
        daemon.copy_migrated_store()
        db = Database(daemon.db_url, None, synchronous=True)  # type: ignore[arg-type]
        db.migrate_blocking()  # at head already when copied
        clock: Any = get_reactor()
        box = SecretBox(KEY.encode("ascii"))
        owner = done(db.run("owner", thd_make_user, "owner"))
        account = done(defer.Deferred.fromCoroutine(Accounts(db, clock, box).create(
            owner, host="localhost", port=port, username=source, email=source,
            password="secret", allow_cleartext=True, tls_ca_pem=ca_pem)))
        now = datetime.datetime.now(datetime.UTC)
        job_id = done(db.run("job", thd_create_job, {
            "kind": "migrate", "user_id": owner, "account_id": account.id,
            "status": "queued", "email": destination, "host": "localhost", "port": port,
            "protocol": "imap", "allow_cleartext": True, "username": destination,
            "password_enc": box.encrypt("secret"), "tls_ca_pem": ca_pem,
            "created_at": now, "updated_at": now}))
        db.engine.dispose()
        return int(job_id)

    async def test_every_message_lands_once_through_kill_9(self) -> None:
        reactor = get_reactor()
        began = reactor.seconds()
        server = await self.dovecot()
        source = f"{server.new_user()}@example.test"
        destination = f"{server.new_user()}@example.test"
        total = fill(server, source, MESSAGES, "crash")
        expected = await mailbox(server, source)
        self.assertEqual(sum(expected.values()), total)

        daemon = Daemon(tempdir_for(self))
        with daemon.config.open("a") as f:
            f.write(f'\n[fetch]\nallow_loopback = true\nsecret_key = "{KEY}"\n')
        ca = server.pki.ca_pem.decode()
        job_id = self.prepare(daemon, server.imap, source, destination, ca)
        watch = Database(daemon.db_url, get_reactor(), max_threads=1)
        self.addCleanup(watch.close)
        await watch.open()

        def row(conn: Connection) -> Any:
            return conn.execute(select(mailbox_jobs).where(mailbox_jobs.c.id == job_id)).one()

        filled = reactor.seconds()
        await daemon.start()
        self.addCleanup(daemon.stop)
        starts = [reactor.seconds() - filled]
        rng = random.Random()
        marks = sorted(rng.uniform(0.05 + 0.85 * k / KILLS, 0.05 + 0.85 * (k + 1) / KILLS)
                       for k in range(KILLS))
        kills: list[tuple[int, int]] = []
        # A kill is of a run: the next one waits until the restarted daemon has claimed the
        # job (attempts went up), or two close marks would kill a daemon that had not yet
        # resumed the copy (and the run count would fall short of the kills).
        claimed_by_killed = 0
        deadline = reactor.seconds() + 240
        job: Any = None
        while reactor.seconds() < deadline:
            job = await watch.read("job", row)
            if job.status in ("done", "failed"):
                break
            progress = job.downloaded / total if job.messages else 0.0
            resumed = job.status == "running" and job.attempts > claimed_by_killed
            if len(kills) < KILLS and resumed and progress >= marks[len(kills)]:
                claimed_by_killed = job.attempts
                await kill_from_outside(daemon, rng.uniform(0.0, 0.05))
                await daemon.stop()  # reap it
                after = await watch.read("job", row)
                kills.append((job.downloaded, after.downloaded))
                restart = reactor.seconds()
                await daemon.start()
                starts.append(reactor.seconds() - restart)
                continue
            await sleep(0.02)
        # What the resumed runs found of the messages in flight at each kill (the daemon
        # logs it per folder): the window between an OK and its record, resolved.
        window = [tuple(map(int, m)) for m in re.findall(
            r"(\d+) of (\d+) messages in flight", (daemon.directory / "twistd.log").read_text())]
        summary = (f"{len(kills)} kills at (seen, on record) {kills}; in flight at a stop "
                   f"(found there, checked): {window}; job {job.status} "
                   f"after {job.attempts} runs: {job.downloaded}/{job.messages} dealt with, "
                   f"{job.appended} appended; filling {filled - began:.1f} s, starts "
                   f"{sum(starts):.1f} s, in all {reactor.seconds() - began:.1f} s")
        print(f"\n  {summary}")
        log.info("migrate kill -9 test: {summary}", summary=summary)
        self.assertEqual(job.status, "done", summary + f" ({job.reason})")
        self.assertEqual(len(kills), KILLS, summary)
        self.assertGreaterEqual(job.attempts, KILLS + 1)
        landed = await mailbox(server, destination)
        missing = expected - landed
        extra = landed - expected
        self.assertEqual((sum(missing.values()), sum(extra.values())), (0, 0),
                         f"missing {sum(missing.values())}, duplicates or strays "
                         f"{sum(extra.values())}; {summary}; e.g. missing "
                         f"{sorted(missing)[:3]}, extra {sorted(extra)[:3]}")

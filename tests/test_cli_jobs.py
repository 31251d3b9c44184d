"""`mailcore jobs list|show|cancel` as a real subprocess on a data directory whose store holds
a migrate and a restore: listing and filters, one job's details (never the destination's
password), cancelling (the job fails as cancelled; a finished job cannot be), mistakes as one
line on stderr."""

from __future__ import annotations

import datetime

from cryptography.fernet import Fernet
from sqlalchemy import Connection

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.jobs import thd_create_job
from mailcore.fetch.secrets import SecretBox
from mailcore.store import Database
from tests.support.cli import CliTestCase
from tests.support.fetchenv import thd_make_user
from tests.support.reactor import get_reactor


class JobsCliTests(CliTestCase):
    timeout = 300

    async def jobs(self) -> tuple[int, int]:
        """A migrate (to imap.new.test) and a restore of one account; their ids."""
        self.assertIn("0 job(s) shown", await self.ok("jobs", "list"))  # makes the store
        db = Database(f"sqlite:///{self.data_dir / 'mailcore.sqlite'}", get_reactor())
        self.addCleanup(db.close)
        await db.open()
        box = SecretBox(Fernet.generate_key())
        owner = await db.run("owner", thd_make_user, "owner")
        account = await Accounts(db, get_reactor(), box).create(
            owner, host="imap.old.test", port=993, username="fred", password="pw",
            use_ssl=True)
        now = datetime.datetime.now(datetime.UTC)

        def txn(conn: Connection) -> tuple[int, int]:
            common = {"user_id": owner, "account_id": account.id, "status": "queued",
                      "created_at": now, "updated_at": now}
            migrate = thd_create_job(conn, {
                **common, "kind": "migrate", "email": "fred@new.test",
                "host": "imap.new.test", "port": 143, "protocol": "imap", "start_tls": True,
                "username": "fred@new.test", "password_enc": box.encrypt("s3cret-dest")})
            restore = thd_create_job(conn, {**common, "kind": "restore",
                                            "email": "fred@old.test"})
            return migrate, restore

        return await db.run("jobs", txn)

    async def test_list_show_and_cancel(self) -> None:
        migrate, restore = await self.jobs()
        listed = await self.ok("jobs", "list")
        self.assertIn("2 job(s) shown", listed)
        self.assertIn("fred@new.test", listed)
        lines = listed.splitlines()
        self.assertTrue(lines[1].startswith(str(restore)), listed)  # newest first
        only = await self.ok("jobs", "list", "--kind", "migrate")
        self.assertIn("1 job(s) shown", only)
        self.assertNotIn("restore", only)
        self.assertIn("0 job(s) shown", await self.ok("jobs", "list", "--status", "done"))
        self.assertIn("2 job(s) shown", await self.ok("jobs", "list", "--user", "owner"))

        shown = await self.ok("jobs", "show", str(migrate))
        self.assertIn("Kind:        migrate", shown)
        self.assertIn("Status:      queued", shown)
        self.assertIn("fred@new.test at imap.new.test:143 (STARTTLS)", shown)
        self.assertNotIn("s3cret", shown)

        self.assertIn(f"cancelled job {migrate}", await self.ok("jobs", "cancel", str(migrate)))
        shown = await self.ok("jobs", "show", str(migrate))
        self.assertIn("Status:      failed", shown)
        self.assertIn("Reason:      cancelled by an operator", shown)
        await self.refused("jobs", "cancel", str(migrate), fragment="has already ended")
        self.assertIn("Status:      queued", await self.ok("jobs", "show", str(restore)))

    async def test_mistakes_are_one_line(self) -> None:
        await self.ok("jobs", "list")
        await self.refused("jobs", "show", "999", fragment="no job 999")
        await self.refused("jobs", "cancel", "999", fragment="no job 999")
        await self.refused("jobs", "show", "abc", fragment="not a job id")
        await self.refused("jobs", "list", "--status", "sleeping", fragment="invalid choice")
        await self.refused("jobs", "list", "--user", "nobody", fragment="no user")
        await self.refused("jobs", "list", "--limit", "0", fragment="--limit")

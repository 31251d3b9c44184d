"""`mailcore mailbox …` run as a real subprocess on a temp data dir."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from twisted.internet.task import Clock

from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.store.schema import users
from mailcore.workers import CpuPool
from tests.support.cli import CliTestCase
from tests.support.db import open_database_at


class MailboxCliTests(CliTestCase):
    tempdir_prefix = "mailcore-cli-mailboxes-"

    async def test_add_list_remove(self) -> None:
        await self.ok("user", "add", "bob", "--email", "bob@users.test", "--password", "x")
        await self.ok("user", "add", "joe", "--email", "joe@users.test", "--password", "x")
        await self.ok("domain", "add", "hosted.test", "--owner", "bob",
                      "--redirect-to", "mx.example.net")
        self.assertEqual(await self.ok("mailbox", "add", "Bob@Hosted.test", "--owner", "bob"),
                         "mailbox bob@hosted.test for bob\n")
        await self.ok("mailbox", "add", "joe@hosted.test", "--owner", "joe@users.test")
        await self.refused("mailbox", "add", "bob@hosted.test", "--owner", "bob",
                           fragment="already a mailbox")
        await self.refused("mailbox", "add", "x@other.test", "--owner", "bob",
                           fragment="not a served domain")
        await self.refused("mailbox", "add", "x@hosted.test", "--owner", "carol",
                           fragment="no such user: carol")
        await self.refused("mailbox", "add", "x@hosted.test", fragment="--owner")
        listing = (await self.ok("mailbox", "list")).splitlines()
        self.assertEqual(listing[0].split(), ["ADDRESS", "OWNER", "CREATED", "USED", "QUOTA"])
        self.assertEqual([line.split()[:2] for line in listing[1:]],
                         [["bob@hosted.test", "bob"], ["joe@hosted.test", "joe"]])
        only_joe = (await self.ok("mailbox", "list", "--owner", "joe")).splitlines()
        self.assertEqual([line.split()[0] for line in only_joe[1:]], ["joe@hosted.test"])
        self.assertEqual(await self.ok("mailbox", "remove", "JOE@hosted.test"),
                         "removed mailbox joe@hosted.test\n")
        await self.refused("mailbox", "remove", "joe@hosted.test",
                           fragment="no such mailbox: joe@hosted.test")
        self.assertEqual(len((await self.ok("mailbox", "list")).splitlines()), 2)

    async def test_one_mailboxs_quota_is_set_shown_and_reset(self) -> None:
        # Every mailbox had [mailapi] mailbox_quota_bytes and nothing else: the operator
        # could give none more, less or no limit.
        await self.ok("user", "add", "bob", "--email", "bob@users.test", "--password", "x")
        await self.ok("domain", "add", "hosted.test", "--owner", "bob",
                      "--redirect-to", "mx.example.net")
        for box in ("bob@hosted.test", "team@hosted.test"):
            await self.ok("mailbox", "add", box, "--owner", "bob")
        self.assertEqual(await self.ok("mailbox", "quota", "Team@hosted.test", "5000000000"),
                         "mailbox team@hosted.test: 0 bytes used, quota 5000000000 (own)\n")
        listing = [line.split() for line in (await self.ok("mailbox", "list")).splitlines()]
        self.assertEqual(listing[1][0], "bob@hosted.test")
        self.assertEqual(listing[1][-2:], ["0", "1073741824"])
        self.assertEqual(listing[2][-3:], ["0", "5000000000", "(own)"])
        self.assertEqual(await self.ok("mailbox", "quota", "team@hosted.test", "0"),
                         "mailbox team@hosted.test: 0 bytes used, quota no limit (own)\n")
        self.assertEqual(await self.ok("mailbox", "quota", "team@hosted.test", "default"),
                         "mailbox team@hosted.test: 0 bytes used, quota 1073741824\n")
        await self.refused("mailbox", "quota", "team@hosted.test", "-1", fragment="bytes")
        await self.refused("mailbox", "quota", "team@hosted.test", "1G", fragment="bytes")
        await self.refused("mailbox", "quota", "nobody@hosted.test", "10",
                           fragment="mailbox not found")
        self.assertIn("'default'", await self.ok("mailbox", "quota", "--help"))

    async def test_a_mailbox_with_outbox_mail_is_removed_only_with_force(self) -> None:
        # Mail answered 202 "enqueued to be sent" went with the mailbox unsent (found by an
        # audit): the refusal names how many wait; --force removes them, unsent.
        await self.ok("user", "add", "bob", "--email", "bob@users.test", "--password", "x")
        await self.ok("domain", "add", "hosted.test", "--owner", "bob",
                      "--redirect-to", "mx.example.net")
        await self.ok("mailbox", "add", "bob@hosted.test", "--owner", "bob")
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        mail = MailService(db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests())
        bob = await db.read("bob", lambda c: c.execute(
            select(users.c.id).where(users.c.username == "bob")).scalar_one())
        for n in range(3):
            written = await mail.create(bob, "bob@users.test", Edit("outbox", {
                "from": "bob@hosted.test", "to": f"x{n}@customer.test"}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        await self.refused("mailbox", "remove", "bob@hosted.test",
                           fragment="mailbox bob@hosted.test has 3 mails waiting to be sent; "
                           "remove it once they are sent, or with --force")
        self.assertEqual(len((await self.ok("mailbox", "list")).splitlines()), 2)
        self.assertIn("--force", await self.ok("mailbox", "remove", "--help"))
        self.assertEqual(await self.ok("mailbox", "remove", "bob@hosted.test", "--force"),
                         "removed mailbox bob@hosted.test and 3 mails of its outbox, unsent\n")
        self.assertEqual(len((await self.ok("mailbox", "list")).splitlines()), 1)

    async def test_a_hosted_domain(self) -> None:
        await self.ok("user", "add", "bob", "--email", "bob@users.test", "--password", "x")
        self.assertEqual(await self.ok("domain", "add", "team.test", "--owner", "bob", "--local"),
                         "serving team.test for bob: mail is kept in its mailboxes here "
                         "(mailcore mailbox add)\n")
        await self.refused("domain", "add", "other.test", "--owner", "bob",
                           fragment="one of the arguments --redirect-to --local is required")
        await self.refused("domain", "add", "other.test", "--owner", "bob", "--local",
                           "--redirect-to", "mx.example.net", fragment="not allowed with")
        listing = (await self.ok("domain", "list")).splitlines()
        self.assertEqual(listing[1].split()[:4], ["team.test", "bob", "(hosted", "here)"])
        await self.ok("mailbox", "add", "bob@team.test", "--owner", "bob")


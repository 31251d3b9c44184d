"""`mailcore mailbox …` run as a real subprocess on a temp data dir."""

from __future__ import annotations

from tests.support.cli import CliTestCase


class MailboxCliTests(CliTestCase):
    timeout = 120
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
        self.assertEqual(listing[0].split(), ["ADDRESS", "OWNER", "CREATED"])
        self.assertEqual([line.split()[:2] for line in listing[1:]],
                         [["bob@hosted.test", "bob"], ["joe@hosted.test", "joe"]])
        only_joe = (await self.ok("mailbox", "list", "--owner", "joe")).splitlines()
        self.assertEqual([line.split()[0] for line in only_joe[1:]], ["joe@hosted.test"])
        self.assertEqual(await self.ok("mailbox", "remove", "JOE@hosted.test"),
                         "removed mailbox joe@hosted.test\n")
        await self.refused("mailbox", "remove", "joe@hosted.test",
                           fragment="no such mailbox: joe@hosted.test")
        self.assertEqual(len((await self.ok("mailbox", "list")).splitlines()), 2)

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


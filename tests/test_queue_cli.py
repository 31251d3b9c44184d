"""`mailcore queue list|show|flush|delete`, run as real subprocesses on a temp data dir."""

from __future__ import annotations

from sqlalchemy import select

from mailcore.queue.model import NewMessage, Result, thd_apply_results, thd_insert_messages
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store.schema import queue_recipients
from tests.support.cli import CliTestCase
from tests.support.db import open_database_at
from tests.support.mailsink import thd_add_domain


class QueueCliTests(CliTestCase):
    tempdir_prefix = "mailcore-cli-queue-"

    def setUp(self) -> None:
        super().setUp()
        self.data_dir.mkdir()

    async def test_list_show_flush_delete(self) -> None:
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        domain = await db.run("d", thd_add_domain, "customer.test", "127.0.0.1", 25)
        env = Envelope("alice@x.test", (Recipient("bob@customer.test", domain),
                                        Recipient("carol@customer.test", domain)))
        far = 4_000_000_000.0
        # A long reason with colons is shown whole by list and show.
        error = ("4.4.1 connection to 127.0.0.1:25 failed: Connection refused: "
                 "an error of the other side that goes on well past sixty characters")
        [ids] = await db.run(
            "i", thd_insert_messages, [NewMessage("QCLI1", env, b"Subject: x\r\n\r\nhi\r\n",
                                                  True)], "node", 1000.0, far)
        await db.run("r", thd_apply_results, "node", 1001.0, [
            Result(ids[0], "QCLI1", "deferred", error, "127.0.0.1:25", far),
            Result(ids[1], "QCLI1", "delivered", "250 2.0.0 ok", "127.0.0.1:25"),
        ])
        await db.close()

        out = await self.ok("queue", "list")
        self.assertIn("QCLI1", out)
        self.assertIn("alice@x.test", out)
        self.assertIn("1/2", out)
        self.assertIn(error, out)
        self.assertIn("1 recipient(s) waiting (0 queued, 1 deferred)", out)

        out = await self.ok("queue", "show", "QCLI1")
        self.assertIn("bob@customer.test", out)
        self.assertIn("deferred", out)
        self.assertIn("carol@customer.test", out)
        self.assertIn("delivered", out)
        self.assertIn(error, out)

        out = await self.ok("queue", "flush")
        self.assertIn("1 deferred recipient(s) are due now", out)
        self.assertIn("next sweep", out)
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        r = queue_recipients.c
        due = await db.read("n", lambda c: c.execute(
            select(r.next_attempt_at).where(r.address == "bob@customer.test")).scalar_one())
        self.assertLess(due, far)
        await db.close()

        self.assertEqual(await self.ok("queue", "delete", "QCLI1"), "deleted QCLI1\n")
        out = await self.ok("queue", "list")
        self.assertNotIn("QCLI1", out)

        result = await self.mc("queue", "show", "QCLI1")
        self.assertEqual(result.status, 1)
        self.assertIn("no message QCLI1", result.err)
        result = await self.mc("queue", "delete", "NOPE")
        self.assertEqual(result.status, 1)

"""The next hops' answers about their recipients in the store (`recipient_verdicts`,
mailcore.store.verdicts, for mailcore.gateway.callout): one row per address, with the
route (domain id, next hop) that answered, replaced in place (two nodes writing at once
included), read only while it holds and for its route, and swept by its index once expired;
on SQLite and PostgreSQL."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.store.verdicts import thd_read_verdict, thd_sweep_verdicts, thd_write_verdict
from tests.support.db import DatabaseMixin, engine_query_plans, full_scans

NOW = 1_750_000_000.0
HOP = "mx.example.net:25"


class VerdictsMixin(DatabaseMixin):
    timeout = 120

    async def test_an_answer_holds_until_it_expires_and_a_new_one_replaces_it(self) -> None:
        db = await self.open_database()
        await db.run("w", thd_write_verdict, "a@example.com", 1, HOP, False, "550 no", NOW + 60)
        self.assertEqual(await db.read("r", thd_read_verdict, "a@example.com", 1, HOP, NOW + 59),
                         (False, "550 no"))
        self.assertIsNone(await db.read("r", thd_read_verdict, "a@example.com", 1, HOP, NOW + 60))
        self.assertIsNone(await db.read("r", thd_read_verdict, "b@example.com", 1, HOP, NOW))
        # Two nodes' answers at the same moment: no error, one row.
        await defer.gatherResults([
            db.run("w", thd_write_verdict, "a@example.com", 1, HOP, True, f"250 ok {i}", NOW + 600)
            for i in range(4)])
        answer = await db.read("r", thd_read_verdict, "a@example.com", 1, HOP, NOW + 100)
        assert answer is not None
        deliverable, reply = answer
        self.assertTrue(deliverable)
        self.assertTrue(reply.startswith("250 ok "), reply)

    async def test_an_answer_of_another_route_is_none_and_is_replaced(self) -> None:
        db = await self.open_database()
        await db.run("w", thd_write_verdict, "a@example.com", 1, HOP, False, "550 no",
                     NOW + 60)
        for domain_id, hop in ((2, HOP), (1, "mx2.example.net:25"), (1, "[::1]:25")):
            with self.subTest(domain_id=domain_id, hop=hop):
                self.assertIsNone(await db.read("r", thd_read_verdict, "a@example.com",
                                                domain_id, hop, NOW))
        await db.run("w", thd_write_verdict, "a@example.com", 2, "[::1]:25", True, "250",
                      NOW + 60)
        self.assertEqual(await db.read("r", thd_read_verdict, "a@example.com", 2,
                                       "[::1]:25", NOW), (True, "250"))
        self.assertIsNone(await db.read("r", thd_read_verdict, "a@example.com", 1, HOP, NOW))

    async def test_the_sweep_deletes_the_expired_by_the_index(self) -> None:
        db = await self.open_database()
        for i in range(5):
            await db.run("w", thd_write_verdict, f"u{i}@example.com", 1, HOP, True, "250", NOW + i)
        with engine_query_plans(db.engine) as plans:
            self.assertEqual(await db.run("s", thd_sweep_verdicts, NOW + 2, 2), 2)
        self.assertEqual(full_scans(plans, "recipient_verdicts"), [])
        self.assertEqual(await db.run("s", thd_sweep_verdicts, NOW + 2, 10), 1)
        self.assertEqual(await db.run("s", thd_sweep_verdicts, NOW + 2, 10), 0)
        self.assertIsNotNone(await db.read("r", thd_read_verdict, "u3@example.com", 1, HOP,
                                           NOW + 2))


class SQLiteVerdictsTests(VerdictsMixin, TestCase):
    backend = "sqlite"


class PostgresVerdictsTests(VerdictsMixin, TestCase):
    backend = "postgresql"

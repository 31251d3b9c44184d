"""The queue's hot SQL on both backends: SQLite goes straight through the driver with
multi-row statements (split at the parameter limit), PostgreSQL through SQLAlchemy; both must
give the same rows, ids, results and finished messages."""

from __future__ import annotations

from sqlalchemy import select
from twisted.trial.unittest import TestCase

from mailcore.queue.envelope import Envelope, Recipient
from mailcore.queue.model import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    NewMessage,
    Result,
    thd_apply_results,
    thd_insert_messages,
)
from mailcore.store import Database
from mailcore.store.schema import queue_messages, queue_recipients
from tests.support.db import MixinBase, open_database
from tests.support.mailsink import thd_add_domain

# More rows than one statement of either kind may carry (999 parameters at most).
MESSAGES = 400


class QueueModelTestsMixin(MixinBase):
    backend = ""

    async def db(self) -> Database:
        db = await open_database(self, self.backend)
        self.domain = await db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25)
        return db

    async def test_insert_then_results_for_many_messages(self) -> None:
        db = await self.db()
        msgs = [
            NewMessage(
                f"Q{i:05d}",
                Envelope("a@x.test", (Recipient(f"r{i}@c.test", self.domain),
                                      Recipient(f"s{i}@c.test", self.domain))),
                b"Subject: %d\r\n\r\nbody\r\n" % i,
                leased=i % 2 == 0,
            )
            for i in range(MESSAGES)
        ]
        ids = await db.run("ins", thd_insert_messages, msgs, "node", 100.0, 160.0)
        self.assertEqual([len(x) for x in ids], [2] * MESSAGES)
        flat = [rid for pair in ids for rid in pair]
        self.assertEqual(len(set(flat)), len(flat))

        def rows(conn):  # type: ignore[no-untyped-def]
            r = queue_recipients.c
            return {row.id: row for row in conn.execute(
                select(r.id, r.message_id, r.address, r.state, r.lease_owner, r.lease_until,
                       r.attempts, r.next_attempt_at, r.last_error, r.next_hop))}

        stored = await db.read("rows", rows)
        for i, (first, second) in enumerate(ids):
            self.assertEqual((stored[first].message_id, stored[first].address),
                             (f"Q{i:05d}", f"r{i}@c.test"))
            self.assertEqual(stored[second].address, f"s{i}@c.test")
            self.assertEqual(stored[first].lease_owner, "node" if i % 2 == 0 else None)

        # Leased messages: first recipient delivered, second deferred, except the last
        # leased one whose second recipient bounces (so it finishes, with one failure).
        leased = [i for i in range(MESSAGES) if i % 2 == 0]
        results = []
        for i in leased:
            first, second = ids[i]
            results.append(Result(first, f"Q{i:05d}", DELIVERED, "250 ok", "10.0.0.1:25"))
            if i == leased[-1]:
                results.append(Result(second, f"Q{i:05d}", BOUNCED, "550 5.1.1 no", "h:25"))
            else:
                results.append(Result(second, f"Q{i:05d}", DEFERRED, "451 later", "",
                                      next_attempt_at=500.0))
        # A result for a recipient this node does not lease changes nothing.
        results.append(Result(ids[1][0], "Q00001", DELIVERED, "250 ok", "x:25"))
        finished, applied = await db.run("res", thd_apply_results, "node", 200.0, results)
        self.assertEqual(applied, len(results) - 1)
        self.assertEqual([f.message_id for f in finished], [f"Q{leased[-1]:05d}"])
        self.assertEqual([(b.address, b.detail, b.hop) for b in finished[0].failures],
                         [(f"s{leased[-1]}@c.test", "550 5.1.1 no", "h:25")])
        self.assertIn(b"Subject: %d" % leased[-1], finished[0].headers)

        stored = await db.read("rows", rows)
        first, second = ids[0]
        self.assertEqual((stored[first].state, stored[first].lease_owner,
                          stored[first].attempts, stored[first].next_hop),
                         (DELIVERED, None, 1, "10.0.0.1:25"))
        self.assertEqual((stored[second].state, stored[second].next_attempt_at,
                          stored[second].last_error), (DEFERRED, 500.0, "451 later"))
        self.assertEqual(stored[ids[1][0]].state, "queued")

        def done_messages(conn):  # type: ignore[no-untyped-def]
            m = queue_messages.c
            return [(row.id, row.body) for row in conn.execute(
                select(m.id, m.body).where(m.done_at.is_not(None)))]

        self.assertEqual(await db.read("done", done_messages), [(f"Q{leased[-1]:05d}", None)])


class SQLiteQueueModelTests(QueueModelTestsMixin, TestCase):
    backend = "sqlite"


class PostgresQueueModelTests(QueueModelTestsMixin, TestCase):
    backend = "postgresql"
    timeout = 60

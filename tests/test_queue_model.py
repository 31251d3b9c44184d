"""The queue's hot SQL on both backends: SQLite goes straight through the driver with
multi-row statements (split at the parameter limit), PostgreSQL through SQLAlchemy; both must
give the same rows, ids, results and finished messages. Two nodes recording the last
recipients of one message at once finish it, and a message left unfinished by older versions
is finished by the sweep."""

from __future__ import annotations

import threading
import time
import tracemalloc
from typing import Any

from sqlalchemy import Connection, event, func, select, text
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.queue.model import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    QUARANTINED,
    NewMessage,
    Result,
    thd_apply_results,
    thd_insert_messages,
)
from mailcore.queue.spool import thd_record_results, thd_repair_stranded
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store import Database
from mailcore.store.schema import queue_messages, queue_recipients
from tests.support.db import MixinBase, open_database, open_database_at, synchronous_database
from tests.support.mailsink import ScriptedConnector, done, make_queue, thd_add_domain

# More rows than one statement of either kind may carry (999 parameters at most).
MESSAGES = 400


class QueueModelTestsMixin(MixinBase):
    backend = ""
    # What SQLAlchemy sees of a group commit (each statement's first two words).
    through_sqlalchemy: frozenset[str] = frozenset()

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

        # The deferred ones delivered now: every other leased message finishes, no DSN.
        retried = [
            Result(ids[i][1], f"Q{i:05d}", DELIVERED, "250 ok", "10.0.0.1:25")
            for i in leased[:-1]
        ]

        def lease_again(conn):  # type: ignore[no-untyped-def]
            r = queue_recipients.c
            conn.execute(queue_recipients.update().where(
                r.id.in_([x.rcpt_id for x in retried])).values(lease_owner="node"))

        await db.run("lease", lease_again)
        finished, applied = await db.run("res", thd_apply_results, "node", 300.0, retried)
        self.assertEqual((finished, applied), ([], len(retried)))
        self.assertEqual(sorted(mid for mid, _ in await db.read("done", done_messages)),
                         [f"Q{i:05d}" for i in leased])

    async def test_a_nul_from_a_client_or_a_next_hop_is_stored_as_u_fffd(self) -> None:
        """A HELO and a next hop's reply are not ours to refuse: a NUL in them is kept as
        U+FFFD (PostgreSQL refuses NUL in text, which failed the whole group commit), and
        the bounce's DSN reads the detail back the same."""
        db = await self.db()
        env = Envelope("a@x.test", (Recipient("r@c.test", self.domain),), helo="h\x00elo")
        [[rid]] = await db.run("ins", thd_insert_messages,
                               [NewMessage("Q1", env, b"Subject: s\r\n\r\nb\r\n", leased=True)],
                               "node", 100.0, 160.0)
        finished, applied = await db.run(
            "res", thd_apply_results, "node", 200.0,
            [Result(rid, "Q1", BOUNCED, "550 no\x00such user", "h:25")])
        self.assertEqual(applied, 1)
        self.assertEqual([(b.address, b.detail) for b in finished[0].failures],
                         [("r@c.test", "550 no\ufffdsuch user")])

        def helo(conn):  # type: ignore[no-untyped-def]
            return conn.execute(select(queue_messages.c.helo)).scalar_one()

        self.assertEqual(await db.read("helo", helo), "h\ufffdelo")

    async def test_a_big_message_that_bounces_is_not_loaded_whole_for_its_dsn(self) -> None:
        """The DSN returns the header section (at most 64 KiB): only that much of the body
        is read from the store."""
        db = await self.db()
        head = b"Subject: big\r\nFrom: a@x.test\r\n\r\n"
        body = head + (b"y" * 998 + b"\r\n") * 8000  # 8 MB
        env = Envelope("a@x.test", (Recipient("r@c.test", self.domain),))
        [[rid]] = await db.run("ins", thd_insert_messages, [NewMessage("Q1", env, body, True)],
                               "node", 100.0, 160.0)
        del body

        def bounce(conn: Connection) -> tuple[Any, int]:
            tracemalloc.start()
            try:
                finished, _ = thd_apply_results(conn, "node", 200.0,
                                                [Result(rid, "Q1", BOUNCED, "550 no", "h:25")])
                return finished, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        finished, peak = await db.run("res", bounce)
        self.assertEqual(finished[0].headers, head[:-2])
        self.assertLess(peak, 1 << 20)

    async def test_clean_messages_finish_in_one_step_and_the_others_the_full_way(self) -> None:
        """Delivered or quarantined everywhere: finished without a DSN. A recipient that
        bounced in an earlier batch still gets its DSN when the last one is delivered; a
        message with a recipient still active (here one whose lease is another node's)
        does not finish."""
        db = await self.db()
        rcpts = {
            "Q1": ("a1@c.test", "b1@c.test"),  # both delivered now
            "Q2": ("a2@c.test",),  # quarantined now
            "Q3": ("a3@c.test", "b3@c.test"),  # b3 bounced before, a3 delivered now
            "Q4": ("a4@c.test", "b4@c.test"),  # a4 delivered now, b4 still queued
        }
        msgs = [
            NewMessage(qid, Envelope("s@x.test", tuple(Recipient(a, self.domain)
                                                        for a in addresses)),
                       b"Subject: %s\r\n\r\nbody\r\n" % qid.encode(), leased=True)
            for qid, addresses in rcpts.items()
        ]
        ids = dict(zip(rcpts, await db.run("ins", thd_insert_messages, msgs, "node", 100.0,
                                           160.0), strict=True))
        finished, _ = await db.run("res", thd_apply_results, "node", 150.0, [
            Result(ids["Q3"][1], "Q3", BOUNCED, "550 5.1.1 no", "h:25"),
        ])
        self.assertEqual(finished, [])
        b4 = ids["Q4"][1]

        def release_b4(conn):  # type: ignore[no-untyped-def]
            r = queue_recipients.c
            conn.execute(queue_recipients.update().where(r.id == b4).values(
                lease_owner="other"))

        await db.run("lease", release_b4)
        finished, applied = await db.run("res", thd_apply_results, "node", 200.0, [
            Result(ids["Q1"][0], "Q1", DELIVERED, "250 ok", "h:25"),
            Result(ids["Q1"][1], "Q1", DELIVERED, "250 ok", "h:25"),
            Result(ids["Q2"][0], "Q2", QUARANTINED, "quarantined: spam", ""),
        ])
        self.assertEqual((finished, applied), ([], 3))
        finished, applied = await db.run("res", thd_apply_results, "node", 200.0, [
            Result(ids["Q3"][0], "Q3", DELIVERED, "250 ok", "h:25"),
            Result(ids["Q4"][0], "Q4", DELIVERED, "250 ok", "h:25"),
            Result(b4, "Q4", DELIVERED, "250 ok", "h:25"),  # not ours: not applied
        ])
        self.assertEqual(applied, 2)
        self.assertEqual([(f.message_id, [b.address for b in f.failures]) for f in finished],
                         [("Q3", ["b3@c.test"])])

        def done(conn):  # type: ignore[no-untyped-def]
            m = queue_messages.c
            return {row.id: (row.done_at, row.body is None)
                    for row in conn.execute(select(m.id, m.done_at, m.body))}

        self.assertEqual(await db.read("done", done), {
            "Q1": (200.0, True), "Q2": (200.0, True), "Q3": (200.0, True),
            "Q4": (None, False),
        })
        # A second report for finished messages changes nothing and makes no second DSN.
        finished, _ = await db.run("res", thd_apply_results, "node", 300.0, [
            Result(ids["Q1"][0], "Q1", DELIVERED, "250 ok", "h:25"),
            Result(ids["Q3"][0], "Q3", DELIVERED, "250 ok", "h:25"),
        ])
        self.assertEqual(finished, [])
        self.assertEqual((await db.read("done", done))["Q3"], (200.0, True))

    async def test_a_group_commit_takes_the_statements_of_its_backend(self) -> None:
        """On SQLite a group commit (insert, results, finish) goes straight to the driver:
        SQLAlchemy sees none of its statements. Elsewhere they all go through SQLAlchemy."""
        db = await self.db()
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            seen.append(" ".join(statement.split()[:2]))

        event.listen(db.engine, "before_cursor_execute", record)
        self.addCleanup(event.remove, db.engine, "before_cursor_execute", record)
        msgs = [
            NewMessage(qid, Envelope("s@x.test", (Recipient(f"a@{qid}.test", self.domain),)),
                       b"Subject: x\r\n\r\nbody\r\n", leased=True)
            for qid in ("Q1", "Q2")
        ]

        def group(conn: Connection) -> tuple[Any, ...]:
            [[q1], [q2]] = thd_insert_messages(conn, msgs, "node", 100.0, 160.0)
            return thd_apply_results(conn, "node", 100.0, [
                Result(q1, "Q1", DELIVERED, "250 ok", "h:25"),  # finishes clean
                Result(q2, "Q2", DEFERRED, "451 later", "", next_attempt_at=500.0),
            ])

        self.assertEqual(await db.run("group", group), ([], 2))
        self.assertEqual(set(seen), self.through_sqlalchemy)

        def done(conn: Connection) -> dict[str, float | None]:
            m = queue_messages.c
            return {row.id: row.done_at for row in conn.execute(select(m.id, m.done_at))}

        self.assertEqual(await db.read("done", done), {"Q1": 100.0, "Q2": None})

    async def test_more_messages_finish_at_once_than_one_statement_may_name(self) -> None:
        """Clean messages and messages with a bounce, a thousand of each (more than one
        statement may carry on SQLite), all finish in one call; each bounce is reported."""
        db = await self.db()
        count = 1000
        msgs = [
            NewMessage(f"{kind}{i:04d}",
                       Envelope("s@x.test", (Recipient(f"{kind}{i}@c.test", self.domain),)),
                       b"Subject: %d\r\n\r\nbody\r\n" % i, leased=True)
            for kind in ("C", "B")
            for i in range(count)
        ]
        ids = await db.run("ins", thd_insert_messages, msgs, "node", 100.0, 160.0)
        results = [
            Result(rid, m.queue_id, DELIVERED if m.queue_id[0] == "C" else BOUNCED,
                   "250 ok" if m.queue_id[0] == "C" else "550 no", "h:25")
            for m, [rid] in zip(msgs, ids, strict=True)
        ]
        finished, applied = await db.run("res", thd_apply_results, "node", 200.0, results)
        self.assertEqual(applied, 2 * count)
        self.assertEqual(
            sorted((f.message_id, [(b.address, b.detail) for b in f.failures])
                   for f in finished),
            [(f"B{i:04d}", [(f"B{i}@c.test", "550 no")]) for i in range(count)],
        )

        def unfinished(conn: Connection) -> list[str]:
            m = queue_messages.c
            return [row.id for row in conn.execute(
                select(m.id).where((m.done_at != 200.0) | m.body.is_not(None)))]

        self.assertEqual(await db.read("unfinished", unfinished), [])


    async def test_messages_left_unfinished_are_finished_with_their_dsn(self) -> None:
        """A message no active recipient keeps but never marked done (as two nodes racing
        left them before the message lock) is finished by the repair, once, with its DSN;
        a message with a recipient still active is left alone."""
        db = await self.db()
        msgs = [
            NewMessage(qid, Envelope("s@x.test", (Recipient(f"a@{qid}.test", self.domain),
                                                  Recipient(f"b@{qid}.test", self.domain))),
                       b"Subject: x\r\n\r\nbody\r\n", leased=False)
            for qid in ("Q1", "Q2")
        ]
        ids = await db.run("ins", thd_insert_messages, msgs, "node", 100.0, 160.0)

        def strand(conn: Connection) -> None:
            r = queue_recipients.c
            conn.execute(queue_recipients.update().where(r.id.in_(ids[0])).values(
                state=BOUNCED, last_error="550 no"))
            conn.execute(queue_recipients.update().where(r.id == ids[1][0]).values(
                state=DELIVERED))

        await db.run("strand", strand)
        count, dsns = await db.run("repair", thd_repair_stranded, "node", 200.0, 260.0,
                                   "mx.test", 100)
        self.assertEqual((count, [j.recipients[0].address for j, _ in dsns]),
                         (1, ["s@x.test"]))
        self.assertIn(b"a@Q1.test", dsns[0][1])
        self.assertIn(b"b@Q1.test", dsns[0][1])
        self.assertEqual(await db.run("repair", thd_repair_stranded, "node", 300.0, 360.0,
                                      "mx.test", 100), (0, []))

        def done(conn: Connection) -> dict[str, tuple[float | None, bool]]:
            m = queue_messages.c
            return {row.id: (row.done_at, row.body is None)
                    for row in conn.execute(select(m.id, m.done_at, m.body)
                                            .where(m.id.in_(["Q1", "Q2"])))}

        self.assertEqual(await db.read("done", done),
                         {"Q1": (200.0, True), "Q2": (None, False)})


class RepairChoreTests(TestCase):
    def test_the_sweep_finishes_a_message_left_unfinished_and_sends_its_dsn(self) -> None:
        clock = Clock()
        clock.advance(1000)
        db = synchronous_database()
        domain = done(db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25))
        msg = NewMessage("Q1", Envelope("s@x.test", (Recipient("r@c.test", domain),)),
                         b"Subject: x\r\n\r\nbody\r\n", leased=False)
        [[rid]] = done(db.run("ins", thd_insert_messages, [msg], "", 900.0, 0.0))

        def strand(conn: Connection) -> None:
            conn.execute(queue_recipients.update().where(queue_recipients.c.id == rid)
                         .values(state=BOUNCED, last_error="550 no"))

        done(db.run("strand", strand))
        connector = ScriptedConnector()
        queue = make_queue(db, clock, connector)
        queue.service.startService()
        clock.advance(1)
        self.assertEqual(connector.addresses(), ["s@x.test"])

        def done_at(conn: Connection) -> float | None:
            m = queue_messages.c
            return conn.execute(select(m.done_at).where(m.id == "Q1")).scalar_one()

        self.assertEqual(done(db.read("done", done_at)), 1000.0)
        d = queue.service.stopService()
        clock.advance(30)
        self.successResultOf(d)


class SQLiteQueueModelTests(QueueModelTestsMixin, TestCase):
    backend = "sqlite"


class PostgresQueueModelTests(QueueModelTestsMixin, TestCase):
    backend = "postgresql"
    through_sqlalchemy = frozenset({
        "INSERT INTO", "UPDATE queue_recipients", "UPDATE queue_messages",
        "SELECT queue_messages.id",
    })
    timeout = 60

    async def test_two_nodes_recording_the_last_recipients_at_once_finish_the_message(
        self,
    ) -> None:
        """Recipients r1 and r2 of one message, leased to nodes A and B, reported by both
        at once: B records while A's transaction is still open, then A commits. The message
        finishes (one DSN for both when both bounced). Before the message lock, each saw
        the other's recipient still active, and the message stayed unfinished for ever."""
        db = await self.db()
        other = await open_database_at(self, str(db.engine.url.render_as_string(
            hide_password=False)))
        for states in ((DELIVERED, DELIVERED), (BOUNCED, BOUNCED)):  # no DSN, then one
            qid = f"Q{states[0][0]}"
            await self._race(db, other, qid, states)

    async def _race(self, db: Database, other: Database, qid: str,
                    states: tuple[str, str]) -> None:
        msg = NewMessage(qid, Envelope("s@x.test", (Recipient("r1@c.test", self.domain),
                                                    Recipient("r2@c.test", self.domain))),
                         b"Subject: x\r\n\r\nbody\r\n", leased=False)
        [[r1, r2]] = await db.run("ins", thd_insert_messages, [msg], "", 100.0, 0.0)

        def lease(conn: Connection) -> None:
            r = queue_recipients.c
            for rid, node in ((r1, "A"), (r2, "B")):
                conn.execute(queue_recipients.update().where(r.id == rid).values(
                    lease_owner=node, lease_until=1e12))

        await db.run("lease", lease)
        recorded = threading.Event()
        may_commit = threading.Event()
        self.addCleanup(may_commit.set)

        def node_a(conn: Connection) -> list[Any]:
            dsns = thd_record_results(conn, [Result(r1, qid, states[0], "550 no", "h:25")],
                                      "A", 200.0, 300.0, "mx.test")
            recorded.set()
            may_commit.wait(30)
            return dsns

        def node_b(conn: Connection) -> list[Any]:
            return thd_record_results(conn, [Result(r2, qid, states[1], "550 no", "h:25")],
                                      "B", 200.0, 300.0, "mx.test")

        a = db.run("node A", node_a)
        await threads.deferToThread(recorded.wait, 30)
        b = other.run("node B", node_b)
        b_done: list[bool] = []

        def b_ended(result: Any) -> Any:
            b_done.append(True)
            return result

        b.addBoth(b_ended)

        def b_recorded_or_waits(conn: Connection) -> bool:
            return b_done != [] or bool(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar())

        # B either records at once (as without the lock) or waits for A's lock.
        for _ in range(3000):
            if await db.read("b?", b_recorded_or_waits):
                break
            await threads.deferToThread(time.sleep, 0.01)
        may_commit.set()
        dsns_a, dsns_b = await defer.gatherResults([a, b])

        def state(conn: Connection) -> tuple[bool, bool, int]:
            m = queue_messages.c
            row = conn.execute(select(m.done_at, m.body).where(m.id == qid)).one()
            n = conn.execute(select(func.count()).select_from(queue_messages)
                             .where(m.kind == "bounce")).scalar_one()
            return row.done_at is not None, row.body is None, n

        dsn_count = 1 if states[0] == BOUNCED else 0
        self.assertEqual(len(dsns_a) + len(dsns_b), dsn_count)
        self.assertEqual(await db.read("state", state), (True, True, dsn_count))

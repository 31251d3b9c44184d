"""The spool's commit stream on a real threaded SQLite: it lingers for the next accept and
gives the lane up at once when a chore, due results or a drain want it (results it can take
with its next group wait for it until RESULTS_DELAY); under load it waits for a fuller
group, and when mail trickles in it does not. Results that fail in a group are undone
alone and the group commits (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.queue import spool as spool_module
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.model import DELIVERED, Result
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool, SpoolError, thd_record_results
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.store import Database
from mailcore.store.schema import queue_messages
from tests.support.db import open_database
from tests.support.reactor import get_reactor
from tests.support.servers import sleep

# Far longer than any test may take: if the stream did not give the lane up when asked,
# the test would hang and time out instead of passing.
FOREVER = 3600.0


def _count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(queue_messages)).scalar_one())


class StreamTestCase(TestCase):
    timeout = 30
    backend = "sqlite"
    spool_options: dict[str, float | int] = {"linger": FOREVER}

    async def setUp(self) -> None:  # type: ignore[override]
        self.db: Database = await open_database(self, self.backend)
        self.spool = Spool(
            self.db, get_reactor(), QueueSettings(node_id="test"),
            QueueMetrics(CollectorRegistry()), **self.spool_options,  # type: ignore[arg-type]
        )
        self.addCleanup(self.spool.drain)

    def accept(self, qid: str) -> defer.Deferred[bool]:
        env = Envelope("a@x.test", (Recipient("b@customer.test", None),))
        return defer.Deferred.fromCoroutine(
            self.spool.accept(qid, env, b"Subject: x\r\n\r\nhi\r\n")
        )


class LingeringStreamTests(StreamTestCase):

    async def test_a_lingering_stream_commits_the_next_accept_itself(self) -> None:
        await self.accept("Q1")
        await sleep(0.05)  # the stream is now waiting for more
        await self.accept("Q2")
        self.assertEqual(self.spool.commits, 2)
        self.assertEqual(self.spool.streams, 1)
        self.assertEqual(await self.db.read("n", _count), 2)

    async def test_a_chore_ends_the_linger(self) -> None:
        await self.accept("Q1")
        result = await self.spool.run_serialized("chore", _count)
        self.assertEqual(result, 1)
        await self.accept("Q2")  # a new stream
        self.assertEqual(self.spool.streams, 2)

    async def test_a_lingering_stream_takes_a_rider_itself(self) -> None:
        await self.accept("Q1")
        await sleep(0.05)  # the stream is now waiting for more
        self.assertEqual(await self.spool.ride("count", _count), 1)
        self.assertEqual((self.spool.commits, self.spool.streams), (2, 1))

    async def test_due_results_end_the_linger(self) -> None:
        await self.accept("Q1")
        self.spool.record([Result(1, "Q1", DELIVERED, "250 ok")])
        while self.spool._results or self.spool._busy:
            await sleep(0.01)  # written once due (RESULTS_DELAY), not after the linger
        self.assertEqual(self.spool.streams, 1)

    async def test_results_ride_with_the_next_accept_of_a_lingering_stream(self) -> None:
        # The lane looks quiet (nothing pending, no load), but the stream that lingers
        # takes the results with its next group: no results transaction, no new stream.
        await self.accept("Q1")
        await sleep(0.05)  # the stream is now waiting for more
        self.spool.record([Result(1, "Q1", DELIVERED, "250 ok")])
        await self.accept("Q2")
        self.assertEqual((self.spool.commits, self.spool.streams), (2, 1))
        self.assertFalse(self.spool._results)

    async def test_drain_ends_the_linger(self) -> None:
        await self.accept("Q1")
        await self.spool.drain()
        self.assertFalse(self.spool._busy)


class FailingResultsTests(StreamTestCase):
    """Results that fail in the group they ride along in are rolled back to their savepoint
    and the group commits: on PostgreSQL a statement that fails aborts the transaction,
    which only rolling back to a savepoint gives back."""

    async def test_results_that_fail_in_a_group_cost_no_accept(self) -> None:
        failing = [True]

        def record_results(conn: Connection, *args: Any, **kw: Any) -> Any:
            dsns = thd_record_results(conn, *args, **kw)
            if failing[0]:
                conn.execute(queue_messages.update().where(queue_messages.c.id == "Q1")
                             .values(size=0))  # undone with the results
                conn.execute(text("SELECT no_such_column FROM queue_messages"))
            return dsns

        self.patch(spool_module, "thd_record_results", record_results)
        await self.accept("Q1")
        await sleep(0.05)  # the stream is now waiting for more
        self.spool.record([Result(1, "Q1", DELIVERED, "250 ok")])
        await self.accept("Q2")  # its group carries the result, which fails
        self.assertEqual((self.spool.commits, self.spool.streams), (2, 1))
        self.assertEqual(len(self.flushLoggedErrors(DBAPIError)), 1)
        sizes = await self.db.read("s", lambda c: dict(c.execute(
            select(queue_messages.c.id, queue_messages.c.size)).all()))
        self.assertEqual(sorted(sizes), ["Q1", "Q2"])
        self.assertNotEqual(sizes["Q1"], 0)
        self.assertEqual(len(self.spool._results), 1)  # given back, tried again later
        self.assertIsNotNone(self.spool._retry)
        failing[0] = False
        await self.spool.drain()  # tries them now
        self.assertFalse(self.spool._results)


class PostgreSQLFailingResultsTests(FailingResultsTests):
    timeout = 60
    backend = "postgresql"


class GatheringStreamTests(StreamTestCase):
    """With a gather time far longer than the test, a group that waited for companions it
    was not meant to wait for would hang the test instead of passing."""

    spool_options = {"linger": FOREVER, "gather": FOREVER, "group_target": 3}

    async def test_under_load_a_group_waits_until_it_is_full(self) -> None:
        self.spool._gathering = True  # as after a commit under load
        first = self.accept("Q1")
        await sleep(0.05)  # the stream has Q1 and waits for two more
        self.assertEqual(self.spool.commits, 0)
        await defer.gatherResults([first, self.accept("Q2"), self.accept("Q3")])
        self.assertEqual(self.spool.commits, 1)
        self.assertEqual(await self.db.read("n", _count), 3)

    async def test_when_mail_trickles_in_nothing_waits(self) -> None:
        await self.accept("Q1")
        await self.accept("Q2")
        self.assertEqual(self.spool.commits, 2)

    async def test_a_drain_does_not_wait_for_a_full_group(self) -> None:
        self.spool._gathering = True
        accepted = self.accept("Q1")
        await sleep(0.05)
        await self.spool.drain()
        await accepted
        self.assertEqual(await self.db.read("n", _count), 1)

    async def test_a_rider_waits_for_the_group_under_load(self) -> None:
        self.spool._gathering = True
        first = self.accept("Q1")
        await sleep(0.05)  # the stream has Q1 and waits for two more
        rode = self.spool.ride("count", _count)
        await sleep(0.05)
        self.assertEqual(self.spool.commits, 0)  # the rider did not cut the gathering short
        await defer.gatherResults([first, self.accept("Q2"), self.accept("Q3")])
        self.assertEqual(await rode, 3)
        self.assertEqual(self.spool.commits, 1)

    async def test_a_chore_still_gets_the_lane(self) -> None:
        self.spool._gathering = True
        accepted = self.accept("Q1")
        await sleep(0.05)
        self.assertEqual(await self.spool.run_serialized("chore", _count), 0)
        self.spool._gathering = False  # the group need not wait again in this test
        await self.accept("Q2")
        await accepted
        self.assertEqual(await self.db.read("n", _count), 2)


class _Unreachable:
    """An engine whose connections cannot be had, as while the database server is down;
    anything else is the real engine's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def connect(self) -> Any:
        self.attempts += 1
        raise OperationalError("connect", {}, ConnectionRefusedError("connection refused"))


class UnreachableDatabaseTests(StreamTestCase):

    async def test_accepts_fail_at_once_while_no_connection_can_be_had(self) -> None:
        """The accept is answered (the SMTP client gets 451) instead of waiting for the
        database while the spool starts stream after stream, each failing to connect."""
        engine = self.db.engine
        down = _Unreachable(engine)
        self.db.engine = down  # type: ignore[assignment]
        accepted = self.accept("Q1").addTimeout(5, get_reactor())
        with self.assertRaisesRegex(SpoolError, "connection refused"):
            await accepted
        self.flushLoggedErrors(OperationalError)
        await sleep(0.05)
        self.assertEqual(down.attempts, 1)  # not tried again with nothing to commit
        self.db.engine = engine  # the server is back
        await self.accept("Q2")
        self.assertEqual(await self.db.read("n", _count), 1)

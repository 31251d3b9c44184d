"""The spool's commit stream on a real threaded SQLite: it lingers for the next accept and
gives the lane up at once when a chore, due results or a drain want it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, func, select
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.queue.envelope import Envelope, Recipient
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.model import DELIVERED, Result
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool
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


class LingeringStreamTests(TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.db: Database = await open_database(self, "sqlite")
        self.spool = Spool(
            self.db, get_reactor(), QueueSettings(node_id="test"),
            QueueMetrics(CollectorRegistry()), linger=FOREVER,
        )
        self.addCleanup(self.spool.drain)

    def accept(self, qid: str) -> defer.Deferred[None]:
        env = Envelope("a@x.test", (Recipient("b@customer.test", None),))
        return defer.Deferred.fromCoroutine(
            self.spool.accept(qid, env, b"Subject: x\r\n\r\nhi\r\n")
        )

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

    async def test_due_results_end_the_linger(self) -> None:
        await self.accept("Q1")
        self.spool.record([Result(1, "Q1", DELIVERED, "250 ok")])
        while self.spool._results or self.spool._busy:
            await sleep(0.01)  # written once due (RESULTS_DELAY), not after the linger
        self.assertEqual(self.spool.streams, 1)

    async def test_drain_ends_the_linger(self) -> None:
        await self.accept("Q1")
        await self.spool.drain()
        self.assertFalse(self.spool._busy)

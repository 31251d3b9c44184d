"""`queue flush` reaches a running daemon: the next hops it had marked unusable are tried
again at once. (It used to re-defer the flushed mail without connecting for up to a minute
after a failed connection, counting a try and pushing the next one further out.)"""

from __future__ import annotations

from sqlalchemy import select

from mailcore.queue.model import thd_flush
from mailcore.queue.routing import Hop
from mailcore.store.schema import queue_recipients
from tests.support.mailsink import done
from tests.support.queuetest import QueueTestCase

HOP = Hop("10.0.0.1", 2525)


class FlushTests(QueueTestCase):
    settings = {"min_backoff": 300.0, "dead_hop_seconds": 60.0}

    def state(self) -> tuple[str, int]:
        r = queue_recipients.c
        row = done(self.db.read("s", lambda c: c.execute(
            select(r.state, r.attempts)).one()))
        return row.state, row.attempts

    async def test_a_flush_makes_an_unusable_next_hop_usable_again(self) -> None:
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.state(), ("deferred", 1))
        connects = len(self.connector.connects)
        # The hop is back, and the operator flushes well within the hop's dead time.
        self.connector.down.clear()
        self.clock.advance(5)
        done(self.db.run("flush", thd_flush, self.clock.seconds()))
        self.clock.advance(self.q.settings.poll_interval)
        self.assertEqual(self.state(), ("delivered", 2))  # the failed try and this one
        self.assertEqual(len(self.connector.connects), connects + 1)

    async def test_without_a_flush_the_hop_stays_unusable_until_its_time(self) -> None:
        self.connector.down.add(HOP)
        await self.accept("Q1", "b@customer.test")
        self.connector.down.clear()
        await self.accept("Q2", "b@customer.test")
        # Q2 meets the marked hop: deferred without a connection, not counted against it.
        self.assertEqual(len(self.connector.connects), 1)

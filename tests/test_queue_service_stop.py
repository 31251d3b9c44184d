"""A stop waits for the queue chores in flight: a sweep that is still running when the
daemon stops finishes its housekeeping on the open store (it used to log "the database is
closed" once the store had gone)."""

from __future__ import annotations

from twisted.internet import defer

from tests.support.queuetest import QueueTestCase


class StopWaitsForChoresTests(QueueTestCase):
    async def test_a_sweep_in_flight_finishes_before_the_stop_does(self) -> None:
        service = self.q.service
        gate: defer.Deferred[int] = defer.Deferred()
        swept: list[str] = []

        async def slow_sweep() -> int:
            swept.append("started")
            await gate
            swept.append("finished")
            return 0

        service.sweeper.sweep = slow_sweep  # type: ignore[method-assign]
        self.clock.advance(self.q.settings.poll_interval)
        self.assertEqual(swept, ["started"])
        stopped = service.stopService()
        self.clock.advance(60)
        self.assertNoResult(stopped)
        gate.callback(0)
        self.clock.advance(1)
        await stopped
        self.assertEqual(swept, ["started", "finished"])

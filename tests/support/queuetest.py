"""A queue (spool, runner, service) on a Clock and an in-memory store, delivering to the
scripted connector: the base of the runner's unit tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.support.db import synchronous_database
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain

BODY = b"From: a@x.test\r\nSubject: hello\r\n\r\nbody line\r\n"


class QueueTestCase(TestCase):
    """customer.test served (vouched for, as the operator's adds are) and routed to
    10.0.0.1:2525; `settings` go to QueueSettings.
    At the end the queue is stopped and no DelayedCall may be left on the clock."""

    settings: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = synchronous_database()
        self.connector = ScriptedConnector()
        self.domain = done(self.db.run(
            "add", thd_add_domain, "customer.test", "10.0.0.1", 2525, vouched=True
        ))
        self.q = make_queue(self.db, self.clock, self.connector, **self.settings)
        self.runner = self.q.runner
        self.q.service.startService()
        self.addCleanup(self.stop)

    async def stop_async(self) -> None:
        if self.q.service.running:
            d = self.q.service.stopService()
            self.clock.advance(60)
            await d

    def stop(self) -> defer.Deferred[None]:
        d = defer.Deferred.fromCoroutine(self.stop_async())
        d.addCallback(lambda _: self.assertEqual(self.clock.getDelayedCalls(), []))
        return d

    async def accept(self, qid: str, *rcpts: str, sender: str = "a@x.test",
                     body: bytes = BODY) -> None:
        env = envelope(sender, *[(r, self.domain) for r in rcpts])
        await self.q.spool.accept(qid, env, body)

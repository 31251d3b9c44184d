"""The queue service's start: mail accepted while the node recovers (applies its results
journal, releases its old leases) is delivered as soon as the recovery is done, not a
`[queue] poll_interval` later."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.support.db import synchronous_database
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain


class StartTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = synchronous_database()
        self.domain = done(self.db.run("d", thd_add_domain, "c.test", "10.0.0.1", 25))
        self.connector = ScriptedConnector()
        self.q = make_queue(self.db, self.clock, self.connector, poll_interval=5.0)
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.q.service.running:
            d = self.q.service.stopService()
            self.clock.advance(60)
            self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def gate(self, name: str) -> defer.Deferred[None]:
        """Make the store's `name` work wait until the returned Deferred fires."""
        gate: defer.Deferred[None] = defer.Deferred()
        run = self.db.run

        def gated(what: str, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            if what != name:
                return run(what, fn, *args, **kwargs)
            result: defer.Deferred[Any] = defer.Deferred()
            gate.addCallback(lambda _: run(what, fn, *args, **kwargs).chainDeferred(result))
            return result

        self.db.run = gated  # type: ignore[method-assign, assignment]
        self.addCleanup(setattr, self.db, "run", run)
        return gate

    def accept(self, qid: str, rcpt: str) -> defer.Deferred[bool]:
        env = envelope("s@x.test", (rcpt, self.domain))
        return defer.Deferred.fromCoroutine(self.q.spool.accept(qid, env, b"body\r\n"))

    def test_mail_accepted_during_the_recovery_goes_when_it_is_done(self) -> None:
        """The first sweep, at the end of the recovery, took its turn in the spool's lane
        before the accepts that had waited there, so their mail (committed unleased: the
        runner had not started) waited for the next sweep, `poll_interval` later."""
        released = self.gate("queue_release_own")
        self.q.service.startService()
        accepted = [self.accept("Q0", "r0@c.test"), self.accept("Q1", "r1@c.test")]
        self.assertNoResult(accepted[0])
        released.callback(None)
        for d in accepted:
            self.successResultOf(d)
        self.assertEqual(sorted(self.connector.addresses()), ["r0@c.test", "r1@c.test"])
        # Later mail goes at once too, and nothing is sent twice.
        self.successResultOf(self.accept("Q2", "r2@c.test"))
        self.clock.advance(5)
        self.assertEqual(sorted(self.connector.addresses()),
                         ["r0@c.test", "r1@c.test", "r2@c.test"])
        self.assertEqual(self.q.runner.held, 0)  # (the room held for them was let go)

"""The durable spool: accept returns only after the commit, group commit batches, failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.queue import spool as spool_module
from mailcore.queue.journal import ResultJournal
from mailcore.queue.model import BOUNCED, DEFERRED, DELIVERED, Result
from mailcore.queue.spool import RETRY_DELAY, SpoolError, Withdrawn, thd_record_results
from mailcore.store.schema import queue_messages, queue_recipients
from tests.support.db import synchronous_database
from tests.support.logs import logged
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain


class GatedDatabase:
    """A synchronous test Database whose commit groups (`stream`) complete only when released,
    as a real commit in flight would; it counts transactions and can fail them."""

    def __init__(self) -> None:
        self.inner = synchronous_database()
        self.url = self.inner.url
        self.is_sqlite = True
        self.threaded = False
        self.gates: list[defer.Deferred[None]] = []
        self.accept_batches: list[int] = []
        self.fail_next = False
        self.transactions: list[str] = []
        self.group_results: list[int] = []

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        self.transactions.append(name)
        return self.inner.run(name, fn, *args, **kw)

    def stream(
        self, name: str, take: Callable[[], Any], fn: Callable[..., Any],
        done: Callable[[Any, Any], None],
    ) -> defer.Deferred[None]:
        """Database.stream with each group's transaction held at a gate."""

        async def loop() -> None:
            while True:
                batch = take()
                if not batch:
                    return
                gate: defer.Deferred[None] = defer.Deferred()
                self.gates.append(gate)
                self.accept_batches.append(len(batch.batch))
                self.group_results.append(len(batch.results))
                await gate
                if self.fail_next:
                    self.fail_next = False
                    done(batch, Failure(RuntimeError("disk full")))
                    return
                result = self.inner.run(name, fn, batch)
                done(batch, result.result)

        return defer.Deferred.fromCoroutine(loop())

    def read(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.inner.read(name, fn, *args, **kw)

    def release(self) -> None:
        gates, self.gates = self.gates, []
        for g in gates:
            g.callback(None)


def _count_messages(conn: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(queue_messages)).scalar_one())


class SpoolTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.db = GatedDatabase()
        self.domain = done(self.db.inner.run(
            "d", thd_add_domain, "customer.test", "10.0.0.1", 25
        ))
        self.connector = ScriptedConnector()
        self.q = make_queue(self.db, self.clock, self.connector)  # type: ignore[arg-type]

    def accept(self, qid: str, guard: Callable[[Any], bool] | None = None
               ) -> defer.Deferred[None]:
        env = envelope("a@x.test", ("b@customer.test", self.domain))
        body = b"Subject: x\r\n\r\nhi\r\n"
        return defer.Deferred.fromCoroutine(self.q.spool.accept(qid, env, body, guard=guard))

    def count(self, table: Any) -> int:
        return done(self.db.inner.read(
            "n", lambda c: c.execute(select(func.count()).select_from(table)).scalar_one()
        ))

    def test_accept_returns_only_after_the_commit(self) -> None:
        d = self.accept("Q1")
        self.assertNoResult(d)
        self.assertEqual(self.count(queue_messages), 0)
        self.db.release()
        self.successResultOf(d)
        self.assertEqual(self.count(queue_messages), 1)
        self.assertEqual(self.count(queue_recipients), 1)

    def test_accepts_during_a_commit_share_the_next_transaction(self) -> None:
        first = self.accept("Q0")
        waiting = [self.accept(f"Q{i}") for i in range(1, 51)]
        self.assertEqual(self.db.accept_batches, [1])
        self.db.release()
        self.successResultOf(first)
        for d in waiting:
            self.assertNoResult(d)
        self.assertEqual(self.db.accept_batches, [1, 50])
        self.db.release()
        for d in waiting:
            self.successResultOf(d)
        self.assertEqual(self.count(queue_messages), 51)
        self.assertEqual(self.q.spool.commits, 2)
        self.assertEqual(self.q.metrics.accepted._value.get(), 51)

    def test_batches_are_capped(self) -> None:
        self.q.spool.settings = self.q.settings.__class__(batch_max_messages=20)
        first = self.accept("Q0")
        rest = [self.accept(f"Q{i}") for i in range(1, 46)]
        for _ in range(4):
            self.db.release()
        self.successResultOf(first)
        for d in rest:
            self.successResultOf(d)
        self.assertEqual(self.db.accept_batches, [1, 20, 20, 5])

    def test_a_failed_commit_fails_every_accept_in_it(self) -> None:
        first = self.accept("Q0")
        batch = [self.accept(f"Q{i}") for i in range(1, 4)]
        self.db.release()
        self.db.fail_next = True
        self.db.release()
        for d in batch:
            self.failureResultOf(d, SpoolError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.q.runner.held, 0)
        self.successResultOf(first)
        # The spool carries on with the next accept.
        later = self.accept("Q9")
        self.db.release()
        self.successResultOf(later)
        self.assertEqual(self.count(queue_messages), 2)

    def test_a_run_of_failed_commits_is_logged_once_and_its_end_once(self) -> None:
        """A full disk or a database down fails every group until it is back: the first
        failure is logged with its cause, the end of the run in one line, nothing between."""
        lines = logged(self, lambda e: e.get("log_namespace") == "mailcore.queue.spool")
        refused = []
        for i in range(3):
            d = self.accept(f"Q{i}")
            self.db.fail_next = True
            self.db.release()
            refused.append(d)
        for d in refused:
            self.failureResultOf(d, SpoolError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(lines), 1)
        self.assertIn("accepts are refused (451) until a commit succeeds", lines[0])
        later = self.accept("Q9")
        self.db.release()
        self.successResultOf(later)
        self.assertEqual(lines[1:], [
            "spool commits succeed again, after 3 failed (3 messages refused)",
        ])
        # A later failure is the first of a new run.
        d = self.accept("Q10")
        self.db.fail_next = True
        self.db.release()
        self.failureResultOf(d, SpoolError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(lines), 3)

    def test_a_run_of_failed_result_writes_is_logged_once_and_its_end_once(self) -> None:
        lines = logged(self, lambda e: e.get("log_namespace") == "mailcore.queue.spool")
        spool = self.q.spool
        db = self.db
        failing = [True]

        class Failing:
            def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
                if failing[0]:
                    return defer.fail(RuntimeError("database or disk is full"))
                return db.run(name, fn, *args)

        spool.results_db = Failing()  # type: ignore[assignment]
        spool.record([Result(1, "Q1", DELIVERED, "250 ok")])  # tried at once: the lane is idle
        for _ in range(4):
            self.clock.advance(RETRY_DELAY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(lines, ["writing 1 delivery results failed; retrying every 1 s"])
        failing[0] = False
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(lines[1:], ["delivery results written again, after 5 failed attempts"])
        self.assertFalse(spool._results)

    def failing_results(self) -> list[str]:
        """Every results transaction of the spool fails; the names of those tried."""
        tried: list[str] = []

        class Failing:
            def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
                tried.append(name)
                return defer.fail(RuntimeError("cannot build the DSN"))

        self.q.spool.results_db = Failing()  # type: ignore[assignment]
        return tried

    def test_drain_gives_up_on_results_the_journal_holds_after_one_failed_attempt(
        self,
    ) -> None:
        """At stop, results whose write fails every time (a bounce whose DSN cannot be
        built) are tried once more and given up on: the final ones are in the results
        journal, applied at the next start, and a deferral lost only means an earlier
        retry. Drain retried them every RETRY_DELAY until the service's stop timeout."""
        lines = logged(self, lambda e: e.get("log_namespace") == "mailcore.queue.spool")
        directory = Path(self.mktemp())
        directory.mkdir()
        journal = ResultJournal(directory)
        journal.thd_open()
        self.addCleanup(journal.thd_close)
        spool = self.q.spool
        spool.journal = journal
        tried = self.failing_results()
        bounced = Result(1, "Q1", BOUNCED, "550 5.1.1 unknown user", "10.0.0.1:25")
        deferred = Result(2, "Q2", DEFERRED, "451 4.3.0 try later", "10.0.0.1:25", 500.0)
        spool.record([bounced, deferred])  # tried at once (the lane is idle), and fails
        self.assertEqual(len(tried), 1)
        drained = defer.Deferred.fromCoroutine(spool.drain())
        self.successResultOf(drained)  # after one more attempt, with no time passing
        self.assertEqual(len(tried), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(lines[1:], [
            "at stop, gave up writing 2 delivery results: 1 in the results journal (applied "
            "at the next start), 1 deferrals (tried again sooner)",
        ])
        self.assertFalse(spool._results)
        self.assertFalse(self.clock.getDelayedCalls())
        journal.thd_close()  # the store lacks the bounce: the journal keeps it
        self.assertEqual(ResultJournal(directory).thd_read(), [bounced])

    def test_drain_keeps_trying_final_results_the_journal_lacks(self) -> None:
        """A final result not in the journal (none, or its write failed) is not given up
        on at stop: lost, its mail would be delivered again after the restart."""
        spool = self.q.spool
        self.assertIsNone(spool.journal)
        tried = self.failing_results()
        spool.record([Result(1, "Q1", DELIVERED, "250 ok")])
        drained = defer.Deferred.fromCoroutine(spool.drain())
        self.clock.advance(RETRY_DELAY)
        self.assertNoResult(drained)
        self.assertEqual(len(tried), 3)
        self.assertEqual(len(spool._results), 1)
        self.flushLoggedErrors(RuntimeError)
        spool.results_db = self.db  # type: ignore[assignment]
        self.clock.advance(RETRY_DELAY)
        self.successResultOf(drained)
        self.assertFalse(spool._results)

    def test_drain_waits_for_pending_commits(self) -> None:
        self.accept("Q0")
        self.accept("Q1")
        drained = defer.Deferred.fromCoroutine(self.q.spool.drain())
        self.db.release()
        self.assertNoResult(drained)
        self.db.release()
        self.successResultOf(drained)

    def test_a_rider_is_written_by_the_next_group_commit(self) -> None:
        """A small write of the pipeline (a token charge) does not stop the commit stream
        for a transaction of its own: it goes into the group that commits next."""
        first = self.accept("Q0")
        rode = self.q.spool.ride("count", _count_messages)
        second = self.accept("Q1")
        self.db.release()  # Q0's group, already in flight when the rider came
        self.successResultOf(first)
        self.assertNoResult(rode)
        self.db.release()  # Q1's group, carrying the rider
        self.successResultOf(second)
        self.assertEqual(self.successResultOf(rode), 2)  # it saw its own group's message
        self.assertEqual(self.db.accept_batches, [1, 1])
        self.assertEqual(self.db.transactions, [])  # no transaction of its own
        self.assertEqual(self.q.spool.commits, 2)

    def test_a_rider_alone_starts_a_group(self) -> None:
        rode = self.q.spool.ride("count", _count_messages)
        self.assertNoResult(rode)
        self.db.release()
        self.assertEqual(self.successResultOf(rode), 0)
        self.assertEqual(self.db.accept_batches, [0])

    def test_a_failing_rider_fails_alone_and_its_writes_are_undone(self) -> None:
        def wipe_then_fail(conn: Any) -> None:
            conn.execute(queue_messages.delete())
            raise ValueError("a bug in the rider")

        accepted = self.accept("Q0")
        rode = self.q.spool.ride("wipe", wipe_then_fail)
        also = self.accept("Q1")
        self.db.release()  # Q0's group, in flight before the rider came
        self.successResultOf(accepted)
        self.db.release()  # Q1's, with the rider
        self.successResultOf(also)
        self.failureResultOf(rode, ValueError)
        self.assertEqual(self.count(queue_messages), 2)  # its savepoint was rolled back

    def test_riders_fail_with_their_group(self) -> None:
        first = self.accept("Q0")
        rode = self.q.spool.ride("count", _count_messages)
        second = self.accept("Q1")
        self.db.release()
        self.successResultOf(first)
        self.db.fail_next = True
        self.db.release()
        # Each caller's SpoolError carries the commit's error as its cause (what tells an
        # outage from a bug: mailcore.outages).
        refused = self.failureResultOf(second, SpoolError)
        self.assertIsInstance(refused.value.__cause__, RuntimeError)
        rider = self.failureResultOf(rode, SpoolError)
        self.assertIsInstance(rider.value.__cause__, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_message_whose_guard_says_no_is_left_out_alone(self) -> None:
        """A guard runs in the group's transaction before its message is stored (the
        outbox marks its mail sent there): a message whose guard says no, or raises, is
        not stored and its accept fails; what the guard wrote is undone; the others of
        the group are stored."""
        self.q.runner.start()

        def wipe(answer: bool) -> Callable[[Any], bool]:
            def guard(conn: Any) -> bool:
                conn.execute(queue_messages.delete())
                return answer
            return guard

        def broken(conn: Any) -> bool:
            raise ValueError("a bug in the guard")

        first = self.accept("Q0")
        kept = self.accept("Q1")
        left_out = self.accept("Q2", guard=wipe(False))
        failed = self.accept("Q3", guard=broken)
        yes = self.accept("Q4", guard=lambda conn: True)
        self.db.release()  # Q0's group
        self.successResultOf(first)
        self.db.release()  # the other four's
        self.assertEqual(self.db.accept_batches, [1, 4])
        self.successResultOf(kept)
        self.failureResultOf(left_out, Withdrawn)
        self.failureResultOf(failed, ValueError)
        self.successResultOf(yes)
        ids = done(self.db.inner.read("ids", lambda c: c.execute(
            select(queue_messages.c.id).order_by(queue_messages.c.id)).scalars().all()))
        self.assertEqual(ids, ["Q0", "Q1", "Q4"])
        self.assertEqual(self.q.metrics.accepted._value.get(), 3)
        self.assertEqual(len(self.connector.delivered), 3)
        self.assertEqual(self.q.runner.held, 0)

    def test_drain_waits_for_riders(self) -> None:
        rode = self.q.spool.ride("count", _count_messages)
        drained = defer.Deferred.fromCoroutine(self.q.spool.drain())
        self.assertNoResult(drained)
        self.db.release()
        self.successResultOf(rode)
        self.successResultOf(drained)

    def test_a_message_without_recipients_is_refused(self) -> None:
        d = defer.Deferred.fromCoroutine(self.q.spool.accept("Q", envelope("a@x"), b"x"))
        self.failureResultOf(d, SpoolError)

    def test_an_accept_given_up_on_is_withdrawn_unless_its_commit_has_begun(self) -> None:
        """The SMTP server's command deadline cancels an accept: one still waiting for a
        group is taken out (never stored; the runner's room it held is given back); one
        whose group commit is under way is stored when that lands, its answer dropped, and
        the rest of its group is answered as usual."""
        self.q.runner.start()
        first = self.accept("Q0")
        in_flight, companion = self.accept("Q1"), self.accept("Q2")
        self.db.release()  # Q0's group commits; Q1 and Q2 are taken into the next
        self.successResultOf(first)
        self.assertEqual(self.db.accept_batches, [1, 2])
        waiting = self.accept("Q3")
        held = self.q.runner.held
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.q.runner.held, held - 1)
        in_flight.cancel()
        self.failureResultOf(in_flight, defer.CancelledError)
        self.db.release()  # the commit under way lands
        self.successResultOf(companion)
        self.db.release()
        self.assertEqual(self.db.accept_batches, [1, 2])  # Q3 never went into a group
        ids = done(self.db.inner.read(
            "q", lambda c: sorted(c.execute(select(queue_messages.c.id)).scalars())))
        self.assertEqual(ids, ["Q0", "Q1", "Q2"])
        self.assertEqual(len(self.connector.delivered), 3)  # the late one delivered too

    def test_a_rider_given_up_once_its_group_took_it_commits_unheard(self) -> None:
        """A rider cancelled after a group took it (a safedrop link opened by a client that
        left meanwhile) commits with its group, its answer dropped; the rest of the group is
        answered and handed to the runner as usual. Its second answer raised
        AlreadyCalledError in the middle of that: the riders after it were never answered
        (their callers hung) and the group's messages waited for their lease to lapse."""
        self.q.runner.start()
        first = self.accept("Q0")
        given_up = self.q.spool.ride("count", _count_messages)
        other = self.q.spool.ride("count", _count_messages)
        companion = self.accept("Q1")
        self.db.release()  # Q0's group; Q1 and both riders are taken into the next
        self.successResultOf(first)
        self.assertEqual(self.db.accept_batches, [1, 1])
        given_up.cancel()
        self.failureResultOf(given_up, defer.CancelledError)
        self.db.release()
        self.successResultOf(companion)
        self.assertEqual(self.successResultOf(other), 2)
        self.assertEqual(len(self.connector.delivered), 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_leased_to_this_node_only_while_the_runner_has_room(self) -> None:
        self.q.runner.start()
        self.q.runner.held = self.q.settings.max_in_memory  # full
        d = self.accept("Q1")
        self.db.release()
        self.successResultOf(d)
        owner = done(self.db.inner.read(
            "o", lambda c: c.execute(select(queue_recipients.c.lease_owner)).scalar()
        ))
        self.assertIsNone(owner)
        self.assertEqual(self.connector.delivered, [])

    def test_results_ride_along_in_the_next_group_commit(self) -> None:
        """While mail streams in, a delivery result is written by the next group commit,
        not by a transaction of its own (which would delay the next 250)."""
        self.q.runner.start()
        first = self.accept("Q1")
        second = self.accept("Q2")
        self.db.release()  # Q1 commits and is delivered at once by the scripted hop
        self.successResultOf(first)
        self.assertEqual(self.connector.addresses(), ["b@customer.test"])
        self.assertNoResult(second)
        self.db.release()  # Q2's group, carrying Q1's result
        self.successResultOf(second)
        states = done(self.db.inner.read(
            "s", lambda c: dict(c.execute(
                select(queue_recipients.c.message_id, queue_recipients.c.state)
            ).all())
        ))
        self.assertEqual(states["Q1"], "delivered")
        self.assertEqual(self.db.group_results, [0, 1])
        # Q2's own result, recorded once the lane was quiet, got a transaction.
        self.assertEqual(self.db.transactions.count("queue_results"), 1)
        self.q.runner.running = False

    def test_results_that_fail_in_a_group_commit_cost_no_accept(self) -> None:
        """Results that fail in the group commit they ride along in (a deadlock with another
        node's sweeper, a DSN that cannot be built) are given back and tried again later,
        as a results transaction of their own is; the group's messages are stored and
        their callers answered. They failed the whole group: every SMTP client in it got
        451, and the next group took them again."""
        lines = logged(self, lambda e: e.get("log_namespace") == "mailcore.queue.spool")
        failing = [True]

        def record_results(conn: Any, *args: Any, **kw: Any) -> Any:
            dsns = thd_record_results(conn, *args, **kw)  # its writes are undone
            if failing[0]:
                raise ValueError("cannot build the DSN")
            return dsns

        self.patch(spool_module, "thd_record_results", record_results)
        spool = self.q.spool
        self.q.runner.start()
        first = self.accept("Q1")
        second = self.accept("Q2")
        self.db.release()  # Q1 commits and is delivered at once by the scripted hop
        self.successResultOf(first)
        self.db.release()  # Q2's group, carrying Q1's result, which fails
        self.successResultOf(second)
        self.assertEqual(self.db.group_results, [0, 1])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(lines, ["writing 1 delivery results failed; retrying every 1 s"])

        def states() -> dict[str, str]:
            return done(self.db.inner.read("s", lambda c: dict(c.execute(
                select(queue_recipients.c.message_id, queue_recipients.c.state)).all())))

        self.assertEqual(states(), {"Q1": "queued", "Q2": "queued"})
        self.assertEqual(len(spool._results), 2)  # Q1's given back, Q2's recorded since
        self.clock.advance(RETRY_DELAY)  # their own transaction, which fails as well
        self.assertEqual(self.db.transactions, ["queue_results"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 0)  # a run, logged once
        failing[0] = False
        self.clock.advance(RETRY_DELAY)
        self.assertEqual(states(), {"Q1": "delivered", "Q2": "delivered"})
        self.assertFalse(spool._results)
        self.assertEqual(lines[1:], ["delivery results written again, after 2 failed attempts"])
        self.q.runner.running = False

    def test_results_a_group_failed_are_not_passed_by_later_ones(self) -> None:
        """While the reactor has not yet given back the results whose savepoint failed in a
        group, the stream's next groups take no later results, even when the reactor
        answers an earlier group meanwhile (the stream runs ahead of the reactor). That
        answer cleared the hold: the next group wrote a later result before the failed
        ones."""

        def record_results(conn: Any, *args: Any, **kw: Any) -> Any:
            raise ValueError("cannot build the DSN")

        self.patch(spool_module, "thd_record_results", record_results)
        spool = self.q.spool
        earlier: Any = ("earlier", spool_module.NOT_WRITTEN)
        later: Any = ("later", spool_module.NOT_WRITTEN)
        # On the stream's thread: group A commits (its answer waits for the reactor), then
        # group B, whose results fail in their savepoint.
        a = spool_module._Group([], [])
        b = spool_module._Group([], [earlier])
        a_done = spool_module._Committed(self.clock.seconds(), [], [], [])
        b_done = done(self.db.inner.run("queue_commit", spool._thd_commit, b))
        self.assertIsNotNone(b_done.results_failed)
        # The reactor answers A, B's answer still on its way; a result is recorded meanwhile.
        spool._committed(a, a_done)
        spool._results.append(later)
        spool._riders.append(object())  # the stream's next group has something to take
        group = spool._take_for_stream()
        assert group is not None
        self.assertEqual(group.results, [])
        spool._committed(b, b_done)
        self.assertEqual(list(spool._results), [earlier, later])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_results_left_waiting_when_a_burst_ends_are_written_once_due(self) -> None:
        """Results recorded while a group of a burst commits, whose results timer fired
        before they were due (it was set for earlier ones, which rode along), are written
        RESULTS_DELAY after they were recorded, not only when the lane next stirs."""
        spool = self.q.spool
        first = self.accept("Q0")
        burst = [self.accept(f"Q{i}") for i in range(1, 51)]
        spool.record([Result(1, "Q0", DELIVERED, "250 ok")])  # rides with the burst
        self.db.release()
        self.successResultOf(first)
        self.clock.advance(0.05)
        spool.record([Result(2, "Q1", DELIVERED, "250 ok")])  # while the burst commits
        self.db.release()
        for d in burst:
            self.successResultOf(d)
        self.assertEqual(self.db.group_results, [0, 1])
        self.clock.advance(0.05)  # the timer set for the first result: too early for this
        self.clock.advance(0.1)
        self.assertFalse(spool._results)
        self.assertEqual(self.db.transactions.count("queue_results"), 1)

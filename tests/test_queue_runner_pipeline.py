"""The queue runner runs the pipeline before it takes a connection: a deferred, quarantined
or discarded message never opens one (and each of those decisions is logged), tags travel
with the job and are applied at send time (also when the body is loaded from the store
then), scans are bounded by `max_scans`, a message whose hops are all down is not scanned, a
stop with scans in flight loses nobody, and with no stages nothing of this runs. The same
tests run with stages that decide at once (`process_now`, as the built-in filters do), and
what has to wait after a first stage decided at once resumes from the next stage."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event, select
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from mailcore.billing.plans import Plans
from mailcore.gateway.filtering import PipelineQuarantine
from mailcore.gateway.quarantine import LinkSigner, QuarantineService, QuarantineSettings
from mailcore.queue.pipeline import (
    LATER,
    Action,
    Decision,
    Later,
    Pipeline,
    PipelineMessage,
    Resume,
)
from mailcore.queue.routing import Hop
from mailcore.queue.runner import PROCESSING_FAILED, QUARANTINE_FAILED, TAG_INLINE
from mailcore.store.schema import quarantine, queue_recipients
from mailcore.workers import CpuPool
from tests.support.mailsink import done
from tests.support.queuetest import BODY, QueueTestCase


class Stage:
    """A scripted pipeline stage: answers `decision`, or waits on `gate` when set; counts
    the messages it saw and how many it was working on at once. With `now`, it decides at
    once (`process_now`) unless it has a gate."""

    def __init__(self, decision: Decision | None = None) -> None:
        self.decision = decision
        self.gate: defer.Deferred[None] | None = None
        self.seen: list[PipelineMessage] = []
        self.running = 0
        self.most = 0
        self.waiting: list[defer.Deferred[None]] = []
        self.now = False
        self.at_once = 0  # messages decided by process_now

    def process_now(self, message: PipelineMessage) -> Decision | Later | None:
        if not self.now or self.gate is not None:
            return LATER
        self.seen.append(message)
        self.at_once += 1
        return self.decision

    async def process(self, message: PipelineMessage) -> Decision | None:
        self.seen.append(message)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                d: defer.Deferred[None] = defer.Deferred()
                self.waiting.append(d)
                await d
            return self.decision
        finally:
            self.running -= 1

    def release(self, n: int | None = None) -> None:
        """Let the `n` oldest waiting scans (all by default) finish."""
        count = len(self.waiting) if n is None else n
        for d in self.waiting[:count]:
            d.callback(None)
        del self.waiting[:count]


class Kept:
    """The pipeline's quarantine callback: records what it was asked to keep."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[str, ...]]] = []

    def thd_keep(self, conn: Connection, message: PipelineMessage, decision: Decision,
                 now: float) -> None:
        wanted = set(decision.quarantine)
        self.items.append((message.queue_id, tuple(
            r.address for r in message.recipients
            if decision.action is Action.QUARANTINE or r.address in wanted
        )))


class PipelineRunnerBase(QueueTestCase):
    now = False  # the Stages decide at once

    def use(self, *stages: Any, max_scans: int = 32, quarantine: Any = None) -> None:
        for stage in stages:
            if isinstance(stage, Stage):
                stage.now = self.now
        self.runner.pipeline = Pipeline(list(stages), quarantine, max_scans=max_scans)

    def rows(self) -> dict[str, tuple[str, str | None]]:
        r = queue_recipients.c
        return done(self.db.read("rows", lambda c: {
            row.address: (row.state, row.lease_owner)
            for row in c.execute(select(r.address, r.state, r.lease_owner))
        }))

    def last_errors(self) -> dict[str, str | None]:
        r = queue_recipients.c
        return done(self.db.read("errors", lambda c: dict(
            c.execute(select(r.address, r.last_error)).tuples().all())))

    def states(self) -> dict[str, str]:
        return {a: s for a, (s, _o) in self.rows().items()}

    async def hop(self) -> Hop:
        hop: Hop = await self.runner.router.route(self.domain, "x@customer.test")
        return hop


class DecisionBeforeConnectTests(PipelineRunnerBase):
    async def test_a_deferred_message_never_opens_a_connection(self) -> None:
        stage = Stage(Decision(Action.DEFER, reason="4.7.1 tokens exhausted"))
        self.use(stage)
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "deferred",
                                         "c@customer.test": "deferred"})
        self.assertEqual(len(stage.seen), 1)
        self.assertEqual(self.runner.held, 0)

    async def test_a_quarantined_message_never_opens_a_connection(self) -> None:
        kept = Kept()
        self.use(Stage(Decision(Action.QUARANTINE, reason="spam", category="spam")),
                 quarantine=kept)
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(kept.items, [("Q1", ("b@customer.test",))])
        self.assertEqual(self.states(), {"b@customer.test": "quarantined"})

    async def test_a_quarantine_without_a_store_stays_queued(self) -> None:
        self.use(Stage(Decision(Action.QUARANTINE, reason="spam")))
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "deferred"})

    async def test_a_failing_quarantine_defers_with_a_fixed_text(self) -> None:
        """The store's error (SQL, parameters, the message's bytes) is logged; the result,
        which `queue show` shows and an expiry DSN quotes to the sender, says only what
        failed."""
        class Broken:
            def thd_keep(self, conn: Connection, message: PipelineMessage,
                         decision: Decision, now: float) -> None:
                raise RuntimeError("INSERT INTO quarantine ... parameters: secret body bytes")

        self.use(Stage(Decision(Action.QUARANTINE, reason="spam", category="spam")),
                 quarantine=Broken())
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.last_errors(), {"b@customer.test": QUARANTINE_FAILED})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_discarded_message_never_opens_a_connection(self) -> None:
        self.use(Stage(Decision(Action.DISCARD, reason="policy")))
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "delivered"})

    async def test_partial_quarantine_sends_the_others_tagged(self) -> None:
        kept = Kept()
        self.use(Stage(Decision(Action.TAG, (("X-Spam-Flag", "YES"),), reason="spam",
                                quarantine=("c@customer.test",), subject_prefix="[SPAM]")),
                 quarantine=kept)
        await self.accept("Q1", "b@customer.test", "c@customer.test", "d@customer.test")
        self.assertEqual(kept.items, [("Q1", ("c@customer.test",))])
        [(_hop, _f, rcpts, body, _tls)] = self.connector.delivered
        self.assertEqual(rcpts, ["b@customer.test", "d@customer.test"])
        self.assertEqual(body, b"X-Spam-Flag: YES\r\nFrom: a@x.test\r\n"
                               b"Subject: [SPAM] hello\r\n\r\nbody line\r\n")
        self.assertEqual(self.states(), {"b@customer.test": "delivered",
                                         "c@customer.test": "quarantined",
                                         "d@customer.test": "delivered"})

    async def test_each_decision_that_keeps_mail_back_is_logged(self) -> None:
        cases = [
            (Decision(Action.DEFER, reason="4.7.1 tokens exhausted"),
             "Q1: deferred to=<b@customer.test>,<c@customer.test> relay=- delay=0.00 "
             "reason=4.7.1 tokens exhausted"),
            (Decision(Action.QUARANTINE, reason="spam score 9.1"),
             "Q2: quarantined nrcpt=2 to=<b@customer.test>,<c@customer.test> "
             "reason=spam score 9.1"),
            (Decision(Action.TAG, reason="one is strict", quarantine=("c@customer.test",)),
             "Q3: quarantined nrcpt=1 to=<c@customer.test> reason=one is strict"),
            (Decision(Action.DISCARD, reason="virus found"),
             "Q4: discarded nrcpt=2 to=<b@customer.test>,<c@customer.test> "
             "reason=virus found"),
        ]
        stage = Stage()
        self.use(stage, quarantine=Kept())
        for n, (decision, line) in enumerate(cases, 1):
            stage.decision = decision
            with capturedLogs() as events:
                await self.accept(f"Q{n}", "b@customer.test", "c@customer.test")
            self.assertIn(line, [formatEvent(e) for e in events])

    async def test_the_pipeline_runs_before_any_connection_is_taken(self) -> None:
        stage = Stage()
        stage.gate = defer.Deferred()
        self.use(stage)
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(len(stage.waiting), 1)
        self.assertEqual(self.connector.connects, [])
        stage.release()
        self.assertEqual(len(self.connector.connects), 1)
        self.assertEqual(self.connector.delivered[0][3], BODY)

    async def test_a_failing_pipeline_defers(self) -> None:
        class Broken:
            async def process(self, message: PipelineMessage) -> Decision:
                raise ValueError("bug")

        self.use(Broken())
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "deferred"})
        self.assertEqual(self.last_errors(), {"b@customer.test": PROCESSING_FAILED})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class DecisionAtOnceTests(DecisionBeforeConnectTests):
    now = True

    async def test_a_decision_at_once_takes_no_scan(self) -> None:
        stage = Stage(Decision(Action.TAG, (("X-Spam-Flag", "YES"),)))
        self.use(stage)
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        self.assertEqual((stage.at_once, stage.most), (1, 0))
        self.assertEqual(self.runner._scans, 0)
        [(_hop, _f, rcpts, body, _tls)] = self.connector.delivered
        self.assertEqual((rcpts, body), (["b@customer.test", "c@customer.test"],
                                         b"X-Spam-Flag: YES\r\n" + BODY))

    async def test_a_failing_decision_at_once_defers(self) -> None:
        class Broken(Stage):
            def process_now(self, message: PipelineMessage) -> Decision | Later | None:
                raise ValueError("bug")

        self.use(Broken())
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "deferred"})
        self.assertEqual(self.last_errors(), {"b@customer.test": PROCESSING_FAILED})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    async def test_a_later_stage_that_waits_resumes_after_the_first(self) -> None:
        first = Stage(Decision(Action.TAG, (("X-A", "1"),), reason="a", subject_prefix="[A]"))
        second = Stage(Decision(Action.TAG, (("X-B", "2"),), reason="b"))
        self.use(first, second)
        second.gate = defer.Deferred()
        await self.accept("Q1", "b@customer.test")
        self.assertEqual((first.at_once, len(first.seen), len(second.waiting)), (1, 1, 1))
        self.assertEqual(self.connector.connects, [])
        second.release()
        self.assertEqual(len(first.seen), 1)  # not asked again
        [(_hop, _f, _r, body, _tls)] = self.connector.delivered
        self.assertEqual(body, b"X-A: 1\r\nX-B: 2\r\nFrom: a@x.test\r\n"
                               b"Subject: [A] hello\r\n\r\nbody line\r\n")


class PipelineNowTests(PipelineRunnerBase):
    """Pipeline.process_now against Pipeline.process."""

    def message(self) -> PipelineMessage:
        return PipelineMessage("Q1", "relay", "a@x.test", (), BODY)

    async def test_the_same_decisions_as_process(self) -> None:
        tag_a = Decision(Action.TAG, (("X-A", "1"),), reason="a", subject_prefix="[A]")
        tag_b = Decision(Action.TAG, (("X-B", "2"),), reason="b")
        defer_ = Decision(Action.DEFER, reason="4.7.1 later")
        for decisions in ([], [None], [tag_a], [tag_a, None, tag_b], [tag_a, defer_, tag_b],
                          [Decision.deliver(), tag_b]):
            stages = [Stage(d) for d in decisions]
            for stage in stages:
                stage.now = True
            pipeline = Pipeline(stages)
            self.assertEqual(pipeline.process_now(self.message()),
                             await pipeline.process(self.message()), decisions)

    async def test_a_stage_that_waits_gives_where_to_resume(self) -> None:
        first = Stage(Decision(Action.TAG, (("X-A", "1"),), reason="a"))
        second = Stage(Decision(Action.TAG, (("X-B", "2"),), reason="b"))
        first.now = True
        pipeline = Pipeline([first, second])
        resume = pipeline.process_now(self.message())
        assert isinstance(resume, Resume)
        self.assertEqual((resume.stage, resume.tags), (1, [("X-A", "1")]))
        decision = await pipeline.process(self.message(), resume)
        self.assertEqual(decision, Decision(Action.TAG, (("X-A", "1"), ("X-B", "2")),
                                            reason="a; b"))
        self.assertEqual((len(first.seen), len(second.seen)), (1, 1))
        # A stage without process_now waits from the start.
        waits = Pipeline([object()]).process_now(self.message())  # type: ignore[list-item]
        self.assertEqual(waits, Resume(0))


class TagsFromTheStoreTests(PipelineRunnerBase):
    # No body stays in memory: the scan and the send both load it from the store.
    settings = {"body_cache_bytes": 0}

    async def test_tags_are_applied_to_a_body_loaded_at_send_time(self) -> None:
        stage = Stage(Decision(Action.TAG, (("X-Spam-Flag", "YES"), ("X-Spam-Score", "7.0")),
                               subject_prefix="[SPAM]"))
        self.use(stage)
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(stage.seen[0].body, BODY)
        self.assertEqual(len(self.runner.bodies), 0)
        [(_hop, _f, _r, body, _tls)] = self.connector.delivered
        self.assertEqual(body, b"X-Spam-Flag: YES\r\nX-Spam-Score: 7.0\r\nFrom: a@x.test\r\n"
                               b"Subject: [SPAM] hello\r\n\r\nbody line\r\n")

    async def test_tags_survive_a_retry_of_one_recipient(self) -> None:
        self.use(Stage(Decision(Action.TAG, (("X-Spam-Flag", "YES"),))))
        self.connector.replies["c@customer.test"] = (451, ("4.3.0 later",))
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        self.connector.replies.clear()
        self.clock.advance(self.q.settings.min_backoff)
        bodies = [body for _h, _f, _r, body, _t in self.connector.delivered]
        self.assertEqual(bodies, [b"X-Spam-Flag: YES\r\n" + BODY] * 2)
        self.assertEqual(set(self.states().values()), {"delivered"})


class _RecordingPool(CpuPool):
    """The synchronous CPU pool of the tests, naming what it was given to run."""

    def __init__(self) -> None:
        super().__init__(None, synchronous=True)
        self.ran: list[str] = []

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.ran.append(fn.__name__)
        return super().run(fn, *args, **kwargs)


class LargeTaggedBodyTests(PipelineRunnerBase):
    async def test_a_large_body_is_tagged_on_the_cpu_pool(self) -> None:
        """The tagged copy of a large body is made off the reactor (a 53 MB one took 45-93
        ms of its CPU); a small one at once, as before."""
        pool = _RecordingPool()
        self.runner.cpu = pool
        self.use(Stage(Decision(Action.TAG, (("X-Spam-Flag", "YES"),), subject_prefix="[S]")))
        large = BODY + b"more body\r\n" * (TAG_INLINE // 11)
        await self.accept("Q1", "b@customer.test", body=large)
        await self.accept("Q2", "c@customer.test")
        self.assertEqual(pool.ran, ["apply_tags"])
        bodies = sorted(body for _h, _f, _r, body, _t in self.connector.delivered)
        tagged = b"X-Spam-Flag: YES\r\nFrom: a@x.test\r\nSubject: [S] hello\r\n\r\nbody line\r\n"
        self.assertEqual(bodies, [tagged, tagged + large[len(BODY):]])


class ScanBoundTests(PipelineRunnerBase):
    async def test_no_more_than_max_scans_run_at_once(self) -> None:
        stage = Stage()
        stage.gate = defer.Deferred()
        self.use(stage, max_scans=3)
        for i in range(10):
            await self.accept(f"Q{i}", f"r{i}@customer.test")
        self.assertEqual((stage.running, len(stage.seen)), (3, 3))
        self.assertEqual(self.runner.held, 10)  # the waiting ones still count
        stage.release(1)
        self.assertEqual((stage.running, len(stage.seen)), (3, 4))
        while stage.waiting:
            stage.release()
        self.assertEqual(stage.most, 3)
        self.assertEqual(len(stage.seen), 10)
        self.assertEqual(len(self.connector.delivered), 10)
        self.assertEqual(self.runner.held, 0)

    async def test_a_message_whose_hops_are_all_down_is_not_scanned(self) -> None:
        stage = Stage()
        self.use(stage)
        self.connector.down.add(await self.hop())
        await self.accept("Q1", "b@customer.test")
        self.assertEqual(len(stage.seen), 1)  # not known to be down yet
        await self.accept("Q2", "c@customer.test")
        self.assertEqual(len(stage.seen), 1)
        self.assertEqual(len(self.connector.connects), 1)
        self.assertEqual(self.states(), {"b@customer.test": "deferred",
                                         "c@customer.test": "deferred"})


class ScanBoundAtOnceTests(ScanBoundTests):
    now = True


class NoStageTests(PipelineRunnerBase):
    async def test_without_stages_the_pipeline_is_never_called(self) -> None:
        calls: list[str] = []

        class Watched(Pipeline):
            async def process(self, message: PipelineMessage,
                              resume: Resume | None = None) -> Decision:
                calls.append(message.queue_id)
                return Decision.deliver()

            def process_now(self, message: PipelineMessage) -> Decision | Resume:
                calls.append(message.queue_id)
                return Decision.deliver()

        loads: list[str] = []
        real_get = self.runner.loader.get

        async def get(message_id: str) -> bytes | None:
            loads.append(message_id)
            return await real_get(message_id)

        self.runner.loader.get = get  # type: ignore[method-assign]
        self.runner.pipeline = Watched()
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        self.assertEqual(calls, [])
        self.assertEqual(loads, [])  # the body came from the cache, as before
        self.assertEqual(self.connector.delivered[0][2:4],
                         (["b@customer.test", "c@customer.test"], BODY))


class StopWithScansTests(PipelineRunnerBase):
    async def test_scans_in_flight_and_waiting_lose_no_recipient(self) -> None:
        stage = Stage()
        stage.gate = defer.Deferred()
        self.use(stage, max_scans=2)
        for i in range(5):
            await self.accept(f"Q{i}", f"r{i}@customer.test")
        self.assertEqual(len(stage.waiting), 2)
        stopping = defer.Deferred.fromCoroutine(self.runner.stop())
        self.assertFalse(stopping.called)  # waits for the two scans in flight
        stage.release()
        leftover = await stopping
        self.assertEqual(len(leftover), 5)
        self.assertEqual(self.runner.held, 0)
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(len(stage.seen), 2)

    async def test_a_decision_made_during_the_stop_is_recorded(self) -> None:
        stage = Stage(Decision(Action.DEFER, reason="4.7.0 filter down"))
        stage.gate = defer.Deferred()
        self.use(stage)
        await self.accept("Q1", "b@customer.test")
        stopping = self.q.service.stopService()
        stage.release()
        self.clock.advance(60)
        await stopping
        self.assertEqual(self.rows(), {"b@customer.test": ("deferred", None)})
        self.assertEqual(self.runner.held, 0)

    async def test_leases_are_released_for_what_was_never_sent(self) -> None:
        stage = Stage()
        stage.gate = defer.Deferred()
        self.use(stage, max_scans=1)
        await self.accept("Q1", "b@customer.test")
        await self.accept("Q2", "c@customer.test")
        stopping = self.q.service.stopService()
        stage.release()
        self.clock.advance(60)
        await stopping
        self.assertEqual(self.rows(), {"b@customer.test": ("queued", None),
                                       "c@customer.test": ("queued", None)})


class HopLimitBeforeThePipelineTests(PipelineRunnerBase):
    async def test_a_looping_message_is_bounced_before_any_stage_sees_it(self) -> None:
        stage = Stage()
        self.use(stage)
        field = b"Received: from gw.test\r\n\tby gw.test (Mailcore)\r\n"
        await self.accept("Q1", "b@customer.test", sender="", body=field * 51 + BODY)
        self.assertEqual(stage.seen, [])  # not filtered, so no tokens charged for it
        self.assertEqual(self.connector.connects, [])
        self.assertEqual(self.states(), {"b@customer.test": "bounced"})
        await self.accept("Q2", "c@customer.test", body=field * 50 + BODY)
        self.assertEqual([m.queue_id for m in stage.seen], ["Q2"])
        self.assertEqual(self.connector.addresses(), ["c@customer.test"])


class HopLimitAtOnceTests(HopLimitBeforeThePipelineTests):
    now = True


class Killed(Exception):
    """What the store answers once the process is dead (`KillAfterKeep`)."""


class KillAfterKeep:
    """kill -9 right after the first commit that kept a message in quarantine: nothing the
    process does from then on reaches the store."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.kept = False
        self.dead = False
        # (begin too: the queue's hot statements run on the DBAPI cursor, unseen by the
        # cursor events)
        self._listeners = [("begin", self._executing), ("before_cursor_execute", self._executing),
                           ("after_cursor_execute", self._executed),
                           ("commit", self._commit), ("rollback", self._rollback)]
        for name, fn in self._listeners:
            event.listen(engine, name, fn)

    def revive(self) -> None:
        """The next start (on the store the dead process left)."""
        for name, fn in self._listeners:
            event.remove(self.engine, name, fn)

    def _executing(self, *args: Any) -> None:
        if self.dead:
            raise Killed()

    def _executed(self, _conn: Any, _cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO QUARANTINE "):
            self.kept = True

    def _commit(self, _conn: Any) -> None:
        self.dead = self.kept

    def _rollback(self, _conn: Any) -> None:
        self.kept = False


class QuarantineCommitTests(PipelineRunnerBase):
    async def test_killed_after_the_keep_commits_the_message_is_not_queued_as_well(
        self,
    ) -> None:
        """The quarantine's row and the recipient's `quarantined` result commit together:
        a kill -9 right after the row's commit must not leave the recipient queued, to be
        filtered again at the next start (and delivered when the verdict or the domain's
        policy changed meanwhile, while the message stays in quarantine, releasable: the
        message kept twice)."""
        service = QuarantineService(self.db, self.clock, QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        self.use(Stage(Decision(Action.QUARANTINE, reason="spam", category="spam")),
                 quarantine=PipelineQuarantine(service))
        kill = KillAfterKeep(self.db.engine)
        await self.accept("Q1", "b@customer.test", "c@customer.test")
        self.assertTrue(kill.dead)
        kill.revive()
        self.flushLoggedErrors(Killed)
        rows = done(self.db.read("kept", lambda c: c.execute(
            select(quarantine.c.email)).scalars().all()))
        self.assertEqual(sorted(rows), ["b@customer.test", "c@customer.test"])
        self.assertEqual({a: s for a, (s, _o) in self.rows().items()},
                         {"b@customer.test": "quarantined", "c@customer.test": "quarantined"})

    async def test_a_node_whose_lease_was_taken_over_keeps_nothing(self) -> None:
        """This node's lease lapsed while the filter worked, and another node claimed the
        message (it filters and keeps it itself): nothing is kept or recorded here."""
        service = QuarantineService(self.db, self.clock, QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        stage = Stage(Decision(Action.QUARANTINE, reason="spam", category="spam"))
        stage.gate = defer.Deferred()
        self.use(stage, quarantine=PipelineQuarantine(service))
        await self.accept("Q1", "b@customer.test")
        done(self.db.run("take over", lambda c: c.execute(
            queue_recipients.update().values(lease_owner="node-b"))))
        stage.release()
        rows = done(self.db.read("kept", lambda c: c.execute(
            select(quarantine.c.email)).scalars().all()))
        self.assertEqual(rows, [])
        self.assertEqual(self.rows(), {"b@customer.test": ("queued", "node-b")})
        self.assertEqual(self.runner.held, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

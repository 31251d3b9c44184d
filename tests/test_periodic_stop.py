"""A PeriodicService's stop waits for the run in flight: `LoopingCall.stop()` alone does
not, so a sweep still running at SIGTERM used to finish after the daemon had closed the
store (and log "the database is closed"). Every periodic job (tokens, domains, domain
verification, the credential sweeper, ...) gets this from `mailcore.periodic`."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.periodic import InFlight, PeriodicService
from tests.support.db import synchronous_database


class Gated(PeriodicService):
    """Each run waits on a gate of its own that the test opens."""

    name = "gated"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.gates: list[defer.Deferred[None]] = []
        self.ended = 0

    def interval(self) -> float:
        return 60.0

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        gate: defer.Deferred[None] = defer.Deferred()
        self.gates.append(gate)
        await gate
        self.ended += 1


class Instant(PeriodicService):
    """Runs that end at once (tick returns None)."""

    name = "instant"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.runs = 0

    def interval(self) -> float:
        return 60.0

    def tick(self) -> None:
        self.runs += 1


class StopWaitsForTheRunInFlightTests(TestCase):
    def test_the_stop_fires_only_after_the_run_in_flight_ends(self) -> None:
        clock = Clock()
        service = Gated(clock)
        service.startService()
        self.assertEqual(len(service.gates), 1)  # the run at start, held
        stopped = service.stopService()
        clock.advance(3600)
        self.assertNoResult(stopped)
        self.assertEqual(len(service.gates), 1)  # and no new run was started meanwhile
        service.gates[0].callback(None)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(service.ended, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_later_run_in_flight_is_waited_for_too(self) -> None:
        clock = Clock()
        service = Gated(clock)
        service.startService()
        service.gates[0].callback(None)
        clock.advance(60)
        self.assertEqual(len(service.gates), 2)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        service.gates[1].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(service.ended, 2)

    def test_with_nothing_in_flight_the_stop_fires_at_once(self) -> None:
        clock = Clock()
        service = Instant(clock)
        service.startService()
        clock.advance(60)
        self.assertEqual(service.runs, 2)
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_service_never_started_stops_at_once(self) -> None:
        self.successResultOf(Instant(Clock()).stopService())


class FirstTickTests(TestCase):
    def test_without_tick_at_start_the_first_run_is_an_interval_later(self) -> None:
        """For a service that did the work just before it started (blocking, at the
        daemon's start): it is not done again at once."""
        clock = Clock()
        service = Instant(clock)
        service.tick_at_start = False
        service.startService()
        self.assertEqual(service.runs, 0)
        clock.advance(60)
        self.assertEqual(service.runs, 1)
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])


class InFlightTests(TestCase):
    def test_wait_ends_after_every_tracked_run_and_results_pass_through(self) -> None:
        runs = InFlight()
        first: defer.Deferred[int] = defer.Deferred()
        second: defer.Deferred[int] = defer.Deferred()
        self.assertIs(runs.track(first), first)
        runs.track(second)
        runs.track(defer.succeed(3))  # ended already
        waited = defer.Deferred.fromCoroutine(runs.wait())
        first.callback(1)
        self.assertNoResult(waited)
        second.callback(2)
        self.successResultOf(waited)
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(self.successResultOf(second), 2)

    def test_a_failed_run_ends_the_wait_and_keeps_its_failure(self) -> None:
        runs = InFlight()
        run: defer.Deferred[None] = defer.Deferred()
        runs.track(run)
        waited = defer.Deferred.fromCoroutine(runs.wait())
        run.errback(RuntimeError("boom"))
        self.successResultOf(waited)
        self.failureResultOf(run, RuntimeError)


class QuarantineStopTests(TestCase):
    def test_a_purge_in_flight_is_waited_for(self) -> None:
        from pathlib import Path

        from mailcore.billing.plans import Plans
        from mailcore.gateway.quarantine import QuarantineService, QuarantineSettings

        clock = Clock()
        service = QuarantineService(
            synchronous_database(), clock, QuarantineSettings(), Plans(), hostname="mx.test",
            signer=Path(self.mktemp()) / "quarantine.key",
        )
        gate: defer.Deferred[int] = defer.Deferred()

        async def slow_purge() -> int:
            return await gate

        service.purge = slow_purge  # type: ignore[method-assign]
        service.startService()
        clock.advance(service.settings.purge_interval)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        gate.callback(0)
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

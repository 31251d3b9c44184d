"""Repeated log lines are rate-limited on a Clock: a flood of one line gives a bounded
number of lines and a summary; different lines all pass."""

from __future__ import annotations

import threading
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, LogPublisher, formatEvent
from twisted.trial.unittest import TestCase

from mailcore.logfilter import LogLimiterService, RepeatLimiter
from mailcore.logwriter import UNIQUE_KEY

BURST = 10
INTERVAL = 60.0


class LimiterTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.lines: list[LogEvent] = []
        self.collect = cast(ILogObserver, self.lines.append)
        self.limiter = RepeatLimiter(self.collect, self.clock, burst=BURST, interval=INTERVAL)
        self.log = Logger(namespace="mailcore.test", observer=self.limiter)

    def tearDown(self) -> None:
        self.limiter.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.lines]


class RepeatLimiterTests(LimiterTestCase):
    def test_ten_thousand_identical_events_give_eleven_lines(self) -> None:
        for _ in range(10_000):
            self.log.info("closed an HTTP connection from {client}", client="203.0.113.5")
        self.assertEqual(len(self.lines), BURST)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.lines), BURST + 1)
        summary = self.lines[-1]
        self.assertEqual(
            formatEvent(summary),
            "… 9990 more like this suppressed in the last 60 s: "
            "closed an HTTP connection from 203.0.113.5",
        )
        self.assertEqual((summary["log_namespace"], summary["log_level"]),
                         ("mailcore.test", LogLevel.info))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_steady_flood_gives_a_bounded_number_of_lines_per_interval(self) -> None:
        for _ in range(10_000):  # ten minutes of one line every 60 ms
            self.log.warn("RCPT refused for {client}", client="198.51.100.7")
            self.clock.advance(0.06)
        self.limiter.flush()
        # Ten intervals, each: `BURST` lines and one summary.
        self.assertEqual(len(self.lines), 10 * (BURST + 1))
        suppressed = sum(e.get("log_repeat_count", 0) for e in self.lines)
        self.assertEqual(suppressed + 10 * BURST, 10_000)
        self.assertTrue(all(e["log_level"] == LogLevel.warn for e in self.lines))

    def test_different_lines_are_never_held_back(self) -> None:
        for n in range(1000):
            self.log.info("{queue_id}: accepted", queue_id=f"Q{n}")
        self.assertEqual(len(self.lines), 1000)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.lines), 1000)  # nothing suppressed: no summary

    def test_twisted_closing_connections_out_of_descriptors_repeats_by_its_format(self) -> None:
        """A listening port out of file descriptors logs each connection it closes with the
        peer's address: a flood of connections was as many lines."""
        port = Logger(namespace="twisted.internet.tcp.Port", observer=self.limiter)
        for n in range(1000):
            port.info("EMFILE recovery: Closed socket from {address}",
                      address=("127.0.0.1", 40000 + n))
        self.assertEqual(len(self.lines), BURST)
        self.clock.advance(INTERVAL)
        self.assertEqual(self.texts()[-1],
                         "… 990 more like this suppressed in the last 60 s: EMFILE recovery: "
                         "Closed socket from a client (too many open files: connections are "
                         "closed as they come until some end; see ulimit -n)")

    def test_level_namespace_and_failure_type_tell_lines_apart(self) -> None:
        other = Logger(namespace="mailcore.other", observer=self.limiter)
        for _ in range(BURST + 5):
            self.log.info("same")
            self.log.error("same")
            other.info("same")
            for error in (ValueError("x"), KeyError("x")):
                try:
                    raise error
                except Exception:
                    self.log.failure("same failure")
        self.assertEqual(len(self.lines), 5 * BURST)

    def test_after_the_interval_the_line_passes_again(self) -> None:
        for _ in range(BURST + 3):
            self.log.info("again")
        self.clock.advance(INTERVAL)
        self.log.info("again")
        self.assertEqual(self.texts()[-2:],
                         ["… 3 more like this suppressed in the last 60 s: again", "again"])

    def test_braces_in_the_repeated_text_are_kept(self) -> None:
        for _ in range(BURST + 1):
            self.log.info("{what}", what="a {literal} line")
        self.limiter.flush()
        self.assertEqual(self.texts()[-1],
                         "… 1 more like this suppressed in the last 60 s: a {literal} line")

    def test_tracking_is_bounded(self) -> None:
        limiter = RepeatLimiter(self.collect, self.clock, burst=1, interval=INTERVAL,
                                max_tracked=3)
        log = Logger(namespace="t", observer=limiter)
        for n in range(3):
            log.info("line {n}", n=n)
        for _ in range(5):
            log.info("untracked")  # a fourth distinct line: passes, unlimited
        self.assertEqual(len(self.lines), 8)
        self.clock.advance(INTERVAL)  # the three expire; a new line is tracked again
        for _ in range(5):
            log.info("tracked")
        self.assertEqual(len(self.lines), 9)
        limiter.flush()

    def test_lines_expire_oldest_first_and_running_ones_stay(self) -> None:
        limiter = RepeatLimiter(self.collect, self.clock, burst=1, interval=INTERVAL,
                                max_tracked=2)
        log = Logger(namespace="t", observer=limiter)
        log.info("old")
        self.clock.advance(INTERVAL / 2)
        log.info("young")
        self.clock.advance(INTERVAL / 2 + 1)  # "old" is over, "young" still runs
        log.info("new")  # tracked in the place of "old"
        log.info("new")
        log.info("young")
        self.assertEqual(self.texts(), ["old", "young", "new"])
        limiter.flush()

    def test_lines_that_cannot_repeat_pass_untracked(self) -> None:
        log = Logger(namespace="mailcore.mail", observer=self.limiter)
        for n in range(BURST * 3):
            log.info("Q{n}: delivered", n=n, **{UNIQUE_KEY: True})
        self.assertEqual(len(self.lines), BURST * 3)
        self.assertEqual(self.limiter._windows, {})

    def test_events_from_other_threads_pass_unlimited(self) -> None:
        def flood() -> None:
            for _ in range(BURST * 3):
                self.log.info("from a worker thread")

        worker = threading.Thread(target=flood)
        worker.start()
        worker.join()
        self.assertEqual(len(self.lines), BURST * 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceTests(TestCase):
    def test_the_service_puts_the_limiter_in_front_while_running(self) -> None:
        clock = Clock()
        seen: list[LogEvent] = []
        also: list[LogEvent] = []
        first: Any = seen.append
        second: Any = also.append
        publisher = LogPublisher(first, second)
        log = Logger(namespace="mailcore.test", observer=publisher)
        service = LogLimiterService(clock, publisher, burst=2, interval=10.0)
        service.startService()
        for _ in range(100):
            log.info("flood")
        self.assertEqual((len(seen), len(also)), (2, 2))
        service.stopService()  # pending summaries are written, the observers restored
        self.assertEqual(formatEvent(seen[-1]),
                         "… 98 more like this suppressed in the last 10 s: flood")
        self.assertEqual(clock.getDelayedCalls(), [])
        for _ in range(5):
            log.info("flood")
        self.assertEqual((len(seen), len(also)), (8, 8))

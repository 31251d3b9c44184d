"""The buffered log writer: the same lines as Twisted's text file observer, in the same order,
written once per reactor turn (a Clock's `advance(0)` here), at once past the size limit,
and all of them on stop."""

from __future__ import annotations

import faulthandler
import io
import threading
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogPublisher,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import TestCase

from mailcore import maillog
from mailcore.logfilter import LogLimiterService
from mailcore.logwriter import TEXT_KEY, BufferedLogWriter, is_text_file_observer


class Recorder(io.StringIO):
    """A text file that records each write and flush."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


class WriterTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000.25)
        self.out = Recorder()
        self.writer = BufferedLogWriter(self.out, self.clock, limit=1000)
        self.log = Logger(namespace="mailcore.test", observer=self.writer)

    def tearDown(self) -> None:
        self.writer.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BufferingTests(WriterTestCase):
    def test_a_turns_lines_are_written_once_in_order_when_the_turn_ends(self) -> None:
        for n in range(5):
            self.log.info("line {n}", n=n)
        self.assertEqual(self.out.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 1)
        self.assertEqual(self.out.flushes, 1)
        self.assertEqual([line.split("] ", 1)[1] for line in self.out.getvalue().splitlines()],
                         [f"line {n}" for n in range(5)])
        self.log.info("next turn")
        self.clock.advance(0)
        self.assertEqual(len(self.out.writes), 2)
        self.assertTrue(self.out.writes[1].endswith("] next turn\n"))

    def test_past_the_limit_the_buffer_is_written_at_once(self) -> None:
        for _ in range(20):
            self.log.info("x" * 98)  # with its time stamp and system, over 100 bytes
        self.assertGreaterEqual(len(self.out.writes), 1)
        self.assertTrue(all(len(w) > 1000 for w in self.out.writes))
        self.clock.advance(0)
        self.assertEqual(self.out.getvalue().count("x" * 98), 20)
        self.assertEqual(len(self.out.getvalue().splitlines()), 20)

    def test_close_writes_what_is_pending_and_then_writes_through(self) -> None:
        self.log.info("pending")
        self.writer.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.out.getvalue().endswith("] pending\n"))
        self.log.info("after")
        self.assertTrue(self.out.getvalue().endswith("] after\n"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_line_from_another_thread_is_written_at_once_after_the_pending_ones(self) -> None:
        self.log.info("first, in the reactor thread")
        worker = threading.Thread(target=lambda: self.log.info("second, from a thread"))
        worker.start()
        worker.join()
        self.assertEqual([line.split("] ", 1)[1] for line in self.out.getvalue().splitlines()],
                         ["first, in the reactor thread", "second, from a thread"])
        self.clock.advance(0)  # the turn's own write finds nothing left
        self.assertEqual(len(self.out.writes), 1)

    def test_a_line_logged_in_the_middle_of_a_write_on_its_thread_is_written_next(
        self,
    ) -> None:
        # A Python signal handler runs between two bytecodes of the main thread, and
        # twistd's SIGTERM handler logs: here it interrupts each kind of write (the end of a
        # turn, past the limit, close). With a plain lock it waited for the write it had
        # interrupted, for ever (the daemon neither stopped nor logged again). The watchdog
        # turns such a hang into a crash with every thread's stack instead of a stuck run.
        interrupted: list[str] = []

        class Interrupted(Recorder):
            def write(inner, s: str) -> int:
                if interrupted:
                    self.log.info(interrupted.pop())
                return super().write(s)

        self.out = Interrupted()
        self.writer = BufferedLogWriter(self.out, self.clock, limit=1000)
        self.log = Logger(namespace="mailcore.test", observer=self.writer)
        faulthandler.dump_traceback_later(60, exit=True)
        self.addCleanup(faulthandler.cancel_dump_traceback_later)
        self.log.info("before")
        interrupted.append("Received SIGTERM, shutting down.")
        self.clock.advance(0)  # the turn's write, interrupted
        interrupted.append("past the limit, interrupted")
        for _ in range(12):  # past the limit: written at once, interrupted
            self.log.info("x" * 98)
        self.assertEqual(interrupted, [])
        interrupted.append("at close, interrupted")
        self.log.info("last")
        self.writer.close()
        lines = [line.split("] ", 1)[1] for line in self.out.getvalue().splitlines()]
        self.assertEqual(lines[:2], ["before", "Received SIGTERM, shutting down."])
        self.assertEqual(lines.count("past the limit, interrupted"), 1)
        self.assertEqual(lines.count("x" * 98), 12)
        self.assertEqual(lines[-2:], ["last", "at close, interrupted"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_write_that_fails_at_the_end_of_a_turn_loses_its_lines_not_the_writer(self) -> None:
        class Full(Recorder):
            fail = True

            def write(self, s: str) -> int:
                if self.fail:
                    raise OSError(28, "No space left on device")
                return super().write(s)

        out = Full()
        writer = BufferedLogWriter(out, self.clock)
        log = Logger(namespace="t", observer=writer)
        log.info("lost")
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry every turn
        out.fail = False
        log.info("kept")
        self.clock.advance(0)
        self.assertEqual(out.getvalue().count("] "), 1)
        self.assertTrue(out.getvalue().endswith("] kept\n"))


class FormatTests(WriterTestCase):
    def same_as_twisted(self, emit: Any) -> None:
        """`emit(logger)` gives the same text through the writer as through Twisted's own
        text file observer."""
        theirs = io.StringIO()
        emit(Logger(namespace="mailcore.test", observer=textFileLogObserver(theirs)))
        emit(self.log)
        self.writer.flush()
        self.assertEqual(self.out.getvalue(), theirs.getvalue())
        self.assertTrue(theirs.getvalue())

    def test_plain_lines_are_what_twisted_writes(self) -> None:
        self.same_as_twisted(lambda log: log.warn("a {what} line", what="plain"))

    def test_multi_line_text_and_log_system_are_what_twisted_writes(self) -> None:
        self.same_as_twisted(lambda log: log.info("one\ntwo", log_system="smtp,192.0.2.1"))

    def test_failures_are_what_twisted_writes_traceback_and_all(self) -> None:
        def emit(log: Logger) -> None:
            try:
                1 / 0  # noqa: B018
            except ZeroDivisionError:
                log.failure("it broke")

        self.same_as_twisted(emit)
        self.assertIn("ZeroDivisionError", self.out.getvalue())

    def test_an_outage_is_one_line_without_its_traceback(self) -> None:
        """Every periodic job logged its own traceback of a database outage, each minute
        it lasted (some 50 lines each)."""
        from sqlalchemy.exc import OperationalError

        try:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError(
                "connection failed: connection to server at 127.0.0.1 failed\nIs it up?"))
        except OperationalError:
            self.log.failure("webhook sweep failed")
        self.writer.flush()
        self.assertEqual(
            self.out.getvalue().split(" ", 1)[1],  # (after the time stamp)
            "[mailcore.test#critical] webhook sweep failed (the "
            "database cannot be reached: ConnectionRefusedError: connection failed: "
            "connection to server at 127.0.0.1 failed)\n")

    def test_control_characters_a_remote_party_sent_are_written_escaped(self) -> None:
        """A next hop's greeting (`421 busy ESC]0;title BEL ESC[2J`) reaches the log in
        a line of the queue runner's; the terminal of whoever reads the log never gets the
        ESC sequence, CR or BEL, and a line stays one line."""
        self.log.info("next hop {hop} unusable: {reason}", hop="mx.example",
                      reason="greeting: 421 busy \x1b]0;pwned\x07\x1b[2J\rnow\u2028x")
        self.writer.flush()
        line = self.out.getvalue()
        self.assertIn("greeting: 421 busy \\x1b]0;pwned\\x07\\x1b[2J\\x0dnow\\u2028x\n", line)
        self.assertEqual(line.count("\n"), 1)
        for character in "\x1b\x07\r\u2028":
            self.assertNotIn(character, line)

    def test_a_failures_message_is_written_escaped_too(self) -> None:
        try:
            raise ValueError("server said \x1b[2Jgone\x07")
        except ValueError:
            self.log.failure("sync failed")
        self.writer.flush()
        written = self.out.getvalue()
        self.assertIn("ValueError: server said \\x1b[2Jgone\\x07", written)
        self.assertNotIn("\x1b", written)

    def test_an_event_without_text_writes_nothing(self) -> None:
        self.log.info()  # no format: Twisted's observer writes nothing either
        self.writer.flush()
        self.assertEqual(self.out.getvalue(), "")

    def test_the_time_stamp_follows_the_clock_of_each_event(self) -> None:
        for when in (1_700_000_000.5, 1_700_000_000.9, 1_700_000_001.0):
            self.writer({"log_format": "t", "log_time": when, "log_namespace": "n"})
        reference = io.StringIO()
        observer = textFileLogObserver(reference)
        for when in (1_700_000_000.5, 1_700_000_000.9, 1_700_000_001.0):
            observer({"log_format": "t", "log_time": when, "log_namespace": "n"})
        self.writer.flush()
        self.assertEqual(self.out.getvalue(), reference.getvalue())

    def test_a_mail_log_line_is_formatted_once_when_emitted(self) -> None:
        publisher = LogPublisher()
        seen: list[Any] = []
        publisher.addObserver(cast(ILogObserver, seen.append))
        original = maillog.log.observer
        maillog.log.observer = publisher
        self.addCleanup(setattr, maillog.log, "observer", original)
        maillog.kept("Q1", "quarantined", ["b@customer.test"], "spam")
        (event,) = seen
        self.assertEqual(event[TEXT_KEY], formatEvent(event))
        self.assertEqual(event[TEXT_KEY],
                         "Q1: quarantined nrcpt=1 to=<b@customer.test> reason=spam")


class ReplacementTests(TestCase):
    def test_only_twisteds_default_text_file_observer_is_replaced(self) -> None:
        out = io.StringIO()
        self.assertTrue(is_text_file_observer(textFileLogObserver(out)))
        self.assertIs(textFileLogObserver(out)._outFile, out)  # what `replacing` reads
        self.assertFalse(is_text_file_observer(textFileLogObserver(out, timeFormat=None)))
        self.assertFalse(is_text_file_observer(jsonFileLogObserver(io.StringIO())))
        self.assertFalse(is_text_file_observer(cast(ILogObserver, [].append)))

    def test_the_service_buffers_the_log_file_while_running(self) -> None:
        clock = Clock()
        out = Recorder()
        others: list[Any] = []
        publisher = LogPublisher(textFileLogObserver(out), cast(ILogObserver, others.append))
        log = Logger(namespace="mailcore.test", observer=publisher)
        service = LogLimiterService(clock, publisher, burst=2, interval=10.0)
        service.startService()
        log.info("one")
        log.info("two")
        self.assertEqual((out.writes, len(others)), ([], 2))
        clock.advance(0)
        self.assertEqual(len(out.writes), 1)
        for _ in range(5):
            log.info("flood")
        service.stopService()  # the pending lines and the summary, then the file as it was
        lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
        self.assertEqual(lines, ["one", "two", "flood", "flood",
                                 "… 3 more like this suppressed in the last 10 s: flood"])
        self.assertEqual(clock.getDelayedCalls(), [])
        writes = len(out.writes)
        log.info("after")
        self.assertEqual(len(out.writes), writes + 1)  # Twisted's own observer again

    def test_unbuffered_the_service_leaves_the_file_observer_alone(self) -> None:
        clock = Clock()
        out = Recorder()
        publisher = LogPublisher(textFileLogObserver(out))
        service = LogLimiterService(clock, publisher, buffered=False)
        service.startService()
        Logger(observer=publisher).info("at once")
        self.assertEqual(len(out.writes), 1)
        service.stopService()

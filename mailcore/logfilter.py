"""Repeated log lines are rate-limited, so that a flood cannot fill the disk or drown the rest.

`RepeatLimiter` is a log observer in front of another. Events that would print the same
line — same namespace, level and text (and the same exception type, for failures) — pass
through `burst` times per `interval` seconds; the rest of that interval's are counted, and
when the interval ends one summary line says how many were dropped:

    closed an HTTP connection from 203.0.113.5: request headers not received within 30 s
    … 4290 more like this suppressed in the last 60 s: closed an HTTP connection from …

Lines that differ (each access-log line has its request id, each message-log line its
queue id) are never held back: the limit is on repetition, not on volume. A few lines of
Twisted's that name each peer of a flood (`BY_FORMAT`) repeat by their format. Intervals run on
the injected clock (events logged from a worker thread pass unlimited: the clock's timers
belong to the reactor thread).

The daemon installs it with `LogLimiterService`: when the service starts (after twistd has
set up its log file or syslog), the observers of the global log publisher are moved behind
one limiter, twistd's text log file (or stdout) written by a `BufferedLogWriter` (once per
reactor turn, see mailcore.logwriter) and, when it is twistd's `--logfile`, rotated
within the bounds of the `[log]` table (mailcore.logrotation); when it stops pending
summaries and lines are written and the observers are put back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    globalLogPublisher,
)
from zope.interface import implementer

from mailcore.logrotation import LogSettings
from mailcore.logwriter import UNIQUE_KEY, BufferedLogWriter, event_text, is_text_file_observer

BURST = 10
INTERVAL = 60.0
# Distinct lines tracked at once; past this, new lines pass unlimited until some expire.
MAX_TRACKED = 1000
SUMMARY = "… {log_repeat_count} more like this suppressed in the last {log_repeat_interval:g} s: "

_Key = tuple[str, str, str, str]

# Lines of other code that name a peer, so that each of a flood is new text, but say one
# thing: repeated by their format, summarised in these words. Twisted's listening ports,
# out of file descriptors (EMFILE: `ulimit -n`), accept each waiting connection and close
# it at once, one line each: a flood of connections was as many lines.
BY_FORMAT = {
    "EMFILE recovery: Closed socket from {address}":
        "EMFILE recovery: Closed socket from a client (too many open files: connections are "
        "closed as they come until some end; see ulimit -n)",
}


@dataclass
class _Window:
    """One line's current interval: when it began, how many passed, how many did not."""

    start: float
    namespace: str
    level: LogLevel
    text: str
    passed: int = 0
    suppressed: int = 0
    timer: IDelayedCall | None = None


@implementer(ILogObserver)
class RepeatLimiter:
    """Passes each distinct line `burst` times per `interval` on to `observer`, then one
    summary line per interval for the ones it held back. Make it in the reactor thread:
    events logged from other threads pass unlimited."""

    def __init__(
        self,
        observer: ILogObserver,
        clock: IReactorTime,
        *,
        burst: int = BURST,
        interval: float = INTERVAL,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.observer = observer
        self.clock = clock
        self.burst = burst
        self.interval = interval
        self.max_tracked = max_tracked
        self._windows: dict[_Key, _Window] = {}
        self._thread = threading.get_ident()  # the reactor's: make it there

    def __call__(self, event: LogEvent) -> None:
        if UNIQUE_KEY in event or threading.get_ident() != self._thread:
            # A line that cannot repeat (nothing to limit), or one logged from a worker
            # thread (the clock's timers are the reactor thread's).
            self.observer(event)
            return
        key = self._key(event)
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is not None and now >= window.start + self.interval:
            self._end(key)
            window = None
        if window is None:
            if len(self._windows) >= self.max_tracked:
                self._expire(now)
            if len(self._windows) >= self.max_tracked:
                self.observer(event)
                return
            level = event.get("log_level", LogLevel.info)
            window = _Window(now, key[0], level, key[3])
            self._windows[key] = window
        if window.passed < self.burst:
            window.passed += 1
            self.observer(event)
            return
        window.suppressed += 1
        if window.timer is None:
            delay = window.start + self.interval - now
            window.timer = self.clock.callLater(delay, self._end, key)

    def flush(self) -> None:
        """End every interval now: write the pending summaries, cancel the timers."""
        for key in list(self._windows):
            self._end(key)

    @staticmethod
    def _key(event: LogEvent) -> _Key:
        failure = event.get("log_failure")
        kind = type(failure.value).__name__ if failure is not None else ""
        text = BY_FORMAT.get(str(event.get("log_format")))
        return (
            str(event.get("log_namespace", "")),
            str(getattr(event.get("log_level"), "name", "")),
            kind,
            text if text is not None else event_text(event),
        )

    def _end(self, key: _Key) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None and window.timer.active():
            window.timer.cancel()
        if window.suppressed:
            Logger(namespace=window.namespace, observer=self.observer).emit(
                window.level,
                SUMMARY + "{log_repeat_text}",
                log_repeat_count=window.suppressed,
                log_repeat_interval=self.interval,
                log_repeat_text=window.text,
            )

    def _expire(self, now: float) -> None:
        """Forget lines whose interval is over (those with a summary pending keep it).

        Windows are kept in the order they began, so this stops at the first one still
        running: a busy daemon whose every line is new (queue ids, request ids) pays O(1)
        per line here, not a walk over every tracked line."""
        over = []
        for key, window in self._windows.items():
            if now < window.start + self.interval:
                break
            if window.suppressed == 0:
                over.append(key)
        for key in over:
            del self._windows[key]


class LogLimiterService(Service):
    """Puts a `RepeatLimiter` between a log publisher (the global one) and its observers
    while running; with `buffered`, a text file observer among them is replaced by a
    `BufferedLogWriter` to the same file meanwhile. With `rotation`, that file, when it is
    a rotating log file, is rotated within its bounds (`LogSettings.apply`)."""

    name = "log-limiter"

    def __init__(
        self,
        clock: IReactorTime,
        publisher: LogPublisher = globalLogPublisher,
        *,
        buffered: bool = True,
        rotation: LogSettings | None = None,
        **limits: Any,
    ) -> None:
        self.clock = clock
        self.publisher = publisher
        self.buffered = buffered
        self.rotation = rotation
        self.limits = limits
        self.limiter: RepeatLimiter | None = None
        self.writers: list[BufferedLogWriter] = []
        self._moved: list[ILogObserver] = []

    def startService(self) -> None:
        super().startService()
        # LogPublisher lists its observers only privately; twistd adds its file (or
        # syslog) observer to the global publisher before services start.
        self._moved = list(self.publisher._observers)
        behind: list[ILogObserver] = []
        for observer in self._moved:
            if is_text_file_observer(observer):
                if self.rotation is not None:
                    self.rotation.apply(observer._outFile)
                if self.buffered:
                    observer = BufferedLogWriter.replacing(observer, self.clock)
                    self.writers.append(observer)
            behind.append(observer)
        self.limiter = RepeatLimiter(LogPublisher(*behind), self.clock, **self.limits)
        self.publisher.addObserver(self.limiter)
        for observer in self._moved:
            self.publisher.removeObserver(observer)

    def stopService(self) -> None:
        super().stopService()
        if self.limiter is None:
            return
        # Summaries and buffered lines are written while the limiter still stands in
        # front, so that a line logged meanwhile (from a thread) keeps its place.
        self.limiter.flush()
        for writer in self.writers:
            writer.close()
        self.publisher.removeObserver(self.limiter)
        for observer in self._moved:
            self.publisher.addObserver(observer)
        self.limiter, self._moved, self.writers = None, [], []

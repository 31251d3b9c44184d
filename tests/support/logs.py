"""What the code under test logs: events from the global log publisher, formatted, for as
long as the test runs."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailcore.store.database import SLOW_TRANSACTION


def logged(test: SynchronousTestCase, wanted: Callable[[LogEvent], bool]) -> list[str]:
    """The events `wanted` picks, formatted, logged from now until `test` ends (the list
    grows as they come)."""
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if wanted(event):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def load_noise(event: LogEvent) -> bool:
    """Whether `event` is the store's slow transaction warning: it times the machine's load
    (a loaded CI machine logs one in any test), not the code under test."""
    return event.get("log_format") == SLOW_TRANSACTION


def logged_at(test: SynchronousTestCase, level: LogLevel) -> list[str]:
    """The events of `level` logged from now until `test` ends, but for `load_noise`."""
    return logged(test, lambda event: event.get("log_level") == level
                  and not load_noise(event))

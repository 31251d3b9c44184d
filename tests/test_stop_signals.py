"""A SIGTERM or SIGINT while the daemon stops (mailcore.service.SignalsWhileStopping)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from mailcore.service import SignalsWhileStopping
from tests.support.logs import logged_at


class _Reactor(MemoryReactor):
    """Signal handlers as Twisted's reactor installs them: bound methods that stop it."""

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0
        self.from_thread: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def sigTerm(self, number: int, frame: FrameType | None = None) -> None:
        self.stops += 1

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.from_thread.append((f, args, kwargs))

    def shut_down(self) -> None:
        """Run the triggers before shutdown, as reactor.stop() does."""
        for f, args, kwargs in self.triggers.get("before", {}).get("shutdown", []):
            f(*args, **kwargs)

    def run_calls(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


class SignalsWhileStoppingTests(SynchronousTestCase):
    def setUp(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        self.reactor = _Reactor()
        self.service = SignalsWhileStopping(self.reactor)  # type: ignore[arg-type]
        self.lines = logged_at(self, LogLevel.info)

    def test_a_second_sigterm_while_stopping_is_one_line(self) -> None:
        """The reactor's handler stopped it again, and that raised ReactorNotRunning,
        logged as a traceback."""
        signal.signal(signal.SIGTERM, self.reactor.sigTerm)
        self.service.startService()
        self.assertEqual(signal.getsignal(signal.SIGTERM), self.reactor.sigTerm)
        self.reactor.shut_down()
        handler = signal.getsignal(signal.SIGTERM)
        self.assertNotEqual(handler, self.reactor.sigTerm)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        self.reactor.run_calls()
        self.assertEqual(self.reactor.stops, 0)
        self.assertEqual(self.lines, [
            "received SIGTERM while stopping: the daemon is stopping already (SIGKILL ends "
            "it at once)"])

    def test_handlers_that_are_not_the_reactors_are_left(self) -> None:
        def own(number: int, frame: FrameType | None) -> None:
            pass

        signal.signal(signal.SIGTERM, own)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.service.startService()
        self.reactor.shut_down()
        self.assertEqual(signal.getsignal(signal.SIGTERM), own)
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)

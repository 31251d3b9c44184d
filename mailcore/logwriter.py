"""The daemon's log file written once per reactor turn, not once per line.

A busy relay logs a few mail-log lines per message (mailcore.maillog). Twisted's text file
observer formats each event in full (a time zone lookup and a `strftime` per line, the
format string parsed again after the repeated-line limiter parsed it) and writes it with one
unbuffered `write(2)` per line. `BufferedLogWriter` takes its place in front of the same
file: it turns each event into the same text once (the event text the limiter already made
is reused, the time stamp is made once per second), appends it to a buffer, and writes and
flushes the buffer once per reactor turn, at once when it holds more than `limit` bytes,
and when the daemon stops. Lines keep their order; an event logged from another thread
writes the buffer and its own line at once.

A failure that is a resource out of room or reach (a full disk, the database down:
mailcore.outages) is written as one line, its cause appended, without its traceback.

A line can also arrive in the middle of a write, on the same thread: a Python signal
handler runs between any two bytecodes of the main thread, and twistd's SIGTERM handler
logs ("Received SIGTERM, shutting down."). The lock is re-entrant and such a line is only
buffered (and a write scheduled): with a plain lock the handler waited for the write it had
interrupted, for ever, and the daemon neither stopped nor logged again (CI saw it, 1 run in
a few dozen; a stack dump, `kill -USR2`, showed where).

What this costs: a crash (SIGKILL, a power cut) loses at most the lines of the reactor turn
in which it happened. Mail itself is never at stake: a message is acknowledged only once
its queue file is durable, and its state lives in the store and the queue journal, not in
this log.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import IO, Any, TypeGuard

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.compat import ioType
from zope.interface import implementer

from mailcore.outages import describe, outage
from mailcore.text import escape_controls

# An event's text (formatEvent's result), kept in the event by the first observer that
# needs it, so the limiter and the file do not format it twice; the mail log sets it when
# it emits.
TEXT_KEY = "mailcore_text"
# Set (True) in an event whose text cannot repeat (a mail log line naming its message's
# queue id): the repeated-line limiter (mailcore.logfilter) passes it on untracked.
UNIQUE_KEY = "mailcore_unique"

# Bytes buffered before a write without waiting for the end of the reactor turn.
LIMIT = 64 * 1024


def emit_text(logger: Logger, log_format: str, text: str, fields: dict[str, Any], *,
              unique: bool = False) -> None:
    """Emit at level info the event `logger.info(log_format, **fields)` would, with its
    text (`log_format` filled in with `fields`) formatted by the caller: the event carries
    it (TEXT_KEY) for the limiter and the file to use as it is, and with `unique` says that
    it cannot repeat (UNIQUE_KEY). Skips the checks `Logger.emit` repeats for every event,
    for lines logged once per message or per request (the mail log, the access log)."""
    event = {
        **fields, TEXT_KEY: text, "log_logger": logger, "log_level": LogLevel.info,
        "log_namespace": logger.namespace, "log_source": logger.source,
        "log_format": log_format, "log_time": time.time(),
    }
    if unique:
        event[UNIQUE_KEY] = True
    logger.observer(event)


def event_text(event: LogEvent) -> str:
    """`formatEvent(event)`, computed once per event."""
    text = event.get(TEXT_KEY)
    if text is None:
        text = event[TEXT_KEY] = formatEvent(event)
    return text  # type: ignore[no-any-return]


def is_text_file_observer(observer: object) -> TypeGuard[FileLogObserver]:
    """Whether `observer` is what `twisted.logger.textFileLogObserver` (twistd's log file
    or stdout) returns with its default time format: the observers this module replaces.
    Reads the observer's `formatEvent` (public) and `_outFile` (private; pinned by
    tests/test_logwriter.py)."""
    if type(observer) is not FileLogObserver:
        return False
    formatter = getattr(observer, "formatEvent", None)
    closure = getattr(formatter, "__closure__", None) or ()
    return (
        getattr(formatter, "__qualname__", "") == "textFileLogObserver.<locals>.formatEvent"
        and [c.cell_contents for c in closure] == [timeFormatRFC3339]
        and hasattr(observer, "_outFile")
    )


@implementer(ILogObserver)
class BufferedLogWriter:
    """Writes events to `out` as Twisted's text file observer would, a reactor turn's lines
    at a time (see the module docstring). Make it in the reactor thread; `close()` writes
    what is pending and cancels the pending write."""

    def __init__(self, out: IO[Any], clock: IReactorTime, *, limit: int = LIMIT) -> None:
        self.out = out
        self.clock = clock
        self.limit = limit
        self._encode = ioType(out) is not str
        self._lines: list[str] = []
        self._size = 0
        self._call: IDelayedCall | None = None
        self._lock = threading.RLock()
        self._busy = False  # in a locked region's work: a line now came in re-entered
        self._thread = threading.get_ident()
        self._stamp: tuple[int, str] = (-1, "")  # a second and its time stamp
        self.closed = False

    @classmethod
    def replacing(cls, observer: FileLogObserver, clock: IReactorTime,
                  **kwargs: Any) -> BufferedLogWriter:
        """A writer to the file of `observer` (see `is_text_file_observer`)."""
        return cls(observer._outFile, clock, **kwargs)

    def __call__(self, event: LogEvent) -> None:
        line = self._line(event)
        if not line:
            return
        with self._lock:
            self._lines.append(line)
            self._size += len(line)
            if self._busy:
                # Re-entered in the middle of a write on this thread (a signal handler that
                # logs): buffered; the end of this turn writes it (a write from here could
                # re-enter the file object's own write).
                if self._call is None and not self.closed:
                    self._call = self.clock.callLater(0, self._turn_ended)
                return
            if self.closed or self._size > self.limit or threading.get_ident() != self._thread:
                with self._working():
                    self._write()
            elif self._call is None:
                self._call = self.clock.callLater(0, self._turn_ended)

    def flush(self) -> None:
        """Write what is buffered now."""
        with self._lock, self._working():
            self._write()

    def close(self) -> None:
        """Write what is buffered; from now on every line is written at once."""
        with self._lock, self._working():
            self.closed = True
            self._write()
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None

    def _turn_ended(self) -> None:
        with self._lock, self._working():
            self._call = None
            # A file that cannot be written (a full disk) loses these lines, as Twisted's
            # own observer loses a line it cannot write; logging that would only come back
            # here (and again every turn), so it is not logged.
            with contextlib.suppress(Exception):
                self._write()

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Mark a locked region's work (the caller holds the lock): a line logged while it
        runs, on this thread, is one that interrupted it."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _write(self) -> None:
        """Write and flush the buffer, and what comes in meanwhile (the caller holds the
        lock and is `_working`)."""
        while self._lines:
            # Taken before it is joined: a line appended by an interruption lands in the
            # list written now or in the next one, never in one cleared unwritten.
            lines, self._lines = self._lines, []
            self._size = 0
            text = "".join(lines)
            self.out.write(text.encode("utf-8") if self._encode else text)
            self.out.flush()

    def _line(self, event: LogEvent) -> str | None:
        """What `textFileLogObserver` writes for `event`, made with the cached event text
        and a time stamp formatted once per second."""
        failure = event.get("log_failure")
        found = outage(failure.value) if failure is not None else None
        if failure is not None and found is None:
            # Rare: Twisted's own formatting, traceback and all.
            line = formatEventAsClassicLogText(
                event, formatTime=lambda t: formatTime(t, timeFormatRFC3339))
            return escape_controls(line, keep_lines=True) if line else line
        text = event_text(event)
        if failure is not None and found is not None and text:
            # A resource out of room or reach (mailcore.outages): while it lasts, every job
            # that needs it fails the same way, and a traceback each says nothing more than
            # the cause does, in one line.
            text = f"{text} ({found.what}: {describe(failure.value)})"
        if not text:
            return None
        when = event.get("log_time")
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            cached, stamp = self._stamp
            if second != cached:
                stamp = formatTime(second, timeFormatRFC3339)
                self._stamp = (second, stamp)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        if not text.isprintable():
            # What a remote party said (a next hop's greeting, a server's refusal) may hold
            # ESC sequences, CR or BEL for whoever reads the log in a terminal.
            text = escape_controls(text, keep_lines=True)
            if "\n" in text:
                text = text.replace("\n", "\n\t")
        return f"{stamp} [{system}] {text}\n"


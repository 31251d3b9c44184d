"""The results journal: a delivery is on record as soon as the next hop's 250 is read.

Delivery results reach the store in the spool's group commits, some milliseconds (under
load, tens of them) after the next hop's reply. A `kill -9` in between lost them, and every
recipient whose result was lost was delivered a second time after the restart (about 1% of
the mail relayed around a kill). So every final result (delivered, bounced, quarantined)
is also appended to a file in the data directory, one line each, by one `write()` in the
reactor thread as soon as the runner knows it, before the connection carries anything
else. There is no fsync: what a process has written survives its crash in the kernel,
and only a power loss can take the last lines, which costs duplicates, as before. The
write is a few microseconds, like a log line; the files are opened, read and closed at
start and stop, on the database's threads.

At the next start, before the node releases its old leases, the journal's results are
applied to the store like any others (only rows this node still leases change, so lines
the store already has change nothing) and the journal starts empty.

Two files take turns, so the journal stays bounded without losing a line the store lacks:
once the one being written holds MAX_BYTES, writing moves to the other as soon as every
result written there is committed, and that one is emptied first (one `ftruncate`).

Deferrals are not journaled: losing one only means an earlier retry, never a duplicate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from twisted.logger import Logger

from mailcore.queue.model import FINAL, Result

log = Logger()

# json's own string quoting (its C function): ASCII, as JSONEncoder's default.
_quoted = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]

NAMES = ("queue-results.0", "queue-results.1")
MAX_BYTES = 4 << 20
# What `append` returns for a result it did not write.
NOT_WRITTEN = -1


def encode(result: Result) -> bytes:
    """One journal line for a final result: the JSON array [rcpt_id, message_id, state,
    detail, hop] as json.JSONEncoder(separators=(",", ":")) writes it, without the
    encoder object its encode() builds for every call (a line per delivered message)."""
    return (f"[{result.rcpt_id:d},{_quoted(result.message_id)},{_quoted(result.state)},"
            f"{_quoted(result.detail)},{_quoted(result.hop)}]\n").encode("ascii")


def decode(line: bytes) -> Result | None:
    """The result of one journal line; None for a line that is not one (the last line of a
    write that a crash cut short, or anything else that is not ours)."""
    try:
        rcpt_id, message_id, state, detail, hop = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(rcpt_id, int) or isinstance(rcpt_id, bool) or state not in FINAL
            or not all(isinstance(v, str) for v in (message_id, detail, hop))):
        return None
    return Result(rcpt_id, message_id, state, detail, hop)


class ResultJournal:
    """The two journal files of one node's data directory; see the module docstring."""

    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES) -> None:
        self.directory = directory
        self.paths = tuple(directory / name for name in NAMES)
        self.max_bytes = max_bytes
        self._fds: list[int] = []
        self._current = 0
        self._size = 0
        # Per file: results written there and not yet committed to the store.
        self._outstanding = [0, 0]
        self.failed = False  # the last write failed (a full disk): the next one tries again

    @property
    def is_open(self) -> bool:
        return bool(self._fds)

    def thd_read(self) -> list[Result]:
        """Blocking: every result in the journal files (left by a run that did not stop)."""
        results: list[Result] = []
        for path in self.paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            for line in data.splitlines():
                result = decode(line)
                if result is not None:
                    results.append(result)
        return results

    def thd_open(self) -> None:
        """Blocking: open both files empty, to be written from now on (OSError if the
        directory is missing or not writable)."""
        self.thd_close()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        fds: list[int] = []
        try:
            for path in self.paths:
                fds.append(os.open(path, flags, 0o600))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self._fds = fds
        self._current = 0
        self._size = 0
        self._outstanding = [0, 0]
        self.failed = False

    def thd_close(self) -> None:
        """Blocking: close the files, and empty them when the store has every result
        written there (a clean stop); otherwise the next start reads them."""
        fds, self._fds = self._fds, []
        clean = not any(self._outstanding) and not self.failed
        for fd in fds:
            if clean:
                os.ftruncate(fd, 0)
            os.close(fd)

    def append(self, results: Sequence[Result]) -> list[int]:
        """Write the final ones among `results` (one write); returns for each result the
        file it went to (to hand back to `committed`), or NOT_WRITTEN."""
        if not self._fds:
            return [NOT_WRITTEN] * len(results)
        lines = [encode(r) for r in results if r.state in FINAL]
        if not lines:
            return [NOT_WRITTEN] * len(results)
        joined = b"".join(lines)
        # After a failed write, a newline first ends the line it may have cut short.
        data = memoryview(b"\n" + joined if self.failed else joined)
        try:
            self._turn()
            fd = self._fds[self._current]
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            # The results still go to the store: only the protection from duplicates is
            # lost, for these and until a write succeeds again (once the disk has room:
            # each append tries). A half-written line is skipped when read.
            if not self.failed:
                log.error("cannot write the results journal ({error}); until it can again, "
                          "a crash may deliver some mail twice", error=e.strerror or str(e))
            self.failed = True
            return [NOT_WRITTEN] * len(results)
        if self.failed:
            log.info("the results journal is written again")
            self.failed = False
        self._size += sum(len(line) for line in lines)
        self._outstanding[self._current] += len(lines)
        where = self._current
        return [where if r.state in FINAL else NOT_WRITTEN for r in results]

    def committed(self, written: Iterable[int]) -> None:
        """The results `append` wrote to these files are in the store now."""
        for where in written:
            if where != NOT_WRITTEN:
                self._outstanding[where] -= 1

    def _turn(self) -> None:
        """Move to the other file once this one is full and the other one's results are
        all in the store (emptying it: a metadata change, no data is written)."""
        other = 1 - self._current
        if self._size >= self.max_bytes and self._outstanding[other] == 0:
            os.ftruncate(self._fds[other], 0)
            self._current = other
            self._size = 0

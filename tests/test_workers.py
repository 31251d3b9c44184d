"""CpuPool's worker processes (`run_in_process`): real processes on the real reactor."""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet.utils import getProcessOutput
from twisted.trial import unittest

from mailcore.messages.parse import parse_message, parse_messages
from mailcore.workers import CpuPool
from tests.support.reactor import get_reactor
from tests.support.servers import sleep

RAW = (b"From: Ann <ann@example.test>\r\nTo: bob@example.test\r\nSubject: hi\r\n"
       b"Message-ID: <w-1@example.test>\r\n\r\nHello there.\r\n")


def _pid() -> int:
    return os.getpid()


def _fail(text: str) -> None:
    raise ValueError(text)


# A parent that starts a worker, prints the worker's pid and dies with SIGKILL.
_ORPHANING_PARENT = """
import os, signal
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from mailcore.workers import _watch_parent
pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                           initializer=_watch_parent, initargs=(os.getpid(),))
print(pool.submit(os.getpid).result(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class RunInProcessTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = CpuPool(get_reactor(), max_processes=1)
        self.addCleanup(self.pool.stop)

    async def test_runs_in_another_process(self) -> None:
        pid = await self.pool.run_in_process(_pid)
        self.assertNotEqual(pid, os.getpid())
        parsed = await self.pool.run_in_process(parse_messages, [RAW, RAW])
        self.assertEqual(parsed, [parse_message(RAW)] * 2)

    async def test_error_reaches_the_caller(self) -> None:
        with self.assertRaises(ValueError):
            await self.pool.run_in_process(_fail, "no")
        self.assertNotEqual(await self.pool.run_in_process(_pid), os.getpid())

    async def test_dead_worker_fails_no_work(self) -> None:
        first = await self.pool.run_in_process(_pid)
        os.kill(first, signal.SIGKILL)
        pid = await self.pool.run_in_process(_pid)  # on a thread, or in a new pool
        self.assertNotEqual(pid, first)
        again = await self.pool.run_in_process(_pid)
        self.assertNotIn(again, (os.getpid(), first))


class OrphanTests(unittest.TestCase):
    async def test_worker_ends_with_a_killed_parent(self) -> None:
        """A daemon killed with SIGKILL leaves no worker behind (a real process: waited
        for on the reactor, as the other integration tests do)."""
        reactor = get_reactor()
        out = await getProcessOutput(sys.executable, ["-c", _ORPHANING_PARENT],
                                     env=dict(os.environ), path=os.getcwd(), reactor=reactor,
                                     errortoo=True)
        worker = int(out.split()[0])  # its first line (a warning may follow on stderr)
        deadline = reactor.seconds() + 10
        while _alive(worker) and reactor.seconds() < deadline:
            await sleep(0.05)
        self.assertFalse(_alive(worker))


class SynchronousTests(unittest.TestCase):
    def test_inline(self) -> None:
        pool = CpuPool.for_tests()
        d = pool.run_in_process(_pid)
        self.assertEqual(self.successResultOf(d), os.getpid())

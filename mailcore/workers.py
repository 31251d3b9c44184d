"""A thread pool for CPU-heavy work (password hashing, big MIME parsing, PDF rendering), and
a small pool of worker processes for bulk work that would otherwise hold Python's lock.

Same shape as the Database's pool: `run(fn, *args)` returns a Deferred; in synchronous mode
(unit tests) the work runs at once on the calling thread. `run_in_process(fn, *args)` runs
`fn` (a module-level function; arguments and result picklable) in a worker process: parsing
a sync's messages there leaves the daemon's lock to the reactor and the store thread, which
waited behind the parsing threads for it (one process holds the lock one thread at a time,
whatever the number of cores). The workers are spawned on first use (fresh interpreters,
never a fork of the threaded daemon) and end after `process_idle` seconds without work; a
worker that dies fails none of the work: the pool is made anew and the call runs on a
thread instead.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ParamSpec, TypeVar

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")
P = ParamSpec("P")

log = Logger()

# Worker processes: at most this many, and each ends after this long without work.
MAX_PROCESSES = 2
PROCESS_IDLE = 60.0
# How often (seconds) a worker looks whether the daemon is still its parent.
PARENT_CHECK = 1.0


class CpuPool:
    """Runs blocking CPU work off the reactor thread (threads, or worker processes)."""

    def __init__(
        self, reactor: IReactorFromThreads | None, *, max_threads: int = 2,
        synchronous: bool = False, max_processes: int | None = None,
        process_idle: float = PROCESS_IDLE,
    ) -> None:
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        if not synchronous:
            self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="mailcore-cpu")
        self.max_processes = max_processes if max_processes is not None else max(
            1, min(MAX_PROCESSES, os.cpu_count() or 1))
        self.process_idle = process_idle
        self._executor: ProcessPoolExecutor | None = None
        self._in_process = 0       # calls running in the worker processes
        self._idle: IDelayedCall | None = None

    @classmethod
    def for_tests(cls) -> CpuPool:
        return cls(None, synchronous=True)

    def start(self) -> None:
        if self._pool is not None and not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()
        self._stop_processes()

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        if self._pool is None:
            try:
                return defer.succeed(fn(*args, **kwargs))
            except BaseException:
                return defer.fail()
        self.start()
        assert self._reactor is not None
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

    def run_in_process(self, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """`fn(*args)` in a worker process (see the module docstring); synchronous mode
        runs it at once, like `run`."""
        if self._pool is None:
            return self.run(fn, *args)
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        executor = self._executor
        if executor is None:
            executor = self._executor = ProcessPoolExecutor(
                self.max_processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_watch_parent, initargs=(os.getpid(),))
        try:
            future = executor.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):
            self._broken(executor)
            return self.run(fn, *args)
        self._in_process += 1
        d: defer.Deferred[T] = defer.Deferred()
        reactor = self._reactor
        assert reactor is not None

        def done(future: Future[T]) -> None:  # on the executor's thread, or here
            reactor.callFromThread(finished, future)

        def finished(future: Future[T]) -> None:
            self._in_process -= 1
            self._idle_soon()
            try:
                d.callback(future.result())
            except BrokenProcessPool:
                self._broken(executor)
                self.run(fn, *args).chainDeferred(d)
            except BaseException:
                d.errback()

        future.add_done_callback(done)
        return d

    def _broken(self, executor: ProcessPoolExecutor) -> None:
        """A worker process died: the next call makes a new pool."""
        if self._executor is executor:
            log.warn("a CPU worker process died; its work runs on a thread, a new pool "
                     "takes the next")
            self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)

    def _idle_soon(self) -> None:
        if self._in_process or self._executor is None:
            return
        call_later = getattr(self._reactor, "callLater", None)
        if call_later is not None and (self._idle is None or not self._idle.active()):
            self._idle = call_later(self.process_idle, self._stop_processes)

    def _stop_processes(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


def _watch_parent(parent: int) -> None:
    """In a worker process: end it once the daemon is gone, however it ended (a worker
    waiting for work would otherwise outlive a daemon killed with SIGKILL: every worker
    holds the work queue's writing end, so its read never sees the end of the pipe)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

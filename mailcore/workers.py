"""A thread pool for CPU-heavy work (password hashing, big MIME parsing, PDF rendering).

Same shape as the Database's pool: `run(fn, *args)` returns a Deferred; in synchronous mode
(unit tests) the work runs at once on the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")
P = ParamSpec("P")


class CpuPool:
    """Runs blocking CPU work off the reactor thread."""

    def __init__(
        self, reactor: IReactorFromThreads | None, *, max_threads: int = 2,
        synchronous: bool = False,
    ) -> None:
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        if not synchronous:
            self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="mailcore-cpu")

    @classmethod
    def for_tests(cls) -> CpuPool:
        return cls(None, synchronous=True)

    def start(self) -> None:
        if self._pool is not None and not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        if self._pool is not None and self._pool.started:
            self._pool.stop()

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[T]:
        if self._pool is None:
            try:
                return defer.succeed(fn(*args, **kwargs))
            except BaseException:
                return defer.fail()
        self.start()
        assert self._reactor is not None
        return threads.deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)

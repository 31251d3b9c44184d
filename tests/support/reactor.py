"""The real reactor trial runs, for integration tests that talk to real sockets and processes.

This is the one module under tests/ allowed to import the global reactor. Unit tests never
use it: they take a Clock, MemoryReactor or StringTransport instead.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor


def get_reactor() -> Any:
    """The running trial reactor (IReactorTime, IReactorTCP, IReactorFromThreads, ...)."""
    return _reactor

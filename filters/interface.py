"""The one filter interface: a message goes in, a `Verdict` comes out, or an error says why not.

Every filter (the built-in checks, the spamd, clamd and rspamd clients, and the chain that
combines them) has a `name` and an `async def scan(message, context=None) -> Verdict`.
`scan_deferred` wraps that for callers that need a Deferred. A filter that analyses small
messages on the calling thread (the built-in checks) is also an `InlineFilter`: the chain
then answers such a message with one plain call (`FilterChain.scan_now`).

A filter that cannot give an opinion raises `FilterError` (daemon down, protocol garbage,
timeout, message larger than the filter accepts). The chain turns that into
`FilterUnavailable` for its caller, unless the operator made the filter fail-open: then the
chain's verdict records the filter as skipped. Nothing passes unscanned by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar, runtime_checkable

from twisted.internet.defer import Deferred

T = TypeVar("T")
P = ParamSpec("P")

DEFAULT_THRESHOLD = 5.0


@dataclass(frozen=True)
class Symbol:
    """One rule that matched: its name, the points it scored (None when the filter does not
    say, e.g. spamd's SYMBOLS reply), and a description when the filter gives one."""

    name: str
    score: float | None = None
    description: str = ""


@dataclass(frozen=True)
class ScanContext:
    """What the gateway knows about a message besides its bytes (the SMTP envelope).

    Filters that can use it (rspamd) pass it on; the others ignore it. Every field is
    optional: released quarantine mail or a digest has no client IP.
    """

    mail_from: str = ""
    recipients: tuple[str, ...] = ()
    client_ip: str = ""
    helo: str = ""
    hostname: str = ""  # reverse DNS name of the client, when known
    queue_id: str = ""
    user: str = ""  # authenticated SMTP user, when any


@dataclass(frozen=True)
class Verdict:
    """What a filter said about one message.

    `score` is on the filter's own scale and `threshold` is that filter's spam threshold
    (spamd: 5, rspamd: its reject score, the chain: its own). `spam` is the filter's
    decision, which may come from more than the score (an rspamd action, GTUBE).
    `viruses` are signature or heuristic names; a non-empty tuple means "virus".

    A verdict from a `FilterChain` has `filter == "chain"`, combined fields, and in `results`
    the verdict of every filter in chain order. A fail-open filter that could not answer
    appears there with `unavailable` set to why; `skipped` lists those filters by name.
    """

    filter: str
    score: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    spam: bool = False
    viruses: tuple[str, ...] = ()
    symbols: tuple[Symbol, ...] = ()
    reasons: tuple[str, ...] = ()
    unavailable: str | None = None
    results: tuple[Verdict, ...] = field(default=(), repr=False)

    @property
    def virus(self) -> bool:
        """Whether any virus (signature or heuristic) was found."""
        return bool(self.viruses)

    @property
    def clean(self) -> bool:
        """Neither spam nor virus. (A chain verdict with skipped filters can be clean.)"""
        return not self.spam and not self.viruses

    @property
    def skipped(self) -> tuple[str, ...]:
        """Names of the filters that were unavailable and skipped (fail-open)."""
        own = (self.filter,) if self.unavailable is not None else ()
        return own + tuple(name for r in self.results for name in r.skipped)

    @property
    def symbol_names(self) -> tuple[str, ...]:
        """Names of the matched symbols, each once, in the order they were reported."""
        return tuple(dict.fromkeys(s.name for s in self.symbols))

    def result(self, filter_name: str) -> Verdict | None:
        """The verdict of the named filter inside a chain verdict (None when absent)."""
        for r in self.results:
            if r.filter == filter_name:
                return r
        return None


class FilterError(Exception):
    """A filter could not give a verdict for this message.

    `permanent` means retrying cannot help (the message is larger than the filter accepts);
    otherwise the condition is temporary (daemon down, timeout, garbled reply).
    """

    def __init__(self, filter_name: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(f"{filter_name}: {reason}")
        self.filter = filter_name
        self.reason = reason
        self.permanent = permanent


class FilterTimeout(FilterError):
    """The filter did not answer within its timeout."""


class MessageTooLarge(FilterError):
    """The message exceeds what the filter accepts (clamd's StreamMaxLength, max_size)."""

    def __init__(self, filter_name: str, reason: str) -> None:
        super().__init__(filter_name, reason, permanent=True)


def refuse_oversized(filter_name: str, message: bytes, max_size: int, limit: str = "") -> None:
    """MessageTooLarge when the message is larger than `max_size` (0: no limit); `limit`
    says what that limit is on the daemon's side."""
    if max_size and len(message) > max_size:
        raise MessageTooLarge(
            filter_name, f"message of {len(message)} bytes exceeds max_size {max_size}{limit}")


class FilterUnavailable(Exception):
    """The chain could not scan the message because a fail-closed filter gave no verdict.

    For the caller this is temporary: keep the message queued and try again later (4xx at
    SMTP time). Nothing was let through. When `permanent` is true, retrying will not help
    (the message is too large for that filter); the caller decides what to do with it, it
    still must not deliver it unscanned.
    """

    def __init__(self, filter_name: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(f"filter {filter_name} unavailable: {reason}")
        self.filter = filter_name
        self.reason = reason
        self.permanent = permanent


@runtime_checkable
class Filter(Protocol):
    """Anything that scans a message: a name and an async `scan`."""

    name: str

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """Scan the raw RFC 5322 message; raise FilterError when no verdict can be given."""
        ...


class NotInline(Exception):
    """Raised by `InlineFilter.scan_inline` for a message that turned out to need more work
    than a plain call on the reactor may take (the built-in checks of a small message that
    holds a zip archive): nothing was decided, `scan` answers it off the reactor."""


@runtime_checkable
class InlineFilter(Filter, Protocol):
    """A filter that can also answer as a plain call, for the messages it would analyse on
    the calling thread anyway (the built-in checks of a small message): `inline(message)`
    says whether it would, and `scan_inline` is then what `scan` would return or raise, or
    NotInline when the message needs more work than that after all."""

    def inline(self, message: bytes) -> bool:
        """Whether `scan` would answer this message without waiting on anything."""
        ...

    def scan_inline(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """`scan`'s verdict (or error) as a plain call; only when `inline(message)`."""
        ...


class Runner(Protocol):
    """Where CPU-heavy work runs: `mailcore.workers.CpuPool` (or `CpuPool.for_tests()`)."""

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """Run fn(*args, **kwargs) off the reactor thread; the Deferred fires with its result."""
        ...


def scan_deferred(
    filter_: Filter, message: bytes, context: ScanContext | None = None
) -> Deferred[Verdict]:
    """`filter_.scan(...)` as a Deferred, for callers on the Deferred side of the edge."""
    return Deferred.fromCoroutine(filter_.scan(message, context))

"""The chain: run every filter on a message at once, combine what they say, apply the
failure policy.

Combination rule (one verdict out of several):

- Each filter's score is put on the chain's scale: `score * chain_threshold /
  filter_threshold` (spamd's 5, rspamd's 15 and the built-in 5 become comparable).
- `score_mode = "max"` (default): the chain's score is the highest of those; `"sum"`: their
  sum (several borderline filters add up to spam).
- The message is spam when any filter says spam (its own decision: score over its
  threshold, an rspamd action, GTUBE) or the chain's score reaches the chain's threshold.
- Virus names are the union of all filters' (in chain order, each once); so are symbols
  (by name, first report wins; each filter's own list stays in `results`) and reasons
  (prefixed with the filter's name).

When every filter of the chain is an `InlineFilter` that would analyse a message on the
calling thread (the built-in checks of a small message), `scan_now` gives the same verdict
or error as a plain call: no coroutine, Deferred or deadline per message (an inline analysis
is over before any deadline could be armed, as in `scan`).

Failure policy: a filter that raises (down, garbled reply, timeout, message too large, or
a bug) makes `scan` raise `FilterUnavailable` and cancels the other scans, unless that
filter is fail-open: then its entry in `results` has `unavailable` set and the verdict is
built from the others. A message larger than a filter accepts is skipped the same way
when that filter's entry has `skip_oversize` (spam filters commonly skip big mail), and
otherwise raises `FilterUnavailable(permanent=True)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from filters._net import with_deadline
from filters.interface import (
    DEFAULT_THRESHOLD,
    Filter,
    FilterError,
    FilterUnavailable,
    InlineFilter,
    MessageTooLarge,
    NotInline,
    ScanContext,
    Symbol,
    Verdict,
)

SCORE_MODES = ("max", "sum")

log = Logger()


@dataclass(frozen=True)
class ChainEntry:
    """A filter in the chain, how its failures count, and an optional deadline the chain
    enforces itself (for filters without their own timeout, e.g. the built-in checks)."""

    filter: Filter
    fail_open: bool = False
    timeout: float | None = None
    skip_oversize: bool = False  # a message too large for this filter: skip, don't fail


def combine(
    verdicts: Sequence[Verdict],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    score_mode: str = "max",
    name: str = "chain",
) -> Verdict:
    """One verdict out of several, by the rule in this module's docstring."""
    if len(verdicts) == 1 and verdicts[0].unavailable is None:
        # The usual verdict of a one-filter chain: nothing to unite, only to scale (and the
        # filter's name put before its reasons), as below.
        v = verdicts[0]
        one = v.score * threshold / v.threshold if v.threshold > 0 else v.score
        score = round(one if score_mode == "max" else sum((one,)), 3)
        symbols = tuple(v.symbols)
        if len({s.name for s in symbols}) != len(symbols):
            symbols = _first_of_each(symbols)
        return Verdict(filter=name, score=score, threshold=threshold,
                       spam=v.spam or score >= threshold,
                       viruses=tuple(dict.fromkeys(v.viruses)), symbols=symbols,
                       reasons=tuple(f"{v.filter}: {r}" for r in v.reasons), results=(v,))
    counted = [v for v in verdicts if v.unavailable is None]
    scaled = [
        v.score * threshold / v.threshold if v.threshold > 0 else v.score for v in counted
    ]
    if score_mode == "sum":
        score = sum(scaled)
    else:
        score = max(scaled, default=0.0)
    score = round(score, 3)
    viruses = tuple(dict.fromkeys(name for v in counted for name in v.viruses))
    symbols = _first_of_each(s for v in counted for s in v.symbols)
    reasons: list[str] = []
    for v in verdicts:
        if v.unavailable is not None:
            reasons.append(f"{v.filter}: skipped, unavailable ({v.unavailable})")
        else:
            reasons.extend(f"{v.filter}: {r}" for r in v.reasons)
    return Verdict(
        filter=name,
        score=score,
        threshold=threshold,
        spam=any(v.spam for v in counted) or score >= threshold,
        viruses=viruses,
        symbols=symbols,
        reasons=tuple(reasons),
        results=tuple(verdicts),
    )


def _first_of_each(symbols: Iterable[Symbol]) -> tuple[Symbol, ...]:
    """The symbols by name, each once: the first reported of that name, in order."""
    first: dict[str, Symbol] = {}
    for s in symbols:
        first.setdefault(s.name, s)
    return tuple(first.values())


class FilterChain:
    """Several filters as one: `scan` runs them concurrently and combines the verdicts.

    The chain is itself a Filter (its verdicts have `filter == "chain"` and carry every
    filter's own verdict in `results`).
    """

    def __init__(
        self,
        entries: Sequence[ChainEntry | Filter],
        clock: IReactorTime,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        score_mode: str = "max",
        name: str = "chain",
    ) -> None:
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {', '.join(SCORE_MODES)}")
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        self.entries = tuple(e if isinstance(e, ChainEntry) else ChainEntry(e) for e in entries)
        names = [e.filter.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"filter names must be unique: {names}")
        self.clock = clock
        # The filters when every one can answer inline (InlineFilter), else None.
        self._inline: tuple[InlineFilter, ...] | None = tuple(
            e.filter for e in self.entries if isinstance(e.filter, InlineFilter)
        ) if all(isinstance(e.filter, InlineFilter) for e in self.entries) else None
        self.threshold = threshold
        self.score_mode = score_mode
        self.name = name

    @property
    def names(self) -> tuple[str, ...]:
        """The filters' names, in chain order."""
        return tuple(e.filter.name for e in self.entries)

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        """Scan with every filter; raises FilterUnavailable per the failure policy."""
        if not self.entries:
            return combine([], threshold=self.threshold, score_mode=self.score_mode,
                           name=self.name)
        if len(self.entries) == 1:
            # One filter: its own failure is the chain's, no fan-out to gather or cancel.
            verdict = await self._run(self.entries[0], message, context)
            return combine([verdict], threshold=self.threshold, score_mode=self.score_mode,
                           name=self.name)
        runs = [defer.Deferred.fromCoroutine(self._run(e, message, context))
                for e in self.entries]
        try:
            verdicts = await defer.gatherResults(runs, consumeErrors=True)
        except defer.FirstError as e:
            for d in runs:
                d.cancel()
            failure: Any = e.subFailure
            failure.raiseException()
            raise  # not reached: raiseException always raises
        return combine(verdicts, threshold=self.threshold, score_mode=self.score_mode,
                       name=self.name)

    def inline(self, message: bytes) -> bool:
        """Whether `scan_now` can answer this message (every filter analyses it inline)."""
        filters = self._inline
        return filters is not None and all(f.inline(message) for f in filters)

    def scan_now(self, message: bytes, context: ScanContext | None = None) -> Verdict | None:
        """What `scan` would give, as a plain call, when `inline(message)`; else None, with
        nothing run (and None when a filter turns the message down after all: NotInline,
        nothing decided). Raises FilterUnavailable as `scan` does: every filter runs, as
        `scan` starts them all, and the first (in chain order) that failed closed is
        raised."""
        if not self.inline(message):
            return None
        verdicts: list[Verdict] = []
        first: FilterUnavailable | None = None
        for entry in self.entries:
            try:
                verdicts.append(self._run_inline(entry, message, context))
            except FilterUnavailable as e:
                if first is None:
                    first = e
            except NotInline:
                return None
        if first is not None:
            raise first
        return combine(verdicts, threshold=self.threshold, score_mode=self.score_mode,
                       name=self.name)

    def _run_inline(
        self, entry: ChainEntry, message: bytes, context: ScanContext | None
    ) -> Verdict:
        """`_run` of an InlineFilter's inline analysis."""
        f: Any = entry.filter
        try:
            verdict: Verdict = f.scan_inline(message, context)
            return verdict
        except NotInline:
            raise
        except Exception as e:
            return self._failed(entry, e)

    async def _run(
        self, entry: ChainEntry, message: bytes, context: ScanContext | None
    ) -> Verdict:
        name = entry.filter.name
        try:
            work = entry.filter.scan(message, context)
            if entry.timeout is not None:
                return await with_deadline(name, self.clock, entry.timeout, work)
            return await work
        except defer.CancelledError:
            raise
        except Exception as e:
            return self._failed(entry, e)

    def _failed(self, entry: ChainEntry, e: Exception) -> Verdict:
        """The failure policy for `entry`'s error `e` (called in its except block): the
        entry's skipped verdict when it is fail-open (or skips oversize mail), else
        FilterUnavailable."""
        name = entry.filter.name
        permanent = False
        if isinstance(e, MessageTooLarge):
            if entry.skip_oversize:
                return Verdict(filter=name, unavailable=e.reason)
            reason, permanent = e.reason, e.permanent
        elif isinstance(e, FilterError):
            reason, permanent = e.reason, e.permanent
        else:
            log.failure("filter {name} failed unexpectedly", name=name)
            reason = f"internal error: {type(e).__name__}: {e}"
        if entry.fail_open:
            log.warn("filter {name} unavailable, skipped (fail-open): {reason}",
                     name=name, reason=reason)
            return Verdict(filter=name, unavailable=reason)
        raise FilterUnavailable(name, reason, permanent=permanent)

    async def health(self) -> dict[str, str]:
        """Ask every filter that can be pinged; "ok" or "ok: PONG" or "error: why"."""

        async def one(f: Filter) -> str:
            ping = getattr(f, "ping", None)
            if ping is None:
                return "ok"
            try:
                return f"ok: {await ping()}"
            except Exception as e:
                return f"error: {e}"

        answers = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(e.filter)) for e in self.entries])
        return dict(zip(self.names, answers, strict=True))

    async def close(self) -> None:
        """Release what the filters hold (idle HTTP connections)."""
        for entry in self.entries:
            close = getattr(entry.filter, "close", None)
            if close is not None:
                await close()

"""The chain: combination rule, concurrency, failure policy (timeouts with a Clock,
fail-open, oversize), health and the Deferred edge."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from filters.builtin import EICAR, GTUBE, BuiltinFilter, BuiltinSettings
from filters.chain import ChainEntry, FilterChain, combine
from filters.interface import (
    Filter,
    FilterError,
    FilterUnavailable,
    MessageTooLarge,
    NotInline,
    ScanContext,
    Symbol,
    Verdict,
    scan_deferred,
)
from mailcore.workers import CpuPool
from tests.support.filterd import message


class Fixed:
    """A filter that answers with a fixed verdict (or raises a fixed error)."""

    def __init__(self, name: str, verdict: Verdict | None = None,
                 error: Exception | None = None) -> None:
        self.name = name
        self.verdict = verdict or Verdict(filter=name)
        self.error = error
        self.contexts: list[ScanContext | None] = []

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        self.contexts.append(context)
        if self.error is not None:
            raise self.error
        return self.verdict


class Inline(Fixed):
    """A Fixed filter that also answers inline (an InlineFilter) for messages up to
    `inline_max` bytes."""

    def __init__(self, name: str, verdict: Verdict | None = None,
                 error: Exception | None = None, inline_max: int = 100) -> None:
        super().__init__(name, verdict, error)
        self.inline_max = inline_max
        self.inline_scans = 0

    def inline(self, message: bytes) -> bool:
        return len(message) <= self.inline_max

    def scan_inline(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        self.inline_scans += 1
        self.contexts.append(context)
        if self.error is not None:
            raise self.error
        return self.verdict


class Pending:
    """A filter whose scans wait on Deferreds the test fires (or never does)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting: list[defer.Deferred[Verdict]] = []
        self.cancelled = 0

    async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
        def cancel(d: defer.Deferred[Verdict]) -> None:
            self.cancelled += 1

        d: defer.Deferred[Verdict] = defer.Deferred(cancel)
        self.waiting.append(d)
        return await d


def v(name: str, score: float = 0.0, threshold: float = 5.0, **kw: Any) -> Verdict:
    return Verdict(filter=name, score=score, threshold=threshold, **kw)


class CombineTests(TestCase):
    def test_scores_are_scaled_to_the_chain_threshold_and_max_wins(self) -> None:
        verdict = combine([v("spamd", 4.0, 5.0), v("rspamd", 9.0, 15.0)], threshold=5.0)
        self.assertEqual(verdict.score, 4.0)  # rspamd's 9/15 is 3.0 on a 5-point scale
        self.assertFalse(verdict.spam)

    def test_sum_mode_adds_borderline_filters_up_to_spam(self) -> None:
        verdicts = [v("spamd", 4.0, 5.0), v("rspamd", 9.0, 15.0)]
        verdict = combine(verdicts, threshold=5.0, score_mode="sum")
        self.assertEqual(verdict.score, 7.0)
        self.assertTrue(verdict.spam)

    def test_any_filter_saying_spam_makes_spam(self) -> None:
        verdict = combine([v("rspamd", 2.0, 15.0, spam=True), v("spamd", 0.0)])
        self.assertTrue(verdict.spam)
        self.assertLess(verdict.score, 5.0)

    def test_viruses_symbols_reasons_are_unions_in_chain_order(self) -> None:
        a = v("builtin", viruses=("Eicar-Test-Signature",), symbols=(Symbol("GTUBE", 1000.0),),
              reasons=("found it",))
        b = v("clamd", viruses=("Eicar-Test-Signature", "Other.UNOFFICIAL"),
              symbols=(Symbol("GTUBE"), Symbol("NO_RELAYS")), reasons=("clamd too",))
        verdict = combine([a, b])
        self.assertEqual(verdict.viruses, ("Eicar-Test-Signature", "Other.UNOFFICIAL"))
        self.assertEqual(verdict.symbol_names, ("GTUBE", "NO_RELAYS"))
        self.assertEqual(verdict.symbols[0].score, 1000.0)  # first report wins
        self.assertEqual(verdict.reasons, ("builtin: found it", "clamd: clamd too"))
        self.assertEqual(verdict.results, (a, b))
        self.assertIs(verdict.result("clamd"), b)
        self.assertIsNone(verdict.result("rspamd"))

    def test_skipped_filters_do_not_count(self) -> None:
        skipped = Verdict(filter="spamd", unavailable="connection refused")
        verdict = combine([skipped, v("builtin", 1.0)])
        self.assertEqual(verdict.score, 1.0)
        self.assertEqual(verdict.skipped, ("spamd",))
        self.assertIn("spamd: skipped, unavailable (connection refused)", verdict.reasons)

    def test_empty_chain_is_clean(self) -> None:
        verdict = combine([])
        self.assertTrue(verdict.clean)
        self.assertEqual(verdict.score, 0.0)


class ChainTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def chain(self, *entries: ChainEntry | Filter, **kw: Any) -> FilterChain:
        return FilterChain(entries, self.clock, **kw)

    async def test_combined_verdict_from_every_filter(self) -> None:
        spamd = Fixed("spamd", v("spamd", 6.0, spam=True, symbols=(Symbol("BAYES_99"),)))
        clamd = Fixed("clamd", v("clamd", viruses=("Win.Trojan.X",)))
        context = ScanContext(mail_from="a@b.c", recipients=("d@e.f",))
        verdict = await self.chain(spamd, clamd).scan(b"msg", context)
        self.assertTrue(verdict.spam)
        self.assertEqual(verdict.viruses, ("Win.Trojan.X",))
        self.assertEqual([r.filter for r in verdict.results], ["spamd", "clamd"])
        self.assertEqual(spamd.contexts, [context])

    async def test_filters_run_concurrently(self) -> None:
        a, b = Pending("a"), Pending("b")
        d = defer.Deferred.fromCoroutine(self.chain(a, b).scan(b"msg"))
        # Both scans started before either answered.
        self.assertEqual((len(a.waiting), len(b.waiting)), (1, 1))
        b.waiting[0].callback(v("b", 1.0))
        self.assertNoResult(d)
        a.waiting[0].callback(v("a", 2.0))
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.score, 2.0)
        self.assertEqual([r.filter for r in verdict.results], ["a", "b"])

    async def test_a_failing_filter_makes_the_chain_unavailable(self) -> None:
        chain = self.chain(Fixed("builtin"),
                           Fixed("spamd", error=FilterError("spamd", "connection refused")))
        with self.assertRaises(FilterUnavailable) as caught:
            await chain.scan(b"msg")
        self.assertEqual(caught.exception.filter, "spamd")
        self.assertEqual(caught.exception.reason, "connection refused")
        self.assertFalse(caught.exception.permanent)

    async def test_failure_cancels_the_other_scans(self) -> None:
        slow = Pending("slow")
        chain = self.chain(slow, Fixed("clamd", error=FilterError("clamd", "down")))
        with self.assertRaises(FilterUnavailable):
            await chain.scan(b"msg")
        self.assertEqual(slow.cancelled, 1)

    async def test_filter_that_never_answers_times_out_by_the_clock(self) -> None:
        silent = Pending("spamd")
        chain = self.chain(ChainEntry(silent, timeout=10.0))
        d = defer.Deferred.fromCoroutine(chain.scan(b"msg"))
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(d, FilterUnavailable)
        self.assertIn("no answer within 10 s", failure.value.reason)
        self.assertEqual(silent.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_fail_open_filter_that_times_out_is_skipped(self) -> None:
        silent = Pending("rspamd")
        chain = self.chain(Fixed("builtin", v("builtin", 1.0)),
                           ChainEntry(silent, fail_open=True, timeout=5.0))
        d = defer.Deferred.fromCoroutine(chain.scan(b"msg"))
        self.clock.advance(5.0)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.skipped, ("rspamd",))
        skipped = verdict.result("rspamd")
        assert skipped is not None
        self.assertIn("no answer within 5 s", skipped.unavailable or "")
        self.assertEqual(verdict.score, 1.0)

    async def test_fail_open_filter_that_errors_is_skipped(self) -> None:
        chain = self.chain(ChainEntry(Fixed("spamd", error=FilterError("spamd", "refused")),
                                      fail_open=True))
        verdict = await chain.scan(b"msg")
        self.assertEqual(verdict.skipped, ("spamd",))
        self.assertTrue(verdict.clean)

    async def test_unexpected_exception_is_unavailable_not_clean(self) -> None:
        chain = self.chain(Fixed("buggy", error=KeyError("oops")))
        with self.assertRaises(FilterUnavailable) as caught:
            await chain.scan(b"msg")
        self.assertIn("KeyError", caught.exception.reason)
        self.flushLoggedErrors(KeyError)

    async def test_too_large_is_permanent_unless_skipped(self) -> None:
        big = Fixed("clamd", error=MessageTooLarge("clamd", "over StreamMaxLength"))
        with self.assertRaises(FilterUnavailable) as caught:
            await self.chain(big).scan(b"msg")
        self.assertTrue(caught.exception.permanent)
        verdict = await self.chain(ChainEntry(big, skip_oversize=True)).scan(b"msg")
        self.assertEqual(verdict.skipped, ("clamd",))

    async def test_chain_deadline_also_covers_the_builtin_filter(self) -> None:
        class NeverRunner:
            def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
                return defer.Deferred()

        builtin = BuiltinFilter(NeverRunner(), BuiltinSettings(inline_max=0))
        d = defer.Deferred.fromCoroutine(
            self.chain(ChainEntry(builtin, timeout=30.0)).scan(b"msg"))
        self.clock.advance(30)
        self.failureResultOf(d, FilterUnavailable)

    async def test_real_builtin_filter_in_a_chain(self) -> None:
        chain = self.chain(BuiltinFilter(CpuPool.for_tests()))
        verdict = await chain.scan(message(GTUBE + b"\r\n" + EICAR))
        self.assertTrue(verdict.spam)
        self.assertTrue(verdict.virus)
        self.assertEqual(chain.names, ("builtin",))

    # -- scan_now: every filter inline, the same answers as a plain call ------------------

    async def assertSameAsScan(self, chain: FilterChain, message: bytes) -> None:
        """`scan_now` gives `scan`'s verdict, or raises its error."""
        try:
            expected: Verdict | FilterUnavailable = await chain.scan(message)
        except FilterUnavailable as e:
            expected = e
        if isinstance(expected, FilterUnavailable):
            with self.assertRaises(FilterUnavailable) as caught:
                chain.scan_now(message)
            self.assertEqual((caught.exception.filter, caught.exception.reason,
                              caught.exception.permanent),
                             (expected.filter, expected.reason, expected.permanent))
        else:
            self.assertEqual(chain.scan_now(message), expected)

    async def test_scan_now_answers_as_scan_when_every_filter_is_inline(self) -> None:
        spam = Inline("a", v("a", 6.0, spam=True, symbols=(Symbol("X"),)))
        virus = Inline("b", v("b", viruses=("Eicar-Test-Signature",)))
        chain = self.chain(spam, virus)
        self.assertTrue(chain.inline(b"msg"))
        context = ScanContext(mail_from="a@b.c", recipients=("d@e.f",))
        verdict = chain.scan_now(b"msg", context)
        self.assertEqual(verdict, await chain.scan(b"msg", context))
        assert verdict is not None
        self.assertTrue(verdict.spam and verdict.virus)
        self.assertEqual(spam.contexts, [context, context])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_scan_now_keeps_the_failure_policy(self) -> None:
        down = FilterError("b", "refused")
        await self.assertSameAsScan(self.chain(Inline("a"), Inline("b", error=down)), b"m")
        await self.assertSameAsScan(
            self.chain(Inline("a", v("a", 2.0)), ChainEntry(Inline("b", error=down),
                                                            fail_open=True)), b"m")
        big = MessageTooLarge("b", "too big")
        await self.assertSameAsScan(self.chain(Inline("b", error=big)), b"m")
        await self.assertSameAsScan(
            self.chain(ChainEntry(Inline("b", error=big), skip_oversize=True)), b"m")
        await self.assertSameAsScan(self.chain(Inline("bug", error=KeyError("x"))), b"m")
        self.flushLoggedErrors(KeyError)

    def test_scan_now_runs_every_filter_and_raises_the_first_failure(self) -> None:
        last = Inline("c")
        chain = self.chain(Inline("a", error=FilterError("a", "down")),
                           Inline("b", error=FilterError("b", "down")), last)
        with self.assertRaises(FilterUnavailable) as caught:
            chain.scan_now(b"msg")
        self.assertEqual(caught.exception.filter, "a")
        self.assertEqual(last.inline_scans, 1)  # as `scan` starts every filter

    def test_scan_now_is_none_when_a_filter_turns_the_message_down(self) -> None:
        """NotInline (more work than a plain call takes on) is no failure: nothing is
        decided, and `scan` answers the message."""
        chain = self.chain(Inline("a", error=NotInline("a zip")), Inline("b"))
        self.assertTrue(chain.inline(b"msg"))
        self.assertIsNone(chain.scan_now(b"msg"))

    def test_scan_now_is_none_with_nothing_run_unless_every_filter_is_inline(self) -> None:
        inline = Inline("a", inline_max=3)
        self.assertIsNone(self.chain(inline, Fixed("spamd")).scan_now(b"m"))
        self.assertFalse(self.chain(inline, Fixed("spamd")).inline(b"m"))
        self.assertIsNone(self.chain(inline).scan_now(b"long"))
        self.assertEqual(inline.inline_scans, 0)
        self.assertIsNotNone(self.chain(inline).scan_now(b"abc"))

    async def test_scan_now_with_the_builtin_filter(self) -> None:
        class NeverRunner:
            def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
                raise AssertionError("an inline message is not sent to the pool")

        builtin = BuiltinFilter(NeverRunner(), BuiltinSettings(inline_max=2000))
        chain = self.chain(ChainEntry(builtin, timeout=30.0))
        for body in (message(GTUBE + b"\r\n" + EICAR), message(b"hello"),
                     b"garbage without a header"):
            await self.assertSameAsScan(chain, body)
        self.assertIsNone(chain.scan_now(message(b"x" * 3000)))

    def test_scan_deferred_is_the_deferred_edge(self) -> None:
        d = scan_deferred(self.chain(Fixed("a", v("a", 9.0))), b"msg")
        self.assertIsInstance(d, defer.Deferred)
        self.assertTrue(self.successResultOf(d).spam)

    def test_configuration_errors(self) -> None:
        self.assertRaises(ValueError, self.chain, Fixed("a"), Fixed("a"))
        self.assertRaises(ValueError, self.chain, Fixed("a"), score_mode="avg")
        self.assertRaises(ValueError, self.chain, Fixed("a"), threshold=0)

    async def test_health_pings_what_can_be_pinged(self) -> None:
        class Pingable(Fixed):
            async def ping(self) -> str:
                if self.error:
                    raise self.error
                return "PONG"

        chain = self.chain(Fixed("builtin"), Pingable("clamd"),
                           Pingable("spamd", error=FilterError("spamd", "refused")))
        self.assertEqual(await chain.health(), {
            "builtin": "ok", "clamd": "ok: PONG", "spamd": "error: spamd: refused"})

    async def test_close_closes_filters_that_hold_resources(self) -> None:
        closed: list[str] = []

        class Closable(Fixed):
            async def close(self) -> None:
                closed.append(self.name)

        await self.chain(Fixed("a"), Closable("b")).close()
        self.assertEqual(closed, ["b"])

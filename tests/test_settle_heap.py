"""`settle_heap`: start-up's garbage is collected, what is left is frozen (never walked by
a collection again), and what the daemon allocates afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import TestCase

from mailcore.service import settle_heap


class _Node:
    """An object that can sit in a reference cycle and be watched through a weak ref."""

    def __init__(self) -> None:
        self.me = self


def _cycle() -> weakref.ref[_Node]:
    """A reference cycle nothing else holds: only the cyclic collector can free it."""
    return weakref.ref(_Node())


class SettleHeapTests(TestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)  # the test process keeps collecting as before

    def test_garbage_is_collected_and_the_rest_frozen(self) -> None:
        kept = _Node()  # lives on, like start-up's objects
        dead = _cycle()
        self.assertIsNotNone(dead())
        before = gc.get_freeze_count()
        settle_heap()
        self.assertIsNone(dead(), "start-up's garbage was frozen instead of collected")
        self.assertGreater(gc.get_freeze_count(), before)
        # Frozen: no generation holds it any more, so no collection walks it.
        for generation in range(3):
            self.assertFalse(any(o is kept for o in gc.get_objects(generation)))

    def test_later_garbage_is_still_collected(self) -> None:
        settle_heap()
        later = _cycle()
        self.assertIsNotNone(later())
        gc.collect()
        self.assertIsNone(later())

"""The CPU pool: work off the calling thread, and a short GIL switch interval while it runs."""

from __future__ import annotations

import sys

from twisted.trial.unittest import TestCase

from mailcore.workers import SWITCH_INTERVAL, CpuPool


class SwitchIntervalTests(TestCase):
    def setUp(self) -> None:
        before = sys.getswitchinterval()
        self.addCleanup(sys.setswitchinterval, before)
        sys.setswitchinterval(0.005)

    def test_a_started_pool_shortens_the_switch_interval(self) -> None:
        pool = CpuPool(None)  # no work is run: no reactor needed
        self.assertEqual(sys.getswitchinterval(), 0.005)  # nothing until it starts
        pool.start()
        self.addCleanup(pool.stop)
        self.assertAlmostEqual(sys.getswitchinterval(), SWITCH_INTERVAL)

    def test_a_synchronous_pool_changes_nothing(self) -> None:
        CpuPool.for_tests().start()
        self.assertEqual(sys.getswitchinterval(), 0.005)

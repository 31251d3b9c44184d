"""tests.support.logs: what a test sees of the log."""

from __future__ import annotations

from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from mailcore.store.database import SLOW_TRANSACTION
from tests.support.logs import logged_at


class LoggedAtTests(SynchronousTestCase):
    def test_the_stores_slow_transaction_warning_is_not_counted(self) -> None:
        """A loaded machine makes any transaction slow: CI once failed a test counting its
        warnings on 'slow transaction queue_commit: 1.75s'."""
        warnings = logged_at(self, LogLevel.warn)
        log = Logger(namespace="mailcore.store.database")
        log.warn(SLOW_TRANSACTION, name="queue_commit", elapsed=1.75)
        log.warn("the cap was reached")
        log.info("not a warning")
        self.assertEqual(warnings, ["the cap was reached"])

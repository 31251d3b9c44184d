"""The `[store]` table: the database's threads as the operator sets them, checked at
start-up, and the daemon's store built with them; the bound on the daemon's stop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.config import Config, ConfigError, config_from_toml
from mailcore.service import OrderedMultiService, build_core
from mailcore.startup import check_tables
from mailcore.store.settings import StoreSettings
from mailcore.store.stuck import StuckSessionReaper
from tests.support.logs import logged_at
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for


class StoreSettingsTests(SynchronousTestCase):
    def error(self, section: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            check_tables(config_from_toml({"store": section}), get_reactor())
        return str(caught.exception)

    def test_defaults_leave_the_read_lane_to_the_database(self) -> None:
        self.assertEqual(StoreSettings.from_config({}), StoreSettings(4, None))
        self.assertEqual(StoreSettings.from_config({"threads": 8, "read_threads": 6}),
                         StoreSettings(8, 6))

    def test_bad_values_are_one_line_naming_the_key(self) -> None:
        for key, value in (("threads", 0), ("threads", 65), ("read_threads", "2"),
                           ("read_threads", True), ("threads", 2.5), ("read_threads", -1)):
            self.assertEqual(self.error({key: value}),
                             f"[store] {key} must be a whole number from 1 to 64", (key, value))
        self.assertEqual(self.error({"pool": 3}), "[store] unknown key: pool")

    def test_idle_in_transaction_timeout_is_a_number_of_seconds_from_1(self) -> None:
        self.assertEqual(StoreSettings.from_config({}).idle_in_transaction_timeout, 30.0)
        self.assertEqual(StoreSettings.from_config(
            {"idle_in_transaction_timeout": 3}).idle_in_transaction_timeout, 3.0)
        for value in (0, 0.5, -1, "30", True, float("nan"), float("inf")):
            self.assertEqual(self.error({"idle_in_transaction_timeout": value}),
                             "[store] idle_in_transaction_timeout must be a number of "
                             "seconds, at least 1", value)

    def test_stop_timeout_is_a_positive_number_of_seconds(self) -> None:
        self.assertEqual(StoreSettings.from_config({}).stop_timeout, 60.0)
        self.assertEqual(StoreSettings.from_config({"stop_timeout": 2.5}).stop_timeout, 2.5)
        for value in (0, -1, "60", True, float("nan"), float("inf")):
            self.assertEqual(self.error({"stop_timeout": value}),
                             "[store] stop_timeout must be a positive number", value)


class _Stuck(Service):
    """A service whose stop waits on something that never comes (a frozen database)."""

    name = "queue"

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred()


class _Quick(Service):
    def __init__(self, name: str, stopped: list[str]) -> None:
        self.name = self.label = name
        self.stopped = stopped

    def stopService(self) -> None:
        super().stopService()
        self.stopped.append(self.label)


class BoundedStopTests(SynchronousTestCase):
    def test_a_stop_that_waits_on_a_frozen_store_ends_at_stop_timeout(self) -> None:
        """The daemon's stop waited for ever on a database that did not answer; past
        [store] stop_timeout it ends, saying what was still stopping, and the services
        not yet stopped are told to (those that need no store stop at once)."""
        clock = Clock()
        stopped: list[str] = []
        top = OrderedMultiService(clock, stop_timeout=60)
        for child in (_Quick("log", stopped), _Quick("store", stopped), _Stuck(),
                      _Quick("http", stopped)):
            child.setServiceParent(top)
        top.startService()
        critical = logged_at(self, LogLevel.critical)
        d = top.stopService()
        self.assertEqual(stopped, ["http"])
        clock.advance(59)
        self.assertNoResult(d)
        clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(stopped, ["http", "store", "log"])
        self.assertEqual(critical, [
            "mailcore: the stop did not finish within [store] stop_timeout (60 s) and ends "
            "now (a database that does not answer?); still stopping: queue; not stopped: "
            "store, log. Nothing acknowledged is lost"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_stop_in_time_leaves_no_timer(self) -> None:
        clock = Clock()
        stopped: list[str] = []
        top = OrderedMultiService(clock, stop_timeout=60)
        _Quick("store", stopped).setServiceParent(top)
        top.startService()
        self.successResultOf(top.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])


class BuiltStoreTests(TestCase):
    async def build(self, store: dict[str, float], db_url: str | None = None) -> Any:
        data_dir = Path(tempdir_for(self, "mailcore-store-")) / "var"
        # build_core adds 077 to the process umask, as the daemon does at start-up: the
        # tests after this one in the same process get the umask they had back (left at
        # 077, a later test's real server could not read the files it was given).
        self.addCleanup(os.umask, os.umask(0o077))
        core = build_core(Config(data_dir=data_dir, db_url=db_url, sections={"store": store}),
                          get_reactor())
        self.addCleanup(core.cpu.stop)
        await core.db.open()
        self.addCleanup(core.db.close)
        self.core = core
        return core.db

    async def test_the_daemons_store_has_the_threads_set(self) -> None:
        db = await self.build({"threads": 3, "read_threads": 5},
                              await create_test_database(self))
        assert db._pool is not None and db._read_pool is not None
        self.assertEqual((db._pool.max, db._read_pool.max), (3, 5))
        # PostgreSQL: a connection for each thread and one spare, and no more.
        self.assertEqual((db.engine.pool.size(), db.engine.pool._max_overflow), (9, 0))

    async def test_postgresql_reads_on_two_threads_unless_told(self) -> None:
        db = await self.build({"threads": 6}, await create_test_database(self))
        assert db._pool is not None and db._read_pool is not None
        self.assertEqual((db._pool.max, db._read_pool.max, db.engine.pool.size()), (6, 2, 9))

    async def test_postgresql_ends_a_transaction_idle_past_the_timeout_set(self) -> None:
        """[store] idle_in_transaction_timeout is every session's
        idle_in_transaction_session_timeout and the stuck session reaper's bound (before,
        30 s whatever the operator's need: the two-node SIGSTOP test waited it out)."""
        db = await self.build({"idle_in_transaction_timeout": 2.5},
                              await create_test_database(self))

        def timeout(conn: Any) -> str:
            return str(conn.exec_driver_sql(
                "SELECT current_setting('idle_in_transaction_session_timeout')").scalar_one())

        self.assertEqual(await db.read("timeout", timeout), "2500ms")
        self.assertEqual(await db.run("timeout", timeout), "2500ms")
        reapers = [s for s in self.core.background_services()
                   if isinstance(s, StuckSessionReaper)]
        self.assertEqual([(r.silent, r.interval()) for r in reapers], [(2.5, 2.5)])

    async def test_postgresql_idle_in_transaction_timeout_is_30_s_unless_told(self) -> None:
        db = await self.build({}, await create_test_database(self))
        self.assertEqual(await db.read("timeout", lambda conn: conn.exec_driver_sql(
            "SELECT current_setting('idle_in_transaction_session_timeout')").scalar_one()),
            "30s")
        reapers = [s for s in self.core.background_services()
                   if isinstance(s, StuckSessionReaper)]
        self.assertEqual([(r.silent, r.interval()) for r in reapers], [(30.0, 10.0)])

    async def test_sqlite_reads_on_one_thread_unless_told(self) -> None:
        db = await self.build({})
        assert db._pool is not None and db._read_pool is not None
        self.assertEqual((db._pool.max, db._read_pool.max), (4, 1))

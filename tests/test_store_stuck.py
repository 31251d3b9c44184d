"""A node stopped in the middle of sending a statement holds its transaction's locks past
PostgreSQL's idle-in-transaction timeout; the other nodes end its session
(mailcore.store.stuck). Real PostgreSQL: the frozen node is a session that sent a statement
without its Sync (as libpq leaves one whose client stopped between two writes)."""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy.engine import make_url
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.store.engine import APPLICATION_NAME, make_engine
from mailcore.store.stuck import StuckSessionReaper, thd_end_stuck_sessions
from tests.support.db import open_database_at
from tests.support.pg import create_test_database
from tests.support.servers import sleep


def conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Frozen:
    """A session that locked row 1 of `held` and then sent a statement without its Sync:
    PostgreSQL ran it and waits for the rest, `active`, its locks held (a client stopped
    while writing)."""

    def __init__(self, url: str, application_name: str) -> None:
        self.conn = psycopg.connect(conninfo(url), application_name=application_name)
        self.conn.execute("SET idle_in_transaction_session_timeout = 1000")
        self.conn.execute("SELECT id FROM held WHERE id = 1 FOR UPDATE")
        self.pid = self.conn.info.backend_pid
        pg = self.conn.pgconn
        pg.enter_pipeline_mode()
        pg.send_query_params(b"SELECT 1", None)
        pg.flush()

    def close(self) -> None:
        self.conn.pgconn.finish()


class StuckSessionTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.url = await create_test_database(self)
        self.engine = make_engine(self.url, node="node-a")
        self.addCleanup(self.engine.dispose)

        def schema() -> None:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE held (id int PRIMARY KEY, n int)")
                conn.exec_driver_sql("INSERT INTO held VALUES (1, 0)")

        await threads.deferToThread(schema)

    async def freeze(self, application_name: str = f"{APPLICATION_NAME} node-b") -> Frozen:
        frozen = await threads.deferToThread(Frozen, self.url, application_name)
        self.addCleanup(frozen.close)
        return frozen

    def wait_for_row(self) -> defer.Deferred[None]:
        """Another node's write of the row the frozen session holds (on a thread: it
        blocks until the lock goes)."""
        def update() -> None:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE held SET n = n + 1 WHERE id = 1")

        return threads.deferToThread(update)

    def end_stuck(self, silent: float) -> defer.Deferred[list[Any]]:
        def run() -> list[Any]:
            with self.engine.begin() as conn:
                return thd_end_stuck_sessions(conn, silent)

        return threads.deferToThread(run)

    def state_of(self, pid: int) -> defer.Deferred[tuple[Any, ...] | None]:
        def run() -> tuple[Any, ...] | None:
            with self.engine.begin() as conn:
                row = conn.exec_driver_sql(
                    "SELECT state, wait_event_type, application_name FROM pg_stat_activity"
                    f" WHERE pid = {int(pid)}").first()
                return None if row is None else tuple(row)

        return threads.deferToThread(run)

    async def test_a_session_stopped_mid_statement_outlives_the_idle_timeout_until_ended(
            self) -> None:
        frozen = await self.freeze()
        waiting = self.wait_for_row()
        await sleep(2.5)  # its idle_in_transaction_session_timeout is 1 s
        self.assertFalse(waiting.called, "the idle timeout ended it: the test proves nothing")
        self.assertEqual(await self.state_of(frozen.pid),
                         ("active", "Client", f"{APPLICATION_NAME} node-b"))
        [ended] = await self.end_stuck(1.0)
        self.assertEqual((ended.pid, ended.application_name, ended.blocked, ended.ended),
                         (frozen.pid, f"{APPLICATION_NAME} node-b", 1, True))
        self.assertGreaterEqual(ended.silent, 2.0)
        await waiting  # the lock went with the session
        self.assertIsNone(await self.state_of(frozen.pid))

    async def test_sessions_left_alone(self) -> None:
        """Not ours (an operator's psql), ours and silent for less than the limit, ours and
        blocking nobody: none is ended."""
        other = await self.freeze("psql")
        waiting = self.wait_for_row()
        await sleep(1.5)
        self.assertEqual(await self.end_stuck(1.0), [])
        other.close()
        await waiting
        ours = await self.freeze()
        waiting = self.wait_for_row()
        await sleep(1.5)
        self.assertEqual(await self.end_stuck(3600.0), [])
        self.assertFalse(waiting.called)
        ours.close()
        await waiting
        alone = await self.freeze()
        await sleep(1.5)
        self.assertEqual(await self.end_stuck(1.0), [])
        self.assertIsNotNone(await self.state_of(alone.pid))

    async def test_the_reaper_ends_them_from_the_read_lane(self) -> None:
        """The daemon's service, on a store whose shared pool is busy waiting for the lock."""
        db = await open_database_at(self, self.url, max_threads=1)
        await self.freeze()
        waiting = self.wait_for_row()
        clock = Clock()
        reaper = StuckSessionReaper(db, clock, silent=1.0)
        blocked = db.run("blocked", lambda conn: conn.exec_driver_sql(
            "UPDATE held SET n = n + 1 WHERE id = 1").rowcount)
        await sleep(1.5)
        reaper.startService()
        self.addCleanup(reaper.stopService)
        self.assertEqual(await blocked, 1)
        await waiting

    async def test_the_daemon_names_its_sessions(self) -> None:
        def name() -> str:
            with self.engine.begin() as conn:
                return str(conn.exec_driver_sql(
                    "SELECT current_setting('application_name')").scalar_one())

        self.assertEqual(await threads.deferToThread(name), f"{APPLICATION_NAME} node-a")

"""The test harness itself: free ports, binaries, server processes, the PostgreSQL helper."""

from __future__ import annotations

import os
import signal
import sys
import unittest
from unittest import mock

from sqlalchemy import create_engine, text
from twisted.internet import threads
from twisted.trial.unittest import FailTest, TestCase

from tests.support import pg, servers

_IGNORES_SIGTERM = (
    "import signal\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "signal.pause()\n"
)


class FreePortTests(TestCase):
    def test_free_port_is_bindable(self) -> None:
        """free_port hands out a port nothing listens on, so a server can bind it."""
        import socket

        port = servers.free_port()
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        self.assertGreater(port, 1023)

    def test_free_ports_are_different_ones(self) -> None:
        """One server's several listeners never get the same port twice."""
        for _ in range(20):
            ports = servers.free_ports(4)
            self.assertEqual(len(set(ports)), 4, ports)


class RequireBinaryTests(TestCase):
    def test_present_binary_returns_path(self) -> None:
        path = servers.require_binary("sh", "dash")
        self.assertTrue(os.access(path, os.X_OK))

    def test_missing_binary_skips_with_package_name(self) -> None:
        with mock.patch.dict(os.environ, {"CI": ""}):
            with self.assertRaises(unittest.SkipTest) as caught:
                servers.require_binary("no-such-binary-mc", "mc-package")
        self.assertIn("apt-get install mc-package", str(caught.exception))

    def test_missing_binary_fails_under_ci(self) -> None:
        with mock.patch.dict(os.environ, {"CI": "true"}):
            with self.assertRaises(FailTest) as caught:
                servers.require_binary("no-such-binary-mc", "mc-package")
        self.assertIn("no-such-binary-mc", str(caught.exception))

    def test_tempdir_is_traversable(self) -> None:
        path = servers.tempdir_for(self)
        self.assertEqual(path.stat().st_mode & 0o777, 0o755)


class ServerProcessTests(TestCase):
    async def test_start_wait_and_stop(self) -> None:
        """A real server: its port opens, SIGTERM stops it, the PID is reaped."""
        port = servers.free_port()
        server = await servers.start_server(
            self,
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
            port=port,
            name="http",
        )
        self.assertTrue(await servers.port_open(port))
        status = await server.stop()
        self.assertEqual(status, -signal.SIGTERM)
        self.assertFalse(server.running())
        self.assertFalse(await servers.port_open(port))
        with self.assertRaises(ChildProcessError):  # already reaped: no zombie left
            os.waitpid(server.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)

    async def test_stop_escalates_to_sigkill(self) -> None:
        server = servers.ServerProcess(
            [sys.executable, "-c", _IGNORES_SIGTERM], directory=servers.tempdir_for(self)
        ).start()
        self.addCleanup(server.stop)
        while "ready" not in server.log():
            await servers.sleep(0.02)
        status = await server.stop(grace=0.2)
        self.assertEqual(status, -signal.SIGKILL)

    async def test_wait_for_port_reports_early_exit_with_log(self) -> None:
        server = servers.ServerProcess(
            [sys.executable, "-c", "import sys; sys.exit('boom: bad config')"],
            directory=servers.tempdir_for(self),
            name="broken",
        ).start()
        self.addCleanup(server.stop)
        with self.assertRaises(RuntimeError) as caught:
            await server.wait_for_port(servers.free_port(), timeout=5)
        self.assertIn("boom: bad config", str(caught.exception))


class PostgresHelperTests(TestCase):
    async def test_fresh_database_per_call(self) -> None:
        """Each call gives a new empty database on a server that answers SQL."""
        first = await pg.create_test_database(self)
        second = await pg.create_test_database(self)
        self.assertNotEqual(first, second)
        self.assertTrue(first.startswith("postgresql+psycopg://"))

        def check(url: str) -> tuple[str, int]:
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    name = conn.execute(text("SELECT current_database()")).scalar_one()
                    tables = conn.execute(
                        text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                    ).scalar_one()
                    return str(name), int(tables)
            finally:
                engine.dispose()

        name, tables = await threads.deferToThread(check, first)
        self.assertEqual(first.rsplit("/", 1)[1], name)
        self.assertEqual(tables, 0)

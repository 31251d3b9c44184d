"""The real daemon: `twistd -n mailcore` as a subprocess on free ports in a temp data dir.

It generates its TLS pair, migrates before it listens, stops cleanly on SIGTERM (exit 0 in
a few seconds), does the same on PostgreSQL, and serves `/api/v1/ping` to a key the CLI made.
A mistake at start-up (in the file, a listener, the data directory, a port in use, a second
daemon on the same data directory) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import sqlite3
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import threads
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailcore.startup import TABLES
from mailcore.store.engine import make_engine
from mailcore.store.migrate import current_revision, head_revision
from tests.support.cli import cli_command
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import (
    ServerProcess,
    free_port,
    free_ports,
    port_open,
    require_binary,
    run_command,
    sleep,
    tempdir_for,
)

REPO = Path(__file__).resolve().parent.parent
# twistd without relying on $PATH or on where the venv put its scripts.
TWISTD = (
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
)


def _env(with_repo: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    # twistd logs to stdout, a file here: unbuffered, or the last lines are lost when it
    # re-raises SIGTERM on itself after shutting down.
    env["PYTHONUNBUFFERED"] = "1"
    if with_repo:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _revision_blocking(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


class DaemonTestCase(TestCase):
    def setUp(self) -> None:
        self.base = tempdir_for(self, "mailcore-daemon-")
        self.data_dir = self.base / "var"
        self.http_port, self.smtp_port = free_ports(2)

    async def start_daemon(
        self, *extra: str, twistd_options: Sequence[str] = ()
    ) -> ServerProcess:
        """twistd -n mailcore on this test's ports; waits until HTTP and SMTP listen.
        `extra` go to mailcore, `twistd_options` to twistd (before the plugin name)."""
        daemon = ServerProcess(
            [
                *TWISTD, "-n", "--pidfile=", *twistd_options, "mailcore",
                "--data-dir", str(self.data_dir),
                "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
                "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1",
                *extra,
            ],
            directory=self.base,
            name="twistd",
            env=_env(),
            grace=10.0,
            dump_signal=signal.SIGUSR2,  # a daemon that does not stop shows where it hangs
        ).start()
        self.addCleanup(daemon.stop)
        await daemon.wait_for_port(self.http_port, timeout=30)
        await daemon.wait_for_port(self.smtp_port, timeout=10)
        await self.wait_until_serving()
        return daemon

    async def wait_until_serving(self) -> None:
        """Wait for an HTTP answer: the reactor runs and has its signal handlers.

        twistd opens the listeners before the reactor starts, so an open port alone does
        not mean SIGTERM would be handled yet (it would kill the process outright).
        """
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        response = await http.get(f"http://127.0.0.1:{self.http_port}/")
        await treq.content(response)
        await pool.closeCachedConnections()

    async def stop_cleanly(self, daemon: ServerProcess) -> None:
        """SIGTERM: the daemon closes its listeners and the store, and exits within seconds.

        After a clean shutdown twistd re-raises the signal on itself (app._exitWithSignal),
        so the status is "killed by SIGTERM", which service managers count as success; an
        exit status of 0 is accepted too. The log lines are what show the shutdown was clean.
        """
        reactor = get_reactor()
        started = reactor.seconds()
        status = await daemon.stop(grace=10.0)
        elapsed = reactor.seconds() - started
        self.assertIn(status, (0, -signal.SIGTERM), daemon.log())
        self.assertLess(elapsed, 8.0, daemon.log())
        log = daemon.stdout_path.read_text()
        self.assertIn("Received SIGTERM", log)
        self.assertIn("Main loop terminated", log)
        self.assertIn("Server Shut Down", log)
        self.assertNotIn("Traceback", log)
        self.assertFalse(await port_open(self.http_port))
        self.assertFalse(await port_open(self.smtp_port))
        # The store was closed: SQLite checkpoints and removes its WAL when the last
        # connection closes; a daemon that just died would leave it behind.
        self.assertFalse((self.data_dir / "mailcore.sqlite-wal").exists())

    async def assertDumpsStacks(self, daemon: ServerProcess) -> None:
        """`kill -USR2`: every thread's stack on stderr (the reactor's, in twistd's run
        loop), and the daemon carries on serving."""
        os.kill(daemon.pid, signal.SIGUSR2)
        deadline = get_reactor().seconds() + 10
        # The reactor's stack, not "Current thread": the kernel hands a process's signal to
        # any of its threads, and one Python does not know (a C library's) is no thread's
        # "current" in the dump, though every thread is in it.
        while "twisted/application/app.py" not in daemon.stderr_path.read_text():
            self.assertLess(get_reactor().seconds(), deadline, daemon.log())
            await sleep(0.05)
        dump = daemon.stderr_path.read_text()
        self.assertIn("twisted/application/app.py", dump)
        self.assertTrue(daemon.running())
        await self.wait_until_serving()

    def assertMigratedBeforeListening(self, daemon: ServerProcess) -> None:
        """The store was built (migrated) before the first listener opened."""
        log = daemon.stdout_path.read_text()
        building = log.find("mailcore starting:")
        listening = log.find(f"starting on {self.http_port}")
        self.assertNotEqual(building, -1, log)
        self.assertNotEqual(listening, -1, log)
        self.assertLess(building, listening, log)


class DaemonLifecycleTests(DaemonTestCase):
    async def test_starts_with_self_signed_certificate_and_stops_on_sigterm(self) -> None:
        daemon = await self.start_daemon()
        cert, key = self.data_dir / "tls" / "cert.pem", self.data_dir / "tls" / "key.pem"
        self.assertTrue(cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----"))
        self.assertEqual(key.stat().st_mode & 0o077, 0)
        self.assertIn("generated a self-signed", daemon.stdout_path.read_text())
        self.assertMigratedBeforeListening(daemon)
        url = f"sqlite:///{self.data_dir / 'mailcore.sqlite'}"
        self.assertEqual(await threads.deferToThread(_revision_blocking, url), head_revision())
        await self.assertDumpsStacks(daemon)
        await self.stop_cleanly(daemon)

        # Second start: the pair exists, nothing is generated again.
        before = cert.read_bytes()
        again = await self.start_daemon()
        self.assertNotIn("generated a self-signed", again.stdout_path.read_text())
        self.assertEqual(cert.read_bytes(), before)
        await self.stop_cleanly(again)

    async def test_log_file_data_dir_database_and_wal_are_private(self) -> None:
        """Under the usual login umask 022 (which `twistd -n` keeps) the daemon still makes
        its data dir 0700 and every file 0600, twistd's log file included."""
        previous = os.umask(0o022)  # the child inherits it
        self.addCleanup(os.umask, previous)
        logfile = self.base / "twistd.log"
        daemon = await self.start_daemon(twistd_options=("--logfile", str(logfile)))
        self.assertPrivate(logfile)
        await daemon.stop(grace=10.0)

    def assertPrivate(self, logfile: Path) -> None:
        """The data dir is 0700; the log file and every file in the data dir 0600."""
        database = self.data_dir / "mailcore.sqlite"
        wal, shm = Path(f"{database}-wal"), Path(f"{database}-shm")
        self.assertTrue(wal.exists(), "the running daemon's database has a WAL")
        self.assertEqual(stat.S_IMODE(self.data_dir.stat().st_mode), 0o700)
        made = [p for p in self.data_dir.rglob("*") if p.is_file()]
        for path in (database, wal, shm, self.data_dir / "tls" / "key.pem"):
            self.assertIn(path, made)
        for path in [logfile, *made]:
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)
        self.assertIn("mailcore starting", logfile.read_text())

    async def test_runs_on_postgresql(self) -> None:
        url = await create_test_database(self)
        daemon = await self.start_daemon("--db", url)
        self.assertMigratedBeforeListening(daemon)
        self.assertEqual(await threads.deferToThread(_revision_blocking, url), head_revision())
        self.assertFalse((self.data_dir / "mailcore.sqlite").exists())
        await self.stop_cleanly(daemon)

    async def test_bad_option_exits_with_usage_error(self) -> None:
        result = await run_command(
            [*TWISTD, "-n", "--pidfile=", "mailcore", "--tls-cert", "/nonexistent.pem"],
            env=_env(), cwd=self.base,
        )
        self.assertNotEqual(result.status, 0)
        self.assertIn("--tls-cert and --tls-key go together", result.out + result.err)

    async def test_plugin_is_found_from_any_directory(self) -> None:
        """The installed project (pip install -e .) exposes the twistd plugin everywhere."""
        result = await run_command([*TWISTD, "--help"], env=_env(with_repo=False), cwd=self.base)
        self.assertEqual(result.status, 0, result.err)
        self.assertRegex(result.out, r"\n\s+mailcore\s+Mail gateway")


# A process under load: three threads in deep recursion and one starting and ending threads,
# so frames are pushed and popped all the time, and the main thread busy as a reactor is.
_BUSY_PROCESS = """
import threading
from mailcore.service import enable_stack_dumps

enable_stack_dumps()

def deep(n):
    return 0 if n == 0 else deep(n - 1) + 1

def churn():
    while True:
        deep(200)

def spawn():
    while True:
        thread = threading.Thread(target=deep, args=(50,))
        thread.start()
        thread.join()

for _ in range(3):
    threading.Thread(target=churn, daemon=True).start()
threading.Thread(target=spawn, daemon=True).start()
print("ready", flush=True)
while True:
    deep(100)
"""


class StackDumpTests(TestCase):
    async def test_dumps_of_a_busy_process_never_kill_it(self) -> None:
        """`kill -USR2` again and again while other threads run Python: every dump is
        whole, the main thread's included, and the process lives on. (faulthandler's own
        C-level handler read the frames of running threads and died of SIGSEGV within a
        few signals here.)"""
        process = ServerProcess(
            [sys.executable, "-c", _BUSY_PROCESS], name="busy", env=_env(), grace=2.0
        ).start()
        self.addCleanup(process.stop)
        reactor = get_reactor()
        deadline = reactor.seconds() + 30
        while "ready" not in process.stdout_path.read_text():
            self.assertTrue(process.running(), process.log())
            self.assertLess(reactor.seconds(), deadline, process.log())
            await sleep(0.02)
        for dumps in range(1, 31):
            os.kill(process.pid, signal.SIGUSR2)
            while process.stderr_path.read_text().count("Current thread") < dumps:
                self.assertTrue(process.running(), f"died after {dumps - 1} dumps: {process.log()}")
                self.assertLess(reactor.seconds(), deadline, process.log())
                await sleep(0.01)
        self.assertTrue(process.running(), process.log())
        dump = process.stderr_path.read_text()
        self.assertIn("in churn", dump)
        self.assertIn('File "<string>"', dump)


class DaemonRunDirTests(DaemonTestCase):
    async def test_a_relative_data_dir_is_the_one_where_it_was_started(self) -> None:
        """twistd changes to its --rundir after makeService: the services still use the
        data directory the store was made in, named relative to where twistd started."""
        elsewhere = self.base / "elsewhere"
        elsewhere.mkdir()
        daemon = ServerProcess(
            [*TWISTD, "-n", "--pidfile=", f"--rundir={elsewhere}", "mailcore",
             "--data-dir", "var",
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
             "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1"],
            directory=self.base, name="twistd", env=_env(), grace=10.0,
        ).start()
        self.addCleanup(daemon.stop)
        await daemon.wait_for_port(self.http_port, timeout=30)
        await self.wait_until_serving()
        await sleep(1)  # the Mail API's file sweep runs at start
        self.assertTrue((self.data_dir / "mailcore.sqlite").exists())
        self.assertEqual(list(elsewhere.iterdir()), [])
        log = daemon.stdout_path.read_text()
        self.assertNotIn("Traceback", log)
        self.assertIn(f"mailcore starting: data {self.data_dir}", log)
        await self.stop_cleanly(daemon)


class DaemonServesApiTests(DaemonTestCase):
    async def test_ping_with_a_key_made_by_the_cli(self) -> None:
        cli = ("--data-dir", str(self.data_dir))
        made = await cli_command(
            *cli, "user", "add", "alice", "--email", "alice@example.test", "--password", "pw",
            env=_env(), cwd=self.base,
        )
        self.assertEqual(made.status, 0, made.err)
        key = await cli_command(*cli, "apikey", "create", "alice", env=_env(), cwd=self.base)
        self.assertEqual(key.status, 0, key.err)
        api_key = key.out.strip()

        daemon = await self.start_daemon()
        pool = HTTPConnectionPool(get_reactor(), persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        url = f"http://127.0.0.1:{self.http_port}/api/v1/ping"

        headers: dict[bytes | str, bytes | str] = {"Api-Key": api_key}
        response = await http.get(url, headers=headers)
        body: Any = json.loads(await treq.content(response))
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body.get("msg"), "pong")
        self.assertIs(body.get("success"), True)
        self.assertTrue(body.get("request_id"))

        response = await http.get(url)
        body = json.loads(await treq.content(response))
        self.assertEqual(response.code, 401, body)
        self.assertIs(body.get("success"), False)

        headers = {"Api-Key": "0" * 40}
        response = await http.get(url, headers=headers)
        self.assertEqual(response.code, 401)
        await treq.content(response)

        # The key was used: `apikey list` now shows when.
        listing = await cli_command(*cli, "apikey", "list", "alice", env=_env(), cwd=self.base)
        row = listing.out.splitlines()[1].split()
        self.assertEqual(len(row), 7, listing.out)  # prefix, label, created, last used, revoked
        self.assertEqual(row[-1], "no")
        await pool.closeCachedConnections()
        await self.stop_cleanly(daemon)


class DaemonInBackgroundTests(DaemonTestCase):
    """`twistd mailcore` without `-n`: twistd forks into the background after
    `makeService` built (and migrated) the store."""

    async def start_in_background(self) -> int:
        """Start the daemon in the background; returns its pid (stopped at cleanup)."""
        pidfile = self.base / "twistd.pid"
        started = await run_command(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={self.base / 'twistd.log'}",
             "mailcore", "--data-dir", str(self.data_dir),
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
             "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1"],
            env=_env(), cwd=self.base,
        )
        self.assertEqual(started.status, 0, started.err)
        pid = int(pidfile.read_text())
        self.addCleanup(self.stop_background, pid)
        await self.wait_until_serving()
        return pid

    async def stop_background(self, pid: int) -> None:
        os.kill(pid, signal.SIGTERM)
        reactor = get_reactor()
        deadline = reactor.seconds() + 10
        while reactor.seconds() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    async def test_serves_a_domain_the_cli_adds_while_it_runs(self) -> None:
        """No connection to SQLite crosses the fork: one made by the parent (for the
        migrations) kept a snapshot in the child, which then never saw what the CLI
        wrote (a domain added meanwhile was refused, 550 5.7.1 Relaying denied)."""
        await self.start_in_background()
        cli = ("--data-dir", str(self.data_dir))
        for command in (
            ["user", "add", "alice", "--email", "alice@example.test", "--password", "pw"],
            ["domain", "add", "late.test", "--owner", "alice", "--redirect-to",
             "mx.late.invalid"],
        ):
            done = await cli_command(*cli, *command, env=_env(), cwd=self.base)
            self.assertEqual(done.status, 0, done.err)

        def rcpt() -> int:
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as s:
                s.ehlo("client.test")
                s.mail("a@example.net")
                code, _ = s.rcpt("bob@late.test")
                return int(code)

        reactor = get_reactor()
        deadline = reactor.seconds() + 10  # [domains] poll_interval is 0.5 s
        while (code := await threads.deferToThread(rcpt)) != 250:
            if reactor.seconds() > deadline:
                log = (self.base / "twistd.log").read_text()
                self.fail(f"RCPT to the new domain still answered {code}\n{log[-3000:]}")
            await sleep(0.25)


class DaemonStartupMistakesTests(DaemonTestCase):
    """A mistake found at start-up is one line on stderr, `mailcore: …`, and exit status 1:
    no traceback, on stderr or in the log."""

    log = ""  # what the last refused daemon logged

    def write_config(self, text: str) -> Path:
        path = self.base / "mailcore.toml"
        path.write_text(text, encoding="utf-8")
        return path

    async def refused(self, *extra: str, config: str | None = None,
                      under: Sequence[str] = ()) -> str:
        """Start the daemon as `start_daemon` would (run by the command `under`, if any);
        it must refuse. Its one stderr line (what it logged, on stdout, is in `self.log`)."""
        argv = [
            *under, *TWISTD, "-n", "--pidfile=", "mailcore",
            "--data-dir", str(self.data_dir),
            "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
            "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1",
        ]
        if config is not None:
            argv += ["--config", str(self.write_config(config))]
        result = await run_command([*argv, *extra], env=_env(), cwd=self.base, timeout=30)
        self.assertEqual(result.status, 1, result.out + result.err)
        self.assertNotIn("Traceback", result.out + result.err)
        self.assertEqual(result.err.count("\n"), 1, result.err)
        self.assertFalse(await port_open(self.http_port))
        self.log = result.out
        return result.err.rstrip("\n")

    async def assertRefusedBeforeWriting(self, config: str, message: str) -> None:
        """The mistake in the file is refused before the data directory is even made."""
        self.assertEqual(await self.refused(config=config), f"mailcore: {message}")
        self.assertFalse(self.data_dir.exists())

    async def test_unknown_table(self) -> None:
        await self.assertRefusedBeforeWriting(
            "[smpt]\nmax_recipients = 5\n",
            f"unknown table [smpt] (tables: {', '.join(sorted(TABLES))})",
        )

    async def test_unknown_keys_in_tables_that_took_anything(self) -> None:
        for table in ("smtp", "domains", "protecmail"):
            await self.assertRefusedBeforeWriting(
                f"[{table}]\ncolour = 'red'\n", f"[{table}] unknown key: colour"
            )

    async def test_wrong_type(self) -> None:
        await self.assertRefusedBeforeWriting(
            "[queue]\nmin_backoff = 'soon'\n", "[queue] min_backoff must be of type float"
        )

    async def test_negative_sync_interval(self) -> None:
        await self.assertRefusedBeforeWriting(
            "[fetch]\nsync_interval = -5\n", "[fetch] sync_interval must be a positive number"
        )

    async def test_mistake_in_the_file_itself(self) -> None:
        await self.assertRefusedBeforeWriting("data_dri = 'x'\n", "unknown config key: data_dri")

    async def test_bad_listener_strings(self) -> None:
        self.assertEqual(
            await self.refused("--smtp", "tcp:notaport"),
            "mailcore: SMTP listener 'tcp:notaport': 'notaport' is not a number",
        )
        self.assertEqual(
            await self.refused("--http", "bogus:1"),
            "mailcore: HTTP listener 'bogus:1': unknown endpoint type 'bogus' "
            "(an endpoint is written like tcp:8080:interface=127.0.0.1)",
        )
        self.assertFalse(self.data_dir.exists())

    async def test_a_unix_socket_in_a_missing_directory(self) -> None:
        """Twisted makes the socket's lock file while the listeners open: in a directory that
        is not there, that was a FileNotFoundError traceback out of twistd."""
        missing = self.base / "missing"
        line = await self.refused("--smtp", f"unix:{missing}/smtp.sock")
        self.assertEqual(line, f"mailcore: SMTP listener 'unix:{missing}/smtp.sock': "
                               f"no such directory: {missing}")
        self.assertFalse(self.data_dir.exists())

    async def test_unusable_data_dir(self) -> None:
        self.data_dir.write_text("a file where the data directory should be")
        self.assertEqual(
            await self.refused(), f"mailcore: data directory {self.data_dir}: not a directory"
        )

    async def test_unusable_files_dir(self) -> None:
        """The daemon made the files directories while it built its services: one that
        could not be made was an OSError traceback out of twistd."""
        files = self.base / "files"
        files.write_text("a file where the files directory should be")
        self.assertEqual(
            await self.refused("--files-dir", str(files)),
            f"mailcore: files directory (--files-dir) {files}: not a directory",
        )

    async def test_unreachable_database(self) -> None:
        port = free_port()  # nothing listens there
        line = await self.refused("--db", f"postgresql+psycopg://mc:secret@127.0.0.1:{port}/mc")
        self.assertTrue(line.startswith(
            f"mailcore: cannot open the database postgresql+psycopg://mc:***@127.0.0.1:{port}/mc: "
            "connection failed"), line)
        self.assertNotIn("secret", line)

    async def test_a_database_that_takes_no_writes(self) -> None:
        """A store already at head is migrated without a write: a read-only one (here a
        SQLite file opened read-only; a read-only mount or file, a PostgreSQL standby) let
        the daemon start and answer, every write failing after (a 451 for every message)."""
        result = await cli_command("--data-dir", str(self.data_dir), "user", "list",
                                   env=_env(), cwd=self.base)
        self.assertEqual(result.status, 0, result.err)
        path = self.data_dir / "mailcore.sqlite"
        line = await self.refused("--db", f"sqlite:///file:{path}?mode=ro&uri=true")
        self.assertTrue(line.startswith("mailcore: cannot write to the database sqlite:"), line)
        self.assertTrue(line.endswith(": attempt to write a readonly database"), line)

    async def test_a_database_another_process_is_migrating(self) -> None:
        """Its lock held (the admin CLI migrating a new store) was `cannot open the database
        …: database is locked`, nothing said of why or by whom."""
        self.data_dir.mkdir()
        path = self.data_dir / "mailcore.sqlite"
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("CREATE TABLE being_migrated (x INTEGER)")
        line = await self.refused()
        prefix = (f"mailcore: cannot open the database sqlite:///{path}: database is locked: "
                  f"another process holds its lock (pid {os.getpid()} (")
        self.assertTrue(line.startswith(prefix), line)
        self.assertTrue(line.endswith(")); start again once it is done"), line)

    async def test_a_database_server_that_never_answers(self) -> None:
        """A server that takes the TCP connection and says nothing (hung, stopped): the
        start hung for ever with nothing said. Now libpq's connect_timeout ends it.

        The URL names a short connect_timeout so the test does not wait out the daemon's
        10 s default (twice: 20 s); that the default is given to every connection the URL
        names none for is tests.test_store_engine's."""
        mute = socket.socket()
        self.addCleanup(mute.close)
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # never accepted: the kernel completes the handshake, no one answers
        port = mute.getsockname()[1]
        url = f"postgresql+psycopg://mc@127.0.0.1:{port}/mc?connect_timeout=2"
        line = await self.refused("--db", url)
        self.assertTrue(line.startswith(f"mailcore: cannot open the database {url}: "), line)
        self.assertIn("timeout", line)

    async def test_port_in_use(self) -> None:
        port = get_reactor().listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        busy = port.getHost().port
        message = f"mailcore: cannot listen on 127.0.0.1:{busy}: address already in use"
        self.assertEqual(await self.refused("--smtp", f"tcp:{busy}:interface=127.0.0.1"), message)
        # The daemon had started logging: the log says it too (for a --logfile).
        self.assertIn(f"[mailcore.service#critical] {message}\n", self.log)

    async def test_a_logfile_in_a_missing_directory(self) -> None:
        """twistd opens its --logfile after makeService: in a missing directory that was
        its FileNotFoundError traceback, after the data directory and database were made."""
        for where, why in ((self.base / "nowhere" / "mailcore.log", "no such directory"),
                           (self.base / "a-file" / "mailcore.log", "not a directory")):
            (self.base / "a-file").write_text("not a directory")
            argv = [*TWISTD, "--logfile", str(where), "--pidfile=", "mailcore",
                    "--data-dir", str(self.data_dir),
                    "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
                    "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1"]
            result = await run_command(argv, env=_env(), cwd=self.base, timeout=30)
            self.assertEqual(result.status, 1, result.out + result.err)
            self.assertEqual(result.out + result.err,
                             f"mailcore: --logfile {where}: {why}: {where.parent}\n")
            self.assertFalse(self.data_dir.exists())

    async def test_a_unix_listeners_lock_file_that_cannot_be_made(self) -> None:
        """An OSError of a unix: listener's lock file was `cannot listen: file name too
        long: 12054`, the pid it links to named as the file; a lock held by a running
        process, and a socket path in use, named the path as `*:b'/…'`."""
        name = "x" * 250  # the socket's name fits, its lock file's ("….sock.lock") does not
        socket_path = self.base / f"{name}.sock"
        self.assertEqual(
            await self.refused("--smtp", f"unix:{socket_path}"),
            f"mailcore: cannot make a listener's file {socket_path}.lock: file name too long")
        held = self.base / "held.sock"
        os.symlink("1", f"{held}.lock")  # pid 1 runs
        self.assertEqual(
            await self.refused("--smtp", f"unix:{held}"),
            f"mailcore: cannot listen on {held}: its lock file {held}.lock is held by another "
            "process (pid 1)")
        taken = self.base / "taken.sock"
        taken.mkdir()
        self.assertEqual(await self.refused("--smtp", f"unix:{taken}"),
                         f"mailcore: cannot listen on {taken}: address already in use")

    async def test_a_unix_listeners_lock_file_held_by_another_users_process(self) -> None:
        """A daemon not run as root may not signal another user's process: Twisted's check
        of the pid a lock file links to raised EPERM, an OSError naming no file, and the
        line was `a listener cannot start: operation not permitted`. The daemon runs here
        as root of a user namespace of its own (no capability outside it, as a daemon of
        its own user), the lock file linking to a process of nobody's."""
        unshare = require_binary("unshare", "util-linux")
        under = [unshare, "--user", "--map-root-user"]
        probe = await run_command([*under, "/bin/true"], env=_env())
        if probe.status != 0:
            raise SkipTest(f"no user namespace here: {probe.err.strip()}")
        other = ServerProcess(["/bin/sleep", "600"], user="nobody",
                              directory=tempdir_for(self, "mailcore-other-"))
        other.start()
        self.addCleanup(other.stop)
        for option in ("--smtp", "--http"):
            held = self.base / f"held-{option[2:]}.sock"
            os.symlink(str(other.pid), f"{held}.lock")
            self.assertEqual(
                await self.refused(option, f"unix:{held}", under=under),
                f"mailcore: cannot listen on {held}: its lock file {held}.lock is held by a "
                f"process of another user (pid {other.pid})")

    async def test_a_lost_password_key_is_refused(self) -> None:
        """A missing fetch.key was made anew without a word: every webhook delivery was then
        given up and every sync failed, one by one."""
        for args in (["user", "add", "alice", "--email", "alice@example.test", "--password",
                      "pw"], ["webhook", "add", "alice", "https://hooks.example.test/in"]):
            result = await cli_command("--data-dir", str(self.data_dir), *args, env=_env(),
                                       cwd=self.base)
            self.assertEqual(result.status, 0, result.err)
        key = self.data_dir / "fetch.key"
        key.unlink()
        self.assertEqual(
            await self.refused(),
            f"mailcore: {key} is missing, but the database holds secrets encrypted with it "
            f"(remote mailbox passwords, webhook secrets): restore that file (or set [fetch] "
            f"secret_key to its key); if it is lost for good, `mailcore secrets forget` gives "
            f"up those secrets so that the daemon starts")
        self.assertFalse(key.exists())

    async def test_second_daemon_on_the_same_data_dir(self) -> None:
        first = await self.start_daemon()
        ports = (self.http_port, self.smtp_port)
        self.http_port, self.smtp_port = free_ports(2)
        self.assertEqual(
            await self.refused(),
            f"mailcore: data directory {self.data_dir} is in use by another mailcore daemon "
            f"(pid {first.pid})",
        )
        # The first one was not disturbed, and its data directory is free once it stopped.
        self.assertTrue(await port_open(ports[0]))
        self.http_port, self.smtp_port = ports
        await self.stop_cleanly(first)
        self.http_port, self.smtp_port = free_ports(2)
        second = await self.start_daemon()
        await self.stop_cleanly(second)

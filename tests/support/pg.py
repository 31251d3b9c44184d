"""A throwaway PostgreSQL for the tests: one cluster per test process, a database per test.

`await create_test_database(test)` returns a `postgresql+psycopg://` URL of a fresh, empty
database. The first call starts the cluster: `initdb` and `postgres` (as user postgres when
we are root) in a 0755 temp dir, listening on 127.0.0.1 at a free port, with its socket in
that dir. It is stopped by PID when the process exits. If `MAILCORE_TEST_PG_URL` names a
server (any database on it; the user must be allowed to CREATE DATABASE), that server is
used instead and each test's database is dropped when the test ends.

Without PostgreSQL binaries the test is skipped with the reason (failed under CI=true).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from twisted.internet import defer, task, threads
from twisted.trial.unittest import TestCase

from tests.support.reactor import get_reactor
from tests.support.servers import ServerProcess, find_binary, free_port, missing, tempdir

ENV_URL = "MAILCORE_TEST_PG_URL"
_SUPERUSER = "postgres"
_counter = itertools.count(1)
_lock = defer.DeferredLock()
_cluster: PostgresCluster | None = None


class PostgresCluster:
    """A private PostgreSQL cluster in a temp dir, owned by this process."""

    def __init__(self, initdb: str) -> None:
        self.bindir = Path(os.path.realpath(initdb)).parent
        self.base = tempdir("mailcore-pg-")
        self.data = self.base / "data"
        self.sockets = self.base / "run"
        self.port = free_port()
        self.user = _SUPERUSER if os.geteuid() == 0 else None
        self.server: ServerProcess | None = None

    @property
    def url(self) -> URL:
        """The URL of the `postgres` maintenance database, as the superuser."""
        return URL.create(
            "postgresql+psycopg",
            username=_SUPERUSER,
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    def initdb_blocking(self) -> None:
        """Create the data directory. Blocks ~1 s: call from a thread."""
        for d in (self.data, self.sockets):
            d.mkdir(mode=0o700)
            if self.user is not None:
                shutil.chown(d, self.user, self.user)
        extra: dict[str, Any] = {}
        if self.user is not None:
            extra = {"user": self.user, "group": self.user, "extra_groups": []}
        result = subprocess.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", _SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
                "--no-instructions",
            ],
            cwd=self.base,
            env=_env(),
            capture_output=True,
            check=False,
            **extra,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
            )

    def start(self) -> None:
        """Spawn postgres (on the reactor thread, which outlives it)."""
        self.server = ServerProcess(
            [
                str(self.bindir / "postgres"), "-D", str(self.data),
                "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.sockets),
                "-c", "max_connections=100", "-c", "shared_buffers=32MB",
            ],
            directory=self.base,
            name="postgres",
            env=_env(),
            user=self.user,
            stop_signal=signal.SIGINT,  # "fast" shutdown: SIGTERM would wait for clients
            grace=10.0,
        ).start()

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until the server accepts SQL (it listens before recovery has finished)."""
        assert self.server is not None
        await self.server.wait_for_port(self.port, timeout)
        reactor = get_reactor()
        deadline = reactor.seconds() + timeout
        while True:
            try:
                await threads.deferToThread(_execute_blocking, self.url, "SELECT 1")
                return
            except Exception:
                if reactor.seconds() > deadline or not self.server.running():
                    raise RuntimeError(
                        f"postgres did not become ready\n{self.server.log()}"
                    ) from None
            await task.deferLater(reactor, 0.1, lambda: None)

    def stop_blocking(self) -> None:
        """Stop the server by PID, reap it, remove the cluster's files."""
        if self.server is not None:
            self.server.stop_blocking()
        shutil.rmtree(self.base, ignore_errors=True)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def _execute_blocking(url: URL, *statements: str) -> None:
    """Run statements in autocommit (CREATE/DROP DATABASE refuse transactions). Blocks."""
    import psycopg

    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def _find_initdb() -> str:
    """initdb's path, with postgres beside it; else skip (fail under CI)."""
    initdb = find_binary("initdb")
    if initdb is None or not (Path(os.path.realpath(initdb)).parent / "postgres").exists():
        raise missing("PostgreSQL not found (initdb, postgres): apt-get install postgresql")
    return initdb


async def _server_url() -> tuple[URL, bool]:
    """The maintenance URL to create databases with, and whether the server is external."""
    external = os.environ.get(ENV_URL)
    if external:
        return make_url(external).set(drivername="postgresql+psycopg"), True
    global _cluster
    await _lock.acquire()
    try:
        if _cluster is None:
            cluster = PostgresCluster(_find_initdb())
            try:
                await threads.deferToThread(cluster.initdb_blocking)
                cluster.start()
                atexit.register(cluster.stop_blocking)
                await cluster.wait_ready()
            except BaseException:
                cluster.stop_blocking()
                raise
            _cluster = cluster
        return _cluster.url, False
    finally:
        _lock.release()


async def create_test_database(test: TestCase, *, template: str | None = None) -> str:
    """A fresh empty database for `test`, as a `postgresql+psycopg://` URL string; with
    `template`, a copy of that database of the server (`create_template_database`)."""
    server, external = await _server_url()
    name = f"mc_test_{os.getpid()}_{next(_counter)}"
    copy = f' TEMPLATE "{template}"' if template is not None else ""
    await threads.deferToThread(_execute_blocking, server, f'CREATE DATABASE "{name}"{copy}')
    if external:
        test.addCleanup(
            threads.deferToThread, _execute_blocking, server,
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        )
    return server.set(database=name).render_as_string(hide_password=False)


async def create_template_database(number: int = 0, *, template: str | None = None) -> str:
    """A fresh empty database (with `template`, a copy of that one) that lives as long as
    this process (dropped at exit on an external server), as a URL string: for a template
    that `create_test_database` copies. Whoever fills it must close every connection to it
    before it is copied. `number` tells this process's templates apart."""
    server, external = await _server_url()
    name = f"mc_template_{os.getpid()}_{number}"
    copy = f' TEMPLATE "{template}"' if template is not None else ""
    await threads.deferToThread(_execute_blocking, server, f'CREATE DATABASE "{name}"{copy}')
    if external:
        atexit.register(_execute_blocking, server,
                        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return server.set(database=name).render_as_string(hide_password=False)


def pause_cluster(paused: bool) -> list[int]:
    """Freeze this process's cluster (SIGSTOP to its postmaster, then to every backend and
    auxiliary process it has forked), as a hung server is: connections stay open, the
    kernel still acknowledges TCP, no statement ends. Or (`paused` False) let it go on
    (SIGCONT, backends first). Returns the PIDs signalled; skips the test on an external
    server (MAILCORE_TEST_PG_URL), which is not ours to stop."""
    if os.environ.get(ENV_URL) or _cluster is None or _cluster.server is None:
        raise missing("no private PostgreSQL cluster of this process to freeze")
    postmaster = _cluster.server.pid
    if paused:
        os.kill(postmaster, signal.SIGSTOP)  # first: it forks no new backend meanwhile
        pids = [postmaster, *_children(postmaster)]
    else:
        pids = [*_children(postmaster), postmaster]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)
        except ProcessLookupError:
            pass  # a backend that had just ended
    return pids


def _children(parent: int) -> list[int]:
    """The PIDs whose parent is `parent` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            found.append(int(entry.name))
    return found


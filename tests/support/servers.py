"""Real servers for integration tests: free ports, temp dirs, processes stopped by PID.

A test finds its binary with `require_binary` (skip with the reason when it is missing, or
fail when CI=true), makes a directory with `tempdir`, picks ports with `free_port`, starts
the server with `ServerProcess(...).start()`, and `await server.wait_for_port(port)`.
`await server.stop()` (or `start_server`, which registers it as a cleanup) sends the stop
signal to the PID, escalates to SIGKILL after a grace period, and always reaps the child.

Every server also gets the parent-death signal: if the test process dies, so do its servers.
`run_command` runs a short-lived command (a CLI, doveadm, sigtool) to completion without
blocking the reactor; `sleep` waits on the reactor (never `time.sleep` in tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, TestCase

from tests.support.reactor import get_reactor

# Directories searched after $PATH: daemons live in sbin, PostgreSQL's tools in its own bin.
_EXTRA_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_VERSIONED_DIRS = ("/usr/lib/postgresql/*/bin",)

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def in_ci() -> bool:
    """Whether missing servers are failures (CI=true) rather than skips."""
    return os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now (for one
    server's several listeners: asked one at a time, the kernel may hand out a port it just
    gave back, and the server then finds the same port twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                   for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def find_binary(name: str) -> str | None:
    """The path of executable `name`: $PATH, then sbin, then PostgreSQL's versioned bin."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    for pattern in _VERSIONED_DIRS:
        dirs = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        for directory in dirs:
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def _version_key(path: str) -> tuple[int, ...]:
    parts = [p for p in Path(path).parts if p.isdigit()]
    return tuple(int(p) for p in parts)


def missing(reason: str) -> Exception:
    """The exception for an absent prerequisite: SkipTest, or a test failure under CI."""
    if in_ci():
        return FailTest(f"{reason} (CI=true: missing servers are failures; run `make deps`)")
    return unittest.SkipTest(reason)


def require_binary(name: str, apt_package: str) -> str:
    """The path of `name`; skips the test (fails it under CI=true) when it is not installed."""
    path = find_binary(name)
    if path is None:
        raise missing(f"{name} not found: apt-get install {apt_package}")
    return path


def tempdir(prefix: str = "mailcore-test-") -> Path:
    """A fresh temp dir that other users (dovecot, postgres, nobody) can traverse (0755).

    The caller removes it (`shutil.rmtree`), typically with `addCleanup`.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def tempdir_for(test: TestCase, prefix: str = "mailcore-test-") -> Path:
    """A `tempdir()` removed when `test` ends."""
    path = tempdir(prefix)
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _death_signal(sig: int) -> Callable[[], None]:
    """A preexec_fn asking the kernel to send `sig` to the child when we (its parent) die."""

    def set_pdeathsig() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(sig))

    return set_pdeathsig


class _Probe(Protocol):
    """Connects, then hangs up at once; `closed` fires when the socket is gone."""

    def __init__(self) -> None:
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class ServerProcess:
    """One server process started in a directory, its output captured to files there.

    `argv[0]` should be an absolute path (from `require_binary`). With `user`, the process
    runs as that user (we are root in CI). `stop_signal` asks the server to stop (SIGTERM,
    or SIGINT for PostgreSQL's fast shutdown); it is also sent if the test process dies.
    `dump_signal`, when given, is sent to a server that has not stopped within its grace,
    a second before SIGKILL, so its log shows where it hung (mailcore: SIGUSR2).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        directory: Path | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        grace: float = 5.0,
        dump_signal: int | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.directory = directory if directory is not None else tempdir(f"{self.name}-")
        self.env = dict(env) if env is not None else None
        self.user = user
        self.stop_signal = stop_signal
        self.grace = grace
        self.dump_signal = dump_signal
        self.stdout_path = self.directory / f"{self.name}.stdout.log"
        self.stderr_path = self.directory / f"{self.name}.stderr.log"
        self._popen: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Spawn the process (on the calling thread, which must outlive it). Returns self."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        extra: dict[str, Any] = {}
        if self.user is not None and os.geteuid() == 0:
            extra = {"user": self.user, "group": _primary_group(self.user), "extra_groups": []}
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._popen = subprocess.Popen(
                self.argv,
                cwd=self.directory,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                preexec_fn=_death_signal(self.stop_signal),
                **extra,
            )
        return self

    @property
    def pid(self) -> int:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else None."""
        return None if self._popen is None else self._popen.poll()

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def log(self, limit: int = 4000) -> str:
        """The tail of what the process wrote to stdout and stderr, for failure messages."""
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {path.name}\n{text[-limit:]}")
        return "\n".join(parts) or "(no output)"

    # -- readiness ------------------------------------------------------------------------

    async def wait_for_port(
        self, port: int, timeout: float = 15.0, host: str = "127.0.0.1"  # noqa: ASYNC109
    ) -> None:
        """Wait (on the reactor, without blocking) until `host:port` accepts a connection.

        Raises RuntimeError with the server's log if it exits or the time runs out.
        """
        reactor = get_reactor()
        deadline = reactor.seconds() + timeout
        while True:
            if not self.running():
                raise RuntimeError(
                    f"{self.name} exited with {self.returncode} before listening on "
                    f"{host}:{port}\n{self.log()}"
                )
            if await port_open(port, host):
                return
            if reactor.seconds() > deadline:
                raise RuntimeError(
                    f"{self.name} did not listen on {host}:{port} within {timeout}s\n{self.log()}"
                )
            await sleep(0.05)

    # -- stopping -------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> int | None:
        """Send the stop signal, SIGKILL after `grace` seconds; reap. Returns the status."""
        if self._popen is None:
            return None
        reactor = get_reactor()
        grace = self.grace if grace is None else grace
        if self._popen.poll() is None:
            self._signal(self.stop_signal)
            deadline = reactor.seconds() + grace
            while self._popen.poll() is None and reactor.seconds() < deadline:
                await sleep(0.02)
            if self._popen.poll() is None and self.dump_signal is not None:
                self._signal(self.dump_signal)
                await sleep(1.0)
            if self._popen.poll() is None:
                self._signal(signal.SIGKILL)
                while self._popen.poll() is None:
                    await sleep(0.02)
        return self._popen.returncode

    def stop_blocking(self, grace: float | None = None) -> int | None:
        """Like `stop`, blocking; for atexit handlers where no reactor runs any more."""
        if self._popen is None:
            return None
        grace = self.grace if grace is None else grace
        if self._popen.poll() is None:
            self._signal(self.stop_signal)
            try:
                self._popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._popen.wait()
        return self._popen.returncode

    def _signal(self, sig: int) -> None:
        assert self._popen is not None
        try:
            os.kill(self._popen.pid, sig)
        except ProcessLookupError:
            pass


async def sleep(seconds: float) -> None:
    """Let the reactor run for `seconds` (integration tests only; never time.sleep)."""
    await task.deferLater(get_reactor(), seconds, lambda: None)


async def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to host:port succeeds now (closed again before returning)."""
    reactor = get_reactor()
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=2)
    try:
        factory: Any = Factory.forProtocol(_Probe)
        probe: _Probe = cast(_Probe, await endpoint.connect(factory))
    except ConnectError:
        return False
    await probe.closed
    return True


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did."""

    status: int | None  # exit status; None when killed by a signal
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[tuple[int | None, int | None]] = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.stdin:
            transport.write(self.stdin)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        self.done.callback((value.exitCode, value.signal))


async def run_command(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 (Twisted, not asyncio: no asyncio.timeout)
) -> CommandResult:
    """Run a command to completion on the reactor (no blocking): its status and output.

    `argv[0]` must be a path. `env` defaults to ours. Killed (SIGKILL) after `timeout`.
    """
    reactor = get_reactor()
    protocol = _Collect(stdin)
    process = reactor.spawnProcess(
        protocol, argv[0], [str(a) for a in argv],
        env=dict(os.environ if env is None else env),
        path=None if cwd is None else str(cwd),
    )

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except Exception:  # noqa: S110 (already gone)
            pass

    killer = reactor.callLater(timeout, kill)
    try:
        status, sig = await protocol.done
    finally:
        if killer.active():
            killer.cancel()
    return CommandResult(status, sig, b"".join(protocol.out), b"".join(protocol.err))


async def start_server(
    test: TestCase,
    argv: Sequence[str],
    *,
    port: int | None = None,
    timeout: float = 15.0,  # noqa: ASYNC109 (Twisted, not asyncio: no asyncio.timeout)
    **kwargs: Any,
) -> ServerProcess:
    """Start a server for one test, wait for `port`, and stop it when the test ends."""
    server = ServerProcess(argv, **kwargs)
    if "directory" not in kwargs:
        test.addCleanup(shutil.rmtree, server.directory, True)
    server.start()
    test.addCleanup(server.stop)
    if port is not None:
        await server.wait_for_port(port, timeout)
    return server



async def start_smtp_sink(test: TestCase) -> tuple[Path, int]:
    """Postfix's smtp-sink on a free port, writing every message it takes to a dump file,
    for one test (stopped when it ends); returns the dump's path (made at the first
    message) and the port."""
    binary = require_binary("smtp-sink", "postfix")
    directory = tempdir_for(test)
    directory.chmod(0o777)
    dump = directory / "dump"
    port = free_port()
    await start_server(test, [binary, "-u", "nobody", "-D", str(dump), f"127.0.0.1:{port}",
                              "100"], port=port, directory=directory)
    return dump, port

def _primary_group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid

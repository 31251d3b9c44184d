"""The benchmarks' server processes: free ports, tools, environment, waiting, stopping, the
CPU time of a process, the temp dir at the end, and `twistd -n mailcore` on a temp data dir.

Not a benchmark itself: the bench/*.py scripts import it as a sibling (they run as
`python bench/X.py`, which puts bench/ on sys.path). Plain subprocesses and blocking sockets:
the benchmark drivers measure a daemon from outside and run no reactor of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once something accepts on 127.0.0.1:`port`; exit if `proc` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode}): {proc.args!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s: {proc.args!r}")


def terminate(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM `proc` if it still runs; SIGKILL it when it has not exited after `grace` s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def need(name: str, package: str) -> str:
    """The path of tool `name` ($PATH, then /usr/sbin and /usr/bin), else exit naming its
    apt package."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise SystemExit(f"{name} not found: apt-get install {package}")


def env() -> dict[str, str]:
    """Our environment, with the repository first on PYTHONPATH (for twistd and the CLI)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, timeout: float = 3600.0) -> float:
    """Wait until the daemon `pid` is idle (under 10 % of a CPU over 2 s, twice in a row):
    on a new store its background work (the backup indexer's first pass over every message
    a sync stored) would otherwise run into the leg measured next. Returns the seconds
    waited."""
    started = time.monotonic()
    quiet = 0
    while quiet < 2 and time.monotonic() - started < timeout:
        before = cpu_seconds(pid)
        time.sleep(2)
        busy = (cpu_seconds(pid) - before) / 2
        quiet = quiet + 1 if busy < 0.1 else 0
        if not quiet and int(time.monotonic() - started) % 60 < 2:
            print(f"  waiting for the daemon to settle ({busy:.0%} CPU) ...", flush=True)
    return time.monotonic() - started


class StealMeter:
    """The share of the machine's CPU time that the hypervisor gave to others (the steal
    column of /proc/stat) from its making to `share()`: on a VM whose neighbours are busy,
    a leg that ran with much of it was slowed by them, not by the code measured."""

    def __init__(self) -> None:
        self.total, self.stolen = self._times()

    @staticmethod
    def _times() -> tuple[int, int]:
        # The first line: cpu user nice system idle iowait irq softirq steal (clock ticks).
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(values), values[7]

    def share(self) -> float:
        total, stolen = self._times()
        return (stolen - self.stolen) / max(1, total - self.total)


def keep_or_remove(directory: Path, keep: bool) -> None:
    """At the end of a run: say where `directory` is kept (--keep), else remove it."""
    if keep:
        print(f"kept {directory}")
    else:
        shutil.rmtree(directory, True)


class MailcoreDaemon:
    """`twistd -n mailcore` on `directory`/data with `config` (TOML text) written to
    `directory`/mailcore.toml, HTTP and SMTP on free ports of 127.0.0.1 (HTTP with
    `backlog` when given); the CLI on the same data dir and config; JSON calls to its API."""

    def __init__(self, directory: Path, config: str, backlog: int | None = None) -> None:
        self.dir = directory
        self.data = directory / "data"
        self.http = free_port()
        self.smtp = free_port()
        self.backlog = backlog
        self.config = directory / "mailcore.toml"
        self.config.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{self.http}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the daemon; return once it listens (within `timeout` s: it migrates the
        store first, which on a cached store of a benchmark may take minutes)."""
        http = f"tcp:{self.http}:interface=127.0.0.1"
        if self.backlog is not None:
            http += f":backlog={self.backlog}"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "-l",
             str(self.dir / "twistd.log"), "mailcore", "--data-dir", str(self.data), "-c",
             str(self.config), "--http", http,
             "--smtp", f"tcp:{self.smtp}:interface=127.0.0.1"],
            env=env(), cwd=self.dir, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            stderr=(self.dir / "twistd.err").open("ab"),
        )
        wait_port(self.http, self.proc, timeout=timeout)

    def stop(self) -> None:
        terminate(self.proc, grace=30)

    def cli(self, *args: str) -> str:
        """`python -m mailcore.cli ARGS` on the daemon's data dir; its stdout, else exit."""
        result = subprocess.run(
            [sys.executable, "-m", "mailcore.cli", "--data-dir", str(self.data), "-c",
             str(self.config), *args], env=env(), capture_output=True, check=False,
            cwd=self.dir,
        )
        if result.returncode != 0:
            raise SystemExit(f"mailcore {' '.join(args)}: {result.stderr.decode()}")
        return result.stdout.decode()

    def request(self, method: str, path: str, body: dict[str, Any] | None,
                headers: dict[str, str], timeout: float) -> tuple[int, Any]:
        """(status, decoded JSON) of one call to the daemon's HTTP API."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (our own http://127.0.0.1 base)
            self.base + path, data=data, method=method
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for name, value in headers.items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

"""The benchmarks' server processes: free ports, tools, environment, waiting, stopping.

Not a benchmark itself: bench/run.py and bench/fetch.py import it as a sibling (they run as
`python bench/X.py`, which puts bench/ on sys.path). Plain subprocesses and blocking sockets:
the benchmark drivers measure a daemon from outside and run no reactor of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

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

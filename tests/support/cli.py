"""The `mailcore` admin command run as a real subprocess, for tests of the CLI.

`CliTestCase` gives each test a temp base directory (the command's cwd) holding a data
directory, runs `python -m mailcore.cli` there without blocking the reactor, and checks the
two outcomes every command has: success (exit 0, nothing on stderr) or a mistake (exit 1,
nothing on stdout, one `mailcore: …` line on stderr and no traceback).

A command is a process of its own, started by `cli_command`: a child the test process's CLI
zygote forks (tests/support/cli_zygote.py, started at the first command, with the CLI's
modules imported once), reached through a stdlib-only client process that takes the
command's place (tests/support/cli_client.py). The command runs as `python -m mailcore.cli`
would, in its own process with its own stdio, cwd, umask and environment, and ends with the
same status; what it no longer does is import ~1,000 modules again (some 1.2 s of CPU each
time, over 250 commands in the suite). There is a zygote per environment commands are given
(what the interpreter reads at its start, PYTHONUNBUFFERED say, is then as the command's).
With MAILCORE_TEST_ZYGOTE=0 in it, a command is started as `python -m mailcore.cli` itself
(to rule the zygote out when a CLI test fails). One difference stays: the children of one
zygote share its hash seed, so the order of a set of strings is the same in every command of
a test process, where each `python -m` run had its own: a test that passes only in one
order may be steady within a run and flaky across runs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support.servers import CommandResult, run_command, tempdir, tempdir_for

REPO = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent


def cli_env() -> dict[str, str]:
    """Our environment with the repository importable and MAILCORE_DEBUG off (so that an
    unexpected error is still one line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MAILCORE_DEBUG", None)
    return env


# This test process's zygotes (each its process and socket), one per environment the
# commands were given, started by the first command in it.
MAX_ZYGOTES = 4
_zygotes: dict[frozenset[tuple[str, str]], tuple[subprocess.Popen[bytes], str]] = {}


def _zygote_socket(env: Mapping[str, str]) -> str | None:
    """The socket of the running zygote started with `env` (started now if there is none),
    or None when MAILCORE_TEST_ZYGOTE is 0 there."""
    if env.get("MAILCORE_TEST_ZYGOTE") == "0":
        return None
    key = frozenset(env.items())
    if key in _zygotes and _zygotes[key][0].poll() is None:
        return _zygotes[key][1]
    if len(_zygotes) >= MAX_ZYGOTES:  # environments made anew for each command
        return None
    directory = tempdir("mailcore-cli-zygote-")
    atexit.register(shutil.rmtree, directory, True)
    path = str(directory / "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    with open(directory / "zygote.log", "wb") as log:
        process = subprocess.Popen(  # a fork and exec; the zygote imports on its own time
            [sys.executable, str(HERE / "cli_zygote.py"), str(listener.fileno())],
            pass_fds=[listener.fileno()], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=log, env=dict(env), cwd=directory,
        )
    listener.close()
    atexit.register(_end_zygote, process)
    _zygotes[key] = (process, path)
    return path


def _end_zygote(process: subprocess.Popen[bytes]) -> None:
    """EOF on the zygote's stdin ends it; waited for, so that it is not left behind."""
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


async def cli_command(
    *args: str, stdin: bytes = b"", env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None, timeout: float = 60.0,  # noqa: ASYNC109 (as run_command)
) -> CommandResult:
    """`python -m mailcore.cli ARGS` in `env` (by default `cli_env()`) and `cwd`, run to its
    end (killed after `timeout` seconds): its status and output."""
    env = cli_env() if env is None else env
    path = _zygote_socket(env)
    argv = ([sys.executable, str(HERE / "cli_client.py"), path] if path is not None
            else [sys.executable, "-m", "mailcore.cli"])
    return await run_command([*argv, *args], stdin=stdin, env=env, cwd=cwd, timeout=timeout)


class CliTestCase(TestCase):
    """`self.base` (a temp dir, the CLI's cwd) and `self.data_dir` (base/var, not created)."""

    tempdir_prefix = "mailcore-cli-"
    # Many CLI runs in a row, each a process of ~1.5 s of CPU (the CLI builds the whole Core):
    # a loaded 2-core machine passed trial's default 120 s in a test of 16 runs.
    timeout = 300

    def setUp(self) -> None:
        self.base = tempdir_for(self, self.tempdir_prefix)
        self.data_dir = self.base / "var"

    async def run_cli(self, *args: str, stdin: bytes = b"") -> CommandResult:
        """`python -m mailcore.cli ARGS` with no implicit data dir (cwd: the temp base)."""
        return await cli_command(*args, stdin=stdin, cwd=self.base)

    async def mc(self, *args: str, stdin: bytes = b"") -> CommandResult:
        """The CLI on this test's data directory."""
        return await self.run_cli("--data-dir", str(self.data_dir), *args, stdin=stdin)

    async def ok(self, *args: str, stdin: bytes = b"") -> str:
        """Run a command that must succeed quietly on stderr; its stdout."""
        result = await self.mc(*args, stdin=stdin)
        self.assertEqual(
            (result.status, result.err), (0, ""), f"mailcore {' '.join(args)}: {result.err}"
        )
        return result.out

    async def refused(self, *args: str, fragment: str, stdin: bytes = b"") -> None:
        """Run a command that must fail as a mistake whose line names `fragment`."""
        self.assertOneLineError(await self.mc(*args, stdin=stdin), fragment, context=args)

    def assertOneLineError(
        self, result: CommandResult, *fragments: str, context: object = ""
    ) -> None:
        """Exit 1, nothing on stdout, one `mailcore: ...` line on stderr with the fragments."""
        why = f"{context}: {result.out!r} {result.err!r}"
        self.assertEqual(result.status, 1, why)
        self.assertNotIn("Traceback", result.err, why)
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, why)
        self.assertTrue(lines[0].startswith("mailcore: "), why)
        for fragment in fragments:
            self.assertIn(fragment, lines[0], why)
        self.assertEqual(result.out, "", why)

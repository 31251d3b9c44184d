"""The `mailcore` admin command run as a real subprocess, for tests of the CLI.

`CliTestCase` gives each test a temp base directory (the command's cwd) holding a data
directory, runs `python -m mailcore.cli` there without blocking the reactor, and checks the
two outcomes every command has: success (exit 0, nothing on stderr) or a mistake (exit 1,
nothing on stdout, one `mailcore: …` line on stderr and no traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support.servers import CommandResult, run_command, tempdir_for

REPO = Path(__file__).resolve().parent.parent.parent


def cli_env() -> dict[str, str]:
    """Our environment with the repository importable and MAILCORE_DEBUG off (so that an
    unexpected error is still one line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("MAILCORE_DEBUG", None)
    return env


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
        return await run_command(
            [sys.executable, "-m", "mailcore.cli", *args], stdin=stdin, env=cli_env(),
            cwd=self.base,
        )

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

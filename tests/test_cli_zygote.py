"""The test suite's CLI zygote (tests/support/cli_zygote.py): a command run through it
(tests.support.cli.cli_command) ends as `python -m mailcore.cli` would, on its stderr too."""

from __future__ import annotations

import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.support.cli import cli_command, cli_env
from tests.support.servers import run_command, tempdir_for


class ZygoteStderrTests(TestCase):
    async def test_what_the_imports_write_on_stderr_is_the_commands(self) -> None:
        """A warning the CLI's imports print (PYTHONWARNINGS=default shows the
        DeprecationWarning of twisted.mail.pop3client) was printed in the zygote, on its
        log, once: a command through it had nothing on stderr where `python -m
        mailcore.cli` had the warning, so a test of "nothing on stderr" passed where the
        real command does not."""
        env = {**cli_env(), "PYTHONWARNINGS": "default"}
        base = tempdir_for(self, "mailcore-cli-zygote-")
        args = ("--data-dir", str(base / "var"), "user", "list")
        direct = await run_command([sys.executable, "-m", "mailcore.cli", *args], env=env,
                                   cwd=base)
        if "Warning" not in direct.err:
            raise SkipTest("no import of the CLI prints a warning now: nothing to compare")
        zygote = await cli_command(*args, env=env, cwd=base)
        self.assertEqual((zygote.status, zygote.out, zygote.err),
                         (direct.status, direct.out, direct.err))


"""The admin CLI checks every table of the config file as the daemon does, before it touches
the data directory: a mistake is one line on stderr and exit status 1."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.startup import TABLES
from tests.support.cli import cli_command
from tests.support.servers import CommandResult, tempdir_for

REPO = Path(__file__).resolve().parent.parent


class CliConfigTests(TestCase):
    def setUp(self) -> None:
        self.base = tempdir_for(self, "mailcore-cli-config-")
        self.data_dir = self.base / "var"

    def config_file(self, text: str) -> Path:
        path = Path(self.mktemp()).resolve()
        path.write_text(text, encoding="utf-8")
        return path

    async def mailcore(self, config: str, *args: str) -> CommandResult:
        path = self.config_file(config)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("MAILCORE_DEBUG", None)
        return await cli_command("--config", str(path), "--data-dir", str(self.data_dir),
                                 *args, env=env, cwd=self.base)

    async def test_a_bad_table_is_one_line_before_anything_is_written(self) -> None:
        cases = [
            ("[smtp]\ncolour = 'red'\n", "[smtp] unknown key: colour"),
            # Tables the CLI itself never uses are checked too.
            ("[web]\nmetrics = 'yes'\n", "[web] metrics must be true or false"),
            ("[smpt]\nmax_recipients = 5\n",
             f"unknown table [smpt] (tables: {', '.join(sorted(TABLES))})"),
            ("[fetch]\nsync_interval = -5\n", "[fetch] sync_interval must be a positive number"),
        ]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.mailcore(config, "user", "list"))
             for config, _ in cases]
        )
        for (config, message), result in zip(cases, results, strict=True):
            self.assertEqual(
                (result.status, result.out, result.err), (1, "", f"mailcore: {message}\n"),
                config,
            )
        self.assertFalse(self.data_dir.exists())

    async def test_an_empty_data_dir_is_one_line_before_anything_is_written(self) -> None:
        """`data_dir = ""` made the current directory the data directory: `user list` made
        mailcore.sqlite there."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("MAILCORE_DEBUG", None)
        path = self.config_file('data_dir = ""\n')
        for args, message in (
            (["--config", str(path)], "config key data_dir is empty: name a directory"),
            (["--data-dir", ""], "--data-dir is empty: name a directory"),
        ):
            result = await cli_command(*args, "user", "list", env=env, cwd=self.base)
            self.assertEqual((result.status, result.out, result.err),
                             (1, "", f"mailcore: {message}\n"), args)
        self.assertEqual(sorted(p.name for p in self.base.iterdir()), [])

    async def test_a_good_file_is_used(self) -> None:
        result = await self.mailcore("[smtp]\nmax_recipients = 5\n", "user", "list")
        self.assertEqual((result.status, result.err), (0, ""))
        self.assertTrue((self.data_dir / "mailcore.sqlite").exists())

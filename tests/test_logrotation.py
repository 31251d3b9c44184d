"""The `[log]` table bounds twistd's rotating log file: how large it grows, how many rotated
files stay (mailcore.logrotation, applied by LogLimiterService)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, Any, cast

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile
from twisted.trial.unittest import TestCase

from mailcore.config import ConfigError
from mailcore.logfilter import LogLimiterService
from mailcore.logrotation import LogSettings


class SettingsTests(TestCase):
    def test_defaults_bound_the_log_to_about_110_mb(self) -> None:
        settings = LogSettings.from_config({})
        self.assertEqual((settings.rotate_length, settings.keep), (10_000_000, 10))

    def test_values_are_read(self) -> None:
        settings = LogSettings.from_config({"rotate_length": 5_000_000, "keep": 0})
        self.assertEqual((settings.rotate_length, settings.keep), (5_000_000, 0))

    def test_bad_values_name_the_key(self) -> None:
        for section, message in (
            ({"size": 1}, "[log] unknown key: size"),
            ({"keep": -1}, "[log] keep must not be negative"),
            ({"keep": True}, "[log] keep must be an integer"),
            ({"keep": "10"}, "[log] keep must be an integer"),
            ({"rotate_length": 0}, "[log] rotate_length must be a positive number of bytes"),
            ({"rotate_length": 1.5}, "[log] rotate_length must be an integer"),
        ):
            with self.assertRaises(ConfigError) as caught:
                LogSettings.from_config(section)
            self.assertEqual(str(caught.exception), message)


class RotationTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def run_service(self, settings: LogSettings, lines: int) -> LogFile:
        """The daemon's log service in front of a twistd-style log file in self.dir,
        `lines` distinct lines logged, one reactor turn each; the file, closed."""
        out = LogFile("twistd.log", str(self.dir))  # as twistd opens --logfile (an IO)
        publisher = LogPublisher(textFileLogObserver(cast(IO[Any], out)))
        clock = Clock()
        service = LogLimiterService(clock, publisher, rotation=settings)
        service.startService()
        log = Logger(namespace="mailcore.test", observer=publisher)
        for n in range(lines):
            log.info("line {n} {pad}", n=n, pad="x" * 80)
            clock.advance(0)
        service.stopService()
        out.close()
        return out

    def test_the_oldest_files_beyond_keep_are_deleted_those_of_earlier_runs_too(self) -> None:
        for n in range(1, 6):  # an earlier run's rotated files
            (self.dir / f"twistd.log.{n}").write_text(f"old {n}\n")
        out = self.run_service(LogSettings(rotate_length=2_000, keep=2), lines=200)
        self.assertEqual(self.names(), ["twistd.log", "twistd.log.1", "twistd.log.2"])
        for name in self.names():
            text = (self.dir / name).read_text()
            self.assertNotIn("old", text)
            # Lines are written whole, once per reactor turn: a file ends at most one
            # turn's lines past the bound.
            self.assertLessEqual(len(text), 2_000 + 200, name)
        self.assertEqual(out.rotateLength, 2_000)
        last = (self.dir / "twistd.log").read_text().splitlines()[-1]
        self.assertIn("line 199 ", last)

    def test_keep_zero_deletes_nothing(self) -> None:
        self.run_service(LogSettings(rotate_length=2_000, keep=0), lines=200)
        self.assertGreater(len(self.names()), 10)

    def test_without_settings_twistds_own_rotation_stands(self) -> None:
        out = LogFile("twistd.log", str(self.dir))
        publisher = LogPublisher(textFileLogObserver(cast(IO[Any], out)))
        service = LogLimiterService(Clock(), publisher)
        service.startService()
        service.stopService()
        out.close()
        self.assertEqual((out.rotateLength, out.maxRotatedFiles), (1_000_000, None))

    def test_stdout_is_no_rotating_file(self) -> None:
        self.assertFalse(LogSettings().apply(io.StringIO()))

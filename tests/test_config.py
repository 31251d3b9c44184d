"""Configuration: defaults, the TOML file, the command line over it, and one-line errors."""

from __future__ import annotations

from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailcore.config import (
    DEFAULT_HTTP,
    DEFAULT_SMTP,
    Config,
    ConfigError,
    DaemonOptions,
    config_from_toml,
    load_toml,
)


class ConfigTestCase(SynchronousTestCase):
    def write_toml(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def parse(self, *argv: str) -> Config:
        options = DaemonOptions()
        options.parseOptions(list(argv))
        config: Config = options.config
        return config

    def usage_error(self, *argv: str) -> str:
        """The UsageError message for argv, checked to be a single line."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message)
        return message


class DefaultTests(ConfigTestCase):
    def test_defaults(self) -> None:
        config = self.parse()
        self.assertEqual(config, Config())
        self.assertEqual(config.data_dir, Path("var"))
        self.assertEqual(config.smtp_endpoints, (DEFAULT_SMTP,))
        self.assertEqual(config.http_endpoints, (DEFAULT_HTTP,))
        self.assertEqual(DEFAULT_SMTP, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(DEFAULT_HTTP, "tcp:8080:interface=127.0.0.1")
        self.assertIsNone(config.tls_cert)
        self.assertIsNone(config.tls_key)
        self.assertEqual(config.hostname, "localhost")
        self.assertEqual(config.session_token_ttl, 3600)

    def test_database_defaults_to_sqlite_in_the_data_dir(self) -> None:
        config = self.parse("--data-dir", "/srv/mc")
        self.assertEqual(config.database_url, "sqlite:////srv/mc/mailcore.sqlite")

    def test_relative_data_dir_gives_an_absolute_sqlite_path(self) -> None:
        url = self.parse("--data-dir", "rel").database_url
        self.assertTrue(url.startswith("sqlite:////"), url)
        self.assertTrue(url.endswith("/rel/mailcore.sqlite"), url)

    def test_db_option_is_used_as_given(self) -> None:
        url = "postgresql+psycopg://mc:secret@127.0.0.1:5432/mailcore"
        self.assertEqual(self.parse("--db", url).database_url, url)

    def test_sections_default_to_empty(self) -> None:
        self.assertEqual(self.parse().section("smtp"), {})


class TomlTests(ConfigTestCase):
    def test_toml_file_sets_every_top_level_key(self) -> None:
        path = self.write_toml(
            """
data_dir = "/srv/mailcore"
db = "postgresql+psycopg://mc@127.0.0.1/mc"
smtp = ["tcp:25:interface=0.0.0.0", "tcp:587"]
http = "tcp:8081"
tls_cert = "/etc/mc/cert.pem"
tls_key = "/etc/mc/key.pem"
hostname = "mx.example.test"
http_max_body = 1024
session_token_ttl = 60

[queue]
max_attempts = 12
"""
        )
        config = self.parse("--config", str(path))
        self.assertEqual(config.data_dir, Path("/srv/mailcore"))
        self.assertEqual(config.database_url, "postgresql+psycopg://mc@127.0.0.1/mc")
        self.assertEqual(config.smtp_endpoints, ("tcp:25:interface=0.0.0.0", "tcp:587"))
        self.assertEqual(config.http_endpoints, ("tcp:8081",))
        self.assertEqual(config.tls_cert, Path("/etc/mc/cert.pem"))
        self.assertEqual(config.tls_key, Path("/etc/mc/key.pem"))
        self.assertEqual(config.hostname, "mx.example.test")
        self.assertEqual(config.http_max_body, 1024)
        self.assertEqual(config.session_token_ttl, 60)
        self.assertEqual(config.section("queue"), {"max_attempts": 12})

    def test_short_config_option(self) -> None:
        path = self.write_toml('hostname = "short.example.test"\n')
        self.assertEqual(self.parse("-c", str(path)).hostname, "short.example.test")

    def test_section_is_a_copy(self) -> None:
        config = config_from_toml({"queue": {"retries": 3}})
        config.section("queue")["retries"] = 99
        self.assertEqual(config.section("queue"), {"retries": 3})

    def test_command_line_wins_over_toml(self) -> None:
        path = self.write_toml(
            'data_dir = "/from/toml"\nhostname = "toml.example.test"\n'
            'smtp = ["tcp:25"]\nhttp = ["tcp:80"]\n'
        )
        config = self.parse(
            "--config", str(path), "--data-dir", "/from/cli", "--smtp", "tcp:2526",
        )
        self.assertEqual(config.data_dir, Path("/from/cli"))
        self.assertEqual(config.smtp_endpoints, ("tcp:2526",))
        # What the command line does not mention keeps the file's value.
        self.assertEqual(config.hostname, "toml.example.test")
        self.assertEqual(config.http_endpoints, ("tcp:80",))

    def test_cli_hostname_and_tls_win_over_toml(self) -> None:
        path = self.write_toml(
            'hostname = "toml.example.test"\ntls_cert = "/t/c.pem"\ntls_key = "/t/k.pem"\n'
        )
        config = self.parse(
            "--config", str(path), "--hostname", "cli.example.test",
            "--tls-cert", "/c/c.pem", "--tls-key", "/c/k.pem",
        )
        self.assertEqual(config.hostname, "cli.example.test")
        self.assertEqual((config.tls_cert, config.tls_key), (Path("/c/c.pem"), Path("/c/k.pem")))

    def test_repeatable_listeners(self) -> None:
        config = self.parse(
            "--smtp", "tcp:2525", "--smtp", "tcp:2526:interface=127.0.0.1",
            "--http", "tcp:8080", "--http", "unix:/tmp/mc.sock",
        )
        self.assertEqual(config.smtp_endpoints, ("tcp:2525", "tcp:2526:interface=127.0.0.1"))
        self.assertEqual(config.http_endpoints, ("tcp:8080", "unix:/tmp/mc.sock"))

    def test_options_do_not_share_listener_lists(self) -> None:
        self.parse("--smtp", "tcp:1")
        self.assertEqual(self.parse().smtp_endpoints, (DEFAULT_SMTP,))


class ErrorTests(ConfigTestCase):
    def test_bad_toml_is_one_line_usage_error(self) -> None:
        path = self.write_toml("data_dir = \n[broken\n")
        message = self.usage_error("--config", str(path))
        self.assertIn(str(path), message)

    def test_missing_config_file(self) -> None:
        message = self.usage_error("--config", "/nonexistent/mailcore.toml")
        self.assertEqual(message, "config file not found: /nonexistent/mailcore.toml")

    def test_unknown_key(self) -> None:
        path = self.write_toml('data_dri = "/typo"\n')
        self.assertEqual(self.usage_error("--config", str(path)), "unknown config key: data_dri")

    def test_wrong_type(self) -> None:
        path = self.write_toml('http_max_body = "big"\n')
        self.assertEqual(
            self.usage_error("--config", str(path)),
            "config key http_max_body must be of type int",
        )

    def test_boolean_is_not_an_integer(self) -> None:
        path = self.write_toml("session_token_ttl = true\n")
        self.assertIn("session_token_ttl", self.usage_error("--config", str(path)))

    def test_listener_list_of_non_strings(self) -> None:
        path = self.write_toml("smtp = [25, 587]\n")
        self.assertEqual(
            self.usage_error("--config", str(path)),
            "config key smtp must be a string or a list of strings",
        )

    def test_tls_cert_without_key_is_refused(self) -> None:
        self.assertIn("--tls-key", self.usage_error("--tls-cert", "/etc/cert.pem"))

    def test_tls_key_without_cert_is_refused(self) -> None:
        self.assertIn("--tls-cert", self.usage_error("--tls-key", "/etc/key.pem"))

    def test_unknown_option(self) -> None:
        with self.assertRaises(usage.UsageError):
            self.parse("--no-such-option")

    def test_load_toml_directory_is_config_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_toml(Path(self.mktemp()).parent)
        self.assertIn("cannot read config file", str(caught.exception))


class ListenTableTests(ConfigTestCase):
    def test_listeners_inside_their_tables_beside_other_settings(self) -> None:
        path = self.write_toml(
            '[smtp]\nlisten = ["tcp:2526"]\nmax_recipients = 50\n'
            '[web]\nlisten = "tcp:8081"\nlogin_rate = 0\n'
        )
        config = self.parse("--config", str(path))
        self.assertEqual(config.smtp_endpoints, ("tcp:2526",))
        self.assertEqual(config.http_endpoints, ("tcp:8081",))
        # `listen` is taken out; the service sees only its own settings.
        self.assertEqual(config.section("smtp"), {"max_recipients": 50})
        self.assertEqual(config.section("web"), {"login_rate": 0})

    def test_command_line_wins_over_listen_table(self) -> None:
        path = self.write_toml('[smtp]\nlisten = ["tcp:2526"]\n')
        config = self.parse("--config", str(path), "--smtp", "tcp:2527")
        self.assertEqual(config.smtp_endpoints, ("tcp:2527",))

    def test_http_listeners_given_twice_is_an_error(self) -> None:
        path = self.write_toml('http = ["tcp:80"]\n[web]\nlisten = ["tcp:81"]\n')
        self.assertIn("listeners given twice", self.usage_error("--config", str(path)))

    def test_listen_of_wrong_type(self) -> None:
        path = self.write_toml("[smtp]\nlisten = 25\n")
        self.assertIn("[smtp] listen", self.usage_error("--config", str(path)))

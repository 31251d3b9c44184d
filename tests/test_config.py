"""Configuration: defaults, the TOML file, the command line over it, and one-line errors
for every mistake: tables, keys, types, listeners, the data directory and its lock."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailcore.config import (
    DEFAULT_HTTP,
    DEFAULT_SMTP,
    Config,
    ConfigError,
    DaemonOptions,
    apply_overrides,
    check_positive,
    config_from_toml,
    is_positive_number,
    load_toml,
)
from mailcore.safedrop.model import SafedropSettings
from mailcore.startup import (
    LOCK_NAME,
    TABLES,
    DataDirLock,
    check_database_url,
    check_listeners,
    check_tables,
    check_tls_files,
    database_error,
    ensure_data_dir,
)
from mailcore.tls import generate_self_signed


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
        """The UsageError message for argv (a mistake in the options), one line."""
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*argv)
        return self.one_line(caught.exception)

    def config_error(self, *argv: str) -> str:
        """The ConfigError message for argv (a mistake in the file), one line."""
        with self.assertRaises(ConfigError) as caught:
            self.parse(*argv)
        return self.one_line(caught.exception)

    def one_line(self, error: Exception) -> str:
        message = str(error)
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

    def test_files_dir_defaults_to_the_data_dir_and_is_set_by_file_or_option(self) -> None:
        self.assertEqual(self.parse("--data-dir", "/d").files_root, Path("/d"))
        path = self.write_toml('data_dir = "/d"\nfiles_dir = "/from/toml"\n')
        self.assertEqual(self.parse("-c", str(path)).files_root, Path("/from/toml"))
        config = self.parse("-c", str(path), "--files-dir", "/mnt/shared")
        self.assertEqual((config.data_dir, config.files_root), (Path("/d"), Path("/mnt/shared")))
        relative = self.parse("--files-dir", "shared").absolute()
        self.assertEqual(relative.files_root, Path.cwd() / "shared")  # before twistd's chdir

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
    def test_bad_toml_is_one_line(self) -> None:
        path = self.write_toml("data_dir = \n[broken\n")
        message = self.config_error("--config", str(path))
        self.assertIn(str(path), message)

    def test_missing_config_file(self) -> None:
        message = self.config_error("--config", "/nonexistent/mailcore.toml")
        self.assertEqual(message, "config file not found: /nonexistent/mailcore.toml")

    def test_unknown_key(self) -> None:
        path = self.write_toml('data_dri = "/typo"\n')
        self.assertEqual(self.config_error("--config", str(path)), "unknown config key: data_dri")

    def test_wrong_type(self) -> None:
        path = self.write_toml('http_max_body = "big"\n')
        self.assertEqual(
            self.config_error("--config", str(path)),
            "config key http_max_body must be of type int",
        )

    def test_boolean_is_not_an_integer(self) -> None:
        path = self.write_toml("session_token_ttl = true\n")
        self.assertIn("session_token_ttl", self.config_error("--config", str(path)))

    def test_top_level_numbers_out_of_range(self) -> None:
        """A session TTL past datetime's range made every login fail with OverflowError; a
        negative one made every session expired; a body limit below 1 was taken as it was
        (found by an audit)."""
        for line, message in (
            ("session_token_ttl = 100000000000000",
             "config key session_token_ttl must be from 1 to 315360000, not 100000000000000"),
            ("session_token_ttl = -5", "config key session_token_ttl must be from 1 to "
                                       "315360000, not -5"),
            ("session_token_ttl = 0", "config key session_token_ttl must be from 1 to "
                                      "315360000, not 0"),
            ("http_max_body = -1",
             "config key http_max_body must be from 1 to 1099511627776, not -1"),
        ):
            path = self.write_toml(line + "\n")
            self.assertEqual(self.config_error("--config", str(path)), message)
        path = self.write_toml("session_token_ttl = 315360000\nhttp_max_body = 1\n")
        config = config_from_toml(load_toml(path))
        self.assertEqual((config.session_token_ttl, config.http_max_body), (315360000, 1))

    def test_listener_list_of_non_strings(self) -> None:
        path = self.write_toml("smtp = [25, 587]\n")
        self.assertEqual(
            self.config_error("--config", str(path)),
            "config key smtp must be a string or a list of strings",
        )

    def test_an_empty_path_or_database_url_is_refused(self) -> None:
        """`data_dir = ""` silently meant the current directory (Path("") is Path(".")):
        the store, keys and certificates went wherever the daemon was started; `db = ""`
        silently meant SQLite in the data directory. In the file and on the command line."""
        for key, hint in (
            ("data_dir", "name a directory"),
            ("files_dir", "name a directory, or leave it out for the data directory"),
            ("db", "give a database URL, or leave it out for SQLite in the data directory"),
            ("tls_cert", "name a PEM file"),
            ("tls_key", "name a PEM file"),
        ):
            for value in ('""', '"  "'):
                path = self.write_toml(f"{key} = {value}\n")
                self.assertEqual(self.config_error("--config", str(path)),
                                 f"config key {key} is empty: {hint}", value)
        for argv, message in (
            (("--data-dir", ""), "--data-dir is empty: name a directory"),
            (("--files-dir=",), "--files-dir is empty: name a directory, or leave it out for "
                                "the data directory"),
            (("--db", " "), "--db is empty: give a database URL, or leave it out for SQLite "
                            "in the data directory"),
            (("--tls-cert", " ", "--tls-key", " "), "--tls-cert is empty: name a PEM file"),
        ):
            self.assertEqual(self.config_error(*argv), message)

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
        self.assertIn("listeners given twice", self.config_error("--config", str(path)))

    def test_listen_of_wrong_type(self) -> None:
        path = self.write_toml("[smtp]\nlisten = 25\n")
        self.assertIn("[smtp] listen", self.config_error("--config", str(path)))


def reactor() -> MemoryReactorClock:
    return MemoryReactorClock()


class TableTests(SynchronousTestCase):
    """Every table is built by its reader before anything starts; mistakes are one line."""

    def error(self, data: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            check_tables(config_from_toml(data), reactor())
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_an_unknown_table_is_refused(self) -> None:
        self.assertEqual(
            self.error({"smpt": {"max_recipients": 5}}),
            f"unknown table [smpt] (tables: {', '.join(sorted(TABLES))})",
        )
        self.assertIn("smtp, store, tokens, web, webhooks", ", ".join(sorted(TABLES)))

    def test_every_table_read_anywhere_is_registered(self) -> None:
        """A table some code reads with `config.section(...)` but TABLES does not list
        would be refused at start-up: register its reader in mailcore/startup.py."""
        repo = Path(__file__).resolve().parent.parent
        read = {
            match.group(1)
            for package in ("mailcore", "web", "filters")
            for path in (repo / package).rglob("*.py")
            for match in re.finditer(r"\.section\(\s*\"(\w+)\"", path.read_text())
        }
        self.assertIn("smtp", read)
        self.assertEqual(read - set(TABLES), set())

    def test_an_unknown_key_is_refused_in_every_table(self) -> None:
        expected = {name: f"[{name}] unknown key: no_such_key" for name in TABLES}
        # [filters] words its own errors (filters/config.py); [plans] holds one table a plan.
        expected["filters"] = "unknown key filters.no_such_key"
        expected["plans"] = ("[plans] unknown plan 'no_such_key' "
                             "(plans: free, standard, agency)")
        for name in TABLES:
            self.assertEqual(self.error({name: {"no_such_key": 1}}), expected[name], name)

    def test_a_field_that_is_not_a_key_is_refused(self) -> None:
        """[smtp] hostname is a field of SMTPSettings, but set by the top-level hostname;
        [web] max_body and session_token_ttl are fields of WebSettings, set by the top-level
        http_max_body and session_token_ttl (refused as "unknown key in [web]: max_body",
        another wording than every other table's)."""
        self.assertEqual(self.error({"smtp": {"hostname": "mx"}}), "[smtp] unknown key: hostname")
        self.assertEqual(self.error({"web": {"max_body": 5}}), "[web] unknown key: max_body")
        self.assertEqual(self.error({"web": {"session_token_ttl": 5}}),
                         "[web] unknown key: session_token_ttl")

    def test_a_key_in_a_sub_table_is_checked(self) -> None:
        self.assertEqual(self.error({"plans": {"free": {"monthly_token": 5}}}),
                         "[plans.free] unknown key: monthly_token")
        self.assertEqual(self.error({"filters": {"builtin": {"gtub": True}}}),
                         "unknown key filters.builtin.gtub")

    def test_a_wrong_type_is_refused(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"smtp": {"max_recipients": "many"}},
             "[smtp] max_recipients must be a positive number"),
            ({"smtp": {"idle_timeout": True}}, "[smtp] idle_timeout must be a positive number"),
            ({"fetch": {"allow_private": "yes"}}, "[fetch] allow_private must be true or false"),
            ({"fetch": {"sync_interval": "900"}}, "[fetch] sync_interval must be of type float"),
            ({"web": {"metrics": "yes"}}, "[web] metrics must be true or false"),
        ]
        for data, message in cases:
            self.assertEqual(self.error(data), message, data)

    def test_a_negative_sync_interval_is_refused(self) -> None:
        self.assertEqual(self.error({"fetch": {"sync_interval": -5}}),
                         "[fetch] sync_interval must be a positive number")
        self.assertEqual(self.error({"fetch": {"tick": 0}}),
                         "[fetch] tick must be a positive number")

    def test_safedrop_max_recipients_and_max_files_are_bounded_whole_numbers(self) -> None:
        for key in ("max_recipients", "max_files", "max_concurrent_uploads"):
            for value in (0, -1, 100_001, 2.5, True, "100"):
                self.assertEqual(self.error({"safedrop": {key: value}}),
                                 f"[safedrop] {key} must be a whole number from 1 to 100000",
                                 value)

    def test_safedrop_max_bundles_per_user_is_a_whole_number_0_for_no_limit(self) -> None:
        for value in (-1, 100_001, 2.5, True, "100"):
            self.assertEqual(self.error({"safedrop": {"max_bundles_per_user": value}}),
                             "[safedrop] max_bundles_per_user must be a whole number from 0 "
                             "(no limit) to 100000", value)
        for value in (0, 1, 100_000):
            self.assertEqual(SafedropSettings.from_config(
                {"max_bundles_per_user": value}).max_bundles_per_user, value)

    def test_safedrop_sms_caps_are_whole_numbers_0_for_no_cap(self) -> None:
        defaults = SafedropSettings()
        self.assertEqual((defaults.max_sms_per_user_per_day, defaults.max_sms_per_link_per_day),
                         (200, 10))
        for key in ("max_sms_per_user_per_day", "max_sms_per_link_per_day"):
            for value in (-1, 100_001, 2.5, True, "100"):
                self.assertEqual(self.error({"safedrop": {key: value}}),
                                 f"[safedrop] {key} must be a whole number from 0 (no limit) "
                                 "to 100000", value)
            for value in (0, 1, 100_000):
                self.assertEqual(getattr(SafedropSettings.from_config({key: value}), key),
                                 value)

    def test_a_good_file_passes(self) -> None:
        check_tables(config_from_toml({
            "smtp": {"listen": ["tcp:2526"], "max_recipients": 5},
            "domains": {"refresh_interval": 10},
            "queue": {"min_backoff": 60, "tls": "may"},
            "pipeline": {"filtering": False},
            "filters": {"enabled": ["builtin"], "builtin": {"gtube": False}},
            "quarantine": {"retention_days": 3},
            "plans": {"free": {"monthly_tokens": 5}},
            "tokens": {"when_empty": "allow"},
            "billing": {"currency": "USD"},
            "protecmail": {"forbidden_redirects": ["10.0.0.0/8"], "verify_domains": False},
            "fetch": {"sync_interval": 60, "jitter": 0},
            "webhooks": {"max_attempts": 3},
            "safedrop": {"max_file_size": 1024, "max_recipients": 500, "max_files": 50},
            "web": {"listen": "tcp:8081", "metrics": False},
        }), reactor())
        check_tables(Config(), reactor())


# Each table's settings dataclass: its float fields are the keys a TOML nan or inf can reach.
_SETTINGS = {
    "smtp": "mailcore.smtp.settings:SMTPSettings",
    "domains": "mailcore.gateway.domains:DomainSettings",
    "queue": "mailcore.queue.settings:QueueSettings",
    "quarantine": "mailcore.gateway.quarantine:QuarantineSettings",
    "tokens": "mailcore.billing.tokens:TokenSettings",
    "fetch": "mailcore.fetch.settings:FetchSettings",
    "webhooks": "mailcore.webhooks.settings:WebhookSettings",
    "safedrop": "mailcore.safedrop.model:SafedropSettings",
    "mailapi": "mailcore.mailapi.settings:MailApiSettings",
    "web": "web.settings:WebSettings",
    "protecmail": "mailcore.gateway.verification:VerificationSettings",
}


class NotFiniteTests(SynchronousTestCase):
    """TOML's nan and inf are floats: every number key of every table refuses them, naming
    the table and the key. `[smtp] idle_timeout = nan` was accepted and re-armed the idle
    timer on every reactor turn; inf turned a timeout off (found by an audit)."""

    def float_keys(self) -> list[tuple[str, str]]:
        import importlib
        from dataclasses import fields

        keys = []
        for table, where in _SETTINGS.items():
            module, name = where.split(":")
            cls = getattr(importlib.import_module(module), name)
            keys += [(table, f.name) for f in fields(cls)
                     if isinstance(f.default, float) and not isinstance(f.default, bool)]
        return keys

    def test_nan_and_inf_are_refused_in_every_table(self) -> None:
        keys = self.float_keys()
        self.assertIn(("smtp", "idle_timeout"), keys)
        self.assertIn(("fetch", "jitter"), keys)  # one that may be zero
        self.assertGreater(len(keys), 30)
        for table, key in keys:
            for value in (float("nan"), float("inf"), float("-inf")):
                with self.assertRaises(ConfigError, msg=f"[{table}] {key} = {value}") as caught:
                    check_tables(config_from_toml({table: {key: value}}), reactor())
                message = str(caught.exception)
                self.assertIn(f"[{table}] {key} must be", message)
                self.assertNotIn("\n", message)

    def test_filter_numbers_refuse_nan_and_inf(self) -> None:
        for value in (float("nan"), float("inf")):
            with self.assertRaises(ConfigError) as caught:
                check_tables(config_from_toml({"filters": {"threshold": value}}), reactor())
            self.assertEqual(str(caught.exception), "filters.threshold must be a finite number")

    def test_is_positive_number(self) -> None:
        self.assertTrue(is_positive_number(1))
        self.assertTrue(is_positive_number(0.5))
        self.assertTrue(is_positive_number(0, zero_ok=True))
        for value in (0, -1, float("nan"), float("inf"), True, "5", None):
            self.assertFalse(is_positive_number(value), value)
        self.assertFalse(is_positive_number(float("inf"), zero_ok=True))
        self.assertFalse(is_positive_number(2.0, integer=True))


class CheckPositiveTests(SynchronousTestCase):
    def test_every_number_field_must_be_positive(self) -> None:
        @dataclass(frozen=True)
        class Settings:
            count: int = 1
            seconds: float = 1.0
            fraction: float = 0.0
            on: bool = False
            name: str = ""

        check_positive("t", Settings(), zero_ok=("fraction",))
        with self.assertRaises(ConfigError) as caught:
            check_positive("t", Settings(seconds=0.0), zero_ok=("fraction",))
        self.assertEqual(str(caught.exception), "[t] seconds must be a positive number")
        with self.assertRaises(ConfigError) as caught:
            check_positive("t", Settings(fraction=-0.5), zero_ok=("fraction",))
        self.assertEqual(str(caught.exception), "[t] fraction must not be negative")


class ListenerTests(SynchronousTestCase):
    def error(self, service: str, description: str) -> str:
        config = apply_overrides(Config(), {service: [description]})
        with self.assertRaises(ConfigError) as caught:
            check_listeners(config, reactor())
        return str(caught.exception)

    def test_bad_listener_strings_are_one_line(self) -> None:
        cases = [
            ("smtp", "tcp:notaport", "SMTP listener 'tcp:notaport': 'notaport' is not a number"),
            ("http", "bogus:1", "HTTP listener 'bogus:1': unknown endpoint type 'bogus' "
             "(an endpoint is written like tcp:8080:interface=127.0.0.1)"),
            ("smtp", "tcp", "SMTP listener 'tcp': missing 'port' "
             "(an endpoint is written like tcp:2525:interface=127.0.0.1)"),
            ("http", "tcp:8080:colour=red",
             "HTTP listener 'tcp:8080:colour=red': unknown parameter 'colour'"),
            ("smtp", "tcp6:2525:interface=::1",
             "SMTP listener 'tcp6:2525:interface=::1': 'interface' given twice "
             "(a ':' inside a value is written '\\:')"),
            ("smtp", "tcp:70000",
             "SMTP listener 'tcp:70000': port 70000 is out of range (0-65535)"),
            ("http", "ssl:8443:privateKey=/nonexistent/key.pem",
             "HTTP listener 'ssl:8443:privateKey=/nonexistent/key.pem': "
             "no such file or directory: /nonexistent/key.pem"),
        ]
        for service, description, message in cases:
            self.assertEqual(self.error(service, description), message)

    def test_good_listener_strings_pass(self) -> None:
        check_listeners(
            replace(Config(), smtp_endpoints=("tcp:2525", r"tcp6:2526:interface=\:\:1"),
                    http_endpoints=("tcp:0:interface=127.0.0.1", "unix:/tmp/mc.sock")),
            reactor(),
        )


class TlsFilesTests(SynchronousTestCase):
    def error(self, cert: Path, key: Path) -> str:
        with self.assertRaises(ConfigError) as caught:
            check_tls_files(replace(Config(), tls_cert=cert, tls_key=key))
        return str(caught.exception)

    def test_a_tls_file_that_cannot_be_read(self) -> None:
        self.assertEqual(
            self.error(Path("/nonexistent/cert.pem"), Path("/nonexistent/key.pem")),
            "--tls-cert /nonexistent/cert.pem: no such file or directory",
        )

    def test_tls_files_that_are_not_a_pair(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        generate_self_signed(base / "a.pem", base / "a.key", "a.example.test")
        generate_self_signed(base / "b.pem", base / "b.key", "b.example.test")
        (base / "junk.pem").write_text("not PEM\n")
        check_tls_files(replace(Config(), tls_cert=base / "a.pem", tls_key=base / "a.key"))
        self.assertEqual(
            self.error(base / "a.pem", base / "b.key"),
            f"--tls-key {base / 'b.key'} is not the key of --tls-cert {base / 'a.pem'}",
        )
        self.assertEqual(
            self.error(base / "junk.pem", base / "a.key"),
            f"--tls-cert {base / 'junk.pem'} and --tls-key {base / 'a.key'} are not a PEM "
            "certificate and its private key",
        )
        # A chain file whose intermediate is broken (its certificate alone is good).
        broken = (base / "a.pem").read_bytes() + (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
        (base / "chain.pem").write_bytes(broken)
        self.assertEqual(
            self.error(base / "chain.pem", base / "a.key"),
            f"--tls-cert {base / 'chain.pem'} and --tls-key {base / 'a.key'} are not a PEM "
            "certificate and its private key",
        )


class DataDirTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir(parents=True)

    def test_a_missing_data_dir_is_made(self) -> None:
        config = Config(data_dir=self.base / "a" / "b")
        self.assertEqual(ensure_data_dir(config), self.base / "a" / "b")
        self.assertTrue((self.base / "a" / "b").is_dir())

    def test_a_file_in_the_way_is_one_line(self) -> None:
        (self.base / "file").write_text("")
        for path in (self.base / "file", self.base / "file" / "sub"):
            with self.assertRaises(ConfigError) as caught:
                ensure_data_dir(Config(data_dir=path))
            self.assertEqual(str(caught.exception), f"data directory {path}: not a directory")

    def test_one_daemon_per_sqlite_data_dir(self) -> None:
        config = Config(data_dir=self.base / "var")
        first = DataDirLock.acquire(config)
        assert first is not None
        self.addCleanup(first.release)
        self.assertEqual((config.data_dir / LOCK_NAME).read_text(), f"{os.getpid()}\n")
        # flock locks belong to an open file: a second open is refused, even in-process.
        with self.assertRaises(ConfigError) as caught:
            DataDirLock.acquire(config)
        self.assertEqual(
            str(caught.exception),
            f"data directory {config.data_dir} is in use by another mailcore daemon "
            f"(pid {os.getpid()})",
        )
        first.release()
        second = DataDirLock.acquire(config)
        assert second is not None
        second.release()

    def test_no_lock_on_postgresql(self) -> None:
        config = Config(data_dir=self.base / "var", db_url="postgresql+psycopg://mc@127.0.0.1/mc")
        self.assertIsNone(DataDirLock.acquire(config))
        self.assertFalse((self.base / "var").exists())


class DatabaseUrlTests(SynchronousTestCase):
    def error(self, url: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            check_database_url(Config(db_url=url))
        return str(caught.exception)

    def test_supported_databases_pass(self) -> None:
        for url in (None, "sqlite:////srv/mc.sqlite", "postgresql+psycopg://mc:pw@db/mc"):
            check_database_url(Config(db_url=url))

    def test_a_database_url_mailcore_cannot_use(self) -> None:
        example = "sqlite:////PATH or postgresql+psycopg://USER:PASSWORD@HOST/DATABASE"
        self.assertEqual(self.error("not a url"),
                         f"--db: not a database URL (such as {example})")
        self.assertEqual(self.error("mysql://mc:secret@db/mc"),
                         "--db mysql://mc:***@db/mc: Mailcore runs on SQLite or PostgreSQL "
                         f"(such as {example})")
        self.assertEqual(self.error("postgresql+nodriver://db/mc"),
                         "--db postgresql+nodriver://db/mc: unknown driver "
                         f"'postgresql+nodriver' (such as {example})")

    def test_a_database_error_is_its_first_line_without_the_password(self) -> None:
        from sqlalchemy.exc import OperationalError

        config = Config(db_url="postgresql+psycopg://mc:secret@127.0.0.1:1/mc")
        error = OperationalError("SELECT 1", {}, Exception("connection refused\nIs it up?"))
        self.assertEqual(
            str(database_error(config, error)),
            "cannot open the database postgresql+psycopg://mc:***@127.0.0.1:1/mc: "
            "connection refused",
        )


class QueueNumbersTests(SynchronousTestCase):
    """`[queue]` numbers are checked for range, not only type: a negative backoff or a zero
    concurrency is refused at start-up with the key named, instead of a queue that spins or
    never sends."""

    def settings(self, **keys: Any) -> Any:
        from mailcore.queue.settings import QueueSettings

        return QueueSettings.from_config(Config(sections={"queue": {"node_id": "n", **keys}}))

    def test_negative_zero_and_infinite_numbers_are_refused(self) -> None:
        for key, value, said in (
            ("min_backoff", -1, "[queue] min_backoff must be greater than 0, not -1.0"),
            ("hop_concurrency", 0, "[queue] hop_concurrency must be greater than 0, not 0"),
            ("lease_seconds", float("inf"), "lease_seconds must be greater than 0"),
            ("poll_interval", float("nan"), "poll_interval must be greater than 0"),
            ("connection_idle", -0.5, "[queue] connection_idle must be 0 or more, not -0.5"),
        ):
            with self.assertRaises(ConfigError) as raised:
                self.settings(**{key: value})
            self.assertIn(said, str(raised.exception))

    def test_zero_where_it_switches_something_off(self) -> None:
        settings = self.settings(connection_idle=0, route_cache_seconds=0, stop_grace=0)
        self.assertEqual((settings.connection_idle, settings.route_cache_seconds), (0.0, 0.0))


class LoginTokenSettingsTests(ConfigTestCase):
    """The lifetime and number of the tokens password logins hand out."""

    def test_defaults_keep_the_reference_services_tokens(self) -> None:
        config = self.parse()
        self.assertEqual((config.login_token_ttl, config.login_token_idle,
                          config.login_tokens_per_user), (0, 0, 100))

    def test_from_the_file_and_the_command_line(self) -> None:
        path = self.write_toml("login_token_ttl = 86400\nlogin_token_idle = 3600\n"
                               "login_tokens_per_user = 5\n")
        config = self.parse("--config", str(path), "--login-tokens-per-user", "7")
        self.assertEqual((config.login_token_ttl, config.login_token_idle,
                          config.login_tokens_per_user), (86400, 3600, 7))
        config = self.parse("--login-token-ttl", "0", "--login-token-idle", "600")
        self.assertEqual((config.login_token_ttl, config.login_token_idle), (0, 600))

    def test_out_of_range(self) -> None:
        for line, message in (
            ("login_token_ttl = -1",
             "config key login_token_ttl must be from 0 to 315360000, not -1"),
            ("login_token_idle = 599",
             "config key login_token_idle must be from 600 to 315360000 (or 0), not 599"),
            ("login_tokens_per_user = 0",
             "config key login_tokens_per_user must be from 1 to 1000000, not 0"),
        ):
            path = self.write_toml(line + "\n")
            self.assertEqual(self.config_error("--config", str(path)), message)
        self.assertEqual(self.usage_error("--login-token-idle", "60"),
                         "--login-token-idle must be from 600 to 315360000 (or 0), not 60")
        self.assertIn("not a whole number: 'x'", self.usage_error("--login-tokens-per-user", "x"))

    def test_the_help_names_them(self) -> None:
        text = str(DaemonOptions())
        for option in ("--login-token-ttl", "--login-token-idle", "--login-tokens-per-user"):
            self.assertIn(option, text)

"""Daemon and CLI configuration: command-line options over an optional TOML file.

The precedence is command line, then the TOML file, then the embedded defaults. The result
is one frozen `Config` that every service receives through its constructor.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from twisted.python import usage

DEFAULT_SMTP = "tcp:2525:interface=127.0.0.1"
DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"


class ConfigError(Exception):
    """The configuration is unusable; the message says why, in one line."""


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know, resolved once at start-up."""

    data_dir: Path = Path("var")
    # Where uploaded files live (safedrop's `safedrop/`, the Mail API's `mailapi/`): the
    # data directory unless given. Nodes sharing a PostgreSQL store must all see one
    # (shared storage): mailcore.nodes.files checks that they do.
    files_dir: Path | None = None
    db_url: str | None = None
    smtp_endpoints: tuple[str, ...] = (DEFAULT_SMTP,)
    http_endpoints: tuple[str, ...] = (DEFAULT_HTTP,)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    hostname: str = "localhost"
    # HTTP
    http_max_body: int = 25 * 1024 * 1024
    session_token_ttl: int = 3600
    # The tokens password logins hand out (IMAP2API, Mail API): lifetime from the login and
    # from the last use, in seconds (0: none, the reference service's tokens never expire),
    # and how many one user keeps (a login past them removes the one unused the longest).
    login_token_ttl: int = 0
    login_token_idle: int = 0
    login_tokens_per_user: int = 100
    # Sections of the TOML file that later services read (smtp, queue, filters, fetch ...).
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def files_root(self) -> Path:
        """The directory holding `safedrop/` and `mailapi/`: `files_dir`, else the data
        directory."""
        return self.files_dir if self.files_dir is not None else self.data_dir

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: the one given, else SQLite in the data directory."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'mailcore.sqlite').resolve()}"

    def absolute(self) -> Config:
        """This Config with its file paths made absolute against the current directory,
        for a process that may change it later (twistd's `--rundir`)."""
        return replace(
            self,
            data_dir=self.data_dir.absolute(),
            files_dir=self.files_dir.absolute() if self.files_dir is not None else None,
            tls_cert=self.tls_cert.absolute() if self.tls_cert is not None else None,
            tls_key=self.tls_key.absolute() if self.tls_key is not None else None,
        )

    def section(self, name: str) -> dict[str, Any]:
        """The TOML table `[name]`, empty when absent.

        A table is known when it has a reader in `mailcore.startup.TABLES`; a key of it is
        known when that reader looks at it (start-up refuses the others).
        """
        return dict(self.sections.get(name, {}))


# TOML keys at the top level that map onto Config fields, and their types.
_TOP_LEVEL: dict[str, type] = {
    "data_dir": str,
    "files_dir": str,
    "db": str,
    "smtp": list,
    "http": list,
    "tls_cert": str,
    "tls_key": str,
    "hostname": str,
    "http_max_body": int,
    "session_token_ttl": int,
    "login_token_ttl": int,
    "login_token_idle": int,
    "login_tokens_per_user": int,
}


# Top-level settings whose empty value would silently mean something else (a path "" is the
# current directory, Path("") == Path("."); a db "" the SQLite store of the data directory),
# and what to give instead.
_NOT_EMPTY = {
    "data_dir": "name a directory",
    "files_dir": "name a directory, or leave it out for the data directory",
    "db": "give a database URL, or leave it out for SQLite in the data directory",
    "tls_cert": "name a PEM file",
    "tls_key": "name a PEM file",
}


def refuse_empty(values: Mapping[str, Any], *, options: bool = False) -> None:
    """Refuse an empty (or blank) path or database URL among `values` (TOML spelling), named
    as the config key, or as the command-line option with `options`."""
    for key, hint in _NOT_EMPTY.items():
        value = values.get(key)
        if isinstance(value, str) and not value.strip():
            name = "--" + key.replace("_", "-") if options else f"config key {key}"
            raise ConfigError(f"{name} is empty: {hint}")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file, turning every failure into a one-line ConfigError."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return data


def config_from_toml(data: dict[str, Any]) -> Config:
    """Build a Config from a parsed TOML document, checking the types of known keys."""
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            table = dict(value)
            # Listeners may also be given inside their service's table, so that a file can
            # hold both `[smtp] listen = [...]` and the other [smtp] settings.
            listen_key = _LISTEN_TABLES.get(key)
            if listen_key is not None and "listen" in table:
                if listen_key in values:
                    raise ConfigError(f"listeners given twice: {listen_key} and [{key}] listen")
                values[listen_key] = _checked(f"[{key}] listen", table.pop("listen"), list)
            sections[key] = table
            continue
        expected = _TOP_LEVEL.get(key)
        if expected is None:
            raise ConfigError(f"unknown config key: {key}")
        if key in values:
            raise ConfigError(f"listeners given twice: {key} and [{key}] listen")
        values[key] = _checked(key, value, expected)
    refuse_empty(values)
    return apply_overrides(Config(sections=sections), values)


# Tables whose `listen` key sets the endpoints of that service.
_LISTEN_TABLES = {"smtp": "smtp", "web": "http"}


# Top-level numbers and their largest value: a session TTL past datetime's range made every
# session creation raise OverflowError; ten years is more than any deployment wants.
_TOP_LEVEL_MAX = {
    "http_max_body": 1 << 40,
    "session_token_ttl": 10 * 365 * 86400,
    "login_token_ttl": 10 * 365 * 86400,
    "login_token_idle": 10 * 365 * 86400,
    "login_tokens_per_user": 1_000_000,
}
# Their smallest value, where it is not 1. 0 means "never" for the login token lifetimes;
# an idle lifetime is at least 600 s, since a token's last use is written at most every
# 300 s (mailcore.identity.service).
_TOP_LEVEL_MIN = {"login_token_ttl": 0, "login_token_idle": 600}
_ZERO_MEANS_NEVER = {"login_token_idle"}


def _checked(key: str, value: Any, expected: type) -> Any:
    if expected is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key} must be a string or a list of strings")
    elif not isinstance(value, expected) or isinstance(value, bool):
        raise ConfigError(f"config key {key} must be of type {expected.__name__}")
    if key in _TOP_LEVEL_MAX:
        low = _TOP_LEVEL_MIN.get(key, 1)
        if not (low <= value <= _TOP_LEVEL_MAX[key]
                or (key in _ZERO_MEANS_NEVER and value == 0)):
            never = " (or 0)" if key in _ZERO_MEANS_NEVER else ""
            raise ConfigError(f"config key {key} must be from {low} to "
                              f"{_TOP_LEVEL_MAX[key]}{never}, not {value}")
    return value


def checked_number(key: str, value: Any) -> Any:
    """A top-level number given on the command line, checked as the TOML file's is."""
    return None if value is None else _checked(key, value, int)


def unknown_key(table: str, key: str) -> ConfigError:
    """The error for a key `[table]` does not have, worded the same for every table."""
    return ConfigError(f"[{table}] unknown key: {key}")


def refuse_unknown(table: str, section: Mapping[str, Any], settings: type) -> None:
    """Refuse a key of `[table]` (`section`) that is no field of `settings`, the dataclass
    read from it (the first such key in sorted order is named)."""
    known = {f.name for f in fields(settings)}
    for key in sorted(section):
        if key not in known:
            raise unknown_key(table, key)


def is_positive_number(value: object, *, zero_ok: bool = False, integer: bool = False) -> bool:
    """Whether a setting's `value` is a finite number above zero (zero too with `zero_ok`),
    a whole one with `integer`; never a bool. Every settings reader checks its numbers
    here: TOML's nan passes a `<= 0` test and inf turns a timeout or an interval off."""
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return value >= 0 if zero_ok else value > 0


def check_positive(table: str, settings: Any, *, zero_ok: Iterable[str] = ()) -> None:
    """Refuse zero or less, nan and inf in any number field of `settings`, the dataclass
    read from `[table]` (less than zero for the fields in `zero_ok`): counts, sizes and
    durations are positive and finite, and a field added later is checked too."""
    allowed = set(zero_ok)
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"[{table}] {f.name} must be a finite number")
        if f.name in allowed and value < 0:
            raise ConfigError(f"[{table}] {f.name} must not be negative")
        if f.name not in allowed and value <= 0:
            raise ConfigError(f"[{table}] {f.name} must be a positive number")


def apply_overrides(config: Config, values: dict[str, Any]) -> Config:
    """Overlay option values (TOML or command-line spelling) on a Config."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in ("data_dir", "files_dir"):
            changes[key] = Path(value)
        elif key == "db":
            changes["db_url"] = value
        elif key == "smtp":
            changes["smtp_endpoints"] = tuple(value)
        elif key == "http":
            changes["http_endpoints"] = tuple(value)
        elif key in ("tls_cert", "tls_key"):
            changes[key] = Path(value)
        elif key in {f.name for f in fields(Config)}:
            changes[key] = value
    return replace(config, **changes)


def _whole(value: str) -> int:
    """An option's whole number (Twisted puts the ValueError's text in its UsageError)."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"not a whole number: {value!r}") from None


class CommonOptions(usage.Options):
    """Options shared by the daemon and the admin CLI: where the data lives."""

    optParameters: list[list[Any]] = [
        ["data-dir", None, None,
         "Directory for the database, keys and certificates [default: ./var]."],
        ["files-dir", None, None,
         "Directory for uploaded files: safedrop's and the Mail API's [default: the data "
         "directory]. Nodes sharing a PostgreSQL database must all name one shared storage."],
        ["db", None, None, "SQLAlchemy database URL [default: SQLite in the data directory]; "
         "postgresql+psycopg://user:pass@host/db for PostgreSQL."],
        ["config", "c", None, "TOML configuration file; command-line options win over it."],
    ]

    def resolve(self) -> Config:
        """The effective Config: defaults, then the TOML file, then these options."""
        config = Config()
        if self["config"]:
            config = config_from_toml(load_toml(Path(self["config"])))
        overrides = self.overrides()
        refuse_empty(overrides, options=True)
        return apply_overrides(config, overrides)

    def overrides(self) -> dict[str, Any]:
        """Values given on the command line, in TOML spelling."""
        return {"data_dir": self["data-dir"], "files_dir": self["files-dir"], "db": self["db"]}


class DaemonOptions(CommonOptions):
    """`twistd mailcore` options."""

    synopsis = "[options]"
    longdesc = (
        "Run the Mailcore gateway: the SMTP MX relay, the fetch engine and the HTTP APIs, "
        "in one process. Listeners are Twisted endpoint strings, e.g. "
        "tcp:2525:interface=127.0.0.1 or ssl:8443:privateKey=key.pem:certKey=cert.pem."
    )
    optParameters: list[list[Any]] = [
        *CommonOptions.optParameters,
        ["tls-cert", None, None, "PEM certificate for STARTTLS, followed by its intermediates "
         "(as certbot's fullchain.pem) [default: self-signed, generated in the data directory "
         "on first start]."],
        ["tls-key", None, None, "PEM private key matching --tls-cert."],
        ["hostname", None, None, "This gateway's public host name: in SMTP greetings, "
         "Received headers and DSNs, the default postmaster (postmaster@NAME), the senders "
         "and Message-IDs of the mail it writes, the links of quarantine digests and safedrop "
         "mails (unless [quarantine]/[safedrop] link_hostname), the first self-signed "
         "certificate [default: localhost; TOML hostname]."],
        ["login-token-ttl", None, None, "Seconds a token from a password login "
         "(/api-token-auth/, /api/v1/auth/) lives after the login; 0: for ever, as the "
         "reference service's do [default: 0; TOML login_token_ttl].", _whole],
        ["login-token-idle", None, None, "Seconds such a token lives unused (at least 600); "
         "0: for ever [default: 0; TOML login_token_idle].", _whole],
        ["login-tokens-per-user", None, None, "Login tokens one user keeps; a login past them "
         "removes the one unused the longest [default: 100; TOML login_tokens_per_user].",
         _whole],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["smtp"] = []
        self["http"] = []

    def opt_smtp(self, endpoint: str) -> None:
        """SMTP listener endpoint (repeatable) [default: tcp:2525:interface=127.0.0.1]."""
        self["smtp"].append(endpoint)

    def opt_http(self, endpoint: str) -> None:
        """HTTP listener endpoint (repeatable) [default: tcp:8080:interface=127.0.0.1]."""
        self["http"].append(endpoint)

    def overrides(self) -> dict[str, Any]:
        values = super().overrides()
        values.update(
            smtp=self["smtp"] or None,
            http=self["http"] or None,
            tls_cert=self["tls-cert"],
            tls_key=self["tls-key"],
            hostname=self["hostname"],
            login_token_ttl=self["login-token-ttl"],
            login_token_idle=self["login-token-idle"],
            login_tokens_per_user=self["login-tokens-per-user"],
        )
        return values

    def postOptions(self) -> None:
        """Resolve the Config; a mistake in the file raises ConfigError (one line), a
        mistake in the options UsageError."""
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for key in ("login_token_ttl", "login_token_idle", "login_tokens_per_user"):
            try:
                checked_number(key, self[key.replace("_", "-")])
            except ConfigError as e:
                raise usage.UsageError(str(e).replace(
                    f"config key {key}", "--" + key.replace("_", "-"))) from None
        self.config = self.resolve()

"""What the daemon and the admin CLI check before they touch anything, each mistake one line.

- Every table of the TOML file is built by its reader in `TABLES` (the settings class of the
  service that uses it). A table with no reader, a key that is no field of the table's
  settings dataclass (where it has one) or that its reader did not look at, and a value its
  reader refuses are errors naming the table and the key. Readers run on a Config that
  records which keys they read, so a key added to a settings class is known without a
  second list; a new table needs one line in `TABLES` (tests/test_config.py finds every
  `config.section("…")` in the code and checks that it is there).
- Every listener string parses (`check_listeners`); a listener that cannot open (a port in
  use, no permission, a `unix:` one's lock file that cannot be made or that another
  process holds, of this user or another) is one line too, naming the address or the file
  (`listen_error`).
- `--db` names SQLite or PostgreSQL with an installed driver (`check_database_url`), and a
  database that cannot be opened is one line (`database_error`; a SQLite one whose lock
  another process holds names the processes that have the file open).
- The data directory exists or can be made, and is writable (`ensure_data_dir`); so is the
  directory of twistd's `--logfile` (`check_logfile`).
- One daemon per SQLite data directory (`DataDirLock`): the daemon holds an exclusive
  `flock` on `DATA/mailcore.lock` for its lifetime, taken before the migrations; a second
  daemon on the same directory is refused while the first runs (the kernel releases the
  lock when the process ends, even on `kill -9`). On PostgreSQL no lock is taken: several
  nodes share the database by design, each with its own data directory (and one shared
  `files_dir` and the same keys: mailcore.nodes checks both). The admin CLI
  never takes it, so it can run beside the daemon.

Every check raises ConfigError with a message that starts with what is wrong and names
where (`[smtp] unknown key: foo`); the daemon prints it as `mailcore: …` and exits 1.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError

from mailcore.config import DEFAULT_HTTP, DEFAULT_SMTP, Config, ConfigError, unknown_key
from mailcore.tls import server_context
from mailcore.tlslisten import UnsupportedParameter, parse_ssl

# -- the tables ------------------------------------------------------------------------------

Reader = Callable[[Config, Any], object]


def _only_fields(config: Config, table: str, settings: type) -> None:
    """Refuse a key of `[table]` that is no field of `settings`, its dataclass."""
    known = {f.name for f in fields(settings)}
    for key in config.sections.get(table, {}):
        if key not in known:
            raise unknown_key(table, key)


def _settings(table: str, where: str, constructor: str) -> Reader:
    """The reader of a table whose settings dataclass (`where`, "module:Class") refuses a
    key that is none of its fields and is built by `Class.constructor(config.section(table))`.
    The module is imported when the table is read, not when this one is (web.settings among
    them: mailcore itself is free of HTTP)."""

    def read(config: Config, reactor: Any) -> object:
        module, name = where.split(":")
        settings = getattr(importlib.import_module(module), name)
        _only_fields(config, table, settings)
        return getattr(settings, constructor)(config.section(table))

    return read


def _smtp(config: Config, reactor: Any) -> object:
    from mailcore.smtp.settings import SMTPSettings

    _only_fields(config, "smtp", SMTPSettings)
    return SMTPSettings.from_config(config)


def _queue(config: Config, reactor: Any) -> object:
    from mailcore.queue.settings import QueueSettings

    _only_fields(config, "queue", QueueSettings)
    return QueueSettings.from_config(config)


def _filters(config: Config, reactor: Any) -> object:
    from filters import build_chain
    from mailcore.workers import CpuPool

    # Built and dropped: the clients it makes connect only when a message is scanned.
    return build_chain(
        config.section("filters"), reactor=reactor, runner=CpuPool(None, synchronous=True)
    )


def _plans(config: Config, reactor: Any) -> object:
    from mailcore.billing.plans import Plans

    return Plans.from_config(config.section("plans"))


def _protecmail(config: Config, reactor: Any) -> object:
    """Two readers share the table: the next-hop policy and domain verification."""
    from mailcore.gateway.verification import VerificationSettings
    from mailcore.queue.nexthop import forbidden_redirects

    return forbidden_redirects(config), VerificationSettings.from_config(
        config.section("protecmail")
    )


def _web(config: Config, reactor: Any) -> object:
    from web.settings import WebSettings  # imported here: mailcore itself is free of HTTP

    _only_fields(config, "web", WebSettings)
    return WebSettings.from_config(config)


# Every table of the TOML file and what reads it, the way the service that uses it does.
TABLES: dict[str, Reader] = {
    "smtp": _smtp,
    "domains": _settings("domains", "mailcore.gateway.domains:DomainSettings", "from_config"),
    "queue": _queue,
    "pipeline": _settings("pipeline", "mailcore.gateway.filtering:PolicySettings", "from_config"),
    "filters": _filters,
    "quarantine": _settings(
        "quarantine", "mailcore.gateway.quarantine:QuarantineSettings", "from_config"
    ),
    "plans": _plans,
    "tokens": _settings("tokens", "mailcore.billing.tokens:TokenSettings", "from_config"),
    "billing": _settings("billing", "mailcore.billing.invoices:BillingSettings", "from_config"),
    "protecmail": _protecmail,
    "fetch": _settings("fetch", "mailcore.fetch.settings:FetchSettings", "from_section"),
    "webhooks": _settings("webhooks", "mailcore.webhooks.settings:WebhookSettings", "from_section"),
    "safedrop": _settings("safedrop", "mailcore.safedrop.model:SafedropSettings", "from_config"),
    "mailapi": _settings("mailapi", "mailcore.mailapi.settings:MailApiSettings", "from_config"),
    "oauth": _settings("oauth", "mailcore.oauth.settings:OAuthSettings", "from_section"),
    "dropmyemail": _settings("dropmyemail", "mailcore.backup:BackupSettings", "from_section"),
    "web": _web,
    "log": _settings("log", "mailcore.logrotation:LogSettings", "from_config"),
    "store": _settings("store", "mailcore.store.settings:StoreSettings", "from_config"),
    "limits": _settings("limits", "mailcore.sendcaps:SendCapSettings", "from_config"),
}


class _ReadKeys(dict[str, Any]):
    """One table, remembering which keys its reader looked at. A reader that walks the
    whole table (to refuse unknown keys itself) has looked at every key."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def unread(self) -> list[str]:
        return sorted(set(dict.keys(self)) - self.read)

    def _all(self) -> None:
        self.read.update(dict.keys(self))

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().pop(key, *default)

    def __iter__(self) -> Iterator[str]:
        self._all()
        return super().__iter__()

    def keys(self) -> Any:
        self._all()
        return super().keys()

    def values(self) -> Any:
        self._all()
        return super().values()

    def items(self) -> Any:
        self._all()
        return super().items()

    def copy(self) -> dict[str, Any]:
        self._all()
        return dict(super().items())


@dataclass(frozen=True)
class _ReadingConfig(Config):
    """A Config whose `section()` hands out the same `_ReadKeys` for a table each time."""

    read: dict[str, _ReadKeys] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config) -> _ReadingConfig:
        return cls(**{f.name: getattr(config, f.name) for f in fields(Config) if f.init})

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.read:
            self.read[name] = _ReadKeys(self.sections.get(name, {}))
        return self.read[name]


def check_tables(config: Config, reactor: Any) -> None:
    """Build every table's settings: raise ConfigError for the first unknown table, unknown
    key or refused value. Builds nothing lasting; `reactor` only constructs filter clients."""
    unknown = sorted(set(config.sections) - set(TABLES))
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}] (tables: {', '.join(sorted(TABLES))})")
    reading = _ReadingConfig.of(config)
    for name, reader in TABLES.items():
        reader(reading, reactor)
        table = reading.read.get(name)
        keys = table.unread() if table is not None else sorted(config.sections.get(name, {}))
        if keys:
            raise unknown_key(name, keys[0])


# -- listeners -------------------------------------------------------------------------------


_UNKNOWN_TYPE = re.compile(r"Unknown endpoint type: '(.*)'")
_NOT_A_NUMBER = re.compile(r"invalid literal for int\(\) with base 10: '(.*)'")
_UNKNOWN_PARAMETER = re.compile(r"unexpected keyword argument '(.*)'")
_MISSING = re.compile(r"missing \d+ required positional arguments?: (.*)")
_TWICE = re.compile(r"multiple values for (?:keyword )?argument '(.*)'")


def check_listeners(config: Config, reactor: Any) -> None:
    """Parse every listener string (nothing is opened); ConfigError names the first bad one."""
    for kind, descriptions in (("SMTP", config.smtp_endpoints), ("HTTP", config.http_endpoints)):
        for description in descriptions:
            check_listener(kind, description, reactor)


def check_listener(kind: str, description: str, reactor: Any) -> None:
    """ConfigError in one line if `description` names no server endpoint. An `ssl:` one
    (mailcore.tlslisten) has its certificate files loaded (blocks)."""
    try:
        listener = parse_ssl(description)
        if listener is None:
            parsed = serverFromString(reactor, description)
            port = getattr(parsed, "_port", None)  # TCP endpoints keep it; bind() fails later
        else:
            port = listener.port
    except UnsupportedParameter as e:
        reason = str(e)
    except (ValueError, TypeError, LookupError) as e:
        reason = _endpoint_reason(e, DEFAULT_SMTP if kind == "SMTP" else DEFAULT_HTTP)
    except OSError as e:
        reason = _file_reason(e)
    else:
        socket_dir = _unix_socket_directory(parsed) if listener is None else None
        if isinstance(port, int) and not 0 <= port <= 65535:
            reason = f"port {port} is out of range (0-65535)"
        elif socket_dir is not None and not socket_dir.is_dir():
            reason = f"no such directory: {socket_dir}"
        elif listener is None:
            return
        else:
            try:
                server_context(listener.cert, listener.key, listener.chain)
                return
            except OSError as e:  # a file an ssl: endpoint names
                reason = _file_reason(e)
            except Exception as e:  # not PEM, a key that is not the certificate's
                reason = f"its certificate or key does not load: {e or repr(e)}"
    raise ConfigError(f"{kind} listener {description!r}: {reason}")


def _unix_socket_directory(endpoint: object) -> Path | None:
    """The directory a `unix:` server endpoint makes its socket (and lock file) in; None
    for other endpoints. (Twisted's lock file in a missing directory was a traceback.)"""
    path = unix_socket_path(endpoint)
    return Path(path).parent if path is not None else None


# How many endpoints wrapping one another `unix_socket_path` looks through.
_MOST_WRAPPERS = 4


def unix_socket_path(endpoint: object) -> str | None:
    """The socket path of a `unix:` server endpoint, or of the one an endpoint of ours
    wraps (its `endpoint`: mailcore.queue.nexthop.ListeningEndpoint); None for others."""
    for _ in range(_MOST_WRAPPERS):
        if isinstance(endpoint, UNIXServerEndpoint):
            address = getattr(endpoint, "_address", None)
            return os.fsdecode(address) if isinstance(address, (str, bytes)) else None
        endpoint = getattr(endpoint, "endpoint", None)
    return None


def _file_reason(error: OSError) -> str:
    return f"{_strerror(error)}: {error.filename}" if error.filename else _strerror(error)


def _endpoint_reason(error: Exception, example: str) -> str:
    """Twisted's parse error, said for a person who wrote an endpoint string."""
    text = str(error)
    if match := _NOT_A_NUMBER.search(text):
        return f"{match.group(1)!r} is not a number"
    if match := _UNKNOWN_PARAMETER.search(text):
        return f"unknown parameter {match.group(1)!r}"
    if match := _TWICE.search(text):  # tcp6:25:interface=::1, where ':' must be '\:'
        return f"{match.group(1)!r} given twice (a ':' inside a value is written '\\:')"
    if match := _UNKNOWN_TYPE.search(text):
        reason = f"unknown endpoint type {match.group(1)!r}"
    elif match := _MISSING.search(text):
        reason = f"missing {match.group(1)}"
    else:
        reason = "not an endpoint"
    return f"{reason} (an endpoint is written like {example})"


def _strerror(error: OSError) -> str:
    """`No such file or directory` as `no such file or directory`."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


class ListenError(ConfigError):
    """A listener could not open (a port in use, no permission)."""


# Twisted's reason when a unix: listener's lock file names a process that runs.
_LOCK_HELD = "Cannot acquire lock"


def listen_error(error: Exception, socket_path: str | None = None) -> ListenError:
    """A failure to start a listener, as one line naming the address or file and the cause.

    A listener that cannot listen (a port in use, no permission) is `cannot listen on
    ADDRESS: CAUSE`. An OSError that is no listening error is a file a `unix:` listener
    makes before it listens, its lock file `PATH.lock` (a symlink to the pid that holds
    it): it names that file (os.symlink's error names the pid it links to first, which
    was what the line showed: `cannot listen: file name too long: 12054`). One that names
    no file comes from the lock's check of the pid it links to: a process of another user,
    which a daemon not run as root may not signal (EPERM), holds it; with the listener's
    `socket_path` the line names the lock file and the pid (it was `a listener cannot
    start: operation not permitted`)."""
    if isinstance(error, CannotListenError):
        if isinstance(error.port, (str, bytes)):  # a unix: socket's path
            where = os.fsdecode(error.port)
        else:
            where = f"{error.interface or '*'}:{error.port}"
        cause = error.socketError
        if cause == _LOCK_HELD:
            reason = f"its lock file {where}.lock is held by {_lock_holder(where + '.lock')}"
        else:
            reason = _strerror(cause) if isinstance(cause, OSError) else str(cause)
        return ListenError(f"cannot listen on {where}: {reason}")
    if isinstance(error, OSError):
        path = error.filename2 if error.filename2 is not None else error.filename
        if path is None and socket_path is not None:
            lock = f"{socket_path}.lock"
            if error.errno == errno.EPERM:
                reason = (f"its lock file {lock} is held by "
                          f"{_lock_holder(lock, 'a process of another user')}")
            else:
                reason = f"its lock file {lock}: {_strerror(error)}"
            return ListenError(f"cannot listen on {socket_path}: {reason}")
        if path is None:
            return ListenError(f"a listener cannot start: {_strerror(error)}")
        return ListenError(f"cannot make a listener's file {os.fsdecode(path)}: "
                           f"{_strerror(error)}")
    return ListenError(f"cannot listen: {error}")


def _lock_holder(lock: str, holder: str = "another process") -> str:
    """Who holds a unix: listener's lock file, for the message: `holder`, with the pid it
    links to."""
    try:
        pid = os.readlink(lock)
    except OSError:
        return holder
    return f"{holder} (pid {pid})" if pid.isdigit() else holder


def report_config_errors() -> None:
    """From now on an uncaught ConfigError prints `mailcore: <message>` on stderr and
    nothing else (the exit status stays 1).

    For twistd, which lets an exception from the plugin's options, its `makeService` or a
    service's start go up as a traceback (after its logging started: into the log).
    """
    previous = sys.excepthook
    if getattr(previous, "mailcore", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, ConfigError):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"mailcore: {value}\n")
            stream.flush()
        else:
            previous(kind, value, tb)

    hook.mailcore = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def check_tls_files(config: Config) -> None:
    """The STARTTLS certificate and key given (`--tls-cert`, `--tls-key`) can be read, are
    PEM, and belong together. Reads them (blocks)."""
    from OpenSSL.crypto import Error as OpenSSLError
    from twisted.internet.error import VerifyError

    from mailcore.tls import server_context

    cert, key = config.tls_cert, config.tls_key
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{option} {path}: {_strerror(e)}") from None
    if cert is None or key is None:
        return
    try:
        server_context(cert, key)
    except (OpenSSLError, ValueError):  # (ValueError: a malformed certificate after the first)
        raise ConfigError(f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate "
                          "and its private key") from None
    except VerifyError:
        raise ConfigError(f"--tls-key {key} is not the key of --tls-cert {cert}") from None


# -- the database ----------------------------------------------------------------------------

DB_EXAMPLE = "sqlite:////PATH or postgresql+psycopg://USER:PASSWORD@HOST/DATABASE"


def check_database_url(config: Config) -> None:
    """`--db` names a database Mailcore runs on, with its driver installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if config.db_url is None:
        return
    try:
        url = make_url(config.db_url)
    except ArgumentError:
        raise ConfigError(f"--db: not a database URL (such as {DB_EXAMPLE})") from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"--db {shown}: Mailcore runs on SQLite or PostgreSQL "
                          f"(such as {DB_EXAMPLE})")
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise ConfigError(f"--db {shown}: unknown driver {url.drivername!r} "
                          f"(such as {DB_EXAMPLE})") from None
    except ImportError as e:
        raise ConfigError(f"--db {shown}: the driver {e.name or url.drivername!r} is not "
                          "installed") from None


def database_error(config: Config, error: Exception) -> ConfigError:
    """A failure to open or migrate the database, in one line (the driver's first). A
    SQLite database whose lock another process holds (the admin CLI migrating it, say)
    says so, and which processes have the file open."""
    from sqlalchemy.engine import make_url

    from mailcore.outages import DATABASE_BUSY, outage

    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = lines[0] if lines else type(cause).__name__
    url = make_url(config.database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and outage(error) is DATABASE_BUSY:
        holders = ", ".join(_processes_with_open(url.database or ""))
        who = holders or "the admin CLI, or a daemon of another data directory"
        reason += f": another process holds its lock ({who}); start again once it is done"
    return ConfigError(f"cannot open the database {shown}: {reason}")


def _processes_with_open(database: str, most: int = 3) -> list[str]:
    """Other processes that have the SQLite file `database` open, as `pid N (command)`:
    who may hold its lock (Linux's /proc; those of other users only as root; none found
    elsewhere)."""
    if database.startswith("file:"):  # a URI filename
        database = database[len("file:"):].split("?", 1)[0]
    try:
        target = os.stat(database)
    except OSError:
        return []
    found: list[str] = []
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            opened = any(_same_file(f"/proc/{pid}/fd/{fd}", target) for fd in fds)
            if not opened:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = f.read(400).split(b"\0")
        except OSError:
            continue  # gone, or not ours to look at
        # One line: an argument may hold newlines (python -c), or be long.
        command = " ".join(" ".join(os.fsdecode(w) for w in words[:6] if w).split())
        command = command if len(command) <= 80 else command[:79] + "…"
        found.append(f"pid {pid} ({command})" if command else f"pid {pid}")
        if len(found) == most:
            break
    return found


def _same_file(fd_path: str, target: os.stat_result) -> bool:
    try:
        here = os.stat(fd_path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (target.st_dev, target.st_ino)


# -- twistd's log file ------------------------------------------------------------------------


def check_logfile(twistd_options: Mapping[str, Any] | None) -> None:
    """ConfigError when twistd's `--logfile` cannot be opened: its directory is missing or
    not a directory, or it (or, when it does not exist yet, its directory) is not writable.
    twistd opens it only after `makeService` returned, as the user that started it, and a
    failure was its traceback, after the data directory and the database were made."""
    if twistd_options is None:
        return
    name = twistd_options.get("logfile")
    if not name or name == "-":  # none (twistd's default), or stdout
        return
    path = Path(name).absolute()  # twistd opens it before it changes to --rundir
    directory = path.parent
    if not directory.is_dir():
        what = "not a directory" if directory.exists() else "no such directory"
        raise ConfigError(f"--logfile {name}: {what}: {directory}")
    if path.is_dir():
        raise ConfigError(f"--logfile {name}: is a directory")
    target = path if path.exists() else directory
    mode = os.W_OK if path.exists() else os.W_OK | os.X_OK
    if not os.access(target, mode, effective_ids=True):
        raise ConfigError(f"--logfile {name}: not writable: {target}")


# -- the data directory ----------------------------------------------------------------------


def ensure_data_dir(config: Config) -> Path:
    """The data directory, made if missing; ConfigError if it cannot be made or written."""
    return _ensure_directory(config.data_dir, "data directory")


def ensure_files_dir(config: Config) -> Path:
    """The directory of uploaded files (`--files-dir`, else the data directory), made if
    missing; ConfigError if it cannot be made or written (a read-only or missing mount)."""
    return _ensure_directory(config.files_root, "files directory (--files-dir)")


def _ensure_directory(path: Path, what: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path}: not a directory") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {_strerror(e)}") from None
    if not os.access(path, os.W_OK | os.X_OK, effective_ids=True):
        raise ConfigError(f"{what} {path}: not writable")
    return path


LOCK_NAME = "mailcore.lock"


class DataDirLock(Service):
    """The daemon's exclusive hold on its SQLite data directory (see the module docstring).

    The lock is an `flock` on an open file, so it survives twistd's fork into the
    background and ends with the process. As a service (the daemon's first) it is kept as
    long as the daemon, and writes the pid of the process that runs into the lock file, for
    the message a second daemon prints.
    """

    name = "data-dir-lock"

    def __init__(self, path: Path, file: TextIO) -> None:
        self.path = path
        self._file = file

    @classmethod
    def acquire(cls, config: Config) -> DataDirLock | None:
        """Take the lock when the store is SQLite (None on PostgreSQL); ConfigError when
        another process holds it or the file cannot be written."""
        if not config.database_url.startswith("sqlite"):
            return None
        path = ensure_data_dir(config) / LOCK_NAME
        try:
            file = path.open("a+", encoding="ascii")
        except OSError as e:
            raise ConfigError(f"data directory {config.data_dir}: {_strerror(e)}") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(file)
            file.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {path}: {_strerror(e)}") from None
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(
                f"data directory {config.data_dir} is in use by another mailcore daemon{who}"
            ) from None
        lock = cls(path, file)
        lock.write_pid()
        return lock

    def write_pid(self) -> None:
        """Record this process as the holder (after a fork into the background, again)."""
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def startService(self) -> None:
        super().startService()
        self.write_pid()

    def release(self) -> None:
        """Give the lock up (the process ending does the same)."""
        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def _read_pid(file: TextIO) -> str:
    try:
        file.seek(0)
        text = file.read(32).strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""

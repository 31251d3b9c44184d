"""Real spamd, clamd and rspamd for the filter integration tests.

Each daemon is started at most once per test process, lazily, by the first test that asks
(`await spamd()`, `await clamd()`, `await rspamd()`), on 127.0.0.1 and free ports, in a
temp dir; an atexit handler stops it by PID and removes the dir. Start-up costs: spamd
~1 s, clamd ~0.2 s with our own two-signature EICAR database, rspamd ~10-15 s on an empty
database (its compiled regular expressions are kept in a cache dir, so later runs start
in under a second).

rspamd is kept off the network: its DNS resolver points at a closed local port and the
modules that fetch remote maps or query remote services are disabled.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import io
import os
import pwd
import shutil
import zipfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.testing import StringTransport

from filters.builtin import EICAR
from tests.support import servers

# clamd's StreamMaxLength in the test instance: small, so an oversized stream is cheap.
CLAMD_STREAM_MAX = 2 * 1024 * 1024

_RSPAMD_CACHE = Path(
    os.environ.get("MAILCORE_TEST_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mailcore-tests"
) / "rspamd-hs"
_RSPAMD_CACHE_SUFFIXES = (".hs", ".unser", ".hsmp", ".hsmc")

# Modules that would query remote services or fetch remote maps.
_RSPAMD_OFFLINE = (
    "fuzzy_check", "rbl", "multimap", "phishing", "whitelist", "mid", "mime_types",
    "surbl", "asn", "spf", "dkim", "dmarc", "arc", "rspamd_update", "url_redirector",
    "emails", "dcc", "metadata_exporter", "clickhouse", "elastic", "neural", "reputation",
    "external_services", "antivirus", "p0f", "mx_check", "bimi",
)


@dataclass
class Daemon:
    """A running daemon: where it listens and its process."""

    name: str
    process: servers.ServerProcess
    directory: Path
    port: int
    socket: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


_running: dict[str, Daemon] = {}
_failed: dict[str, Exception] = {}
_lock = defer.DeferredLock()


async def _once(name: str, start: Callable[[], Coroutine[Any, Any, Daemon]]) -> Daemon:
    """Start the daemon on first use; later callers get it (or the same start-up error at
    once, instead of waiting for another doomed start)."""
    await _lock.acquire()
    try:
        if name in _failed:
            raise _failed[name]
        if name not in _running:
            try:
                _running[name] = await start()
            except RuntimeError as e:
                _failed[name] = e
                raise
        return _running[name]
    finally:
        _lock.release()


async def _launch(daemon: Daemon, timeout: float) -> Daemon:  # noqa: ASYNC109
    """Start the process and wait for its port; on failure stop it and remove its dir."""
    daemon.process.start()
    try:
        await daemon.process.wait_for_port(daemon.port, timeout=timeout)
    except BaseException:
        await daemon.process.stop()
        shutil.rmtree(daemon.directory, ignore_errors=True)
        raise
    return daemon


def _stop_all() -> None:
    for daemon in list(_running.values()):
        daemon.process.stop_blocking()
        if daemon.name == "rspamd":
            _save_rspamd_cache(daemon.directory / "db")
        shutil.rmtree(daemon.directory, ignore_errors=True)
    _running.clear()


atexit.register(_stop_all)


async def spamd() -> Daemon:
    """spamd with the bundled rules, network tests off (`--local`)."""
    binary = servers.require_binary("spamd", "spamd")

    async def start() -> Daemon:
        directory = servers.tempdir("mailcore-spamd-")
        port = servers.free_port()
        sock = directory / "spamd.sock"
        process = servers.ServerProcess([
            binary, f"--listen=127.0.0.1:{port}", f"--listen={sock}",
            "--allowed-ips=127.0.0.1", "--username=nobody", "--groupname=nogroup",
            "--local", "--nouser-config", "--max-children=2", "--min-children=1",
            f"--pidfile={directory}/spamd.pid", f"--syslog={directory}/spamd.log",
            "--socketmode=0666",
        ], directory=directory, name="spamd")
        return await _launch(Daemon("spamd", process, directory, port, str(sock)), 30)

    return await _once("spamd", start)


async def clamd() -> Daemon:
    """clamd whose only signatures are EICAR (by MD5 and by body), StreamMaxLength 2 MiB."""
    binary = servers.require_binary("clamd", "clamav-daemon")

    async def start() -> Daemon:
        directory = servers.tempdir("mailcore-clamd-")
        port = servers.free_port()
        db = directory / "db"
        db.mkdir()
        (db / "local.hdb").write_text(
            f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Eicar-Test-Signature-Local\n")
        (db / "local.ndb").write_text(f"Eicar-Test-Signature-Body:0:*:{EICAR.hex()}\n")
        sock = directory / "clamd.sock"
        (directory / "clamd.conf").write_text("\n".join([
            f"LocalSocket {sock}",
            f"TCPSocket {port}",
            "TCPAddr 127.0.0.1",
            f"DatabaseDirectory {db}",
            "Foreground yes",
            f"LogFile {directory}/clamd.log",
            f"PidFile {directory}/clamd.pid",
            f"StreamMaxLength {CLAMD_STREAM_MAX}",
            "",
        ]))
        process = servers.ServerProcess(
            [binary, "-c", str(directory / "clamd.conf")], directory=directory, name="clamd")
        return await _launch(Daemon("clamd", process, directory, port, str(sock)), 30)

    return await _once("clamd", start)


async def rspamd() -> Daemon:
    """rspamd with one normal worker, offline, its DB seeded from the regexp cache."""
    binary = servers.require_binary("rspamd", "rspamd")

    async def start() -> Daemon:
        directory = servers.tempdir("mailcore-rspamd-")
        port, controller, proxy, dns = servers.free_ports(4)
        conf = directory / "conf"
        for sub in ("override.d", "local.d"):
            (conf / sub).mkdir(parents=True)
        (conf / "override.d" / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        (conf / "override.d" / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n')
        (conf / "override.d" / "worker-proxy.inc").write_text(
            f'bind_socket = "127.0.0.1:{proxy}";\ncount = 1;\nmilter = yes;\n'
            'upstream "local" { default = yes; self_scan = yes; }\n')
        (conf / "override.d" / "logging.inc").write_text(
            f'type = "file";\nfilename = "{directory}/log/rspamd.log";\nlevel = "notice";\n')
        (conf / "local.d" / "options.inc").write_text(
            f'dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 0.2s; retransmits = 1; }}\n')
        for module in _RSPAMD_OFFLINE:
            (conf / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        user = pwd.getpwnam("_rspamd") if os.geteuid() == 0 else None
        for sub in ("db", "run", "log"):
            (directory / sub).mkdir()
        _seed_rspamd_cache(directory / "db")
        if user is not None:
            for sub in ("db", "run", "log"):
                for path in [directory / sub, *(directory / sub).iterdir()]:
                    os.chown(path, user.pw_uid, user.pw_gid)
        argv = [binary, "-f", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={conf}", f"--var=DBDIR={directory}/db",
                f"--var=RUNDIR={directory}/run", f"--var=LOGDIR={directory}/log"]
        if user is not None:
            argv[2:2] = ["-u", "_rspamd", "-g", "_rspamd"]
        process = servers.ServerProcess(argv, directory=directory, name="rspamd")
        return await _launch(Daemon("rspamd", process, directory, port), 60)

    return await _once("rspamd", start)


def _seed_rspamd_cache(db: Path) -> None:
    if not _RSPAMD_CACHE.is_dir():
        return
    for path in _RSPAMD_CACHE.iterdir():
        if path.name.endswith(_RSPAMD_CACHE_SUFFIXES):
            shutil.copy2(path, db / path.name)


def _save_rspamd_cache(db: Path) -> None:
    try:
        _RSPAMD_CACHE.mkdir(parents=True, exist_ok=True)
        for path in db.iterdir():
            target = _RSPAMD_CACHE / path.name
            if path.name.endswith(_RSPAMD_CACHE_SUFFIXES) and not target.exists():
                partial = target.with_name(target.name + f".{os.getpid()}.tmp")
                shutil.copy2(path, partial)
                partial.replace(target)
    except OSError:
        pass  # the cache only saves start-up time


# -- unit-test helpers (no daemon, no reactor) ---------------------------------------------


class FakeEndpoint:
    """An IStreamClientEndpoint for protocol tests: each connect() hands the protocol a
    StringTransport (kept in `transports`), fails with `error`, or (with `hang`) never
    completes until cancelled, like a connection attempt to a black hole."""

    def __init__(self, *, error: Exception | None = None, hang: bool = False) -> None:
        self.error = error
        self.hang = hang
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.error is not None:
            return defer.fail(self.error)
        if self.hang:
            def cancel(d: defer.Deferred[Any]) -> None:
                self.cancelled += 1
                d.errback(ConnectingCancelledError(None))

            return defer.Deferred(cancel)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        self.transports.append(transport)
        self.protocols.append(proto)
        proto.makeConnection(transport)
        return defer.succeed(proto)


def message(
    body: bytes = b"Hello Bob,\r\n\r\nare we still on for lunch on Thursday?\r\n\r\nAlice\r\n",
    *,
    headers: list[tuple[str, str]] | None = None,
    date: str | None = None,
) -> bytes:
    """A well-formed RFC 5322 message (From, To, Subject, Date, Message-ID) with `body`,
    ending with CRLF as every message that came through SMTP does (rspamd, for one, only
    sees GTUBE on a terminated line)."""
    if headers is None:
        headers = [
            ("From", "Alice <alice@example.com>"),
            ("To", "Bob <bob@example.org>"),
            ("Subject", "Lunch on Thursday"),
            ("Date", date or formatdate(localtime=False)),
            ("Message-ID", "<20251124.lunch.1@example.com>"),
        ]
    head = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    if not body.endswith(b"\n"):
        body += b"\r\n"
    return head + b"\r\n" + body


def multipart(
    parts: list[tuple[list[tuple[str, str]], bytes]],
    *,
    boundary: str = "==mailcore-test==",
    subtype: str = "mixed",
) -> bytes:
    """A multipart message: each part is (its header fields, its already-encoded body)."""
    head = [
        ("From", "Alice <alice@example.com>"),
        ("To", "Bob <bob@example.org>"),
        ("Subject", "Files"),
        ("Date", formatdate(localtime=False)),
        ("Message-ID", "<20251124.files.1@example.com>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/{subtype}; boundary="{boundary}"'),
    ]
    return message(multipart_body(parts, boundary), headers=head)


def multipart_body(parts: list[tuple[list[tuple[str, str]], bytes]], boundary: str) -> bytes:
    """The body of a multipart entity: delimiter, part headers, part body, close."""
    out = [b"This is a multi-part message in MIME format.\r\n"]
    for fields, body in parts:
        out.append(f"--{boundary}\r\n".encode())
        out.extend(f"{k}: {v}\r\n".encode() for k, v in fields)
        out.append(b"\r\n" + body + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def attachment(
    filename: str, data: bytes, content_type: str = "application/octet-stream",
) -> tuple[list[tuple[str, str]], bytes]:
    """A base64 attachment part for `multipart`."""
    return (
        [("Content-Type", f'{content_type}; name="{filename}"'),
         ("Content-Transfer-Encoding", "base64"),
         ("Content-Disposition", f'attachment; filename="{filename}"')],
        base64.encodebytes(data).replace(b"\n", b"\r\n"),
    )


def text_part(text: bytes = b"See the attachment.") -> tuple[list[tuple[str, str]], bytes]:
    """A plain text part for `multipart`."""
    return ([("Content-Type", "text/plain; charset=utf-8")], text)


def zip_bytes(files: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive in memory holding `files`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()

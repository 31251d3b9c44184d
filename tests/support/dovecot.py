"""A real Dovecot for fetch tests: IMAP (STARTTLS), IMAPS, POP3 (STLS) and POP3S on 127.0.0.1.

One instance per test class (`await DovecotServer.start(test)` in a class-level fixture, or
per test). Its certificate is signed by a CA made here and names only `localhost` (no IP
address), so a client that trusts `ca_pem` verifies `localhost` and fails on `127.0.0.1`:
both the right and the wrong host name can be tested. Mailboxes are filled by writing
Maildir files directly (fast: hundreds of messages in milliseconds) and then running
`doveadm index`, as the notes in shared/notes/real-components.md describe.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import defer

from tests.support.servers import ServerProcess, free_ports, missing, require_binary, tempdir
from tests.support.testca import PKI, make_pki

_counter = itertools.count(1)


@functools.cache
def dovecot_pki() -> PKI:
    """Dovecot's CA and certificate: DNS:localhost only, so 127.0.0.1 is a wrong host name."""
    return make_pki("Mailcore Fetch Test CA")


_CONFIG = """\
protocols = imap pop3
listen = 127.0.0.1
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
ssl = yes
ssl_cert = <{dir}/cert.pem
ssl_key = <{dir}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
mail_location = maildir:{dir}/mail/%u
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 0
pop3_uidl_format = %g
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
{extra}
"""


class DovecotServer:
    """One Dovecot instance with users `alice`, `bob` and `u1`..`u60` (password `secret`);
    tests sharing an instance take a fresh user each (`new_user`)."""

    USERS = ("alice", "bob", *(f"u{i}" for i in range(1, 61)))
    PASSWORD = "secret"

    def __init__(self, directory: Path, extra_config: str = "") -> None:
        self.dovecot = require_binary("dovecot", "dovecot-imapd dovecot-pop3d")
        self.doveadm = require_binary("doveadm", "dovecot-core")
        for program, package in (("imap", "dovecot-imapd"), ("pop3", "dovecot-pop3d")):
            if not os.access(f"/usr/lib/dovecot/{program}", os.X_OK):
                raise missing(f"Dovecot's {program} is not installed: apt-get install {package}")
        self.dir = directory
        self.pki = dovecot_pki()
        self.imap, self.imaps, self.pop3, self.pop3s = free_ports(4)
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        self.extra_config = extra_config
        self.process: ServerProcess | None = None
        self._next_user = 0

    def new_user(self) -> str:
        """A user nobody used yet on this instance (an empty mailbox)."""
        self._next_user += 1
        return f"u{self._next_user}"

    @property
    def config_path(self) -> Path:
        return self.dir / "dovecot.conf"

    def write_config(self) -> None:
        for sub in ("run", "state", "mail"):
            (self.dir / sub).mkdir(exist_ok=True)
        (self.dir / "cert.pem").write_bytes(self.pki.cert_pem)
        key = self.dir / "key.pem"
        key.write_bytes(self.pki.key_pem)
        key.chmod(0o600)
        (self.dir / "passwd").write_text(
            "".join(f"{u}:{{PLAIN}}{self.PASSWORD}::::::\n" for u in self.USERS)
        )
        # Dovecot's auth process reads it as the dovecot user, whatever umask the test
        # process has (the daemon's restrict_umask leaves 077 in a process that ran it).
        (self.dir / "passwd").chmod(0o644)
        self.config_path.write_text(_CONFIG.format(
            dir=self.dir, uid=self.uid, gid=self.gid, imap=self.imap, imaps=self.imaps,
            pop3=self.pop3, pop3s=self.pop3s, extra=self.extra_config,
        ))
        os.chown(self.dir / "mail", self.uid, self.gid)

    async def start(self) -> DovecotServer:
        self.write_config()
        self.process = ServerProcess(
            [self.dovecot, "-F", "-c", str(self.config_path)], directory=self.dir,
            name="dovecot",
        )
        self.process.start()
        for port in (self.imap, self.imaps, self.pop3, self.pop3s):
            await self.process.wait_for_port(port)
        return self

    async def stop(self) -> None:
        if self.process is not None:
            await self.process.stop()

    # -- mailboxes -------------------------------------------------------------------------

    def folder_dir(self, user: str, folder: str) -> Path:
        """The Maildir++ directory of `folder` ("INBOX", "Archive", "Lists/Python")."""
        base = self.dir / "mail" / user
        if folder.upper() == "INBOX":
            return base
        return base / ("." + folder.replace("/", "."))

    def _chown_tree(self, path: Path) -> None:
        for root, _dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in files:
                os.chown(os.path.join(root, name), self.uid, self.gid)

    def add_messages(self, user: str, folder: str, messages: list[bytes],
                     *, index: bool = True, mtimes: list[float] | None = None) -> list[Path]:
        """Write messages as Maildir files (in order: later files get higher UIDs). The
        file time is the INTERNALDATE (default: November 2023)."""
        box = self.folder_dir(user, folder)
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        if box != self.dir / "mail" / user:
            (box / "maildirfolder").touch()
        paths = []
        stamp = 1_700_000_000
        for i, raw in enumerate(messages):
            n = next(_counter)
            path = box / "cur" / f"{stamp + n}.M{n}P{os.getpid()}.test:2,"
            path.write_bytes(raw)
            when = mtimes[i] if mtimes is not None else stamp + n
            os.utime(path, (when, when))
            paths.append(path)
        self._chown_tree(self.dir / "mail" / user)
        if index:
            self.index(user, folder)
        return paths

    def index(self, user: str, folder: str = "*") -> None:
        """`doveadm index` so the server assigns UIDs in file order now. Blocks briefly."""
        self.doveadm_run("index", "-u", user, folder)

    def doveadm_run(self, *args: str) -> str:
        """Run doveadm against this server; a failure raises with the end of the server's
        log (which says why: Dovecot's own message only points to it)."""
        result = subprocess.run(
            [self.doveadm, "-c", str(self.config_path), *args],
            capture_output=True, check=False, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {result.stderr.decode()}\n"
                               f"dovecot.log ends:\n{self.log_tail()}")
        return result.stdout.decode()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "dovecot.log").read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def add_flag(self, user: str, folder: str, uids: str, flag: str) -> None:
        self.doveadm_run("flags", "add", "-u", user, flag, "mailbox", folder, "uid", uids)

    def expunge(self, user: str, folder: str, uids: str) -> None:
        self.doveadm_run("expunge", "-u", user, "mailbox", folder, "uid", uids)

    def create_folder(self, user: str, folder: str) -> None:
        self.doveadm_run("mailbox", "create", "-u", user, folder)

    def source_hashes(self, user: str, folder: str) -> list[str]:
        """SHA-256 of every message file in a folder (what the server holds)."""
        box = self.folder_dir(user, folder)
        return sorted(
            hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("cur", "new") if (box / sub).exists()
            for p in (box / sub).iterdir()
        )

    def reset_uidvalidity(self, user: str, folder: str) -> None:
        """Give a folder a new UIDVALIDITY (and new UIDs), as a server rebuild would."""
        box = self.folder_dir(user, folder)
        uidlist = box / "dovecot-uidlist"
        old = 0
        if uidlist.exists():
            header = uidlist.read_text().split("\n", 1)[0].split()
            for field in header:
                if field.startswith("V"):
                    old = int(field[1:])
        for path in box.iterdir():
            if path.name.startswith("dovecot") and path.is_file():
                path.unlink()
        # Renaming the files drops any UID Dovecot might keep in their names.
        for sub in ("cur", "new"):
            for p in sorted((box / sub).iterdir()):
                p.rename(p.with_name("r" + p.name))
        self.index(user, folder)
        new = int(uidlist.read_text().split("\n", 1)[0].split()[1][1:])
        if new == old:
            text = uidlist.read_text().split("\n", 1)
            fields = [f"V{old + 1000}" if f.startswith("V") else f for f in text[0].split()]
            uidlist.write_text(" ".join(fields) + "\n" + (text[1] if len(text) > 1 else ""))
            for path in box.iterdir():
                if path.name.startswith("dovecot.index"):
                    path.unlink()
            self._chown_tree(box)


class DovecotClassMixin:
    """One Dovecot per test class, started by the first test that asks and stopped (by PID)
    after the class's last test; tests take a fresh user each, so they do not see each
    other. Trial runs no tearDownClass, so the mixin counts the tests it has seen, and an
    atexit hook stops a server that a partial run (one test selected) left behind."""

    _dovecot: DovecotServer | None = None
    _tests_seen: int = 0
    extra_config = ""

    async def dovecot(self) -> DovecotServer:
        cls = type(self)
        if cls.__dict__.get("_dovecot") is None:
            server = await start_dovecot(self, self.extra_config)
            cls._dovecot = server
            atexit.register(_stop_blocking, server)
        server = cls.__dict__["_dovecot"]
        assert server is not None
        return server

    def tearDown(self) -> Any:
        cls = type(self)
        cls._tests_seen = cls.__dict__.get("_tests_seen", 0) + 1
        total = len([name for name in dir(cls) if name.startswith("test")])
        server = cls.__dict__.get("_dovecot")
        result = super().tearDown()  # type: ignore[misc]
        if server is None or cls._tests_seen < total:
            return result
        cls._dovecot = None
        return defer.Deferred.fromCoroutine(_stop(server))


async def _stop(server: DovecotServer) -> None:
    await server.stop()
    shutil.rmtree(server.dir, True)


def _stop_blocking(server: DovecotServer) -> None:
    if server.process is not None and server.process.running():
        server.process.stop_blocking()
    shutil.rmtree(server.dir, True)


async def start_dovecot(test: object, extra_config: str = "") -> DovecotServer:
    """A running Dovecot in a fresh temp dir; the caller stops it (`await server.stop()`)."""
    directory = tempdir("mailcore-dovecot-")
    server = DovecotServer(directory, extra_config)
    try:
        await server.start()
    except BaseException:
        shutil.rmtree(directory, True)
        raise
    return server

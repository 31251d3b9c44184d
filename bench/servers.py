"""What operators would otherwise run, for bench/run.py to measure side by side: a private
Postfix MX relay and a private rspamd.

Postfix: an instance of its own in a temp dir (its own config_directory, queue_directory and
data_directory; one smtpd on 127.0.0.1 and a free port; `relay_domains` the bench domain,
`relayhost` the bench's smtp-sink, `mynetworks` 127.0.0.0/8; no local delivery, no chroot,
logging to a file through postlogd), started with `postfix -c DIR start` and stopped with
`postfix -c DIR stop` (then its master by PID if that did not end it). The system instance
(/etc/postfix) is never touched. Debian's Postfix runs its daemons as `mail_owner` postfix
and needs root to start: the bench runs as root.

rspamd: the integration tests' configuration (tests/support/filterd.py: offline, one normal
worker, a proxy worker in milter mode with `self_scan`), started as a plain child process
and stopped by PID. With `milter=True` a Postfix instance sends every message through the
proxy (`smtpd_milters`), as a Postfix + rspamd site does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from procs import REPO, free_port, need, terminate, wait_port


def _tree_pids(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of process `root`, its live descendants and the children
    they already reaped: for multi-process servers (Postfix's master and its daemons)."""
    total = 0.0
    for pid in _tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix MX relay for `domain`, relaying to 127.0.0.1:`next_hop`; with
    `milter` (host:port of rspamd's proxy) every message is scanned before it is queued."""

    def __init__(self, directory: Path, next_hop: int, domain: str = "customer.test",
                 milter: str | None = None) -> None:
        self.postfix = need("postfix", "postfix")
        if os.geteuid() != 0:
            raise SystemExit("the Postfix legs need root (Postfix starts as root and runs "
                             "its daemons as user postfix)")
        pwd.getpwnam("postfix")  # Debian's mail_owner; KeyError says what is missing
        self.directory = directory
        self.config = directory / "etc"
        self.queue = directory / "spool"
        self.data = directory / "data"
        self.log = directory / "postfix.log"
        self.port = free_port()
        for d in (self.config, self.queue, self.data):
            d.mkdir(parents=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data, postfix.pw_uid, postfix.pw_gid)
        self.log.touch()
        os.chown(self.log, postfix.pw_uid, postfix.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.test",
            "mydomain": "postfix-bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:no local delivery here",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relay_domains": domain,
            "relayhost": f"[127.0.0.1]:{next_hop}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "default_process_limit": "200",
            "biff": "no",
            "syslog_name": "postfix-bench",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(directory),
            "smtputf8_enable": "no",
        }
        if milter is not None:
            main.update({
                "smtpd_milters": f"inet:{milter}",
                "non_smtpd_milters": "",
                "milter_protocol": "6",
                "milter_mail_macros": "i {mail_addr} {client_addr} {client_name} {auth_authen}",
                "milter_default_action": "tempfail",
            })
        (self.config / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in main.items()))
        (self.config / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        self.master_pid = 0
        self._run("start")
        deadline = time.monotonic() + 30
        pid_file = self.queue / "pid" / "master.pid"
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                break
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        if not self.master_pid:
            self.stop()
            raise SystemExit(f"private Postfix did not start: see {self.log}")
        self._wait_port()

    def _run(self, command: str) -> None:
        result = subprocess.run(
            [self.postfix, "-c", str(self.config), command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "MAIL_CONFIG": str(self.config)},
        )
        if result.returncode != 0 and command == "start":
            raise SystemExit(f"postfix -c {self.config} start failed: "
                             f"{result.stdout.decode(errors='replace')}")

    def _wait_port(self) -> None:
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"private Postfix does not listen on {self.port}: see {self.log}")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.master_pid) if self.master_pid else 0.0

    def stop(self) -> None:
        """`postfix stop`; the master by PID (SIGKILL after 10 s) if that did not end it."""
        self._run("stop")
        if not self.master_pid:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(self.master_pid):
            time.sleep(0.05)
        for pid in _tree_pids(self.master_pid) if _alive(self.master_pid) else []:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        self.master_pid = 0


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Rspamd:
    """A private rspamd (the integration tests' configuration): `address` is its normal
    worker (HTTP, for our rspamd filter), `milter` its proxy worker in milter mode."""

    def __init__(self, directory: Path) -> None:
        import sys

        sys.path.insert(0, str(REPO))
        from tests.support import filterd

        binary = need("rspamd", "rspamd")
        self.directory = directory
        port, controller, proxy, dns = (free_port() for _ in range(4))
        self.address = f"127.0.0.1:{port}"
        self.milter = f"127.0.0.1:{proxy}"
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
        for module in filterd._RSPAMD_OFFLINE:
            (conf / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
        for sub in ("db", "run", "log"):
            (directory / sub).mkdir()
        filterd._seed_rspamd_cache(directory / "db")
        user = pwd.getpwnam("_rspamd") if os.geteuid() == 0 else None
        if user is not None:
            for sub in ("db", "run", "log"):
                for path in [directory / sub, *(directory / sub).iterdir()]:
                    os.chown(path, user.pw_uid, user.pw_gid)
        argv = [binary, "-f", "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={conf}", f"--var=DBDIR={directory}/db",
                f"--var=RUNDIR={directory}/run", f"--var=LOGDIR={directory}/log"]
        if user is not None:
            argv[2:2] = ["-u", "_rspamd", "-g", "_rspamd"]
        self._save_cache = filterd._save_rspamd_cache
        self.proc = subprocess.Popen(argv, cwd=directory, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=(directory / "rspamd.err").open("wb"))
        try:
            wait_port(port, self.proc, timeout=180)  # ~15 s, more when the CPU is busy
            wait_port(proxy, self.proc, timeout=30)
            self._wait_ready(controller)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("rspamd does not answer /ping")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.proc.poll() is None else 0.0

    def stop(self) -> None:
        terminate(self.proc, grace=10)
        self._save_cache(self.directory / "db")
        shutil.rmtree(self.directory, ignore_errors=True)


class Postgres:
    """A throwaway PostgreSQL cluster (as tests/support/pg.py starts one: `initdb` and
    `postgres` as user postgres in a temp dir, 127.0.0.1 and a free port, fsync on) with one
    empty database; `url` is its SQLAlchemy URL."""

    def __init__(self, directory: Path, database: str = "bench") -> None:
        found = shutil.which("initdb") or next(
            iter(sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                        reverse=True)), None)
        if found is None:
            raise SystemExit("initdb not found: apt-get install postgresql")
        initdb = found
        bindir = Path(os.path.realpath(initdb)).parent
        self.directory = directory
        self.port = free_port()
        data, sockets = directory / "data", directory / "run"
        user = "postgres" if os.geteuid() == 0 else None
        for d in (data, sockets):
            d.mkdir(mode=0o700, parents=True)
            if user is not None:
                shutil.chown(d, user, user)
        groups: list[str] | None = [] if user is not None else None
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"],
            cwd=directory, env=clean, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, user=user, group=user, extra_groups=groups,
        )
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", str(sockets), "-c", "max_connections=200",
             "-c", "shared_buffers=128MB"],
            cwd=directory, env=clean, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(directory / "postgres.log").open("wb"), user=user, group=user,
            extra_groups=groups,
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"
        try:
            wait_port(self.port, self.proc)
            self._create(database)
        except BaseException:
            self.stop()
            raise

    def _create(self, database: str) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                                     autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{database}"')  # type: ignore[arg-type]
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID; SIGKILL after 20 s."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

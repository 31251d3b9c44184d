"""Migrate benchmark: Mailcore's migrate job next to mbsync, between the same two IMAP stores.

1. A private Dovecot (127.0.0.1, STARTTLS with a test CA) gets 20,000 messages of about 4 KiB
   in alice's INBOX (Maildir files and `doveadm index`, as bench/fetch.py does).
2. `twistd -n mailcore` on a temp data dir backs alice up (an IMAP2API account, one sync:
   reported, not part of the migrate's time, since a Dropmyemail account is backed up before
   anyone migrates it). The daemon stops; a migrate of that account into Dovecot user `u1`
   is queued in its store; the daemon starts and its job runner takes the job at once. The
   rate is messages over the job's own time (its start to its end: the backup brought up to
   date, the destination read, every message APPENDed and recorded).
3. `mbsync` (isync, FSync on, its default) pushes alice's INBOX into user `bob` on the same
   Dovecot: two IMAP stores, `Sync Push`-equivalent (`Far` = bob, `Near` = alice, `Sync
   Push`), `Create Far`. Wall time of the run.

Both destinations are then counted. Prints messages/s of each, the ratio (target: Mailcore at
least 1.0 x mbsync) and the peak RSS of the daemon (during the migrate run) and of mbsync.
Exits 1 when the target is missed or a step fails.

Options: --messages N (20000), --keep (leave the temp dir).
Needs dovecot-imapd and isync.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from procs import REPO, cpu_seconds, keep_or_remove, need

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch import USER, Daemon, Dovecot, add_dovecot_account, add_user, sync, workspace

TARGET = 1.0
DESTINATION = "u1"
MBSYNC_DESTINATION = "bob"


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a running process (KiB), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def count(dovecot: Dovecot, user: str) -> int:
    out = dovecot.server.doveadm_run("mailbox", "status", "-u", user, "messages", "INBOX")
    return int(out.strip().split("=")[-1])


def queue_migrate(daemon: Daemon, key: str, account_id: int, dovecot: Dovecot) -> int:
    """Insert a queued migrate of the account into DESTINATION (daemon stopped)."""
    from sqlalchemy import create_engine, select

    from mailcore.fetch.jobs import thd_create_job
    from mailcore.fetch.secrets import SecretBox
    from mailcore.store.schema import fetch_accounts

    s = dovecot.server
    engine = create_engine(f"sqlite:///{(daemon.data / 'mailcore.sqlite').resolve()}")
    box = SecretBox(key.encode("ascii"))
    now = datetime.datetime.now(datetime.UTC)
    with engine.begin() as conn:
        user_id = conn.execute(select(fetch_accounts.c.user_id)
                               .where(fetch_accounts.c.id == account_id)).scalar_one()
        job_id = thd_create_job(conn, {
            "kind": "migrate", "user_id": user_id, "account_id": account_id,
            "status": "queued", "email": DESTINATION, "host": "localhost", "port": s.imap,
            "protocol": "imap", "start_tls": True, "username": DESTINATION,
            "password_enc": box.encrypt(s.PASSWORD), "tls_ca_pem": s.pki.ca_pem.decode(),
            "created_at": now, "updated_at": now})
    engine.dispose()
    return job_id


def job_row(daemon: Daemon, job_id: int) -> Any:
    from sqlalchemy import create_engine, select

    from mailcore.store.schema import mailbox_jobs

    engine = create_engine(f"sqlite:///{(daemon.data / 'mailcore.sqlite').resolve()}")
    with engine.connect() as conn:
        row = conn.execute(select(mailbox_jobs).where(mailbox_jobs.c.id == job_id)).one()
    engine.dispose()
    return row


def seconds(value: Any) -> float:
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.UTC)
    return float(value.timestamp())


def run_mbsync(mbsync: str, dovecot: Dovecot, directory: Path) -> tuple[float, int, float]:
    """mbsync pushing alice's INBOX into bob's; (seconds, peak RSS KiB, CPU seconds)."""
    s = dovecot.server
    ca = directory / "ca.pem"
    ca.write_bytes(s.pki.ca_pem)
    state = directory / "mbsync-state"
    state.mkdir()
    config = directory / "mbsyncrc-migrate"
    account = ("IMAPAccount {name}\nHost localhost\nPort {port}\nUser {user}\nPass {pw}\n"
               "SSLType STARTTLS\nCertificateFile {ca}\n\n")
    config.write_text(
        account.format(name="src", port=s.imap, user=USER, pw=s.PASSWORD, ca=ca)
        + account.format(name="dst", port=s.imap, user=MBSYNC_DESTINATION, pw=s.PASSWORD,
                         ca=ca)
        + "IMAPStore src\nAccount src\n\nIMAPStore dst\nAccount dst\n\n"
        f"Channel migrate\nFar :dst:\nNear :src:\nPatterns INBOX\nCreate Far\n"
        f"Sync Push\nSyncState {state}/\n"
    )
    started = time.monotonic()
    proc = subprocess.Popen([mbsync, "-q", "-c", str(config), "-a"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while True:
        peak = max(peak, peak_rss_kib(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    err = proc.stderr.read() if proc.stderr else b""
    if proc.returncode != 0:
        raise SystemExit(f"mbsync failed: {err.decode(errors='replace')}")
    return elapsed, peak, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    mbsync = need("mbsync", "isync")
    need("dovecot", "dovecot-imapd")
    base, dovecot, daemon = workspace("mailcore-bench-migrate-")
    key = Fernet.generate_key().decode("ascii")
    daemon.config.write_text(daemon.config.read_text().replace(
        "[fetch]\n", f'[fetch]\nsecret_key = "{key}"\n', 1))
    rows: list[tuple[str, str]] = []
    failed = False
    try:
        dovecot.start()
        print(f"filling Dovecot with {args.messages} messages ...", flush=True)
        rows.append(("Dovecot fill (Maildir files + doveadm index)",
                     f"{dovecot.fill(args.messages):.1f} s"))

        daemon.start()
        token = add_user(daemon)
        server = add_dovecot_account(daemon, token, dovecot, "the account")
        print("backing the source up ...", flush=True)
        wall, _inside, new = sync(daemon, token, server["id"])
        if new != args.messages:
            raise SystemExit(f"the backup holds {new} messages, expected {args.messages}")
        rows.append(("backup of the source first (one sync; not timed below)",
                     f"{args.messages / wall:,.0f} msg/s ({wall:.1f} s)"))
        daemon.stop()

        print("migrate: mbsync ...", flush=True)
        theirs_s, theirs_rss, theirs_cpu = run_mbsync(mbsync, dovecot, base)
        if (copied := count(dovecot, MBSYNC_DESTINATION)) != args.messages:
            raise SystemExit(f"mbsync copied {copied} messages, expected {args.messages}")

        print("migrate: mailcore ...", flush=True)
        job_id = queue_migrate(daemon, key, server["id"], dovecot)
        started = time.monotonic()
        daemon.start()
        assert daemon.proc is not None
        cpu_before = cpu_seconds(daemon.proc.pid)
        peak = [0]
        watching = True

        def watch() -> None:
            while watching:
                peak[0] = max(peak[0], peak_rss_kib(daemon.proc.pid))  # type: ignore[union-attr]
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        while True:
            job = job_row(daemon, job_id)
            if job.status in ("done", "failed"):
                break
            if time.monotonic() - started > 1800:
                raise SystemExit("the migrate did not end in 30 minutes")
            time.sleep(0.2)
        watching = False
        watcher.join()
        ours_cpu = cpu_seconds(daemon.proc.pid) - cpu_before
        if job.status != "done":
            raise SystemExit(f"the migrate failed: {job.reason}")
        ours_s = seconds(job.end_time) - seconds(job.start_time)
        if (copied := count(dovecot, DESTINATION)) != args.messages:
            raise SystemExit(f"mailcore copied {copied} messages, expected {args.messages}")
        ours = args.messages / ours_s
        theirs = args.messages / theirs_s
        ratio = ours / theirs
        rows.append(("migrate, mailcore (job start to end, exactly-once records)",
                     f"{ours:,.0f} msg/s ({ours_s:.1f} s; {job.appended:,} appended)"))
        rows.append(("migrate, mbsync (Sync Push between two IMAP stores, FSync on)",
                     f"{theirs:,.0f} msg/s ({theirs_s:.1f} s)"))
        rows.append(("ratio mailcore / mbsync (target >= 1.0)", f"{ratio:.2f}"))
        rows.append(("CPU per message: mailcore daemon (start, migrate) / mbsync",
                     f"{1000 * ours_cpu / args.messages:.2f} ms / "
                     f"{1000 * theirs_cpu / args.messages:.2f} ms"))
        rows.append(("peak RSS: mailcore daemon (migrate run) / mbsync",
                     f"{peak[0] / 1024:.0f} MiB / {theirs_rss / 1024:.0f} MiB"))
        failed = ratio < TARGET
    finally:
        daemon.stop()
        dovecot.stop()
        keep_or_remove(base, args.keep)
    width = max(len(label) for label, _ in rows) if rows else 0
    print()
    print(f"Migrate: {args.messages:,} messages of ~4 KiB, one Dovecot, user to user")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    if failed:
        print(f"FAILED: mailcore's migrate rate is under {TARGET:.1f} x mbsync's")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

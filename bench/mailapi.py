"""Mail API benchmark (issue 14): the outbox into an smtp-sink, and the listing under wrk.

1. Outbox: `twistd -n mailcore` on a temp data dir (SQLite), user bob with the hosted
   mailbox bob@hosted.test, customer.test relayed to Postfix's `smtp-sink`. N messages
   (2,000) are posted through `POST /api/v1/mail/` (status outbox, JSON, 16 clients at
   once) and timed until the sink has every one: posts/s (202s) and delivered messages/s,
   with the daemon's CPU time per message. The outbox is FIFO per sending mailbox, so this
   is the rate of one mailbox's ordered stream.
2. Listing: the daemon stops; the store gets 100,000 inbox messages in bob's mailbox,
   written straight through the store layer (one transaction of bulk inserts); the daemon
   starts again and `wrk` measures `GET /api/v1/mail/` (the newest page, count 25) and a
   deep page (`cursor` = a mail about 90,000 from the top, through the keyset cursor), each
   with 1 and 16 connections: requests/s, p50 and p99 latency.

Issue 14 sets no numeric target: the figures are printed; the exit status is 1 only when a
step fails (a post not answered 202, a message that never reaches the sink, a listing that
answers anything but 200). Needs smtp-sink (apt-get install postfix; postfix itself never
runs) and wrk. Options: --messages N (2000), --clients N (16), --store N (100000),
--duration S (8), --keep (leave the temp dir).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from procs import REPO, MailcoreDaemon, cpu_seconds, free_port, keep_or_remove, need
from run import Sink
from wrk import wrk

sys.path.insert(0, str(REPO))

USER = "bob"
MAILBOX = "bob@hosted.test"
PASSWORD = "bench-Pa55word"  # noqa: S105 (a throwaway user of a temp store)
BODY = "Hello,\n\n" + "This is a line of the benchmark's outbox mail.\n" * 40


class Daemon(MailcoreDaemon):
    """`twistd -n mailcore` on a temp data dir; customer.test goes to the sink."""

    def __init__(self, directory: Path, sink_port: int) -> None:
        super().__init__(
            directory,
            "[web]\nlogin_rate = 0\nmax_connections_per_ip = 1000\n"
            # The bench measures the API, not its per-user rate (20/second by default).
            'mailapi_user_rate = "1000000000/hour"\n\n'
            "[pipeline]\nfiltering = false\n\n[queue]\nallow_loopback = true\n\n"
            # Nor the user's cap on recipients (500 an hour by default).
            "[limits]\nuser_recipients_per_hour = 0\nuser_recipients_per_day = 0\n",
            backlog=1000,
        )
        self.cli("init")
        self.cli("user", "add", USER, "--email", MAILBOX, "--password", PASSWORD)
        self.cli("domain", "add", "customer.test", "--owner", USER, "--redirect-to",
                 f"127.0.0.1:{sink_port}")
        self.cli("domain", "add", "hosted.test", "--owner", USER, "--local")
        self.cli("mailbox", "add", MAILBOX, "--owner", USER)
        self.token = self.cli("token", "create", USER, "--label", "bench").strip()

    @property
    def db_url(self) -> str:
        return f"sqlite:///{(self.data / 'mailcore.sqlite').resolve()}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> tuple[int, Any]:
        return self.request(method, path, body, {"Auth-Key": self.token}, timeout=120)


# -- 1. the outbox -----------------------------------------------------------------------------


def outbox(daemon: Daemon, sink: Sink, messages: int, clients: int) -> dict[str, float]:
    """Post `messages` outbox mails from `clients` threads; time the 202s and the sink."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = sink.count()
    cpu0 = cpu_seconds(pid)
    failures: list[str] = []
    lock = threading.Lock()
    next_index = [0]

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= messages or failures:
                    return
                next_index[0] += 1
            status, reply = daemon.call("POST", "/api/v1/mail/", {
                "status": "outbox", "to": f"rcpt{i % 50}@customer.test",
                "subject": f"bench {i}", "body": BODY})
            if status != 202:
                with lock:
                    failures.append(f"post {i}: {status} {reply}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    posted = time.perf_counter() - started
    if failures:
        raise SystemExit(f"outbox: {len(failures)} posts refused, first: {failures[0]}")
    if not sink.reach(before + messages):
        raise SystemExit(f"outbox: the sink has {sink.count() - before} of {messages}")
    delivered = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    return {"posts_per_s": messages / posted, "delivered_per_s": messages / delivered,
            "seconds": delivered, "cpu_ms_per_message": 1000 * cpu / messages}


# -- 2. the listing ----------------------------------------------------------------------------


def fill_store(db_url: str, count: int) -> float:
    """Add `count` inbox mails to bob's mailbox through the store layer (one transaction
    of bulk inserts); returns the seconds it took."""
    from sqlalchemy import insert, select

    from mailcore.mailapi.counts import thd_count_mail
    from mailcore.store import Database
    from mailcore.store.schema import mailapi_mail, mailboxes

    started = time.perf_counter()
    db = Database(db_url, None, synchronous=True)  # type: ignore[arg-type]

    def txn(conn: Any) -> None:
        box = conn.execute(select(mailboxes.c.id).where(mailboxes.c.address == MAILBOX)
                           ).scalar_one()
        now = time.time() - count
        used: set[str] = {r[0] for r in conn.execute(select(mailapi_mail.c.public_id))}
        rows = []
        for n in range(count):
            public_id = secrets.token_hex(4)[:7]
            while public_id in used:
                public_id = secrets.token_hex(5)[:10]
            used.add(public_id)
            rows.append({
                "public_id": public_id, "mailbox_id": box, "status": "inbox",
                "read": n % 3 == 0, "mail_from": f"Sender {n % 997} <s{n % 997}@far.test>",
                "to_addrs": MAILBOX, "subject": f"Stored mail {n}",
                "body": f"Body of stored mail {n}.\n" + "Some more text in it.\n" * 10,
                "created_at": now + n,
            })
            if len(rows) == 5000:
                conn.execute(insert(mailapi_mail), rows)
                rows = []
        if rows:
            conn.execute(insert(mailapi_mail), rows)
        thd_count_mail(conn, box, count)

    d = db.run("bench_fill_mailapi", txn)
    failure: list[Any] = []
    d.addErrback(failure.append)
    db.engine.dispose()
    if failure:
        failure[0].raiseException()
    return time.perf_counter() - started


def listing(daemon: Daemon, duration: int, connections: tuple[int, ...]
            ) -> list[tuple[str, int, dict[str, float]]]:
    status, first = daemon.call("GET", "/api/v1/mail/?count=1000")
    if status != 200:
        raise SystemExit(f"listing: {status} {first}")
    cursor = first["next_page_id"]
    for _ in range(89):  # about 90,000 mails down, by the keyset cursor
        status, page = daemon.call("GET", f"/api/v1/mail/?count=1000&cursor={cursor}")
        if status != 200 or page["next_page_id"] is None:
            break
        cursor = page["next_page_id"]
    paths = [("first page", "/api/v1/mail/?count=25"),
             ("deep page", f"/api/v1/mail/?count=25&cursor={cursor}")]
    results = []
    for label, path in paths:
        for c in connections:
            wrk(daemon.base + path, daemon.token, 1, c)  # warm up
            stats = wrk(daemon.base + path, daemon.token, duration, c)
            if stats["errors"]:
                raise SystemExit(f"listing {label}: {int(stats['errors'])} non-2xx replies")
            results.append((label, c, stats))
    return results


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--store", type=int, default=100000)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    need("smtp-sink", "postfix")
    need("wrk", "wrk")
    tmp = Path(tempfile.mkdtemp(prefix="mailcore-bench-mailapi-"))
    sink = Sink(tmp, free_port())
    daemon = Daemon(tmp, sink.port)
    try:
        daemon.start()
        print(f"outbox: posting {args.messages:,} messages ...", flush=True)
        sent = outbox(daemon, sink, args.messages, args.clients)
        daemon.stop()
        print(f"store: adding {args.store:,} inbox mails ...", flush=True)
        filled = fill_store(daemon.db_url, args.store)
        daemon.start()
        print("wrk: GET /api/v1/mail/ ...", flush=True)
        listed = listing(daemon, args.duration, (1, 16))
    finally:
        daemon.stop()
        sink.stop()
        keep_or_remove(tmp, args.keep)
    print()
    print(f"Mail API benchmark (issue 14 sets no numeric target; figures only). "
          f"{args.messages:,} outbox mails from one mailbox, {args.clients} clients; "
          f"{args.store:,} stored mails (filled in {filled:.1f} s); wrk -t2, {args.duration} s")
    print(f"  outbox: {sent['posts_per_s']:8.1f} posts/s (202)  "
          f"{sent['delivered_per_s']:8.1f} delivered/s at the sink  "
          f"({sent['seconds']:.1f} s, {sent['cpu_ms_per_message']:.2f} ms daemon CPU/message)")
    print(f"  {'GET /api/v1/mail/':<24}{'conns':>6}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for label, c, stats in listed:
        print(f"  {label:<24}{c:>6}{stats['rps']:>10.1f}{stats['p50']:>10.2f}"
              f"{stats['p99']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

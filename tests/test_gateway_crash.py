"""Durability: a real `twistd mailcore` relays thousands of messages to Postfix's smtp-sink
and is killed with SIGKILL at random moments, and restarted each time.

Every message that got a 250 must reach the next hop. A message the next hop receives twice
is a duplicate. The only window for one is between the next hop's 250 and our record of it
(the results journal, written as the reply is read): so no message whose delivery was on
record when the daemon died may arrive again, and duplicates stay under 0.1% of the
messages accepted. That window holds at most the transactions in flight at the kill, one per
connection (`[queue] hop_concurrency`), so a kill costs at most that many duplicates (with a
backlog to deliver, often about half of them): there are enough messages per kill for the
0.1% to hold even then. The test prints `duplicates: N of M (x.xx%)` (N counts every extra
copy) and the duplicates of each kill.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections import Counter
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from mailcore.queue.journal import NAMES as JOURNAL_NAMES
from mailcore.queue.settings import QueueSettings
from tests.support.mailsink import Daemon, SendLog, send_numbered
from tests.support.reactor import get_reactor
from tests.support.servers import (
    sleep,
    start_smtp_sink,
    tempdir_for,
)

KILLS = 2
# A kill costs at most HOP_CONCURRENCY duplicates, and makes the sends in flight (at most
# `concurrency`, 10) fail, unaccepted.
HOP_CONCURRENCY = QueueSettings().hop_concurrency
MESSAGES = 1000 * HOP_CONCURRENCY * KILLS + 10 * KILLS + 200

log = Logger()

# smtp-sink starts each message of its dump with this record.
_MESSAGE_START = b"X-Client-Addr: "
_SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.M)
_QUEUE_ID = re.compile(rb"\(Mailcore\) with \w+ id ([0-9A-Z]+)")


def dumped(dump: Path) -> list[tuple[int, bytes]]:
    """(sequence number, our queue id) of every message in smtp-sink's dump, in order of
    arrival (smtp-sink writes a message once it has taken it whole)."""
    try:
        data = dump.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for part in data.split(_MESSAGE_START)[1:]:
        seq, queue_id = _SEQ.search(part), _QUEUE_ID.search(part)
        assert seq is not None and queue_id is not None, part[:500]
        out.append((int(seq.group(1)), queue_id.group(1)))
    return out


def dumped_count(dump: Path) -> int:
    try:
        return dump.read_bytes().count(_MESSAGE_START)
    except FileNotFoundError:
        return 0


def journal_of(daemon: Daemon) -> bytes:
    """What the daemon's results journal holds (read after it died)."""
    return b"".join(
        path.read_bytes() for name in JOURNAL_NAMES if (path := daemon.data_dir / name).exists()
    )


async def sink_and_daemon(test: TestCase) -> tuple[Path, Daemon, int]:
    """A real smtp-sink dumping to a file (its path) and a started daemon relaying
    customer.test to it (and that domain's id); both stopped at the test's cleanup."""
    dump, sink_port = await start_smtp_sink(test)
    daemon = Daemon(tempdir_for(test), queue={"poll_interval": 0.5})
    domain_id = daemon.prepare_blocking("customer.test", sink_port)
    await daemon.start()
    test.addCleanup(daemon.stop)
    return dump, daemon, domain_id


async def kill_from_outside(daemon: Daemon, delay: float) -> None:
    """SIGKILL the daemon from another process `delay` seconds from now and wait until it
    is dead: the kill lands at a moment this process's reactor does not choose (its own
    kills would all come right after one of its turns)."""
    killer = subprocess.Popen(  # noqa: ASYNC220 (polled below, never waited on)
        ["/bin/sh", "-c", f"sleep {delay:.4f}; kill -KILL {daemon.process.pid}"],
        stdin=subprocess.DEVNULL, close_fds=True,
    )
    while killer.poll() is None or daemon.process.running():
        await sleep(0.005)


class KillNineTests(TestCase):
    timeout = 300

    async def test_every_accepted_message_survives_kill_9(self) -> None:
        dump, daemon, _ = await sink_and_daemon(self)

        sent = SendLog()
        sending = defer.Deferred.fromCoroutine(
            send_numbered(lambda: [daemon.smtp_port], list(range(MESSAGES)), sent,
                          concurrency=10, size=400)
        )
        rng = random.Random()
        # Kill at random points spread over the run (by progress, so a fast or slow machine
        # still gets every kill inside the run). At each kill: how many messages the sink
        # had, and what the dead daemon had on record.
        marks = sorted(rng.uniform(0.1 + 0.8 * k / KILLS, 0.1 + 0.8 * (k + 1) / KILLS)
                       for k in range(KILLS))
        kills: list[tuple[int, bytes]] = []
        while not sending.called and len(kills) < KILLS:
            if len(sent.accepted) + len(sent.failed) < marks[len(kills)] * MESSAGES:
                await sleep(0.01)
                continue
            await kill_from_outside(daemon, rng.uniform(0.0, 0.02))
            await daemon.stop()  # reap it
            kills.append((dumped_count(dump), journal_of(daemon)))
            await daemon.start()
        await sending
        self.assertGreaterEqual(len(kills), 2, "the run ended before the daemon was killed twice")
        self.assertGreater(len(sent.accepted), MESSAGES // 2)

        reactor = get_reactor()
        deadline = reactor.seconds() + 60
        while not sent.accepted <= {seq for seq, _ in dumped(dump)}:
            if reactor.seconds() > deadline:
                break
            await sleep(0.5)
        arrivals = dumped(dump)
        missing = sorted(sent.accepted - {seq for seq, _ in arrivals})
        self.assertEqual(missing, [], f"{len(missing)} accepted messages never arrived")

        # Each extra copy, by the kill it came after: that message may not have been on
        # record (in the dead daemon's journal) at that kill or any before it.
        on_record = []
        per_kill: Counter[int] = Counter()
        received: set[int] = set()
        for i, (seq, queue_id) in enumerate(arrivals):
            if seq not in received:
                received.add(seq)
                continue
            before = [k for k, (count, _) in enumerate(kills) if count <= i]
            if not before:  # sent twice with no kill in between
                on_record.append(seq)
                continue
            per_kill[before[-1]] += 1
            if any(queue_id in journal for _, journal in kills[: before[-1] + 1]):
                on_record.append(seq)
        duplicates = len(arrivals) - len(received)
        accepted = len(sent.accepted)
        rate = f"duplicates: {duplicates} of {accepted} ({100 * duplicates / accepted:.2f}%)"
        summary = (f"{len(kills)} kills, {accepted} accepted, {len(sent.failed)} not accepted, "
                   f"{len(arrivals)} delivered; {rate}; by kill: "
                   f"{[per_kill[k] for k in range(len(kills))]}")
        print(f"\n  {summary}")  # on the terminal with plain `trial`
        log.info("kill -9 test: {summary}", summary=summary)  # in test.log under `trial -j`
        self.assertTrue(any(journal for _, journal in kills), "the daemon kept no results journal")
        self.assertEqual(on_record, [], "delivered again though on record when the daemon died")
        self.assertLessEqual(max(per_kill.values(), default=0), HOP_CONCURRENCY, summary)
        self.assertLess(duplicates * 1000, accepted, rate)

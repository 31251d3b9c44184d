"""Durability: a real `twistd mailcore` is killed with SIGKILL at random moments while
thousands of messages go through it, and restarted each time. Every message that got a 250
must reach the next hop; duplicates (delivered, then killed before the result was written)
are counted and must be rare."""

from __future__ import annotations

import random
from collections import Counter

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from tests.support.mailsink import Daemon, SendLog, SinkFactory, SinkState, send_numbered, seq_of
from tests.support.reactor import get_reactor
from tests.support.servers import sleep, tempdir_for

MESSAGES = 3000
KILLS = 4


class KillNineTests(TestCase):
    timeout = 120

    async def test_every_accepted_message_survives_kill_9(self) -> None:
        state = SinkState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(state)
        )
        self.addCleanup(listener.stopListening)
        sink_port = listener.getHost().port
        daemon = Daemon(tempdir_for(self), queue={"poll_interval": 0.5})
        daemon.prepare_blocking("customer.test", sink_port)
        await daemon.start()
        self.addCleanup(daemon.stop)

        log = SendLog()
        sending = defer.Deferred.fromCoroutine(
            send_numbered(lambda: [daemon.smtp_port], list(range(MESSAGES)), log,
                          concurrency=10)
        )
        rng = random.Random()
        kills = 0
        # Kill at random points spread over the run (by progress, so a fast or slow machine
        # still gets every kill inside the run).
        marks = sorted(rng.uniform(0.1 + 0.8 * k / KILLS, 0.1 + 0.8 * (k + 1) / KILLS)
                       for k in range(KILLS))
        while not sending.called and kills < KILLS:
            done = len(log.accepted) + len(log.failed)
            if done < marks[kills] * MESSAGES:
                await sleep(0.01)
                continue
            daemon.kill()
            await daemon.stop()  # reap it
            kills += 1
            await daemon.start()
        await sending
        self.assertGreaterEqual(kills, 2, "the run ended before the daemon was killed twice")
        self.assertGreater(len(log.accepted), MESSAGES // 2)

        async def arrived() -> set[int]:
            return {s for m in state.messages if (s := seq_of(m.data)) is not None}

        reactor = get_reactor()
        deadline = reactor.seconds() + 40
        while not log.accepted <= await arrived():
            if reactor.seconds() > deadline:
                break
            await sleep(0.2)
        seen = Counter(seq_of(m.data) for m in state.messages)
        missing = sorted(log.accepted - set(seen))
        duplicates = sum(n - 1 for n in seen.values() if n > 1)
        print(f"\n  {kills} kills, {len(log.accepted)} accepted, {len(log.failed)} not "
              f"accepted, {len(state.messages)} delivered, {duplicates} duplicates")
        if missing:
            import sqlite3
            c = sqlite3.connect(str(daemon.data_dir / "mailcore.sqlite"))
            print(c.execute("select state, lease_owner is null, count(*), min(next_attempt_at), "
                            "max(attempts) from queue_recipients group by 1, 2").fetchall())
            print(c.execute("select last_error, count(*) from queue_recipients "
                            "group by 1").fetchall()[:5])
            print((daemon.directory / "twistd.log").read_text()[-3000:])
        self.assertEqual(missing, [], f"{len(missing)} accepted messages never arrived")
        self.assertLessEqual(duplicates, len(log.accepted) // 20)

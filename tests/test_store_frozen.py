"""A frozen database under a real daemon: `twistd mailcore` on the PostgreSQL of
tests/support, whose postmaster and backends are stopped with SIGSTOP (a hung server: the
connections stay open, the kernel still acknowledges TCP, no statement ends and no error
comes). The clients get answers within the configured deadlines ([smtp] command_timeout:
451 4.3.0, the session goes on; [web] reply_timeout: 503 with Retry-After), what does not
wait on the store (/metrics) answers at once, and once the server goes on (SIGCONT) nothing
acknowledged is lost: a message answered 451 is delivered at most once (its commit was
under way) or not stored at all. The cluster is let go on (SIGCONT) at each test's cleanup.
Run it with `timeout 300`.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.mailsink import Daemon, numbered_message, open_session
from tests.support.pg import create_test_database, pause_cluster
from tests.support.reactor import get_reactor
from tests.support.servers import (
    sleep,
    start_smtp_sink,
    tempdir_for,
)

# The deadlines the daemon is given: short, so that the test is.
DEADLINE = 3.0
# How much later than its deadline an answer may come on a loaded machine.
SLACK = 7.0
STOP_TIMEOUT = 2.0
_SEQ = re.compile(rb"^X-Seq: (\d+)\r?$", re.M)


def delivered(dump: Path) -> list[int]:
    """The sequence numbers of the messages smtp-sink received, in order (repeats kept)."""
    try:
        return [int(m) for m in _SEQ.findall(dump.read_bytes())]
    except FileNotFoundError:
        return []


class FrozenDatabaseTests(TestCase):
    timeout = 240

    async def start(self, store: dict[str, Any] | None = None) -> tuple[Daemon, Path]:
        """smtp-sink as the next hop of customer.test, and the daemon on a fresh database
        of the cluster, with short deadlines."""
        url = await create_test_database(self)
        dump, sink_port = await start_smtp_sink(self)
        daemon = Daemon(tempdir_for(self), db_url=url, smtp={"command_timeout": DEADLINE},
                        web={"reply_timeout": DEADLINE}, queue={"poll_interval": 0.5},
                        store=store)
        daemon.prepare_blocking("customer.test", sink_port)
        await daemon.start()
        self.addCleanup(daemon.stop)
        return daemon, dump

    def freeze(self) -> None:
        pause_cluster(True)
        self.addCleanup(pause_cluster, False)  # always, whatever happens before

    async def send(self, session: Any, seq: int) -> tuple[int, str, float]:
        """(DATA's reply code, its text, seconds it took) of numbered message `seq`."""
        reactor = get_reactor()
        started = reactor.seconds()
        result = await session.send("a@x.test", ["b@customer.test"], numbered_message(seq, 400))
        self.assertEqual(result.mail.code, 250)
        reply = result.data if result.data is not None else result.rcpts[0]
        return reply.code, reply.text, reactor.seconds() - started

    async def http(self, daemon: Daemon, method: str, path: str, **kwargs: Any
                   ) -> tuple[int, dict[str, list[str]], float]:
        reactor = get_reactor()
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        started = reactor.seconds()
        response = await client.request(method, f"http://127.0.0.1:{daemon.http_port}{path}",
                                        **kwargs)
        await treq.content(response)
        await pool.closeCachedConnections()
        headers = {k.decode().lower(): [v.decode() for v in vs]
                   for k, vs in response.headers.getAllRawHeaders()}
        return response.code, headers, reactor.seconds() - started

    async def test_answers_in_time_and_nothing_acknowledged_is_lost(self) -> None:
        daemon, dump = await self.start()
        session = await open_session(daemon.smtp_port)
        self.assertEqual((await self.send(session, 0))[0], 250)  # warm: pooled connections

        self.freeze()
        late: list[int] = []
        for seq in (1, 2):  # the same session, answered each time
            code, text, took = await self.send(session, seq)
            self.assertEqual(code, 451, text)
            self.assertIn("not confirmed in time", text)
            self.assertGreaterEqual(took, DEADLINE - 0.5)
            self.assertLess(took, DEADLINE + SLACK)
            late.append(seq)
        # An HTTP request that waits on the store: a login (its user and its rate bucket).
        status, headers, took = await self.http(
            daemon, "POST", "/api-token-auth/", data={"username": "u", "password": "p"})
        self.assertEqual(status, 503)
        self.assertEqual(headers.get("retry-after"), ["30"])
        self.assertLess(took, DEADLINE + SLACK)
        # What does not wait on the store is not held up by the pool threads that do.
        status, _, took = await self.http(daemon, "GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertLess(took, 2.0)

        pause_cluster(False)
        # The session goes on, and so does the store.
        reactor = get_reactor()
        deadline = reactor.seconds() + 60
        while True:
            code, text, _ = await self.send(session, 3)
            if code == 250 or reactor.seconds() > deadline:
                break
            await sleep(0.5)  # the first commits after the thaw may still fail
        self.assertEqual(code, 250, text)
        await session.quit()
        while not {0, 3} <= set(delivered(dump)) and reactor.seconds() < deadline:
            await sleep(0.2)
        await sleep(2.0)  # a late commit's delivery, if there is one
        arrived = delivered(dump)
        self.assertTrue({0, 3} <= set(arrived), arrived)  # every 250 delivered
        self.assertEqual(len(arrived), len(set(arrived)), arrived)  # each at most once
        self.assertTrue(set(arrived) <= {0, 3, *late}, arrived)
        print(f"\n  answered 451 then delivered (late commits): "
              f"{sorted(set(arrived) & set(late))}")
        log = (daemon.directory / "twistd.log").read_text()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)

    async def test_under_load_every_250_is_delivered_once(self) -> None:
        """Sessions sending back to back while the database freezes for a while: each
        reply comes within the deadline, every 250 is delivered, nothing twice, and the
        messages answered 451 that were delivered all the same are counted (printed): the
        rare duplicates a client that sends them again makes."""
        daemon, dump = await self.start()
        reactor = get_reactor()
        accepted: set[int] = set()
        refused: set[int] = set()
        slowest = [0.0]
        seqs = iter(range(1, 100_000))
        state = {"frozen": False, "stop": False}

        async def worker() -> None:
            session = await open_session(daemon.smtp_port)
            while not state["stop"]:
                seq = next(seqs)
                code, text, took = await self.send(session, seq)
                slowest[0] = max(slowest[0], took)
                if code == 250:
                    accepted.add(seq)
                else:
                    self.assertEqual(code, 451, text)
                    refused.add(seq)
                    if not state["frozen"]:
                        await sleep(0.2)  # a commit failing just after the thaw
            await session.quit()

        workers = [defer.Deferred.fromCoroutine(worker()) for _ in range(8)]
        await sleep(2.0)
        self.freeze()
        state["frozen"] = True
        await sleep(2 * DEADLINE)
        state["frozen"] = False
        pause_cluster(False)
        await sleep(3.0)
        state["stop"] = True
        await defer.gatherResults(workers)
        deadline = reactor.seconds() + 60
        while not accepted <= set(delivered(dump)) and reactor.seconds() < deadline:
            await sleep(0.2)
        await sleep(2.0)
        arrived = delivered(dump)
        late = sorted(set(arrived) & refused)
        print(f"\n  {len(accepted)} accepted, {len(refused)} answered 451, {len(arrived)} "
              f"delivered; answered 451 but delivered (late commits): {len(late)}; slowest "
              f"reply {slowest[0]:.1f} s")
        self.assertEqual(sorted(accepted - set(arrived)), [])  # every 250 delivered
        self.assertEqual(len(arrived), len(set(arrived)))  # none twice
        self.assertTrue(set(arrived) <= accepted | refused)
        self.assertTrue(refused)
        self.assertLess(slowest[0], DEADLINE + SLACK)

    async def test_sigterm_while_frozen_stops_within_stop_timeout(self) -> None:
        """SIGTERM while the database is frozen and a message waits on its commit: the stop
        waits on the store until [store] stop_timeout, then ends with one line saying so
        (it waited for ever: the queue's stop waited on its last commits)."""
        daemon, _ = await self.start(store={"stop_timeout": STOP_TIMEOUT})
        session = await open_session(daemon.smtp_port)
        self.assertEqual((await self.send(session, 0))[0], 250)
        self.freeze()
        waiting = defer.Deferred.fromCoroutine(self.send(session, 1))
        waiting.addErrback(lambda f: None)  # the connection goes with the daemon
        await sleep(0.5)
        reactor = get_reactor()
        started = reactor.seconds()
        status = await daemon.process.stop(grace=STOP_TIMEOUT + SLACK + 20)
        took = reactor.seconds() - started
        log = (daemon.directory / "twistd.log").read_text()
        print(f"\n  SIGTERM while frozen: exit status {status} after {took:.1f} s")
        self.assertIn(status, (0, -signal.SIGTERM), log[-3000:])
        self.assertGreaterEqual(took, STOP_TIMEOUT - 0.5)
        self.assertLess(took, STOP_TIMEOUT + SLACK, log[-3000:])
        self.assertIn("the stop did not finish within [store] stop_timeout (2 s)", log)
        self.assertIn("Main loop terminated", log)

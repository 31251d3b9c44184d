"""A server that trickles untagged replies keeps no sync (and no concurrency slot) forever.

Untagged replies restart the idle timer (Dovecot's `* OK Searched 40% of the mailbox` keeps
a slow SEARCH alive), but a command not answered within the command deadline fails the
session whatever the server sends meanwhile; LOGOUT is waited for a few seconds at most, and
a cancelled close still drops the connection. The unit tests drive a session over a
StringTransport with a Clock; the last ones run the engine against a trickling server.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.fetch.errors import FetchTimeout
from mailcore.fetch.imap import IMAPClient
from tests.support.fetchenv import make_env, thd_make_user
from tests.support.reactor import get_reactor
from tests.test_fetch_imap_hostile import (
    FakeIMAP,
    FakeIMAPFactory,
    cleartext_servers,
    failure_of,
)

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def connected(**kw: Any) -> tuple[IMAPClient, StringTransport, Clock]:
    clock = Clock()
    client = IMAPClient(clock, host="fake", **kw)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK ready\r\n")
    return client, transport, clock


def trickle(client: IMAPClient, clock: Clock, seconds: float, line: bytes) -> None:
    """The server sends `line` every half second for `seconds`."""
    for _ in range(int(seconds * 2)):
        clock.advance(0.5)
        client.dataReceived(line + b"\r\n")


class KeepAliveTests(TestCase):
    def test_untagged_progress_keeps_a_slow_command_alive_until_the_deadline(self) -> None:
        for answered in (True, False):
            client, transport, clock = connected(idle_timeout=2, command_timeout=30)
            d = client.send(b"UID SEARCH", b"ALL")
            trickle(client, clock, 29, b"* OK Searched 40% of the mailbox, ETA 0:42")
            if answered:
                client.dataReceived(b"* SEARCH 1\r\n0001 OK searched\r\n")
                self.assertEqual(self.successResultOf(d)[0][-1], b"SEARCH 1")
            else:
                trickle(client, clock, 1, b"* OK Searched 41% of the mailbox, ETA 0:42")
                self.assertIsInstance(failure_of(d), FetchTimeout)
                self.assertTrue(transport.disconnecting)

    def test_a_body_on_its_way_restarts_the_idle_timer(self) -> None:
        client, _transport, clock = connected(idle_timeout=2)
        d = client.uid_fetch([1], b"UID BODY.PEEK[]")
        client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(BODY))
        for byte in BODY:  # a byte a second: slow, but it is the reply
            clock.advance(1)
            client.dataReceived(bytes([byte]))
        client.dataReceived(b")\r\n0001 OK done\r\n")
        [item] = self.successResultOf(d)
        self.assertEqual(item.body, BODY)


class CommandDeadlineTests(TestCase):
    def test_a_command_unanswered_past_the_deadline_fails_whatever_else_comes(self) -> None:
        for bulk in (True, False):
            client, transport, clock = connected(idle_timeout=0, command_timeout=10)
            d = client.uid_fetch([1], b"UID BODY.PEEK[]") if bulk else client.send(b"NOOP")
            trickle(client, clock, 9.5, b"* 1 FETCH (UID 9 FLAGS ())")
            self.assertNoResult(d)
            clock.advance(0.5)
            error = failure_of(d)
            self.assertIsInstance(error, FetchTimeout)
            self.assertIn("answered no command for 10 s", str(error))
            self.assertTrue(transport.disconnecting)
            self.assertEqual(clock.getDelayedCalls(), [])

    def test_each_answer_gives_the_next_command_a_whole_deadline(self) -> None:
        client, _transport, clock = connected(idle_timeout=0, command_timeout=10)
        first = client.send(b"NOOP")
        second = client.send(b"NOOP")  # queued behind the first
        clock.advance(9)
        client.dataReceived(b"0001 OK done\r\n")
        self.successResultOf(first)
        clock.advance(9)
        self.assertNoResult(second)
        client.dataReceived(b"0002 OK done\r\n")
        self.successResultOf(second)
        self.assertEqual(clock.getDelayedCalls(), [])  # nothing waits: no deadline runs

    def test_without_a_command_timeout_there_is_no_deadline(self) -> None:
        client, _transport, clock = connected(idle_timeout=0)
        d = client.send(b"NOOP")
        clock.advance(10 ** 6)
        self.assertNoResult(d)
        self.assertEqual(clock.getDelayedCalls(), [])


class LogoutTests(TestCase):
    def test_logout_unanswered_is_waited_for_five_seconds(self) -> None:
        client, transport, clock = connected(idle_timeout=0)
        d = defer.Deferred.fromCoroutine(client.close_session())
        self.assertEqual(transport.value(), b"0001 LOGOUT\r\n")
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_cancelled_close_drops_the_connection(self) -> None:
        client, transport, clock = connected(idle_timeout=0, command_timeout=10)
        d = defer.Deferred.fromCoroutine(client.close_session())
        d.cancel()
        self.assertIsInstance(failure_of(d), defer.CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])
        client.connectionLost(Failure(ConnectionDone()))  # no second errback of LOGOUT's


class TricklingServerTests(TestCase):
    """The whole engine against a server that answers a body fetch with a line every 0.2 s
    and never the tagged reply: the sync ends, with an error on the folder."""

    timeout = 30
    factory: FakeIMAPFactory

    async def sync_against_trickle(self, line: bytes, *, folders: int = 1,
                                   **settings: Any) -> Any:
        loops: list[task.LoopingCall] = []

        def trickle(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"BODY" not in rest:
                return None
            loop = task.LoopingCall(conn.transport.write, line + b"\r\n")
            loop.clock = get_reactor()
            loop.start(0.2)
            loops.append(loop)
            return True

        def stop() -> None:
            for loop in loops:
                if loop.running:
                    loop.stop()

        self.addCleanup(stop)
        (factory, port), = cleartext_servers(self, 1)
        factory.hooks["UID FETCH"] = trickle
        if folders > 1:
            def listing(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
                conn.transport.write(b"".join(b'* LIST () "/" F%d\r\n' % i
                                              for i in range(folders))
                                     + tag + b" OK listed\r\n")
                return True

            factory.hooks["LIST"] = listing
        self.factory = factory
        env = await make_env(self, **settings)
        account = await env.accounts.create(
            env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
            allow_cleartext=True, start_tls=False,
        )
        started = get_reactor().seconds()
        result = await env.engine.sync(account.id)
        self.assertLess(get_reactor().seconds() - started, 10)
        return result

    async def test_untagged_ok_every_fifth_of_a_second_meets_the_command_deadline(
        self,
    ) -> None:
        result = await self.sync_against_trickle(b"* OK still here", idle_timeout=1.0,
                                                 command_timeout=1.5)
        self.assertEqual(result.status, "error")
        self.assertIn("INBOX: 127.0.0.1", result.problems())
        self.assertIn("answered no command for 1.5 s", result.problems())

    async def test_the_sync_stops_at_the_first_command_past_the_deadline(self) -> None:
        result = await self.sync_against_trickle(
            b"* OK still here", folders=3, idle_timeout=60.0, command_timeout=1.0)
        self.assertEqual(result.status, "error")
        self.assertRegex(result.problems() or "",
                         r"^the sync stopped at a command the server left unanswered; the other "
                         r"folders are synced next time; F0: 127\.0\.0\.1:\d+ answered no "
                         r"command for 1 s$")
        examined = [line for _tls, line in self.factory.received if b" EXAMINE " in line]
        self.assertEqual(len(examined), 1)
        self.assertEqual(len(self.factory.connections), 1)

    async def test_any_trickle_meets_the_command_deadline(self) -> None:
        result = await self.sync_against_trickle(
            b"* 1 FETCH (UID 1 FLAGS ())", idle_timeout=60.0, command_timeout=1.5)
        self.assertEqual(result.status, "error")
        self.assertIn("answered no command for 1.5 s", result.problems())


class SlotHoldingServerTests(TestCase):
    """A user's servers that hold each sync up to the command deadline take at most
    `max_concurrent_per_user` of the engine's slots: another user's account syncs
    meanwhile instead of waiting for them."""

    timeout = 30

    async def test_another_users_sync_does_not_wait_for_a_hostile_server(self) -> None:
        (hostile, hostile_port), (_honest, honest_port) = cleartext_servers(self, 2)
        hostile.hooks["LIST"] = lambda conn, tag, rest: True  # never answered
        env = await make_env(self, max_concurrent=2, max_concurrent_per_user=1,
                             idle_timeout=60.0, command_timeout=3.0)
        bob = await env.db.run("make_user", thd_make_user, "bob")
        held = [await env.accounts.create(
            env.user_id, host="127.0.0.1", port=hostile_port, username=f"m{i}",
            password="pw", allow_cleartext=True, start_tls=False) for i in range(2)]
        mine = await env.accounts.create(
            bob, host="127.0.0.1", port=honest_port, username="bob", password="pw",
            allow_cleartext=True, start_tls=False)
        hung = [env.engine.sync(account.id) for account in held]
        result = await env.engine.sync(mine.id)
        # Before, the two hostile syncs held both slots: bob's waited for the first to
        # fail at its command deadline.
        self.assertEqual((result.status, result.new_messages), ("success", 1))
        self.assertEqual([d.called for d in hung], [False, False])
        self.assertEqual(len(hostile.connections), 1)  # the second waits for the first
        for d in hung:
            outcome = await d
            self.assertIn("answered no command for 3 s", outcome.problems() or "")
        self.assertEqual(len(hostile.connections), 2)

"""A domain or address added anywhere is served within a second on every node.

The README's tour adds a domain with the admin CLI (another process, another connection to
the store) while the daemon runs, and sends mail to it at once. Each node polls the one-row
change counter every `[domains] poll_interval` (0.5 s) and reloads its RCPT snapshot when
it moved; between changes a poll is that one read and nothing else.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailcore.cli import build_parser
from mailcore.config import Config
from mailcore.core import Core
from mailcore.gateway.domains import DomainService
from mailcore.identity import Identity
from mailcore.store import Database
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.servers import tempdir_for
from tests.support.smtpsession import RecordingSink, Session, make_factory
from tests.support.web import Web
from web.root import build_root

POLL = 0.5


class ReadmeTourMixin(DatabaseMixin):
    """A daemon's DomainService and SMTP server on one connection to the store; the CLI and
    the API of another node on a second one, as separate processes would have."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(1_750_000_000)
        daemon_db = await self.open_database()
        # The other process: its own engine on the same database, run synchronously.
        self.other_db = Database(daemon_db.url, MemoryReactor(), synchronous=True)  # type: ignore[arg-type]
        self.addCleanup(self.other_db.engine.dispose)
        self.daemon = DomainService(daemon_db, self.clock)
        self.daemon.startService()
        await self.daemon.when_loaded()
        self.addCleanup(self.stop_daemon)
        self.factory = make_factory(self.daemon, RecordingSink(), self.clock)
        self.other = Core.build(
            Config(data_dir=tempdir_for(self, "mailcore-freshness-")), self.other_db,
            Clock(), cpu=CpuPool.for_tests(),
        )
        self.alice = await self.other.identity.create_user("alice", "alice@example.test")

    async def stop_daemon(self) -> None:
        self.daemon.stopService()
        await self.daemon.idle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def rcpt(self, address: str) -> str:
        """The reply to one RCPT in a fresh session on the daemon's SMTP server."""
        session = Session(self.factory)
        try:
            session.hello()
            self.assertEqual(session.codes(b"MAIL FROM:<a@example.net>\r\n"), ["250"])
            [reply] = session.send(f"RCPT TO:<{address}>\r\n".encode())
            return reply
        finally:
            session.close()

    async def poll(self, seconds: float = POLL) -> None:
        """Let the daemon's clock run `seconds` and its poll finish."""
        await self.daemon.idle()  # the timer is set again once the previous poll is over
        self.clock.advance(seconds)
        await self.daemon.idle()

    async def cli(self, *argv: str) -> str:
        """One `mailcore` command through the CLI's handler, on the other connection."""
        args = build_parser().parse_args(list(argv))
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        status = await args.handler(args, self.other)
        self.assertEqual(status, 0)
        return out.getvalue()

    async def test_a_domain_added_by_the_cli_is_served_within_a_second(self) -> None:
        self.assertIn("Relaying denied", self.rcpt("bob@customer.test"))
        out = await self.cli("domain", "add", "customer.test", "--owner", "alice",
                             "--redirect-to", "mx.customer.test:2526")
        self.assertIn("serving customer.test", out)
        await self.poll()
        self.assertTrue(self.rcpt("bob@customer.test").startswith("250 "))
        await self.cli("address", "add", "customer.test", "carol")
        await self.poll()
        self.assertIn("User unknown", self.rcpt("bob@customer.test"))
        self.assertTrue(self.rcpt("carol@customer.test").startswith("250 "))
        await self.cli("domain", "remove", "customer.test")
        await self.poll()
        self.assertIn("Relaying denied", self.rcpt("carol@customer.test"))

    async def test_an_address_added_through_the_api_is_served_within_a_second(self) -> None:
        await self.other.domains.add("customer.test", self.alice.id, "mx.customer.test")
        await self.other.domains.add_address("customer.test", "carol")
        await self.poll()
        self.assertIn("User unknown", self.rcpt("john@customer.test"))
        root = build_root(self.other)
        web = Web(self.other, Clock(), root, StubTreq(root))
        key = await web.credential(self.alice)
        status, _, reply = await web.call(
            "PUT", "/api/v1/domain/customer.test/addresses/john", headers={"Api-Key": key}
        )
        self.assertEqual((status, reply["success"]), (200, True))
        await self.poll()
        self.assertTrue(self.rcpt("john@customer.test").startswith("250 "))


class SQLiteReadmeTourTests(ReadmeTourMixin, TestCase):
    backend = "sqlite"


class PostgreSQLReadmeTourTests(ReadmeTourMixin, TestCase):
    backend = "postgresql"


class PollTests(TestCase):
    """Two nodes on one store: `node` runs the snapshot, `cli` only writes (as the CLI)."""

    def setUp(self) -> None:
        self.db = Database.for_tests()
        self.clock = Clock()
        self.identity = Identity(self.db, self.clock, CpuPool.for_tests())
        self.node = DomainService(self.db, self.clock)
        self.cli = DomainService(self.db, self.clock)
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.node.running:
            self.node.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def count_transactions(self) -> list[str]:
        calls: list[str] = []
        original = self.db._transaction

        def counting(name: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(name, *args, **kwargs)

        self.db._transaction = counting  # type: ignore[method-assign]
        return calls

    async def test_every_kind_of_change_reaches_the_other_node_at_the_next_poll(self) -> None:
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        self.node.startService()

        async def seen_after_one_poll(check: Any) -> None:
            self.assertFalse(check())
            self.clock.advance(POLL)
            self.assertTrue(check())

        await self.cli.add("example.com", owner, "mx.example.net")
        await seen_after_one_poll(lambda: self.node.lookup("example.com") is not None)
        await self.cli.update("example.com", {"redirect_to": "mx2.example.net"})
        await seen_after_one_poll(
            lambda: self.node.lookup("example.com").redirect_host == "mx2.example.net"  # type: ignore[union-attr]
        )
        await self.cli.add_address("example.com", "john")
        await seen_after_one_poll(lambda: not self.node.accepts("jane", "example.com"))
        await self.cli.remove_address("example.com", "john")
        await seen_after_one_poll(lambda: self.node.accepts("jane", "example.com"))
        await self.cli.remove("example.com")
        await seen_after_one_poll(lambda: self.node.lookup("example.com") is None)

    async def test_between_changes_a_poll_reads_only_the_counter(self) -> None:
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        await self.cli.add("example.com", owner, "mx.example.net")
        self.node.startService()
        calls = self.count_transactions()
        for _ in range(10):
            self.clock.advance(POLL)
        self.assertEqual(calls, ["domain_generation"] * 10)
        await self.cli.add_address("example.com", "john")
        del calls[:]
        self.clock.advance(POLL)
        self.assertEqual(calls, ["domain_generation", "domain_snapshot"])
        # a change refused by the store moves nothing
        with self.assertRaises(Exception):
            await self.cli.add("example.com", owner, "mx.example.net")
        del calls[:]
        self.clock.advance(POLL)
        self.assertEqual(calls, ["domain_generation"])

    async def test_a_store_outage_is_logged_once_and_its_end_once(self) -> None:
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        self.node.startService()
        lines: list[str] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "snapshot" in (event.get("log_format") or ""):
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        original = self.db.read
        self.db.read = lambda *a, **k: fail(RuntimeError("database down"))  # type: ignore
        for _ in range(120):  # a minute of polls
            self.clock.advance(POLL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(lines, ["could not load the domain snapshot (retrying every 0.5 s)"])
        self.db.read = original  # type: ignore[method-assign]
        await self.cli.add("example.com", owner, "mx.example.net")
        self.clock.advance(POLL)
        self.assertIsNotNone(self.node.lookup("example.com"))
        self.assertEqual(lines[1:], ["domain snapshot loaded again after 120 failed attempts"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

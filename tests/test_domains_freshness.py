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

from sqlalchemy import insert, select
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
from mailcore.gateway import domains as domains_module
from mailcore.gateway.domains import DomainService
from mailcore.identity import Identity
from mailcore.mailapi.mailboxes import MailboxService
from mailcore.store import Database
from mailcore.store.schema import domain_addresses, domain_changes
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin, synchronous_database
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

    async def test_a_hosted_domain_refuses_what_is_no_mailbox_at_rcpt(self) -> None:
        await self.other.domains.add("hosted.test", self.alice.id, "", hosted=True)
        await self.other.mailboxes.add("bob@hosted.test", self.alice.id)
        await self.poll()
        self.assertTrue(self.rcpt("bob@hosted.test").startswith("250 "))
        self.assertTrue(self.rcpt("postmaster@hosted.test").startswith("250 "))
        self.assertIn("550 5.1.1", self.rcpt("nobody@hosted.test"))
        await self.other.mailboxes.add("nobody@hosted.test", self.alice.id)
        await self.poll()
        self.assertTrue(self.rcpt("nobody@hosted.test").startswith("250 "))

    async def test_postmaster_of_a_hosted_domain_without_its_mailbox_is_ours(self) -> None:
        """postmaster@ a hosted domain must be accepted (RFC 5321 4.5.1); without a
        postmaster mailbox it went to the domain, found no mailbox and bounced, so it goes
        to the operator's postmaster ([smtp] postmaster) until the domain has one."""
        await self.other.domains.add("hosted.test", self.alice.id, "", hosted=True)
        await self.poll()

        def recipients(address: str) -> list[str]:
            session = Session(self.factory)
            try:
                session.hello()
                session.send(b"MAIL FROM:<a@example.net>\r\n")
                [reply] = session.send(f"RCPT TO:<{address}>\r\n".encode())
                self.assertTrue(reply.startswith("250 "), reply)
                return [r.address for r in session.protocol._recipients]
            finally:
                session.close()

        ours = str(self.factory.postmaster)
        self.assertNotEqual(ours, "postmaster@hosted.test")
        self.assertEqual(recipients("PostMaster@hosted.test"), [ours])
        self.assertEqual(recipients("postmaster"), [ours])
        await self.other.mailboxes.add("postmaster@hosted.test", self.alice.id)
        await self.poll()
        self.assertEqual(recipients("PostMaster@hosted.test"), ["PostMaster@hosted.test"])

    async def test_a_disabled_users_domains_are_refused_for_now_until_it_is_enabled(
            self) -> None:
        """`mailcore user disable` (the CLI, another process) makes every node answer the
        user's domains' recipients 450 4.2.1 within a poll: the senders keep the mail and
        try again, and once `user enable` is run it is accepted again. Other users'
        domains are served meanwhile; the snapshot is patched, not read whole."""
        bob = await self.other.identity.create_user("bob", "bob@example.test")
        await self.other.domains.add("customer.test", self.alice.id, "mx.customer.test")
        await self.other.domains.add("hosted.test", self.alice.id, "", hosted=True)
        await self.other.mailboxes.add("ann@hosted.test", self.alice.id)
        await self.other.domains.add("other.test", bob.id, "mx.other.test")
        await self.poll()
        reloads = self.daemon.reloads
        await self.cli("user", "disable", "alice")
        await self.poll()
        for address in ("joe@customer.test", "ann@hosted.test", "postmaster@customer.test"):
            reply = self.rcpt(address)
            self.assertTrue(reply.startswith("450 4.2.1 "), reply)
        self.assertTrue(self.rcpt("joe@other.test").startswith("250 "))
        await self.cli("user", "enable", "alice")
        await self.poll()
        self.assertTrue(self.rcpt("joe@customer.test").startswith("250 "))
        self.assertTrue(self.rcpt("ann@hosted.test").startswith("250 "))
        self.assertEqual(self.daemon.reloads, reloads)
        # A node that reads the whole snapshot (started now, or its periodic reload) knows
        # the same.
        await self.cli("user", "disable", "alice")
        fresh = DomainService(self.other_db, Clock())
        await fresh.refresh()
        self.assertEqual((fresh.suspended("customer.test"), fresh.suspended("other.test")),
                         (True, False))


class SQLiteReadmeTourTests(ReadmeTourMixin, TestCase):
    backend = "sqlite"


class PostgreSQLReadmeTourTests(ReadmeTourMixin, TestCase):
    backend = "postgresql"


class PollTests(TestCase):
    """Two nodes on one store: `node` runs the snapshot, `cli` only writes (as the CLI)."""

    def setUp(self) -> None:
        self.db = synchronous_database()
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
        self.assertEqual(calls, ["domain_generation", "domain_changes"])
        # a change refused by the store moves nothing
        with self.assertRaises(Exception):
            await self.cli.add("example.com", owner, "mx.example.net")
        del calls[:]
        self.clock.advance(POLL)
        self.assertEqual(calls, ["domain_generation"])

    async def test_a_change_reads_only_the_domains_it_touched(self) -> None:
        """One customer's address list edits made every node read every domain and every
        address list again; now the node reads the logged domain alone."""
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        await self.cli.add("a.test", owner, "mx.a.test")
        await self.cli.add("b.test", owner, "mx.b.test")
        self.node.startService()
        self.assertEqual((self.node.reloads, self.node.patches), (1, 0))
        # a row written behind the services' backs: only a full reload can see it
        await self.db.run("behind", lambda conn: conn.execute(
            insert(domain_addresses).values(domain_id=self.node.lookup("b.test").id,  # type: ignore[union-attr]
                                            local_part="bob")))
        await self.cli.add_address("a.test", "ann")
        self.clock.advance(POLL)
        self.assertEqual((self.node.reloads, self.node.patches), (1, 1))
        self.assertFalse(self.node.accepts("zed", "a.test"))
        self.assertTrue(self.node.accepts("ann", "a.test"))
        self.assertTrue(self.node.accepts("zed", "b.test"))  # b.test was not read
        self.clock.advance(DomainService(self.db, self.clock).refresh_interval)
        self.assertEqual(self.node.reloads, 2)
        self.assertFalse(self.node.accepts("zed", "b.test"))

    async def test_a_name_removed_and_added_again_is_patched_to_its_new_owner(self) -> None:
        alice = (await self.identity.create_user("alice", "alice@users.test")).id
        bob = (await self.identity.create_user("bob", "bob@users.test")).id
        await self.cli.add("a.test", alice, "mx.alice.test")
        await self.cli.add_address("a.test", "ann")
        self.node.startService()
        await self.cli.remove("a.test")
        await self.cli.add("a.test", bob, "mx.bob.test")
        self.clock.advance(POLL)
        found = self.node.lookup("a.test")
        assert found is not None
        self.assertEqual((found.owner_id, found.redirect_host), (bob, "mx.bob.test"))
        self.assertIs(self.node.domain_by_id(found.id), found)
        self.assertTrue(self.node.accepts("zed", "a.test"))  # alice's list went with hers
        await self.cli.remove("a.test")
        self.clock.advance(POLL)
        self.assertIsNone(self.node.lookup("a.test"))
        self.assertIsNone(self.node.domain_by_id(found.id))
        self.assertEqual((self.node.reloads, self.node.patches), (1, 2))

    async def test_a_hosted_domain_accepts_its_mailboxes_only(self) -> None:
        """A hosted domain (no next hop) accepted every local part, and mail to one that is
        no mailbox bounced later, to a sender who may be forged; mailboxes added or removed
        anywhere reach every node's RCPT snapshot at its next poll."""
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        await self.cli.add("hosted.test", owner, "", hosted=True)
        await self.cli.add("relayed.test", owner, "mx.relayed.test")
        boxes = MailboxService(self.db, self.clock)  # another node's, or the CLI's
        await boxes.add("Bob@hosted.test", owner)
        await boxes.add("carol@relayed.test", owner)
        self.node.startService()
        self.assertEqual([self.node.accepts(local, "hosted.test")
                          for local in ("bob", "BOB", "nobody", "postmaster")],
                         [True, True, False, True])
        self.assertTrue(self.node.accepts("anyone", "relayed.test"))  # no list: all
        await boxes.add("dave@hosted.test", owner)
        self.assertFalse(self.node.accepts("dave", "hosted.test"))
        self.clock.advance(POLL)
        self.assertTrue(self.node.accepts("dave", "hosted.test"))
        await boxes.remove("bob@hosted.test")
        await boxes.delete(owner, "dave@hosted.test")
        self.clock.advance(POLL)
        self.assertEqual([self.node.accepts(local, "hosted.test") for local in ("bob", "dave")],
                         [False, False])
        self.assertEqual((self.node.reloads, self.node.patches), (1, 2))
        self.clock.advance(DomainService(self.db, self.clock).refresh_interval)
        self.assertEqual(self.node.reloads, 2)  # a full reload reads the same
        self.assertEqual([self.node.accepts(local, "hosted.test")
                          for local in ("bob", "dave", "postmaster")], [False, False, True])

    async def test_what_the_log_cannot_tell_is_read_whole(self) -> None:
        """A node further behind than the log keeps, or a change of more domains than a
        patch reads, reloads everything; the log keeps only CHANGE_LOG_KEEP raises."""
        self.patch(domains_module, "CHANGE_LOG_KEEP", 3)
        self.patch(domains_module, "_MOST_PATCHED", 2)
        owner = (await self.identity.create_user("alice", "alice@users.test")).id
        self.node.startService()
        for name in ("a.test", "b.test", "c.test", "d.test"):
            await self.cli.add(name, owner, f"mx.{name}")
        seqs = await self.db.read("log", lambda conn: conn.execute(
            select(domain_changes.c.seq).distinct()).scalars().all())
        self.assertEqual(sorted(seqs), [2, 3, 4])  # rows CHANGE_LOG_KEEP raises old are gone
        self.clock.advance(POLL)
        self.assertEqual((self.node.reloads, self.node.patches), (2, 0))
        self.assertEqual([self.node.lookup(n) is not None for n in ("a.test", "d.test")],
                         [True, True])
        for name in ("a.test", "b.test"):
            await self.cli.add_address(name, "ann")
        self.clock.advance(POLL)  # two domains: patched
        self.assertEqual((self.node.reloads, self.node.patches), (2, 1))
        for name in ("a.test", "b.test", "c.test"):
            await self.cli.add_address(name, "bob")
        self.clock.advance(POLL)  # three: read whole
        self.assertEqual((self.node.reloads, self.node.patches), (3, 1))
        self.assertTrue(self.node.accepts("bob", "c.test"))
        self.assertFalse(self.node.accepts("ann", "c.test"))

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

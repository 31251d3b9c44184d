"""Background jobs shared by the nodes of one store: two nodes (two service instances with
different node ids, each on its own Database and thread pool) on one PostgreSQL and on one
SQLite file, and each job is done once.

Leased: named periodic jobs (quarantine digests and purges, domain verification passes, the
Mail API's file and gone sweeps, the OAuth and webhook log prunes, the token, credential,
rate-bucket, API sends and safedrop sweeps) and the Mail API's outbox through `job_leases`,
account syncs through `fetch_accounts.lease_owner`, webhook deliveries through their
claim; a node that stalled past its lease leaves the outcome of the node that took the
work over (its late result is not recorded). Idempotent (checked here to stay right when
two nodes run them at once, as they may when one's lease lapsed): the quarantine purge,
the credential sweep, the safedrop expiry sweep (one expiry notice per drop). Elsewhere:
the token sweep's rollovers and charges on two nodes are
`tests.test_tokens.*ConcurrencyTests`, migrates and restores' `tests.test_mailbox_jobs`,
the queue's `tests.test_queue_leases` and `tests.test_gateway_cluster` (killed and paused
nodes), the database clock the nodes' leases are judged by `tests.test_store_dbclock`."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import Connection, func, insert, select, update
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore import sendcaps
from mailcore.backup.jobs import FORGET_INTERVAL, OldJobsSweeper
from mailcore.billing.plans import Plans
from mailcore.billing.tokens import TokenService, TokenSettings
from mailcore.config import Config
from mailcore.core import Core
from mailcore.fetch.accounts import Account, Accounts, thd_claim_sync, thd_renew_syncs
from mailcore.fetch.engine import BUSY, SYNC_LEASE, SyncEngine, SyncResult
from mailcore.fetch.scheduler import FetchScheduler
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.settings import FetchSettings
from mailcore.gateway.domains import DomainService
from mailcore.gateway.quarantine import (
    SEND_HOLD,
    QuarantineService,
    QuarantineSettings,
    ToKeep,
)
from mailcore.gateway.verification import DomainVerifier, VerificationSettings
from mailcore.identity.service import CredentialSweeper
from mailcore.mailapi.mail import GoneSweeper, MailFilesSweeper
from mailcore.mailapi.outbox import OUTBOX_LEASE, OUTBOX_POLL, OutboxSender
from mailcore.messages.models import FetchedMessage, Location
from mailcore.messages.store import MessageStore
from mailcore.oauth import OAuthPruner
from mailcore.periodic import PeriodicService
from mailcore.queue.mtasts import PolicySweeper
from mailcore.queue.spool import Withdrawn
from mailcore.ratelimits import SWEEP_INTERVAL, BucketSweeper
from mailcore.safedrop.model import SafedropSettings
from mailcore.safedrop.service import SafedropService, SafedropSweeper
from mailcore.sendcaps import SendsSweeper
from mailcore.smtp.envelope import Envelope
from mailcore.store import Database
from mailcore.store.leases import JobLeases
from mailcore.store.schema import (
    credentials,
    domains,
    drop_bundles,
    fetch_accounts,
    mailapi_mail,
    mailboxes,
    quarantine,
    users,
    webhook_deliveries,
)
from mailcore.store.schema.mailapi import OUTBOX, SENT
from mailcore.webhooks import WebhookPruner, Webhooks, WebhookSender, WebhookSettings
from mailcore.webhooks.events import account_scope, thd_record_batch, thd_record_outcome
from mailcore.webhooks.store import thd_claim_due as thd_claim_due_webhooks
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user
from tests.support.imap2api import Receiver, mail
from tests.support.mailsink import thd_add_domain
from tests.support.webhooks import sync_ended

START = 1_800_000_000.0
DAY = 86400.0


def gather(*coroutines: Any) -> defer.Deferred[list[Any]]:
    """Run the coroutines at once (two nodes racing); their results in order."""
    return defer.gatherResults(
        [c if isinstance(c, defer.Deferred) else defer.Deferred.fromCoroutine(c)
         for c in coroutines],
        consumeErrors=True,
    )



def thd_outbox_mail(conn: Connection, owner: int, count: int) -> None:
    """Blocking: a mailbox me@hosted.test (of the domain hosted.test) of `owner` with `count`
    mails in its outbox, in order: public ids m0000..., queue ids Q0000..."""
    domain = thd_add_domain(conn, "hosted.test", "mx.hosted.test", 25)
    box = conn.execute(insert(mailboxes).values(
        address="me@hosted.test", owner_id=owner, created_at=START, domain_id=domain,
    ).returning(mailboxes.c.id)).scalar_one()
    for i in range(count):
        conn.execute(insert(mailapi_mail).values(
            public_id=f"m{i:04d}", mailbox_id=box, status=OUTBOX,
            mail_from="me@hosted.test", to_addrs="you@example.test",
            raw=b"Subject: hi\r\n\r\nbody\r\n", queue_id=f"Q{i:04d}",
            created_at=START, outbox_seq=i,
        ))

class RecordingSpool:
    """Where a node's digests go: each accepted message is recorded (the queue itself is
    tested elsewhere; here only how many digests the nodes queue matters)."""

    def __init__(self, queued: list[tuple[str, Envelope]], node: str,
                 db: Database | None = None) -> None:
        self.queued = queued
        self.node = node
        self.db = db  # where an accept's guard runs (Spool.accept), if any is given
        # Told when delivery results commit (the outbox waits on it); none commit here.
        self.on_results: list[Callable[[], None]] = []
        self.on_recorded: list[Callable[[Any], None]] = []

    async def accept(self, queue_id: str, envelope: Envelope, body: bytes, *,
                     guard: Callable[[Connection], bool] | None = None) -> None:
        if guard is not None:
            assert self.db is not None
            if not await self.db.run("guard", guard):
                raise Withdrawn("its guard left the message out")
        self.queued.append((self.node, envelope))


class ConnectRecorder(MemoryReactorClock):
    """A reactor on which every connection attempt is recorded and stays pending; `tried`
    fires at the first attempt after it was (re)made."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: defer.Deferred[None] = defer.Deferred()

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        connector = super().connectTCP(*args, **kwargs)
        if not self.tried.called:
            self.tried.callback(None)
        return connector

    def refuse(self, index: int) -> None:
        """The server refuses attempt `index`: that sync fails."""
        _host, _port, factory, _timeout, _bind = self.tcpClients[index]
        factory.clientConnectionFailed(self.connectors[index], Failure(ConnectionRefusedError()))


class SharedJobsMixin(DatabaseMixin):
    """Two nodes on one store (this class's backend)."""

    timeout = 60

    async def two_stores(self) -> tuple[Database, Database]:
        first = await self.open_database()
        second = await self.open_database_at(first.url)
        return first, second

    # -- the lease itself --------------------------------------------------------------

    async def test_of_many_concurrent_claims_one_node_wins(self) -> None:
        a, b = await self.two_stores()
        nodes = [JobLeases(a, "node-a"), JobLeases(b, "node-b")]

        def winners(won: list[bool]) -> set[str]:
            return {nodes[i % 2].node_id for i, w in enumerate(won) if w}

        # A job never claimed: one node's claim inserts its row.
        won = await gather(*(nodes[i % 2].claim("job", START, 60.0) for i in range(20)))
        self.assertEqual(len(winners(won)), 1)
        # Its lease lapsed: one node takes it over, and holds it (its other claims succeed).
        won = await gather(*(nodes[i % 2].claim("job", START + 60, 60.0) for i in range(20)))
        self.assertEqual(len(winners(won)), 1)
        self.assertEqual(sum(won), 10)
        # A periodic job: one run of twenty attempts, new row or lapsed.
        for now in (START, START + 60):
            won = await gather(*(nodes[i % 2].claim_periodic("digest", now, 60.0)
                                 for i in range(20)))
            self.assertEqual(sum(won), 1)

    async def test_the_holder_keeps_a_job_until_its_lease_lapses_or_it_lets_go(self) -> None:
        a, b = await self.two_stores()
        la, lb = JobLeases(a, "node-a"), JobLeases(b, "node-b")
        self.assertTrue(await la.claim("j", 0.0, 10.0))
        self.assertFalse(await lb.claim("j", 5.0, 10.0))
        self.assertTrue(await la.claim("j", 9.0, 10.0))  # held again, until 19
        self.assertFalse(await lb.claim("j", 18.0, 10.0))
        self.assertTrue(await lb.claim("j", 19.0, 10.0))  # a lapsed: b takes over
        self.assertFalse(await la.claim("j", 20.0, 10.0))
        self.assertTrue(await lb.release("j", 21.0))
        self.assertTrue(await la.claim("j", 21.0, 10.0))
        self.assertFalse(await lb.release("j", 22.0))  # not b's to give up

    async def test_a_late_renewal_never_shortens_a_lease(self) -> None:
        # Two renewals of one node may commit out of order (its timer's and an explicit
        # one, on two pool threads): the older one committing last must not pull the
        # lease back, or another node takes the job while it still runs.
        a, b = await self.two_stores()
        la, lb = JobLeases(a, "node-a"), JobLeases(b, "node-b")
        self.assertTrue(await la.claim("j", 0.0, 10.0))
        self.assertTrue(await la.claim("j", 8.0, 10.0))  # until 18
        self.assertTrue(await la.claim("j", 4.0, 10.0))  # the older renewal, late: still 18
        self.assertFalse(await lb.claim("j", 16.0, 10.0))
        self.assertTrue(await lb.claim("j", 18.0, 10.0))
        # Fetch sync leases likewise.
        ea, eb, _reactor, account = await self.engines()
        a, b = ea.db, eb.db
        self.assertTrue(await a.run("claim", thd_claim_sync, account.id, "node-a", 0.0,
                                    300.0, datetime.datetime.now(datetime.UTC)))
        self.assertEqual(await a.run("renew", thd_renew_syncs, "node-a", [account.id],
                                     500.0), [account.id])
        self.assertEqual(await a.run("renew", thd_renew_syncs, "node-a", [account.id],
                                     400.0), [account.id])  # late: still held until 500
        now = datetime.datetime.now(datetime.UTC)
        self.assertFalse(await b.run("claim", thd_claim_sync, account.id, "node-b", 450.0,
                                     750.0, now))
        self.assertTrue(await b.run("claim", thd_claim_sync, account.id, "node-b", 500.0,
                                    800.0, now))
        self.assertEqual(await a.run("renew", thd_renew_syncs, "node-a", [account.id],
                                     900.0), [])  # b's now: a's renewal finds it gone

    # -- domain verification passes ------------------------------------------------------

    async def verifier(self, db: Database, clock: Clock, node: str,
                       lookups: list[str]) -> DomainVerifier:
        settings = VerificationSettings(verify_domains=True, dns_servers=(("127.0.0.1", 53),),
                                        verify_interval=600.0)
        domains_ = DomainService(db, clock, verify_domains=True)
        verifier = DomainVerifier(domains_, clock, settings)
        verifier.leases = JobLeases(db, node)

        async def lookup(name: str) -> list[str]:
            lookups.append(f"{node} {name}")
            return []

        verifier._lookup = lookup  # type: ignore[method-assign]  # no DNS needed here
        return verifier

    async def test_a_verification_pass_runs_on_one_node_per_period(self) -> None:
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        lookups: list[str] = []
        va = await self.verifier(a, clock, "node-a", lookups)
        vb = await self.verifier(b, clock, "node-b", lookups)
        owner = await a.run("owner", thd_make_user, "owner")
        await va.domains.add("customer.test", owner, "10.0.0.1")
        await gather(va.leased_tick(), vb.leased_tick())
        self.assertEqual(len(lookups), 1)
        clock.advance(300)  # within the period: neither node runs it again
        await gather(vb.leased_tick(), va.leased_tick())
        self.assertEqual(len(lookups), 1)
        clock.advance(300)
        await gather(vb.leased_tick(), va.leased_tick())
        self.assertEqual(len(lookups), 2)
        # Whichever node ran it last stops: the other one runs the next period's pass.
        last = lookups[-1].split()[0]
        other = vb if last == "node-a" else va
        clock.advance(600)
        await gather(other.leased_tick())
        self.assertEqual(len(lookups), 3)
        self.assertNotEqual(lookups[2].split()[0], last)

    # -- quarantine digests and purges ---------------------------------------------------

    async def quarantines(self) -> tuple[QuarantineService, QuarantineService, list[Any],
                                         Clock, int]:
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        queued: list[tuple[str, Envelope]] = []
        settings = QuarantineSettings(digest_interval=DAY, retention_days=30)
        nodes = []
        for db, node in ((a, "node-a"), (b, "node-b")):
            nodes.append(QuarantineService(
                db, clock, settings, Plans(), hostname="mx.test",
                signer=self.mktemp_path() / "quarantine.key",
                spool=RecordingSpool(queued, node, db), leases=JobLeases(db, node),
            ))
        domain_id = await a.run("domain", thd_add_domain, "customer.test", "10.0.0.1", 25)

        def txn(conn: Connection) -> None:
            conn.execute(update(domains).values(send_resume=True))
            conn.execute(update(users).values(plan="standard"))

        await a.run("resume", txn)
        return nodes[0], nodes[1], queued, clock, domain_id

    def mktemp_path(self) -> Any:
        from pathlib import Path

        path = Path(self.mktemp())
        path.mkdir(parents=True)
        return path

    async def hold(self, node: QuarantineService, domain_id: int, n: int) -> None:
        """`n` messages held for bob, each of a queued message of its own."""
        self.held = getattr(self, "held", 0) + n
        items = [ToKeep(f"Q{i}", "spam@x.test", "bob@customer.test", domain_id, "spam",
                        "score 9") for i in range(self.held - n, self.held)]
        await node.keep(items, b"Subject: hi\r\n\r\nbody\r\n")

    async def test_each_period_one_digest_per_recipient_whatever_the_nodes(self) -> None:
        qa, qb, queued, clock, domain_id = await self.quarantines()
        await self.hold(qa, domain_id, 2)
        sent = await gather(qa.leased_digests(), qb.leased_digests(), qb.leased_digests())
        self.assertEqual(sorted(sent), [0, 0, 1])
        self.assertEqual([e.recipients[0].address for _n, e in queued], ["bob@customer.test"])
        # New mail held: nothing more within the period, then again one digest.
        await self.hold(qb, domain_id, 1)
        clock.advance(DAY / 2)
        self.assertEqual(await gather(qa.leased_digests(), qb.leased_digests()), [0, 0])
        clock.advance(DAY / 2)
        sent = await gather(qb.leased_digests(), qa.leased_digests())
        self.assertEqual(sorted(sent), [0, 1])
        self.assertEqual(len(queued), 2)

    def restarted(self, db: Database, node: str, queued: list[tuple[str, Envelope]]
                  ) -> QuarantineService:
        """Node `node`'s quarantine service after a restart (a new process)."""
        return QuarantineService(
            db, self.clock, QuarantineSettings(digest_interval=DAY, retention_days=30),
            Plans(), hostname="mx.test", signer=self.mktemp_path() / "quarantine.key",
            spool=RecordingSpool(queued, node, db), leases=JobLeases(db, node))

    async def hold_for(self, node: QuarantineService, domain_id: int, local: str,
                       n: int) -> None:
        self.held = getattr(self, "held", 0) + n
        items = [ToKeep(f"Q{i}", "spam@x.test", f"{local}@customer.test", domain_id, "spam",
                        "score 9") for i in range(self.held - n, self.held)]
        await node.keep(items, b"Subject: hi\r\n\r\nbody\r\n")

    async def killed_after_the_first_digest(self, node: QuarantineService) -> None:
        """Run `node`'s digests until the first one is queued, then leave the run hanging
        forever (a process killed right after that commit)."""
        committed: defer.Deferred[None] = defer.Deferred()
        spool = node.spool

        class Dies:
            async def accept(self, *args: Any, **kwargs: Any) -> None:
                await spool.accept(*args, **kwargs)
                committed.callback(None)
                await defer.Deferred()

        node.spool = Dies()
        defer.Deferred.fromCoroutine(node.leased_digests())
        await committed

    async def test_a_digest_run_cut_short_is_finished_at_the_next_start(self) -> None:
        """A run killed after bob's digest: at the node's next start carol (not reached)
        gets hers, with what was held for her meanwhile, and bob gets no second digest
        this period (his new mail waits for the next one)."""
        qa, qb, queued, clock, domain_id = await self.quarantines()
        self.clock = clock
        await self.hold_for(qa, domain_id, "bob", 2)
        await self.hold_for(qa, domain_id, "carol", 1)
        await self.killed_after_the_first_digest(qa)
        self.assertEqual([e.recipients[0].address for _n, e in queued], ["bob@customer.test"])
        clock.advance(3600)
        await self.hold_for(qb, domain_id, "bob", 1)
        await self.hold_for(qb, domain_id, "carol", 1)
        qa = self.restarted(qa.db, "node-a", queued)
        qa.startService()
        await qa.stopService()
        self.assertEqual([e.recipients[0].address for _n, e in queued],
                         ["bob@customer.test", "carol@customer.test"])
        # The run is finished: no sweep, start or node sends anything more this period.
        self.assertEqual(await gather(qa.resume_digests(), qb.resume_digests(),
                                      qa.leased_digests(), qb.leased_digests()), [0, 0, 0, 0])
        clock.advance(DAY)
        self.assertEqual(sorted(await gather(qa.leased_digests(), qb.leased_digests())),
                         [0, 1])
        self.assertEqual([e.recipients[0].address for _n, e in queued][2:],
                         ["bob@customer.test"])

    async def test_another_node_finishes_a_run_cut_short_once_its_lease_lapses(
            self) -> None:
        qa, qb, queued, clock, domain_id = await self.quarantines()
        await self.hold_for(qa, domain_id, "bob", 1)
        await self.hold_for(qa, domain_id, "carol", 1)
        await self.killed_after_the_first_digest(qa)
        # node-a may still be sending: node-b's sweep leaves the run alone ...
        self.assertEqual(await qb.resume_digests(), 0)
        clock.advance(SEND_HOLD)
        # ... until node-a's lease on it lapsed.
        self.assertEqual(sorted(await gather(qb.resume_digests(), qb.resume_digests())),
                         [0, 1])
        self.assertEqual([e.recipients[0].address for _n, e in queued],
                         ["bob@customer.test", "carol@customer.test"])
        self.assertEqual(await qb.resume_digests(), 0)

    async def test_a_disabled_owners_held_mail_waits_for_a_digest_until_it_is_enabled(
            self) -> None:
        """`mailcore user disable` (made on another node) stops the owner's digests on every
        node; the held mail stays undigested and is in the first period's digest once the
        owner is enabled."""
        qa, qb, queued, clock, domain_id = await self.quarantines()
        await self.hold(qa, domain_id, 2)
        await qb.db.run("disable", lambda c: c.execute(update(users).values(is_active=False)))
        for _ in range(2):
            self.assertEqual(await gather(qa.leased_digests(), qb.leased_digests()), [0, 0])
            clock.advance(DAY)
        self.assertEqual(queued, [])
        await qa.db.run("enable", lambda c: c.execute(update(users).values(is_active=True)))
        sent = await gather(qa.leased_digests(), qb.leased_digests())
        self.assertEqual(sorted(sent), [0, 1])
        self.assertEqual([e.recipients[0].address for _n, e in queued], ["bob@customer.test"])

    async def test_the_quarantine_purge_runs_on_one_node_per_period(self) -> None:
        """Of two nodes' quarantine services, each running its purge timer (started at
        once, or half a period apart), one purges per `[quarantine] purge_interval`: each
        node's purge deleted the same old rows at the same time."""
        qa, qb, _queued, clock, _domain_id = await self.quarantines()
        purged: list[str] = []
        for node, name in ((qa, "node-a"), (qb, "node-b")):
            async def purge(name: str = name) -> int:
                purged.append(name)
                return 0

            node.purge = purge  # type: ignore[method-assign]
            node.startService()
            self.addCleanup(node.stopService)
        interval = qa.settings.purge_interval

        async def advance(seconds: float) -> None:
            clock.advance(seconds)
            await gather(qa._runs.wait(), qb._runs.wait())

        await advance(0)  # their start: a digest run to resume, none to purge
        self.assertEqual(purged, [])
        await advance(interval)  # both timers fire
        self.assertEqual(len(purged), 1)
        await qb.stopService()  # node b restarts half a period later
        await advance(interval / 2)
        qb.startService()
        for _ in range(4):  # a's timer, then b's within a's period, twice
            await advance(interval / 2)
        self.assertEqual(len(purged), 3)
        self.assertEqual(purged[1:], ["node-a", "node-a"])

    async def test_purges_on_both_nodes_at_once_remove_each_old_message_once(self) -> None:
        qa, qb, _queued, clock, domain_id = await self.quarantines()
        await self.hold(qa, domain_id, 5)
        clock.advance(31 * DAY)
        await self.hold(qb, domain_id, 2)
        purged = await gather(qa.purge(), qb.purge(), qa.purge())
        self.assertEqual(sum(purged), 5)

        def count(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(quarantine)).scalar_one())

        self.assertEqual(await qa.db.read("count", count), 2)

    # -- account syncs -------------------------------------------------------------------

    async def engines(self) -> tuple[SyncEngine, SyncEngine, ConnectRecorder, Account]:
        a, b = await self.two_stores()
        reactor = ConnectRecorder()
        reactor.advance(START)
        box = SecretBox(Fernet.generate_key())
        owner = await a.run("owner", thd_make_user, "owner")
        settings = FetchSettings(allow_loopback=True)
        engines = []
        for db, node in ((a, "node-a"), (b, "node-b")):
            accounts = Accounts(db, reactor, box)
            store = MessageStore(db, CpuPool.for_tests(), reactor)
            engines.append(SyncEngine(reactor, db, accounts, store, settings, node_id=node))
        account = await engines[0].accounts.create(
            owner, host="127.0.0.1", port=143, username="u", password="pw",
            allow_cleartext=True,
        )
        return engines[0], engines[1], reactor, account

    async def test_one_account_is_never_synced_on_two_nodes_at_once(self) -> None:
        ea, eb, reactor, account = await self.engines()
        syncs = [ea.sync(account.id), eb.sync(account.id)]
        first, index = await defer.DeferredList(syncs, fireOnOneCallback=True,
                                                fireOnOneErrback=True)
        self.assertEqual(first.status, BUSY)
        winner, loser = (eb, ea) if index == 0 else (ea, eb)
        await reactor.tried  # the winner connects to the server
        self.assertEqual((await loser.sync(account.id)).status, BUSY)
        self.assertEqual(len(reactor.tcpClients), 1)
        # The sync ends (the server refuses it): the lease is free for the other node.
        reactor.refuse(0)
        ended = await syncs[1 - index]
        self.assertEqual(ended.status, "error")
        reactor.tried = defer.Deferred()
        second = loser.sync(account.id)
        await reactor.tried
        self.assertEqual(len(reactor.tcpClients), 2)
        reactor.refuse(1)
        self.assertEqual((await second).status, "error")
        self.assertEqual(winner.running(), [])

    async def test_a_due_account_is_synced_by_one_scheduler_of_two(self) -> None:
        ea, eb, reactor, account = await self.engines()
        sa, sb = FetchScheduler(ea), FetchScheduler(eb)
        started = await gather(sa.tick(), sb.tick())
        # Both may try (the store lets one through), or on a threaded store the second may
        # already see the account taken and not try at all; either way one sync runs.
        self.assertIn(sum(started), (1, 2))
        await reactor.tried
        reactor.refuse(0)
        for engine in (ea, eb):
            while engine.running():
                await defer.DeferredList([engine.sync(account.id)], consumeErrors=True)
        self.assertEqual(len(reactor.tcpClients), 1)
        # Not due again until its interval passed, on either node.
        reactor.advance(60)
        self.assertEqual(await gather(sa.tick(), sb.tick()), [0, 0])

    async def test_a_scheduler_that_looked_before_another_node_synced_does_nothing(
        self,
    ) -> None:
        ea, eb, reactor, account = await self.engines()
        looked = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
        reactor.advance(1)
        synced = ea.sync(account.id)
        await reactor.tried
        reactor.refuse(0)
        await synced  # node a synced (and let go of the lease) after b looked
        late = await eb.sync(account.id, due_before=looked)
        self.assertEqual(late.status, BUSY)
        self.assertEqual(len(reactor.tcpClients), 1)

    async def test_a_running_sync_keeps_its_lease_and_a_dead_nodes_lapses(self) -> None:
        ea, eb, reactor, account = await self.engines()
        syncing = ea.sync(account.id)
        await reactor.tried
        for _ in range(4):  # well past one lease: renewed every third of it
            reactor.advance(SYNC_LEASE / 3)
            await ea.renew_leases()
        self.assertEqual((await eb.sync(account.id)).status, BUSY)
        # Node a dies (its renewals stop); once its lease lapsed node b syncs.
        a_renewal = ea._renewal
        assert a_renewal is not None
        a_renewal.stop()
        reactor.advance(SYNC_LEASE)
        reactor.tried = defer.Deferred()
        taken = eb.sync(account.id)
        await reactor.tried
        self.assertEqual(len(reactor.tcpClients), 2)
        reactor.refuse(1)
        self.assertEqual((await taken).status, "error")
        # Node a's next renewal finds its lease gone and stops its own sync.
        await ea.renew_leases()
        await defer.DeferredList([syncing], consumeErrors=True)
        self.assertEqual(ea.running(), [])

    def sync_state(self, engine: SyncEngine, account_id: int) -> Any:
        def txn(conn: Connection) -> Any:
            return conn.execute(select(
                fetch_accounts.c.sync_status, fetch_accounts.c.sync_error,
                fetch_accounts.c.lease_owner).where(fetch_accounts.c.id == account_id)).one()

        return engine.db.read("sync state", txn)

    async def test_a_sync_that_outlived_its_lease_leaves_the_takers_outcome(self) -> None:
        """Node a stalls mid-sync past its lease (a pause, SIGSTOP: its renewals stop) and
        node b syncs the account meanwhile. When node a's sync ends after all, or is stopped
        at its next renewal, b's outcome stays recorded and is told once (one sync.completed
        webhook, not two)."""
        ea, eb, reactor, account = await self.engines()
        second = await ea.accounts.create(
            account.user_id, host="127.0.0.1", port=143, username="v", password="pw",
            allow_cleartext=True)
        told: list[tuple[str, int]] = []
        ea.listeners.append(lambda r: told.append(("node-a", r.account_id)))
        eb.listeners.append(lambda r: told.append(("node-b", r.account_id)))
        syncing = [ea.sync(account.id)]
        await reactor.tried
        reactor.tried = defer.Deferred()
        syncing.append(ea.sync(second.id))
        await reactor.tried
        a_renewal = ea._renewal
        assert a_renewal is not None
        a_renewal.stop()  # node a stalls
        reactor.advance(SYNC_LEASE)
        for i, acc in enumerate((account, second)):
            reactor.tried = defer.Deferred()
            taken = eb.sync(acc.id)
            await reactor.tried
            reactor.refuse(2 + i)
            self.assertEqual((await taken).status, "error")
        taken_over = [await self.sync_state(eb, acc.id) for acc in (account, second)]
        self.assertEqual(told, [("node-b", account.id), ("node-b", second.id)])
        # Node a wakes up: its first sync ends (its server refused it too) ...
        reactor.refuse(0)
        self.assertEqual((await syncing[0]).status, "error")
        # ... and its next renewal finds the second one taken over and stops it.
        await ea.renew_leases()
        await defer.DeferredList([syncing[1]], consumeErrors=True)
        self.assertEqual(told, [("node-b", account.id), ("node-b", second.id)])
        self.assertEqual([await self.sync_state(eb, acc.id) for acc in (account, second)],
                         taken_over)

    # -- webhook deliveries and their log ------------------------------------------------

    async def test_each_webhook_delivery_is_posted_by_one_node(self) -> None:
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        box = SecretBox(Fernet.generate_key())
        settings = WebhookSettings(concurrency=8)
        receivers = [Receiver(), Receiver()]
        services = [Webhooks(db, clock, box, settings) for db in (a, b)]
        senders = [WebhookSender(s, clock, StubTreq(r)) for s, r in zip(services, receivers,
                                                                         strict=True)]
        owner = await a.run("owner", thd_make_user, "owner")
        await services[0].create(owner, url="https://hooks.example.com/in",
                                 events=["sync.completed"])
        now = datetime.datetime.fromtimestamp(START, datetime.UTC)
        for i in range(30):
            await sync_ended(services[i % 2], SyncResult(
                account_id=i, user_id=owner, started_at=now, finished_at=now,
                status="success",
            ))
        for _ in range(100):  # sweeps of both nodes at once until every delivery is done
            await gather(senders[0].sweep(), senders[1].sweep())
            for sender in senders:
                pending = [d for *_, d in sender._in_flight.values()]
                await defer.DeferredList(pending, consumeErrors=True)
            if sum(len(r.received) for r in receivers) >= 30:
                break
        await gather(senders[0].sweep(), senders[1].sweep())  # nothing is left to post
        bodies = [body for r in receivers for _h, body in r.received]
        self.assertEqual(len(bodies), 30)
        self.assertEqual(len(set(bodies)), 30)

        def states(conn: Connection) -> list[str]:
            return [r.status for r in conn.execute(select(webhook_deliveries.c.status))]

        self.assertEqual(set(await a.read("states", states)), {"success"})
        # Pruning the log later on both nodes at once (one node's lease lapsed mid-prune):
        # each old row goes once, no error.
        clock.advance(settings.retention_days * DAY + 3601)
        pruned = await gather(senders[0].webhooks.prune(), senders[1].webhooks.prune())
        self.assertEqual(sum(pruned), 30)
        self.assertEqual(await a.read("states", states), [])

    async def test_each_pending_sync_event_is_told_by_one_node(self) -> None:
        """Twenty syncs' events pending (e-mails each sync committed, and its outcome): both
        nodes' sweeps and both nodes' end-of-sync tells at once write each event's delivery
        once (a sync's events are told by whichever transaction takes them first)."""
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        box = SecretBox(Fernet.generate_key())
        services = [Webhooks(db, clock, box) for db in (a, b)]
        owner = await a.run("owner", thd_make_user, "owner")
        await services[0].create(owner, url="https://hooks.example.com/in",
                                 events=["sync.completed", "email.new"])
        store = MessageStore(a, CpuPool.for_tests(), clock)
        ids = (await store.store_batch(
            Location(user_id=owner, account_id=None, folder_id=None, folder="INBOX"),
            [FetchedMessage(raw=mail(i)) for i in range(240)])).created
        now = datetime.datetime.fromtimestamp(START, datetime.UTC)
        for n in range(20):
            result = SyncResult(account_id=n + 1, user_id=owner, started_at=now,
                                finished_at=now, status="success", new_messages=12)

            def txn(conn: Connection, n: int = n, result: SyncResult = result) -> None:
                thd_record_batch(conn, owner, n + 1, ids[n * 12:n * 12 + 6], [], START)
                thd_record_batch(conn, owner, n + 1, ids[n * 12 + 6:n * 12 + 12], [], START)
                thd_record_outcome(conn, result, START)

            await (a, b)[n % 2].run("record", txn)
        await gather(*(service.tell_left() for service in services),
                     *(service.tell(account_scope(n)) for n in range(1, 21)
                       for service in services))

        def told(conn: Connection) -> list[tuple[str, Any]]:
            return [(r.event, json.loads(r.payload)["data"]) for r in conn.execute(
                select(webhook_deliveries.c.event, webhook_deliveries.c.payload))]

        rows = await a.read("told", told)
        emails = [e["id"] for event, data in rows if event == "email.new"
                  for e in data["emails"]]
        self.assertEqual(sorted(emails), sorted(ids))
        completed = sorted(data["imap_server"] for event, data in rows
                           if event == "sync.completed")
        self.assertEqual(completed, list(range(1, 21)))
        self.assertEqual(await gather(*(service.tell_left() for service in services)), [0, 0])

    async def test_a_node_whose_delivery_lease_lapsed_does_not_overwrite_the_new_outcome(
            self) -> None:
        """Node a claims a delivery and stalls (a GC pause, SIGSTOP) past its lease; node b
        takes it over and posts it (200). Node a's late outcome (its receiver said 500) must
        not replace b's success, or the delivery is pending again and posted a third time."""
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        box = SecretBox(Fernet.generate_key())
        settings = WebhookSettings()
        receivers = [Receiver(), Receiver()]
        services = [Webhooks(db, clock, box, settings) for db in (a, b)]
        senders = [WebhookSender(s, clock, StubTreq(r)) for s, r in zip(services, receivers,
                                                                         strict=True)]
        owner = await a.run("owner", thd_make_user, "owner")
        await services[0].create(owner, url="https://hooks.example.com/in",
                                 events=["sync.completed"])
        now = datetime.datetime.fromtimestamp(START, datetime.UTC)
        await sync_ended(services[0], SyncResult(
            account_id=1, user_id=owner, started_at=now, finished_at=now, status="success"))
        [item] = await a.run("claim", thd_claim_due_webhooks, START, START + 60.0, 1)
        clock.advance(61)  # node a stalls past its lease: node b takes the delivery over
        self.assertEqual(await senders[1].sweep(), 1)
        await defer.DeferredList([d for *_, d in senders[1]._in_flight.values()])
        receivers[0].codes = [500]
        await senders[0].attempt(item)  # node a wakes up and finishes its attempt

        def row(conn: Connection) -> tuple[str, int]:
            r = conn.execute(select(webhook_deliveries.c.status,
                                    webhook_deliveries.c.attempts)).one()
            return r.status, r.attempts

        self.assertEqual(await a.read("row", row), ("success", 1))
        clock.advance(DAY)
        self.assertEqual(await gather(senders[0].sweep(), senders[1].sweep()), [0, 0])
        self.assertEqual([len(r.received) for r in receivers], [1, 1])

    # -- credentials ---------------------------------------------------------------------

    async def test_credential_sweeps_on_both_nodes_at_once_purge_each_once(self) -> None:
        a, b = await self.two_stores()
        from mailcore.identity import Identity

        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")
        expired = datetime.datetime.fromtimestamp(START - 30 * DAY, datetime.UTC)

        def txn(conn: Connection) -> None:
            for i in range(6):
                conn.execute(insert(credentials).values(
                    user_id=owner, kind="session", prefix=f"p{i}", digest=bytes([i]) * 32,
                    scopes="", created_at=expired, expires_at=expired,
                ))

        await a.run("credentials", txn)
        nodes = [Identity(db, clock, CpuPool.for_tests()) for db in (a, b)]
        purged = await gather(nodes[0].purge_expired(), nodes[1].purge_expired())
        self.assertEqual(sum(purged), 6)

    # -- safedrop expiry sweeps ----------------------------------------------------------

    async def test_an_expired_drop_is_removed_and_summarised_by_one_node(self) -> None:
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")
        then = datetime.datetime.fromtimestamp(START - DAY, datetime.UTC)

        def txn(conn: Connection) -> None:
            for i in range(4):
                conn.execute(insert(drop_bundles).values(
                    owner_id=owner, subject=f"drop {i}", message="", expiry_date=then,
                    email_receipt_when=0, read_remove=False, allow_comments=False,
                    require_token_auth=False, created_at=then, sent_at=then,
                ))

        await a.run("drops", txn)
        queued: list[tuple[str, Envelope]] = []
        nodes = []
        for db, node in ((a, "node-a"), (b, "node-b")):
            drops = SafedropService(
                db, clock, CpuPool.for_tests(), SecretBox(Fernet.generate_key()),
                RecordingSpool(queued, node, db), SafedropSettings(),  # type: ignore[arg-type]
                data_dir=self.mktemp_path(), hostname="mx.test",
            )
            drops.files.prepare()
            nodes.append(drops)
        removed = await gather(nodes[0].sweep(), nodes[1].sweep(), nodes[0].sweep())
        self.assertEqual(sum(removed), 4)
        self.assertEqual(len(queued), 4)  # one summary per drop

    # -- the Mail API's file sweep --------------------------------------------------------

    async def test_the_mail_api_file_sweep_runs_on_one_node_per_period(self) -> None:
        """The nodes share `files_dir`: the sweep the Core runs (listing every file of it)
        is done by one node per `[mailapi] file_sweep_interval`, not by each."""
        await self.one_node_per_period(MailFilesSweeper, "mail", "sweep")

    async def test_the_mail_api_gone_sweep_runs_on_one_node_per_period(self) -> None:
        """The expired places of mail that left a mailbox (mailapi_gone) are deleted by one
        node per GONE_SWEEP_INTERVAL (not by every delete and send any more)."""
        await self.one_node_per_period(GoneSweeper, "mail", "sweep_gone")

    async def test_the_oauth_prune_runs_on_one_node_per_period(self) -> None:
        """The spent OAuth codes and tokens are pruned by one node per PRUNE_INTERVAL: two
        nodes' batched deletes of the same rows could deadlock on PostgreSQL (retried, but
        both nodes' work wasted)."""
        await self.one_node_per_period(OAuthPruner, "oauth", "prune", (0, 0))

    async def test_the_webhook_log_prune_runs_on_one_node_per_period(self) -> None:
        """The finished webhook deliveries past their retention are pruned by one node per
        hour: every node's sender pruned them, at the same hour, on the same rows."""
        await self.one_node_per_period(WebhookPruner, "webhooks", "prune")

    async def test_the_credential_sweep_runs_on_one_node_per_period(self) -> None:
        await self.one_node_per_period(CredentialSweeper, "identity", "purge_expired")

    async def test_the_rate_bucket_sweep_runs_on_one_node_per_period(self) -> None:
        await self.one_node_per_period(BucketSweeper, "rate_buckets", "sweep",
                                       period=SWEEP_INTERVAL)

    async def test_the_api_sends_sweep_runs_on_one_node_per_period(self) -> None:
        await self.one_node_per_period(SendsSweeper, "send_caps", "sweep",
                                       period=sendcaps.SWEEP_INTERVAL)

    async def test_the_safedrop_sweep_runs_on_one_node_per_period(self) -> None:
        """The drops' rows and files are shared: one node sweeps them per `[safedrop]
        sweep_interval` (two could not both mail an expiry notice: see
        test_an_expired_drop_is_removed_and_summarised_by_one_node)."""
        await self.one_node_per_period(SafedropSweeper, "safedrop", "sweep",
                                       period=SafedropSettings().sweep_interval)

    async def test_the_mta_sts_policy_sweep_runs_on_one_node_per_period(self) -> None:
        """The expired MTA-STS policies (mta_sts_policies, shared) are deleted by one node
        per hour, not by each."""
        await self.one_node_per_period(PolicySweeper, "", "sweep")

    async def test_the_old_jobs_sweep_runs_on_one_node_per_period(self) -> None:
        """The items of the migrates and restores past `[dropmyemail]
        jobs_kept_per_account` are deleted by one node per FORGET_INTERVAL, in batches."""
        await self.one_node_per_period(OldJobsSweeper, "jobs", "forget_old_jobs",
                                       period=FORGET_INTERVAL)

    async def test_the_token_sweep_runs_on_one_node_per_period(self) -> None:
        """The token tanks' sweep (rollovers, the purge of old usage and charges) is run by
        one node per `[tokens] rollover_interval`: each node's sweep locked and deleted the
        same rows at the same time. (Any node's charge rolls a tank over lazily:
        tests.test_tokens test_a_node_that_did_not_sweep_rolls_a_tank_over_as_it_charges.)"""
        await self.one_node_per_period(TokenService, "tokens", "sweep",
                                       period=TokenSettings().rollover_interval)

    async def one_node_per_period(self, kind: type[PeriodicService], service: str, method: str,
                                  result: object = 0, period: float = 3600.0) -> None:
        """Of two nodes' Cores, one runs the `kind` sweep (the Core's `service`'s `method`,
        or the sweeper's own when `service` is "", here answering `result`) each `period`
        seconds."""
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        files = self.mktemp_path()
        swept: list[str] = []
        sweepers = []
        for db, node in ((a, "node-a"), (b, "node-b")):
            config = Config(files_dir=files, sections={"queue": {"node_id": node}})
            core = Core.build(config, db, clock, cpu=CpuPool.for_tests())

            async def sweep(node: str = node) -> object:
                swept.append(node)
                return result

            sweeper = next(s for s in core.background_services() if isinstance(s, kind))
            setattr(getattr(core, service) if service else sweeper, method, sweep)
            sweepers.append(sweeper)
        await gather(sweepers[0].leased_tick(), sweepers[1].leased_tick())
        self.assertEqual(len(swept), 1)
        clock.advance(period / 2)  # within the period: neither sweeps again
        await gather(sweepers[1].leased_tick(), sweepers[0].leased_tick())
        self.assertEqual(len(swept), 1)
        clock.advance(period / 2)
        await gather(sweepers[1].leased_tick(), sweepers[0].leased_tick())
        self.assertEqual(len(swept), 2)

    # -- the Mail API's outbox -----------------------------------------------------------

    async def test_the_outbox_is_sent_by_one_node_at_a_time_each_message_once(self) -> None:
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")

        await a.run("outbox", thd_outbox_mail, owner, 12)
        queued: list[tuple[str, Envelope]] = []
        accepted: list[str] = []

        class Spool(RecordingSpool):
            async def accept(self, queue_id: str, envelope: Envelope, body: bytes, *,
                             guard: Callable[[Connection], bool] | None = None) -> None:
                accepted.append(queue_id)
                await super().accept(queue_id, envelope, body, guard=guard)

        claims: list[str] = []

        class Leases(JobLeases):
            async def claim(self, name: str, now: float, hold: float) -> bool:
                claims.append(self.node_id)
                return await super().claim(name, now, hold)

        senders = [OutboxSender(db, clock, Spool(queued, node, db),  # type: ignore[arg-type]
                                leases=Leases(db, node))
                   for db, node in ((a, "node-a"), (b, "node-b"))]
        for sender in senders:
            sender.startService()  # each looks at the outbox at once
            self.addCleanup(sender.stopService)

        async def passes() -> None:
            await defer.DeferredList([s.settled() for s in senders])

        await passes()
        for _ in range(20):  # the nodes' polls, until the outbox is empty
            if len(accepted) >= 12:
                break
            clock.advance(OUTBOX_POLL)
            await passes()
        self.assertEqual(accepted, [f"Q{i:04d}" for i in range(12)])  # once each, in order
        # The holder renews its lease only when half of it has passed, not per message.
        self.assertLess(len(claims), 12)

        def statuses(conn: Connection) -> set[str]:
            return {r.status for r in conn.execute(select(mailapi_mail.c.status))}

        self.assertEqual(await a.read("statuses", statuses), {SENT})

    async def test_a_dead_senders_outbox_is_taken_over_once_its_lease_lapsed(self) -> None:
        """Node a dies (SIGKILL) right after queueing the first mail of the outbox: node b
        leaves the outbox alone while a's lease lasts, then sends the rest, once each and
        in order."""
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")
        await a.run("outbox", thd_outbox_mail, owner, 5)
        queued: list[tuple[str, Envelope]] = []
        accepted: list[str] = []
        committed: defer.Deferred[None] = defer.Deferred()

        class Spool(RecordingSpool):
            async def accept(self, queue_id: str, envelope: Envelope, body: bytes, *,
                             guard: Callable[[Connection], bool] | None = None) -> None:
                await super().accept(queue_id, envelope, body, guard=guard)
                accepted.append(queue_id)
                if self.node == "node-a":
                    committed.callback(None)
                    await defer.Deferred()  # killed: never returns, never lets go

        dying = OutboxSender(a, clock, Spool(queued, "node-a", a),  # type: ignore[arg-type]
                             leases=JobLeases(a, "node-a"))
        dying.startService()
        await committed
        assert dying._poll is not None
        dying._poll.stop()  # the process is gone: no timer of its runs any more
        taker = OutboxSender(b, clock, Spool(queued, "node-b", b),  # type: ignore[arg-type]
                             leases=JobLeases(b, "node-b"))
        taker.startService()
        self.addCleanup(taker.stopService)
        await taker.settled()
        while clock.seconds() < START + OUTBOX_LEASE - OUTBOX_POLL:
            clock.advance(OUTBOX_POLL)
            await taker.settled()
        self.assertEqual(accepted, ["Q0000"])  # a's lease still holds
        for _ in range(10):
            clock.advance(OUTBOX_POLL)
            await taker.settled()
            if len(accepted) >= 5:
                break
        self.assertEqual(accepted, [f"Q{i:04d}" for i in range(5)])
        self.assertEqual([n for n, _e in queued], ["node-a"] + ["node-b"] * 4)

    async def test_a_disabled_owners_outbox_waits_on_every_node_until_it_is_enabled(
            self) -> None:
        """`mailcore user disable` (the CLI, another process) stops the owner's outbox on
        both nodes: its mail stays in the outbox, neither sent nor failed, and once the owner
        is enabled the nodes' polls send it, once each and in order."""
        a, b = await self.two_stores()
        clock = Clock()
        clock.advance(START)
        owner = await a.run("owner", thd_make_user, "owner")

        def txn(conn: Connection) -> None:
            thd_outbox_mail(conn, owner, 3)
            conn.execute(update(users).where(users.c.id == owner).values(is_active=False))

        await a.run("outbox", txn)
        queued: list[tuple[str, Envelope]] = []
        senders = [OutboxSender(db, clock, RecordingSpool(queued, node, db),  # type: ignore[arg-type]
                                leases=JobLeases(db, node))
                   for db, node in ((a, "node-a"), (b, "node-b"))]
        for sender in senders:
            sender.startService()
            self.addCleanup(sender.stopService)

        async def polls(n: int) -> None:
            for _ in range(n):
                clock.advance(OUTBOX_POLL)
                await defer.DeferredList([s.settled() for s in senders])

        await polls(3)
        self.assertEqual(queued, [])

        def statuses(conn: Connection) -> list[str]:
            return [r.status for r in conn.execute(
                select(mailapi_mail.c.status).order_by(mailapi_mail.c.id))]

        self.assertEqual(await b.read("statuses", statuses), [OUTBOX] * 3)
        await b.run("enable", lambda c: c.execute(
            update(users).where(users.c.id == owner).values(is_active=True)))
        await polls(10)
        self.assertEqual(len(queued), 3)
        self.assertEqual(await a.read("statuses", statuses), [SENT] * 3)


class SQLiteSharedJobsTests(SharedJobsMixin, TestCase):
    backend = "sqlite"


class PostgresSharedJobsTests(SharedJobsMixin, TestCase):
    backend = "postgresql"


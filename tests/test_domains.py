"""DomainService: domains and address lists in the store, and the per-RCPT snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, create_engine, delete, event, insert, select
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.config import ConfigError
from mailcore.gateway.domains import (
    DomainError,
    DomainLimitReached,
    DomainService,
    DomainSettings,
    format_redirect,
    normalise_domain,
    normalise_local_part,
    parse_redirect,
)
from mailcore.identity import Identity
from mailcore.queue.model import thd_vouched_domain_for
from mailcore.store.schema import domain_addresses, domains
from mailcore.workers import CpuPool
from tests.support.db import open_database, synchronous_database
from tests.support.pg import create_test_database


class NamesTests(TestCase):
    """Normalisation and validation of domain names, local parts and redirectTo."""

    def test_domain_names_are_idna_lower_case_without_trailing_dot(self) -> None:
        self.assertEqual(normalise_domain("Example.COM."), "example.com")
        self.assertEqual(normalise_domain("Bücher.de"), "xn--bcher-kva.de")
        self.assertEqual(normalise_domain("xn--bcher-kva.de"), "xn--bcher-kva.de")
        self.assertEqual(normalise_domain(" ÉCOLE.fr "), "xn--cole-9oa.fr")

    def test_bad_domain_names_are_refused_with_a_reason(self) -> None:
        for bad in ("", ".", "localhost", "1.2.3.4", "a..b", "-a.com", "a_b.com",
                    "[1.2.3.4]", "a" * 64 + ".com", "ex ample.com", "user@example.com"):
            with self.subTest(bad=bad):
                with self.assertRaises(DomainError) as cm:
                    normalise_domain(bad)
                self.assertEqual(cm.exception.field, "domain")
                self.assertTrue(cm.exception.message)

    def test_local_parts_are_dot_atoms_kept_in_lower_case(self) -> None:
        self.assertEqual(normalise_local_part("John.Doe"), "john.doe")
        self.assertEqual(normalise_local_part("a+tag"), "a+tag")
        for bad in ("", "a..b", ".a", "a.", '"quoted"', "a b", "x" * 65, "é", "a@b.com"):
            with self.subTest(bad=bad), self.assertRaises(DomainError):
                normalise_local_part(bad)

    def test_redirect_spellings(self) -> None:
        cases = {
            "mx.example.net": ("mx.example.net", 25),
            "MX.Example.NET:2525": ("mx.example.net", 2525),
            "localhost": ("localhost", 25),
            "192.0.2.7": ("192.0.2.7", 25),
            "192.0.2.7:587": ("192.0.2.7", 587),
            "[192.0.2.7]": ("192.0.2.7", 25),
            "[192.0.2.7]:26": ("192.0.2.7", 26),
            "[2001:db8::1]": ("2001:db8::1", 25),
            "[2001:DB8:0::1]:2525": ("2001:db8::1", 2525),
            "[IPv6:2001:db8::1]:2526": ("2001:db8::1", 2526),
            "2001:db8::1": ("2001:db8::1", 25),
            "bücher.de:26": ("xn--bcher-kva.de", 26),
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parse_redirect(text), expected)

    def test_bad_redirects_are_refused(self) -> None:
        for bad in ("", "host:", "host:0", "host:65536", "host:abc", "[mx.example.net]",
                    "[2001:db8::1", "[192.0.2.1]x", "2001:db8::1:25x", "a b", "host:25:26"):
            with self.subTest(bad=bad):
                with self.assertRaises(DomainError) as cm:
                    parse_redirect(bad)
                self.assertEqual(cm.exception.field, "redirectTo")

    def test_an_ipv6_zone_index_is_refused(self) -> None:
        # ipaddress takes any text after the "%": it would be stored as the next hop.
        for bad in ("[fe80::1%eth0]", "[2001:db8::1%eth0]:2525", "2001:db8::1%eth0",
                    "[IPv6:2001:db8::1%1]", "[2001:db8::1%\r\nRCPT TO:<x@y.test>]",
                    "[2001:db8::1%" + "x" * 300 + "]"):
            with self.subTest(bad=bad):
                with self.assertRaises(DomainError) as cm:
                    parse_redirect(bad)
                self.assertEqual(cm.exception.field, "redirectTo")
                self.assertIn("zone index", cm.exception.message)

    def test_format_redirect_inverts_parse(self) -> None:
        for text in ("mx.example.net", "mx.example.net:2525", "[2001:db8::1]",
                     "[2001:db8::1]:2525", "192.0.2.7:26"):
            with self.subTest(text=text):
                self.assertEqual(format_redirect(*parse_redirect(text)), text)


class DomainServiceTests(TestCase):
    """The store API, on the synchronous in-memory database."""

    def setUp(self) -> None:
        self.db = synchronous_database()
        self.clock = Clock()
        self.clock.advance(1_750_000_000)
        self.identity = Identity(self.db, self.clock, CpuPool.for_tests())
        self.domains = DomainService(self.db, self.clock, refresh_interval=30)

    async def user(self, name: str) -> int:
        return (await self.identity.create_user(name, f"{name}@users.test")).id

    async def test_add_get_list(self) -> None:
        alice = await self.user("alice")
        bob = await self.user("bob")
        added = await self.domains.add("Bücher.DE", alice, "[2001:db8::25]:2525",
                                       spam_action=1, require_tls=True)
        self.assertEqual(added.name, "xn--bcher-kva.de")
        self.assertEqual(added.unicode_name, "bücher.de")
        self.assertEqual((added.redirect_host, added.redirect_port), ("2001:db8::25", 2525))
        self.assertEqual(added.redirect_to, "[2001:db8::25]:2525")
        self.assertEqual((added.spam_action, added.virus_action), (1, 0))
        self.assertTrue(added.require_tls)
        self.assertFalse(added.send_resume)
        self.assertEqual(added.created_at.timestamp(), 1_750_000_000)
        await self.domains.add("b.example", bob, "mx.b.example")
        await self.domains.add("a.example", alice, "mx.a.example")
        self.assertEqual(await self.domains.get("BÜCHER.de"), added)
        self.assertIsNone(await self.domains.get("bücher.de", owner_id=bob))
        self.assertIsNone(await self.domains.get("not a domain"))
        self.assertEqual([d.name for d in await self.domains.list()],
                         ["a.example", "b.example", "xn--bcher-kva.de"])
        self.assertEqual([d.name for d in await self.domains.list(alice)],
                         ["a.example", "xn--bcher-kva.de"])

    async def test_only_the_operators_adds_are_vouched_for_when_nothing_is_verified(
        self,
    ) -> None:
        # verify_domains off: both are served at once, but only the operator's (the CLI
        # passes verified=True) draws this gateway's own mail straight to its next hop; a
        # user's claim of any name through the API does not (queue.model.VOUCHED).
        alice = await self.user("alice")
        operators = await self.domains.add("vouched.test", alice, "mx.v.test", verified=True)
        claimed = await self.domains.add("gmail.test", alice, "mx.claimant.test")
        self.assertFalse(operators.pending or claimed.pending)
        self.assertIsNotNone(operators.verified_at)
        self.assertIsNone(claimed.verified_at)
        self.assertEqual(await self.db.read("v", thd_vouched_domain_for, "vouched.test"),
                         operators.id)
        self.assertIsNone(await self.db.read("v", thd_vouched_domain_for, "gmail.test"))

    async def test_add_refuses_duplicates_unknown_owners_and_bad_options(self) -> None:
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        with self.assertRaises(DomainError) as cm:
            await self.domains.add("EXAMPLE.com.", alice, "mx.example.net")
        self.assertIn("already served", cm.exception.message)
        with self.assertRaises(DomainError) as cm:
            await self.domains.add("other.com", 999, "mx.example.net")
        self.assertEqual(cm.exception.field, "owner")
        for options, field in (
            ({"spam_action": 2}, "spam_action"),
            ({"virus_action": True}, "virus_action"),
            ({"send_resume": "yes"}, "send_resume"),
            ({"resume_reply_to": "not-an-address"}, "resume_reply_to"),
            ({"colour": "blue"}, "colour"),
        ):
            with self.subTest(options=options):
                with self.assertRaises(DomainError) as cm:
                    await self.domains.add("other.com", alice, "mx.example.net", **options)
                self.assertEqual(cm.exception.field, field)
        self.assertEqual(len(await self.domains.list()), 1)

    async def test_resume_reply_to_is_one_address(self) -> None:
        # The digests' Reply-To field: "a,b@x.test" made it a list of two mailboxes (one
        # without a domain), "a:b@x.test" a group, and ESC or DEL went into the header raw.
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        for bad in ("a,b@x.test", "a:b@x.test;", "<a@x.test>", "a\x1bb@x.test",
                    "a@x.test\x7f", "a b@x.test", "a(c)@x.test", "a@", "@x.test", "a@b@x.test",
                    "a..b@x.test", "a@x_y.test", "Bob <b@x.test>", "x" * 65 + "@x.test",
                    # RFC 2047 words: a line break, or a name, once decoded.
                    "=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?=@x.test",
                    "=?utf-8?q?Support?=@x.test"):
            with self.subTest(bad=bad), self.assertRaises(DomainError) as cm:
                await self.domains.update("example.com", {"resume_reply_to": bad})
            self.assertEqual(cm.exception.field, "resume_reply_to")
        for good in ("support@example.test", "first.last+tag@sub.example.test",
                     " help@x.test ", "élise@bücher.example", "o'neil@x.test"):
            with self.subTest(good=good):
                stored = await self.domains.update("example.com", {"resume_reply_to": good})
                self.assertEqual(stored.resume_reply_to, good.strip())

    async def test_a_subject_template_that_decodes_to_a_line_break_is_refused(self) -> None:
        # The digests' Subject: an RFC 2047 word decoding to CR LF was taken (only raw
        # control characters were refused), and made every digest of the domain unbuildable.
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        for bad in ("=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?= {count}", "held\r\nBcc: x@y"):
            with self.subTest(bad=bad), self.assertRaises(DomainError) as cm:
                await self.domains.update("example.com", {"resume_template_subject": bad})
            self.assertEqual(cm.exception.field, "resume_template_subject")
        good = "=?utf-8?q?R=C3=A9sum=C3=A9?= {count} for {email}"
        stored = await self.domains.update("example.com", {"resume_template_subject": good})
        self.assertEqual(stored.resume_template_subject, good)

    async def test_update_changes_only_what_is_given(self) -> None:
        alice = await self.user("alice")
        bob = await self.user("bob")
        await self.domains.add("example.com", alice, "mx.example.net", send_resume=True)
        updated = await self.domains.update(
            "example.com", {"redirect_to": "192.0.2.9:2525", "virus_action": 1,
                            "resume_link_hostname": "Quarantine.Example.com"}
        )
        self.assertEqual(updated.redirect_to, "192.0.2.9:2525")
        self.assertEqual(updated.virus_action, 1)
        self.assertTrue(updated.send_resume)
        self.assertEqual(updated.resume_link_hostname, "quarantine.example.com")
        with self.assertRaises(DomainError):
            await self.domains.update("example.com", {"virus_action": 1}, owner_id=bob)
        with self.assertRaises(DomainError):
            await self.domains.update("nowhere.example", {"virus_action": 1})

    async def test_digest_templates_are_text(self) -> None:
        """The digest's Subject template is one header line; its body and item templates are
        text someone reads (TAB, CR, LF and U+2028 kept). Control characters reached the
        digest's Subject header."""
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        for field, value in [("resume_template_subject", "held\x00x"),
                             ("resume_template_subject", "held \x1b[31m"),
                             ("resume_template_subject", "held\r\nBcc: x@y.test"),
                             ("resume_template_subject", "held\u2028x"),
                             ("resume_template_body", "a\x00b"),
                             ("resume_template_resume", "a\x7fb")]:
            with self.assertRaises(DomainError) as cm:
                await self.domains.update("example.com", {field: value})
            self.assertEqual(cm.exception.field, field)
        text = "Dear {email},\r\n\tsee {count}\u2028below.\n"
        updated = await self.domains.update(
            "example.com", {"resume_template_body": text, "resume_template_resume": text,
                            "resume_template_subject": "{count} held for {email}"})
        self.assertEqual(updated.resume_template_body, text)

    async def test_tls_policy_defaults_to_the_queue_and_can_be_overridden(self) -> None:
        alice = await self.user("alice")
        plain = await self.domains.add("plain.example", alice, "mx.plain.example")
        self.assertIsNone(plain.tls)
        self.assertFalse(plain.require_tls)
        lax = await self.domains.add("lax.example", alice, "mx.lax.example", tls="may")
        self.assertEqual(lax.tls, "may")
        for policy in ("none", "verify-if-offered", "verify", "may"):
            self.assertEqual((await self.domains.update("plain.example", {"tls": policy})).tls,
                             policy)
        for cleared in (None, "", "default"):
            await self.domains.update("plain.example", {"tls": "verify"})
            self.assertIsNone((await self.domains.update("plain.example",
                                                          {"tls": cleared})).tls)
        for bad in ("sometimes", "VERIFY", 1, True):
            with self.subTest(bad=bad):
                with self.assertRaises(DomainError) as cm:
                    await self.domains.update("plain.example", {"tls": bad})
                self.assertEqual(cm.exception.field, "tls")
                self.assertIn("verify-if-offered", cm.exception.message)
        self.assertIsNone((await self.domains.get("plain.example")).tls)  # type: ignore[union-attr]

    async def test_require_tls_is_the_verify_policy_and_never_contradicts_it(self) -> None:
        """One stored knob: require_tls true sets tls "verify"; false drops only a
        "verify"; a request that says both ways at once is refused."""
        alice = await self.user("alice")
        strict = await self.domains.add("strict.example", alice, "mx", require_tls=True)
        self.assertEqual((strict.tls, strict.require_tls), ("verify", True))
        relaxed = await self.domains.update("strict.example", {"require_tls": False})
        self.assertEqual((relaxed.tls, relaxed.require_tls), (None, False))
        await self.domains.update("strict.example", {"tls": "may"})
        kept = await self.domains.update("strict.example", {"require_tls": False})
        self.assertEqual(kept.tls, "may")  # not a "verify" to drop
        self.assertEqual((await self.domains.update("strict.example", {"tls": "verify"}))
                         .require_tls, True)
        both = await self.domains.add("both.example", alice, "mx", require_tls=True,
                                      tls="verify")
        self.assertEqual(both.tls, "verify")
        for options in ({"require_tls": True, "tls": "may"},
                        {"require_tls": False, "tls": "verify"},
                        {"require_tls": True, "tls": None}):
            with self.subTest(options=options):
                with self.assertRaises(DomainError) as cm:
                    await self.domains.update("strict.example", options)
                self.assertEqual(cm.exception.field, "tls")
                self.assertIn("contradicts", cm.exception.message)
        with self.assertRaises(DomainError):
            await self.domains.add("other.example", alice, "mx", require_tls=True, tls="none")
        self.assertEqual((await self.domains.get("strict.example")).tls, "verify")  # type: ignore[union-attr]

    async def test_remove_takes_the_address_list_along(self) -> None:
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        await self.domains.add_address("example.com", "john")
        await self.domains.remove("Example.com")
        self.assertIsNone(await self.domains.get("example.com"))

        def count(conn: Connection) -> int:
            return len(conn.execute(select(domain_addresses)).all())

        self.assertEqual(await self.db.read("count", count), 0)
        with self.assertRaises(DomainError) as cm:
            await self.domains.remove("example.com")
        self.assertIn("No such domain", cm.exception.message)

    async def test_addresses(self) -> None:
        alice = await self.user("alice")
        await self.domains.add("example.com", alice, "mx.example.net")
        self.assertEqual(await self.domains.list_addresses("example.com"), [])
        self.assertTrue(await self.domains.add_address("example.com", "Postmaster"))
        self.assertTrue(await self.domains.add_address("EXAMPLE.com", "john"))
        self.assertFalse(await self.domains.add_address("example.com", "JOHN"))
        self.assertEqual(await self.domains.list_addresses("example.com"),
                         ["john", "postmaster"])
        await self.domains.remove_address("example.com", "John")
        self.assertEqual(await self.domains.list_addresses("example.com"), ["postmaster"])
        with self.assertRaises(DomainError):
            await self.domains.remove_address("example.com", "john")
        with self.assertRaises(DomainError):
            await self.domains.add_address("nowhere.example", "john")
        with self.assertRaises(DomainError):
            await self.domains.add_address("example.com", "bad..local")


class SnapshotTests(TestCase):
    """lookup/accepts answer from memory; changes and the timer refresh them."""

    def setUp(self) -> None:
        self.db = synchronous_database()
        self.clock = Clock()
        self.identity = Identity(self.db, self.clock, CpuPool.for_tests())
        self.domains = DomainService(self.db, self.clock, refresh_interval=30)
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.domains.running:
            self.domains.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def owner(self) -> int:
        return (await self.identity.create_user("alice", "alice@users.test")).id

    async def test_changes_through_the_service_show_at_once(self) -> None:
        owner = await self.owner()
        self.domains.startService()
        self.assertTrue(self.domains.loaded)
        self.assertIsNone(self.domains.lookup("example.com"))
        added = await self.domains.add("example.com", owner, "mx.example.net")
        self.assertEqual(self.domains.lookup("EXAMPLE.COM"), added)
        self.assertEqual(self.domains.lookup("example.com."), added)
        self.assertEqual(self.domains.domain_by_id(added.id), added)
        self.assertTrue(self.domains.accepts("anyone", "example.com"))
        await self.domains.add_address("example.com", "john")
        self.assertTrue(self.domains.accepts("John", "example.com"))
        self.assertFalse(self.domains.accepts("anyone", "example.com"))
        self.assertFalse(self.domains.accepts("john", "other.example"))
        # RFC 5321 4.5.1: postmaster@ every served domain, listed or not.
        self.assertTrue(self.domains.accepts("PostMaster", "example.com"))
        self.assertFalse(self.domains.accepts("postmaster", "other.example"))
        await self.domains.remove("example.com")
        self.assertIsNone(self.domains.lookup("example.com"))

    async def test_unicode_lookup(self) -> None:
        owner = await self.owner()
        self.domains.startService()
        added = await self.domains.add("bücher.de", owner, "mx.example.net")
        self.assertEqual(self.domains.lookup("BÜCHER.de"), added)
        self.assertEqual(self.domains.lookup("XN--BCHER-KVA.DE"), added)

    async def test_lookups_use_no_sql(self) -> None:
        owner = await self.owner()
        self.domains.startService()
        await self.domains.add("example.com", owner, "mx.example.net")
        calls: list[str] = []
        original = self.db._transaction

        def counting(name: str, *args: object, **kwargs: object) -> object:
            calls.append(name)
            return original(name, *args, **kwargs)  # type: ignore[arg-type]

        self.db._transaction = counting  # type: ignore[method-assign,assignment]
        for _ in range(100):
            self.assertTrue(self.domains.accepts("x", "example.com"))
            self.assertIsNotNone(self.domains.lookup("example.com"))
        self.assertEqual(calls, [])

    async def test_changes_by_another_node_show_after_the_refresh_interval(self) -> None:
        owner = await self.owner()
        self.domains.startService()

        def other_node(conn: Connection) -> None:
            conn.execute(insert(domains).values(
                owner_id=owner, name="late.example", redirect_host="mx", redirect_port=25,
                created_at=self.domains.now()))

        await self.db.run("other_node", other_node)
        self.assertIsNone(self.domains.lookup("late.example"))
        self.clock.advance(29)
        self.assertIsNone(self.domains.lookup("late.example"))
        self.clock.advance(1)
        self.assertIsNotNone(self.domains.lookup("late.example"))

    async def test_unused_service_keeps_no_snapshot(self) -> None:
        owner = await self.owner()
        await self.domains.add("example.com", owner, "mx.example.net")
        self.assertFalse(self.domains.loaded)
        self.assertIsNone(self.domains.lookup("example.com"))

    async def test_when_loaded_waits_for_the_first_load(self) -> None:
        owner = await self.owner()
        await self.domains.add("example.com", owner, "mx.example.net")
        waiter = self.domains.when_loaded()
        self.assertTrue(waiter.called)
        self.assertTrue(self.domains.loaded)
        self.assertIsNotNone(self.domains.lookup("example.com"))

    async def test_a_failed_first_load_fails_the_waiters_and_later_loads_recover(self) -> None:
        owner = await self.owner()
        await self.domains.add("example.com", owner, "mx.example.net")
        original = self.db.read
        self.db.read = lambda *a, **k: fail(RuntimeError("database down"))  # type: ignore
        waiter = self.domains.when_loaded()
        self.failureResultOf(waiter, RuntimeError)
        self.assertFalse(self.domains.loaded)
        self.flushLoggedErrors(RuntimeError)
        self.db.read = original  # type: ignore[method-assign]
        self.domains.startService()
        self.assertTrue(self.domains.loaded)

    async def test_a_failed_refresh_keeps_the_old_snapshot_and_the_timer(self) -> None:
        owner = await self.owner()
        self.domains.startService()
        await self.domains.add("example.com", owner, "mx.example.net")
        original = self.db.read
        self.db.read = lambda *a, **k: fail(RuntimeError("database down"))  # type: ignore
        self.clock.advance(30)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNotNone(self.domains.lookup("example.com"))
        self.db.read = original  # type: ignore[method-assign]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    async def test_pending_load_is_shared(self) -> None:
        """While a load is in flight, waiters share it rather than each reading the store."""
        owner = await self.owner()
        await self.domains.add("example.com", owner, "mx.example.net")
        gate: Deferred[None] = Deferred()
        original = self.db.read
        reads: list[str] = []

        def slow_read(name: str, fn: object, *a: object, **k: object) -> Deferred[object]:
            reads.append(name)
            d: Deferred[object] = original(name, fn, *a, **k)  # type: ignore[arg-type]
            result: Deferred[object] = Deferred()
            gate.addCallback(lambda _: d.addCallback(result.callback))
            return result

        self.db.read = slow_read  # type: ignore[assignment]
        first, second = self.domains.when_loaded(), self.domains.when_loaded()
        self.assertNoResult(first)
        self.assertEqual(reads, ["domain_snapshot"])
        gate.callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertIsNotNone(self.domains.lookup("example.com"))


class PostgresAddressRaceTests(TestCase):
    """add_address on PostgreSQL (READ COMMITTED), when another connection commits between
    its SELECT and its INSERT: what two requests at once do."""

    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]
        url = await create_test_database(self)
        self.db = synchronous_database(url)
        self.addCleanup(self.db.close)
        self.clock = Clock()
        self.clock.advance(1_750_000_000)
        identity = Identity(self.db, self.clock, CpuPool.for_tests())
        self.domains = DomainService(self.db, self.clock, refresh_interval=30)
        self.alice = (await identity.create_user("alice", "alice@users.test")).id
        await self.domains.add("example.com", self.alice, "mx.example.net")
        self.other = create_engine(self.db.engine.url)
        self.addCleanup(self.other.dispose)

    def before_insert(self, meanwhile: Callable[[Connection], object],
                      prefix: str = "INSERT INTO domain_addresses") -> None:
        """Run `meanwhile` on another connection, committed, just before the next statement
        starting with `prefix` (the INSERT into domain_addresses)."""
        done: list[bool] = []

        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.startswith(prefix) and not done:
                done.append(True)
                with self.other.begin() as other:
                    meanwhile(other)

        event.listen(self.db.engine, "before_cursor_execute", hook)
        self.addCleanup(event.remove, self.db.engine, "before_cursor_execute", hook)

    def domain_id(self, conn: Connection) -> int:
        return int(conn.execute(
            select(domains.c.id).where(domains.c.name == "example.com")).scalar_one())

    async def test_an_address_listed_meanwhile_is_already_listed(self) -> None:
        # It was an IntegrityError (the API's 500) for the request that committed second.
        self.before_insert(lambda conn: conn.execute(insert(domain_addresses).values(
            domain_id=self.domain_id(conn), local_part="john")))
        self.assertFalse(await self.domains.add_address("example.com", "john",
                                                        owner_id=self.alice))
        self.assertEqual(await self.domains.list_addresses("example.com"), ["john"])
        self.assertTrue(await self.domains.add_address("example.com", "jane"))

    async def test_a_domain_removed_meanwhile_is_no_such_domain(self) -> None:
        def remove(conn: Connection) -> None:
            conn.execute(delete(domains).where(domains.c.id == self.domain_id(conn)))

        # Before add_address finds and locks the domain's row: a DELETE once the row is
        # locked waits for the add's transaction.
        self.before_insert(remove, prefix="SELECT domains.id, domains.owner_id, domains.name")
        with self.assertRaises(DomainError) as caught:
            await self.domains.add_address("example.com", "john", owner_id=self.alice)
        self.assertEqual(caught.exception.message, "No such domain: example.com.")


class CapSettingsTests(TestCase):
    def test_the_caps_are_read_from_domains(self) -> None:
        settings = DomainSettings.from_config({"max_per_user": 5, "max_addresses": 7})
        self.assertEqual((settings.max_per_user, settings.max_addresses), (5, 7))
        self.assertEqual(DomainSettings.from_config({}).max_per_user, 1000)
        for value in (0, -1, 1.5, True, "10"):
            with self.assertRaises(ConfigError) as caught:
                DomainSettings.from_config({"max_addresses": value})
            self.assertIn("[domains] max_addresses must be a positive integer",
                          str(caught.exception))


class PostgresLimitTests(TestCase):
    """[domains] max_per_user and max_addresses under concurrent adds, on PostgreSQL: each
    add counted, then inserted, and under READ COMMITTED concurrent ones counted the same
    rows and all inserted."""

    timeout = 240

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await open_database(self, "postgresql", max_threads=8)
        identity = Identity(self.db, Clock(), CpuPool.for_tests())
        self.alice = (await identity.create_user("alice", "alice@users.test")).id
        self.domains = DomainService(self.db, Clock(), refresh_interval=30,
                                     max_per_user=5, max_addresses=5)

    async def all_at_once(self, calls: list[Any]) -> list[Any]:
        results = await DeferredList([Deferred.fromCoroutine(c) for c in calls],
                                     consumeErrors=True)
        refused = [r.value for ok, r in results if not ok]
        self.assertEqual({type(e) for e in refused}, {DomainLimitReached})
        return [r for ok, r in results if ok]

    async def test_concurrent_domain_adds_keep_the_per_user_limit(self) -> None:
        added = await self.all_at_once([
            self.domains.add(f"d{i}.example.com", self.alice, "mx.example.net")
            for i in range(30)])
        self.assertEqual(len(added), 5)
        self.assertEqual(len(await self.domains.list(self.alice)), 5)

    async def test_concurrent_address_adds_keep_the_list_limit(self) -> None:
        await self.domains.add("example.com", self.alice, "mx.example.net")
        added = await self.all_at_once([
            self.domains.add_address("example.com", f"u{i}") for i in range(30)])
        self.assertEqual(added, [True] * 5)
        self.assertEqual(len(await self.domains.list_addresses("example.com")), 5)


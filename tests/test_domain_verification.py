"""Proof of domain ownership ([protecmail] verify_domains): a domain is served only once
its `_mailcore-verify` TXT record carries its token, as a real resolver finds it on a
twisted.names authoritative server listening on 127.0.0.1 (a free UDP port)."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.task import Clock
from twisted.names import authority, dns, server
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.gateway.domains import Domain, DomainError, DomainService
from mailcore.gateway.verification import (
    DomainVerifier,
    VerificationSettings,
    system_nameservers,
    verification_record,
)
from mailcore.identity import Identity
from mailcore.queue.model import thd_domain_for
from mailcore.workers import CpuPool
from tests.support.cli import CliTestCase
from tests.support.db import open_database_at, synchronous_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for
from tests.support.smtpsession import RecordingSink, Session, make_factory
from tests.support.web import Web

ZONES = ("customer.test", "gmail.com")


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone held in a dict the test changes while the server runs."""

    soa: Any
    records: Any

    def __init__(self, zone: str) -> None:
        super().__init__(zone)

    def loadFile(self, filename: Any) -> None:
        zone = filename.encode("ascii")
        soa = dns.Record_SOA(mname=b"ns1." + zone, rname=b"hostmaster." + zone, serial=1,
                             refresh=3600, retry=600, expire=86400, minimum=1, ttl=1)
        self.soa = (zone, soa)
        self.records = {zone: [soa]}

    def set_txt(self, name: str, *values: str) -> None:
        self.records[name.encode("ascii")] = [
            dns.Record_TXT(value.encode("ascii"), ttl=1) for value in values
        ]


class DnsServerMixin:
    """A local authoritative DNS server for ZONES; `dns_servers` points at it."""

    async def start_dns(self: Any) -> None:
        self.zones = {zone: MemoryAuthority(zone) for zone in ZONES}
        factory = server.DNSServerFactory(authorities=list(self.zones.values()))
        port = get_reactor().listenUDP(0, dns.DNSDatagramProtocol(factory),
                                       interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.settings = VerificationSettings(
            verify_domains=True, dns_servers=(("127.0.0.1", port.getHost().port),),
            verify_interval=60,
        )

    def publish(self: Any, domain: Domain, value: str | None = None) -> None:
        record = verification_record(domain)
        assert record is not None
        zone = self.zones[domain.name]
        zone.set_txt(record.name, "v=spf1 -all", value if value is not None else record.value)


class VerificationTests(DnsServerMixin, TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await self.start_dns()
        self.db = synchronous_database()
        self.clock = Clock()
        self.clock.advance(1_750_000_000)
        self.identity = Identity(self.db, self.clock, CpuPool.for_tests())
        self.alice = (await self.identity.create_user("alice", "alice@users.test")).id
        self.domains = DomainService(self.db, self.clock, verify_domains=True)
        self.domains.startService()
        self.verifier = DomainVerifier(self.domains, self.clock, self.settings,
                                       reactor=get_reactor())
        self.addCleanup(self.stop)
        self.factory = make_factory(self.domains, RecordingSink(), self.clock)

    async def stop(self) -> None:
        for service in (self.verifier, self.domains):
            if service.running:
                service.stopService()
        await self.verifier.idle()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def rcpt(self, address: str) -> str:
        session = Session(self.factory)
        try:
            session.hello()
            self.assertEqual(session.codes(b"MAIL FROM:<a@example.net>\r\n"), ["250"])
            [reply] = session.send(f"RCPT TO:<{address}>\r\n".encode())
            return reply
        finally:
            session.close()

    async def periodic_pass(self) -> None:
        """Let the verifier's interval pass and its lookups finish."""
        if not self.verifier.running:
            self.verifier.startService()  # the first pass runs at once
        else:
            self.clock.advance(self.settings.verify_interval)
        await self.verifier.idle()

    async def test_a_domain_is_refused_until_its_record_is_published(self) -> None:
        domain = await self.domains.add("customer.test", self.alice, "mx.customer.test")
        self.assertTrue(domain.pending)
        record = verification_record(domain)
        assert record is not None
        self.assertEqual(record.name, "_mailcore-verify.customer.test")
        self.assertRegex(record.value, r"^mailcore-verify=[0-9a-f]{32}$")
        self.assertIn("Relaying denied", self.rcpt("bob@customer.test"))

        result = await self.verifier.check("customer.test")
        self.assertEqual((result.verified, result.detail),
                         (False, "_mailcore-verify.customer.test does not exist in DNS"))
        await self.periodic_pass()
        self.assertIn("Relaying denied", self.rcpt("bob@customer.test"))

        self.publish(domain)
        await self.periodic_pass()
        self.assertTrue(self.rcpt("bob@customer.test").startswith("250 "))
        stored = await self.domains.get("customer.test")
        assert stored is not None
        self.assertFalse(stored.pending)
        self.assertEqual(stored.verified_at, self.domains.now())
        self.assertEqual((await self.verifier.check("customer.test")).verified, True)

    async def test_a_record_with_another_token_proves_nothing(self) -> None:
        domain = await self.domains.add("customer.test", self.alice, "mx.customer.test")
        other = await self.domains.add("gmail.com", self.alice, "mx.customer.test")
        other_record = verification_record(other)
        assert other_record is not None
        # The token of another domain, or of an earlier claim of this one, is not enough.
        self.publish(domain, other_record.value)
        result = await self.verifier.check("customer.test")
        self.assertFalse(result.verified)
        self.assertIn("do not include", result.detail)
        self.publish(domain, "mailcore-verify=")
        self.assertFalse((await self.verifier.check("customer.test")).verified)
        self.assertIn("Relaying denied", self.rcpt("bob@customer.test"))
        await self.domains.remove("customer.test")
        again = await self.domains.add("customer.test", self.alice, "mx.customer.test")
        self.publish(again, verification_record(domain).value)  # type: ignore[union-attr]
        self.assertFalse((await self.verifier.check("customer.test")).verified)
        self.assertIn("Relaying denied", self.rcpt("bob@customer.test"))

    async def test_a_record_found_after_the_claim_changed_verifies_nothing(self) -> None:
        """A lookup that finds the old token of a claim removed meanwhile marks nothing."""
        first = await self.domains.add("customer.test", self.alice, "mx.customer.test")
        await self.domains.remove("customer.test")
        await self.domains.add("customer.test", self.alice, "mx.customer.test")
        self.assertIsNone(await self.domains.mark_verified(first))
        self.assertTrue((await self.domains.get("customer.test")).pending)  # type: ignore[union-attr]

    async def test_no_answer_is_a_clear_reason_not_a_crash(self) -> None:
        await self.domains.add("unserved.example", self.alice, "mx.customer.test")
        result = await self.verifier.check("unserved.example")
        self.assertFalse(result.verified)
        self.assertIn("_mailcore-verify.unserved.example", result.detail)
        with self.assertRaises(DomainError):
            await self.verifier.check("nowhere.example")

    async def test_unproven_claims_are_forgotten_after_the_expiry(self) -> None:
        """Nobody keeps a name they cannot prove (gmail.com) from its owner for ever."""
        await self.domains.add("gmail.com", self.alice, "mx.customer.test")
        await self.periodic_pass()
        self.assertIsNotNone(await self.domains.get("gmail.com"))
        self.clock.advance(7 * 86400 - 60)
        await self.verifier.idle()
        self.assertIsNotNone(await self.domains.get("gmail.com"))
        self.clock.advance(60)
        await self.verifier.idle()
        self.assertIsNone(await self.domains.get("gmail.com"))
        bob = (await self.identity.create_user("bob", "bob@users.test")).id
        claim = await self.domains.add("gmail.com", bob, "mx.gmail.test")
        self.assertTrue(claim.pending)

    async def test_pending_domains_are_checked_a_few_at_a_time(self) -> None:
        names = [f"d{i}.customer.test" for i in range(5)]
        for name in names:
            await self.domains.add(name, self.alice, "mx.customer.test")
        limited = DomainVerifier(
            self.domains, self.clock,
            VerificationSettings(verify_domains=True, dns_servers=self.settings.dns_servers,
                                 verify_concurrency=2),
            reactor=get_reactor(),
        )
        in_flight: list[int] = []
        peak = [0]
        original = limited._lookup

        async def counting(name: str) -> list[str]:
            in_flight.append(1)
            peak[0] = max(peak[0], len(in_flight))
            try:
                return await original(name)
            finally:
                in_flight.pop()

        limited._lookup = counting  # type: ignore[method-assign]
        results = await limited.check_pending()
        self.assertEqual(sorted(r.domain.name for r in results), names)
        self.assertEqual(peak[0], 2)

    async def test_bounces_to_a_claimed_domain_do_not_go_to_the_claimant(self) -> None:
        """A DSN to a sender at gmail.com is routed as for any outside domain while a claim
        on gmail.com waits for its proof, not to the claimant's next hop."""
        claim = await self.domains.add("gmail.com", self.alice, "mx.mallory.test")
        self.assertIsNone(await self.db.read("route", thd_domain_for, "gmail.com"))
        self.publish(claim)
        self.assertTrue((await self.verifier.check("gmail.com")).verified)
        self.assertEqual(await self.db.read("route", thd_domain_for, "gmail.com"), claim.id)

    async def test_operators_may_vouch_for_a_domain(self) -> None:
        domain = await self.domains.add("customer.test", self.alice, "mx.customer.test",
                                        verified=True)
        self.assertFalse(domain.pending)
        self.assertIsNone(verification_record(domain))
        self.assertTrue(self.rcpt("bob@customer.test").startswith("250 "))

    async def test_without_verification_domains_are_served_at_once(self) -> None:
        plain = DomainService(self.db, self.clock)
        domain = await plain.add("customer.test", self.alice, "mx.customer.test")
        self.assertFalse(domain.pending)
        self.assertIsNone(verification_record(domain))
        self.clock.advance(self.domains.poll_interval)
        self.assertTrue(self.rcpt("bob@customer.test").startswith("250 "))


class ApiClaimTests(DnsServerMixin, TestCase):
    """A user of the API cannot make gmail.com served without its record."""

    async def setUp(self) -> None:  # type: ignore[override]
        await self.start_dns()
        port = self.settings.dns_servers[0][1]
        self.web = Web.build(Config(sections={"protecmail": {
            "verify_domains": True, "dns_servers": [f"127.0.0.1:{port}"]}}))
        self.user = await self.web.core.identity.create_user("mallory", "m@example.test")
        self.key = await self.web.credential(self.user)
        self.web.core.domains.startService()
        self.addCleanup(self.web.core.domains.stopService)
        self.verifier = DomainVerifier(self.web.core.domains, Clock(),
                                       self.web.core.verifier.settings, reactor=get_reactor())

    async def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        status, _, reply = await self.web.call(method, path, headers={"Api-Key": self.key},
                                               **kwargs)
        self.assertEqual(status, 200, reply)
        result: dict[str, Any] = reply
        return result

    async def test_gmail_com_is_not_served_without_its_record(self) -> None:
        reply = await self.call("POST", "/api/v1/domain/gmail.com",
                                json={"redirectTo": "mx.mallory.test"})
        domain = await self.web.core.domains.get("gmail.com")
        assert domain is not None
        record = verification_record(domain)
        assert record is not None
        self.assertEqual(reply["data"], {
            "domain": "gmail.com", "verified": False,
            "verification": {"name": "_mailcore-verify.gmail.com", "type": "TXT",
                             "value": record.value},
        })
        self.assertIn("_mailcore-verify.gmail.com", reply["msg"])
        info = await self.call("GET", "/api/v1/domain/gmail.com")
        self.assertIn(record.value, info["msg"])
        self.assertEqual(info["data"]["domain"], "gmail.com")
        self.assertIsNone(self.web.core.domains.lookup("gmail.com"))
        self.zones["gmail.com"].set_txt("_mailcore-verify.gmail.com", "google-site-verification=x")
        result = await self.verifier.check("gmail.com")
        self.assertFalse(result.verified)
        self.assertIsNone(self.web.core.domains.lookup("gmail.com"))
        self.assertTrue((await self.web.core.domains.get("gmail.com")).pending)  # type: ignore[union-attr]

    async def test_replies_say_nothing_new_when_the_domain_is_served(self) -> None:
        await self.web.core.domains.add("customer.test", self.user.id, "mx.customer.test",
                                        verified=True)
        info = await self.call("GET", "/api/v1/domain/customer.test")
        self.assertEqual(set(info), {"request_id", "success", "data"})


class CliTests(DnsServerMixin, CliTestCase):
    """`mailcore domain add` and `mailcore domain verify` as a real process, against the
    local DNS server."""


    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        await self.start_dns()
        port = self.settings.dns_servers[0][1]
        self.config = self.base / "mailcore.toml"
        self.config.write_text(
            f'[protecmail]\nverify_domains = true\ndns_servers = ["127.0.0.1:{port}"]\n'
        )

    async def cli(self, *args: str) -> str:
        return await self.ok("-c", str(self.config), *args)

    async def test_add_list_and_verify(self) -> None:
        await self.cli("user", "add", "alice", "--email", "alice@users.test", "--password", "x")
        out = await self.cli("domain", "add", "customer.test", "--owner", "alice",
                             "--redirect-to", "mx.customer.test")
        match = re.search(r'_mailcore-verify\.customer\.test\. IN TXT "(mailcore-verify=\w+)"',
                          out)
        assert match is not None, out
        self.assertTrue(out.startswith("added customer.test for alice, not served until"), out)
        listing = (await self.cli("domain", "list")).splitlines()
        self.assertEqual(listing[1].split()[:2], ["customer.test", "(unverified)"])

        zone = self.zones["customer.test"]
        result = await self.mc("-c", str(self.config), "domain", "verify", "customer.test")
        self.assertOneLineError(result, "customer.test is not verified",
                                "does not exist in DNS", match.group(1))
        zone.set_txt("_mailcore-verify.customer.test", "mailcore-verify=0123")
        result = await self.mc("-c", str(self.config), "domain", "verify", "customer.test")
        self.assertOneLineError(result, "do not include")
        zone.set_txt("_mailcore-verify.customer.test", match.group(1))
        self.assertEqual(await self.cli("domain", "verify", "customer.test"),
                         "customer.test is verified (_mailcore-verify.customer.test carries "
                         "its token) and served\n")
        listing = (await self.cli("domain", "list")).splitlines()
        self.assertEqual(listing[1].split()[:2], ["customer.test", "alice"])

        out = await self.cli("domain", "add", "vouched.test", "--owner", "alice",
                             "--redirect-to", "mx.vouched.test", "--verified")
        self.assertTrue(out.startswith("serving vouched.test for alice"), out)
        self.assertIn("needs no proof", await self.cli("domain", "verify", "vouched.test"))
        result = await self.mc("-c", str(self.config), "domain", "verify", "nowhere.test")
        self.assertOneLineError(result, "no such domain")

        # what a daemon with verification on serves from the same store
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        served = DomainService(db, get_reactor(), verify_domains=True)
        await served.refresh()
        self.assertIsNotNone(served.lookup("customer.test"))
        self.assertIsNotNone(served.lookup("vouched.test"))


class SettingsTests(TestCase):
    def test_defaults_and_values(self) -> None:
        self.assertEqual(VerificationSettings.from_config({}), VerificationSettings())
        self.assertFalse(VerificationSettings().verify_domains)
        settings = VerificationSettings.from_config({
            "verify_domains": True, "dns_servers": ["192.0.2.53", "192.0.2.54:5353",
                                                    "[2001:db8::53]:53", "2001:db8::54"],
            "verify_interval": 30, "verify_concurrency": 4, "verify_expiry_days": 2.5,
            "forbidden_redirects": ["10.0.0.0/8"],  # another reader's key
        })
        self.assertEqual(settings.dns_servers, (("192.0.2.53", 53), ("192.0.2.54", 5353),
                                                ("2001:db8::53", 53), ("2001:db8::54", 53)))
        self.assertEqual((settings.verify_interval, settings.verify_concurrency,
                          settings.verify_expiry_days), (30.0, 4, 2.5))

    def test_mistakes_name_the_key(self) -> None:
        for key, value in (("verify_domains", "yes"), ("dns_servers", "192.0.2.53"),
                           ("dns_servers", ["ns1.example.net"]), ("dns_servers", ["1.2.3.4:0"]),
                           ("dns_servers", ["1.2.3.4:x"]), ("verify_interval", 0),
                           ("verify_concurrency", 1.5), ("verify_expiry_days", True)):
            with self.subTest(key=key, value=value):
                with self.assertRaises(ConfigError) as cm:
                    VerificationSettings.from_config({key: value})
                self.assertTrue(str(cm.exception).startswith(f"[protecmail] {key}"))

    def test_the_system_resolver_comes_from_resolv_conf(self) -> None:
        path = tempdir_for(self) / "resolv.conf"
        path.write_text("# comment\nsearch example.net\nnameserver 192.0.2.53\n"
                        "nameserver fe80::1%eth0\nnameserver bogus\n")
        self.assertEqual(system_nameservers(path), [("192.0.2.53", 53), ("fe80::1", 53)])
        path.write_text("")
        self.assertEqual(system_nameservers(path), [("127.0.0.1", 53)])
        self.assertEqual(system_nameservers(path.with_name("missing")), [("127.0.0.1", 53)])

    def test_the_daemon_runs_the_checker_only_when_verification_is_on(self) -> None:
        off = Web.build().core
        self.assertNotIn(off.verifier, off.background_services())
        self.assertFalse(off.domains.verify_domains)
        on = Web.build(Config(sections={"protecmail": {"verify_domains": True}})).core
        self.assertIn(on.verifier, on.background_services())
        self.assertTrue(on.domains.verify_domains)


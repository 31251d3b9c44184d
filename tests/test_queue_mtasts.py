"""Outbound MTA-STS (RFC 8461, mailcore.queue.mtasts): the TXT record and the policy's
strict parsing, its fetch over verified HTTPS from a local server with a test CA (no
redirect, no more than 64 KiB, text/plain, only to addresses the next-hop policy allows),
its cache in the store (kept when the TXT record vanishes or a refresh fails, fetched again
when the id changes), what the router makes of it (enforce: matching MX hosts only, TLS
verified; testing: as without one), and the queue's deferral, nothing sent in cleartext."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer, threads
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailcore.config import Config, ConfigError
from mailcore.queue.model import thd_show
from mailcore.queue.mtasts import (
    FETCH_TIMEOUT,
    FETCH_WAIT,
    MAX_AGE_LIMIT,
    MAX_FETCHES,
    MAX_MX_PATTERNS,
    TXT_TIMEOUT,
    Policy,
    PolicyError,
    PolicyFetcher,
    PolicyFinder,
    PolicySweeper,
    mx_matches,
    parse_policy,
    parse_txt,
    thd_read_policy,
    thd_sweep_policies,
    thd_write_policy,
)
from mailcore.queue.routing import Hop, Router, RoutingError
from mailcore.queue.settings import QueueSettings
from mailcore.store.leases import JobLeases
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin, synchronous_database
from tests.support.logs import logged
from tests.support.mailsink import done, envelope
from tests.support.names import FakeNames
from tests.support.queuetest import BODY, QueueTestCase
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for
from tests.support.testca import make_pki

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmx: *.mail.example.test\n" \
          "max_age: 86400\n"


class ParseTests(TestCase):
    def test_a_policy_with_crlf_lines_and_two_patterns(self) -> None:
        policy = parse_policy(ENFORCE.replace("\n", "\r\n"), "id1", 100.0)
        self.assertEqual(policy, Policy("id1", "enforce", ("mx1.example.test",
                                                         "*.mail.example.test"), 86400, 100.0))
        self.assertEqual(policy.expires_at, 86500.0)

    def test_max_age_is_capped_at_a_year(self) -> None:
        policy = parse_policy(ENFORCE.replace("86400", "99999999"), "id1", 0.0)
        self.assertEqual(policy.max_age, MAX_AGE_LIMIT)

    def test_invalid_policies_are_refused(self) -> None:
        for text in (ENFORCE.replace("STSv1", "STSv2"),
                     ENFORCE.replace("enforce", "strict"),
                     ENFORCE.replace("max_age: 86400\n", ""),
                     ENFORCE.replace("86400", "-1"),
                     ENFORCE.replace("mx1.example.test", "mx1.*.example.test"),
                     ENFORCE.replace("mx1.example.test", "*"),
                     "version: STSv1\nmode: enforce\nmax_age: 600\n",
                     ENFORCE + "this line has no colon\n",
                     "<html>policy</html>"):
            with self.assertRaises(PolicyError, msg=text):
                parse_policy(text, "id1", 0.0)

    def test_extension_fields_are_ignored(self) -> None:
        """RFC 8461 3.2: an extension's name may hold `-` and `.`; unknown, it is ignored,
        and the policy holds (refused, the domain went as without one)."""
        for extra in ("x-report: yes\n", "ext.v2: a b\n", "foo_bar:\n"):
            self.assertEqual(parse_policy(ENFORCE + extra, "id1", 0.0).mode, "enforce")
        with self.assertRaises(PolicyError):
            parse_policy(ENFORCE + "-x: 1\n", "id1", 0.0)

    def test_a_policy_with_too_many_mx_patterns_is_refused(self) -> None:
        """Each policy is kept in memory and in the store: 64 KiB of patterns were ~0.4 MB
        of memory per hostile domain; MAX_MX_PATTERNS distinct ones at most (a repeated
        one counts once)."""
        head = "version: STSv1\nmode: enforce\nmax_age: 600\n"
        most = "".join(f"mx: m{i}.example.test\n" for i in range(MAX_MX_PATTERNS))
        self.assertEqual(len(parse_policy(head + most * 2, "a", 0).mx), MAX_MX_PATTERNS)
        with self.assertRaises(PolicyError):
            parse_policy(head + most + "mx: one.more.test\n", "a", 0)

    def test_mode_none_needs_no_mx(self) -> None:
        self.assertEqual(parse_policy("version: STSv1\nmode: none\nmax_age: 60\n", "a", 0).mode,
                         "none")

    def test_wildcards_match_one_leftmost_label(self) -> None:
        self.assertTrue(mx_matches("*.mail.example.test", "a.mail.example.test."))
        self.assertTrue(mx_matches("mx1.example.test", "MX1.example.test"))
        self.assertFalse(mx_matches("*.mail.example.test", "mail.example.test"))
        self.assertFalse(mx_matches("*.mail.example.test", "a.b.mail.example.test"))
        self.assertFalse(mx_matches("mx1.example.test", "mx2.example.test"))

    def test_the_txt_record(self) -> None:
        self.assertEqual(parse_txt(["v=STSv1; id=20261207T01;"]), "20261207T01")
        self.assertEqual(parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]), "abc")
        self.assertIsNone(parse_txt(["v=STSv1; id=a;", "v=STSv1; id=b;"]))  # two: none
        self.assertIsNone(parse_txt(["v=STSv1; id=not-alnum;"]))
        self.assertIsNone(parse_txt(["v=STSv1;"]))
        self.assertIsNone(parse_txt([]))


class NamedReactor:
    """The real reactor, with host names resolved from a table."""

    def __init__(self, reactor: Any, names: dict[str, list[str]]) -> None:
        self._reactor = reactor
        self.nameResolver = FakeNames(names)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class PolicyPage(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.how = "ok"
        self.body = ENFORCE.encode()
        self.paths: list[bytes] = []

    def render_GET(self, request: Any) -> Any:
        self.paths.append(request.path)
        if self.how == "redirect":
            request.setResponseCode(301)
            request.setHeader(b"location", b"https://127.0.0.1/.well-known/mta-sts.txt")
            return b""
        request.setHeader(b"content-type", b"text/html" if self.how == "html"
                          else b"text/plain; charset=utf-8")
        if self.how == "large":  # streamed, no Content-Length
            for _ in range(80):
                request.write(b"x" * 1024)
            request.finish()
            return NOT_DONE_YET
        return self.body


class FetchTests(TestCase):
    """A real HTTPS server on 127.0.0.1 with a certificate for mta-sts.example.test from a
    test CA that only the fetcher's `tls_ca_file` trusts."""

    timeout = 30

    async def setup(self, names: dict[str, list[str]] | None = None, *, trusted: bool = True,
                    **settings: Any) -> PolicyFetcher:
        pki = make_pki("MTA-STS Test CA", dns_names=("mta-sts.example.test",))
        other = make_pki("Another CA", dns_names=("mta-sts.example.test",))
        ca = Path(tempdir_for(self)) / "ca.pem"
        ca.write_bytes(pki.ca_pem if trusted else other.ca_pem)
        self.page = PolicyPage()
        site = Site(self.page)
        port = await SSL4ServerEndpoint(get_reactor(), 0, pki.server_options(),
                                        interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        settings.setdefault("allow_loopback", True)
        qs = QueueSettings(tls_ca_file=str(ca), **settings)
        reactor = NamedReactor(get_reactor(), names if names is not None
                               else {"mta-sts.example.test": ["127.0.0.1"]})
        return PolicyFetcher(reactor, qs, port=port.getHost().port)

    async def test_the_policy_is_fetched_over_verified_https(self) -> None:
        fetcher = await self.setup()
        text = await fetcher.fetch("example.test")
        self.assertEqual(text, ENFORCE)
        self.assertEqual(self.page.paths, [b"/.well-known/mta-sts.txt"])
        self.assertEqual(parse_policy(text, "id1", 0).mode, "enforce")

    async def test_a_redirect_is_not_followed(self) -> None:
        fetcher = await self.setup()
        self.page.how = "redirect"
        with self.assertRaises(PolicyError) as caught:
            await fetcher.fetch("example.test")
        self.assertIn("answered 301", str(caught.exception))
        self.assertEqual(len(self.page.paths), 1)

    async def test_an_oversized_policy_is_refused(self) -> None:
        fetcher = await self.setup()
        self.page.how = "large"
        with self.assertRaises(PolicyError) as caught:
            await fetcher.fetch("example.test")
        self.assertIn("larger than 65536", str(caught.exception))

    async def test_a_policy_that_is_not_text_plain_is_refused(self) -> None:
        fetcher = await self.setup()
        self.page.how = "html"
        with self.assertRaises(PolicyError) as caught:
            await fetcher.fetch("example.test")
        self.assertIn("not text/plain", str(caught.exception))

    async def test_a_policy_host_on_a_forbidden_address_is_not_connected_to(self) -> None:
        for address, why in (("10.0.0.7", "private"), ("127.0.0.1", "loopback")):
            fetcher = await self.setup({"mta-sts.example.test": [address]},
                                       allow_loopback=False)
            with self.assertRaises(PolicyError) as caught:
                await fetcher.fetch("example.test")
            self.assertIn(why, str(caught.exception))
            self.assertEqual(self.page.paths, [])

    async def test_a_certificate_the_trust_roots_do_not_know_is_refused(self) -> None:
        fetcher = await self.setup(trusted=False)
        with self.assertRaises(PolicyError):
            await fetcher.fetch("example.test")
        self.assertEqual(self.page.paths, [])


class FetchTimeoutTests(TestCase):
    async def test_a_policy_host_that_never_answers_is_given_up_on(self) -> None:
        reactor = MemoryReactorClock()
        reactor.nameResolver = FakeNames(  # type: ignore[assignment]
            {"mta-sts.example.test": ["93.184.216.34"]})
        d = PolicyFetcher(reactor, QueueSettings()).fetch("example.test")
        self.assertEqual([c[:2] for c in reactor.tcpClients], [("93.184.216.34", 443)])
        reactor.advance(FETCH_TIMEOUT)
        with self.assertRaises(defer.TimeoutError):
            await d


class SettingsTests(TestCase):
    def test_mta_sts_is_on_by_default_and_may_be_turned_off(self) -> None:
        self.assertTrue(QueueSettings.from_config(Config()).mta_sts)
        off = QueueSettings.from_config(Config(sections={"queue": {"mta_sts": False}}))
        self.assertFalse(off.mta_sts)
        with self.assertRaises(ConfigError):
            QueueSettings.from_config(Config(sections={"queue": {"mta_sts": "yes"}}))


class FakeDNS:
    """MX and TXT answers from tables; NXDOMAIN for a TXT name not in its table."""

    def __init__(self) -> None:
        self.mx: dict[str, list[tuple[int, str]]] = {
            "example.test": [(10, "mx1.example.test"), (20, "rogue.attacker.test")]}
        self.txt: dict[str, list[str]] = {"_mta-sts.example.test": ["v=STSv1; id=one;"]}
        self.asked_txt: list[str] = []
        self.hold: defer.Deferred[None] | None = None  # TXT answers wait for it, if set

    def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
        return defer.succeed(([dns.RRHeader(name, dns.MX, payload=dns.Record_MX(p, h))
                               for p, h in self.mx.get(name, [])], [], []))

    def lookupText(self, name: str) -> defer.Deferred[Any]:
        self.asked_txt.append(name)
        if name not in self.txt:
            return defer.fail(DNSNameError(name))
        answer: Any = ([dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(r.encode()))
                        for r in self.txt[name]], [], [])
        if self.hold is not None:
            return self.hold.addCallback(lambda _: answer)
        return defer.succeed(answer)


class FakeFetcher:
    def __init__(self) -> None:
        self.texts: dict[str, str | Exception] = {"example.test": ENFORCE}
        self.fetched: list[str] = []

    def fetch(self, domain: str) -> defer.Deferred[str]:
        self.fetched.append(domain)
        text = self.texts[domain]
        return defer.fail(text) if isinstance(text, Exception) else defer.succeed(text)


class RouterPolicyTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = synchronous_database()
        self.dns = FakeDNS()
        self.fetcher = FakeFetcher()

    def router(self, **settings: Any) -> Router:
        qs = QueueSettings(**settings)
        return Router(self.db, self.clock, qs, self.dns,
                      sts=PolicyFinder(self.db, self.clock, qs, self.fetcher))

    def stored(self) -> Policy | None:
        return done(self.db.read("p", thd_read_policy, "example.test"))

    async def test_enforce_keeps_only_the_listed_mx_with_verified_tls(self) -> None:
        hop = await self.router().route(None, "u@example.test")
        self.assertEqual((hop.host, hop.fallbacks, hop.tls, hop.sts),
                         ("mx1.example.test", (), "verify", "enforce"))
        self.assertEqual(self.dns.asked_txt, ["_mta-sts.example.test"])
        self.assertEqual(self.fetcher.fetched, ["example.test"])
        stored = self.stored()
        assert stored is not None
        self.assertEqual((stored.policy_id, stored.mode, stored.mx),
                         ("one", "enforce", ("mx1.example.test", "*.mail.example.test")))

    async def test_enforce_with_no_matching_mx_defers_4_7_5(self) -> None:
        self.dns.mx["example.test"] = [(10, "rogue.attacker.test")]
        with self.assertRaises(RoutingError) as caught:
            await self.router().route(None, "u@example.test")
        self.assertFalse(caught.exception.permanent)
        self.assertEqual(caught.exception.status, "4.7.5")
        self.assertIn("MTA-STS", str(caught.exception))

    async def test_enforce_finds_a_listed_mx_past_the_first_five(self) -> None:
        """The MX hosts are cut to MAX_MX_HOSTS after those the policy does not list are
        left out, not before (a domain whose listed MX came sixth was deferred 4.7.5)."""
        rogues = [(10 + i, f"rogue{i}.attacker.test") for i in range(6)]
        self.dns.mx["example.test"] = [*rogues, (30, "mx1.example.test"),
                                       *((40 + i, f"m{i}.mail.example.test") for i in range(6))]
        hop = await self.router().route(None, "u@example.test")
        self.assertEqual((hop.host, hop.fallbacks, hop.tls), (
            "mx1.example.test", tuple(f"m{i}.mail.example.test" for i in range(4)), "verify"))
        # Without a policy, the first five as before.
        self.dns.mx["other.test"] = self.dns.mx["example.test"]
        hop = await self.router().route(None, "u@other.test")
        self.assertEqual([hop.host, *hop.fallbacks], [h for _p, h in rogues[:5]])

    async def test_domains_of_one_mx_host_under_enforce_share_one_hop(self) -> None:
        """The policy's domain is no part of the hop's identity: domains whose MX host is
        the same share its hop queue (hop_concurrency, connections), as without a policy."""
        self.dns.mx["other.test"] = self.dns.mx["example.test"]
        self.dns.txt["_mta-sts.other.test"] = ["v=STSv1; id=two;"]
        self.fetcher.texts["other.test"] = ENFORCE
        router = self.router()
        one = await router.route(None, "u@example.test")
        two = await router.route(None, "u@other.test")
        self.assertEqual((two.sts, two.sts_domain), ("enforce", "other.test"))
        self.assertEqual(one, two)
        self.assertEqual(len({one, two}), 1)

    async def test_a_policy_the_store_cannot_keep_is_used_all_the_same(self) -> None:
        """A failed write of a good policy is logged, not a failed route (it was deferred
        ROUTING_FAILED, the policy lost)."""
        run = self.db.run

        def run_or_fail(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "mta_sts_store":
                return defer.fail(RuntimeError("the store is gone"))
            return run(name, *args, **kwargs)

        self.db.run = run_or_fail  # type: ignore[method-assign]
        router = self.router()
        hop = await router.route(None, "u@example.test")
        self.assertEqual((hop.host, hop.fallbacks, hop.tls, hop.sts),
                         ("mx1.example.test", (), "verify", "enforce"))
        self.assertIsNone(self.stored())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # Kept in memory: the next route neither fetches nor fails.
        await router.route(None, "u@example.test")
        self.assertEqual(self.fetcher.fetched, ["example.test"])

    async def test_a_policy_of_max_age_0_lasts_a_route_cache_period(self) -> None:
        """Not fetched again at every route (before, each route fetched it)."""
        self.fetcher.texts["example.test"] = ENFORCE.replace("86400", "0")
        router = self.router(route_cache_seconds=30.0)
        for _ in range(3):
            hop = await router.route(None, "u@example.test")
            self.assertEqual((hop.host, hop.sts), ("mx1.example.test", "enforce"))
        self.clock.advance(10)
        await router.route(None, "u@example.test")
        # Another node (or a restart): the store's row counts for the period too.
        await self.router(route_cache_seconds=30.0).route(None, "u@example.test")
        self.assertEqual(self.fetcher.fetched, ["example.test"])
        self.clock.advance(21)
        await router.route(None, "u@example.test")
        self.assertEqual(self.fetcher.fetched, ["example.test"] * 2)

    async def test_testing_mode_routes_as_without_a_policy(self) -> None:
        self.fetcher.texts["example.test"] = ENFORCE.replace("enforce", "testing")
        hop = await self.router().route(None, "u@example.test")
        self.assertEqual((hop.host, hop.fallbacks, hop.tls, hop.sts),
                         ("mx1.example.test", ("rogue.attacker.test",), "verify-if-offered",
                          "testing"))

    async def test_a_testing_policy_warns_once_a_period_per_domain(self) -> None:
        """Not once per recipient routed: once per domain and route_cache_seconds (a
        minute at least)."""
        warned = logged(self, lambda e: "(testing) does not list MX" in e.get("log_format", ""))
        self.fetcher.texts["example.test"] = ENFORCE.replace("enforce", "testing")
        router = self.router()
        for _ in range(3):
            await router.route(None, "u@example.test")
        self.assertEqual(len(warned), 1)
        self.clock.advance(61)
        await router.route(None, "u@example.test")
        self.assertEqual(len(warned), 2)

    async def test_an_invalid_policy_is_ignored(self) -> None:
        self.fetcher.texts["example.test"] = ENFORCE.replace("STSv1", "STSv9")
        hop = await self.router().route(None, "u@example.test")
        self.assertEqual(hop, Hop("mx1.example.test", 25, "verify-if-offered",
                                  ("rogue.attacker.test",)))
        self.assertIsNone(self.stored())

    async def test_the_cached_policy_holds_when_the_txt_record_vanishes(self) -> None:
        router = self.router()
        await router.route(None, "u@example.test")
        del self.dns.txt["_mta-sts.example.test"]  # stripped by an attacker
        self.dns.mx["example.test"] = [(10, "rogue.attacker.test")]
        self.clock.advance(60)
        with self.assertRaises(RoutingError):
            await router.route(None, "u@example.test")
        self.assertEqual(self.fetcher.fetched, ["example.test"])
        # Another node (a new router on the same store) holds to it too.
        with self.assertRaises(RoutingError):
            await self.router().route(None, "u@example.test")
        # Until it expires.
        self.clock.advance(86400)
        hop = await self.router().route(None, "u@example.test")
        self.assertEqual((hop.host, hop.sts), ("rogue.attacker.test", ""))

    async def test_a_failed_refresh_keeps_the_cached_policy(self) -> None:
        router = self.router()
        await router.route(None, "u@example.test")
        self.dns.txt["_mta-sts.example.test"] = ["v=STSv1; id=two;"]
        self.fetcher.texts["example.test"] = PolicyError("connection refused")
        self.clock.advance(60)
        hop = await router.route(None, "u@example.test")
        self.assertEqual((hop.host, hop.tls), ("mx1.example.test", "verify"))
        self.assertEqual(self.fetcher.fetched, ["example.test", "example.test"])

    async def test_a_new_txt_id_fetches_the_policy_again(self) -> None:
        router = self.router()
        await router.route(None, "u@example.test")
        await router.route(None, "v@example.test")  # same id: from memory, no fetch
        self.assertEqual(len(self.dns.asked_txt), 1)
        self.clock.advance(60)
        await router.route(None, "u@example.test")  # same id: the cache, no fetch
        self.assertEqual(self.fetcher.fetched, ["example.test"])
        self.dns.txt["_mta-sts.example.test"] = ["v=STSv1; id=two;"]
        self.fetcher.texts["example.test"] = ENFORCE.replace("mx1.", "rogue.").replace(
            "example.test\nmx: *", "attacker.test\nmx: *")
        self.clock.advance(60)
        hop = await router.route(None, "u@example.test")
        self.assertEqual(self.fetcher.fetched, ["example.test", "example.test"])
        self.assertEqual((hop.host, hop.tls), ("rogue.attacker.test", "verify"))
        self.assertEqual(self.stored().policy_id, "two")  # type: ignore[union-attr]

    async def test_routes_of_one_domain_at_once_share_one_lookup(self) -> None:
        router = self.router()
        self.dns.hold = defer.Deferred()
        routes = [defer.Deferred.fromCoroutine(router.route(None, f"u{i}@example.test"))
                  for i in range(5)]
        self.assertFalse(any(r.called for r in routes))
        self.dns.hold.callback(None)
        hops = [await r for r in routes]
        self.assertEqual({h.tls for h in hops}, {"verify"})
        self.assertEqual(self.dns.asked_txt, ["_mta-sts.example.test"])
        self.assertEqual(self.fetcher.fetched, ["example.test"])

    async def test_a_txt_lookup_that_never_ends_is_given_up_on_and_remembered(self) -> None:
        """A domain whose name servers drop `_mta-sts` queries: its mail waits TXT_TIMEOUT,
        not twisted.names' minute, goes as without a policy, and the next message within
        route_cache_seconds of the answer waits for no lookup of its own."""
        router = self.router()
        self.dns.hold = defer.Deferred()  # never answered
        first = defer.Deferred.fromCoroutine(router.route(None, "u@example.test"))
        self.clock.advance(TXT_TIMEOUT)
        hop = self.successResultOf(first)
        self.assertEqual((hop.host, hop.sts), ("mx1.example.test", ""))
        self.clock.advance(1)
        hop = await router.route(None, "v@example.test")
        self.assertEqual(hop.sts, "")
        self.assertEqual(self.dns.asked_txt, ["_mta-sts.example.test"])
        self.assertEqual(self.fetcher.fetched, [])

    async def test_a_slow_answer_is_remembered_from_when_it_came(self) -> None:
        router = self.router(route_cache_seconds=5.0)
        self.dns.hold = defer.Deferred()
        first = defer.Deferred.fromCoroutine(router.route(None, "u@example.test"))
        self.clock.advance(8)  # longer than route_cache_seconds, within TXT_TIMEOUT
        self.dns.hold.callback(None)
        self.assertEqual(self.successResultOf(first).sts, "enforce")
        self.clock.advance(1)
        await router.route(None, "v@example.test")
        self.assertEqual(self.dns.asked_txt, ["_mta-sts.example.test"])

    async def test_a_fetch_waits_for_a_slot_no_longer_than_fetch_wait(self) -> None:
        """Policy hosts that never answer hold every fetch slot: another domain's route
        comes within FETCH_WAIT, as without a new policy (before, it waited for a slot
        for as long as they held them)."""
        router = self.router()
        hanging: list[defer.Deferred[str]] = []

        def fetch(domain: str) -> defer.Deferred[str]:
            self.fetcher.fetched.append(domain)
            hanging.append(defer.Deferred())
            return hanging[-1]

        self.fetcher.fetch = fetch  # type: ignore[method-assign]
        for i in range(MAX_FETCHES + 1):
            self.dns.mx[f"d{i}.test"] = [(10, f"mx.d{i}.test")]
            self.dns.txt[f"_mta-sts.d{i}.test"] = ["v=STSv1; id=one;"]
        routes = [defer.Deferred.fromCoroutine(router.route(None, f"u@d{i}.test"))
                  for i in range(MAX_FETCHES + 1)]
        self.assertEqual(len(self.fetcher.fetched), MAX_FETCHES)  # the last one waits
        self.clock.advance(FETCH_WAIT)
        for route in routes:
            self.assertEqual(self.successResultOf(route).sts, "")
        self.assertTrue(all(d.called for d in hanging))  # cancelled, their slots free

    async def test_a_domain_that_is_no_host_name_is_never_looked_up(self) -> None:
        for address in ("u@evil.test/x?", "u@evil_test.test", "u@-evil.test"):
            hop = await self.router().route(None, address)
            self.assertEqual(hop.sts, "")
        self.assertEqual(self.dns.asked_txt, [])

    async def test_off_no_lookup_is_made(self) -> None:
        hop = await Router(self.db, self.clock, QueueSettings(mta_sts=False),
                           self.dns).route(None, "u@example.test")
        self.assertEqual(hop.sts, "")
        self.assertEqual(self.dns.asked_txt, [])

    async def test_a_served_domain_route_is_untouched(self) -> None:
        from tests.support.mailsink import thd_add_domain

        served = done(self.db.run("d", thd_add_domain, "example.test", "10.0.0.9", 2525))
        hop = await self.router().route(served, "u@example.test")
        self.assertEqual(hop, Hop("10.0.0.9", 2525, "verify-if-offered"))
        self.assertEqual(self.dns.asked_txt, [])


class SweepTests(TestCase):
    """The expired policies are deleted every hour, on one node of those sharing the store
    (before, no row was ever deleted)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = synchronous_database()
        for domain, max_age in (("a.test", 100), ("b.test", 3000), ("c.test", 86400)):
            policy = Policy("one", "enforce", ("mx.a.test",), max_age, self.clock.seconds())
            done(self.db.run("w", thd_write_policy, domain, policy))

    def kept(self) -> list[str]:
        return sorted(d for d in ("a.test", "b.test", "c.test")
                      if done(self.db.read("r", thd_read_policy, d)) is not None)

    def test_the_sweep_deletes_what_expired_and_only_that(self) -> None:
        now = self.clock.seconds()
        self.assertEqual(done(self.db.run("s", thd_sweep_policies, now + 100, 10)), 1)
        self.assertEqual(self.kept(), ["b.test", "c.test"])
        # A batch at a time.
        self.assertEqual(done(self.db.run("s", thd_sweep_policies, now + 86400, 1)), 1)
        self.assertEqual(self.kept(), ["c.test"])

    def test_the_sweeper_sweeps_every_hour(self) -> None:
        sweeper = PolicySweeper(self.db, self.clock)
        sweeper.startService()
        self.assertEqual(self.kept(), ["a.test", "b.test", "c.test"])  # none expired yet
        self.clock.advance(3600)
        self.assertEqual(self.kept(), ["c.test"])
        self.successResultOf(defer.maybeDeferred(sweeper.stopService))

    def test_one_node_sweeps_per_period(self) -> None:
        swept: list[str] = []

        class Told(PolicySweeper):
            def swept(self, result: int) -> None:
                swept.append(str(self.leases.node_id if self.leases else ""))

        sweepers = []
        for node in ("node-a", "node-b"):
            sweeper = Told(self.db, self.clock)
            sweeper.leases = JobLeases(self.db, node)
            sweepers.append(sweeper)
        self.clock.advance(3600)
        for sweeper in sweepers:
            self.successResultOf(defer.maybeDeferred(sweeper.leased_tick))
        self.assertEqual(len(swept), 1)
        self.assertEqual(self.kept(), ["c.test"])
        self.clock.advance(3600)
        for sweeper in sweepers:
            self.successResultOf(defer.maybeDeferred(sweeper.leased_tick))
        self.assertEqual(len(swept), 2)


class QueuePolicyTests(QueueTestCase):
    """The queue's runner with a scripted next hop: an enforce policy's hop that offers no
    STARTTLS is deferred 4.7.5 and gets nothing; under testing it gets the mail."""

    settings = {"relayhost": ""}

    def setUp(self) -> None:
        super().setUp()
        self.dns = FakeDNS()
        self.fetcher = FakeFetcher()
        self.runner.router._resolver = self.dns
        assert self.runner.router.sts is not None
        self.runner.router.sts.fetcher = self.fetcher

    async def send(self) -> Any:
        await self.q.spool.accept("Q1", envelope("a@x.test", ("u@example.test", None)), BODY)
        return done(self.db.read("show", thd_show, "Q1")).recipients[0]

    async def test_enforce_defers_a_hop_without_starttls_and_sends_nothing(self) -> None:
        self.connector.offer_starttls = False
        rcpt = await self.send()
        self.assertEqual(rcpt.state, "deferred")
        self.assertIn("4.7.5 TLS is required by the MTA-STS policy of the recipient's domain",
                      rcpt.last_error)
        self.assertEqual(self.connector.delivered, [])
        self.assertEqual([h.host for h in self.connector.connects], ["mx1.example.test"])

    async def test_two_domains_of_one_mx_host_share_one_connection(self) -> None:
        self.dns.mx["other.test"] = self.dns.mx["example.test"]
        self.dns.txt["_mta-sts.other.test"] = ["v=STSv1; id=two;"]
        self.fetcher.texts["other.test"] = ENFORCE
        self.connector.offer_starttls = True
        await self.q.spool.accept("Q1", envelope("a@x.test", ("u@example.test", None),
                                                 ("v@other.test", None)), BODY)
        shown = done(self.db.read("show", thd_show, "Q1"))
        self.assertEqual([r.state for r in shown.recipients], ["delivered", "delivered"])
        self.assertEqual([h.host for h in self.connector.connects], ["mx1.example.test"])
        self.assertEqual(len(self.connector.delivered), 1)

    async def test_enforce_delivers_over_verified_tls(self) -> None:
        self.connector.offer_starttls = True
        rcpt = await self.send()
        self.assertEqual(rcpt.state, "delivered")
        self.assertEqual(self.connector.verified, [True])
        self.assertEqual([(h.host, tls) for h, _f, _r, _b, tls in self.connector.delivered],
                         [("mx1.example.test", True)])

    async def test_testing_mode_delivers_as_today(self) -> None:
        self.fetcher.texts["example.test"] = ENFORCE.replace("enforce", "testing")
        self.connector.offer_starttls = False
        rcpt = await self.send()
        self.assertEqual(rcpt.state, "delivered")
        self.assertEqual(len(self.connector.delivered), 1)

    async def test_a_testing_policy_host_without_starttls_is_warned_of_once(self) -> None:
        warned = logged(self, lambda e: "offers no STARTTLS" in e.get("log_format", ""))
        self.fetcher.texts["example.test"] = ENFORCE.replace("enforce", "testing")
        self.connector.offer_starttls = False
        for queue_id in ("Q1", "Q2", "Q3"):
            await self.q.spool.accept(queue_id, envelope("a@x.test", ("u@example.test", None)),
                                      BODY)
            self.clock.advance(self.q.runner.settings.connection_idle + 1)  # a new connection
        self.assertEqual(len(self.connector.connects), 3)
        self.assertEqual(len(warned), 1)
        self.assertIn("mx1.example.test", warned[0])


BEFORE = "0069_ids_never_reused"  # the revision 0070_mta_sts_policies builds on


def thd_tables(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def thd_indexes(conn: sa.Connection) -> set[str]:
    return {str(i["name"]) for i in sa.inspect(conn).get_indexes("mta_sts_policies")}


class MigrationMixin(DatabaseMixin):
    timeout = 120

    async def test_the_table_comes_on_the_way_up_and_goes_on_the_way_down(self) -> None:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("mta_sts_policies", await db.read("t", thd_tables))
        await threads.deferToThread(db.migrate_blocking)
        policy = Policy("one", "enforce", ("mx1.example.test", "*.mail.example.test"), 600,
                        1000.0)
        await db.run("w", thd_write_policy, "example.test", policy)
        await db.run("w", thd_write_policy, "example.test", policy)  # replaced, no error
        self.assertEqual(await db.read("r", thd_read_policy, "example.test"), policy)
        self.assertIn("ix_mta_sts_policies_expires_at", await db.read("i", thd_indexes))
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("mta_sts_policies", await db.read("t", thd_tables))


class SQLiteMigrationTests(MigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMigrationTests(MigrationMixin, TestCase):
    backend = "postgresql"

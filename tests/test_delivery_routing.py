"""Next-hop routing: a served domain's redirect and TLS policy, relayhost for foreign
recipients, and the MX lookup (with an injected resolver; no DNS traffic)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import TestCase

from mailcore.queue.model import thd_vouched_domain_for
from mailcore.queue.routing import MAX_LOOKUPS, Hop, Router, RoutingError, parse_hostport
from mailcore.queue.settings import QueueSettings
from tests.support.db import synchronous_database
from tests.support.mailsink import done, thd_add_domain


class FakeResolver:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
        self.asked.append(name)
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        records = [
            dns.RRHeader(name, dns.MX, payload=dns.Record_MX(pref, host))
            for pref, host in (answer or [])
        ]
        return defer.succeed((records, [], []))


class RouterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.db = synchronous_database()
        self.served = done(self.db.run("d", thd_add_domain, "customer.test", "mx.customer.test",
                                  2525))
        self.strict = done(self.db.run("d", thd_add_domain, "strict.test", "[2001:db8::1]:26", 25,
                                  require_tls=True))

    def router(self, resolver: Any = None, **settings: Any) -> Router:
        return Router(self.db, self.clock, QueueSettings(**settings), resolver)

    async def test_served_domain_goes_to_its_redirect(self) -> None:
        hop = await self.router().route(self.served, "b@customer.test")
        self.assertEqual(hop, Hop("mx.customer.test", 2525, "verify-if-offered"))

    async def test_require_tls_domain_gets_the_verify_policy(self) -> None:
        hop = await self.router().route(self.strict, "b@strict.test")
        self.assertEqual(hop.tls, "verify")

    async def test_a_domain_without_a_policy_follows_the_queue_default(self) -> None:
        for policy in ("none", "may", "verify-if-offered", "verify"):
            hop = await self.router(tls=policy).route(self.served, "b@customer.test")
            self.assertEqual(hop.tls, policy)

    async def test_the_domains_own_policy_wins_over_the_queue_default(self) -> None:
        """A customer's server with a self-signed certificate gets `may`, even when the
        queue default is stricter; a stricter domain policy wins over a laxer default."""
        lax = done(self.db.run("d", thd_add_domain, "selfsigned.test", "mx.selfsigned.test",
                               25, tls="may"))
        hop = await self.router(tls="verify").route(lax, "b@selfsigned.test")
        self.assertEqual(hop, Hop("mx.selfsigned.test", 25, "may"))
        hop = await self.router(tls="none").route(self.strict, "b@strict.test")
        self.assertEqual(hop.tls, "verify")

    async def test_a_changed_domain_policy_is_seen_after_the_cache_expires(self) -> None:
        router = self.router(route_cache_seconds=30)
        self.assertEqual((await router.route(self.served, "b@customer.test")).tls,
                         "verify-if-offered")
        done(self.db.run("u", lambda c: c.exec_driver_sql("UPDATE domains SET tls = 'may'")))
        self.clock.advance(31)
        self.assertEqual((await router.route(self.served, "b@customer.test")).tls, "may")

    async def test_an_unknown_stored_policy_fails_closed_as_verify(self) -> None:
        done(self.db.run("u", lambda c: c.exec_driver_sql(
            "UPDATE domains SET tls = 'opportunistic' WHERE name = 'customer.test'")))
        hop = await self.router(tls="may").route(self.served, "b@customer.test")
        self.assertEqual(hop.tls, "verify")

    async def test_routes_are_cached_for_a_while(self) -> None:
        router = self.router(route_cache_seconds=30)
        await router.route(self.served, "b@customer.test")
        done(self.db.run("u", lambda c: c.exec_driver_sql(
            "UPDATE domains SET redirect_port = 2626")))
        self.assertEqual((await router.route(self.served, "b@customer.test")).port, 2525)
        self.clock.advance(31)
        self.assertEqual((await router.route(self.served, "b@customer.test")).port, 2626)

    async def test_a_removed_domain_is_a_permanent_routing_error(self) -> None:
        # Its id is never given again: no retry could route the mail, which bounces now
        # rather than after days of retries (a domain removed, or its owner deleted).
        with self.assertRaises(RoutingError) as e:
            await self.router().route(999, "x@gone.test")
        self.assertTrue(e.exception.permanent)
        self.assertIn("domain 999 is no longer served", str(e.exception))

    async def test_own_mail_to_a_suspended_domain_is_a_temporary_4_2_1_until_enabled(
            self) -> None:
        router = self.router(route_cache_seconds=30)
        done(self.db.run("u", lambda c: c.exec_driver_sql("UPDATE users SET is_active = 0")))
        for kind in ("outbox", "bounce", "notification", "digest"):
            with self.assertRaises(RoutingError) as e:
                await router.route(self.served, "b@customer.test", kind)
            self.assertFalse(e.exception.permanent)
            self.assertEqual(e.exception.status, "4.2.1")
        # Mail accepted from the world before the suspension (answered 250) still goes.
        for kind in ("relay", "release"):
            self.assertEqual((await router.route(self.served, "b@customer.test", kind)).port,
                             2525)
        done(self.db.run("u", lambda c: c.exec_driver_sql("UPDATE users SET is_active = 1")))
        self.clock.advance(31)
        self.assertEqual((await router.route(self.served, "b@customer.test", "outbox")).port,
                         2525)

    async def test_foreign_recipient_goes_to_the_relayhost(self) -> None:
        resolver = FakeResolver({})
        hop = await self.router(resolver, relayhost="[10.1.2.3]:587").route(None, "a@x.test")
        self.assertEqual(hop, Hop("10.1.2.3", 587, "verify-if-offered"))
        self.assertEqual(resolver.asked, [])

    async def test_without_relayhost_the_best_mx_is_used(self) -> None:
        resolver = FakeResolver({"x.test": [(20, "backup.x.test"), (10, "mx1.x.test")]})
        hop = await self.router(resolver).route(None, "a@X.test")
        self.assertEqual(hop, Hop("mx1.x.test", 25, "verify-if-offered", ("backup.x.test",)))

    async def test_the_other_mx_hosts_are_fallbacks_by_preference(self) -> None:
        answers = [(30, "c.x.test"), (10, "a.x.test"), (20, "b.x.test"), (10, "a.x.test")]
        answers += [(40 + i, f"more{i}.x.test") for i in range(5)]
        hop = await self.router(FakeResolver({"x.test": answers})).route(None, "a@x.test")
        self.assertEqual((hop.host, hop.fallbacks),
                         ("a.x.test", ("b.x.test", "c.x.test", "more0.x.test", "more1.x.test")))
        self.assertEqual([h.host for h in hop.hosts()],
                         ["a.x.test", "b.x.test", "c.x.test", "more0.x.test", "more1.x.test"])
        self.assertEqual({h.fallbacks for h in hop.hosts()}, {()})

    async def test_no_mx_falls_back_to_the_domain_itself(self) -> None:
        hop = await self.router(FakeResolver({"x.test": []})).route(None, "a@x.test")
        self.assertEqual(hop, Hop("x.test", 25, "verify-if-offered"))

    async def test_foreign_hops_get_the_queue_default(self) -> None:
        resolver = FakeResolver({"x.test": [(10, "mx1.x.test")]})
        self.assertEqual((await self.router(resolver, tls="may").route(None, "a@x.test")).tls,
                         "may")
        relayed = await self.router(resolver, relayhost="relay.test", tls="verify").route(
            None, "a@x.test")
        self.assertEqual(relayed.tls, "verify")

    async def test_at_most_max_lookups_are_under_way_at_once(self) -> None:
        asked: list[defer.Deferred[Any]] = []

        class Silent:
            def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
                asked.append(defer.Deferred())
                return asked[-1]

        router = self.router(Silent())
        routes = [defer.Deferred.fromCoroutine(router.route(None, f"a@d{i}.test"))
                  for i in range(MAX_LOOKUPS + 5)]
        self.assertEqual(len(asked), MAX_LOOKUPS)
        asked[0].callback(([], [], []))
        self.assertEqual(len(asked), MAX_LOOKUPS + 1)
        i = 1
        while i < len(asked):  # each answer lets the next waiting lookup start
            asked[i].callback(([], [], []))
            i += 1
        self.assertEqual(len(asked), MAX_LOOKUPS + 5)
        self.assertEqual([self.successResultOf(r).host for r in routes],
                         [f"d{i}.test" for i in range(MAX_LOOKUPS + 5)])

    async def test_nonexistent_domain_is_permanent(self) -> None:
        resolver = FakeResolver({"nx.test": DNSNameError("nx")})
        with self.assertRaises(RoutingError) as e:
            await self.router(resolver).route(None, "a@nx.test")
        self.assertTrue(e.exception.permanent)

    async def test_dns_failure_is_temporary(self) -> None:
        resolver = FakeResolver({"x.test": DNSServerError("servfail")})
        with self.assertRaises(RoutingError) as e:
            await self.router(resolver).route(None, "a@x.test")
        self.assertFalse(e.exception.permanent)

    async def test_null_mx_is_permanent(self) -> None:
        with self.assertRaises(RoutingError) as e:
            await self.router(FakeResolver({"x.test": [(0, b"")]})).route(None, "a@x.test")
        self.assertTrue(e.exception.permanent)

    # -- this gateway's own mail to a domain served but not vouched for -----------------

    async def test_own_mail_to_a_claimed_domain_goes_by_mx_with_the_served_hop_behind(
        self,
    ) -> None:
        # Claimed through the API with verification off: served, not vouched for.
        resolver = FakeResolver({"customer.test": [(10, b"mx.real.test")]})
        hop = await self.router(resolver).route(None, "b@customer.test")
        self.assertEqual(hop, Hop("mx.real.test", 25, "verify-if-offered", loop_to=Hop(
            "mx.customer.test", 2525, "verify-if-offered")))
        self.assertEqual(resolver.asked, ["customer.test"])

    async def test_own_mail_to_a_claimed_domain_without_dns_takes_the_served_hop(
        self,
    ) -> None:
        resolver = FakeResolver({"customer.test": DNSNameError("nx")})
        hop = await self.router(resolver).route(None, "b@customer.test")
        self.assertEqual(hop, Hop("mx.customer.test", 2525, "verify-if-offered"))

    async def test_own_mail_to_a_claimed_domain_waits_when_dns_fails(self) -> None:
        resolver = FakeResolver({"customer.test": DNSServerError("servfail")})
        with self.assertRaises(RoutingError) as e:
            await self.router(resolver).route(None, "b@customer.test")
        self.assertFalse(e.exception.permanent)

    async def test_an_unserved_domain_has_no_served_hop_behind(self) -> None:
        resolver = FakeResolver({"other.test": [(10, b"mx.other.test")]})
        hop = await self.router(resolver).route(None, "b@other.test")
        self.assertIsNone(hop.loop_to)

    async def test_which_served_domains_own_mail_names(self) -> None:
        vouched = await self.db.run("d", thd_add_domain, "vouched.test", "mx.v.test", 25,
                                    vouched=True)
        self.assertEqual(await self.db.read("v", thd_vouched_domain_for, "vouched.test"),
                         vouched)
        self.assertIsNone(await self.db.read("v", thd_vouched_domain_for, "customer.test"))
        self.assertIsNone(await self.db.read("v", thd_vouched_domain_for, "nowhere.test"))

    def test_parse_hostport(self) -> None:
        self.assertEqual(parse_hostport("mx.test"), ("mx.test", 25))
        self.assertEqual(parse_hostport("mx.test:2525"), ("mx.test", 2525))
        self.assertEqual(parse_hostport("[::1]:26"), ("::1", 26))
        self.assertEqual(parse_hostport("[::1]"), ("::1", 25))

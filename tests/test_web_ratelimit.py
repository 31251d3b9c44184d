"""Token-bucket rate limits on an injected clock, and the headers that report them."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from web.ratelimit import Rate, RateLimited, RateLimiter, client_key, enforce


def request_from(address: Any) -> Any:
    request: Any = DummyRequest([b""])
    request.client = address
    return request


class ClientKeyTests(TestCase):
    """An anonymous client is its IPv4 address or its IPv6 /64: 1,000 logins from 1,000
    addresses of one /64 were all allowed against a limit of 100 an hour (found by an
    audit)."""

    def test_ipv6_clients_are_counted_by_their_64(self) -> None:
        keys = {client_key(request_from(IPv6Address("TCP", host, 4000)))
                for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff",
                             "2001:DB8:1:2:0:0:0:c8")}
        self.assertEqual(keys, {"2001:db8:1:2::/64"})
        self.assertEqual(client_key(request_from(IPv6Address("TCP", "2001:db8:1:3::1", 1))),
                         "2001:db8:1:3::/64")

    def test_ipv4_and_ipv4_mapped_addresses_are_the_ipv4_address(self) -> None:
        self.assertEqual(client_key(request_from(IPv4Address("TCP", "192.0.2.1", 1))),
                         "192.0.2.1")
        self.assertEqual(client_key(request_from(IPv6Address("TCP", "::ffff:192.0.2.1", 1))),
                         "192.0.2.1")
        self.assertEqual(client_key(request_from(None)), "unknown")

    def test_one_64_gets_the_429_of_one_client(self) -> None:
        limiter = RateLimiter(Clock(), Rate(100, 3600))
        for i in range(1, 101):
            request = request_from(IPv6Address("TCP", f"2001:db8:1:2::{i:x}", 4000))
            enforce(request, limiter, ("login", client_key(request)))
        last = request_from(IPv6Address("TCP", "2001:db8:1:2::ffff", 4000))
        error = self.assertRaises(RateLimited, enforce, last, limiter,
                                  ("login", client_key(last)))
        self.assertEqual(error.status, 429)


class RateTests(TestCase):
    def test_parse(self) -> None:
        self.assertEqual(Rate.parse("100/hour"), Rate(100, 3600))
        self.assertEqual(Rate.parse("20/second"), Rate(20, 1))
        self.assertEqual(Rate.parse(" 5 / 10min "), Rate(5, 600))
        self.assertEqual(Rate.parse("1000/d"), Rate(1000, 86400))

    def test_bad_rates(self) -> None:
        for text in ("100", "x/hour", "10/fortnight", "-1/s", ""):
            self.assertRaises(ValueError, Rate.parse, text)
        self.assertRaises(ValueError, Rate, 0, 1)
        self.assertRaises(ValueError, Rate, 1, 0)


class LimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limiter = RateLimiter(self.clock, Rate(3, 60))

    def test_a_burst_up_to_the_limit_then_refusals(self) -> None:
        decisions = [self.limiter.check("k") for _ in range(4)]
        self.assertEqual([d.allowed for d in decisions], [True, True, True, False])
        self.assertEqual([d.remaining for d in decisions], [2, 1, 0, 0])
        refused = decisions[-1]
        self.assertEqual(refused.retry_after, 20)  # one token every 60/3 s
        self.assertEqual(refused.reset, 1000 + 60)
        self.assertEqual(
            refused.headers(),
            {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0",
             "X-RateLimit-Reset": "1060", "Retry-After": "20"},
        )

    def test_tokens_come_back_evenly(self) -> None:
        for _ in range(3):
            self.limiter.check("k")
        self.clock.advance(19)
        self.assertFalse(self.limiter.check("k").allowed)
        self.clock.advance(1)
        decision = self.limiter.check("k")
        self.assertTrue(decision.allowed)
        self.assertNotIn("Retry-After", decision.headers())
        self.clock.advance(600)
        self.assertEqual(self.limiter.peek("k"), 3)  # never more than the limit

    def test_refused_requests_do_not_dig_deeper(self) -> None:
        for _ in range(10):
            self.limiter.check("k")
        self.clock.advance(20)
        self.assertTrue(self.limiter.check("k").allowed)

    def test_keys_are_independent_and_peek_takes_nothing(self) -> None:
        for _ in range(3):
            self.limiter.check("a")
        self.assertEqual(self.limiter.peek("b"), 3)
        self.assertEqual(self.limiter.peek("b"), 3)
        self.assertTrue(self.limiter.check("b").allowed)
        self.assertFalse(self.limiter.check("a").allowed)

    def test_memory_stays_bounded(self) -> None:
        limiter = RateLimiter(self.clock, Rate(1, 60), max_keys=10)
        for i in range(100):
            limiter.check(i)
        self.assertLessEqual(len(limiter._buckets), 10)
        self.assertFalse(limiter.check(99).allowed)  # the newest keys are kept

    def test_enforce_sets_headers_and_raises_429(self) -> None:
        request: Any = DummyRequest([b""])
        enforce(request, self.limiter, "k")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"X-RateLimit-Remaining"),
                         [b"2"])
        enforce(request, self.limiter, "k")
        enforce(request, self.limiter, "k")
        error = self.assertRaises(RateLimited, enforce, request, self.limiter, "k")
        self.assertEqual(error.status, 429)
        self.assertEqual(error.headers["Retry-After"], "20")
        self.assertEqual(error.message, "Request was throttled. Expected available in 20 "
                                        "seconds.")

"""Behind a trusted reverse proxy (`[web] trusted_proxies`): the client's address and scheme
come from X-Forwarded-For and X-Forwarded-Proto, and from nobody else's headers."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from mailcore.config import Config
from tests.support.web import make_core
from web.forwarded import MAX_HOPS, forwarded_client, forwarded_secure, trusted
from web.root import MailcoreSite, build_root
from web.settings import WebSettings

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def headers(**values: list[str]) -> Headers:
    return Headers({k.replace("_", "-").encode(): [v.encode() for v in vs]
                    for k, vs in values.items()})


class ForwardedTests(TestCase):
    def test_only_listed_peers_are_trusted(self) -> None:
        self.assertTrue(trusted("10.1.2.3", PROXIES))
        self.assertTrue(trusted("::ffff:10.1.2.3", PROXIES))
        self.assertFalse(trusted("192.0.2.1", PROXIES))
        self.assertFalse(trusted("10.1.2.3", ()))
        self.assertFalse(trusted(None, PROXIES))
        self.assertFalse(trusted("not an address", PROXIES))

    def test_the_client_is_the_first_untrusted_address_from_the_right(self) -> None:
        cases = [
            ([], "10.0.0.1"),  # no header: the peer
            (["198.51.100.7"], "198.51.100.7"),
            # What the client sent itself stands left of what the proxy appended.
            (["1.2.3.4, 198.51.100.7"], "198.51.100.7"),
            # A chain of trusted proxies is walked past.
            (["1.2.3.4, 198.51.100.7, 10.9.9.9"], "198.51.100.7"),
            (["1.2.3.4", "198.51.100.7,10.9.9.9"], "198.51.100.7"),  # two header lines
            (["10.2.2.2, 10.3.3.3"], "10.2.2.2"),  # all trusted: the leftmost
            (["[2001:db8::5]:4711"], "2001:db8::5"),
            (["198.51.100.7:4711"], "198.51.100.7"),
            (["::ffff:198.51.100.7"], "198.51.100.7"),
            # Garbage ends the walk at the last trusted hop: whoever wrote it is not believed.
            (["198.51.100.7, unknown, 10.9.9.9"], "10.9.9.9"),
            (["198.51.100.7, bogus"], "10.0.0.1"),
        ]
        for values, client in cases:
            got = forwarded_client("10.0.0.1", headers(x_forwarded_for=values), PROXIES)
            self.assertEqual(got, client, values)

    def test_a_long_header_is_read_only_so_far(self) -> None:
        chain = ", ".join(["198.51.100.9"] + ["10.0.0.7"] * (MAX_HOPS + 5))
        got = forwarded_client("10.0.0.1", headers(x_forwarded_for=[chain]), PROXIES)
        self.assertEqual(got, "10.0.0.7")

    def test_the_scheme_is_the_nearest_proxys(self) -> None:
        self.assertIsNone(forwarded_secure(headers()))
        self.assertIs(forwarded_secure(headers(x_forwarded_proto=["https"])), True)
        self.assertIs(forwarded_secure(headers(x_forwarded_proto=["HTTPS"])), True)
        self.assertIs(forwarded_secure(headers(x_forwarded_proto=["http"])), False)
        self.assertIs(forwarded_secure(headers(x_forwarded_proto=["http, https"])), True)
        self.assertIs(forwarded_secure(headers(x_forwarded_proto=["https", "http"])), False)


class SiteTests(TestCase):
    """Through the real site and channel, on StringTransports: the access log, the per-address
    rates and the page cookies see what the request's getClientAddress and isSecure say."""

    def build(self, **web: Any) -> None:
        core, _ = make_core(Config())
        settings = WebSettings(max_connections=10, max_connections_per_ip=1, **web)
        self.site = MailcoreSite(build_root(core, settings), settings, Clock())
        self.seen: list[tuple[str, bool]] = []
        site = self.site

        class Seeing(site.requestFactory):  # type: ignore[name-defined,misc]
            def process(inner) -> None:
                self.seen.append((inner.getClientAddress().host, inner.isSecure()))
                super().process()

        site.requestFactory = Seeing

    def request(self, peer: str, *lines: str, path: str = "/api/v1/ping") -> bytes:
        address = IPv4Address("TCP", peer, 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        head = "".join(f"{line}\r\n" for line in lines)
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        return bytes(transport.value())

    def test_without_trusted_proxies_the_headers_are_ignored(self) -> None:
        self.build()
        self.request("10.0.0.1", "X-Forwarded-For: 198.51.100.7", "X-Forwarded-Proto: https")
        self.assertEqual(self.seen, [("10.0.0.1", False)])

    def test_a_trusted_proxy_tells_the_client_and_its_scheme(self) -> None:
        self.build(trusted_proxies=PROXIES)
        self.request("10.0.0.1", "X-Forwarded-For: 1.2.3.4, 198.51.100.7",
                     "X-Forwarded-Proto: https")
        self.request("10.0.0.1")
        # Anyone else's headers are not believed.
        self.request("192.0.2.1", "X-Forwarded-For: 198.51.100.7", "X-Forwarded-Proto: https")
        self.assertEqual(self.seen, [("198.51.100.7", True), ("10.0.0.1", False),
                                     ("192.0.2.1", False)])

    def test_a_trusted_proxys_connections_count_against_the_total_only(self) -> None:
        self.build(trusted_proxies=PROXIES)
        for _ in range(3):
            self.assertTrue(self.request("10.0.0.1").startswith(b"HTTP/1.1 401 "))
        self.assertTrue(self.request("192.0.2.1").startswith(b"HTTP/1.1 401 "))
        self.assertTrue(self.request("192.0.2.1").startswith(b"HTTP/1.1 503 "))

    def test_metrics_behind_a_local_proxy_are_for_local_clients_only(self) -> None:
        """A proxy on loopback made every client a loopback one to /metrics' check."""
        self.build(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
        reply = self.request("127.0.0.1", "X-Forwarded-For: 198.51.100.7", path="/metrics")
        self.assertTrue(reply.startswith(b"HTTP/1.1 403 "), reply[:40])
        reply = self.request("127.0.0.1", path="/metrics")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:40])

"""Next hops are checked where they are used: on the address actually connected to, after
resolution (redirects, MX answers), by the operator's `[queue]` network policy; and the
gateway's own SMTP listeners are never a next hop, neither when a redirect is set (API,
CLI) nor at delivery. No DNS traffic: names resolve through a fake resolver on a
MemoryReactor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.queue.assembly import Queue, build_queue
from mailcore.queue.connector import TCPConnector
from mailcore.queue.model import thd_show
from mailcore.queue.nexthop import Listeners, NextHopPolicy, NextHopRefused, listener_address
from mailcore.queue.routing import Hop
from mailcore.queue.settings import QueueSettings
from tests.support.cli import cli_command
from tests.support.db import synchronous_database
from tests.support.mailsink import done, envelope, thd_add_domain
from tests.support.names import FakeNames
from tests.support.reactor import get_reactor
from tests.support.servers import CommandResult, tempdir_for
from tests.support.web import Web

REPO = Path(__file__).resolve().parent.parent
BODY = b"From: a@x.test\r\nSubject: hello\r\n\r\nbody line\r\n"
LOOPBACK_REFUSED = "loopback (allow with [queue] allow_loopback = true)"
PRIVATE_REFUSED = ("private (allow with [queue] allow_private = true, or the network in "
                   "[queue] allow_networks)")


class FakeMX:
    """twisted.names' lookupMailExchange from a table of (preference, host) lists."""

    def __init__(self, answers: dict[str, list[tuple[int, str]]]) -> None:
        self.answers = answers

    def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
        records = [dns.RRHeader(name, dns.MX, payload=dns.Record_MX(pref, host))
                   for pref, host in self.answers.get(name, [])]
        return defer.succeed((records, [], []))


def reactor_with(names: dict[str, list[str]]) -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeNames(names)  # type: ignore[assignment]
    return reactor


def connected(reactor: MemoryReactorClock, local: str, peer: str,
              peer_port: int) -> tuple[StringTransport, Any]:
    """Complete the reactor's last TCP connection attempt with a transport whose ends
    are `local` and `peer:peer_port`; the transport and the protocol."""
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", peer, peer_port))
    assert protocol is not None
    transport = StringTransport(hostAddress=IPv4Address("TCP", local, 40000),
                                peerAddress=IPv4Address("TCP", peer, peer_port))
    protocol.makeConnection(transport)
    return transport, protocol


def queue_settings(**keys: Any) -> QueueSettings:
    """`[queue]` as the operator writes it."""
    return QueueSettings.from_config(Config(sections={"queue": {"node_id": "n", **keys}}))


# -- our own listeners --------------------------------------------------------------------


class ListenerTests(TestCase):
    def test_listener_strings_give_their_address_and_port(self) -> None:
        self.assertEqual(listener_address("tcp:2525:interface=127.0.0.1"), ("127.0.0.1", 2525))
        self.assertEqual(listener_address("tcp:2525"), ("0.0.0.0", 2525))  # noqa: S104
        self.assertEqual(listener_address("tcp:port=25:backlog=50"), ("0.0.0.0", 25))  # noqa: S104
        self.assertEqual(listener_address(r"tcp6:port=2525:interface=\:\:1"), ("::1", 2525))
        self.assertEqual(listener_address("tcp6:2526"), ("::", 2526))
        self.assertEqual(listener_address("ssl:465:privateKey=k.pem:certKey=c.pem"),
                         ("0.0.0.0", 465))  # noqa: S104
        self.assertIsNone(listener_address("unix:/run/mailcore.sock"))
        self.assertIsNone(listener_address("tcp:notaport"))

    def test_a_wildcard_listener_owns_its_port_on_every_local_address(self) -> None:
        own = Listeners(["tcp:2525"])
        self.assertTrue(own.owns("127.0.0.1", 2525))
        self.assertTrue(own.owns("127.3.4.5", 2525))
        self.assertTrue(own.owns("::ffff:127.0.0.1", 2525))
        self.assertFalse(own.owns("127.0.0.1", 2526))
        # a non-loopback address is ours when it is our own end of the connection
        self.assertFalse(own.owns("93.184.216.34", 2525))
        self.assertTrue(own.owns_peer("93.184.216.34", 2525, local="93.184.216.34"))
        self.assertFalse(own.owns_peer("93.184.216.34", 2525, local="198.18.0.1"))
        # an IPv4 wildcard does not take IPv6; "::" takes both
        self.assertFalse(own.owns("::1", 2525))
        both = Listeners(["tcp6:2525"])
        self.assertTrue(both.owns("::1", 2525))
        self.assertTrue(both.owns("127.0.0.1", 2525))

    def test_a_listener_on_one_interface_owns_only_that_address(self) -> None:
        own = Listeners(["tcp:2525:interface=127.0.0.1"])
        self.assertTrue(own.owns("127.0.0.1", 2525))
        self.assertFalse(own.owns("127.0.0.2", 2525))

    def test_ports_as_bound_count_too(self) -> None:
        own = Listeners(["tcp:0:interface=127.0.0.1"])  # the port is known once bound
        self.assertFalse(own)
        own.bound("0.0.0.0", 40125)  # noqa: S104
        self.assertTrue(own.owns("127.0.0.1", 40125))


# -- the policy, checked by the connector -------------------------------------------------


class ConnectorTests(TestCase):
    def connector(self, names: dict[str, list[str]], listeners: Listeners | None = None,
                  **settings: Any) -> tuple[MemoryReactorClock, TCPConnector]:
        reactor = reactor_with(names)
        qs = queue_settings(**settings)
        return reactor, TCPConnector(reactor, qs, "mx.test", NextHopPolicy(qs, listeners))

    async def refusal(self, connector: TCPConnector, hop: Hop) -> NextHopRefused:
        with self.assertRaises(NextHopRefused) as caught:
            await connector.connect(hop)
        return caught.exception

    async def test_a_name_that_resolves_to_loopback_is_refused_by_default(self) -> None:
        reactor, connector = self.connector({"mx.customer.test": ["127.0.0.1"]})
        refused = await self.refusal(connector, Hop("mx.customer.test", 2526))
        self.assertEqual(str(refused), "4.7.0 next hop mx.customer.test (127.0.0.1) is not "
                                       f"allowed: {LOOPBACK_REFUSED}")
        self.assertFalse(refused.permanent)
        self.assertEqual(reactor.tcpClients, [])  # no connection was even attempted

    async def test_the_operator_allows_loopback_next_hops(self) -> None:
        reactor, connector = self.connector({"mx.customer.test": ["127.0.0.1"]},
                                            allow_loopback=True)
        connector.connect(Hop("mx.customer.test", 2526))
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("127.0.0.1", 2526)])

    async def test_only_allowed_addresses_of_a_name_are_tried(self) -> None:
        reactor, connector = self.connector(
            {"mx.customer.test": ["10.0.0.7", "93.184.216.34"]}
        )
        connector.connect(Hop("mx.customer.test", 25))
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("93.184.216.34", 25)])

    async def test_at_most_max_addresses_of_a_name_are_tried(self) -> None:
        addresses = [f"93.184.216.{i}" for i in range(1, 21)]
        reactor, connector = self.connector({"mx.customer.test": addresses})
        d = connector.connect(Hop("mx.customer.test", 25))
        while not d.called:
            factory = reactor.tcpClients[-1][2]
            factory.clientConnectionFailed(reactor.connectors[-1],
                                           Failure(error.ConnectionRefusedError()))
        self.failureResultOf(d, error.ConnectionRefusedError)
        # connector.MAX_ADDRESSES of them
        self.assertEqual([h for h, *_ in reactor.tcpClients], addresses[:5])

    async def test_ip_literal_hops_are_checked_without_resolving(self) -> None:
        reactor, connector = self.connector({}, allow_networks=["10.1.0.0/16"])
        refused = await self.refusal(connector, Hop("10.2.0.1", 25))
        self.assertEqual(str(refused), f"4.7.0 next hop 10.2.0.1 is not allowed: {PRIVATE_REFUSED}")
        refused = await self.refusal(connector, Hop("169.254.169.254", 25))
        self.assertIn("link-local", str(refused))
        connector.connect(Hop("10.1.2.3", 25))
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("10.1.2.3", 25)])
        self.assertEqual(reactor.nameResolver.asked, [])  # type: ignore[attr-defined]

    async def test_deny_networks_win_over_the_allowances(self) -> None:
        _, connector = self.connector({"mx.customer.test": ["127.0.0.1"]},
                                      allow_loopback=True, deny_networks=["127.0.0.0/8"])
        refused = await self.refusal(connector, Hop("mx.customer.test", 25))
        self.assertIn("in [queue] deny_networks (127.0.0.0/8)", str(refused))

    async def test_a_name_that_resolves_to_our_own_listener_is_a_loop(self) -> None:
        reactor, connector = self.connector(
            {"mx.customer.test": ["127.0.0.1"]}, Listeners(["tcp:2525:interface=127.0.0.1"]),
            allow_loopback=True,
        )
        refused = await self.refusal(connector, Hop("mx.customer.test", 2525))
        self.assertTrue(refused.permanent)
        self.assertTrue(str(refused).startswith("5.4.6 mail for mx.customer.test:2525 loops "
                                                "back to myself"), str(refused))
        self.assertEqual(reactor.tcpClients, [])

    async def test_a_wildcard_listener_reached_on_our_own_address_is_closed_unspoken(
        self,
    ) -> None:
        # We listen on 0.0.0.0:25; the hop is one of this host's public addresses.
        reactor, connector = self.connector({}, Listeners(["tcp:25"]))
        connecting = connector.connect(Hop("93.184.216.34", 25))
        transport, _ = connected(reactor, local="93.184.216.34", peer="93.184.216.34",
                                 peer_port=25)
        with self.assertRaises(NextHopRefused) as caught:
            await connecting
        self.assertTrue(caught.exception.permanent)
        self.assertIn("5.4.6", str(caught.exception))
        self.assertEqual(transport.value(), b"")  # not even EHLO
        self.assertTrue(transport.disconnecting)

    async def test_another_host_on_the_same_port_is_not_a_loop(self) -> None:
        reactor, connector = self.connector({}, Listeners(["tcp:25"]))
        connecting = connector.connect(Hop("93.184.216.34", 25))
        transport, protocol = connected(reactor, local="198.18.0.1", peer="93.184.216.34",
                                        peer_port=25)
        protocol.dataReceived(b"220 mx.example ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO mx.test\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        with self.assertRaises(Exception):
            await connecting


# -- the queue: deferred or bounced, with a last error that says why -----------------------


class QueueTests(TestCase):
    """A queue on a MemoryReactorClock and an in-memory store, with the real TCP
    connector; names resolve through FakeNames, MX lookups through FakeMX."""

    def make(self, names: dict[str, list[str]], *, config: Config | None = None,
             mx: dict[str, list[tuple[int, str]]] | None = None, **settings: Any) -> Queue:
        self.reactor = reactor_with(names)
        self.db = synchronous_database()
        config = config or Config(hostname="mx.test")
        qs = queue_settings(**settings)
        q = build_queue(config, self.db, self.reactor, CollectorRegistry(),
                        reactor=self.reactor, settings=qs, resolver=FakeMX(mx or {}))
        q.service.startService()
        self.addCleanup(self.stop, q)
        return q

    async def stop(self, q: Queue) -> None:
        d = q.service.stopService()
        self.reactor.advance(60)
        await d

    def last(self, qid: str) -> tuple[str, str]:
        view = done(self.db.read("show", thd_show, qid))
        return view.recipients[0].state, view.recipients[0].last_error

    async def test_a_redirect_resolving_to_loopback_is_deferred_with_the_reason(self) -> None:
        q = self.make({"mx.customer.test": ["127.0.0.1"]})
        domain = done(self.db.run("d", thd_add_domain, "customer.test", "mx.customer.test",
                                  2526))
        await q.spool.accept("Q1", envelope("a@x.test", ("b@customer.test", domain)), BODY)
        self.assertEqual(self.last("Q1"), (
            "deferred", "4.7.0 next hop mx.customer.test (127.0.0.1) is not allowed: "
            f"{LOOPBACK_REFUSED}",
        ))
        self.assertEqual(self.reactor.tcpClients, [])

    async def test_an_mx_answer_pointing_at_a_private_address_is_refused(self) -> None:
        q = self.make({"mx.remote.test": ["10.9.8.7"]},
                      mx={"remote.test": [(10, "mx.remote.test")]})
        await q.spool.accept("Q1", envelope("a@x.test", ("b@remote.test", None)), BODY)
        self.assertEqual(self.last("Q1"), (
            "deferred", f"4.7.0 next hop mx.remote.test (10.9.8.7) is not allowed: "
            f"{PRIVATE_REFUSED}",
        ))
        self.assertEqual(self.reactor.tcpClients, [])

    async def test_a_redirect_to_our_own_listener_bounces_with_5_4_6(self) -> None:
        # Set behind the API's back (or before the listener moved there).
        q = self.make({}, config=Config(hostname="mx.test",
                                        smtp_endpoints=("tcp:2525:interface=127.0.0.1",)),
                      allow_loopback=True)
        domain = done(self.db.run("d", thd_add_domain, "customer.test", "127.0.0.1", 2525))
        await q.spool.accept("Q1", envelope("", ("b@customer.test", domain)), BODY)
        self.assertEqual(self.last("Q1"), (
            "bounced", "5.4.6 mail for 127.0.0.1:2525 loops back to myself (it is one of "
            "this gateway's own SMTP listeners)",
        ))
        self.assertEqual(self.reactor.tcpClients, [])

    def own_mail(self, mx_host: str) -> Queue:
        """A queue listening on 127.0.0.1:25 and customer.test, served here (its hop
        93.184.216.34:2526) but not vouched for, whose MX is `mx_host`."""
        q = self.make({"mx.us.test": ["127.0.0.1"], "mx.elsewhere.test": ["93.184.216.35"]},
                      config=Config(hostname="mx.test",
                                    smtp_endpoints=("tcp:25:interface=127.0.0.1",)),
                      mx={"customer.test": [(10, mx_host)]}, allow_loopback=True)
        done(self.db.run("d", thd_add_domain, "customer.test", "93.184.216.34", 2526))
        return q

    async def test_own_mail_whose_mx_is_us_takes_the_claimed_domains_served_hop(self) -> None:
        # A bounce (the gateway's own mail) routed without a domain id, as it is for a
        # domain claimed through the API: its MX names us, so the served hop is taken.
        q = self.own_mail("mx.us.test")
        await q.spool.accept("Q1", envelope("", ("b@customer.test", None)), BODY)
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients],
                         [("93.184.216.34", 2526)])
        self.assertEqual(self.last("Q1")[0], "queued")

    async def test_own_mail_whose_mx_is_elsewhere_goes_there_not_to_the_claimant(
        self,
    ) -> None:
        q = self.own_mail("mx.elsewhere.test")
        await q.spool.accept("Q1", envelope("", ("b@customer.test", None)), BODY)
        self.assertEqual([(h, p) for h, p, *_ in self.reactor.tcpClients],
                         [("93.184.216.35", 25)])


# -- when a redirect is set: the API -------------------------------------------------------


class ApiTests(TestCase):
    async def client(self, config: Config) -> tuple[Web, dict[str, str]]:
        web = Web.build(config)
        user = await web.core.identity.create_user("alice", "alice@example.test",
                                                   plan="standard")
        return web, {"Api-Key": await web.credential(user)}

    async def put(self, web: Web, headers: dict[str, str], target: str,
                  method: str = "PUT") -> tuple[int, Any]:
        status, _, reply = await web.call(method, "/api/v1/domain/alice.example",
                                          headers=headers, json={"redirectTo": target})
        return status, reply

    async def test_a_redirect_to_our_own_smtp_listener_is_refused(self) -> None:
        config = Config(smtp_endpoints=("tcp:2525:interface=127.0.0.1",),
                        sections={"queue": {"allow_loopback": True}})
        web, key = await self.client(config)
        for target in ("127.0.0.1:2525", "localhost:2525", "[::ffff:127.0.0.1]:2525"):
            status, reply = await self.put(web, key, target, "POST")
            self.assertEqual(status, 400, target)
            self.assertIn("is this gateway's own SMTP listener: mail sent there would loop "
                          "back to it", reply["msg"])
            self.assertIn("redirectTo", reply["data"])
        self.assertEqual((await self.put(web, key, "127.0.0.1:2526", "POST"))[0], 200)
        status, reply = await self.put(web, key, "127.0.0.1:2525")
        self.assertEqual(status, 400)
        stored = await web.core.domains.get("alice.example")
        assert stored is not None
        self.assertEqual(stored.redirect_to, "127.0.0.1:2526")

    async def test_a_wildcard_listener_owns_its_port_on_any_loopback_address(self) -> None:
        web, key = await self.client(Config(smtp_endpoints=("tcp:2600",),
                                            sections={"queue": {"allow_loopback": True}}))
        status, reply = await self.put(web, key, "127.0.0.5:2600", "POST")
        self.assertEqual(status, 400)
        self.assertIn("own SMTP listener", reply["msg"])

    async def test_the_port_a_listener_actually_bound_is_refused(self) -> None:
        web, key = await self.client(Config(smtp_endpoints=("tcp:0:interface=127.0.0.1",),
                                            sections={"queue": {"allow_loopback": True}}))
        [listener] = web.core.listener_services(get_reactor())
        listener.startService()
        self.addCleanup(listener.stopService)
        port = listener._waitingForPort.result.getHost().port  # type: ignore[attr-defined]
        status, reply = await self.put(web, key, f"127.0.0.1:{port}", "POST")
        self.assertEqual(status, 400)
        self.assertIn("own SMTP listener", reply["msg"])

    async def test_loopback_and_private_redirects_need_the_operators_allowance(self) -> None:
        web, key = await self.client(Config())
        status, reply = await self.put(web, key, "127.0.0.1:2526", "POST")
        self.assertEqual(status, 400)
        self.assertEqual(reply["msg"], "redirectTo: this server does not relay to 127.0.0.1: "
                                       f"{LOOPBACK_REFUSED}.")
        status, reply = await self.put(web, key, "10.1.2.3", "POST")
        self.assertIn(PRIVATE_REFUSED, reply["msg"])
        # a name is checked at delivery, on what it resolves to then
        self.assertEqual((await self.put(web, key, "mx.alice.example", "POST"))[0], 200)


# -- when a redirect is set: the CLI -------------------------------------------------------


class CliTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.base = tempdir_for(self, "mailcore-nexthop-")
        self.config = self.base / "mailcore.toml"
        self.config.write_text('smtp = ["tcp:2525:interface=127.0.0.1"]\n\n'
                               "[queue]\nallow_loopback = true\n")

    async def mc(self, *args: str) -> CommandResult:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("MAILCORE_DEBUG", None)
        return await cli_command("--data-dir", str(self.base / "var"), "-c",
                                 str(self.config), *args, env=env, cwd=self.base)

    async def test_a_redirect_to_our_own_smtp_listener_is_refused(self) -> None:
        result = await self.mc("user", "add", "alice", "--email", "a@users.test",
                               "--password", "x")
        self.assertEqual(result.status, 0, result.err)
        result = await self.mc("domain", "add", "alice.example", "--owner", "alice",
                               "--redirect-to", "127.0.0.1:2525")
        self.assertEqual((result.status, result.out), (1, ""), result.err)
        [line] = result.err.splitlines()
        self.assertTrue(line.startswith("mailcore: "), line)
        self.assertIn("127.0.0.1:2525 is this gateway's own SMTP listener: mail sent there "
                      "would loop back to it", line)
        result = await self.mc("domain", "add", "alice.example", "--owner", "alice",
                               "--redirect-to", "127.0.0.1:2526")
        self.assertEqual(result.status, 0, result.err)
        result = await self.mc("domain", "set", "alice.example", "--redirect-to",
                               "localhost:2525")
        self.assertEqual(result.status, 1)
        self.assertIn("own SMTP listener", result.err)
        self.config.write_text('smtp = ["tcp:2525:interface=127.0.0.1"]\n')  # no allowance
        result = await self.mc("domain", "set", "alice.example", "--redirect-to",
                               "127.0.0.1:2527")
        self.assertEqual(result.status, 1)
        self.assertIn(LOOPBACK_REFUSED, result.err)

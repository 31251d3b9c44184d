"""The real delivery client: connections only to addresses the operator allows, checked on
what a host name resolves to (so DNS cannot redirect a saved webhook), over real sockets to a
local receiver; and the `mailcore webhook` CLI."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import URI
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailcore.fetch.engine import SyncResult
from mailcore.store import Database
from mailcore.webhooks import (
    AddressPolicy,
    AddressRefused,
    WebhookError,
    Webhooks,
    WebhookSettings,
    verify_signature,
)
from mailcore.webhooks.client import MAX_ANSWER_BYTES, _GuardedEndpoint, guarded_http_client
from mailcore.webhooks.sender import WebhookSender
from tests.support.cli import cli_command
from tests.support.imap2api import Receiver, client, config, live_api
from tests.support.names import FakeNames
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import CommandResult, sleep, tempdir_for
from tests.support.web import Web
from tests.support.webhooks import sync_ended


class GuardedEndpointTests(TestCase):
    def endpoint(self, table: dict[str, list[str]], url: bytes, **settings: Any) -> Any:
        reactor = MemoryReactorClock()
        reactor.nameResolver = FakeNames(table)  # type: ignore[assignment]
        policy = AddressPolicy(WebhookSettings.from_section(settings))
        return reactor, _GuardedEndpoint(reactor, policy, URI.fromBytes(url), 5.0)

    async def test_a_name_that_resolves_to_a_forbidden_address_is_refused(self) -> None:
        reactor, endpoint = self.endpoint({"hooks.example.com": ["127.0.0.1", "10.0.0.7"]},
                                          b"http://hooks.example.com/in")
        with self.assertRaises(AddressRefused) as caught:
            await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertIn("10.0.0.7, 127.0.0.1", str(caught.exception))
        self.assertEqual(reactor.tcpClients, [])  # nothing was even attempted

    async def test_only_the_allowed_addresses_of_a_name_are_tried(self) -> None:
        reactor, endpoint = self.endpoint(
            {"hooks.example.com": ["10.0.0.7", "93.184.216.34"]}, b"http://hooks.example.com/"
        )
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("93.184.216.34", 80)])

    async def test_an_address_literal_is_checked_without_resolving(self) -> None:
        reactor, endpoint = self.endpoint({}, b"http://127.0.0.1:8080/", allow_loopback=True)
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("127.0.0.1", 8080)])

    async def test_a_name_that_does_not_resolve_fails_cleanly(self) -> None:
        _, endpoint = self.endpoint({}, b"https://nowhere.example.com/")
        with self.assertRaises(AddressRefused):
            await endpoint.connect(Factory.forProtocol(Protocol))


class Connection:
    """The receiver's end of one delivery connection, in memory: what the client wrote, and
    what it is fed."""

    def __init__(self, reactor: MemoryReactorClock) -> None:
        host, port, factory, *_ = reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        self.protocol.dataReceived(data)

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def lost(self) -> None:
        """The transport reports the end of the connection, as a socket would."""
        self.protocol.connectionLost(Failure(
            ConnectionAborted() if self.aborted else ConnectionDone()
        ))


class HostileReceiverTests(TestCase):
    """The guarded client under a sender, against a receiver played byte by byte in memory."""

    web: Web
    resolver: FakeNames

    async def setup(self, names: dict[str, list[str]] | None = None,
                    **settings: Any) -> tuple[MemoryReactorClock, Any]:
        web = self.web = Web.build(config(webhooks={"poll_interval": 1, **settings}))
        alice = await client(web)
        reactor = MemoryReactorClock()
        self.resolver = FakeNames(
            {"hooks.example.com": ["93.184.216.34"]} if names is None else names
        )
        reactor.nameResolver = self.resolver  # type: ignore[assignment]
        webhooks = web.core.webhooks
        http = guarded_http_client(reactor, webhooks.policy, webhooks.settings.timeout)
        sender = WebhookSender(webhooks, web.clock, http)
        hook, _ = await webhooks.create(alice.user.id, url="http://hooks.example.com/in",
                                        events=["sync.completed"])
        now = datetime.datetime.fromtimestamp(web.clock.seconds(), datetime.UTC)
        await sync_ended(webhooks, SyncResult(
            account_id=1, user_id=alice.user.id, started_at=now, finished_at=now,
            status="success",
        ))
        sender.startService()
        self.addCleanup(sender.stopService)
        web.clock.advance(0)

        async def entry() -> Any:
            [e] = (await webhooks.deliveries(alice.user.id, hook.id)).items
            return e

        return reactor, entry

    async def test_endless_headers_abort_the_connection_after_a_bounded_number_of_bytes(
            self) -> None:
        reactor, entry = await self.setup(timeout=10)
        connection = Connection(reactor)
        self.assertTrue(connection.transport.value().startswith(b"POST /in HTTP/1.1\r\n"))
        connection.feed(b"HTTP/1.1 200 OK\r\n")
        line = b"X-A: " + b"a" * 8000 + b"\r\n"
        while not connection.aborted and connection.fed < 10 * MAX_ANSWER_BYTES:
            connection.feed(line)
        self.assertTrue(connection.aborted)
        self.assertLessEqual(connection.fed, MAX_ANSWER_BYTES + len(line))
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_status_code), ("pending", 1, None))
        self.assertEqual(e.last_error, f"the answer was longer than {MAX_ANSWER_BYTES} bytes")

    async def test_a_long_body_still_reports_the_status(self) -> None:
        reactor, entry = await self.setup(timeout=10)
        connection = Connection(reactor)
        connection.feed(b"HTTP/1.1 500 Oops\r\nContent-Length: 10000000\r\n\r\n")
        while not connection.aborted and connection.fed < 10_000_000:
            connection.feed(b"b" * 4096)  # the receiver ignores the client's stop
        self.assertLessEqual(connection.fed, MAX_ANSWER_BYTES + 4096)
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.last_status_code), ("pending", 500))
        self.assertEqual(e.last_error, "HTTP 500: " + "b" * 512)


    async def test_a_body_that_stalls_past_the_timeout_closes_the_connection(self) -> None:
        reactor, entry = await self.setup(timeout=10)
        connection = Connection(reactor)
        connection.feed(b"HTTP/1.1 500 Oops\r\nContent-Length: 100000\r\n\r\nabc")
        web_clock = self.web.clock
        web_clock.advance(9)
        self.assertFalse(connection.aborted)
        web_clock.advance(1)
        self.assertTrue(connection.aborted)
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_error),
                         ("pending", 1, "no answer within 10 s"))


    async def test_the_timeout_bounds_the_whole_attempt_not_each_half(self) -> None:
        # The answer's head at 9 s, then its body stalls: the attempt ends at 10 s, as
        # `timeout` says, not 10 s after the head (19 s).
        reactor, entry = await self.setup(timeout=10)
        connection = Connection(reactor)
        web_clock = self.web.clock
        web_clock.advance(9)
        connection.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        self.assertFalse(connection.aborted)
        web_clock.advance(1)
        self.assertTrue(connection.aborted)
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_error),
                         ("pending", 1, "no answer within 10 s"))

    async def test_a_redirect_is_not_followed(self) -> None:
        # A receiver must not send the signed payload on to where it likes, the address
        # policy's private networks among them: a 3xx is a failed attempt, retried.
        reactor, entry = await self.setup(timeout=10)
        connection = Connection(reactor)
        connection.feed(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://10.0.0.1/in\r\n"
                        b"Content-Length: 0\r\n\r\n")
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_status_code, e.last_error),
                         ("pending", 1, 307, "HTTP 307"))
        self.assertEqual(len(reactor.tcpClients), 1)

    async def test_a_name_that_does_not_resolve_is_retried(self) -> None:
        reactor, entry = await self.setup(names={}, backoff_base=30)
        self.assertEqual(reactor.tcpClients, [])
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_error),
                         ("pending", 1, "hooks.example.com does not resolve"))
        self.assertEqual(e.next_attempt_at, self.web.clock.seconds() + 30)
        self.resolver.table["hooks.example.com"] = ["93.184.216.34"]  # the resolver is back
        self.web.clock.advance(30)
        connection = Connection(reactor)
        connection.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        connection.lost()
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_status_code), ("success", 2, 204))


    async def test_the_delivery_log_does_not_tell_what_a_name_resolves_to(self) -> None:
        events: list[dict[str, Any]] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        reactor, entry = await self.setup(names={"hooks.example.com": ["10.0.0.5"]})
        self.assertEqual(reactor.tcpClients, [])
        e = await entry()
        self.assertEqual((e.status, e.attempts, e.last_error),
                         ("failed", 1, "hooks.example.com is where this server does not send "
                                       "webhooks"))
        logged = [formatEvent(event) for event in events]
        self.assertTrue(any("10.0.0.5" in line for line in logged), logged)  # the operator's


class _Answer(Resource):
    """A receiver answering `code` and `body`."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body

    def render_POST(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return self.body


class PostgresLogTests(TestCase):
    async def test_an_answer_holding_nul_is_logged_and_retried_as_any_other(self) -> None:
        # A receiver's answer is kept in the delivery log; PostgreSQL's text columns refuse
        # NUL, so the record failed: the attempt was never counted, and the delivery was
        # posted again at each lease, past max_attempts, a traceback each time.
        await self.two_attempts(_Answer(500, b"bad \x00 thing"), 500,
                                "HTTP 500: bad \ufffd thing")

    async def two_attempts(self, receiver: Resource, code: int | None, error: str) -> None:
        """Two attempts at one delivery to `receiver` (max_attempts 2): each is logged
        with `code` and `error`, pending after the first and failed after the second."""
        url = await create_test_database(self)
        web = Web.build(config(webhooks={"poll_interval": 1, "max_attempts": 2}), url=url)
        self.addCleanup(web.core.db.close)
        alice = await client(web)
        sender = WebhookSender(web.core.webhooks, web.clock, StubTreq(receiver))
        hook, _ = await web.core.webhooks.create(alice.user.id, url="https://hooks.example.com/in",
                                                 events=["sync.completed"])
        now = datetime.datetime.fromtimestamp(web.clock.seconds(), datetime.UTC)
        await sync_ended(web.core.webhooks, SyncResult(
            account_id=1, user_id=alice.user.id, started_at=now, finished_at=now,
            status="success"))
        for attempts, status in ((1, "pending"), (2, "failed")):
            web.clock.advance(3600)
            self.assertEqual(await sender.sweep(), 1)
            await DeferredList([d for *_, d in sender._in_flight.values()])
            [entry] = (await web.core.webhooks.deliveries(alice.user.id, hook.id)).items
            self.assertEqual((entry.status, entry.attempts, entry.last_status_code,
                              entry.last_error), (status, attempts, code, error))

    async def test_a_status_code_past_three_digits_is_logged_as_no_status(self) -> None:
        # Twisted's client takes any integer for the status code; the log's column is a
        # 32-bit integer on PostgreSQL, and a code out of its range failed the record.
        await self.two_attempts(_Answer(99_999_999_999, b"ok"), None,
                                "the answer's status code 99999999999 is not an HTTP "
                                "status code (100 to 599)")


class RealSocketTests(TestCase):
    timeout = 30

    async def deliver(self, allow_loopback_at_send: bool) -> tuple[Any, Receiver, str, Any]:
        reactor = get_reactor()
        receiver = Receiver()
        port = reactor.listenTCP(0, Site(receiver, timeout=None), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        api = await live_api(self, {"webhooks": {"allow_loopback": True, "timeout": 5}})
        user = await api.core.identity.create_user("alice", "alice@example.test", "pw-pw-pw-1")
        hook, secret = await api.core.webhooks.create(
            user.id, url=f"http://127.0.0.1:{port.getHost().port}/hook",
            events=["sync.completed"],
        )
        api.core.webhooks.policy.settings = WebhookSettings(
            allow_loopback=allow_loopback_at_send, timeout=5
        )
        sender = api.core.webhooks.sender
        sender.startService()
        self.addCleanup(sender.stopService)
        now = datetime.datetime.now(datetime.UTC)
        await sync_ended(api.core.webhooks, SyncResult(
            account_id=1, user_id=user.id, started_at=now, finished_at=now, status="success",
        ))
        for _ in range(100):
            log = (await api.core.webhooks.deliveries(user.id, hook.id)).items
            if log and log[0].status != "pending":
                break
            await sleep(0.05)
        return api, receiver, secret, log[0]

    async def test_a_signed_post_reaches_a_real_receiver(self) -> None:
        _, receiver, secret, entry = await self.deliver(allow_loopback_at_send=True)
        self.assertEqual((entry.status, entry.last_status_code), ("success", 200))
        [(headers, body)] = receiver.received
        self.assertEqual(headers["user-agent"], "Mailcore-Webhooks/1")
        self.assertTrue(verify_signature(secret, headers["x-mailcore-timestamp"], body,
                                         headers["x-mailcore-signature"],
                                         now=get_reactor().seconds()))

    async def test_a_forbidden_address_is_never_connected_to(self) -> None:
        _, receiver, _, entry = await self.deliver(allow_loopback_at_send=False)
        self.assertEqual(entry.status, "failed")
        self.assertIn("does not send webhooks", entry.last_error)
        self.assertEqual(receiver.received, [])


class CliTests(TestCase):
    timeout = 120

    async def mc(self, data_dir: Path, *args: str) -> CommandResult:
        """`mailcore --data-dir DIR ARGS`, a process of its own (forked by the CLI zygote:
        tests.support.cli, not ~1,000 modules imported again for each of the ten)."""
        return await cli_command("--data-dir", str(data_dir), *args, cwd=data_dir.parent)

    async def test_add_list_deliveries_remove(self) -> None:
        data_dir = tempdir_for(self, "mailcore-cli-webhooks-") / "var"
        result = await self.mc(data_dir, "user", "add", "alice", "--email", "a@x.test",
                               "--password", "pw")
        self.assertEqual(result.status, 0, result.err)
        result = await self.mc(data_dir, "webhook", "add", "alice",
                               "https://hooks.example.com/in", "--events",
                               "email.new,sync.completed", "--description", "crm")
        self.assertEqual((result.status, result.err), (0, ""))
        first, second = result.out.splitlines()
        self.assertEqual(first, "webhook 1 for alice: https://hooks.example.com/in "
                                "(sync.completed,email.new)")
        self.assertRegex(second, r"^secret: whsec_\S{40,}$")
        result = await self.mc(data_dir, "webhook", "list", "alice")
        self.assertIn("https://hooks.example.com/in  sync.completed,email.new  yes     crm",
                      result.out)
        self.assertNotIn("whsec_", result.out)
        result = await self.mc(data_dir, "webhook", "deliveries", "alice", "1")
        self.assertEqual((result.status, result.out.split()[:3]), (0, ["ID", "EVENT", "STATUS"]))
        for args, fragment in [
            (("webhook", "add", "alice", "http://10.0.0.1/"), "URL: this server does not"),
            (("webhook", "add", "alice", "https://h.example.com/", "--events", "x"),
             "--events:"),
            (("webhook", "add", "nobody", "https://h.example.com/"), "no such user"),
            (("webhook", "remove", "alice", "7"), "no such webhook"),
        ]:
            result = await self.mc(data_dir, *args)
            self.assertEqual(result.status, 1, args)
            self.assertIn(fragment, result.err, args)
            self.assertNotIn("Traceback", result.err)
        result = await self.mc(data_dir, "webhook", "remove", "alice", "1")
        self.assertEqual((result.status, result.out.strip()),
                         (0, "removed webhook 1 (https://hooks.example.com/in)"))
        self.assertEqual((await self.mc(data_dir, "webhook", "list", "alice")).out.strip(),
                         "ID  URL  EVENTS  ACTIVE  DESCRIPTION")


class PostgreSQLTests(TestCase):
    timeout = 240

    async def test_concurrent_creates_keep_the_per_user_limit(self) -> None:
        url = await create_test_database(self)
        web = Web.build(url=url)
        self.addCleanup(web.core.db.close)
        alice = await web.user()
        db = Database(url, get_reactor(), max_threads=8)  # threads, as the daemon runs it
        await db.open()
        self.addCleanup(db.close)
        webhooks = web.core.webhooks
        threaded = Webhooks(db, web.clock, webhooks.secrets, webhooks.settings)
        results = await DeferredList([
            Deferred.fromCoroutine(threaded.create(alice.id, url=f"http://93.184.216.{i}/h"))
            for i in range(1, 41)
        ], consumeErrors=True)
        limit = webhooks.settings.max_per_user
        self.assertEqual(sum(1 for ok, _ in results if ok), limit)
        refused: list[Any] = [r for ok, r in results if not ok]
        self.assertEqual({type(f.value) for f in refused}, {WebhookError})
        self.assertEqual((await webhooks.list_webhooks(alice.id, limit=100)).count, limit)

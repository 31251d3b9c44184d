"""The upload gate (web.limits, web.root.upload_gate): a body larger than `[web] max_body`
is read on an upload path only from a client its API serves. Driven through the site's real
channel on a StringTransport."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.identity.service import RESOLVED_TTL
from mailcore.uploads import encoded_bound
from tests.support.logs import logged_at
from tests.support.web import Web
from tests.test_web_deadline import HungStore
from tests.test_web_safedrop_api import MULTIPART, multipart_file
from tests.test_web_safedrop_files import FileFixture
from web.auth import CredentialResolver
from web.root import MailcoreSite, upload_gate, upload_paths
from web.safedrop import UPLOAD_OVERHEAD

MAX_BODY = 10_000


class GateFixture(FileFixture):
    """Alice logged in to safedrop, a bundle of hers, and the site over a small max_body."""

    async def start(self, test: TestCase, db_url: str | None = None,
                    max_body: int = MAX_BODY, web: dict[str, Any] | None = None,
                    **safedrop: Any) -> None:
        data_dir = Path(test.mktemp())
        config = Config(data_dir=data_dir, session_token_ttl=3600, http_max_body=max_body,
                        sections={"safedrop": {"max_file_size": 200_000, **safedrop},
                                  "web": web or {}})
        self.web = Web.build(config)
        self.data_dir = data_dir
        self.alice = await self.web.user("alice")
        self.key = await self.web.credential(self.alice)
        self.token = await self.login("alice@example.test", self.key)
        self.site = MailcoreSite(self.web.root, self.web.root.settings, self.web.clock)


class UploadGateTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = GateFixture()
        await self.f.start(self)
        self.bundle_id = await self.f.bundle()
        self.path = f"/dropbundles/{self.bundle_id}/dropfiles".encode()
        self.body = multipart_file("big.bin", b"b" * 50_000)
        self.transport = StringTransport()
        self.channel = self.f.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def head(self, headers: dict[str, str], length: int | None = None) -> bytes:
        lines = [f"POST {self.path.decode()} HTTP/1.1", "Host: x",
                 f"Content-Type: {MULTIPART['Content-Type']}",
                 f"Content-Length: {len(self.body) if length is None else length}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def request(self) -> Any:
        return self.channel.requests[-1]

    async def reply(self) -> bytes:
        """What the site wrote, once the request in progress is answered."""
        if self.channel.requests:
            await self.request().notifyFinish()
        return bytes(self.transport.value())

    async def test_an_upload_without_a_credential_is_answered_before_its_body(self) -> None:
        self.channel.dataReceived(self.head({}) + self.body[:4000])
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 401 "), sent[:80])
        self.assertIn(b"Connection: close", sent)
        self.assertIn(b'WWW-Authenticate: X-Auth-Token realm="safedrop"', sent)  # RFC 9110
        self.assertEqual(self.f.file_rows(), [])
        self.assertTrue(self.transport.disconnecting)  # the rest is never read
        self.assertEqual(self.f.stored(), [])

    async def test_a_bad_or_foreign_credential_is_refused_alike(self) -> None:
        mail_key = await self.f.web.credential(self.f.alice, "token")
        for headers in ({"X-Auth-Token": "0" * 40}, {"X-Auth-Token": "\u00e9"},
                        {"Auth-Key": mail_key}, {"Authorization": f"Token {mail_key}"}):
            transport = StringTransport()
            channel = self.f.site.buildProtocol(None)
            channel.makeConnection(transport)
            self.addCleanup(channel.connectionLost, None)
            channel.dataReceived(self.head(headers) + self.body[:100])
            if channel.requests:
                await channel.requests[-1].notifyFinish()
            sent = bytes(transport.value())
            self.assertTrue(sent.startswith(b"HTTP/1.1 401 "), (headers, sent[:80]))
        self.assertEqual(self.f.file_rows(), [])

    async def test_the_owner_of_a_token_uploads_through_the_gate(self) -> None:
        self.channel.dataReceived(self.head({"X-Auth-Token": self.f.token}) + self.body[:4000])
        self.channel.dataReceived(self.body[4000:])
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 "), sent[:200])
        [row] = self.f.file_rows()
        self.assertEqual(row.name, "big.bin")

    async def test_a_coded_upload_is_answered_before_its_body(self) -> None:
        """A body with a transforming Content-Encoding is refused once read
        (web.parsing.body_file); the gate refuses it before, with the same reply (safedrop
        answers a body it cannot read with 400), instead of reading up to max_file_size of
        it to disk first. An anonymous one still gets its 401."""
        headers = {"X-Auth-Token": self.f.token, "Content-Encoding": "gzip"}
        self.channel.dataReceived(self.head(headers) + self.body[:4000])  # of 50,000
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 400 "), sent[:200])
        self.assertIn(b'Content-Encoding \\"gzip\\" is not supported', sent)
        self.assertIn(b"Accept-Encoding: identity", sent)
        self.assertTrue(self.transport.disconnecting)  # the rest is never read
        self.assertEqual(self.f.file_rows(), [])
        transport = StringTransport()
        channel = self.f.site.buildProtocol(None)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(self.head({"Content-Encoding": "gzip"}) + self.body[:100])
        if channel.requests:
            await channel.requests[-1].notifyFinish()
        self.assertTrue(bytes(transport.value()).startswith(b"HTTP/1.1 401 "))

    async def test_while_the_gate_decides_nothing_is_read(self) -> None:
        asked: list[defer.Deferred[bool]] = []

        def gate(request: Any) -> defer.Deferred[bool]:
            self.assertEqual(request.uri, self.path)
            asked.append(defer.Deferred())
            return asked[-1]

        self.f.site.upload_gate = gate
        self.channel.dataReceived(self.head({"X-Auth-Token": self.f.token}) + self.body[:4000])
        self.assertEqual(len(asked), 1)
        self.assertEqual(self.transport.producerState, "paused")
        self.channel.dataReceived(self.body[4000:20_000])  # already in flight
        self.assertEqual(self.request().content.tell(), 0)
        asked[0].callback(True)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.request().content.tell(), 20_000)  # what waited is read
        self.channel.dataReceived(self.body[20_000:])
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 "), sent[:200])
        self.assertEqual([r.name for r in self.f.file_rows()], ["big.bin"])

    async def test_a_failing_gate_reads_no_body(self) -> None:
        def gate(request: Any) -> defer.Deferred[bool]:
            return defer.fail(RuntimeError("the store is gone"))

        self.f.site.upload_gate = gate
        self.channel.dataReceived(self.head({"X-Auth-Token": self.f.token}) + self.body[:4000])
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 400 "), sent[:200])
        self.assertEqual(self.f.file_rows(), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_body_within_max_body_is_not_held(self) -> None:
        asked: list[Any] = []

        def gate(request: Any) -> defer.Deferred[bool]:
            asked.append(request)
            return defer.succeed(True)

        self.f.site.upload_gate = gate
        small = multipart_file("small.bin", b"s" * 100)
        self.body = small
        self.channel.dataReceived(self.head({"X-Auth-Token": self.f.token}) + small)
        sent = await self.reply()
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 "), sent[:200])
        self.assertEqual(asked, [])


class OverJsonMaxBodyTests(TestCase):
    """A body within `[web] max_body` but over `json_max_body` (every other path's limit)
    is gated too: an anonymous client or a bad credential gets its 401 before any of the
    body is read. The gate only reached bodies over max_body (25 MiB by default), so anyone
    could make the daemon take 25 MiB before answering 401."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = GateFixture()
        await self.f.start(self, max_body=100_000, web={"json_max_body": 5_000},
                           max_concurrent_uploads=1)
        self.bundle_id = await self.f.bundle()
        self.body = multipart_file("mid.bin", b"m" * 50_000)  # 5,000 < it < 100,000
        self.mail_key = await self.f.web.credential(self.f.alice, "token")
        self.resolved: list[str] = []
        identity = self.f.web.core.identity
        resolve = identity.resolve

        async def counted(secret: str, kinds: tuple[str, ...]) -> Any:
            self.resolved.append(secret)
            return await resolve(secret, kinds)

        identity.resolve = counted  # type: ignore[method-assign]
        self.lookups: list[str] = []  # the credential lookups that reached SQL
        db = self.f.web.core.db
        read = db.read

        def recorded(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "resolve_credential":
                self.lookups.append(name)
            return read(name, *args, **kwargs)

        db.read = recorded  # type: ignore[method-assign]

    async def send(self, path: str, headers: dict[str, str]) -> tuple[bytes, Any, Any]:
        """The head of an upload and 4000 bytes of its body; the reply, request, transport
        (the reply is awaited only once the request is held or answered: on the old code
        it waited for the rest of the body)."""
        transport = StringTransport()
        channel = self.f.site.buildProtocol(None)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        lines = [f"POST {path} HTTP/1.1", "Host: x",
                 f"Content-Type: {MULTIPART['Content-Type']}",
                 f"Content-Length: {len(self.body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body[:4000])
        request = channel.requests[-1] if channel.requests else None
        if request is not None:
            self.assertEqual(request._received, 0)  # nothing of the body read yet
            if not request.finished:
                await request.notifyFinish()
        return bytes(transport.value()), request, (channel, transport)

    async def test_no_or_a_bad_credential_is_a_401_before_the_body(self) -> None:
        upload = f"/dropbundles/{self.bundle_id}/dropfiles"
        for path, headers in ((upload, {}), (upload, {"X-Auth-Token": "0" * 40}),
                              (upload, {"Auth-Key": self.mail_key}),
                              ("/api/v1/mail/", {}), ("/api/v1/mail/", {"Auth-Key": "0" * 40}),
                              ("/api/v1/mail/", {"X-Auth-Token": self.f.token})):
            sent, _, (_, transport) = await self.send(path, headers)
            self.assertTrue(sent.startswith(b"HTTP/1.1 401 "), (path, headers, sent[:80]))
            self.assertIn(b"Connection: close", sent)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.f.file_rows(), [])
        self.assertEqual(self.f.stored(), [])
        # Each bad secret was looked up once, though the gate and the API both asked.
        self.assertEqual(sorted(self.resolved), sorted(["0" * 40, "0" * 40]))

    async def test_the_owner_uploads_and_the_token_is_looked_up_from_memory(self) -> None:
        for _ in range(2):  # (the second within max_concurrent_uploads: the first ended)
            transport = StringTransport()
            channel = self.f.site.buildProtocol(None)
            channel.makeConnection(transport)
            self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
            lines = [f"POST /dropbundles/{self.bundle_id}/dropfiles HTTP/1.1", "Host: x",
                     f"Content-Type: {MULTIPART['Content-Type']}",
                     f"Content-Length: {len(self.body)}", f"X-Auth-Token: {self.f.token}"]
            channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body)
            if channel.requests:
                await channel.requests[-1].notifyFinish()
            sent = bytes(transport.value())
            self.assertTrue(sent.startswith(b"HTTP/1.1 200 "), sent[:200])
        self.assertEqual([r.name for r in self.f.file_rows()], ["mid.bin", "mid.bin"])
        self.assertEqual(len(self.f.stored()), 1)  # (stored once by content)
        # The gate's check and the API's: the token came from memory after its first use.
        self.assertEqual(self.resolved, [self.f.token] * 4)
        self.assertLessEqual(len(self.lookups), 1)


class RefusedBeforeTheBodyTests(TestCase):
    """What the API would refuse after reading an upload is refused before: another user's
    bundle, a sent one, no room for the declared length, too many uploads under way. The
    reply is the API's own; no byte of the body is kept and the connection closes."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = GateFixture()
        await self.f.start(self, max_bundle_size=150_000, max_concurrent_uploads=1)
        self.bundle_id = await self.f.bundle()
        self.body = multipart_file("big.bin", b"b" * 50_000)
        self.made: list[Any] = []
        factory = self.f.site.requestFactory

        def made(*args: Any, **kwargs: Any) -> Any:
            self.made.append(factory(*args, **kwargs))
            return self.made[-1]

        self.f.site.requestFactory = made  # type: ignore[assignment]

    def connect(self, close: bool = True) -> tuple[Any, StringTransport]:
        transport = StringTransport()
        channel = self.f.site.buildProtocol(None)
        channel.makeConnection(transport)
        if close:
            self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel, transport

    def head(self, bundle_id: int, token: str, length: int) -> bytes:
        lines = [f"POST /dropbundles/{bundle_id}/dropfiles HTTP/1.1", "Host: x",
                 f"Content-Type: {MULTIPART['Content-Type']}", f"Content-Length: {length}",
                 f"X-Auth-Token: {token}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def send(self, bundle_id: int, token: str | None = None,
                   length: int | None = None) -> tuple[bytes, Any, StringTransport]:
        """The head of an upload and 4000 bytes of its body; the reply, request, transport."""
        channel, transport = self.connect()
        head = self.head(bundle_id, token or self.f.token,
                         len(self.body) if length is None else length)
        channel.dataReceived(head + self.body[:4000])
        request = self.made[-1]
        if transport.value() and not request.finished:
            await request.notifyFinish()
        return bytes(transport.value()), request, transport

    def assertUnread(self, sent: bytes, status: bytes, request: Any,
                     transport: StringTransport) -> dict[str, Any]:
        self.assertTrue(sent.startswith(b"HTTP/1.1 " + status), sent[:200])
        self.assertIn(b"Connection: close", sent)
        self.assertTrue(request.body_refused)
        self.assertEqual(request._received, 0)  # no byte of the body was stored
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.f.file_rows(), [])
        self.assertEqual(self.f.stored(), [])
        reply: dict[str, Any] = json.loads(sent.split(b"\r\n\r\n", 1)[1])
        return reply

    async def test_another_users_bundle_is_a_404_before_the_body(self) -> None:
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        sent, request, transport = await self.send(self.bundle_id, bob_token)
        reply = self.assertUnread(sent, b"404 ", request, transport)
        self.assertEqual(reply["error"], "Not found.")
        sent, request, transport = await self.send(10**30)  # no such bundle at all
        self.assertUnread(sent, b"404 ", request, transport)

    async def test_a_sent_bundle_is_a_405_before_the_body(self) -> None:
        status, _ = await self.f.upload(self.bundle_id, multipart_file("a", b"a"))
        self.assertEqual(status, 200)
        status, _ = await self.f.form(
            "POST", f"/dropbundles/{self.bundle_id}/dropbundlerecipients",
            "email=ann%40example.org")
        self.assertEqual(status, 200)
        status, _, _ = await self.f.call("GET", f"/dropbundles/{self.bundle_id}?send")
        self.assertEqual(status, 200)
        rows = self.f.file_rows()
        sent, request, transport = await self.send(self.bundle_id)
        self.assertTrue(sent.startswith(b"HTTP/1.1 405 "), sent[:200])
        self.assertIn(b"Allow: GET", sent)
        self.assertEqual(request._received, 0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.f.file_rows(), rows)

    async def test_a_declared_length_beyond_the_room_left_is_a_413_before_the_body(self) -> None:
        # 150,000 bytes a bundle: a body of 1 MiB of framing and 150,000 bytes as base64
        # would send them (its file's own bytes count) and a few more cannot fit.
        sent, request, transport = await self.send(
            self.bundle_id, length=UPLOAD_OVERHEAD + encoded_bound(150_000) + 11)
        reply = self.assertUnread(sent, b"413 ", request, transport)
        self.assertEqual(reply["errors"], {"the_file": [
            "The bundle's files would exceed the total allowed size."]})
        # One that may fit is read, and refused only if it does not.
        sent, _, _ = await self.send(self.bundle_id,
                                     length=UPLOAD_OVERHEAD + encoded_bound(150_000))
        self.assertEqual(sent, b"")  # let in: waiting for the rest of its body

    async def test_a_user_has_max_concurrent_uploads_under_way(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(self.head(self.bundle_id, self.f.token, len(self.body))
                             + self.body[:4000])
        first = self.made[-1]
        self.assertFalse(first.finished)  # let in, its body on its way
        sent, request, other = await self.send(self.bundle_id)
        reply = self.assertUnread(sent, b"429 ", request, other)
        self.assertIn(b"Retry-After: 10", sent)
        self.assertIn("1 uploads under way", reply["error"])
        # A body within max_body is not held before it is read, but counts all the same.
        status, small = await self.f.upload(self.bundle_id, multipart_file("s", b"s"))
        self.assertEqual((status, small["error"]), (429, reply["error"]))
        # Another user is not held up by alice's uploads.
        bob = await self.f.web.user("bob")
        bob_token = await self.f.login("bob@example.test", await self.f.web.credential(bob))
        bob_bundle = await self.f.bundle()
        sent, _, _ = await self.send(bob_bundle, bob_token)
        self.assertTrue(sent.startswith(b"HTTP/1.1 404 "), sent[:80])  # not 429: not hers
        # Once the first one ends, the slot is free again.
        channel.dataReceived(self.body[4000:])  # the file is stored at once (no threads)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:80])
        channel, transport = self.connect()
        channel.dataReceived(self.head(self.bundle_id, self.f.token, len(self.body))
                             + self.body)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:80])
        self.assertEqual(len(self.f.file_rows()), 2)

    async def test_a_dropped_connection_gives_its_slot_back(self) -> None:
        channel, _ = self.connect(close=False)
        channel.dataReceived(self.head(self.bundle_id, self.f.token, len(self.body))
                             + self.body[:4000])
        channel.connectionLost(Failure(ConnectionDone()))
        sent, _, _ = await self.send(self.bundle_id)
        self.assertEqual(sent, b"")  # let in


class EncodedUploadTests(TestCase):
    """A file sent base64 (a part's Content-Transfer-Encoding) is held to the limits by its
    own bytes before its body is read as after: the path's body limit and the gate's room
    check counted the encoded bytes, 4/3 of the file and its line breaks, so a file within
    max_file_size or the bundle's room was refused 413 before it was read."""

    LIMIT = 3 * 1024 * 1024  # as base64, 4.1 MiB: over the 1 MiB of framing it had

    async def start(self, **safedrop: Any) -> GateFixture:
        f = GateFixture()
        await f.start(self, **safedrop)
        return f

    def body(self, payload: bytes) -> bytes:
        encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        return (b'--def46f21fc67\r\ncontent-disposition: form-data; name="the_file"; '
                b'filename="b.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
                + encoded + b"\r\n--def46f21fc67--\r\n")

    async def send(self, f: GateFixture, bundle_id: int, payload: bytes) -> tuple[int, Any]:
        """The whole upload through the site's channel: the status and the reply."""
        body = self.body(payload)
        self.assertGreater(len(body), len(payload) + UPLOAD_OVERHEAD)
        transport = StringTransport()
        channel = f.site.buildProtocol(None)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        lines = [f"POST /dropbundles/{bundle_id}/dropfiles HTTP/1.1", "Host: x",
                 f"Content-Type: {MULTIPART['Content-Type']}",
                 f"Content-Length: {len(body)}", f"X-Auth-Token: {f.token}"]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        if channel.requests and not channel.requests[-1].finished:
            await channel.requests[-1].notifyFinish()
        sent = bytes(transport.value())
        head, _, reply = sent.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(reply)

    async def test_a_base64_file_of_max_file_size_is_taken_one_byte_more_refused(
            self) -> None:
        f = await self.start(max_file_size=self.LIMIT)
        bundle_id = await f.bundle()
        payload = bytes(range(256)) * (self.LIMIT // 256)
        status, reply = await self.send(f, bundle_id, payload)
        self.assertEqual(status, 200, reply)  # was 413: "Request body too large"
        [row] = f.file_rows()
        self.assertEqual(row.size, self.LIMIT)
        status, reply = await self.send(f, bundle_id, payload + b"x")
        self.assertEqual((status, reply["errors"]), (413, {"the_file": [
            f"The file is larger than {self.LIMIT} bytes."]}))
        self.assertEqual(len(f.file_rows()), 1)

    async def test_a_base64_file_filling_the_room_left_is_let_in_and_counted_decoded(
            self) -> None:
        f = await self.start(max_file_size=2 * self.LIMIT, max_bundle_size=self.LIMIT + 10)
        bundle_id = await f.bundle()
        payload = bytes(range(256)) * (self.LIMIT // 256)
        status, reply = await self.send(f, bundle_id, payload + b"0123456789x")
        self.assertEqual((status, reply["errors"]), (413, {"the_file": [
            "The bundle's files would exceed the total allowed size."]}))
        status, reply = await self.send(f, bundle_id, payload)
        self.assertEqual(status, 200, reply)  # was 413 at the gate: no room for 4.1 MiB
        # The bundle holds the file's own bytes: 10 more fit, 11 do not.
        status, _ = await f.upload(bundle_id, multipart_file("c", b"0123456789x"))
        self.assertEqual(status, 413)
        status, _ = await f.upload(bundle_id, multipart_file("c", b"0123456789"))
        self.assertEqual(status, 200)
        self.assertEqual([r.size for r in f.file_rows()], [self.LIMIT, 10])


class GateFunctionTests(TestCase):
    async def test_only_the_credential_of_the_paths_api_opens_it(self) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        f = GateFixture()
        await f.start(self)
        paths = upload_paths(f.web.core, f.web.root.apps)
        gate = upload_gate(CredentialResolver(f.web.core.identity),
                           [(path, policy, None) for path, _, policy, _ in paths],
                           f.web.clock, 120)
        mail_key = await f.web.credential(f.alice, "token")

        async def ask(uri: bytes, headers: dict[str, str]) -> bool:
            request: Any = DummyRequest([b""])
            request.uri = uri
            for name, value in headers.items():
                request.requestHeaders.addRawHeader(name.encode(), value.encode())
            return await gate(request)

        self.assertTrue(await ask(b"/dropbundles/1/dropfiles", {"X-Auth-Token": f.token}))
        self.assertTrue(await ask(b"/dropbundles/1/dropfiles/", {"Auth-Token": f.token}))
        self.assertFalse(await ask(b"/dropbundles/1/dropfiles", {}))
        self.assertFalse(await ask(b"/dropbundles/1/dropfiles", {"Auth-Key": mail_key}))
        self.assertTrue(await ask(b"/api/v1/mail/", {"Auth-Key": mail_key}))
        self.assertTrue(await ask(b"/api/v1/mail/?auth_key=" + mail_key.encode(), {}))
        self.assertTrue(await ask(b"/api/v1/mail/abc", {"Authorization": f"Token {mail_key}"}))
        self.assertFalse(await ask(b"/api/v1/mail/", {"X-Auth-Token": f.token}))
        self.assertFalse(await ask(b"/api/v1/mail/", {"Authorization": "Token"}))
        self.assertFalse(await ask(b"/dropbundles", {"X-Auth-Token": f.token}))


class OverTcpTests(TestCase):
    """A client on a real socket: held while the gate (answering a turn later) decides."""

    async def test_uploads_over_a_socket(self) -> None:
        import treq
        from twisted.internet import task

        from tests.support.browser import serve
        from tests.support.reactor import get_reactor

        f = GateFixture()
        await f.start(self)
        bundle_id = await f.bundle()
        reactor = get_reactor()
        gate = f.site.upload_gate
        assert gate is not None

        async def later(request: Any) -> bool:
            await task.deferLater(reactor, 0)
            return await gate(request)

        f.site.upload_gate = later
        base = serve(self, f.site)
        url = f"{base}/dropbundles/{bundle_id}/dropfiles"
        body = multipart_file("tcp.bin", b"t" * 60_000)
        for headers, expected in (({}, 401), ({"X-Auth-Token": "0" * 40}, 401),
                                  ({"X-Auth-Token": f.token}, 200)):
            sent: dict[bytes | str, bytes | str] = {k: v for k, v in MULTIPART.items()}
            sent.update({k: v for k, v in headers.items()})
            response = await treq.post(url, data=body, persistent=False, headers=sent)
            reply = await response.json()
            self.assertEqual(response.code, expected, (headers, reply))
        self.assertEqual([r.name for r in f.file_rows()], ["tcp.bin"])


class FrozenStoreTests(TestCase):
    """A store that does not answer what the gate asks it (a frozen or hung database): the
    upload is answered at `[web] reply_timeout` with its API's 503 and Retry-After: 30, as
    web.deadline answers a request, its body unread and the gate's wait cancelled. The
    client was held, its connection paused, until `[web] body_timeout` (300 s), then 408."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = GateFixture()
        await self.f.start(self, web={"reply_timeout": 30})
        self.bundle_id = await self.f.bundle()
        self.body = multipart_file("big.bin", b"b" * 50_000)
        self.warnings = logged_at(self, LogLevel.warn)

    def send(self, path: str, headers: dict[str, str]) -> tuple[Any, StringTransport]:
        """The head of an upload over max_body and 4000 bytes of its body."""
        transport = StringTransport()
        channel = self.f.site.buildProtocol(None)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        lines = [f"POST {path} HTTP/1.1", "Host: x",
                 f"Content-Type: {MULTIPART['Content-Type']}",
                 f"Content-Length: {len(self.body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body[:4000])
        return channel.requests[-1], transport

    def assertAnsweredInTime(self, request: Any, transport: StringTransport,
                             store: HungStore) -> dict[str, Any]:
        """Nothing until reply_timeout, then the 503 (the reply's JSON body)."""
        self.assertTrue(store.held)  # the gate waits on the store
        self.f.web.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")  # the body is not read
        self.f.web.clock.advance(1)
        sent = bytes(transport.value())
        self.assertTrue(sent.startswith(b"HTTP/1.1 503 "), sent[:200])
        self.assertIn(b"\r\nRetry-After: 30\r\n", sent)
        self.assertIn(b"\r\nConnection: close\r\n", sent)
        self.assertTrue(request.body_refused)
        self.assertEqual(request._received, 0)  # no byte of the body was stored
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.warnings[-1],
                         "answering 503 while the database did not answer in time")
        reply: dict[str, Any] = json.loads(sent.split(b"\r\n\r\n", 1)[1])
        return reply

    async def test_a_credential_lookup_that_is_not_answered_is_a_503(self) -> None:
        mail_key = await self.f.web.credential(self.f.alice, "token")
        self.f.web.clock.advance(RESOLVED_TTL)  # the token is looked up in the store again
        store = HungStore(self.f.web.core.db, only="resolve_credential")
        request, transport = self.send(f"/dropbundles/{self.bundle_id}/dropfiles",
                                       {"X-Auth-Token": self.f.token})
        reply = self.assertAnsweredInTime(request, transport, store)
        self.assertEqual(reply["error"],
                         "Try again later: the database did not answer in time.")
        request, transport = self.send("/api/v1/mail/", {"Auth-Key": mail_key})
        reply = self.assertAnsweredInTime(request, transport, store)
        self.assertEqual(reply["message"],
                         "Try again later: the database did not answer in time.")
        store.release()  # the lookups answer late: nothing more is written
        self.assertTrue(transport.value().endswith(b"}"))
        self.assertEqual(self.f.file_rows(), [])
        self.assertEqual(self.f.stored(), [])

    async def test_an_admission_that_is_not_answered_is_a_503(self) -> None:
        # The token is resolved (and remembered) first: the gate then waits on the bundle.
        status, _, _ = await self.f.call("GET", f"/dropbundles/{self.bundle_id}")
        self.assertEqual(status, 200)
        store = HungStore(self.f.web.core.db)
        request, transport = self.send(f"/dropbundles/{self.bundle_id}/dropfiles",
                                       {"X-Auth-Token": self.f.token})
        self.assertTrue(request.over_max_body)
        reply = self.assertAnsweredInTime(request, transport, store)
        self.assertEqual(reply["error"],
                         "Try again later: the database did not answer in time.")
        store.release()
        self.assertEqual(self.f.file_rows(), [])

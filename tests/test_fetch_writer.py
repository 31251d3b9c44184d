"""The mailbox writer against a real Dovecot: folders, byte-exact appends, find, pipelining.

Each test takes a fresh Dovecot user, writes with `open_writer` (STARTTLS, the test CA
trusted, like a sync) and reads back with a plain IMAP session (`open_session`, names
encoded by Twisted's own codec) and with `doveadm`, so the writer is checked by code that
is not its own. Pipelining is shown on the wire: a recording transport logs what the
writer sends and receives, and the tests count APPEND commands in flight and "+"
continuations (round trips), never time. A second Dovecot offers neither LITERAL+ nor
MULTIAPPEND (its `imap_capability`), and has a 1 MiB quota, for the fallbacks and
[OVERQUOTA].
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import TestCase

from mailcore.fetch.errors import AuthFailed, ConnectFailed, TLSFailed
from mailcore.fetch.imap import IMAPClient, ServerSpec, open_session
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.tls import client_tls
from mailcore.fetch.writer import (
    HASH_INLINE,
    Append,
    MailboxWriter,
    Streamed,
    WriterSession,
    open_writer,
)
from mailcore.workers import CpuPool
from tests.support.dovecot import DovecotClassMixin, DovecotServer
from tests.support.reactor import get_reactor

UTC = datetime.UTC
P = ParamSpec("P")
T = TypeVar("T")
SETTINGS = FetchSettings(allow_loopback=True)


def spec_for(server: DovecotServer) -> ServerSpec:
    return ServerSpec(host="localhost", port=server.imap, use_ssl=False, start_tls=True,
                      allow_cleartext=False, username="", password="")


async def writer_for_user(server: DovecotServer, user: str, **kw: Any) -> MailboxWriter:
    return await open_writer(
        get_reactor(), spec_for(server), user, server.PASSWORD,
        tls=client_tls("localhost", ca_pem=server.pki.ca_pem.decode()), settings=SETTINGS,
        **kw,
    )


async def reader_for(server: DovecotServer, user: str) -> IMAPClient:
    spec = spec_for(server)
    spec = ServerSpec(**{**spec.__dict__, "username": user, "password": server.PASSWORD})
    return await open_session(
        get_reactor(), spec, client_tls("localhost", ca_pem=server.pki.ca_pem.decode()),
        policy=SETTINGS.address_policy(),
    )


async def read_folder(server: DovecotServer, user: str, name: str) -> tuple[int, list[Any]]:
    """(UIDVALIDITY, FETCH items in UID order) of a folder, by a plain session."""
    reader = await reader_for(server, user)
    try:
        info = await reader.examine(name)
        items = await reader.uid_fetch(b"1:*", b"UID FLAGS INTERNALDATE BODY.PEEK[]")
    finally:
        await reader.close_session()
    assert info.uidvalidity is not None
    return info.uidvalidity, sorted(items, key=lambda i: i.uid or 0)


class RecordingPool(CpuPool):
    """The real CPU thread pool, recording what it ran: each function's name, and whether
    it ran on the reactor's thread."""

    def __init__(self) -> None:
        super().__init__(get_reactor(), max_threads=1)
        self.ran: list[tuple[str, bool]] = []

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        def recorded(*args: P.args, **kwargs: P.kwargs) -> T:
            self.ran.append((fn.__name__, isInIOThread()))
            return fn(*args, **kwargs)

        return super().run(recorded, *args, **kwargs)


class Recorder:
    """Logs what a session writes and receives (the wire, above TLS)."""

    _APPEND = re.compile(rb"(?:^|\r\n)([0-9A-F]{4,}) APPEND ")
    _TAGGED = re.compile(rb"([0-9A-F]{4,}) (?:OK|NO|BAD)\b")

    def __init__(self, session: WriterSession) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.real = session.transport
        session.transport = self  # type: ignore[assignment]
        original = session.dataReceived

        def received(data: bytes) -> None:
            self.events.append(("r", data))
            original(data)

        session.dataReceived = received  # type: ignore[method-assign]

    def write(self, data: bytes) -> None:
        self.events.append(("w", data))
        self.real.write(data)  # type: ignore[union-attr]

    def writeSequence(self, seq: list[bytes]) -> None:
        for data in seq:
            self.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def analyse(self) -> dict[str, int]:
        """APPEND commands sent, the most in flight at once, "+" continuations received,
        and APPENDs sent after the first tagged APPEND reply came back."""
        outstanding: set[bytes] = set()
        sent = most = continuations = after_first_reply = 0
        replied = False
        pending = b""
        for kind, data in self.events:
            if kind == "w":
                tags = self._APPEND.findall(data)
                sent += len(tags)
                if replied:
                    after_first_reply += len(tags)
                outstanding.update(tags)
                most = max(most, len(outstanding))
            else:
                # A reply may arrive cut across reads: count whole lines only.
                pending += data
                lines = pending.split(b"\r\n")
                pending = lines.pop()
                for line in lines:
                    if line.startswith(b"+ "):
                        continuations += 1
                    elif m := self._TAGGED.match(line):
                        if m.group(1) in outstanding:
                            outstanding.discard(m.group(1))
                            replied = True
        return {"sent": sent, "max_in_flight": most, "continuations": continuations,
                "after_first_reply": after_first_reply}


def message(n: int, *, message_id: bool = True, size: int = 600) -> bytes:
    head = (
        (f"Message-ID: <writer-{n}@example.test>\r\n" if message_id else "")
        + f"From: Jürgen <j{n}@example.test>\r\nSubject: =?utf-8?q?R=C3=A9union?= {n}\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    ).encode()
    body = b"D\xe9j\xe0 vu " + str(n).encode() + b"\r\n"
    body += b"line with a lone dot follows\r\n.\r\n"
    filler = b"".join(b"filler %d %d\r\n" % (n, i) for i in range(size // 14))
    return head + body + filler


def when(n: int) -> datetime.datetime:
    tz = datetime.timezone(datetime.timedelta(hours=(n % 5) - 2))
    return datetime.datetime(2021, 1 + n % 12, 1 + n % 28, n % 24, n % 60, n % 60, tzinfo=tz)


FLAG_SETS: list[tuple[str, ...]] = [
    ("\\Seen",), ("\\Seen", "$Forwarded"), (), ("\\Flagged", "\\Answered", "\\Recent"),
    ("\\Draft", "Junk-Label"),
]


def items(start: int, count: int, **kw: Any) -> list[Append]:
    return [Append(message(n, **kw), FLAG_SETS[n % len(FLAG_SETS)], when(n))
            for n in range(start, start + count)]


class WriterDovecotTests(DovecotClassMixin, TestCase):
    timeout = 120

    async def setup(self) -> tuple[DovecotServer, str, MailboxWriter]:
        server = await self.dovecot()
        user = server.new_user()
        writer = await writer_for_user(server, user)
        self.addCleanup(writer.logout)
        return server, user, writer

    async def test_login_is_checked_like_a_sync(self) -> None:
        server = await self.dovecot()
        user = server.new_user()
        ca = server.pki.ca_pem.decode()
        wrong_name = ServerSpec(host="127.0.0.1", port=server.imap, use_ssl=False,
                                start_tls=True, allow_cleartext=False, username="", password="")
        # The certificate names localhost only.
        with self.assertRaises(TLSFailed):
            await open_writer(get_reactor(), wrong_name, user, server.PASSWORD,
                              tls=client_tls("127.0.0.1", ca_pem=ca), settings=SETTINGS)
        with self.assertRaises(AuthFailed):
            await open_writer(get_reactor(), spec_for(server), user, "wrong",
                              tls=client_tls("localhost", ca_pem=ca), settings=SETTINGS)
        # The default address policy refuses loopback, as for a sync.
        with self.assertRaises(ConnectFailed):
            await open_writer(get_reactor(), spec_for(server), user, server.PASSWORD,
                              tls=client_tls("localhost", ca_pem=ca))

    async def test_nested_non_ascii_folders(self) -> None:
        server, user, writer = await self.setup()
        self.assertEqual(writer.separator, "/")
        self.assertIn("LITERAL+", writer.capabilities)
        paths = [("Archiv", "Größe 2024", "日本語"), ("Projekte", "Ωmega & Co"),
                 ("inbox", "Sub"), ("a/b",), ("Emoji 😀",)]
        for path in paths:
            await writer.ensure_folder(path)
            await writer.ensure_folder(path)  # idempotent
        listed = server.doveadm_run("mailbox", "list", "-u", user).split("\n")
        for name in ("Archiv", "Archiv/Größe 2024", "Archiv/Größe 2024/日本語",
                     "Projekte/Ωmega & Co", "INBOX/Sub", "a\u2215b", "Emoji 😀"):
            self.assertIn(name, listed)
        subscribed = server.doveadm_run("mailbox", "list", "-s", "-u", user).split("\n")
        self.assertIn("Archiv/Größe 2024/日本語", subscribed)
        folders = await writer.folders()
        for path in (("Archiv", "Größe 2024", "日本語"), ("Projekte", "Ωmega & Co"),
                     ("INBOX", "Sub"), ("a\u2215b",), ("INBOX",), ("Emoji 😀",)):
            self.assertIn(path, folders)

    async def test_append_is_byte_exact_with_flags_dates_and_appenduid(self) -> None:
        server, user, writer = await self.setup()
        path = ("Archiv", "Größe 2024", "日本語")
        batch = [*items(0, 25), Append(b"Subject: tiny\r\n\r\n.\r\n", (), None)]
        await writer.ensure_folder(path)
        results = await writer.append(path, batch)
        self.assertTrue(all(r.ok for r in results), results)
        uidvalidity, fetched = await read_folder(server, user, "Archiv/Größe 2024/日本語")
        self.assertEqual([r.uid for r in results], [f.uid for f in fetched])
        self.assertEqual({r.uidvalidity for r in results}, {uidvalidity})
        for item, got in zip(batch, fetched, strict=True):
            self.assertEqual(got.body, item.data)
            want_flags = {f for f in item.flags if f != "\\Recent"}
            self.assertEqual(set(got.flags or ()), want_flags)
            if item.internaldate is not None:
                self.assertEqual(got.internal_date, item.internaldate)

    async def test_large_message_streamed_is_byte_exact(self) -> None:
        server, user, writer = await self.setup()
        head = message(1)
        # Every printable byte, 8-bit ones too, in CRLF lines (NUL and bare LF are not what
        # IMAP gives back byte-exact).
        unit = bytes(range(32, 256)) + b"\r\n"
        big = head + unit * ((20 * 1024 * 1024) // len(unit))
        asked: list[int] = []

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(big), 1024 * 1024):
                asked.append(at)
                yield big[at:at + 1024 * 1024]

        streamed = Append(b"", ("\\Seen",), when(7), stream=Streamed(len(big), chunks))
        batch = [*items(0, 3), streamed, *items(3, 2)]
        results = await writer.append(("INBOX",), batch)
        self.assertTrue(all(r.ok and r.uid for r in results), results)
        self.assertEqual(len(asked), 21)
        self.assertEqual(writer.session.streamed_chunks, 21)
        # The transport's buffer filled and held the chunks back (backpressure).
        self.assertGreater(writer.session.stream_pauses, 0)
        _, fetched = await read_folder(server, user, "INBOX")
        self.assertEqual([f.uid for f in fetched], [r.uid for r in results])
        self.assertEqual(hashlib.sha256(fetched[3].body).hexdigest(),
                         hashlib.sha256(big).hexdigest())
        self.assertEqual(fetched[3].internal_date, when(7))
        self.assertEqual([f.body for f in fetched[:3] + fetched[4:]],
                         [i.data for i in batch[:3] + batch[4:]])
        # `find` knows it by what it needs only: size, date, Message-ID, hash.
        uid = await writer.find(("INBOX",), message_id=None, size=len(big),
                                internaldate=when(7), sha256=hashlib.sha256(big).hexdigest())
        self.assertEqual(uid, results[3].uid)

    async def test_missing_folder_is_created_on_trycreate(self) -> None:
        server, user, writer = await self.setup()
        results = await writer.append(("Neu", "Ünter"), items(0, 3))
        self.assertTrue(all(r.ok for r in results), results)
        _, fetched = await read_folder(server, user, "Neu/Ünter")
        self.assertEqual(len(fetched), 3)

    async def test_find_with_and_without_message_id(self) -> None:
        _server, _user, writer = await self.setup()
        path = ("Suche",)
        with_id = items(0, 5)
        without_id = items(5, 5, message_id=False)
        await writer.ensure_folder(path)
        results = await writer.append(path, with_id + without_id)
        for item, result, mid in zip(
            with_id + without_id, results,
            [f"<writer-{n}@example.test>" for n in range(5)] + [None] * 5, strict=True,
        ):
            uid = await writer.find(
                path, message_id=mid, size=len(item.data), internaldate=item.internaldate,
                sha256=hashlib.sha256(item.data).hexdigest(),
            )
            self.assertEqual(uid, result.uid)
            # Already accounted for: not found again.
            self.assertIsNone(await writer.find(
                path, message_id=mid, size=len(item.data), internaldate=item.internaldate,
                sha256=hashlib.sha256(item.data).hexdigest(), exclude={result.uid or 0},
            ))
        other = message(99, message_id=False)
        self.assertIsNone(await writer.find(
            path, message_id=None, size=len(other), internaldate=when(99),
            sha256=hashlib.sha256(other).hexdigest()))
        # Same size and date as a stored message, different bytes: the hash tells.
        twin = bytearray(without_id[0].data)
        twin[-3:-2] = b"#"
        self.assertIsNone(await writer.find(
            path, message_id=None, size=len(twin), internaldate=without_id[0].internaldate,
            sha256=hashlib.sha256(bytes(twin)).hexdigest()))
        # A Message-ID that is there, with another size: not this message.
        self.assertIsNone(await writer.find(
            path, message_id="<writer-0@example.test>", size=len(with_id[0].data) + 1,
            internaldate=None, sha256=""))
        self.assertIsNone(await writer.find(
            ("Nirgendwo",), message_id="<writer-0@example.test>", size=1, internaldate=None,
            sha256=""))

    async def test_find_hashes_a_large_body_on_the_cpu_pool(self) -> None:
        """The body `find` compares by its SHA-256 was hashed on the reactor whatever its
        size (64 MiB, the largest fetched: some 160 ms of it); one over HASH_INLINE is
        hashed on a thread of the CPU pool now, a small one still inline."""
        server = await self.dovecot()
        user = server.new_user()
        pool = RecordingPool()
        self.addCleanup(pool.stop)
        writer = await writer_for_user(server, user, cpu=pool)
        self.addCleanup(writer.logout)
        large = Append(message(1, message_id=False, size=HASH_INLINE + 4096), (), when(1))
        small = Append(message(2, message_id=False), (), when(2))
        results = await writer.append(("INBOX",), [large, small])
        self.assertTrue(all(r.ok and r.uid for r in results), results)
        for item, result in zip((large, small), results, strict=True):
            uid = await writer.find(("INBOX",), message_id=None, size=len(item.data),
                                    internaldate=item.internaldate,
                                    sha256=hashlib.sha256(item.data).hexdigest())
            self.assertEqual(uid, result.uid)
        self.assertGreater(len(large.data), HASH_INLINE)
        self.assertEqual(pool.ran, [("_sha256_hex", False)])  # the large one, off the reactor

    async def test_batches_of_hundreds_are_pipelined(self) -> None:
        server, user, writer = await self.setup()
        await writer.ensure_folder(("Bulk",))
        recorder = Recorder(writer.session)
        batch = items(0, 400, size=300)
        results = await writer.append(("Bulk",), batch)
        self.assertEqual(len({r.uid for r in results}), 400)
        stats = recorder.analyse()
        # MULTIAPPEND groups of 64 with LITERAL+: 7 commands, all sent before any reply,
        # no continuation round trip.
        self.assertEqual(stats["sent"], 7)
        self.assertEqual(stats["max_in_flight"], 7)
        self.assertEqual(stats["continuations"], 0)
        self.assertEqual(stats["after_first_reply"], 0)
        _, fetched = await read_folder(server, user, "Bulk")
        self.assertEqual([f.body for f in fetched], [i.data for i in batch])
        self.assertEqual([f.uid for f in fetched], [r.uid for r in results])

    async def test_single_appends_are_pipelined_up_to_the_window(self) -> None:
        server, user, _ = await self.setup()
        writer = await writer_for_user(server, user, group_messages=1, window=100)
        self.addCleanup(writer.logout)
        recorder = Recorder(writer.session)
        batch = items(0, 300, size=200)
        results = await writer.append(("INBOX",), batch)
        self.assertTrue(all(r.ok and r.uid for r in results))
        stats = recorder.analyse()
        self.assertEqual(stats["sent"], 300)
        self.assertEqual(stats["max_in_flight"], 100)
        self.assertEqual(stats["continuations"], 0)
        _, fetched = await read_folder(server, user, "INBOX")
        self.assertEqual([f.body for f in fetched], [i.data for i in batch])

    async def test_plain_reader_sees_names_encoded_by_twisted(self) -> None:
        # Twisted's encoder (right for names without control characters) reads back what
        # our encoder wrote.
        server, user, writer = await self.setup()
        await writer.append(("Café & Bar", "Ψ"), items(0, 1))
        reader = await reader_for(server, user)
        try:
            info = await reader.examine("Café & Bar/Ψ")
            self.assertEqual(info.exists, 1)
            names = {f.name for f in await reader.list_folders()}
        finally:
            await reader.close_session()
        self.assertIn("Café & Bar/Ψ", names)


# Dovecot 2.3's own list without LITERAL+ and MULTIAPPEND.
_CAPS = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE "
    "UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN "
    "CONTEXT=SEARCH LIST-STATUS BINARY MOVE SPECIAL-USE"
)


class WriterFallbackDovecotTests(DovecotClassMixin, TestCase):
    timeout = 120
    extra_config = f"""
imap_capability = {_CAPS}
mail_plugins = $mail_plugins quota
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=1M
}}
"""

    async def setup(self) -> tuple[DovecotServer, str, MailboxWriter]:
        server = await self.dovecot()
        user = server.new_user()
        writer = await writer_for_user(server, user)
        self.addCleanup(writer.logout)
        return server, user, writer

    async def test_without_literal_plus_or_multiappend(self) -> None:
        server, user, writer = await self.setup()
        self.assertNotIn("LITERAL+", writer.capabilities)
        self.assertNotIn("MULTIAPPEND", writer.capabilities)
        self.assertIn("UIDPLUS", writer.capabilities)
        recorder = Recorder(writer.session)
        batch = items(0, 60, size=400)
        results = await writer.append(("INBOX",), batch)
        self.assertTrue(all(r.ok and r.uid for r in results), results)
        stats = recorder.analyse()
        # One "+" per message, but commands overlap: the next goes out on its "+", not on
        # the previous one's tagged reply.
        self.assertEqual(stats["sent"], 60)
        self.assertEqual(stats["continuations"], 60)
        uidvalidity, fetched = await read_folder(server, user, "INBOX")
        self.assertEqual([f.body for f in fetched], [i.data for i in batch])
        self.assertEqual([f.uid for f in fetched], [r.uid for r in results])
        self.assertEqual({r.uidvalidity for r in results}, {uidvalidity})

    async def test_over_quota_is_not_retryable(self) -> None:
        server, user, writer = await self.setup()
        batch = items(0, 40, size=40_000)   # ~1.6 MB against a 1 MiB quota
        results = await writer.append(("INBOX",), batch)
        stored = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        self.assertTrue(stored and refused)
        self.assertEqual(results[:len(stored)], stored)  # the first ones fit, in order
        for r in refused:
            self.assertFalse(r.retryable)
            self.assertIn("OVERQUOTA", r.reason or "")
        _, fetched = await read_folder(server, user, "INBOX")
        self.assertEqual(len(fetched), len(stored))

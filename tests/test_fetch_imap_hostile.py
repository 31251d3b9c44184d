"""A hostile or broken IMAP server gives a clear error on that account, never a crash.

Regression tests for shared/notes/twisted-pitfalls.md 3, 4 and 7, each failing on stock
`IMAP4Client` behaviour: an announced 4 GB literal is refused before a byte is buffered;
plaintext injected after STARTTLS's OK is discarded and CAPABILITY is asked again over TLS;
malformed replies fail the session with a message; a password never goes out in cleartext
when STARTTLS is missing; credentials are sent as UTF-8 bytes and bodies come back as the
exact bytes. The first group drives the session over a StringTransport; the second runs
the whole engine against a scripted server on a real loopback socket.
"""

from __future__ import annotations

import base64
import resource
from typing import Any

from sqlalchemy import select
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import Account
from mailcore.fetch.errors import FetchError, LiteralTooLarge, ProtocolFailed
from mailcore.fetch.imap import IMAPClient, expand_set, parse_fetch
from mailcore.store.schema import fetch_folders, messages
from tests.support.dovecot import dovecot_pki
from tests.support.fetchenv import FetchEnv, make_env
from tests.support.reactor import get_reactor


class TLSStringTransport(StringTransport):
    """A StringTransport that records a switch to TLS."""

    tls_started = False

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started = True


def connected_client(**kw: Any) -> tuple[IMAPClient, TLSStringTransport]:
    client = IMAPClient(Clock(), host="fake", **kw)
    transport = TLSStringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK fake ready\r\n")
    return client, transport


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addErrback(box.append)
    assert box, "the Deferred did not fail"
    return box[0].value


class SessionUnitTests(TestCase):
    def test_announced_4gb_literal_fails_at_once_without_buffering(self) -> None:
        client, transport = connected_client(max_literal=1024 * 1024)
        d = client.uid_fetch([1], b"UID BODY.PEEK[]")
        client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {4294967296}\r\n" + b"x" * 65536)
        error = failure_of(d)
        self.assertIsInstance(error, LiteralTooLarge)
        self.assertIn("4294967296-byte literal", str(error))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(client._pendingBuffer if hasattr(client, "_pendingBuffer") else None)
        # Nothing more is read: more junk is ignored, nothing is buffered.
        client.dataReceived(b"y" * 65536)
        self.assertEqual(client._buffer, b"")

    def test_bytes_after_starttls_ok_are_discarded_and_capability_asked_again(self) -> None:
        client, transport = connected_client()
        d = defer.Deferred.fromCoroutine(client.starttls(object()))  # type: ignore[arg-type]
        self.assertEqual(transport.value(), b"0001 STARTTLS\r\n")
        transport.clear()
        client.dataReceived(
            b"0001 OK Begin TLS now\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN INJECTED\r\n"
        )
        self.assertTrue(transport.tls_started)
        self.assertEqual(transport.value(), b"0002 CAPABILITY\r\n")
        client.dataReceived(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n0002 OK done\r\n")
        caps = self.successResultOf(d)
        self.assertNotIn("INJECTED", caps)
        self.assertEqual(caps, {"IMAP4REV1", "AUTH=PLAIN"})

    def test_malformed_replies_fail_with_a_clear_error(self) -> None:
        cases = [
            b"* LIST (\\HasNoChildren \"/\" INBOX\r\n0001 OK\r\n",   # unbalanced parens
            b"0001\r\n",                                                # tag alone
            b"9999 OK who are you\r\n",                                 # unknown tag
            b"* 1 FETCH (UID 1 BODY[] {12x}\r\n",                       # bad literal count
        ]
        for data in cases:
            client, transport = connected_client()
            d = defer.Deferred.fromCoroutine(client.list_folders())
            client.dataReceived(data)
            error = failure_of(d)
            self.assertIsInstance(error, ProtocolFailed, data)
            self.assertIn("malformed", str(error))
            self.assertTrue(transport.disconnecting)

    def test_plain_credentials_are_utf8_bytes(self) -> None:
        client, transport = connected_client()
        client.capabilities = {"IMAP4REV1", "AUTH=PLAIN", "SASL-IR"}
        d = defer.Deferred.fromCoroutine(client.authenticate_plain("zoë", "pässwörd✓"))
        line = transport.value().rstrip(b"\r\n")
        token = line.split(b" ")[-1]
        self.assertEqual(base64.b64decode(token), "\0zoë\0pässwörd✓".encode())
        client.dataReceived(b"0001 OK logged in\r\n")
        self.successResultOf(d)

    def test_fetched_body_is_the_exact_bytes(self) -> None:
        raw = b"Subject: \xe9t\xe9\r\n\r\nbody \x00\xff {3}\r\n)(\r\n"
        line = b"1 FETCH (UID 7 FLAGS (\\Seen) RFC822.SIZE %d BODY[] {%d}\r\n%s)" % (
            len(raw), len(raw), raw)
        item = parse_fetch(line)
        self.assertEqual(item.body, raw)
        self.assertIsInstance(item.body, bytes)
        self.assertEqual((item.uid, item.flags, item.size), (7, ("\\Seen",), len(raw)))


# -- a scripted server on a real socket -------------------------------------------------


class FakeIMAP(LineReceiver):
    """Speaks just enough IMAP; `factory.hooks` override replies per command."""

    factory: FakeIMAPFactory
    transport: Any

    def connectionMade(self) -> None:
        self.tls = False
        self.factory.connections.append(self)
        self.sendLine(b"* OK fake IMAP ready")

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)

    def lineReceived(self, line: bytes) -> None:
        self.factory.received.append((self.tls, line))
        tag, _, rest = line.partition(b" ")
        command = rest.split(b" ", 2)
        name = command[0].upper()
        if name == b"UID":
            name = b"UID " + command[1].upper()
        hook = self.factory.hooks.get(name.decode())
        if hook is not None and hook(self, tag, rest) is not None:
            return
        if name == b"CAPABILITY":
            self.sendLine(b"* CAPABILITY " + self.factory.caps)
            self.sendLine(tag + b" OK capabilities")
        elif name == b"STARTTLS":
            self.sendLine(tag + b" OK Begin TLS")
            self.transport.startTLS(dovecot_pki_options())
            self.tls = True
        elif name in (b"LOGIN", b"AUTHENTICATE"):
            self.sendLine(tag + b" OK logged in")
        elif name == b"LIST":
            self.sendLine(b'* LIST () "/" INBOX')
            self.sendLine(tag + b" OK listed")
        elif name == b"EXAMINE":
            self.sendLine(b"* 1 EXISTS")
            self.sendLine(b"* OK [UIDVALIDITY 7] ok")
            self.sendLine(b"* OK [UIDNEXT 2] ok")
            self.sendLine(tag + b" OK [READ-ONLY] done")
        elif name == b"UID SEARCH":
            self.sendLine(b"* SEARCH 1")
            self.sendLine(tag + b" OK searched")
        elif name == b"UID FETCH" and b"BODY" not in rest:
            self.sendLine(b"* 1 FETCH (UID 1 RFC822.SIZE 20)")
            self.sendLine(tag + b" OK fetched")
        elif name == b"UID FETCH":
            body = b"Subject: hi\r\n\r\nhello\r\n"
            self.transport.write(
                b"* 1 FETCH (UID 1 FLAGS () RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n"
                % (len(body), len(body), body)
            )
            self.sendLine(tag + b" OK fetched")
        elif name == b"LOGOUT":
            self.sendLine(b"* BYE bye")
            self.sendLine(tag + b" OK bye")
            self.transport.loseConnection()
        else:
            self.sendLine(tag + b" BAD unknown")


def dovecot_pki_options() -> Any:
    from twisted.internet import ssl

    pki = dovecot_pki()
    return ssl.PrivateCertificate.loadPEM(pki.cert_pem + pki.key_pem).options()


class FakeIMAPFactory(protocol.ServerFactory):
    protocol = FakeIMAP  # type: ignore[assignment]

    def __init__(self) -> None:
        self.caps = b"IMAP4rev1 STARTTLS AUTH=PLAIN"
        self.hooks: dict[str, Any] = {}
        self.received: list[tuple[bool, bytes]] = []
        self.connections: list[FakeIMAP] = []
        self.lost: list[FakeIMAP] = []

    def passwords(self) -> list[str]:
        """The passwords clients logged in with (AUTHENTICATE PLAIN with SASL-IR: offer it
        in `caps`)."""
        found = []
        for _tls, line in self.received:
            words = line.split()
            if len(words) == 4 and words[1].upper() == b"AUTHENTICATE":
                found.append(base64.b64decode(words[3]).split(b"\0")[2].decode())
        return found

    def close_all(self) -> None:
        """End every connection still open (a test's sessions leave none behind)."""
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.loseConnection()


def cleartext_servers(test: TestCase, n: int) -> list[tuple[FakeIMAPFactory, int]]:
    """`n` fake IMAP servers on loopback that take AUTHENTICATE PLAIN in cleartext (so
    `passwords()` tells what each was given), with their ports; stopped with `test`."""
    servers = []
    for _ in range(n):
        factory = FakeIMAPFactory()
        factory.caps = b"IMAP4rev1 AUTH=PLAIN SASL-IR"  # no STARTTLS: cleartext
        port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        test.addCleanup(factory.close_all)
        servers.append((factory, port.getHost().port))
    return servers


async def cleartext_account(test: TestCase, port: int) -> tuple[FetchEnv, Account]:
    """A fetch environment and an account of it on the cleartext server at `port`."""
    env = await make_env(test)
    account = await env.accounts.create(
        env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
        allow_cleartext=True, start_tls=False,
    )
    return env, account


class HostileServerTests(TestCase):
    timeout = 30

    async def run_sync(self, factory: FakeIMAPFactory, **account: Any) -> Any:
        reactor = get_reactor()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        env = await make_env(self)
        values: dict[str, Any] = {
            "host": "localhost", "port": port.getHost().port, "username": "alice",
            "password": "sécret", "tls_ca_pem": dovecot_pki().ca_pem.decode(),
        }
        values.update(account)
        created = await env.accounts.create(env.user_id, **values)
        result = await env.engine.sync(created.id)
        for conn in factory.connections:
            if conn.transport is not None:
                conn.transport.loseConnection()
        return result, env, created

    async def test_4gb_literal_is_an_error_on_the_account_and_memory_stays_bounded(
        self,
    ) -> None:
        factory = FakeIMAPFactory()
        chunk = b"A" * (1024 * 1024)

        def huge(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"BODY" not in rest:
                return None
            conn.transport.write(b"* 1 FETCH (UID 1 BODY[] {4294967296}\r\n")
            for _ in range(16):
                conn.transport.write(chunk)
            return True

        factory.hooks["UID FETCH"] = huge
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result, env, account = await self.run_sync(factory)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        self.assertEqual(result.status, "error")
        self.assertIn("4294967296-byte literal", result.problems())
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertEqual(stored.sync_status, "error")
        self.assertIn("over the limit", stored.sync_error)
        self.assertLess(grown_kib, 200 * 1024)
        self.assertEqual(await env.count(account.id), 0)

    async def test_injection_after_starttls_is_ignored_over_real_tls(self) -> None:
        factory = FakeIMAPFactory()

        def inject(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(
                tag + b" OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN INJECTED\r\n"
            )
            conn.transport.startTLS(dovecot_pki_options())
            conn.tls = True
            return True

        factory.hooks["STARTTLS"] = inject
        result, _env, _account = await self.run_sync(factory, start_tls=True)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(result.new_messages, 1)
        after_tls = [line for tls, line in factory.received if tls]
        self.assertTrue(after_tls[0].endswith(b"CAPABILITY"))
        self.assertFalse(any(b"AUTHENTICATE" in line or b"LOGIN" in line
                             for tls, line in factory.received if not tls))

    async def test_starttls_required_but_not_offered_refuses_to_log_in(self) -> None:
        for account in ({"start_tls": True}, {"start_tls": False}):
            factory = FakeIMAPFactory()
            factory.caps = b"IMAP4rev1 AUTH=PLAIN"
            result, _env, _created = await self.run_sync(factory, **account)
            self.assertEqual(result.status, "error")
            self.assertIn("refusing to send the password in cleartext", result.error)
            sent = b" ".join(line for _tls, line in factory.received)
            self.assertNotIn(b"AUTHENTICATE", sent)
            self.assertNotIn(b"LOGIN", sent)

    async def test_cleartext_only_when_the_account_allows_it(self) -> None:
        factory = FakeIMAPFactory()
        factory.caps = b"IMAP4rev1 AUTH=PLAIN"
        result, _env, _created = await self.run_sync(factory, allow_cleartext=True)
        self.assertEqual(result.status, "success", result.problems())

    async def test_malformed_server_reply_is_a_clear_error(self) -> None:
        factory = FakeIMAPFactory()

        def garbage(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.sendLine(b"* 1 FETCH (UID 1 ((((")
            conn.sendLine(tag + b" OK done")
            return True

        # (An EXAMINE's FETCH replies are read only when QRESYNC asked for them.)
        factory.hooks["UID FETCH"] = garbage
        result, _env, _created = await self.run_sync(factory)
        self.assertEqual(result.status, "error")
        self.assertIn("malformed FETCH reply", result.problems())

    async def test_server_that_hangs_up_is_a_clear_error(self) -> None:
        factory = FakeIMAPFactory()

        def hang_up(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.loseConnection()
            return True

        factory.hooks["LIST"] = hang_up
        result, _env, _created = await self.run_sync(factory)
        self.assertEqual(result.status, "error")
        self.assertIn("closed", result.error)
        self.assertIsInstance(FetchError("x"), Exception)


class POP3SessionUnitTests(TestCase):
    def test_lines_after_stls_ok_are_discarded_and_capa_asked_again(self) -> None:
        from mailcore.fetch.pop3 import POP3Session

        session = POP3Session(Clock(), host="fake")
        transport = TLSStringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        d = defer.Deferred.fromCoroutine(session.stls(object()))  # type: ignore[arg-type]
        self.assertEqual(transport.value(), b"STLS\r\n")
        transport.clear()
        session.dataReceived(b"+OK Begin TLS\r\n+OK\r\nSTLS\r\nINJECTED\r\n.\r\n")
        self.assertTrue(transport.tls_started)
        self.assertEqual(transport.value(), b"CAPA\r\n")
        session.dataReceived(b"+OK\r\nUIDL\r\nUSER\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), {"UIDL", "USER"})

    def test_message_over_the_bound_fails_the_session(self) -> None:
        from mailcore.fetch.pop3 import MessageTooLarge, POP3Session

        session = POP3Session(Clock(), host="fake", max_message=100)
        transport = TLSStringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        # Over the bound, and then over another bound of what is read to be dropped.
        session.dataReceived(b"+OK\r\n" + b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n"
                             + b"z" * 90 + b"\r\n")
        session.connectionLost(Failure(ConnectionDone()))
        error = failure_of(d)
        self.assertIsInstance(error, MessageTooLarge)
        self.assertTrue(transport.disconnecting)


class MissingBodyTests(TestCase):
    """A FETCH reply without the body of a message still in the folder: the message was
    passed over as if expunged, the sync said success, and the next sync looked only above
    the highest UID held, so it was never backed up."""

    timeout = 30

    async def sync(self, *, left_out: int = 0, size_omit: frozenset[int] = frozenset(),
                   gone: frozenset[int] | set[int] = frozenset()) -> tuple[Any, Any, int, int]:
        """Sync an account of UIDs 1 to 3 whose server leaves UID 2's body out of its first
        `left_out` body FETCHes; `gone` UIDs are listed by the first search only (expunged
        meanwhile), `size_omit` ones left out of the size FETCH. The result, the env, the
        account id and the server's port."""
        (factory, port), = cleartext_servers(self, 1)
        times = [left_out]

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                                 b"* OK [UIDNEXT 4] n\r\n" + tag + b" OK done\r\n")
            return True

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            words = rest.split()
            listed = [1, 2, 3] if words[-1] == b"ALL" else [
                u for u in expand_set(words[-1].replace(b"*", b"3"), 10)
                if u <= 3 and u not in gone]
            conn.transport.write(b"* SEARCH " + b" ".join(b"%d" % u for u in listed) + b"\r\n"
                                 + tag + b" OK searched\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            sizing = b"BODY" not in rest
            uids = expand_set(rest.split(b" ")[2], 10)
            omit = not sizing and 2 in uids and times[0] > 0
            if omit:
                times[0] -= 1
            for uid in uids:
                body = b"Subject: m%d\r\nMessage-ID: <m%d@x.test>\r\n\r\nhi\r\n" % (uid, uid)
                if sizing:
                    if uid not in size_omit:
                        conn.transport.write(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n"
                                             % (uid, uid, len(body)))
                elif (uid == 2 and omit) or uid in gone:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS ())\r\n" % (uid, uid))
                else:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n"
                                         % (uid, uid, len(body), body))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        factory.hooks.update({"EXAMINE": examine, "UID SEARCH": search, "UID FETCH": fetch})
        env, account = await cleartext_account(self, port)
        return await env.engine.sync(account.id), env, account.id, port

    async def test_a_body_left_out_once_is_fetched_again_at_once(self) -> None:
        result, env, account_id, _port = await self.sync(left_out=1)
        self.assertEqual((result.status, result.new_messages), ("success", 3), result.problems())
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 2, 3])

    async def test_a_body_left_out_twice_is_a_folder_error_not_a_silent_success(
        self,
    ) -> None:
        result, env, account_id, port = await self.sync(left_out=2)
        self.assertEqual((result.status, result.new_messages), ("error", 2))
        self.assertEqual(result.problems(),
                         f"INBOX: UID 2: 127.0.0.1:{port} sent no body for it, twice; not fetched")
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 3])

    async def test_a_skipped_message_is_tried_again_at_each_sync_until_it_is_fetched(
        self,
    ) -> None:
        """The next sync looked only above the highest UID held: UID 2 was never fetched,
        and its error went with the next sync, which said success."""
        result, env, account_id, port = await self.sync(left_out=4)
        self.assertEqual((result.status, result.new_messages), ("error", 2))

        async def folder() -> tuple[str | None, str | None]:
            row = (await env.db.read("folder", lambda c: c.execute(select(
                fetch_folders.c.sync_error, fetch_folders.c.skipped_uids)).one()))
            return row.sync_error, row.skipped_uids

        error = f"UID 2: 127.0.0.1:{port} sent no body for it, twice; not fetched"
        self.assertEqual(await folder(), (error, "2"))
        again = await env.engine.sync(account_id)  # left out twice more: still an error
        self.assertEqual((again.status, again.new_messages, again.problems()),
                         ("error", 0, f"INBOX: {error}"))
        self.assertEqual(await folder(), (error, "2"))
        last = await env.engine.sync(account_id)
        self.assertEqual((last.status, last.new_messages), ("success", 1), last.problems())
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 2, 3])
        self.assertEqual(await folder(), (None, None))

    async def test_a_skipped_message_expunged_since_is_no_longer_an_error(self) -> None:
        gone: set[int] = set()
        result, env, account_id, _port = await self.sync(left_out=2, gone=gone)
        self.assertEqual(result.status, "error")
        gone.add(2)  # expunged before the next sync
        again = await env.engine.sync(account_id)
        self.assertEqual((again.status, again.new_messages), ("success", 0), again.problems())
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 3])

    async def test_a_message_expunged_since_the_search_is_no_error(self) -> None:
        result, env, account_id, _port = await self.sync(gone=frozenset({2}))
        self.assertEqual((result.status, result.new_messages), ("success", 2), result.problems())
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 3])

    async def test_a_message_the_size_fetch_left_out_is_fetched(self) -> None:
        result, env, account_id, _port = await self.sync(size_omit=frozenset({2}))
        self.assertEqual((result.status, result.new_messages), ("success", 3), result.problems())
        self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 2, 3])


class SkippedThenInterruptedTests(TestCase):
    """A message a sync skipped (over the size limit, or its body left out twice) below a
    UID it then committed, in a sync that did not finish (the connection dropped, the
    daemon stopped): the skipped UIDs were saved only at the folder's end, and the next
    sync looked only above the highest UID held, so the message was never tried again and
    that sync said success; the backup lacked it without a word."""

    timeout = 30

    async def sync_twice(self, *, oversized: bool, resync: bool) -> tuple[Any, Any, int]:
        """Sync an account whose server holds UIDs 1 to 4 (1 alone at a first sync when
        `resync`), UID 2 over the size limit by its RFC822.SIZE (`oversized`) or its body
        always left out; the server drops the connection when first asked for UID 4's
        body. The last sync's result, the env and the account id."""
        (factory, port), = cleartext_servers(self, 1)
        held = [1] if resync else [1, 2, 3, 4]
        drops = [1]

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT %d] n"
                                 b"\r\n%s OK done\r\n" % (len(held), max(held) + 1, tag))
            return True

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            words = rest.split()
            top = b"%d" % max(held)
            asked = set(held) if words[-1] == b"ALL" else set(
                expand_set(words[-1].replace(b"*", top), 10))
            conn.transport.write(b"* SEARCH " + b" ".join(
                b"%d" % u for u in held if u in asked) + b"\r\n" + tag + b" OK searched\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            sizing = b"BODY" not in rest
            uids = [u for u in expand_set(rest.split(b" ")[2], 10) if u in held]
            if not sizing and 4 in uids and drops[0]:
                drops[0] -= 1
                conn.transport.loseConnection()
                return True
            for uid in uids:
                body = b"Subject: m%d\r\nMessage-ID: <m%d@x.test>\r\n\r\nhi\r\n" % (uid, uid)
                if sizing:
                    size = 5000 if uid == 2 and oversized else len(body)
                    conn.transport.write(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n"
                                         % (uid, uid, size))
                elif uid == 2 and not oversized:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS ())\r\n" % (uid, uid))
                else:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n"
                                         % (uid, uid, len(body), body))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        factory.hooks.update({"EXAMINE": examine, "UID SEARCH": search, "UID FETCH": fetch})
        # One batch a fetch, one on the wire: UID 3 is committed before UID 4 is asked for.
        env = await make_env(self, max_message_bytes=2000, batch_messages=1,
                             pipeline_depth=1)
        account = await env.accounts.create(
            env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
            allow_cleartext=True, start_tls=False,
        )
        if resync:
            first = await env.engine.sync(account.id)
            self.assertEqual(first.status, "success", first.problems())
            held[:] = [1, 2, 3, 4]
        cut = await env.engine.sync(account.id)
        self.assertEqual(cut.status, "error")
        self.assertIn("connection to 127.0.0.1", cut.problems() or "")
        self.assertEqual(sorted(await env.copies(account.id, "INBOX")), [1, 3])
        return await env.engine.sync(account.id), env, account.id

    async def test_a_skip_below_a_committed_uid_is_tried_again_after_an_interrupted_sync(
        self,
    ) -> None:
        for oversized in (True, False):
            for resync in (False, True):
                last, env, account_id = await self.sync_twice(oversized=oversized,
                                                              resync=resync)
                self.assertEqual((last.status, last.new_messages), ("error", 1),
                                 (oversized, resync, last.problems()))
                why = ("UID 2 is 5000 bytes, over the limit of 2000; not fetched" if oversized
                       else "sent no body for it, twice; not fetched")
                self.assertIn(why, last.problems() or "")
                self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 3, 4])
                row = await env.db.read("folder", lambda c: c.execute(select(
                    fetch_folders.c.skipped_uids)).scalar())
                self.assertEqual(row, "2")


class FirstSyncCutThenNewUidvalidityTests(TestCase):
    """A folder's first sync stopped after some batches were committed, then the server
    gave the folder a new UIDVALIDITY (RFC 3501 2.3.1.1: every UID void): the folder had
    no UIDVALIDITY of ours yet, so the next sync was no rescan and stored every message
    again beside the copies under the old one, each message twice."""

    timeout = 30

    async def test_the_next_sync_rescans_and_relinks_instead_of_copying_twice(self) -> None:
        (factory, port), = cleartext_servers(self, 1)
        server = {"validity": 7, "base": 0, "drop": True}

        def body(n: int) -> bytes:
            return b"Subject: m%d\r\nMessage-ID: <m%d@x.test>\r\n\r\nhi\r\n" % (n, n)

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 3 EXISTS\r\n* OK [UIDVALIDITY %d] v\r\n* OK [UIDNEXT %d] n"
                                 b"\r\n%s OK done\r\n" % (server["validity"], server["base"] + 4,
                                                          tag))
            return True

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            base = server["base"]
            conn.transport.write(b"* SEARCH %d %d %d\r\n%s OK searched\r\n"
                                 % (base + 1, base + 2, base + 3, tag))
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            base = server["base"]
            uids = [u for u in expand_set(rest.split(b" ")[2], 100) if 0 < u - base <= 3]
            if b"BODY" in rest and base + 3 in uids and server["drop"]:
                server["drop"] = False
                conn.transport.loseConnection()
                return True
            for uid in uids:
                raw = body(uid - base)
                if b"BODY" not in rest:
                    conn.transport.write(b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n"
                                         % (uid - base, uid, len(raw)))
                else:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n"
                                         % (uid - base, uid, len(raw), raw))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        factory.hooks.update({"EXAMINE": examine, "UID SEARCH": search, "UID FETCH": fetch})
        env = await make_env(self, batch_messages=1, pipeline_depth=1)
        account = await env.accounts.create(
            env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
            allow_cleartext=True, start_tls=False,
        )
        cut = await env.engine.sync(account.id)
        self.assertEqual((cut.status, cut.new_messages), ("error", 2), cut.problems())
        server.update(validity=8, base=10)  # the folder made again: new UIDs
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages, again.relinked), ("success", 1, 2),
                         again.problems())
        rows = await env.db.read("rows", lambda c: c.execute(select(
            messages.c.uidvalidity, messages.c.uid, messages.c.on_server)
            .order_by(messages.c.uid)).all())
        self.assertEqual([tuple(r) for r in rows], [(8, 11, True), (8, 12, True),
                                                   (8, 13, True)])


class ModseqWentBackTests(TestCase):
    """A CONDSTORE server whose HIGHESTMODSEQ went back (restored from a backup of its own,
    RFC 7162 says never, UIDVALIDITY unchanged): the sync asked for the flags changed since
    the mod-sequence it had seen, higher than any the server would give again, so each flag
    changed meanwhile was never read and our copies kept the old flags for good."""

    timeout = 30

    async def test_every_flag_is_read_again(self) -> None:
        (factory, port), = cleartext_servers(self, 1)
        factory.caps = b"IMAP4rev1 AUTH=PLAIN SASL-IR CONDSTORE"
        server: dict[str, Any] = {"modseq": 100, "flags": b"()", "changed": 1}
        raw = b"Subject: m1\r\nMessage-ID: <m1@x.test>\r\n\r\nhi\r\n"

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 2] n\r\n"
                                 b"* OK [HIGHESTMODSEQ %d] m\r\n%s OK done\r\n"
                                 % (server["modseq"], tag))
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            since = rest.split(b"CHANGEDSINCE ")[1].split(b")")[0] if b"CHANGEDSINCE" in rest \
                else b"0"
            if b"BODY" in rest:
                conn.transport.write(b"* 1 FETCH (UID 1 FLAGS %s BODY[] {%d}\r\n%s)\r\n"
                                     % (server["flags"], len(raw), raw))
            elif b"RFC822.SIZE" in rest:
                conn.transport.write(b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % len(raw))
            elif int(since) < server["changed"]:  # the mod-sequence of the flags' change
                conn.transport.write(b"* 1 FETCH (UID 1 FLAGS %s MODSEQ (%d))\r\n"
                                     % (server["flags"], server["changed"]))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        factory.hooks.update({"EXAMINE": examine, "UID FETCH": fetch})
        env, account = await cleartext_account(self, port)
        first = await env.engine.sync(account.id)
        self.assertEqual((first.status, first.new_messages), ("success", 1), first.problems())
        server.update(modseq=80, flags=b"(\\Seen)", changed=60)
        again = await env.engine.sync(account.id)
        self.assertEqual(again.status, "success", again.problems())
        self.assertEqual(await env.copies(account.id, "INBOX"), {1: ("\\Seen", True)})
        server.update(modseq=90, flags=b"(\\Seen \\Flagged)", changed=85)  # as usual again
        self.assertEqual((await env.engine.sync(account.id)).status, "success")
        self.assertEqual(await env.copies(account.id, "INBOX"), {1: ("\\Seen \\Flagged", True)})


class UidBeyondUidnextTests(TestCase):
    """A server that lists a UID far above the UIDNEXT it announced: the message was stored
    and the next sync searched above it (the highest UID held), so every message the server
    numbered below it afterwards was never fetched."""

    timeout = 30

    async def test_messages_numbered_below_the_lie_are_still_fetched(self) -> None:
        (factory, port), = cleartext_servers(self, 1)
        lie = 1_000_000
        server: dict[str, Any] = {"uids": [1, lie], "uidnext": 2}

        def body(uid: int) -> bytes:
            return b"Subject: m%d\r\nMessage-ID: <m%d@x.test>\r\n\r\nhi\r\n" % (uid, uid)

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                                 b"* OK [UIDNEXT %d] n\r\n%s OK done\r\n"
                                 % (len(server["uids"]), server["uidnext"], tag))
            return True

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            last = rest.split()[-1]
            uids = server["uids"]
            if last != b"ALL":  # UID n:* (RFC 3501: n above them all names the highest)
                first = int(last.split(b":")[0])
                uids = [u for u in uids if u >= first] or uids[-1:]
            conn.transport.write(b"* SEARCH " + b" ".join(b"%d" % u for u in uids) + b"\r\n"
                                 + tag + b" OK searched\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            for uid in expand_set(rest.split(b" ")[2], 10):
                if uid not in server["uids"]:
                    continue
                raw = body(uid)
                if b"BODY" in rest:
                    conn.transport.write(b"* 1 FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n"
                                         % (uid, len(raw), raw))
                else:
                    conn.transport.write(b"* 1 FETCH (UID %d RFC822.SIZE %d)\r\n"
                                         % (uid, len(raw)))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        factory.hooks.update({"EXAMINE": examine, "UID SEARCH": search, "UID FETCH": fetch})
        env, account = await cleartext_account(self, port)
        first = await env.engine.sync(account.id)
        self.assertEqual((first.status, first.new_messages), ("success", 2), first.problems())
        server.update(uids=[1, 2, 3, lie], uidnext=4)  # two new messages, numbered as due
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages), ("success", 2), again.problems())
        self.assertEqual(sorted(await env.copies(account.id, "INBOX")), [1, 2, 3, lie])
        fetched = [line for _tls, line in factory.received if b"BODY.PEEK" in line]
        self.assertEqual(len(fetched), 2, fetched)  # the lie is not fetched a second time
        last = await env.engine.sync(account.id)
        self.assertEqual((last.status, last.new_messages), ("success", 0), last.problems())


class ListedButNotOpenedTests(TestCase):
    """Dovecot lists a folder deleted while it had subfolders as (\\HasChildren), not
    \\Noselect, and answers its EXAMINE a plain NO: the sync recorded that as the folder's
    error, so every backup of such an account failed (and a migrate or restore with it)."""

    timeout = 30

    async def sync_twice(self, answer: bytes, flags: bytes = b"\\HasChildren",
                         refused: bytes = b"Archive", *, first_too: bool = True,
                         ) -> tuple[Any, Any, Any, int, int]:
        """Two syncs of an account listing INBOX (with `flags` too), Archive (listed with
        `flags`) and Archive/2023, the EXAMINE of `refused` answered `answer` (in the second
        only, unless `first_too`): their results, the env, the account id and the server's
        port."""
        (factory, port), = cleartext_servers(self, 1)
        refusing = [first_too]

        def listing(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b'* LIST (' + flags + b') "/" INBOX\r\n'
                                 b'* LIST (' + flags + b') "/" Archive\r\n'
                                 b'* LIST (\\HasNoChildren) "/" Archive/2023\r\n'
                                 + tag + b" OK listed\r\n")
            return True

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if not refusing[0] or rest.split()[1].strip(b'"') != refused:
                return None
            conn.transport.write(tag + b" " + answer + b"\r\n")
            return True

        factory.hooks.update({"LIST": listing, "EXAMINE": examine})
        env, account = await cleartext_account(self, port)
        first = await env.engine.sync(account.id)
        refusing[0] = True
        again = await env.engine.sync(account.id)
        return first, again, env, account.id, port

    async def archive_error(self, env: FetchEnv) -> str | None:
        return await env.db.read("folder", lambda c: c.execute(
            select(fetch_folders.c.sync_error).where(fetch_folders.c.name == "Archive")
        ).scalar_one())

    async def test_a_folder_listed_but_refused_with_a_plain_no_is_passed_over(self) -> None:
        for answer in (b"NO Mailbox doesn't exist: Archive", b"NO [NONEXISTENT] gone"):
            first, again, env, account_id, _port = await self.sync_twice(answer)
            self.assertEqual((first.status, first.new_messages, first.problems()),
                             ("success", 2, None), answer)
            self.assertEqual((again.status, again.new_messages, again.problems()),
                             ("success", 0, None), answer)
            self.assertEqual([r.error for r in first.folders.values()], [None] * 3)
            self.assertEqual((first.unsure(), again.unsure()), ({}, {}))  # never opened
            self.assertEqual(list(await env.copies(account_id, "Archive/2023")), [1])
            self.assertEqual(list(await env.copies(account_id, "Archive")), [])
            self.assertIsNone(await self.archive_error(env))

    async def test_a_plain_no_of_a_folder_opened_before_is_passed_over_unsure(self) -> None:
        # Dovecot's answer for a folder deleted while it had subfolders, or Office 365's
        # "Server Unavailable" for a moment: the sync cannot tell them apart. Passed over (a
        # backup is a success), the result says so: a migrate taking it as deleted ended
        # done without the mail that came into the folder since the sync that opened it.
        first, again, env, account_id, port = await self.sync_twice(
            b"NO Server Unavailable. 15", first_too=False)
        self.assertEqual((first.status, first.new_messages, first.unsure()),
                         ("success", 3, {}))
        self.assertEqual((again.status, again.problems(), again.unsure()), ("success", None, {
            "Archive": f"EXAMINE refused by 127.0.0.1:{port}: Server Unavailable. 15"}))
        self.assertEqual(list(await env.copies(account_id, "Archive")), [1])
        self.assertIsNone(await self.archive_error(env))
        # NONEXISTENT says the folder is gone.
        _, again, _, _, _ = await self.sync_twice(b"NO [NONEXISTENT] gone", first_too=False)
        self.assertEqual((again.status, again.problems(), again.unsure()),
                         ("success", None, {}))

    async def test_a_plain_no_of_a_folder_without_children_is_still_its_error(
            self) -> None:
        # Office 365 answers a momentary "NO Server Unavailable. 15", naming no code: passed
        # over, the sync was a success without the folder's new mail, and a migrate after
        # it ended done. Only Dovecot's case, a folder listed \HasChildren, is passed over.
        for flags in (b"\\HasNoChildren", b""):
            first, again, env, _account_id, port = await self.sync_twice(
                b"NO Server Unavailable. 15", flags)
            for result in (first, again):
                self.assertEqual((result.status, result.problems()), (
                    "error", f"Archive: EXAMINE refused by 127.0.0.1:{port}: Server "
                    "Unavailable. 15"), flags)
            self.assertIsNotNone(await self.archive_error(env))
        # INBOX is never deleted: its plain NO is an error, children or not (Office 365
        # lists an INBOX with subfolders \HasChildren).
        first, again, _, _, port = await self.sync_twice(b"NO Server Unavailable. 15",
                                                         refused=b"INBOX")
        for result in (first, again):
            self.assertEqual((result.status, result.problems()), (
                "error", f"INBOX: EXAMINE refused by 127.0.0.1:{port}: Server "
                "Unavailable. 15"))
        # NONEXISTENT says so whatever the flags.
        first, _, env, _, _ = await self.sync_twice(b"NO [NONEXISTENT] gone", b"")
        self.assertEqual((first.status, first.problems()), ("success", None))

    async def test_a_refusal_for_now_or_a_bad_is_still_the_folders_error(self) -> None:
        # NOPERM too: a folder the login may not read is not one that holds no mail, and a
        # backup passing it over would say nothing of the mail it leaves out.
        for answer in (b"NO [UNAVAILABLE] try later", b"NO [INUSE] busy",
                       b"BAD Mailbox doesn't exist", b"NO [NOPERM] not yours to read"):
            first, again, env, account_id, port = await self.sync_twice(answer)
            said = answer.split(b" ", 1)[1].decode()
            for result in (first, again):
                self.assertEqual((result.status, result.problems()), (
                    "error", f"Archive: EXAMINE refused by 127.0.0.1:{port}: {said}"))
            self.assertEqual(list(await env.copies(account_id, "Archive/2023")), [1])
            self.assertIsNotNone(await self.archive_error(env))

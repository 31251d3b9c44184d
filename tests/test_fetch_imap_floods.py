"""A server flooding a command with small replies holds memory in proportion to its bytes.

A command's reply was bounded in bytes only (`IMAPClient.max_reply_bytes`, 144 MiB by
default), but what the client keeps of it is objects: Twisted's reader keeps each untagged
line of a command (a LIST, a CAPABILITY, an EXAMINE) in a list, and the bulk reader each
FETCH reply naming a UID of a pipelined list. 144 MB of `* a` lines were 29 million bytes
objects (a gigabyte, and two minutes of the reactor, for one command); the same FETCH reply
of one UID sent again and again was a FetchItem each time. The unit tests drive a session
over a StringTransport; the last one runs the whole engine against a loopback server.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection, event, insert, select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import imap4
from twisted.trial.unittest import TestCase

from mailcore.fetch import engine, imap
from mailcore.fetch.errors import ProtocolFailed
from mailcore.fetch.imap import (
    ARRIVING,
    LINE_COST,
    LIST_SLACK,
    MAX_CAPABILITY,
    MAX_EXISTS,
    MAX_FLAG_SETS,
    IMAPClient,
    SelectInfo,
    compress_set,
    expand_set,
)
from mailcore.fetch.state import thd_held_uids, thd_stored_uids, thd_update_flags
from mailcore.messages.sql import new_id
from mailcore.store.chunks import KEY_CHUNK
from mailcore.store.schema import fetch_folders, message_blobs, messages
from tests.support.db import MixinBase
from tests.support.fetchenv import make_env
from tests.test_fetch_imap_hostile import (
    FakeIMAP,
    FakeIMAPFactory,
    cleartext_account,
    cleartext_servers,
)
from tests.test_fetch_imap_hostile import connected_client as connected

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def searching(uids: bytes) -> Any:
    """A fake server's UID SEARCH hook answering `uids` (b"1 3")."""
    def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
        conn.transport.write(b"* SEARCH " + uids + b"\r\n" + tag + b" OK searched\r\n")
        return True
    return search


def message_reply(uid: int, rest: bytes) -> bytes:
    """A fake server's FETCH reply for `uid` to a sync's body fetch, else its size fetch."""
    if b"BODY" in rest:
        return b"* %d FETCH (UID %d FLAGS () BODY[] {%d}\r\n%s)\r\n" % (
            uid, uid, len(BODY), BODY)
    return b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (uid, uid, len(BODY))


class UntaggedFloodTests(TestCase):
    def test_each_line_kept_counts_beyond_its_bytes(self) -> None:
        """100,000 lines `* a` are 500 kB: within a 1 MiB bound by their bytes, they were
        all kept; each counts LINE_COST more, so the session ends at about 15,000."""
        client, transport = connected(max_reply_bytes=1024 * 1024)
        d = client.send(b"LIST", b'"" "*"')
        chunk = b"* a\r\n" * 10_000
        for _ in range(10):
            client.dataReceived(chunk)
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn("sent more than 1048576 bytes for one command", str(error))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(client._inflight, 1024 * 1024 + 5 + LINE_COST)

    def test_a_reply_of_honest_lines_is_read_whole(self) -> None:
        """A LIST of 10,000 folders (the most a sync takes) is far within the default."""
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.list_all())
        client.dataReceived(b"".join(b'* LIST () "/" "Folder %05d"\r\n' % i
                                     for i in range(10_000)) + b"0001 OK listed\r\n")
        self.assertEqual(len(self.successResultOf(d).folders), 10_000)


class CapabilityFloodTests(TestCase):
    def words(self, n: int) -> bytes:
        return b" ".join(b"X%06x" % i for i in range(n))

    def test_a_greetings_capability_code_is_not_parsed(self) -> None:
        """Twisted parsed the greeting's [CAPABILITY ...] into a dict (15 MB of words: 30 s
        of the reactor and 1.8 GB); CAPABILITY is asked once logged in, so it is not read."""
        parsed: list[bytes] = []
        real = imap4.parseNestedParens
        self.patch(imap4, "parseNestedParens",
                   lambda s, *a: parsed.append(s) or real(s, *a))  # type: ignore[func-returns-value]
        client = IMAPClient(Clock(), host="fake")
        client.makeConnection(StringTransport())
        client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 " + self.words(20_000) + b"] hi\r\n")
        self.successResultOf(client.greeted)
        self.assertEqual((parsed, client._capCache, client.state), ([], None, "unauth"))

        client = IMAPClient(Clock(), host="fake")
        client.makeConnection(StringTransport())
        client.dataReceived(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in\r\n")
        self.successResultOf(client.greeted)
        self.assertEqual(client.state, "auth")

    def test_a_bye_greetings_text_is_kept(self) -> None:
        """Only the greeting's [CAPABILITY ...] code is left unread: a server refusing us
        with `* BYE <why>` still has its why in the session's error (the account's error),
        where aa3dd15 made it "* BYE greeting"."""
        client = IMAPClient(Clock(), host="fake")
        client.makeConnection(StringTransport())
        client.dataReceived(b"* BYE [UNAVAILABLE] Too many connections from your IP\r\n")
        error = self.failureResultOf(client.greeted).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn("Too many connections from your IP", str(error))

        client = IMAPClient(Clock(), host="fake")
        client.makeConnection(StringTransport())
        client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 " + self.words(20_000) + b"] hi\r\n")
        self.successResultOf(client.greeted)
        self.assertEqual((client._capCache, client.state), (None, "unauth"))

    def test_untagged_lines_outside_any_command_are_not_parsed(self) -> None:
        """Twisted's reader parsed each (with parseNestedParens) for a handler that drops
        it: a 16 MiB line of words between two commands held the reactor as the greeting
        did."""
        client, _transport = connected()
        parsed: list[bytes] = []
        real = imap4.parseNestedParens
        self.patch(imap4, "parseNestedParens",
                   lambda s, *a: parsed.append(s) or real(s, *a))  # type: ignore[func-returns-value]
        client.dataReceived(b"* OK (" + self.words(20_000) + b")\r\n+ go on\r\n")
        self.assertEqual(parsed, [])
        d = client.send(b"NOOP")
        client.dataReceived(b"* 3 EXISTS\r\n0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d), ([b"3 EXISTS"], b"OK done"))

    def assert_flood_ends_the_session(self, space: bytes) -> IMAPClient:
        """A CAPABILITY reply of 10,000 words, `space` after its first word: the session
        ends with a ProtocolFailed naming MAX_CAPABILITY; the client, for more checks."""
        client, transport = connected()
        d = defer.Deferred.fromCoroutine(client.ask_capabilities())
        client.dataReceived(b"* CAPABILITY" + space + b"IMAP4rev1 " + self.words(10_000)
                            + b"\r\n0001 OK done\r\n")
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn(f"sent a CAPABILITY reply longer than {MAX_CAPABILITY} bytes", str(error))
        self.assertTrue(transport.disconnecting)
        return client

    def test_a_capability_reply_over_64_kib_ends_the_session(self) -> None:
        """Each word became a string in a set: 8 lines of 15 MB took 11 s and 670 MB."""
        client = self.assert_flood_ends_the_session(b" ")
        self.assertEqual(client.capabilities, set())

        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.ask_capabilities())
        client.dataReceived(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d), {"IMAP4REV1", "AUTH=PLAIN"})

    def test_a_capability_line_of_any_spacing_is_bounded(self) -> None:
        """The bound counted lines beginning "CAPABILITY " only, while the reader took any
        whose first word (split on any white space) is CAPABILITY: "CAPABILITY<TAB>..."
        put its 10,000 words in the set, unbounded."""
        self.assert_flood_ends_the_session(b"\t")

        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.ask_capabilities())
        client.dataReceived(b"* OK " + self.words(10_000) + b"\r\n"
                            b"* CAPABILITY\tIMAP4rev1  AUTH=PLAIN\r\n* CAPABILITY\r\n"
                            b"0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d), {"IMAP4REV1", "AUTH=PLAIN"})


class RepeatedFetchTests(TestCase):
    def test_one_uids_reply_again_and_again_ends_the_session(self) -> None:
        """A batch of one UID answered with its FETCH reply 1,000 times: before, a FetchItem
        each time, as many as the bytes bound let in."""
        client, transport = connected()
        d = client.uid_fetch([7], b"UID FLAGS")
        client.dataReceived(b"* 1 FETCH (UID 7 FLAGS (\\Seen))\r\n" * 1000)
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn(f"more than {2 + LIST_SLACK} FETCH replies", str(error))
        self.assertTrue(transport.disconnecting)

    def test_twice_a_uid_is_taken(self) -> None:
        """Each UID's reply and a flag change told beside it, for a pipelined batch: both
        read, the last one's flags kept by the engine."""
        client, _transport = connected()
        d = client.uid_fetch([1, 2], b"UID FLAGS")
        client.dataReceived(b"* 1 FETCH (UID 1 FLAGS ())\r\n* 2 FETCH (UID 2 FLAGS ())\r\n"
                            b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n"
                            b"* 2 FETCH (UID 2 FLAGS (\\Seen))\r\n0001 OK fetched\r\n")
        self.assertEqual([(i.uid, i.flags) for i in self.successResultOf(d)],
                         [(1, ()), (2, ()), (1, ("\\Seen",)), (2, ("\\Seen",))])


class FloodingServerTests(TestCase):
    """The engine against a server answering a body fetch with its one message's FETCH
    reply repeated: the folder gets an error, and nothing is stored twice."""

    timeout = 30

    async def test_a_body_sent_again_and_again_is_a_folder_error(self) -> None:
        body = b"Subject: hi\r\n\r\nhello\r\n"
        one = b"* 1 FETCH (UID 1 FLAGS () RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n" % (
            len(body), len(body), body)

        def flood(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"BODY" not in rest:
                return None
            conn.transport.write(one * 5000 + tag + b" OK fetched\r\n")
            return True

        (factory, port), = cleartext_servers(self, 1)
        factory.hooks["UID FETCH"] = flood
        env, account = await cleartext_account(self, port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("error", 0))
        self.assertIn(f"INBOX: 127.0.0.1:{port} sent more than {2 + LIST_SLACK} FETCH "
                      "replies for one UID FETCH", result.problems() or "")


class LyingExistsTests(TestCase):
    """Every bound on the FETCH replies of one command over a folder is its EXISTS and
    ARRIVING: an EXISTS near 2^32 let a UID FETCH of a set keep as many FetchItems as the
    bytes bound let in (5 million small ones of FLAGS, over a gigabyte)."""

    def examine(self, exists: int) -> defer.Deferred[SelectInfo]:
        client, self.transport = connected()
        d = defer.Deferred.fromCoroutine(client.examine("INBOX"))
        client.dataReceived(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
                            b"0001 OK [READ-ONLY] done\r\n" % exists)
        return d

    def test_an_exists_over_the_ceiling_is_refused_naming_it(self) -> None:
        error = self.failureResultOf(self.examine(2**32 - 1)).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), f"fake says 'INBOX' holds 4294967295 messages, more "
                                     f"than the {MAX_EXISTS} a folder may hold")

    def test_a_folder_of_the_ceiling_is_taken(self) -> None:
        self.assertEqual(self.successResultOf(self.examine(MAX_EXISTS)).exists, MAX_EXISTS)

    def test_messages_with_the_same_flags_share_them(self) -> None:
        """A folder's messages carry a few sets of flags: each set is kept once (a tuple and
        strings a message were about 100 of its 250 bytes); a long one is not shared."""
        client, _transport = connected()
        d = client.uid_fetch(b"1:*", b"UID FLAGS")
        long = b" ".join(b"$Label%03d" % i for i in range(30))
        client.dataReceived(b"".join(b"* %d FETCH (UID %d FLAGS (\\Seen $Work))\r\n" % (n, n)
                                     for n in (1, 2))
                            + b"* 3 FETCH (UID 3 FLAGS (%s))\r\n" % long
                            + b"* 4 FETCH (UID 4 FLAGS (%s))\r\n" % long
                            + b"0001 OK done\r\n")
        one, two, three, four = self.successResultOf(d)
        self.assertEqual(one.flags, ("\\Seen", "$Work"))
        self.assertIs(one.flags, two.flags)
        self.assertEqual(three.flags, four.flags)
        self.assertIsNot(three.flags, four.flags)
        self.assertLessEqual(len(imap._FLAG_SETS), MAX_FLAG_SETS)

    def test_sets_are_shared_again_once_the_table_is_full(self) -> None:
        """The table of shared sets is the process's: kept for good once full, no set
        seen after (keywords of months, or one hostile sync's) was shared until a restart.
        A new set finding it full empties it; it stays within its bound."""
        self.patch(imap, "_FLAG_SETS", {})
        self.patch(imap, "MAX_FLAG_SETS", 2)
        client, _transport = connected()
        d = client.uid_fetch(b"1:*", b"UID FLAGS")
        client.dataReceived(b"".join(b"* %d FETCH (UID %d FLAGS (%s))\r\n" % (n, n, flag)
                                     for n, flag in enumerate((b"$A", b"$B", b"$C", b"$C",
                                                               b"$A", b"$A"), start=1))
                            + b"0001 OK done\r\n")
        a, b, c, c2, a2, a3 = self.successResultOf(d)
        self.assertEqual((a.flags, b.flags, c.flags, a2.flags), (("$A",), ("$B",), ("$C",),
                                                                 ("$A",)))
        self.assertIs(c.flags, c2.flags)
        self.assertIs(a2.flags, a3.flags)
        self.assertLessEqual(len(imap._FLAG_SETS), 2)


class SetWithinTests(TestCase):
    """A UID FETCH of a set `within` two UIDs (a CONDSTORE resync's changes) keeps and
    counts the replies naming them only, and past `max_items` fails TooManyReplies once
    answered, the session going on: its caller asks otherwise."""

    replies = (b"* 1 FETCH (UID 1 FLAGS ())\r\n* 9 FETCH (UID 9 FLAGS ())\r\n"
               b"* 2 FETCH (UID 2 FLAGS ())\r\n* 3 FETCH (UID 3 FLAGS ())\r\n")

    def test_replies_naming_other_uids_are_not_kept(self) -> None:
        client, _transport = connected()
        d = client.uid_fetch(b"1:3", b"UID FLAGS", max_items=3, within=(1, 3))
        client.dataReceived(self.replies + b"0001 OK done\r\n")
        self.assertEqual([i.uid for i in self.successResultOf(d)], [1, 2, 3])

    def test_past_max_items_the_command_fails_alone(self) -> None:
        for busy in (False, True):  # the bulk path, or Twisted's reader behind a NOOP
            client, transport = connected()
            noop = client.send(b"NOOP") if busy else None
            d = client.uid_fetch(b"1:3", b"UID FLAGS", max_items=2, within=(1, 3))
            tag = b"0002" if busy else b"0001"
            client.dataReceived((b"0001 OK noop\r\n" if busy else b"") + self.replies
                                + tag + b" OK done\r\n")
            error = self.failureResultOf(d).value
            self.assertIsInstance(error, imap.TooManyReplies)
            self.assertEqual(str(error), "fake sent more than 2 FETCH replies for one UID FETCH")
            self.assertFalse(transport.disconnecting)
            if noop is not None:
                self.successResultOf(noop)
            after = client.send(b"NOOP")
            client.dataReceived(b"%s OK noop\r\n" % (b"0003" if busy else b"0002"))
            self.successResultOf(after)


class ChangedFlagsFloodTests(TestCase):
    """The flags a QRESYNC EXAMINE says changed (RFC 7162 3.2.5.1) were taken up to the
    folder's EXISTS and ARRIVING, whatever their UID: each line kept, then parsed, then a
    change kept, then an UPDATE; 10 million with an EXISTS within MAX_EXISTS, as many as the
    reply's bytes let in (1.6 million small ones). Only the UIDs up to the highest held are
    kept, MAX_CHANGED_FLAGS of them at most, each named twice at most (and LIST_SLACK)."""

    def examine(self, *fetches: bytes, exists: int = 5_000_000,
                held: int = 10) -> defer.Deferred[SelectInfo]:
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.examine("INBOX", qresync=(7, 5), held=held))
        client.dataReceived(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n" % exists)
        for i in range(0, len(fetches), 10_000):
            client.dataReceived(b"".join(b"* 1 FETCH (%s)\r\n" % f
                                         for f in fetches[i : i + 10_000]))
        client.dataReceived(b"0001 OK [READ-ONLY] done\r\n")
        return d

    def test_flags_of_uids_above_the_highest_held_are_not_kept(self) -> None:
        fetches = [b"UID %d FLAGS (\\Deleted)" % uid for uid in range(11, 100_011)]
        info = self.successResultOf(self.examine(*fetches, b"UID 4 FLAGS (\\Seen)"))
        self.assertEqual(info.changed_flags, {4: ("\\Seen",)})
        self.assertFalse(info.flags_beyond)

    def test_past_the_changes_kept_none_is_and_the_engine_is_told(self) -> None:
        self.patch(imap, "MAX_CHANGED_FLAGS", 2)
        fetches = [b"UID %d FLAGS (\\Seen)" % uid for uid in (1, 2, 3)]
        info = self.successResultOf(self.examine(*fetches[:2]))
        self.assertEqual((info.changed_flags, info.flags_beyond),
                         ({1: ("\\Seen",), 2: ("\\Seen",)}, False))
        info = self.successResultOf(self.examine(*fetches))
        self.assertEqual((info.changed_flags, info.flags_beyond), ({}, True))

    def test_the_same_uid_again_and_again_fails(self) -> None:
        fetch = b"UID 4 FLAGS (\\Seen)"
        info = self.successResultOf(self.examine(*[fetch] * (2 + LIST_SLACK)))
        self.assertEqual(info.changed_flags, {4: ("\\Seen",)})
        error = self.failureResultOf(self.examine(*[fetch] * 200_000)).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), f"fake sent {3 + LIST_SLACK} FETCH replies for 1 UIDs "
                                     f"to one EXAMINE, more than two a UID and {LIST_SLACK}")

    def test_past_exists_and_arriving_none_is_parsed(self) -> None:
        """The EXISTS seen bounds the replies parsed; the whole EXISTS, the replies taken."""
        self.patch(imap, "ARRIVING", 1)
        fetches = [b"UID %d FLAGS (\\Seen)" % uid for uid in (1, 2, 3)]
        info = self.successResultOf(self.examine(*fetches[:2], exists=1))
        self.assertEqual(len(info.changed_flags), 2)
        error = self.failureResultOf(self.examine(*fetches, exists=1)).value
        self.assertEqual(str(error), "fake sent more than 2 FETCH replies to one EXAMINE")


class LyingExistsSyncTests(TestCase):
    """The engine against a server lying about a folder's EXISTS: the folder gets an error
    naming the lie, nothing wrong is stored, and the next honest sync works."""

    timeout = 30

    async def test_an_absurd_exists_is_a_folder_error(self) -> None:
        def lying(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.sendLine(b"* 4294967295 EXISTS")
            conn.sendLine(b"* OK [UIDVALIDITY 7] ok")
            conn.sendLine(tag + b" OK [READ-ONLY] done")
            return True

        (factory, port), = cleartext_servers(self, 1)
        factory.hooks["EXAMINE"] = lying
        env, account = await cleartext_account(self, port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("error", 0))
        self.assertIn(f"INBOX: 127.0.0.1:{port} says 'INBOX' holds 4294967295 messages, more "
                      f"than the {MAX_EXISTS} a folder may hold", result.problems() or "")
        self.assertFalse([line for _tls, line in factory.received if b"FETCH" in line])
        del factory.hooks["EXAMINE"]
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 1))

    async def test_flags_of_messages_not_held_are_not_kept(self) -> None:
        """A CONDSTORE resync of a folder whose EXISTS says 5 million, of which we hold UID
        1: its flags were asked as UID 1:1, and the replies taken up to EXISTS and
        ARRIVING, each kept, then an UPDATE of its own. The UIDs held are asked for: the
        replies naming others are not kept."""
        modseq = [5]
        kept: list[int] = []

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.sendLine(b"* %d EXISTS" % (5_000_000 if modseq[0] > 5 else 1))
            conn.sendLine(b"* OK [UIDVALIDITY 7] ok")
            conn.sendLine(b"* OK [UIDNEXT 2] ok")
            conn.sendLine(b"* OK [HIGHESTMODSEQ %d] ok" % modseq[0])
            conn.sendLine(tag + b" OK [READ-ONLY] done")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"CHANGEDSINCE" not in rest:
                return None
            conn.transport.write(b"".join(b"* %d FETCH (UID %d FLAGS (\\Deleted))\r\n" % (n, n)
                                          for n in range(1, 2 * ARRIVING))
                                 + tag + b" OK fetched\r\n")
            return True

        def counting(conn: Any, folder_id: int, uidvalidity: int,
                     flags: dict[int, tuple[str, ...]], now: Any) -> int:
            kept.append(len(flags))
            return thd_update_flags(conn, folder_id, uidvalidity, flags, now)

        self.patch(engine, "thd_update_flags", counting)
        self.patch(engine, "_HELD_PAGE", 1)  # a page full: the next one is read (none)
        (factory, port), = cleartext_servers(self, 1)
        factory.caps += b" CONDSTORE"
        factory.hooks.update({"EXAMINE": examine, "UID FETCH": fetch})
        env, account = await cleartext_account(self, port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 1))
        modseq[0] = 6
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(kept, [1])
        self.assertEqual(result.folders["INBOX"].flags_updated, 1)
        self.assertEqual(await env.copies(account.id, "INBOX"), {1: ("\\Deleted", True)})
        asked = [line for _tls, line in factory.received if b"CHANGEDSINCE" in line]
        self.assertEqual([line.split(b" ", 1)[1] for line in asked],
                         [b"UID FETCH 1 (UID FLAGS) (CHANGEDSINCE 5)"])


class FlagsResyncCostTests(TestCase):
    """A CONDSTORE resync without QRESYNC (Gmail's) asks the flags changed by one UID FETCH
    of the UIDs from the lowest held to the highest. Asked by lists of the UIDs held, read
    from the store a page at a time, a folder of 300,000 took 150 commands each sync with
    new mail, of up to 22 KB each. Every flag (a HIGHESTMODSEQ gone back) is still asked by
    lists of the UIDs held, each a line of at most _LIST_BYTES."""

    timeout = 30

    def serve(self, modseq: list[int], told: int = 1) -> FakeIMAPFactory:
        """A CONDSTORE server of UIDs 2, 4, 6, 8 and 10, answering a flags UID FETCH for
        every UID of its set (held or not, `told` times each) and UID 12 unasked."""
        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 5 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
                                 b"* OK [UIDNEXT 11] ok\r\n* OK [HIGHESTMODSEQ %d] ok\r\n"
                                 % modseq[0] + tag + b" OK done\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            for uid in expand_set(rest.split(b" ")[2], 20):
                if b"BODY" in rest or b"RFC822.SIZE" in rest:
                    conn.transport.write(message_reply(uid, rest))
                else:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS (\\Answered))\r\n"
                                         % (uid, uid) * told)
            if b"RFC822.SIZE" not in rest and b"BODY" not in rest:
                conn.transport.write(b"* 6 FETCH (UID 12 FLAGS (\\Deleted))\r\n")
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        (factory, self.port), = cleartext_servers(self, 1)
        factory.caps += b" CONDSTORE"
        factory.hooks.update({"EXAMINE": examine, "UID SEARCH": searching(b"2 4 6 8 10"),
                              "UID FETCH": fetch})
        return factory

    async def test_the_changes_are_asked_by_one_command(self) -> None:
        pages: list[int] = []

        def paging(*args: Any) -> list[int]:
            pages.append(args[3])
            return thd_held_uids(*args)

        self.patch(engine, "thd_held_uids", paging)
        self.patch(engine, "_SIZE_CHUNK", 2)
        self.patch(engine, "_HELD_PAGE", 2)
        modseq = [5]
        factory = self.serve(modseq)
        env, account = await cleartext_account(self, self.port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5))
        modseq[0] = 6
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        asked = [line.split(b" ", 1)[1] for _tls, line in factory.received
                 if line.endswith(b"(UID FLAGS) (CHANGEDSINCE 5)")]
        self.assertEqual(asked, [b"UID FETCH 2:10 (UID FLAGS) (CHANGEDSINCE 5)"])
        self.assertEqual(pages, [])  # no UID held read from the store
        self.assertEqual(result.folders["INBOX"].flags_updated, 5)
        self.assertEqual(await env.copies(account.id, "INBOX"),
                         {uid: ("\\Answered", True) for uid in (2, 4, 6, 8, 10)})

    async def test_the_sizes_of_sparse_uids_are_asked_by_lines_of_bounded_length(self) -> None:
        """The sizes of new messages were asked _SIZE_CHUNK UIDs a command whatever the line
        they made: 2,000 UIDs left apart by deletions were a line of ~22 KB, past the ~8 KB
        RFC 7162 4 asks clients to keep to. Each command's set is now at most _LIST_BYTES."""
        self.patch(engine, "_LIST_BYTES", 5)
        factory = self.serve([5])
        env, account = await cleartext_account(self, self.port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5))
        asked = [line.split(b" ", 1)[1] for _tls, line in factory.received
                 if line.endswith(b"(UID RFC822.SIZE)")]
        self.assertEqual(asked, [b"UID FETCH 2,4,6 (UID RFC822.SIZE)",
                                 b"UID FETCH 8,10 (UID RFC822.SIZE)"])

    async def test_the_uids_held_among_more_than_a_statement_binds_are_found(self) -> None:
        """Which UIDs of a list we hold (the changes an EXAMINE or a UID FETCH told, a
        server's UIDs beyond its UIDNEXT, those skipped) was one IN list of them all:
        SQLite binds at most 250,000 values (32,766 by default), and the sync failed. They
        are asked a chunk at a time (mailcore.store.chunks)."""
        self.serve([5])
        env, account = await cleartext_account(self, self.port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5))

        def inbox(conn: Connection) -> int:
            return int(conn.execute(select(fetch_folders.c.id).where(
                fetch_folders.c.account_id == account.id,
                fetch_folders.c.name == "INBOX")).scalar_one())

        folder_id = await env.db.read("test_inbox", inbox)
        held = await env.db.read("fetch_stored_uids", thd_stored_uids, folder_id, 7,
                                 range(1, 250_002))
        self.assertEqual(held, {2, 4, 6, 8, 10})

    async def test_more_changes_than_the_uids_held_take_are_asked_by_lists(self) -> None:
        """Replies past two a UID held and ARRIVING (messages among them we do not hold:
        skipped, or outside a days limit) are not kept: the lists of the UIDs held are
        asked, in the same session."""
        self.patch(engine, "ARRIVING", 0)
        modseq = [5]
        factory = self.serve(modseq, told=2)  # 18 replies for 5 UIDs held
        env, account = await cleartext_account(self, self.port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5))
        modseq[0] = 6
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        asked = [line.split(b" ", 1)[1] for _tls, line in factory.received
                 if line.endswith(b"(UID FLAGS) (CHANGEDSINCE 5)")]
        self.assertEqual(asked, [b"UID FETCH 2:10 (UID FLAGS) (CHANGEDSINCE 5)",
                                 b"UID FETCH 2,4,6,8,10 (UID FLAGS) (CHANGEDSINCE 5)"])
        self.assertEqual(result.folders["INBOX"].flags_updated, 5)
        self.assertEqual(len([line for _tls, line in factory.received
                              if b"LOGIN" in line or b"AUTHENTICATE" in line]), 2)

    async def test_every_flag_is_asked_by_lists_of_bounded_lines(self) -> None:
        self.patch(engine, "_LIST_BYTES", 3)
        modseq = [100]
        factory = self.serve(modseq)
        env, account = await cleartext_account(self, self.port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5))
        modseq[0] = 80  # went back: every flag is asked
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        asked = [line.split(b" ", 1)[1] for _tls, line in factory.received
                 if line.endswith(b"(UID FLAGS)")]
        self.assertEqual(asked, [b"UID FETCH 2,4 (UID FLAGS)", b"UID FETCH 6,8 (UID FLAGS)",
                                 b"UID FETCH 10 (UID FLAGS)"])
        self.assertEqual(await env.copies(account.id, "INBOX"),
                         {uid: ("\\Answered", True) for uid in (2, 4, 6, 8, 10)})

    def test_a_list_of_sparse_uids_is_cut_by_its_line(self) -> None:
        """2,000 UIDs of 10 digits, none next to another, were one line of 22 KB."""
        sparse = list(range(1_000_000_000, 1_000_000_000 + 4_000, 2))
        lists = list(engine._by_line(sparse, engine._LIST_BYTES))
        self.assertEqual([uid for uids in lists for uid in uids], sparse)
        self.assertEqual([len(compress_set(uids)) for uids in lists], [7_996, 7_996, 6_005])
        self.assertEqual(len(lists), 3)
        dense = list(range(1, 50_001))
        self.assertEqual(list(engine._by_line(dense, engine._LIST_BYTES)), [dense])


class ChangedFlagsSyncTests(TestCase):
    """The engine against a QRESYNC server whose EXAMINE tells flag changes of UIDs it does
    not hold: they are neither kept nor written; past MAX_CHANGED_FLAGS the flags of the
    UIDs held are asked for; one UID told again and again is a folder error."""

    timeout = 30

    async def test_only_the_changes_of_messages_held_are_written(self) -> None:
        modseq = [5]
        told: list[bytes] = []
        kept: list[list[int]] = []

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 5000000 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n"
                                 b"* OK [UIDNEXT 4] ok\r\n* OK [HIGHESTMODSEQ %d] ok\r\n"
                                 % modseq[0] + b"".join(told) + tag + b" OK done\r\n")
            return True

        def enable(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* ENABLED QRESYNC\r\n" + tag + b" OK enabled\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            for uid in expand_set(rest.split(b" ")[2], 10):
                if b"CHANGEDSINCE" in rest:
                    conn.transport.write(b"* %d FETCH (UID %d FLAGS (\\Answered))\r\n"
                                         % (uid, uid))
                else:
                    conn.transport.write(message_reply(uid, rest))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        def counting(conn: Any, folder_id: int, uidvalidity: int,
                     flags: dict[int, tuple[str, ...]], now: Any) -> int:
            kept.append(sorted(flags))
            return thd_update_flags(conn, folder_id, uidvalidity, flags, now)

        self.patch(engine, "thd_update_flags", counting)
        (factory, port), = cleartext_servers(self, 1)
        factory.caps += b" CONDSTORE ENABLE QRESYNC"
        factory.hooks.update({"EXAMINE": examine, "ENABLE": enable,
                              "UID SEARCH": searching(b"1 3"), "UID FETCH": fetch})
        env, account = await cleartext_account(self, port)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 2))

        # UID 2 (below the highest held, not held) and 4 to 20,003 (above it) were kept
        # and written beside UID 1: 20,001 changes, an UPDATE each.
        modseq[0] = 6
        told[:] = [b"* 1 FETCH (UID %d FLAGS (\\Deleted))\r\n" % uid
                   for uid in (2, *range(4, 20_004))] + [b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n"]
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(kept, [[1]])
        self.assertEqual(result.folders["INBOX"].flags_updated, 1)
        self.assertEqual(await env.copies(account.id, "INBOX"),
                         {1: ("\\Seen", True), 3: ("", True)})
        self.assertFalse([line for _tls, line in factory.received if b"CHANGEDSINCE" in line])

        # More changes than an EXAMINE keeps: the flags of the UIDs held are asked for.
        self.patch(imap, "MAX_CHANGED_FLAGS", 1)
        modseq[0] = 7
        told[:] = [b"* 1 FETCH (UID %d FLAGS (\\Flagged))\r\n" % uid for uid in (1, 2, 3)]
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(kept[1:], [[1, 3]])
        self.assertEqual(await env.copies(account.id, "INBOX"),
                         {1: ("\\Answered", True), 3: ("\\Answered", True)})
        asked = [line for _tls, line in factory.received if b"CHANGEDSINCE" in line]
        self.assertEqual([line.split(b" ", 1)[1] for line in asked],
                         [b"UID FETCH 1:3 (UID FLAGS) (CHANGEDSINCE 6)"])

        # UID 1 told again and again: a folder error, nothing written.
        modseq[0] = 8
        told[:] = [b"* 1 FETCH (UID 1 FLAGS ())\r\n"] * 50_000
        result = await env.engine.sync(account.id)
        self.assertEqual(result.status, "error")
        self.assertIn(f"INBOX: 127.0.0.1:{port} sent {3 + LIST_SLACK} FETCH replies for 1 "
                      f"UIDs to one EXAMINE, more than two a UID and {LIST_SLACK}",
                      result.problems() or "")
        self.assertEqual(len(kept), 2)


class FlagWritesMixin(MixinBase):
    """The flag changes of a sync (up to MAX_CHANGED_FLAGS told by QRESYNC, every UID held
    by a flags resync) were an UPDATE each: 50,000 statements. They are written by flag set,
    a chunk of UIDs (KEY_CHUNK) an UPDATE."""

    backend = "sqlite"
    timeout = 60

    async def test_changes_are_written_by_flag_set_a_chunk_of_uids_a_statement(self) -> None:
        env = await make_env(self, backend=self.backend)
        account = await env.accounts.create(
            env.user_id, host="127.0.0.1", port=143, username="alice", password="pw",
            allow_cleartext=True, start_tls=False,
        )
        then = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        now = then + datetime.timedelta(days=1)
        held = range(1, 3 * KEY_CHUNK + 4)  # 501 of each flag set: two chunks each

        def fill(conn: Connection) -> int:
            """The same UIDs under UIDVALIDITY 6 (left alone) and 7, each \\Draft."""
            folder_id = new_id(conn.execute(insert(fetch_folders).values(
                account_id=account.id, name="INBOX", delimiter="/")))
            conn.execute(insert(message_blobs).values(sha256="0" * 64, size=len(BODY),
                                                      raw=BODY, created_at=then))
            conn.execute(insert(messages), [{
                "user_id": env.user_id, "account_id": account.id, "folder_id": folder_id,
                "folder": "INBOX", "uidvalidity": uidvalidity, "uid": uid,
                "sha256": "0" * 64, "size": len(BODY), "flags": "\\Draft",
                "created_at": then, "updated_at": then,
            } for uidvalidity in (6, 7) for uid in held])
            return folder_id

        folder_id = await env.db.run("test_fill", fill)
        sets: list[tuple[str, ...]] = [("\\Seen",), ("\\Seen", "\\Flagged"), ()]
        changes = {uid: sets[uid % 3] for uid in held}
        changes.update({uid: ("\\Deleted",) for uid in range(5_000, 5_010)})  # not held
        updates: list[str] = []

        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("UPDATE"):
                updates.append(statement)

        event.listen(env.db.engine, "before_cursor_execute", hook)
        self.addCleanup(event.remove, env.db.engine, "before_cursor_execute", hook)
        written = await env.db.run("update_fetch_flags", thd_update_flags, folder_id, 7,
                                   changes, now)
        self.assertEqual(written, len(held))
        self.assertEqual(len(updates), 3 * 2 + 1)

        def copies(conn: Connection) -> dict[tuple[int, int], tuple[str, datetime.datetime]]:
            return {(row.uidvalidity, row.uid): (row.flags, row.updated_at)
                    for row in conn.execute(select(
                        messages.c.uidvalidity, messages.c.uid, messages.c.flags,
                        messages.c.updated_at).where(messages.c.folder_id == folder_id))}

        self.assertEqual(await env.db.read("test_copies", copies), {
            **{(6, uid): ("\\Draft", then) for uid in held},
            **{(7, uid): (" ".join(sets[uid % 3]), now) for uid in held},
        })


class SQLiteFlagWritesTests(FlagWritesMixin, TestCase):
    pass


class PostgreSQLFlagWritesTests(FlagWritesMixin, TestCase):
    backend = "postgresql"

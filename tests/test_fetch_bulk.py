"""The bulk path of the IMAP client: pipelined UID FETCH read by the lean reader.

The lean FETCH parser must read every reply as the general parser (Twisted's nested-list
reader) does, and hand it anything it does not know; the pipelined commands all go out at
once, each gets exactly its own messages whatever way the bytes are cut, and Twisted's reader
takes the connection back afterwards.
"""

from __future__ import annotations

import datetime
import re
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.fetch import bulk, imap
from mailcore.fetch.bulk import ReplyReader, parse_fetch_reply, parse_internaldate
from mailcore.fetch.errors import LiteralTooLarge, ProtocolFailed
from mailcore.fetch.imap import ARRIVING as _ARRIVING
from mailcore.fetch.imap import (
    FetchItem,
    IMAPClient,
    _parse_internaldate,
    parse_fetch,
    parse_fetch_lean,
)
from mailcore.fetch.jobs import TransientJobError
from mailcore.fetch.migrate import DestinationIndex, FolderPlan, MailboxCopier, Source
from mailcore.fetch.restore import restore
from tests.test_fetch_imap_hostile import failure_of

BODIES = {7: b"Subject: a\r\n\r\none {3}\r\n)(\r\n", 8: b"Subject: \xe9\r\n\r\n\x00\xff",
          9: b"x" * 5000}


def reply(uid: int, body: bytes, *, flags: bytes = b"\\Seen $Label",
          date: bytes = b"14-Nov-2023 22:13:21 +0100", seq: int | None = None) -> bytes:
    return (b"* %d FETCH (UID %d FLAGS (%s) INTERNALDATE \"%s\" RFC822.SIZE %d BODY[] {%d}\r\n"
            % (seq or uid, uid, flags, date, len(body), len(body)) + body + b")\r\n")


def lean(data: bytes) -> Any:
    replies = ReplyReader(max_line=10_000, max_literal=100_000, host="h").feed(data)
    assert len(replies) == 1
    return replies[0]


def general(data: bytes) -> FetchItem:
    return parse_fetch(data[2:-2])


def connected() -> tuple[IMAPClient, StringTransport]:
    client = IMAPClient(Clock(), host="fake", max_literal=100_000)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK ready\r\n")
    return client, transport


class LeanParserTests(TestCase):
    def test_lean_reads_every_usual_shape_as_the_general_parser(self) -> None:
        cases = [
            reply(7, BODIES[7]),
            reply(8, BODIES[8], flags=b"", date=b" 2-Feb-2024 01:02:03 -0730"),
            reply(9, BODIES[9], flags=b"\\Recent \\Flagged"),
            b"* 3 FETCH (UID 3 RFC822.SIZE 4096)\r\n",
            b"* 3 FETCH (RFC822.SIZE 10 UID 3 MODSEQ (12345))\r\n",
            b"* 4 FETCH (UID 4 FLAGS (\\Seen) MODSEQ (77))\r\n",
            b"* 5 FETCH (UID 5 RFC822 {2}\r\nhi)\r\n",
            b"* 5 FETCH (BODY[] {2}\r\nhi UID 5)\r\n",
            b"* 5 FETCH (UID 5 BODY[]<0> {2}\r\nhi)\r\n",
            b"* 6 FETCH (UID 6 INTERNALDATE NIL BODY[] NIL)\r\n",
            b"* 6 FETCH (UID 6 INTERNALDATE \"99-Foo-2024 00:00:00 +0000\")\r\n",
        ]
        for data in cases:
            self.assertIsNotNone(parse_fetch_reply(lean(data)), data)
            self.assertEqual(parse_fetch_lean(lean(data)), general(data), data)

    def test_other_shapes_go_to_the_general_parser_with_the_same_outcome(self) -> None:
        cases = [
            b"* 1 FETCH (UID 1 BODYSTRUCTURE (\"TEXT\" \"PLAIN\" NIL NIL NIL \"7BIT\" 2 1))\r\n",
            b"* 1 FETCH (UID 1 INTERNALDATE \"a \\\"q\\\" b\")\r\n",
        ]
        for data in cases:
            self.assertIsNone(parse_fetch_reply(lean(data)), data)
            self.assertEqual(parse_fetch_lean(lean(data)), general(data), data)
        # A section other than the whole message is read, and left out, by both.
        data = b"* 1 FETCH (UID 1 BODY[HEADER.FIELDS (FROM)] {2}\r\nhi)\r\n"
        self.assertEqual(parse_fetch_lean(lean(data)), general(data))
        self.assertIsNone(general(data).body)
        with self.assertRaises(ProtocolFailed):
            parse_fetch_lean(lean(b"* 1 FETCH (UID 1 FLAGS (\\Seen)\r\n"))

    def test_the_usual_reply_is_read_in_one_match_as_the_loop_reads_it(self) -> None:
        """Dovecot's reply to the sync's UID FETCH goes through one expression (`_USUAL`);
        what it reads is what the item-by-item loop reads of the same reply, and a reply a
        little off that shape goes through the loop."""
        usual = [reply(uid, body, flags=flags, date=date)
                 for uid, body in BODIES.items()
                 for flags in (b"", b"\\Seen", b"\\Seen $Label \\Recent", b"a\\b  c")
                 for date in (b"14-Nov-2023 22:13:21 +0100", b" 2-Feb-2024 01:02:03 -0730",
                              b"30-Feb-2024 00:00:00 +0000", b"soon", b"", b"a {1} b")]
        usual += [reply(0, b"x"), reply(2**64, b"x"), reply(5, b"x", seq=99)]
        off = [data.replace(old, new) for data in usual[:6] for old, new in (
            (b"UID", b"uid"), (b"FLAGS (", b"FLAGS  ("), (b" BODY[]", b" MODSEQ (3) BODY[]"),
            (b"UID %d" % 7, b"UID NIL"), (b"RFC822.SIZE", b"RFC822.SIZE 1 RFC822.SIZE"))]
        for data in usual:
            self.assertIsNotNone(bulk._USUAL.fullmatch(lean(data).lines[0]), data)
        for data in off:
            self.assertIsNone(bulk._USUAL.fullmatch(lean(data).lines[0]), data)
        for data in usual + off:  # what becomes of it is what the general parser makes
            outcomes: list[FetchItem | type[ProtocolFailed]] = []
            for read in (lambda d: parse_fetch_lean(lean(d)), general):
                try:
                    outcomes.append(read(data))
                except ProtocolFailed:
                    outcomes.append(ProtocolFailed)
            self.assertEqual(outcomes[0], outcomes[1], data)
        fast = [parse_fetch_reply(lean(data)) for data in usual + off]
        self.patch(bulk, "_USUAL", re.compile(b"(?!)"))  # matches nothing: the loop alone
        self.assertEqual(fast, [parse_fetch_reply(lean(data)) for data in usual + off])

    def test_internaldate_zones_as_datetime_reads_them(self) -> None:
        """A zone's offset is what datetime.timezone takes (under 24 hours either way, its
        minutes may run past 59), remembered once read; the result is the same instant
        in UTC."""
        for zone in (b"+0000", b"-0000", b"+0100", b"-0730", b"+1400", b"+2359", b"-2359",
                     b"+0075", b"+2400", b"-2400", b"+9999", b"+2360"):
            for _again in range(2):  # the second time, the remembered offset
                value = b"14-Nov-2023 22:13:21 " + zone
                hours, minutes = int(zone[1:3]), int(zone[3:])
                offset = datetime.timedelta(hours=hours, minutes=minutes)
                try:
                    tz = datetime.timezone(-offset if zone.startswith(b"-") else offset)
                except ValueError:
                    self.assertIsNone(parse_internaldate(value), zone)
                    continue
                expected = datetime.datetime(2023, 11, 14, 22, 13, 21, tzinfo=tz)
                got = parse_internaldate(value)
                assert got is not None
                self.assertEqual((got, got.tzinfo), (expected, datetime.UTC), zone)
        # Out of datetime's years once in UTC.
        self.assertIsNone(parse_internaldate(b"31-Dec-9999 23:00:00 -0100"))
        self.assertIsNone(parse_internaldate(b"01-Jan-0001 00:00:00 +0100"))

    def test_internaldate_fast_path_matches_strptime(self) -> None:
        for value in [b"14-Nov-2023 22:13:21 +0100", b" 2-feb-2024 01:02:03 -0730",
                      b"31-Dec-1999 23:59:59 +1400", b"29-Feb-2024 00:00:00 +0000"]:
            slow = datetime.datetime.strptime(
                value.decode().strip(), "%d-%b-%Y %H:%M:%S %z").astimezone(datetime.UTC)
            self.assertEqual(parse_internaldate(value), slow)
            self.assertEqual(_parse_internaldate(value), slow)
        self.assertIsNone(_parse_internaldate(b"30-Feb-2024 00:00:00 +0000"))


class PipelinedFetchTests(TestCase):
    def test_commands_go_out_together_and_each_gets_its_own_messages(self) -> None:
        client, transport = connected()
        first = client.uid_fetch([7, 8], b"UID BODY.PEEK[]")
        second = client.uid_fetch([9], b"UID BODY.PEEK[]")
        # Both on the wire before any reply (Twisted's reader sends one at a time).
        self.assertEqual(transport.value(), b"0001 UID FETCH 7:8 (UID BODY.PEEK[])\r\n"
                                            b"0002 UID FETCH 9 (UID BODY.PEEK[])\r\n")
        stream = (reply(7, BODIES[7]) + b"* 3 EXISTS\r\n" + reply(8, BODIES[8])
                  + b"0001 OK done\r\n" + reply(9, BODIES[9]) + b"0002 OK done\r\n")
        for i in range(len(stream)):  # cut everywhere: one byte at a time
            client.dataReceived(stream[i : i + 1])
        items = self.successResultOf(first)
        self.assertEqual([(i.uid, i.body) for i in items], [(7, BODIES[7]), (8, BODIES[8])])
        self.assertEqual(items[0].flags, ("\\Seen", "$Label"))
        self.assertEqual([(i.uid, i.body) for i in self.successResultOf(second)],
                         [(9, BODIES[9])])

    def test_a_refused_fetch_fails_alone_and_twisted_takes_the_connection_back(self) -> None:
        client, transport = connected()
        refused = client.uid_fetch([7], b"UID BODY.PEEK[]")
        fine = client.uid_fetch([8], b"UID BODY.PEEK[]")
        queued = client.send(b"NOOP")  # waits until the pipelined commands are done
        self.assertNotIn(b"NOOP", transport.value())
        client.dataReceived(b"0001 NO [SERVERBUG] oops\r\n" + reply(8, BODIES[8])
                            + b"0002 OK done\r\n* 9 EXISTS\r\n")
        self.assertIsInstance(self.failureResultOf(refused).value, ProtocolFailed)
        self.assertEqual([i.uid for i in self.successResultOf(fine)], [8])
        self.assertTrue(transport.value().endswith(b"0003 NOOP\r\n"))
        client.dataReceived(b"0003 OK noop\r\n")
        self.assertEqual(self.successResultOf(queued)[1], b"OK noop")
        # And the bulk path again afterwards.
        again = client.uid_fetch([9], b"UID BODY.PEEK[]")
        client.dataReceived(reply(9, BODIES[9]) + b"0004 OK done\r\n")
        self.assertEqual([i.body for i in self.successResultOf(again)], [BODIES[9]])

    def test_bounds_hold_on_the_bulk_path(self) -> None:
        client, transport = connected()
        d = client.uid_fetch([1], b"UID BODY.PEEK[]")
        client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {4294967296}\r\n" + b"x" * 100)
        self.assertIsInstance(self.failureResultOf(d).value, LiteralTooLarge)
        self.assertTrue(transport.disconnecting)

        client, transport = connected()
        client.max_reply_bytes = 10_000
        d = client.uid_fetch([1, 2, 3], b"UID BODY.PEEK[]")
        for uid in (1, 2, 3):
            client.dataReceived(reply(uid, b"y" * 4000))
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn("more than 10000 bytes", str(error))

        client, transport = connected()
        d = client.uid_fetch([1], b"UID BODY.PEEK[]")
        client.dataReceived(b"0009 OK who\r\n")
        self.assertIn("malformed", str(self.failureResultOf(d).value))

    def test_a_lost_connection_fails_every_pipelined_fetch(self) -> None:
        client, _transport = connected()
        ds = [client.uid_fetch([u], b"UID BODY.PEEK[]") for u in (1, 2)]
        client.dataReceived(b"* 1 FETCH (UID 1 BODY[] {10}\r\nabc")
        client.connectionLost(Failure(ConnectionLost()))
        for d in ds:
            self.assertIn("closed", str(self.failureResultOf(d).value))
        self.successResultOf(client.closed)


def size_replies(first: int, last: int) -> bytes:
    return b"".join(b'* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE "01-Jan-2024 00:00:00 '
                    b'+0000")\r\n' % (n, n, n * 10) for n in range(first, last + 1))


async def destination(copier: MailboxCopier, client: IMAPClient,
                      wanted: set[tuple[int, Any]] | None = None,
                      ) -> tuple[int | None, DestinationIndex]:
    """(UIDVALIDITY, the look-alike index of what it holds) of the destination's Archive, as
    a migrate reads them, for messages to copy of the keys `wanted`."""
    opened = await copier._examine(client, b"Archive")
    assert opened is not None
    return opened[0], await copier._held(client, opened[1],
                                         DestinationIndex(wanted or set(), set(), set()))


class SetFetchTests(TestCase):
    """A UID FETCH of a set (b"1:*") goes on the bulk path too: its replies were all parsed
    by Twisted's nested-list reader in the one callback of the tagged OK (about 90 us a
    reply: 100,000 replies held the reactor 9 s)."""

    def test_the_replies_are_parsed_as_they_arrive(self) -> None:
        parsed = [0]

        def counting(parse: Any) -> Any:
            def counted(reply: Any) -> FetchItem:
                parsed[0] += 1
                return parse(reply)  # type: ignore[no-any-return]
            return counted

        self.patch(imap, "parse_fetch", counting(imap.parse_fetch))
        self.patch(imap, "parse_fetch_lean", counting(imap.parse_fetch_lean))
        client, transport = connected()
        d = client.uid_fetch(b"1:*", b"UID RFC822.SIZE INTERNALDATE")
        self.assertEqual(transport.value(),
                         b"0001 UID FETCH 1:* (UID RFC822.SIZE INTERNALDATE)\r\n")
        stream = size_replies(1, 20_000) + b"0001 OK done\r\n"
        slice_lines, most = 0, 0
        for start in range(0, len(stream), 65536):
            chunk = stream[start : start + 65536]
            before = parsed[0]
            client.dataReceived(chunk)
            slice_lines = max(slice_lines, chunk.count(b"\r\n") + 1)
            most = max(most, parsed[0] - before)
        self.assertLessEqual(most, slice_lines)  # never more than what one read brought
        items = self.successResultOf(d)
        self.assertEqual([(i.uid, i.size) for i in items],
                         [(n, n * 10) for n in range(1, 20_001)])
        self.assertEqual({i.internal_date for i in items},
                         {datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)})

    def test_a_set_takes_every_fetch_reply_as_twisteds_reader_did(self) -> None:
        client, transport = connected()
        d = client.uid_fetch(b"1:*", b"UID FLAGS", b"CHANGEDSINCE 5")
        later = client.uid_fetch([9], b"UID BODY.PEEK[]")  # waits: the set is alone
        noop = client.send(b"NOOP")
        self.assertEqual(transport.value(),
                         b"0001 UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 5)\r\n")
        replies = [b"* 1 FETCH (UID 3 FLAGS (\\Seen) MODSEQ (7))\r\n", b"* 2 EXISTS\r\n",
                   b"* 2 FETCH (FLAGS (\\Deleted))\r\n", reply(7, BODIES[7])]
        for data in replies:
            client.dataReceived(data)
        self.assertNotIn(b"0002", transport.value())
        client.dataReceived(b"0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d),
                         [general(r) for r in (replies[0], replies[2], replies[3])])
        self.assertTrue(transport.value().endswith(b"0002 UID FETCH 9 (UID BODY.PEEK[])\r\n"))
        client.dataReceived(reply(9, BODIES[9]) + b"0002 OK done\r\n")
        self.assertEqual([i.body for i in self.successResultOf(later)], [BODIES[9]])
        client.dataReceived(b"0003 OK noop\r\n")
        self.assertEqual(self.successResultOf(noop)[1], b"OK noop")
        refused = client.uid_fetch(b"1:*", b"UID FLAGS")
        client.dataReceived(b"0004 NO [SERVERBUG] oops\r\n")
        self.assertIn("UID FETCH refused by fake: [SERVERBUG] oops",
                      str(self.failureResultOf(refused).value))

    def test_more_replies_than_asked_for_end_the_session(self) -> None:
        client, transport = connected()
        d = client.uid_fetch(b"1:*", b"UID RFC822.SIZE INTERNALDATE", max_items=100)
        client.dataReceived(size_replies(1, 100))
        self.assertNoResult(d)
        client.dataReceived(size_replies(101, 101))
        error = self.failureResultOf(d).value
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn("fake sent more than 100 FETCH replies for one UID FETCH", str(error))
        self.assertTrue(transport.disconnecting)

    def test_migrate_refuses_a_destinations_number_beyond_imaps_as_a_protocol_error(
        self,
    ) -> None:
        # Over 4,300 digits int() raises ValueError: the job ended in an internal error.
        copier = MailboxCopier(*[cast(Any, None)] * 4)
        huge = b"9" * 5000
        cases = [
            (b"* %s EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n" % huge, "EXISTS 999"),
            (b"* 3 EXISTS\r\n* OK [UIDVALIDITY %s] v\r\n" % huge, "UIDVALIDITY 999"),
            (b"* 4294967296 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n", "EXISTS 4294967296"),
        ]
        for examined, what in cases:
            client, transport = connected()
            d = defer.Deferred.fromCoroutine(destination(copier, client))
            client.dataReceived(examined + b"0001 OK done\r\n")
            error = self.failureResultOf(d, TransientJobError).value
            self.assertIn(f"the server sent {what}", str(error))
            self.assertNotIn(b"UID FETCH", transport.value())

    def test_migrate_takes_a_destinations_exists_and_a_margin(self) -> None:
        copier = MailboxCopier(*[cast(Any, None)] * 4)
        for extra, ok in ((_ARRIVING, True), (_ARRIVING + 1, False)):
            client, _transport = connected()
            d = defer.Deferred.fromCoroutine(destination(copier, client))
            client.dataReceived(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n0001 OK done\r\n")
            client.dataReceived(size_replies(1, 3 + extra) + b"0002 OK done\r\n")
            if ok:
                validity, held = self.successResultOf(d)
                self.assertEqual((validity, held.others), (7, 3 + extra))
            else:
                error = self.failureResultOf(d, TransientJobError).value
                self.assertIn(f"more than {3 + _ARRIVING} FETCH replies", str(error))

    def test_migrate_keeps_of_a_destination_what_its_lookups_ask_not_the_reply(self) -> None:
        """A migrate's `UID FETCH 1:*` of a destination folder was kept whole (FetchItems,
        then tuples, then a Counter of every key): 400 MB for 2 million small messages. Each
        reply is now counted as it is read, and only the keys of messages to copy are kept."""
        copier = MailboxCopier(*[cast(Any, None)] * 4)
        client, _transport = connected()
        day = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        wanted = {(70, day), (70, day.replace(tzinfo=None)), (600_000, day), (11, day)}
        d = defer.Deferred.fromCoroutine(destination(copier, client, wanted))
        client.dataReceived(b"* 60000 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n0001 OK done\r\n")
        stream = size_replies(1, 60_000) + size_replies(7, 7) + b"0002 OK done\r\n"
        tracemalloc.start()
        try:
            for start in range(0, len(stream), 65536):
                client.dataReceived(stream[start : start + 65536])
            _now, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        _validity, held = self.successResultOf(d)
        # As the Counter of every key had it: a naive date is no UTC one, 11 is no size there.
        self.assertEqual(held.others, 60_001)
        self.assertEqual(dict(held.settle(set())), {(70, day): 2, (600_000, day): 1})
        # 60,000 FetchItems alone were 17 MB (and their tuples and Counter 14 MB more); the
        # reads themselves, 64 KiB each and their lines, about 0.5 MB.
        self.assertLess(peak, 2_000_000)

    def test_migrate_refuses_a_destination_reply_no_folder_gives(self) -> None:
        """A reply naming a message past the folder's EXISTS and ARRIVING, or a message
        copied there named again and again, ends the session as a protocol error."""
        copier = MailboxCopier(*[cast(Any, None)] * 4)
        client, transport = connected()
        d = defer.Deferred.fromCoroutine(destination(copier, client))
        client.dataReceived(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n0001 OK done\r\n")
        beyond = 4 + _ARRIVING
        client.dataReceived(size_replies(1, 2) + size_replies(beyond, beyond) + b"0002 OK done\r\n")
        error = self.failureResultOf(d, TransientJobError).value
        self.assertIn(f"names message {4 + _ARRIVING} of a folder of at most {3 + _ARRIVING}",
                      str(error))
        self.assertTrue(transport.disconnecting)

        index = DestinationIndex(set(), set(), {2})
        item = general(size_replies(2, 2))
        for _ in range(2 + imap.LIST_SLACK):
            index.add(item)
        with self.assertRaisesRegex(ProtocolFailed, "103 FETCH replies for 1 UIDs"):
            index.add(item)

    def test_a_set_with_a_sink_behind_another_command_is_read_as_it_arrives(self) -> None:
        """Behind a command in flight the set goes on Twisted's reader: its replies are
        handed to the sink as they come, none kept; past `max_items` the session ends."""
        for count, ok in ((3, True), (4, False)):
            client, transport = connected()
            noop = client.send(b"NOOP")
            got: list[FetchItem] = []
            d = client.uid_fetch(b"1:*", b"UID RFC822.SIZE", max_items=3, sink=got.append)
            client.dataReceived(b"0001 OK noop\r\n")
            self.successResultOf(noop)
            self.assertIn(b"0002 UID FETCH 1:* (UID RFC822.SIZE)", transport.value())
            client.dataReceived(size_replies(1, 2) + b"* 2 EXISTS\r\n")
            self.assertEqual([i.uid for i in got], [1, 2])
            client.dataReceived(size_replies(3, count) + b"0002 OK done\r\n")
            if ok:
                self.assertEqual(self.successResultOf(d), [])
                self.assertEqual([i.uid for i in got], [1, 2, 3])
            else:
                self.assertIn("more than 3 FETCH replies", str(self.failureResultOf(d).value))
                self.assertTrue(transport.disconnecting)

    def test_migrate_refuses_a_destination_folder_of_more_messages_than_a_folder_may_hold(
        self,
    ) -> None:
        """An EXISTS near 2^32 bounded the destination's `UID FETCH 1:*` by the bytes bound
        alone (144 MB: millions of FetchItems); the job now ends before it is sent."""
        copier = MailboxCopier(*[cast(Any, None)] * 4)
        client, transport = connected()
        d = defer.Deferred.fromCoroutine(destination(copier, client))
        client.dataReceived(b"* 4294967295 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                            b"0001 OK done\r\n")
        error = self.failureResultOf(d, TransientJobError).value
        self.assertIn("fake says Archive holds 4294967295 messages, more than the "
                      f"{imap.MAX_EXISTS} a folder may hold", str(error))
        self.assertNotIn(b"UID FETCH", transport.value())

    def test_restore_takes_a_search_of_what_the_account_holds_and_a_margin(self) -> None:
        """A restore's SEARCH ALL of a folder took up to MAX_SEARCH (a million) UIDs, each
        parsed and held, whatever the folder's EXISTS said."""
        clients: list[IMAPClient] = []
        copied: list[Any] = []
        copier, job = restore_job(clients, copied)
        for extra, ok in ((_ARRIVING, True), (_ARRIVING + 1, False)):
            client, transport = connected()
            clients.append(client)
            d = defer.Deferred.fromCoroutine(restore(cast(Any, copier), cast(Any, None),
                                                     cast(Any, job)))
            client.dataReceived(b'* LIST () "/" "Archive"\r\n0001 OK listed\r\n')
            client.dataReceived(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n0002 OK done\r\n")
            self.assertIn(b"0003 UID SEARCH ALL", transport.value())
            client.dataReceived(b"* SEARCH " + b" ".join(
                b"%d" % u for u in range(1, 4 + extra)) + b"\r\n0003 OK searched\r\n")
            client.dataReceived(b"* BYE bye\r\n0004 OK bye\r\n")
            if ok:
                self.successResultOf(d)
                self.assertEqual(len(copied), 1)
            else:
                error = self.failureResultOf(d, TransientJobError).value
                self.assertEqual(str(error),
                                 f"fake answered a SEARCH with more than {3 + _ARRIVING} UIDs")
                self.assertEqual(len(copied), 1)  # not copied

    def test_restore_takes_a_listed_folder_dovecot_will_not_open_as_gone(self) -> None:
        """Dovecot lists a folder deleted while it had subfolders (\\HasChildren, not
        \\Noselect) and answers its EXAMINE a plain NO: the restore failed on it as for now,
        every run until the job failed. It is gone: every message goes back. A NO for now
        (UNAVAILABLE), one naming another code (NOPERM: a folder there the login may not
        read, children or not, taken as gone had each message put in twice) or a BAD is
        still an error."""
        clients: list[IMAPClient] = []
        copied: list[Any] = []
        copier, job = restore_job(clients, copied)
        # A plain NO of a folder without children is not Dovecot's answer for one deleted
        # while it had subfolders: Office 365 answers "NO Server Unavailable. 15" for now,
        # and every message taken as gone would go back a second time.
        for answer, flags, gone in ((b"NO Mailbox doesn't exist: Archive", b"\\HasChildren", True),
                                    (b"NO [NONEXISTENT] no such folder", b"\\HasChildren", True),
                                    (b"NO [NONEXISTENT] no such folder", b"", True),
                                    (b"NO Server Unavailable. 15", b"\\HasNoChildren", False),
                                    (b"NO [NOPERM] not yours", b"\\HasChildren", False),
                                    (b"NO [UNAVAILABLE] try later", b"\\HasChildren", False),
                                    (b"BAD Mailbox doesn't exist", b"\\HasChildren", False)):
            client, transport = connected()
            clients.append(client)
            copied.clear()
            d = defer.Deferred.fromCoroutine(restore(cast(Any, copier), cast(Any, None),
                                                     cast(Any, job)))
            client.dataReceived(b'* LIST (' + flags + b') "/" "Archive"\r\n'
                                b'* LIST () "/" "Archive/2023"\r\n0001 OK listed\r\n')
            self.assertIn(b'0002 EXAMINE "Archive"', transport.value())
            client.dataReceived(b"0002 " + answer + b"\r\n")
            client.dataReceived(b"* BYE bye\r\n0003 OK bye\r\n")
            if gone:
                self.successResultOf(d)
                (plans,) = [args[4] for args in copied]
                self.assertEqual([len(plan.candidates) for plan in plans], [1], answer)
            else:
                error = self.failureResultOf(d, TransientJobError).value
                self.assertIn("EXAMINE refused by fake", str(error))
                self.assertEqual(copied, [], answer)


def restore_job(clients: list[IMAPClient], copied: list[Any]) -> tuple[Any, Any]:
    """A copier whose restore reads an account of one backed-up folder, Archive (one message,
    UIDVALIDITY 7, UID 1), through the last of `clients`, and whose copies are put in
    `copied` (their arguments); and the job."""
    account = SimpleNamespace(
        id=5, protocol="imap", host="fake", port=143, use_ssl=False, start_tls=False,
        allow_cleartext=True, username="u", tls_ca_pem=None, tls_fingerprint=None)

    async def nothing(*args: Any, **kw: Any) -> None:
        return None

    async def credentials(account_id: int) -> tuple[Any, str]:
        return account, "pw"

    async def read(name: str, fn: Any, *args: Any) -> Any:
        if name == "mailbox_job_folders":
            return [FolderPlan(1, "Archive", ("Archive",), candidates=[Source(
                id=1, size=10, internal_date=None, message_id="", sha256="0" * 64,
                flags=(), uidvalidity=7, uid=1)])]
        return {}

    async def open_reader(spec: Any, creator: Any) -> IMAPClient:
        return clients[-1]

    async def copy(*args: Any, **kw: Any) -> None:
        copied.append(args)

    copier = SimpleNamespace(
        bring_backup_up_to_date=nothing, backup_synced=nothing, creator=lambda *a: None,
        accounts=SimpleNamespace(credentials=credentials), db=SimpleNamespace(read=read),
        open_reader=open_reader, copy=copy)
    return copier, SimpleNamespace(id=9, account_id=5)


def feed_in_reads(receive: Any, data: bytes, size: int) -> float:
    """Seconds `receive` takes for `data` given `size` bytes at a time."""
    began = time.perf_counter()
    for i in range(0, len(data), size):
        receive(data[i : i + size])
    return time.perf_counter() - began


def lines_fed(reads: list[bytes]) -> list[list[list[bytes]]]:
    """The replies' lines the bulk reader gives for each of `reads`."""
    reader = ReplyReader(max_line=100, max_literal=100, host="fake")
    return [[r.lines for r in reader.feed(data)] for data in reads]


def read_all(reader: ReplyReader, data: bytes, size: int) -> tuple[float, list[Any]]:
    """Seconds the bulk reader takes for `data` given `size` bytes at a time, and the
    replies it read."""
    out: list[Any] = []
    return feed_in_reads(lambda part: out.extend(reader.feed(part)), data, size), out


class LongLineTests(TestCase):
    """Both readers appended each read to what they held and searched all of it again for
    the line's end: a line of 16 MiB read 64 KiB at a time (as TCP gives it) held the
    reactor 6 s, against 0.1 s whole, and a reply of nine such lines a minute."""

    LINE = b"* SEARCH 7 " + b"x" * (15 * 1024 * 1024) + b"\r\n"

    def test_twisteds_reader_takes_a_long_line_in_time_linear_in_its_length(self) -> None:
        times = []
        for size in (len(self.LINE), 65536):
            client, _transport = connected()
            d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
            times.append(feed_in_reads(client.dataReceived, self.LINE + b"0001 OK s\r\n", size))
            self.assertEqual(self.successResultOf(d), [7])
        whole, in_reads = times
        self.assertLess(in_reads, 10 * whole + 0.2, times)

    def test_the_bulk_reader_takes_a_long_line_in_time_linear_in_its_length(self) -> None:
        line = b"* 1 FETCH (UID 1 X-LONG " + b"7" * (15 * 1024 * 1024) + b")\r\n"
        times = []
        for size in (len(line), 65536):
            reader = ReplyReader(max_line=imap.MAX_LINE, max_literal=1000, host="fake")
            seconds, out = read_all(reader, line, size)
            times.append(seconds)
            self.assertEqual([r.lines for r in out], [[line[:-2]]])
        whole, in_reads = times
        self.assertLess(in_reads, 10 * whole + 0.2, times)

    def test_a_bare_lf_in_each_read_does_not_make_a_long_line_quadratic(self) -> None:
        # "No LF in the read" was the test for "no line ends here": an LF alone in each
        # read (no IMAP line end) had the whole line joined and searched at every read,
        # 4 MiB in 1 KiB reads 12.8 s.
        piece = b"7" * 2047 + b"\n"
        body = piece * (4 * 1024 * 1024 // len(piece))
        line = b"* SEARCH 7 " + body + b"\r\n"
        times = []
        for size in (len(line), len(piece)):
            client, _transport = connected()
            d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
            times.append(feed_in_reads(client.dataReceived, line + b"0001 OK s\r\n", size))
            self.assertIn("not a number from 1 to 4294967295", str(failure_of(d)))
        self.assertLess(times[1], 10 * times[0] + 0.2, times)
        fetch = b"* 1 FETCH (UID 1 X-LONG " + body + b")\r\n"
        times = []
        for size in (len(fetch), len(piece)):
            reader = ReplyReader(max_line=imap.MAX_LINE, max_literal=1000, host="fake")
            seconds, out = read_all(reader, fetch, size)
            times.append(seconds)
            self.assertEqual([r.lines for r in out], [[fetch[:-2]]])
        self.assertLess(times[1], 10 * times[0] + 0.2, times)

    def test_an_lf_alone_after_a_held_cr_ends_its_line(self) -> None:
        reads = [b"* SEARCH 4 5\r", b"\n", b"0001 OK s\r", b"\n"]
        self.assertEqual(self.search_in_reads(reads), [4, 5])
        self.assertEqual(lines_fed(reads), [[], [[b"* SEARCH 4 5"]], [], [[b"0001 OK s"]]])

    def test_an_empty_read_between_a_cr_and_its_lf_hides_no_line_end(self) -> None:
        # LineReceiver.resumeProducing passes b"" (TCP never does): kept aside, it was the
        # last piece `ends_line` looked at, and the line waited for another CRLF.
        reads = [b"* SEARCH 4 5\r", b"", b"\n", b"0001 OK s\r", b"", b"\n"]
        self.assertEqual(self.search_in_reads(reads), [4, 5])
        self.assertEqual(lines_fed(reads),
                         [[], [], [[b"* SEARCH 4 5"]], [], [], [[b"0001 OK s"]]])

    def search_in_reads(self, reads: list[bytes]) -> list[int]:
        """What UID SEARCH ALL gives when its replies come in `reads` (Twisted's reader)."""
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
        for data in reads:
            client.dataReceived(data)
        result: list[int] = self.successResultOf(d)
        return result

    def test_a_line_cut_anywhere_is_read_once_whole(self) -> None:
        data = b"* SEARCH 4 5\r\n* SEARCH 6\r\n0001 OK s\r\n"
        for size in (1, 2, 3, 7):
            client, _transport = connected()
            d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
            feed_in_reads(client.dataReceived, data, size)
            self.assertEqual(self.successResultOf(d), [4, 5, 6])
            _seconds, out = read_all(ReplyReader(max_line=100, max_literal=100, host="fake"),
                                     data, size)
            self.assertEqual([r.lines for r in out],
                             [[b"* SEARCH 4 5"], [b"* SEARCH 6"], [b"0001 OK s"]])

    def test_a_line_over_the_bound_still_fails_read_by_read(self) -> None:
        client, transport = connected()
        self.patch(client, "MAX_LENGTH", 1000)
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
        feed_in_reads(client.dataReceived, b"* SEARCH " + b"7 " * 600, 100)
        self.assertTrue(transport.disconnecting)
        self.assertIn("sent a line longer than 1000 bytes", str(failure_of(d)))
        reader = ReplyReader(max_line=1000, max_literal=100, host="fake")
        with self.assertRaises(ProtocolFailed):
            feed_in_reads(reader.feed, b"* SEARCH " + b"7 " * 600, 100)

    def test_starttls_discards_what_followed_its_ok_read_in_pieces(self) -> None:
        client, transport = connected()
        transport.startTLS = lambda creator: None  # type: ignore[attr-defined]
        d = defer.Deferred.fromCoroutine(client.starttls(cast(Any, None)))
        client.dataReceived(b"0001 OK g")  # kept aside: no line ends in it
        client.dataReceived(b"o\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n* OK inj")
        client.dataReceived(b"ected")  # (over TLS this is ciphertext)
        self.assertEqual(client.clearLineBuffer(), b"ected")
        client.dataReceived(b"* CAPABILITY IMAP4rev1\r\n0002 OK caps\r\n")
        self.assertEqual(self.successResultOf(d), {"IMAP4REV1"})

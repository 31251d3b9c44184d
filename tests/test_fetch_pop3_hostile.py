"""A hostile or broken POP3 server gives a clear error on that account, never a crash, a
memory blow-up or a message silently lost.

Stock `POP3Client.listUID()`/`listSize()` pad a list up to whatever message number the
server names (a 16-byte UIDL line "200000000 big" allocated gigabytes on the reactor), take
what int() takes ("1_0", "+1") and put number 0 at index -1, over another message. Besides:
a UIDL given to two messages, or not one of RFC 1939, is refused by name; a message that
comes back over the size limit is skipped and the others are fetched; a cancelled sync drops
the connection, and QUIT waits a few seconds at most; a date limit reads headers (TOP), not
whole messages. The unit groups drive the session over a StringTransport and a Clock;
HostileServerTests runs the whole engine against a scripted server on a real loopback socket.
"""

from __future__ import annotations

import datetime
import random
import tracemalloc
from collections.abc import Sequence
from email.utils import format_datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import delete, select
from twisted.internet import defer, protocol, task
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.fetch.engine import POP_REOPENS
from mailcore.fetch.errors import INTERNAL_ERROR, CommandTimeout, ProtocolFailed
from mailcore.fetch.pop3 import (
    MAX_CAPA,
    MAX_HEADER,
    QUIT_WAIT,
    Listing,
    MessageTooLarge,
    OutOfStep,
    POP3Session,
)
from mailcore.messages.models import FetchedMessage, Location, StoreResult
from mailcore.store.schema import message_blobs, message_pop_sizes, messages
from tests.support.db import MixinBase
from tests.support.fetchenv import FetchEnv, make_env
from tests.support.reactor import get_reactor
from tests.support.servers import sleep
from tests.test_fetch_bulk import feed_in_reads


def connected(**kw: Any) -> tuple[POP3Session, StringTransport]:
    session = POP3Session(Clock(), host="fake", **kw)
    transport = StringTransport()
    session.makeConnection(transport)
    session.dataReceived(b"+OK fake POP3\r\n")
    transport.clear()
    return session, transport


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addErrback(box.append)
    assert box, "the Deferred did not fail"
    return box[0].value


def listing_of(uidl: list[bytes], sizes: list[bytes], count: int = 3) -> defer.Deferred[Any]:
    """`POP3Session.listing()` fed STAT (`count`), the UIDL lines and the LIST lines."""
    session, _transport = connected()
    d = defer.Deferred.fromCoroutine(session.listing())
    for reply in (b"+OK %d 300\r\n" % count,
                  b"+OK\r\n" + b"".join(line + b"\r\n" for line in uidl) + b".\r\n",
                  b"+OK\r\n" + b"".join(line + b"\r\n" for line in sizes) + b".\r\n"):
        if session._dead:
            break
        session.dataReceived(reply)
    if session._dead:
        session.connectionLost(Failure(ConnectionDone()))
    return d


class ListingUnitTests(TestCase):
    def test_listing_pairs_uidl_and_list_by_message_number(self) -> None:
        d = listing_of([b"1 u1", b"3 u3", b"2 u2"], [b"1 10", b"2 20", b"3 30 extra"])
        self.assertEqual(self.successResultOf(d),
                         Listing([(0, "u1", 10), (1, "u2", 20), (2, "u3", 30)], []))

    def test_a_message_list_leaves_out_has_an_unknown_size(self) -> None:
        d = listing_of([b"1 u1", b"2 u2", b"3 u3"], [b"1 10", b"3 30"])
        self.assertEqual(self.successResultOf(d),
                         Listing([(0, "u1", 10), (1, "u2", None), (2, "u3", 30)], []))

    def test_a_message_uidl_leaves_out_is_told(self) -> None:
        d = listing_of([b"1 u1", b"3 u3"], [b"1 10", b"2 20", b"3 30"], count=4)
        self.assertEqual(self.successResultOf(d), Listing([(0, "u1", 10), (2, "u3", 30)], [2, 4]))

    def test_a_number_beyond_stat_fails_at_once_without_padding_a_list(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.listing())
        self.assertEqual(transport.value(), b"STAT\r\n")
        session.dataReceived(b"+OK 1 100\r\n")
        self.assertEqual(transport.value(), b"STAT\r\nUIDL\r\n")
        session.dataReceived(b"+OK\r\n1 u1\r\n200000000 big\r\n3 more\r\n.\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        error = failure_of(d)
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), "UIDL from fake names message 200000000; STAT said the "
                                     "mailbox holds 1")

    def test_numbers_are_digits_from_one_listed_once(self) -> None:
        for lines, message in [
            ([b"0 evil"], "UIDL from fake names message 0; STAT said the mailbox holds 3"),
            ([b"1_0 ten"], "malformed UIDL line from fake: 1_0 ten"),
            ([b"+1 one"], "malformed UIDL line from fake: +1 one"),
            ([b"-3 x"], "malformed UIDL line from fake: -3 x"),
            ([b" 1 x"], "malformed UIDL line from fake:  1 x"),
            ([b"garbage"], "malformed UIDL line from fake: garbage"),
            ([b"1 a", b"1 b"], "UIDL from fake lists message 1 twice"),
        ]:
            error = failure_of(listing_of(lines, [b"1 10"]))
            self.assertIsInstance(error, ProtocolFailed)
            self.assertEqual(str(error), message)
        error = failure_of(listing_of([b"1 u1"], [b"1 1e3"]))
        self.assertEqual(str(error), "malformed LIST line from fake: 1 1e3")
        error = failure_of(listing_of([b"1 u1"], [b"4 10"]))
        self.assertEqual(str(error), "LIST from fake names message 4; STAT said the mailbox "
                                     "holds 3")

    def test_a_uidl_is_printable_ascii_of_1_to_70_given_once(self) -> None:
        for lines, message in [
            ([b"1 u1", b"2 same", b"3 same"], "fake gives UIDL same to messages 2 and 3"),
            ([b"1 a\xe9", b"2 a\xe8"], "fake gives message 1 the UIDL a\\xe9, not 1 to 70 "
                                        "characters from 0x21 to 0x7E (RFC 1939)"),
            ([b"1 nul\x00id"], "fake gives message 1 the UIDL nul\\x00id, not 1 to 70 "
                               "characters from 0x21 to 0x7E (RFC 1939)"),
            ([b"2 a b"], "fake gives message 2 the UIDL a\\x20b, not 1 to 70 characters "
                         "from 0x21 to 0x7E (RFC 1939)"),
            ([b"1 " + b"L" * 71], "fake gives message 1 the UIDL " + "L" * 71 + ", not 1 to 70 "
                                  "characters from 0x21 to 0x7E (RFC 1939)"),
        ]:
            error = failure_of(listing_of(lines, [b"1 10"]))
            self.assertIsInstance(error, ProtocolFailed)
            self.assertEqual(str(error), message)
        d = listing_of([b"1 " + b"L" * 70, b"2 !~"], [])
        self.assertEqual(self.successResultOf(d).messages,
                         [(0, "L" * 70, None), (1, "!~", None)])

    def test_a_bad_uidl_fails_as_it_comes_not_once_the_reply_ends(self) -> None:
        """What is held while the reply comes is bounded too: a hostile server could send a
        million lines of a MiB each."""
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.listing())
        session.dataReceived(b"+OK 2 300\r\n+OK\r\n1 " + b"L" * 100_000 + b"\r\n2 u2\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertIn("gives message 1 the UIDL LLLL", str(failure_of(d)))

    def test_a_server_without_stat_has_its_numbers_bounded_by_max_messages(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.listing())
        session.dataReceived(b"-ERR no STAT here\r\n")
        self.assertEqual(transport.value(), b"STAT\r\nUIDL\r\n")
        session.dataReceived(b"+OK\r\n1 u1\r\n2 u2\r\n.\r\n+OK\r\n1 10\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), Listing([(0, "u1", 10), (1, "u2", None)], []))
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.listing())
        session.dataReceived(b"-ERR no STAT here\r\n+OK\r\n1000001 x\r\n.\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(str(failure_of(d)), "UIDL from fake names message 1000001; a sync "
                                             "takes at most 1000000")

    def test_stat_is_digits_and_bounded(self) -> None:
        for stat, message in [
            (b"+OK 1_000 9", "malformed STAT reply from fake: 1_000 9"),
            (b"+OK 99999999 9", "fake holds 99999999 messages, more than the 1000000 a sync "
                                "takes"),
        ]:
            session, transport = connected()
            d = defer.Deferred.fromCoroutine(session.listing())
            session.dataReceived(stat + b"\r\n")
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"STAT\r\n")  # no UIDL asked
            self.assertEqual(str(failure_of(d)), message)


class CapabilityUnitTests(TestCase):
    def test_capa_gives_the_capability_names(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.ask_capabilities())
        self.assertEqual(transport.value(), b"CAPA\r\n")
        session.dataReceived(b"+OK\r\nstls\r\nSASL PLAIN LOGIN\r\nUIDL\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), {"STLS", "SASL", "UIDL"})
        d = defer.Deferred.fromCoroutine(session.ask_capabilities())
        session.dataReceived(b"-ERR no CAPA\r\n")  # RFC 2449 is optional: none known
        self.assertEqual(self.successResultOf(d), set())
        self.assertIsNone(session.error)

    def test_a_capa_reply_is_bounded_as_it_comes(self) -> None:
        """Twisted's capabilities() kept every line of the reply in a dict, however many: a
        hostile server (any host an account names, before the login) could send distinct
        lines until the daemon ran out of memory."""
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.ask_capabilities())
        session.dataReceived(b"+OK\r\n")
        for i in range(20_000):
            if session._dead:
                break
            session.dataReceived(b"X%d %s\r\n" % (i, b"y" * 1000))
        self.assertTrue(transport.disconnecting)
        self.assertLess(i, 100)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(str(failure_of(d)),
                         f"fake sent a CAPA reply longer than {MAX_CAPA} bytes")


class RetrieveUnitTests(TestCase):
    def test_a_message_over_the_bound_is_read_to_its_end_and_the_session_goes_on(
        self,
    ) -> None:
        session, transport = connected(max_message=100)
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\n" + b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
        error = failure_of(d)
        self.assertIsInstance(error, MessageTooLarge)
        self.assertEqual(str(error), "message 1 on fake is over the limit of 100 bytes")
        self.assertFalse(transport.disconnecting)
        self.assertIsNone(session.error)
        transport.clear()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(1))
        self.assertEqual(transport.value(), b"RETR 2\r\n")
        session.dataReceived(b"+OK\r\nSubject: x\r\n\r\n..dot\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), b"Subject: x\r\n\r\n.dot\r\n")


    def test_a_message_of_short_lines_is_held_at_about_its_size(self) -> None:
        # A line kept as a bytes object of its own costs some 35 bytes besides its
        # octets: 256 KiB of 2-byte lines held 2.8 MiB, and 11 MiB at its join.
        size = 256 * 1024
        session, _transport = connected()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\n")
        block = b"ab\r\n" * 4096
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(size // len(block)):
                session.dataReceived(block)
            session.dataReceived(b".\r\n")
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        self.assertEqual(self.successResultOf(d), b"ab\r\n" * (size // 4))
        self.assertLess(peak, 3 * size, f"peak {peak} bytes for a message of {size}")

    def test_a_header_is_read_by_top_and_bounded(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.header(2))
        self.assertEqual(transport.value(), b"TOP 3 0\r\n")
        session.dataReceived(b"+OK\r\nDate: x\r\n\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), b"Date: x\r\n\r\n")
        d = defer.Deferred.fromCoroutine(session.header(0))
        session.dataReceived(b"+OK\r\n" + (b"X: " + b"y" * 1000 + b"\r\n") * 300 + b".\r\n")
        self.assertEqual(str(failure_of(d)), "the header of message 1 on fake is over the limit "
                         f"of {MAX_HEADER} bytes")
        self.assertIsNone(session.error)


class LongLineUnitTests(TestCase):
    """LineOnlyReceiver joined each read to what it held of the line and searched it all
    again for CRLF: a line of 1 MiB (MAX_LENGTH) trickled 256 bytes at a time held the
    reactor 2.6 s, and a RETR may be a hundred such lines."""

    def test_a_long_line_in_small_reads_costs_time_linear_in_its_length(self) -> None:
        line = b"x" * (POP3Session.MAX_LENGTH - 2)
        times = []
        for size in (len(line) + 20, 256):
            session, _transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            times.append(feed_in_reads(session.dataReceived,
                                       b"+OK\r\n" + line + b"\r\n.\r\n", size))
            self.assertEqual(self.successResultOf(d), line + b"\r\n")
        whole, in_reads = times
        self.assertLess(in_reads, 10 * whole + 0.2, times)

    def test_a_reply_cut_anywhere_is_read_as_whole(self) -> None:
        for size in (1, 2, 3, 7):
            session, _transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            feed_in_reads(session.dataReceived,
                          b"+OK\r\nSubject: x\r\n\r\n..dot\rcr\nlf\r\n.\r\n", size)
            self.assertEqual(self.successResultOf(d), b"Subject: x\r\n\r\n.dot\rcr\nlf\r\n")
            self.assertIsNone(session.error)

    def test_a_line_over_the_bound_in_small_reads_fails_the_session(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\n")
        for _ in range(POP3Session.MAX_LENGTH // 4096 + 1):
            session.dataReceived(b"x" * 4096)
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(str(failure_of(d)),
                         f"fake sent a line longer than {POP3Session.MAX_LENGTH}")


class ShortLineUnitTests(TestCase):
    """A message's lines were read one Python call each (and several more in Twisted's
    client): 16 MiB of 2-byte lines held the reactor 8 s, and a RETR may be twice
    max_message_bytes. Now the lines of a read go to the message in one piece."""

    def test_short_lines_cost_no_more_than_long_ones(self) -> None:
        times = []
        for line in (b"x" * 998, b"ab"):
            session, _transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            block = (line + b"\r\n") * (65536 // (len(line) + 2))
            times.append(feed_in_reads(session.dataReceived,
                                       b"+OK\r\n" + block * 64 + b".\r\n", 65536))
            self.assertEqual(self.successResultOf(d), block * 64)
        long_lines, short_lines = times
        self.assertLess(short_lines, 10 * long_lines + 0.2, times)

    def test_dot_lines_are_unstuffed_wherever_the_reads_cut(self) -> None:
        lines = [b"..", b"...", b"..x", b".y", b"", b"a.b", b"..", b".\r.", b"z", b"...."]
        sent = b"".join(line + b"\r\n" for line in lines)
        # Twisted's client a line at a time: a line beginning ".." loses one ".".
        expected = b"".join((line[1:] if line.startswith(b"..") else line) + b"\r\n"
                            for line in lines)
        for size in (1, 2, 3, 4, 5, 7, 11, len(sent) + 8):
            session, _transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            feed_in_reads(session.dataReceived, b"+OK\r\n" + sent + b".\r\n", size)
            self.assertEqual(self.successResultOf(d), expected, size)
            self.assertIsNone(session.error)

    def test_a_long_line_among_short_ones_in_one_read_fails_the_session(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\nab\r\n" + b"x" * (POP3Session.MAX_LENGTH + 1)
                             + b"\r\nab\r\n.\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(str(failure_of(d)),
                         f"fake sent a line longer than {POP3Session.MAX_LENGTH}")

    def test_random_replies_cut_at_random_read_as_a_line_at_a_time(self) -> None:
        # Against Twisted's reading a line at a time (a line beginning ".." loses one
        # "."): dot lines, a CR or LF alone, NUL, a CRLF or the ending ".\r\n" cut by a
        # read, messages over max_message (skipped, or the session dropped past twice it).
        rnd = random.Random(47)
        pieces = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\0", b"\r.", b"\n..", b"x" * 30]
        for case in range(300):
            limit = (40, 120, 1 << 20)[case % 3]
            body = b"".join(b"".join(rnd.choices(pieces, k=rnd.randrange(6))) + b"\r\n"
                            for _ in range(rnd.randrange(12)))
            # Its lines as the server cuts them ("\r" and "\n.." make a CRLF too), none
            # the line "." (a server stuffs it).
            lines = [b".." if line == b"." else line for line in body.split(b"\r\n")[:-1]]
            sent = b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"
            expected = b"".join((line[1:] if line.startswith(b"..") else line) + b"\r\n"
                                for line in lines)
            cuts = sorted(rnd.sample(range(1, len(sent)), rnd.randrange(min(len(sent), 16))))
            if case % 10 == 0:
                cuts = list(range(1, len(sent)))
            bounds = [0, *cuts, len(sent)]
            top = case % 4 == 3
            session, transport = connected(max_message=limit)
            d = defer.Deferred.fromCoroutine(
                session.header(0) if top else session.retrieve_bytes(0))
            for start, stop in pairwise(bounds):
                session.dataReceived(sent[start:stop])
            what = (case, sent, cuts)
            if len(expected) > 2 * limit:
                self.assertTrue(transport.disconnecting, what)
                self.assertIsInstance(session.error, MessageTooLarge, what)
                session.connectionLost(Failure(ConnectionDone()))
                self.assertIsInstance(failure_of(d), MessageTooLarge)
                continue
            if len(expected) > limit:
                self.assertIsInstance(failure_of(d), MessageTooLarge)
            else:
                self.assertEqual(self.successResultOf(d), expected, what)
            self.assertIsNone(session.error, what)
            confirmed = defer.Deferred.fromCoroutine(session.confirm())
            session.dataReceived(b"+OK\r\n")
            self.assertIsNone(self.successResultOf(confirmed))
            self.assertFalse(transport.disconnecting, what)


class OutOfStepUnitTests(TestCase):
    """A RETR reply that goes on after its end (a line "." not byte-stuffed) fails the
    session, naming the message that was cut, whether the rest came in the same read or
    later, where the next reply was due."""

    def test_the_rest_in_the_same_read_fails_that_retr(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(1))
        session.dataReceived(b"+OK\r\nhead\r\n.\r\nrest\r\n.\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        error = failure_of(d)
        assert isinstance(error, OutOfStep)
        self.assertEqual((str(error), error.index), (
            "fake sent more after the end of message 2 (a line '.' in it not byte-stuffed, "
            "RFC 1939 3?)", 1))

    def test_the_rest_where_the_next_reply_is_due_names_the_message_before(self) -> None:
        for next_command in ("retr", "confirm"):
            session, transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(1))
            session.dataReceived(b"+OK\r\nhead\r\n.\r\n")
            self.assertEqual(self.successResultOf(d), b"head\r\n")  # cut: not yet known
            following: defer.Deferred[Any] = defer.Deferred.fromCoroutine(
                session.retrieve_bytes(2) if next_command == "retr"
                else session.confirm())  # type: ignore[arg-type]
            session.dataReceived(b"rest\r\n.\r\n+OK\r\n")
            self.assertTrue(transport.disconnecting)
            session.connectionLost(Failure(ConnectionDone()))
            error = failure_of(following)
            assert isinstance(error, OutOfStep)
            self.assertEqual((str(error), error.index), (
                "fake sent more after the end of message 2: rest came where a reply was due "
                "(a line '.' not byte-stuffed, RFC 1939 3?)", 1))

    def test_a_reply_in_step_confirms_the_message_before(self) -> None:
        for answer in (b"+OK\r\n", b"-ERR no NOOP here\r\n"):
            session, transport = connected()
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            session.dataReceived(b"+OK\r\nx\r\n..\r\ny\r\n.\r\n")
            self.assertEqual(self.successResultOf(d), b"x\r\n.\r\ny\r\n")
            transport.clear()
            confirmed = defer.Deferred.fromCoroutine(session.confirm())
            self.assertEqual(transport.value(), b"NOOP\r\n")
            session.dataReceived(answer)
            self.assertIsNone(self.successResultOf(confirmed))
            self.assertFalse(transport.disconnecting)
            self.assertIsNone(session.error)


class OutOfTurnUnitTests(TestCase):
    def test_lines_outside_any_command_are_dropped_and_logged_once(self) -> None:
        """Twisted's client logs each line a server sends between commands, whole (up to the
        1 MiB line bound, repr'd): a server sending distinct lines while a batch is stored
        wrote them to the daemon's log as fast as it sent them."""
        events: list[Any] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        session, transport = connected()
        for i in range(100):
            session.dataReceived(b"+OK junk %d %s\r\n" % (i, b"z" * 10_000))
        texts = [formatEvent(e) for e in events]
        self.assertEqual(len(texts), 1, [t[:80] for t in texts[:3]])
        self.assertLess(len(texts[0]), 300)
        self.assertIn("fake sent a line outside any command: +OK junk 0 zzz", texts[0])
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))  # still in step
        self.assertEqual(transport.value(), b"RETR 1\r\n")
        session.dataReceived(b"+OK\r\nx\r\n.\r\n")
        self.assertEqual(self.successResultOf(d), b"x\r\n")


class DeadlineUnitTests(TestCase):
    def session(self) -> tuple[POP3Session, StringTransport, Clock]:
        clock = Clock()
        session = POP3Session(clock, host="fake", idle_timeout=30, command_timeout=100)
        transport = StringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        return session, transport, clock

    def test_a_trickled_reply_ends_at_the_command_deadline(self) -> None:
        """Each line restarts the idle timer: a server sending one every 20 s held a sync
        (and one of the engine's max_concurrent slots) for ever."""
        session, transport, clock = self.session()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\n")
        for _ in range(4):
            clock.advance(20)
            session.dataReceived(b"more\r\n")
        self.assertNoResult(d)
        clock.advance(20)
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        error = failure_of(d)
        self.assertIsInstance(error, CommandTimeout)
        self.assertEqual(str(error), "fake answered no command for 100 s")

    def test_each_command_has_a_whole_deadline_and_none_is_left_after_it(self) -> None:
        session, transport, clock = self.session()
        for _ in range(3):
            d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
            clock.advance(25)
            session.dataReceived(b"+OK\r\n")
            clock.advance(25)
            session.dataReceived(b"x\r\n.\r\n")
            self.assertEqual(self.successResultOf(d), b"x\r\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # the idle timer alone


class EndingUnitTests(TestCase):
    def test_a_cancelled_command_drops_the_connection_and_says_cancelled(self) -> None:
        session, transport = connected()
        d = defer.Deferred.fromCoroutine(session.retrieve_bytes(0))
        session.dataReceived(b"+OK\r\npartial\r\n")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)  # not "RETR failed on fake: "
        self.assertTrue(transport.disconnecting)
        transport.clear()
        self.successResultOf(defer.Deferred.fromCoroutine(session.close_session()))
        self.assertEqual(transport.value(), b"")  # no QUIT

    def test_quit_waits_a_few_seconds_for_its_reply(self) -> None:
        clock = Clock()
        session = POP3Session(clock, host="fake", idle_timeout=120.0)
        transport = StringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        d = defer.Deferred.fromCoroutine(session.close_session())
        self.assertEqual(transport.value(), b"QUIT\r\n")
        clock.advance(QUIT_WAIT - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)
        session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_an_answered_quit_leaves_no_timer(self) -> None:
        clock = Clock()
        session = POP3Session(clock, host="fake", idle_timeout=0)
        transport = StringTransport()
        session.makeConnection(transport)
        session.dataReceived(b"+OK fake POP3\r\n")
        d = defer.Deferred.fromCoroutine(session.close_session())
        session.dataReceived(b"+OK bye\r\n")
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])


# -- a scripted server on a real socket -------------------------------------------------


def message(i: int) -> bytes:
    return (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: m%d\r\n"
            b"Message-ID: <m%d@example.test>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
            b"\r\nbody %d\r\n" % (i, i, i))


class FakePOP3(LineReceiver):
    """Speaks just enough POP3; `factory.hooks` override replies per command."""

    factory: FakePOP3Factory
    transport: Any

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.sendLine(b"+OK fake POP3 ready")

    def lineReceived(self, line: bytes) -> None:
        f = self.factory
        f.received.append(line)
        name, _, arg = line.partition(b" ")
        hook = f.hooks.get(name.upper().decode())
        if hook is not None and hook(self, arg) is not None:
            return
        if name == b"CAPA":
            self.transport.write(b"+OK\r\nUIDL\r\nUSER\r\n.\r\n")
        elif name in (b"USER", b"PASS", b"NOOP"):
            self.sendLine(b"+OK")
        elif name == b"STAT":
            self.sendLine(b"+OK %d %d" % (len(f.messages), sum(map(len, f.messages))))
        elif name in (b"UIDL", b"LIST"):
            lines = f.uidl_lines() if name == b"UIDL" else f.list_lines()
            self.transport.write(b"+OK\r\n" + b"".join(x + b"\r\n" for x in lines) + b".\r\n")
        elif name == b"RETR":
            f.retrieved.append(int(arg))
            body = f.messages[int(arg) - 1]
            stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n"
                               for x in body.split(b"\r\n")[:-1])
            self.transport.write(b"+OK\r\n" + stuffed + b".\r\n")
        elif name == b"TOP":
            number, _, count = arg.partition(b" ")
            f.tops.append(int(number))
            assert count == b"0"
            head = f.messages[int(number) - 1].split(b"\r\n\r\n", 1)[0]
            self.transport.write(b"+OK\r\n" + head + b"\r\n\r\n.\r\n")
        elif name == b"QUIT":
            self.sendLine(b"+OK bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"-ERR unknown command")


class FakePOP3Factory(protocol.ServerFactory):
    protocol = FakePOP3  # type: ignore[assignment]

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.uidls: list[bytes] | None = None  # "uid-N" unless set
        self.uidl: list[bytes] | None = None  # the UIDL reply's lines, when set
        self.list: list[bytes] | None = None  # the LIST reply's lines, when set
        self.sizes: list[int] | None = None  # the real sizes unless set
        self.hooks: dict[str, Any] = {}
        self.received: list[bytes] = []
        self.retrieved: list[int] = []
        self.tops: list[int] = []
        self.connections: list[FakePOP3] = []
        self.port = 0  # set when it listens

    def uidl_lines(self) -> list[bytes]:
        if self.uidl is not None:
            return self.uidl
        uidls = self.uidls or [b"uid-%d" % (i + 1) for i in range(len(self.messages))]
        return [b"%d %s" % (i + 1, u) for i, u in enumerate(uidls)]

    def list_lines(self) -> list[bytes]:
        if self.list is not None:
            return self.list
        sizes = self.sizes or [len(m) for m in self.messages]
        return [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)]

    def close_all(self) -> None:
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.loseConnection()


def batch_bytes_stored(env: FetchEnv) -> list[int]:
    """The bytes of each batch the engine will store, as it stores them."""
    held: list[int] = []
    store_batch = env.store.store_batch

    async def recording(where: Location, fetched: Sequence[FetchedMessage], *args: Any,
                        **kw: Any) -> StoreResult:
        held.append(sum(len(f.raw) for f in fetched))
        return await store_batch(where, fetched, *args, **kw)

    env.store.store_batch = recording  # type: ignore[method-assign]
    return held


class HostileServerTests(TestCase):
    timeout = 30

    async def account(self, factory: FakePOP3Factory, limit: tuple[str, int] = ("all", 0),
                      **settings: Any) -> tuple[FetchEnv, Any]:
        port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.close_all)
        factory.port = port.getHost().port
        env = await make_env(self, **settings)
        account = await env.accounts.create(
            env.user_id, protocol="pop", host="127.0.0.1", port=port.getHost().port,
            username="alice", password="pw", allow_cleartext=True, start_tls=False,
            email="alice@example.test", sync_limit_type=limit[0], sync_limit_value=limit[1],
        )
        return env, account

    async def sync(self, factory: FakePOP3Factory, **settings: Any) -> tuple[Any, FetchEnv, Any]:
        env, account = await self.account(factory, **settings)
        return await env.engine.sync(account.id), env, account

    async def test_a_number_beyond_the_mailbox_is_a_folder_error(self) -> None:
        factory = FakePOP3Factory([message(1)])
        factory.uidl = [b"1 u1", b"2000000 big"]
        result, env, account = await self.sync(factory)
        self.assertEqual(result.status, "error")
        self.assertEqual(result.problems(), f"INBOX: UIDL from 127.0.0.1:{factory.port} names "
                         "message 2000000; STAT said the mailbox holds 1")
        self.assertEqual(factory.retrieved, [])
        self.assertEqual(await env.count(account.id), 0)

    async def test_message_number_zero_is_refused_not_put_over_another(self) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        factory.uidl = [b"1 u1", b"2 u2", b"0 evil"]
        result, env, account = await self.sync(factory)
        self.assertEqual(result.status, "error")
        self.assertIn("names message 0", result.problems() or "")
        self.assertEqual(await env.count(account.id), 0)

    async def test_two_messages_with_one_uidl_fail_the_folder_and_none_is_dropped(
        self,
    ) -> None:
        factory = FakePOP3Factory([message(1), message(2), message(3)])
        factory.uidls = [b"same", b"same", b"other"]
        result, env, account = await self.sync(factory)
        self.assertEqual(result.status, "error")
        self.assertEqual(result.problems(),
                         f"INBOX: 127.0.0.1:{factory.port} gives UIDL same to messages 1 and 2")
        self.assertEqual(await env.count(account.id), 0)
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertIn("gives UIDL same to messages 1 and 2", stored.sync_error or "")

    async def test_8bit_nul_and_long_uidls_are_refused_by_name(self) -> None:
        for uidls, shown in [([b"a\xe9", b"a\xe8"], "a\\xe9"),  # were both "a\ufffd"
                             ([b"ok-1", b"nul\x00id"], "nul\\x00id"),
                             ([b"ok-1", b"L" * 300], "L" * 80 + "...")]:
            factory = FakePOP3Factory([message(1), message(2)])
            factory.uidls = uidls
            result, env, account = await self.sync(factory)
            self.assertEqual(result.status, "error")
            self.assertIn(f"the UIDL {shown}, not 1 to 70 characters", result.problems() or "")
            self.assertEqual(await env.count(account.id), 0)

    async def test_a_fault_of_ours_shows_a_fixed_text_and_logs_the_traceback(self) -> None:
        """On PostgreSQL a failed insert's text is the SQL with its parameters: a message's
        headers and body, which the account's owner must not be shown as the sync error."""
        factory = FakePOP3Factory([message(1)])
        env, account = await self.account(factory)

        async def broken(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("INSERT INTO messages ... parameters: Subject: m1, body 1")

        env.store.store_batch = broken  # type: ignore[method-assign]
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.error), ("error", INTERNAL_ERROR))
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertEqual((stored.sync_status, stored.sync_error), ("error", INTERNAL_ERROR))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_a_message_over_the_limit_whose_list_size_lied_is_skipped(self) -> None:
        big = message(1) + b"x" * 3000 + b"\r\n"
        factory = FakePOP3Factory([big, message(2), message(3)])
        factory.sizes = [10, 10, 10]
        env, account = await self.account(factory, max_message_bytes=2000)
        skipped = ("INBOX: message uid-1 came back over the limit of 2000 bytes (LIST said "
                   "10 bytes); not fetched")
        for new in (2, 0):  # the next sync skips it again, and nothing else
            result = await env.engine.sync(account.id)
            self.assertEqual((result.status, result.new_messages, result.problems()),
                             ("error", new, skipped))
        self.assertEqual(await env.count(account.id), 2)
        self.assertEqual(factory.retrieved, [1, 2, 3, 1])
        self.assertEqual(len(factory.connections), 2)  # one session a sync

    async def test_a_message_far_over_the_limit_ends_the_session_and_a_new_one_goes_on(
        self,
    ) -> None:
        huge = message(2) + (b"x" * 998 + b"\r\n") * 10
        factory = FakePOP3Factory([message(1), huge, message(3), huge])
        factory.list = [b"1 10", b"3 10", b"4 9999"]
        result, env, account = await self.sync(factory, max_message_bytes=2000)
        self.assertEqual((result.status, result.new_messages), ("error", 2))
        self.assertEqual(result.problems(), "INBOX: message uid-4 is 9999 bytes, over the "
                         "limit; not fetched; message uid-2 came back over the limit of 2000 "
                         "bytes (LIST said no size); not fetched")
        self.assertEqual(await env.count(account.id), 2)
        self.assertEqual(factory.retrieved, [1, 2, 3])
        self.assertEqual(len(factory.connections), 2)

    async def test_new_sessions_after_messages_far_over_the_limit_are_bounded(self) -> None:
        huge = message(0) + (b"x" * 998 + b"\r\n") * 10
        factory = FakePOP3Factory([huge] * (POP_REOPENS + 2))
        factory.sizes = [10] * (POP_REOPENS + 2)
        result, _env, _account = await self.sync(factory, max_message_bytes=2000)
        self.assertEqual(result.status, "error")
        self.assertTrue((result.problems() or "").endswith(
            f"{POP_REOPENS + 1} messages ran far over the size limit or went on after their "
            "end, each ending the session; the others are fetched next time"), result.problems())
        self.assertEqual(len(factory.connections), POP_REOPENS + 1)
        self.assertEqual(factory.retrieved, list(range(1, POP_REOPENS + 2)))

    async def test_stopping_the_engine_mid_retr_is_quick_and_shows_cancelled(self) -> None:
        factory = FakePOP3Factory([message(1)])
        started: defer.Deferred[None] = defer.Deferred()

        def partial(conn: FakePOP3, arg: bytes) -> bool:
            conn.transport.write(b"+OK\r\npartial\r\n")
            started.callback(None)
            return True

        factory.hooks["RETR"] = partial
        factory.hooks["QUIT"] = lambda conn, arg: True  # never answered
        env, account = await self.account(factory, idle_timeout=20.0)
        outcome: list[Any] = []
        env.engine.sync(account.id).addBoth(outcome.append)
        await started
        reactor = get_reactor()
        began = reactor.seconds()
        await env.engine.stop()
        self.assertLess(reactor.seconds() - began, 2.0)  # not the idle timeout
        self.assertTrue(outcome[0].check(defer.CancelledError), outcome)
        stored = await env.accounts.get(env.user_id, account.id)
        self.assertEqual((stored.sync_status, stored.sync_error),
                         ("error", "sync cancelled"))
        self.assertNotIn(b"QUIT", factory.received)

    async def test_a_date_limit_reads_headers_and_fetches_only_recent_mail_once(
        self,
    ) -> None:
        recent = message(4).replace(b"Mon, 1 Jan 2024 10:00:00 +0000", format_datetime(
            datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)).encode())
        factory = FakePOP3Factory([message(1), message(2), message(3), recent])
        env, account = await self.account(factory, limit=("days", 30))
        for new in (1, 0):
            result = await env.engine.sync(account.id)
            self.assertEqual((result.status, result.new_messages), ("success", new),
                             result.problems())
        self.assertEqual(factory.retrieved, [4])  # the old ones never, the recent one once
        self.assertEqual(factory.tops, [1, 2, 3, 4, 1, 2, 3])
        self.assertEqual(await env.count(account.id), 1)

    async def test_a_date_limit_without_top_fetches_to_read_the_date(self) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        factory.hooks["TOP"] = lambda conn, arg: conn.sendLine(b"-ERR no TOP") or True
        env, account = await self.account(factory, limit=("days", 30))
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 0))
        self.assertEqual(factory.retrieved, [1, 2])

    async def test_a_message_uidl_leaves_out_is_told_and_the_others_are_fetched(self) -> None:
        factory = FakePOP3Factory([message(1), message(2), message(3)])
        factory.uidl = [b"1 u1", b"3 u3"]
        result, _env, _account = await self.sync(factory)
        self.assertEqual((result.status, result.new_messages, result.problems()),
                         ("error", 2, "INBOX: message 2 without a UIDL; not fetched"))
        self.assertEqual(factory.retrieved, [1, 3])

    async def test_stopping_the_engine_while_a_batch_is_stored_sends_no_quit(self) -> None:
        factory = FakePOP3Factory([message(1)])
        factory.hooks["QUIT"] = lambda conn, arg: True  # never answered
        env, account = await self.account(factory)
        storing: defer.Deferred[None] = defer.Deferred()

        async def never(*args: Any, **kw: Any) -> Any:
            storing.callback(None)
            await defer.Deferred()

        env.store.store_batch = never  # type: ignore[method-assign]
        outcome: list[Any] = []
        env.engine.sync(account.id).addBoth(outcome.append)
        await storing
        await sleep(0)  # the sync goes on to wait for the store
        reactor = get_reactor()
        began = reactor.seconds()
        await env.engine.stop()
        self.assertLess(reactor.seconds() - began, 2.0)  # not QUIT_WAIT
        self.assertTrue(outcome[0].check(defer.CancelledError), outcome)
        self.assertNotIn(b"QUIT", factory.received)

    async def test_a_message_list_leaves_out_is_fetched(self) -> None:
        factory = FakePOP3Factory([message(1), message(2), message(3)])
        factory.list = [b"1 100", b"3 100"]
        result, env, account = await self.sync(factory)
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(factory.retrieved, [1, 2, 3])
        self.assertEqual(await env.count(account.id), 3)


    async def test_a_server_trickling_a_message_fails_the_sync_at_the_command_deadline(
        self,
    ) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        reactor = get_reactor()

        def trickle(conn: FakePOP3, arg: bytes) -> bool | None:
            if arg != b"2":
                return None
            conn.transport.write(b"+OK\r\n")
            beat = task.LoopingCall(conn.transport.write, b"still coming\r\n")
            beat.clock = reactor
            beat.start(0.2)

            def stop() -> None:
                if beat.running:
                    beat.stop()

            self.addCleanup(stop)
            return True

        factory.hooks["RETR"] = trickle
        result, env, account = await self.sync(factory, idle_timeout=1.0, command_timeout=1.5)
        self.assertEqual(result.status, "error")
        self.assertEqual(result.problems(),
                         f"INBOX: 127.0.0.1:{factory.port} answered no command for 1.5 s")
        self.assertEqual(await env.count(account.id), 1)  # the one fetched before

    async def test_a_batch_holds_at_most_batch_bytes_of_messages(self) -> None:
        """A POP3 batch was cut by count alone: 1,000 messages of up to max_message_bytes
        (64 MiB) each were held in memory before one store."""
        factory = FakePOP3Factory([message(i) + b"x" * 3000 + b"\r\n" for i in range(1, 8)])
        env, account = await self.account(factory, batch_bytes=7000)
        held = batch_bytes_stored(env)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 7), result.problems())
        self.assertEqual(sum(held), sum(map(len, factory.messages)))
        self.assertLessEqual(max(held), 7000, held)
        self.assertEqual(len(held), 4)  # two messages a batch, the last alone

    async def test_a_batch_whose_list_sizes_lied_is_cut_by_the_bytes_fetched(self) -> None:
        factory = FakePOP3Factory([message(i) + b"x" * 3000 + b"\r\n" for i in range(1, 8)])
        factory.sizes = [1] * 7
        env, account = await self.account(factory, batch_bytes=7000)
        held = batch_bytes_stored(env)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 7), result.problems())
        # At most batch_bytes and one message more.
        self.assertLessEqual(max(held), 7000 + len(factory.messages[0]), held)
        self.assertGreater(len(held), 1)

    async def test_what_was_fetched_before_the_server_closed_is_stored(self) -> None:
        """A server that drops the connection within a RETR (a session limit of its own)
        cost the whole batch fetched before it, at every sync."""
        factory = FakePOP3Factory([message(i) for i in range(1, 6)])

        def drop_at_fourth(conn: FakePOP3, arg: bytes) -> bool | None:
            if int(arg) == 4:
                conn.transport.write(b"+OK\r\npartial\r\n")
                conn.transport.loseConnection()
                return True
            return None

        factory.hooks["RETR"] = drop_at_fourth
        result, env, account = await self.sync(factory)
        self.assertEqual(result.status, "error")
        self.assertIn("connection to 127.0.0.1", result.problems() or "")
        self.assertEqual(await env.count(account.id), 3)
        factory.hooks.clear()
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 2), result.problems())
        self.assertEqual(await env.count(account.id), 5)

    async def test_a_reply_going_on_after_its_end_stores_no_cut_message(self) -> None:
        """A server that does not byte-stuff a message's line "." (RFC 1939 3) ends its
        RETR reply there: the message was stored cut at that line, the rest of it dropped
        as lines outside any command (or read as the next command's reply, which failed
        the sync with the cut message stored all the same), and the sync said success."""
        bodies = [message(i) for i in range(1, 5)]
        bodies[1] = bodies[1].replace(b"\r\nbody 2\r\n", b"\r\nbody 2\r\n.\r\nrest of 2\r\n")
        for late in (False, True):  # the rest in the same write, or 50 ms after the end
            factory = FakePOP3Factory(list(bodies))

            def unstuffed(conn: FakePOP3, arg: bytes, late: bool = late) -> bool | None:
                if int(arg) != 2:
                    return None
                cut, rest = bodies[1].split(b"\r\n.\r\n")
                conn.transport.write(b"+OK\r\n" + cut + b"\r\n.\r\n")
                tail = rest + b".\r\n"
                if not late:
                    conn.transport.write(tail)
                    return True
                conn.pauseProducing()  # busy writing the message: the next command waits

                def go_on() -> None:
                    conn.transport.write(tail)
                    conn.resumeProducing()

                get_reactor().callLater(0.05, go_on)
                return True

            factory.hooks["RETR"] = unstuffed
            result, env, account = await self.sync(factory, batch_messages=2)
            self.assertEqual((result.status, result.new_messages), ("error", 3), late)
            self.assertRegex(result.problems() or "", r"^INBOX: message uid-2: 127\.0\.0\.1:\d+ "
                             r"sent more after the end of message 2")
            raws = await env.db.read("raws", lambda c: c.execute(select(
                message_blobs.c.raw)).scalars().all())
            self.assertEqual(sorted(bytes(r) for r in raws),
                             sorted([bodies[0], bodies[2], bodies[3]]), late)
            # Tried again at the next sync, and told again; nothing stored twice.
            again = await env.engine.sync(account.id)
            self.assertEqual((again.status, again.new_messages), ("error", 0))
            self.assertEqual(await env.count(account.id), 3)


class ReusedUidlMixin(MixinBase):
    """A POP3 server may give a new message the UIDL of one deleted (RFC 1939 asks a UIDL
    to be unique only while its message is in the maildrop): the sync held the UIDL and
    never fetched the new message. A UIDL we hold that LIST gives another size is fetched."""

    timeout = 30
    backend = "sqlite"

    async def first_sync(self, factory: FakePOP3Factory) -> tuple[FetchEnv, Any]:
        port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.close_all)
        env = await make_env(self, backend=self.backend)
        account = await env.accounts.create(
            env.user_id, protocol="pop", host="127.0.0.1", port=port.getHost().port,
            username="alice", password="pw", allow_cleartext=True, start_tls=False,
            email="alice@example.test",
        )
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 2), result.problems())
        return env, account

    async def copies(self, env: FetchEnv, account: Any) -> list[tuple[str | None, str, bool]]:
        """(UIDL, subject, on the server) of each copy, in the order stored."""
        rows = await env.db.read("test_pop_copies", lambda conn: conn.execute(
            select(messages.c.pop_uidl, messages.c.subject, messages.c.on_server)
            .where(messages.c.account_id == account.id).order_by(messages.c.id)).all())
        return [(r.pop_uidl, r.subject, bool(r.on_server)) for r in rows]

    async def test_a_uidl_given_to_a_new_message_fetches_it_and_keeps_the_old(self) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        env, account = await self.first_sync(factory)
        factory.messages = [message(1), message(30)]  # 2 deleted; 30 took its UIDL uid-2
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages), ("success", 1), again.problems())
        self.assertEqual(await self.copies(env, account), [
            ("uid-1", "m1", True), (None, "m2", False), ("uid-2", "m30", True)])
        self.assertEqual(factory.retrieved, [1, 2, 2])
        last = await env.engine.sync(account.id)
        self.assertEqual((last.status, last.new_messages), ("success", 0), last.problems())
        self.assertEqual(factory.retrieved, [1, 2, 2])

    async def test_a_copy_fetched_before_sizes_were_kept_takes_its_size_then_tells(
        self,
    ) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        env, account = await self.first_sync(factory)
        await env.db.run("test_forget_sizes",
                         lambda conn: conn.execute(delete(message_pop_sizes)))
        quiet = await env.engine.sync(account.id)  # as after the upgrade: sizes learnt
        self.assertEqual((quiet.status, quiet.new_messages), ("success", 0))
        factory.messages = [message(1), message(30)]
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages), ("success", 1), again.problems())
        self.assertEqual([c[1] for c in await self.copies(env, account)], ["m1", "m2", "m30"])

    async def test_the_same_message_listed_with_another_size_is_not_stored_twice(
        self,
    ) -> None:
        factory = FakePOP3Factory([message(1), message(2)])
        env, account = await self.first_sync(factory)
        factory.sizes = [len(message(1)), len(message(2)) + 7]  # its server counts anew
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages), ("success", 0), again.problems())
        self.assertEqual(await self.copies(env, account),
                         [("uid-1", "m1", True), ("uid-2", "m2", True)])
        self.assertEqual(factory.retrieved, [1, 2, 2])  # fetched once to compare, then kept
        await env.engine.sync(account.id)
        self.assertEqual(factory.retrieved, [1, 2, 2])


class SQLiteReusedUidlTests(ReusedUidlMixin, TestCase):
    backend = "sqlite"


class PostgreSQLReusedUidlTests(ReusedUidlMixin, TestCase):
    backend = "postgresql"

"""Values a lying or broken IMAP server sends reach the store only when every backend takes
them: one bad folder or flag costs that folder or flag, never the account (and never a SQL
error on PostgreSQL where SQLite stored it).

The unit tests drive the session over a StringTransport; the sync tests run the engine
against a scripted cleartext server on loopback, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailcore.fetch import engine, imap
from mailcore.fetch.engine import SyncResult
from mailcore.fetch.errors import LiteralTooLarge, ProtocolFailed
from mailcore.fetch.imap import ARRIVING as _ARRIVING
from mailcore.fetch.imap import (
    LIST_SLACK,
    FolderListing,
    IMAPClient,
    expand_set,
    expand_vanished,
    parse_fetch,
    parse_fetch_lean,
)
from tests.support.db import MixinBase
from tests.support.fetchenv import FetchEnv, make_env
from tests.test_fetch_bulk import connected, lean
from tests.test_fetch_imap_hostile import (
    FakeIMAP,
    FakeIMAPFactory,
    cleartext_servers,
    failure_of,
)

BODY = b"Subject: hi\r\nMessage-ID: <m1@example.test>\r\n\r\nhello\r\n"


def listed(test: TestCase, *names: bytes, delimiter: bytes = b'"/"') -> FolderListing:
    """What `list_all` makes of a LIST reply naming `names` (each as it goes on the wire)."""
    client, _transport = connected()
    d = defer.Deferred.fromCoroutine(client.list_all())
    client.dataReceived(b"".join(b"* LIST () %s %s\r\n" % (delimiter, n) for n in names)
                        + b"0001 OK listed\r\n")
    return test.successResultOf(d)


def fetch_reply(uid: bytes, *, flags: bytes = b"()", body: bytes = BODY) -> bytes:
    return (b"* 1 FETCH (UID %s FLAGS %s RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n"
            % (uid, flags, len(body), len(body), body))


class FlagTests(TestCase):
    def test_a_flag_with_nul_space_or_control_is_dropped_by_both_parsers(self) -> None:
        data = fetch_reply(b"1", flags=b'(\\Seen a\x00b "x y" \x1bx $Label caf\xc3\xa9)')
        for item in (parse_fetch(data[2:-2]), parse_fetch_lean(lean(data))):
            self.assertEqual(item.flags, ("\\Seen", "$Label", "café"))
        only = parse_fetch_lean(lean(fetch_reply(b"1", flags=b"(\\Seen a\x00b \x7f)")))
        self.assertEqual(only.flags, ("\\Seen",))


class NumberTests(TestCase):
    """RFC 3501: a UID is from 1 to 2^32 - 1 (UIDVALIDITY and UIDNEXT may be 0, as before);
    RFC 7162: a mod-sequence is below 2^63."""

    def examined(self, *lines: bytes, **kw: Any) -> defer.Deferred[Any]:
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.examine("INBOX", **kw))
        client.dataReceived(b"".join(b"* " + line + b"\r\n" for line in lines)
                            + b"0001 OK [READ-ONLY] done\r\n")
        return d

    def test_uids_out_of_range_fail_both_parsers(self) -> None:
        for uid in (b"0", b"4294967296", b"1099511627776", b"99999999999999999999", b"9" * 5000):
            data = fetch_reply(uid)
            for parse in (lambda d: parse_fetch(d[2:-2]), lambda d: parse_fetch_lean(lean(d))):
                error = self.assertRaises(ProtocolFailed, parse, data)
                self.assertIn("UID", str(error))
        self.assertEqual(parse_fetch(fetch_reply(b"4294967295")[2:-2]).uid, 4294967295)

    def test_modseq_over_2_63_fails(self) -> None:
        ok = parse_fetch(b"1 FETCH (UID 1 MODSEQ (9223372036854775807))")
        self.assertEqual(ok.modseq, 2**63 - 1)
        self.assertRaises(ProtocolFailed, parse_fetch, b"1 FETCH (UID 1 MODSEQ (%d))" % 2**63)

    def test_examine_numbers_out_of_range_fail_with_a_clear_error(self) -> None:
        base = [b"1 EXISTS", b"OK [UIDVALIDITY 7] v", b"OK [UIDNEXT 2] n"]
        for bad in (b"OK [UIDVALIDITY 99999999999999999999] v", b"OK [UIDNEXT 4294967296] n",
                    b"OK [HIGHESTMODSEQ 9223372036854775808] m", b"99999999999999999999 EXISTS",
                    b"VANISHED (EARLIER) 0:3", b"VANISHED (EARLIER) 1:4294967296"):
            error = failure_of(self.examined(*base, bad, qresync=(7, 5), held=10))
            self.assertIsInstance(error, ProtocolFailed, bad)
            self.assertIn("not a number from", str(error))
        info = self.successResultOf(self.examined(b"0 EXISTS", b"OK [UIDVALIDITY 0] v",
                                                  b"OK [UIDNEXT 0] n"))
        self.assertEqual((info.exists, info.uidvalidity, info.uidnext), (0, 0, 0))

    def test_search_results_out_of_range_fail(self) -> None:
        for bad in (b"0", b"4294967296", b"99999999999999999999"):
            client, _transport = connected()
            d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
            client.dataReceived(b"* SEARCH 1 " + bad + b"\r\n0001 OK done\r\n")
            self.assertIn("UID " + bad.decode(), str(failure_of(d)))
        for spec in (b"0", b"2,99999999999999999999", b"0:3"):
            self.assertRaises(ProtocolFailed, expand_set, spec, 10)

    def test_search_results_are_read_whole_lines_at_a_time(self) -> None:
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL"))
        client.dataReceived(b"* SEARCH 5 3 x 5\r\n* search 9 (MODSEQ 77)\r\n* SEARCH\r\n"
                            b"* 3 EXISTS\r\n0001 OK done\r\n")
        self.assertEqual(self.successResultOf(d), [3, 5, 9])

    def test_a_search_answering_more_than_its_bound_fails_before_it_is_read(self) -> None:
        """Each UID of a reply was parsed and held: a 92 MB reply of 12 million UIDs held the
        reactor 50 s and took 1.7 GB."""
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL", max_uids=5))
        client.dataReceived(b"* SEARCH 1 2 3\r\n* SEARCH 4 5 6\r\n0001 OK done\r\n")
        error = failure_of(d)
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), "fake answered a SEARCH with more than 5 UIDs")
        self.patch(imap, "MAX_SEARCH", 3)  # the bound whatever the caller asks
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL", max_uids=10))
        client.dataReceived(b"* SEARCH 1 2 3 4\r\n0001 OK done\r\n")
        self.assertEqual(str(failure_of(d)), "fake answered a SEARCH with more than 3 UIDs")

    def test_a_search_line_too_long_for_its_bound_fails_before_it_is_split(self) -> None:
        """A line of a million UIDs answering a resume's SEARCH in a folder of three was
        split into a million words twice (some 100 MB) before its count was checked."""
        line = b"* SEARCH " + b" ".join(b"%d" % u for u in range(1, 1_000_001)) + b"\r\n"
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL", max_uids=3 + _ARRIVING))
        data = line + b"0001 OK done\r\n"
        tracemalloc.start()
        try:
            client.dataReceived(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(str(failure_of(d)),
                         f"fake answered a SEARCH with more than {3 + _ARRIVING} UIDs")
        self.assertLess(peak, 5 * len(line))  # three copies of the line; its words were 15
        # A bound's worth of UIDs of ten digits, as a server may write them, is read.
        many = b"* SEARCH " + b" ".join(b"%d" % u for u in range(4_000_000_000,
                                                                  4_000_000_000 + 1003))
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.uid_search(b"ALL", max_uids=1003))
        client.dataReceived(many + b" \r\n0001 OK done\r\n")
        self.assertEqual(len(self.successResultOf(d)), 1003)


    def test_a_set_over_its_limit_fails_before_it_is_listed(self) -> None:
        self.assertEqual(expand_set(b"3,1:2,,9:7", 6), [3, 1, 2, 7, 8, 9])
        self.assertEqual(expand_set(b"", 1), [])
        for spec, limit in ((b"1:4294967295", 10_000_000), (b"1:3,5", 3), (b"1,2,3", 2),
                            (b",".join([b"1:10000000"] * 100), 1)):
            error = self.assertRaises(ProtocolFailed, expand_set, spec, limit)
            self.assertIn(f"more than {limit} numbers", str(error))

class VanishedTests(TestCase):
    """A short VANISHED line cannot make a long list (52 bytes made 30 million UIDs)."""

    def examined(self, *lines: bytes, **kw: Any) -> Any:
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.examine("INBOX", **kw))
        client.dataReceived(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                            + b"".join(b"* " + line + b"\r\n" for line in lines)
                            + b"0001 OK [READ-ONLY] done\r\n")
        return self.successResultOf(d)

    def test_vanished_is_ignored_unless_qresync_was_asked_for(self) -> None:
        line = b"VANISHED (EARLIER) 1:3"
        self.assertEqual(self.examined(line, condstore=True).vanished, [])
        self.assertEqual(self.examined(line, qresync=(7, 5), held=10).vanished, [1, 2, 3])

    def test_vanished_ranges_are_clipped_to_the_highest_uid_held_and_merged(self) -> None:
        line = b"VANISHED (EARLIER) " + b",".join([b"1:9999999"] * 200) + b",4,9:7"
        info = self.examined(line, b"VANISHED 2,40:4294967295", qresync=(7, 5), held=8)
        self.assertEqual(info.vanished, [1, 2, 3, 4, 5, 6, 7, 8])
        self.assertEqual(self.examined(line, qresync=(7, 5), held=0).vanished, [])

    def test_changed_flags_are_read_only_when_qresync_was_asked_for(self) -> None:
        """Every FETCH line of an EXAMINE reply was parsed by Twisted's parser (0.14 ms
        each), asked for or not: 100,000 of them (3.9 MB) held the reactor 14 s."""
        lines = (b"1 FETCH (UID 4 FLAGS (\\Seen $Work) MODSEQ (90))",
                 b"2 FETCH (FLAGS () UID 6)")
        self.assertEqual(self.examined(*lines, condstore=True).changed_flags, {})
        self.assertEqual(self.examined(*lines).changed_flags, {})
        self.patch(imap, "ARRIVING", 1)  # EXISTS 1: two FETCH replies at most
        info = self.examined(*lines, qresync=(7, 5), held=10)
        self.assertEqual(info.changed_flags, {4: ("\\Seen", "$Work"), 6: ()})

    def test_more_changed_flags_than_the_folder_holds_fail_before_they_are_read(
        self,
    ) -> None:
        self.patch(imap, "ARRIVING", 1)
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.examine("INBOX", qresync=(7, 5), held=10))
        client.dataReceived(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                            + b"".join(b"* %d FETCH (UID %d FLAGS ())\r\n" % (i, i)
                                       for i in range(1, 4))
                            + b"0001 OK [READ-ONLY] done\r\n")
        error = failure_of(d)
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), "fake sent more than 2 FETCH replies to one EXAMINE")

    def test_more_than_the_cap_fails_before_the_list_is_made(self) -> None:
        self.assertEqual(expand_vanished(b"5,1:3,2:4", 100), [1, 2, 3, 4, 5])
        error = self.assertRaises(ProtocolFailed, expand_vanished, b"1:4294967295",
                                  2**32 - 1)
        self.assertIn("more than 10000000 UIDs", str(error))
        self.assertRaises(ProtocolFailed, expand_vanished, b"1,,2", 10)


class InternalDateTests(TestCase):
    DATES = (b"01-Jan-0001 00:00:00 +0100", b"31-Dec-9999 23:59:59 -0100")

    def test_a_date_out_of_range_in_utc_is_no_date(self) -> None:
        for date in self.DATES:
            line = b'1 FETCH (UID 1 INTERNALDATE "%s" RFC822.SIZE 3)' % date
            self.assertIsNone(parse_fetch(line).internal_date)

    def test_on_the_bulk_path_the_message_comes_with_no_date(self) -> None:
        for date in self.DATES:
            client, transport = connected()
            d = client.uid_fetch([1], b"UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]")
            client.dataReceived(fetch_reply(b"1").replace(
                b"FLAGS ()", b'FLAGS () INTERNALDATE "%s"' % date) + b"0001 OK done\r\n")
            [item] = self.successResultOf(d)
            self.assertEqual((item.uid, item.body, item.internal_date), (1, BODY, None))
            self.assertFalse(transport.disconnecting)

    def test_an_unforeseen_error_in_a_parser_fails_the_session_not_the_reactor(self) -> None:
        def broken(reply: Any) -> Any:
            raise OverflowError("a value no check foresaw")

        self.patch(imap, "parse_fetch_reply", broken)
        client, transport = connected()
        d = client.uid_fetch([1], b"UID BODY.PEEK[]")
        client.dataReceived(fetch_reply(b"1") + b"0001 OK done\r\n")
        error = failure_of(d)
        self.assertIsInstance(error, ProtocolFailed)
        self.assertIn("malformed FETCH reply (OverflowError)", str(error))
        self.assertTrue(transport.disconnecting)


class PartialBodyTests(TestCase):
    """BODY[]<origin> is a substring of the message from that octet (RFC 3501 7.4.2): a
    sync asks for no part, and a reply giving one from an octet past the first was taken
    for the whole message by both parsers and stored cut."""

    def test_a_body_from_an_octet_past_the_first_is_no_body_for_both_parsers(self) -> None:
        for origin, whole in ((b"<100>", False), (b"<0>", True), (b"", True)):
            data = fetch_reply(b"1").replace(b"BODY[]", b"BODY[]" + origin)
            self.assertEqual(parse_fetch(data[2:-2]).body, BODY if whole else None, origin)
            self.assertEqual(parse_fetch_lean(lean(data)).body, BODY if whole else None, origin)
            client, _transport = connected()
            d = client.uid_fetch([1], b"UID FLAGS RFC822.SIZE BODY.PEEK[]")
            client.dataReceived(data + b"0001 OK done\r\n")
            [item] = self.successResultOf(d)
            self.assertEqual(item.body, BODY if whole else None, origin)


class OversizedLiteralTests(TestCase):
    def test_the_literal_over_the_bound_names_its_uid_on_both_readers(self) -> None:
        for uids in ([7, 8], b"7:8"):  # the bulk path, Twisted's reader
            client = IMAPClient(Clock(), host="fake", max_literal=1000)
            client.makeConnection(StringTransport())
            client.dataReceived(b"* OK ready\r\n")
            d = client.uid_fetch(uids, b"UID BODY.PEEK[]")
            client.dataReceived(b"* 1 FETCH (FLAGS () UID 7 BODY[] {5000}\r\n")
            error = failure_of(d)
            self.assertIsInstance(error, LiteralTooLarge)
            self.assertEqual(getattr(error, "uid", None), 7, uids)


    def test_a_fetch_answered_before_the_literal_over_the_bound_keeps_its_answer(self) -> None:
        client = IMAPClient(Clock(), host="fake", max_literal=1000)
        client.makeConnection(StringTransport())
        client.dataReceived(b"* OK ready\r\n")
        first = client.uid_fetch([1], b"UID BODY.PEEK[]")
        second = client.uid_fetch([2], b"UID BODY.PEEK[]")
        client.dataReceived(fetch_reply(b"1") + b"0001 OK done\r\n"  # one read, both
                            + b"* 2 FETCH (BODY[] {5000}\r\n")
        [item] = self.successResultOf(first)
        self.assertEqual((item.uid, item.body), (1, BODY))
        self.assertIsInstance(failure_of(second), LiteralTooLarge)


class FolderListingTests(TestCase):
    def test_a_folder_the_store_cannot_keep_is_refused_alone(self) -> None:
        listing = listed(self, b"INBOX", b'"bad&AAA-name"', b'"' + b"n" * 1025 + b'"',
                         b'"&2D0-"', b'"' + b"n" * 1024 + b'"')
        self.assertEqual([f.name for f in listing.folders], ["INBOX", "n" * 1024])
        self.assertEqual(len(listing.refused), 3)
        self.assertEqual(listing.refused[0][0], "bad&AAA-name")
        self.assertIn("NUL", listing.refused[0][1])
        self.assertIn("longer than 1024", listing.refused[1][1])

    def test_a_name_that_does_not_round_trip_is_refused_and_a_repeated_one_listed_once(
        self,
    ) -> None:
        listing = listed(self, b"INBOX", b"Sent", b'"&AGE-"', b"a", b'"&Jjo"', b"Sent",
                         b'"&AGEAYgBj-"', b'"Entw&APw-rfe"', b'"a&-b"')
        self.assertEqual([f.name for f in listing.folders],
                         ["INBOX", "Sent", "a", "Entwürfe", "a&b"])
        self.assertEqual([shown for shown, _why in listing.refused],
                         ["&AGE-", "&Jjo", "&AGEAYgBj-"])
        self.assertIn("not modified UTF-7 as RFC 3501 writes it", listing.refused[0][1])

    def test_inbox_spelt_in_other_cases_is_one_folder(self) -> None:
        """INBOX is one folder whatever its case (RFC 3501 5.1): listed as INBOX and inbox
        it was synced twice, each message stored twice, as the first spelling listed."""
        for names, kept in (((b"inbox", b"INBOX", b"Sent"), "INBOX"),
                            ((b"Inbox", b"inbox", b"Sent"), "Inbox")):
            listing = listed(self, *names)
            self.assertEqual([f.name for f in listing.folders], [kept, "Sent"], names)
            self.assertEqual(listing.refused, [], names)  # as a name listed twice

    def test_a_name_with_8_bit_bytes_is_refused_alone(self) -> None:
        listing = listed(self, b"INBOX", b'"caf\xe9"', b'"caf\xc3\xa9"', b'"a&b-c"', b"Sent")
        self.assertEqual([f.name for f in listing.folders], ["INBOX", "Sent"])
        self.assertEqual([shown for shown, _why in listing.refused],
                         ["caf\ufffd", "caf\ufffd\ufffd", "a&b-c"])
        self.assertIn("not modified UTF-7 (8-bit bytes?)", listing.refused[0][1])

    def test_only_the_first_max_folders_are_read(self) -> None:
        """Each listed folder cost the reactor about 0.2 ms to parse, an EXAMINE at every
        sync and a row in the store: a LIST of a million folders (23 MB, within the reply
        bound) held the daemon's reactor for minutes and stored a million rows."""
        self.patch(imap, "MAX_FOLDERS", 50)
        listing = listed(self, *[b"f%d" % i for i in range(57)])
        self.assertEqual([f.name for f in listing.folders], [f"f{i}" for i in range(50)])
        self.assertEqual(listing.beyond, 7)
        self.assertEqual(listing.refused, [(
            "(7 more folders)",
            "fake lists more than 50 folders; those after the first 50 are not synced")])
        self.assertEqual(listed(self, *[b"f%d" % i for i in range(50)]).beyond, 0)

    def test_a_reader_of_every_folder_fails_beyond_max_folders(self) -> None:
        """A restore takes a folder it does not see for one deleted, and puts every
        message of it back: it fails instead."""
        self.patch(imap, "MAX_FOLDERS", 50)
        client, _transport = connected()
        d = defer.Deferred.fromCoroutine(client.list_folders())
        client.dataReceived(b"".join(b"* LIST () \"/\" f%d\r\n" % i for i in range(51))
                            + b"0001 OK listed\r\n")
        error = failure_of(d)
        self.assertIsInstance(error, ProtocolFailed)
        self.assertEqual(str(error), "fake lists more than 50 folders")

    def test_a_delimiter_longer_than_the_store_takes_is_refused(self) -> None:
        listing = listed(self, b"x", delimiter=b'"abcde"')
        self.assertEqual(listing.folders, [])
        self.assertIn("delimiter", listing.refused[0][1])
        nil = listed(self, b"x", delimiter=b"NIL")
        self.assertEqual([f.delimiter for f in nil.folders], [None])


def listlean(*lines: bytes) -> Any:
    def hook(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
        conn.transport.write(b"".join(b"* LIST () " + line + b"\r\n" for line in lines)
                             + tag + b" OK listed\r\n")
        return True

    return hook


def bodylean(uid: bytes, **kw: Any) -> Any:
    def hook(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
        if b"BODY" not in rest:
            return None
        conn.transport.write(fetch_reply(uid, **kw) + tag + b" OK fetched\r\n")
        return True

    return hook


class SyncValuesMixin(MixinBase):
    backend = "sqlite"
    timeout = 60
    factory: FakeIMAPFactory  # the server of the last run_sync

    async def run_sync(self, factory_hooks: dict[str, Any], **settings: Any
                       ) -> tuple[SyncResult, FetchEnv, int]:
        (factory, port), = cleartext_servers(self, 1)
        factory.hooks.update(factory_hooks)
        env = await make_env(self, backend=self.backend, **settings)
        account = await env.accounts.create(
            env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
            allow_cleartext=True, start_tls=False,
        )
        result = await env.engine.sync(account.id)
        self.factory = factory
        return result, env, account.id

    async def test_nul_in_a_flag_is_dropped_and_the_message_stored(self) -> None:
        result, env, account_id = await self.run_sync(
            {"UID FETCH": bodylean(b"1", flags=b"(\\Seen a\x00b $Label)")})
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.copies(account_id, "INBOX"),
                         {1: ("\\Seen $Label", True)})

    async def test_folders_the_store_cannot_keep_fail_alone(self) -> None:
        result, env, account_id = await self.run_sync({"LIST": listlean(
            b'"/" INBOX', b'"/" "bad&AAA-name"', b'"abcdefgh" "x"',
            b'"/" "' + b"n" * 2000 + b'"',
        )})
        self.assertEqual(result.status, "error")
        self.assertEqual(result.new_messages, 1)
        self.assertIsNone(result.folders["INBOX"].error)
        problems = result.problems() or ""
        self.assertIn("bad&AAA-name: the folder name holds NUL", problems)
        self.assertIn("delimiter is longer than 4", problems)
        self.assertIn("longer than 1024 characters", problems)
        self.assertNotIn("internal error", problems)
        names = [f["name"] for f in await env.accounts.folders(account_id)]
        self.assertEqual(names, ["INBOX"])

    async def test_a_folder_name_over_the_index_bytes_fails_alone(self) -> None:
        """1,000 random CJK characters are within the 1,024 characters a folder name may
        have but are 3,000 bytes of UTF-8, past PostgreSQL's largest index entry (2,704
        bytes, uq_fetch_folders_account_name): the folder is refused, the rest synced."""
        rnd = random.Random(3)
        wide = "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(1000))
        result, env, account_id = await self.run_sync({"LIST": listlean(
            b'"/" INBOX', b'"/" "' + wide.encode("imap4-utf-7") + b'"')})
        self.assertEqual(result.new_messages, 1)
        self.assertIsNone(result.folders["INBOX"].error)
        problems = result.problems() or ""
        self.assertIn("longer than 1024 characters or 2000 bytes", problems)
        self.assertNotIn("internal error", problems)
        names = [f["name"] for f in await env.accounts.folders(account_id)]
        self.assertEqual(names, ["INBOX"])

    async def test_uid_over_2_63_fails_the_folder_not_the_store(self) -> None:
        big = b"99999999999999999999"

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* SEARCH " + big + b"\r\n" + tag + b" OK s\r\n")
            return True

        result, env, account_id = await self.run_sync({"UID SEARCH": search})
        self.assertEqual(result.status, "error")
        self.assertIn("INBOX: the server sent UID 99999999999999999999", result.problems())
        self.assertEqual(await env.count(account_id), 0)

    async def test_uids_0_and_2_40_are_not_stored(self) -> None:
        for uid in (b"0", b"1099511627776"):
            result, env, account_id = await self.run_sync({"UID FETCH": bodylean(uid)})
            self.assertEqual(result.status, "error")
            self.assertIn(f"the server sent UID {uid.decode()}", result.problems())
            self.assertEqual(await env.count(account_id), 0)

    async def test_uidvalidity_or_uidnext_over_2_63_fails_the_folder(self) -> None:
        for code in (b"UIDVALIDITY", b"UIDNEXT"):
            def examine(conn: FakeIMAP, tag: bytes, rest: bytes, code: bytes = code) -> bool:
                conn.transport.write(
                    b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 2] n\r\n"
                    b"* OK [%s 99999999999999999999] x\r\n%s OK done\r\n" % (code, tag))
                return True

            result, _env, _account_id = await self.run_sync({"EXAMINE": examine})
            self.assertEqual(result.status, "error")
            self.assertIn(f"INBOX: the server sent {code.decode()} 9999", result.problems())


    async def test_a_search_answering_more_uids_than_the_folder_holds_fails_it(self) -> None:
        self.patch(engine, "ARRIVING", 5)

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* SEARCH " + b" ".join(b"%d" % u for u in range(1, 8))
                                 + b"\r\n" + tag + b" OK s\r\n")
            return True

        result, _env, _account_id = await self.run_sync({"UID SEARCH": search})
        self.assertEqual(result.status, "error")
        self.assertRegex(result.problems() or "", r"^INBOX: 127\.0\.0\.1:\d+ answered a "
                         r"SEARCH with more than 6 UIDs$")  # EXISTS 1, and 5 arriving

    async def test_a_sync_takes_the_first_max_folders_and_says_so(self) -> None:
        self.patch(imap, "MAX_FOLDERS", 5)
        result, _env, _account_id = await self.run_sync({"LIST": listlean(
            b'"/" INBOX', *[b'"/" f%d' % i for i in range(8)])})
        self.assertEqual(result.status, "error")
        self.assertEqual(sorted(result.folders), ["(4 more folders)", "INBOX", "f0", "f1",
                                                  "f2", "f3"])
        self.assertRegex(result.problems() or "", r"^\(4 more folders\): 127\.0\.0\.1:\d+ "
                         r"lists more than 5 folders; those after the first 5 are not synced$")
        examined = [line for _tls, line in self.factory.received if b"EXAMINE" in line]
        self.assertEqual(len(examined), 5)

    async def test_a_folder_listed_twice_or_spelt_twice_syncs_once(self) -> None:
        result, env, account_id = await self.run_sync({"LIST": listlean(
            b'"/" INBOX', b'"/" "Sent"', b'"/" "Sent"', b'"/" "&AGE-"', b'"/" "a"',
            b'"/" "&Jjo"',
        )})
        self.assertEqual(result.status, "error")
        self.assertEqual(sorted(result.folders), ["&AGE-", "&Jjo", "INBOX", "Sent", "a"])
        self.assertEqual(result.new_messages, 3)
        self.assertNotIn("internal error", result.problems())
        names = sorted(f["name"] for f in await env.accounts.folders(account_id))
        self.assertEqual(names, ["INBOX", "Sent", "a"])
        examined = [line.split(b" ", 2)[2] for _tls, line in self.factory.received
                    if b" EXAMINE " in line]
        self.assertEqual(sorted(examined), [b'"INBOX"', b'"Sent"', b'"a"'])


    async def test_inbox_listed_in_two_cases_syncs_once(self) -> None:
        result, env, account_id = await self.run_sync({"LIST": listlean(
            b'"/" inbox', b'"/" INBOX')})
        self.assertEqual((result.status, result.new_messages), ("success", 1),
                         result.problems())
        self.assertEqual(await env.count(account_id), 1)
        names = sorted(f["name"] for f in await env.accounts.folders(account_id))
        self.assertEqual(names, ["INBOX"])

    async def test_a_folder_name_with_8_bit_bytes_fails_that_folder_alone(self) -> None:
        result, env, account_id = await self.run_sync({"LIST": listlean(
            b'"/" INBOX', b'"/" "caf\xe9"',
        )})
        self.assertEqual(result.status, "error")
        self.assertEqual(result.new_messages, 1)
        self.assertIn("caf\ufffd: the folder name is not modified UTF-7", result.problems())
        names = [f["name"] for f in await env.accounts.folders(account_id)]
        self.assertEqual(names, ["INBOX"])


    async def test_vanished_marks_gone_only_with_qresync_enabled(self) -> None:
        modseq = [5]

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(
                b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 2] n\r\n"
                b"* OK [HIGHESTMODSEQ %d] m\r\n* VANISHED (EARLIER) 1:9999999,1:9999999\r\n"
                b"%s OK done\r\n" % (modseq[0], tag))
            return True

        def enable(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* ENABLED QRESYNC\r\n" + tag + b" OK enabled\r\n")
            return True

        hooks = {"EXAMINE": examine, "ENABLE": enable}
        for caps, on_server in ((b"CONDSTORE", True), (b"CONDSTORE ENABLE QRESYNC", False)):
            (factory, port), = cleartext_servers(self, 1)
            factory.caps += b" " + caps
            factory.hooks.update(hooks)
            env = await make_env(self, backend=self.backend)
            account = await env.accounts.create(
                env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
                allow_cleartext=True, start_tls=False,
            )
            modseq[0] = 5
            first = await env.engine.sync(account.id)
            self.assertEqual(first.new_messages, 1, first.problems())
            modseq[0] = 6
            second = await env.engine.sync(account.id)
            self.assertEqual(second.status, "success", second.problems())
            copies = await env.copies(account.id, "INBOX")
            self.assertEqual(copies, {1: ("", on_server)}, caps)


    async def test_a_flag_fetch_takes_no_more_replies_than_the_messages_held(self) -> None:
        # CONDSTORE without QRESYNC: the second sync asks UID FETCH 1 (UID FLAGS)
        # (CHANGEDSINCE 5), the UIDs from the lowest held to the highest of a folder of one
        # message; its replies were taken without end, then as many as the folder's EXISTS
        # said. A reply naming a UID outside them is not kept; the others are taken up to
        # two a UID held, and ARRIVING more; past them the UIDs held are asked as a list,
        # which takes two replies a UID, and LIST_SLACK more.
        flood = [0]

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(
                b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 2] n\r\n"
                b"* OK [HIGHESTMODSEQ %d] m\r\n%s OK done\r\n" % (6 if flood[0] else 5, tag))
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"CHANGEDSINCE" not in rest:
                return None
            conn.transport.write(
                b"".join(b"* %d FETCH (UID %d FLAGS (\\Deleted) MODSEQ (6))\r\n" % (n, n)
                         for n in range(2, _ARRIVING + 3))
                + b"* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ (6))\r\n" * flood[0]
                + tag + b" OK fetched\r\n")
            return True

        for replies, ok in ((2 + _ARRIVING, True), (3 + _ARRIVING, False)):
            (factory, port), = cleartext_servers(self, 1)
            factory.caps += b" CONDSTORE"
            factory.hooks.update({"EXAMINE": examine, "UID FETCH": fetch})
            env = await make_env(self, backend=self.backend)
            account = await env.accounts.create(
                env.user_id, host="127.0.0.1", port=port, username="alice", password="pw",
                allow_cleartext=True, start_tls=False,
            )
            flood[0] = 0
            first = await env.engine.sync(account.id)
            self.assertEqual(first.new_messages, 1, first.problems())
            flood[0] = replies
            second = await env.engine.sync(account.id)
            asked = [line for _tls, line in factory.received if b"CHANGEDSINCE" in line]
            self.assertEqual([line.split(b" ", 1)[1] for line in asked],
                             [b"UID FETCH 1 (UID FLAGS) (CHANGEDSINCE 5)"] * (1 if ok else 2))
            if ok:
                self.assertEqual(second.status, "success", second.problems())
                self.assertEqual(second.folders["INBOX"].flags_updated, 1)
                self.assertEqual(await env.copies(account.id, "INBOX"),
                                 {1: ("\\Seen", True)})
            else:
                self.assertEqual(second.status, "error")
                self.assertIn(f"sent more than {2 + LIST_SLACK} FETCH replies for one UID "
                              "FETCH", second.problems())
                self.assertEqual(await env.copies(account.id, "INBOX"), {1: ("", True)})

    async def test_a_message_dated_year_1_is_stored_without_its_date(self) -> None:
        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool | None:
            if b"BODY" not in rest:
                return None
            conn.transport.write(fetch_reply(b"1").replace(
                b"FLAGS ()", b'FLAGS () INTERNALDATE "01-Jan-0001 00:00:00 +0100"')
                + tag + b" OK fetched\r\n")
            return True

        result, env, account_id = await self.run_sync({"UID FETCH": fetch})
        self.assertEqual(result.status, "success", result.problems())
        self.assertEqual(await env.count(account_id), 1)


    async def test_a_body_over_the_limit_its_size_denied_is_skipped_alone(self) -> None:
        bodies = {1: BODY, 2: BODY + b"x" * 5000, 3: BODY.replace(b"<m1@", b"<m3@")}
        uid_last = [False]  # the reply names its UID after the body (not before the literal)

        def search(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* SEARCH 1 2 3\r\n" + tag + b" OK s\r\n")
            return True

        def fetch(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            uids = imap.expand_set(rest.split(b" ")[2], 3)
            for uid in uids:
                if b"BODY" not in rest:  # RFC822.SIZE lies for UID 2
                    conn.transport.write(b"* %d FETCH (UID %d RFC822.SIZE 100)\r\n"
                                         % (uid, uid))
                elif uid_last[0]:
                    conn.transport.write(b"* %d FETCH (FLAGS () BODY[] {%d}\r\n%s UID %d)\r\n"
                                         % (uid, len(bodies[uid]), bodies[uid], uid))
                else:
                    conn.transport.write(fetch_reply(b"%d" % uid, body=bodies[uid]))
            conn.transport.write(tag + b" OK fetched\r\n")
            return True

        def examine(conn: FakeIMAP, tag: bytes, rest: bytes) -> bool:
            conn.transport.write(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n"
                                 b"* OK [UIDNEXT 4] n\r\n" + tag + b" OK done\r\n")
            return True

        hooks = {"UID SEARCH": search, "UID FETCH": fetch, "EXAMINE": examine}
        # The session the literal ended, one more; and one before, when the reply of a batch
        # of 3 did not say which message it was (the folder then goes one message a fetch).
        for batch, uid_last[0], sessions in ((1, False, 2), (100, False, 2), (1, True, 2),
                                             (100, True, 3)):
            result, env, account_id = await self.run_sync(
                hooks, max_message_bytes=2000, batch_messages=batch)
            self.assertEqual(result.status, "error")
            self.assertRegex(result.problems() or "",
                             r"^INBOX: UID 2: 127\.0\.0\.1:\d+ announced a 5053-byte literal, "
                             r"over the limit of 2000 bytes; not fetched$")
            copies = await env.copies(account_id, "INBOX")
            self.assertEqual(sorted(copies), [1, 3], batch)
            logins = [line for _tls, line in self.factory.received if b"AUTHENTICATE" in line]
            self.assertEqual(len(logins), sessions)
            shown = await env.accounts.get(env.user_id, account_id)
            self.assertEqual((shown.progress_done, shown.progress_total), (2, 2))

            # Tried again at the next sync, and still an error: the backup lacks it (the
            # error went at the next sync, which said success, before).
            again = await env.engine.sync(account_id)
            self.assertEqual(again.status, "error")
            self.assertEqual(again.problems(), result.problems())
            self.assertEqual(sorted(await env.copies(account_id, "INBOX")), [1, 3])


class SQLiteSyncValuesTests(SyncValuesMixin, TestCase):
    backend = "sqlite"


class PostgreSQLSyncValuesTests(SyncValuesMixin, TestCase):
    backend = "postgresql"

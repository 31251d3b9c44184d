"""The mailbox writer against a scripted, sometimes hostile, destination (no real time).

A fake IMAP server (`ScriptedIMAP`) reads commands with their synchronising and
non-synchronising literals over iosim, stores what it accepts, and lets each test script its
answers: NO with and without codes, TRYCREATE, a cut in the middle of a literal, garbage
APPENDUIDs, BAD, an untagged BYE, a "+" nobody asked for, an OK instead of the "+" asked
for, a "+" never sent, an untagged flood, tagged replies held back until a whole batch
arrived (which only a pipelining client survives). Also the name and argument
encodings (modified UTF-7, UTF-8, flags, INTERNALDATE) as pure functions.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import TestCase

from mailcore.fetch import writer as writer_module
from mailcore.fetch.errors import FetchError, ProtocolFailed
from mailcore.fetch.imap import compress_set, expand_set
from mailcore.fetch.writer import (
    Append,
    Appended,
    AppendInterrupted,
    BadFolderName,
    MailboxWriter,
    Streamed,
    WriterSession,
    _appenduid,
    decode_folder,
    destination_path,
    encode_folder,
    flag_arg,
    imap_datetime,
    mutf7_decode,
    mutf7_encode,
    writer_for,
)
from tests.support.logs import logged_at

UTC = datetime.UTC
_LITERAL = re.compile(rb"\{(\d+)(\+?)\}$")


@dataclass
class Msg:
    flags: bytes
    date: bytes | None
    data: bytes


@dataclass
class Script:
    """What the fake server offers and how it answers."""

    capabilities: str = "IMAP4rev1 UIDPLUS"
    separator: bytes = b"/"
    folders: list[bytes] = field(default_factory=lambda: [b"INBOX", b"Archive"])
    # (command number from 0, messages) -> the tagged reply's text after the tag, or None
    # for the default (store and OK [APPENDUID]).
    append_reply: Callable[[int, str, list[Msg]], bytes | None] | None = None
    # Hold every tagged APPEND reply until this many APPEND commands have arrived.
    hold_until: int = 0
    # Drop the connection once this many literal bytes of APPENDs have arrived in total.
    cut_after: int | None = None
    # Lines to send (raw) right before answering APPEND number n.
    before_reply: dict[int, bytes] = field(default_factory=dict)
    create_reply: bytes | None = None
    namespace: bytes = b'(("" "/")) NIL NIL'


class ScriptedIMAP(Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.buffer = b""
        self.need: int | None = None     # literal bytes still to read
        self.parts: list[bytes] = []     # the command read so far (lines and literals)
        self.literal_bytes = 0
        self.lines: list[bytes] = []     # every command line received (without literals)
        self.commands: list[tuple[bytes, bytes]] = []
        self.appends = 0
        self.continuations = 0
        self.stored: dict[str, list[Msg]] = {
            f.decode(): [] for f in script.folders
        }
        self.held: list[bytes] = []
        self.uid = 100
        self.max_unanswered = 0
        self.unanswered = 0
        self.enabled: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(b"* PREAUTH scripted server ready\r\n")  # type: ignore[union-attr]

    def send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer and self.transport is not None:
            if self.need is not None:
                take = self.buffer[:self.need]
                self.buffer = self.buffer[self.need:]
                self.parts[-1] += take
                self.need -= len(take)
                self.literal_bytes += len(take)
                if self.script.cut_after is not None and (
                    self.literal_bytes >= self.script.cut_after
                ):
                    self.transport.loseConnection()
                    self.buffer = b""
                    return
                if self.need == 0:
                    self.need = None
                continue
            if b"\r\n" not in self.buffer:
                return
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.lines.append(line)
            m = _LITERAL.search(line)
            if m:
                self.parts.append(line[:m.start()])
                self.parts.append(b"")   # the literal's bytes go here
                self.need = int(m.group(1))
                if not m.group(2):
                    self.continuations += 1
                    self.send(b"+ go ahead\r\n")
                if self.need == 0:
                    self.need = None
                continue
            self.parts.append(line)
            parts, self.parts = self.parts, []
            self.command(parts)

    # -- commands -------------------------------------------------------------------------

    def command(self, parts: list[bytes]) -> None:
        first = parts[0]
        tag, _, rest = first.partition(b" ")
        name, _, args = rest.partition(b" ")
        name = name.upper()
        if name == b"UID":
            sub, _, args = args.partition(b" ")
            name = b"UID " + sub.upper()
        self.commands.append((name, args))
        reply = getattr(self, "do_" + name.decode().replace(" ", "_"), None)
        if reply is None:
            self.send(tag + b" BAD unknown command\r\n")
            return
        reply(tag, args, parts)

    def do_CAPABILITY(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(b"* CAPABILITY " + self.script.capabilities.encode() + b"\r\n")
        self.send(tag + b" OK done\r\n")

    def do_ENABLE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.enabled.append(args)
        self.send(b"* ENABLED " + args + b"\r\n" + tag + b" OK enabled\r\n")

    def do_LIST(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        sep = b'"' + self.script.separator + b'"'
        if args == b'"" ""':
            self.send(b"* LIST (\\Noselect) " + sep + b' ""\r\n')
        else:
            for name in self.stored:
                raw = name.encode("utf-8") if self.enabled else name.encode("ascii")
                quoted = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
                self.send(b"* LIST () " + sep + b' "' + quoted + b'"\r\n')
        self.send(tag + b" OK listed\r\n")

    def do_NAMESPACE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(b"* NAMESPACE " + self.script.namespace + b"\r\n" + tag + b" OK done\r\n")

    def do_CREATE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        if self.script.create_reply is not None:
            self.send(tag + b" " + self.script.create_reply + b"\r\n")
            return
        name = unquote(args)
        self.stored.setdefault(name, [])
        self.send(tag + b" OK created\r\n")

    def do_SUBSCRIBE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(tag + b" OK subscribed\r\n")

    def do_LOGOUT(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def do_APPEND(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        # parts: [b'APPEND "box" (flags) "date" ', literal, b' (flags) ', literal, b'']
        number = self.appends
        self.appends += 1
        head = parts[0].split(b" APPEND ", 1)[1]
        box_end = head.index(b'"', 1) + 1 if head.startswith(b'"') else head.index(b" ")
        box = unquote(head[:box_end])
        specs = [head[box_end:], *parts[2:-1:2]]
        msgs = []
        for spec, data in zip(specs, parts[1::2], strict=True):
            m = re.match(rb'\s*\(([^)]*)\)\s*(?:"([^"]*)")?\s*$', spec)
            assert m, spec
            msgs.append(Msg(m.group(1), m.group(2), data))
        self.unanswered += 1
        self.max_unanswered = max(self.max_unanswered, self.unanswered)
        reply = None
        if self.script.append_reply is not None:
            reply = self.script.append_reply(number, box, msgs)
        if reply is None:
            if box not in self.stored:
                reply = b"NO [TRYCREATE] no such mailbox"
            else:
                first = self.uid + 1
                self.uid += len(msgs)
                self.stored[box].extend(msgs)
                uids = compress_set(list(range(first, self.uid + 1)))
                reply = b"OK [APPENDUID 7 " + uids + b"] appended"
        out = self.script.before_reply.get(number, b"") + tag + b" " + reply + b"\r\n"
        self.held.append(out)
        if self.appends >= self.script.hold_until:
            for line in self.held:
                self.unanswered -= 1
                self.send(line)
            self.held = []


def unquote(arg: bytes) -> str:
    if arg.startswith(b'"'):
        arg = arg[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\")
    try:
        return arg.decode("ascii")
    except UnicodeDecodeError:
        return arg.decode("utf-8")


class Rig:
    """A writer connected to a scripted server through iosim."""

    def __init__(self, test: TestCase, script: Script,
                 server_class: type[ScriptedIMAP] = ScriptedIMAP,
                 session_options: dict[str, Any] | None = None, **options: Any) -> None:
        self.server = server_class(script)
        self.clock = Clock()
        self.session = WriterSession(self.clock, host="fake", **(session_options or {}))
        self.pump: IOPump = connect(
            self.server, FakeTransport(self.server, isServer=True),
            self.session, FakeTransport(self.session, isServer=False),
        )
        self.test = test
        self.run(self.session.ask_capabilities())
        self.writer: MailboxWriter = self.run(writer_for(self.session, **options))

    def start(self, coro: Any) -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(coro)
        self.pump.flush()
        return d

    def run(self, coro: Any) -> Any:
        return self.test.successResultOf(self.start(coro))

    def fails(self, coro: Any, kind: type[BaseException]) -> Any:
        return self.test.failureResultOf(self.start(coro), kind).value


def msg(n: int, size: int = 200) -> Append:
    head = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\n".encode()
    return Append(head + b"x" * max(0, size - len(head)), ("\\Seen",),
                  datetime.datetime(2024, 3, 1, 12, 0, n % 60, tzinfo=UTC))


class AnswersTests(TestCase):
    def test_no_is_retryable_unless_its_code_says_otherwise(self) -> None:
        replies = {1: b"NO [OVERQUOTA] Quota exceeded", 2: b"NO Temporary failure",
                   3: b"NO [LIMIT] Message too large", 4: b"BAD [CLIENTBUG] what?"}
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               append_reply=lambda n, box, m: replies.get(n)))
        results = rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(6)]))
        self.assertEqual([r.ok for r in results], [True, False, False, False, False, True])
        self.assertEqual(results[0], Appended(True, 101, 7, None, False))
        self.assertEqual(results[5].uid, 102)
        self.assertFalse(results[1].retryable)
        self.assertIn("OVERQUOTA", results[1].reason or "")
        self.assertTrue(results[2].retryable)
        self.assertEqual(results[2].reason, "NO Temporary failure")
        self.assertFalse(results[3].retryable)
        self.assertFalse(results[4].retryable)
        self.assertTrue((results[4].reason or "").startswith("BAD"))
        self.assertEqual(len(rig.server.stored["INBOX"]), 2)

    def test_multiappend_refused_as_a_whole_is_sent_again_one_by_one(self) -> None:
        def reply(n: int, box: str, msgs: list[Msg]) -> bytes | None:
            if len(msgs) > 1:
                return b"NO [OVERQUOTA] Quota exceeded (whole group)"
            return b"NO [OVERQUOTA] Quota exceeded" if n >= 4 else None

        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ MULTIAPPEND",
                               append_reply=reply), group_messages=3)
        results = rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(5)]))
        # Two groups (3 + 2) refused, then five single APPENDs: the first two fit.
        self.assertEqual(rig.server.appends, 7)
        self.assertEqual([r.ok for r in results], [True, True, False, False, False])
        self.assertEqual([r.uid for r in results[:2]], [101, 102])
        self.assertFalse(any(r.retryable for r in results[2:]))
        self.assertEqual(len(rig.server.stored["INBOX"]), 2)

    def test_multiappend_uid_set_maps_in_order(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ MULTIAPPEND"),
                  group_messages=3)
        items = [msg(i) for i in range(5)]
        results = rig.run(rig.writer.append(("Archive",), items))
        self.assertEqual([r.uid for r in results], [101, 102, 103, 104, 105])
        self.assertEqual({r.uidvalidity for r in results}, {7})
        self.assertEqual(rig.server.appends, 2)
        self.assertEqual([m.data for m in rig.server.stored["Archive"]],
                         [i.data for i in items])
        self.assertEqual(rig.server.continuations, 0)

    def test_garbage_appenduid_is_still_stored_but_without_uid(self) -> None:
        garbage = [b"OK [APPENDUID x 5] ok", b"OK [APPENDUID 7 1:3] ok",
                   b"OK [APPENDUID 0 4] ok", b"OK [APPENDUID 7 99999999999] ok",
                   b"OK [APPENDUID] ok", b"OK done",
                   b"OK [APPENDUID " + b"7" * 5000 + b" 5] ok"]  # past int()'s 4,300 digits
        rig = Rig(self, Script(capabilities="IMAP4rev1 LITERAL+",
                               append_reply=lambda n, box, m: garbage[n]))
        results = rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(7)]))
        self.assertEqual(results, [Appended(True, None, None, None, False)] * 7)

    def test_group_with_wrong_uid_count_keeps_ok(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 LITERAL+ MULTIAPPEND",
                               append_reply=lambda n, b, m: b"OK [APPENDUID 7 5:6] ok"))
        results = rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(3)]))
        self.assertEqual([(r.ok, r.uid) for r in results], [(True, None)] * 3)

    def test_appenduid_set_longer_than_the_batch_is_refused_before_it_is_listed(self) -> None:
        # 63 bytes of "1:10000000,..." made 40 million UIDs (1.5 GiB) on the reactor thread
        huge = b"7 " + b",".join([b"1:1000000"] * 4)
        many = b"7 " + b",".join([b"5"] * 100_000)
        tracemalloc.start()
        try:
            self.assertIsNone(_appenduid(huge, 1))
            self.assertIsNone(_appenduid(many, 2))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1 << 20)
        self.assertEqual(_appenduid(b"7 5:6,9", 3), (7, [5, 6, 9]))
        self.assertIsNone(_appenduid(b"7 5:6,9,10", 3))
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               append_reply=lambda n, box, m: b"OK [APPENDUID 7 %s] ok" % huge[2:]))
        results = rig.run(rig.writer.append(("INBOX",), [msg(1)]))
        self.assertEqual([(r.ok, r.uid) for r in results], [(True, None)])

    def test_an_appendlimit_of_more_digits_than_any_size_is_no_limit(self) -> None:
        # Over 4,300 digits int() raised ValueError: the destination could not be opened.
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ APPENDLIMIT="
                               + "9" * 5000))
        self.assertIsNone(rig.writer.appendlimit)
        results = rig.run(rig.writer.append(("INBOX",), [msg(1, 2000)]))
        self.assertTrue(results[0].ok)

    def test_over_appendlimit_is_refused_without_sending(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ APPENDLIMIT=1000"))
        results = rig.run(rig.writer.append(("INBOX",), [msg(1, 2000), msg(2, 500)]))
        self.assertFalse(results[0].ok)
        self.assertFalse(results[0].retryable)
        self.assertIn("APPENDLIMIT", results[0].reason or "")
        self.assertTrue(results[1].ok)
        self.assertEqual(rig.server.appends, 1)


class InterruptionTests(TestCase):
    def test_cut_in_a_literal_gives_the_answered_prefix(self) -> None:
        # LITERAL+: the whole batch goes out at once; the connection drops in the middle
        # of the fourth message's literal, after three answers.
        items = [msg(i, 1000) for i in range(6)]
        script = Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+", cut_after=3500)
        rig = Rig(self, script)
        error = rig.fails(rig.writer.append(("INBOX",), items), AppendInterrupted)
        self.assertEqual([r.uid for r in error.answered], [101, 102, 103])
        self.assertTrue(all(r.ok for r in error.answered))
        self.assertEqual(error.not_sent, ())   # all handed to the transport: unknown
        self.assertIn("after 3 of 6 answers", str(error))
        self.assertIsInstance(error, FetchError)

    def test_cut_with_sync_literals_says_what_never_went_out(self) -> None:
        items = [msg(i, 1000) for i in range(5)]
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS", cut_after=2500))
        error = rig.fails(rig.writer.append(("INBOX",), items), AppendInterrupted)
        self.assertEqual(len(error.answered), 2)
        # The third was being written when the line dropped; the fourth and fifth never
        # got their "+", so the server cannot hold them.
        self.assertEqual(error.not_sent, (3, 4))

    def test_untagged_bye_then_close(self) -> None:
        script = Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                        before_reply={0: b"* BYE shutting down for maintenance\r\n"},
                        cut_after=1500)
        rig = Rig(self, script)
        error = rig.fails(rig.writer.append(("INBOX",), [msg(i, 1000) for i in range(4)]),
                          AppendInterrupted)
        self.assertEqual(len(error.answered), 1)
        self.assertIn("BYE shutting down for maintenance", str(error))

    def test_reply_with_an_unknown_tag_fails_the_batch(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               before_reply={1: b"ZZZZ OK [APPENDUID 7 1] sure\r\n"}))
        error = rig.fails(rig.writer.append(("INBOX",), [msg(i) for i in range(3)]),
                          AppendInterrupted)
        self.assertEqual(len(error.answered), 1)
        self.assertIn("malformed reply", str(error))

    def test_unasked_continuation_fails_the_batch(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               before_reply={0: b"+ more please\r\n"}))
        error = rig.fails(rig.writer.append(("INBOX",), [msg(i) for i in range(2)]),
                          AppendInterrupted)
        self.assertEqual(error.answered, [])

    def test_an_ok_instead_of_the_continuation_is_not_believed(self) -> None:
        """A server answering a synchronising literal's command OK instead of "+" never
        had the message: it was counted as copied (a migrate recorded it done)."""
        class Lying(ScriptedIMAP):
            def dataReceived(self, data: bytes) -> None:
                if data.endswith(b"}\r\n") and b" APPEND " in data and self.need is None:
                    tag = data.split(b" ", 1)[0]
                    self.send(tag + b" OK [APPENDUID 7 1] stored\r\n")
                    return
                super().dataReceived(data)

        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS"), Lying)
        error = rig.fails(rig.writer.append(("INBOX",), [msg(1), msg(2)]), AppendInterrupted)
        self.assertEqual((error.answered, error.not_sent), ([], (0, 1)))
        self.assertIn("fake answered OK to an APPEND before it had the message", str(error))
        self.assertFalse(rig.session.alive())
        self.assertEqual(rig.server.stored["INBOX"], [])

    def test_a_continuation_never_sent_ends_at_the_command_deadline(self) -> None:
        class Mute(ScriptedIMAP):
            def dataReceived(self, data: bytes) -> None:
                if b" APPEND " not in data:
                    super().dataReceived(data)

        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS"), Mute,
                  session_options={"idle_timeout": 300, "command_timeout": 100})
        d = rig.start(rig.writer.append(("INBOX",), [msg(1), msg(2)]))
        rig.clock.advance(99)
        rig.pump.flush()
        self.assertNoResult(d)
        rig.clock.advance(1)
        rig.pump.flush()
        error = self.failureResultOf(d, AppendInterrupted).value
        self.assertEqual((error.answered, error.not_sent), ([], (0, 1)))
        self.assertIn("answered no command for 100 s", str(error))

    def test_an_untagged_flood_between_answers_is_bounded(self) -> None:
        flood = b"* 1 RECENT\r\n" * 10_000
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               before_reply={1: flood}),
                  session_options={"max_reply_bytes": 64 * 1024})
        error = rig.fails(rig.writer.append(("INBOX",), [msg(i) for i in range(3)]),
                          AppendInterrupted)
        self.assertEqual([r.uid for r in error.answered], [101])
        self.assertIn("fake sent more than 65536 bytes for one command", str(error))
        self.assertFalse(rig.session.alive())

    def test_nothing_sent_on_a_dead_session(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        rig.server.transport.loseConnection()  # type: ignore[union-attr]
        rig.pump.flush()
        error = rig.fails(rig.writer.append(("INBOX",), [msg(1), msg(2)]), AppendInterrupted)
        self.assertEqual((error.answered, error.not_sent), ([], (0, 1)))


class DeadlineTests(TestCase):
    def test_an_append_trickled_past_the_command_deadline_fails_the_batch(self) -> None:
        """Each untagged reply restarts the idle timer: a destination that never answers an
        APPEND but says '* OK' every 20 s held a migrate or restore job, its lease and one
        of the job runner's max_concurrent slots for ever."""
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+", hold_until=1000),
                  session_options={"idle_timeout": 30, "command_timeout": 100})
        d = rig.start(rig.writer.append(("INBOX",), [msg(i) for i in range(3)]))
        for _ in range(4):
            rig.clock.advance(20)
            rig.server.send(b"* OK still working\r\n")
            rig.pump.flush()
        self.assertNoResult(d)
        rig.clock.advance(20)
        rig.pump.flush()
        error = self.failureResultOf(d, AppendInterrupted).value
        self.assertEqual(error.answered, [])
        self.assertIn("answered no command for 100 s", str(error))

    def test_answers_in_time_leave_no_deadline_behind(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"),
                  session_options={"idle_timeout": 30, "command_timeout": 100})
        for n in range(3):
            rig.clock.advance(25)
            results = rig.run(rig.writer.append(("INBOX",), [msg(n)]))
            self.assertTrue(results[0].ok)
        self.assertIsNone(rig.session._deadline)


class TryCreateTests(TestCase):
    def test_trycreate_creates_parents_and_retries_once(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        results = rig.run(rig.writer.append(("Projects", "2024"), [msg(1), msg(2)]))
        self.assertTrue(all(r.ok for r in results))
        self.assertEqual([n for n, _ in rig.server.commands if n != b"APPEND"],
                         [b"CAPABILITY", b"LIST", b"LIST", b"CREATE", b"SUBSCRIBE",
                          b"CREATE", b"SUBSCRIBE"])
        creates = [a for n, a in rig.server.commands if n == b"CREATE"]
        self.assertEqual(creates, [b'"Projects"', b'"Projects/2024"'])
        self.assertEqual(len(rig.server.stored["Projects/2024"]), 2)
        self.assertEqual(rig.server.appends, 4)

    def test_connection_lost_while_creating(self) -> None:
        class Dropping(ScriptedIMAP):
            def do_CREATE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

        def reply(n: int, box: str, msgs: list[Msg]) -> bytes | None:
            return b"NO [TRYCREATE] missing" if n == 1 else b"OK [APPENDUID 7 5] ok"

        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+", append_reply=reply),
                  Dropping)
        error = rig.fails(rig.writer.append(("New",), [msg(1), msg(2), msg(3)]),
                          AppendInterrupted)
        self.assertEqual([r.uid for r in error.answered], [5])
        self.assertEqual(error.not_sent, (1,))   # it was refused, so certainly not stored

    def test_trycreate_twice_is_a_permanent_failure(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               append_reply=lambda n, b, m: b"NO [TRYCREATE] nope"))
        results = rig.run(rig.writer.append(("Gone",), [msg(1)]))
        self.assertFalse(results[0].ok)
        self.assertFalse(results[0].retryable)
        self.assertEqual(rig.server.appends, 2)

    def test_create_refused(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+",
                               create_reply=b"NO [NOPERM] not allowed"))
        results = rig.run(rig.writer.append(("Gone",), [msg(1)]))
        self.assertFalse(results[0].ok)
        self.assertFalse(results[0].retryable)
        self.assertIn("NOPERM", results[0].reason or "")
        error = rig.fails(rig.writer.ensure_folder(("Other",)), FetchError)
        self.assertIn("cannot create folder 'Other'", str(error))


class PipeliningTests(TestCase):
    def test_literal_plus_batch_needs_no_reply_before_the_last_command(self) -> None:
        # The server answers nothing until all 50 commands arrived: a client waiting for
        # any reply before sending the next command would never finish.
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+", hold_until=50))
        results = rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(50)]))
        self.assertEqual([r.uid for r in results], list(range(101, 151)))
        self.assertEqual(rig.server.max_unanswered, 50)
        self.assertEqual(rig.server.continuations, 0)
        self.assertEqual(rig.session.max_in_flight, 50)

    def test_sync_literals_wait_for_their_own_continuation_only(self) -> None:
        # No LITERAL+ and no MULTIAPPEND: one "+" per message, but no tagged reply is
        # awaited before the next command goes out.
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS", hold_until=20))
        items = [msg(i) for i in range(20)]
        results = rig.run(rig.writer.append(("INBOX",), items))
        self.assertEqual([r.uid for r in results], list(range(101, 121)))
        self.assertEqual(rig.server.continuations, 20)
        self.assertEqual(rig.session.continuations, 20)
        self.assertEqual(rig.server.max_unanswered, 20)
        self.assertEqual([m.data for m in rig.server.stored["INBOX"]], [i.data for i in items])

    def test_literal_minus_only_for_small_literals(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL-"))
        results = rig.run(rig.writer.append(("INBOX",), [msg(1, 100), msg(2, 5000)]))
        self.assertTrue(all(r.ok for r in results))
        literals = [_LITERAL.search(x).group(0) for x in rig.server.lines  # type: ignore[union-attr]
                    if _LITERAL.search(x)]
        self.assertEqual(literals, [b"{100+}", b"{5000}"])
        self.assertEqual(rig.server.continuations, 1)

    def test_window_bounds_commands_in_flight(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"), window=4)
        rig.run(rig.writer.append(("INBOX",), [msg(i) for i in range(30)]))
        self.assertLessEqual(rig.session.max_in_flight, 4)

    def test_sync_refusal_instead_of_continuation(self) -> None:
        # A server may refuse a synchronising literal instead of asking for it.
        class Refusing(ScriptedIMAP):
            def dataReceived(self, data: bytes) -> None:
                if b"{5000}" in data and self.need is None:
                    tag = data.split(b" ", 1)[0]
                    self.send(tag + b" NO [TOOBIG] too big\r\n")
                    return
                super().dataReceived(data)

        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS"), Refusing)
        results = rig.run(rig.writer.append(("INBOX",), [msg(1, 5000), msg(2, 100)]))
        self.assertEqual([r.ok for r in results], [False, True])
        self.assertFalse(results[0].retryable)
        self.assertEqual(rig.server.stored["INBOX"][0].data, msg(2, 100).data)


class FolderNameTests(TestCase):
    def test_control_characters_refused_before_any_protocol_line(self) -> None:
        rig = Rig(self, Script())
        before = list(rig.server.lines)
        for bad in (("a\r\nb",), ("x\x00",), ("ok", "li\nne"), ("tab\there",), ("",),
                    (), ("\ud800",)):
            rig.fails(rig.writer.ensure_folder(bad), BadFolderName)
            rig.fails(rig.writer.append(bad, [msg(1)]), BadFolderName)
            rig.fails(rig.writer.find(bad, message_id=None, size=1, internaldate=None,
                                      sha256=""), BadFolderName)
        self.assertEqual(rig.server.lines, before)

    def test_utf8_accept_is_enabled_and_names_go_as_utf8(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ ENABLE UTF8=ACCEPT"))
        self.assertTrue(rig.writer.utf8)
        self.assertEqual(rig.server.enabled, [b"UTF8=ACCEPT"])
        rig.run(rig.writer.ensure_folder(("Größe", 'a"b')))
        creates = [a for n, a in rig.server.commands if n == b"CREATE"]
        self.assertEqual(creates, ['"Größe"'.encode(), '"Größe/a\\"b"'.encode()])
        self.assertIn(("Größe", 'a"b'), rig.run(rig.writer.folders()))

    def test_a_line_separator_is_text_in_a_folder_name(self) -> None:
        # U+2028 is refused in names people type (mailcore.text.has_control) but is text in
        # an IMAP name: a source's folder that holds one is created at the destination.
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ ENABLE UTF8=ACCEPT"))
        rig.run(rig.writer.ensure_folder(("a\u2028b",)))
        creates = [a for n, a in rig.server.commands if n == b"CREATE"]
        self.assertEqual(creates, ['"a\u2028b"'.encode()])

    def test_personal_namespace_prefix(self) -> None:
        # Courier/Cyrus style: every folder lives under "INBOX.".
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ NAMESPACE",
                               separator=b".", folders=[b"INBOX", b"INBOX.Sent"],
                               namespace=b'(("INBOX." ".")) NIL NIL'))
        self.assertEqual(rig.writer.prefix, ("INBOX",))
        self.assertEqual(rig.writer.destination_path(("Archive", "2024")),
                         ("INBOX", "Archive", "2024"))
        self.assertEqual(rig.writer.destination_path(("INBOX", "Sent")), ("INBOX", "Sent"))
        self.assertEqual(rig.writer.destination_path(("inbox",)), ("INBOX",))
        results = rig.run(rig.writer.append(("Archive", "2024"), [msg(1)]))
        self.assertTrue(results[0].ok)
        creates = [a for n, a in rig.server.commands if n == b"CREATE"]
        self.assertEqual(creates, [b'"INBOX.Archive"', b'"INBOX.Archive.2024"'])
        self.assertEqual(len(rig.server.stored["INBOX.Archive.2024"]), 1)
        rig.run(rig.writer.append(("Sent",), [msg(2)]))
        self.assertEqual(len(rig.server.stored["INBOX.Sent"]), 1)
        self.assertIn(("INBOX", "Archive", "2024"), rig.run(rig.writer.folders()))

    def test_modified_utf7_names_and_separator_stand_in(self) -> None:
        rig = Rig(self, Script(separator=b"."))
        self.assertEqual(rig.writer.separator, ".")
        rig.run(rig.writer.ensure_folder(("inbox", "Été", "v1.2")))
        creates = [a for n, a in rig.server.commands if n == b"CREATE"]
        self.assertEqual(creates, [b'"INBOX.&AMk-t&AOk-"', b'"INBOX.&AMk-t&AOk-.v1&ICQ-2"'])
        self.assertIn(("INBOX", "Été", "v1\u20242"), rig.run(rig.writer.folders()))


class Searchable(ScriptedIMAP):
    """A destination whose Archive holds `exists` messages of `size` bytes, each of other
    bytes than the one looked for, and whose UID SEARCH answers `found` (raw)."""

    exists = 3
    size = 200
    found = b"1 2 3"

    def __init__(self, script: Script) -> None:
        super().__init__(script)
        self.bodies_fetched = 0

    def do_EXAMINE(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(b"* %d EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n%s OK [READ-ONLY] done\r\n"
                  % (self.exists, tag))

    def do_UID_SEARCH(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        self.send(b"* SEARCH " + self.found + b"\r\n" + tag + b" OK searched\r\n")

    def do_UID_FETCH(self, tag: bytes, args: bytes, parts: list[bytes]) -> None:
        uids = expand_set(args.split(b" ", 1)[0], 1_000_000)
        out = []
        for uid in uids:
            if b"BODY.PEEK[]" in args:
                self.bodies_fetched += 1
                body = b"%08d" % uid + b"y" * (self.size - 8)
                out.append(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n"
                           % (uid, uid, len(body), body))
            else:
                out.append(b'* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE '
                           b'"01-Mar-2024 12:00:00 +0000")\r\n' % (uid, uid, self.size))
        self.send(b"".join(out) + tag + b" OK fetched\r\n")


class FindTests(TestCase):
    def find(self, server_class: type[Searchable], message_id: str | None) -> Any:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"), server_class)
        d = rig.start(rig.writer.find(
            ("Archive",), message_id=message_id, size=200,
            internaldate=datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC),
            sha256="0" * 64))
        return rig, d

    def test_a_search_naming_more_uids_than_the_folder_holds_fails_before_they_are_read(
        self,
    ) -> None:
        """A destination answering a resume's SEARCH with a million UIDs had each listed,
        its size fetched and each look-alike's body fetched, for every message looked for:
        a resume unbounded in time and memory. What EXAMINE counted (and a margin for
        mail arriving) bounds it, as a sync's SEARCH."""
        class Flooding(Searchable):
            found = b" ".join(b"%d" % u for u in range(1, 1_000_001))

        for message_id in ("<m1@test>", None):
            rig, d = self.find(Flooding, message_id)
            error = self.failureResultOf(d, ProtocolFailed).value
            self.assertEqual(str(error), f"fake answered a SEARCH with more than "
                                         f"{3 + writer_module.ARRIVING} UIDs")
            self.assertNotIn(b"UID FETCH", [n for n, _ in rig.server.commands])

    def test_more_look_alikes_than_the_bound_stop_the_comparing_not_the_copy(self) -> None:
        """Past MAX_LOOKALIKES bodies compared, find was a ProtocolFailed and the job failed,
        though an honest folder can hold that many (messages without Message-ID or date
        are searched by size alone). It now stops comparing, with a warning: without a
        Message-ID the message is not there (sent again, at worst a duplicate); with one
        it is the lowest UID, as when none of fewer look-alikes is it."""
        class LookAlikes(Searchable):
            exists = 500
            found = b" ".join(b"%d" % u for u in range(1, 301))

        warnings = logged_at(self, LogLevel.warn)
        for message_id, found in (("<m1@test>", 1), (None, None)):
            rig, d = self.find(LookAlikes, message_id)
            self.assertEqual(self.successResultOf(d), found)
            self.assertEqual(rig.server.bodies_fetched, writer_module.MAX_LOOKALIKES)
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"fake holds more than {writer_module.MAX_LOOKALIKES} messages in "
                      "'Archive' that look like one looked for", warnings[0])
        self.assertIn("taken as the lowest UID of them", warnings[0])
        self.assertIn("taken as not there: it is sent again, at worst a duplicate",
                      warnings[1])

    def test_look_alikes_past_the_folder_budget_are_not_compared_again_this_run(
            self) -> None:
        """MAX_LOOKALIKES bounded the bodies compared per message only: a destination
        naming 100 look-alikes for each message of a resume cost 100 body fetches and a
        warning each. Past MAX_LOOKALIKE_FETCHES bodies compared in a folder, no body of
        that folder is fetched again by this writer (this run): each message is decided as
        past the bound, with one warning for the folder. One message past the bound stops
        only its own comparing (an honest folder can hold many look-alikes of one). Another
        folder has its own budget."""
        class LookAlikes(Searchable):
            exists = 500
            found = b" ".join(b"%d" % u for u in range(1, 301))

        class Many(Searchable):  # each message within the bound, many messages
            exists = 500
            found = b" ".join(b"%d" % u for u in range(1, 61))

        date = datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)

        def find(rig: Rig, folder: str, message_id: str | None) -> Any:
            return rig.run(rig.writer.find((folder,), message_id=message_id, size=200,
                                           internaldate=date, sha256="0" * 64))

        warnings = logged_at(self, LogLevel.warn)
        rig: Any = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"), LookAlikes)
        for i in range(20):
            self.assertIsNone(find(rig, "Archive", None))
            self.assertEqual(find(rig, "Archive", f"<m{i}@test>"), 1)  # the lowest UID
        # Nine messages past the bound (a warning each); the tenth's comparing spends the
        # folder's budget (one warning), and nothing is fetched there after.
        budget = writer_module.MAX_LOOKALIKE_FETCHES
        self.assertEqual(rig.server.bodies_fetched, budget)
        self.assertEqual(len(warnings), budget // writer_module.MAX_LOOKALIKES)
        self.assertIn("not compared further in that folder this run", warnings[-1])
        self.assertIsNone(find(rig, "Other", None))  # its own budget
        self.assertEqual(rig.server.bodies_fetched, budget + writer_module.MAX_LOOKALIKES)
        self.assertEqual(len(warnings), budget // writer_module.MAX_LOOKALIKES + 1)

        del warnings[:]
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"), Many)
        for i in range(40):
            self.assertIsNone(find(rig, "Archive", None))
            self.assertEqual(find(rig, "Archive", f"<m{i}@test>"), 1)
        self.assertEqual(rig.server.bodies_fetched, writer_module.MAX_LOOKALIKE_FETCHES)
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"({writer_module.MAX_LOOKALIKE_FETCHES} bodies compared there)",
                      warnings[0])

    def test_bodies_found_the_same_do_not_spend_the_folders_budget(self) -> None:
        """A second migrate to the same mailbox looks for each message without a Message-ID
        there, one body fetched each, and finds it. Counted against MAX_LOOKALIKE_FETCHES,
        those matches spent the budget of a folder of 1,000 such messages, and every later
        one was taken as not there without comparing: sent again, a duplicate each. Only
        bodies compared that are not it count."""
        class One(Searchable):  # the message looked for is there, at UID 1
            exists = 2000
            found = b"1"

        body = b"%08d" % 1 + b"y" * (One.size - 8)
        rig: Any = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"), One)
        warnings = logged_at(self, LogLevel.warn)
        times = writer_module.MAX_LOOKALIKE_FETCHES + 5
        for _ in range(times):
            self.assertEqual(rig.run(rig.writer.find(
                ("Archive",), message_id=None, size=One.size,
                internaldate=datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC),
                sha256=hashlib.sha256(body).hexdigest())), 1)
        self.assertEqual(rig.server.bodies_fetched, times)
        self.assertEqual(warnings, [])

    def test_look_alikes_within_the_bound_are_compared(self) -> None:
        class Few(Searchable):
            found = b"1 2 3"

        rig, d = self.find(Few, None)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(rig.server.bodies_fetched, 3)
        rig, d = self.find(Few, "<m1@test>")  # no body has it: the lowest UID, as before
        self.assertEqual(self.successResultOf(d), 1)


class FolderCountTests(TestCase):
    def test_a_destination_listing_more_than_max_folders_fails(self) -> None:
        """Each listed folder costs the reactor a parse: a destination listing a million
        held the daemon for minutes."""
        self.patch(writer_module, "MAX_FOLDERS", 50)
        names = [b"INBOX"] + [b"f%d" % i for i in range(50)]
        rig = Rig(self, Script(folders=names))
        error = rig.fails(rig.writer.folders(), ProtocolFailed)
        self.assertEqual(str(error), "fake lists more than 50 folders")
        rig = Rig(self, Script(folders=names[:50]))
        self.assertEqual(len(rig.run(rig.writer.folders())), 50)


class EncodingTests(TestCase):
    def test_rfc3501_example_and_round_trips(self) -> None:
        self.assertEqual(mutf7_encode("~peter/mail/台北/日本語"),
                         b"~peter/mail/&U,BTFw-/&ZeVnLIqe-")
        self.assertEqual(mutf7_decode(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
                         "~peter/mail/台北/日本語")
        for text in ("a&b", "&", "Ünïcödé & 😀 mixed", "x\ty", "~", "", "&-", "é\u20ac😀é"):
            self.assertEqual(mutf7_decode(mutf7_encode(text)), text)
        self.assertEqual(mutf7_encode("&"), b"&-")
        self.assertEqual(mutf7_encode("😀"), b"&2D3eAA-")

    def test_tab_is_not_turned_into_an_ampersand(self) -> None:
        # Twisted's imap4-utf-7 encodes "A\tB" as b"A&-B" (which reads back as "A&B").
        self.assertEqual(mutf7_encode("A\tB"), b"A&AAk-B")

    def test_invalid_modified_utf7_is_refused(self) -> None:
        for raw in (b"&Jjo", b"&Jjo!", b"&2D0-", b"caf\xc3\xa9", b"a\x00b", b"&A-", b"&AAAAA-"):
            with self.assertRaises(ValueError, msg=raw):
                mutf7_decode(raw)

    def test_decode_folder(self) -> None:
        self.assertEqual(decode_folder(b"inbox/&AMk-t&AOk-", "/"), ("INBOX", "Été"))
        self.assertEqual(decode_folder("Archive/Größe", "/"), ("Archive", "Größe"))
        self.assertEqual(decode_folder("Lists.python.dev", "."), ("Lists", "python", "dev"))
        self.assertEqual(decode_folder("Flat/Name", None), ("Flat/Name",))
        self.assertEqual(decode_folder("a//b/", "/"), ("a", "b"))
        self.assertEqual(decode_folder("Größe".encode(), "/"), ("Größe",))  # raw UTF-8
        self.assertEqual(decode_folder("&Größe".encode(), "/", utf8=True), ("&Größe",))
        with self.assertRaises(ValueError):
            decode_folder(b"\xff\xfe", "/")

    def test_destination_path_and_encoding(self) -> None:
        self.assertEqual(destination_path(("a/b", "c"), "/"), ("a\u2215b", "c"))
        self.assertEqual(destination_path(("a.b",), "/"), ("a.b",))
        self.assertEqual(destination_path(("a\\b",), "\\"), ("a\u29f5b",))
        self.assertEqual(destination_path(("a:b",), ":"), ("a_b",))
        self.assertEqual(destination_path(("a_b",), "_"), ("a-b",))
        self.assertEqual(encode_folder(("Inbox", "x"), "/", utf8=False), b'"INBOX/x"')
        self.assertEqual(encode_folder(("é",), "/", utf8=True), '"é"'.encode())
        self.assertEqual(encode_folder(('q"\\',), "/", utf8=False), b'"q\\"\\\\"')

    def test_flags_and_dates(self) -> None:
        self.assertIsNone(flag_arg("\\Recent"))
        self.assertIsNone(flag_arg("\\recent"))
        self.assertEqual(flag_arg("$Forwarded"), b"$Forwarded")
        self.assertEqual(flag_arg("\\Seen"), b"\\Seen")
        for bad in ("two words", "br(ace", "ünï", "", "\\", "a]b", "\\*", "x\r\n"):
            self.assertIsNone(flag_arg(bad), bad)
        tz = datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))
        self.assertEqual(imap_datetime(datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=tz)),
                         b'"02-Jan-2024 03:04:05 -0530"')
        self.assertEqual(imap_datetime(datetime.datetime(1999, 12, 31, 23, 59, 59, 900)),
                         b'"31-Dec-1999 23:59:59 +0000"')
        odd = datetime.timezone(datetime.timedelta(seconds=3601))
        self.assertEqual(imap_datetime(datetime.datetime(2024, 1, 2, 3, 0, 0, tzinfo=odd)),
                         b'"02-Jan-2024 01:59:59 +0000"')

    def test_append_arguments_on_the_wire(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        item = Append(b"Subject: x\r\n\r\nbody\r\n", ("\\Seen", "\\Recent", "$Label1",
                                                        "bad flag", "\\Seen"),
                      datetime.datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC))
        rig.run(rig.writer.append(("INBOX",), [item, Append(b"x", (), None)]))
        appends = [x for x in rig.server.lines if b" APPEND " in x]
        self.assertEqual(appends[0].split(b" ", 1)[1],
                         b'APPEND "INBOX" (\\Seen $Label1) "06-May-2020 07:08:09 +0000" {20+}')
        self.assertEqual(appends[1].split(b" ", 1)[1], b'APPEND "INBOX" () {1+}')
        self.assertEqual(rig.server.stored["INBOX"][0].data, item.data)


class Source:
    """A streamed message for the tests: `data` in chunks of `chunk` bytes, announcing
    `announce` bytes (default: the truth); counts the chunks asked for, and can fail or
    call `on_chunk` after yielding a chunk."""

    def __init__(self, data: bytes, chunk: int = 1000, announce: int | None = None,
                 fail_after: int | None = None,
                 on_chunk: Callable[[int], None] | None = None) -> None:
        self.data = data
        self.chunk = chunk
        self.size = len(data) if announce is None else announce
        self.fail_after = fail_after
        self.on_chunk = on_chunk
        self.asked = 0
        self.starts = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        self.starts += 1
        for n, at in enumerate(range(0, len(self.data), self.chunk)):
            if self.fail_after is not None and n >= self.fail_after:
                raise OSError("disk on fire")
            self.asked += 1
            yield self.data[at:at + self.chunk]
            if self.on_chunk is not None:
                self.on_chunk(n)

    def append(self) -> Append:
        return Append(b"", ("\\Seen",), datetime.datetime(2024, 3, 1, 12, 0, tzinfo=UTC),
                      stream=Streamed(self.size, self.chunks))


def big(n: int, size: int) -> bytes:
    head = f"Message-ID: <big{n}@test>\r\nSubject: big {n}\r\n\r\n".encode()
    body = bytes(range(256)) * (size // 256 + 1)
    return head + body[:size - len(head)]


class StreamedTests(TestCase):
    def test_streamed_message_goes_alone_and_byte_exact(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ MULTIAPPEND"),
                  group_messages=8)
        source = Source(big(1, 10_000), chunk=999)
        items = [msg(1), msg(2), source.append(), msg(3)]
        results = rig.run(rig.writer.append(("INBOX",), items))
        self.assertEqual([r.uid for r in results], [101, 102, 103, 104])
        # A group of two, the streamed message alone, then the last one.
        self.assertEqual(rig.server.appends, 3)
        self.assertEqual([m.data for m in rig.server.stored["INBOX"]],
                         [msg(1).data, msg(2).data, source.data, msg(3).data])
        self.assertEqual(source.asked, 11)
        self.assertEqual(rig.session.streamed_chunks, 11)

    def test_streamed_with_a_synchronising_literal_waits_for_the_continuation(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS"))
        source = Source(big(1, 5000))
        results = rig.run(rig.writer.append(("INBOX",), [source.append()]))
        self.assertTrue(results[0].ok)
        self.assertEqual(rig.server.continuations, 1)
        self.assertEqual(rig.server.stored["INBOX"][0].data, source.data)

    def test_streamed_again_after_trycreate(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        source = Source(big(1, 3000))
        results = rig.run(rig.writer.append(("New",), [source.append()]))
        self.assertTrue(results[0].ok)
        self.assertEqual(source.starts, 2)   # a new iterator for the second APPEND
        self.assertEqual([m.data for m in rig.server.stored["New"]], [source.data])

    def test_over_appendlimit_is_refused_by_its_announced_size(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+ APPENDLIMIT=1000"))
        source = Source(big(1, 2000))
        results = rig.run(rig.writer.append(("INBOX",), [source.append()]))
        self.assertIn("APPENDLIMIT", results[0].reason or "")
        self.assertEqual((rig.server.appends, source.starts), (0, 0))

    def _interrupted(self, source: Source, capabilities: str = "IMAP4rev1 UIDPLUS LITERAL+"
                     ) -> tuple[Rig, AppendInterrupted]:
        rig = Rig(self, Script(capabilities=capabilities))
        error = rig.fails(rig.writer.append(("INBOX",), [msg(1), source.append(), msg(2)]),
                          AppendInterrupted)
        rig.pump.flush()
        # The first message was answered; the streamed one never fully went out, the one
        # after it never started: neither can be stored.
        self.assertEqual([r.uid for r in error.answered], [101])
        self.assertEqual(error.not_sent, (1, 2))
        self.assertEqual([m.data for m in rig.server.stored["INBOX"]], [msg(1).data])
        self.assertEqual(rig.server.appends, 1)
        self.assertFalse(rig.session.alive())
        return rig, error

    def test_source_shorter_than_announced_drops_the_connection(self) -> None:
        source = Source(big(1, 3000), announce=5000)
        _, error = self._interrupted(source)
        self.assertIn("yielded 3000 of the 5000 bytes", str(error))

    def test_source_shorter_with_a_synchronising_literal(self) -> None:
        source = Source(big(1, 3000), announce=5000)
        self._interrupted(source, "IMAP4rev1 UIDPLUS")

    def test_source_longer_than_announced_drops_the_connection(self) -> None:
        # 5000 bytes announced, chunks of 1000: the whole literal went out, but not the end
        # of the command, so the server never takes it.
        source = Source(big(1, 6000), announce=5000)
        _, error = self._interrupted(source)
        self.assertIn("more than the 5000 bytes", str(error))
        self.assertEqual(source.asked, 6)

    def test_source_failing_drops_the_connection(self) -> None:
        source = Source(big(1, 6000), fail_after=2)
        _, error = self._interrupted(source)
        # The source's exception (on PostgreSQL a failed statement with its parameters) is
        # logged for the operator, never put in the error a user reads.
        self.assertIn("an internal error; see the daemon's log", str(error))
        self.assertNotIn("disk on fire", str(error))
        [logged] = self.flushLoggedErrors()
        self.assertIn("disk on fire", str(logged.value))

    def test_chunks_wait_for_the_transport_to_drain(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        transport: Any = rig.session.transport

        def pause(n: int) -> None:
            if n == 1:
                transport.producer.pauseProducing()

        source = Source(big(1, 5000), on_chunk=pause)
        d = rig.start(rig.writer.append(("INBOX",), [source.append()]))
        self.assertNoResult(d)
        # Paused while the third chunk was being read: it is written, then nothing more
        # is asked of the source until the transport resumes.
        self.assertEqual(source.asked, 3)
        rig.pump.flush()
        self.assertEqual(source.asked, 3)
        transport.producer.resumeProducing()
        rig.pump.flush()
        self.assertTrue(self.successResultOf(d)[0].ok)
        self.assertEqual(source.asked, 5)
        self.assertIsNone(transport.producer)   # unregistered when done
        self.assertEqual(rig.server.stored["INBOX"][0].data, source.data)

    def test_a_draining_transport_is_not_silence(self) -> None:
        rig = Rig(self, Script(capabilities="IMAP4rev1 UIDPLUS LITERAL+"))
        clock: Clock = rig.session.callLater.__self__  # type: ignore[attr-defined]
        rig.session.setTimeout(10)
        transport: Any = rig.session.transport
        source = Source(big(1, 5000), on_chunk=lambda n: transport.producer.pauseProducing())
        d = rig.start(rig.writer.append(("INBOX",), [source.append()]))
        for _ in range(3):
            # Held back 8 s each time, 24 s in all: each drain counts as the server alive.
            clock.advance(8)
            self.assertTrue(rig.session.alive())
            transport.producer.resumeProducing()
            rig.pump.flush()
        transport.producer.resumeProducing()
        rig.pump.flush()
        self.assertTrue(self.successResultOf(d)[0].ok)
        self.assertEqual(rig.server.stored["INBOX"][0].data, source.data)
        # Held back longer than the idle timeout, the session ends as for any silence.
        source = Source(big(2, 5000), on_chunk=lambda n: transport.producer.pauseProducing())
        d = rig.start(rig.writer.append(("INBOX",), [source.append()]))
        clock.advance(11)
        rig.pump.flush()
        error = self.failureResultOf(d, AppendInterrupted).value
        self.assertIn("stopped answering", str(error))
        self.assertEqual(error.not_sent, (0,))

    def test_append_has_bytes_or_a_stream(self) -> None:
        with self.assertRaises(ValueError):
            Append(b"x", (), None, stream=Streamed(1, Source(b"x").chunks))
        self.assertEqual(Source(b"abc").append().size, 3)

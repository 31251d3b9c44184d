"""The results journal: a final delivery result is in a file as soon as the runner hands it
to the spool, and a node that starts again after a crash applies what the journal holds
before it claims its old work, so a recipient the next hop took just before the crash is
not delivered a second time (and a bounce gets its one DSN)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.queue.journal import NAMES, NOT_WRITTEN, ResultJournal, decode, encode
from mailcore.queue.model import BOUNCED, DEFERRED, DELIVERED, Result
from mailcore.store.schema import queue_messages, queue_recipients
from tests.support.db import synchronous_database
from tests.support.logs import logged
from tests.support.mailsink import ScriptedConnector, done, envelope, make_queue, thd_add_domain


def delivered(rcpt_id: int) -> Result:
    return Result(rcpt_id, f"Q{rcpt_id}", DELIVERED, "250 2.0.0 Ok: queued", "10.0.0.1:2525")


class JournalFileTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def journal(self, **kw: Any) -> ResultJournal:
        journal = ResultJournal(self.dir, **kw)
        journal.thd_open()
        self.addCleanup(journal.thd_close)
        return journal

    def read_after_crash(self) -> list[Result]:
        return ResultJournal(self.dir).thd_read()

    def test_final_results_are_in_the_file_at_once_and_deferrals_are_not(self) -> None:
        journal = self.journal()
        bounced = Result(3, "Q3", BOUNCED, "550 5.1.1 unknown user", "10.0.0.1:2525")
        deferred = Result(2, "Q2", DEFERRED, "451 4.3.0 try later", "10.0.0.1:2525", 500.0)
        where = journal.append([delivered(1), deferred, bounced])
        self.assertEqual(where, [0, NOT_WRITTEN, 0])
        self.assertEqual(self.read_after_crash(), [delivered(1), bounced])

    def test_a_line_cut_short_by_a_crash_and_foreign_lines_are_skipped(self) -> None:
        journal = self.journal()
        journal.append([delivered(1)])
        with (self.dir / NAMES[0]).open("ab") as f:
            f.write(b"not a result\n[1,2,3]\n" + encode(delivered(2))[:-9])
        self.assertEqual(self.read_after_crash(), [delivered(1)])

    def test_writing_turns_to_the_other_file_only_once_its_results_are_in_the_store(
        self,
    ) -> None:
        journal = self.journal(max_bytes=1)  # every write fills the file it went to
        first = journal.append([delivered(1)])
        self.assertEqual(journal.append([delivered(2)]), [1])  # the other file was empty
        self.assertEqual(journal.append([delivered(3)]), [1])  # result 1 is not stored yet
        journal.committed(first)
        self.assertEqual(journal.append([delivered(4)]), [0])  # file 0 emptied first
        self.assertEqual(sorted(r.rcpt_id for r in self.read_after_crash()), [2, 3, 4])

    def test_a_clean_close_empties_the_journal(self) -> None:
        journal = self.journal()
        journal.committed(journal.append([delivered(1)]))
        journal.thd_close()
        self.assertEqual(self.read_after_crash(), [])
        self.assertEqual([(self.dir / n).stat().st_size for n in NAMES], [0, 0])

    def test_a_close_with_results_the_store_lacks_keeps_them(self) -> None:
        journal = self.journal()
        journal.append([delivered(1)])
        journal.thd_close()
        self.assertEqual(self.read_after_crash(), [delivered(1)])

    def test_a_write_that_fails_says_so_once_and_the_journal_goes_on_once_it_can(
        self,
    ) -> None:
        """A full disk turned the journal off until the next start: a crash long after the
        disk had room again could still deliver mail twice."""
        lines = logged(self, lambda e: e.get("log_namespace") == "mailcore.queue.journal")
        (self.dir / NAMES[0]).symlink_to("/dev/full")  # every write: ENOSPC
        journal = self.journal()
        self.assertEqual(journal.append([delivered(1)]), [NOT_WRITTEN])
        self.assertTrue(journal.failed)
        self.assertEqual(journal.append([delivered(2)]), [NOT_WRITTEN])
        self.assertEqual(lines, ["cannot write the results journal (No space left on device); "
                                 "until it can again, a crash may deliver some mail twice"])
        # The disk has room again: the same descriptor now writes to a file.
        room = os.open(self.dir / "room", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(room, journal._fds[0])
        os.close(room)
        with (self.dir / "room").open("wb") as f:
            f.write(encode(delivered(1))[:-9])  # the line the full disk cut short
        self.assertEqual(journal.append([delivered(3)]), [0])
        self.assertFalse(journal.failed)
        self.assertEqual(lines[1:], ["the results journal is written again"])
        written = (self.dir / "room").read_bytes().splitlines()
        self.assertEqual([decode(line) for line in written], [None, delivered(3)])

    def test_a_line_is_the_json_array_the_encoder_writes_and_reads_back(self) -> None:
        """encode writes what json.JSONEncoder(separators=(",", ":")) wrote before it (the
        journal of a daemon stopped by a crash is read by its successor): quotes,
        backslashes, control characters, non-ASCII and astral characters alike."""
        encoder = json.JSONEncoder(separators=(",", ":"))
        for result in [
            delivered(1),
            Result(2**40, 'Q"\\x', BOUNCED, "550 5.1.1 \u00e9\u2603 \x00\x1f\n\t\U0001f600 \ufffd",
                   "[2001:db8::1]:25"),
            Result(0, "", DELIVERED, "", ""),
        ]:
            fields = [result.rcpt_id, result.message_id, result.state, result.detail,
                      result.hop]
            self.assertEqual(encode(result), (encoder.encode(fields) + "\n").encode("ascii"))
            self.assertEqual(decode(encode(result)), result)

    def test_a_missing_directory_is_an_error_at_open(self) -> None:
        journal = ResultJournal(self.dir / "gone")
        self.assertRaises(FileNotFoundError, journal.thd_open)
        self.assertEqual(journal.append([delivered(1)]), [NOT_WRITTEN])


class RestartAfterCrashTests(TestCase):
    """Node "a" delivers, then dies before its results reach the store; it starts again
    with the same node id and data directory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = synchronous_database()
        self.domain = done(self.db.run("d", thd_add_domain, "c.test", "10.0.0.1", 2525))
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def node(self, connector: ScriptedConnector) -> Any:
        q = make_queue(self.db, self.clock, connector, node_id="a", lease_seconds=60.0)
        q.spool.journal = ResultJournal(self.dir)
        self.addCleanup(q.spool.journal.thd_close)
        return q

    def die(self, q: Any) -> None:
        """The node is killed: no stop, no drain, no more sweeps or renewals."""
        for loop in (q.service._sweep_loop, q.service._renew_loop):
            loop.stop()
        q.service.running = False
        q.runner.running = False

    def stop(self, q: Any) -> None:
        d = q.service.stopService()
        self.clock.advance(60)
        self.successResultOf(d)

    def states(self) -> dict[str, str]:
        r = queue_recipients.c
        rows = done(self.db.read("s", lambda c: c.execute(select(r.address, r.state)).all()))
        return {row[0]: row[1] for row in rows}

    def test_a_delivery_on_record_in_the_journal_is_not_made_again(self) -> None:
        first = ScriptedConnector()
        first.replies["r1@c.test"] = (550, ("5.1.1 no such user",))
        a = self.node(first)
        # Its results go to a store that is not this one: for this store they are lost,
        # as they would be in a crash before their transaction.
        a.spool.results_db = synchronous_database()
        a.service.startService()
        for i in range(3):
            env = envelope("s@x.test", (f"r{i}@c.test", self.domain))
            self.successResultOf(
                defer.Deferred.fromCoroutine(a.spool.accept(f"Q{i}", env, b"body\r\n"))
            )
        self.assertEqual(sorted(first.addresses()), ["r0@c.test", "r2@c.test"])
        self.assertEqual(set(self.states().values()), {"queued"})
        self.die(a)

        second = ScriptedConnector()
        again = self.node(second)
        again.service.startService()
        # The two delivered are not sent again; the bounce got its one DSN (to the sender,
        # through the relay host); nothing is left to do.
        self.assertEqual(second.addresses(), ["s@x.test"])
        states = self.states()
        self.assertEqual(
            [states[f"r{i}@c.test"] for i in range(3)], [DELIVERED, BOUNCED, DELIVERED]
        )
        self.assertEqual(states["s@x.test"], DELIVERED)
        m = queue_messages.c
        unfinished = done(self.db.read(
            "u", lambda c: c.execute(select(m.id).where(m.done_at.is_(None))).all()
        ))
        self.assertEqual(unfinished, [])
        self.stop(again)
        self.assertEqual([os.path.getsize(self.dir / n) for n in NAMES], [0, 0])

    def test_a_clean_stop_leaves_nothing_to_apply(self) -> None:
        connector = ScriptedConnector()
        a = self.node(connector)
        a.service.startService()
        env = envelope("s@x.test", ("r0@c.test", self.domain))
        self.successResultOf(
            defer.Deferred.fromCoroutine(a.spool.accept("Q0", env, b"body\r\n"))
        )
        self.assertEqual(connector.addresses(), ["r0@c.test"])
        self.assertEqual(len(ResultJournal(self.dir).thd_read()), 1)
        self.stop(a)
        self.assertEqual(ResultJournal(self.dir).thd_read(), [])

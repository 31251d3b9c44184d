"""Keeping a message in quarantine on both backends: whatever text the mail carries (an
RFC 2047 Subject that decodes to NUL or ESC, a NUL in the filter's reason) is stored, so the
spam is kept instead of being deferred until it bounces to its forged sender."""

from __future__ import annotations

from dataclasses import replace

import sqlalchemy as sa
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.billing.plans import Plans
from mailcore.gateway.filtering import PipelineQuarantine
from mailcore.gateway.quarantine import (
    LinkSigner,
    QuarantineService,
    QuarantineSettings,
    ToKeep,
    decoded_subject,
)
from mailcore.queue.model import QUARANTINED, NewMessage, Result, thd_insert_messages
from mailcore.queue.pipeline import Action, Decision, PipelineMessage, PipelineRecipient
from mailcore.queue.runner import thd_quarantine
from mailcore.queue.spool import NotLeased
from mailcore.store.schema import queue_recipients
from tests.support.db import MixinBase, open_database
from tests.support.mailsink import add_domain, envelope

SPAM = (b"From: spammer@forged.test\r\nTo: ann@q.test\r\n"
        b"Subject: =?utf-8?q?win=00money=1B[2J?=\r\n\r\nbuy now\r\n")


class DecodedSubjectTests(TestCase):
    def test_controls_from_encoded_words_become_u_fffd(self) -> None:
        self.assertEqual(decoded_subject(SPAM), "win\ufffdmoney\ufffd[2J")

    def test_a_plain_subject_is_unchanged(self) -> None:
        self.assertEqual(decoded_subject(b"Subject: =?utf-8?q?caf=C3=A9?=  au\r\n lait\r\n\r\n"),
                         "caf\u00e9 au lait")


    def test_raw_utf8_and_odd_charsets_are_read(self) -> None:
        # A Subject in raw UTF-8 (SMTPUTF8 mail, and much spam) was U+FFFD for each of its
        # bytes; a word in a charset Python does not know, or holding a byte its charset
        # does not, or in a codec that is no text encoding, lost the whole Subject.
        for raw, text in [
            ("Subject: r\u00e9sum\u00e9 \u2014 \u4f60\u597d".encode(),
             "r\u00e9sum\u00e9 \u2014 \u4f60\u597d"),
            (b"Subject: Fran\xe7ois", "Fran\u00e7ois"),
            (b"Subject: =?x-unknown?q?hello?= world", "hello world"),
            (b"Subject: =?utf-8?q?bad=FF?= byte", "bad\ufffd byte"),
            (b"Subject: =?hex?q?win?= a prize", "win a prize"),
        ]:
            self.assertEqual(decoded_subject(raw + b"\r\n\r\nbody\r\n"), text, raw)


class KeepTestsMixin(MixinBase):
    backend = ""
    timeout = 60

    async def test_a_spam_with_nul_in_its_subject_and_reason_is_kept(self) -> None:
        db = await open_database(self, self.backend)
        dom = await add_domain(db, "q.test", "10.0.0.1", 25)
        service = QuarantineService(db, Clock(), QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        [ident] = await service.keep(
            [ToKeep("Q1", "spammer@forged.test", "ann@q.test", dom, "spam",
                    "spam: tests=SYM\x00BOL")], SPAM)
        held = await service.find(ident)
        assert held is not None
        self.assertEqual((held.subject, held.reason, held.mailfrom),
                         ("win\ufffdmoney\ufffd[2J", "spam: tests=SYM\ufffdBOL",
                          "spammer@forged.test"))

    async def test_a_message_filtered_again_after_a_crash_is_kept_once(self) -> None:
        # Kept again: by a node that took the message over after the keeping node's lease
        # lapsed (that node's keep commits, its results are not applied), or on a store
        # whose keep committed before the queue recorded the recipient. It was a second
        # entry (listed, digested and releasable twice).
        db = await open_database(self, self.backend)
        dom = await add_domain(db, "q.test", "10.0.0.1", 25)
        service = QuarantineService(db, Clock(), QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        ann, bob = (ToKeep("Q1", "s@forged.test", f"{n}@q.test", dom, "spam", "GTUBE")
                    for n in ("ann", "bob"))
        first = await service.keep([ann, bob], SPAM)
        self.assertEqual(await service.keep([ann, bob], SPAM), first)
        other = await service.keep([ToKeep("Q2", "s@forged.test", "ann@q.test", dom, "spam",
                                           "GTUBE")], SPAM)
        self.assertNotIn(other[0], first)
        page = await service.page(dom, None, 0, 10)
        self.assertEqual(page.count, 3)

    async def test_the_queue_keeps_and_records_a_message_in_one_transaction(self) -> None:
        # The queue runner's transaction (thd_quarantine): the rows kept and the recipients
        # recorded quarantined commit together; a replay, or a node whose lease another
        # node took over, keeps nothing (NotLeased, its transaction rolled back).
        db = await open_database(self, self.backend)
        dom = await add_domain(db, "q.test", "10.0.0.1", 25)
        service = QuarantineService(db, Clock(), QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        now = 1_800_000_000.0
        env = envelope("s@forged.test", ("ann@q.test", dom), ("bob@q.test", dom))
        [ids] = await db.run("accept", thd_insert_messages,
                             [NewMessage("Q1", env, SPAM, True)], "node", now, now + 300)
        message = PipelineMessage("Q1", "relay", "s@forged.test", tuple(
            PipelineRecipient(r.address, dom) for r in env.recipients), SPAM)
        decision = Decision(Action.TAG, reason="GTUBE", quarantine=("bob@q.test",),
                            category="spam")
        results = [Result(ids[1], "Q1", QUARANTINED, "quarantined: GTUBE", "")]
        keep = PipelineQuarantine(service)
        await db.run("quarantine", thd_quarantine, keep, message, decision, results, "node",
                     now, now + 300, "mx.test")
        with self.assertRaises(NotLeased):
            await db.run("quarantine", thd_quarantine, keep, message, decision, results,
                         "node", now, now + 300, "mx.test")
        # Claimed by node-a (this node's lease lapsed): node-b keeps nothing of Q2.
        [others] = await db.run("accept", thd_insert_messages,
                                 [NewMessage("Q2", env, SPAM, True)], "node-a", now, now + 300)
        with self.assertRaises(NotLeased):
            await db.run("quarantine", thd_quarantine, keep, replace(message, queue_id="Q2"),
                          decision, [Result(others[1], "Q2", QUARANTINED, "quarantined", "")],
                          "node-b", now, now + 300, "mx.test")
        page = await service.page(dom, None, 0, 10)
        self.assertEqual([h.email for h in page.emails], ["bob@q.test"])
        states: dict[str, dict[str, str]] = {}
        for qid, address, state in await db.read("states", lambda c: c.execute(sa.select(
                queue_recipients.c.message_id, queue_recipients.c.address,
                queue_recipients.c.state)).tuples().all()):
            states.setdefault(qid, {})[address] = state
        self.assertEqual(states.pop("Q1"), {"ann@q.test": "queued", "bob@q.test": QUARANTINED})
        self.assertEqual(states.pop("Q2"), {"ann@q.test": "queued", "bob@q.test": "queued"})

    async def test_an_address_is_listed_however_its_local_part_is_spelled(self) -> None:
        # SMTPUTF8 local parts: SQL lower() folds ASCII only on SQLite, so "Ünal@" was not
        # found as "ünal@"; an NFD spelling (U + U+0308) and a U-label domain neither.
        db = await open_database(self, self.backend)
        dom = await add_domain(db, "xn--bcher-kva.test", "10.0.0.1", 25)
        other = await add_domain(db, "q.test", "10.0.0.1", 25)
        service = QuarantineService(db, Clock(), QuarantineSettings(), Plans(),
                                    hostname="mx.test", signer=LinkSigner(b"k" * 32))
        for queue_id, rcpt, domain_id in (
                ("Q1", "\u00dcnal@xn--bcher-kva.test", dom),
                ("Q2", "\u00fcnal@b\u00fccher.test", dom),
                ("Q3", "U\u0308NAL@xn--bcher-kva.test", dom),
                ("Q4", "jos\u00e9@xn--bcher-kva.test", dom),
                ("Q5", "\u00fcnal@q.test", other)):
            await service.keep([ToKeep(queue_id, "s@forged.test", rcpt, domain_id, "spam",
                                       "GTUBE")], SPAM)
        for asked in ("\u00fcnal@xn--bcher-kva.test", "\u00dcNAL@xn--bcher-kva.test",
                      "u\u0308nal@xn--bcher-kva.test"):
            page = await service.page(dom, asked, 0, 10)
            self.assertEqual(page.count, 3, asked)
            self.assertEqual(sorted(h.email for h in page.emails),
                             sorted(["\u00dcnal@xn--bcher-kva.test", "\u00fcnal@b\u00fccher.test",
                                     "U\u0308NAL@xn--bcher-kva.test"]))
        page = await service.page(dom, "JOS\u00c9@xn--bcher-kva.test", 0, 10)
        self.assertEqual([h.email for h in page.emails], ["jos\u00e9@xn--bcher-kva.test"])


class SQLiteKeepTests(KeepTestsMixin, TestCase):
    backend = "sqlite"


class PostgresKeepTests(KeepTestsMixin, TestCase):
    backend = "postgresql"

"""The filtering stage between spool and delivery, with the built-in chain: GTUBE and
EICAR against each domain policy, clean mail untouched, a filter that is down, empty tanks."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs, formatEvent
from twisted.names import dns
from twisted.trial.unittest import TestCase

from filters.chain import ChainEntry, FilterChain
from filters.clamd import ClamdClient
from filters.interface import Symbol, Verdict
from mailcore.config import Config
from mailcore.gateway.filtering import FILTERING_UNAVAILABLE, spam_headers
from mailcore.queue.pipeline import Action, PipelineMessage, apply_tags
from mailcore.smtp.envelope import Envelope, Recipient
from tests.support.logs import load_noise
from tests.support.quarantine import (
    GTUBE,
    DownChain,
    Gateway,
    eicar_attachment,
    message,
    stopper,
)


class PipelineFilteringTests(TestCase):
    def setUp(self) -> None:
        self.gw = Gateway()
        self.addCleanup(stopper(self.gw))

    async def held(self, domain: str) -> list[Any]:
        dom = self.gw.core.domains.lookup(domain)
        assert dom is not None
        return (await self.gw.core.quarantine.page(dom.id, None, 0, 100)).emails

    async def test_gtube_to_a_quarantine_domain_is_quarantined_not_delivered(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=0)
        await self.gw.send(message("buy now", GTUBE), "bob@q.test")
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"bob@q.test": "quarantined"})
        [held] = await self.held("q.test")
        self.assertEqual((held.email, held.subject, held.category), ("bob@q.test", "buy now",
                                                                    "spam"))
        self.assertIn("GTUBE", held.reason)
        self.assertRegex(held.ident, r"^\d{20}$")

    async def test_gtube_to_a_tag_domain_is_delivered_tagged(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "t.test", spam_action=1)
        body = message("buy now", GTUBE)
        await self.gw.send(body, "bob@t.test")
        [(_f, rcpts, got)] = self.gw.delivered()
        self.assertEqual(rcpts, ["bob@t.test"])
        head = got.split(b"\r\n\r\n")[0]
        self.assertIn(b"X-Spam-Flag: YES\r\n", head)
        self.assertRegex(head, rb"X-Spam-Score: \d+\.\d")
        self.assertRegex(head, rb"X-Spam-Status: Yes, score=\d+\.\d required=5\.0 tests=GTUBE")
        self.assertIn(b"Subject: [SPAM] buy now\r\n", head)
        self.assertEqual(await self.held("t.test"), [])

    async def test_eicar_attachment_is_quarantined_with_the_virus_name(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "v.test", spam_action=1, virus_action=0)
        await self.gw.send(eicar_attachment(), "bob@v.test")
        self.assertEqual(self.gw.delivered(), [])
        [held] = await self.held("v.test")
        self.assertEqual(held.category, "virus")
        self.assertIn("Eicar-Test-Signature", held.reason)

    async def test_virus_tagged_for_virus_action_1(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "vt.test", virus_action=1)
        await self.gw.send(eicar_attachment("hi"), "bob@vt.test")
        [(_f, _r, got)] = self.gw.delivered()
        self.assertIn(b"X-Virus-Status: Infected (Eicar-Test-Signature)\r\n", got)
        self.assertIn(b"Subject: [VIRUS] hi\r\n", got)

    async def test_clean_mail_is_delivered_byte_identical(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "c.test", spam_action=0)
        body = message("lunch?", b"see you at noon")
        await self.gw.send(body, "bob@c.test", sender="friend@x.test")
        self.assertEqual(self.gw.delivered(), [("friend@x.test", ["bob@c.test"], body)])

    async def test_mixed_policies_in_one_delivery_split(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=0)
        await self.gw.domain(user, "t.test", spam_action=1)
        await self.gw.send(message("x", GTUBE), "a@q.test", "b@t.test")
        [(_f, rcpts, got)] = self.gw.delivered()
        self.assertEqual(rcpts, ["b@t.test"])
        self.assertIn(b"X-Spam-Flag: YES", got)
        self.assertEqual(self.gw.states(), {"a@q.test": "quarantined", "b@t.test": "delivered"})
        self.assertEqual(len(await self.held("q.test")), 1)

    async def test_bounces_and_releases_are_not_filtered(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=0)
        body = message("x", GTUBE)
        await self.gw.send(body, "a@q.test", kind="release")
        self.assertEqual(self.gw.delivered(), [("spammer@x.test", ["a@q.test"], body)])

    async def test_filter_down_keeps_the_message_queued(self) -> None:

        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=1)
        stage: Any = self.gw.core.queue.runner.pipeline.stages[0]
        real, stage.chain = stage.chain, DownChain()
        with capturedLogs() as events:
            await self.gw.send(message("hi", b"x"), "bob@q.test")
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"bob@q.test": "deferred"})
        # The filter's reason is for the operator's log; the result (quoted by a DSN at
        # expiry) says only that filtering was unavailable.
        self.assertEqual(self.gw.last_errors(), {"bob@q.test": FILTERING_UNAVAILABLE})
        self.assertIn("filter spamd unavailable: connection refused",
                      " ".join(formatEvent(e) for e in events))
        stage.chain = real
        self.gw.clock.advance(3600)
        self.assertEqual([r for _f, r, _b in self.gw.delivered()], [["bob@q.test"]])

    def too_large_for_clamd(self) -> None:
        """The stage's chain: clamd alone, fail-closed, taking 16 bytes at most (the
        message is refused before any connection: the endpoint is never used)."""
        stage: Any = self.gw.core.queue.runner.pipeline.stages[0]
        endpoint = TCP4ClientEndpoint(MemoryReactor(), "127.0.0.1", 3310)
        clamd = ClamdClient(endpoint, self.gw.clock, max_size=16)
        stage.chain = FilterChain([ChainEntry(clamd)], self.gw.clock)

    async def test_too_large_for_a_fail_closed_filter_is_quarantined_unscanned(self) -> None:
        # Retrying cannot make it fit: deferred, it would be scanned again at every retry
        # until it bounced days later. Held unscanned, whatever the domains' policy.
        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=0)
        await self.gw.domain(user, "t.test", spam_action=1, virus_action=1)
        self.too_large_for_clamd()
        await self.gw.send(message("big", b"x" * 64), "a@q.test", "b@t.test")
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"a@q.test": "quarantined",
                                            "b@t.test": "quarantined"})
        [held] = await self.held("t.test")
        self.assertEqual((held.category, held.reason),
                         ("oversize", "unscanned: too large for filter clamd"))
        self.assertEqual(await self.gw.core.quarantine.release(held.ident), "released")
        self.gw.clock.advance(60)
        self.assertEqual([r for _f, r, _b in self.gw.delivered()], [["b@t.test"]])

    async def test_too_large_with_a_recipient_outside_the_domains_defers_only_it(self) -> None:
        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=1)
        self.too_large_for_clamd()
        answer: Any = ([dns.RRHeader("gw.test", dns.MX, payload=dns.Record_MX(10, "mx.gw.test"))],
                  [], [])

        class Resolver:
            def lookupMailExchange(self, name: str) -> defer.Deferred[Any]:
                return defer.succeed(answer)

        self.gw.core.queue.runner.router._resolver = Resolver()
        dom = self.gw.core.domains.lookup("q.test")
        assert dom is not None
        envelope = Envelope("s@x.test", (Recipient("a@q.test", dom.id),
                                         Recipient("postmaster@gw.test", None)))
        await self.gw.core.spool.accept("Q9", envelope, message("big", b"x" * 64))
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"a@q.test": "quarantined",
                                            "postmaster@gw.test": "deferred"})
        self.assertEqual(self.gw.last_errors()["postmaster@gw.test"], FILTERING_UNAVAILABLE)

    async def test_empty_tanks_defer_and_nothing_is_lost(self) -> None:
        user = await self.gw.owner(tokens=0)
        tanks = await self.gw.core.tokens.tanks(user.id)
        self.assertEqual(await self.gw.core.tokens.consume(user.id, tanks.total), "ok")
        await self.gw.domain(user, "q.test", spam_action=1)
        await self.gw.send(message("hi", b"x"), "bob@q.test")
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"bob@q.test": "deferred"})
        await self.gw.core.tokens.credit(user.id, 5)
        self.gw.clock.advance(3600)
        self.assertEqual([r for _f, r, _b in self.gw.delivered()], [["bob@q.test"]])
        tanks = await self.gw.core.tokens.tanks(user.id)
        self.assertEqual(tanks.total, 4)


class TagHelperTests(TestCase):
    def test_subject_prefix_added_once_and_when_missing(self) -> None:
        body = b"From: a\r\nSubject: hi\r\n\r\nSubject: not a header\r\n"
        once = apply_tags(body, (), "[SPAM]")
        self.assertEqual(once, b"From: a\r\nSubject: [SPAM] hi\r\n\r\nSubject: not a header\r\n")
        self.assertEqual(apply_tags(once, (), "[SPAM]"), once)
        self.assertEqual(apply_tags(b"From: a\r\n\r\nx", (), "[SPAM]"),
                         b"Subject: [SPAM]\r\nFrom: a\r\n\r\nx")

    def test_tags_go_after_the_leading_trace_fields(self) -> None:
        """RFC 5322 3.6: trace fields stay in one block at the top; added fields follow."""
        body = (b"Return-Path: <a@x.test>\r\nReceived: from a\r\n\tby b; date\r\n"
                b"received: from c by d; date\r\nFrom: a\r\nReceived: late\r\n\r\nx\r\n")
        tagged = apply_tags(body, (("X-Spam-Flag", "YES"),))
        self.assertEqual(
            tagged,
            b"Return-Path: <a@x.test>\r\nReceived: from a\r\n\tby b; date\r\n"
            b"received: from c by d; date\r\nX-Spam-Flag: YES\r\nFrom: a\r\n"
            b"Received: late\r\n\r\nx\r\n",
        )
        self.assertEqual(apply_tags(b"From: a\r\n\r\nx", (("X-A", "1"),)),
                         b"X-A: 1\r\nFrom: a\r\n\r\nx")

    def test_a_long_symbol_list_is_folded_after_its_commas(self) -> None:
        """60 rspamd symbols made a 1,370-octet X-Spam-Status line."""
        names = [f"RSPAMD_SYMBOL_NAME_{i:02d}" for i in range(60)]
        verdict = Verdict(filter="chain", score=25.0, threshold=15.0, spam=True,
                          symbols=tuple(Symbol(n, 1.0) for n in names))
        tagged = apply_tags(b"From: a\r\n\r\nx", spam_headers(verdict))
        head = tagged.split(b"\r\n\r\n")[0]
        self.assertLessEqual(max(len(line) for line in head.split(b"\r\n")), 78)
        status: Any = message_from_bytes(tagged, policy=default)["X-Spam-Status"]
        self.assertEqual(str(status).replace(", ", ","),
                         "Yes,score=25.0 required=15.0 tests=" + ",".join(names))

    def test_controls_in_a_value_are_dropped(self) -> None:
        tagged = apply_tags(b"From: a\r\n\r\nx", (("X-Virus-Status", "Infected (E\x00\x1b)"),))
        self.assertEqual(tagged, b"X-Virus-Status: Infected (E)\r\nFrom: a\r\n\r\nx")

    def test_a_non_ascii_symbol_name_is_written_in_rfc6533_notation(self) -> None:
        """The message may not have said SMTPUTF8: a field we add stays ASCII."""
        tagged = apply_tags(b"From: a\r\n\r\nx", (("X-Spam-Status", "Yes, tests=CAF\u00c9"),))
        self.assertEqual(tagged, b"X-Spam-Status: Yes, tests=CAF\\x{C9}\r\nFrom: a\r\n\r\nx")

    def test_a_non_ascii_tag_is_an_encoded_word(self) -> None:
        body = b"From: a\r\nSubject: hi\r\n\r\nx"
        once = apply_tags(body, (), "[\u0421\u041f\u0410\u041c]")
        self.assertTrue(once.isascii())
        self.assertEqual(apply_tags(once, (), "[\u0421\u041f\u0410\u041c]"), once)
        for original, shown in ((b"hi", "[\u0421\u041f\u0410\u041c] hi"),
                                (b"=?utf-8?q?caf=C3=A9?=", "[\u0421\u041f\u0410\u041c] caf\u00e9"),
                                (None, "[\u0421\u041f\u0410\u041c]")):
            body = b"From: a\r\n" + (b"" if original is None else b"Subject: " + original
                                      + b"\r\n") + b"\r\nx"
            tagged = apply_tags(body, (), "[\u0421\u041f\u0410\u041c]")
            self.assertTrue(tagged.isascii())
            parsed: Any = message_from_bytes(tagged, policy=default)
            self.assertEqual(str(parsed["Subject"]), shown)

    def test_a_new_subject_goes_after_the_trace_fields(self) -> None:
        """RFC 5321 4.4: the trace fields stay at the top of the header."""
        body = b"Received: from a by b; date\r\nFrom: a\r\n\r\nx"
        self.assertEqual(apply_tags(body, (("X-A", "1"),), "[SPAM]"),
                         b"Received: from a by b; date\r\nX-A: 1\r\nSubject: [SPAM]\r\n"
                         b"From: a\r\n\r\nx")

    def test_a_tag_with_a_control_character_is_refused_at_load(self) -> None:
        from mailcore.config import ConfigError
        from mailcore.gateway.filtering import PolicySettings

        for key in ("subject_tag", "virus_subject_tag"):
            for bad in ("[SPAM]\r\nBcc: x@y.test", "[SPAM]\x00", "[\x1b[31mSPAM]"):
                with self.assertRaises(ConfigError) as raised:
                    PolicySettings.from_config({key: bad})
                self.assertIn(f"[pipeline] {key} must be one line of text", str(raised.exception))
        self.assertEqual(PolicySettings.from_config({"subject_tag": "[\u0421\u041f\u0410\u041c]"})
                         .subject_tag, "[\u0421\u041f\u0410\u041c]")

    def test_pipeline_config_rejects_unknown_keys(self) -> None:
        from mailcore.config import ConfigError
        from mailcore.gateway.filtering import PolicySettings

        self.assertEqual(PolicySettings.from_config({"subject_tag": "***"}).subject_tag, "***")
        self.assertRaises(ConfigError, PolicySettings.from_config, {"nope": 1})

    async def test_non_relay_message_skips_the_stage(self) -> None:
        gw = Gateway(Config())
        self.addCleanup(stopper(gw))
        stage = gw.core.queue.runner.pipeline.stages[0]
        msg = PipelineMessage("Q", "digest", "", (), b"x")
        self.assertIsNone(await stage.process(msg))
        self.assertIs(Action.DEFER.value, "defer")


class ProcessNowTests(TestCase):
    """`FilteringStage.process_now` decides and logs as `process` (built-in chain, no
    tokens), and waits, with nothing done, for what it cannot decide at once."""

    def stage(self, inline_max: int = 32768) -> Any:
        from types import SimpleNamespace

        from twisted.internet.task import Clock

        from filters import build_chain
        from mailcore.gateway.filtering import FilteringStage
        from mailcore.workers import CpuPool
        from tests.test_tokens_batching import Lookup

        domains = [SimpleNamespace(id=i, owner_id=1, name=f"d{i}.test", spam_action=spam,
                                   virus_action=virus)
                   for i, (spam, virus) in enumerate([(0, 0), (1, 0), (1, 1)], 1)]
        chain = build_chain({"builtin": {"inline_max": inline_max}}, reactor=Clock(),
                            runner=CpuPool.for_tests())
        return FilteringStage(chain, Lookup(*domains), None)

    async def test_the_same_decisions_and_log_lines_as_process(self) -> None:
        from twisted.logger import capturedLogs, formatEvent

        from mailcore.queue.pipeline import PipelineRecipient

        stage = self.stage()
        bodies = [message("hi", b"clean"), message("buy", GTUBE), eicar_attachment(),
                  b"no header at all", b"From: <broken\r\nDate: never\r\n\r\nx\r\n"]
        groups = [(1,), (2,), (3,), (1, 2), (2, 3), (1, 2, 3)]
        for n, (body, group) in enumerate((b, g) for b in bodies for g in groups):
            msg = PipelineMessage(f"Q{n}", "relay", "a@x.test", tuple(
                PipelineRecipient(f"r{d}@d{d}.test", d) for d in group), body)
            with capturedLogs() as now_events:
                now = stage.process_now(msg)
            with capturedLogs() as later_events:
                later = await stage.process(msg)
            self.assertEqual(now, later, (body, group))
            later_events = [e for e in later_events if not load_noise(e)]
            self.assertEqual([formatEvent(e) for e in now_events],
                             [formatEvent(e) for e in later_events])
            self.assertEqual(len(now_events), 1)  # the `filtered` line

    async def test_what_cannot_be_decided_at_once_waits(self) -> None:
        from twisted.logger import capturedLogs

        from mailcore.queue.pipeline import LATER, PipelineRecipient

        msg = PipelineMessage("Q1", "relay", "a@x.test",
                              (PipelineRecipient("r@d1.test", 1),), message("hi", b"x"))
        stage = self.stage(inline_max=10)  # analysed on the pool
        self.assertIs(stage.process_now(msg), LATER)
        stage = self.stage()
        stage.domains.loaded = False  # the first snapshot is still loading
        self.assertIs(stage.process_now(msg), LATER)
        stage.domains.loaded = True
        self.assertIsNone(stage.process_now(msg))
        self.assertIsNone(stage.process_now(PipelineMessage("Q", "digest", "", (), b"x")))
        # A small message whose analysis its size does not bound (many parts: a zip, many
        # header lines likewise) waits for the pool, nothing decided or logged.
        parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(150))
        many = (b"From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                + parts + b"--b--\r\n")
        msg = PipelineMessage("Q2", "relay", "a@x.test", (PipelineRecipient("r@d1.test", 1),),
                              many)
        with capturedLogs() as events:
            self.assertIs(stage.process_now(msg), LATER)
        self.assertEqual(events, [])


class FilteringSwitchTests(TestCase):
    """The stage runs unless `[pipeline] filtering = false` (on by default)."""

    def test_default_core_filters(self) -> None:
        from mailcore.gateway.filtering import FilteringStage
        from mailcore.queue.pipeline import DEFAULT_MAX_SCANS
        from tests.support.web import make_core

        core, _clock = make_core()
        pipeline = core.queue.runner.pipeline
        [stage] = pipeline.stages
        assert isinstance(stage, FilteringStage)
        self.assertEqual(pipeline.max_scans, DEFAULT_MAX_SCANS)
        # A message is charged in the commit that stores it; the charges asked for later
        # are batched and written by the spool's next group commit.
        assert stage.tokens is not None
        self.assertIs(core.spool.charger, stage)
        self.assertEqual(stage.tokens.lane, core.spool.charge)

    def test_switch_off_passes_everything(self) -> None:
        from tests.support.web import make_core

        core, _clock = make_core(Config(sections={"pipeline": {"filtering": False}}))
        self.assertEqual(core.queue.runner.pipeline.stages, [])

    def test_max_scans_is_configurable_and_checked(self) -> None:
        from mailcore.config import ConfigError
        from tests.support.web import make_core

        core, _clock = make_core(Config(sections={"pipeline": {"max_scans": 4}}))
        self.assertEqual(core.queue.runner.pipeline.max_scans, 4)
        for bad in (0, -1, True, 2.5, "8"):
            with self.assertRaises(ConfigError, msg=repr(bad)):
                make_core(Config(sections={"pipeline": {"max_scans": bad}}))

    def test_switch_must_be_boolean(self) -> None:
        from mailcore.config import ConfigError
        from tests.support.web import make_core

        with self.assertRaises(ConfigError):
            make_core(Config(sections={"pipeline": {"filtering": "yes"}}))

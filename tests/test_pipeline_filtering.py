"""The filtering stage between spool and delivery, with the built-in chain: GTUBE and
EICAR against each domain policy, clean mail untouched, a filter that is down, empty tanks."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from filters import FilterUnavailable, ScanContext, Verdict
from mailcore.config import Config
from mailcore.queue.pipeline import Action, PipelineMessage, apply_tags
from tests.support.quarantine import GTUBE, Gateway, eicar_attachment, message, stopper


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
        class Down:
            async def scan(self, message: bytes, context: ScanContext | None = None) -> Verdict:
                raise FilterUnavailable("spamd", "connection refused")

        user = await self.gw.owner()
        await self.gw.domain(user, "q.test", spam_action=1)
        stage: Any = self.gw.core.queue.runner.pipeline.stages[0]
        real, stage.chain = stage.chain, Down()
        await self.gw.send(message("hi", b"x"), "bob@q.test")
        self.assertEqual(self.gw.delivered(), [])
        self.assertEqual(self.gw.states(), {"bob@q.test": "deferred"})
        stage.chain = real
        self.gw.clock.advance(3600)
        self.assertEqual([r for _f, r, _b in self.gw.delivered()], [["bob@q.test"]])

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

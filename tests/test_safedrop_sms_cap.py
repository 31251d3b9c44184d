"""`[safedrop] max_sms_per_user_per_day` and `max_sms_per_link_per_day`: the one-time codes
texted for one user's drops, and for one recipient's link, are capped, counted in the store
(the nodes sharing it count one total); past a cap a code goes by mail, the refusal is
counted in /metrics by cap and the first of a spell logged. A link past its own cap spends
none of its owner's texts."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from mailcore.safedrop.access import Access
from mailcore.safedrop.service import (
    CODE_BY_MAIL,
    CODE_BY_SMS,
    SMS_LINK_LIMIT,
    SMS_PERIOD,
    SafedropService,
)
from mailcore.safedrop.sms import SmsGateway
from mailcore.sendcaps import SPELL_QUIET
from tests.support.db import synchronous_database
from tests.support.logs import logged_at
from tests.support.pg import create_test_database
from tests.test_web_safedrop_pages import LINK, PageFixture

CAPPED = "mailcore_safedrop_sms_capped_total"
BOBS, DANS = "442077394252", "12025550123"


class Gateway(Resource):
    """An SMS gateway answering `status` to every message; the numbers it was given."""

    isLeaf = True

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        self.texted: list[str] = []

    def render_POST(self, request: Any) -> bytes:
        self.texted.append(request.args[b"to"][0].decode())
        request.setResponseCode(self.status)
        return b"ok"


class SmsCapTests(TestCase):
    """On SQLite; SmsCapOnPostgresTests runs them on PostgreSQL."""

    on_postgres = False

    async def start(self, cap: int, status: int = 200, link_cap: int = 10) -> Access:
        """Alice's drop sent to bob (who has a telephone) with require_token_auth, her
        texts capped at `cap` a day and each link's at `link_cap`, through a gateway
        answering `status`: bob's link."""
        self.db_url = await create_test_database(self) if self.on_postgres else None
        self.f = f = PageFixture()
        await f.start(self, self.db_url)
        self.drops = drops = f.web.core.safedrop
        drops.settings = dataclasses.replace(drops.settings, max_sms_per_user_per_day=cap,
                                             max_sms_per_link_per_day=link_cap)
        self.gateway = Gateway(status)
        drops.sms = self.texting()
        _, bob = await f.sent_bundle("subject=Deal&require_token_auth=1")
        return await drops.open_link(bob.removeprefix("/drop/"))

    def texting(self) -> SmsGateway:
        """A client of `self.gateway`, on the test's clock."""
        return SmsGateway("http://sms.example/send", StubTreq(self.gateway), self.f.web.clock)

    def node(self, registry: CollectorRegistry) -> SafedropService:
        """Another node's drop service (its metrics in `registry`), on the same store (on
        PostgreSQL, through a connection of its own), with the same settings and
        gateway."""
        core = self.f.web.core
        db = core.db
        if self.db_url is not None:
            db = synchronous_database(self.db_url)
            self.addCleanup(db.close)
        drops = SafedropService(
            db, core.clock, core.cpu, core.fetch.secrets, core.spool,
            self.drops.settings, data_dir=core.config.data_dir,
            files_dir=core.config.files_root, hostname=core.config.hostname,
            sms=self.texting(),
            registry=registry)
        drops.prepare()
        return drops

    async def link_to(self, recipient: str) -> Access:
        """The link of `recipient` (`email=`'s value) to another drop of the user logged
        in, with require_token_auth."""
        f = self.f
        address = recipient.partition("&")[0].replace("%40", "@")
        await f.sent_bundle("subject=Other&require_token_auth=1", recipients=(recipient,))
        [notification] = f.mails_to(address)
        link = LINK.search(notification.get_content())
        assert link is not None
        return await self.drops.open_link(link.group(1).removeprefix("/drop/"))

    def mailed(self, address: str = "bob@example.net") -> int:
        """How many codes went to `address` (bob) by mail."""
        return len([m for m in self.f.mails_to(address)
                    if m["Subject"] == "Your safedrop code"])

    def capped(self, cap: str = "user") -> float | None:
        return self.f.web.core.metrics.get_sample_value(CAPPED, {"cap": cap})

    async def left(self, found: Access) -> float:
        """The texts left in the bucket of `found`'s link."""
        return await self.drops.sms_sent.available(
            SMS_LINK_LIMIT, found.recipient.id, self.drops.settings.max_sms_per_link_per_day,
            SMS_PERIOD)

    async def test_past_the_cap_codes_go_by_mail_counted_and_logged_once(self) -> None:
        warnings = logged_at(self, LogLevel.warn)
        bob = await self.start(cap=2)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(4)],
                         [CODE_BY_SMS, CODE_BY_SMS, CODE_BY_MAIL, CODE_BY_MAIL])
        self.assertEqual(self.gateway.texted, ["442077394252"] * 2)
        self.assertEqual(self.mailed(), 2)
        self.assertEqual(self.capped(), 2)
        alice = self.f.alice
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"user {alice.id} (alice <alice@example.test>) reached its cap on "
                      "safedrop text messages ([safedrop] max_sms_per_user_per_day = 2): its "
                      "drops' codes go by mail", warnings[0])
        # The bucket gives one text back every day/2; the spell ended (SPELL_QUIET passed
        # without a refusal), so the next refusal is logged again.
        self.assertLess(SPELL_QUIET, SMS_PERIOD / 2)
        self.f.web.clock.advance(SMS_PERIOD / 2)
        self.assertEqual(await self.drops.send_code(bob), CODE_BY_SMS)
        self.assertEqual(len(self.gateway.texted), 3)
        self.assertEqual(await self.drops.send_code(bob), CODE_BY_MAIL)
        self.assertEqual((len(self.gateway.texted), self.mailed(), self.capped()), (3, 3, 3))
        self.assertEqual(len(warnings), 2, warnings)

    async def test_the_nodes_sharing_the_store_count_one_total(self) -> None:
        bob = await self.start(cap=2)
        registry = CollectorRegistry()
        other = self.node(registry)
        self.assertEqual([await self.drops.send_code(bob), await other.send_code(bob),
                          await other.send_code(bob), await self.drops.send_code(bob)],
                         [CODE_BY_SMS, CODE_BY_SMS, CODE_BY_MAIL, CODE_BY_MAIL])
        self.assertEqual(len(self.gateway.texted), 2)
        self.assertEqual(self.mailed(), 2)
        # Each node counts and logs its own refusals.
        self.assertEqual(self.capped(), 1)
        self.assertEqual(registry.get_sample_value(CAPPED, {"cap": "user"}), 1)

    async def test_the_nodes_sharing_the_store_count_one_total_for_a_link(self) -> None:
        bob = await self.start(cap=0, link_cap=2)
        registry = CollectorRegistry()
        other = self.node(registry)
        self.assertEqual([await other.send_code(bob), await self.drops.send_code(bob),
                          await other.send_code(bob)],
                         [CODE_BY_SMS, CODE_BY_SMS, CODE_BY_MAIL])
        self.assertEqual(len(self.gateway.texted), 2)
        self.assertEqual(registry.get_sample_value(CAPPED, {"cap": "link"}), 1)
        self.assertEqual(self.capped("link"), 0)

    async def test_each_owner_has_a_cap_of_its_own(self) -> None:
        bob = await self.start(cap=1)
        f = self.f
        carol = await f.web.user("carol")
        f.token = await f.login("carol@example.test", await f.web.credential(carol))
        dans = await self.link_to(f"dan%40example.net&telephone={DANS}")
        self.assertEqual([await self.drops.send_code(bob), await self.drops.send_code(bob),
                          await self.drops.send_code(dans)],
                         [CODE_BY_SMS, CODE_BY_MAIL, CODE_BY_SMS])
        self.assertEqual(self.gateway.texted, [BOBS, DANS])
        self.assertEqual(self.mailed(), 1)

    async def test_a_link_past_its_cap_spends_none_of_its_owners_texts(self) -> None:
        """Bob's link past its own cap gets its codes by mail, counted and logged once,
        and takes nothing from alice's texts: dan, her other recipient, gets the last."""
        warnings = logged_at(self, LogLevel.warn)
        bob = await self.start(cap=3, link_cap=2)
        dans = await self.link_to(f"dan%40example.net&telephone={DANS}")
        self.assertEqual([await self.drops.send_code(bob) for _ in range(5)],
                         [CODE_BY_SMS] * 2 + [CODE_BY_MAIL] * 3)
        self.assertEqual([await self.drops.send_code(dans) for _ in range(2)],
                         [CODE_BY_SMS, CODE_BY_MAIL])
        self.assertEqual(self.gateway.texted, [BOBS, BOBS, DANS])
        self.assertEqual((self.mailed(), self.mailed("dan@example.net")), (3, 1))
        self.assertEqual((self.capped("link"), self.capped("user")), (3, 1))
        alice = self.f.alice
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(f"the link of safedrop recipient {bob.recipient.id} (bundle "
                      f"{bob.bundle.id} of user {alice.id} (alice <alice@example.test>)) "
                      "reached its cap on text messages ([safedrop] max_sms_per_link_per_day "
                      "= 2): its codes go by mail", warnings[0])
        self.assertIn(f"user {alice.id} (alice <alice@example.test>) reached its cap",
                      warnings[1])
        # The link's bucket gives one text back every day/2 (its spell over meanwhile:
        # its next refusal is logged again); alice's gives one every day/3.
        self.f.web.clock.advance(SMS_PERIOD / 2)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(2)],
                         [CODE_BY_SMS, CODE_BY_MAIL])
        self.assertEqual(self.gateway.texted, [BOBS, BOBS, DANS, BOBS])
        self.assertEqual(self.capped("link"), 4)
        self.assertEqual(len(warnings), 3, warnings)
        self.assertIn("max_sms_per_link_per_day = 2", warnings[2])

    async def test_a_code_past_both_caps_is_refused_by_the_links(self) -> None:
        """The link's cap is asked first: a code past both is the link's refusal."""
        bob = await self.start(cap=1, link_cap=1)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(2)],
                         [CODE_BY_SMS, CODE_BY_MAIL])
        self.assertEqual((self.capped("link"), self.capped("user")), (1, 0))

    async def test_a_code_the_owners_cap_refuses_spends_none_of_its_links_texts(
            self) -> None:
        bob = await self.start(cap=1, link_cap=3)
        dans = await self.link_to(f"dan%40example.net&telephone={DANS}")
        self.assertEqual([await self.drops.send_code(bob), await self.drops.send_code(dans),
                          await self.drops.send_code(bob)],
                         [CODE_BY_SMS, CODE_BY_MAIL, CODE_BY_MAIL])
        self.assertEqual((self.capped("link"), self.capped("user")), (0, 2))
        self.assertEqual((await self.left(bob), await self.left(dans)), (2, 3))

    async def test_every_text_handed_to_the_gateway_counts_whatever_it_answers(
            self) -> None:
        bob = await self.start(cap=2, status=503)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(3)],
                         [CODE_BY_MAIL] * 3)
        self.assertEqual(len(self.gateway.texted), 2)
        self.assertEqual(self.mailed(), 3)
        self.assertEqual(self.capped(), 1)

    async def test_a_code_by_mail_takes_nothing_from_the_cap(self) -> None:
        bob = await self.start(cap=1)
        self.drops.sms = None
        self.assertEqual(await self.drops.send_code(bob), CODE_BY_MAIL)
        self.drops.sms = self.texting()
        self.assertEqual(await self.drops.send_code(bob), CODE_BY_SMS)
        self.assertEqual((len(self.gateway.texted), self.mailed(), self.capped()), (1, 1, 0))

    async def test_0_is_no_cap(self) -> None:
        warnings = logged_at(self, LogLevel.warn)
        bob = await self.start(cap=0, link_cap=0)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(12)],
                         [CODE_BY_SMS] * 12)
        self.assertEqual(len(self.gateway.texted), 12)
        self.assertEqual(self.mailed(), 0)
        self.assertEqual((self.capped("link"), self.capped("user")), (0, 0))
        self.assertEqual(warnings, [])

    async def test_0_is_no_cap_for_a_link_the_owners_still_counts(self) -> None:
        bob = await self.start(cap=3, link_cap=0)
        self.assertEqual([await self.drops.send_code(bob) for _ in range(4)],
                         [CODE_BY_SMS] * 3 + [CODE_BY_MAIL])
        self.assertEqual((self.capped("link"), self.capped("user")), (0, 1))


class SmsCapOnPostgresTests(SmsCapTests):
    """The same on PostgreSQL, the other node on a connection of its own."""

    on_postgres = True
    timeout = 120

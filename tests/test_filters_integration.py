"""The whole chain as configured from TOML, against real spamd, clamd and rspamd."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from filters.builtin import EICAR, EICAR_NAME, GTUBE
from filters.chain import FilterChain
from filters.config import build_chain
from filters.interface import FilterUnavailable, ScanContext
from mailcore.workers import CpuPool
from tests.support import filterd
from tests.support.filterd import attachment, message, multipart, text_part
from tests.support.reactor import get_reactor
from tests.support.servers import free_port

CONTEXT = ScanContext(mail_from="alice@example.com", recipients=("bob@example.org",),
                      client_ip="127.0.0.1", helo="localhost", queue_id="IT1")


class FullChainTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        self.spamd = await filterd.spamd()
        self.clamd = await filterd.clamd()
        self.rspamd = await filterd.rspamd()
        self.cpu = CpuPool(self.reactor)
        self.addCleanup(self.cpu.stop)

    def chain(self, **overrides: Any) -> FilterChain:
        section: dict[str, Any] = {
            "enabled": ["builtin", "spamd", "clamd", "rspamd"],
            "builtin": {"inline_max": 1024},
            "spamd": {"address": self.spamd.address, "timeout": 20},
            "clamd": {"address": self.clamd.socket, "timeout": 20},
            "rspamd": {"address": self.rspamd.address, "timeout": 20},
        }
        for key, value in overrides.items():
            section[key] = {**section.get(key, {}), **value}
        chain = build_chain(section, reactor=self.reactor, runner=self.cpu)
        self.addCleanup(chain.close)
        return chain

    async def test_gtube_is_spam_for_every_spam_filter(self) -> None:
        verdict = await self.chain().scan(message(GTUBE), CONTEXT)
        self.assertTrue(verdict.spam)
        self.assertEqual(verdict.score, 1000.0)  # max of the scaled scores
        spam_by = {r.filter for r in verdict.results if r.spam}
        self.assertEqual(spam_by, {"builtin", "spamd", "rspamd"})
        self.assertEqual(verdict.viruses, ())
        self.assertIn("GTUBE", verdict.symbol_names)

    async def test_eicar_attachment_is_a_virus_for_builtin_and_clamd(self) -> None:
        data = multipart([text_part(b"x" * 4000), attachment("eicar.com.txt", EICAR)])
        verdict = await self.chain().scan(data, CONTEXT)
        self.assertEqual(verdict.viruses[0], EICAR_NAME)
        self.assertTrue(any(v.endswith(".UNOFFICIAL") for v in verdict.viruses),
                        verdict.viruses)
        self.assertEqual(verdict.skipped, ())

    async def test_clean_mail_is_clean(self) -> None:
        verdict = await self.chain().scan(message(), CONTEXT)
        self.assertTrue(verdict.clean, verdict.reasons)
        self.assertLess(verdict.score, 5.0)
        self.assertEqual([r.filter for r in verdict.results],
                         ["builtin", "spamd", "clamd", "rspamd"])

    async def test_a_daemon_that_is_down_defers_the_message(self) -> None:
        chain = self.chain(spamd={"address": f"127.0.0.1:{free_port()}"})
        with self.assertRaises(FilterUnavailable) as caught:
            await chain.scan(message(), CONTEXT)
        self.assertEqual(caught.exception.filter, "spamd")
        self.assertIn("cannot connect", caught.exception.reason)

    async def test_fail_open_daemon_that_is_down_is_skipped(self) -> None:
        chain = self.chain(spamd={"address": f"127.0.0.1:{free_port()}", "fail_open": True})
        verdict = await chain.scan(message(GTUBE), CONTEXT)
        self.assertEqual(verdict.skipped, ("spamd",))
        self.assertTrue(verdict.spam)  # the others still caught it

    async def test_health(self) -> None:
        health = await self.chain().health()
        self.assertEqual(health, {"builtin": "ok", "spamd": "ok: PONG", "clamd": "ok: PONG",
                                  "rspamd": "ok: pong"})

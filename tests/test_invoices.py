"""Buying tokens: the permanent tank is credited and an invoice issued in one transaction,
with sequential references (also with two nodes buying at once), the account's details as
they were, and a real PDF that pdftotext reads."""

from __future__ import annotations

import datetime
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from mailcore.billing.invoices import (
    BillingSettings,
    Invoice,
    InvoiceError,
    InvoiceLine,
    InvoiceService,
    money_number,
    parse_price,
    render_invoice_pdf,
)
from mailcore.billing.plans import Plans
from mailcore.billing.tokens import Tanks, TokenService
from mailcore.config import ConfigError
from mailcore.identity import Identity, User
from mailcore.store.schema import billing_counters
from mailcore.workers import CpuPool
from tests.support.cli import cli_command
from tests.support.db import DatabaseMixin, synchronous_database
from tests.support.servers import CommandResult, require_binary, run_command, tempdir_for
from tests.test_tokens import clock_at

REPO = Path(__file__).resolve().parent.parent
PROFILE = {
    "first_name": "John", "last_name": "Doe", "organisation": "jd unlimited",
    "tva_intra": "FR454545", "address": "69 avenue de le pie", "city": "Paris",
    "zip": "75010", "country": "FR", "phone": "+3365478945",
}


async def pdf_text(test: TestCase, data: bytes) -> str:
    """The text pdftotext (poppler-utils) reads from a PDF document."""
    binary = require_binary("pdftotext", "poppler-utils")
    directory = tempdir_for(test, "mailcore-pdf-")
    path = Path(directory) / "invoice.pdf"
    path.write_bytes(data)
    result = await run_command([binary, "-layout", str(path), "-"], timeout=30)
    test.assertEqual(result.status, 0, result.err)
    return result.out


class PriceTests(TestCase):
    def test_prices_are_exact_cents(self) -> None:
        self.assertEqual(parse_price("60"), 6000)
        self.assertEqual(parse_price(720), 72000)
        self.assertEqual(parse_price("724.8"), 72480)
        self.assertEqual(parse_price(Decimal("0.05")), 5)
        self.assertEqual(parse_price("0"), 0)
        for bad in ("0.001", "-1", "abc", "NaN", "Infinity", 1.5, True, "1e20"):
            with self.assertRaises(InvoiceError, msg=bad):
                parse_price(bad)  # type: ignore[arg-type]

    def test_totals_are_numbers_as_the_seed_writes_them(self) -> None:
        self.assertEqual(money_number(6000), 60)
        self.assertIsInstance(money_number(6000), int)
        self.assertEqual(money_number(72480), 724.8)
        self.assertEqual(money_number(5), 0.05)

    def test_settings_from_config(self) -> None:
        settings = BillingSettings.from_config(
            {"currency": "chf", "timezone": "Europe/Paris", "first_invoice_ref": 26589,
             "seller_address": "1 rue de la Paix"}
        )
        self.assertEqual((settings.currency, settings.first_invoice_ref), ("CHF", 26589))
        self.assertEqual(settings.seller_address, ("1 rue de la Paix",))
        winter = datetime.datetime(2018, 1, 1, tzinfo=datetime.UTC).astimezone(settings.tz)
        self.assertEqual(winter.utcoffset(), datetime.timedelta(hours=1))
        for section in ({"currency": "EURO"}, {"timezone": "Mars/Olympus"},
                        {"first_invoice_ref": 0}, {"seller_vat": 5}, {"colour": "red"}):
            with self.assertRaises(ConfigError, msg=section):
                BillingSettings.from_config(section)


class InvoiceTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = synchronous_database()
        self.clock = clock_at("2018-10-16T15:04:41")
        self.cpu = CpuPool.for_tests()
        self.identity = Identity(self.db, self.clock, self.cpu)
        self.tokens = TokenService(self.db, self.clock, Plans({"free": 100}))
        self.settings = BillingSettings(timezone="Europe/Paris")
        self.invoices = InvoiceService(self.db, self.clock, self.cpu, self.tokens, self.settings)
        self.user = await self.user_named("john")

    async def user_named(self, name: str) -> User:
        return await self.identity.create_user(name, f"{name}@doe.com", **PROFILE)

    async def test_buying_credits_perm_and_issues_sequential_invoices(self) -> None:
        first = await self.invoices.buy(self.user.id, 10_000, "60")
        self.clock.advance(3600)
        second = await self.invoices.buy(self.user.id, 120_000, "724.80")
        self.assertEqual((first.ref, second.ref), (1, 2))
        self.assertEqual(await self.tokens.tanks(self.user.id), Tanks(100, 130_000))
        self.assertEqual(second.lines, (InvoiceLine("120000 filtering tokens", 120_000, 72480),))
        self.assertEqual((second.total_cents, second.currency, second.tokens),
                         (72480, "EUR", 120_000))
        self.assertEqual(self.invoices.date_text(first.issued_at), "2018-10-16T17:04:41+02:00")
        listed = await self.invoices.list(self.user.id)
        self.assertEqual([i.ref for i in listed], [2, 1])

    async def test_numbering_starts_at_the_configured_reference(self) -> None:
        invoices = InvoiceService(self.db, self.clock, self.cpu, self.tokens,
                                  BillingSettings(first_invoice_ref=26589))
        self.assertEqual((await invoices.buy(self.user.id, 1, "1")).ref, 26589)
        self.assertEqual((await invoices.buy(self.user.id, 1, "1")).ref, 26590)
        # Lowering the setting later never reuses a number.
        self.assertEqual((await self.invoices.buy(self.user.id, 1, "1")).ref, 26591)

    async def test_a_refused_purchase_changes_nothing(self) -> None:
        for user_id, n, price in ((self.user.id + 50, 5, "1"), (self.user.id, 0, "1"),
                                  (self.user.id, 5, "1.001"), (self.user.id, True, "1")):
            with self.assertRaises(InvoiceError):
                await self.invoices.buy(user_id, n, price)  # type: ignore[arg-type]

        def counter(conn: Connection) -> int:
            return int(conn.execute(select(billing_counters.c.value)).scalar_one())

        self.assertEqual(await self.db.read("t", counter), 0)
        self.assertEqual(await self.invoices.list(self.user.id), [])
        self.assertEqual(await self.tokens.tanks(self.user.id), Tanks(100, 0))

    async def test_an_invoice_keeps_the_account_details_of_its_day(self) -> None:
        invoice = await self.invoices.buy(self.user.id, 5, "1")
        await self.identity.update_profile(self.user.id, {"organisation": "New Name SA"})
        again = await self.invoices.get(invoice.ref)
        assert again is not None
        self.assertEqual(again.account["organisation"], "jd unlimited")
        self.assertEqual(again.account["tva_intra"], "FR454545")
        self.assertEqual(again, invoice)

    async def test_an_invoice_is_only_its_owners(self) -> None:
        invoice = await self.invoices.buy(self.user.id, 5, "1")
        other = await self.user_named("jane")
        self.assertIsNone(await self.invoices.get(invoice.ref, user_id=other.id))
        self.assertIsNone(await self.invoices.pdf(invoice.ref, user_id=other.id))
        self.assertIsNone(await self.invoices.pdf(invoice.ref + 1, user_id=self.user.id))
        self.assertEqual(await self.invoices.list(other.id), [])

    def hold_renders(self) -> list[defer.Deferred[bytes]]:
        """Each render asked of the CPU pool waits for the test to fire its Deferred."""
        renders: list[defer.Deferred[bytes]] = []

        def run(fn: Any, *args: Any) -> defer.Deferred[bytes]:
            renders.append(defer.Deferred())
            return renders[-1]

        self.cpu.run = run  # type: ignore[method-assign, assignment]
        return renders

    async def test_an_invoice_is_rendered_once_however_often_it_is_downloaded(self) -> None:
        # Every download rendered it again (~0.13 s of CPU holding Python's lock with the
        # embedded font): 20 requests a second of one user kept the CPU pool busy for good.
        invoice = await self.invoices.buy(self.user.id, 5, "1")
        renders = self.hold_renders()
        first = [defer.Deferred.fromCoroutine(self.invoices.pdf(invoice.ref,
                                                                user_id=self.user.id))
                 for _ in range(3)]
        self.assertEqual(len(renders), 1)
        renders[0].callback(b"%PDF-1")
        self.assertEqual([self.successResultOf(d) for d in first], [b"%PDF-1"] * 3)
        self.assertEqual(await self.invoices.pdf(invoice.ref, user_id=self.user.id), b"%PDF-1")
        other = await self.user_named("jane")
        self.assertIsNone(await self.invoices.pdf(invoice.ref, user_id=other.id))
        self.assertEqual(len(renders), 1)

    async def test_a_failed_render_fails_its_waiters_and_is_tried_again(self) -> None:
        invoice = await self.invoices.buy(self.user.id, 5, "1")
        renders = self.hold_renders()
        waiting = [defer.Deferred.fromCoroutine(self.invoices.pdf(invoice.ref)) for _ in range(2)]
        renders[0].errback(RuntimeError("font unreadable"))
        for d in waiting:
            self.failureResultOf(d, RuntimeError)
        again = defer.Deferred.fromCoroutine(self.invoices.pdf(invoice.ref))
        self.assertEqual(len(renders), 2)
        renders[1].callback(b"%PDF-2")
        self.assertEqual(self.successResultOf(again), b"%PDF-2")

    async def test_the_pdf_shows_account_lines_ref_date_and_total(self) -> None:
        invoice = await self.invoices.buy(self.user.id, 120_000, "724.80")
        data = await self.invoices.pdf(invoice.ref, user_id=self.user.id)
        assert data is not None
        self.assertTrue(data.startswith(b"%PDF-"))
        self.assertIn(b"%%EOF", data[-32:])
        text = await pdf_text(self, data)
        for expected in ("Invoice 1", "2018-10-16", "724.80 EUR", "120000 filtering tokens",
                         "John Doe", "jd unlimited", "69 avenue de le pie", "75010 Paris",
                         "FR454545", "john@doe.com"):
            self.assertIn(expected, text)

    async def test_any_name_prints_with_or_without_an_embedded_font(self) -> None:
        invoice = Invoice(
            ref=7, user_id=1, issued_at=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
            currency="EUR", total_cents=100, tokens=1,
            account={**{k: "" for k in ("nic", "email", "address", "zip", "city", "country",
                                         "tva_intra")},
                     "first_name": "Zoë", "last_name": "Ōkubo", "organisation": "Ünï"},
            lines=(InvoiceLine("1 filtering token", 1, 100),),
        )
        font = self.settings.font_path()
        fallback = await pdf_text(self, render_invoice_pdf(invoice, self.settings, None))
        self.assertIn("Zoë ?kubo", fallback)
        if font is None:
            raise self.skipTest("DejaVu Sans not installed (apt-get install fonts-dejavu-core)")
        embedded = await pdf_text(self, render_invoice_pdf(invoice, self.settings, font))
        self.assertIn("Zoë Ōkubo", embedded)
        self.assertIn("1.00 EUR", embedded)


class ConcurrentPurchaseMixin(DatabaseMixin):
    timeout = 60

    async def test_two_nodes_buying_at_once_get_distinct_sequential_refs(self) -> None:
        first = await self.open_database()
        second = await self.open_database_at(first.url)
        clock = clock_at("2024-11-14T10:00:00")
        cpu = CpuPool.for_tests()
        user = await Identity(first, clock, cpu).create_user("john", "john@doe.com")
        plans = Plans({"free": 0})
        nodes = [
            InvoiceService(db, clock, cpu, TokenService(db, clock, plans))
            for db in (first, second)
        ]
        purchases = [
            defer.Deferred.fromCoroutine(nodes[i % 2].buy(user.id, i + 1, str(i)))
            for i in range(20)
        ]
        bought = await defer.gatherResults(purchases)
        self.assertEqual(sorted(i.ref for i in bought), list(range(1, 21)))
        tanks = await nodes[0].tokens.tanks(user.id)
        self.assertEqual(tanks, Tanks(0, sum(range(1, 21))))


class SQLiteConcurrentPurchaseTests(ConcurrentPurchaseMixin, TestCase):
    backend = "sqlite"


class PostgresConcurrentPurchaseTests(ConcurrentPurchaseMixin, TestCase):
    backend = "postgresql"


class TokensCliTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.base = tempdir_for(self, "mailcore-cli-tokens-")

    async def mc(self, *args: str) -> CommandResult:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("MAILCORE_DEBUG", None)
        config = self.base / "mailcore.toml"
        config.write_text('[plans.standard]\nmonthly_tokens = 500\n'
                          '[billing]\nfirst_invoice_ref = 41\n')
        return await cli_command("--data-dir", str(self.base / "var"), "--config",
                                 str(config), *args, env=env, cwd=self.base)

    async def test_buy_prints_the_ref_and_show_prints_the_tanks(self) -> None:
        result = await self.mc("user", "add", "john", "--email", "john@doe.com",
                               "--password", "x", "--plan", "standard")
        self.assertEqual(result.status, 0, result.err)
        bought = await self.mc("tokens", "buy", "john", "10000", "--price", "60")
        self.assertEqual((bought.status, bought.out, bought.err), (0, "41\n", ""))
        bought = await self.mc("tokens", "buy", "john@doe.com", "5", "--price", "0.50")
        self.assertEqual(bought.out, "42\n")
        shown = await self.mc("tokens", "show", "john")
        self.assertEqual(shown.status, 0, shown.err)
        self.assertEqual(shown.out.splitlines()[1].split(),
                         ["john", "standard", "500", "10005", "10505", "0"])
        for args, fragment in [
            (("tokens", "buy", "john", "5", "--price", "0.001"), "more than two decimals"),
            (("tokens", "buy", "nobody", "5", "--price", "1"), "no such user: nobody"),
            (("tokens", "buy", "john", "0", "--price", "1"), "must be at least 1"),
            (("tokens", "buy", "john", "5"), "--price"),
        ]:
            refused = await self.mc(*args)
            self.assertEqual((refused.status, refused.out), (1, ""), args)
            [line] = refused.err.splitlines()
            self.assertIn(fragment, line)

"""Protecmail token tanks, daily average and invoices over HTTP: the seed's shapes, exact
numbers across a month rollover, the PDF download, and other users' invoices as 404."""

from __future__ import annotations

import datetime
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.config import Config
from tests.support.web import header
from tests.test_invoices import PROFILE, pdf_text
from tests.test_tokens import move
from tests.test_web_protecmail_domains import Client, build_web

CONFIG = Config(sections={
    "plans": {"standard": {"monthly_tokens": 1000}},
    "billing": {"timezone": "Europe/Paris", "seller_name": "Gateway SAS",
                "seller_vat": "FR000111"},
})
RFC3339 = "%Y-%m-%dT%H:%M:%S%z"


class BillingTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = build_web(CONFIG)
        move(self.web.clock, "2024-10-16T15:04:41+00:00")
        identity = self.web.core.identity
        user = await identity.create_user("john", "john@doe.com", plan="standard", **PROFILE)
        self.john = Client(self, self.web, user, await self.web.credential(user))
        other = await identity.create_user("jane", "jane@doe.com", plan="standard")
        self.jane = Client(self, self.web, other, await self.web.credential(other))

    async def tanks(self, client: Client, path: str = "/api/v1/tanks") -> dict[str, Any]:
        reply = await client.call("GET", path)
        self.assertEqual(set(reply), {"request_id", "success", "data"})
        data: dict[str, Any] = reply["data"]
        self.assertEqual(list(data), ["monthly", "perm", "total"])
        return data

    async def test_tanks_and_tolens_are_the_same_and_exact_across_a_rollover(self) -> None:
        tokens = self.web.core.tokens
        self.assertEqual(await self.tanks(self.john), {"monthly": 1000, "perm": 0, "total": 1000})
        await self.web.core.invoices.buy(self.john.user.id, 10_000, "60")
        self.assertEqual(await tokens.consume(self.john.user.id, 250), "ok")
        expected = {"monthly": 750, "perm": 10_000, "total": 10_750}
        self.assertEqual(await self.tanks(self.john), expected)
        self.assertEqual(await self.tanks(self.john, "/api/v1/tolens"), expected)
        move(self.web.clock, "2024-11-01T00:00:00+00:00")
        self.assertEqual(await self.tanks(self.john),
                         {"monthly": 1000, "perm": 10_750, "total": 11_750})
        self.assertEqual(await tokens.consume(self.john.user.id, 1200), "ok")
        self.assertEqual(await self.tanks(self.john),
                         {"monthly": 0, "perm": 10_550, "total": 10_550})
        self.assertEqual(await self.tanks(self.jane),
                         {"monthly": 1000, "perm": 0, "total": 1000})

    async def test_daily_average_is_an_integer(self) -> None:
        reply = await self.john.call("GET", "/api/v1/token/daily-average")
        self.assertEqual(reply["data"], 0)
        await self.web.core.tokens.consume(self.john.user.id, 700)
        self.web.clock.advance(86400)
        await self.web.core.tokens.consume(self.john.user.id, 200)
        reply = await self.john.call("GET", "/api/v1/token/daily-average")
        self.assertEqual(reply["data"], 30)  # 900 // 30
        self.assertEqual((await self.jane.call("GET", "/api/v1/token/daily-average"))["data"], 0)

    async def test_invoices_list_as_the_seed_shows_newest_first(self) -> None:
        invoices = self.web.core.invoices
        await invoices.buy(self.john.user.id, 10_000, "60")
        move(self.web.clock, "2024-10-30T13:36:52+00:00")
        await invoices.buy(self.jane.user.id, 1, "1")
        await invoices.buy(self.john.user.id, 120_000, "724.8")
        reply = await self.john.call("GET", "/api/v1/invoices")
        self.assertEqual(reply["data"], [
            {"ref": 3, "date": "2024-10-30T14:36:52+01:00", "total": 724.8},
            {"ref": 1, "date": "2024-10-16T17:04:41+02:00", "total": 60},
        ])
        for item in reply["data"]:
            parsed = datetime.datetime.strptime(item["date"], RFC3339)
            self.assertIsNotNone(parsed.utcoffset())
        self.assertEqual((await self.jane.call("GET", "/api/v1/invoices"))["data"],
                         [{"ref": 2, "date": "2024-10-30T14:36:52+01:00", "total": 1}])

    async def test_an_invoice_downloads_as_a_pdf_with_ref_date_total_and_account(self) -> None:
        invoice = await self.web.core.invoices.buy(self.john.user.id, 120_000, "724.8")
        status, headers, body = await self.web.call(
            "GET", f"/api/v1/invoices/{invoice.ref}", headers={"Api-Key": self.john.key}
        )
        self.assertEqual(status, 200)
        self.assertEqual(header(headers, "Content-Type"), "application/pdf")
        self.assertIn(f'filename="invoice-{invoice.ref}.pdf"',
                      header(headers, "Content-Disposition") or "")
        self.assertTrue(body.startswith(b"%PDF-"))
        text = await pdf_text(self, body)
        for expected in (f"Invoice {invoice.ref}", "2024-10-16", "724.80 EUR", "John Doe",
                         "jd unlimited", "69 avenue de le pie", "75010 Paris", "FR454545",
                         "Gateway SAS", "FR000111", "120000 filtering tokens"):
            self.assertIn(expected, text)

    async def test_another_users_or_an_unknown_invoice_is_a_404_envelope(self) -> None:
        invoice = await self.web.core.invoices.buy(self.john.user.id, 5, "1")
        for ref in (str(invoice.ref), "999", "abc", "1.0", "-1", "9" * 40):
            reply = await self.jane.call("GET", f"/api/v1/invoices/{ref}", status=404)
            self.assertEqual(set(reply), {"request_id", "success", "msg"})
            self.assertEqual(reply["msg"], f"No such invoice: {ref}.")

"""Buying filtering tokens, and the invoices that record the purchases.

`InvoiceService.buy(user_id, n, price)` credits `n` tokens to the user's permanent tank and
issues an invoice in the same transaction: both happen or neither. An invoice has a
sequential integer reference (never reused, shared by all accounts, starting at
`[billing] first_invoice_ref`), its date, its lines and its total, and a copy of the account's
details (name, organisation, address, VAT number) as they were when it was issued.

`price` is what the customer pays for the purchase, in `[billing] currency` (default EUR),
with at most two decimals; it is the invoice's one line and its total. Dates are shown in
`[billing] timezone` (default UTC) as RFC 3339 with an offset.

The PDF is rendered with fpdf2 on the CPU pool, never on the reactor, once per invoice: an
invoice never changes, so the last `PDF_CACHE` rendered are kept, and requests for one being
rendered wait for it. (A render with the embedded font costs ~0.13 s of CPU and holds
Python's lock; at the API's 20 requests a second one user downloading one invoice again and
again kept the CPU pool, which also hashes passwords, busy for good.) It uses DejaVu Sans
when it is installed (Debian: fonts-dejavu-core; `[billing] font` names another TrueType
file), so that any name prints; without it, the PDF core font Helvetica with the characters
outside Latin-1 replaced by "?".

```toml
[billing]
currency = "EUR"             # ISO 4217 code of every price and invoice
timezone = "UTC"             # IANA zone invoice dates are shown in
first_invoice_ref = 1        # the reference of the first invoice issued
seller_name = "Mailcore"     # the seller, at the head of every invoice ...
seller_address = []          # ... its address, one string a line ...
seller_vat = ""              # ... and VAT number (none: not printed)
# font = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # a TrueType file for the PDF
                             # [default: DejaVu Sans when installed, else Helvetica]
```
"""

from __future__ import annotations

import datetime
import zoneinfo
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailcore.billing.tokens import TokenError, TokenService
from mailcore.config import ConfigError, unknown_key
from mailcore.store import Database
from mailcore.store.schema import billing_counters, invoice_lines, invoices, users
from mailcore.workers import CpuPool

INVOICE_COUNTER = "invoice_ref"
DEFAULT_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)
MAX_TOKENS = 10**12
MAX_CENTS = 10**13
PDF_CACHE = 64  # rendered invoices kept in memory (a few tens of KB each)
ACCOUNT_FIELDS = (
    "nic", "first_name", "last_name", "email", "organisation", "tva_intra", "address",
    "zip", "city", "country",
)


class InvoiceError(Exception):
    """A purchase was refused (bad count or price, unknown user)."""


@dataclass(frozen=True)
class BillingSettings:
    """The TOML table `[billing]`: currency, shown time zone, seller, numbering, font."""

    currency: str = "EUR"
    timezone: str = "UTC"
    first_invoice_ref: int = 1
    seller_name: str = "Mailcore"
    seller_address: tuple[str, ...] = ()
    seller_vat: str = ""
    font: str | None = None

    @property
    def tz(self) -> datetime.tzinfo:
        """The zone invoice dates are shown in."""
        return datetime.UTC if self.timezone == "UTC" else zoneinfo.ZoneInfo(self.timezone)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> BillingSettings:
        known = {"currency", "timezone", "first_invoice_ref", "seller_name", "seller_address",
                 "seller_vat", "font"}
        unknown = set(section) - known
        if unknown:
            raise unknown_key("billing", sorted(unknown)[0])
        currency = section.get("currency", cls.currency)
        if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
            raise ConfigError("[billing] currency must be a 3-letter code such as EUR")
        tz_name = section.get("timezone", cls.timezone)
        try:
            if tz_name != "UTC":
                zoneinfo.ZoneInfo(str(tz_name))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"[billing] unknown timezone {tz_name!r}") from None
        first = section.get("first_invoice_ref", cls.first_invoice_ref)
        if isinstance(first, bool) or not isinstance(first, int) or first < 1:
            raise ConfigError("[billing] first_invoice_ref must be a positive integer")
        address = section.get("seller_address", [])
        if isinstance(address, str):
            address = [address]
        if not isinstance(address, list) or not all(isinstance(a, str) for a in address):
            raise ConfigError("[billing] seller_address must be a string or a list of strings")
        texts: dict[str, str] = {}
        for key in ("seller_name", "seller_vat"):
            value = section.get(key, getattr(cls, key))
            if not isinstance(value, str):
                raise ConfigError(f"[billing] {key} must be a string")
            texts[key] = value
        font = section.get("font")
        if font is not None and not isinstance(font, str):
            raise ConfigError("[billing] font must be the path of a TrueType file")
        return cls(
            currency=currency.upper(),
            timezone=str(tz_name),
            first_invoice_ref=first,
            seller_address=tuple(address),
            font=font,
            **texts,
        )

    def font_path(self) -> str | None:
        """The TrueType font to embed, or None for the core font."""
        if self.font:
            return self.font
        for candidate in DEFAULT_FONTS:
            if Path(candidate).is_file():
                return candidate
        return None


@dataclass(frozen=True)
class InvoiceLine:
    description: str
    quantity: int
    amount_cents: int


@dataclass(frozen=True)
class Invoice:
    """An issued invoice; `account` holds ACCOUNT_FIELDS as they were at issue time."""

    ref: int
    user_id: int | None
    issued_at: datetime.datetime
    currency: str
    total_cents: int
    tokens: int
    account: Mapping[str, str]
    lines: tuple[InvoiceLine, ...]


def parse_price(price: Decimal | int | str) -> int:
    """A price in currency units (at most two decimals, not negative) as integer cents."""
    if isinstance(price, bool) or isinstance(price, float):
        raise InvoiceError("Give the price as a decimal string or an integer, not a float.")
    try:
        value = Decimal(str(price).strip())
    except InvalidOperation:
        raise InvoiceError(f"Price {price!r} is not a number.") from None
    if not value.is_finite() or value < 0:
        raise InvoiceError(f"Price {price!r} must be a non-negative amount.")
    cents = value * 100
    if cents != cents.to_integral_value():
        raise InvoiceError(f"Price {price!r} has more than two decimals.")
    if cents > MAX_CENTS:
        raise InvoiceError(f"Price {price!r} is too large.")
    return int(cents.to_integral_value(ROUND_HALF_UP))


def money_text(cents: int) -> str:
    """Cents as "1234.50"."""
    return f"{cents // 100}.{cents % 100:02d}"


def money_number(cents: int) -> int | float:
    """Cents as seed 004 writes a total: 60 for whole units, 724.8 otherwise."""
    if cents % 100 == 0:
        return cents // 100
    return float(Decimal(cents) / 100)


# -- blocking store functions ----------------------------------------------------------------


def _next_ref_txn(conn: Connection, first: int) -> int:
    """Blocking: the next invoice reference. The counter row is locked until commit."""
    row = conn.execute(
        select(billing_counters.c.value)
        .where(billing_counters.c.name == INVOICE_COUNTER)
        .with_for_update()
    ).first()
    if row is None:  # the migration makes the row; a database restored without it
        highest = conn.execute(select(invoices.c.ref).order_by(invoices.c.ref.desc())).first()
        ref = max(first, (int(highest[0]) + 1) if highest else 1)
        conn.execute(insert(billing_counters).values(name=INVOICE_COUNTER, value=ref))
        return ref
    ref = max(first, int(row.value) + 1)
    conn.execute(
        update(billing_counters)
        .where(billing_counters.c.name == INVOICE_COUNTER)
        .values(value=ref)
    )
    return ref


def _invoice_txn(conn: Connection, row: Any) -> Invoice:
    m = row._mapping
    lines = conn.execute(
        select(invoice_lines)
        .where(invoice_lines.c.invoice_id == m["id"])
        .order_by(invoice_lines.c.position)
    ).all()
    issued = m["issued_at"]
    if issued.tzinfo is None:
        issued = issued.replace(tzinfo=datetime.UTC)
    return Invoice(
        ref=int(m["ref"]),
        user_id=m["user_id"],
        issued_at=issued,
        currency=m["currency"],
        total_cents=int(m["total_cents"]),
        tokens=int(m["tokens"]),
        account={f: m[f] for f in ACCOUNT_FIELDS},
        lines=tuple(
            InvoiceLine(
                l._mapping["description"], int(l._mapping["quantity"]),
                int(l._mapping["amount_cents"]),
            )
            for l in lines  # noqa: E741
        ),
    )


# -- PDF -------------------------------------------------------------------------------------


def render_invoice_pdf(
    invoice: Invoice, settings: BillingSettings, font_path: str | None = None
) -> bytes:
    """The invoice as a PDF document. CPU work: run it on the CpuPool."""
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    pdf = FPDF(format="A4")
    pdf.set_creation_date(invoice.issued_at)
    pdf.set_title(f"Invoice {invoice.ref}")
    pdf.set_author(settings.seller_name)
    pdf.set_creator("mailcore")
    if font_path is not None:
        pdf.add_font("Body", "", font_path)
        family = "Body"

        def clean(text: str) -> str:
            return text
    else:
        family = "Helvetica"

        def clean(text: str) -> str:
            return text.encode("latin-1", "replace").decode("latin-1")

    pdf.add_page()
    pdf.set_auto_page_break(auto=True, margin=20)

    def line(text: str, size: float = 10, height: float = 5.5) -> None:
        pdf.set_font(family, size=size)
        pdf.cell(0, height, clean(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    line(settings.seller_name, 14, 8)
    for text in settings.seller_address:
        line(text)
    if settings.seller_vat:
        line(f"VAT number: {settings.seller_vat}")
    pdf.ln(6)

    date = invoice.issued_at.astimezone(settings.tz)
    line(f"Invoice {invoice.ref}", 18, 10)
    line(f"Invoice number: {invoice.ref}")
    line(f"Date: {date.strftime('%Y-%m-%d')} ({date.isoformat(timespec='seconds')})")
    pdf.ln(4)

    account = invoice.account
    line("Bill to", 12, 7)
    name = " ".join(p for p in (account["first_name"], account["last_name"]) if p)
    for text in (
        name,
        account["organisation"],
        account["address"],
        " ".join(p for p in (account["zip"], account["city"]) if p),
        account["country"],
    ):
        if text:
            line(text)
    if account["tva_intra"]:
        line(f"VAT number: {account['tva_intra']}")
    line(f"Customer: {account['nic']}  {account['email']}")
    pdf.ln(6)

    widths = (110, 30, 50)
    pdf.set_font(family, size=10)
    for text, width, align in zip(
        ("Description", "Quantity", f"Amount ({invoice.currency})"), widths,
        ("L", "R", "R"), strict=True,
    ):
        pdf.cell(width, 7, text, border="B", align=align)
    pdf.ln(7)
    for item in invoice.lines:
        pdf.cell(widths[0], 7, clean(item.description))
        pdf.cell(widths[1], 7, str(item.quantity), align="R")
        pdf.cell(widths[2], 7, money_text(item.amount_cents), align="R")
        pdf.ln(7)
    pdf.set_font(family, size=12)
    pdf.cell(widths[0] + widths[1], 9, "Total", border="T")
    pdf.cell(
        widths[2], 9, f"{money_text(invoice.total_cents)} {invoice.currency}", border="T",
        align="R",
    )
    pdf.ln(9)
    return bytes(pdf.output())


# -- the service -----------------------------------------------------------------------------


class InvoiceService:
    """Token purchases, invoices, and their PDFs."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        cpu: CpuPool,
        tokens: TokenService,
        settings: BillingSettings | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.cpu = cpu
        self.tokens = tokens
        self.settings = settings or BillingSettings()
        self._pdfs: OrderedDict[int, bytes] = OrderedDict()  # by ref, least recent first
        self._rendering: dict[int, list[defer.Deferred[bytes]]] = {}  # ref: its waiters

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def date_text(self, moment: datetime.datetime) -> str:
        """RFC 3339 with the offset of `[billing] timezone` (seed: 2018-10-16T17:04:41+02:00)."""
        return moment.astimezone(self.settings.tz).isoformat(timespec="seconds")

    async def buy(
        self,
        user_id: int,
        n: int,
        price: Decimal | int | str,
        *,
        description: str | None = None,
    ) -> Invoice:
        """Credit `n` tokens to the permanent tank and issue the invoice, atomically."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOKENS:
            raise InvoiceError(f"The number of tokens must be from 1 to {MAX_TOKENS}.")
        cents = parse_price(price)
        text = description or f"{n} filtering tokens"
        if len(text) > 255:
            raise InvoiceError("The line description is longer than 255 characters.")
        now = self.now()
        settings = self.settings

        def txn(conn: Connection) -> int:
            row = conn.execute(select(users).where(users.c.id == user_id)).first()
            if row is None:
                raise InvoiceError(f"No such user (id {user_id}).")
            try:
                self.tokens.credit_txn(conn, user_id, n, now)
            except TokenError as e:
                raise InvoiceError(str(e)) from None
            ref = _next_ref_txn(conn, settings.first_invoice_ref)
            account = {f: row._mapping[f] or "" for f in ACCOUNT_FIELDS}
            result = conn.execute(
                insert(invoices).values(
                    ref=ref, user_id=user_id, issued_at=now, currency=settings.currency,
                    total_cents=cents, tokens=n, **account,
                )
            )
            invoice_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            conn.execute(
                insert(invoice_lines).values(
                    invoice_id=invoice_id, position=1, description=text, quantity=n,
                    amount_cents=cents,
                )
            )
            return ref

        ref = await self.db.run("buy_tokens", txn)
        invoice = await self.get(ref)
        assert invoice is not None
        return invoice

    async def get(self, ref: int, *, user_id: int | None = None) -> Invoice | None:
        """The invoice `ref`; with `user_id`, only if it is that user's."""

        def txn(conn: Connection) -> Invoice | None:
            query = select(invoices).where(invoices.c.ref == ref)
            if user_id is not None:
                query = query.where(invoices.c.user_id == user_id)
            row = conn.execute(query).first()
            return _invoice_txn(conn, row) if row is not None else None

        return await self.db.read("get_invoice", txn)

    async def list(self, user_id: int) -> Sequence[Invoice]:
        """The user's invoices, newest (highest ref) first, without their lines."""

        def txn(conn: Connection) -> list[Invoice]:
            rows = conn.execute(
                select(invoices)
                .where(invoices.c.user_id == user_id)
                .order_by(invoices.c.ref.desc())
            ).all()
            return [
                Invoice(
                    ref=int(r.ref), user_id=r.user_id,
                    issued_at=r.issued_at if r.issued_at.tzinfo else r.issued_at.replace(
                        tzinfo=datetime.UTC),
                    currency=r.currency, total_cents=int(r.total_cents), tokens=int(r.tokens),
                    account={f: r._mapping[f] for f in ACCOUNT_FIELDS}, lines=(),
                )
                for r in rows
            ]

        return await self.db.read("list_invoices", txn)

    async def pdf(self, ref: int, *, user_id: int | None = None) -> bytes | None:
        """The invoice as PDF bytes, or None if not found (or not `user_id`'s)."""
        invoice = await self.get(ref, user_id=user_id)
        if invoice is None:
            return None
        return await self.rendered(invoice)

    def kept_size(self, ref: int) -> int | None:
        """The length of the invoice's PDF if it is kept (rendered before); None if not.
        What a HEAD can say of the PDF without rendering it."""
        kept = self._pdfs.get(ref)
        return None if kept is None else len(kept)

    async def rendered(self, invoice: Invoice) -> bytes:
        """The PDF of `invoice`: kept, being rendered (waited for), or rendered now on the
        CPU pool."""
        ref = invoice.ref
        kept = self._pdfs.get(ref)
        if kept is not None:
            self._pdfs.move_to_end(ref)
            return kept
        waiters = self._rendering.get(ref)
        if waiters is not None:
            waiting: defer.Deferred[bytes] = defer.Deferred()
            waiters.append(waiting)
            return await waiting
        waiters = self._rendering[ref] = []
        try:
            data = await self.cpu.run(
                render_invoice_pdf, invoice, self.settings, self.settings.font_path()
            )
        except Exception as e:
            del self._rendering[ref]
            for waiting in waiters:
                waiting.errback(Failure(e))
            raise
        del self._rendering[ref]
        self._pdfs[ref] = data
        while len(self._pdfs) > PDF_CACHE:
            self._pdfs.popitem(last=False)
        for waiting in waiters:
            waiting.callback(data)
        return data

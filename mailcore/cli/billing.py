"""`mailcore tokens …`: buy filtering tokens for a user (issuing an invoice), show the tanks.

`tokens buy USER N --price P` credits N tokens to USER's permanent tank and issues an
invoice of P (in `[billing] currency`) in the same transaction; it prints the invoice
reference alone on stdout, so that scripts can capture it. `tokens show USER` prints the
tanks and the 30-day daily average.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.billing.invoices import Invoice, InvoiceError, InvoiceService
from mailcore.billing.tokens import Tanks, TokenService
from mailcore.cli import CommandError, command_group, in_cli_words, print_table
from mailcore.cli.users import require_user


def register(subparsers: Any) -> None:
    """Add `tokens` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "tokens", help="buy filtering tokens and show token tanks",
        description="Filtering tokens: one is used per recipient of each filtered message, "
        "from the monthly tank first, then the permanent one.",
    )
    buy = actions.add_parser(
        "buy", help="credit tokens to a user's permanent tank and issue the invoice",
        description="Credit N tokens to USER's permanent tank and issue an invoice for "
        "PRICE (what the customer pays, at most two decimals). Prints the invoice reference.",
    )
    buy.add_argument("user", metavar="USER", help="user name or email")
    buy.add_argument("count", metavar="N", type=_positive_int, help="number of tokens")
    buy.add_argument("--price", required=True, metavar="P", help="the invoice total, e.g. 60")
    buy.add_argument("--description", help='the invoice line [default: "N filtering tokens"]')
    buy.set_defaults(handler=tokens_buy)

    show = actions.add_parser("show", help="show a user's token tanks and daily average")
    show.add_argument("user", metavar="USER", help="user name or email")
    show.set_defaults(handler=tokens_show)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def tokens_buy(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.user)
    service: InvoiceService = core.invoices
    try:
        invoice: Invoice = await service.buy(
            user.id, args.count, args.price, description=args.description
        )
    except InvoiceError as e:
        raise CommandError(in_cli_words(str(e), options={"Price": "--price"})) from None
    print(invoice.ref)
    return 0


async def tokens_show(args: argparse.Namespace, core: Any) -> int:
    user = await require_user(core, args.user)
    service: TokenService = core.tokens
    tanks: Tanks = await service.tanks(user.id)
    average = await service.daily_average(user.id)
    print_table(
        ("USER", "PLAN", "MONTHLY", "PERM", "TOTAL", "DAILY AVERAGE"),
        [(user.username, user.plan, str(tanks.monthly), str(tanks.perm), str(tanks.total),
          str(average))],
    )
    return 0

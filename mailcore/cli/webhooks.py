"""`mailcore webhook …`: a user's webhooks and their delivery log, from a shell.

The same service the IMAP2API's `/api/webhooks/` uses: the URL is checked against the
operator's `[webhooks]` address rules, and the signing secret is printed once, at `add`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import (
    command_group,
    in_cli_words,
    limit,
    print_table,
    refusals,
    utc_seconds,
)
from mailcore.cli.users import require_user
from mailcore.webhooks import EVENTS, Webhook, WebhookError


def register(subparsers: Any) -> None:
    """Add `webhook` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "webhook", help="add, list and remove a user's webhooks",
        description="Webhooks receive signed JSON POSTs on " + ", ".join(EVENTS) + ".",
    )
    add = actions.add_parser(
        "add", help="register a webhook (prints its signing secret, once)",
        description="Register URL for USER. Deliveries carry X-Mailcore-Signature: "
        "sha256=HMAC-SHA256(secret, '<X-Mailcore-Timestamp>.<body>').",
    )
    add.add_argument("user", help="the owning user (name or email)")
    add.add_argument("url", help="http:// or https:// URL")
    add.add_argument(
        "--events", default=",".join(EVENTS),
        help=f"comma-separated events [default: all: {', '.join(EVENTS)}]",
    )
    add.add_argument("--description", default="", help="a note shown in listings")
    add.add_argument("--secret", help="the signing secret (16+ characters) [default: made]")
    add.set_defaults(handler=webhook_add)

    listing = actions.add_parser("list", help="list a user's webhooks")
    listing.add_argument("user", help="the user (name or email)")
    listing.set_defaults(handler=webhook_list)

    remove = actions.add_parser("remove", help="delete a webhook and its delivery log")
    remove.add_argument("user", help="the owning user (name or email)")
    remove.add_argument("id", type=int, help="the webhook id")
    remove.set_defaults(handler=webhook_remove)

    log = actions.add_parser("deliveries", help="show a webhook's latest deliveries")
    log.add_argument("user", help="the owning user (name or email)")
    log.add_argument("id", type=int, help="the webhook id")
    log.add_argument("--limit", type=limit, default=20, help="how many [default: 20]")
    log.set_defaults(handler=webhook_deliveries)


# The arguments and options that set the fields a WebhookError may name.
WEBHOOK_OPTIONS = {
    "url": "URL", "events": "--events", "description": "--description", "secret": "--secret",
}


def _refusal(e: WebhookError) -> str:
    """The argument at fault, then what is wrong with it; an unknown id is "no such
    webhook"."""
    if e.field == "id":
        return "no such webhook"
    return in_cli_words(e.message, e.field, WEBHOOK_OPTIONS)


_webhook_errors = refusals(WebhookError, _refusal)


@_webhook_errors
async def webhook_add(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.user)
    hook, secret = await core.webhooks.create(
        owner.id, url=args.url, events=args.events, description=args.description,
        secret=args.secret,
    )
    print(f"webhook {hook.id} for {owner.username}: {hook.url} ({','.join(hook.events)})")
    print(f"secret: {secret}")
    return 0


@_webhook_errors
async def webhook_list(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.user)
    page = await core.webhooks.list_webhooks(owner.id, offset=0, limit=1000)
    hooks: list[Webhook] = page.items
    print_table(
        ("ID", "URL", "EVENTS", "ACTIVE", "DESCRIPTION"),
        [(str(h.id), h.url, ",".join(h.events), "yes" if h.active else "no", h.description)
         for h in hooks],
    )
    return 0


@_webhook_errors
async def webhook_remove(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.user)
    hook = await core.webhooks.delete(owner.id, args.id)
    print(f"removed webhook {hook.id} ({hook.url})")
    return 0


@_webhook_errors
async def webhook_deliveries(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.user)
    page = await core.webhooks.deliveries(owner.id, args.id, offset=0, limit=args.limit)
    print_table(
        ("ID", "EVENT", "STATUS", "ATTEMPTS", "CODE", "CREATED", "LAST ERROR"),
        [(str(d.id), d.event, d.status, str(d.attempts),
          str(d.last_status_code) if d.last_status_code is not None else "-",
          utc_seconds(d.created_at), (d.last_error or "")[:80])
         for d in page.items],
    )
    return 0

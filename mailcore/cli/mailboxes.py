"""`mailcore mailbox …`: hosted mailboxes (the Mail API's, seed 002), from a shell.

A mailbox is an address of a served domain whose mail is kept here instead of being relayed
to the domain's next hop. Its owner holds every right on it through the Mail API.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import command_group, print_table, refusals, utc_seconds
from mailcore.cli.users import require_user
from mailcore.mailapi import MailApiError, Mailbox
from mailcore.mailapi.counts import effective_quota
from mailcore.mailapi.mailboxes import OutboxNotEmpty


def register(subparsers: Any) -> None:
    """Add `mailbox` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "mailbox", help="add, list and remove hosted mailboxes, set their quota",
        description="A hosted mailbox keeps the mail of its address here (Mail API, "
        "/api/v1/mail/); its domain must be served (`mailcore domain add`).",
    )
    add = actions.add_parser("add", help="host an address's mail here")
    add.add_argument("address", help="the address, local@domain of a served domain")
    add.add_argument("--owner", required=True, help="the owning user (name or email)")
    add.set_defaults(handler=mailbox_add)

    listing = actions.add_parser("list", help="list hosted mailboxes")
    listing.add_argument("--owner", help="only this user's (name or email)")
    listing.set_defaults(handler=mailbox_list)

    quota = actions.add_parser(
        "quota", help="set one mailbox's quota",
        description="Set the bytes one mailbox's mail may take (text fields, attachments, "
        "messages as sent or received), in place of [mailapi] mailbox_quota_bytes: 0 is no "
        "limit, 'default' follows mailbox_quota_bytes again. Nothing is removed: a mailbox "
        "over its new quota takes no new mail (drafts and uploads refused 507, mail for it "
        "refused at RCPT 552 5.2.2) until mail is deleted.",
    )
    quota.add_argument("address", help="the mailbox's address")
    quota.add_argument("bytes", type=_quota,
                       help="its quota in bytes (0: no limit; 'default': the configured one)")
    quota.set_defaults(handler=mailbox_quota)

    remove = actions.add_parser(
        "remove", help="delete a mailbox with its mail and grants",
        description="Delete a mailbox with its mail and grants. A mailbox whose outbox holds "
        "mail (answered 202 'enqueued to be sent', not yet handed to the queue) is kept, "
        "and the refusal says how many mails wait; remove it once they are sent, or give "
        "--force.",
    )
    remove.add_argument("address", help="the mailbox's address")
    remove.add_argument("--force", action="store_true",
                        help="remove it even with mail in its outbox, which is then never sent")
    remove.set_defaults(handler=mailbox_remove)


def _quota(text: str) -> int | None:
    """A quota argument: bytes (0: no limit), or 'default' (None)."""
    if text == "default":
        return None
    if not text.isdigit() or len(text) > 18:
        raise argparse.ArgumentTypeError(f"not a number of bytes nor 'default': {text!r}")
    return int(text)


def _quota_text(box: Mailbox, configured: int | None) -> str:
    """A mailbox's quota as `list` and `quota` show it."""
    quota = effective_quota(box.quota_bytes, configured)
    shown = "no limit" if quota is None else str(quota)
    return shown if box.quota_bytes is None else f"{shown} (own)"


def _refusal(e: MailApiError) -> str:
    if isinstance(e, OutboxNotEmpty):
        return (f"{e.message}; remove it once they are sent, or with --force (they are "
                "then never sent)")
    return e.message


_mailbox_errors = refusals(MailApiError, _refusal)


@_mailbox_errors
async def mailbox_add(args: argparse.Namespace, core: Any) -> int:
    owner = await require_user(core, args.owner)
    box = await core.mailboxes.add(args.address, owner.id)
    print(f"mailbox {box.address} for {owner.username}")
    return 0


@_mailbox_errors
async def mailbox_list(args: argparse.Namespace, core: Any) -> int:
    owner_id = None
    if args.owner:
        owner_id = (await require_user(core, args.owner)).id
    found = await core.mailboxes.list_all(owner_id)
    configured = core.mailapi_settings.mailbox_quota_bytes
    print_table(("ADDRESS", "OWNER", "CREATED", "USED", "QUOTA"),
                [(b.address if b.active else f"{b.address} (domain removed)", b.owner,
                  utc_seconds(b.created_at), str(b.used_bytes), _quota_text(b, configured))
                 for b in found])
    return 0


@_mailbox_errors
async def mailbox_quota(args: argparse.Namespace, core: Any) -> int:
    box = await core.mailboxes.set_quota(args.address, args.bytes)
    print(f"mailbox {box.address}: {box.used_bytes} bytes used, quota "
          f"{_quota_text(box, core.mailapi_settings.mailbox_quota_bytes)}")
    return 0


@_mailbox_errors
async def mailbox_remove(args: argparse.Namespace, core: Any) -> int:
    box = await core.mailboxes.find(args.address)
    if box is None:
        raise MailApiError("not_found", f"no such mailbox: {args.address}")
    unsent = await core.mailboxes.remove(box.address, force=args.force)
    if unsent:
        print(f"removed mailbox {box.address} and {unsent} "
              f"{'mail' if unsent == 1 else 'mails'} of its outbox, unsent")
    else:
        print(f"removed mailbox {box.address}")
    return 0

"""`mailcore mailbox …`: hosted mailboxes (the Mail API's, seed 002), from a shell.

A mailbox is an address of a served domain whose mail is kept here instead of being relayed
to the domain's next hop. Its owner holds every right on it through the Mail API.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import command_group, print_table, refusals, utc_seconds
from mailcore.cli.users import require_user
from mailcore.mailapi import MailApiError
from mailcore.mailapi.mailboxes import OutboxNotEmpty


def register(subparsers: Any) -> None:
    """Add `mailbox` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "mailbox", help="add, list and remove hosted mailboxes",
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
    print_table(("ADDRESS", "OWNER", "CREATED"),
                [(b.address if b.active else f"{b.address} (domain removed)", b.owner,
                  utc_seconds(b.created_at)) for b in found])
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

"""`mailcore queue …`: look at the mail queue and act on it.

`list` shows messages still waiting (queued or deferred recipients), `show ID` one message
with every recipient's state, last reply and next attempt, `flush` makes every deferred
recipient due now, and `delete ID` drops a message without delivering or bouncing it.
These work on the store directly; a running daemon notices flushed work on its next sweep,
and then tries the next hops it had marked unusable again rather than waiting out the mark.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailcore.cli import CommandError, command_group, limit, print_table, utc_seconds
from mailcore.queue.model import (
    ACTIVE,
    MessageView,
    thd_counts,
    thd_delete,
    thd_flush,
    thd_list_active,
    thd_show,
)


def register(subparsers: Any) -> None:
    """Add `queue` to the `mailcore` command line."""
    actions = command_group(
        subparsers, "queue", help="list, show, flush and delete queued messages",
        description="The mail queue: messages accepted and not yet delivered to every "
        "recipient's next hop.",
    )
    listing = actions.add_parser("list", help="messages with recipients still waiting")
    listing.add_argument("--limit", type=limit, default=100,
                         help="show at most this many messages, oldest first [100]")
    listing.set_defaults(handler=queue_list)
    show = actions.add_parser("show", help="one message and every recipient's state")
    show.add_argument("id", help="the queue id (from the 250 reply or `queue list`)")
    show.set_defaults(handler=queue_show)
    flush = actions.add_parser("flush", help="make every deferred recipient due now")
    flush.set_defaults(handler=queue_flush)
    delete = actions.add_parser("delete", help="drop a message without delivering it")
    delete.add_argument("id", help="the queue id")
    delete.set_defaults(handler=queue_delete)


def _sender(mail_from: str) -> str:
    return mail_from or "<>"


async def queue_list(args: argparse.Namespace, core: Any) -> int:
    views: list[MessageView] = await core.db.read("queue_list", thd_list_active, args.limit)
    counts: dict[str, int] = await core.db.read("queue_counts", thd_counts)
    rows = []
    for v in views:
        waiting = [r for r in v.recipients if r.state in ACTIVE]
        next_at = min((r.next_attempt_at for r in waiting), default=None)
        last = next((r.last_error for r in waiting if r.last_error), "") or ""
        rows.append([
            v.id, utc_seconds(v.created_at), str(v.size), _sender(v.mail_from),
            f"{len(waiting)}/{len(v.recipients)}", utc_seconds(next_at), last,
        ])
    if rows:
        print_table(["ID", "ARRIVED (UTC)", "SIZE", "FROM", "WAITING", "NEXT TRY", "LAST ERROR"],
                    rows)
    active = sum(counts.get(s, 0) for s in ACTIVE)
    print(f"{len(views)} message(s) shown; {active} recipient(s) waiting "
          f"({counts.get('queued', 0)} queued, {counts.get('deferred', 0)} deferred)")
    return 0


async def queue_show(args: argparse.Namespace, core: Any) -> int:
    view: MessageView | None = await core.db.read("queue_show", thd_show, args.id)
    if view is None:
        raise CommandError(f"no message {args.id} in the queue")
    print(f"ID:        {view.id}")
    print(f"Kind:      {view.kind}")
    print(f"From:      {_sender(view.mail_from)}")
    print(f"Client:    {view.client_ip or '-'}")
    print(f"Size:      {view.size}")
    print(f"Arrived:   {utc_seconds(view.created_at)} UTC")
    print(f"Finished:  {utc_seconds(view.done_at)}{' UTC' if view.done_at else ''}")
    rows = [
        [r.address, r.state, str(r.attempts),
         utc_seconds(r.next_attempt_at) if r.state in ACTIVE else "-",
         r.next_hop or "-", r.lease_owner or "-", r.last_error or ""]
        for r in view.recipients
    ]
    print_table(["RECIPIENT", "STATE", "TRIES", "NEXT TRY", "HOP", "LEASED BY", "LAST REPLY"],
                rows)
    return 0


async def queue_flush(args: argparse.Namespace, core: Any) -> int:
    now = core.clock.seconds()
    n = await core.db.run("queue_flush", thd_flush, now)
    interval = core.queue.settings.poll_interval
    print(f"{n} deferred recipient(s) are due now; a running daemon picks them up on its next "
          f"sweep (every {interval:g} s) and tries next hops it had marked unusable again.")
    return 0


async def queue_delete(args: argparse.Namespace, core: Any) -> int:
    if not await core.db.run("queue_delete", thd_delete, args.id):
        raise CommandError(f"no message {args.id} in the queue")
    print(f"deleted {args.id}")
    return 0

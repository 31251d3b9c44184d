"""Local delivery: queued mail for a hosted mailbox is stored in it as inbox mail.

The queue routes a hosted address to its LOCAL hop (`HostedAddresses` tells it which they
are) and, after filtering, calls `thd_store_local` inside the transaction that also records
the recipient's result (mailcore.queue.runner.thd_deliver_local). A recipient is stored at
most once: `mailapi_mail.queue_rcpt_id` is unique, and a replay finds its row.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from sqlalchemy import Connection, insert, select
from twisted.internet.interfaces import IReactorTime

from mailcore.mailapi.mime import parse_message
from mailcore.store import Database
from mailcore.store.schema import mailapi_attachments, mailapi_mail, mailboxes

# How long the set of hosted addresses is trusted before it is read again (changes made
# through this process's MailboxService are seen at once).
HOSTED_TTL = 10.0

_mail = mailapi_mail.c


def stored_form(address: str) -> str:
    """The form a mailbox address is stored in (lower case), for a recipient as given."""
    return address.strip().lower()


def thd_new_public_id(conn: Connection) -> str:
    """A short opaque id no mail has yet (7 hex digits, as the seed's examples)."""
    for length in (7, 7, 7, 10, 16):
        candidate = secrets.token_hex(8)[:length]
        if conn.execute(select(_mail.id).where(_mail.public_id == candidate)).first() is None:
            return candidate
    raise RuntimeError("no free mail id")  # pragma: no cover - 2**64 ids


def thd_hosted(conn: Connection) -> frozenset[str]:
    return frozenset(row[0] for row in conn.execute(select(mailboxes.c.address)))


class HostedAddresses:
    """Which recipient addresses are hosted mailboxes (a cached set of all of them)."""

    def __init__(self, db: Database, clock: IReactorTime, ttl: float = HOSTED_TTL) -> None:
        self.db = db
        self.clock = clock
        self.ttl = ttl
        self._known: frozenset[str] | None = None
        self._until = 0.0

    def invalidate(self) -> None:
        self._known = None

    async def contains(self, address: str) -> bool:
        now = self.clock.seconds()
        if self._known is None or now >= self._until:
            self._known = await self.db.read("mailapi_hosted_addresses", thd_hosted)
            self._until = now + self.ttl
        return stored_form(address) in self._known


def thd_store_local(
    conn: Connection, recipients: Sequence[tuple[int, str]], queue_id: str, body: bytes,
    now: float,
) -> set[int]:
    """Store `body` as unread inbox mail in the mailbox of each recipient; returns the
    recipient ids stored now or before (see the module docstring)."""
    stored: set[int] = set()
    parsed = None
    for rcpt_id, address in recipients:
        if conn.execute(select(_mail.id).where(_mail.queue_rcpt_id == rcpt_id)).first():
            stored.add(rcpt_id)
            continue
        box = conn.execute(
            select(mailboxes.c.id).where(mailboxes.c.address == stored_form(address))
        ).first()
        if box is None:
            continue
        if parsed is None:
            parsed = parse_message(body)
        key = conn.execute(insert(mailapi_mail).values(
            public_id=thd_new_public_id(conn), mailbox_id=box.id, status="inbox", read=False,
            mail_from=parsed.mail_from, to_addrs=parsed.to, cc_addrs=parsed.cc,
            reply_to=parsed.reply_to, subject=parsed.subject, body=parsed.body, raw=body,
            queue_rcpt_id=rcpt_id, created_at=now,
        )).inserted_primary_key
        assert key is not None
        mail_id = key[0]
        for attachment in parsed.attachments:
            conn.execute(insert(mailapi_attachments).values(
                mail_id=mail_id, name=attachment.name, content_type=attachment.content_type,
                size=len(attachment.data), data=attachment.data,
            ))
        stored.add(rcpt_id)
    return stored

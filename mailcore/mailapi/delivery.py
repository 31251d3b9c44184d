"""Local delivery: queued mail for a hosted mailbox is stored in it as inbox mail.

The queue routes a hosted address to its LOCAL hop (`HostedAddresses` tells it which they
are) and, after filtering, hands the message to `LocalMailboxes` (mailcore.queue.runner's
LocalStore): `prepare` parses it once and writes the message as received and each of its
attachments to their files (mailcore.mailapi.files), outside any transaction; `thd_store`
then inserts one row per mailbox, all naming the same files, inside the transaction that
also records the recipients' results (mailcore.queue.runner.thd_deliver_local). A recipient
is stored at most once: `mailapi_mail.queue_rcpt_id` is unique, and a replay finds its row;
two recipients of one mailbox (`Bob@` and `bob@`) share the first one's row.
A mailbox whose mail would pass `[mailapi] mailbox_quota_bytes` with the message (its size:
the message as received, its attachments and text fields, mailcore.mailapi.counts) stores
nothing: its recipients bounce 5.2.2 "mailbox full" (RFC 3463), as Dovecot's LDA and LMTP
answer by default (`quota_full_tempfail = no`). A temporary failure would keep the message
in the spool for the queue's lifetime, retried, and move the disk it takes from the mailbox
to the spool; the sender learns of it days later rather than at once. Most such mail never
gets here: the SMTP server refuses a recipient whose mailbox has no room at RCPT
(mailcore.mailapi.room), so this bounce is for the message that fills a mailbox (or mail
that came another way: an outbox, a bounce).
A mailbox whose domain is suspended (its owner disabled: `mailcore user disable`) stores
nothing either: its recipients wait in the queue (deferred 4.2.1, as the SMTP server answers
them 450 4.2.1 meanwhile) and are stored once the owner is enabled, or bounce at the queue's
lifetime. Mail reaches the queue for them without the SMTP server (a hosted mailbox's
outbox, a bounce, mail accepted before the owner was disabled).
Files a delivery wrote but no row names (a replay, a mailbox removed meanwhile) are swept
later (MailService.sweep).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, insert, select
from twisted.internet.interfaces import IReactorTime

from mailcore.mailapi.addresses import mailbox_key
from mailcore.mailapi.counts import mail_size, thd_count_mail, thd_fits
from mailcore.mailapi.files import MailFiles, StoredFile
from mailcore.mailapi.mime import Parsed, parse_message
from mailcore.mailapi.snapshot import Snapshot
from mailcore.messages.parts import NotClean
from mailcore.queue.model import SERVED, LocalStored
from mailcore.store import Database
from mailcore.store.schema import domains, mailapi_attachments, mailapi_mail, mailboxes, users
from mailcore.workers import CpuPool

# How long the set of hosted addresses is trusted before it is read again (changes made
# through this process's MailboxService are seen at once).
HOSTED_TTL = 10.0

_mail = mailapi_mail.c


_ID_TAKEN = select(_mail.id).where(_mail.public_id == bindparam("candidate"))


def thd_new_public_id(conn: Connection) -> str:
    """A short opaque id no mail has yet (7 hex digits, as the seed's examples)."""
    for length in (7, 7, 7, 10, 16):
        candidate = secrets.token_hex(8)[:length]
        if conn.execute(_ID_TAKEN, {"candidate": candidate}).first() is None:
            return candidate
    raise RuntimeError("no free mail id")  # pragma: no cover - 2**64 ids


# The addresses of the mailboxes whose own domain row (the one they were created under) is
# served; and the mailbox at :address, if it is one of them, held until the delivery commits
# (PostgreSQL: FOR KEY SHARE, as mailcore.mailapi.mailboxes.thd_mailbox's `hold`): its delete
# meanwhile waits and takes the mail along, instead of failing the delivery's insert (and with
# it every recipient's copy) on the foreign key.
_HOSTED = select(mailboxes.c.address) \
    .join(domains, domains.c.id == mailboxes.c.domain_id).where(SERVED)
# With it, whether the domain's owner is enabled (else the domain is suspended).
_HOSTED_BOX = select(mailboxes.c.id, users.c.is_active) \
    .join(domains, domains.c.id == mailboxes.c.domain_id) \
    .join(users, users.c.id == domains.c.owner_id) \
    .where(mailboxes.c.address == bindparam("address"), SERVED) \
    .with_for_update(read=True, key_share=True, of=mailboxes)


def thd_hosted(conn: Connection) -> frozenset[str]:
    """The addresses of the mailboxes whose domain is served. Removing a domain leaves its
    mailboxes (and their mail) but unbinds them for good (`mailboxes.domain_id`): routing
    to them afterwards stored in bob's mailbox what was sent to bob@ a domain nobody
    served, or, once another user had claimed the name again (proved or not), mail meant
    for that user."""
    return frozenset(row[0] for row in conn.execute(_HOSTED))


class HostedAddresses:
    """Which recipient addresses are hosted mailboxes (a cached set of all of them, read
    again `ttl` seconds after; `invalidate` after a change made through this process)."""

    def __init__(self, db: Database, clock: IReactorTime, ttl: float = HOSTED_TTL) -> None:
        self.db = db
        self.clock = clock
        self.ttl = ttl
        self._known = Snapshot(clock, ttl, self._read)
        self.invalidate = self._known.invalidate

    def _read(self) -> Awaitable[frozenset[str]]:
        return self.db.read("mailapi_hosted_addresses", thd_hosted)

    async def contains(self, address: str) -> bool:
        known = await self._known.get()
        key = mailbox_key(address)
        return key is not None and key in known


@dataclass(frozen=True)
class Prepared:
    """A message ready to be stored: its fields, its file, its attachments' files."""

    parsed: Parsed
    raw: StoredFile
    attachments: tuple[StoredFile, ...]


class LocalMailboxes:
    """Stores queued mail in hosted mailboxes (see the module docstring)."""

    def __init__(self, files: MailFiles, io: CpuPool, quota_bytes: int | None = None) -> None:
        self.files = files
        self.io = io
        self.quota_bytes = quota_bytes  # bytes a mailbox's mail may take (None: no limit)

    async def prepare(self, queue_id: str, body: bytes) -> Prepared:
        return await self.io.run(self.thd_prepare, body)

    def thd_prepare(self, body: bytes) -> Prepared:
        """Blocking: parse `body` and write it and its attachments to their files."""
        parsed = parse_message(body)
        raw = self.files.write(body)
        attachments = []
        for a in parsed.attachments:
            try:  # a slice at a time, straight from the message
                stored = self.files.write_chunks(a.chunks())
            except NotClean:  # not decodable so: at once, by the email package
                stored = self.files.write(a.whole())
            attachments.append(StoredFile(a.name, a.content_type, stored.size, stored.sha256))
        parsed.attachments = []  # their bytes are in the files now
        return Prepared(parsed, raw, tuple(attachments))

    def thd_store(
        self, conn: Connection, recipients: Sequence[tuple[int, str]], queue_id: str,
        prepared: Prepared, now: float,
    ) -> LocalStored:
        """Store the message as unread inbox mail in the mailbox of each recipient, once
        per mailbox (Bob@ and bob@ are two recipients to the SMTP server, RFC 5321 2.4, and
        one mailbox here); returns the recipient ids stored now or before, those whose
        mailbox has no room for it (its quota) and those whose domain is suspended. A
        mailbox whose
        domain is removed (or no longer served) stores nothing, whatever routed the mail
        here (a node's set of hosted addresses read before the removal)."""
        stored: set[int] = set()
        full: set[int] = set()
        suspended: set[int] = set()
        full_boxes: set[int] = set()
        boxes: set[int] = set()  # the mailboxes that hold this message
        fresh = []
        for rcpt_id, address in recipients:
            row = conn.execute(
                select(_mail.mailbox_id).where(_mail.queue_rcpt_id == rcpt_id)).first()
            if row is None:
                fresh.append((rcpt_id, address))
            else:
                stored.add(rcpt_id)
                boxes.add(row.mailbox_id)
        parsed = prepared.parsed
        fields = (parsed.mail_from, parsed.to, parsed.cc, parsed.reply_to, parsed.subject,
                  parsed.body)
        size = mail_size(fields, (a.size for a in prepared.attachments), [prepared.raw.size])
        for rcpt_id, address in fresh:
            key = mailbox_key(address)
            box = None if key is None else conn.execute(_HOSTED_BOX, {"address": key}).first()
            if box is None:
                continue
            if not box.is_active:
                suspended.add(rcpt_id)
                continue
            if box.id in boxes:
                stored.add(rcpt_id)
                continue
            if box.id in full_boxes or not thd_fits(conn, box.id, size, self.quota_bytes):
                full_boxes.add(box.id)
                full.add(rcpt_id)
                continue
            boxes.add(box.id)
            inserted = conn.execute(insert(mailapi_mail).values(
                public_id=thd_new_public_id(conn), mailbox_id=box.id, status="inbox",
                read=False, mail_from=parsed.mail_from, to_addrs=parsed.to,
                cc_addrs=parsed.cc, reply_to=parsed.reply_to, subject=parsed.subject,
                body=parsed.body, raw_sha256=prepared.raw.sha256, queue_rcpt_id=rcpt_id,
                created_at=now, size=size,
            )).inserted_primary_key
            assert inserted is not None
            thd_count_mail(conn, box.id, 1)
            for a in prepared.attachments:
                conn.execute(insert(mailapi_attachments).values(
                    mail_id=inserted[0], name=a.name, content_type=a.content_type,
                    size=a.size, sha256=a.sha256, data=None,
                ))
            stored.add(rcpt_id)
        return LocalStored(stored, full, suspended)

"""Dropmyemail's contacts: the correspondents found in an account's backed-up mail.

Every address in From, To and Cc of the account's messages (the account's own address
aside) is a contact, named by the display name it last came with. Its telephone number is
the one a vCard attached to any of those messages gives, else the one the signature block of
the newest message from that address gives (read once per message by the backup indexer:
mailcore.backup.index and .signature). Each is served as a vCard 3.0 built with vobject.
`backup_date` is when a message naming the contact was last backed up. A contact's id is
derived from its address (stable across backups).
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, replace
from email.utils import getaddresses

import vobject
from sqlalchemy import Connection, func, or_, select

from mailcore.backup.mail import BackupMail, NotFound, Window
from mailcore.messages.models import Page
from mailcore.messages.store import MessageNotFound
from mailcore.store.schema import message_attachments, messages

VCARD_TYPES = ("text/vcard", "text/x-vcard", "text/directory")


@dataclass(frozen=True)
class Contact:
    id: int
    name: str
    email: str
    phone: str
    backup_date: datetime.datetime | None

    @property
    def filename(self) -> str:
        return f"{self.email}.vcf"

    def vcard(self) -> str:
        """The contact as a vCard 3.0 (vobject)."""
        card = vobject.vCard()
        name = self.name or self.email
        card.add("fn").value = name
        card.add("n").value = vobject.vcard.Name(given=name)
        email = card.add("email")
        email.value = self.email
        email.type_param = "INTERNET"
        if self.phone:
            card.add("tel").value = self.phone
        return str(card.serialize())


def contact_id(address: str) -> int:
    """A stable id below 2^56 from the (lower-case) address."""
    return int.from_bytes(hashlib.sha256(address.encode("utf-8")).digest()[:7], "big")


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value


def vcard_entries(data: bytes) -> list[tuple[str, str, str]]:
    """(name, email, phone) of every card in `data` with an e-mail address."""
    out = []
    try:
        for card in vobject.readComponents(data.decode("utf-8", "replace")):
            emails = [e.value for e in card.contents.get("email", []) if e.value]
            if not emails:
                continue
            name = card.fn.value if "fn" in card.contents else ""
            phones = [t.value for t in card.contents.get("tel", []) if t.value]
            out.append((str(name), str(emails[0]), str(phones[0]) if phones else ""))
    except Exception:  # a broken card is no contact, not an error of the listing
        return out
    return out


def _correspondents(sender: str, recipient: str, cc: str,
                    sender_address: str) -> list[tuple[str, str]]:
    """(name, address) of each address in a message's From, To and Cc display text. The
    email package's address parser recurses once per nested "(": a field its stack cannot
    hold (a display name decoded to 3,000 "(") gives no names, the From its bare address
    as the store parsed it, rather than fail the whole account's listing."""
    try:
        return getaddresses([sender, recipient, cc])
    except (RecursionError, ValueError, LookupError, TypeError, IndexError):
        pass
    pairs: list[tuple[str, str]] = []
    for text, fallback in ((sender, sender_address), (recipient, ""), (cc, "")):
        try:
            pairs.extend(getaddresses([text]))
        except (RecursionError, ValueError, LookupError, TypeError, IndexError):
            if fallback:
                pairs.append(("", fallback))
    return pairs


Row = tuple[str, str, str, "datetime.datetime | None", str | None, str | None]


def fold_contacts(rows: list[Row], own: str) -> dict[str, Contact]:
    """The contacts of an account's message rows (sender, recipient, cc, created_at,
    sender address, signature phone), oldest first, by lower-case address; the account's
    own address aside. CPU-bound (a worker process)."""
    found: dict[str, Contact] = {}
    for sender_text, recipient, cc, created_at, sender_address, signature_phone in rows:
        seen = _utc(created_at)
        sender = (sender_address or "").strip().lower()
        signed = signature_phone or ""
        for name, address in _correspondents(sender_text, recipient, cc, sender_address or ""):
            key = address.strip().lower()
            if "@" not in key or key == own or len(key) > 320:
                continue
            old = found.get(key)
            phone = signed if signed and key == sender else (old.phone if old else "")
            found[key] = Contact(contact_id(key), name.strip() or (old.name if old else ""),
                                 key, phone, seen)
    return found


class BackupContacts:
    def __init__(self, mail: BackupMail) -> None:
        self.mail = mail
        self.store = mail.store

    async def _all(self, user_id: int, account_id: int) -> list[Contact]:
        account = await self.mail.accounts.get(user_id, account_id)
        own = account.email.strip().lower()

        def txn(conn: Connection) -> list[Row]:
            return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in conn.execute(
                select(messages.c.sender, messages.c.recipient, messages.c.cc,
                       messages.c.created_at, messages.c.sender_address,
                       messages.c.signature_phone)
                .where(messages.c.user_id == user_id, messages.c.account_id == account_id)
                .order_by(messages.c.created_at, messages.c.id)
            )]

        rows = await self.mail.db.read("backup_contacts", txn)
        # The fold (an address parse per field, 0.1 ms a message) runs in a worker process:
        # in the read transaction it held the store's read lane 1.1 s per request for an
        # account of 5,000 messages, every read of the daemon waiting behind it.
        found = await self.store.cpu.run_in_process(fold_contacts, rows, own)
        for name, address, phone in await self._cards(user_id, account_id):
            key = address.strip().lower()
            if "@" not in key or key == own:
                continue
            old = found.get(key)
            if old is None:
                found[key] = Contact(contact_id(key), name, key, phone, None)
            else:
                found[key] = replace(old, name=old.name or name, phone=phone or old.phone)
        return list(found.values())

    async def _cards(self, user_id: int, account_id: int) -> list[tuple[str, str, str]]:
        """(name, email, phone) of the cards of every vCard attached to the account's mail.
        The vCards are picked by one query (the listing of every attachment of the account,
        200 at a time with a count each, took a query pair per 200 attachments)."""

        def txn(conn: Connection) -> list[int]:
            a = message_attachments.c
            return [int(r[0]) for r in conn.execute(
                select(a.id)
                .select_from(message_attachments.join(
                    messages, messages.c.id == a.message_row_id))
                .where(messages.c.user_id == user_id, messages.c.account_id == account_id,
                       or_(a.mime_type.in_(VCARD_TYPES), func.lower(a.filename).like("%.vcf")))
                .order_by(messages.c.date, a.id)
            )]

        out: list[tuple[str, str, str]] = []
        for attachment_id in await self.mail.db.read("backup_contact_cards", txn):
            try:
                _, data = await self.store.attachment_content(user_id, attachment_id)
            except MessageNotFound:
                continue
            out.extend(await self.store.cpu.run(vcard_entries, data))
        return out

    async def list(self, user_id: int, account_id: int, *, sort: str, direction: str,
                   window: Window) -> Page[Contact]:
        await self.mail._account(user_id, account_id)
        contacts = await self._all(user_id, account_id)
        if sort == "name":
            contacts.sort(key=lambda c: ((c.name or c.email).casefold(), c.email))
        else:
            contacts.sort(key=lambda c: c.email)
        if direction == "desc":
            contacts.reverse()
        return Page(len(contacts), contacts[window.offset:window.offset + window.per_page])

    async def get(self, user_id: int, account_id: int, contact: int) -> Contact:
        await self.mail._account(user_id, account_id)
        for c in await self._all(user_id, account_id):
            if c.id == contact:
                return c
        raise NotFound()

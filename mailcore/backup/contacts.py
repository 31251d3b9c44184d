"""Dropmyemail's contacts: the correspondents found in an account's backed-up mail.

Every address in From, To and Cc of the account's messages (the account's own address
aside) is a contact, named by the display name it last came with. Its telephone number is
the one a vCard attached to any of those messages gives, else the one the signature block of
the newest message from that address gives (read once per message by the backup indexer:
mailcore.backup.index and .signature). Each is served as a vCard 3.0 built with vobject.
`backup_date` is when a message naming the contact was last backed up. A contact's id is
derived from its address (stable across backups): the low 53 bits of the first 7 bytes of
its SHA-256, so that it is at most 2^53 - 1 (`MAX_CONTACT_ID`), which a JSON number read as
a double (JavaScript's Number.MAX_SAFE_INTEGER) holds exactly. Ids were those 56 bits until
then: a browser read 7 in 8 of them rounded and asked for a contact that did not exist. An
id kept from then still names its contact (`ContactBook.find`): one below 2^53 is the same
id now, one above it is known by its low bits and checked whole, and one a browser rounded
is the contact whose old id rounds to the same double, when one alone does.

The contacts are worked out from the whole account (every message's address fields, every
attached vCard), so they are worked out once per change of the backup, not per request: an
account's `ContactBook` (sorted both ways, and by id) is kept with the stamp it was read at,
the user's change stamp (`mailcore.messages.counts.thd_change_stamp`: any message stored,
deleted or moved, on any node) and how many of the account's messages the indexer has yet to
read the signature of. A page, or one contact, is then a lookup in the book while the stamp
stands (`ContactBooks`).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, replace
from email.utils import getaddresses

import vobject
from sqlalchemy import Connection, func, or_, select
from twisted.internet import defer

from mailcore.backup.mail import BackupMail, NotFound, Window
from mailcore.fetch.errors import AccountNotFound
from mailcore.messages.counts import thd_change_stamp
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


# The largest contact id: the largest integer a double holds exactly (2^53 - 1).
MAX_CONTACT_ID = 2**53 - 1


def old_contact_id(address: str) -> int:
    """The id a contact had before ids were cut to 53 bits: below 2^56, from the
    (lower-case) address."""
    return int.from_bytes(hashlib.sha256(address.encode("utf-8")).digest()[:7], "big")


def contact_id(address: str) -> int:
    """A stable id of at most `MAX_CONTACT_ID` from the (lower-case) address: the old id's
    low 53 bits, so that an old id below 2^53 is the same id."""
    return old_contact_id(address) & MAX_CONTACT_ID


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value


# The properties `vcard_entries` reads (and those that frame a card).
_READ = frozenset({"BEGIN", "END", "VERSION", "FN", "EMAIL", "TEL"})
_LINE_END = re.compile(r"\r\n|\r|\n")


def only_read_properties(text: str) -> str:
    """The physical lines of the properties `vcard_entries` reads, the others (a PHOTO or a
    sound of megabytes, a NOTE) left out, so that vobject parses names, addresses and numbers
    only. Logical lines as vobject reads them: a line starting with a space or a tab
    continues the one before, as does any line after one of a quoted-printable property
    (vCard 2.1) that ends with "="; a blank line ends one; a name may carry a group
    ("item1.EMAIL"). One pass over the text: vobject took 4.5 s for a card holding a 7.7 MB
    photo, more than linearly (it searches each logical line again at each of its lines)."""
    out: list[str] = []
    keep = quoted_printable = continues = False
    for line in _LINE_END.split(text):
        if not line.strip():
            keep = quoted_printable = continues = False
            continue
        if not (continues or line[0] in " \t"):
            head = line.split(":", 1)[0]
            name = head.split(";", 1)[0].rsplit(".", 1)[-1].strip().upper()
            keep = name in _READ
            quoted_printable = "quoted-printable" in head.lower()
        continues = quoted_printable and line.endswith("=")
        if keep:
            out.append(line)
    return "\r\n".join(out) + "\r\n" if out else ""


def vcard_entries(data: bytes) -> list[tuple[str, str, str]]:
    """(name, email, phone) of every card in `data` with an e-mail address."""
    out = []
    try:
        text = only_read_properties(data.decode("utf-8", "replace"))
        for card in vobject.readComponents(text):
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


@dataclass(frozen=True)
class ContactBook:
    """An account's contacts as its listing reads them: by name, by address, by id."""

    by_name: tuple[Contact, ...]
    by_email: tuple[Contact, ...]
    by_id: dict[int, Contact]

    def __len__(self) -> int:
        return len(self.by_email)

    def find(self, wanted: int) -> Contact | None:
        """The contact of id `wanted`, or of the old id `wanted` (module docstring): one
        whose old id it is exactly, else the one contact whose old id a double rounds to
        the same value (a double of 2^53 to 2^56 is a multiple of 2, 4 or 8, and the client
        may write it with the fewest digits that read back as it: within 8 of the old id)."""
        if wanted <= MAX_CONTACT_ID:
            return self.by_id.get(wanted)
        rounded: list[Contact] = []  # each old id is one contact's: none comes twice
        for old in range(wanted - 8, wanted + 9):
            found = self.by_id.get(old & MAX_CONTACT_ID)
            if found is None or old_contact_id(found.email) != old:
                continue
            if old == wanted:
                return found
            if float(old) == float(wanted):
                rounded.append(found)
        return rounded[0] if len(rounded) == 1 else None


def make_book(contacts: list[Contact]) -> ContactBook:
    """The book of `contacts` (two sorts of them all: CPU-bound, off the reactor)."""
    return ContactBook(
        by_name=tuple(sorted(contacts, key=lambda c: ((c.name or c.email).casefold(),
                                                      c.email))),
        by_email=tuple(sorted(contacts, key=lambda c: c.email)),
        by_id={c.id: c for c in contacts})


# The stamp a book is read at: the user's change stamp, and how many of the account's
# messages still wait for the indexer to read their signature (its phone may change then).
Stamp = tuple[int, int]


class ContactBooks:
    """Books kept with their stamp (module docstring), the least recently used dropped first
    once they hold more than `max_contacts` contacts together; a book larger than that is
    not kept. Requests at once for a book not kept share one fold."""

    def __init__(self, max_contacts: int = 100_000) -> None:
        self.max_contacts = max_contacts
        self._books: OrderedDict[Hashable, tuple[Stamp, ContactBook]] = OrderedDict()
        self._held = 0
        self._waiting: dict[tuple[Hashable, Stamp],
                            list[defer.Deferred[ContactBook | None]]] = {}

    def get(self, key: Hashable, stamp: Stamp) -> ContactBook | None:
        found = self._books.get(key)
        if found is None or found[0] != stamp:
            return None
        self._books.move_to_end(key)
        return found[1]

    def _put(self, key: Hashable, stamp: Stamp, book: ContactBook) -> None:
        old = self._books.pop(key, None)
        if old is not None:
            self._held -= len(old[1])
        if len(book) > self.max_contacts:
            return
        self._books[key] = (stamp, book)
        self._held += len(book)
        while self._held > self.max_contacts:
            _, (_, dropped) = self._books.popitem(last=False)
            self._held -= len(dropped)

    async def book(self, key: Hashable, stamp: Stamp) -> ContactBook | None:
        """The book kept for `key` at `stamp`, or the one a fold under way makes; None
        when the caller is to fold it (and then call `fold_done`, whatever the outcome)."""
        while True:
            found = self.get(key, stamp)
            if found is not None:
                return found
            waiting = self._waiting.get((key, stamp))
            if waiting is None:
                self._waiting[(key, stamp)] = []
                return None
            d: defer.Deferred[ContactBook | None] = defer.Deferred()
            waiting.append(d)
            found = await d
            if found is not None:
                return found
            # That fold failed (its request went away, say): one of us folds again.

    def fold_done(self, key: Hashable, stamp: Stamp, book: ContactBook | None) -> None:
        """Keep the book folded for `key` at `stamp` and hand it to the requests waiting for
        it; None: the fold failed, and they try again."""
        waiting = self._waiting.pop((key, stamp), [])
        if book is not None:
            self._put(key, stamp, book)
        for d in waiting:
            d.callback(book)


class BackupContacts:
    def __init__(self, mail: BackupMail, books: ContactBooks | None = None) -> None:
        self.mail = mail
        self.store = mail.store
        self.books = books or ContactBooks()

    async def book(self, user_id: int, account_id: int) -> ContactBook:
        """The account's contacts, folded once per change of its backup (module
        docstring); NotFound if the account is not the user's."""
        try:
            account = await self.mail.accounts.get(user_id, account_id)
        except AccountNotFound:
            raise NotFound() from None
        c = messages.c

        def txn(conn: Connection) -> Stamp:
            unscanned = conn.execute(
                select(func.count()).select_from(messages)
                .where(c.signature_phone.is_(None), c.account_id == account_id)).scalar()
            return thd_change_stamp(conn, user_id), int(unscanned or 0)

        # Read before the rows: a change after it makes a book newer than its stamp, which
        # the next request finds stale, never one older than it.
        stamp = await self.mail.db.read("backup_contacts_stamp", txn)
        key = (user_id, account_id)
        found = await self.books.book(key, stamp)
        if found is not None:
            return found
        book = None
        try:
            contacts = await self._all(user_id, account_id, account.email.strip().lower())
            book = await self.store.cpu.run(make_book, contacts)
        finally:
            self.books.fold_done(key, stamp, book)
        return book

    async def _all(self, user_id: int, account_id: int, own: str) -> list[Contact]:

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
        book = await self.book(user_id, account_id)
        ordered = book.by_name if sort == "name" else book.by_email
        total = len(ordered)
        start, end = window.offset, window.offset + window.per_page
        if direction == "desc":  # the same slice of the reversed order, none reversed
            start, end = max(total - end, 0), max(total - start, 0)
            return Page(total, list(reversed(ordered[start:end])))
        return Page(total, list(ordered[start:end]))

    async def get(self, user_id: int, account_id: int, contact: int) -> Contact:
        found = (await self.book(user_id, account_id)).find(contact)
        if found is None:
            raise NotFound()
        return found

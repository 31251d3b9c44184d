"""Values the message store hands out and takes in (no SQL here)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Fields a message list may be ordered by (prefix "-" for descending), as the seed APIs name
# them; "from"/"to" are Dropmyemail's names for sender/recipient.
ORDERING_FIELDS = (
    "id", "date", "subject", "sender", "recipient", "folder", "size", "created_at",
    "updated_at", "message_id", "has_attachments",
)


@dataclass(frozen=True)
class FetchedMessage:
    """One message as a fetch session got it: the exact bytes plus what the server said."""

    raw: bytes
    uid: int | None = None
    uidl: str | None = None
    flags: tuple[str, ...] = ()
    internal_date: datetime.datetime | None = None
    # The size POP3's LIST gave it (kept with the copy: `message_pop_sizes`).
    listed_size: int | None = None


@dataclass(frozen=True)
class Location:
    """Where fetched messages go: the owner, the account and the folder."""

    user_id: int
    account_id: int | None
    folder_id: int | None
    folder: str
    uidvalidity: int | None = None


@dataclass(frozen=True)
class StoreResult:
    """What one batch did: rows created, rows re-linked after a UIDVALIDITY change, skipped."""

    created: list[int] = field(default_factory=list)
    relinked: int = 0
    already_stored: int = 0
    thread_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class MessageQuery:
    """Filters, ordering and a window for listing messages.

    `date_from`/`date_to` are inclusive calendar days (UTC). `threads_only` keeps one row per
    thread: the first (oldest) message of it among those matching the filters.
    `without_pop` leaves out the mail of the user's POP3 accounts (the IMAP2API's, whose
    imap-servers are the IMAP accounts only); the store reads which accounts those are into
    `hidden_accounts` (those holding mail) in the transaction that reads the page.
    """

    q: str | None = None
    folder: str | None = None
    folder_id: int | None = None
    account_id: int | None = None
    date_from: datetime.date | None = None
    date_to: datetime.date | None = None
    has_attachments: bool | None = None
    thread_id: int | None = None
    threads_only: bool = False
    ordering: str = "-date"
    offset: int = 0
    limit: int = 50
    without_pop: bool = False
    hidden_accounts: tuple[int, ...] = ()


@dataclass(slots=True)
class MessageSummary:
    """A message as list endpoints show it. Not frozen: a page builds 50 to 100 of these
    per request, and a frozen dataclass's __init__ (object.__setattr__ per field) costs
    about seven times a plain one's."""

    id: int
    user_id: int
    account_id: int | None
    folder_id: int | None
    folder: str
    message_id: str
    subject: str
    sender: str
    sender_address: str
    recipient: str
    date: datetime.datetime | None
    size: int
    has_attachments: bool
    flags: tuple[str, ...]
    thread_id: int | None
    thread_count: int
    created_at: datetime.datetime
    updated_at: datetime.datetime


@dataclass(frozen=True)
class AttachmentSummary:
    """An attachment as list endpoints show it."""

    id: int
    message_row_id: int
    account_id: int | None
    part_path: str
    filename: str
    mime_type: str
    size: int
    content_id: str | None
    sender: str
    date: datetime.datetime | None


@dataclass(frozen=True)
class MessageDetail:
    """A message with its bodies, headers and attachments."""

    summary: MessageSummary
    cc: str
    body_text: str
    body_html: str
    headers: str
    in_reply_to: str
    references: tuple[str, ...]
    internal_date: datetime.datetime | None
    uidvalidity: int | None
    uid: int | None
    sha256: str
    parse_problems: tuple[str, ...]
    attachments: tuple[AttachmentSummary, ...]


@dataclass(frozen=True)
class Page(Generic[T]):
    """One window of a result set and the size of the whole set.

    `stamp`: the user's change stamp the page was read at, when the query's rows change
    only with it (a page kept with it is good while it stands); `unchanged`: the caller's
    kept page is still good (the stamp it gave stands), so nothing was read; `json`: the
    items as the JSON array a reply holds, written by the store when asked (`items` is
    then empty)."""

    count: int
    items: list[T]
    stamp: int | None = None
    unchanged: bool = False
    json: bytes | None = None


@dataclass(frozen=True)
class FolderInfo:
    """A folder (Dropmyemail: mailbox) and how many messages we hold from it."""

    id: int | None
    account_id: int | None
    name: str
    message_count: int
    special_use: str | None = None


@dataclass(frozen=True)
class Statistics:
    """Seed 001 statistics: totals and per-folder counts."""

    total_emails: int
    total_threads: int
    folders: dict[str, int]


@dataclass(frozen=True)
class AccountUsage:
    """How many messages and bytes an account holds in the store (Dropmyemail msg_count,
    storage)."""

    message_count: int
    storage: int

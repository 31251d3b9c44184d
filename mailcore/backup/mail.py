"""What Dropmyemail shows of a backed-up account: its mailboxes (the fetch engine's folders),
their messages, each message's exact bytes, a full-text search, and its attachments (each
described by libmagic, as `file(1)` would); over mailcore.messages.

Pages are numbered from 1 and hold 1 to 40 items (dropmyemail-v1.md); every call first checks
that the account (and the mailbox) is the user's, so another user's ids are "not found".
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, select

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.errors import AccountNotFound
from mailcore.messages import MessageStore
from mailcore.messages.models import (
    AttachmentSummary,
    FolderInfo,
    MessageQuery,
    MessageSummary,
    Page,
)
from mailcore.messages.store import MessageNotFound
from mailcore.store import Database
from mailcore.store.schema import fetch_folders

MAX_PER_PAGE = 40


class NotFound(Exception):
    """The account, mailbox or message is not the user's (or does not exist)."""


@dataclass(frozen=True)
class Window:
    """A page of `per_page` items, numbered from 1."""

    page: int = 1
    per_page: int = 20

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


class BackupMail:
    def __init__(self, db: Database, accounts: Accounts, store: MessageStore) -> None:
        self.db = db
        self.accounts = accounts
        self.store = store

    async def _account(self, user_id: int, account_id: int) -> None:
        try:
            await self.accounts.get(user_id, account_id)
        except AccountNotFound:
            raise NotFound() from None

    async def _mailbox(self, user_id: int, account_id: int, mailbox_id: int) -> None:
        await self._account(user_id, account_id)

        def txn(conn: Connection) -> bool:
            return conn.execute(
                select(fetch_folders.c.id).where(fetch_folders.c.id == mailbox_id,
                                                 fetch_folders.c.account_id == account_id)
            ).first() is not None

        if not await self.db.read("backup_mailbox_exists", txn):
            raise NotFound()

    async def mailboxes(self, user_id: int, account_id: int, *, sort: str, direction: str,
                        window: Window) -> Page[FolderInfo]:
        await self._account(user_id, account_id)
        return await self.store.mailboxes(user_id, account_id, sort=sort, direction=direction,
                                          offset=window.offset, limit=window.per_page)

    async def messages(self, user_id: int, account_id: int, mailbox_id: int, *,
                       attachments_only: bool, direction: str,
                       window: Window) -> Page[MessageSummary]:
        await self._mailbox(user_id, account_id, mailbox_id)
        return await self.store.list_messages(user_id, MessageQuery(
            account_id=account_id, folder_id=mailbox_id,
            has_attachments=True if attachments_only else None,
            ordering="-date" if direction == "desc" else "date",
            offset=window.offset, limit=window.per_page,
        ))

    async def eml(self, user_id: int, account_id: int, mailbox_id: int, row_id: int) -> bytes:
        """The message's exact bytes, if it is in that mailbox of that account."""
        await self._mailbox(user_id, account_id, mailbox_id)
        try:
            found = await self.store.get_message(user_id, row_id)
        except MessageNotFound:
            raise NotFound() from None
        s = found.summary
        if s.account_id != account_id or s.folder_id != mailbox_id:
            raise NotFound()
        try:
            return await self.store.raw_message(user_id, row_id)
        except MessageNotFound:
            raise NotFound() from None

    async def search(self, user_id: int, account_id: int, query: str,
                     window: Window) -> Page[MessageSummary]:
        await self._account(user_id, account_id)
        return await self.store.list_messages(user_id, MessageQuery(
            q=query, account_id=account_id, ordering="-date",
            offset=window.offset, limit=window.per_page,
        ))


# How much of a file libmagic looks at (what `file` reads by default is about this much).
MAGIC_BYTES = 1 << 20


def describe(content: bytes) -> str:
    """What `file(1)` says of `content` (libmagic). Blocks: run it on the CPU pool."""
    import magic

    try:
        return str(magic.from_buffer(content[:MAGIC_BYTES]))
    except Exception as e:  # libmagic refuses rarely; the listing still works
        return f"unknown ({type(e).__name__})"


@dataclass(frozen=True)
class Attachment:
    """An attachment as Dropmyemail lists it: the indexed part and libmagic's description."""

    summary: AttachmentSummary
    meta_data: str


class BackupAttachments:
    """An account's attachments: listed, searched by file name or type, and read."""

    def __init__(self, mail: BackupMail) -> None:
        self.mail = mail
        self.store = mail.store

    async def _described(self, user_id: int, item: AttachmentSummary) -> Attachment:
        try:
            _, content = await self.store.attachment_content(user_id, item.id)
        except MessageNotFound:
            return Attachment(item, "")
        return Attachment(item, await self.store.cpu.run(describe, content))

    async def list(self, user_id: int, account_id: int, *, query: str | None = None,
                   sort: str = "date", direction: str = "asc",
                   window: Window) -> Page[Attachment]:
        await self.mail._account(user_id, account_id)
        found = await self.store.list_attachments(
            user_id, account_id=account_id, query=query, sort=sort, direction=direction,
            offset=window.offset, limit=window.per_page)
        items = [await self._described(user_id, a) for a in found.items]
        return Page(count=found.count, items=items)

    async def content(self, user_id: int, account_id: int,
                      attachment_id: int) -> tuple[AttachmentSummary, bytes]:
        await self.mail._account(user_id, account_id)
        try:
            info, content = await self.store.attachment_content(user_id, attachment_id)
        except MessageNotFound:
            raise NotFound() from None
        if info.account_id != account_id:
            raise NotFound()
        return info, content

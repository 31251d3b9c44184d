"""What Dropmyemail shows of a backed-up account: its mailboxes (the fetch engine's folders),
their messages, each message's exact bytes, a full-text search, and its attachments (each
described once by libmagic, as `file(1)` would: mailcore.backup.index); over
mailcore.messages.

Pages are numbered from 1 and hold 1 to 40 items (dropmyemail-v1.md); every call first checks
that the account (and the mailbox) is the user's, so another user's ids are "not found".
"""

from __future__ import annotations

import binascii
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from mailcore.backup.index import BackupIndex
from mailcore.fetch.accounts import Accounts
from mailcore.fetch.errors import AccountNotFound
from mailcore.messages import MessageStore, parts
from mailcore.messages.models import (
    AttachmentSummary,
    FolderInfo,
    MessageQuery,
    MessageSummary,
    Page,
)
from mailcore.messages.parse import extract_part
from mailcore.messages.sql import utc
from mailcore.messages.store import raw_chunks
from mailcore.store import Database
from mailcore.store.engine import ilike, like_pattern
from mailcore.store.schema import (
    fetch_accounts,
    fetch_folders,
    message_attachments,
    message_blobs,
    messages,
)

MAX_PER_PAGE = 40
# A message is read this much at a time to be sent: a multiple of 3, so that each chunk
# turns into base64 on its own.
EML_CHUNK = 3 * 256 * 1024


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


# Every message list and download asks it: built once (see
# mailcore.oauth.provider._LIVE_TOKEN).
_MAILBOX_NAME = select(fetch_folders.c.name) \
    .join_from(fetch_folders, fetch_accounts, fetch_accounts.c.id == fetch_folders.c.account_id) \
    .where(fetch_folders.c.id == bindparam("mailbox"),
           fetch_folders.c.account_id == bindparam("account"),
           fetch_accounts.c.user_id == bindparam("user"))


@dataclass(frozen=True)
class StoredEml:
    """A backed-up message's stored bytes: which blob, how long."""

    sha256: str
    size: int


# One read: the message row is in that mailbox of that account of the user's.
_EML = select(messages.c.sha256, message_blobs.c.size) \
    .join_from(messages, message_blobs, message_blobs.c.sha256 == messages.c.sha256) \
    .where(messages.c.id == bindparam("row"), messages.c.folder_id == bindparam("mailbox"),
           messages.c.account_id == bindparam("account"),
           messages.c.user_id == bindparam("user"))


class BackupMail:
    def __init__(self, db: Database, accounts: Accounts, store: MessageStore) -> None:
        self.db = db
        self.accounts = accounts
        self.store = store
        # The index of the backup (attachments' descriptions, signature phones): filled by
        # the Core's BackupIndexer, and by a read that finds rows not yet filled.
        self.index = BackupIndex(db, store)

    async def _account(self, user_id: int, account_id: int) -> None:
        try:
            await self.accounts.get(user_id, account_id)
        except AccountNotFound:
            raise NotFound() from None

    async def _mailbox(self, user_id: int, account_id: int, mailbox_id: int) -> str:
        """The mailbox's name, if it is a mailbox of that account of the user's (one read:
        every message list and download asks)."""

        def txn(conn: Connection) -> str | None:
            name: str | None = conn.execute(_MAILBOX_NAME, {
                "mailbox": mailbox_id, "account": account_id, "user": user_id}).scalar()
            return name

        name = await self.db.read("backup_mailbox_exists", txn)
        if name is None:
            raise NotFound()
        return name

    async def mailboxes(self, user_id: int, account_id: int, *, sort: str, direction: str,
                        window: Window) -> Page[FolderInfo]:
        await self._account(user_id, account_id)
        return await self.store.mailboxes(user_id, account_id, sort=sort, direction=direction,
                                          offset=window.offset, limit=window.per_page)

    async def messages(self, user_id: int, account_id: int, mailbox_id: int, *,
                       attachments_only: bool, direction: str,
                       window: Window) -> Page[MessageSummary]:
        name = await self._mailbox(user_id, account_id, mailbox_id)
        # By (account, folder name), unique per account and the same rows as the folder's
        # id: the store keeps the count of those and indexes them by date.
        return await self.store.list_messages(user_id, MessageQuery(
            account_id=account_id, folder=name,
            has_attachments=True if attachments_only else None,
            ordering="-date" if direction == "desc" else "date",
            offset=window.offset, limit=window.per_page,
        ))

    async def eml(self, user_id: int, account_id: int, mailbox_id: int,
                  row_id: int) -> StoredEml:
        """The message's stored bytes (their blob and size, to be read a chunk at a time),
        if it is in that mailbox of that account of the user's."""

        def txn(conn: Connection) -> StoredEml | None:
            row = conn.execute(_EML, {"row": row_id, "mailbox": mailbox_id,
                                      "account": account_id, "user": user_id}).first()
            return None if row is None else StoredEml(row.sha256, int(row.size))

        found = await self.db.read("backup_eml", txn)
        if found is None:
            raise NotFound()
        return found

    def eml_chunks(self, eml: StoredEml) -> AsyncIterator[bytes]:
        """The message's bytes a chunk at a time (mailcore.messages.store.raw_chunks), never
        whole; NotFound when they end short of its size (the account deleted meanwhile)."""

        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            async for piece in raw_chunks(self.db, eml.sha256, chunk_size=EML_CHUNK):
                sent += len(piece)
                yield piece
            if sent != eml.size:
                raise NotFound()

        return chunks()

    async def search(self, user_id: int, account_id: int, query: str,
                     window: Window) -> Page[MessageSummary]:
        await self._account(user_id, account_id)
        return await self.store.list_messages(user_id, MessageQuery(
            q=query, account_id=account_id, ordering="-date",
            offset=window.offset, limit=window.per_page,
        ))


@dataclass(frozen=True)
class Attachment:
    """An attachment as Dropmyemail lists it: the indexed part and libmagic's description."""

    summary: AttachmentSummary
    meta_data: str


@dataclass(frozen=True)
class AttachmentFile:
    """An attachment to send: its index entry and the raw message it is cut from. When the
    part decodes cleanly a slice at a time (`located`), `base64_chunks` encodes it from the
    raw bytes as it goes, so that only the message itself is held; otherwise `content` holds
    the bytes the email package cut out."""

    summary: AttachmentSummary
    raw: bytes
    located: parts.Located | None
    content: bytes | None

    @property
    def size(self) -> int:
        if self.located is not None:
            return self.located.size
        return len(self.content or b"")

    def base64_chunks(self) -> Iterator[bytes]:
        """The file, base64-encoded without line breaks, a slice at a time."""
        if self.located is not None:
            yield from parts.base64_chunks(self.raw, self.located.span)
            return
        content = self.content or b""
        step = parts.CHUNK
        for at in range(0, len(content), step):
            yield binascii.b2a_base64(content[at:at + step], newline=False)


def known_size(info: AttachmentSummary) -> int | None:
    """The size `BackupAttachments.open` sends of the attachment, known from its index entry
    without decoding the part: the size the email package decoded it to when the message
    was stored, which is what `open` sends (the part's slices are checked to decode to it,
    or the email package cuts it out as it did then). None for an attached message listed
    with size 0, which may be one nested too deep to write out (mailcore.messages.parse:
    "its size not known"), sent as its raw bytes."""
    if info.size == 0 and info.mime_type == "message/rfc822":
        return None
    return info.size


_SORT_KEYS = {"date": messages.c.date, "filename": message_attachments.c.filename,
              "sender": messages.c.sender}
_COLUMNS = (
    message_attachments.c.id, message_attachments.c.message_row_id, messages.c.account_id,
    message_attachments.c.part_path, message_attachments.c.filename,
    message_attachments.c.mime_type, message_attachments.c.size,
    message_attachments.c.content_id, messages.c.sender, messages.c.date,
    message_attachments.c.meta_data,
)
_JOIN = message_attachments.join(messages, messages.c.id == message_attachments.c.message_row_id)


def _summary(row: Any) -> AttachmentSummary:
    m = row._mapping
    return AttachmentSummary(
        id=m["id"], message_row_id=m["message_row_id"], account_id=m["account_id"],
        part_path=m["part_path"], filename=m["filename"], mime_type=m["mime_type"],
        size=int(m["size"]), content_id=m["content_id"], sender=m["sender"],
        date=utc(m["date"]),
    )


class BackupAttachments:
    """An account's attachments, read from the index (mailcore.backup.index): listed,
    searched by file name, type or libmagic's description, and read."""

    def __init__(self, mail: BackupMail) -> None:
        self.mail = mail
        self.store = mail.store
        self.index = mail.index

    async def list(self, user_id: int, account_id: int, *, query: str | None = None,
                   sort: str = "date", direction: str = "asc",
                   window: Window) -> Page[Attachment]:
        await self.mail._account(user_id, account_id)
        if sort not in _SORT_KEYS or direction not in ("asc", "desc"):
            raise ValueError(f"bad sort {sort!r} or direction {direction!r}")

        def txn(conn: Connection) -> tuple[int, list[tuple[AttachmentSummary, str | None]]]:
            conds: list[ColumnElement[bool]] = [messages.c.user_id == user_id,
                                                messages.c.account_id == account_id]
            if query:
                pattern = like_pattern(query)
                conds.append(or_(
                    ilike(conn, message_attachments.c.filename, pattern),
                    ilike(conn, message_attachments.c.mime_type, pattern),
                    ilike(conn, message_attachments.c.meta_data, pattern),
                ))
            total = conn.execute(select(func.count()).select_from(_JOIN).where(*conds)).scalar()
            key = _SORT_KEYS[sort]
            rows = conn.execute(
                select(*_COLUMNS).select_from(_JOIN).where(*conds)
                .order_by(key.desc() if direction == "desc" else key.asc(),
                          message_attachments.c.id)
                .offset(window.offset).limit(window.per_page)
            )
            return int(total or 0), [(_summary(r), r.meta_data) for r in rows]

        total, rows = await self.mail.db.read("backup_attachments", txn)
        missing = [s.id for s, meta in rows if meta is None]
        described = await self.index.describe(missing) if missing else {}
        return Page(count=total, items=[
            Attachment(s, meta if meta is not None else described.get(s.id, ""))
            for s, meta in rows])

    async def _file_row(self, user_id: int, account_id: int, attachment_id: int,
                        *, raw: bool) -> tuple[AttachmentSummary, bytes]:
        """The attachment's index entry and, with `raw`, the message it is cut from (b""
        without); NotFound when the account is not the user's or has no such attachment."""
        await self.mail._account(user_id, account_id)

        def txn(conn: Connection) -> tuple[AttachmentSummary, bytes] | None:
            row = conn.execute(
                select(*_COLUMNS, *((message_blobs.c.raw,) if raw else ()))
                .select_from(_JOIN.join(message_blobs,
                                        message_blobs.c.sha256 == messages.c.sha256))
                .where(messages.c.user_id == user_id, messages.c.account_id == account_id,
                       message_attachments.c.id == attachment_id)
            ).first()
            return None if row is None else (_summary(row), bytes(row.raw) if raw else b"")

        found = await self.mail.db.read("backup_attachment_file", txn)
        if found is None:
            raise NotFound()
        return found

    async def entry(self, user_id: int, account_id: int, attachment_id: int
                    ) -> AttachmentSummary:
        """The attachment's index entry, its message neither read nor decoded (what a HEAD
        answers from: `known_size`)."""
        info, _ = await self._file_row(user_id, account_id, attachment_id, raw=False)
        return info

    async def open(self, user_id: int, account_id: int, attachment_id: int) -> AttachmentFile:
        """The attachment `attachment_id` of that account, ready to send."""
        info, raw = await self._file_row(user_id, account_id, attachment_id, raw=True)
        limits = self.store.limits
        located = await self.store.cpu.run(parts.check, raw, info.part_path, info.size, limits)
        if located is not None:
            return AttachmentFile(info, raw, located, None)
        content = await self.store.cpu.run(extract_part, raw, info.part_path, limits)
        if content is None:
            raise NotFound()
        return AttachmentFile(info, b"", None, content)

"""The message store: raw messages by hash, parsed fields, attachments, threads and search."""

from mailcore.messages.models import (
    AccountUsage,
    AttachmentSummary,
    FetchedMessage,
    FolderInfo,
    Location,
    MessageDetail,
    MessageQuery,
    MessageSummary,
    Page,
    Statistics,
    StoreResult,
)
from mailcore.messages.parse import MimeLimits, ParsedMessage, parse_message
from mailcore.messages.store import ORDER_FIELDS, MessageNotFound, MessageStore, QueryError

__all__ = [
    "ORDER_FIELDS",
    "AccountUsage",
    "AttachmentSummary",
    "FetchedMessage",
    "FolderInfo",
    "Location",
    "MessageDetail",
    "MessageNotFound",
    "MessageQuery",
    "MessageStore",
    "MessageSummary",
    "MimeLimits",
    "Page",
    "ParsedMessage",
    "QueryError",
    "Statistics",
    "StoreResult",
    "parse_message",
]

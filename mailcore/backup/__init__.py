"""The mailbox-backup service Dropmyemail (seed 000) exposes: its accounts are fetch-engine
accounts (the same ones the IMAP2API shows as imap-servers, so one engine backs each
mailbox up once), with Dropmyemail's rules on top (accounts.py)."""

from mailcore.backup.accounts import (
    GOOGLE_REFUSAL,
    BackupAccount,
    BackupAccounts,
    BackupError,
    BackupSettings,
    derive_host,
)
from mailcore.backup.contacts import BackupContacts, Contact
from mailcore.backup.index import BackupIndex, BackupIndexer, describe
from mailcore.backup.mail import (
    MAX_PER_PAGE,
    Attachment,
    AttachmentFile,
    BackupAttachments,
    BackupMail,
    NotFound,
    Window,
    known_size,
)

__all__ = [
    "GOOGLE_REFUSAL",
    "MAX_PER_PAGE",
    "Attachment",
    "AttachmentFile",
    "BackupAccount",
    "BackupAccounts",
    "BackupAttachments",
    "BackupContacts",
    "BackupError",
    "BackupIndex",
    "BackupIndexer",
    "BackupMail",
    "BackupSettings",
    "Contact",
    "NotFound",
    "Window",
    "derive_host",
    "describe",
    "known_size",
]

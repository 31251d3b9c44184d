"""The Mail API's model (seed 002): hosted mailboxes with local delivery, drafts, a FIFO outbox
that sends through the queue, and shared mailboxes with access grants.

web/mailapi.py only translates the wire format; every rule lives here.
"""

from mailcore.mailapi.errors import CONFLICT, DENIED, INVALID, NOT_FOUND, QUOTA, MailApiError
from mailcore.mailapi.mailboxes import RIGHTS, Access, Grant, Mailbox, MailboxService, Rights

__all__ = [
    "CONFLICT",
    "DENIED",
    "INVALID",
    "NOT_FOUND",
    "QUOTA",
    "RIGHTS",
    "Access",
    "Grant",
    "MailApiError",
    "Mailbox",
    "MailboxService",
    "Rights",
]

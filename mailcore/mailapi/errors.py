"""What the Mail API's services refuse, and why (web/ picks the status from `kind`)."""

from __future__ import annotations

# The kinds of refusal: bad input, an object the caller may not see (or that does not
# exist: the same answer), a right the caller does not hold, a clash with what is stored, a
# write its mailbox has no room for (`[mailapi] mailbox_quota_bytes`).
INVALID = "invalid"
NOT_FOUND = "not_found"
DENIED = "denied"
CONFLICT = "conflict"
QUOTA = "quota"


class MailApiError(Exception):
    """An operation of the Mail API's model was refused; `field` names the offending input."""

    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

"""Errors of the fetch engine. Each carries a message fit to show the account's owner."""

from __future__ import annotations

# What an account or job shows for a failure of ours: the exception's own text may hold SQL
# with its parameters (a message's headers and body), so it goes only to the log.
INTERNAL_ERROR = "internal error; see the daemon's log"
# Why a sync or job of an account its owner deleted while it ran stopped.
ACCOUNT_DELETED = "the account was deleted"


class FetchError(Exception):
    """A sync of an account (or of one folder) failed; `str(e)` says why in one line."""


class ConnectFailed(FetchError):
    """The server could not be reached."""


class TLSFailed(FetchError):
    """TLS could not be set up or the server's certificate did not verify."""


class CleartextRefused(FetchError):
    """No TLS was available and the account does not allow sending the password in clear."""


class AuthFailed(FetchError):
    """The server refused the credentials."""


class ProtocolFailed(FetchError):
    """The server said something we cannot accept (malformed, refused, or over a bound)."""


class CommandRefused(ProtocolFailed):
    """The server answered a command NO or BAD (`status`)."""

    def __init__(self, message: str, status: str = "NO") -> None:
        super().__init__(message)
        self.status = status


class LiteralTooLarge(ProtocolFailed):
    """The server announced a literal over the configured bound; `uid` is the UID of the
    FETCH reply it belongs to, when that reply named its UID before the literal."""

    def __init__(self, message: str, uid: int | None = None) -> None:
        super().__init__(message)
        self.uid = uid


class FetchTimeout(FetchError):
    """The server stopped answering."""


class CommandTimeout(FetchTimeout):
    """The server answered no command for the command deadline, whatever else it sent."""


class AccountError(Exception):
    """An account operation was refused; `field` names the offending input, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class MailboxTaken(Exception):
    """An account of the user already backs up that mailbox (host, port, user): account
    `account_id` (`mailcore.fetch.accounts.thd_same_mailbox`)."""

    def __init__(self, account_id: int, host: str, port: int, username: str) -> None:
        self.message = (f"The mailbox of {username} on {host}:{port} is already backed up "
                        f"as account {account_id}; change that account instead of adding "
                        "the mailbox again (it would be backed up twice).")
        super().__init__(self.message)
        self.account_id = account_id


class AccountNotFound(AccountError):
    """No such account for this user."""

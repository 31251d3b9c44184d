"""What the SMTP server hands the spool: the envelope of one accepted message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipient:
    """One RCPT: the address as given (str) and the served domain it belongs to (None for
    a recipient outside the served domains, such as the sender a bounce goes back to)."""

    address: str
    domain_id: int | None


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope. `mail_from` is "" for the null sender `<>`."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    client_ip: str = ""
    helo: str = ""
    tls: bool = False
    kind: str = "relay"  # relay | bounce | digest | release | outbox | notification

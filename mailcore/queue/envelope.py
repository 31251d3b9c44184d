"""What the SMTP server hands the spool: the envelope of one accepted message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT: the address as given (str) and the served domain it belongs to."""

    address: str
    domain_id: int


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope. `mail_from` is "" for the null sender `<>`."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    client_ip: str = ""
    helo: str = ""
    tls: bool = False
    kind: str = "relay"  # relay | bounce | digest | release | outbox | notification

"""What a drop is made of: bundles, recipients, files, the settings, and the errors.

`email_receipt_when` (seed default 4) says which read receipts the sender gets; reply
notifications and expiry summaries are sent whatever its value:

| value | read receipts |
|---|---|
| 0 | never |
| 1 | each time a recipient opens the drop (at most once an hour each; a HEAD is none) |
| 2 | the first time each recipient opens the drop |
| 3 | each time a recipient downloads a file |
| 4 | once, when every recipient has downloaded every file (default) |
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, is_positive_number, refuse_unknown
from mailcore.emailpolicy import header_as_written, header_breaks
from mailcore.mailapi.addresses import normalise_address
from mailcore.mailapi.errors import MailApiError
from mailcore.smtp.address import PathError, parse_rcpt_to, relay_refusal
from mailcore.text import CONTROL_CHARACTER

RECEIPT_VALUES = (0, 1, 2, 3, 4)
DEFAULT_RECEIPT_WHEN = 4
# International dialling format without "+": E.164 allows at most 15 digits.
TELEPHONE = re.compile(r"[1-9][0-9]{6,14}")
MAX_TEXT = 100_000  # subject, message and secure message, in characters
MAX_FILENAME = 255
# A recipient's `valid_for` (seconds of access after sending; deprecated by the seed in favour
# of the bundle's expiry_date). Ten years of 365 days is longer than any drop is meant to
# last, and keeps "sent + valid_for" a date (datetime ends at year 9999).
MAX_VALID_FOR = 10 * 365 * 24 * 3600
GIB = 1024**3


class DropError(Exception):
    """Bad input for a drop: `field` names what was wrong (None: the drop as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class DropNotFound(Exception):
    """No such bundle, recipient or file for this user (another user's counts as none)."""


class DropSent(Exception):
    """The bundle has been sent: it can no longer be changed."""


class TooLarge(DropError):
    """An upload over `[safedrop] max_file_size` or the bundle's total."""


def bundle_full() -> TooLarge:
    """The 413 of an upload that would take a bundle's files past `[safedrop]
    max_bundle_size`."""
    return TooLarge("the_file", "The bundle's files would exceed the total allowed size.")


@dataclass(frozen=True)
class Bundle:
    id: int
    owner_id: int
    subject: str
    message: str
    has_secure_message: bool
    has_password: bool
    expiry_date: datetime.datetime | None
    email_receipt_when: int
    read_remove: bool
    allow_comments: bool
    require_token_auth: bool
    created_at: datetime.datetime
    sent_at: datetime.datetime | None
    removed_at: datetime.datetime | None


@dataclass(frozen=True)
class DropRecipient:
    id: int
    bundle_id: int
    email: str
    telephone: str
    valid_for: int
    expires_at: datetime.datetime | None
    done_at: datetime.datetime | None


@dataclass(frozen=True)
class DropFile:
    id: int
    bundle_id: int
    name: str
    content_type: str
    size: int
    sha256: str
    created_at: datetime.datetime


def check_email(value: str) -> str:
    """A recipient address as the queue would take it and the Mail API would send to
    (normalise_address: a dot-atom local part, a fully qualified domain, so no `localhost`
    nor any other single label), or DropError("email")."""
    text = value.strip()
    try:
        mailbox, _ = parse_rcpt_to(f"TO:<{text}>")
    except PathError as e:
        raise DropError("email", f"Enter a valid email address ({e.text}).") from None
    if not mailbox.domain or relay_refusal(mailbox) is not None:
        raise DropError("email", "Enter a valid email address.")
    try:
        normalise_address(str(mailbox))
    except MailApiError:
        raise DropError("email", "Enter a valid email address (a fully qualified domain, "
                        "a dot-atom local part).") from None
    if not header_as_written("To", str(mailbox)):
        # A local part spelling an RFC 2047 word: the notification's To field would show
        # what it decodes to, or (a line break) could not be written, failing the send.
        raise DropError("email", "Enter a valid email address.")
    return str(mailbox)


def check_subject(value: str) -> str:
    """A bundle's subject (one line, no control character: the web layer checks that), or
    DropError("subject") when its RFC 2047 encoded words decode to a control character,
    as a raw one is refused: every mail of the drop would leave it out of its Subject."""
    if header_breaks("Subject", value):
        raise DropError("subject", CONTROL_CHARACTER)
    return value


def check_expiry(value: datetime.datetime | None, now: datetime.datetime
                 ) -> datetime.datetime | None:
    """A bundle's expiry date (None: never) if it is still to come at `now`, or
    DropError("expiry_date"): a drop past it is never sent, and one never sent is deleted
    once past it (`[safedrop] sweep_interval`)."""
    if value is not None and value <= now:
        raise DropError("expiry_date", "The expiry date has passed.")
    return value


def check_telephone(value: str) -> str:
    """International digits without "+" ("" for none), or DropError("telephone")."""
    text = value.strip()
    if text and not TELEPHONE.fullmatch(text):
        raise DropError(
            "telephone",
            "Enter the number in international format without '+' (7 to 15 digits, "
            "for example 442077394252).",
        )
    return text


@dataclass(frozen=True)
class SafedropSettings:
    """The `[safedrop]` table.

    ```toml
    [safedrop]
    max_file_size = 2147483648    # bytes per uploaded file (2 GiB)
    max_bundle_size = 10737418240 # bytes of all files of one bundle (10 GiB)
    link_hostname = ""            # host of recipients' links; "" = hostname
    notify_from = ""              # From of notifications; "" = safedrop@{hostname}
    sweep_interval = 300          # seconds between expiry sweeps
    sms_gateway = ""              # URL taking a form POST (to, text); "" = codes by mail
    unsent_max_age = 2592000      # seconds an unsent bundle is kept (30 days), then deleted
    max_user_size = 53687091200   # bytes of all files a user keeps, all bundles (50 GiB)
    max_recipients = 100          # recipients of one bundle (its send queues one mail each)
    max_files = 1000              # files of one bundle (each mail of its send lists them all)
    max_bundles_per_user = 10000  # bundles one user has not yet sent; 400 beyond; 0: no limit
    max_concurrent_uploads = 4    # uploads one user has under way at once (per node); 429 beyond
    max_download_attempts = 3     # downloads of a read_remove file a recipient may start
    max_sms_per_user_per_day = 200  # code texts for one user's drops a day; 0: no cap
    max_sms_per_link_per_day = 10   # code texts for one recipient's link a day; 0: no cap
    ```
    """

    max_file_size: int = 2 * GIB
    max_bundle_size: int = 10 * GIB
    link_hostname: str = ""
    notify_from: str = ""
    sweep_interval: float = 300.0
    sms_gateway: str = ""
    unsent_max_age: float = 30 * 86400.0
    max_user_size: int = 50 * GIB
    max_recipients: int = 100
    max_files: int = 1000
    max_bundles_per_user: int = 10_000
    max_concurrent_uploads: int = 4
    max_download_attempts: int = 3
    max_sms_per_user_per_day: int = 200
    max_sms_per_link_per_day: int = 10

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> SafedropSettings:
        refuse_unknown("safedrop", section, cls)
        values: dict[str, Any] = {}
        for key in ("max_file_size", "max_bundle_size", "max_user_size"):
            if key in section:
                v = section[key]
                if not is_positive_number(v, integer=True):
                    raise ConfigError(f"[safedrop] {key} must be a positive number of bytes")
                values[key] = v
        for key in ("sweep_interval", "unsent_max_age"):
            if key in section:
                v = section[key]
                if not is_positive_number(v):
                    raise ConfigError(f"[safedrop] {key} must be a positive number of seconds")
                values[key] = float(v)
        for key in ("max_recipients", "max_files", "max_concurrent_uploads",
                    "max_download_attempts"):
            if key in section:
                v = section[key]
                if not is_positive_number(v, integer=True) or v > 100_000:
                    raise ConfigError(f"[safedrop] {key} must be a whole number from 1 to "
                                      "100000")
                values[key] = v
        for key in ("max_bundles_per_user", "max_sms_per_user_per_day",
                    "max_sms_per_link_per_day"):
            if key in section:
                v = section[key]
                if not is_positive_number(v, zero_ok=True, integer=True) or v > 100_000:
                    raise ConfigError(f"[safedrop] {key} must be a whole number from 0 "
                                      "(no limit) to 100000")
                values[key] = v
        for key in ("link_hostname", "notify_from", "sms_gateway"):
            if key in section:
                v = section[key]
                if not isinstance(v, str) or any(c in v for c in "\r\n\0"):
                    raise ConfigError(f"[safedrop] {key} must be a one-line string")
                values[key] = v.strip()
        gateway = values.get("sms_gateway", "")
        if gateway and not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", gateway):
            raise ConfigError("[safedrop] sms_gateway must be an http:// or https:// URL")
        return cls(**values)

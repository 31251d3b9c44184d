"""The `[mailapi]` table.

```toml
[mailapi]
require_api_key = false          # true: every /api/v1/auth/ call needs an api_key
max_attachment_bytes = 26214400  # bytes per attachment of a mail (25 MiB)
max_message_bytes = 26214400     # bytes of all the attachments of one mail (25 MiB)
file_sweep_interval = 3600       # seconds between sweeps of files no mail names any more
mailbox_quota_bytes = 1073741824 # bytes a mailbox's mail may take (1 GiB); 0: no limit
max_drafts_per_mailbox = 10000   # drafts a mailbox may hold; 0: no limit
```

An upload over either limit is refused with 413 and leaves nothing stored; so is one
that would take a draft's attachments (those it keeps and those added) over
`max_message_bytes` or 256 files. The HTTP body of
a POST or PUT to `/api/v1/mail/…` may be `max_message_bytes` plus 1 MiB (the multipart
framing and the text fields), whatever `[web] max_body` says.

`mailbox_quota_bytes` bounds what the mail of one mailbox takes (mailcore.mailapi.counts: a
mail's text fields, attachments and message as sent or received), unless the operator set
that mailbox's own quota (`mailcore mailbox quota`: `mailboxes.quota_bytes`, 0 for no
limit). A draft or upload that
would pass it is refused (507, nothing stored); mail for a mailbox without room for it is
refused at RCPT (552 5.2.2, RFC 3463 "mailbox full": mailcore.mailapi.room) or, when it did
not fit after all, bounces 5.2.2; sending a draft is never refused for the message it builds
(the mailbox may then pass its quota by that message, and takes no new mail until it is
back under).

`max_drafts_per_mailbox` bounds the drafts of one mailbox: an empty draft takes no byte of
its quota. A new mail that stays a draft (asked for as one, or not sendable) in a mailbox
that holds that many drafts is refused as a full one is (507, nothing stored); a new mail
sent at once, and an edit of a draft, add no draft and are never refused by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, is_positive_number, refuse_unknown


@dataclass(frozen=True)
class MailApiSettings:
    require_api_key: bool = False
    max_attachment_bytes: int = 25 * 1024 * 1024
    max_message_bytes: int = 25 * 1024 * 1024
    file_sweep_interval: float = 3600.0
    # None: no limit (0 in the file).
    mailbox_quota_bytes: int | None = 1024 * 1024 * 1024
    # None: no limit (0 in the file).
    max_drafts_per_mailbox: int | None = 10_000

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> MailApiSettings:
        refuse_unknown("mailapi", section, cls)
        values: dict[str, Any] = {}
        if "require_api_key" in section:
            if not isinstance(section["require_api_key"], bool):
                raise ConfigError("[mailapi] require_api_key must be true or false")
            values["require_api_key"] = section["require_api_key"]
        for key in ("max_attachment_bytes", "max_message_bytes"):
            if key in section:
                v = section[key]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise ConfigError(f"[mailapi] {key} must be a positive number of bytes")
                values[key] = v
        if "mailbox_quota_bytes" in section:
            v = section["mailbox_quota_bytes"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError("[mailapi] mailbox_quota_bytes must be a number of bytes "
                                  "(0: no limit)")
            values["mailbox_quota_bytes"] = v or None
        if "max_drafts_per_mailbox" in section:
            v = section["max_drafts_per_mailbox"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError("[mailapi] max_drafts_per_mailbox must be a whole number "
                                  "(0: no limit)")
            values["max_drafts_per_mailbox"] = v or None
        if "file_sweep_interval" in section:
            v = section["file_sweep_interval"]
            if not is_positive_number(v):
                raise ConfigError("[mailapi] file_sweep_interval must be a positive number "
                                  "of seconds")
            values["file_sweep_interval"] = float(v)
        return cls(**values)

"""The `[mailapi]` table.

```toml
[mailapi]
require_api_key = false          # true: every /api/v1/auth/ call needs an api_key
max_attachment_bytes = 10485760  # bytes per attachment of a mail (10 MiB)
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError


@dataclass(frozen=True)
class MailApiSettings:
    require_api_key: bool = False
    max_attachment_bytes: int = 10 * 1024 * 1024

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> MailApiSettings:
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"[mailapi] unknown key: {unknown[0]}")
        values: dict[str, Any] = {}
        if "require_api_key" in section:
            if not isinstance(section["require_api_key"], bool):
                raise ConfigError("[mailapi] require_api_key must be true or false")
            values["require_api_key"] = section["require_api_key"]
        if "max_attachment_bytes" in section:
            v = section["max_attachment_bytes"]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError("[mailapi] max_attachment_bytes must be a positive number "
                                  "of bytes")
            values["max_attachment_bytes"] = v
        return cls(**values)

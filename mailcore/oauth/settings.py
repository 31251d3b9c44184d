"""The `[oauth]` table: how long the provider's access tokens live.

```toml
[oauth]
access_token_ttl = 7200   # seconds; the seed's token reply says expires_in: 7200
```

Authorization codes live 5 minutes (seed 000 says so) and are not configurable; refresh
tokens do not expire, but each is good for one refresh (it is rotated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, unknown_key

CODE_TTL = 300


@dataclass(frozen=True)
class OAuthSettings:
    access_token_ttl: int = 7200

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> OAuthSettings:
        """Settings from `[oauth]`; an unknown key or a bad value raises ConfigError."""
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key != "access_token_ttl":
                raise unknown_key("oauth", key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError("[oauth] access_token_ttl must be a positive integer")
            values[key] = value
        return cls(**values)

"""The `[oauth]` table: how long the provider's access tokens live, and how long a revoked
token's row is kept.

```toml
[oauth]
access_token_ttl = 7200   # seconds; the seed's token reply says expires_in: 7200
revoked_token_days = 30   # days a rotated or revoked token's row is kept (replay detection)
max_apps_per_user = 20    # apps a user may own (the Applications page and the CLI refuse one more)
max_grants_per_user_app = 100  # live grants (token families) a user keeps per app
```

Authorization codes live 5 minutes (seed 000 says so) and are not configurable; refresh
tokens do not expire, but each is good for one refresh (it is rotated). A rotated refresh
token presented again revokes its family (RFC 9700 4.14.2) for `revoked_token_days` after
its rotation; then its row is deleted (mailcore.oauth.provider.OAuthPruner) and it is only
invalid_grant. A code is deleted a day after it expired once no token row names it.

Each code exchanged starts a grant (a family of tokens that lives as long as its refresh
token is used); a user keeps `max_grants_per_user_app` live ones per app: exchanging a code
for one more deletes those used longest ago (mailcore.oauth.validator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, unknown_key

CODE_TTL = 300
# How long past its expiry an authorization code's row is kept (once no token names it).
CODE_RETENTION = 86400.0


@dataclass(frozen=True)
class OAuthSettings:
    access_token_ttl: int = 7200
    revoked_token_days: int = 30
    max_apps_per_user: int = 20
    max_grants_per_user_app: int = 100

    @property
    def revoked_token_retention(self) -> float:
        """`revoked_token_days` in seconds."""
        return self.revoked_token_days * 86400.0

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> OAuthSettings:
        """Settings from `[oauth]`; an unknown key or a bad value raises ConfigError."""
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in ("access_token_ttl", "revoked_token_days", "max_apps_per_user",
                           "max_grants_per_user_app"):
                raise unknown_key("oauth", key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"[oauth] {key} must be a positive integer")
            values[key] = value
        return cls(**values)

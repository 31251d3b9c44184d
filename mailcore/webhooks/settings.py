"""The `[webhooks]` table, and the address policy that says where deliveries may go.

Where deliveries may go is the operator's decision (`[webhooks]`): http and https only; no
loopback, private, link-local or otherwise non-global address unless allowed; the check runs
on the URL when it is saved and again on every address the host name resolves to when a
delivery connects (so DNS cannot point a saved name at a forbidden address later).

```toml
[webhooks]
allow_loopback = false       # 127.0.0.0/8 and ::1 (tests and single-host setups)
allow_private = false        # RFC 1918, CGNAT, ULA, link-local and other non-global ranges
allow_networks = []          # CIDRs allowed even if private ("10.1.2.0/24")
deny_networks = []           # CIDRs refused whatever else says
max_attempts = 8
backoff_base = 30            # seconds before the 2nd attempt; doubles each time
backoff_max = 3600
timeout = 10                 # seconds per attempt, all in all (connect, send, read the answer)
concurrency = 4              # attempts in flight at once, in all
per_webhook = 2              # ... and to one webhook (a dead receiver holds no more)
per_user = 3                 # ... and to one user's webhooks (room is left for the others)
poll_interval = 5
retention_days = 30          # finished deliveries are pruned after this long
max_per_user = 20
```
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mailcore import netpolicy
from mailcore.backoff import doubling
from mailcore.config import ConfigError, is_positive_number, unknown_key
from mailcore.netpolicy import IPNetwork, parse_networks
from mailcore.webhooks.model import WebhookError

MAX_URL_LENGTH = 2048
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class WebhookSettings:
    """The `[webhooks]` table (see the module docstring)."""

    allow_loopback: bool = False
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    max_attempts: int = 8
    backoff_base: float = 30.0
    backoff_max: float = 3600.0
    timeout: float = 10.0
    concurrency: int = 4
    per_webhook: int = 2
    per_user: int = 3
    poll_interval: float = 5.0
    retention_days: float = 30.0
    max_per_user: int = 20

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> WebhookSettings:
        """Settings from `[webhooks]`; a bad value raises ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise unknown_key("webhooks", key)
            default = getattr(cls, key)
            if key in ("allow_networks", "deny_networks"):
                values[key] = parse_networks("webhooks", key, value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"[webhooks] {key} must be true or false")
                values[key] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"[webhooks] {key} must be a positive integer")
                values[key] = value
            else:
                if not is_positive_number(value):
                    raise ConfigError(f"[webhooks] {key} must be a positive number")
                values[key] = float(value)
        return cls(**values)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        return doubling(attempts, self.backoff_base, self.backoff_max)


class AddressPolicy(netpolicy.AddressPolicy):
    """The operator's network policy (mailcore.netpolicy) plus the check of a webhook URL
    when it is saved."""

    def check_url(self, url: Any) -> str:
        """The URL, normalised, if deliveries may go there; else WebhookError("url")."""
        if not isinstance(url, str) or not url.strip():
            raise WebhookError("Enter a valid URL.", "url")
        text = url.strip()
        if len(text) > MAX_URL_LENGTH:
            raise WebhookError(
                f"Ensure this field has no more than {MAX_URL_LENGTH} characters.", "url"
            )
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
            raise WebhookError("Enter a valid URL.", "url")
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise WebhookError("Enter a valid URL: the scheme must be http or https.", "url")
        if parts.username is not None or parts.password is not None:
            raise WebhookError("A webhook URL must not carry a user name or password.", "url")
        try:
            port = parts.port
        except ValueError:
            raise WebhookError("Enter a valid URL: the port is not valid.", "url") from None
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise WebhookError("Enter a valid URL: it has no host.", "url")
        netloc = self._check_host(host)
        if port is not None:
            if port == 0:
                raise WebhookError("Enter a valid URL: the port is not valid.", "url")
            netloc += f":{port}"
        return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))

    def _check_host(self, host: str) -> str:
        """The host as it goes in the URL, if allowed."""
        refused = WebhookError("This server does not send webhooks to that address.", "url")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if not self.allows(ip):
                raise refused
            return f"[{ip}]" if ip.version == 6 else str(ip)
        try:
            name = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url") from None
        labels = name.split(".")
        if not all(_LABEL.match(label) for label in labels) or len(name) > 253:
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url")
        # A numeric last label is an address in disguise (2130706433, 0x7f.1), never a name.
        if labels[-1].isdigit() or labels[-1].startswith("0x"):
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url")
        if name == "localhost" or name.endswith(".localhost"):
            if not self.allows("127.0.0.1"):
                raise refused
        return name

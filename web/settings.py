"""HTTP settings: the Config's HTTP fields and the optional `[web]` table of the TOML file.

```toml
[web]
json_max_body = 1048576          # largest body (JSON, form or multipart) of every path but
                                 # the upload paths, which take http_max_body or more
login_rate = "100/hour"          # password logins per client address (0 turns it off)
login_failure_rate = "20/hour"   # failed password logins per account name from one
                                 # client address (0 turns it off)
login_account_failure_rate = "100/hour"  # ... per account name from all addresses
                                 # together, except those that logged in to it in the
                                 # last 30 days (0 turns it off)
imap2api_user_rate = "1000/hour" # IMAP2API requests per user
imap2api_anonymous_rate = "100/hour"
dropmyemail_token_rate = "20/second"
oauth_token_rate = "20/2s"       # POST /oauth/token per client (its client_id and the
                                 # secret it presents): 20 at once, then 10 a second
oauth_client_failure_rate = "100/hour"  # failed client authentications at /oauth/token
                                 # and /oauth/revoke per client address (0 turns it off)
protecmail_user_rate = "20/second"  # Protecmail requests per user (all its API keys)
mailapi_user_rate = "20/second"     # Mail API requests per user
safedrop_user_rate = "20/second"    # safedrop requests per user
bad_credential_rate = "100/hour" # Protecmail, Mail API, safedrop requests with a missing or
                                 # bad credential, per client address, the three together
metrics = true                   # serve GET /metrics
metrics_allow = ["127.0.0.0/8", "::1/128"]    # client networks allowed (the default;
                                 # [] serves every client)
idle_timeout = 60                # seconds an idle (keep-alive) HTTP connection stays open,
                                 # and a client may read nothing of a reply sent to it
header_timeout = 30              # seconds from a request's first byte to its last header
body_timeout = 300               # seconds from a request's headers to the end of its body
max_connections = 500            # open HTTP connections in total (more: 503, Retry-After)
max_connections_per_ip = 50      # ... from one client address (a trusted proxy's
                                 # connections count against max_connections only)
trusted_proxies = []             # reverse proxies whose X-Forwarded-For and
                                 # X-Forwarded-Proto are believed (networks; see
                                 # web.forwarded)
cors_origins = []                # IMAP2API origins allowed by CORS ("*": any; [] none)
imap2api_sync_wait = 25          # seconds POST .../sync/ waits before answering 202
reply_timeout = 120              # seconds a request may wait for its reply to begin (on a
                                 # database that does not answer); then 503, Retry-After
                                 # (web.deadline; a write may still land after it)
```
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailcore.config import Config, ConfigError, is_positive_number, unknown_key
from web.ratelimit import Rate

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEYS = {
    "json_max_body",
    "login_rate",
    "login_failure_rate",
    "login_account_failure_rate",
    "imap2api_user_rate",
    "imap2api_anonymous_rate",
    "dropmyemail_token_rate",
    "oauth_token_rate",
    "oauth_client_failure_rate",
    "protecmail_user_rate",
    "mailapi_user_rate",
    "safedrop_user_rate",
    "bad_credential_rate",
    "metrics",
    "metrics_allow",
    "idle_timeout",
    "header_timeout",
    "body_timeout",
    "max_connections",
    "max_connections_per_ip",
    "cors_origins",
    "imap2api_sync_wait",
    "trusted_proxies",
    "reply_timeout",
}


# Defaults (module constants: a frozen Rate is safe to share).
LOGIN_RATE = Rate(100, 3600)
# Failed password logins per account name from one client address: that address is refused
# for that account, and only it, so sending wrong passwords cannot lock the owner out from
# elsewhere. Only failures count, so a script that logs in for every run is never refused.
LOGIN_FAILURE_RATE = Rate(20, 3600)
# Failed password logins per account name from all addresses together: many addresses (a
# botnet, an IPv6 network's /64s) must not multiply the guesses at one password. Addresses
# that logged in to the account lately are not refused by it (web.login).
LOGIN_ACCOUNT_FAILURE_RATE = Rate(100, 3600)
IMAP2API_USER_RATE = Rate(1000, 3600)
IMAP2API_ANONYMOUS_RATE = Rate(100, 3600)
DROPMYEMAIL_TOKEN_RATE = Rate(20, 1)
# POST /oauth/token per client: a burst of 20, then 10 a second. Every code exchange and
# every refresh stores a token row (kept for replay detection, see mailcore.oauth.provider's
# pruning), so a client refreshing in a loop must not write as fast as it can ask.
OAUTH_TOKEN_RATE = Rate(20, 2)
# Failed client authentications (a wrong client secret) at /oauth/token and /oauth/revoke
# per client address, whatever client they name: oauth_token_rate counts each guessed
# secret apart, so without this one address could guess a client's secret as fast as it
# asked. Once spent, the address is refused before its secret is checked (a right guess
# past the budget is told nothing), as many requests as IMAP2API allows anonymous clients.
OAUTH_CLIENT_FAILURE_RATE = Rate(100, 3600)
# Protecmail, the Mail API and safedrop: a burst of 20, then 20 a second, per user. The rate
# Dropmyemail's seed states for its own API; far above what a person at a client makes, and
# enough for a provisioning script (10,000 addresses in under 9 minutes), while one key can
# no longer make the gateway reload its domain snapshot thousands of times at once. A
# script paced by the 429's Retry-After loses nothing.
PROTECMAIL_USER_RATE = Rate(20, 1)
MAILAPI_USER_RATE = Rate(20, 1)
SAFEDROP_USER_RATE = Rate(20, 1)
# Requests to those three APIs whose credential is missing or not live, per client address:
# as many as IMAP2API allows anonymous clients. One budget for the three, because one API key
# opens Protecmail (`Api-Key`), safedrop (`X-Auth-Key`) and the Mail API's `api_key` check
# alike: spreading guesses over them buys nothing.
BAD_CREDENTIAL_RATE = Rate(100, 3600)


@dataclass(frozen=True)
class WebSettings:
    """Everything the web layer reads from the configuration, checked once."""

    max_body: int = 25 * 1024 * 1024
    json_max_body: int = 1024 * 1024
    session_token_ttl: int = 3600
    login_rate: Rate | None = LOGIN_RATE
    login_failure_rate: Rate | None = LOGIN_FAILURE_RATE
    login_account_failure_rate: Rate | None = LOGIN_ACCOUNT_FAILURE_RATE
    imap2api_user_rate: Rate = IMAP2API_USER_RATE
    imap2api_anonymous_rate: Rate = IMAP2API_ANONYMOUS_RATE
    dropmyemail_token_rate: Rate = DROPMYEMAIL_TOKEN_RATE
    oauth_token_rate: Rate = OAUTH_TOKEN_RATE
    oauth_client_failure_rate: Rate | None = OAUTH_CLIENT_FAILURE_RATE
    protecmail_user_rate: Rate = PROTECMAIL_USER_RATE
    mailapi_user_rate: Rate = MAILAPI_USER_RATE
    safedrop_user_rate: Rate = SAFEDROP_USER_RATE
    bad_credential_rate: Rate = BAD_CREDENTIAL_RATE
    metrics: bool = True
    # Loopback by default: /metrics has no credential, and a listener on a public address
    # would show anyone the queue and traffic figures. `[]` serves every client.
    metrics_allow: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    body_timeout: float = 300.0
    max_connections: int = 500
    max_connections_per_ip: int = 50
    cors_origins: tuple[str, ...] = ()
    imap2api_sync_wait: float = 25.0
    # A reply not begun this long after its request reached its app is a 503 (web.deadline).
    reply_timeout: float = 120.0
    # Reverse proxies whose forwarding headers tell the client's address and scheme
    # (web.forwarded). None by default: any client can send those headers.
    trusted_proxies: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> WebSettings:
        """Settings from a Config; a bad `[web]` value raises ConfigError naming it."""
        table = config.section("web")
        unknown = set(table) - _KEYS
        if unknown:
            raise unknown_key("web", sorted(unknown)[0])
        defaults = cls()
        json_max = _int(table, "json_max_body", defaults.json_max_body)
        return cls(
            max_body=config.http_max_body,
            json_max_body=min(json_max, config.http_max_body),
            session_token_ttl=config.session_token_ttl,
            login_rate=_rate(table, "login_rate", defaults.login_rate, allow_off=True),
            login_failure_rate=_rate(
                table, "login_failure_rate", defaults.login_failure_rate, allow_off=True
            ),
            login_account_failure_rate=_rate(
                table, "login_account_failure_rate", defaults.login_account_failure_rate,
                allow_off=True,
            ),
            imap2api_user_rate=_rate(table, "imap2api_user_rate", defaults.imap2api_user_rate),
            imap2api_anonymous_rate=_rate(
                table, "imap2api_anonymous_rate", defaults.imap2api_anonymous_rate
            ),
            dropmyemail_token_rate=_rate(
                table, "dropmyemail_token_rate", defaults.dropmyemail_token_rate
            ),
            oauth_token_rate=_rate(table, "oauth_token_rate", defaults.oauth_token_rate),
            oauth_client_failure_rate=_rate(
                table, "oauth_client_failure_rate", defaults.oauth_client_failure_rate,
                allow_off=True,
            ),
            protecmail_user_rate=_rate(
                table, "protecmail_user_rate", defaults.protecmail_user_rate
            ),
            mailapi_user_rate=_rate(table, "mailapi_user_rate", defaults.mailapi_user_rate),
            safedrop_user_rate=_rate(table, "safedrop_user_rate", defaults.safedrop_user_rate),
            bad_credential_rate=_rate(
                table, "bad_credential_rate", defaults.bad_credential_rate
            ),
            metrics=_bool(table, "metrics", defaults.metrics),
            metrics_allow=(_networks(table, "metrics_allow") if "metrics_allow" in table
                           else defaults.metrics_allow),
            idle_timeout=float(_int(table, "idle_timeout", int(defaults.idle_timeout))),
            header_timeout=float(
                _int(table, "header_timeout", int(defaults.header_timeout))
            ),
            body_timeout=float(_int(table, "body_timeout", int(defaults.body_timeout))),
            max_connections=_int(table, "max_connections", defaults.max_connections),
            max_connections_per_ip=_int(
                table, "max_connections_per_ip", defaults.max_connections_per_ip
            ),
            cors_origins=_origins(table.get("cors_origins", [])),
            imap2api_sync_wait=float(
                _int(table, "imap2api_sync_wait", int(defaults.imap2api_sync_wait))
            ),
            trusted_proxies=_networks(table, "trusted_proxies"),
            reply_timeout=_seconds(table, "reply_timeout", defaults.reply_timeout),
        )

    def metrics_allowed(self, host: str | None) -> bool:
        """Whether a client at `host` may read /metrics."""
        if not self.metrics:
            return False
        if not self.metrics_allow:  # []: every client
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return any(address in network for network in self.metrics_allow)


def _int(table: dict[str, Any], key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"[web] {key} must be a positive integer")
    return value


def _seconds(table: dict[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if not is_positive_number(value):
        raise ConfigError(f"[web] {key} must be a positive number")
    return float(value)


def _bool(table: dict[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"[web] {key} must be true or false")
    return value


def _rate(
    table: dict[str, Any], key: str, default: Any, *, allow_off: bool = False
) -> Any:
    if key not in table:
        return default
    value = table[key]
    if allow_off and (value == 0 or value == "0" or value is False):
        return None
    if not isinstance(value, str):
        raise ConfigError(f'[web] {key} must be a rate such as "100/hour"')
    try:
        return Rate.parse(value)
    except ValueError as e:
        raise ConfigError(f"[web] {key}: {e}") from None


def _networks(table: dict[str, Any], key: str) -> tuple[IPNetwork, ...]:
    values = table.get(key, [])
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"[web] {key} must be a list of networks")
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as e:
        raise ConfigError(f"[web] {key}: {e}") from None


def _origins(values: Any) -> tuple[str, ...]:
    """CORS origins: "*" or scheme://host[:port] each, compared lower-case."""
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise ConfigError("[web] cors_origins must be a list of origins")
    out = []
    for value in values:
        origin = value.strip().rstrip("/").lower()
        if origin != "*" and not re.match(r"^https?://[^/?#\s]+$", origin):
            raise ConfigError(f"[web] cors_origins: not an origin: {value!r}")
        out.append(origin)
    return tuple(out)

"""Queue settings: the `[queue]` table of the TOML file, with Postfix-like defaults.

Every key, with its default (times in seconds, sizes in octets):

```toml
[queue]
# Retries (RFC 5321 4.5.4.1; Postfix's minimal/maximal_backoff_time, maximal_queue_lifetime)
min_backoff = 300.0          # first wait after a temporary failure, doubling from there ...
max_backoff = 4000.0         # ... up to this
lifetime = 432000.0          # 5 days: then the mail bounces
# Leases (nodes sharing a store claim recipients row by row)
lease_seconds = 120.0        # a claim's length; renewed every third of it
poll_interval = 5.0          # how often the sweeper claims due work and prunes the log
node_id = ""                 # this node's name in leases [default: host name and data dir]
# Delivery
hop_concurrency = 10         # connections to one next hop at once
max_connections = 100        # connections to next hops open or opening, all hops together
messages_per_connection = 100  # messages sent over one connection before it QUITs
connection_idle = 2.0        # an idle connection to a next hop is kept this long (0: not)
connect_timeout = 30.0       # to connect to a next hop
command_timeout = 300.0      # for each other reply of a next hop (its greeting too; the
                             # reply to QUIT is awaited 10 s at most)
data_timeout = 600.0         # to send a message's data and read the reply to its end
dead_hop_seconds = 60.0      # a hop that cannot be reached is not tried again for this long
                             # (at most min_backoff)
stop_grace = 10.0            # at stop, deliveries under way get this long to end
# Memory and group commits
max_in_memory = 10000        # recipients the runner holds at once
body_cache_bytes = 67108864  # message bodies kept in memory from accept to send (0: none)
max_send_memory = 1073741824  # octets of bodies delivery attempts hold, all together: past
                              # it an attempt waits, unconnected, for another to end (one
                              # always goes)
batch_max_messages = 256     # messages accepted in one group commit, at most ...
batch_max_bytes = 16777216   # ... and their bytes
# Routing and TLS
relayhost = ""               # host[:port] for mail to domains not served (bounces, Mail API,
                             # safedrop mail) [default: the recipient domain's MX]
tls = "verify-if-offered"    # outbound STARTTLS: none, may, verify-if-offered, verify
tls_ca_file = ""             # PEM trust roots for verifying next hops [default: the system's]
route_cache_seconds = 30.0   # a served domain's next hop is read again after this (0: always)
mta_sts = true               # MTA-STS (RFC 8461) for mail routed by MX: a domain's enforce
                             # policy allows only its listed MX hosts, over verified TLS
                             # (mailcore.queue.mtasts)
log_retention = 86400.0      # a delivered message stays visible to `mailcore queue show`
# Which addresses a next hop may have (see below)
allow_loopback = false       # 127.0.0.0/8 and ::1 (tests, a next hop on the same host)
allow_private = false        # RFC 1918, CGNAT, ULA, link-local and other non-global ranges
allow_networks = []          # CIDRs allowed even if private ("10.1.2.0/24")
deny_networks = []           # CIDRs refused whatever else says
```

Which addresses a next hop may be (`mailcore.queue.nexthop`): the four keys of
`mailcore.netpolicy`, checked on the address actually connected to, after resolution, on
every delivery (served domains' redirects, MX answers, the relayhost) and when a redirect is
set. The default forbids loopback, link-local and private ranges; an operator who relays to
hosts on its own network or on the same host allows them. The gateway's own SMTP listeners
are never a next hop, whatever these say.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mailcore.config import Config, ConfigError, is_positive_number, unknown_key
from mailcore.netpolicy import IPNetwork, parse_networks

# Outbound STARTTLS policies, weakest first:
# - "none": never;
# - "may": when offered, certificate not checked, cleartext retry if the handshake fails
#   (Postfix `may`; for next hops with self-signed certificates);
# - "verify-if-offered" (the default): when offered, the certificate must verify against the
#   trust roots (`tls_ca_file`, else the system's) and name the hop, else the delivery is
#   deferred (4.7.5) and nothing goes out in cleartext; a hop that offers no STARTTLS gets
#   cleartext;
# - "verify": always, and verified (a hop without STARTTLS is deferred too).
# A served domain may override the default with its own policy (`mailcore domain set NAME
# --tls POLICY`); its `require_tls` is the same as an override of "verify".
TLS_POLICIES = ("none", "may", "verify-if-offered", "verify")
DEFAULT_TLS = "verify-if-offered"


def effective_tls(domain_tls: str | None, default: str) -> str:
    """The policy a hop gets: the domain's own when it has one, else the queue default.

    A stored value that is not a known policy (written behind the service's back) fails
    closed as "verify" rather than falling through to cleartext.
    """
    if domain_tls is None:
        return default
    return domain_tls if domain_tls in TLS_POLICIES else "verify"


@dataclass(frozen=True)
class QueueSettings:
    """Every knob of the spool and the runner. Times are seconds."""

    # Retry schedule (RFC 5321 4.5.4.1; Postfix minimal/maximal_backoff_time, queue lifetime).
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    # Leases: how long a claim lasts without renewal, and how often the sweeper looks.
    lease_seconds: float = 120.0
    poll_interval: float = 5.0
    # Delivery.
    hop_concurrency: int = 10
    # Connections to next hops open at once, all hops together (Postfix's
    # default_process_limit): past it, hops wait their turn for a connection.
    max_connections: int = 100
    messages_per_connection: int = 100
    connection_idle: float = 2.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    dead_hop_seconds: float = 60.0
    stop_grace: float = 10.0
    # Memory bounds: recipients held by the runner, and bodies kept hot from accept to send.
    max_in_memory: int = 10000
    body_cache_bytes: int = 64 * 1024 * 1024
    # The octets of message bodies that delivery attempts hold together, from before the
    # attempt takes a connection until it ends (a next hop that reads slowly keeps one for
    # up to data_timeout): an attempt that would pass it waits, holding no connection,
    # until another ends; one attempt always goes, whatever its size. Without it,
    # max_connections x max_message_size.
    max_send_memory: int = 1024 * 1024 * 1024
    # Group commit caps.
    batch_max_messages: int = 256
    batch_max_bytes: int = 16 * 1024 * 1024
    # Routing and TLS.
    relayhost: str = ""
    tls: str = DEFAULT_TLS
    tls_ca_file: str = ""
    route_cache_seconds: float = 30.0
    # MTA-STS (RFC 8461) for mail routed by MX (mailcore.queue.mtasts).
    mta_sts: bool = True
    # Which addresses a next hop may have (see the module docstring).
    allow_loopback: bool = False
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    # Identity of this node in leases; default host name plus the data directory.
    node_id: str = ""
    # How long a finished message stays visible to `queue show`.
    log_retention: float = 86400.0

    @classmethod
    def from_config(cls, config: Config) -> QueueSettings:
        """Read `[queue]`, checking names and types; the node id defaults per data dir."""
        section = config.section("queue")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise unknown_key("queue", key)
            if key in ("allow_networks", "deny_networks"):
                values[key] = parse_networks("queue", key, value)
                continue
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"[queue] {key} must be true or false")
                values[key] = value
                continue
            if isinstance(default, bool) or isinstance(value, bool):
                raise ConfigError(f"[queue] {key} has the wrong type")
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if not isinstance(value, type(default)):
                raise ConfigError(f"[queue] {key} must be of type {type(default).__name__}")
            if isinstance(value, (int, float)) and not _in_range(key, value):
                raise ConfigError(f"[queue] {key} must be {_RANGE_TEXT[key in _MAY_BE_ZERO]}, "
                                  f"not {value}")
            values[key] = value
        if values.get("tls", DEFAULT_TLS) not in TLS_POLICIES:
            raise ConfigError(f"[queue] tls must be one of {', '.join(TLS_POLICIES)}")
        if not values.get("node_id"):
            values["node_id"] = default_node_id(config.data_dir)
        return cls(**values)


# Numbers that may be 0 (switches a cache or a wait off); every other number must be > 0.
_MAY_BE_ZERO = frozenset({"connection_idle", "route_cache_seconds", "body_cache_bytes",
                          "dead_hop_seconds", "stop_grace", "log_retention"})
_RANGE_TEXT = {False: "greater than 0", True: "0 or more"}


def _in_range(key: str, value: float) -> bool:
    """A finite number that is positive (or, for the keys that allow it, zero)."""
    return is_positive_number(value, zero_ok=key in _MAY_BE_ZERO)


def default_node_id(data_dir: Path) -> str:
    """Host name and data directory: stable across restarts, distinct per daemon."""
    return f"{socket.gethostname()}:{os.path.abspath(data_dir)}"[:128]

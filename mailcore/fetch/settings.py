"""The `[fetch]` section of the configuration, checked once at start-up.

Every key, with its default (times in seconds, sizes in octets; more on each at its field):

```toml
[fetch]
sync_interval = 900.0        # each account is synced about this often (its own wins) ...
jitter = 0.1                 # ... spread by this fraction either way
max_concurrent = 4           # accounts synced at once ...
max_concurrent_per_user = 2  # ... of them one user's (the user's others wait, taking none;
                             # unset: half of max_concurrent, at least 1)
tick = 30.0                  # how often the scheduler looks for accounts due
max_message_bytes = 67108864 # the largest message fetched (an IMAP literal, a POP3 message)
batch_messages = 1000        # messages per pipelined fetch, one store transaction ...
batch_bytes = 8388608        # ... and their declared bytes
pipeline_depth = 3           # such fetches on the wire while a batch is stored
connect_timeout = 30.0       # to connect to an account's server
idle_timeout = 120.0         # silence from the server while a command waits
command_timeout = 1800.0     # a command unanswered this long fails the session
max_accounts_per_user = 1000 # IMAP2API imap-servers and Dropmyemail accounts of one user
# secret_key = "KEY[,OLD]"   # Fernet key(s) of remote passwords [default: fetch.key in the
                             # data directory, made on first use]
```

Which servers an account may name is the operator's decision (mailcore.netpolicy): every
address the account's host resolves to is checked when the sync connects, and a host with no
allowed address fails the sync ("<host> is where this server does not connect"; the addresses
it resolved to are logged for the operator, never shown to the user) before any connection
is opened:

```toml
[fetch]
allow_loopback = false       # 127.0.0.0/8 and ::1 (tests and single-host setups)
allow_private = false        # RFC 1918, CGNAT, ULA, link-local and other non-global ranges
allow_networks = []          # CIDRs allowed even if private ("10.1.2.0/24")
deny_networks = []           # CIDRs refused whatever else says
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mailcore.config import ConfigError, check_positive, unknown_key
from mailcore.netpolicy import AddressPolicy, IPNetwork, parse_networks


@dataclass(frozen=True)
class FetchSettings:
    """How the fetch engine behaves. Every field can be set in `[fetch]` of the TOML file."""

    # Periodic sync: every account is synced about every `sync_interval` seconds (its own
    # `sync_interval` wins), spread by +/- `jitter` (a fraction), at most `max_concurrent`
    # accounts at once; the scheduler looks for due accounts every `tick` seconds.
    sync_interval: float = 900.0
    jitter: float = 0.1
    max_concurrent: int = 4
    # Of them, at most this many of one user's accounts: a user's server that holds each
    # sync up to command_timeout (or the same user's thousand accounts) keeps the others'
    # accounts from syncing no more than this lets it. Below max_concurrent to mean anything:
    # unset, it is half of max_concurrent (at least 1), so an operator who raised that for a
    # few users' many accounts keeps their syncs at once.
    max_concurrent_per_user: int = 2
    tick: float = 30.0
    # The biggest message we accept; an IMAP literal or POP3 message over it fails/skips.
    max_message_bytes: int = 64 * 1024 * 1024
    # Messages per pipelined UID FETCH, bounded in count and in declared bytes, and how many
    # such fetches are on the wire (or fetched and being parsed) while a batch is stored.
    # Each batch is one store transaction with work of its own (keys, threads, counts, the
    # full-text index's segment): 1,000 small messages a batch synced 20,000 of 4 KiB about
    # 10 % faster than 200 did (`make bench`; 2,000 gained nothing more, and a pipeline
    # deeper than 3 lost). A crash re-fetches at most the batches not yet committed. A POP3
    # batch is bounded the same way (by LIST's sizes, then by the bytes fetched).
    batch_messages: int = 1000
    batch_bytes: int = 8 * 1024 * 1024
    pipeline_depth: int = 3
    connect_timeout: float = 30.0
    idle_timeout: float = 120.0
    # An IMAP or POP3 sync's session fails when no command is answered for this long while
    # one waits, whatever the server sends meanwhile (IMAP's untagged replies and each line
    # of a POP3 reply restart idle_timeout: Dovecot sends `* OK Searched 40% ...` during a
    # slow SEARCH). Long enough for the biggest message on a slow link: 64 MiB at 300 kbit/s.
    command_timeout: float = 1800.0
    # How many accounts (IMAP2API imap-servers, Dropmyemail accounts) one user may have:
    # each is synced on its own schedule, so the number bounds the work a user can ask for.
    max_accounts_per_user: int = 1000
    # Fernet key(s) for remote passwords, the first encrypting (commas between several);
    # default: `fetch.key` in the data directory.
    secret_key: str | None = None
    # Where accounts may connect (see the module docstring): loopback and other non-global
    # addresses are refused unless allowed; deny_networks wins over everything.
    allow_loopback: bool = False
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> FetchSettings:
        """Settings from `[fetch]`; an unknown key or a bad value raises ConfigError."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise unknown_key("fetch", key)
            if key in ("allow_networks", "deny_networks"):
                values[key] = parse_networks("fetch", key, value)
                continue
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"[fetch] {key} must be true or false")
                values[key] = value
                continue
            if isinstance(default, float) and isinstance(value, int) and not isinstance(
                value, bool
            ):
                value = float(value)
            expected = type(default) if default is not None else str
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"[fetch] {key} must be of type {expected.__name__}")
            values[key] = value
        if "max_concurrent_per_user" not in values and "max_concurrent" in values:
            values["max_concurrent_per_user"] = max(1, values["max_concurrent"] // 2)
        settings = cls(**values)
        check_positive("fetch", settings, zero_ok=("jitter",))
        if not 0 <= settings.jitter < 1:
            raise ConfigError("[fetch] jitter must be a fraction in [0, 1)")
        return settings

    def address_policy(self) -> AddressPolicy:
        """The policy on the addresses an account's server may resolve to."""
        return AddressPolicy(self)

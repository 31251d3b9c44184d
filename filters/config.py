"""Building the filter chain from the `[filters]` section of the TOML config file.

Every key is optional; with no `[filters]` section only the built-in checks run.
Unknown keys and wrong types are errors (`ConfigError`, one line naming the key), in the
table of a filter that is not enabled too.

```toml
[filters]
enabled = ["builtin", "clamd", "spamd"]  # which filters run, in this order; names are
                                         # builtin, spamd, clamd, rspamd [default: builtin]
threshold = 5.0      # the chain's spam threshold; each filter's score is scaled onto it
                     # (score * threshold / filter's own threshold) [default: 5.0]
score_mode = "max"   # "max": the chain's score is the highest scaled score; "sum": their
                     # sum. Spam when any filter says spam or the score >= threshold.

[filters.builtin]    # checks in-process, no daemon
fail_open = false    # true: if the checks fail, skip them instead of deferring the message
timeout = 30.0       # seconds before the checks count as failed (they run on a CPU pool)
threshold = 5.0      # header-sanity points at or above this make the message spam
gtube = true         # GTUBE test string -> symbol GTUBE (scores.GTUBE, default 1000)
eicar = true         # EICAR test string, also in base64/QP parts and zips -> virus
                     # "Eicar-Test-Signature"
headers = true       # header sanity checks (points per symbol in [filters.builtin.scores])
scan_zip = true      # open zip attachments (nested too) within the zip_* limits
detect_executables = true  # Windows PE / ELF bytes count as a dangerous attachment
dangerous_action = "virus"     # "virus" (-> "Heuristics.Dangerous.Attachment"), "spam"
                               # (symbol DANGEROUS_ATTACHMENT worth the threshold) or "off"
zip_bomb_action = "virus"      # -> "Heuristics.Zip.Bomb" / symbol ZIP_BOMB / "off"
encrypted_zip_action = "off"   # -> "Heuristics.Encrypted.Zip" / symbol ZIP_ENCRYPTED
limits_action = "virus"        # MIME beyond max_parts/max_depth/max_header_bytes/decoding ->
                               # "Heuristics.Limits.Exceeded" / symbol MIME_LIMITS
dangerous_extensions = ["exe", "scr", "js", ...]  # replaces the default list: exe scr js
                     # jse vbs vbe bat cmd com pif jar msi msp hta lnk iso img vhd vhdx cpl
                     # wsf wsh ps1 reg scf msc application gadget
dangerous_types = ["application/x-msdownload", ...]  # replaces the default MIME types
                     # (x-msdownload, x-msdos-program, x-dosexec, x-msi, java-archive,
                     # x-iso9660-image, hta, x-ms-shortcut, ...; see filters.builtin)
max_parts = 1000     # MIME parts walked at most
max_depth = 20       # MIME nesting (multipart, message/rfc822) at most
max_header_bytes = 262144  # a header block larger than this is not parsed
max_header_field = 16384   # a single field larger than this -> HEADER_TOO_LONG
zip_max_entries = 1000     # entries per message, all its zips and nested zips included
zip_max_total_size = 104857600  # bytes expanded per message, all its zips included
zip_max_ratio = 100.0      # expanded/compressed size per entry ...
zip_ratio_min_size = 1048576  # ... for entries larger than this
zip_max_depth = 3          # zips inside zips
inline_max = 32768   # messages up to this size are checked on the reactor thread,
                     # larger ones on the CPU pool (and so are smaller ones holding a
                     # zip, more than 100 parts or 500 header lines)

[filters.builtin.scores]  # points per symbol, merged over the defaults; 0 turns it off;
                          # also MIME_LIMITS, DANGEROUS_ATTACHMENT, ZIP_BOMB, ZIP_ENCRYPTED
                          # (their action "spam": at least the threshold)
GTUBE = 1000.0
MISSING_FROM = 2.0
MISSING_DATE = 1.0
MISSING_MESSAGE_ID = 0.5
DUPLICATE_FROM = 3.0
DUPLICATE_DATE = 1.5
DUPLICATE_MESSAGE_ID = 1.5
MALFORMED_FROM = 2.5        # From that does not parse as mailbox addresses
MALFORMED_ADDRESS = 1.0     # To, Cc, Bcc, Reply-To or Sender that does not parse
MALFORMED_DATE = 1.0
MALFORMED_MESSAGE_ID = 0.5
MALFORMED_HEADER = 1.0      # header lines that are not fields
HEADER_TOO_LONG = 1.5
HEADERS_TOO_LARGE = 3.0
MIME_DUPLICATE_FIELD = 5.0  # Content-Type, -Transfer-Encoding or -Disposition twice in a part
MIME_NO_PARTS = 2.0         # a multipart without a boundary, or none of its lines in the body
MIME_LONG_BOUNDARY = 1.0    # a boundary longer than RFC 2046's 70 characters
MIME_BROKEN_BASE64 = 3.0    # base64 broken by padding more than once in 256 characters

[filters.spamd]      # SpamAssassin's spamd
address = "127.0.0.1:783"  # host:port, [v6]:port, or a unix socket path (/run/spamd.sock)
timeout = 30.0       # seconds for connect + scan; then the filter counts as failed
fail_open = false
command = "SYMBOLS"  # SYMBOLS (rule names), REPORT (rule names with points) or CHECK
                     # (no rule names: a scan cut short at spamd's time limit looks clean)
user = ""            # SPAMC User header (per-user settings in spamd), empty: none
max_size = 1048576   # larger messages are not sent to spamd (0: no limit) ...
oversize = "skip"    # ... and are "skip"ped (recorded as skipped) or "fail" (unless fail_open:
                     # quarantined unscanned, category "oversize", for a person to release)
max_reply = 262144   # bytes of reply accepted

[filters.clamd]      # ClamAV's clamd
address = "127.0.0.1:3310"  # or a unix socket path (/run/clamav/clamd.ctl)
timeout = 60.0
fail_open = false
chunk_size = 65536   # INSTREAM chunk size
max_size = 26214400  # keep equal to clamd's StreamMaxLength (0: no limit of ours) ...
oversize = "fail"    # ... larger messages: "fail" (quarantined unscanned) or "skip"
max_reply = 65536

[filters.rspamd]     # rspamd's normal worker (POST /checkv2)
address = "127.0.0.1:11333"  # host:port, http(s)://host:port URL, or unix socket path
timeout = 30.0
fail_open = false
threshold = 15.0     # score that makes spam [default: rspamd's required_score per reply]
spam_actions = ["reject", "rewrite subject", "add header"]  # rspamd actions meaning spam
                     # ("soft reject", rspamd's try-again-later, fails the scan unless listed;
                     # set rspamd's own soft_reject_on_timeout = true: without it, a scan it
                     # cut short at task_timeout answers "no action" and reads as clean)
max_size = 0         # 0: no limit of ours (rspamd has its own)
oversize = "skip"
max_reply = 1048576
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime

from filters._net import Address, client_endpoint, parse_address
from filters.archive import ZipLimits
from filters.builtin import (
    ACTIONS,
    DEFAULT_DANGEROUS_EXTENSIONS,
    DEFAULT_DANGEROUS_TYPES,
    DEFAULT_INLINE_MAX,
    SYMBOLS,
    BuiltinFilter,
    BuiltinSettings,
    default_scores,
)
from filters.chain import SCORE_MODES, ChainEntry, FilterChain
from filters.clamd import DEFAULT_CHUNK, ClamdClient
from filters.clamd import DEFAULT_MAX_SIZE as CLAMD_MAX_SIZE
from filters.clamd import DEFAULT_PORT as CLAMD_PORT
from filters.clamd import MAX_REPLY as CLAMD_MAX_REPLY
from filters.interface import DEFAULT_THRESHOLD, Filter, Runner
from filters.mime import MimeLimits
from filters.rspamd import DEFAULT_PORT as RSPAMD_PORT
from filters.rspamd import (
    DEFAULT_SPAM_ACTIONS,
    KNOWN_ACTIONS,
    RspamdClient,
    make_http_client,
    target,
)
from filters.rspamd import MAX_REPLY as RSPAMD_MAX_REPLY
from filters.spamd import COMMANDS, SpamdClient
from filters.spamd import DEFAULT_PORT as SPAMD_PORT
from filters.spamd import MAX_REPLY as SPAMD_MAX_REPLY
from mailcore.config import ConfigError, is_positive_number

FILTER_NAMES = ("builtin", "spamd", "clamd", "rspamd")
OVERSIZE = ("skip", "fail")


class _Table:
    """Typed reads from one TOML table; `done()` rejects keys nobody read."""

    def __init__(self, path: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"[{path}] must be a table")
        self.path = path
        self.data = dict(data)
        self.seen: set[str] = set()

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def _bad(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}.{key} must be {what}")

    def get_bool(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def get_number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise self._bad(key, "a finite number")
        if positive and not is_positive_number(value):
            raise self._bad(key, "a positive number")
        return float(value)

    def get_optional_number(self, key: str) -> float | None:
        if self._get(key) is None:
            return None
        return self.get_number(key, 0.0)

    def get_int(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        if value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return value

    def get_str(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def get_choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get_str(key, default)
        if value not in choices:
            raise self._bad(key, "one of " + ", ".join(repr(c) for c in choices))
        return value

    def get_str_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return tuple(value)

    def get_table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(f"{self.path}.{key}", self.data.get(key, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"unknown key {self.path}.{unknown[0]}")


def build_chain(
    section: Mapping[str, Any],
    *,
    reactor: Any,
    runner: Runner,
    http_client: Any | None = None,
) -> FilterChain:
    """The FilterChain the `[filters]` section describes.

    `reactor` gives the clock and the TCP/unix connections; `runner` (a CpuPool) runs the
    built-in checks for large messages; `http_client` (treq HTTPClient or StubTreq) talks to
    rspamd, else the rspamd client uses `filters.rspamd.OneShotHTTP`.
    Raises ConfigError naming the first bad key.
    """
    top = _Table("filters", section)
    enabled = top.get_str_list("enabled", ("builtin",))
    for name in enabled:
        if name not in FILTER_NAMES:
            raise ConfigError(
                f"filters.enabled: unknown filter {name!r} (known: {', '.join(FILTER_NAMES)})")
    if len(set(enabled)) != len(enabled):
        raise ConfigError("filters.enabled: a filter is listed twice")
    threshold = top.get_number("threshold", DEFAULT_THRESHOLD)
    score_mode = top.get_choice("score_mode", "max", SCORE_MODES)
    tables = {name: top.get_table(name) for name in FILTER_NAMES}
    top.done()

    clock: IReactorTime = reactor
    entries: list[ChainEntry] = []
    for name in FILTER_NAMES:
        table = tables[name]
        if name not in enabled and not table.data:
            continue
        # A table configured but not enabled is read all the same, and dropped: a key
        # misspelt there is an error now, not once the filter is enabled. Building a client
        # opens nothing.
        if name == "builtin":
            entry = _builtin(table, runner)
        elif name == "spamd":
            entry = _spamd(table, reactor, clock)
        elif name == "clamd":
            entry = _clamd(table, reactor, clock)
        else:
            entry = _rspamd(table, reactor, clock, http_client)
        table.done()
        if name in enabled:
            entries.append(entry)
    entries.sort(key=lambda e: enabled.index(e.filter.name))
    return FilterChain(entries, clock, threshold=threshold, score_mode=score_mode)


def _entry(table: _Table, filter_: Filter, *, timeout: float | None = None,
           skip_oversize: bool = False) -> ChainEntry:
    return ChainEntry(filter_, fail_open=table.get_bool("fail_open", False), timeout=timeout,
                      skip_oversize=skip_oversize)


def _address(table: _Table, default: str, default_port: int) -> Address:
    text = table.get_str("address", default)
    try:
        return parse_address(text, default_port)
    except ValueError as e:
        raise ConfigError(f"{table.path}.address: {e}") from None


def _builtin(table: _Table, runner: Runner) -> ChainEntry:
    scores = default_scores()
    score_table = table.get_table("scores")
    for key in score_table.data:
        if key not in SYMBOLS:
            raise ConfigError(f"unknown key {score_table.path}.{key} (symbols: "
                              f"{', '.join(sorted(SYMBOLS))})")
        scores[key] = score_table.get_number(key, 0.0, positive=False)
    score_table.done()
    settings = BuiltinSettings(
        threshold=table.get_number("threshold", DEFAULT_THRESHOLD),
        gtube=table.get_bool("gtube", True),
        eicar=table.get_bool("eicar", True),
        headers=table.get_bool("headers", True),
        scan_zip=table.get_bool("scan_zip", True),
        detect_executables=table.get_bool("detect_executables", True),
        dangerous_action=table.get_choice("dangerous_action", "virus", ACTIONS),
        zip_bomb_action=table.get_choice("zip_bomb_action", "virus", ACTIONS),
        encrypted_zip_action=table.get_choice("encrypted_zip_action", "off", ACTIONS),
        limits_action=table.get_choice("limits_action", "virus", ACTIONS),
        dangerous_extensions=frozenset(
            e.lower().lstrip(".") for e in table.get_str_list(
                "dangerous_extensions", tuple(DEFAULT_DANGEROUS_EXTENSIONS))),
        dangerous_types=frozenset(
            t.lower() for t in table.get_str_list(
                "dangerous_types", tuple(DEFAULT_DANGEROUS_TYPES))),
        max_header_field=table.get_int("max_header_field", 16 * 1024),
        mime=MimeLimits(
            max_parts=table.get_int("max_parts", 1000),
            max_depth=table.get_int("max_depth", 20),
            max_header_bytes=table.get_int("max_header_bytes", 256 * 1024),
        ),
        zip=ZipLimits(
            max_entries=table.get_int("zip_max_entries", 1000),
            max_total_size=table.get_int("zip_max_total_size", 100 * 1024 * 1024),
            max_ratio=table.get_number("zip_max_ratio", 100.0),
            ratio_min_size=table.get_int("zip_ratio_min_size", 1024 * 1024, minimum=0),
            max_depth=table.get_int("zip_max_depth", 3),
        ),
        scores=scores,
        inline_max=table.get_int("inline_max", DEFAULT_INLINE_MAX, minimum=0),
    )
    return _entry(table, BuiltinFilter(runner, settings),
                  timeout=table.get_number("timeout", 30.0))


def _spamd(table: _Table, reactor: Any, clock: IReactorTime) -> ChainEntry:
    address = _address(table, f"127.0.0.1:{SPAMD_PORT}", SPAMD_PORT)
    timeout = table.get_number("timeout", 30.0)
    client = SpamdClient(
        client_endpoint(reactor, address, timeout), clock, address=address,
        timeout=timeout,
        command=table.get_choice("command", "SYMBOLS", COMMANDS),
        user=table.get_str("user", ""),
        max_size=table.get_int("max_size", 1024 * 1024, minimum=0),
        max_reply=table.get_int("max_reply", SPAMD_MAX_REPLY),
    )
    oversize = table.get_choice("oversize", "skip", OVERSIZE)
    return _entry(table, client, skip_oversize=oversize == "skip")


def _clamd(table: _Table, reactor: Any, clock: IReactorTime) -> ChainEntry:
    address = _address(table, f"127.0.0.1:{CLAMD_PORT}", CLAMD_PORT)
    timeout = table.get_number("timeout", 60.0)
    client = ClamdClient(
        client_endpoint(reactor, address, timeout), clock, address=address,
        timeout=timeout,
        chunk_size=table.get_int("chunk_size", DEFAULT_CHUNK),
        max_size=table.get_int("max_size", CLAMD_MAX_SIZE, minimum=0),
        max_reply=table.get_int("max_reply", CLAMD_MAX_REPLY),
    )
    oversize = table.get_choice("oversize", "fail", OVERSIZE)
    return _entry(table, client, skip_oversize=oversize == "skip")


def _rspamd(
    table: _Table, reactor: Any, clock: IReactorTime, http_client: Any | None
) -> ChainEntry:
    try:
        url, address = target(table.get_str("address", f"127.0.0.1:{RSPAMD_PORT}"))
    except ValueError as e:
        raise ConfigError(f"filters.rspamd.address: {e}") from None
    timeout = table.get_number("timeout", 30.0)
    max_reply = table.get_int("max_reply", RSPAMD_MAX_REPLY)
    pool = None
    if http_client is None:
        http_client, pool = make_http_client(
            reactor, address, timeout, tls=url.startswith("https://"), max_reply=max_reply)
    actions = table.get_str_list("spam_actions", DEFAULT_SPAM_ACTIONS)
    for action in actions:
        if action not in KNOWN_ACTIONS:
            raise ConfigError(
                f"filters.rspamd.spam_actions: unknown action {action!r} "
                f"(known: {', '.join(KNOWN_ACTIONS)})")
    client = RspamdClient(
        http_client, clock, url=url, timeout=timeout,
        threshold=table.get_optional_number("threshold"),
        spam_actions=actions,
        max_size=table.get_int("max_size", 0, minimum=0),
        max_reply=max_reply,
        pool=pool,
    )
    oversize = table.get_choice("oversize", "skip", OVERSIZE)
    return _entry(table, client, skip_oversize=oversize == "skip")

"""The inbound SMTP server's settings: the `[smtp]` table of the TOML file (`SMTPSettings`,
every key with its default) and the `postmaster` address it names, checked at start-up.

The server that applies them is mailcore.smtp.server (its session `ESMTPServerProtocol`
and its factory `SMTPServerFactory`, which holds the stress the `stress_` keys are for),
its memory for DATA mailcore.smtp.datamemory; the queue reads `max_hops` here too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mailcore.config import Config, ConfigError, is_positive_number
from mailcore.smtp.address import Mailbox, PathError, parse_rcpt_to, relay_refusal
from mailcore.smtp.hops import DEFAULT_MAX_HOPS

# [smtp] keys that stand in, under stress, for the key beside them.
_STRESS_KEYS = (("stress_idle_timeout", "idle_timeout"), ("stress_max_errors", "max_errors"),
                ("stress_max_junk_commands", "max_junk_commands"))
# [smtp] keys for which 0 means off.
_ZERO_OK_KEYS = frozenset({"stress_min_data_rate"})
# [smtp] keys that are no numbers.
_NOT_NUMBERS = frozenset({"hostname", "postmaster", "verify_recipients", "verify_unreachable"})
# What `verify_unreachable` may say.
VERIFY_UNREACHABLE = ("accept", "defer")


@dataclass(frozen=True)
class SMTPSettings:
    """Limits and timeouts of the inbound server: the `[smtp]` table of the TOML file.

    Keys (all optional; sizes in octets, times in seconds):

    - `max_message_size` (52428800): the SIZE advertised in EHLO; larger messages get 552,
      at MAIL when the client declares SIZE=, else at the end of DATA (a message's size,
      as in RFC 1870, does not count the dots DATA doubles).
    - `max_data_memory` (1073741824, 1 GiB): octets of DATA all sessions together may hold
      in memory, from the first octet of a message until the spool has committed it, past
      the first MiB of each message (DATA_FREE: small mail is never refused for this). One
      client address may hold at most its connections' share of it
      (`max_connections_per_ip` / `max_connections`, at least `max_message_size`). A
      message that would take them past either is read to its end but not kept, and
      answered 452 4.3.1 (insufficient system storage: the sender tries again later), as
      Postfix answers when its queue's disk is short. Without it `max_connections`
      sessions could each hold a message of `max_message_size` (200 x 50 MB: 10 GB) and
      the daemon be killed for memory.
    - `max_recipients` (100): accepted RCPTs per message; more get 452 4.5.3.
    - `max_connections` (200): concurrent connections in total; more get 421 4.7.0.
    - `max_connections_per_ip` (20): concurrent connections from one client address.
    - `idle_timeout` (300): silence from the client (between commands or inside DATA)
      before we say 421 4.4.2 and close.
    - `command_timeout` (120): how long one command may wait on us (a store lookup, the
      spool's commit) before it is answered 451 4.3.0 and the session goes on: a store
      that does not answer (a frozen or hung database server, which neither TCP
      keepalives nor a statement error end) must not hold the client without a reply.
      RFC 5321 4.5.3.2 gives the client 5 minutes for a RCPT reply and 10 for DATA's, so
      keep it well under 300. A message so answered is taken out of the spool if its
      group commit has not begun; if it has, the commit may still land and the message is
      delivered, and again when the client sends it again (a rare duplicate, the price of
      an answer in time).
    - `max_session_time` (3600): how long a session may last in all, whatever it does,
      before we say 421 4.4.2 and close; a message still in DATA then is not accepted. The
      idle timeout alone lets one octet every few minutes hold a session (and its
      connection slot) for ever. An hour carries a message of the default maximum size
      (50 MB) over a link of 128 kbit/s; senders that keep a connection for many messages
      hold it for minutes (Postfix's client: `smtp_connection_reuse_time_limit`, 300 s),
      and mail cut off is retried on a new connection. A command waiting on us (the
      spool's commit) is answered before the session ends (it has `command_timeout`).
    - `max_errors` (20): refused commands and recipients in one session before 421 4.7.0;
      a recipient over `max_recipients` (452 4.5.3) counts as one once a message has had
      `RECIPIENT_OVERSHOOT` (1,000, as Postfix's `smtpd_recipient_overshoot_limit`) of them:
      a sender that pipelines all its recipients expects 452s for the rest and sends them in
      another transaction. (Under stress those after the first 452 of a transaction do not
      move `stress_idle_timeout`'s deadline: see `SMTPServerFactory`.)
    - `max_junk_commands` (100, Postfix's `smtpd_junk_command_limit`, which counts NOOP,
      VRFY, ETRN and RSET only): commands that change nothing (NOOP, RSET, VRFY, HELP,
      HELO and EHLO, a recipient given again) answered since the session began or its
      last accepted message (not since its STARTTLS: RFC 3207 4.2 resets the greeting and
      the transaction, not this count, nor does Postfix); one more is answered 421 4.7.0
      and the session ends. Under stress the session's first HELO/EHLO, and the first
      after its STARTTLS, are not held against it (see `ESMTPServerProtocol._junk`).
    - `stress_idle_timeout` (10), `stress_max_errors` (1), `stress_max_junk_commands` (1):
      what `idle_timeout`, `max_errors` and `max_junk_commands` become while the server is
      under stress, as Postfix's `smtpd_timeout = ${stress?{10}:{300}}`,
      `smtpd_hard_error_limit = ${stress?{1}:{20}}` and `smtpd_junk_command_limit =
      ${stress?{1}:{100}}` (STRESS_README), the idle timeout then counted from the last
      complete command line, DATA chunk ending a line (with `stress_min_data_rate` 0) or
      answer, as Postfix's `smtpd_per_record_deadline = ${stress?{yes}:{no}}`: see
      `SMTPServerFactory`. Each is at most the value it stands in for (a larger one
      configured is an error; the default is lowered to it). Setting all three to their
      usual values, and `stress_min_data_rate` to 0, turns stress off.
    - `stress_min_data_rate` (500 octets a second, as Postfix's `smtpd_min_data_rate`; 0
      turns it off): under stress, inside DATA, the 10 s are a budget that runs down while
      the client is silent and that each octet of the message it sends refills by
      1/`stress_min_data_rate` s, never past `stress_idle_timeout` ahead (Postfix's
      per-request deadline in DATA and BDAT): a sender slower than the rate on average, or
      silent for `stress_idle_timeout`, is answered 421 4.4.2, however often its lines
      come. Off, DATA's lines under stress count as records, as commands do.
    - `max_line_length` (1000): longest DATA line, CRLF included, a dot doubled for
      transparency not counted (RFC 5321 4.5.3.1.6).
    - `max_command_length` (512): longest command line, CRLF included (4.5.3.1.4).
    - `max_hops` (50, as Postfix's `hopcount_limit`): most Received header fields a message
      may carry when it leaves us, ours included; more is a mail loop, refused at the end of
      DATA with 554 5.4.6 (a queued message is bounced with 5.4.6 instead).
    - `postmaster` ("postmaster@" + `hostname`): where mail to `<postmaster>` without a
      domain goes (RFC 5321 4.5.1 says it must be accepted). A plain `local@domain`
      address: to its domain's next hop when the gateway serves that domain, else through
      `[queue] relayhost` or the domain's MX. With the default `hostname` of `localhost`
      there is nowhere sensible for it to go: it is accepted, has no useful next hop and
      ends as a bounce to its sender (a warning is logged at start-up). Set `postmaster`,
      or a `hostname` whose mail reaches you.

    - `verify_recipients` (false): recipient verification at the next hop ("SMTP callout",
      Postfix's `reject_unverified_recipient`), for the served domains that have no
      address list (every local part is otherwise accepted, and what the next hop later
      refuses bounces to a sender who is usually forged: backscatter, which gets the
      gateway blocklisted). At RCPT the domain's next hop is asked, as the queue reaches
      it (its route and TLS policy), with MAIL FROM:<> and RCPT TO, then RSET (never
      DATA), the connection kept a few seconds for the next probe to that next hop
      (mailcore.gateway.callout.PROBE_IDLE), then QUIT; its refusal of the recipient
      itself (550, 551 or 553 about the address:
      mailcore.gateway.callout.refuses_recipient) is our 550 5.1.1 with its reply.
      Answers are kept in the store for every node (see mailcore.gateway.callout).
    - `verify_unreachable` ("accept"): what a RCPT gets when the next hop gives no answer
      (unreachable, 4xx, another 5xx, past `verify_timeout`): "accept" takes the mail (the
      gateway holds it while the customer's server is down), "defer" answers 450 4.1.1.
    - `verify_timeout` (10): seconds one verification may take in all, connection and TLS
      included (the client waits at RCPT); then `verify_unreachable` decides. Less than
      `command_timeout`, which would otherwise answer the RCPT 451 first.
    - `verify_positive_ttl` (604800, 7 days), `verify_negative_ttl` (10800, 3 hours): how
      long an address the next hop took, or refused, is answered from the store.
    - `verify_hop_concurrency` (4): verification connections this node has open to one
      next hop at once (per node; until each is closed: while idle and during its QUIT
      too); more wait (within `verify_timeout`).

    The host name in the greeting and in Received headers is the top-level `hostname`; it
    may hold no space or control character, so that no SMTP line can be split by it.
    """

    hostname: str = "localhost"
    max_message_size: int = 52_428_800
    max_data_memory: int = 1_073_741_824
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 20
    idle_timeout: float = 300.0
    command_timeout: float = 120.0
    max_session_time: float = 3600.0
    max_errors: int = 20
    max_junk_commands: int = 100
    stress_idle_timeout: float = 10.0
    stress_max_errors: int = 1
    stress_max_junk_commands: int = 1
    stress_min_data_rate: int = 500  # octets a second; 0: off
    max_line_length: int = 1000
    max_command_length: int = 512
    max_hops: int = DEFAULT_MAX_HOPS
    postmaster: str = ""  # "" is postmaster@hostname
    verify_recipients: bool = False
    verify_unreachable: str = "accept"  # or "defer" (450)
    verify_timeout: float = 10.0
    verify_positive_ttl: float = 604_800.0
    verify_negative_ttl: float = 10_800.0
    verify_hop_concurrency: int = 4

    @classmethod
    def from_config(cls, config: Config) -> SMTPSettings:
        """Read `[smtp]`; a known key with a wrong type or value raises ConfigError."""
        section = config.section("smtp")
        hostname = config.hostname
        if not hostname or not all("\x21" <= c <= "\x7e" for c in hostname):
            raise ConfigError(f"hostname {hostname!r} must be a host name in printable "
                              "ASCII, without spaces (an internationalised one in its xn-- "
                              "form)")
        values: dict[str, Any] = {"hostname": hostname}
        if "postmaster" in section:
            if not isinstance(section["postmaster"], str):
                raise ConfigError("[smtp] postmaster must be a string")
            values["postmaster"] = section["postmaster"]
        if "verify_recipients" in section:
            if not isinstance(section["verify_recipients"], bool):
                raise ConfigError("[smtp] verify_recipients must be true or false")
            values["verify_recipients"] = section["verify_recipients"]
        if "verify_unreachable" in section:
            if section["verify_unreachable"] not in VERIFY_UNREACHABLE:
                raise ConfigError("[smtp] verify_unreachable must be one of "
                                  + ", ".join(VERIFY_UNREACHABLE))
            values["verify_unreachable"] = section["verify_unreachable"]
        for f in fields(cls):
            if f.name in _NOT_NUMBERS or f.name not in section:
                continue
            value = section[f.name]
            zero_ok = f.name in _ZERO_OK_KEYS
            if not is_positive_number(value, integer=f.type in ("int", int), zero_ok=zero_ok):
                raise ConfigError(f"[smtp] {f.name} must be a positive number"
                                  + (" or 0" if zero_ok else ""))
            values[f.name] = value
        for stress, usual in _STRESS_KEYS:
            # Stress only shortens: a longer timeout or a higher limit is a mistake.
            if stress in values and values[stress] > values.get(usual, getattr(cls, usual)):
                raise ConfigError(f"[smtp] {stress} must not be more than {usual}")
        settings = cls(**values)
        if settings.verify_recipients and settings.verify_timeout >= settings.command_timeout:
            # The RCPT would be answered 451 at command_timeout first, whatever
            # verify_unreachable says.
            raise ConfigError("[smtp] verify_timeout must be less than command_timeout")
        if settings.max_line_length < 80 or settings.max_command_length < 80:
            raise ConfigError("[smtp] line length limits must be at least 80")
        try:
            postmaster_mailbox(settings)
        except ValueError as e:
            hint = "" if settings.postmaster else " (the default, from hostname); set it"
            raise ConfigError(f"[smtp] postmaster: {e}{hint}") from None
        return settings

    @property
    def postmaster_address(self) -> str:
        """Where mail to `<postmaster>` goes: the `postmaster` key, else postmaster@hostname."""
        return self.postmaster or f"postmaster@{self.hostname}"


def postmaster_mailbox(settings: SMTPSettings) -> Mailbox:
    """The `postmaster` address parsed as a recipient would be; ValueError when it is not a
    plain `local@domain` (no source route, %-hack, quotes or address literal, and, since
    the parser takes only printable ASCII, no CR, LF or other control character that could
    end up splitting an SMTP command line)."""
    address = settings.postmaster_address
    try:
        mailbox, params = parse_rcpt_to(f"TO:<{address}>")
    except PathError as e:
        raise ValueError(f"{address!r} is not a usable address ({e.text})") from None
    reason = relay_refusal(mailbox)
    if params or not mailbox.domain or reason is not None:
        raise ValueError(f"{address!r} is not a plain local@domain address"
                         + (f" ({reason})" if reason else ""))
    return mailbox

"""Inbound ESMTP: the MX side of the gateway, for the domains we serve.

Written on a bare `Protocol` rather than `twisted.mail.smtp.ESMTP`, whose behaviour we must
not inherit (see shared/notes/twisted-pitfalls.md):

- commands run one at a time: while a command waits on a Deferred (the domain snapshot
  still loading, the spool committing a message) later input stays buffered, so replies to
  pipelined commands come back in order (pitfall 5, twisted#8126);
- a client that does not read its replies gets no more of them: the session is a streaming
  producer of its transport, and while the transport holds more unsent replies than its
  buffer size (64 KiB for TCP) no input is handled and the socket is not read, until the
  client has read them (else a pipelined flood of HELP would have us hold ~13 octets of
  reply per octet it sent, without limit);
- input that arrived together with STARTTLS is thrown away before TLS starts
  (pitfall 2, CVE-2011-0411);
- DATA ends only at CRLF "." CRLF, and a message with a bare CR or bare LF anywhere in it is
  refused as a whole, so no next hop can see two messages where we saw one (pitfall 6, the
  2023 SMTP-smuggling class);
- a message with a NUL octet anywhere in it is refused as a whole (554 5.6.0): message
  text has none (RFC 5322 3.5; RFC 2045 2.7 and 2.8 allow none in 7bit or 8bit data, and
  we do not offer BINARYMIME). It is refused rather than stripped, so that what we pass on
  is what the sender sent, or nothing;
- a message whose first line begins with a space or a tab is refused as a whole
  (554 5.6.0): a header section cannot begin with a continuation line (RFC 5322 2.2.3),
  and behind the Received field we prepend it would become part of that field, the
  client's text in our trace (a forged `by`, `for` or date). Refused rather than
  repaired, as a NUL is;
- a message that would leave us with more than `max_hops` Received header fields (ours
  included) is refused at the end of DATA with 554 5.4.6 Too many hops: it is looping (see
  `mailcore.smtp.hops`). The fields are counted as the header section streams in, and
  once there are too many the rest of the message is read but not kept;
- a RCPT for a hosted mailbox that has no room for the message is refused with 552 5.2.2
  "mailbox full" (RFC 3463; Dovecot's LMTP with `lmtp_rcpt_check_quota`): its room (the
  factory's `MailboxRoom`, cached) is less than the SIZE the client declared at MAIL, or
  than MIN_STORED when it declared none. Permanent, as the bounce at delivery of a message
  that does not fit is (mailcore.mailapi.delivery): the sender's server tells its user at
  once, and nothing here sends a DSN to a sender who may be forged. A SIZE is the client's
  word: when every recipient is such a mailbox and the message, once received, is larger
  than the room each has left (asked again then), it is refused at the end of DATA with
  the same 552 5.2.2, rather than accepted to bounce at delivery;
- `RCPT TO:<postmaster>` (no domain) is always accepted (RFC 5321 4.5.1) and its mail goes
  to the `postmaster` address: to that domain's next hop when we serve it, else routed like
  a bounce to a foreign sender (the `[queue] relayhost`, or the domain's MX). Only that one
  configured address can be reached this way, so it opens no relay. Mail to postmaster@
  a hosted domain that has no postmaster mailbox goes there too (it would only bounce).

- with `[smtp] verify_recipients` on, a RCPT for a served, relayed domain that has no
  address list is accepted only when the domain's next hop takes it, asked at once
  (mailcore.gateway.callout: MAIL FROM:<> and RCPT TO, never DATA; answers kept in the
  store): its refusal is our 550 5.1.1 with its reply, no answer is accepted (or, with
  `verify_unreachable = "defer"`, 450 4.1.1), so that we do not accept what can only
  bounce to a sender who may be forged. One client address (an IPv6 client's /64) has at
  most MAX_CLIENT_PROBES probes under way; past them its RCPT is no answer, unprobed.

Recipients are checked against a `RecipientDirectory` (the DomainService's in-memory
snapshot: no SQL per RCPT) and accepted messages go to a `MessageSink` (the spool), whose
`accept` returns only once the message is durably committed; only then do we say 250. A
command that waits on the store longer than `command_timeout` (the end of DATA, a RCPT
whose lookup is not cached) is cancelled and answered 451 4.3.0 (see `SMTPSettings`).

Configuration: the `[smtp]` table of the TOML file (see mailcore.smtp.settings). The
Received header field we prepend is mailcore.smtp.received's.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailcore import maillog
from mailcore.connlimits import ConnectionCounter, peer_key
from mailcore.netwrite import close_now, write_now
from mailcore.smtp.address import (
    Mailbox,
    PathError,
    parse_mail_from,
    parse_rcpt_to,
    relay_refusal,
)
from mailcore.smtp.datamemory import DataMemory
from mailcore.smtp.dotstuff import AcceptedBody, CRLFBody
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.hops import ReceivedCounter
from mailcore.smtp.queueid import new_queue_id
from mailcore.smtp.received import received_header, received_protocol
from mailcore.smtp.settings import SMTPSettings, postmaster_mailbox
from mailcore.text import has_cc

if TYPE_CHECKING:  # the verifier opens sessions as the queue does, and the queue needs us
    from mailcore.gateway.callout import RecipientVerifier, Verdict

log = Logger()

END_OF_DATA = b"\r\n.\r\n"
# Bytes of pipelined input held while a command is pending before we stop reading the socket.
MAX_BACKLOG = 64 * 1024
# Replies gathered for one segment of input before they are written out (and the transport
# may tell us to stop): one 64 KiB segment of pipelined HELP would otherwise be answered
# whole, 13 times its size, before the transport's buffer limit could act.
MAX_CORKED_REPLIES = 256
# After we end a session, how long the client has to take our last replies (and, over TLS,
# to answer our close_notify) before the connection is dropped.
CLOSE_GRACE = 10.0
# RCPTs over `max_recipients` in one transaction answered 452 before each further one counts
# as an error (Postfix's smtpd_recipient_overshoot_limit).
RECIPIENT_OVERSHOOT = 1000
# The fewest bytes a message received for a hosted mailbox takes there (our Received field
# alone is longer): a mailbox with less room refuses mail that declares no SIZE.
MIN_STORED = 64
# Under stress (see SMTPServerFactory) from this share of `max_connections` open sessions,
# until fewer than STRESS_LEAVE of it are open (hysteresis: stress does not flap on and off
# as sessions come and go around one number).
STRESS_ENTER = 0.8
STRESS_LEAVE = 0.6
# No stress below this `max_connections`: with so few slots the thresholds would be a
# session or two apart (with 1, every session would be under stress), and stress would
# begin and end with nearly every connection.
STRESS_MIN_CONNECTIONS = 10
_HTTP_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE"})


# -- what the server depends on --------------------------------------------------------


class SpoolError(Exception):
    """A `MessageSink` could not commit the message (it logs why itself); the server
    answers 451."""


class MessageSink(Protocol):
    """Where accepted messages go: the spool. `accept` returns once the message is durable
    (what it returns is not used here); it raises SpoolError when it could not be stored
    for a reason the spool logs itself."""

    async def accept(self, queue_id: str, envelope: Envelope, data: bytes) -> object: ...


class ServedDomain(Protocol):
    """What the server needs to know of a served domain."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...


class MailboxRoom(Protocol):
    """How much room hosted mailboxes have left (mailcore.mailapi.room.MailboxRoom): from a
    cached read, not one per RCPT."""

    async def room(self, address: str) -> int | None: ...


class RecipientDirectory(Protocol):
    """Which recipients we accept (the DomainService). Lookups answer from memory."""

    @property
    def loaded(self) -> bool: ...

    def when_loaded(self) -> defer.Deferred[None]: ...

    def lookup(self, domain_name: str) -> ServedDomain | None: ...

    def accepts(self, local_part: str, domain_name: str) -> bool: ...

    def postmaster_elsewhere(self, domain_name: str) -> bool: ...

    def suspended(self, domain_name: str) -> bool: ...


# -- checking a message at the end of DATA ---------------------------------------------


def _line_too_long(data: bytes, start: int, limit: int) -> bool:
    """Whether a CRLF-separated line of data[start:] exceeds `limit` octets with its CRLF.

    Jumps from the last CRLF inside each window of `limit` octets, so short lines cost
    nothing each (no per-line Python work). `data` must end with CRLF or be shorter.
    """
    pos, end = start, len(data)
    while end - pos > limit:
        last = data.rfind(b"\r\n", pos, pos + limit)
        if last < 0:
            return True
        pos = last + 2
    return False


@dataclass
class _Counts:
    """What the checks at the end of DATA need of the stored octets, counted as they are
    stored: CRs, LFs, CRLFs (one split across two reads included), lines that begin with
    a dot (their dot doubled for transparency), and whether a NUL was among them."""

    cr: int = 0
    lf: int = 0
    crlf: int = 0
    stuffed: int = 0
    nul: bool = False


# -- the protocol -------------------------------------------------------------------------


Handler = Callable[["ESMTPServerProtocol", str], "defer.Deferred[None] | None"]


@implementer(IPushProducer, IHandshakeListener)
class ESMTPServerProtocol(TwistedProtocol):
    """One inbound SMTP session. See the module docstring for what it guarantees.

    It is the streaming producer of its own transport: `pauseProducing` and
    `resumeProducing` come from the transport as its buffer of unsent replies fills and
    drains."""

    factory: SMTPServerFactory

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.clock = factory.clock
        self.client_ip = ""
        self.tls = False
        self.helo: str | None = None
        self.esmtp = False
        self._open = False
        self._admitted = False
        self._errors = 0
        # Since the session began or the last accepted message: a STARTTLS does not reset
        # it (nor _errors), as Postfix's does not, else a client could spend the limit
        # once in the clear and once more over TLS.
        self._junk_commands = 0
        # Whether the first HELO/EHLO since the session began or its STARTTLS has been
        # counted, and how many such greetings that count holds (at most one per start:
        # not held against it under stress, see _junk).
        self._greeting_counted = False
        self._greetings = 0
        # Input not yet handled, from _pos on; _paused while a command's Deferred is pending,
        # _write_blocked while the transport holds too many unsent replies (the client does
        # not read them); _reading_paused while the socket is not read, for either reason.
        self._buf = b""
        self._cork: list[bytes] | None = None
        self._pos = 0
        self._paused = False
        self._write_blocked = False
        self._reading_paused = False
        self._discarding = False
        self._producing = False  # registered as the transport's producer
        # The transaction.
        self._mail_from: str | None = None
        self._recipients: list[Recipient] = []
        self._seen: set[tuple[str, str]] = set()  # (local part, domain in lower case)
        self._overshoot = 0  # RCPTs of this transaction answered 452 (too many recipients)
        self._overshoot_at = 0.0  # when its first one came (see do_RCPT)
        self._declared = 0  # the SIZE given at MAIL (0: none)
        # The recipients whose room (a nearly full hosted mailbox's) was known at RCPT.
        self._short_of_room: set[str] = set()
        # DATA: the octets received so far (one buffer: a client sending an octet per
        # segment would have us hold some 40 octets of list entry and bytes object per
        # octet), their count, the last 4 octets (to find the end marker across chunk
        # boundaries), whether the size limit was passed, and the Received fields of the
        # header section (whether there are too many). The stored octets' CRs, LFs, CRLFs,
        # dot-stuffed lines and NULs are counted as they arrive (`_Counts`), so the end of
        # a large message does not pass over it once more for each on the reactor.
        self._in_data = False
        self._body = bytearray()
        self._data_len = 0
        self._tail = b""
        self._overflow = False
        self._no_room = False  # past the factory's max_data_memory: read, not kept
        self._held = 0  # octets of _body counted in the factory's `memory`
        self._address: str | None = None  # the client address as max_data_memory counts it
        self._hops = ReceivedCounter(stuffed=True)
        self._looping = False
        self._counts = _Counts()
        # The session's one timer (see _arm_timer): the idle and the command timeout, and
        # the session's time. _last_record is when the client last completed a record (a
        # command line; in DATA a chunk that ends a line) or we last answered: under
        # stress the idle timeout counts from it, not from the last octet.
        self._last_activity = 0.0
        self._last_record = 0.0
        # Under stress in DATA, with a stress_min_data_rate: when the session times out
        # unless more of the message comes, and how many of the message's octets
        # (_data_len) have been counted towards it (see _data_deadline).
        self._data_until = 0.0
        self._metered = 0
        self._paused_at = 0.0
        self._session_end = 0.0  # max_session_time after the connection was admitted
        self._timer: IDelayedCall | None = None
        # The command's Deferred while it waits on us: cancelled at its deadline.
        self._waiting: defer.Deferred[None] | None = None

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.client_ip = _normalise_ip(getattr(peer, "host", "") or "")
        self._address = peer_key(self.client_ip)
        self.tls = ISSLTransport.providedBy(self.transport) or INegotiated.providedBy(
            self.transport
        )
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._write(f"421 4.7.0 {self.settings.hostname} {refusal}\r\n")
            self._flush()
            # (On a TLS listener the 421 waits for a handshake the client may never start:
            # the grace timer ends such a connection, which no limit counts.)
            self._close()
            return
        self._admitted = True
        self._open = True
        if not self.tls:
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]
            self._producing = True
        # else a TLS listener's handshake is still to come: see handshakeCompleted.
        self._last_activity = self._last_record = now = self.clock.seconds()
        self._session_end = now + self.settings.max_session_time
        self._arm_timer(now)
        self._write(f"220 {self.settings.hostname} ESMTP Mailcore\r\n")

    def handshakeCompleted(self) -> None:
        """(IHandshakeListener) On a TLS listener, the session becomes its transport's
        producer once the handshake is done. Before, the TLS transport holds what we write
        (the greeting) for the handshake and pauses its producer meanwhile: we stopped
        reading the socket, the client's handshake with it, and no session could begin."""
        if self._open and not self._producing:
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]
            self._producing = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._open = False
        self._drop_body()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._admitted:
            self._admitted = False
            self.factory.release(self)

    def _write(self, text: str) -> None:
        data = text.encode("ascii", "replace")
        if self._cork is not None:
            self._cork.append(data)
        else:
            write_now(self.transport, data)

    def _flush(self) -> None:
        """Send the replies gathered while one segment of input was handled, in one write
        (pipelined commands get their replies together, as RFC 2920 suggests)."""
        cork, self._cork = self._cork, None
        if cork:
            write_now(self.transport, b"".join(cork))

    def reply(self, code: int, status: str, text: str) -> None:
        """Send one reply line (with its enhanced status code) if still connected."""
        if self._open:
            self._write(f"{code} {status} {text}\r\n")

    def _refuse(self, stage: str, code: int, status: str, text: str, *,
                recipients: Sequence[str] = (), mail_from: str | None = None,
                error: bool = False) -> None:
        """Refuse a recipient or a message, with its line in the mail log. A permanent
        refusal, or one marked `error`, counts towards `max_errors`."""
        if code >= 500 or error:
            self._error(code, status, text)
        else:
            self.reply(code, status, text)
        maillog.refused(stage, f"{code} {status} {text}", client=self.client_ip,
                        mail_from=self._mail_from if mail_from is None else mail_from,
                        recipients=recipients)

    def _error(self, code: int, status: str, text: str) -> None:
        """Refuse a command; too many refusals end the session."""
        self.reply(code, status, text)
        self._errors += 1
        if self._errors >= self.factory.max_errors:
            self.shutdown("4.7.0", "Error: too many errors")

    def _junk(self, greeting: bool = False) -> bool:
        """Count a command that changes nothing. One more than `max_junk_commands` since
        the session began or the last accepted message ends the session: say so (True),
        and answer nothing else. Under stress the session's first HELO/EHLO, and the first
        after STARTTLS (`greeting`), are not held against it: with
        `stress_max_junk_commands` 1, EHLO then RSET before MAIL (as some MTAs send) would
        end it. (Postfix counts no HELO/EHLO; out of stress they count here, as before.)"""
        self._junk_commands += 1
        if greeting and not self._greeting_counted:
            self._greeting_counted = True
            self._greetings += 1
        factory = self.factory
        limit = factory.max_junk_commands
        if factory.stressed:
            limit += self._greetings
        if self._junk_commands > limit:
            self.shutdown("4.7.0", "Error: too many junk commands")
            return True
        return False

    def shutdown(self, status: str, text: str) -> None:
        """Say 421 and close: the server's way to end a session."""
        if not self._open:
            return
        self.reply(421, status, f"{self.settings.hostname} {text}")
        self._open = False
        self._buf = b""
        self._pos = 0
        self._drop_body()  # a message still in DATA is not accepted
        self._flush()
        self._close()

    def _close(self) -> None:
        """Close the connection once our last replies are out (at once when they are: see
        mailcore.netwrite.close_now), and drop it if it is not gone CLOSE_GRACE seconds
        later.

        The session first stops being its transport's producer: a TLS transport does not
        close while one is registered (it waits for unregisterProducer), so every TLS
        session outlived its QUIT or its 421 for as long as the client kept the socket. A
        TLS close also waits for the client's close_notify, and replies written before the
        TLS handshake finished wait for the handshake (a client that sends STARTTLS and
        then nothing): the grace timer ends those. A client that reads nothing gets no
        grace: the replies would wait for it for ever, and the connection with them."""
        transport: Any = self.transport
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._producing:
            self._producing = False
            transport.unregisterProducer()
        if self._write_blocked:
            transport.abortConnection()
            return
        if close_now(transport):
            return  # our replies were all sent: closed (connectionLost has run)
        self._timer = self.clock.callLater(self.factory.close_grace, self._drop)

    def _drop(self) -> None:
        """The client did not let the connection go after we closed it: abort it."""
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[union-attr, attr-defined]

    # -- output flow control (IPushProducer, called by the transport) ---------------------

    def pauseProducing(self) -> None:
        """The transport holds more unsent replies than its buffer size: handle no more
        input, and stop reading it, until the client has read them."""
        self._write_blocked = True
        if self._open and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        """The client read our replies: handle the input held meanwhile, then read on."""
        self._write_blocked = False
        if not self._open:
            return
        self._last_activity = self._last_record = self.clock.seconds()
        self._cork = []
        try:
            self._process()
        finally:
            self._flush()
        self._resume_reading()

    def stopProducing(self) -> None:
        """The connection is going; connectionLost does the cleaning up."""

    # -- input --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        self._last_activity = self.clock.seconds()
        self._cork = []
        try:
            self._received(data)
        finally:
            self._flush()

    def _received(self, data: bytes) -> None:
        if self._in_data and not self._paused and not self._buf and not self._write_blocked:
            rest = self._feed_data(data)
            if rest is None:
                return
            self._buf = rest
        else:
            self._buf += data
        self._process()
        if self._paused and len(self._buf) > MAX_BACKLOG and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _process(self) -> None:
        """Handle buffered input until it runs out, a command pauses, or the session ends."""
        try:
            self._process_buffer()
        finally:
            if self._pos:
                self._buf = self._buf[self._pos:]
                self._pos = 0

    def _process_buffer(self) -> None:
        limit = self.settings.max_command_length
        while self._open and not self._paused and not self._write_blocked:
            if self._in_data:
                if self._pos >= len(self._buf):
                    return
                chunk = self._buf[self._pos:]
                self._buf, self._pos = b"", 0
                rest = self._feed_data(chunk)
                if rest is None:
                    return
                self._buf = rest
                continue
            end = self._buf.find(b"\r\n", self._pos)
            if end < 0:
                pending = len(self._buf) - self._pos
                if self._buf.endswith(b"\r"):
                    pending -= 1  # the CR of the CRLF still to come
                if self._discarding or pending > limit - 2:
                    if not self._discarding:
                        self._discarding = True
                        self._error(500, "5.5.2", "Error: line too long")
                    # Keep a final CR: its LF may come in the next segment.
                    self._buf = b"\r" if self._buf.endswith(b"\r") else b""
                    self._pos = 0
                return
            line = self._buf[self._pos:end]
            self._pos = end + 2
            if self._discarding:
                self._discarding = False
                continue
            if len(line) + 2 > limit:
                self._error(500, "5.5.2", "Error: line too long")
                continue
            self._command(line)
            cork = self._cork
            if cork is not None and len(cork) >= MAX_CORKED_REPLIES:
                # A long pipeline: send what it has been answered so far, so that the
                # transport can stop us (pauseProducing) if the client is not reading.
                self._flush()
                self._cork = []

    def _command(self, line: bytes) -> None:
        self._last_record = self._last_activity  # (the time of the input that ended it)
        if b"\r" in line or b"\n" in line:
            self._error(500, "5.5.2", "Error: bare CR or LF in command")
            return
        text = line.decode("latin-1")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _VERBS.get(verb)
        if handler is None:
            if verb in _HTTP_VERBS:
                self.shutdown("4.7.0", "Error: this is an SMTP server")
                return
            self._error(502, "5.5.2", "Error: command not recognized")
            return
        pending = handler(self, arg)
        if pending is not None:
            self._wait(pending)

    def _wait(self, pending: defer.Deferred[None]) -> None:
        """Hold later input until `pending` fires: this keeps pipelined replies in order."""
        pending.addErrback(self._internal_error)
        if pending.called:
            return
        self._paused = True
        self._paused_at = self.clock.seconds()  # the command timeout runs from here
        self._waiting = pending
        pending.addBoth(self._resume)

    def _resume(self, result: object) -> None:
        self._paused = False
        self._waiting = None
        if not self._open:
            return
        if self.clock.seconds() >= self._session_end:
            # The command that waited is answered; nothing behind it runs.
            self._end_session_time()
            return
        # We have answered: the client's silence counts from now.
        self._last_activity = self._last_record = self.clock.seconds()
        self._process()
        self._resume_reading()

    def _resume_reading(self) -> None:
        """Read the socket again unless a command still waits with a large backlog or the
        client still has replies to read."""
        if (self._reading_paused and not self._paused and not self._write_blocked
                and len(self._buf) <= MAX_BACKLOG):
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _internal_error(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            # Past command_timeout, in a command that does not answer that itself.
            self._reset_transaction()
            self.reply(451, "4.3.0", "Error: timeout waiting for the store, try again later")
            return
        log.failure("SMTP command failed", failure)
        self._reset_transaction()
        self.reply(451, "4.3.0", "Error: internal error, try again later")

    def _deadline(self) -> float:
        """When the session times out if nothing happens: `command_timeout` after a command
        began to wait on us, else `idle_timeout` after the client's last input (or our
        last answer), or the end of the session's time if sooner. While a command waits,
        the idle timeout and the session's time do not run out. The idle timeout is the
        factory's: shorter while the server is under stress, and then counted from the
        client's last complete record (a command line, or in DATA a chunk that ends a
        line) or our last answer, as Postfix's `smtpd_per_record_deadline` under stress:
        octets that never end a line do not keep a session. Under stress in DATA, with a
        `stress_min_data_rate`, the budget of `_data_deadline` stands in for the records:
        the message's octets must come at that rate."""
        if self._paused:
            return self._paused_at + self.settings.command_timeout
        factory = self.factory
        if not factory.stressed:
            last = self._last_activity
        elif self._in_data and self.settings.stress_min_data_rate:
            return min(self._data_deadline(), self._session_end)
        else:
            last = self._last_record
        return min(last + factory.idle_timeout, self._session_end)

    def _data_deadline(self) -> float:
        """Under stress in DATA, Postfix's `smtpd_min_data_rate` (with its per-request
        deadline): the idle timeout is a budget that runs down while the client is silent,
        and that each message octet it sends adds 1/`stress_min_data_rate` s to, but never
        past `idle_timeout` after its last read. A client that completes a line every 9 s
        (a slowloris in DATA) gains a few milliseconds a line and is cut some 10 s after
        its 354; one streaming its message faster than the rate is never cut.

        The octets are counted here, when the session's timer looks (at most
        `idle_timeout` apart), not at each read: the relay's DATA path does no more work
        per chunk, under stress or not. So the credit of octets read between two looks is
        capped at the later of their reads rather than at each one's own: a burst gains
        as much as it would have, a little later; the average needed is the same."""
        received = self._data_len
        if received != self._metered:
            credit = (received - self._metered) / self.settings.stress_min_data_rate
            self._metered = received
            self._data_until = min(self._data_until + credit,
                                   self._last_activity + self.factory.idle_timeout)
        return self._data_until

    def _arm_timer(self, now: float) -> None:
        """Schedule the one timer at the deadline, or sooner: at most the shorter of the two
        timeouts from now. A command that starts waiting later has its deadline at least
        `command_timeout` from now, so the timer is never late for it, and neither a
        command nor input has to move the timer (a callLater and a cancel per message)."""
        step = min(self.factory.idle_timeout, self.settings.command_timeout)
        self._timer = self.clock.callLater(
            max(0.0, min(self._deadline(), now + step) - now), self._check_timeouts
        )

    def _check_timeouts(self) -> None:
        self._timer = None
        if not self._open:
            return
        now = self.clock.seconds()
        if now >= self._deadline() - 1e-6:  # (not re-armed for a rounding error's worth)
            if self._paused and self._waiting is not None:
                overdue = self._waiting
                self._overdue(overdue)
                if overdue.called:  # answered (451): the session goes on (the input held
                    # behind it may have started a wait of its own, with its own deadline)
                    if self._open and self._timer is None:
                        self._arm_timer(now)
                    return
            if not self._paused and now >= self._session_end - 1e-6:
                self._end_session_time()
            else:
                self.shutdown("4.4.2", "Error: timeout exceeded")
            return
        self._arm_timer(now)

    def timeouts_changed(self) -> None:
        """The factory's idle timeout was shortened (stress): move the session's timer to
        its new deadline, which may have passed (the session then ends on the reactor's
        next turn, not inside the caller). A session without a timer is ending, or is in
        `_check_timeouts`, which arms the next one with the new timeout. One in DATA
        starts its budget (see `_data_deadline`) at its last read, with the octets it has
        sent so far counted."""
        if self._in_data:
            self._data_until = self._last_activity + self.factory.idle_timeout
            self._metered = self._data_len
        timer = self._timer
        if self._open and timer is not None and timer.active():
            timer.cancel()
            self._arm_timer(self.clock.seconds())

    def _overdue(self, pending: defer.Deferred[None]) -> None:
        """A command waited on the store past `command_timeout`: cancel it. Its coroutine
        answers 451 4.3.0 (the work it waited on goes on: see `SMTPSettings`), and the
        input held behind it is handled. One that does not answer ends the session (421)."""
        self._waiting = None
        log.warn("an SMTP command waited on the store over [smtp] command_timeout "
                 "({timeout:g} s); answered 451", timeout=self.settings.command_timeout)
        pending.cancel()

    def _end_session_time(self) -> None:
        self.shutdown("4.4.2", "Error: session time limit exceeded")

    # -- session commands ----------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._recipients = []
        self._seen = set()
        self._overshoot = 0
        self._declared = 0
        self._short_of_room = set()

    def do_HELO(self, arg: str) -> None:
        self._greet(arg, esmtp=False)

    def do_EHLO(self, arg: str) -> None:
        self._greet(arg, esmtp=True)

    def _greet(self, arg: str, *, esmtp: bool) -> None:
        if self._junk(greeting=self.helo is None):
            return
        name = arg.strip()
        if not name:
            self._error(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        if has_cc(name):
            # A domain or an address literal (RFC 5321 4.1.1.1) holds no control character;
            # one (NUL, ESC, a bare CR) would go on into the log and the store.
            self._error(501, "5.5.2", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname "
                        "(no control characters)")
            return
        self.helo = name
        self.esmtp = esmtp
        self._reset_transaction()
        hostname = self.settings.hostname
        if not esmtp:
            self._write(f"250 {hostname}\r\n")
            return
        lines = [
            hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self._can_start_tls():
            lines.append("STARTTLS")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._write(text)

    def _can_start_tls(self) -> bool:
        return (
            not self.tls
            and self.factory.tls is not None
            and ITLSTransport.providedBy(self.transport)
        )

    def do_STARTTLS(self, arg: str) -> None:
        if arg.strip():
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.tls:
            self._error(503, "5.5.1", "Error: TLS already active")
            return
        if not self._can_start_tls():
            self._error(454, "4.7.0", "Error: TLS not available")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # Pitfall 2 (CVE-2011-0411): whatever came in the clear behind STARTTLS must not
        # be read as if it had come over TLS.
        self._buf = b""
        self._pos = 0
        self._discarding = False
        self._flush()
        self.transport.startTLS(self.factory.tls)  # type: ignore[union-attr]
        self.tls = True
        # A new start (RFC 3207 4.2): the client's greeting and the transaction are
        # forgotten, and the EHLO it needs is not held against it under stress (see
        # _junk). The session's counts of errors and junk commands go on (see __init__).
        self.helo = None
        self.esmtp = False
        self._greeting_counted = False
        self._reset_transaction()

    def do_NOOP(self, arg: str) -> None:
        if self._junk():
            return
        self.reply(250, "2.0.0", "Ok")

    def do_RSET(self, arg: str) -> None:
        if self._junk():
            return
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._open = False
        self._flush()
        self._close()

    def do_VRFY(self, arg: str) -> None:
        if self._junk():
            return
        self.reply(252, "2.5.0", "Cannot VRFY user; send a message and we will try")

    def do_HELP(self, arg: str) -> None:
        if self._junk():
            return
        self.reply(
            214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"
        )

    # -- transaction commands -------------------------------------------------------------

    def do_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self._error(503, "5.5.1", "Error: send HELO/EHLO first")
            return
        if self._mail_from is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return
        try:
            mailbox, params = parse_mail_from(arg)
        except PathError as e:
            self._error(e.code, e.status, e.text)
            return
        declared = 0
        for key, value in params.items():
            if key == "SIZE" and self.esmtp:
                if value is None or not value.isdigit() or len(value) > 20:
                    self._error(501, "5.5.4", "Bad SIZE parameter")
                    return
                if int(value) > self.settings.max_message_size:
                    self._error(552, "5.3.4", "Message size exceeds fixed limit")
                    return
                declared = int(value)
            elif key == "BODY" and self.esmtp:
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(501, "5.5.4", "Bad BODY parameter")
                    return
            else:
                self._error(555, "5.5.4", f"Unsupported parameter {key}")
                return
        self._mail_from = str(mailbox) if mailbox is not None else ""
        self._declared = declared
        self.reply(250, "2.1.0", "Ok")

    def do_RCPT(self, arg: str) -> defer.Deferred[None] | None:
        if self._mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return None
        try:
            mailbox, params = parse_rcpt_to(arg)
        except PathError as e:
            self._error(e.code, e.status, e.text)
            return None
        if params:
            self._error(555, "5.5.4", f"Unsupported parameter {next(iter(params))}")
            return None
        if len(self._recipients) >= self.settings.max_recipients:
            # A sender that gives all its recipients at once (pipelining, as sendmail does)
            # expects 452s and sends the rest later: only far more than it may give is abuse.
            self._overshoot += 1
            if self._overshoot == 1:
                self._overshoot_at = self._last_record
            elif self.factory.stressed:
                # Under stress the 452s after the first buy no time (see _deadline): one
                # every 9 s would keep the session for RECIPIENT_OVERSHOOT x 9 s, past
                # max_session_time, while a pipelining sender's come all at once. (Not
                # before the stress began: a first 452 from before it buys what it began.)
                self._last_record = max(self._overshoot_at, self.factory.stressed_since)
            self._refuse("RCPT", 452, "4.5.3", "Error: too many recipients",
                         recipients=[str(mailbox)], error=self._overshoot > RECIPIENT_OVERSHOOT)
            return None
        reason = relay_refusal(mailbox)
        if reason is not None:
            self._refuse("RCPT", 550, "5.7.1", f"<{mailbox}>: Relaying denied: {reason}",
                         recipients=[str(mailbox)])
            return None
        directory = self.factory.directory
        if not directory.loaded:
            return defer.Deferred.fromCoroutine(self._rcpt_when_loaded(mailbox))
        return self._check_recipient(mailbox)

    async def _rcpt_when_loaded(self, mailbox: Mailbox) -> None:
        try:
            await self.factory.directory.when_loaded()
        except Exception:
            self._refuse("RCPT", 451, "4.3.0", f"<{mailbox}>: Temporary lookup failure",
                         recipients=[str(mailbox)])
            return
        checking = self._check_recipient(mailbox)
        if checking is not None:
            await checking

    def _check_recipient(self, mailbox: Mailbox) -> defer.Deferred[None] | None:
        directory = self.factory.directory
        if not mailbox.domain:
            # <postmaster>: RFC 5321 4.5.1 says accept it; it goes to the configured address.
            self._add_postmaster()
            return None
        domain = directory.lookup(mailbox.domain)
        address = str(mailbox)
        if domain is None:
            self._refuse("RCPT", 550, "5.7.1", f"<{address}>: Relaying denied",
                         recipients=[address])
            return None
        if directory.suspended(mailbox.domain):
            # Its owner is disabled (`mailcore user disable`): a temporary refusal, so the
            # sender keeps the mail and it arrives once the owner is enabled.
            self._refuse("RCPT", 450, "4.2.1",
                         f"<{address}>: Recipient address temporarily unavailable, try again "
                         "later", recipients=[address])
            return None
        if not directory.accepts(mailbox.local_part, mailbox.domain):
            self._refuse("RCPT", 550, "5.1.1",
                         f"<{address}>: Recipient address rejected: User unknown",
                         recipients=[address])
            return None
        if mailbox.local_part.lower() == "postmaster" and directory.postmaster_elsewhere(
                mailbox.domain):
            self._add_postmaster()  # a hosted domain without a postmaster mailbox
            return None
        verifier = self.factory.verifier
        verify = verifier is not None and verifier.wanted(mailbox.local_part, mailbox.domain)
        if self.factory.room is not None or verify:
            return defer.Deferred.fromCoroutine(self._rcpt_checked(address, domain.id, verify))
        self._add_recipient(address, domain.id)
        return None

    async def _rcpt_checked(self, address: str, domain_id: int, verify: bool) -> None:
        """A recipient of a served domain: accepted unless it is a hosted mailbox (of a
        hosted or a relayed domain) without room for the message, or (`verify`) its next
        hop refuses it (see the module docstring)."""
        room: int | None = None
        try:
            if self.factory.room is not None:
                room = await self.factory.room.room(address)
                if room is not None and room < max(self._declared, MIN_STORED):
                    self._refuse("RCPT", 552, "5.2.2",
                                 f"<{address}>: Recipient address rejected: mailbox full",
                                 recipients=[address])
                    return
            if verify:
                assert self.factory.verifier is not None
                verdict = await self.factory.verifier.verify(address, domain_id,
                                                             self._address)
        except defer.CancelledError:  # command_timeout: the store did not answer
            self._refuse("RCPT", 451, "4.3.0", f"<{address}>: Temporary lookup failure",
                         recipients=[address])
            return
        if verify and not self._verified(address, verdict):
            return
        if room is not None:
            self._short_of_room.add(address)
        self._add_recipient(address, domain_id)

    def _verified(self, address: str, verdict: Verdict) -> bool:
        """Whether a recipient stands after its next hop's `verdict`; if not, it is refused
        (550 5.1.1 when the next hop refused it; 450 4.1.1 when it gave no answer and
        `verify_unreachable` is "defer")."""
        if verdict.undeliverable:
            self._refuse("RCPT", 550, "5.1.1",
                         f"<{address}>: Recipient address rejected: undeliverable address "
                         f"({verdict.reply})", recipients=[address])
            return False
        if verdict.unknown and self.settings.verify_unreachable == "defer":
            self._refuse("RCPT", 450, "4.1.1",
                         f"<{address}>: Recipient address rejected: unverified address "
                         f"({verdict.reply})", recipients=[address])
            return False
        return True

    def _add_postmaster(self) -> None:
        """Accept the operator's postmaster (`[smtp] postmaster`) as the recipient: in a
        served domain it goes to that domain's next hop or mailbox, else it is routed like
        a foreign recipient."""
        postmaster = self.factory.postmaster
        served = self.factory.directory.lookup(postmaster.domain)
        self._add_recipient(str(postmaster), served.id if served is not None else None)

    def _add_recipient(self, address: str, domain_id: int | None) -> None:
        """Accept a recipient, once: the same local part at the same domain is one
        recipient. Domains are compared without case (DNS), local parts exactly (RFC 5321
        2.4: the next hop may tell Bob from bob), except `postmaster`, which RFC 5321 4.5.1
        makes case-insensitive."""
        local, _, domain = address.rpartition("@")
        if len(local) == 10 and local.lower() == "postmaster":
            local = "postmaster"
        key = (local, domain.lower())
        if key not in self._seen:
            self._seen.add(key)
            self._recipients.append(Recipient(address=address, domain_id=domain_id))
        elif self._junk():
            return
        self.reply(250, "2.1.5", "Ok")

    def do_DATA(self, arg: str) -> None:
        if arg.strip():
            self._error(501, "5.5.4", "Syntax: DATA")
            return
        if self._mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return
        if not self._recipients:
            self._error(554, "5.5.1", "Error: no valid recipients")
            return
        self._write("354 End data with <CR><LF>.<CR><LF>\r\n")
        self._in_data = True
        self._body = bytearray()
        self._data_len = 0
        self._data_until = self._last_record + self.factory.idle_timeout  # (our 354)
        self._metered = 0
        self._tail = b"\r\n"  # DATA's own CRLF: a message may be just ".\r\n"
        self._overflow = False
        self._no_room = False
        self._hops = ReceivedCounter(stuffed=True)
        self._looping = False
        self._counts = _Counts()

    # -- DATA -----------------------------------------------------------------------------

    def _feed_data(self, chunk: bytes) -> bytes | None:
        """Take message bytes; at CRLF.CRLF finish the message and return what follows."""
        if b"\n" in chunk:  # (found within a line's length: no pass over the chunk)
            self._last_record = self._last_activity  # it ends a line: see _deadline
        tail = self._tail
        boundary = (tail + chunk[:4]).find(END_OF_DATA)
        if 0 <= boundary < len(tail):
            at = boundary - len(tail)  # the marker began in earlier data
        else:
            found = chunk.find(END_OF_DATA)
            if found < 0:
                self._store(chunk)
                self._tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
                return None
            at = found
        body_end = at + 2  # the CRLF before the dot belongs to the message
        if body_end >= 0:
            self._store(chunk[:body_end])
        else:
            self._trim(-body_end)
        rest = chunk[at + len(END_OF_DATA):]
        self._end_of_data()
        return rest

    def _store(self, piece: bytes) -> None:
        if not piece:
            return
        # The size is the message's, without the dots doubled for transparency (RFC 1870:
        # SIZE= and our limit count the message, not its DATA stream). A "\r\n." split
        # across reads begins in the last octets stored before this piece (the tail).
        stuffed = piece.count(b"\r\n.") + (self._tail[-2:] + piece[:2]).count(b"\r\n.")
        self._data_len += len(piece) - stuffed
        if self._overflow or self._looping or self._no_room:
            return
        counts = self._counts
        counts.stuffed += stuffed
        counts.cr += piece.count(b"\r")
        counts.lf += piece.count(b"\n")
        counts.crlf += piece.count(b"\r\n") + (self._tail[-1:] == b"\r" and piece[0] == 10)
        counts.nul = counts.nul or b"\x00" in piece
        # (+ 1: the CR of an end marker split across reads, "\r\n.\r", is counted until
        # `_trim` takes it back; `_end_of_data` checks the exact size.)
        if self._data_len > self.settings.max_message_size + 1:
            self._overflow = True
            self._drop_body()
            return
        hops = self._hops
        if hops.in_header:
            hops.feed(piece)
            # With the Received field we would add: more than max_hops is a loop.
            if hops.count + 1 > self.settings.max_hops:
                self._looping = True
                self._drop_body()
                return
        if not self.factory.memory.hold(self._address, self._held, len(piece)):
            self._no_room = True
            self._drop_body()
            return
        self._held += len(piece)
        self._body += piece

    def _drop_body(self) -> None:
        """Let the message's octets go, and their count in the factory's `memory`."""
        self._body = bytearray()
        self.factory.memory.let_go(self._address, self._held)
        self._held = 0

    def _trim(self, count: int) -> None:
        """Drop the last `count` stored octets (part of an end marker split across reads):
        its dot, which `_store` did not count (it follows a CRLF), and what came after it."""
        self._data_len -= count - 1
        start = max(0, len(self._body) - count)
        counts = self._counts
        counts.stuffed -= 1  # that dot
        counts.cr -= self._body.count(b"\r", start)  # a CR whose LF was not stored
        released = min(self._held, len(self._body) - start)
        self.factory.memory.let_go(self._address, released)
        self._held -= released
        del self._body[start:]

    def _end_of_data(self) -> None:
        """The message is complete: check it, then hand it to the sink (asynchronously)."""
        self._in_data = False
        body, self._body = self._body, bytearray()
        held, self._held = self._held, 0  # counted until the spool has it (see _queue)
        overflow = self._overflow or self._data_len > self.settings.max_message_size
        looping = self._looping
        counts = self._counts
        mail_from, recipients = self._mail_from or "", tuple(self._recipients)
        short_of_room = self._short_of_room
        self._reset_transaction()
        addresses = [r.address for r in recipients]

        def refuse(code: int, status: str, text: str) -> None:
            self.factory.memory.let_go(self._address, held)
            self._refuse("DATA", code, status, text, recipients=addresses, mail_from=mail_from)

        if overflow:
            refuse(552, "5.3.4", "Error: message size exceeds fixed limit")
            return
        if looping:
            # Counted as the client sent it: ours would be one more.
            refuse(554, "5.4.6", f"Too many hops (more than {self.settings.max_hops - 1} "
                                 "Received header fields); message refused")
            return
        if self._no_room:
            refuse(452, "4.3.1", "Error: insufficient system storage, try again later")
            return
        queue_id = new_queue_id(self.clock.seconds())
        header = received_header(
            helo=self.helo or "",
            client_ip=self.client_ip,
            hostname=self.settings.hostname,
            protocol=received_protocol(esmtp=self.esmtp, tls=self.tls),
            queue_id=queue_id,
            recipients=recipients,
            when=self.clock.seconds(),
        )
        if counts.cr != counts.crlf or counts.lf != counts.crlf:
            # Pitfall 6: a bare CR or LF could end the message early at a next hop.
            refuse(550, "5.5.2", "Error: bare CR or LF in message data; message refused")
            return
        # The message's first octet, its dot-stuffing undone (RFC 5321 4.5.2).
        first = body[1:2] if body[:1] == b"." else body[:1]
        data = b"".join([header, body])  # (the header: CRLF-terminated lines, no dot)
        del body
        stuffed = counts.stuffed > 0
        if stuffed:
            # Undo dot-stuffing (RFC 5321 4.5.2); a line may still begin with a dot. Before
            # the lines are measured: their limit does not count that dot (4.5.3.1.6).
            data = data.replace(b"\r\n.", b"\r\n")
        if _line_too_long(data, len(header), self.settings.max_line_length):
            refuse(500, "5.5.2", "Error: line too long; message refused")
            return
        if counts.nul:
            # Not text (RFC 5322 3.5): refused rather than stripped (module docstring).
            refuse(554, "5.6.0", "Error: NUL character in message data; message refused")
            return
        if first in (b" ", b"\t"):
            # A header section cannot begin with a continuation line (RFC 5322 2.2.3): it
            # would fold into our Received field, which would then carry the client's text.
            refuse(554, "5.6.0", "Error: message begins with a folded line (white space); "
                                 "message refused")
            return
        if stuffed:
            data = CRLFBody(data)  # checked: no bare CR or LF
        else:
            # No line begins with a dot and the hops were counted (see AcceptedBody).
            data = AcceptedBody(data)
        envelope = Envelope(
            mail_from=mail_from,
            recipients=recipients,
            client_ip=self.client_ip,
            helo=self.helo or "",
            tls=self.tls,
        )
        # Only when every recipient's room was known at RCPT can it fit none of them.
        check_room = all(r.address in short_of_room for r in recipients)
        self._wait(defer.Deferred.fromCoroutine(
            self._queue(queue_id, envelope, data, held, check_room=check_room)))

    async def _queue(self, queue_id: str, envelope: Envelope, data: bytes,
                     held: int = 0, *, check_room: bool = False) -> None:
        """Hand the message to the spool and answer; its `held` octets count in the
        factory's `memory` until then. With `check_room`, first refuse it if it fits in
        none of its recipients' mailboxes."""
        try:
            if check_room:
                try:
                    fits = await self._fits_somewhere(envelope, len(data))
                except defer.CancelledError:  # command_timeout: the store did not answer
                    self._refuse("DATA", 451, "4.3.0", "Error: timeout waiting for the "
                                 "store, try again later",
                                 recipients=[r.address for r in envelope.recipients],
                                 mail_from=envelope.mail_from)
                    return
                if not fits:
                    self._refuse("DATA", 552, "5.2.2", "Error: mailbox full (no room for "
                                 f"the {len(data)} octets of the message); message refused",
                                 recipients=[r.address for r in envelope.recipients],
                                 mail_from=envelope.mail_from)
                    return
            await self._commit(queue_id, envelope, data)
        finally:
            self.factory.memory.let_go(self._address, held)

    async def _fits_somewhere(self, envelope: Envelope, size: int) -> bool:
        """Whether one of the recipients' mailboxes has room for `size` octets now (or may
        have: its room is no longer known to be short), as their delivery will ask."""
        room = self.factory.room
        if room is None:
            return True
        for recipient in envelope.recipients:
            left = await room.room(recipient.address)
            if left is None or left >= size:
                return True
        return False

    async def _commit(self, queue_id: str, envelope: Envelope, data: bytes) -> None:
        sink = self.factory.sink
        try:
            if sink is None:
                raise RuntimeError("no spool is configured")
            await sink.accept(queue_id, envelope, data)
        except defer.CancelledError:
            # command_timeout: the spool did not confirm the commit in time. The message is
            # withdrawn, or its commit (under way) may still land (see SMTPSettings).
            self.reply(451, "4.3.0", "Error: message not confirmed in time, try again later")
            maillog.refused("DATA", "451 4.3.0 message not confirmed in time",
                            client=self.client_ip, mail_from=envelope.mail_from,
                            queue_id=queue_id,
                            recipients=[r.address for r in envelope.recipients])
            return
        except Exception as e:
            if not isinstance(e, SpoolError):  # (the spool logs why its commits fail)
                log.failure("could not queue message {queue_id}", queue_id=queue_id)
            self.reply(451, "4.3.0", "Error: queue file write error, try again later")
            maillog.refused("DATA", "451 4.3.0 queue file write error", client=self.client_ip,
                            mail_from=envelope.mail_from, queue_id=queue_id,
                            recipients=[r.address for r in envelope.recipients])
            return
        self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        self._junk_commands = 0  # as Postfix: a session that delivers mail is no junk
        self._greetings = 0
        maillog.accepted(queue_id, client=envelope.client_ip, helo=envelope.helo,
                         mail_from=envelope.mail_from, size=len(data),
                         recipients=[r.address for r in envelope.recipients], tls=envelope.tls)


def stress_gauge(registry: CollectorRegistry) -> Gauge:
    """The /metrics gauge of the inbound server's stress (see SMTPServerFactory)."""
    return Gauge("mailcore_smtp_stress",
                 "1 while the inbound SMTP server is under stress (its open sessions reached "
                 "80 % of [smtp] max_connections, until below 60 %): shorter idle timeout, "
                 "error and junk command limits", registry=registry)


def _normalise_ip(host: str) -> str:
    """The client address as text; IPv4-mapped IPv6 addresses become plain IPv4."""
    if ":" not in host and host.count(".") == 3:
        return host  # the kernel's dotted quad is already canonical (the common case)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


_VERBS: dict[str, Handler] = {
    "HELO": ESMTPServerProtocol.do_HELO,
    "EHLO": ESMTPServerProtocol.do_EHLO,
    "STARTTLS": ESMTPServerProtocol.do_STARTTLS,
    "MAIL": ESMTPServerProtocol.do_MAIL,
    "RCPT": ESMTPServerProtocol.do_RCPT,
    "DATA": ESMTPServerProtocol.do_DATA,
    "RSET": ESMTPServerProtocol.do_RSET,
    "NOOP": ESMTPServerProtocol.do_NOOP,
    "QUIT": ESMTPServerProtocol.do_QUIT,
    "VRFY": ESMTPServerProtocol.do_VRFY,
    "HELP": ESMTPServerProtocol.do_HELP,
}


# -- the factory -----------------------------------------------------------------------


class SMTPServerFactory(ServerFactory):
    """Builds sessions and enforces the connection limits (total and per client address).

    Stress (Postfix's, STRESS_README): while `max_connections` is nearly taken, sessions
    that do nothing useful give their slots to those that do. From STRESS_ENTER (80 %) of
    `max_connections` open sessions until fewer than STRESS_LEAVE (60 %) are (never with
    a `max_connections` below STRESS_MIN_CONNECTIONS, 10), every session, those open
    already included, has `stress_idle_timeout` (10 s) instead of
    `idle_timeout`, counted not from its last octet but from its last complete record (a
    command line, or in DATA with `stress_min_data_rate` 0 a chunk that ends a line) or
    our last answer, as Postfix's `smtpd_per_record_deadline` under stress (RCPTs
    answered 452 for too many recipients, after the first, are no such record); in DATA,
    instead, the message must come at
    `stress_min_data_rate` (500 octets a second), as with Postfix's
    `smtpd_min_data_rate`; and `stress_max_errors` and `stress_max_junk_commands` (1 each)
    stand in for `max_errors` and `max_junk_commands`: a slowloris holding its sessions
    with an octet every few seconds or minutes, or with a line every 9 s in DATA, is cut
    within seconds, a sender whose commands and message keep coming is not, and a message
    being committed is answered first (a command waiting on us has `command_timeout`).
    Each change is logged once, and /metrics shows it, `mailcore_smtp_stress`. The
    sessions read the three values from the factory (`idle_timeout`, `max_errors`,
    `max_junk_commands`), so stress costs them nothing per octet (an assignment per
    command line, and per DATA chunk that holds a line end; DATA's rate is counted when
    a session's timer fires, not per chunk).
    """

    def __init__(
        self,
        settings: SMTPSettings,
        directory: RecipientDirectory,
        sink: MessageSink | None,
        clock: IReactorTime,
        *,
        tls: Any = None,
        room: MailboxRoom | None = None,
        verifier: RecipientVerifier | None = None,
        stress_gauge: Gauge | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.sink = sink
        self.clock = clock
        self.tls = tls  # an IOpenSSLContextFactory (CertificateOptions) for STARTTLS, or None
        self.room = room  # the room hosted mailboxes have left (None: not checked at RCPT)
        self.verifier = verifier  # asks next hops about recipients (None: they are not)
        self.postmaster = postmaster_mailbox(settings)  # where <postmaster> goes
        if "." not in self.postmaster.domain:
            log.warn("mail to <postmaster> goes to {address}, which has no next hop: set "
                     "[smtp] postmaster (or a hostname whose mail reaches you)",
                     address=str(self.postmaster))
        self.counter = ConnectionCounter(settings.max_connections,
                                         settings.max_connections_per_ip)
        self.memory = DataMemory(settings)  # the octets of DATA the sessions hold
        self.close_grace = CLOSE_GRACE
        # Stress: the limits sessions read now, the admitted sessions (to shorten their
        # timers when stress begins), and the open sessions at which it begins and below
        # which it ends.
        self.idle_timeout = settings.idle_timeout
        self.max_errors = settings.max_errors
        self.max_junk_commands = settings.max_junk_commands
        self.stressed = False
        self.stressed_since = 0.0
        self.sessions: set[ESMTPServerProtocol] = set()
        # (Below STRESS_MIN_CONNECTIONS stress_at is past max_connections: never reached.
        # Leaving takes at least two sessions fewer than entering: hysteresis.)
        if settings.max_connections < STRESS_MIN_CONNECTIONS:
            self.stress_at = settings.max_connections + 1
        else:
            self.stress_at = math.ceil(settings.max_connections * STRESS_ENTER)
        self.calm_below = max(1, min(math.ceil(settings.max_connections * STRESS_LEAVE),
                                     self.stress_at - 1))
        self.stress_gauge = stress_gauge
        if stress_gauge is not None:
            stress_gauge.set(0)

    @property
    def connections(self) -> int:
        """Sessions open now."""
        return self.counter.total

    @property
    def per_ip(self) -> dict[str, int]:
        """Sessions open now, by client address."""
        return self.counter.by_address

    def buildProtocol(self, addr: Any) -> ESMTPServerProtocol:  # type: ignore[override]
        return ESMTPServerProtocol(self)

    def admit(self, session: ESMTPServerProtocol) -> str | None:
        """Count a new session in, or say why it must be refused (421)."""
        refusal = self.counter.admit(session.client_ip or None)
        if refusal is not None:
            return f"Error: {refusal}"
        self.sessions.add(session)
        if self.counter.total >= self.stress_at and not self.stressed:
            self._stress(True)
        return None

    def release(self, session: ESMTPServerProtocol) -> None:
        """Count a finished session out."""
        self.counter.release(session.client_ip or None)
        self.sessions.discard(session)
        if self.stressed and self.counter.total < self.calm_below:
            self._stress(False)

    def _stress(self, on: bool) -> None:
        """Enter or leave stress (see the class docstring): the limits the sessions read
        change; on entering, every session's timer moves to its shortened deadline."""
        settings = self.settings
        self.stressed = on
        now = self.clock.seconds()
        if on:
            self.stressed_since = now
            self.idle_timeout = min(settings.stress_idle_timeout, settings.idle_timeout)
            self.max_errors = min(settings.stress_max_errors, settings.max_errors)
            self.max_junk_commands = min(settings.stress_max_junk_commands,
                                         settings.max_junk_commands)
            log.warn("SMTP server under stress: {open} of [smtp] max_connections ({max}) "
                     "sessions open; idle timeout {idle:g} s, {errors} error(s) and "
                     "{junk} junk command(s) per session until fewer than {calm} are open",
                     open=self.counter.total, max=settings.max_connections,
                     idle=self.idle_timeout, errors=self.max_errors,
                     junk=self.max_junk_commands, calm=self.calm_below)
            for session in list(self.sessions):
                session.timeouts_changed()
        else:
            self.idle_timeout = settings.idle_timeout
            self.max_errors = settings.max_errors
            self.max_junk_commands = settings.max_junk_commands
            # (The sessions' timers, armed for the short timeout, find their deadlines
            # later when they fire and are armed again.)
            log.info("SMTP server no longer under stress, after {duration:.0f} s: {open} of "
                     "[smtp] max_connections ({max}) sessions open",
                     duration=now - self.stressed_since, open=self.counter.total,
                     max=settings.max_connections)
        if self.stress_gauge is not None:
            self.stress_gauge.set(1 if on else 0)

"""The outbound ESMTP client: one connection to a next hop, many transactions on it.

Written on LineReceiver rather than on `twisted.mail.smtp.ESMTPClient` so that the things
that matter for a relay are ours: dot-stuffing that holds across chunks (pitfall 1),
PIPELINING, multi-line reply parsing, timeouts on the injected clock, a result per
recipient, and STARTTLS whose failure the caller can answer by retrying in cleartext instead
of giving up (pitfall 9).

Each reply of a transaction is judged by what RFC 5321 4.3.2 lets its command be answered
with: a success (MAIL 250, RCPT 250 or 251, DATA 354, the end of the data 2yz), a refusal
(4yz temporary, 5yz permanent), or anything else, which is the next hop breaking the
protocol (a 250 to DATA: no body went out; a 354 to RCPT or after the body): that is a
temporary failure of ours (`protocol_error`, "4.5.0 protocol error: …") and the session is
dropped, as no later reply on it can be trusted. A reply that comes while our DATA stream is
still being written (the reactor reads between its chunks) stops the stream and drops the
session: a refusal stands, a success is such a protocol error (`early_reply`).

Usage: connect with `client_factory(...)` and make an `SMTPSession` of the protocol (as
`mailcore.queue.connector` does); `handshake()` reads the greeting and says EHLO,
`starttls(...)` when asked; then `send(...)` per message and `quit()`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.interfaces import IReactorTime as _IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailcore.netwrite import write_now
from mailcore.pacing import Pacer
from mailcore.smtp.dotstuff import TERMINATOR, AcceptedBody, CRLFBody, DotStuffer

WRITE_CHUNK = 65536
# A DATA stream gives the reactor a turn after this many bytes (`write_paced`).
TURN_BYTES = 256 * 1024

# The most one reply may hold (an EHLO reply has a line per extension, a dozen or two): past
# either, the reply fails as a protocol error and the connection is dropped. A line is at
# most SMTPClientProtocol.MAX_LENGTH.
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 65536
# After QUIT, how long the next hop has to close its end (over TLS: to answer our
# close_notify, which Twisted's TLS waits for before closing the socket) before the
# connection is dropped.
CLOSE_GRACE = 10.0
# How long the reply to QUIT is awaited (a message's work is done by then: the connection
# holds its slots only to be polite), not command_timeout.
QUIT_TIMEOUT = 10.0


class SMTPClientError(Exception):
    """A session-level failure: the connection or the dialogue broke (not a reply)."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class ReplyTimeout(SMTPClientError):
    """The server did not answer within the timeout."""


class ConnectionLostError(SMTPClientError):
    """The connection closed while a reply was awaited."""


class TLSFailed(SMTPClientError):
    """STARTTLS was refused or the TLS handshake failed."""


class ProtocolError(SMTPClientError):
    """The next hop's reply broke the protocol (one too long): the connection is dropped
    and the mail retried (the message is a "4.5.0 protocol error: …" text of ours)."""


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) server reply, or (`protocol_error`) our temporary failure
    standing for a reply its command does not allow."""

    code: int
    lines: tuple[str, ...]
    protocol_error: bool = False

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        if self.protocol_error:
            return self.text  # our words, not the next hop's: no reply code in front
        return f"{self.code} {self.text}".strip()

    @property
    def ok(self) -> bool:
        """A positive completion (2yz); the session lets only its command's successes by."""
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


# RFC 5321 4.3.2: the success replies of each command of a transaction. 252 is not RCPT's:
# the table gives it to VRFY and EXPN only ("cannot VRFY user, but will accept message",
# 3.5.3), so a 252 to RCPT is taken as a protocol error like any other stray code. After
# the data any 2yz is success: 4.2.5 makes every 2yz there the next hop's acceptance of
# responsibility, and retrying it would deliver the message twice.
RSET_OK = frozenset({250})
MAIL_OK = frozenset({250})
RCPT_OK = frozenset({250, 251})
DATA_OK = frozenset({354})
END_OK = frozenset(range(200, 300))


def protocol_error_reply(code: int, command: str) -> Reply:
    """Our temporary failure for a reply `command` does not allow (the peer's text is not
    quoted: `code` is three digits, `command` our own word)."""
    return Reply(451, (f"4.5.0 protocol error: {code} in reply to {command}",),
                 protocol_error=True)


def early_reply(reply: Reply) -> Reply:
    """The outcome of a reply that came before the end of our DATA stream: a refusal
    stands (a 552 or 421 cutting a message short is one); anything else is a protocol
    error, as nothing can have accepted a message not all sent yet."""
    if 400 <= reply.code < 600:
        return reply
    return Reply(451, (f"4.5.0 protocol error: {reply.code} before the end of the data",),
                 protocol_error=True)


def judge(reply: Reply, success: frozenset[int], command: str) -> Reply:
    """`reply` when it is one of `success` or a refusal (4yz, 5yz); else a protocol error."""
    if reply.code in success or 400 <= reply.code < 600:
        return reply
    return protocol_error_reply(reply.code, command)


@dataclass
class TransactionResult:
    """The replies of one mail transaction; `for_recipient` gives each recipient's outcome."""

    mail: Reply
    rcpts: list[Reply]
    data: Reply | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def for_recipient(self, index: int) -> Reply:
        """The reply that decides recipient `index`: the first failure on its path, or DATA."""
        if not self.mail.ok:
            return self.mail
        rcpt = self.rcpts[index]
        if not rcpt.ok:
            return rcpt
        assert self.data is not None
        return self.data


class _Awaited:
    """Who waits for the next `count` replies: one Deferred for a single reply, or one for a
    whole pipelined group (firing with the list), instead of one Deferred per command."""

    __slots__ = ("count", "deferred", "group", "replies", "timeout")

    def __init__(self, count: int, timeout: float, group: bool) -> None:
        self.count = count
        self.timeout = timeout
        self.group = group
        self.replies: list[Reply] = []
        self.deferred: defer.Deferred[Any] = defer.Deferred()


class SMTPClientProtocol(LineReceiver):
    """The wire side: writes commands, parses replies in order, enforces timeouts.

    A reply has one deadline, its wait's timeout from when its command was sent (from the
    previous reply's end for the later replies of a pipelined group, which the server
    answers in order): continuation lines do not extend it. A reply is at most
    MAX_REPLY_LINES lines and MAX_REPLY_BYTES octets. Input while no reply is awaited (an
    idle pooled connection), or still in hand when we write (see _in_step), is discarded
    and the connection dropped: a next hop that talks unasked is out of step with us.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self, clock: _IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._waiting: deque[_Awaited] = deque()
        self._lines: list[str] = []
        self._reply_bytes = 0
        self._timer: IDelayedCall | None = None
        self._deadline = 0.0
        self._lost: Failure | None = None
        # Set once we drop or close the connection (an abort's connectionLost comes later):
        # nothing more is sent on it.
        self.closing = False
        self.connected_deferred: defer.Deferred[SMTPClientProtocol] = defer.Deferred()
        self.tls_started = False
        self._close_timer: IDelayedCall | None = None

    # -- connection events --------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_deferred.callback(self)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self._lost = reason
        self.closing = True
        self._cancel_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        waiting, self._waiting = self._waiting, deque()
        message = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
        error_cls = TLSFailed if self.tls_started and not self._lines_after_tls else (
            ConnectionLostError
        )
        for w in waiting:
            w.deferred.errback(error_cls(f"connection lost: {message}"))

    _lines_after_tls = False

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail_all(SMTPClientError("reply line too long"))
        self.abort()

    def lineReceived(self, line: bytes) -> None:
        if not self._waiting:
            # Unsolicited (a 421 before closing, or a peer out of step): dropped with the
            # connection, whose next command could only be answered by this. On one we
            # are closing, the rest of the input is dropped: over TLS reads go on until
            # the hop's close_notify (up to CLOSE_GRACE), and LineReceiver, which stops
            # after a line once the transport is disconnecting, kept all but one line of
            # each read in its buffer (what a hop sent after QUIT piled up in memory).
            if not self.closing:
                self.abort()
            else:
                self.clearLineBuffer()
            return
        if self.tls_started:
            self._lines_after_tls = True
        text = line.decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit():
            # (bytes.isdigit is ASCII's 0-9 only: str.isdigit let "²50" through to an
            # int() that raised out of dataReceived, and read "٢٥٠" as 250)
            self._fail_all(SMTPClientError(f"malformed reply: {text[:80]!r}"))
            self.abort()
            return
        self._reply_bytes += len(line)
        if self._reply_bytes > MAX_REPLY_BYTES or len(self._lines) >= MAX_REPLY_LINES:
            self._fail_all(ProtocolError(
                f"4.5.0 protocol error: a reply of more than {MAX_REPLY_LINES} lines or "
                f"{MAX_REPLY_BYTES} octets"))
            self.abort()
            return
        self._lines.append(text[4:])
        if len(text) > 3 and text[3] == "-":
            return  # the reply's deadline stands: more lines do not extend it
        reply = Reply(int(line[:3]), tuple(self._lines))
        self._lines = []
        self._reply_bytes = 0
        w = self._waiting[0]
        w.replies.append(reply)
        if len(w.replies) < w.count:
            self._arm_timer()
            return
        self._waiting.popleft()
        self._arm_timer()
        w.deferred.callback(w.replies if w.group else reply)

    # -- sending ------------------------------------------------------------------------

    @property
    def is_lost(self) -> bool:
        return self._lost is not None

    def expect(self, timeout: float | None = None) -> defer.Deferred[Reply]:
        """A Deferred for the next reply not yet claimed (replies come in command order)."""
        return self._await(1, timeout, group=False)

    def expect_group(self, count: int, timeout: float | None = None) -> defer.Deferred[
        list[Reply]
    ]:
        """One Deferred for the next `count` replies (a pipelined group), as a list."""
        return self._await(count, timeout, group=True)

    def _await(self, count: int, timeout: float | None, *, group: bool) -> defer.Deferred[Any]:
        w = _Awaited(count, self.timeout if timeout is None else timeout, group)
        if self._lost is not None:
            w.deferred.errback(
                ConnectionLostError(f"connection lost: {self._lost.getErrorMessage()}")
            )
            return w.deferred
        self._waiting.append(w)
        if len(self._waiting) == 1:
            self._arm_timer()
        return w.deferred

    def write_lines(self, *lines: bytes) -> None:
        if self._in_step():
            write_now(self.transport, b"".join(line + b"\r\n" for line in lines))

    def write_raw(self, data: bytes) -> None:
        if self._in_step():
            write_now(self.transport, data)

    def _in_step(self) -> bool:
        """Whether to write: not on a connection we dropped, and not while input waits
        unparsed. Replies come only to what was sent, so bytes in hand as we write (the rest
        of the read that held the reply we are acting on, or a partial line that came
        unasked) are the peer out of step: they would be read as the answer to what we are
        about to send (a message the hop refused, or never saw, recorded as delivered). The
        connection is dropped instead; the replies already read stand. STARTTLS discards
        what came before the switch (start_tls), so it writes on."""
        if self.closing:
            return False
        if self._buffer:
            self.abort()
            return False
        return True

    def abort(self) -> None:
        """Drop the connection, and what is left of the read in hand: a TCP transport's
        abortConnection does not stop LineReceiver's loop over it (it checks
        `disconnecting`, which only loseConnection sets), which split the rest of a 64 KiB
        read line by line for nothing (42 ms of reactor time for 21,845 short lines)."""
        self.closing = True
        self.clearLineBuffer()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the connection, and drop it if it is not gone CLOSE_GRACE seconds later: a
        TLS close waits for the next hop's close_notify, and one that neither answers it
        nor closes its end held the socket (and a descriptor of ours) for ever."""
        self.closing = True
        if not self._waiting:
            self._cancel_timer()  # (the lazy reply timer, waiting for nothing)
        if self.transport is None or self._lost is not None:
            return
        self.transport.loseConnection()
        if self._close_timer is None:
            self._close_timer = self.clock.callLater(CLOSE_GRACE, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self._lost is None:
            self.abort()

    def start_tls(self, creator: IOpenSSLClientConnectionCreator) -> None:
        """Switch to TLS; bytes the server sent before the switch are discarded."""
        self.clearLineBuffer()
        self._lines = []
        self._reply_bytes = 0
        self.tls_started = True
        self.transport.startTLS(creator)  # type: ignore[union-attr]

    # -- timeouts -----------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """Start the reply timeout for the oldest awaited reply (its command was just sent,
        or the reply before it just ended).

        One DelayedCall per connection, moved lazily: arming only records a deadline, and
        the call re-schedules itself when it fires early (a reply per command would
        otherwise cost a callLater and a cancel each). A deadline earlier than the call
        (a command's after the data phase's longer wait) moves the call back to it.
        """
        if not self._waiting:
            return
        seconds = self._waiting[0].timeout
        self._deadline = self.clock.seconds() + seconds
        if self._timer is None:
            self._timer = self.clock.callLater(seconds, self._check_deadline)
        elif self._timer.getTime() > self._deadline:
            # Set for a longer wait (the data phase's): a shorter one must not wait for it.
            self._timer.reset(seconds)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        remaining = self._deadline - self.clock.seconds()
        if remaining > 0:
            self._timer = self.clock.callLater(remaining, self._check_deadline)
            return
        self._timed_out()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail_all(ReplyTimeout("timed out waiting for the server's reply"))
        self.abort()

    def _fail_all(self, error: Exception) -> None:
        self._cancel_timer()
        self._lines = []
        self._reply_bytes = 0
        waiting, self._waiting = self._waiting, deque()
        for w in waiting:
            w.deferred.errback(error)


class SMTPSession:
    """A conversation with one next hop, after greeting and EHLO: send messages, then quit."""

    def __init__(self, protocol: SMTPClientProtocol, *, helo_name: str, data_timeout: float):
        self.protocol = protocol
        self.helo_name = helo_name
        self.data_timeout = data_timeout
        self.extensions: dict[str, str] = {}
        self.greeting: Reply | None = None
        self.tls = False
        self.transactions = 0
        # A transaction may still be open at the server (MAIL sent, no end of data since):
        # the next one starts with RSET. After a completed DATA phase there is none.
        self.in_transaction = False

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def usable(self) -> bool:
        return not self.protocol.closing

    async def handshake(self) -> None:
        """Read the greeting and say EHLO (HELO if EHLO is refused)."""
        self.greeting = await self.protocol.expect()
        if self.greeting.code != 220:
            raise SMTPClientError(f"greeting: {self.greeting}", code=self.greeting.code)
        await self.ehlo()

    async def ehlo(self) -> None:
        reply = await self._command(b"EHLO " + self.helo_name.encode("ascii", "replace"))
        if reply.code == 250:
            self.extensions = parse_extensions(reply)
            return
        if 500 <= reply.code < 600:
            reply = await self._command(b"HELO " + self.helo_name.encode("ascii", "replace"))
            if reply.code == 250:
                self.extensions = {}
                return
        raise SMTPClientError(f"EHLO: {reply}", code=reply.code)

    async def starttls(self, creator: IOpenSSLClientConnectionCreator) -> None:
        """STARTTLS then EHLO again; any failure raises TLSFailed (the caller may go cleartext)."""
        reply = await self._command(b"STARTTLS")
        if reply.code != 220:
            raise TLSFailed(f"STARTTLS refused: {reply}", code=reply.code)
        self.protocol.start_tls(creator)
        try:
            await self.ehlo()
        except TLSFailed:
            raise
        except SMTPClientError as e:
            raise TLSFailed(f"after STARTTLS: {e}", code=e.code) from e
        self.tls = True

    async def send(self, mail_from: str, recipients: list[str], body: bytes) -> TransactionResult:
        """One mail transaction; pipelined when the server offers PIPELINING. It starts with
        RSET when the previous one on this session did not end with a DATA phase.

        A body holding 8-bit octets goes out with BODY=8BITMIME when the server offers
        8BITMIME (RFC 6152). To a server that does not, the queue runner converts it to 7
        bit first (mailcore.smtp.sevenbit); what it cannot convert (8-bit header fields)
        goes out as it is.

        An address holding a control character (CR and LF above all, which would end the
        command line and start another) is never written: such a recipient gets a 553 of
        ours, and such a sender refuses the whole transaction. Our inputs never let one in
        (the SMTP server's parser, the checked configuration); this is the last guard."""
        if _unsafe(mail_from):
            refused = Reply(553, ("5.1.7 sender address holds a control character; not sent",))
            return TransactionResult(refused, [refused] * len(recipients))
        bad = [i for i, r in enumerate(recipients) if _unsafe(r)]
        if not bad:
            return await self._transaction(mail_from, recipients, body)
        refused = Reply(553, ("5.1.3 recipient address holds a control character; not sent",))
        good = [r for i, r in enumerate(recipients) if i not in bad]
        if not good:
            return TransactionResult(refused, [refused] * len(recipients))
        result = await self._transaction(mail_from, good, body)
        replies = iter(result.rcpts)
        result.rcpts = [refused if i in bad else next(replies) for i in range(len(recipients))]
        return result

    async def _transaction(
        self, mail_from: str, recipients: list[str], body: bytes
    ) -> TransactionResult:
        p = self.protocol
        reset_first = self.in_transaction
        self.in_transaction = True
        mail = b"MAIL FROM:<" + mail_from.encode("utf-8") + b">"
        if "SIZE" in self.extensions:
            mail += b" SIZE=%d" % len(body)
        if "8BITMIME" in self.extensions and not body.isascii():
            mail += b" BODY=8BITMIME"
        rcpts = [b"RCPT TO:<" + r.encode("utf-8") + b">" for r in recipients]
        self.transactions += 1
        if self.pipelining:
            commands = ([b"RSET"] if reset_first else []) + [mail, *rcpts, b"DATA"]
            group = p.expect_group(len(commands))
            p.write_lines(*commands)
            replies = _judge_group(await group, reset_first)[1 if reset_first else 0 :]
            mail_reply, rcpt_replies = replies[0], replies[1:-1]
            data_reply: Reply | None = replies[-1]
        else:
            broken = None
            if reset_first:
                broken = judge(await self._command(b"RSET"), RSET_OK, "RSET")
            if broken is not None and broken.protocol_error:
                return self._broken(TransactionResult(broken, [broken] * len(rcpts)), broken)
            mail_reply = judge(await self._command(mail), MAIL_OK, "MAIL")
            rcpt_replies = []
            data_reply = None
            if mail_reply.ok:
                for r in rcpts:
                    reply = judge(await self._command(r), RCPT_OK, "RCPT")
                    if reply.protocol_error:  # the rest are not sent: the same failure
                        rcpt_replies += [reply] * (len(rcpts) - len(rcpt_replies))
                        data_reply = reply
                        break
                    rcpt_replies.append(reply)
                else:
                    if any(r.ok for r in rcpt_replies):
                        data_reply = judge(await self._command(b"DATA"), DATA_OK, "DATA")
            else:
                rcpt_replies = [mail_reply] * len(rcpts)
        result = TransactionResult(mail_reply, rcpt_replies)
        if data_reply is None:
            if mail_reply.protocol_error:
                return self._broken(result, mail_reply)
            result.data = Reply(503, ("5.5.1 no valid recipients",))
            return result
        if data_reply.protocol_error:
            return self._broken(result, data_reply)
        if data_reply.code != 354:
            result.data = data_reply
            return result
        if not mail_reply.ok or not any(r.ok for r in rcpt_replies):
            # RFC 2920 3.1: DATA was accepted though nobody was: end it with no content.
            wait = p.expect()
            p.write_raw(b".\r\n")
            if judge(await wait, END_OK, "the end of the data").protocol_error:
                self.abort()
            self.in_transaction = False
            result.data = Reply(503, ("5.5.1 no valid recipients",))
            return result
        wait = p.expect(self.data_timeout)
        if not await write_paced(p, body, wait) and wait.called:
            # The next hop answered before our data ended: what it read as the end was not
            # ours, and the rest of our data would be commands to it. The stream is stopped
            # and the session dropped; a success there is no acceptance of our message.
            result.data = early_reply(await wait)
            self.abort()
            return result
        final = judge(await wait, END_OK, "the end of the data")
        if final.protocol_error:
            return self._broken(result, final)
        result.data = final
        self.in_transaction = False
        return result

    def _broken(self, result: TransactionResult, error: Reply) -> TransactionResult:
        """End a transaction whose next hop broke the protocol: `error` decides every
        recipient no earlier reply decided, and the session is dropped."""
        result.data = error
        self.abort()
        return result

    async def _command(self, line: bytes) -> Reply:
        """Write one command and read its reply (its wait is registered first, so that a
        reply read while the write is still on the stack finds it)."""
        wait = self.protocol.expect()
        self.protocol.write_lines(line)
        return await wait

    async def probe(self, recipient: str) -> Reply:
        """Whether the next hop takes mail for `recipient` (recipient verification,
        mailcore.gateway.callout): MAIL FROM:<> and RCPT TO:<recipient>, then RSET (not
        after a 421: the hop is closing); no DATA is ever sent. The RCPT's reply (judged,
        so a stray code is a protocol error and the session is dropped), which stands when
        the RSET then fails (the session dropped); SMTPClientError when MAIL FROM:<> itself
        is refused, which says nothing of the recipient. Made on a session with no
        transaction open: a new one, or one whose last probe's RSET was answered 250
        (`in_transaction` false; the verifier reuses no other)."""
        if _unsafe(recipient):
            return Reply(553, ("5.1.3 recipient address holds a control character; not sent",))
        assert not self.in_transaction, "a probe on a session with a transaction open"
        self.in_transaction = True
        mail = judge(await self._command(b"MAIL FROM:<>"), MAIL_OK, "MAIL")
        if not mail.ok:
            if mail.protocol_error:
                self.abort()
            raise SMTPClientError(f"MAIL FROM:<>: {mail}", code=mail.code)
        reply = judge(await self._command(b"RCPT TO:<" + recipient.encode("utf-8") + b">"),
                      RCPT_OK, "RCPT")
        if reply.protocol_error:
            self.abort()
            return reply
        if reply.code == 421:
            return reply  # the hop is closing: no RSET
        try:
            reset = await self._command(b"RSET")
        except SMTPClientError:
            # The RCPT was answered: its reply stands (a hop may hang up right after it,
            # as Exim's `drop` does); the session, its transaction open, is not reused.
            self.abort()
            return reply
        if reset.code == 250:
            self.in_transaction = False
        return reply

    async def quit(self) -> None:
        """Say QUIT and close, whatever the server answers or within QUIT_TIMEOUT if it
        answers nothing. Its reply was awaited for command_timeout (300 s): a next hop that
        answered all else and not QUIT kept each connection's slots (`max_connections`, its
        `hop_concurrency`) five minutes after its last message, so a few such hops (a
        customer's redirect may be one) held them all. Postfix does not await it at all
        (smtp_skip_quit_response)."""
        if self.protocol.closing:
            return
        try:
            wait = self.protocol.expect(min(QUIT_TIMEOUT, self.protocol.timeout))
            self.protocol.write_lines(b"QUIT")
            await wait
        except SMTPClientError:
            pass
        finally:
            self.protocol.close()

    def abort(self) -> None:
        self.protocol.abort()


def _judge_group(replies: list[Reply], reset: bool) -> list[Reply]:
    """The replies to a pipelined group ([RSET,] MAIL, RCPT…, DATA), judged in order: from
    the first protocol error on, every reply is that error (the replies after it cannot be
    matched to their commands). The list itself when every reply is allowed."""
    last = len(replies) - 1
    for i, reply in enumerate(replies):
        code = reply.code
        if 400 <= code < 600:
            continue
        if i == last:
            success, command = DATA_OK, "DATA"
        elif i == 0 and reset:
            success, command = RSET_OK, "RSET"
        elif i == int(reset):
            success, command = MAIL_OK, "MAIL"
        else:
            success, command = RCPT_OK, "RCPT"
        if code not in success:
            return replies[:i] + [protocol_error_reply(code, command)] * (len(replies) - i)
    return replies


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _unsafe(address: str) -> bool:
    """Whether an address cannot go into a command line (it holds a control character)."""
    return _CONTROL.search(address) is not None


def data_stream(body: bytes) -> Iterator[bytes]:
    """`body` as a DATA stream through a fresh DotStuffer, in chunks of about WRITE_CHUNK
    (line endings left as they are for a CRLFBody). An AcceptedBody has no line to stuff:
    it goes as it is."""
    if type(body) is AcceptedBody and len(body) <= WRITE_CHUNK and body.endswith(b"\r\n"):
        yield body + TERMINATOR
        return
    stuffer = DotStuffer(crlf_only=isinstance(body, CRLFBody))
    if len(body) <= WRITE_CHUNK:
        yield stuffer.feed(body) + stuffer.finish()
        return
    view = memoryview(body)
    for i in range(0, len(body), WRITE_CHUNK):
        out = stuffer.feed(bytes(view[i : i + WRITE_CHUNK]))
        if out:
            yield out
    yield stuffer.finish()


async def write_paced(protocol: SMTPClientProtocol, body: bytes,
                      answered: defer.Deferred[Reply] | None = None) -> bool:
    """Write `body`'s DATA stream a chunk at a time, each when the transport has room for
    it (the stream's producer, a `mailcore.pacing.Pacer`). Written at once, a 53 MB
    message held the reactor for 300-480 ms (dot-stuffing it and handing it to the
    transport, which then held a stuffed copy of it besides).

    Whether the whole stream was written: it stops when the connection goes, or when
    `answered` (the wait for the reply to the end of the data) has fired before the end
    was written. Between chunks the reactor reads, and a next hop's reply read then
    counted as its answer to an end it had not seen, while the rest of the stream went
    on to it as commands."""
    transport = protocol.transport
    pacer = Pacer()
    transport.registerProducer(pacer, True)  # type: ignore[union-attr]
    since_turn = 0
    try:
        for out in data_stream(body):
            if since_turn >= TURN_BYTES:
                # A socket that takes all (a next hop reading as fast) never pauses us.
                since_turn = 0
                await deferLater(protocol.clock, 0)
            await pacer.ready()
            if pacer.stopped or protocol.closing or (answered is not None and answered.called):
                return False
            protocol.write_raw(out)
            since_turn += len(out)
        return True
    finally:
        transport.unregisterProducer()  # type: ignore[union-attr]


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-case) and their parameters; the first line is the greeting."""
    out: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            out[keyword.upper()] = params
    return out


class _ClientFactory(Factory):
    noisy = False  # one factory per outbound connection: no start/stop log lines

    def __init__(self, clock: _IReactorTime, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = SMTPClientProtocol(self.clock, self.timeout)
        p.factory = self
        return p


def client_factory(clock: _IReactorTime, timeout: float) -> Factory:
    """The protocol factory to hand an endpoint's `connect`."""
    return _ClientFactory(clock, timeout)

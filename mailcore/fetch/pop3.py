"""The POP3 client session the sync engine drives, on `twisted.mail.pop3client.POP3Client`.

A backup client only reads: STAT and UIDL to know what is new, LIST for sizes, RETR for the
bytes, TOP for the header alone (where the account takes only recent mail). It never sends
DELE. Like the IMAP session it verifies TLS, discards plaintext that follows the server's
reply to STLS, refuses to send a password in clear unless the account allows it, bounds
what one message may cost, and turns every failure into one FetchError. A reply that goes on
after its end (a message's line "." the server did not byte-stuff) is OutOfStep, found where
the next reply is due if not in the same read: the engine confirms the last message of a
batch with a NOOP before storing it, so that no message is stored cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.mail import pop3client
from twisted.mail._except import ServerErrorResponse
from twisted.python.failure import Failure

from mailcore.fetch.bulk import ends_line
from mailcore.fetch.errors import (
    AuthFailed,
    CleartextRefused,
    CommandTimeout,
    FetchError,
    FetchTimeout,
    ProtocolFailed,
)
from mailcore.fetch.imap import (
    DEFAULT_MAX_LITERAL,
    ServerSpec,
    _show,
    _tls_failure,
    abort_transport,
    connect_to,
    connection_lost_error,
)
from mailcore.netpolicy import AddressPolicy
from mailcore.text import breaks_line

_T = TypeVar("_T")

log = Logger()

# The most messages one mailbox may hold (STAT) for a sync: its UIDL and LIST replies are
# held in memory whole.
MAX_MESSAGES = 1_000_000
# The most a message's header (TOP n 0) may take, in bytes.
MAX_HEADER = 256 * 1024
# The most a CAPA reply may take, in bytes (RFC 2449 lists a dozen short lines).
MAX_CAPA = 64 * 1024
# How long a session waits for the reply to QUIT (seconds): the sync is done by then.
QUIT_WAIT = 5.0


class MessageTooLarge(ProtocolFailed):
    """A message was longer than the bound while being retrieved."""


class OutOfStep(ProtocolFailed):
    """The server sent more after the end of a multi-line reply than that reply: a line "."
    inside a message it did not byte-stuff (RFC 1939 3) ended the reply there, and the rest
    of the message followed. `index` is the message (counted from 0) whose RETR reply it
    was, when it was one: that message is cut, whether its RETR answered or not."""

    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index


def _escaped(data: bytes, limit: int = 80) -> str:
    """Server bytes for an error message, every octet outside 0x21-0x7E as \\xHH (two
    UIDLs that differ in one 8-bit octet read differently)."""
    text = "".join(chr(b) if 0x21 <= b <= 0x7E else f"\\x{b:02x}" for b in data[:limit])
    return text + ("..." if len(data) > limit else "")


def _valid_uidl(uid: bytes) -> bool:
    """RFC 1939 §7: a unique-id is 1 to 70 characters from 0x21 to 0x7E."""
    return 1 <= len(uid) <= 70 and all(0x21 <= b <= 0x7E for b in uid)


def _number(word: bytes) -> int | None:
    """A decimal number of ASCII digits only (int() also takes "+1", "1_0" and spaces)."""
    if not word or len(word) > 18 or not word.isdigit():
        return None
    return int(word)


@dataclass(frozen=True)
class Listing:
    """A mailbox as a session's STAT, UIDL and LIST describe it."""

    # (index, uidl, size) of each message UIDL lists: index counted from 0 as Twisted does,
    # size None when LIST leaves the message out (RETR is bounded anyway).
    messages: list[tuple[int, str, int | None]]
    # The numbers STAT counts that UIDL leaves out (no UIDL: they cannot be tracked).
    unlisted: list[int]


class POP3Session(pop3client.POP3Client):
    """One POP3 session. Create through `open_pop3`."""

    MAX_LENGTH = 1024 * 1024

    def __init__(
        self, clock: IReactorTime, *, max_message: int = DEFAULT_MAX_LITERAL,
        idle_timeout: float = 120.0, command_timeout: float = 0.0, host: str = "server",
    ) -> None:
        self.greeted: defer.Deferred[None] = defer.Deferred()
        self.error: FetchError | None = None
        self.max_message = max_message
        self.host = host
        self.timeout = int(idle_timeout) if idle_timeout > 0 else 0
        # The command deadline (0: none): each command is answered whole within it,
        # whatever the server trickles meanwhile (each line restarts the idle timer).
        self.command_timeout = command_timeout
        self.callLater = clock.callLater  # type: ignore[assignment]
        self._discard = False
        self._dead = False
        self._out_of_turn = False
        # Whether bytes follow the line being read (in the same read, or a partial line).
        self._more = False
        # The message (index) a RETR reads now, and the one whose RETR reply ended last
        # while no status line has come since (the next reply tells whether it was whole).
        self._reading: int | None = None
        self._unconfirmed: int | None = None
        self._message_reply = False  # a RETR or TOP reply is being read
        # Where the lines of the message a RETR or TOP reads go, with their CRLF, many at
        # a time (see _read_lines).
        self._message_chunk: Callable[[bytes], None] | None = None
        # What has come of a line not ended yet (see dataReceived).
        self._partial = bytearray()

    def serverGreeting(self, greeting: bytes) -> None:
        if not self.greeted.called:
            self.greeted.callback(None)

    def _fail(self, err: FetchError) -> None:
        if self.error is None:
            self.error = err
        self._dead = True
        if self.transport is not None:
            abort_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        """LineOnlyReceiver's reading, knowing for each line whether more bytes follow it.

        A read in which no line ends is added to what is held of the line (`_partial`),
        not joined to it and searched again: LineOnlyReceiver did both at every read, so a
        line up to MAX_LENGTH trickled in small reads cost time quadratic in its length (a
        1 MiB line in 256-byte reads 2.6 s of the reactor, in 16-byte reads half a minute,
        and a RETR may hold a hundred such lines)."""
        if self._dead:
            return
        self._discard = False
        held = self._partial
        if not ends_line(data, held):
            held += data
            if len(held) > self.MAX_LENGTH:
                self.lineLengthExceeded(b"")
            return
        if held:
            held += data
            data = bytes(held)
            held.clear()
        self._read_lines(data)

    def _read_lines(self, data: bytes) -> None:
        """The lines of `data`, which starts one: each to `lineReceived`, but those of a
        message (RETR, TOP) in one piece to `_message_chunk` (`_read_message`); what ends
        no line is kept in `_partial`."""
        start, end = 0, len(data)
        while start < end:
            if self._dead or self._discard or getattr(self.transport, "disconnecting", False):
                return  # (after STLS's +OK the rest of the read is plaintext: dropped)
            if self._message_chunk is not None and self.state == "LONG":
                start = self._read_message(data, start)
                if start >= end or self._dead:
                    break
            stop = data.find(self.delimiter, start)
            if stop < 0:
                self._partial += data[start:]
                break
            line = data[start:stop]
            start = stop + 2
            if len(line) > self.MAX_LENGTH:
                self.lineLengthExceeded(line)
                return
            self._more = start < end
            self.lineReceived(line)
        if len(self._partial) > self.MAX_LENGTH:
            self.lineLengthExceeded(b"")

    def _read_message(self, data: bytes, start: int) -> int:
        """Give the whole lines of a message in `data` from `start` (a line's start) to
        `_message_chunk` at once, dot-unstuffed as Twisted's client does a line at a time
        (a line beginning ".." loses one "."), up to the line "." that ends the reply or
        the last line ended; where reading goes on a line at a time (the line ".", with
        the check of what follows it, or what ends no line). A line at a time, 16 MiB of
        2-byte lines cost 8 s of the reactor, and a RETR may be twice max_message."""
        if data.startswith(b".\r\n", start):
            return start
        stop = data.find(b"\r\n.\r\n", start)
        if stop < 0:
            stop = data.rfind(self.delimiter, start)
            if stop < 0:
                return start
        stop += 2
        chunk = data[start:stop]
        if len(chunk) > self.MAX_LENGTH and max(map(len, chunk.split(self.delimiter))) > (
                self.MAX_LENGTH):
            self.lineLengthExceeded(b"")
            return stop
        chunk = chunk.replace(b"\r\n..", b"\r\n.")
        if chunk.startswith(b".."):
            chunk = chunk[1:]
        if self.timeout > 0:
            self.resetTimeout()
        assert self._message_chunk is not None
        self._message_chunk(chunk)
        return stop

    def lineReceived(self, line: bytes) -> None:
        if self._dead or self._discard:
            return
        try:
            super().lineReceived(line)
        except Exception:
            self._fail(ProtocolFailed(f"malformed reply from {self.host}: {_show(line)}"))

    def state_WAITING(self, line: bytes) -> None:
        """A line outside any command: dropped. Twisted's client logs each one whole (up to
        MAX_LENGTH, repr'd), so a server sending lines between our commands (while a batch
        is stored) wrote them to the daemon's log as fast as it sent them; the first is
        logged, shortened, once per session."""
        if not self._out_of_turn:
            self._out_of_turn = True
            log.info("fetch: {host} sent a line outside any command: {line} (such lines "
                     "are dropped)", host=self.host, line=_show(line))

    def _in_step(self, line: bytes) -> bool:
        """Whether a line where a command's status line is due is one (+OK or -ERR); else
        the session fails: what came is the rest of the reply before it."""
        if line.split(b" ", 1)[0] in (b"+OK", b"-ERR"):
            self._unconfirmed = None
            return True
        what = ("a reply" if self._unconfirmed is None
                else f"message {self._unconfirmed + 1}")
        self._fail(OutOfStep(
            f"{self.host} sent more after the end of {what}: {_show(line, 60)} came where "
            "a reply was due (a line '.' not byte-stuffed, RFC 1939 3?)", self._unconfirmed))
        return False

    def state_SHORT(self, line: bytes) -> Any:
        if not self._in_step(line):
            return None
        return super().state_SHORT(line)

    def state_LONG_INITIAL(self, line: bytes) -> Any:
        if not self._in_step(line):
            return None
        return super().state_LONG_INITIAL(line)

    def state_LONG(self, line: bytes) -> Any:
        if line == b".":
            if self._more and self._message_reply:
                # Nothing was asked since: the reply goes on after its end.
                what = ("a reply" if self._reading is None
                        else f"message {self._reading + 1}")
                self._fail(OutOfStep(
                    f"{self.host} sent more after the end of {what} (a line '.' in it not "
                    "byte-stuffed, RFC 1939 3?)", self._reading))
                return None
            # Before the reply's Deferred fires: its caller may send the next command now.
            self._unconfirmed, self._reading = self._reading, None
            self._message_reply = False
        return super().state_LONG(line)

    def lineLengthExceeded(self, buffer: bytes) -> None:
        self._fail(ProtocolFailed(f"{self.host} sent a line longer than {self.MAX_LENGTH}"))

    def timeoutConnection(self) -> None:
        self._fail(FetchTimeout(f"{self.host} stopped answering for {self.timeout} s"))

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._dead = True
        if self.error is None:
            if self._greetingError and not _tls_failure(reason):
                self.error = ProtocolFailed(
                    f"{self.host} refused the connection: {_show(self._greetingError)}"
                )
            else:
                self.error = connection_lost_error(self.host, reason)
        if not self.greeted.called:
            self.greeted.errback(Failure(self.error))
        self._timedOut = False
        self._greetingError = None
        super().connectionLost(Failure(self.error))

    def _command_timed_out(self) -> None:
        self._fail(CommandTimeout(
            f"{self.host} answered no command for {self.command_timeout:g} s"))

    async def _call(self, d: defer.Deferred[Any], what: str) -> Any:
        deadline = (self.callLater(self.command_timeout, self._command_timed_out)
                    if self.command_timeout > 0 and not self._dead else None)
        try:
            return await d
        except ServerErrorResponse as e:
            raise ProtocolFailed(f"{what} refused by {self.host}: {_show(e.args[0])}") from None
        except FetchError:
            raise
        except defer.CancelledError:
            # The sync was cancelled (the daemon stops, another node took the account):
            # nothing more is said to the server, nor waited for.
            self.abort()
            raise
        except Exception as e:
            raise self.error or ProtocolFailed(f"{what} failed on {self.host}: {e}") from None
        finally:
            if deadline is not None and deadline.active():
                deadline.cancel()

    async def ask_capabilities(self) -> set[str]:
        """The capability names CAPA lists (upper case); none when the server refuses CAPA
        (optional, RFC 2449). Twisted's capabilities() keeps every line of the reply, however
        many: here the reply is bounded as it comes (MAX_CAPA) and only the names are kept."""
        caps: set[str] = set()
        size = 0

        def consume(line: bytes) -> None:
            nonlocal size
            size += len(line) + 2
            if size > MAX_CAPA:
                if not self._dead:
                    self._fail(ProtocolFailed(
                        f"{self.host} sent a CAPA reply longer than {MAX_CAPA} bytes"))
                return
            words = line.split(None, 1)
            if words:
                caps.add(words[0].decode("ascii", "replace").upper())

        try:
            await self._call(self.sendLong(b"CAPA", None, consume, None), "CAPA")
        except ProtocolFailed:
            if self.error is not None:
                raise
            return set()  # -ERR
        return caps

    def _switch_to_tls(self, result: Any, creator: IOpenSSLClientConnectionCreator) -> Any:
        # Lines already read after +OK in this same read are plaintext: drop them.
        self._discard = True
        self._partial.clear()
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.startedTLS = True
        self._capCache = None
        return result

    async def stls(self, creator: IOpenSSLClientConnectionCreator) -> set[str]:
        d = self.sendShort(b"STLS", None)
        d.addCallback(self._switch_to_tls, creator)
        await self._call(d, "STLS")
        return await self.ask_capabilities()

    async def log_in(self, username: str, password: str) -> None:
        # USER and PASS take the rest of their line: a CR or LF would start a command of
        # the sender's choosing, a NUL cut the line.
        if breaks_line(username) or breaks_line(password):
            raise AuthFailed(
                f"the username or password holds NUL, CR or LF; not sent to {self.host}"
            )
        try:
            await self._call(self.user(username.encode("utf-8")), "USER")
            await self._call(self.password(password.encode("utf-8")), "PASS")
        except ProtocolFailed as e:
            if self.error is not None:
                raise self.error from None
            raise AuthFailed(f"login refused by {self.host}: {e}") from None

    async def listing(self) -> Listing:
        """What STAT, UIDL and LIST say of the mailbox.

        Twisted's listUID() and listSize() without a consumer pad a list up to the number
        the server names (a 16-byte line "200000000 x" allocated gigabytes) and take what
        int() takes; here each number is digits only, from 1 to STAT's count, listed once,
        and each UIDL is one of RFC 1939, given to one message only; each line is checked
        as it comes, so that what is held is bounded too."""
        count = await self.message_count()
        bound = (count, f"STAT said the mailbox holds {count}") if count is not None else (
            MAX_MESSAGES, f"a sync takes at most {MAX_MESSAGES}")
        # Two messages with one UIDL would be stored as one, and a UIDL of other octets
        # could not be kept as sent: either refuses the listing, so nothing is dropped.
        owner: dict[bytes, int] = {}

        def uidl(number: int, uid: bytes) -> bytes:
            if not _valid_uidl(uid):
                raise ProtocolFailed(
                    f"{self.host} gives message {number} the UIDL {_escaped(uid)}, not 1 to "
                    "70 characters from 0x21 to 0x7E (RFC 1939)"
                )
            other = owner.setdefault(uid, number)
            if other != number:
                raise ProtocolFailed(
                    f"{self.host} gives UIDL {_escaped(uid)} to messages "
                    f"{min(other, number)} and {max(other, number)}"
                )
            return uid

        def size(number: int, rest: bytes) -> int:
            # RFC 1939 §5: anything may follow the size.
            found = _number(rest.split(None, 1)[0])
            if found is None:
                raise ProtocolFailed(
                    f"malformed LIST line from {self.host}: {_show(b'%d %s' % (number, rest))}"
                )
            return found

        uidls = await self._listed(b"UIDL", bound, uidl)
        sizes = await self._listed(b"LIST", bound, size)
        return Listing(
            [(number - 1, uid.decode("ascii"), sizes.get(number))
             for number, uid in sorted(uidls.items())],
            [n for n in range(1, count + 1) if n not in uidls] if count is not None else [],
        )

    async def message_count(self) -> int | None:
        """How many messages the mailbox holds (STAT), at most MAX_MESSAGES; None if the
        server refuses STAT (which RFC 1939 requires), so that MAX_MESSAGES bounds."""
        try:
            reply = await self._call(self.sendShort(b"STAT", None), "STAT")
        except ProtocolFailed:
            if self.error is not None:
                raise
            return None
        words = reply.split()
        count = _number(words[0]) if words else None
        if count is None:
            raise self._refuse(ProtocolFailed(f"malformed STAT reply from {self.host}: "
                                              f"{_show(reply)}"))
        if count > MAX_MESSAGES:
            raise self._refuse(ProtocolFailed(
                f"{self.host} holds {count} messages, more than the {MAX_MESSAGES} "
                "a sync takes"
            ))
        return count

    async def _listed(self, command: bytes, bound: tuple[int, str],
                      value: Callable[[int, bytes], _T]) -> dict[int, _T]:
        """A UIDL or LIST reply as {message number: `value` of the rest of its line}. A line
        that is not "number SP value" with a number from 1 to `bound` (the highest, and
        where it comes from), listed once, or whose value raises ProtocolFailed, fails the
        session at once (nothing more is read)."""
        name = command.decode("ascii")
        count, said = bound
        found: dict[int, _T] = {}

        def consume(line: bytes) -> None:
            if self._dead:
                return
            word, _, rest = line.partition(b" ")
            number = _number(word)
            rest = rest.strip(b" ")
            if number is None or not rest:
                self._fail(ProtocolFailed(f"malformed {name} line from {self.host}: "
                                          f"{_show(line)}"))
            elif number > count or number == 0:
                self._fail(ProtocolFailed(
                    f"{name} from {self.host} names message {number}; {said}"
                ))
            elif number in found:
                self._fail(ProtocolFailed(
                    f"{name} from {self.host} lists message {number} twice"
                ))
            else:
                try:
                    found[number] = value(number, rest)
                except ProtocolFailed as e:
                    self._fail(e)

        await self._call(self.sendLong(command, None, consume, None), name)
        return found

    def _refuse(self, err: FetchError) -> FetchError:
        """Fail the session with `err` (the server cannot be trusted to go on); the error to
        raise."""
        self._fail(err)
        return err

    async def retrieve_bytes(self, index: int) -> bytes:
        """The exact message (dot-unstuffed, CRLF line ends), bounded by max_message.

        Over the bound (its LIST size lied), MessageTooLarge: the rest of the message is
        read and dropped while it stays within another max_message, so that the session
        goes on with the next message; further than that the session is dropped (`error`
        is set)."""
        return await self._read(index, None, self.max_message,
                                f"message {index + 1} on {self.host}")

    async def header(self, index: int) -> bytes:
        """The message's header section and the empty line after it (TOP n 0), bounded by
        MAX_HEADER as `retrieve_bytes` is by max_message."""
        return await self._read(index, 0, min(MAX_HEADER, self.max_message),
                                f"the header of message {index + 1} on {self.host}")

    async def _read(self, index: int, top: int | None, limit: int, what: str) -> bytes:
        # The message's bytes as they come, not a list of its lines: a line is a bytes
        # object of some 35 bytes besides its own, so a message of short lines ("ab") held
        # 11 times its size, and joining them at the end made it 44 (724 MB for 16 MiB).
        held = bytearray()
        total = [0]

        def too_large() -> MessageTooLarge:
            return MessageTooLarge(f"{what} is over the limit of {limit} bytes")

        def consume(lines: bytes) -> None:
            total[0] += len(lines)
            if total[0] <= limit:
                held.extend(lines)
            elif total[0] <= 2 * limit:
                if held:
                    held.clear()
            elif not self._dead:
                self._fail(too_large())

        def consume_line(line: bytes) -> None:
            consume(line + b"\r\n")

        command = "RETR" if top is None else "TOP"
        self._reading = index if top is None else None
        self._message_reply = True
        self._message_chunk = consume
        try:
            await self._call(self.retrieve(index, consumer=consume_line, lines=top), command)
        finally:
            self._reading, self._message_reply = None, False
            self._message_chunk = None
        if total[0] > limit:
            raise too_large()
        return bytes(held)

    async def confirm(self) -> None:
        """NOOP: its reply comes after all the server sent before it, so a message whose
        RETR reply went on after its end (OutOfStep) is known before it is stored. -ERR
        is in step too (NOOP is required by RFC 1939, refused by none we know)."""
        try:
            await self._call(self.noop(), "NOOP")
        except ProtocolFailed:
            if self.error is not None:
                raise self.error from None

    async def close_session(self) -> None:
        """QUIT politely, waiting QUIT_WAIT seconds at most for the reply, then make sure
        the connection is gone."""
        if not self._dead:
            quitting = self.quit()
            timer = self.callLater(QUIT_WAIT, quitting.cancel)
            try:
                await self._call(quitting, "QUIT")
            except (FetchError, defer.CancelledError):
                pass
            finally:
                if timer.active():
                    timer.cancel()
        self.abort()

    def abort(self) -> None:
        self._dead = True
        if self.transport is not None:
            abort_transport(self.transport)


async def open_pop3(
    reactor: Any,
    spec: ServerSpec,
    creator: IOpenSSLClientConnectionCreator,
    *,
    max_message: int = DEFAULT_MAX_LITERAL,
    connect_timeout: float = 30.0,
    idle_timeout: float = 120.0,
    command_timeout: float = 0.0,
    policy: AddressPolicy,
) -> POP3Session:
    """Connect (only to an address `policy` allows), secure (TLS or STLS, verified), log in.
    With `command_timeout`, every command (CAPA, STLS, the login's included) is answered
    whole within it, or the session fails with CommandTimeout."""
    session = POP3Session(
        reactor, max_message=max_message, idle_timeout=idle_timeout,
        command_timeout=command_timeout, host=f"{spec.host}:{spec.port}",
    )
    await connect_to(reactor, spec, creator, session, connect_timeout, policy)
    try:
        await session.greeted
        if not spec.use_ssl:
            caps = await session.ask_capabilities()
            if "STLS" in caps:
                await session.stls(creator)
            elif spec.start_tls or not spec.allow_cleartext:
                raise CleartextRefused(
                    f"{spec.host}:{spec.port} does not offer STLS; refusing to send the "
                    "password in cleartext"
                )
        await session.log_in(spec.username, spec.password)
    except BaseException:
        session.abort()
        raise
    return session

"""The mailbox writer: put messages into an IMAP account (migrate, restore).

One logged-in session (the same connection, TLS and login rules as a sync: `open_session`)
that creates folders and APPENDs messages byte-exact with their flags and INTERNALDATE.

- Pipelined: every APPEND of a batch goes out without waiting for the previous one's tagged
  reply. With LITERAL+ (RFC 7888; LITERAL- for literals up to 4096 bytes) a command costs no
  round trip at all; without it each literal waits for its own `+` continuation, one at a
  time (anything sent before it would be read as the literal), but never for a tagged reply.
- MULTIAPPEND (RFC 3502) when offered: up to `group_messages` messages in one command, which
  the server stores atomically (one transaction). A group refused as a whole is sent again
  one message per command, so each message gets its own answer.
- UIDPLUS (RFC 4315): the `[APPENDUID uidvalidity uid(-set)]` of each answer is where the
  message landed. An OK without a usable APPENDUID is still an OK (the message is stored);
  the UID is then None.
- A NO [TRYCREATE] creates the folder (with its parents) and sends the refused messages once
  more. A NO is retryable unless its code says the message or the account cannot take it
  (OVERQUOTA, LIMIT, TOOBIG, NOPERM, CANNOT, PARSE...); BAD never is.
- The connection dying in the middle of a batch raises AppendInterrupted with the answers
  received for the leading messages; the rest may or may not be stored (`find` tells). A
  tagged OK to an APPEND before its message went out (instead of a synchronising literal's
  "+", or in the middle of a streamed one) is not believed: it ends the session the same
  way, the message in `not_sent`.
- A message over the server's APPENDLIMIT (RFC 7889) is refused without being sent.
  \\Recent and flags that are not valid atoms (spaces, brackets, 8-bit) are not sent; an
  INTERNALDATE keeps its UTC offset (naive = UTC), to the second.
- Memory: the writer holds nothing but the batch it is given. A large message can be given
  as a `Streamed` source instead of bytes: its literal is announced with the source's size
  and written chunk by chunk as the source yields them, each after the transport drained
  what was written before (the session registers a streaming producer on the transport),
  so at most about one chunk is held. A streamed message goes alone in its command (never
  in a MULTIAPPEND group), once every command before it is answered. A source that yields
  fewer or more bytes than it announced, or fails, drops the connection before the
  command is complete (AppendInterrupted, the message in `not_sent`): never a corrupt or
  truncated message at the destination. The session's idle timeout counts silence from
  the server, between batches too (a caller idle for longer opens a new writer); the
  server draining a streamed literal off a full transport counts as a sign of life.

Folder names are paths of unicode segments. On the wire a path is joined with the
destination's hierarchy separator and encoded in modified UTF-7 (RFC 3501 5.1.3; our own
codec: Twisted's turns a TAB into "&", and decodes unterminated or invalid base64 and lone
surrogates into garbage instead of refusing them), or sent as quoted UTF-8 when the server
offers UTF8=ACCEPT (RFC 6855; ENABLEd at login). A segment that holds the destination's
separator would silently become two hierarchy levels: the separator in it is replaced by a
look-alike (`SEPARATOR_STAND_INS`: "/" -> U+2215, "." -> U+2024, "\\" -> U+29F5; "_" ->
"-", any other -> "_"); `destination_path` says what a path becomes. A segment that is
empty or holds a control character (NUL, CR, LF, TAB...) or a lone surrogate is refused
with BadFolderName before any protocol line is sent. The first segment "inbox" (any case)
is INBOX. On a server whose personal namespace has a prefix (NAMESPACE, e.g. "INBOX." on
Courier and Cyrus) a path not already inside it is put inside it
(`MailboxWriter.destination_path`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IPushProducer
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from mailcore.fetch.errors import CommandRefused, ConnectFailed, FetchError, ProtocolFailed
from mailcore.fetch.imap import (
    ARRIVING,
    MAX_FOLDERS,
    IMAPClient,
    ServerSpec,
    compress_set,
    examined_exists,
    expand_set,
    open_session,
    quote,
)
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.tls import client_tls
from mailcore.text import has_cc, has_control, has_surrogate
from mailcore.workers import CpuPool

log = Logger()
# Bodies `find` hashes on the reactor; a larger one is hashed on the CPU pool.
HASH_INLINE = 256 * 1024

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

SEPARATOR_STAND_INS = {"/": "\u2215", ".": "\u2024", "\\": "\u29f5"}

# NO codes (RFC 5530, RFC 7889, RFC 4469) after which sending the same message again cannot
# succeed without someone changing something; any other NO is taken as transient.
PERMANENT_CODES = frozenset({
    "OVERQUOTA", "LIMIT", "TOOBIG", "NOPERM", "CANNOT", "PARSE", "CONTACTADMIN",
    "CLIENTBUG", "AUTHORIZATIONFAILED", "PRIVACYREQUIRED", "EXPIRED", "NONEXISTENT",
    "BADCHARSET", "BADURL", "TRYCREATE",
})

# Codes (RFC 5530) of a folder's EXAMINE or SELECT refused for now: any other NO to it is
# taken as the folder holding no mail (`refused_as_gone`).
LATER_CODES = frozenset({"UNAVAILABLE", "INUSE", "SERVERBUG"})

# LITERAL- (RFC 7888): non-synchronising literals only up to this size.
LITERAL_MINUS_MAX = 4096

# The most look-alikes (same Message-ID and size, or same size and INTERNALDATE) `find`
# fetches and hashes for one message without finding it: each is a UID FETCH of a whole
# body. A copy already there is usually the first; a destination naming thousands of
# look-alikes held a resume for hours, one body fetch each, for every message it looked for.
# Beyond it `find` stops comparing (a warning): an honest folder can hold that many.
MAX_LOOKALIKES = 100
# The most bodies `find` fetches to compare look-alikes in one folder over a writer's life
# (one run) that are not the message looked for (a body found the same is not counted).
# Past it no body of that folder is compared again (one warning): each message
# looked for there is decided as one past MAX_LOOKALIKES, without fetching. A destination
# naming 100 look-alikes for every message of a resume cost 100 body fetches (and a
# warning) each.
MAX_LOOKALIKE_FETCHES = 10 * MAX_LOOKALIKES


class BadFolderName(FetchError):
    """A folder path that cannot be sent (empty, control characters, not text)."""


class AppendInterrupted(FetchError):
    """The connection died in the middle of a batch. `answered` holds the results of the
    first len(answered) items, in order; the others are UNKNOWN (may or may not be stored),
    except the indices in `not_sent`, which never fully reached the server and so are
    certainly not stored."""

    def __init__(self, message: str, answered: list[Appended],
                 not_sent: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.answered = answered
        self.not_sent = not_sent


@dataclass(frozen=True)
class Streamed:
    """A message too large to hold: exactly `size` bytes, yielded in chunks by a new
    iterator from `chunks()` (called again when the message is sent again)."""

    size: int
    chunks: Callable[[], AsyncIterator[bytes]]

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("a streamed message cannot have a negative size")


@dataclass(frozen=True)
class Append:
    """One message to append: the exact bytes, its flags, its INTERNALDATE (None: now).
    A large message gives `stream` instead of its bytes (`data` is then empty)."""

    data: bytes
    flags: tuple[str, ...]
    internaldate: datetime.datetime | None
    stream: Streamed | None = None

    def __post_init__(self) -> None:
        if self.stream is not None and self.data:
            raise ValueError("an Append has either its bytes or a stream, not both")

    @property
    def size(self) -> int:
        """The literal's size: the bytes', or what the stream announces."""
        return self.stream.size if self.stream is not None else len(self.data)


@dataclass(frozen=True)
class Appended:
    """The server's answer to one message."""

    ok: bool
    uid: int | None
    uidvalidity: int | None
    reason: str | None
    retryable: bool


# -- names --------------------------------------------------------------------------------


def mutf7_encode(text: str) -> bytes:
    """`text` in modified UTF-7 (RFC 3501 5.1.3): printable ASCII stands for itself ("&" is
    "&-"); every other run of characters is base64 (with "," for "/") of its UTF-16BE."""
    out = bytearray()
    run: list[str] = []

    def flush() -> None:
        if run:
            b64 = base64.b64encode("".join(run).encode("utf-16-be", "surrogatepass"))
            out.extend(b"&" + b64.rstrip(b"=").replace(b"/", b",") + b"-")
            run.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            run.append(ch)
    flush()
    return bytes(out)


_MB64 = re.compile(rb"[A-Za-z0-9+,]+")


def mutf7_decode(raw: bytes) -> str:
    """Modified UTF-7 to text; ValueError when `raw` is not valid modified UTF-7 (a byte
    over 0x7E or a control, an unterminated or invalid base64 run, a lone surrogate)."""
    out: list[str] = []
    i = 0
    while i < len(raw):
        b = raw[i]
        if b == 0x26:  # "&"
            end = raw.find(b"-", i + 1)
            if end < 0:
                raise ValueError("unterminated modified UTF-7 run")
            chunk = raw[i + 1:end]
            if not chunk:
                out.append("&")
            else:
                if not _MB64.fullmatch(chunk) or len(chunk) % 4 == 1:
                    raise ValueError("invalid modified UTF-7 base64")
                try:
                    data = base64.b64decode(
                        chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4), validate=True
                    )
                except binascii.Error:
                    raise ValueError("invalid modified UTF-7 base64") from None
                if len(data) % 2:
                    raise ValueError("modified UTF-7 run is not whole UTF-16")
                out.append(data.decode("utf-16-be"))  # strict: a lone surrogate fails
            i = end + 1
        elif 0x20 <= b <= 0x7E:
            out.append(chr(b))
            i += 1
        else:
            raise ValueError("byte outside modified UTF-7")
    return "".join(out)


def decode_folder(name: bytes | str, separator: str | None, *,
                  utf8: bool = False) -> tuple[str, ...]:
    """A folder name as a server or our store gives it, as a path of unicode segments.

    `str` is a name already decoded (what `fetch_folders.name` and `messages.folder` hold:
    the sync engine decodes LIST names); `bytes` is a raw name from the wire, modified UTF-7
    (or UTF-8 when `utf8`, i.e. UTF8=ACCEPT was enabled; a raw name that is not valid
    modified UTF-7 but is valid UTF-8 is taken as UTF-8, as some servers send). Empty
    segments (a doubled or trailing separator) are dropped; a first segment "inbox" in any
    case is "INBOX". ValueError when bytes are neither encoding."""
    if isinstance(name, bytes):
        if utf8:
            text = name.decode("utf-8")
        else:
            try:
                text = mutf7_decode(name)
            except ValueError:
                text = name.decode("utf-8")
    else:
        text = name
    parts = text.split(separator) if separator else [text]
    path = tuple(p for p in parts if p)
    if path and path[0].upper() == "INBOX":
        path = ("INBOX", *path[1:])
    return path


def stand_in(separator: str) -> str:
    """What replaces `separator` inside a segment (see the module docstring)."""
    return SEPARATOR_STAND_INS.get(separator, "-" if separator == "_" else "_")


def destination_path(path: Sequence[str], separator: str | None) -> tuple[str, ...]:
    """The path as it will exist at a destination with `separator`: each segment checked,
    the separator inside a segment replaced by its stand-in, "inbox" first as INBOX."""
    if not path:
        raise BadFolderName("a folder path needs at least one segment")
    out: list[str] = []
    for segment in path:
        if not isinstance(segment, str) or not segment:
            raise BadFolderName("a folder name segment is empty")
        if has_cc(segment):
            raise BadFolderName(
                f"folder name {segment!r} holds a control character (NUL, CR, LF...)"
            )
        if has_surrogate(segment):
            raise BadFolderName("a folder name holds a lone surrogate (not text)")
        if separator and separator in segment:
            segment = segment.replace(separator, stand_in(separator))
        out.append(segment)
    if out[0].upper() == "INBOX":
        out[0] = "INBOX"
    return tuple(out)


def encode_folder(path: Sequence[str], separator: str | None, *, utf8: bool) -> bytes:
    """The path as a mailbox argument for the destination: quoted modified UTF-7, or quoted
    UTF-8 when UTF8=ACCEPT is enabled. BadFolderName before anything is sent."""
    # A server with no hierarchy (separator NIL) keeps the path as one flat name.
    name = (separator or "/").join(destination_path(path, separator))
    if utf8:
        raw = name.encode("utf-8")
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return quote(mutf7_encode(name))


# -- APPEND arguments -------------------------------------------------------------------

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')


def flag_arg(flag: str) -> bytes | None:
    """A flag as APPEND sends it, or None for one that cannot be sent: \\Recent (the
    server's to set) and anything that is not a valid flag atom (spaces, brackets, 8-bit)."""
    if flag.upper() == "\\RECENT":
        return None
    body = flag[1:] if flag.startswith("\\") else flag
    try:
        raw = body.encode("ascii")
    except UnicodeEncodeError:
        return None
    if not raw or any(c < 0x21 or c > 0x7E or c in _ATOM_SPECIALS for c in raw):
        return None
    return flag.encode("ascii")


def imap_datetime(when: datetime.datetime) -> bytes:
    """An INTERNALDATE as APPEND wants it: "02-Jan-2024 13:04:05 +0100" (naive = UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    offset = when.utcoffset() or datetime.timedelta(0)
    if offset.seconds % 60 or offset.microseconds:
        when, offset = when.astimezone(datetime.UTC), datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hh, mm = divmod(abs(minutes), 60)
    text = (f'"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} '
            f'{when.hour:02d}:{when.minute:02d}:{when.second:02d} {sign}{hh:02d}{mm:02d}"')
    return text.encode("ascii")


def _message_prefix(item: Append) -> bytes:
    """What precedes a message's literal: `(flags) "date" `."""
    flags = [f for f in (flag_arg(x) for x in item.flags) if f is not None]
    out = b"(" + b" ".join(dict.fromkeys(flags)) + b") "
    if item.internaldate is not None:
        out += imap_datetime(item.internaldate) + b" "
    return out


def refusal_codes(e: Exception) -> set[str]:
    """The response codes (RFC 5530: CANNOT, NONEXISTENT...) a refusal's text names."""
    return set(re.findall(r"\[([A-Z-]+)", str(e)))


def refused_for_good(e: Exception) -> bool:
    """Whether a refusal's text names a response code of PERMANENT_CODES (RFC 5530:
    CANNOT, NOPERM, OVERQUOTA...), which trying again later does not change."""
    return bool(refusal_codes(e) & PERMANENT_CODES)


def refused_as_gone(session: IMAPClient, e: Exception) -> bool:
    """Whether `e`, the EXAMINE or SELECT of a listed folder refused, says the folder is
    gone (holds no mail): a NO on a live session whose code is not one of LATER_CODES: NO
    [NONEXISTENT] (RFC 5530), or Dovecot's plain NO for a folder deleted while it had
    subfolders, which it still lists (\\HasChildren, not \\Noselect). A BAD, a session
    lost or a code for now is an error."""
    return (session.error is None and isinstance(e, CommandRefused) and e.status == "NO"
            and not refusal_codes(e) & LATER_CODES)


def refused_as_deleted(session: IMAPClient, e: Exception, name: str,
                       with_children: bool) -> bool:
    """Whether `e`, the EXAMINE of folder `name` refused, says the folder holds no mail for
    a reader that would pass it over or put back all it held without a look: NO
    [NONEXISTENT], or a plain NO of a folder listed \\HasChildren (`with_children`: Dovecot's
    for one deleted while it had subfolders). Any other code (NOPERM: the login may not read
    it) or a plain NO of a folder without children (Office 365's momentary "Server
    Unavailable") says nothing of what it holds; nor does any refusal of INBOX, which is
    never deleted."""
    codes = refusal_codes(e)
    return (refused_as_gone(session, e) and name.upper() != "INBOX"
            and (codes == {"NONEXISTENT"} or (not codes and with_children)))


def _text(data: bytes, limit: int = 200) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text) + (
        "..." if len(data) > limit else "")


_CODE = re.compile(rb"^\[([^\]]*)\]")


def _code(text: bytes) -> tuple[str, bytes]:
    """The response code (upper-case first word) of a reply's text, and its arguments."""
    m = _CODE.match(text.lstrip())
    if not m:
        return "", b""
    words = m.group(1).split(None, 1)
    if not words:
        return "", b""
    return words[0].decode("ascii", "replace").upper(), words[1] if len(words) > 1 else b""


def _appenduid(args: bytes, count: int) -> tuple[int, list[int]] | None:
    """(uidvalidity, uids) from APPENDUID's arguments when they are well-formed and name
    exactly `count` UIDs; None for anything else (a lying or broken server). A set naming
    more than `count` UIDs is refused before it is listed."""
    words = args.split()
    if len(words) != 2 or not words[0].isdigit() or len(words[0]) > 10:
        return None
    try:
        uids = expand_set(words[1], count)
    except (ValueError, ProtocolFailed):
        return None
    validity = int(words[0])
    if len(uids) != count or not 0 < validity < 2**32 or any(
        not 0 < u < 2**32 for u in uids
    ) or len(set(uids)) != count:
        return None
    return validity, uids


# -- the session --------------------------------------------------------------------------


class _Command:
    """One APPEND in flight: its tag, the items it carries and its outcome."""

    def __init__(self, tag: bytes, indices: list[int]) -> None:
        self.tag = tag
        self.indices = indices
        self.sent = False          # every literal handed to the transport
        self.reply: bytes | None = None   # "OK ...", "NO ...", "BAD ..."
        self.failure: Failure | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.cont: defer.Deferred[bool] | None = None


@implementer(IPushProducer)
class _Drain:
    """The streaming producer a session registers on its transport while it writes a
    streamed literal: the transport pauses it while its buffer is full and resumes it once
    drained; `wait()` fires when writing may go on (at once when not paused, and when the
    connection ends)."""

    def __init__(self, on_drained: Callable[[], None]) -> None:
        self.paused = False
        self.pauses = 0
        self.on_drained = on_drained
        self._waiters: list[defer.Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.on_drained()
        self.paused = False
        self._release()

    def stopProducing(self) -> None:
        self.paused = False
        self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def wait(self) -> defer.Deferred[None]:
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d


class WriterSession(IMAPClient):
    """The IMAP session of a writer: IMAPClient's bounded reader, login and TLS, plus
    APPEND commands with several tags in flight, routed by tag (Twisted's client keeps one
    command at a time). The writer never mixes the two: `send` is used only when no APPEND
    is in flight."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._appends: dict[bytes, _Command] = {}
        self._awaiting: _Command | None = None  # the command whose literal waits for "+"
        self.bye: bytes | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.continuations = 0
        self._drain: _Drain | None = None
        self.streamed_chunks = 0
        self.stream_pauses = 0   # times a full transport held a streamed literal back

    def _fail(self, err: FetchError) -> None:
        super()._fail(err)
        if self._drain is not None:  # a streamed literal held back: it ends here too
            self._drain.stopProducing()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self._drain is not None:
            self._drain.stopProducing()
        super().connectionLost(reason)

    def _defaultHandler(self, tag: bytes, rest: bytes) -> None:
        if tag == b"*" and rest[:3].upper() == b"BYE":
            self.bye = rest
        if not self._appends:
            super()._defaultHandler(tag, rest)
            return
        if tag == b"*":
            return  # EXISTS, RECENT, FETCH... say nothing about our APPENDs
        if tag == b"+":
            waiting, self._awaiting = self._awaiting, None
            if waiting is None or waiting.cont is None:
                raise imap4.IllegalServerResponse(b"+ " + rest)  # -> ProtocolFailed
            self.continuations += 1
            cont, waiting.cont = waiting.cont, None
            cont.callback(True)
            return
        cmd = self._appends.get(tag)
        if cmd is None:
            raise imap4.IllegalServerResponse(tag + b" " + rest)
        status = rest.split(None, 1)[0].upper() if rest.strip() else b""
        if status not in (b"OK", b"NO", b"BAD"):
            raise imap4.IllegalServerResponse(tag + b" " + rest)
        if status == b"OK" and not cmd.sent:
            # An OK to a command whose message never (fully) went out, e.g. instead of the
            # "+" a synchronising literal waits for: the server cannot hold the message.
            # Believed, it was counted as copied; the session ends, the message not sent.
            self._fail(ProtocolFailed(
                f"{self.host} answered OK to an APPEND before it had the message: "
                f"{_text(rest)}"))
            return
        del self._appends[tag]
        if self.tags is not None:
            self.tags.pop(tag, None)
        self.in_flight -= 1
        cmd.reply = rest
        self._finish(cmd)

    def _finish(self, cmd: _Command) -> None:
        if self._awaiting is cmd:
            self._awaiting = None
        if cmd.cont is not None:
            cont, cmd.cont = cmd.cont, None
            cont.callback(False)
        if not cmd.done.called:
            cmd.done.callback(None)

    def _lost(self, cmd: _Command, reason: Failure) -> None:
        if cmd.reply is None and cmd.failure is None:
            cmd.failure = reason
            self._appends.pop(cmd.tag, None)
            self._finish(cmd)

    def alive(self) -> bool:
        return not self._dead and self.tags is not None and self.transport is not None

    def start_append(self, indices: list[int]) -> _Command:
        """A new APPEND tag, registered so that a lost connection fails it."""
        tag = self.makeTag()
        cmd = _Command(tag, indices)
        # In Twisted's tag table too: IMAPClient._fail and connectionLost errback those.
        holder = imap4.Command(b"APPEND")
        lost: defer.Deferred[Any] = defer.Deferred()
        lost.addErrback(lambda f: self._lost(cmd, f))
        holder.defer = lost  # type: ignore[assignment]  # Twisted declares it None
        assert self.tags is not None
        self.tags[tag] = holder
        self._appends[tag] = cmd
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._arm()  # answered within the command deadline, as any other command
        return cmd

    def wait_continuation(self, cmd: _Command) -> defer.Deferred[bool]:
        """Fires True on the server's "+", False when the command ended first."""
        d: defer.Deferred[bool] = defer.Deferred()
        if cmd.done.called:
            d.callback(False)
            return d
        cmd.cont = d
        self._awaiting = cmd
        return d

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def write_stream(self, stream: Streamed) -> bool:
        """Write a literal's bytes from `stream`, each chunk once the transport drained the
        ones before. True when exactly `stream.size` bytes went out; False when the
        connection ended first, or was dropped here because the source yielded more or
        fewer bytes than announced or failed (the server then never sees a complete
        literal, so the message is not stored)."""
        transport: Any = self.transport  # TCP and TLS transports are IConsumers
        assert transport is not None
        # The server taking our bytes is a sign of life: a long literal on a slow link is
        # not "silence from the server" (the idle timeout).
        drain = self._drain = _Drain(self.resetTimeout)
        transport.registerProducer(drain, True)
        chunks = stream.chunks()
        sent = 0
        try:
            async for chunk in chunks:
                if not self.alive():
                    return False
                if sent + len(chunk) > stream.size:
                    self._fail(ProtocolFailed(
                        f"the message source yielded more than the {stream.size} bytes it "
                        "announced; the APPEND was abandoned"))
                    return False
                if chunk:
                    self.write(chunk)
                    sent += len(chunk)
                    self.streamed_chunks += 1
                await drain.wait()
            if sent != stream.size:
                self._fail(ProtocolFailed(
                    f"the message source yielded {sent} of the {stream.size} bytes it "
                    "announced; the APPEND was abandoned"))
                return False
            return self.alive()
        except Exception:
            # The exception's text may be a failed statement with its parameters: it goes
            # to the log only, as fetch.errors.INTERNAL_ERROR's do.
            log.failure("reading a message to append failed after {sent} of {size} bytes",
                        sent=sent, size=stream.size)
            if self.alive():
                self._fail(ProtocolFailed(
                    f"reading the message to send failed after {sent} of {stream.size} "
                    "bytes (an internal error; see the daemon's log); the APPEND was "
                    "abandoned"))
            return False
        finally:
            self._drain = None
            self.stream_pauses += drain.pauses
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):  # its failure was reported above
                    await aclose()
            # The connection may be gone, with nothing registered any more.
            with contextlib.suppress(Exception):
                transport.unregisterProducer()


# -- the writer ---------------------------------------------------------------------------


def _classify(cmd: _Command) -> tuple[str, bytes, str, bytes]:
    """(status, text after it, code, code arguments) of a command's tagged reply."""
    assert cmd.reply is not None
    parts = cmd.reply.split(None, 1)
    status = parts[0].upper().decode("ascii")
    text = parts[1] if len(parts) > 1 else b""
    code, args = _code(text)
    return status, text, code, args


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MailboxWriter:
    """Writes folders and messages into one account. Operations are serialised (one at a
    time on the session); create with `open_writer`."""

    def __init__(self, session: WriterSession, *, group_messages: int = 64,
                 group_bytes: int = 8 * 1024 * 1024, window: int = 256,
                 cpu: CpuPool | None = None) -> None:
        self.session = session
        # Where `find` hashes a body over HASH_INLINE bytes (None: on the reactor).
        self.cpu = cpu
        self.capabilities: frozenset[str] = frozenset(session.capabilities)
        self.separator = "/"
        self.utf8 = False
        # The personal namespace's prefix (RFC 2342), e.g. ("INBOX",) on servers whose
        # folders all live under "INBOX.": a path outside it is put inside it.
        self.prefix: tuple[str, ...] = ()
        self.group_messages = group_messages
        self.group_bytes = group_bytes
        self.window = window
        self._lock = defer.DeferredLock()
        self._known: set[tuple[str, ...]] | None = None
        # The folders the last LIST named \Noselect: hierarchy levels that hold no mail,
        # and a folder deleted while it had subfolders (RFC 3501 6.3.4), which stays listed.
        self.noselect: set[tuple[str, ...]] = set()
        self._selected: bytes | None = None
        self._exists = 0  # what the EXAMINE of _selected counted
        # Per folder: the bodies `find` fetched to compare look-alikes (None: no more).
        self._compared: dict[bytes, int | None] = {}
        self.appendlimit: int | None = None
        for cap in self.capabilities:
            # Over 20 digits (beyond any size) is no limit; int() refuses over 4,300 digits.
            if cap.startswith("APPENDLIMIT=") and cap[12:].isdigit() and len(cap) <= 32:
                self.appendlimit = int(cap[12:])

    async def _setup(self) -> None:
        """ENABLE UTF8=ACCEPT when offered; learn the hierarchy separator and the personal
        namespace's prefix."""
        if "UTF8=ACCEPT" in self.capabilities and "ENABLE" in self.capabilities:
            lines, _ = await self.session.send(b"ENABLE", b"UTF8=ACCEPT")
            for line in lines:
                words = line.upper().split()
                if words[:1] == [b"ENABLED"] and b"UTF8=ACCEPT" in words:
                    self.utf8 = True
        lines, _ = await self.session.send(b"LIST", b'"" ""')
        for line in lines:
            tokens = self._list_tokens(line)
            if tokens is not None:
                delim = tokens[2]
                self.separator = delim.decode("utf-8", "replace") if delim else ""
                break
        if "NAMESPACE" in self.capabilities:
            lines, _ = await self.session.send(b"NAMESPACE")
            for line in lines:
                if line[:10].upper() == b"NAMESPACE ":
                    self.prefix = self._personal_prefix(line)

    def _personal_prefix(self, line: bytes) -> tuple[str, ...]:
        """The first personal namespace's prefix as a path (() when it is "")."""
        try:
            tokens = imap4.parseNestedParens(line)
            first = tokens[1][0]
            prefix, delim = first[0], first[1]
            if not isinstance(prefix, bytes) or not (delim is None or isinstance(delim, bytes)):
                raise TypeError
            return decode_folder(prefix, delim.decode("utf-8") if delim else None,
                                 utf8=self.utf8)
        except (imap4.MismatchedNesting, imap4.MismatchedQuoting, ValueError, IndexError,
                TypeError):
            # No personal namespace (NIL) or nothing we can read: names are used as given.
            return ()

    def _list_tokens(self, line: bytes) -> list[Any] | None:
        if line[:5].upper() != b"LIST ":
            return None
        try:
            tokens = imap4.parseNestedParens(line)
        except (imap4.MismatchedNesting, imap4.MismatchedQuoting, ValueError, IndexError):
            raise ProtocolFailed(f"malformed LIST reply: {_text(line)}") from None
        if (len(tokens) < 4 or not isinstance(tokens[1], list)
                or not isinstance(tokens[3], bytes)
                or not (tokens[2] is None or isinstance(tokens[2], bytes))):
            raise ProtocolFailed(f"malformed LIST reply: {_text(line)}")
        return tokens

    def mailbox(self, path: Sequence[str]) -> bytes:
        """The path as this destination's mailbox argument (BadFolderName if it cannot)."""
        return encode_folder(self.destination_path(path), self.separator, utf8=self.utf8)

    def destination_path(self, path: Sequence[str]) -> tuple[str, ...]:
        """The path of the folder that `path` names here: separators inside segments
        replaced, and put inside the personal namespace unless it is INBOX or already
        inside. This is what `folders()` lists for it."""
        target = destination_path(path, self.separator)
        n = len(self.prefix)
        if n == 0 or target == ("INBOX",) or target[:n] == self.prefix:
            return target
        return self.prefix + target

    # -- folders ----------------------------------------------------------------------------

    async def folders(self) -> list[tuple[str, ...]]:
        """Every folder of the account (hierarchy levels that hold no mail included)."""
        async with self._lock:
            return await self._folders()

    async def _folders(self) -> list[tuple[str, ...]]:
        lines, _ = await self.session.send(b"LIST", b'"" "*"')
        if sum(line[:5].upper() == b"LIST " for line in lines) > MAX_FOLDERS:
            # Each costs the reactor a parse; a folder not read would be made again.
            raise ProtocolFailed(f"{self.session.host} lists more than {MAX_FOLDERS} folders")
        out: list[tuple[str, ...]] = []
        noselect: set[tuple[str, ...]] = set()
        for line in lines:
            tokens = self._list_tokens(line)
            if tokens is None:
                continue
            flags = {f.upper() for f in tokens[1] if isinstance(f, bytes)}
            if b"\\NONEXISTENT" in flags:
                continue
            delim = tokens[2].decode("utf-8", "replace") if tokens[2] else None
            try:
                path = decode_folder(tokens[3], delim, utf8=self.utf8)
            except ValueError:
                continue  # a name no path of ours can be: nothing we could write to
            if path:
                out.append(path)
                if b"\\NOSELECT" in flags:
                    noselect.add(path)
        self._known, self.noselect = set(out), noselect
        return out

    async def ensure_folder(self, path: tuple[str, ...], *, reopen: bool = False) -> None:
        """CREATE the folder and any missing parent (and SUBSCRIBE what was created, so mail
        clients show it); nothing when it exists. A folder listed \\Noselect is CREATEd
        (a parent may stay one). `reopen`: the folder was found not to be opened: LIST
        again, and CREATE it even if listed (a refusal then, the name still listed, is
        not an error: opening it says)."""
        target = self.destination_path(path)
        self.mailbox(path)
        async with self._lock:
            if reopen:
                await self._folders()
                self.noselect.add(target)
            await self._ensure(path)

    async def _ensure(self, path: Sequence[str]) -> None:
        target = self.destination_path(path)
        known = self._known if self._known is not None else set(await self._folders())
        for depth in range(1, len(target) + 1):
            level = target[:depth]
            # The folder itself must take mail; a parent that holds none is a parent.
            unusable = depth == len(target) and level in self.noselect
            if (level in known and not unusable) or level == ("INBOX",) or (
                level == self.prefix[:depth]
            ):
                continue
            arg = self.mailbox(level)
            try:
                await self.session.send(b"CREATE", arg)
            except ProtocolFailed as e:
                if self.session.error is not None:
                    raise
                if level not in set(await self._folders()) or (
                    unusable and level in self.noselect
                ):
                    what = " (listed \\Noselect)" if unusable else ""
                    raise ProtocolFailed(
                        f"cannot create folder {'/'.join(level)!r}{what}: {e}") from None
                known = self._known or known
                continue
            known.add(level)
            self.noselect.discard(level)
            try:
                await self.session.send(b"SUBSCRIBE", arg)
            except ProtocolFailed:
                if self.session.error is not None:
                    raise
        self._known = known

    # -- append ---------------------------------------------------------------------------

    async def append(self, path: tuple[str, ...], items: Sequence[Append]) -> list[Appended]:
        """Append the items to the folder; one result per item, in order (see the module
        docstring). AppendInterrupted when the connection dies before every answer came."""
        mailbox = self.mailbox(path)
        async with self._lock:
            self._selected = None
            results: list[Appended | None] = [None] * len(items)
            for i, item in enumerate(items):
                if self.appendlimit is not None and item.size > self.appendlimit:
                    results[i] = Appended(False, None, None, (
                        f"{item.size} bytes, over the server's APPENDLIMIT of "
                        f"{self.appendlimit}"), False)
            todo = [i for i, r in enumerate(results) if r is None]
            try:
                again = await self._send_all(mailbox, items, todo, results, True)
                if again:
                    self._known = None  # the folder went missing: our list is stale
                    try:
                        await self._ensure(path)
                    except FetchError as e:
                        if self.session.error is not None or not isinstance(e, ProtocolFailed):
                            # The session died: the TRYCREATE'd messages are not stored.
                            raise _Interrupted(e, again) from None
                        for i in again:
                            results[i] = Appended(False, None, None, str(e),
                                                  not refused_for_good(e))
                        again = []
                    again = await self._send_all(mailbox, items, again, results, False)
                    for i in again:
                        results[i] = Appended(False, None, None,
                                              "the server asked to create the folder twice",
                                              False)
            except _Interrupted as e:
                answered: list[Appended] = []
                for r in results:
                    if r is None:
                        break
                    answered.append(r)
                not_sent = tuple(sorted(i for i in e.not_sent if i >= len(answered)))
                host = self.session.host
                why = str(e.error)
                if self.session.bye:
                    why += f" (the server said BYE {_text(self.session.bye[3:].strip())})"
                raise AppendInterrupted(
                    f"{host}: the connection ended after {len(answered)} of {len(items)} "
                    f"answers: {why}", answered, not_sent) from None
            final = [r for r in results if r is not None]
            assert len(final) == len(items)
            return final

    def _groups(self, items: Sequence[Append], todo: list[int],
                multi: bool) -> list[list[int]]:
        if not multi or "MULTIAPPEND" not in self.capabilities:
            return [[i] for i in todo]
        groups: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i in todo:
            n = items[i].size
            if items[i].stream is not None:
                # A streamed message goes alone: a group is only as fast as its slowest
                # literal, and a source that breaks its size would take the group down.
                if current:
                    groups.append(current)
                    current, size = [], 0
                groups.append([i])
                continue
            if current and (len(current) >= self.group_messages or size + n > self.group_bytes):
                groups.append(current)
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            groups.append(current)
        return groups

    def _non_sync(self, size: int) -> bool:
        if "LITERAL+" in self.capabilities:
            return True
        return "LITERAL-" in self.capabilities and size <= LITERAL_MINUS_MAX

    async def _send_all(self, mailbox: bytes, items: Sequence[Append], todo: list[int],
                        results: list[Appended | None], multi: bool) -> list[int]:
        """Send `todo` pipelined, fill `results`; the indices answered NO [TRYCREATE].
        _Interrupted when the session died before every answer came."""
        s = self.session
        commands: list[_Command] = []
        for group in self._groups(items, todo, multi):
            while s.in_flight >= self.window and s.alive():
                oldest = next(c for c in commands if not c.done.called)
                await oldest.done
            if items[group[0]].stream is not None:
                # A streamed message starts once every command before it is answered: one
                # round trip per large message buys that a source that breaks (and so the
                # connection) leaves no earlier message of the batch unknown.
                for earlier in commands:
                    await earlier.done
            if not s.alive():
                break
            cmd = s.start_append(group)
            commands.append(cmd)
            await self._send_one(cmd, mailbox, items)
        for cmd in commands:
            await cmd.done
        trycreate: list[int] = []
        retry_single: list[int] = []
        lost: Failure | None = None
        for cmd in commands:
            if cmd.reply is None:
                lost = lost or cmd.failure
                continue
            status, text, code, args = _classify(cmd)
            if status == "OK":
                uids = _appenduid(args, len(cmd.indices)) if code == "APPENDUID" else None
                for k, i in enumerate(cmd.indices):
                    results[i] = Appended(True, uids[1][k] if uids else None,
                                          uids[0] if uids else None, None, False)
            elif code == "TRYCREATE":
                trycreate.extend(cmd.indices)
            elif len(cmd.indices) > 1:
                # The group was refused as a whole (and stored nothing): one by one, so
                # each message gets its own answer.
                retry_single.extend(cmd.indices)
            else:
                reason = f"{status} {_text(text)}"
                retryable = status == "NO" and code not in PERMANENT_CODES
                results[cmd.indices[0]] = Appended(False, None, None, reason, retryable)
        started = {i for c in commands for i in c.indices}
        never = [i for i in todo if i not in started]
        # A command answered before all its literals went out (a NO instead of "+") is
        # answered; one the connection took down half-written is certainly not stored.
        never += [i for c in commands if c.reply is None and not c.sent for i in c.indices]
        if lost is not None or never:
            error = lost.value if lost is not None else (
                s.error or ConnectFailed(f"connection to {s.host} closed"))
            raise _Interrupted(error, never)
        if retry_single:
            trycreate += await self._send_all(mailbox, items, sorted(retry_single), results,
                                              False)
        return sorted(trycreate)

    async def _send_one(self, cmd: _Command, mailbox: bytes,
                        items: Sequence[Append]) -> None:
        """Write one APPEND (one or several messages); a synchronising literal waits for
        its "+" (or for the command to end first: refused, or the connection lost)."""
        s = self.session
        head = cmd.tag + b" APPEND " + mailbox
        for i in cmd.indices:
            item = items[i]
            size = item.size
            sync = not self._non_sync(size)
            line = head + b" " + _message_prefix(item) + (
                b"{%d}\r\n" % size if sync else b"{%d+}\r\n" % size)
            head = b""
            if not s.alive():
                return
            s.write(line)
            if sync:
                if not await s.wait_continuation(cmd) or not s.alive():
                    return
            if item.stream is not None:
                if not await s.write_stream(item.stream):
                    return
            else:
                s.write(item.data)
        if s.alive():
            s.write(b"\r\n")
            cmd.sent = True

    # -- find -------------------------------------------------------------------------------

    async def find(self, path: tuple[str, ...], *, message_id: str | None, size: int,
                   internaldate: datetime.datetime | None, sha256: str,
                   exclude: Collection[int] = ()) -> int | None:
        """The UID of a message already in the folder that is this one, else None (also
        when the folder does not exist). With an ASCII Message-ID: SEARCH HEADER Message-ID,
        confirmed by RFC822.SIZE (several left: the one whose body has `sha256`, else the
        lowest UID). Without: SEARCH by size around the INTERNALDATE's day, then the same
        INTERNALDATE to the second, confirmed by fetching each body and comparing its
        SHA-256. UIDs in `exclude` (copies already accounted for, e.g. of an identical
        earlier message) are never returned. A SEARCH answering more UIDs than the folder's
        EXISTS and ARRIVING is a ProtocolFailed (a hostile destination: the copy fails, not
        hangs). At most MAX_LOOKALIKES look-alikes are compared: beyond, without a
        Message-ID the message is taken as not there (a warning; sent again, at worst a
        duplicate), with one as the lowest UID, as when none compared is it. Once
        MAX_LOOKALIKE_FETCHES bodies were compared in the folder, every message with
        look-alikes there is decided so without fetching."""
        mailbox = self.mailbox(path)
        async with self._lock:
            if not await self._examine(path, mailbox):
                return None
            s = self.session
            mid = (message_id or "").strip()
            if mid and mid.isascii() and not has_control(mid):
                uids = await self._search(b"HEADER Message-ID " + quote(mid.encode("ascii")))
                uids = [u for u in uids if u not in exclude]
                if not uids:
                    return None
                found = [f for f in await s.uid_fetch(uids, b"UID RFC822.SIZE")
                         if f.uid is not None and f.size == size and f.uid not in exclude]
                candidates = sorted(f.uid for f in found if f.uid is not None)
                if len(candidates) > 1:
                    same = await self._first_of(
                        candidates, sha256, path,
                        "taken as the lowest UID of them (same Message-ID and size)")
                    if same is not None:
                        return same
                return candidates[0] if candidates else None
            criteria = b"SMALLER %d" % (size + 1)
            if size > 0:
                criteria = b"LARGER %d " % (size - 1) + criteria
            if internaldate is not None:
                day = datetime.datetime.fromtimestamp(_second(internaldate),
                                                      datetime.UTC).date()
                lo, hi = day - datetime.timedelta(days=1), day + datetime.timedelta(days=2)
                criteria += b" SINCE %s BEFORE %s" % (_search_date(lo), _search_date(hi))
            uids = [u for u in await self._search(criteria) if u not in exclude]
            if not uids:
                return None
            want = None if internaldate is None else _second(internaldate)
            found = await s.uid_fetch(uids, b"UID RFC822.SIZE INTERNALDATE")
            candidates = sorted(
                f.uid for f in found
                if f.uid is not None and f.uid not in exclude and f.size == size
                and (want is None or (f.internal_date is not None
                                      and _second(f.internal_date) == want))
            )
            return await self._first_of(
                candidates, sha256, path,
                "taken as not there: it is sent again, at worst a duplicate")

    async def _examine(self, path: Sequence[str], mailbox: bytes) -> bool:
        """EXAMINE the folder (once until the next append); False when it does not exist.
        Its EXISTS bounds what a SEARCH there may answer."""
        if self._selected == mailbox:
            return True
        try:
            lines, _ = await self.session.send(b"EXAMINE", mailbox)
        except ProtocolFailed:
            if self.session.error is not None:
                raise
            if self.destination_path(path) not in set(await self._folders()):
                return False
            raise
        self._selected, self._exists = mailbox, examined_exists(
            lines, self.session.host, mailbox.decode("ascii", "replace"))
        return True

    async def _search(self, criteria: bytes) -> list[int]:
        """UID SEARCH in the folder EXAMINE'd: at most as many UIDs as it holds, and a
        margin for mail arriving (ProtocolFailed beyond, before they are read)."""
        return await self.session.uid_search(criteria, max_uids=self._exists + ARRIVING)

    async def _first_of(self, uids: list[int], sha256: str, path: Sequence[str],
                        otherwise: str) -> int | None:
        """The first of `uids` whose body has `sha256`; None when none has, or when the
        first MAX_LOOKALIKES are not it (an honest folder can hold that many: messages
        without Message-ID or date are searched by size alone), or when the folder's budget
        (MAX_LOOKALIKE_FETCHES) is spent, which stops its comparing for the run; each is
        logged as a warning saying what the caller does `otherwise` (the budget once)."""
        mailbox = self.mailbox(path)
        for n, uid in enumerate(uids):
            fetched = self._compared.setdefault(mailbox, 0)
            if fetched is None:
                return None
            if fetched >= MAX_LOOKALIKE_FETCHES:
                self._compared[mailbox] = None
                log.warn("{host} holds messages in {folder!r} that look like those looked "
                         "for (same size and Message-ID or date) and are not them "
                         "({fetched} bodies compared there); not compared further in that "
                         "folder this run, {otherwise}", host=self.session.host,
                         folder="/".join(path), fetched=fetched, otherwise=otherwise)
                return None
            if n == MAX_LOOKALIKES:
                # This message alone: an honest folder can hold that many look-alikes of
                # one (same-size notifications without Message-ID), and its other messages
                # are still compared, within the folder's budget.
                log.warn("{host} holds more than {n} messages in {folder!r} that look like "
                         "one looked for (same size and Message-ID or date) and are not it; "
                         "not compared further, {otherwise}", host=self.session.host,
                         n=MAX_LOOKALIKES, folder="/".join(path), otherwise=otherwise)
                return None
            if await self._body_hash(uid) == sha256:
                # A match is no look-alike: only bodies that are not it spend the budget
                # (a second migrate finds each message without a Message-ID so).
                return uid
            self._compared[mailbox] = fetched + 1
        return None

    async def _body_hash(self, uid: int) -> str | None:
        """The SHA-256 of message `uid`'s body: one over HASH_INLINE bytes on the CPU pool
        (a 64 MiB one, the largest fetched, took some 160 ms of the reactor)."""
        for item in await self.session.uid_fetch(compress_set([uid]), b"UID BODY.PEEK[]"):
            if item.uid == uid and item.body is not None:
                if self.cpu is None or len(item.body) <= HASH_INLINE:
                    return _sha256_hex(item.body)
                return await self.cpu.run(_sha256_hex, item.body)
        return None

    async def logout(self) -> None:
        """LOGOUT and close the connection."""
        await self.session.close_session()


class _Interrupted(Exception):
    def __init__(self, error: BaseException | None, not_sent: list[int]) -> None:
        super().__init__(str(error))
        self.error = error
        self.not_sent = not_sent


def _search_date(day: datetime.date) -> bytes:
    return f"{day.day}-{_MONTHS[day.month - 1]}-{day.year}".encode("ascii")


def _second(when: datetime.datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


async def open_writer(
    reactor: Any,
    spec: ServerSpec,
    username: str,
    password: str,
    *,
    tls: IOpenSSLClientConnectionCreator | None = None,
    settings: FetchSettings | None = None,
    group_messages: int = 64,
    group_bytes: int = 8 * 1024 * 1024,
    window: int = 256,
    cpu: CpuPool | None = None,
) -> MailboxWriter:
    """Log in to the destination like a sync does (the same TLS verification, cleartext
    rule, address policy and errors: mailcore.fetch.errors) and get a writer.

    `tls` is the verified client TLS for the host (default: the platform's CAs, the host
    name checked; mailcore.fetch.tls.client_tls for a private CA or a pinned certificate);
    `settings` gives the address policy, timeouts (a command, an APPEND included, is
    answered within its command_timeout, whatever the server trickles meanwhile) and the
    reply bound. MULTIAPPEND groups
    hold at most `group_messages` messages and `group_bytes` bytes; at most `window`
    APPEND commands are in flight. `cpu` hashes the large bodies `find` compares."""
    s = settings or FetchSettings()
    spec = dataclasses.replace(spec, username=username, password=password)
    session = await open_session(
        reactor, spec, tls or client_tls(spec.host), max_literal=s.max_message_bytes,
        connect_timeout=s.connect_timeout, idle_timeout=s.idle_timeout,
        command_timeout=s.command_timeout, policy=s.address_policy(),
        client_class=WriterSession,
    )
    assert isinstance(session, WriterSession)
    return await writer_for(session, group_messages=group_messages, group_bytes=group_bytes,
                            window=window, cpu=cpu)


async def writer_for(session: WriterSession, **options: Any) -> MailboxWriter:
    """A writer on a logged-in session (UTF8=ACCEPT enabled when offered, the separator
    learnt); the session is dropped if that fails. `options` as for MailboxWriter."""
    writer = MailboxWriter(session, **options)
    try:
        await writer._setup()
    except BaseException:
        session.abort()
        raise
    return writer


__all__ = [
    "SEPARATOR_STAND_INS",
    "Append",
    "AppendInterrupted",
    "Appended",
    "BadFolderName",
    "MailboxWriter",
    "Streamed",
    "WriterSession",
    "decode_folder",
    "destination_path",
    "encode_folder",
    "flag_arg",
    "imap_datetime",
    "mutf7_decode",
    "mutf7_encode",
    "open_writer",
    "writer_for",
]

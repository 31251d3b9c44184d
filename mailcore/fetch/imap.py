"""The IMAP client session the sync engine drives, on `twisted.mail.imap4.IMAP4Client`.

We keep Twisted's line/literal reader and its tagged-command queue, and replace what is
unsafe or missing for a backup client (see shared/notes/twisted-pitfalls.md 3, 4, 7, 8):

- literals are bounded: a `{N}` over `max_literal` fails the session with LiteralTooLarge
  before a byte of it is buffered, and the bytes received for one command are bounded too
  (each line counting LINE_COST more, for the object it is kept as), as are the FETCH
  replies a UID FETCH takes, and an EXISTS (which bounds them) counts at most MAX_EXISTS;
  a QRESYNC EXAMINE's flag changes are read as they arrive, and kept only for UIDs up to
  the highest held, each once, at most MAX_CHANGED_FLAGS of them;
- STARTTLS discards whatever plaintext followed the server's OK, and CAPABILITY is asked
  again over TLS;
- TLS is always verified (the caller passes a connection creator from mailcore.fetch.tls),
  and the password never goes out in clear unless the account explicitly allows it;
- credentials and bodies stay bytes on the wire (AUTHENTICATE PLAIN or LOGIN with quoting);
- a malformed reply fails the session with a ProtocolFailed naming it, never a traceback;
- untagged replies come back raw, so SELECT gives UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ,
  and FETCH gives BODY[] as the exact bytes (a part from a later octet, BODY[]<n>, is none:
  the message is fetched again, then skipped with an error on its folder);
- UID FETCH of a list of UIDs is pipelined: it goes out at once with its own tag, beside the
  others in flight, and the replies are read by the lean reader of mailcore.fetch.bulk
  (same bounds) instead of Twisted's one-command-at-a-time reader. A UID FETCH of a set
  (b"1:*") is read by it too, alone, each reply parsed as it arrives, and handed to the
  caller's sink when it has one (none kept: a migrate's look-alike index of a destination).
"""

from __future__ import annotations

import base64
import datetime
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from mailcore.fetch.bulk import (
    Reply,
    ReplyReader,
    announced_uid,
    ends_line,
    parse_fetch_reply,
    parse_internaldate,
)
from mailcore.fetch.errors import (
    AuthFailed,
    CleartextRefused,
    CommandRefused,
    CommandTimeout,
    ConnectFailed,
    FetchError,
    FetchTimeout,
    LiteralTooLarge,
    ProtocolFailed,
    TLSFailed,
)
from mailcore.netpolicy import AddressPolicy, AddressRefused, GuardedEndpoint
from mailcore.text import breaks_line, has_cc, not_text

_R = TypeVar("_R")

log = Logger()

DEFAULT_MAX_LITERAL = 64 * 1024 * 1024
MAX_LINE = 16 * 1024 * 1024
# What the store takes of a folder (fetch_folders.name and .delimiter, messages.folder):
# characters, and bytes of UTF-8 in the indexes on the name (PostgreSQL refuses an index
# entry over 2,704 bytes; `mailcore.messages.parse.MAX_INDEXED_BYTES`).
MAX_FOLDER_NAME = 1024
MAX_FOLDER_NAME_BYTES = 2000
MAX_DELIMITER = 4
# The most folders a LIST reply may give that a sync takes (and a migrate or restore reads);
# each costs about 0.2 ms of the reactor to parse, an EXAMINE a sync and a row in the store.
MAX_FOLDERS = 10_000
# RFC 3501: UIDs, UIDVALIDITY, UIDNEXT and message numbers are below 2^32; RFC 7162: a
# mod-sequence is below 2^63 (what a BIGINT holds).
MAX_NUMBER = 2**32 - 1
MAX_MODSEQ = 2**63 - 1
# FETCH replies a UID FETCH of a set takes beyond the folder's EXISTS (mail arriving
# meanwhile), its `max_items`; a server sending more ends the session.
ARRIVING = 10_000
# The most UIDs a UID SEARCH may answer (as POP3's MAX_MESSAGES bounds a mailbox): each is
# parsed on the reactor and held, in a list and a set, by the sync.
MAX_SEARCH = 1_000_000
# The most messages a folder's EXISTS may count (RFC 3501 lets it say up to 2^32 - 1): more
# is a ProtocolFailed naming the claim. Every bound on the FETCH replies one command over a
# folder takes (a set's `max_items`, QRESYNC's changes) is its EXISTS and ARRIVING: an
# EXISTS near 2^32 let them be as many as the bytes bound let in: 3.4 million small ones
# of FLAGS, a gigabyte.
MAX_EXISTS = 10_000_000
# What one line of a reply costs against a command's `max_reply_bytes` beyond its bytes:
# Twisted's reader keeps each untagged line of a command as a bytes object in a list (about
# 60 bytes more than the line in CPython). Counting bytes alone, 144 MB of "* a" lines
# were 29 million objects: a gigabyte and two minutes of the reactor for one command.
LINE_COST = 64
# The longest CAPABILITY reply read (Dovecot's is 300 bytes): each word becomes a string
# in a set, and 8 lines of 15 MB took 11 s and 670 MB.
MAX_CAPABILITY = 64 * 1024
# FETCH replies naming its UIDs a UID FETCH of a list takes beyond two a UID.
LIST_SLACK = 100
# The most flag changes a QRESYNC EXAMINE keeps (of UIDs up to the highest we hold): past
# them none is kept, and the engine asks the flags of the UIDs it holds instead (a few
# megabytes; a lying server's millions were each kept, then an UPDATE of their own).
MAX_CHANGED_FLAGS = 50_000
# Why a connection to an account's host is refused (after the host; which addresses it
# resolved to are the operator's, never the user's: they would map internal names).
REFUSAL = "is where this server does not connect"


def _show(data: bytes, limit: int = 120) -> str:
    """Server text for an error message: printable, short."""
    text = data[:limit].decode("ascii", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text + ("..." if len(data) > limit else "")


def quote(value: bytes) -> bytes:
    """An IMAP quoted string; refuses bytes that cannot be quoted."""
    if any(b in value for b in (0, 10, 13)) or any(b > 127 for b in value):
        raise ValueError("value cannot be sent as an IMAP quoted string")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def mailbox_arg(name: str) -> bytes:
    """A mailbox name as a command argument (modified UTF-7, quoted)."""
    return quote(name.encode("imap4-utf-7"))


@dataclass(frozen=True)
class RemoteFolder:
    """A LIST reply: the folder name (decoded), its delimiter, flags and special use."""

    name: str
    delimiter: str | None
    flags: frozenset[str]

    @property
    def selectable(self) -> bool:
        return not ({"\\NOSELECT", "\\NONEXISTENT"} & self.flags)

    @property
    def special_use(self) -> str | None:
        for flag in ("\\Trash", "\\Junk", "\\Sent", "\\Drafts", "\\Archive", "\\All",
                     "\\Flagged"):
            if flag.upper() in self.flags:
                return flag
        return None


@dataclass(frozen=True)
class FolderListing:
    """A LIST reply: the folders we can sync, and those we refuse (their name as the server
    gave it, made printable, and why), which the rest of the account syncs without;
    `beyond` counts the folders listed after the first MAX_FOLDERS, neither read nor
    named (one entry of `refused` says how many)."""

    folders: list[RemoteFolder]
    refused: list[tuple[str, str]] = field(default_factory=list)
    beyond: int = 0


def folder_problem(name: str, delimiter: str | None) -> str | None:
    """Why a listed folder (its decoded name and delimiter) cannot be kept, or None: NUL or
    a lone surrogate, which PostgreSQL refuses, or longer than the store's columns."""
    if not_text(name) is not None:
        return "the folder name holds NUL or is not text; not synced"
    if len(name) > MAX_FOLDER_NAME or len(name.encode("utf-8")) > MAX_FOLDER_NAME_BYTES:
        return (f"the folder name is longer than {MAX_FOLDER_NAME} characters or "
                f"{MAX_FOLDER_NAME_BYTES} bytes; not synced")
    if delimiter is not None and (
        len(delimiter) > MAX_DELIMITER or not_text(delimiter) is not None
    ):
        return (f"the folder's hierarchy delimiter is longer than {MAX_DELIMITER} characters "
                "or holds NUL; not synced")
    return None


@dataclass
class SelectInfo:
    """What SELECT/EXAMINE told us about a folder."""

    exists: int = 0
    uidvalidity: int | None = None
    uidnext: int | None = None
    highestmodseq: int | None = None
    vanished: list[int] = field(default_factory=list)
    changed_flags: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # QRESYNC told more flag changes than an EXAMINE keeps: `changed_flags` is empty, and
    # the flags of the messages held are to be asked for.
    flags_beyond: bool = False


@dataclass(frozen=True, slots=True)
class FetchItem:
    """One FETCH reply."""

    seq: int
    uid: int | None
    flags: tuple[str, ...] | None
    internal_date: datetime.datetime | None
    size: int | None
    body: bytes | None
    modseq: int | None


class _RawCommand(imap4.Command):
    """A command whose untagged replies are handed back unparsed (literals inline)."""

    def finish(self, lastLine: bytes, unusedCallback: Any) -> None:
        d, self.defer = self.defer, None
        if d is not None and not d.called:  # a cancelled command's late reply is dropped
            d.callback((self.lines, lastLine))


_RE_EXISTS = re.compile(rb"^(\d+) EXISTS", re.IGNORECASE)
_RE_CODE = re.compile(rb"^OK \[(UIDVALIDITY|UIDNEXT|HIGHESTMODSEQ) (\d+)\]", re.IGNORECASE)
_RE_VANISHED = re.compile(rb"^VANISHED (?:\(EARLIER\) )?([\d:,]+)", re.IGNORECASE)
_RE_RANGE = re.compile(rb"([^,:]*)(?::([^,]*))?(?:,|$)")
# At most this many UIDs are taken from the VANISHED replies of one EXAMINE.
MAX_VANISHED = 10_000_000
_RE_FETCH = re.compile(rb"^\d+ FETCH ", re.IGNORECASE)
# A FETCH reply whose first item is its UID (as Dovecot's are): the UID.
_RE_FETCH_UID = re.compile(rb"^\d+ FETCH \(UID (\d+)[ )]", re.IGNORECASE)
_RE_DIGITS = re.compile(rb"[\d ]*")
_RE_UNTAGGED_FETCH = re.compile(rb"\* \d+ FETCH ", re.IGNORECASE)


def expand_set(spec: bytes, limit: int) -> list[int]:
    """An IMAP sequence set of numbers ("1:3,7") as a list, each number from 1 to MAX_NUMBER
    (else ProtocolFailed). A set naming more than `limit` numbers in all is a ProtocolFailed
    before any range is listed: a short line cannot make a long list."""
    ranges: list[tuple[int, int]] = []
    total = 0
    for m in _RE_RANGE.finditer(spec):
        if not m.group(0):
            break  # the empty match at the end
        if m.group(2) is None:
            if not m.group(1):
                continue  # an empty piece ("1,,2")
            lo = hi = number(m.group(1), "a number in a set")
        else:
            a, b = number(m.group(1), "a number in a set"), number(m.group(2), "a number in a set")
            lo, hi = min(a, b), max(a, b)
        total += hi - lo + 1
        if total > limit:
            raise ProtocolFailed(f"sequence set names more than {limit} numbers")
        ranges.append((lo, hi))
    out: list[int] = []
    for lo, hi in ranges:
        out.extend(range(lo, hi + 1))
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges of numbers sorted and merged: none overlaps or touches the next."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def expand_vanished(spec: bytes, highest: int) -> list[int]:
    """The UIDs of a VANISHED set, sorted, each once, none over `highest` (the highest UID
    we hold: no other can be marked gone). A short line cannot make a long list: ranges are
    clipped and merged before they are expanded, and more than MAX_VANISHED UIDs is a
    ProtocolFailed."""
    ranges: list[tuple[int, int]] = []
    compact_at = 65536

    def merged() -> list[tuple[int, int]]:
        out = _merged(ranges)
        if sum(hi - lo + 1 for lo, hi in out) > MAX_VANISHED:
            raise ProtocolFailed(f"VANISHED names more than {MAX_VANISHED} UIDs")
        return out

    for m in _RE_RANGE.finditer(spec):
        if not m.group(0):
            break  # the empty match at the end
        a = number(m.group(1), "a UID in VANISHED")
        b = a if m.group(2) is None else number(m.group(2), "a UID in VANISHED")
        lo, hi = min(a, b), min(max(a, b), highest)
        if lo <= hi:
            ranges.append((lo, hi))
            if len(ranges) >= compact_at:  # the same ranges again and again stay a few
                ranges = merged()
                compact_at = max(compact_at, 2 * len(ranges))
    out: list[int] = []
    for lo, hi in merged():
        out.extend(range(lo, hi + 1))
    return out


def runs(nums: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted distinct numbers as (first, last) of each run of consecutive ones."""
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        yield nums[i], nums[j]
        i = j + 1


def set_range(first: int, last: int) -> bytes:
    """One range of an IMAP set: "7", or "1:3"."""
    return b"%d" % first if first == last else b"%d:%d" % (first, last)


def compress_set(numbers: list[int]) -> bytes:
    """Sorted numbers as a compact IMAP set ("1:3,7")."""
    return b",".join(set_range(*run) for run in runs(sorted(set(numbers))))


def exists_count(value: bytes, host: str, folder: str) -> int:
    """The messages an EXISTS reply counts in `folder` (as an error shows it): from 0 to
    MAX_EXISTS, else ProtocolFailed naming the server's claim."""
    count = number(value, "EXISTS", lowest=0)
    if count > MAX_EXISTS:
        raise ProtocolFailed(f"{host} says {folder} holds {count} messages, more than the "
                             f"{MAX_EXISTS} a folder may hold")
    return count


def examined_exists(lines: list[bytes], host: str, folder: str) -> int:
    """The messages the EXISTS among the untagged `lines` of an EXAMINE count (the last
    one; 0 when none), bounded as exists_count bounds them."""
    exists = 0
    for line in lines:
        if m := _RE_EXISTS.match(line):
            exists = exists_count(m.group(1), host, folder)
    return exists


def number(value: bytes, what: str, *, lowest: int = 1, highest: int = MAX_NUMBER) -> int:
    """A number the server sent, from `lowest` to `highest`; ProtocolFailed naming `what`
    for anything else (one over 2^63 would fail the store's BIGINT columns)."""
    if not value.isdigit() or len(value) > 20 or not lowest <= int(value) <= highest:
        raise ProtocolFailed(
            f"the server sent {what} {_show(value, 24)}, not a number from {lowest} to "
            f"{highest}"
        )
    return int(value)


def _as_int(value: Any, what: str, *, lowest: int = 1, highest: int = MAX_NUMBER
            ) -> int | None:
    """`number` of a FETCH data item, or None when the item is missing or no number."""
    if isinstance(value, bytes) and value.isdigit():
        return number(value, what, lowest=lowest, highest=highest)
    return None


def _parse_internaldate(value: Any) -> datetime.datetime | None:
    if not isinstance(value, bytes):
        return None
    fast = parse_internaldate(value)
    if fast is not None:
        return fast
    try:
        return datetime.datetime.strptime(
            value.decode("ascii").strip(), "%d-%b-%Y %H:%M:%S %z"
        ).astimezone(datetime.UTC)
    except (ValueError, OverflowError):  # not a date, or out of datetime's years in UTC
        return None


def _parser(parse: Callable[[_R], FetchItem]) -> Callable[[_R], FetchItem]:
    """`parse`, failing only with FetchError: any other exception (a value no check foresaw)
    is a ProtocolFailed, which ends the session, not a traceback in the reactor."""

    @functools.wraps(parse)
    def guarded(reply: _R) -> FetchItem:
        try:
            return parse(reply)
        except FetchError:
            raise
        except Exception as e:
            raise ProtocolFailed(f"malformed FETCH reply ({type(e).__name__})") from None

    return guarded


@_parser
def parse_fetch(line: bytes) -> FetchItem:
    """One untagged FETCH reply (`N FETCH (...)`, literals inline) as a FetchItem."""
    try:
        tokens = imap4.parseNestedParens(line)
    except (imap4.MismatchedNesting, imap4.MismatchedQuoting, ValueError, IndexError):
        raise ProtocolFailed(f"malformed FETCH reply: {_show(line)}") from None
    if len(tokens) < 3 or not isinstance(tokens[2], list) or _as_int(
        tokens[0], "message number"
    ) is None:
        raise ProtocolFailed(f"malformed FETCH reply: {_show(line)}")
    items = tokens[2]
    values: dict[str, Any] = {}
    i = 0
    while i < len(items):
        key = items[i]
        if not isinstance(key, bytes):
            raise ProtocolFailed(f"malformed FETCH reply: {_show(line)}")
        name = key.upper()
        i += 1
        if name in (b"BODY", b"BINARY", b"RFC822") and i < len(items) and isinstance(
            items[i], list
        ):
            section = items[i]
            i += 1
            origin = b"<0>"
            if i < len(items) and isinstance(items[i], bytes) and items[i].startswith(b"<"):
                origin = items[i]
                i += 1
            if i >= len(items):
                raise ProtocolFailed(f"malformed FETCH reply: {_show(line)}")
            if section == [] and origin == b"<0>":  # from a later octet: part of it
                values["BODY[]"] = items[i]
            i += 1
            continue
        if i >= len(items):
            raise ProtocolFailed(f"malformed FETCH reply: {_show(line)}")
        values[name.decode("ascii", "replace")] = items[i]
        i += 1
    return _fetch_item(int(tokens[0]), values)


# The flags of messages, each set kept once however many messages carry it (a folder's
# messages share a few: (), (\\Seen,), ...): each was a tuple and strings of its own, about
# 100 bytes a message of a UID FETCH of FLAGS over a whole folder. Sets of at most
# SHARED_FLAGS_CHARS characters are shared, MAX_FLAG_SETS of them at most (a megabyte or two
# in all): a new one finding the table full empties it first (those given out stay shared
# among the messages holding them). Kept for good, the first 4,096 sets seen by the process
# (one hostile sync's, or months of keywords) were the only ones shared until a restart.
# A longer set is kept per message, as before.
MAX_FLAG_SETS = 4096
SHARED_FLAGS_CHARS = 200
_FLAG_SETS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _flags(values: list[Any]) -> tuple[str, ...]:
    """The flags of a FETCH reply that we keep. \\Recent belongs to one session, not to the
    message. A flag holding a control character (NUL, which PostgreSQL refuses) or white
    space (flags are stored space-separated) is no flag atom (RFC 3501) and is dropped."""
    kept = []
    for value in values:
        if not isinstance(value, bytes) or value.upper() == b"\\RECENT":
            continue
        flag = value.decode("utf-8", "replace")
        if flag.split() == [flag] and not has_cc(flag):
            kept.append(flag)
    flags = tuple(kept)
    if sum(map(len, flags)) > SHARED_FLAGS_CHARS:
        return flags
    shared = _FLAG_SETS.get(flags)
    if shared is None:
        if len(_FLAG_SETS) >= MAX_FLAG_SETS:
            _FLAG_SETS.clear()
        shared = _FLAG_SETS[flags] = flags
    return shared


def _fetch_item(seq: int, values: dict[str, Any]) -> FetchItem:
    """A FetchItem of a FETCH reply's data items (by upper-case name; BODY[] for the body)."""
    flags = values.get("FLAGS")
    modseq = values.get("MODSEQ")
    body = values.get("BODY[]", values.get("RFC822"))
    return FetchItem(
        seq=seq,
        uid=_as_int(values.get("UID"), "UID"),
        flags=_flags(flags) if isinstance(flags, list) else None,
        internal_date=_parse_internaldate(values.get("INTERNALDATE")),
        size=_as_int(values.get("RFC822.SIZE"), "RFC822.SIZE", lowest=0, highest=MAX_MODSEQ),
        body=body if isinstance(body, bytes) else None,
        modseq=_as_int(modseq[0], "MODSEQ", lowest=0, highest=MAX_MODSEQ)
        if isinstance(modseq, list) and modseq else None,
    )


@_parser
def parse_fetch_lean(reply: Reply) -> FetchItem:
    """An untagged FETCH reply read by the bulk reader: the lean parser for the usual shape,
    the general one for any other."""
    found = parse_fetch_reply(reply)
    if found is not None:
        return _fetch_item(found.seq, found.values)
    return parse_fetch(reply.joined()[2:])


class _ChangedFlags(list[bytes]):
    """The untagged lines of a QRESYNC EXAMINE, as Twisted's reader appends them, but for
    its FETCH replies (RFC 7162 3.2.5.1), each read as it arrives instead of kept: only
    the flags of UIDs up to `held` (the highest we hold) are kept, each UID once, at most
    `limit` of them (past that none is, and `beyond` says so). The replies are counted;
    past the EXISTS seen and ARRIVING none is parsed (about 0.1 ms each), and one naming a
    UID kept, past two a UID and LIST_SLACK, is a ProtocolFailed (`failure`). All of them
    were kept as lines, then parsed, then kept as changes whatever their UID: as many as
    the reply's bytes bound let in (1.6 million small ones), each then an UPDATE."""

    def __init__(self, host: str, held: int, limit: int) -> None:
        super().__init__()
        self.host, self.held, self.limit = host, held, limit
        self.flags: dict[int, tuple[str, ...]] = {}
        self.exists = 0
        self.fetches = 0  # FETCH replies
        self.naming = 0  # those naming a UID kept
        self.beyond = False
        self.failure: ProtocolFailed | None = None

    def append(self, line: bytes) -> None:
        if not _RE_FETCH.match(line):
            if m := _RE_EXISTS.match(line):
                try:
                    self.exists = exists_count(m.group(1), self.host, "")
                except ProtocolFailed:
                    pass  # named by examine, which reads this line again
            super().append(line)
            return
        self.fetches += 1
        if self.beyond or self.failure is not None:
            return
        if self.fetches > self.exists + ARRIVING:  # an error when the EXAMINE is over
            self._drop()
            return
        if (m := _RE_FETCH_UID.match(line)) and len(m.group(1)) <= 10 \
                and int(m.group(1)) > self.held:
            return  # not a message we hold, seen without parsing the reply (20 us)
        try:
            item = (parse_fetch(line) if b"\r\n" in line  # a literal inline
                    else parse_fetch_lean(Reply([b"* " + line])))
        except ProtocolFailed as e:
            self.failure = e
            return
        if item.uid is None or item.flags is None or item.uid > self.held:
            return  # not a message we hold
        self.flags[item.uid] = item.flags
        self.naming += 1
        if self.naming > 2 * len(self.flags) + LIST_SLACK:
            self.failure = ProtocolFailed(
                f"{self.host} sent {self.naming} FETCH replies for {len(self.flags)} UIDs "
                f"to one EXAMINE, more than two a UID and {LIST_SLACK}")
        elif len(self.flags) > self.limit:
            self._drop()

    def _drop(self) -> None:
        self.beyond = True
        self.flags = {}


class _Streamed(list[bytes]):
    """The untagged lines of a UID FETCH of a set with a sink, on Twisted's reader: each
    FETCH reply parsed as Twisted's reader appends it and handed to `sink`, never kept
    (the others are, as any command's). Past `max_items` of them, or once the sink or the
    parser failed, none is parsed; `failure` says why, and the session ends when the
    command is answered (as `_ChangedFlags`)."""

    def __init__(self, host: str, sink: Callable[[FetchItem], None],
                 max_items: int | None) -> None:
        super().__init__()
        self.host, self.sink, self.max_items = host, sink, max_items
        self.fetches = 0
        self.failure: FetchError | None = None

    def append(self, line: bytes) -> None:
        if not _RE_FETCH.match(line):
            super().append(line)
            return
        self.fetches += 1
        if self.failure is not None:
            return
        if self.max_items is not None and self.fetches > self.max_items:
            self.failure = _too_many(self.host, self.max_items)
            return
        try:
            self.sink(parse_fetch(line))
        except FetchError as e:
            self.failure = e


class _Pipelined(imap4.Command):
    """A UID FETCH sent on the bulk path: its UIDs and the items read so far. It sits in
    Twisted's tag table too, so a failed session or a lost connection fails it."""

    def __init__(self, uids: list[int] | None, max_items: int | None = None,
                 within: tuple[int, int] | None = None,
                 sink: Callable[[FetchItem], None] | None = None) -> None:
        super().__init__(b"UID FETCH")
        self.uids = uids or []  # none for a set: it takes every FETCH reply (in `within`)
        self.max_items = max_items
        self.within = within
        self.over = False  # a set `within` given more than `max_items`: none kept since
        self.items: list[FetchItem] = []
        self.sink = sink  # takes each item as it is read, instead of `items`
        self.taken = 0  # the items taken, kept or sunk
        self.failure: Failure | None = None
        self.result: defer.Deferred[list[FetchItem]] = defer.Deferred()
        self.defer = self.result  # type: ignore[assignment]  # what Twisted's paths fail


def _names(item: FetchItem, within: tuple[int, int] | None) -> bool:
    """Whether a FETCH reply names a UID from within[0] to within[1] (any reply, no bounds)."""
    return within is None or (item.uid is not None and within[0] <= item.uid <= within[1])


def _too_many(host: str, max_items: int) -> ProtocolFailed:
    return ProtocolFailed(f"{host} sent more than {max_items} FETCH replies for one UID FETCH")


class TooManyReplies(ProtocolFailed):
    """A UID FETCH of a set `within` two UIDs was given more than its `max_items` replies
    naming them: none was kept past them, and the session goes on (its caller asks some
    other way)."""


# What `waiting` holds while the bulk reader owns the connection: Twisted queues commands.
_BULK = b"*bulk*"


def abort_transport(transport: Any) -> None:
    """Drop a connection at once (TCP and TLS transports both offer abortConnection)."""
    transport.abortConnection()


def _tls_failure(reason: Failure) -> bool:
    if reason.check(SSL.Error):
        return True
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - service_identity is a dependency
        return False
    return reason.check(VerificationError) is not None


class IMAPClient(imap4.IMAP4Client):
    """One IMAP session. Create through `open_session`; every method fails with FetchError."""

    MAX_LENGTH = MAX_LINE

    def __init__(
        self,
        clock: IReactorTime,
        *,
        max_literal: int = DEFAULT_MAX_LITERAL,
        max_reply_bytes: int | None = None,
        idle_timeout: float = 120.0,
        command_timeout: float = 0.0,
        host: str = "server",
    ) -> None:
        super().__init__()
        self.greeted: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.error: FetchError | None = None
        self._last_tagged = b""  # the status of the last tagged answer
        self.capabilities: set[str] = set()
        self.max_literal = max_literal
        self.max_reply_bytes = max_reply_bytes or (max_literal * 2 + MAX_LINE)
        self.host = host
        self.timeout = int(idle_timeout) if idle_timeout > 0 else 0
        self.callLater = clock.callLater  # type: ignore[assignment]
        # The command deadline (0: none): a command is answered (tagged) within
        # `command_timeout` of being sent or of the answer before it, whatever else the
        # server sends meanwhile. Untagged replies restart the idle timer, as Dovecot's
        # `* OK Searched 40% of the mailbox` keeps a slow command alive; they cannot
        # keep one waiting past this.
        self.command_timeout = command_timeout
        self._deadline: IDelayedCall | None = None
        self._inflight = 0
        self._dead = False
        # The bulk path (pipelined UID FETCH): its reader while it owns the connection, its
        # commands by tag and by UID, and the bytes read since the last one ended.
        self._bulk: ReplyReader | None = None
        self._bulk_tags: dict[bytes, _Pipelined] = {}
        self._bulk_uids: dict[int, _Pipelined] = {}
        self._bulk_set: _Pipelined | None = None  # a UID FETCH of a set, alone in flight
        self._bulk_bytes = 0
        # Reads that end no line, kept aside until one does (see dataReceived).
        self._partial: list[bytes] = []
        self._partial_bytes = 0

    # -- reading, bounded ---------------------------------------------------------------

    def _fail(self, err: FetchError) -> None:
        """Fail every pending command with `err` and drop the connection at once."""
        if self.error is None:
            self.error = err
        self._dead = True
        self._disarm()
        pending = [c for c in (self.tags or {}).values() if c is not None]
        pending += list(self.queued or [])
        self.tags, self.queued, self.waiting = {}, [], None
        self._bulk, self._bulk_tags, self._bulk_uids = None, {}, {}
        self._bulk_set = None
        for cmd in pending:
            d, cmd.defer = cmd.defer, None
            if d is not None and not d.called:
                d.errback(Failure(self.error))
        if not self.greeted.called:
            self.greeted.errback(Failure(self.error))
        self.clearLineBuffer()
        if self.transport is not None:
            abort_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._dead:
            return  # a failed session reads nothing more, so buffers nothing more
        if self._bulk is not None:
            self._bulk_received(data)
            return
        # An empty read (LineReceiver.resumeProducing's, to read what it holds) is not kept
        # aside: as the last piece, it hid a CR before it from `ends_line`.
        if (data and self.line_mode and not self.paused and not self._busyReceiving
                and not ends_line(data, self._partial[-1] if self._partial else self._buffer)):
            # No line ends in this read: kept aside. LineReceiver appends each read to its
            # buffer and searches the whole buffer again, so a line of 16 MiB read 64 KiB
            # at a time cost the reactor 6 s (quadratic in the line's length).
            self._partial.append(data)
            self._partial_bytes += len(data)
            if len(self._buffer) + self._partial_bytes < self.MAX_LENGTH + 2:
                return
            data = b""  # over the line bound: LineReceiver says so
        if self._partial:
            self._join_partial()
        super().dataReceived(data)

    def _join_partial(self) -> None:
        self._buffer += b"".join(self._partial)
        self._partial, self._partial_bytes = [], 0

    def clearLineBuffer(self) -> bytes:
        self._join_partial()
        return super().clearLineBuffer()  # type: ignore[no-any-return]

    # -- the bulk path ------------------------------------------------------------------

    def _bulk_possible(self) -> bool:
        """Whether a UID FETCH can go out now on the bulk path: the bulk reader already
        owns the connection, or Twisted's reader is idle between replies."""
        if self._bulk is not None:
            return True
        return (not self._dead and self.tags is not None and self.waiting is None
                and not self.queued and self._parts is None and bool(self.line_mode))

    def _bulk_send(self, uids: list[int] | None, args: bytes, max_items: int | None = None,
                   within: tuple[int, int] | None = None,
                   sink: Callable[[FetchItem], None] | None = None,
                   ) -> defer.Deferred[list[FetchItem]]:
        """Send a UID FETCH on the bulk path: of `uids`, or of a set (None: the set is in
        `args`, and the command takes every FETCH reply until it is answered, naming a UID
        `within` when given)."""
        leftover = b""
        if self._bulk is None:
            self._bulk = ReplyReader(max_line=self.MAX_LENGTH, max_literal=self.max_literal,
                                     host=self.host)
            leftover = self.clearLineBuffer()
            self.waiting = _BULK
            self._bulk_bytes = 0
        cmd = _Pipelined(uids, max_items, within, sink)
        if uids is None:
            self._bulk_set = cmd
        tag = self.makeTag()
        assert self.tags is not None
        self.tags[tag] = cmd
        self._bulk_tags[tag] = cmd
        for uid in cmd.uids:
            self._bulk_uids[uid] = cmd
        d = cmd.result
        self.sendLine(tag + b" UID FETCH " + args)
        self._arm()
        if leftover:
            self._bulk_received(leftover)
        return d

    def _bulk_received(self, data: bytes) -> None:
        assert self._bulk is not None
        self.resetTimeout()
        self._bulk_bytes += len(data)
        if self._bulk_bytes > self.max_reply_bytes:
            self._fail(ProtocolFailed(
                f"{self.host} sent more than {self.max_reply_bytes} bytes for one command"
            ))
            return
        failed: LiteralTooLarge | None = None
        try:
            try:
                replies = self._bulk.feed(data)
            except LiteralTooLarge as e:  # the replies before it still answer their commands
                failed, replies = e, self._bulk.read_before_failure
            ended = [self._bulk_reply(reply) for reply in replies]
        except FetchError as e:
            self._fail(e)
            return
        except Exception as e:  # not a traceback in the reactor: this session ends
            self._fail(ProtocolFailed(
                f"malformed reply from {self.host} ({type(e).__name__})"))
            return
        done = [cmd for cmd in ended if cmd is not None]
        if failed is not None:
            self._fail(failed)  # the commands not answered yet
            self._bulk_answer(done)
            return
        if done:
            self._bulk_bytes = 0
        if not self._bulk_tags and self._bulk.at_boundary:
            # Every pipelined command has ended: Twisted's reader takes the connection back,
            # with whatever followed, and sends what was queued meanwhile.
            rest = self._bulk.rest()
            self._bulk, self._bulk_uids, self.waiting = None, {}, None
            if rest:
                super().dataReceived(rest)
            if not self._dead:
                self._flushQueue()
        if done:
            self._answered()
        self._bulk_answer(done)

    def _bulk_answer(self, done: list[_Pipelined]) -> None:
        """Fire the Deferreds of pipelined commands that were answered."""
        for cmd in done:
            d, cmd.defer = cmd.result, None
            if d.called:
                continue
            if cmd.failure is None:
                d.callback(cmd.items)
            else:
                d.errback(cmd.failure)

    def _bulk_reply(self, reply: Reply) -> _Pipelined | None:
        """Route one reply; the command it ended, if any."""
        first = reply.lines[0]
        if first.startswith(b"* "):
            if _RE_UNTAGGED_FETCH.match(first):
                item = parse_fetch_lean(reply)
                cmd = self._bulk_uids.get(item.uid) if item.uid is not None else None
                if cmd is None:
                    cmd = self._bulk_set
                    if cmd is not None and not _names(item, cmd.within):
                        cmd = None
                if cmd is not None and not cmd.over:
                    cmd.taken += 1
                    if cmd.max_items is not None and cmd.taken > cmd.max_items:
                        if cmd.within is None:
                            raise _too_many(self.host, cmd.max_items)
                        cmd.items, cmd.over = [], True
                    elif cmd.sink is not None:
                        cmd.sink(item)  # a FetchError it raises ends the session
                    else:
                        cmd.items.append(item)
            return None  # EXISTS, EXPUNGE, FETCH of flags alone...: nothing for a backup
        tag, _, rest = first.partition(b" ")
        cmd = self._bulk_tags.pop(tag, None)
        if cmd is None or len(reply.lines) > 1:
            raise ProtocolFailed(f"malformed reply from {self.host}: {_show(first)}")
        if self.tags is not None:
            self.tags.pop(tag, None)
        for uid in cmd.uids:
            if self._bulk_uids.get(uid) is cmd:
                del self._bulk_uids[uid]
        if self._bulk_set is cmd:
            self._bulk_set = None
        status, _, text = rest.partition(b" ")
        if status.upper() != b"OK":
            cmd.failure = Failure(ProtocolFailed(
                f"UID FETCH refused by {self.host}: {_show(text or rest)}"))
        elif cmd.over:
            assert cmd.max_items is not None
            cmd.failure = Failure(TooManyReplies(str(_too_many(self.host, cmd.max_items))))
        return cmd

    def lineReceived(self, line: bytes) -> None:
        if self._dead:
            return
        self._inflight += len(line) + 2 + LINE_COST
        if self._inflight > self.max_reply_bytes:
            self._fail(ProtocolFailed(
                f"{self.host} sent more than {self.max_reply_bytes} bytes for one command"
            ))
            return
        tagged = self._parts is None and not line.startswith((b"*", b"+"))
        try:
            super().lineReceived(line)
        except Exception:
            self._fail(ProtocolFailed(f"malformed reply from {self.host}: {_show(line)}"))
            return
        if tagged:
            self._inflight = 0
            self._answered()

    def _setupForLiteral(self, rest: bytes, octets: int) -> None:
        if octets > self.max_literal:
            self._fail(LiteralTooLarge(
                f"{self.host} announced a {octets}-byte literal, over the limit of "
                f"{self.max_literal} bytes", announced_uid(rest) if self._parts is None else None
            ))
            return
        self._inflight += octets
        if self._inflight > self.max_reply_bytes:
            self._fail(ProtocolFailed(
                f"{self.host} sent more than {self.max_reply_bytes} bytes for one command"
            ))
            return
        super()._setupForLiteral(rest, octets)

    def rawDataReceived(self, data: bytes) -> None:
        if self._dead:
            return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(ProtocolFailed(f"{self.host} sent a line longer than {self.MAX_LENGTH} bytes"))

    def dispatchCommand(self, tag: bytes, rest: bytes) -> None:
        if self._dead:
            return
        said = rest  # what an error shows: a BYE greeting's why (_show cuts it short)
        if self.state is None and tag == b"*":
            # The greeting: its [CAPABILITY ...] code is not read (CAPABILITY is asked once
            # logged in). Twisted parsed it into a dict: 15 MB of words held the reactor 30 s
            # and took 1.8 GB.
            rest = rest.split(None, 1)[0] + b" greeting"
        handler = (
            self.response_UNAUTH if self.state is None
            else getattr(self, "response_" + self.state.upper(), None)
        )
        try:
            if handler is None:
                raise imap4.IllegalServerResponse(tag + b" " + rest)
            handler(tag, rest)
        except Exception:
            self._fail(ProtocolFailed(
                f"malformed reply from {self.host}: {_show(tag + b' ' + said)}"
            ))

    def _defaultHandler(self, tag: bytes, rest: bytes) -> None:
        if tag in (b"*", b"+") and not self.waiting:
            # Outside any command: nothing for a backup client. Twisted parsed it first (a
            # 16 MiB line of words between two commands held the reactor as the greeting).
            return
        if tag not in (b"*", b"+"):
            # A command's tagged answer: NO and BAD are both an IMAP4Exception, told apart
            # by what `send` raises.
            self._last_tagged = rest.split(None, 1)[0].upper() if rest.strip() else b""
        super()._defaultHandler(tag, rest)

    def serverGreeting(self, caps: Any) -> None:
        if not self.greeted.called:
            self.greeted.callback(None)

    def _extraInfo(self, lines: Any) -> None:
        """Untagged replies outside any command: nothing to do for a backup client."""

    def timeoutConnection(self) -> None:
        self._fail(FetchTimeout(f"{self.host} stopped answering for {self.timeout} s"))

    def sendCommand(self, cmd: imap4.Command) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = super().sendCommand(cmd)
        self._arm()
        return d

    def _arm(self) -> None:
        """Start the command deadline, unless it runs already."""
        if self._deadline is None and self.command_timeout > 0 and not self._dead:
            self._deadline = self.callLater(self.command_timeout, self._command_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _answered(self) -> None:
        """A command was answered: the next one still waiting gets a whole deadline."""
        self._disarm()
        if self.tags:
            self._arm()

    def _command_timed_out(self) -> None:
        self._deadline = None
        self._fail(CommandTimeout(
            f"{self.host} answered no command for {self.command_timeout:g} s"))

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._dead = True
        self._disarm()
        if self.error is None:
            self.error = connection_lost_error(self.host, reason)
        if not self.greeted.called:
            self.greeted.errback(Failure(self.error))
        super().connectionLost(Failure(self.error))
        if not self.closed.called:
            self.closed.callback(None)

    # -- commands ------------------------------------------------------------------------

    def send(self, name: bytes, args: bytes | None = None, continuation: Any = None, *,
             lines: list[bytes] | None = None) -> defer.Deferred[tuple[list[bytes], bytes]]:
        """Queue a command; the Deferred fires with (untagged lines, tagged line). The
        lines are appended to `lines` when given (one reading some as they arrive)."""
        if self._dead or self.tags is None:
            return defer.fail(self.error or ConnectFailed(f"connection to {self.host} closed"))
        cmd = _RawCommand(name, args, (), continuation)
        if lines is not None:
            cmd.lines = lines
        d: defer.Deferred[tuple[list[bytes], bytes]] = self.sendCommand(cmd)

        def refused(f: Failure) -> Failure:
            if f.check(imap4.IMAP4Exception):
                said = f.value.args[0] if f.value is not None and f.value.args else b""
                text = _show(said) if isinstance(said, bytes) else str(said)
                raise CommandRefused(f"{name.decode()} refused by {self.host}: {text}",
                                     "BAD" if self._last_tagged == b"BAD" else "NO")
            return f

        d.addErrback(refused)
        return d

    async def ask_capabilities(self) -> set[str]:
        lines, _ = await self.send(b"CAPABILITY")
        caps: set[str] = set()
        # The lines whose first word is CAPABILITY, whatever white space follows it; only
        # they are split (a flood of other untagged lines is not made into words).
        listed = [line for line in lines if line[:10].upper() == b"CAPABILITY"
                  and (len(line) == 10 or line[10:11].isspace())]
        if sum(map(len, listed)) > MAX_CAPABILITY:
            self._fail(ProtocolFailed(
                f"{self.host} sent a CAPABILITY reply longer than {MAX_CAPABILITY} bytes"))
            assert self.error is not None
            raise self.error
        for line in listed:
            caps.update(w.decode("ascii", "replace").upper() for w in line.split()[1:])
        if not caps:
            raise ProtocolFailed(f"{self.host} gave no CAPABILITY reply")
        self.capabilities = caps
        return caps

    def _switch_to_tls(self, result: Any, creator: IOpenSSLClientConnectionCreator) -> Any:
        # Runs while the tagged OK is being dispatched: whatever plaintext followed it in the
        # same read is still in the line buffer and would be read as if it came over TLS.
        self.clearLineBuffer()
        self.transport.startTLS(creator)  # type: ignore[union-attr]
        self.startedTLS = True
        self._capCache = None
        self.capabilities = set()
        return result

    async def starttls(self, creator: IOpenSSLClientConnectionCreator) -> set[str]:
        """Switch to TLS and learn the capabilities again over it."""
        d = self.send(b"STARTTLS")
        d.addCallback(self._switch_to_tls, creator)
        await d
        return await self.ask_capabilities()

    async def authenticate_plain(self, username: str, password: str) -> None:
        """Log in with AUTHENTICATE PLAIN when offered, else LOGIN (never over cleartext
        unless the caller allowed it before calling)."""
        # NUL separates PLAIN's fields; CR and LF cannot be quoted for LOGIN.
        if breaks_line(username) or breaks_line(password):
            raise AuthFailed(
                f"the username or password holds NUL, CR or LF; not sent to {self.host}"
            )
        user, secret = username.encode("utf-8"), password.encode("utf-8")
        try:
            if "AUTH=PLAIN" in self.capabilities:
                token = base64.b64encode(b"\0" + user + b"\0" + secret)
                if "SASL-IR" in self.capabilities:
                    await self.send(b"AUTHENTICATE", b"PLAIN " + token)
                else:
                    sent: list[bool] = []

                    def answer(_challenge: bytes) -> None:
                        self.sendLine(b"*" if sent else token)
                        sent.append(True)

                    await self.send(b"AUTHENTICATE", b"PLAIN", answer)
            elif "LOGINDISABLED" in self.capabilities:
                raise AuthFailed(f"{self.host} disables LOGIN and offers no AUTH=PLAIN")
            else:
                try:
                    args = quote(user) + b" " + quote(secret)
                except ValueError:
                    raise AuthFailed(
                        f"{self.host} offers only LOGIN, which cannot carry these credentials"
                    ) from None
                await self.send(b"LOGIN", args)
        except ProtocolFailed as e:
            if self.error is not None:
                raise
            raise AuthFailed(f"login refused: {e}") from None

    async def list_folders(self) -> list[RemoteFolder]:
        """The folders of `list_all` that can be synced; ProtocolFailed when the server
        lists more than MAX_FOLDERS (a folder not read would be taken for one not there)."""
        listing = await self.list_all()
        if listing.beyond:
            raise ProtocolFailed(f"{self.host} lists more than {MAX_FOLDERS} folders")
        return listing.folders

    async def list_all(self) -> FolderListing:
        """LIST every folder: a malformed reply fails the session; a folder whose name or
        delimiter the store cannot keep is refused alone (`folder_problem`), as is one whose
        name is not modified UTF-7 as we write it (EXAMINE would open another folder, or
        name one listed under another spelling); a folder listed again is listed once, INBOX in
any case too (as INBOX when it is listed so, else as first listed). Only
        the first MAX_FOLDERS LIST replies are read: the others are counted (`beyond`)."""
        lines, _ = await self.send(b"LIST", b'"" "*"')
        listing = FolderListing(folders=[])
        seen: set[bytes] = set()
        listed = beyond = 0
        for line in lines:
            if not line[:5].upper() == b"LIST ":
                continue
            listed += 1
            if listed > MAX_FOLDERS:
                beyond += 1
                continue
            try:
                tokens = imap4.parseNestedParens(line)
                flags = frozenset(
                    f.decode("ascii", "replace").upper() for f in tokens[1]
                    if isinstance(f, bytes)
                )
                delim = tokens[2].decode("utf-8", "replace") if tokens[2] else None
                raw_name = tokens[3]
                if not isinstance(raw_name, bytes):
                    raise TypeError(raw_name)
            except (IndexError, AttributeError, TypeError, ValueError, UnicodeError,
                    imap4.MismatchedNesting, imap4.MismatchedQuoting):
                raise ProtocolFailed(f"malformed LIST reply: {_show(line)}") from None
            if raw_name in seen:
                continue
            seen.add(raw_name)
            try:
                name = raw_name.decode("imap4-utf-7")
            except ValueError:  # 8-bit bytes, a broken &...- run: this folder alone
                listing.refused.append((_show(raw_name), "the folder name is not modified "
                                        "UTF-7 (8-bit bytes?); not synced"))
                continue
            problem = folder_problem(name, delim)
            if problem is None and name.encode("imap4-utf-7") != raw_name:
                problem = ("the folder name is not modified UTF-7 as RFC 3501 writes it; "
                           "not synced")
            if problem is not None:
                listing.refused.append((_show(raw_name), problem))
                continue
            listing.folders.append(RemoteFolder(name=name, delimiter=delim, flags=flags))
        inboxes = [f for f in listing.folders if f.name.upper() == "INBOX"]
        if len(inboxes) > 1:
            # One folder whatever its case (RFC 3501 5.1), listed once as a repeated name
            # is: each spelling would EXAMINE it and store its messages again. "INBOX" if
            # listed so, else the first listed.
            kept = next((f for f in inboxes if f.name == "INBOX"), inboxes[0])
            listing.folders[:] = [f for f in listing.folders if f not in inboxes or f is kept]
        if beyond:
            listing.refused.append((
                f"({beyond} more folders)",
                f"{self.host} lists more than {MAX_FOLDERS} folders; those after the first "
                f"{MAX_FOLDERS} are not synced",
            ))
            return FolderListing(listing.folders, listing.refused, beyond)
        return listing

    async def examine(
        self, name: str, *, condstore: bool = False,
        qresync: tuple[int, int] | None = None, held: int = 0,
    ) -> SelectInfo:
        """EXAMINE a folder (read-only: nothing we do changes it). VANISHED and the flags
        changed are read only when `qresync` was asked for (RFC 7162), and only for UIDs up
        to `held` (the highest UID we hold of the folder under qresync's UIDVALIDITY): of
        the flags, at most MAX_CHANGED_FLAGS UIDs' (else `flags_beyond`)."""
        args = mailbox_arg(name)
        changed = None
        if qresync is not None:
            args += b" (QRESYNC (%d %d))" % qresync
            changed = _ChangedFlags(self.host, held, MAX_CHANGED_FLAGS)
        elif condstore:
            args += b" (CONDSTORE)"
        lines, _ = await self.send(b"EXAMINE", args, lines=changed)
        info = SelectInfo(exists=examined_exists(lines, self.host, repr(name)))
        vanished: set[int] = set()
        for line in lines:
            if m := _RE_CODE.match(line):
                key = m.group(1).upper()
                # 0 is kept for UIDVALIDITY and UIDNEXT, as before (a UID is never 0).
                if key == b"UIDVALIDITY":
                    info.uidvalidity = number(m.group(2), "UIDVALIDITY", lowest=0)
                elif key == b"UIDNEXT":
                    info.uidnext = number(m.group(2), "UIDNEXT", lowest=0)
                else:
                    info.highestmodseq = number(m.group(2), "HIGHESTMODSEQ", lowest=0,
                                                highest=MAX_MODSEQ)
            elif qresync is not None and (m := _RE_VANISHED.match(line)):
                vanished.update(expand_vanished(m.group(1), held))
                if len(vanished) > MAX_VANISHED:
                    raise ProtocolFailed(f"VANISHED names more than {MAX_VANISHED} UIDs")
        if changed is not None:
            # The flags QRESYNC says changed (RFC 7162 3.2.5.1), one FETCH a message at
            # most, read as they came (_ChangedFlags). Unasked for, they are not read.
            if changed.fetches > info.exists + ARRIVING:
                raise ProtocolFailed(f"{self.host} sent more than {info.exists + ARRIVING} "
                                     "FETCH replies to one EXAMINE")
            if changed.failure is not None:
                raise changed.failure
            info.changed_flags, info.flags_beyond = changed.flags, changed.beyond
        if info.uidvalidity is None:
            raise ProtocolFailed(f"{self.host} gave no UIDVALIDITY for {name!r}")
        info.vanished = sorted(vanished)
        return info

    async def uid_search(self, criteria: bytes, *, max_uids: int = MAX_SEARCH) -> list[int]:
        """The UIDs a UID SEARCH answers, sorted, each once. More than `max_uids` (at most
        MAX_SEARCH) in the replies is a ProtocolFailed before they are read: a 92 MB reply
        of 12 million UIDs held the reactor 50 s and took 1.7 GB."""
        max_uids = min(max_uids, MAX_SEARCH)
        lines, _ = await self.send(b"UID SEARCH", criteria)
        uids: set[int] = set()
        for line in lines:
            words = line.split(None, 1)
            if not words or words[0].upper() != b"SEARCH":
                continue
            # "(MODSEQ n)" (RFC 7162) ends the list; other words that are no number are
            # passed over. Read by whole lines: a loop of Python per word cost 3 us a UID.
            listed = line[len(words[0]):].split(b"(", 1)[0]
            plain = _RE_DIGITS.fullmatch(listed) is not None
            if plain and len(listed) > (max_uids - len(uids)) * 11 + 64:
                # More bytes of numbers than that many UIDs of 10 digits and a space take:
                # too many, known before the line is split (a 7 MB line of a million UIDs
                # was 100 MB of words, for a folder of three messages).
                raise ProtocolFailed(f"{self.host} answered a SEARCH with more than {max_uids} "
                                     "UIDs")
            digits = listed.split()
            if not plain:
                digits = [w for w in digits if w.isdigit()]
            if len(uids) + len(digits) > max_uids:
                raise ProtocolFailed(f"{self.host} answered a SEARCH with more than {max_uids} "
                                     "UIDs")
            if digits and max(map(len, digits)) > 10:  # over 2^32 - 1: named by number()
                number(next(w for w in digits if len(w) > 10), "UID")
            found = list(map(int, digits))
            if found and (min(found) < 1 or max(found) > MAX_NUMBER):
                number(b"%d" % next(u for u in found if not 1 <= u <= MAX_NUMBER), "UID")
            uids.update(found)
        return sorted(uids)

    def uid_fetch(
        self, uids: list[int] | bytes, items: bytes, modifiers: bytes = b"", *,
        max_items: int | None = None, within: tuple[int, int] | None = None,
        sink: Callable[[FetchItem], None] | None = None,
    ) -> defer.Deferred[list[FetchItem]]:
        """Queue a UID FETCH of a list of UIDs or a set like b"1:500" (callers pipeline by
        queueing several lists before awaiting). Both go on the bulk path when they can,
        whose reader parses each reply as it arrives: a list beside other lists, a set
        alone (it takes every FETCH reply while it is in flight). A set whose reply holds
        more than `max_items` FETCH replies ends the session (ProtocolFailed), as does a list
        on the bulk path given more than two replies a UID (and LIST_SLACK). A set `within`
        two UIDs keeps (and counts) only the replies naming a UID from one to the other (a
        server's flag changes of other messages, told unasked, are none of its answer), and
        given more than `max_items` of them keeps none past them and fails TooManyReplies
        once answered: the session goes on.

        A set may be given a `sink` (not with `within`): each item is handed to it as its
        reply is read, and none is kept (the Deferred fires with an empty list), so what
        the caller keeps of a folder's millions of replies is up to it. A FetchError the
        sink raises fails the command and ends the session (a reply no folder gives)."""
        assert sink is None or (isinstance(uids, bytes) and within is None)
        uid_set = uids if isinstance(uids, bytes) else compress_set(uids)
        if not isinstance(uids, bytes) and max_items is None:
            # On the bulk path a list takes the replies naming its UIDs: each once, maybe a
            # flag change told beside. One UID's reply sent again and again was kept each
            # time (the bytes bound let 5 million small ones be a gigabyte of FetchItems).
            max_items = 2 * len(uids) + LIST_SLACK
        args = uid_set + b" (" + items + b")"
        if modifiers:
            args += b" (" + modifiers + b")"
        if isinstance(uids, bytes):
            if self._bulk is None and self._bulk_possible():
                return self._bulk_send(None, args, max_items, within, sink)
        elif self._bulk_set is None and self._bulk_possible():
            return self._bulk_send(uids, args, max_items)
        if sink is not None:
            streamed = _Streamed(self.host, sink, max_items)
            # After the command(s) in flight, on Twisted's reader: each reply read as it comes.
            sent = self.send(b"UID FETCH", args, lines=streamed)

            def settle(_result: tuple[list[bytes], bytes]) -> list[FetchItem]:
                if streamed.failure is not None:
                    self._fail(streamed.failure)
                    raise streamed.failure
                return []

            return sent.addCallback(settle)
        d = self.send(b"UID FETCH", args)  # after the command(s) in flight, on Twisted's reader

        def parse(result: tuple[list[bytes], bytes]) -> list[FetchItem]:
            lines = [line for line in result[0] if _RE_FETCH.match(line)]
            if isinstance(uids, bytes) and max_items is not None and len(lines) > max_items \
                    and within is None:
                self._fail(_too_many(self.host, max_items))
                raise _too_many(self.host, max_items)
            found = [item for item in map(parse_fetch, lines) if _names(item, within)]
            if within is not None and max_items is not None and len(found) > max_items:
                raise TooManyReplies(str(_too_many(self.host, max_items)))
            return found

        return d.addCallback(parse)

    async def enable(self, *extensions: bytes) -> None:
        await self.send(b"ENABLE", b" ".join(extensions))

    async def close_session(self, wait: float = 5.0) -> None:
        """LOGOUT politely, waiting at most `wait` seconds for the answer, then make sure
        the connection is gone (cancelled or not)."""
        try:
            if not self._dead and self.tags is not None:
                timer = self.callLater(wait, lambda: self._fail(FetchTimeout(
                    f"{self.host} did not answer LOGOUT within {wait:g} s")))
                try:
                    await self.send(b"LOGOUT")
                except FetchError:
                    pass
                finally:
                    if timer.active():
                        timer.cancel()
        finally:
            if self.tags and not self._dead:
                # Unanswered (cancelled): its Deferred ends here, not again at connectionLost.
                self._fail(ConnectFailed(f"connection to {self.host} closed"))
            self.abort()

    def abort(self) -> None:
        self._dead = True
        if self.transport is not None:
            abort_transport(self.transport)


@dataclass(frozen=True)
class ServerSpec:
    """Where and how to reach a server (from an Account)."""

    host: str
    port: int
    use_ssl: bool
    start_tls: bool
    allow_cleartext: bool
    username: str
    password: str


def connection_lost_error(host: str, reason: Failure) -> FetchError:
    """Why a session's connection ended, as the one error the account will show."""
    if _tls_failure(reason):
        return TLSFailed(
            f"TLS with {host} failed (certificate not trusted or not for this host): "
            f"{reason.getErrorMessage()}"
        )
    return ConnectFailed(f"connection to {host} closed: {reason.getErrorMessage()}")


async def connect_to(
    reactor: Any,
    spec: ServerSpec,
    creator: IOpenSSLClientConnectionCreator,
    protocol: Any,
    connect_timeout: float,
    policy: AddressPolicy,
) -> None:
    """Connect `protocol` to the account's server, in TLS from the start when `use_ssl`
    (verified by `creator`); every connect failure becomes one ConnectFailed. The host is
    data from a user: only the addresses it resolves to that `policy` allows are tried, and
    a host with none fails before any connection is opened."""
    endpoint: Any = GuardedEndpoint(reactor, policy, spec.host, spec.port, connect_timeout,
                                    refusal=REFUSAL)
    if spec.use_ssl:
        endpoint = wrapClientTLS(creator, endpoint)
    try:
        await connectProtocol(endpoint, protocol)
    except AddressRefused as e:
        # The error reaches the user (an account's sync error, a job's reason, the APIs):
        # the addresses the host resolved to go to the operator's log only.
        if e.reasons:
            log.info("fetch: refused a connection to {host}:{port}: {error}: {reasons}",
                     host=spec.host, port=spec.port, error=str(e), reasons=e.reasons)
        raise ConnectFailed(f"cannot connect to {spec.host}:{spec.port}: {e.public} (the "
                            "operator's [fetch] address policy)") from None
    except Exception as e:
        raise ConnectFailed(f"cannot connect to {spec.host}:{spec.port}: {e}") from None


async def open_session(
    reactor: Any,
    spec: ServerSpec,
    creator: IOpenSSLClientConnectionCreator,
    *,
    max_literal: int = DEFAULT_MAX_LITERAL,
    connect_timeout: float = 30.0,
    idle_timeout: float = 120.0,
    command_timeout: float = 0.0,
    policy: AddressPolicy,
    client_class: type[IMAPClient] | None = None,
) -> IMAPClient:
    """Connect (only to an address `policy` allows), secure (TLS or STARTTLS, verified), log
    in; the session is ready to use. `client_class` is a subclass of IMAPClient taking the
    same arguments (the mailbox writer's pipelined session)."""
    client = (client_class or IMAPClient)(
        reactor, max_literal=max_literal, idle_timeout=idle_timeout,
        command_timeout=command_timeout, host=f"{spec.host}:{spec.port}",
    )
    await connect_to(reactor, spec, creator, client, connect_timeout, policy)
    try:
        await client.greeted
        caps = await client.ask_capabilities()
        if not spec.use_ssl:
            if "STARTTLS" in caps:
                caps = await client.starttls(creator)
            elif spec.start_tls or not spec.allow_cleartext:
                raise CleartextRefused(
                    f"{spec.host}:{spec.port} does not offer STARTTLS; refusing to send the "
                    "password in cleartext"
                )
        await client.authenticate_plain(spec.username, spec.password)
        await client.ask_capabilities()
    except BaseException:
        client.abort()
        raise
    return client

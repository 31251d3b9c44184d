"""Uploads streamed to disk: a multipart/form-data body read a chunk at a time, and file
parts written to a temp file that is hashed as it grows, fsynced and renamed into place.

twisted.web has already spooled the request body (in memory, or in a temp file when large);
the parsers here read it from that file object a chunk at a time, so a file part is never
held in memory whole. Every function blocks: run it on a thread pool. Used by the drop files
(mailcore.safedrop.files) and the Mail API's attachments (mailcore.mailapi.files).
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from multipart import (
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    content_disposition_unquote,
    parse_options_header,
)
from twisted.internet import defer
from twisted.python.failure import Failure

from mailcore.files import durable_directory, fsync_directory, private_directory

if TYPE_CHECKING:
    from mailcore.store.errands import Errand

CHUNK = 64 * 1024
T = TypeVar("T")
# What a part's Content-Transfer-Encoding may make of a file, for the limits checked before
# a body is read (or while it arrives), which can only count its encoded bytes: base64
# writes 4 characters for 3 bytes and a line break (CRLF) after each line, of 76 characters
# in MIME (RFC 2045 6.8) and 64 in PEM, so at most 11 bytes for 8 (4/3 x 66/64), and
# ENCODED_SLACK more for the padding and the last line.
ENCODED_SLACK = 8


def encoded_bound(size: int) -> int:
    """The most bytes a file of `size` bytes takes in an upload's body: as it is, or as
    base64 in lines of 64 characters or more. A body's limit is the file's limit so
    bounded (the limit itself counts the decoded bytes, as they are parsed): a client sends
    at most that, whatever it claims to encode."""
    return -(-size * 11 // 8) + ENCODED_SLACK


def decoded_least(encoded: int) -> int:
    """The fewest bytes `encoded` bytes of a part, within `encoded_bound`, decode to: what a
    check made before the body is read may count on (a file within a limit is never
    refused for its encoding's size). A quoted-printable part can decode to less (a third,
    for binary data); one that large is over `encoded_bound` of its size, and of its
    limit when it is that close to it."""
    return max(0, (encoded - ENCODED_SLACK) * 8 // 11)


class MalformedUpload(ValueError):
    """The body is not a multipart/form-data stream we can read."""


def form_boundary(content_type: str) -> str | None:
    """The boundary of a multipart/form-data content type, or None for any other type."""
    media, options = parse_options_header(content_type)
    boundary = options.get("boundary", "")
    if media.lower() != "multipart/form-data" or not boundary:
        return None
    return str(boundary)


def part_filename(segment: MultipartSegment) -> str | None:
    """A part's file name: RFC 5987's `filename*` (charset'lang'%xx), which RFC 7578
    discourages but some clients send (urllib3 1.x, for a name that is not ASCII; .NET's
    MultipartFormDataContent beside `filename` as an RFC 2047 word), else `filename`; ""
    when a `filename*` alone cannot be decoded; None when the part is not a file. With both,
    `filename*` is the name as RFC 6266 4.3 has recipients pick it, and as browsers do: a
    proxy or scanner in front reading the one and us the other would not see the same file
    (`filename="run.exe"; filename*=UTF-8''a.pdf` was stored as run.exe)."""
    header = segment.header("Content-Disposition", "")
    # (parameter names are read without case, as RFC 6266 and browsers read them)
    star = _parameters(_DISPOSITION_PARAMETER, header).get("filename*") \
        if "filename*" in header.lower() else None
    if star is not None:
        holder = Message()
        holder["Content-Disposition"] = f"attachment; filename*={star}"
        try:
            name = holder.get_filename()
        except (UnicodeError, LookupError, ValueError):
            name = None
        if name:
            return str(name)
    if segment.filename is not None:
        return str(segment.filename)
    return None if star is None else ""


def multipart_events(
    source: BinaryIO, boundary: str, *, max_header_count: int = 16,
    max_segment_count: int = 64,
) -> Iterator[MultipartSegment | bytes | None]:
    """The parser's events for the body in `source` (from its start): a segment, its body
    chunks, None at its end. A broken stream raises MalformedUpload."""
    source.seek(0)
    try:
        with PushMultipartParser(boundary, max_header_count=max_header_count,
                                 max_segment_count=max_segment_count) as parser:
            while not parser.closed:
                chunk = source.read(CHUNK)
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        _one_value_parameters(event)
                    yield event
                if not chunk:
                    break
    except MultipartError as e:
        raise MalformedUpload(f"Malformed multipart body: {_parser_reason(e)}") from None


# A `; name=value` parameter of a Content-Disposition as RFC 6266 and the email package
# read it: any key, a quoted string or the rest up to the next `;`, spaces or tabs around.
_DISPOSITION_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:\\.|[^\\"])*"|[^;]*)')
# The same as the multipart parser (2.0.1) reads it (its `_option`): a key of letters,
# digits, `-` and `_`, spaces only around `=`, a quoted string or a token, found anywhere
# after the first `;`, so inside another parameter's quoted value too.
_PARSER_PARAMETER = re.compile(
    r"""; *([a-zA-Z0-9-_]+) *= *("[^\\"]*"|[a-zA-Z0-9-!#$%&'*+.^_`|~]+|"(?:\\.|[^\\"])*")""")


def _one_value_parameters(segment: MultipartSegment) -> None:
    """Refuse a part whose Content-Disposition gives a parameter twice with different
    values (`filename="a.txt"; filename="b.exe"`, `name="to"; name="bcc"`), or whose name
    or filename the multipart parser reads otherwise than RFC 6266 does (`x.y="; filename=
    b.exe"`: the parser skips a key with a `.` and finds the filename in its value). The
    parser keeps the last of two, the email package the first, and a scanner or proxy in
    front may read either, so the file stored, or the field it fills, would not be the one
    another reader saw. As a field given twice is refused (web.parsing.given_twice)."""
    disposition = segment.header("Content-Disposition", "")
    read = _parameters(_DISPOSITION_PARAMETER, disposition)
    _parameters(_PARSER_PARAMETER, disposition)
    for key, parsed in (("name", segment.name), ("filename", segment.filename)):
        if read.get(key) != parsed:
            raise MalformedUpload(f"Malformed multipart body: a part's Content-Disposition "
                                  f"gives {key} in a way that parsers read differently.")


def _parameters(pattern: re.Pattern[str], disposition: str) -> dict[str, str]:
    """The parameters `pattern` finds after the disposition type, unquoted as the parser
    unquotes them; MalformedUpload if one is given twice with different values."""
    seen: dict[str, str] = {}
    start = disposition.find(";")
    for name, raw in pattern.findall(disposition, start) if start >= 0 else ():
        key = name.lower()
        value = content_disposition_unquote(raw.strip(), key == "filename")
        if seen.setdefault(key, value) != value:
            raise MalformedUpload(f"Malformed multipart body: a part's Content-Disposition "
                                  f"gives {key} more than once, with different values.")
    return seen


def _parser_reason(error: MultipartError) -> str:
    """What the parser found wrong, without the exception it may carry beside its message
    (str() of a header that is not UTF-8 was the repr of its args: the UnicodeDecodeError
    with the header's bytes)."""
    if any(isinstance(arg, UnicodeDecodeError) for arg in error.args):
        return "a part's header is not valid UTF-8."
    return str(error.args[0]) if error.args else str(error)


_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET)


class TransferDecoder:
    """Undoes a part's Content-Transfer-Encoding (base64, quoted-printable) a chunk at a
    time, as web.parsing undoes it for a body read whole: a part so encoded (RFC 7578 4.7
    says not to, and some clients still do) is its decoded bytes, not its encoding's."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        if self.encoding == "base64":
            data = self._carry + data.translate(None, _NOT_BASE64)
            whole = len(data) - len(data) % 4
            self._carry = data[whole:]
            return self._base64(data[:whole])
        # Quoted-printable: whole lines only, so that no =XX is cut in two.
        data = self._carry + data
        end = data.rfind(b"\n") + 1
        self._carry = data[end:]
        return binascii.a2b_qp(data[:end])

    def finish(self) -> bytes:
        rest, self._carry = self._carry, b""
        if self.encoding == "base64":
            return self._base64(rest + b"=" * (-len(rest) % 4)) if rest.strip(b"=") else b""
        return binascii.a2b_qp(rest)

    @staticmethod
    def _base64(data: bytes) -> bytes:
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            raise MalformedUpload("The value is not valid base64.") from None


def transfer_decoder(segment: MultipartSegment) -> TransferDecoder | None:
    """The decoder of a part's Content-Transfer-Encoding; None for the identity ones
    (7bit, 8bit, binary, none); MalformedUpload for another."""
    encoding = (segment.header("Content-Transfer-Encoding") or "").strip().lower()
    if encoding in ("", "7bit", "8bit", "binary"):
        return None
    if encoding in ("base64", "quoted-printable"):
        return TransferDecoder(encoding)
    raise MalformedUpload(f"Content-Transfer-Encoding {encoding[:40]!r} is not supported.")


class SpoolFile:
    """A temp file in `tmp` that counts and hashes (SHA-256) what is written to it. `keep`
    fsyncs it and renames it to its final path (and fsyncs that directory); leaving the
    `with` block without `keep` removes it."""

    def __init__(self, tmp: Path, prefix: str = "upload-") -> None:
        private_directory(tmp)
        fd, name = tempfile.mkstemp(dir=tmp, prefix=prefix)
        self.path = Path(name)
        self._out = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        self._out.write(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def keep(self, final: Path) -> bool:
        """Move the file to `final`; returns whether `final` is new (False: it was there
        already, with the same content when named by its hash)."""
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        durable_directory(final.parent)
        existed = final.exists()
        os.replace(self.path, final)
        fsync_directory(final.parent)
        return not existed

    def keep_under(self, final: Path, lock: threading.Lock) -> tuple[bool, int]:
        """`keep` it at `final` holding `lock`, the one its store takes files back under
        (so that taking a file back never removes the same bytes another upload has just
        written again): whether `final` is new, and its inode."""
        with lock:
            new = self.keep(final)
            return new, final.stat().st_ino

    def discard(self) -> None:
        if not self._out.closed:
            self._out.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.discard()


def remove_stale(tmp: Path, older_than: float, now: float | None = None) -> None:
    """Remove the files in `tmp` last written more than `older_than` seconds ago: what a
    crash left of SpoolFiles. Younger ones may be uploads in progress (a daemon's, while
    the `mailcore` command or another node starts up), so they stay. Blocks."""
    cutoff = (time.time() if now is None else now) - older_than
    try:
        entries = list(os.scandir(tmp))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except FileNotFoundError:
            continue


async def shielded(work: Coroutine[Any, Any, T], errand: Errand | None = None) -> T:
    """Await `work` without letting a cancellation reach it: a client going away cancels its
    request's Deferred, but an upload being stored ends with its file and its row, or with
    neither. The caller stops waiting; the work runs to its end. With `errand` (the one
    `work` runs its store work in, mailcore.store.errands), the caller's cancellation gives
    it up: what it handed the store and has not begun never begins, nor does any more, and
    `work` cleans up after it as after any failure."""
    running = defer.Deferred.fromCoroutine(work)
    waiter: defer.Deferred[T] = defer.Deferred(
        lambda _: errand.give_up() if errand is not None else None)

    def settle(result: Any) -> None:
        if waiter.called:
            return  # cancelled: nobody waits for the outcome any more
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    running.addBoth(settle)
    return await waiter

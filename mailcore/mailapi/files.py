"""The Mail API's files on disk: attachments, and inbox messages as received.

A file lives at `{files_dir}/mailapi/files/<first 2 hex digits>/<sha256 of its bytes>`
(`files_dir`: the data directory unless given; one shared storage for nodes sharing a
PostgreSQL store, mailcore.nodes.files) and is
named by the rows that use it (`mailapi_attachments.sha256`, `mailapi_mail.raw_sha256`): one
file however many mails hold the same bytes (every recipient of one delivered message, a
draft sent to many). Files are written before the row that names them commits (temp file in
`mailapi/tmp`, fsync, rename), so a crash can leave a file no row names but never a row
without its file.

An upload is read from the request body twisted.web spooled, a chunk at a time
(mailcore.uploads): text fields are kept (within `max_text` bytes in all), file parts go to
disk as they are parsed, each within `max_attachment` bytes and all of them within
`max_total`. A refused upload leaves no file: temp files are removed on every error, and
the files an upload placed are removed again when its mail is not stored (`discard`),
unless the same bytes were written again since (a new inode: another upload whose mail may
be about to name them).

Files no row names any more (mail deleted, a mailbox removed with its mail, a crash between
rename and commit) are removed once they are older than `GRACE` seconds, so that a file a
write is about to name is never taken from under it (MailService.collect and sweep; the age
is checked again at the removal). Placing a file and removing one are each one step under a
lock, so within a node no removal races a write of the same bytes; a write of another node
sharing the directory is put back by the removal (mailcore.files.remove_if_older). Every
method here blocks: run it on a thread pool.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from multipart import MultipartSegment

from mailcore.emailpolicy import filename_breaks
from mailcore.files import (
    durable_directory,
    private_directory,
    remove_if_older,
    unlink_if_same,
)
from mailcore.mailapi.errors import INVALID, MailApiError
from mailcore.text import has_control, has_surrogate, strip_bidi_controls
from mailcore.uploads import (
    MalformedUpload,
    SpoolFile,
    TransferDecoder,
    form_boundary,
    multipart_events,
    part_filename,
    remove_stale,
    transfer_decoder,
)

TOO_LARGE = "too_large"
# How old a file no row names must be before the sweep removes it (a write names the file
# it placed within this time, or its mail was not stored).
GRACE = 3600.0
MAX_PARTS = 256
MAX_FILENAME = 255
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredFile:
    """A file part written into place: the name it was uploaded under, its type, size and
    content hash; `new` when this upload made the file (so `discard` may take it back), and
    the inode it was written as (a later upload of the same bytes writes a new one)."""

    name: str
    content_type: str
    size: int
    sha256: str
    new: bool = False
    inode: int = 0


@dataclass
class Received:
    """A multipart body: its text fields (the last of a repeated name wins), its files."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)


class MailFiles:
    """The Mail API's files under one directory (`{files_dir}/mailapi`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Placing a file and taking one back are one step each under this lock, so that
        # an upload taking back its file never removes the same bytes another upload has
        # just written again (see `take_back`).
        self._placing = threading.Lock()

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def prepare(self) -> None:
        """Make the directories and remove temp files a crash left behind. `files` is
        recorded durably in its parents when made (an upload records only the directory
        it makes, `files/<xx>`). Blocks."""
        durable_directory(self.root / "files")
        private_directory(self.tmp)
        self.clear_tmp()

    def clear_tmp(self, now: float | None = None) -> None:
        """Remove temp files older than GRACE: what a crash left. (Younger ones may be
        uploads in progress, of this node or of another one sharing the directory.)"""
        remove_stale(self.tmp, GRACE, now)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a SHA-256 file name: {sha256!r}")
        return self.root / "files" / sha256[:2] / sha256

    def open(self, sha256: str) -> BinaryIO:
        return self.path(sha256).open("rb")

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def write(self, data: bytes) -> StoredFile:
        """Put `data` in the file named by its hash (the same bytes always land in the
        same file). Blocks (fsync)."""
        return self.write_chunks((data,))

    def write_chunks(self, chunks: Iterable[bytes]) -> StoredFile:
        """`write` of the bytes `chunks` yields, as they come; an error of theirs leaves no
        file. Blocks."""
        with SpoolFile(self.tmp) as out:
            for chunk in chunks:
                out.write(chunk)
            new, inode = out.keep_under(self.path(out.sha256), self._placing)
            return StoredFile("", "", out.size, out.sha256, new, inode)

    def receive(self, source: BinaryIO, content_type: str, received: Received, *,
                max_attachment: int, max_total: int, max_text: int) -> None:
        """Parse a multipart/form-data body into `received`, storing its file parts (see
        the module docstring). On MailApiError (INVALID, or TOO_LARGE for a limit) the
        files placed so far are in `received.files`, for the caller to take back."""
        boundary = form_boundary(content_type)
        if boundary is None:
            raise MailApiError(INVALID, "Malformed multipart body: no boundary.")
        self._parse(source, boundary, received, max_attachment, max_total, max_text)

    def _parse(self, source: BinaryIO, boundary: str, received: Received,
               max_attachment: int, max_total: int, max_text: int) -> None:
        total = text_size = 0
        segment: MultipartSegment | None = None
        text: list[bytes] = []
        out: SpoolFile | None = None
        decoder: TransferDecoder | None = None

        def take(data: bytes) -> None:
            nonlocal total, text_size
            if out is not None:
                if out.size + len(data) > max_attachment:
                    raise MailApiError(
                        TOO_LARGE, f"attachment {_shown(segment)!r} is larger than "
                        f"{max_attachment} bytes", "attachment")
                total += len(data)
                if total > max_total:
                    raise MailApiError(TOO_LARGE, "the attachments are larger than "
                                       f"{max_total} bytes in all", "attachment")
                out.write(data)
            else:
                text_size += len(data)
                if text_size > max_text:
                    raise MailApiError(TOO_LARGE, "the text fields are larger than "
                                       f"{max_text} bytes", str(segment and segment.name))
                text.append(bytes(data))

        try:
            for event in multipart_events(source, boundary, max_segment_count=MAX_PARTS):
                if isinstance(event, MultipartSegment):
                    segment, text = event, []
                    if not event.name:
                        raise MailApiError(INVALID, "Malformed multipart body: a part has "
                                           "no name.")
                    decoder = transfer_decoder(event)
                    if part_filename(event) is not None:
                        out = SpoolFile(self.tmp)
                elif event is None:
                    assert segment is not None
                    if decoder is not None:
                        take(decoder.finish())
                    if out is not None:
                        received.files.append(self._place(segment, out))
                        out = None
                    else:
                        name, value = str(segment.name), _text(segment, b"".join(text))
                        if received.fields.get(name, value) != value:
                            # One value a field: `to` twice (a list, as clients send
                            # one) would mail the last address only.
                            raise MailApiError(INVALID, f"{name}: The field is given more "
                                               "than once, with different values; it "
                                               "takes one value.", name)
                        received.fields[name] = value
                else:
                    take(decoder.feed(bytes(event)) if decoder is not None else event)
        except MalformedUpload as e:
            raise MailApiError(INVALID, str(e)) from None
        finally:
            if out is not None:
                out.discard()

    def _place(self, segment: MultipartSegment, out: SpoolFile) -> StoredFile:
        new, inode = out.keep_under(self.path(out.sha256), self._placing)
        media = segment.content_type or "application/octet-stream"
        if has_control(media):
            media = "application/octet-stream"
        return StoredFile(_shown(segment), media[:255], out.size, out.sha256, new, inode)

    def remove_older(self, hashes: Iterable[str], cutoff: float) -> int:
        """Remove those of `hashes` still last written before `cutoff` (one written again
        since, by an upload whose mail may be about to name it, stays); how many."""
        removed = 0
        for sha256 in hashes:
            # The lock keeps this node's writes out; another node's (shared storage) are
            # kept by the removal itself (remove_if_older).
            with self._placing:
                removed += remove_if_older(self.path(sha256), self.tmp, cutoff)
        return removed

    def take_back(self, files: Iterable[StoredFile]) -> None:
        """Remove the files these uploads made, unless the same bytes were written again
        since (another upload, whose mail may be about to name them: a new inode)."""
        for f in files:
            with self._placing:
                unlink_if_same(self.path(f.sha256), f.inode, self.tmp)

    def older_than(self, hashes: Iterable[str], cutoff: float) -> list[str]:
        """Those of `hashes` whose file was last written before `cutoff` (epoch seconds)."""
        old = []
        for sha256 in hashes:
            try:
                if self.path(sha256).stat().st_mtime < cutoff:
                    old.append(sha256)
            except FileNotFoundError:
                continue
        return old

    def hashes(self) -> list[str]:
        """Every file on disk, by its hash."""
        base = self.root / "files"
        if not base.is_dir():
            return []
        found: list[str] = []
        for sub in sorted(base.iterdir()):
            if sub.is_dir():
                found.extend(e.name for e in os.scandir(sub) if _SHA256.fullmatch(e.name))
        return found


def _shown(segment: MultipartSegment | None) -> str:
    """The file name a part is kept under (file_name)."""
    return file_name(part_filename(segment) if segment is not None else None)


def file_name(raw: str | None, default: str = "attachment") -> str:
    """The name a file is kept and shown under, uploaded or received: the last path
    component of the name it came with (RFC 2183 2.3: no directory information is taken
    from it), one line of text, without bidirectional controls ("invoice\u202efdp.exe"
    reads as "invoiceexe.pdf", mailcore.text), at most MAX_FILENAME characters; `default`
    when nothing of it is left."""
    name = strip_bidi_controls((raw or "").replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if not name or name in (".", "..") or has_control(name) or has_surrogate(name) \
            or filename_breaks(name):  # a line break once its RFC 2047 words are decoded
        return default
    return name[:MAX_FILENAME]


def _text(segment: MultipartSegment, raw: bytes) -> str:
    try:
        value = raw.decode(segment.charset or "utf-8")
    except (UnicodeError, LookupError):
        raise MailApiError(INVALID, f"{segment.name}: The value is not valid UTF-8.",
                           segment.name) from None
    if has_surrogate(value):
        raise MailApiError(INVALID, f"{segment.name}: The value holds a lone surrogate, "
                           "which is not text.", segment.name)
    return value

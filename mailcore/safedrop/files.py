"""Uploads written to disk as they are parsed, and the files of a drop on disk.

A file lives at `{files_dir}/safedrop/<bundle id>/<sha256 of its bytes>` (`files_dir`: the
data directory unless given; one shared storage for nodes sharing a PostgreSQL store,
mailcore.nodes.files). An upload is
parsed from the request body (already spooled by twisted.web, in memory or in a temp file)
with the streaming multipart parser of mailcore.uploads, a chunk at a time (a part's
Content-Transfer-Encoding, base64 or quoted-printable, undone as it streams; bad base64 or
another encoding is refused): each chunk is hashed and written to a temp file in
`{files_dir}/safedrop/tmp`, which is fsynced and renamed into place once the part is
complete and within its limit. Nothing of a failed upload stays:
the temp file is removed on every error, and the file it placed is taken back when its row
is not written (`take_back`), unless another upload of the same bytes wrote it again since
(a new inode: that upload's row may be about to name it). Placing a file and taking one back
are each one step under a lock. Every function here blocks: run it on a thread pool.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

from multipart import MultipartSegment

from mailcore.files import (
    durable_directory,
    fsync_directory,
    private_directory,
    unlink_if_same,
)
from mailcore.safedrop.model import MAX_FILENAME, DropError, TooLarge, bundle_full
from mailcore.text import has_control, strip_bidi_controls
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

FILE_FIELD = "the_file"
# How old a temp file must be to count as a crash's leftover: an upload writes its temp
# file from the request body twisted.web already holds, in seconds.
STALE_UPLOAD = 3600.0


@dataclasses.dataclass(frozen=True)
class Stored:
    """A file written into place: its name as uploaded, type, size and content hash; `new`
    when this upload made the file, and the inode it was written as (a later upload of the
    same bytes writes a new one)."""

    name: str
    content_type: str
    size: int
    sha256: str
    new: bool = False
    inode: int = 0


class DropFiles:
    """The drop files under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Placing a file and taking one back are one step each under this lock, so that an
        # upload taking back its file never removes the same bytes another upload has just
        # written again (see `take_back`).
        self._placing = threading.Lock()

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def prepare(self) -> None:
        """Make the directories and remove temp files a crash left behind (older than
        STALE_UPLOAD): a younger one is an upload in progress of the daemon, which runs
        while a `mailcore` command starts up and prepares the same directory. The root is
        recorded durably in its parent when made (an upload records only the bundle
        directory it makes). Blocks."""
        durable_directory(self.root)
        private_directory(self.tmp)
        remove_stale(self.tmp, STALE_UPLOAD)

    def path(self, bundle_id: int, sha256: str) -> Path:
        return self.root / str(bundle_id) / sha256

    def take_back(self, bundle_id: int, stored: Stored) -> None:
        """Remove the file an upload whose row was not written placed: only if that upload
        made it (`new`) and it is still the file it wrote (the same inode). Another upload
        of the same bytes to the bundle wrote it again otherwise, and its row may be
        committed, or about to be, naming it. Blocks."""
        if not stored.new:
            return
        with self._placing:
            unlink_if_same(self.path(bundle_id, stored.sha256), stored.inode, self.tmp)

    def remove_bundle(self, bundle_id: int) -> None:
        """Delete every stored file of a bundle, for good: the removal of its directory is
        on disk (the drop root fsynced) when this returns. Blocks."""
        directory = self.root / str(bundle_id)
        if not directory.exists():
            return
        shutil.rmtree(directory, ignore_errors=True)
        fsync_directory(self.root)

    def bundle_ids(self) -> list[int]:
        """The bundles that have a directory of files. Blocks."""
        try:
            names = [entry.name for entry in os.scandir(self.root) if entry.is_dir()]
        except FileNotFoundError:
            return []
        return sorted(int(name) for name in names if name.isascii() and name.isdigit())

    def receive(
        self, source: BinaryIO, content_type: str, bundle_id: int, limit: int, bundle_room: int,
        room_error: TooLarge | None = None,
    ) -> Stored:
        """Parse a multipart/form-data body from `source` and store its one `the_file`
        part; `limit` bounds the file, `bundle_room` what the bundle (or its owner) may
        still take: past it `room_error`, by default the bundle's."""
        boundary = form_boundary(content_type)
        if boundary is None:
            raise DropError(
                None, "Send the file as multipart/form-data with a boundary (field the_file)."
            )
        with SpoolFile(self.tmp) as out:
            stored = self._parse(source, boundary, out, limit, bundle_room, room_error)
            new, inode = out.keep_under(self.path(bundle_id, stored.sha256), self._placing)
            return dataclasses.replace(stored, new=new, inode=inode)

    def _parse(
        self, source: BinaryIO, boundary: str, out: SpoolFile, limit: int, bundle_room: int,
        room_error: TooLarge | None,
    ) -> Stored:
        found: tuple[str, str] | None = None
        decoder: TransferDecoder | None = None

        def take(data: bytes) -> None:
            if out.size + len(data) > limit:
                raise TooLarge(FILE_FIELD, f"The file is larger than {limit} bytes.")
            if out.size + len(data) > bundle_room:
                raise room_error or bundle_full()
            out.write(data)

        try:
            for event in multipart_events(source, boundary):
                if isinstance(event, MultipartSegment):
                    if event.name != FILE_FIELD:
                        raise DropError(event.name or None, "Unknown field.")
                    if found is not None:
                        raise DropError(FILE_FIELD, "Send one file per request.")
                    filename = part_filename(event)
                    if filename is None:
                        raise DropError(FILE_FIELD, "The part carries no file name.")
                    found = (
                        clean_filename(filename),
                        event.content_type or "application/octet-stream",
                    )
                    # Its Content-Transfer-Encoding undone as it streams (as the Mail
                    # API's uploads undo it): the limits count the file's own bytes.
                    decoder = transfer_decoder(event)
                elif event is None:
                    if decoder is not None:
                        take(decoder.finish())
                        decoder = None
                elif event:
                    take(decoder.feed(bytes(event)) if decoder is not None else event)
        except MalformedUpload as e:
            raise DropError(None, str(e)) from None
        if found is None:
            raise DropError(FILE_FIELD, "This field is required.")
        name, media = found
        return Stored(name, media[:255], out.size, out.sha256)


def clean_filename(raw: str) -> str:
    """The name a file is shown and downloaded under: the last path component of what the
    client sent, one line of text, without bidirectional controls (which would show
    "invoice\u202efdp.exe" as "invoiceexe.pdf")."""
    name = strip_bidi_controls(raw.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    if not name or name in (".", ".."):
        raise DropError(FILE_FIELD, "The file has no name.")
    if has_control(name):
        raise DropError(FILE_FIELD, "The file name contains control characters.")
    if len(name) > MAX_FILENAME:
        raise DropError(FILE_FIELD, f"The file name is longer than {MAX_FILENAME} characters.")
    return name

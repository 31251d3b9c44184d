"""Zip attachments opened in memory (stdlib zipfile) within limits against zip bombs.

`inspect_zip` hands every entry (its path, and its bytes unless encrypted) to a visitor and
recurses into nested zips. It stops and reports a bomb when an archive declares too many
entries or holds too many central directory headers (whatever it declares), an entry expands
by more than `max_ratio`, the bytes expanded exceed `max_total_size`, two entries share
local data (`overlapping_entries`), or zips nest deeper than `max_depth`. Entry counts,
overlaps and declared sizes are checked before anything is read or decompressed; reads are
chunked and counted as well.

The entries and the bytes expanded are counted in a `ZipReport`, which the caller may hand
to each zip of one message in turn, so that `max_entries` and `max_total_size` bound the
message and not each attachment: entries of up to `ratio_min_size` may compress as well as
they like, and one 6 KB zip whose 99 entries all name the same 1 KiB of deflated zeros
expands to 100 MB (0.25 s of CPU), so a message of 20 of them, 160 KB, cost 5.3 s and one of
1,000 would have cost minutes.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

# The records of the zip format read here before zipfile does (PKWARE's APPNOTE.TXT 4.3):
# their signatures and fixed sizes. zipfile holds the same values (stringFileHeader,
# sizeEndCentDir, ...) as module globals outside its __all__, undocumented and absent from
# typeshed's stubs (mypy refuses them): names it may change, not an API to build on.
# (ZIP_MAX_COMMENT, the one of them the stubs name, is used.)
_LOCAL = b"PK\x03\x04"  # a local file header: 30 bytes, then its name and extra field
_LOCAL_SIZE = 30
_CENTRAL = b"PK\x01\x02"  # a central directory file header
_EOCD = b"PK\x05\x06"  # the end of central directory record: 22 bytes and a comment
_EOCD_SIZE = 22
_ZIP64_EOCD = b"PK\x06\x06"  # the zip64 end of central directory record: 56 bytes
_ZIP64_EOCD_SIZE = 56
_SPANNED = b"PK\x07\x08"  # what a split archive begins with
ZIP_MAGIC = (_LOCAL, _EOCD, _SPANNED)
ZIP_TYPES = frozenset({
    "application/zip", "application/x-zip", "application/x-zip-compressed",
    "application/zip-compressed",
})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ZipLimits:
    """Bounds for opening the zip attachments of one message (nested zips included): the
    entries and bytes expanded are counted over all of them when they share a ZipReport."""

    max_entries: int = 1000
    max_total_size: int = 100 * 1024 * 1024
    max_ratio: float = 100.0
    ratio_min_size: int = 1024 * 1024  # smaller entries may compress as well as they like
    max_depth: int = 3


@dataclass(frozen=True)
class ZipEntry:
    """One file inside the archive: `path` names it from the attachment down
    ("a.zip/inner.zip/x.exe"); `content` is None when it could not be read (encrypted)."""

    path: str
    name: str
    content: bytes | None
    depth: int


@dataclass
class ZipReport:
    """What opening the attachment found besides the entries themselves."""

    bombs: list[str] = field(default_factory=list)
    encrypted: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    entries: int = 0
    expanded: int = 0


def looks_like_zip(data: bytes, filename: str = "", content_type: str = "") -> bool:
    """Zip by magic bytes, or by name or type (an archive with junk in front still opens)."""
    if data[:4] in ZIP_MAGIC:
        return True
    return filename.lower().endswith(".zip") or content_type in ZIP_TYPES


def inspect_zip(
    data: bytes, label: str, limits: ZipLimits, visit: Callable[[ZipEntry], None],
    report: ZipReport | None = None,
) -> ZipReport:
    """Open `data` as a zip, visit each entry, recurse into nested zips; never raises.
    With `report` (that of the message's earlier zips) its counts go on, and what this
    zip finds is added to its lists."""
    if report is None:
        report = ZipReport()
    _inspect(data, label, 1, limits, visit, report)
    return report


def declared_entries(data: bytes) -> int | None:
    """The entry count from the end-of-central-directory record, before zipfile reads the
    central directory (a million tiny entries would cost far more memory than the bytes)."""
    start = max(0, len(data) - (zipfile.ZIP_MAX_COMMENT + _EOCD_SIZE))
    pos = data.rfind(_EOCD, start)
    if pos < 0 or pos + _EOCD_SIZE > len(data):
        return None
    (count,) = struct.unpack_from("<H", data, pos + 10)
    if count != 0xFFFF:
        return int(count)
    z64 = data.rfind(_ZIP64_EOCD, 0, pos)
    if z64 < 0 or z64 + _ZIP64_EOCD_SIZE > len(data):
        return None
    (count64,) = struct.unpack_from("<Q", data, z64 + 32)
    return int(count64)


def central_headers(data: bytes) -> int:
    """How many central directory entries zipfile could read from `data`: at most one per
    central file header signature. zipfile reads the central directory by its size in
    bytes and never looks at the end record's entry count, so a count that lies (1, while
    the directory holds 700,000 entries of 47 bytes: a 33 MB attachment) does not bound
    what `infolist` builds; this does. A stored nested zip's entries count here too, as
    they count against the same limit when it is opened."""
    return data.count(_CENTRAL)


def overlapping_entries(data: bytes, infos: list[zipfile.ZipInfo]) -> str | None:
    """Two central directory entries whose local data share bytes, read before anything
    is inflated, or None. Each entry's extent is its local header, name, extra field and
    compressed data; in a zip any tool writes they lie side by side. The overlapping
    entries bomb (Fifield, 2019) names one deflated 1 KiB of zeros from 99 entries, 6 KB
    expanding to 100 MB within every other limit (the same offset named twice), or puts
    each local header inside the previous entry's data (an offset of its own, within
    another). An entry whose local header is not where it says is left to its read (it is
    unreadable)."""
    extents: list[tuple[int, int, str]] = []
    for info in infos:
        start = info.header_offset  # (zipfile's: junk in front of the zip counted)
        if (start < 0 or data[start:start + len(_LOCAL)] != _LOCAL
                or start + _LOCAL_SIZE > len(data)):
            continue
        name_size, extra_size = struct.unpack_from("<2H", data, start + 26)
        end = start + _LOCAL_SIZE + name_size + extra_size + info.compress_size
        extents.append((start, end, info.filename))
    extents.sort()
    for (start, end, name), (later, _end, other) in pairwise(extents):
        if later < end:
            return (f"entries overlap ({other!r} starts at offset {later}, within {name!r}, "
                    f"offsets {start} to {end})")
    return None


def _inspect(
    data: bytes, label: str, depth: int, limits: ZipLimits,
    visit: Callable[[ZipEntry], None], report: ZipReport,
) -> None:
    if depth > limits.max_depth:
        report.bombs.append(f"{label}: zips nested deeper than {limits.max_depth}")
        return
    count = declared_entries(data)
    if count is not None and report.entries + count > limits.max_entries:
        report.bombs.append(f"{label}: {count} entries (limit {limits.max_entries})")
        return
    headers = central_headers(data)
    if report.entries + headers > limits.max_entries:
        report.bombs.append(f"{label}: {headers} central directory entries, declares "
                            f"{count} (limit {limits.max_entries})")
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as e:  # hostile input: any failure to open means "unreadable"
        report.unreadable.append(f"{label}: {type(e).__name__}: {e}"[:300])
        return
    with archive:
        overlap = overlapping_entries(data, infos)
        if overlap is not None:
            report.bombs.append(f"{label}: {overlap}")
            return
        for info in infos:
            if info.is_dir():
                continue
            report.entries += 1
            if report.entries > limits.max_entries:
                report.bombs.append(f"{label}: more than {limits.max_entries} entries")
                return
            path = f"{label}/{info.filename}"
            problem = _declared_problem(info, report, limits)
            if problem is not None:
                report.bombs.append(f"{path}: {problem}")
                return
            if info.flag_bits & 0x1:
                report.encrypted.append(path)
                visit(ZipEntry(path, info.filename, None, depth))
                continue
            content, problem = _read(archive, info, report, limits)
            if problem is not None:
                report.bombs.append(f"{path}: {problem}")
                return
            if content is None:
                report.unreadable.append(path)
                visit(ZipEntry(path, info.filename, None, depth))
                continue
            visit(ZipEntry(path, info.filename, content, depth))
            if content[:4] in ZIP_MAGIC:
                bombs = len(report.bombs)  # (the report may hold earlier zips' bombs)
                _inspect(content, path, depth + 1, limits, visit, report)
                if len(report.bombs) > bombs:
                    return


def _declared_problem(
    info: zipfile.ZipInfo, report: ZipReport, limits: ZipLimits
) -> str | None:
    if report.expanded + info.file_size > limits.max_total_size:
        return (f"expands to more than {limits.max_total_size} bytes "
                f"(declares {info.file_size})")
    return _ratio_problem(info.file_size, info.compress_size, limits)


def _ratio_problem(size: int, compressed: int, limits: ZipLimits) -> str | None:
    if size <= limits.ratio_min_size:
        return None
    ratio = size / max(compressed, 1)
    if ratio > limits.max_ratio:
        return f"compression ratio {ratio:.0f}:1 (limit {limits.max_ratio:g}:1)"
    return None


def _read(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, report: ZipReport, limits: ZipLimits,
) -> tuple[bytes | None, str | None]:
    """The entry's bytes, read in counted chunks: (content, None), (None, bomb reason),
    or (None, None) when it cannot be read."""
    chunks: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as stream:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                report.expanded += len(chunk)
                if report.expanded > limits.max_total_size:
                    return None, f"expands to more than {limits.max_total_size} bytes"
                chunks.append(chunk)
    except Exception:  # CRC errors, unsupported methods, truncation: keep what we read
        if not chunks:
            return None, None
    problem = _ratio_problem(size, info.compress_size, limits)
    if problem is not None:
        return None, problem
    return b"".join(chunks), None

"""Private files: what the daemon and the CLI write is readable by their user only.

The data directory is made 0700; the SQLite database, its WAL and shared-memory files, the
TLS key, `quarantine.key`, `fetch.key`, `pages.key` (web.pages) and twistd's log file 0600.
Two layers make it so:

- `restrict_umask`, called first by the daemon (`makeService`) and by the CLI, adds 077 to
  the process umask, so every file made afterwards — by us, by SQLite (`-wal`, `-shm`) or
  by twistd (its `--logfile`, opened after `makeService` returns) — is private. twistd's
  own `--umask` still wins for files made after start-up, when given.
- The files that hold secrets are also made with explicit modes (`private_directory`,
  `private_file`), so they are private whatever the umask (tests, library use). SQLite
  gives a database's `-wal` and `-shm` the mode of the database file itself.

Only what we create is affected: an existing directory or file keeps the mode it has.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def restrict_umask() -> int:
    """Add 077 to the process umask (a stricter one is kept); returns the previous one."""
    previous = os.umask(PRIVATE_UMASK)
    os.umask(previous | PRIVATE_UMASK)
    return previous


def private_directory(path: Path) -> Path:
    """Make `path` (and missing parents) if absent; `path` itself is made 0700. Blocks."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


def durable_directory(path: Path) -> Path:
    """`private_directory`, with each directory it makes recorded durably in its parent (a
    file renamed into a new directory and fsynced, its directory fsynced too, could still
    vanish with the directory's own entry on a power loss). Blocks."""
    made = []
    walk = path
    while not walk.is_dir() and walk.parent != walk:
        made.append(walk)
        walk = walk.parent
    private_directory(path)
    for directory in reversed(made):
        fsync_directory(directory.parent)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600 if it does not exist yet. Blocks."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path


def fsync_directory(path: Path) -> None:
    """Make the entries of directory `path` (a file created, renamed or linked) durable.
    Blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_if_same(path: Path, inode: int, graveyard: Path) -> None:
    """Remove `path` if it is still the file with `inode` (one written since, by another
    writer of the same content-named file, is left alone; so is a missing one). Blocks;
    the caller holds the lock its writers place files under, and writers outside it
    (another node on shared storage) are kept as `remove_judged` says."""
    remove_judged(path, graveyard, lambda st: st.st_ino == inode)


def remove_if_older(path: Path, graveyard: Path, cutoff: float) -> bool:
    """Remove `path` if it was last written before `cutoff` (epoch seconds); whether it was.
    Blocks; see `remove_judged`."""
    return remove_judged(path, graveyard, lambda st: st.st_mtime < cutoff)


def remove_judged(path: Path, graveyard: Path,
                  removable: Callable[[os.stat_result], bool]) -> bool:
    """Remove `path` if `removable` says so of it; whether it was removed. Another process
    may write the same content-named file again at any moment, outside the caller's lock
    (another node on shared storage): the file is renamed into `graveyard` (a directory on
    the same file system) first and judged again there, so that what is removed is the file
    that was judged, and one written again between the look and the rename is put back
    (its directory fsynced: a power loss must not undo the put-back of a file its writer
    made durable). A crash in between leaves the file in `graveyard`, whose sweep of old
    temp files removes it. Blocks."""
    try:
        if not removable(path.stat()):
            return False
        grave = graveyard / f".removing-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    try:
        if removable(grave.stat()):
            return True
        # Written again meanwhile: back in place, unless a newer copy is there.
        if not _put_unless_there(grave, path):
            return False
        # Its writer made it durable (an upload answered, its row committed): so is it
        # again, back in place, before its name in the graveyard goes.
        fsync_directory(path.parent)
        return False
    finally:
        grave.unlink(missing_ok=True)


def write_whole(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Put a file holding `data` (mode 0600) at `path`, whole or not at all: written to a temp
    file beside it, fsynced, then renamed into place (or, with `replace` False, linked there
    only if `path` does not exist) and the directory fsynced. So a crash, kill -9 or power
    loss, never leaves `path` empty or cut short; at worst a temp file `.{name}.*` beside
    it. Returns whether `path` is now this data (False: it existed and `replace` is False).
    Blocks."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        elif not _put_unless_there(tmp, path):
            return False
        fsync_directory(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _put_unless_there(source: Path, path: Path) -> bool:
    """Put the file `source` at `path` unless a file is there already; whether it was put.
    A hard link (refused at once when `path` exists; `source` stays, for its caller to
    remove); on a file system without hard links, a rename when `path` does not exist (two
    processes putting a file there at the same moment may then both think theirs won)."""
    try:
        os.link(source, path)
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        if path.exists():
            return False
        os.replace(source, path)
    return True


def secret_key_file(path: Path, size: int = 32) -> bytes:
    """The secret key kept in `path`, made (`size` random bytes, mode 0600) if absent. Blocks.

    A new key is written whole or not at all (`write_whole`). An empty file, what an older
    version killed while making the key left behind (nothing was ever signed with it), is
    made again instead of stopping every start. A key shorter than `size` bytes otherwise
    is refused (ValueError): a truncated file would weaken everything signed with it.
    """
    try:
        key = path.read_bytes()
        if not key:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        key = b""
    if not key:
        durable_directory(path.parent)
        key = secrets.token_bytes(size)
        if not write_whole(path, key, replace=False):  # made by another process meanwhile
            return secret_key_file(path, size)
    if len(key) < size:
        raise ValueError(f"{path}: the key is too short (fewer than {size} bytes)")
    return key

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


def private_file(path: Path) -> Path:
    """Create `path` empty with mode 0600 if it does not exist yet. Blocks."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path


def secret_key_file(path: Path, size: int = 32) -> bytes:
    """The secret key kept in `path`, made (`size` random bytes, mode 0600) if absent. Blocks.

    A key shorter than `size` bytes is refused (ValueError): a truncated file would weaken
    everything signed with it.
    """
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        private_directory(path.parent)
        key = secrets.token_bytes(size)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        except FileExistsError:  # made by another process meanwhile: use theirs
            return secret_key_file(path, size)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    if len(key) < size:
        raise ValueError(f"{path}: the key is too short (fewer than {size} bytes)")
    return key

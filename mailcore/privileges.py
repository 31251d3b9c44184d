"""Whose the daemon's files are when it is started as root.

A mail gateway listens on port 25, which only root may open (or a process given
CAP_NET_BIND_SERVICE, as systemd's `AmbientCapabilities=` does: see README, "Running it for
real"). `twistd --uid USER [--gid GROUP] mailcore …` started as root opens the listeners,
then switches to that user for good. Everything start-up writes before that switch would
be root's: the data directory, the SQLite database, its WAL, the keys, the lock file, the
self-signed certificate, all mode 0600 or 0700. After the switch the daemon could open none
of it: every store access failed ("unable to open database file") while the listeners
answered.

- `daemon_ids` is the (uid, gid) twistd will switch to, or None when it stays who it is.
- `acting_as` builds the daemon as that user (effective ids, and its groups), back to
  root only for the listeners: what start-up writes is that user's, and what that user
  cannot read (a certificate in root's 0700 `/etc/letsencrypt/live`) fails now, as one
  line, instead of at the first TLS handshake. A missing data directory is made and given
  to that user; one that holds anything of another user's is refused, naming the `chown`.
- `as_data_dir_owner` is the admin CLI's side: `mailcore …` run as root on a data
  directory that belongs to another user runs as that user for good, so a `sudo mailcore
  user add` leaves no root-owned file (a SQLite WAL, a new key) the daemon cannot open.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mailcore.config import ConfigError


def daemon_ids(twistd_options: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The uid and gid `twistd --uid/--gid` (its parsed options) will switch to; None when
    this process is not root or is told to stay root. A --uid without --gid takes that
    user's primary group, as twistd does."""
    if twistd_options is None or os.geteuid() != 0:
        return None
    uid, gid = twistd_options.get("uid"), twistd_options.get("gid")
    if uid is None or uid == 0:
        return None
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ConfigError(f"--uid {uid}: no such user") from None
    return int(uid), int(gid)


def _groups(uid: int, gid: int) -> list[int]:
    """The user's groups: its primary one and those that list it (none for a bare uid)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return [gid]
    return os.getgrouplist(name, gid)


def _check_owner(data_dir: Path, uid: int, gid: int) -> None:
    """ConfigError when the data directory, or anything directly in it, is not `uid`'s."""
    others = [p for p in (data_dir, *sorted(data_dir.iterdir()))
              if p.lstat().st_uid != uid]
    if others:
        names = ", ".join(p.name or str(p) for p in others[:3])
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        raise ConfigError(
            f"data directory {data_dir}: {names}{more} not owned by uid {uid}, the user the "
            f"daemon runs as (--uid); give it that user: chown -R {uid}:{gid} {data_dir}")


@contextmanager
def acting_as(ids: tuple[int, int] | None, data_dir: Path) -> Iterator[None]:
    """Run the block as the user `ids` names (effective ids and groups), then root again;
    nothing to do for None. See the module docstring."""
    if ids is None:
        yield
        return
    uid, gid = ids
    if not data_dir.exists():
        try:
            data_dir.mkdir(mode=0o700, parents=True)
            os.chown(data_dir, uid, gid)
        except OSError as e:
            raise ConfigError(f"data directory {data_dir}: {e.strerror}") from None
    elif data_dir.is_dir():
        _check_owner(data_dir, uid, gid)
    groups = os.getgroups()
    os.setgroups(_groups(uid, gid))
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def as_data_dir_owner(data_dir: Path) -> None:
    """Root running a command on another user's data directory becomes that user, for
    good (see the module docstring); anyone else, or a directory not made yet, stays."""
    if os.geteuid() != 0:
        return
    try:
        st = data_dir.stat()
    except OSError:
        return
    if st.st_uid == 0:
        return
    os.setgroups(_groups(st.st_uid, st.st_gid))
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)

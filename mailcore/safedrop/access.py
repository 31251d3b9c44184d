"""The recipient's side of a drop: opening a link, the password and one-time code checks,
downloads, read_remove, and the grant a browser keeps between requests.

A link names one recipient of one sent bundle. It stops working (`DropGone`, a 410 page)
when the bundle expired or was removed, when the recipient's own `valid_for` ran out, or,
with read_remove, once that recipient has downloaded every file; once every recipient has,
the files are deleted from disk. Once no link works any more (expired, or each one ended
for one of those reasons), the expiry sweep deletes the files (`expired_bundles_txn`).

The grant: after the password (and the one-time code, with require_token_auth) the browser
gets a cookie for that link only, holding which checks it passed and until when, signed with
HMAC-SHA256 under `{data_dir}/safedrop.key`. It lasts `GRANT_SECONDS`.

The download grant: a read_remove file self-destructs once downloaded, so a GET of its
address (a link scanner, a chat preview) must not start that download. A person starts it
with the drop page's button (a POST); the browser then gets a cookie for that file's address
only, signed as the grant is, that lets GETs of it (the download, and its resumption) start
downloads for `DOWNLOAD_GRANT_SECONDS`.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mailcore.safedrop.model import Bundle, DropFile, DropRecipient
from mailcore.safedrop.store import bundle_of, file_of, recipient_of
from mailcore.store.chunks import rows_for
from mailcore.store.schema.identity import users
from mailcore.store.schema.safedrop import (
    drop_bundles,
    drop_download_attempts,
    drop_download_parts,
    drop_downloads,
    drop_files,
    drop_recipients,
)

GRANT_SECONDS = 12 * 3600
# How long a download a person asked for (the drop page's button, a POST) may start and
# resume (GETs of the file's address) in that browser: `Grants.make_download`.
DOWNLOAD_GRANT_SECONDS = 3600
CODE_SECONDS = 600
CODE_ATTEMPTS = 5  # wrong guesses of one code before it is void
# Wrong codes a recipient may enter in all, whatever new codes it asked for in between (a
# new code gives CODE_ATTEMPTS guesses of its own, not a new budget): then the link takes no
# code, and sends none, for CODE_LOCK_SECONDS. 10 guesses a day of 10^6 codes.
CODE_FAILURES = 10
CODE_LOCK_SECONDS = 24 * 3600
# The same for the drop's password, per recipient (link): 10 wrong ones lock it for a day.
PASSWORD_FAILURES = 10
PASSWORD_LOCK_SECONDS = 24 * 3600
# Runs of bytes kept per recipient and file (drop_download_parts): past this many, the two
# runs with the smallest gap between them become one, the gap counted as sent. No byte that
# was sent is forgotten: a file counts as downloaded at worst a little early, never not at all.
MAX_PARTS = 64
# email_receipt_when=1 ("each time a recipient opens the drop"): at most one such receipt
# per recipient in this many seconds, so that whoever holds a link cannot flood the sender.
OPEN_RECEIPT_SECONDS = 3600
# A grant cookie is levels, expiry and a hex HMAC-SHA256: far shorter than this.
MAX_GRANT_COOKIE = 200
CHECK_PW = "p"  # the bundle password was given
CHECK_CODE = "t"  # the one-time code was given


class LinkInvalid(Exception):
    """No recipient has this link."""


class DropGone(Exception):
    """The link worked once and does not any more; the message says why."""


class DropPaused(Exception):
    """The drop's sender is disabled (`mailcore user disable`): its links open nothing for
    now, and everything works again once the sender is enabled (nothing is removed)."""


@dataclass(frozen=True)
class Access:
    """What one recipient's link opens."""

    bundle: Bundle
    recipient: DropRecipient
    files: list[DropFile]
    downloaded: frozenset[int]
    sender: str
    password_hash: str | None
    secure_message: bytes | None
    code_pending: bool
    first_open: bool
    code_locked_until: datetime.datetime | None  # too many wrong codes: none until then
    tell_opened: bool  # this opening gets the sender an "opened" receipt
    # Too many wrong passwords: the link takes none until then.
    password_locked_until: datetime.datetime | None = None


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def gone_reason(bundle: Bundle, recipient: DropRecipient, now: datetime.datetime) -> str | None:
    """Why this recipient's link no longer opens the drop, or None while it does."""
    if bundle.expiry_date is not None and bundle.expiry_date <= now:
        return "This drop has expired."
    if recipient.expires_at is not None and recipient.expires_at <= now:
        return "This drop has expired."
    if bundle.read_remove and recipient.done_at is not None:
        return "You have downloaded every file of this drop; it has been removed."
    if bundle.removed_at is not None:
        return "This drop has been removed."
    return None


def open_link_txn(
    conn: Connection, digest: bytes, now: datetime.datetime, viewing: bool
) -> Access:
    """The drop a link opens; LinkInvalid or DropGone. `viewing`: the recipient sees the
    contents now (the first time is recorded: `first_open`). A viewing takes the
    recipient's row until the end of the transaction (PostgreSQL; SQLite's writers take
    turns): two openings at once take turns, so that only one of them is the first, or the
    one an hourly receipt goes with, and the sender is told once."""
    query = sa.select(drop_recipients).where(drop_recipients.c.link_digest == digest)
    row = conn.execute(query.with_for_update() if viewing else query).first()
    if row is None:
        raise LinkInvalid()
    recipient = recipient_of(row)
    brow = conn.execute(
        sa.select(drop_bundles).where(drop_bundles.c.id == recipient.bundle_id)
    ).one()
    bundle = bundle_of(brow)
    reason = gone_reason(bundle, recipient, now)
    if reason is not None:
        raise DropGone(reason)
    if not conn.execute(sa.select(users.c.is_active)
                        .where(users.c.id == bundle.owner_id)).scalar_one():
        raise DropPaused()
    first_open = viewing and row.opened_at is None
    last_told = _utc(row.opened_receipt_at)
    quiet = datetime.timedelta(seconds=OPEN_RECEIPT_SECONDS)
    when = bundle.email_receipt_when
    tell = viewing and (
        (when == 2 and first_open)
        or (when == 1 and (last_told is None or now - last_told >= quiet)))
    seen: dict[str, Any] = {}
    if first_open:
        seen["opened_at"] = now
    if tell:
        seen["opened_receipt_at"] = now
    if seen:
        conn.execute(sa.update(drop_recipients).where(drop_recipients.c.id == recipient.id)
                     .values(**seen))
    files = [file_of(f) for f in conn.execute(
        sa.select(drop_files).where(drop_files.c.bundle_id == bundle.id)
        .order_by(drop_files.c.id))]
    downloaded = frozenset(conn.execute(
        sa.select(drop_downloads.c.file_id)
        .where(drop_downloads.c.recipient_id == recipient.id)).scalars())
    sender = conn.execute(
        sa.select(users.c.email).where(users.c.id == bundle.owner_id)).scalar_one()
    expires = _utc(row.code_expires_at)
    return Access(
        bundle=bundle, recipient=recipient, files=files, downloaded=downloaded,
        sender=sender, password_hash=brow.password_hash,
        secure_message=brow.secure_message,
        code_pending=row.code_digest is not None and expires is not None and expires > now,
        first_open=first_open,
        code_locked_until=CODE_LOCK.locked(row, now),
        tell_opened=tell,
        password_locked_until=PASSWORD_LOCK.locked(row, now),
    )


@dataclass(frozen=True)
class Lockout:
    """Wrong answers to one check (the one-time code, the password) a recipient's link may
    give in all, counted in the store (so across restarts and nodes): the `limit`th locks the
    link for that check for `seconds`, and the count starts again; a right answer clears
    both. `failures` and `locked_until` name the recipient's columns."""

    failures: str
    locked_until: str
    limit: int
    seconds: float

    def columns(self) -> tuple[Any, Any]:
        return drop_recipients.c[self.failures], drop_recipients.c[self.locked_until]

    def locked(self, row: Any, now: datetime.datetime) -> datetime.datetime | None:
        """Until when the link is locked (the recipient's row has the columns), or None."""
        until = _utc(getattr(row, self.locked_until))
        return until if until is not None and until > now else None

    def failed(self, row: Any, now: datetime.datetime) -> dict[str, Any]:
        """The column values after one more wrong answer (the row's count is the one
        before it)."""
        if getattr(row, self.failures) + 1 >= self.limit:
            return {self.failures: 0,
                    self.locked_until: now + datetime.timedelta(seconds=self.seconds)}
        return {self.failures: drop_recipients.c[self.failures] + 1}

    def cleared(self) -> dict[str, Any]:
        """The column values after a right answer."""
        return {self.failures: 0, self.locked_until: None}


CODE_LOCK = Lockout("code_failures", "code_locked_until", CODE_FAILURES, CODE_LOCK_SECONDS)
PASSWORD_LOCK = Lockout("password_failures", "password_locked_until", PASSWORD_FAILURES,
                        PASSWORD_LOCK_SECONDS)


def take_guess_txn(conn: Connection, recipient_id: int, lock: Lockout,
                   now: datetime.datetime) -> datetime.datetime | None:
    """Count a guess for the check `lock` guards as wrong before it is checked (a check that
    runs outside the transaction, as the password's hash does: guesses at once cannot pass
    the limit together); `guess_right_txn` takes it back. Returns until when the link is
    locked, None when the guess may be checked (this one may be the one that locks it; a
    right answer unlocks it)."""
    r = drop_recipients.c
    row = conn.execute(sa.select(*lock.columns()).where(r.id == recipient_id)
                       .with_for_update()).one()
    until = lock.locked(row, now)
    if until is not None:
        return until
    conn.execute(sa.update(drop_recipients).where(r.id == recipient_id)
                 .values(**lock.failed(row, now)))
    return None


def guess_right_txn(conn: Connection, recipient_id: int, lock: Lockout) -> None:
    """The guess `take_guess_txn` counted was right: the count starts again, unlocked."""
    conn.execute(sa.update(drop_recipients).where(drop_recipients.c.id == recipient_id)
                 .values(**lock.cleared()))


def set_code_txn(
    conn: Connection, recipient_id: int, digest: bytes, expires: datetime.datetime,
    now: datetime.datetime,
) -> bool:
    """Make `digest` the recipient's live code, with CODE_ATTEMPTS guesses of its own; False
    (nothing changes) while too many wrong codes lock the link. The running count of wrong
    codes stays as it is."""
    row = conn.execute(sa.select(drop_recipients.c.code_locked_until)
                       .where(drop_recipients.c.id == recipient_id).with_for_update()).one()
    if CODE_LOCK.locked(row, now) is not None:
        return False
    conn.execute(
        sa.update(drop_recipients).where(drop_recipients.c.id == recipient_id)
        .values(code_digest=digest, code_expires_at=expires, code_attempts=0)
    )
    return True


CODE_OK = "ok"
CODE_WRONG = "wrong"
CODE_LOCKED = "locked"


def check_code_txn(
    conn: Connection, recipient_id: int, digest: bytes, now: datetime.datetime
) -> str:
    """CODE_OK when `digest` is the recipient's live code (used up, and the count of wrong
    codes starts again); CODE_WRONG otherwise (a wrong guess counts, for the code: void
    after CODE_ATTEMPTS, and for the recipient: after CODE_FAILURES the link is locked for
    CODE_LOCK_SECONDS and its code void); CODE_LOCKED while it is locked."""
    r = drop_recipients.c
    row = conn.execute(
        sa.select(r.code_digest, r.code_expires_at, r.code_attempts, r.code_failures,
                  r.code_locked_until)
        .where(r.id == recipient_id).with_for_update()
    ).one()
    if CODE_LOCK.locked(row, now) is not None:
        return CODE_LOCKED
    mine = sa.update(drop_recipients).where(r.id == recipient_id)
    expires = _utc(row.code_expires_at)
    live = (row.code_digest is not None and expires is not None and expires > now
            and row.code_attempts < CODE_ATTEMPTS)
    void = {"code_digest": None, "code_expires_at": None, "code_attempts": 0}
    if live and hmac.compare_digest(bytes(row.code_digest), digest):
        conn.execute(mine.values(**void, **CODE_LOCK.cleared()))
        return CODE_OK
    failed = CODE_LOCK.failed(row, now)
    if CODE_LOCK.locked_until in failed:
        conn.execute(mine.values(**void, **failed))
        return CODE_LOCKED
    conn.execute(mine.values(code_attempts=r.code_attempts + 1, **failed))
    return CODE_WRONG


@dataclass(frozen=True)
class Downloaded:
    first_time: bool  # this recipient had not downloaded this file in full before
    recipient_done: bool  # ... and now has every file (it just became so)
    all_done: bool  # every recipient has every file (it just became so)


def _downloaded_txn(conn: Connection, recipient_id: int, file_id: int) -> bool:
    """Whether the recipient has the file counted as downloaded; its downloads take turns
    from here to the end of the transaction (PostgreSQL; SQLite's writers always do): two
    parts finishing at once must not each miss the other's bytes, nor two downloads starting
    at once both take the last attempt."""
    conn.execute(sa.select(drop_recipients.c.id).where(drop_recipients.c.id == recipient_id)
                 .with_for_update())
    return conn.execute(sa.select(drop_downloads.c.id).where(
        drop_downloads.c.recipient_id == recipient_id,
        drop_downloads.c.file_id == file_id)).first() is not None


def _attempts_txn(conn: Connection, recipient_id: int, file_id: int) -> int:
    a = drop_download_attempts.c
    found = conn.execute(sa.select(a.attempts).where(
        a.recipient_id == recipient_id, a.file_id == file_id)).scalar_one_or_none()
    return int(found or 0)


def may_download_txn(conn: Connection, recipient_id: int, file_id: int,
                     max_attempts: int) -> bool:
    """Whether a download of a read_remove file may start (`start_download_txn` would let
    it), without counting one."""
    return (not _downloaded_txn(conn, recipient_id, file_id)
            and _attempts_txn(conn, recipient_id, file_id) < max_attempts)


def start_download_txn(conn: Connection, recipient_id: int, file_id: int,
                       max_attempts: int) -> bool:
    """A download of a read_remove file starts: False (it may not) once the recipient has
    it counted as downloaded or has started `max_attempts` downloads of it; else the
    download counts as one more attempt, whatever it will send."""
    if not may_download_txn(conn, recipient_id, file_id, max_attempts):
        return False
    attempts = _attempts_txn(conn, recipient_id, file_id)
    a = drop_download_attempts.c
    if attempts:
        conn.execute(sa.update(drop_download_attempts)
                     .where(a.recipient_id == recipient_id, a.file_id == file_id)
                     .values(attempts=attempts + 1))
    else:
        conn.execute(sa.insert(drop_download_attempts).values(
            recipient_id=recipient_id, file_id=file_id, attempts=1))
    return True


def record_sent_txn(
    conn: Connection, recipient_id: int, bundle_id: int, file_id: int, size: int,
    first: int, last: int, now: datetime.datetime, max_attempts: int | None = None,
) -> Downloaded:
    """Bytes `first` to `last` (both included; none when `last` < `first`) of a file of
    `size` bytes were sent to a recipient. The file counts as downloaded, once, when one
    response carried all of it or the parts sent so far cover it (a download resumed with
    Range, or fetched in pieces); with `max_attempts` (read_remove) also once that many of
    its downloads have started (`start_download_txn`), whatever they sent."""
    if _downloaded_txn(conn, recipient_id, file_id):
        return Downloaded(False, False, False)
    whole = first <= 0 and last >= size - 1
    if not whole and not (last >= first and _covered_txn(conn, recipient_id, file_id, size,
                                                         first, last)) \
            and not (max_attempts is not None
                     and _attempts_txn(conn, recipient_id, file_id) >= max_attempts):
        return Downloaded(False, False, False)
    return _count_download_txn(conn, recipient_id, bundle_id, file_id, now)


def _covered_txn(conn: Connection, recipient_id: int, file_id: int, size: int, first: int,
                 last: int) -> bool:
    """Add bytes `first` to `last` to the runs kept of the file for the recipient: True when
    they now cover it; else the runs are kept (at most MAX_PARTS, see `capped_runs`;
    nothing is written when the bytes were counted already)."""
    p = drop_download_parts.c
    mine = (p.recipient_id == recipient_id, p.file_id == file_id)
    held = [(r.first_byte, r.last_byte) for r in conn.execute(
        sa.select(p.first_byte, p.last_byte).where(*mine).order_by(p.first_byte))]
    runs = capped_runs(merge_runs([*held, (first, last)]))
    if runs[0][0] <= 0 and runs[0][1] >= size - 1:
        return True
    if runs != held:
        conn.execute(sa.delete(drop_download_parts).where(*mine))
        conn.execute(sa.insert(drop_download_parts), [
            {"recipient_id": recipient_id, "file_id": file_id, "first_byte": a, "last_byte": b}
            for a, b in runs])
    return False


def _count_download_txn(conn: Connection, recipient_id: int, bundle_id: int, file_id: int,
                        now: datetime.datetime) -> Downloaded:
    """The recipient has the whole file (not counted before): it counts, its runs and
    attempts go."""
    for table in (drop_download_parts, drop_download_attempts):
        conn.execute(sa.delete(table).where(table.c.recipient_id == recipient_id,
                                            table.c.file_id == file_id))
    conn.execute(sa.insert(drop_downloads).values(
        recipient_id=recipient_id, file_id=file_id, completed_at=now))
    n_files = conn.execute(sa.select(sa.func.count()).select_from(drop_files)
                           .where(drop_files.c.bundle_id == bundle_id)).scalar_one()
    mine = conn.execute(sa.select(sa.func.count()).select_from(drop_downloads)
                        .where(drop_downloads.c.recipient_id == recipient_id)).scalar_one()
    if mine < n_files:
        return Downloaded(True, False, False)
    conn.execute(sa.update(drop_recipients).where(drop_recipients.c.id == recipient_id)
                 .values(done_at=now))
    # Recipients becoming done take turns on the bundle's row (PostgreSQL; SQLite's writers
    # always do), and each counts those still pending once the one before has committed:
    # the last two finishing at once must not each count the other as pending, or no one
    # would see every recipient done (no receipt, no read_remove).
    conn.execute(sa.select(drop_bundles.c.id).where(drop_bundles.c.id == bundle_id)
                 .with_for_update())
    pending = conn.execute(sa.select(sa.func.count()).select_from(drop_recipients).where(
        drop_recipients.c.bundle_id == bundle_id, drop_recipients.c.done_at.is_(None))
    ).scalar_one()
    return Downloaded(True, True, pending == 0)


def merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of byte offsets (both ends included) merged where they overlap or touch, in
    order."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def capped_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merged, ordered `runs` cut down to MAX_PARTS by joining the two neighbours with the
    smallest gap between them (the gap then counts as sent), as often as needed. Dropping a
    run instead would forget bytes the recipient has: fetching every byte in more scattered
    ranges than MAX_PARTS would never count, and read_remove would never end the link."""
    runs = list(runs)
    while len(runs) > MAX_PARTS:
        i = min(range(len(runs) - 1), key=lambda k: runs[k + 1][0] - runs[k][1])
        runs[i:i + 2] = [(runs[i][0], runs[i + 1][1])]
    return runs


def mark_removed_txn(conn: Connection, bundle_id: int, now: datetime.datetime) -> bool:
    """Mark the bundle's files removed, and clear its secrets (the secure message and the
    password's hash: nothing will ever read them again); False when it was already."""
    done = conn.execute(sa.update(drop_bundles).where(
        drop_bundles.c.id == bundle_id, drop_bundles.c.removed_at.is_(None)
    ).values(removed_at=now, secure_message=None, password_hash=None))
    return done.rowcount == 1


def expired_bundles_txn(conn: Connection, now: datetime.datetime) -> list[Any]:
    """Sent bundles whose files are still on disk though no link will serve them again,
    with the owner: past their expiry date, or with no recipient whose link still works
    (each one's `valid_for` ran out, or under read_remove it has every file: `gone_reason`;
    a sent bundle's recipients never change)."""
    b, r = drop_bundles.c, drop_recipients.c
    live_link = sa.exists().where(
        r.bundle_id == b.id,
        sa.or_(r.expires_at.is_(None), r.expires_at > now),
        sa.or_(b.read_remove.is_(False), r.done_at.is_(None)))
    return list(conn.execute(
        sa.select(b.id, b.subject, users.c.email)
        .join(users, users.c.id == b.owner_id)
        .where(b.sent_at.is_not(None), b.removed_at.is_(None),
               sa.or_(sa.and_(b.expiry_date.is_not(None), b.expiry_date <= now),
                      ~live_link))
        .order_by(b.id)
    ))


def stale_unsent_bundles_txn(
    conn: Connection, now: datetime.datetime, made_before: datetime.datetime
) -> list[int]:
    """Bundles never sent that are past their expiry date, or were made before
    `made_before` (`[safedrop] unsent_max_age` ago), expiry date or not."""
    b = drop_bundles.c
    return list(conn.execute(
        sa.select(b.id).where(
            b.sent_at.is_(None),
            sa.or_(sa.and_(b.expiry_date.is_not(None), b.expiry_date <= now),
                   b.created_at <= made_before))
        .order_by(b.id)
    ).scalars())


def delete_unsent_bundle_txn(conn: Connection, bundle_id: int) -> bool:
    """Delete a bundle never sent, with its recipients and files' rows; False when it was
    sent (or deleted) meanwhile."""
    done = conn.execute(sa.delete(drop_bundles).where(
        drop_bundles.c.id == bundle_id, drop_bundles.c.sent_at.is_(None)))
    return done.rowcount == 1


def owner_bundle_ids_txn(conn: Connection, owner_id: int) -> list[int]:
    """The ids of every bundle of `owner_id`, sent or not, removed or not."""
    return [r[0] for r in conn.execute(sa.select(drop_bundles.c.id).where(
        drop_bundles.c.owner_id == owner_id).order_by(drop_bundles.c.id))]


def delete_bundle_txn(conn: Connection, bundle_id: int) -> bool:
    """Delete a bundle whatever its state, with its recipients, files' rows and download
    records (the foreign keys' cascade: they are the bundle's own); False when gone."""
    done = conn.execute(sa.delete(drop_bundles).where(drop_bundles.c.id == bundle_id))
    return done.rowcount == 1


_BUNDLES_REMOVED = sa.select(drop_bundles.c.id, drop_bundles.c.removed_at).where(
    drop_bundles.c.id.in_(sa.bindparam("keys", expanding=True)))


def left_behind_txn(conn: Connection, bundle_ids: list[int]) -> list[int]:
    """Of `bundle_ids` (directories of files on disk), those whose files nothing serves any
    more: the bundle's files are marked removed, or the bundle was deleted. A deleted id
    counts only below the highest bundle id: SQLite may give the highest id again to the
    next bundle made, whose uploads may be writing into that directory."""
    b = drop_bundles.c
    highest = conn.execute(sa.select(sa.func.max(b.id))).scalar() or 0
    live = {row.id: row.removed_at for row in rows_for(conn, _BUNDLES_REMOVED, {}, bundle_ids)}
    return [i for i in bundle_ids if (live[i] is not None if i in live else i < highest)]


def download_summary_txn(conn: Connection, bundle_id: int) -> list[tuple[str, int, int]]:
    """(recipient address, files downloaded, files) of each recipient of a bundle."""
    n_files = conn.execute(sa.select(sa.func.count()).select_from(drop_files)
                           .where(drop_files.c.bundle_id == bundle_id)).scalar_one()
    rows = conn.execute(
        sa.select(drop_recipients.c.email, sa.func.count(drop_downloads.c.id))
        .outerjoin(drop_downloads, drop_downloads.c.recipient_id == drop_recipients.c.id)
        .where(drop_recipients.c.bundle_id == bundle_id)
        .group_by(drop_recipients.c.id, drop_recipients.c.email)
        .order_by(drop_recipients.c.id)
    )
    return [(r[0], int(r[1]), int(n_files)) for r in rows]


class Grants:
    """Signs and checks the cookie that says which checks a browser passed for a link, and
    keys the digests of one-time codes."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, digest: bytes, levels: str, expires: int) -> str:
        payload = b"drop-grant:" + digest.hex().encode() + f":{levels}:{expires}".encode()
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def code_digest(self, recipient_id: int, code: str) -> bytes:
        """What is stored for a one-time code: keyed, so that a copy of the database does
        not give the code away by trying all 10^6 of them."""
        return hmac.new(self._key, f"drop-code:{recipient_id}:{code}".encode(),
                        hashlib.sha256).digest()

    def make(self, digest: bytes, levels: str, now: float) -> str:
        expires = int(now) + GRANT_SECONDS
        levels = "".join(sorted(set(levels)))
        return f"{levels or '-'}.{expires}.{self._mac(digest, levels, expires)}"

    def levels(self, digest: bytes, cookie: str | None, now: float) -> str:
        """The checks a valid, unexpired cookie vouches for ("" for none)."""
        # ASCII only: isdigit takes other scripts' digits, compare_digest refuses non-ASCII.
        if not cookie or len(cookie) > MAX_GRANT_COOKIE or not cookie.isascii() \
                or cookie.count(".") != 2:
            return ""
        levels, expires_text, mac = cookie.split(".")
        levels = "" if levels == "-" else levels
        # An expiry is epoch seconds: 12 digits last until the year 33658 (and int() of more
        # than 4300 digits raises).
        if not expires_text.isdigit() or len(expires_text) > 12 or int(expires_text) <= now:
            return ""
        if not hmac.compare_digest(mac, self._mac(digest, levels, int(expires_text))):
            return ""
        return levels

    def _download_mac(self, digest: bytes, file_id: int, expires: int) -> str:
        payload = b"drop-download:" + digest.hex().encode() + f":{file_id}:{expires}".encode()
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def make_download(self, digest: bytes, file_id: int, now: float) -> str:
        """The cookie that lets the browser of the link `digest` download file `file_id`
        (read_remove) for DOWNLOAD_GRANT_SECONDS."""
        expires = int(now) + DOWNLOAD_GRANT_SECONDS
        return f"{expires}.{self._download_mac(digest, file_id, expires)}"

    def may_download(self, digest: bytes, file_id: int, cookie: str | None,
                     now: float) -> bool:
        """Whether `cookie` is a valid, unexpired download grant of that link and file."""
        if not cookie or len(cookie) > MAX_GRANT_COOKIE or not cookie.isascii() \
                or cookie.count(".") != 1:
            return False
        expires_text, mac = cookie.split(".")
        if not expires_text.isdigit() or len(expires_text) > 12 or int(expires_text) <= now:
            return False
        return hmac.compare_digest(mac, self._download_mac(digest, file_id, int(expires_text)))

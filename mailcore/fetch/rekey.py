"""Changing the fetch key, and giving up the secrets of a lost one (`mailcore secrets`).

The fetch key (mailcore.fetch.secrets) encrypts remote mailbox passwords, migrate and restore
destination passwords, webhook signing secrets and safedrop secure messages.

- `rotate`: every stored secret is encrypted again with the first key. With the key file it
  first puts a new key in front of the old ones, and once every secret is under the new key
  it leaves the new one alone in the file. A crash at any point leaves a file that opens
  everything the database holds (old and new keys both, until the end); running it again
  finishes the job. With `[fetch] secret_key` the operator puts the new key first in the
  setting, runs it, and then removes the old keys.
- `forget`: for a key lost for good. Secrets no key opens are replaced by FORGOTTEN, so that
  the daemon starts; each then fails with a message that says to set it again (a sync, a
  migrate or restore, a webhook delivery: give its secret anew), and a drop's secure
  message is gone. A missing key file is made anew. What the current keys open is kept.

Both work in batches of BATCH rows, a transaction each (the key file on `io`, a thread),
and change a row only if it still holds the ciphertext read (a daemon writing meanwhile
wins). Stop the daemon first: it holds the keys it read at start-up, and would not open
what the new key encrypted until it is started again (every node, on PostgreSQL, with the
new key file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import Column, Connection, select, update

from mailcore.fetch.secrets import (
    FORGOTTEN,
    KEY_FILE,
    SecretBox,
    SecretError,
    encrypted_columns,
    parse_keys,
)
from mailcore.files import write_whole
from mailcore.store import Database
from mailcore.workers import CpuPool

BATCH = 500


@dataclass
class Rekeyed:
    """What a rotate or a forget did, by column (`table.column`)."""

    rotated: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)  # rotate: left as they were
    forgotten: dict[str, int] = field(default_factory=dict)

    def add(self, counts: dict[str, int], column: Column, n: int) -> None:  # type: ignore[type-arg]
        if n:
            name = f"{column.table.name}.{column.name}"
            counts[name] = counts.get(name, 0) + n


def _replacement(box: SecretBox, token: bytes, forget: bool) -> bytes | None:
    """What a stored secret becomes. rotate: encrypted again with the first key
    (SecretError: no key opens it). forget: FORGOTTEN when no key opens it, else None (it
    is kept as it is)."""
    if not forget:
        return box.rotate(token)
    try:
        box.decrypt(token)
    except SecretError:
        return FORGOTTEN
    return None


def _batch_txn(conn: Connection, column: Column, box: SecretBox,  # type: ignore[type-arg]
               after: int, forget: bool) -> tuple[int | None, int, int]:
    """One batch of `column`'s secrets after row id `after`: (the last id, or None at the
    end; how many were encrypted again, or given up; how many no key opens, when
    rotating)."""
    table = column.table
    key = table.c.id
    rows = conn.execute(
        select(key, column).where(key > after, column.is_not(None), column != FORGOTTEN)
        .order_by(key).limit(BATCH)
    ).all()
    changed = unreadable = 0
    for row_id, token in rows:
        token = bytes(token)
        try:
            new = _replacement(box, token, forget)
        except SecretError:  # rotate: no key opens it; left as it is
            unreadable += 1
            continue
        if new is not None:
            done = conn.execute(update(table).where(key == row_id, column == token)
                                .values({column.name: new}))
            changed += done.rowcount
    return (rows[-1][0] if len(rows) == BATCH else None), changed, unreadable


async def _each(db: Database, box: SecretBox, forget: bool) -> Rekeyed:
    result = Rekeyed()
    for column in encrypted_columns():
        after: int | None = 0
        while after is not None:
            after, changed, unreadable = await db.run(
                "secrets_rekey", _batch_txn, column, box, after, forget)
            if forget:
                result.add(result.forgotten, column, changed)
            else:
                result.add(result.rotated, column, changed)
                result.add(result.unreadable, column, unreadable)
    return result


def _write_keys(path: Path, keys: list[bytes]) -> None:
    """The key file holding `keys`, whole or not at all. Blocks."""
    write_whole(path, b"".join(k + b"\n" for k in keys))


async def rotate(db: Database, io: CpuPool, data_dir: Path, configured: str | None) -> Rekeyed:
    """Encrypt every stored secret again with the first key (module docstring). With no
    `configured` keys, a new key is made first and is the only one left at the end, unless
    a secret no key opens stays (it keeps the old keys in the file)."""
    if configured:
        return await _each(db, SecretBox(parse_keys(configured)), forget=False)
    path = data_dir / KEY_FILE
    if not await io.run(path.exists):
        raise SecretError(f"{path} is missing: restore it, then rotate (or, if it is lost "
                          f"for good, run `mailcore secrets forget`)")
    old = await io.run(SecretBox.from_data_dir, data_dir)
    keys = [Fernet.generate_key(), *old.keys]
    await io.run(_write_keys, path, keys)
    result = await _each(db, SecretBox(keys), forget=False)
    if not result.unreadable:
        await io.run(_write_keys, path, keys[:1])
    return result


async def forget(db: Database, io: CpuPool, data_dir: Path, configured: str | None) -> Rekeyed:
    """Give up every stored secret the current keys do not open (module docstring); the
    key file is made when it is missing."""
    box = await io.run(SecretBox.from_data_dir, data_dir, configured)
    return await _each(db, box, forget=True)

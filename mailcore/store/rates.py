"""Token buckets in the store (`schema.rate_buckets`), shared by every node: one transaction
takes from a bucket, holding its row, so that N nodes allow what one does. Blocking
(`thd_`): run them through Database.run / read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update

from mailcore.store.schema import rate_buckets

_b = rate_buckets.c


def _refilled(tokens: float, at: float, now: float, limit: int, period: float) -> float:
    return min(float(limit), tokens + max(0.0, now - at) * limit / period)


def thd_take(conn: Connection, name: str, limit: int, period: float, cost: int,
             now: float) -> tuple[bool, float]:
    """Take `cost` tokens from bucket `name` (`limit` per `period` seconds, full when new)
    if it has them: whether it had, and what it holds now."""
    tokens = _held(conn, name, limit, period, now)
    allowed = tokens >= cost
    if allowed:
        tokens -= cost
    _keep(conn, name, limit, period, tokens, now)
    return allowed, tokens


def thd_take_all(conn: Connection, buckets: Sequence[tuple[str, int, float]], cost: int,
                 now: float) -> int | None:
    """Take `cost` tokens from each of `buckets` (name, limit, period) if every one has
    them: None when they had, else the index of the first that had not, and nothing is
    taken from any. Their rows are locked in the order given: callers keep one order (the
    sweep passes over rows a take holds: `thd_sweep`)."""
    held = []
    for i, (name, limit, period) in enumerate(buckets):
        tokens = _held(conn, name, limit, period, now)
        if tokens < cost:
            return i
        held.append((name, limit, period, tokens - cost))
    for name, limit, period, tokens in held:
        _keep(conn, name, limit, period, tokens, now)
    return None


def _held(conn: Connection, name: str, limit: int, period: float, now: float) -> float:
    """What bucket `name` holds at `now`, its row (made full if missing) locked until the
    transaction ends."""
    _insert_full(conn, name, limit, now)
    row = _locked(conn, name)
    if row is None:
        # The sweep deleted it (full again) between the two statements: on PostgreSQL the
        # insert found the row the sweep had locked, and the lock waited for its delete's
        # commit. A missing bucket is full: made again (the row is this transaction's, or
        # another take's made since, which the sweep would have to delete again).
        _insert_full(conn, name, limit, now)
        row = _locked(conn, name)
        if row is None:  # pragma: no cover - swept twice under one take
            raise RuntimeError(f"rate bucket {name} was swept twice while taken")
    return _refilled(row.tokens, row.at, now, limit, period)


def _locked(conn: Connection, name: str) -> Row[Any, Any] | None:
    """Bucket `name`'s row (tokens, at), locked until the transaction ends; None if none."""
    return conn.execute(select(_b.tokens, _b.at).where(_b.name == name)
                        .with_for_update()).first()


def _keep(conn: Connection, name: str, limit: int, period: float, tokens: float,
          now: float) -> None:
    """Bucket `name` holds `tokens` at `now` (full again when its refill reaches `limit`)."""
    full_at = now + (limit - tokens) * period / limit
    conn.execute(update(rate_buckets).where(_b.name == name)
                 .values(tokens=tokens, at=now, full_at=full_at))


def thd_available(conn: Connection, name: str, limit: int, period: float,
                  now: float) -> float:
    """What bucket `name` holds at `now` (nothing is taken)."""
    row = conn.execute(select(_b.tokens, _b.at).where(_b.name == name)).first()
    if row is None:
        return float(limit)
    return _refilled(row.tokens, row.at, now, limit, period)


def thd_sweep(conn: Connection, now: float, batch: int) -> int:
    """Delete up to `batch` of the buckets full again by `now` (a missing row is a full
    bucket; ix_rate_buckets_full_at finds them); how many. PostgreSQL locks each chosen row
    and asks again whether it is full (FOR UPDATE), as a take may have drawn on it since:
    a bucket in use is never reset to full. It passes over the rows a take holds (SKIP
    LOCKED: the next sweep finds them, if still full): a take_all holds one bucket's row
    while it asks for the next, which the sweep, locking in its own order, could hold
    while it waited for the first (a deadlock, until PostgreSQL cancelled one of them)."""
    names = (select(_b.name).where(_b.full_at <= now).limit(batch)
             .with_for_update(skip_locked=True).scalar_subquery())
    return int(conn.execute(delete(rate_buckets).where(_b.name.in_(names))).rowcount or 0)


def _insert_full(conn: Connection, name: str, limit: int, now: float) -> None:
    """The bucket's row, full, unless it exists (no error, no wait, when another node's
    transaction makes it at the same moment)."""
    values = {"name": name, "tokens": float(limit), "at": now, "full_at": now}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(rate_buckets).values(**values).on_conflict_do_nothing())
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(rate_buckets).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - the two supported backends are above
        if conn.execute(select(_b.name).where(_b.name == name)).first() is None:
            conn.execute(insert(rate_buckets).values(**values))

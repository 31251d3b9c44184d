"""Token buckets in the store (`schema.rate_buckets`), shared by every node: one transaction
takes from a bucket, holding its row, so that N nodes allow what one does. Blocking
(`thd_`): run them through Database.run / read."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select, update

from mailcore.store.schema import rate_buckets

_b = rate_buckets.c


def _refilled(tokens: float, at: float, now: float, limit: int, period: float) -> float:
    return min(float(limit), tokens + max(0.0, now - at) * limit / period)


def thd_take(conn: Connection, name: str, limit: int, period: float, cost: int,
             now: float) -> tuple[bool, float]:
    """Take `cost` tokens from bucket `name` (`limit` per `period` seconds, full when new)
    if it has them: whether it had, and what it holds now."""
    _insert_full(conn, name, limit, now)
    row = conn.execute(select(_b.tokens, _b.at).where(_b.name == name)
                       .with_for_update()).one()
    tokens = _refilled(row.tokens, row.at, now, limit, period)
    allowed = tokens >= cost
    if allowed:
        tokens -= cost
    full_at = now + (limit - tokens) * period / limit
    conn.execute(update(rate_buckets).where(_b.name == name)
                 .values(tokens=tokens, at=now, full_at=full_at))
    return allowed, tokens


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
    a bucket in use is never reset to full."""
    names = (select(_b.name).where(_b.full_at <= now).limit(batch).with_for_update()
             .scalar_subquery())
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

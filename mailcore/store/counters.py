"""Change counters (`schema.change_counters`): raise one in the transaction that makes the
change, read it cheaply elsewhere to learn that something changed. Blocking (`thd_`)."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select, update

from mailcore.store.schema import change_counters

_c = change_counters.c


def thd_read_counter(conn: Connection, name: str) -> int:
    """The counter's value (0 when its row is missing)."""
    value = conn.execute(select(_c.value).where(_c.name == name)).scalar()
    return int(value or 0)


def thd_bump_counter(conn: Connection, name: str) -> None:
    """Raise the counter by one, inside the caller's transaction."""
    result = conn.execute(update(change_counters).where(_c.name == name)
                          .values(value=_c.value + 1))
    if result.rowcount == 0:
        conn.execute(insert(change_counters).values(name=name, value=1))

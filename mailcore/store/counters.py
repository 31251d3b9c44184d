"""Change counters (`schema.change_counters`): raise one in the transaction that makes the
change, read it cheaply elsewhere to learn that something changed. Blocking (`thd_`)."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, insert, select, update

from mailcore.store.schema import change_counters

_c = change_counters.c

# Built once (statements are immutable): raising a counter is one statement that also
# answers the new value (UPDATE ... RETURNING: PostgreSQL, SQLite >= 3.35).
_READ = select(_c.value).where(_c.name == bindparam("counter"))
_BUMP = (update(change_counters).where(_c.name == bindparam("counter"))
         .values(value=_c.value + 1).returning(_c.value))


def thd_read_counter(conn: Connection, name: str) -> int:
    """The counter's value (0 when its row is missing)."""
    value = conn.execute(_READ, {"counter": name}).scalar()
    return int(value or 0)


def thd_bump_counter(conn: Connection, name: str) -> int:
    """Raise the counter by one, inside the caller's transaction; returns its new value."""
    value = conn.execute(_BUMP, {"counter": name}).scalar()
    if value is None:  # its row is missing: the first raise makes it
        conn.execute(insert(change_counters).values(name=name, value=1))
        return 1
    return int(value)

"""Statements over many keys, asked a chunk at a time (mailcore.store.chunks)."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    select,
)
from twisted.trial.unittest import SynchronousTestCase

from mailcore.store.chunks import KEY_CHUNK, found_keys, rows_for

_meta = MetaData()
_items = Table("items", _meta, Column("id", Integer, primary_key=True),
               Column("kind", String(10)))
_OF_KIND = select(_items.c.id).where(
    _items.c.kind == bindparam("kind"), _items.c.id.in_(bindparam("keys", expanding=True)))


class ChunkTests(SynchronousTestCase):
    def test_more_keys_than_a_chunk_each_asked_once_in_order(self) -> None:
        engine = create_engine("sqlite://")
        _meta.create_all(engine)
        statements: list[int] = []
        with engine.begin() as conn:
            conn.execute(_items.insert(), [{"id": i, "kind": "a" if i % 2 else "b"}
                                           for i in range(1, 3 * KEY_CHUNK)])
            keys = list(range(3 * KEY_CHUNK + 10, 0, -1)) * 2  # unordered, repeated
            # The keys each statement was asked (all its parameters but the kind).
            event.listen(engine, "before_cursor_execute",
                         lambda _c, _cur, _s, params, *_a: statements.append(len(params) - 1))
            odd = found_keys(conn, _OF_KIND, {"kind": "a"}, keys)
            rows = list(rows_for(conn, _OF_KIND, {"kind": "b"}, keys))
        self.assertEqual(odd, set(range(1, 3 * KEY_CHUNK, 2)))
        self.assertEqual([r.id for r in rows], list(range(2, 3 * KEY_CHUNK, 2)))
        self.assertEqual(statements, [KEY_CHUNK, KEY_CHUNK, KEY_CHUNK, 10] * 2)

"""The message store's multi-row INSERT on SQLite (mailcore.messages.sql.insert_rows)."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, Table, create_engine, select
from sqlalchemy.dialects.sqlite import base as sqlite_base
from twisted.trial.unittest import SynchronousTestCase

from mailcore.messages.sql import insert_rows
from mailcore.store.schema.types import UTCDateTime

_meta = MetaData()
# The schema's own type (UTCDateTime, built on DateTime) and a plain DateTime.
_ours = Table("ours", _meta, Column("id", Integer, primary_key=True),
              Column("at", UTCDateTime()), Column("made", DateTime(timezone=True)))
_theirs = Table("theirs", _meta, Column("id", Integer, primary_key=True),
                Column("at", UTCDateTime()), Column("made", DateTime(timezone=True)))


class InsertRowsTests(SynchronousTestCase):
    def rows(self) -> list[dict[str, Any]]:
        now = datetime.datetime(2024, 10, 1, 8, 0, 0, 123456, tzinfo=datetime.UTC)
        same_instant = now.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
        assert same_instant == now and hash(same_instant) == hash(now)
        values = [now, same_instant, now.replace(tzinfo=None), None,
                  datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)]
        return [{"id": i + 1, "at": values[i % len(values)], "made": now} for i in range(50)]

    def test_datetimes_are_written_as_sqlalchemy_writes_them(self) -> None:
        """Each value as the column's own bind processor writes it: equal datetimes in other
        zones are other strings (SQLite's DATETIME keeps the wall-clock fields)."""
        engine = create_engine("sqlite://")
        _meta.create_all(engine)
        rows = self.rows()
        with engine.begin() as conn:
            insert_rows(conn, _ours, rows)
            conn.execute(_theirs.insert(), rows)
            ours = conn.exec_driver_sql("SELECT id, at, made FROM ours ORDER BY id").all()
            theirs = conn.exec_driver_sql("SELECT id, at, made FROM theirs ORDER BY id").all()
            self.assertEqual(ours, theirs)
            self.assertEqual(len({r[1] for r in ours}), 4)  # naive now is now
            # Read back as stored: the wall-clock fields, as UTC (what UTCDateTime assumes).
            self.assertEqual(conn.execute(select(_ours.c.at).where(_ours.c.id == 2)).scalar(),
                             datetime.datetime(2024, 10, 1, 10, 0, 0, 123456,
                                               tzinfo=datetime.UTC))

    def test_a_datetime_shared_by_the_rows_is_formatted_once(self) -> None:
        """A batch's rows share one `now` (created_at, updated_at, often date): SQLite's
        DATETIME bind processor (some 5 us a value) ran for it in every row and column,
        inside the store's write transaction."""
        calls: list[object] = []
        real = sqlite_base.DATETIME.bind_processor

        def counted(self: Any, dialect: Any) -> Any:
            process = real(self, dialect)
            assert process is not None

            def counting(value: Any) -> Any:
                calls.append(value)
                return process(value)

            return counting

        self.patch(sqlite_base.DATETIME, "bind_processor", counted)
        engine = create_engine("sqlite://")  # a dialect of its own: no processor cached
        _meta.create_all(engine)
        with engine.begin() as conn:
            insert_rows(conn, _ours, self.rows())
        # Five distinct objects in "at" (one of them the shared now), the shared now in "made".
        self.assertEqual(len(calls), 5 + 1)

"""A safedrop file counts as a recipient's download once what was sent to them covers it:
in one response, or in parts (ranges, a download resumed after it broke off) in any order
(mailcore.safedrop.access.record_sent_txn), on SQLite and PostgreSQL. The page's side
(Range requests through the drop page) is in tests.test_web_safedrop_pages; a download cut
off and resumed against the real daemon in tests.test_safedrop_daemon."""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.safedrop.access import (
    MAX_PARTS,
    Downloaded,
    capped_runs,
    merge_runs,
    record_sent_txn,
    start_download_txn,
)
from mailcore.store.schema.identity import users
from mailcore.store.schema.safedrop import (
    drop_bundles,
    drop_download_attempts,
    drop_download_parts,
    drop_downloads,
    drop_files,
    drop_recipients,
)
from tests.support.db import MixinBase, open_database

NOW = datetime.datetime(2026, 12, 5, 10, 0, tzinfo=datetime.UTC)
SIZE = 100
NOTHING = Downloaded(False, False, False)


def _bundle_txn(conn: Connection) -> dict[str, int]:
    """A sent bundle of two files (SIZE bytes, and 1 byte) with two recipients."""
    owner = conn.execute(sa.insert(users).values(
        username="alice", email="alice@example.test", nic="N1", created_at=NOW,
    ).returning(users.c.id)).scalar_one()
    bundle = conn.execute(sa.insert(drop_bundles).values(
        owner_id=owner, subject="s", message="m", email_receipt_when=4, read_remove=True,
        allow_comments=False, require_token_auth=False, created_at=NOW, sent_at=NOW,
    ).returning(drop_bundles.c.id)).scalar_one()
    ids = {"bundle": bundle}
    for name in ("ann", "bob"):
        ids[name] = conn.execute(sa.insert(drop_recipients).values(
            bundle_id=bundle, email=f"{name}@example.org", telephone="", valid_for=0,
        ).returning(drop_recipients.c.id)).scalar_one()
    for name, size in (("big", SIZE), ("tiny", 1)):
        ids[name] = conn.execute(sa.insert(drop_files).values(
            bundle_id=bundle, name=name, content_type="application/octet-stream", size=size,
            sha256=name * 8, created_at=NOW,
        ).returning(drop_files.c.id)).scalar_one()
    return ids


class MergeRunsTests(SynchronousTestCase):
    def test_overlapping_and_touching_runs_merge_in_order(self) -> None:
        self.assertEqual(merge_runs([]), [])
        self.assertEqual(merge_runs([(5, 9), (0, 4)]), [(0, 9)])  # touching
        self.assertEqual(merge_runs([(0, 6), (3, 4), (5, 9)]), [(0, 9)])  # inside, over
        self.assertEqual(merge_runs([(7, 9), (0, 2), (4, 5)]), [(0, 2), (4, 5), (7, 9)])
        self.assertEqual(merge_runs([(2, 2), (2, 2)]), [(2, 2)])

    def test_capped_runs_join_the_neighbours_with_the_smallest_gap(self) -> None:
        runs = [(10 * k, 10 * k + 1) for k in range(MAX_PARTS)] + [(10 * MAX_PARTS - 7,
                                                                     10 * MAX_PARTS)]
        capped = capped_runs(runs)
        self.assertEqual(len(capped), MAX_PARTS)
        self.assertEqual(capped[-1], (10 * (MAX_PARTS - 1), 10 * MAX_PARTS))
        self.assertEqual(capped[:-1], runs[:MAX_PARTS - 1])
        self.assertEqual(capped_runs(runs[:3]), runs[:3])


class SentPartsTestsMixin(MixinBase):
    backend = ""

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await open_database(self, self.backend)
        self.ids = await self.db.run("bundle", _bundle_txn)

    async def sent(self, who: str, first: int, last: int, file: str = "big") -> Downloaded:
        size = SIZE if file == "big" else 1
        return await self.db.run("sent", record_sent_txn, self.ids[who], self.ids["bundle"],
                                 self.ids[file], size, first, last, NOW)

    async def runs(self, who: str) -> list[tuple[int, int]]:
        def txn(conn: Connection) -> list[Any]:
            p = drop_download_parts.c
            return [(r.first_byte, r.last_byte) for r in conn.execute(
                sa.select(p.first_byte, p.last_byte).where(p.recipient_id == self.ids[who])
                .order_by(p.first_byte))]

        return await self.db.read("runs", txn)

    async def downloads(self) -> list[tuple[int, int]]:
        def txn(conn: Connection) -> list[Any]:
            d = drop_downloads.c
            return [tuple(r) for r in conn.execute(
                sa.select(d.recipient_id, d.file_id).order_by(d.recipient_id, d.file_id))]

        return await self.db.read("downloads", txn)

    async def test_one_response_of_the_whole_file_counts_at_once(self) -> None:
        self.assertEqual(await self.sent("ann", 0, SIZE - 1), Downloaded(True, False, False))
        self.assertEqual(await self.sent("ann", 0, SIZE - 1), NOTHING)  # once
        self.assertEqual(await self.runs("ann"), [])

    async def test_a_download_resumed_after_it_broke_off_counts(self) -> None:
        # The first response broke off after 37 bytes; the client asked for the rest.
        self.assertEqual(await self.sent("ann", 0, 36), NOTHING)
        self.assertEqual(await self.runs("ann"), [(0, 36)])
        # Bytes already counted write nothing (a client asking for them again and again
        # costs no write to the store).
        written: list[str] = []

        def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            written.append(statement.split(None, 1)[0].upper())

        sa.event.listen(self.db.engine, "before_cursor_execute", capture)
        try:
            self.assertEqual(await self.sent("ann", 10, 20), NOTHING)
        finally:
            sa.event.remove(self.db.engine, "before_cursor_execute", capture)
        self.assertNotIn("DELETE", written)
        self.assertNotIn("INSERT", written)
        self.assertIn("SELECT", written)
        self.assertEqual(await self.sent("ann", 37, SIZE - 1), Downloaded(True, False, False))
        self.assertEqual(await self.runs("ann"), [])  # the runs go once the file counts
        self.assertEqual(await self.downloads(), [(self.ids["ann"], self.ids["big"])])

    async def test_parts_in_any_order_count_once_they_cover_the_file(self) -> None:
        # A tail first (what download managers ask for), then pieces out of order,
        # overlapping: nothing counts until every byte was sent.
        for first, last in ((SIZE - 1, SIZE - 1), (60, 79), (0, 19), (15, 40)):
            self.assertEqual(await self.sent("ann", first, last), NOTHING)
        self.assertEqual(await self.runs("ann"), [(0, 40), (60, 79), (SIZE - 1, SIZE - 1)])
        self.assertEqual(await self.sent("ann", 41, 59), NOTHING)
        self.assertEqual(await self.runs("ann"), [(0, 79), (SIZE - 1, SIZE - 1)])
        # Another recipient's parts are theirs: bob's bytes do not complete ann's file.
        self.assertEqual(await self.sent("bob", 80, 98), NOTHING)
        self.assertEqual(await self.downloads(), [])
        self.assertEqual(await self.sent("ann", 80, 98), Downloaded(True, False, False))
        self.assertEqual(await self.sent("ann", 0, 0, "tiny"), Downloaded(True, True, False))
        self.assertEqual(await self.runs("bob"), [(80, 98)])

    async def test_every_recipient_done_is_all_done(self) -> None:
        for who in ("ann", "bob"):
            await self.sent(who, 0, 0, "tiny")
            await self.sent(who, 50, SIZE - 1)
        self.assertEqual(await self.sent("ann", 0, 49), Downloaded(True, True, False))
        self.assertEqual(await self.sent("bob", 0, 49), Downloaded(True, True, True))
        self.assertEqual(await self.sent("bob", 0, 10), NOTHING)  # after: nothing kept
        self.assertEqual(await self.runs("bob"), [])

    async def sent_of(self, size: int, first: int, last: int) -> Downloaded:
        """Bytes of the big file, as if it were `size` bytes long."""
        return await self.db.run("sent", record_sent_txn, self.ids["ann"], self.ids["bundle"],
                                 self.ids["big"], size, first, last, NOW)

    async def test_scattered_ranges_keep_at_most_max_parts_runs_and_forget_no_byte(
            self) -> None:
        many = 2 * MAX_PARTS
        db_size = 3 * many
        sent_bytes: set[int] = set()
        await self.sent_of(db_size, 0, 1)
        sent_bytes.update((0, 1))
        for i in range(1, many):
            await self.sent_of(db_size, 3 * i, 3 * i)  # one byte in every three
            sent_bytes.add(3 * i)
        runs = await self.runs("ann")
        self.assertEqual(len(runs), MAX_PARTS)
        kept = {b for first, last in runs for b in range(first, last + 1)}
        self.assertEqual(sent_bytes - kept, set())
        # Sent in full later, the file still counts.
        self.assertEqual(await self.sent_of(db_size, 0, db_size - 1),
                         Downloaded(True, False, False))
        self.assertEqual(await self.runs("ann"), [])

    async def test_every_byte_in_more_ranges_than_max_parts_counts(self) -> None:
        # One short run, then MAX_PARTS longer ones: dropping the shortest run forgot byte
        # 0, and the rest fetched in one range never completed the file (read_remove dodged).
        size = 300
        self.assertEqual(await self.sent_of(size, 0, 0), NOTHING)
        for k in range(MAX_PARTS):
            self.assertEqual(await self.sent_of(size, 3 * k + 2, 3 * k + 3), NOTHING)
        self.assertEqual(len(await self.runs("ann")), MAX_PARTS)
        self.assertEqual(await self.sent_of(size, 1, size - 1), Downloaded(True, False, False))

    async def test_deleting_the_file_or_recipient_takes_their_runs(self) -> None:
        await self.sent("ann", 0, 9)
        await self.sent("bob", 0, 9)

        def delete(conn: Connection) -> None:
            conn.execute(sa.delete(drop_recipients).where(drop_recipients.c.id == self.ids["bob"]))

        await self.db.run("delete", delete)
        self.assertEqual(await self.runs("bob"), [])
        self.assertEqual(await self.runs("ann"), [(0, 9)])

        def delete_file(conn: Connection) -> None:
            conn.execute(sa.delete(drop_files).where(drop_files.c.id == self.ids["big"]))

        await self.db.run("delete", delete_file)
        self.assertEqual(await self.runs("ann"), [])


    async def start(self, who: str, file: str = "big", limit: int = 3) -> bool:
        return await self.db.run("start", start_download_txn, self.ids[who], self.ids[file],
                                 limit)

    async def sent_remove(self, who: str, first: int, last: int, limit: int = 3) -> Downloaded:
        return await self.db.run("sent", record_sent_txn, self.ids[who], self.ids["bundle"],
                                 self.ids["big"], SIZE, first, last, NOW, limit)

    async def test_read_remove_counts_a_file_once_its_last_allowed_download_ends(
            self) -> None:
        """All but the last byte, twice, then a connection dropped before any byte: the
        third download was the last allowed, so the file counts although byte 99 never
        went; no fourth starts."""
        for _ in range(2):
            self.assertTrue(await self.start("ann"))
            self.assertEqual(await self.sent_remove("ann", 0, SIZE - 2), NOTHING)
        self.assertTrue(await self.start("ann"))
        self.assertEqual(await self.sent_remove("ann", 0, -1), Downloaded(True, False, False))
        self.assertFalse(await self.start("ann"))
        self.assertEqual(await self.runs("ann"), [])

        def attempts(conn: Connection) -> list[Any]:
            return list(conn.execute(sa.select(drop_download_attempts)))

        self.assertEqual(await self.db.read("attempts", attempts), [])
        self.assertTrue(await self.start("bob"))  # each recipient has attempts of its own

    async def test_a_file_downloaded_whole_starts_no_download_again(self) -> None:
        self.assertTrue(await self.start("ann"))
        self.assertEqual(await self.sent_remove("ann", 0, SIZE - 1),
                         Downloaded(True, False, False))
        self.assertFalse(await self.start("ann"))
        self.assertTrue(await self.start("ann", "tiny"))


class SQLiteSentPartsTests(SentPartsTestsMixin, TestCase):
    backend = "sqlite"


class PostgresSentPartsTests(SentPartsTestsMixin, TestCase):
    backend = "postgresql"
    timeout = 60

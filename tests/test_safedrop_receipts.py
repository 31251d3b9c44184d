"""safedrop's receipts to the sender are queued in the transaction that records what decides
them: the opening of a link (email_receipt_when 1 and 2), a file downloaded (3), the last file
of the last recipient (4, and read_remove's removal with it). The queue's insert is made to
fail (a trigger on queue_messages, the store's own refusal) while the deciding step runs:
nothing of it may stay recorded, so that the next opening or download queues the receipt,
once. Recorded in one commit and queued in the next, the receipt was lost for good when the
second failed or the process died between them: the record said it was sent. On SQLite and
on PostgreSQL."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from twisted.trial.unittest import TestCase

from mailcore.store.schema.safedrop import drop_bundles, drop_downloads, drop_recipients
from tests.support.pg import create_test_database
from tests.test_web_safedrop_pages import Browser, PageFixture

ALICE = "alice@example.test"
FILES = (("a.txt", b"0123456789"), ("b.txt", b"abcdef"))

_DOWN_SQLITE = ("CREATE TRIGGER queue_down BEFORE INSERT ON queue_messages "
                "BEGIN SELECT RAISE(ABORT, 'the queue is down'); END")
_DOWN_PG = (
    "CREATE FUNCTION queue_down() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'the queue is down'; END $$",
    "CREATE TRIGGER queue_down BEFORE INSERT ON queue_messages "
    "FOR EACH ROW EXECUTE FUNCTION queue_down()",
)


def _queue_down_txn(conn: Connection) -> None:
    statements = (_DOWN_SQLITE,) if conn.dialect.name == "sqlite" else _DOWN_PG
    for statement in statements:
        conn.exec_driver_sql(statement)


def _queue_up_txn(conn: Connection) -> None:
    conn.exec_driver_sql("DROP TRIGGER queue_down" if conn.dialect.name == "sqlite"
                         else "DROP TRIGGER queue_down ON queue_messages")


class ReceiptQueueDownMixin:
    """The tests, on the backend `database` gives."""

    async def database(self) -> str | None:
        raise NotImplementedError

    async def drop(self, fields: str, *recipients: str) -> tuple[PageFixture, list[str]]:
        test: Any = self
        f = PageFixture()
        await f.start(test, await self.database())
        links = await f.sent_bundle(fields, recipients or ("ann%40example.org",), FILES)
        return f, links

    async def write(self, f: PageFixture, name: str, fn: Any) -> Any:
        return await f.web.core.db.run(name, fn)

    async def receipts(self, f: PageFixture) -> list[str]:
        """The receipts queued for the sender (spooled() reads synchronously on SQLite
        only)."""
        def txn(conn: Connection) -> list[str]:
            from mailcore.store.schema import queue_messages, queue_recipients
            rows = conn.execute(
                sa.select(queue_messages.c.body)
                .join(queue_recipients, queue_recipients.c.message_id == queue_messages.c.id)
                .where(queue_recipients.c.address == ALICE)
                .order_by(queue_messages.c.created_at, queue_messages.c.id))
            return [_text(bytes(r.body)) for r in rows]

        return list(await f.web.core.db.read("receipts", txn))

    async def failing_then_working(self, f: PageFixture, step: Any) -> Any:
        """Run `step()` (a page request) with the queue's insert failing, then let the
        queue take inserts again; what the step answered."""
        test: Any = self
        await self.write(f, "queue_down", _queue_down_txn)
        try:
            return await step()
        finally:
            await self.write(f, "queue_up", _queue_up_txn)
            # The page logs the failure (the store refused the receipt); nothing else.
            failed = test.flushLoggedErrors()
            test.assertTrue(failed)
            test.assertTrue(all("the queue is down" in str(e.value) for e in failed),
                            [str(e.value) for e in failed])

    async def test_a_first_opening_whose_receipt_fails_is_not_recorded(self) -> None:
        """email_receipt_when=2: the opening's receipt failed to queue, so the opening is
        not recorded either; the next one is the first, and tells the sender (before: the
        first opening stayed recorded, and no receipt ever came)."""
        test: Any = self
        f, [ann] = await self.drop("subject=S&email_receipt_when=2")
        browser = Browser(f)
        status, _, _ = await self.failing_then_working(f, lambda: browser.get(ann))
        test.assertEqual(status, 500)
        opened = await f.web.core.db.read("opened", lambda c: c.execute(
            sa.select(drop_recipients.c.opened_at, drop_recipients.c.opened_receipt_at)
        ).one())
        test.assertEqual(tuple(opened), (None, None))
        test.assertEqual(await self.receipts(f), [])
        for _ in range(3):
            status, _, _ = await browser.get(ann)
            test.assertEqual(status, 200)
        test.assertEqual(await self.receipts(f), ["ann@example.org opened your drop."])

    async def test_a_receipt_to_a_sender_address_spelling_an_encoded_word_is_sent(
            self) -> None:
        """The sender's account email, stored before such addresses were refused, spells an
        RFC 2047 word decoding to CR LF: the receipt's To could not be written, so the
        recipient's opening failed (500), every time. It goes To undisclosed-recipients:;,
        the envelope naming the address."""
        test: Any = self
        f, [ann] = await self.drop("subject=S&email_receipt_when=2")
        old = "=?utf-8?q?=0d=0aBcc:_evil=40x.test?=@example.test"
        from mailcore.store.schema import queue_messages, queue_recipients, users
        await self.write(f, "old", lambda c: c.execute(
            sa.update(users).where(users.c.email == ALICE).values(email=old)))
        status, _, _ = await Browser(f).get(ann)
        test.assertEqual(status, 200)
        [body] = await f.web.core.db.read("receipt", lambda c: [bytes(r[0]) for r in c.execute(
            sa.select(queue_messages.c.body)
            .join(queue_recipients, queue_recipients.c.message_id == queue_messages.c.id)
            .where(queue_recipients.c.address == old))])
        test.assertIn(b"\r\nTo: undisclosed-recipients:;\r\n", body)
        test.assertEqual(_text(body), "ann@example.org opened your drop.")

    async def test_an_hourly_opening_whose_receipt_fails_is_told_at_the_next(self) -> None:
        """email_receipt_when=1 (at most one receipt an hour): the failed one does not
        count as told, so the next opening within the hour tells the sender."""
        test: Any = self
        f, [ann] = await self.drop("subject=S&email_receipt_when=1")
        browser = Browser(f)
        status, _, _ = await self.failing_then_working(f, lambda: browser.get(ann))
        test.assertEqual(status, 500)
        f.web.clock.advance(60)
        for _ in range(2):
            status, _, _ = await browser.get(ann)
            test.assertEqual(status, 200)
        test.assertEqual(await self.receipts(f), ["ann@example.org opened your drop."])

    async def test_a_download_whose_receipt_fails_is_counted_with_it(self) -> None:
        """email_receipt_when=3 (each file downloaded): the download whose receipt failed
        is not counted; the next one is, with its receipt (before: counted, never told)."""
        test: Any = self
        f, [ann] = await self.drop("subject=S&email_receipt_when=3&read_remove=0")
        browser = Browser(f)
        first = await _file_paths(browser, ann)
        status, _, body = await self.failing_then_working(f, lambda: browser.get(first[0]))
        test.assertEqual((status, body), (200, b"0123456789"))  # sent before it is recorded
        test.assertEqual(await _downloads(f), 0)
        test.assertEqual(await self.receipts(f), [])
        for _ in range(2):
            status, _, _ = await browser.get(first[0])
            test.assertEqual(status, 200)
        test.assertEqual(await _downloads(f), 1)
        test.assertEqual(await self.receipts(f), ["ann@example.org downloaded a.txt."])

    async def test_the_last_download_whose_receipt_fails_leaves_the_drop_whole(
            self) -> None:
        """email_receipt_when=4 with read_remove: the last file of the last recipient; its
        receipt failed, so neither the download nor the drop's removal is recorded, and the
        files stay; downloaded again, the sender is told once and the drop removed (before:
        the recipient done, no receipt ever, the files left to the expiry sweep)."""
        test: Any = self
        f, [ann] = await self.drop("subject=S&email_receipt_when=4")
        browser = Browser(f)
        paths = await _file_paths(browser, ann)
        status, _, _ = await browser.download(paths[0])
        test.assertEqual(status, 200)
        status, _, _ = await self.failing_then_working(f, lambda: browser.download(paths[1]))
        test.assertEqual(status, 200)
        test.assertEqual(await _downloads(f), 1)
        test.assertEqual(await self.receipts(f), [])
        test.assertEqual(len(f.stored_files()), 2)
        test.assertIsNone(await _removed_at(f))
        status, _, body = await browser.download(paths[1])
        test.assertEqual((status, body), (200, b"abcdef"))
        test.assertEqual(await self.receipts(f),
                         ["Every recipient has downloaded every file."])
        test.assertIsNotNone(await _removed_at(f))
        test.assertEqual(f.stored_files(), [])
        status, _, _ = await browser.get(ann)
        test.assertEqual(status, 410)


def _text(raw: bytes) -> str:
    import email
    import email.policy
    msg: Any = email.message_from_bytes(raw, policy=email.policy.default)
    return str(msg.get_content()).strip()


async def _file_paths(browser: Browser, link: str) -> list[str]:
    status, _, page = await browser.get(link)
    assert status == 200, (status, page)
    return [f"{link}/files/{i.decode()}" for i in re.findall(
        rb'(?:action|href)="' + link.encode() + rb'/files/(\d+)"', page)]


async def _downloads(f: PageFixture) -> int:
    return int(await f.web.core.db.read("downloads", lambda c: c.execute(
        sa.select(sa.func.count()).select_from(drop_downloads)).scalar_one()))


async def _removed_at(f: PageFixture) -> Any:
    return await f.web.core.db.read("removed", lambda c: c.execute(
        sa.select(drop_bundles.c.removed_at)).scalar_one())


class SQLiteReceiptTests(ReceiptQueueDownMixin, TestCase):
    async def database(self) -> str | None:
        return None


class PostgreSQLReceiptTests(ReceiptQueueDownMixin, TestCase):
    timeout = 60

    async def database(self) -> str | None:
        return await create_test_database(self)

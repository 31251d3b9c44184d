"""Dropmyemail's index of the backup (mailcore.backup.index): attachments described by
libmagic once, signature phones read once, existing backups backfilled by the indexer's
passes; attachments cut from the raw message a slice at a time (mailcore.messages.parts) and
sent as streamed base64 holding about one copy of the message."""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import hashlib
import json
import os
from typing import Any
from urllib.parse import quote

from sqlalchemy import event, insert, select
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailcore.backup import contacts as contacts_module
from mailcore.backup import index as index_module
from mailcore.backup.contacts import (
    Contact,
    ContactBook,
    ContactBooks,
    contact_id,
    fold_contacts,
    make_book,
    old_contact_id,
    vcard_entries,
)
from mailcore.backup.signature import signature_phone
from mailcore.fetch.jobs import thd_create_job
from mailcore.fetch.state import thd_folder
from mailcore.messages import parts
from mailcore.messages.models import FetchedMessage, Location
from mailcore.messages.parse import extract_part, parse_message
from mailcore.store.schema import (
    fetch_folders,
    mailbox_job_items,
    message_attachments,
    messages,
)
from tests.support.corpus import make_corpus
from tests.support.oauth import access_token
from tests.support.pg import create_test_database
from tests.support.web import Web, traced_get

PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n"
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02" \
           b"\x00\x00\x00\x90wS\xde"


def b64lines(data: bytes, eol: str = "\r\n") -> str:
    return base64.encodebytes(data).decode().replace("\n", eol)


def mail(sender: str, subject: str, parts_text: str, boundary: str = "b", eol: str = "\r\n",
         date: str = "Mon, 06 Nov 2023 10:00:00 +0000", text_top: str = "") -> bytes:
    head = (f"From: {sender}\nTo: me@example.test\nSubject: {subject}\nDate: {date}\n"
            f"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\n\n")
    return (head + text_top + parts_text).replace("\r\n", "\n").replace("\n", eol).encode(
        "utf-8", "surrogateescape")


def attachment(name: str, ctype: str, data: bytes, boundary: str = "b") -> str:
    param = f'filename="{name}"' if name.isascii() else \
        f"filename*=utf-8''{quote(name)}"  # RFC 2231
    return (f"--{boundary}\nContent-Type: {ctype}\nContent-Transfer-Encoding: base64\n"
            f"Content-Disposition: attachment; {param}\n\n"
            + b64lines(data, "\n"))


def hostile_corpus() -> list[bytes]:
    """Structures the byte-level locator must read as the email package does."""
    text = "--b\nContent-Type: text/plain\n\nhello\n"
    out = [
        # LF line ends, preamble and epilogue, a boundary-like line inside the text.
        mail("a@x.test", "lf", "preamble\n" + text + "--bb not a delimiter\n"
             + attachment("a.pdf", "application/pdf", PDF) + "--b--\nepilogue\n", eol="\n"),
        # No close delimiter: the last part runs to the end.
        mail("a@x.test", "open", text + attachment("b.pdf", "application/pdf", PDF)),
        # Blanks after the delimiter, quoted-printable, 8bit, an unknown encoding.
        mail("a@x.test", "qp", text.replace("--b\n", "--b \t\n")
             + "--b\nContent-Type: text/csv\nContent-Transfer-Encoding: quoted-printable\n"
             "Content-Disposition: attachment; filename=t.csv\n\na=3Db,caf=C3=A9\nsoft =\n"
             "break\n"
             "--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: 8bit\n"
             "Content-Disposition: attachment; filename=e.bin\n\n\xe9t\xe9\n"
             "--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: x-odd\n"
             "Content-Disposition: attachment; filename=o.bin\n\nodd bytes\n--b--\n"),
        # Three levels of nesting; boundaries that are prefixes of each other.
        mail("a@x.test", "nested",
             "--b\nContent-Type: multipart/related; boundary=\"b1\"\n\n"
             "--b1\nContent-Type: multipart/alternative; boundary=b12\n\n"
             "--b12\nContent-Type: text/plain\n\nx\n--b12\nContent-Type: text/html\n\n<p>x\n"
             "--b12--\n" + attachment("deep.png", "image/png", PNG_HEAD, "b1") + "--b1--\n"
             + attachment("top.pdf", "application/pdf", PDF) + "--b--\n"),
        # A part without headers; a forwarded message (re-serialised: the email package's).
        mail("a@x.test", "bare", "--b\n\nno headers here\n"
             "--b\nContent-Type: message/rfc822\n\nFrom: c@x.test\nSubject: in\n\nbody\n"
             + attachment("z.pdf", "application/pdf", PDF) + "--b--\n"),
        # Base64 the email package reads leniently: stray characters, early padding.
        mail("a@x.test", "lenient", "--b\nContent-Type: application/pdf\n"
             "Content-Transfer-Encoding: base64\nContent-Disposition: attachment; "
             "filename=s.pdf\n\n" + base64.b64encode(PDF[:10]).decode() + "!!\n"
             + base64.b64encode(PDF[10:]).decode() + "\n--b--\n"),
        mail("a@x.test", "padding", "--b\nContent-Type: application/pdf\n"
             "Content-Transfer-Encoding: base64\nContent-Disposition: attachment; "
             "filename=p.pdf\n\nQQ==QUJD\n--b--\n"),
        mail("a@x.test", "uu", "--b\nContent-Type: application/octet-stream\n"
             "Content-Transfer-Encoding: x-uuencode\nContent-Disposition: attachment; "
             "filename=u.bin\n\nbegin 644 u.bin\n#86)C\n`\nend\n--b--\n"),
        # Not multipart at all: the whole body is the attachment ("1").
        ("From: a@x.test\r\nSubject: root\r\nContent-Type: application/pdf\r\n"
         "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; "
         "filename=root.pdf\r\n\r\n" + b64lines(PDF)).encode(),
    ]
    return out


class PartsTests(TestCase):
    """The locator agrees with the email package, or says it cannot (and the email package
    is used)."""

    def test_every_attachment_is_cut_as_the_email_package_cuts_it(self) -> None:
        streamed = fallback = 0
        for raw in [m.raw for m in make_corpus(0, 120)] + hostile_corpus():
            for a in parse_message(raw).attachments:
                want = extract_part(raw, a.part_path)
                assert want is not None
                located = parts.check(raw, a.part_path, a.size)
                if located is None:
                    fallback += 1
                    continue
                streamed += 1
                got = b"".join(parts.decoded_chunks(raw, located.span, 7))
                self.assertEqual(got, want, (a, raw[:200]))
                encoded = b"".join(parts.base64_chunks(raw, located.span, 999))
                self.assertEqual(encoded, base64.b64encode(want), a)
        self.assertGreater(streamed, 20)
        self.assertGreater(fallback, 0)

    def test_what_does_not_decode_cleanly_falls_back(self) -> None:
        by_name = {}
        for raw in hostile_corpus():
            for a in parse_message(raw).attachments:
                by_name[a.filename] = (raw, a)
        for name in ("s.pdf", "p.pdf", "u.bin", ""):  # lenient base64, uuencode, rfc822
            raw, a = by_name[name]
            self.assertIsNone(parts.check(raw, a.part_path, a.size), name)
        for name in ("a.pdf", "b.pdf", "t.csv", "e.bin", "o.bin", "deep.png", "root.pdf"):
            raw, a = by_name[name]
            self.assertIsNotNone(parts.check(raw, a.part_path, a.size), name)

    def test_the_parts_of_one_message_are_described_from_one_walk_and_one_parse(self) -> None:
        """Each part was located by a walk of its multipart up to it, and each one that
        does not decode cleanly (an attached message) cut by a parse of the whole message:
        20 of the 201 attachments of a 5.7 MB message took 13 s (found by an audit)."""
        from mailcore.messages import parse as parse_module

        text = "--b\nContent-Type: text/plain\n\nhi\n"
        body = text + attachment("first.pdf", "application/pdf", PDF)
        for n in range(60):
            body += ("--b\nContent-Type: message/rfc822\n\n"
                     f"From: a@x.test\nSubject: inner {n}\n\ninner {n}\n")
            body += attachment(f"{n}.pdf", "application/pdf", PDF + str(n).encode())
        raw = mail("a@x.test", "many", body + "--b--\n")
        found = parse_message(raw).attachments
        wanted = [(n, a.part_path) for n, a in enumerate(found)]
        expected = {}
        for n, a in enumerate(found):
            content = extract_part(raw, a.part_path)
            expected[n] = "" if content is None else index_module.describe(content)
        calls = {"walks": 0, "parses": 0}

        def counted(name: str, module: Any, function: Any) -> None:
            def spy(*args: Any) -> Any:
                calls[name] += 1
                return function(*args)
            self.patch(module, function.__name__, spy)

        counted("walks", parts, parts._delimiters)
        counted("parses", parse_module, parse_module._parse_tree)
        got = index_module.describe_parts(raw, wanted, parse_module.MimeLimits())
        self.assertEqual(len(found), 121)
        self.assertEqual(got, expected)
        self.assertIn("PDF document", got[0])
        self.assertEqual(calls, {"walks": 1, "parses": 1})

    def test_a_path_that_is_not_there_is_none(self) -> None:
        raw = hostile_corpus()[3]
        for path in ("9", "1.1", "0", "x", "2.2.2", "1." + "1" * 5000):
            self.assertIsNone(parts.locate(raw, path), path)


class IndexBase(TestCase):
    postgres = False

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(url=await create_test_database(self) if self.postgres else None)
        if self.postgres:
            self.addCleanup(self.web.core.db.close)
        self.core = self.web.core
        self.alice = await self.web.user()
        self.token = await access_token(self.core.oauth, self.alice.id)
        self.account = await self.core.fetch.accounts.create(
            self.alice.id, name="a", email="alice@example.test", host="127.0.0.1",
            port=993, use_ssl=True, password="pw")
        self.base = f"/v1/accounts/{self.account.id}"
        self.uid = 0

    async def store(self, *raws: bytes, user_id: int | None = None,
                    account_id: int | None = None) -> None:
        where = Location(user_id=user_id or self.alice.id,
                         account_id=account_id or self.account.id, folder_id=None,
                         folder="INBOX")
        fetched = []
        for raw in raws:
            self.uid += 1
            fetched.append(FetchedMessage(raw=raw, uid=self.uid))
        await self.core.messages.store_batch(where, fetched)

    async def call(self, path: str, token: str | None = None) -> tuple[int, Any]:
        status, _, body = await self.web.call(
            "GET", path, headers={"Authorization": f"Bearer {token or self.token}"})
        return status, body

    async def undescribed(self) -> int:
        def txn(conn: Any) -> int:
            return len(conn.execute(select(message_attachments.c.id).where(
                message_attachments.c.meta_data.is_(None))).all())
        return await self.core.db.read("t", txn)

    def get_traced(self, path: str) -> tuple[DigestingTransport, int]:
        """GET `path` over a whole HTTP connection whose transport hashes the reply as it
        comes; (the transport, the peak of memory traced while the request was served)."""
        transport = DigestingTransport()
        return transport, traced_get(self.web, path, self.token, transport)

    def count_libmagic(self) -> list[bytes]:
        calls: list[bytes] = []
        real = index_module.describe

        def counting(content: bytes) -> str:
            calls.append(content)
            return real(content)

        self.patch(index_module, "describe", counting)
        return calls


class AttachmentIndexTests(IndexBase):

    def corpus(self) -> list[bytes]:
        return [
            mail("Bo <bo@x.test>", "invoice", "--b\nContent-Type: text/plain\n\nhi\n"
                 + attachment("r\u00e9sum\u00e9.pdf", "application/octet-stream", PDF)
                 + "--b--\n"),
            mail("Ana <ana@x.test>", "photo", attachment("p.png", "image/png", PNG_HEAD)
                 + "--b--\n", date="Tue, 07 Nov 2023 10:00:00 +0000"),
        ]

    async def test_attachments_are_described_once_then_read_from_the_index(self) -> None:
        calls = self.count_libmagic()
        await self.store(*self.corpus())
        self.assertEqual(await self.undescribed(), 2)
        self.assertEqual(await self.core.backup_mail.index.run(), 2 + 2)  # 2 files, 2 texts
        self.assertEqual((await self.undescribed(), len(calls)), (0, 2))
        for _ in range(3):
            status, page = await self.call(f"{self.base}/attachments?sort=filename")
            self.assertEqual(status, 200, page)
        self.assertEqual(len(calls), 2)  # listing three times described nothing again
        metas = {a["filename"]: a["meta_data"] for a in page["attachments"]}
        self.assertIn("PDF document, version 1.4", metas["résumé.pdf"])
        self.assertIn("PNG image data", metas["p.png"])
        self.assertEqual(await self.core.backup_mail.index.run(), 0)

    async def test_a_page_read_before_the_indexer_describes_its_own_rows_once(self) -> None:
        calls = self.count_libmagic()
        await self.store(*self.corpus())
        status, page = await self.call(f"{self.base}/attachments?per_page=1&sort=filename")
        self.assertEqual((status, len(calls), await self.undescribed()), (200, 1, 1))
        self.assertIn("PNG image data", page["attachments"][0]["meta_data"])
        await self.call(f"{self.base}/attachments?per_page=1&sort=filename")
        self.assertEqual(len(calls), 1)

    async def test_search_matches_name_type_and_description(self) -> None:
        await self.store(*self.corpus())
        await self.core.backup_mail.index.run()
        for query, names in (("sum", ["résumé.pdf"]), ("image/", ["p.png"]),
                             ("PDF document", ["résumé.pdf"]), ("%", []), ("_", []),
                             # Every letter folded, not ASCII alone (SQLite's LIKE: none).
                             ("RÉSUMÉ", ["résumé.pdf"]), ("Résumé.PDF", ["résumé.pdf"])):
            status, page = await self.call(
                f"{self.base}/attachments_search?query={quote(query)}")
            self.assertEqual(status, 200, page)
            self.assertEqual([a["filename"] for a in page["attachments"]], names, query)

    async def test_the_indexer_backfills_at_start_and_indexes_after_each_sync(self) -> None:
        indexer = self.core.backup_index
        await self.store(self.corpus()[0])  # stored "before the upgrade"
        indexer.startService()
        self.assertEqual(await self.undescribed(), 0)  # the first pass backfilled it
        await self.store(self.corpus()[1])
        self.assertEqual(await self.undescribed(), 1)
        indexer.kick(object())  # what the fetch engine's listener does after a sync
        self.assertEqual(await self.undescribed(), 0)
        await self.store(mail("c@x.test", "late", attachment("l.pdf", "application/pdf",
                                                             PDF) + "--b--\n"))
        self.web.clock.advance(indexer.interval)  # the periodic pass
        self.assertEqual(await self.undescribed(), 0)
        await indexer.stopService()
        self.assertEqual(self.web.clock.getDelayedCalls(), [])
        self.assertIn(indexer.kick, self.core.fetch.engine.listeners)
        self.assertIn(indexer, self.core.background_services())


class StreamedFileTests(IndexBase):

    async def test_a_large_file_comes_back_exactly(self) -> None:
        data = os.urandom(3 * 1024 * 1024 + 1)
        await self.store(mail("a@x.test", "big", attachment("big.bin", "application/zip",
                                                             data) + "--b--\n"))
        _, page = await self.call(f"{self.base}/attachments")
        response = await self.web.http.get(
            f"http://127.0.0.1{self.base}/attachments/{page['attachments'][0]['id']}",
            headers={"Authorization": f"Bearer {self.token}"})
        raw_body = await response.content()
        self.assertEqual(response.code, 200, raw_body[:300])
        body = json.loads(raw_body)
        self.assertEqual(base64.b64decode(body["content"]), data)
        self.assertEqual((body["size"], body["filename"], body["mime_type"]),
                         (len(data), "big.bin", "application/zip"))
        self.assertEqual(response.length, len(raw_body))
        self.assertEqual(raw_body, json.dumps(body, separators=(",", ":")).encode())

    async def test_a_forwarded_message_falls_back_to_the_email_package(self) -> None:
        raw = hostile_corpus()[4]
        await self.store(raw)
        _, page = await self.call(f"{self.base}/attachments?sort=filename")
        forwarded = next(a for a in page["attachments"] if a["mime_type"] == "message/rfc822")
        status, body = await self.call(f"{self.base}/attachments/{forwarded['id']}")
        self.assertEqual(status, 200, body)
        part = parse_message(raw).attachments
        path = next(a.part_path for a in part if a.mime_type == "message/rfc822")
        self.assertEqual(base64.b64decode(body["content"]), extract_part(raw, path))

    async def test_the_reply_holds_about_one_copy_of_the_message(self) -> None:
        data = os.urandom(6 * 1024 * 1024)
        raw = mail("a@x.test", "big", attachment("big.bin", "application/zip", data)
                   + "--b--\n")
        await self.store(raw)
        del raw
        _, page = await self.call(f"{self.base}/attachments")
        path = f"{self.base}/attachments/{page['attachments'][0]['id']}"
        transport, peak = self.get_traced(path)
        self.assertTrue(transport.done, transport.head[:300])
        self.assertEqual(transport.digest.hexdigest(), hashlib.sha256(data).hexdigest())
        message_size = len(data) * 4 // 3 + len(data) // 57 * 2  # base64 lines with CRLF
        # One copy of the message (the blob read from the store) and slices; building the
        # JSON in memory took five copies of the file and more.
        self.assertLess(peak, message_size + 2 * 1024 * 1024, peak)


class StreamedMessageTests(IndexBase):
    """GET …/messages/:id read the whole message and built its base64 and JSON at once on
    the reactor thread: a 64 MiB message held it 0.5 s and about five copies of the
    message (found by an audit). It is read a chunk at a time and streamed."""

    async def test_a_message_is_streamed_byte_exact_holding_a_chunk_of_it(self) -> None:
        folder = await self.core.db.run(
            "folder", lambda conn: thd_folder(conn, self.account.id, "INBOX").id)
        raw = (b"From: a@x.test\r\nTo: me@example.test\r\nSubject: big\r\n\r\n"
               + base64.encodebytes(os.urandom(12 * 1024 * 1024)).replace(b"\n", b"\r\n"))
        stored = await self.core.messages.store_batch(
            Location(self.alice.id, self.account.id, folder, "INBOX"),
            [FetchedMessage(raw=raw, uid=1)])
        path = f"{self.base}/mailboxes/{folder}/messages/{stored.created[0]}"
        size, digest = len(raw), hashlib.sha256(raw).hexdigest()
        del raw, stored
        transport, peak = self.get_traced(path)
        self.assertTrue(transport.done, transport.head[:300])
        self.assertEqual(transport.digest.hexdigest(), digest)
        head = json.loads(transport.head[transport.head.index(b"{"):] + b'"x":0}')
        self.assertEqual((head["size"], head["filename"], head["content_type"]),
                         (size, f"{path.rsplit('/', 1)[1]}.eml", "message/rfc822"))
        # A chunk of the stored bytes and its base64; it was about five copies.
        self.assertLess(peak, size // 2, peak)

    async def test_another_mailbox_or_user_is_404(self) -> None:
        folder = await self.core.db.run(
            "folder", lambda conn: thd_folder(conn, self.account.id, "INBOX").id)
        other = await self.core.db.run(
            "folder", lambda conn: thd_folder(conn, self.account.id, "Sent").id)
        stored = await self.core.messages.store_batch(
            Location(self.alice.id, self.account.id, folder, "INBOX"),
            [FetchedMessage(raw=b"Subject: x\r\n\r\nx\r\n", uid=1)])
        row = stored.created[0]
        bob = await self.web.user("bob")
        theirs = await access_token(self.core.oauth, bob.id)
        for path, token in ((f"{self.base}/mailboxes/{other}/messages/{row}", None),
                            (f"{self.base}/mailboxes/{folder}/messages/{row + 1}", None),
                            (f"{self.base}/mailboxes/{folder}/messages/{row}", theirs)):
            status, body = await self.call(path, token)
            self.assertEqual((status, body["error"]), (404, "not_found"), path)
        status, body = await self.call(f"{self.base}/mailboxes/{folder}/messages/{row}")
        self.assertEqual(base64.b64decode(body["content"]), b"Subject: x\r\n\r\nx\r\n")
        self.assertEqual(body["size"], len(b"Subject: x\r\n\r\nx\r\n"))


class DigestingTransport(StringTransport):
    """Keeps the reply's head and hashes the base64 content's bytes as they come, holding
    neither the reply nor the file."""

    def __init__(self) -> None:
        super().__init__()
        self.head = b""
        self.in_content = False
        self.done = False
        self.carry = b""
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if not self.in_content:
            self.head += data
            marker = self.head.find(b'"content":"')
            if marker < 0:
                return
            data = self.head[marker + len(b'"content":"'):]
            self.head = self.head[:marker]
            self.in_content = True
        end = data.find(b'"')
        text = self.carry + (data if end < 0 else data[:end])
        whole = len(text) - len(text) % 4
        self.digest.update(binascii.a2b_base64(text[:whole]))
        self.carry = text[whole:]
        if end >= 0:
            self.done = data[end:] == b'"}'

    def writeSequence(self, seq: Any) -> None:
        for data in seq:
            self.write(data)


class SignaturePhoneTests(TestCase):
    """Phone numbers from signature blocks: realistic signatures, and no false positives."""

    def test_realistic_signatures(self) -> None:
        cases = [
            ("Hallo Anna,\n\nanbei das Angebot.\n\nViele Grüße\n-- \nMax Mustermann\n"
             "Beispiel GmbH | Musterstraße 1 | 10115 Berlin\nTel: +49 30 1234567\n"
             "Fax: +49 30 1234568\nwww.beispiel.de\n", "max@beispiel.de", "+49 30 1234567"),
            ("Thanks!\n\nJohn Smith\nSenior Engineer, Acme Corp.\nPhone: (415) 555-0132\n"
             "www.acme.com\n", "john@acme.com", "+1 415-555-0132"),
            ("Cheers,\n--\nJane Doe\nM: +44 7911 123456\n", "jane@example.co.uk",
             "+44 7911 123456"),
            ("Merci,\n-- \nMarie Dupont\nTél. : 01 42 68 53 00\nPortable : 06 12 34 56 78\n",
             "marie@exemple.fr", "+33 1 42 68 53 00"),
            ("Gruß\n\nKlaus\nFirma AG\nTelefon 030 / 12 34 56 78\n", "k@firma.de",
             "+49 30 12345678"),
            ("see you\n-- \nA. Person\n+49 (0)89 1234 5678\n", "a@b.com", "+49 89 12345678"),
            ("Fax only\n-- \nB\nFax: +49 30 1234568\n", "b@b.de", ""),
        ]
        for text, sender, phone in cases:
            self.assertEqual(signature_phone(text, sender), phone, text)

    def test_quoted_signatures_are_someone_elses(self) -> None:
        cases = [
            "ok, thanks\n\nOn Mon, 4 Mar 2024, Bob <bob@x.com> wrote:\n> -- \n> Bob\n"
            "> Tel: +1 415 555 0132\n",
            "ok\n\n-----Original Message-----\nFrom: Bob\nSent: Monday, 4 March 2024\n"
            "To: Alice\n\n-- \nBob\nTel: +1 415 555 0132\n",
            "ok\n\nFrom: Bob Example <bob@x.com>\nSent: Monday\nSubject: x\n\nTel: +1 415 555 "
            "0132\n",
            "> Tel: +1 415 555 0132\nsure\n",
        ]
        for text in cases:
            self.assertEqual(signature_phone(text, "alice@example.com"), "", text)

    def test_dates_order_numbers_and_addresses_are_no_phones(self) -> None:
        cases = [
            "Your order 4711-2024-0815 shipped on 2024-03-05.\nTracking 1Z999AA10123456784\n"
            "-- \nShop Team\nOrder no. 123456789\nInvoice 2024/000123\n",
            "Server 192.168.10.254 rebooted at 10:30:15.\nUptime 1234567 s\n-- \nops\n"
            "IP: 10.20.30.40\n",
            "Meeting 05.03.2024 14:00-15:30, room 1234.\nCall +49 30 1234567 tomorrow, "
            "and bring the 2024 figures\nthanks\n",
            "Kontonummer 1234567890, BLZ 10010010\n\nGrüße\nEva\n12345 Berlin\n",
            "-- \nSent from my phone\n2024-03-05 10:30\n",
        ]
        for text in cases:
            self.assertEqual(signature_phone(text, "x@example.de"), "", text)


class ContactPhoneTests(IndexBase):

    async def test_a_contact_has_the_phone_of_their_signature(self) -> None:
        await self.store(
            mail("Max <max@beispiel.de>", "hi", "--b\nContent-Type: text/plain\n\nHallo\n"
                 "-- \nMax\nTel: +49 30 1234567\n--b--\n"),
            mail("Eva <eva@x.test>", "order", "--b\nContent-Type: text/plain\n\n"
                 "Order 4711-2024-0815 of 2024-03-05\n--b--\n"),
        )
        await self.core.backup_mail.index.run()
        status, page = await self.call(f"{self.base}/contacts?sort=email")
        self.assertEqual(status, 200, page)
        phones = {c["email"]: c["phone"] for c in page["contacts"]}
        self.assertEqual(phones["max@beispiel.de"], "+49 30 1234567")
        self.assertEqual(phones["eva@x.test"], "")

        def txn(conn: Any) -> list[Any]:
            return conn.execute(select(messages.c.signature_phone)).scalars().all()
        self.assertEqual(sorted(await self.core.db.read("t", txn)), ["", "+49 30 1234567"])


class ContactCostTests(IndexBase):
    """A contacts request folded every message's address fields inside the store's read
    transaction (1.1 s per request for an account of 5,000 messages, every read of the
    daemon waiting behind it) and listed every attachment of the account, 200 at a time
    with a count each, to find the vCards (found by an audit). The read is one query of
    the rows and one of the vCards; the fold runs in a worker process."""

    async def test_the_fold_runs_in_a_worker_and_vcards_are_found_by_one_query(self) -> None:
        card = base64.b64encode(b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Zoe Z\r\n"
                                b"EMAIL:zoe@x.test\r\nTEL:+33 1 23 45 67 89\r\n"
                                b"END:VCARD\r\n").decode()
        many = "".join(attachment(f"{n}.pdf", "application/pdf", PDF) for n in range(450))
        await self.store(
            mail("Bo <bo@x.test>", "files", many + "--b--\n"),
            mail("Zoe <zoe@x.test>", "card", "--b\nContent-Type: text/x-vcard\n"
                 "Content-Transfer-Encoding: base64\n"
                 f"Content-Disposition: attachment; filename=Z.VCF\n\n{card}\n--b--\n"))
        in_process: list[str] = []
        run_in_process = self.core.cpu.run_in_process

        def spy(fn: Any, *args: Any) -> Any:
            in_process.append(fn.__name__)
            return run_in_process(fn, *args)

        self.patch(self.core.cpu, "run_in_process", spy)
        statements: list[str] = []
        engine = self.core.db.engine

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", seen)
        self.addCleanup(event.remove, engine, "before_cursor_execute", seen)
        status, page = await self.call(f"{self.base}/contacts?sort=email")
        self.assertEqual(status, 200, page)
        self.assertEqual([(c["email"], c["name"], c["phone"]) for c in page["contacts"]], [
            ("bo@x.test", "Bo", ""), ("me@example.test", "", ""),
            ("zoe@x.test", "Zoe", "+33 1 23 45 67 89")])
        self.assertEqual(in_process, ["fold_contacts"])
        listing = [s for s in statements if "message_attachments" in s]
        self.assertLessEqual(len(listing), 3, listing)  # the vCards, and reading the one


class ContactBookTests(IndexBase):
    """Every contacts request, a page of 40 or one contact, folded every message of the
    account again (about 0.13 ms a message: 2.5 s a request for 20,000 messages, and a
    client reading 2,110 contacts 40 at a time asked for 53 folds of the whole account).
    An account is folded once per change of its backup now."""

    def spy_folds(self) -> list[tuple[Any, ...]]:
        folds: list[tuple[Any, ...]] = []
        run_in_process = self.core.cpu.run_in_process

        def spy(fn: Any, *args: Any) -> Any:
            if fn.__name__ == "fold_contacts":
                folds.append(args)
            return run_in_process(fn, *args)

        self.patch(self.core.cpu, "run_in_process", spy)
        return folds

    async def emails(self, query: str) -> list[str]:
        status, page = await self.call(f"{self.base}/contacts?{query}")
        self.assertEqual(status, 200, page)
        return [c["email"] for c in page["contacts"]]

    async def test_an_account_is_folded_once_per_change_of_its_backup(self) -> None:
        text = "--b\nContent-Type: text/plain\n\nHallo\n-- \nMax\nTel: +49 30 1234567\n--b--\n"
        await self.store(mail("Max <max@beispiel.de>", "hi", text),
                         mail("Bo <bo@x.test>", "a", text.replace("Tel", "Fax")),
                         mail("Cy <cy@x.test>", "b", text.replace("Tel", "Fax")))
        folds = self.spy_folds()
        everything = await self.emails("sort=email&per_page=40")
        self.assertEqual(everything, ["bo@x.test", "cy@x.test", "max@beispiel.de",
                                      "me@example.test"])
        pages = [await self.emails(f"sort=email&direction=desc&per_page=3&page={n}")
                 for n in (1, 2, 3)]
        self.assertEqual(pages, [everything[::-1][:3], everything[::-1][3:], []])
        self.assertEqual(await self.emails("sort=name&per_page=2&page=2"),
                         ["max@beispiel.de", "me@example.test"])
        max_id = contact_id("max@beispiel.de")
        status, card = await self.call(f"{self.base}/contacts/{max_id}")
        self.assertEqual(status, 200, card)
        self.assertNotIn(b"TEL", base64.b64decode(card["content"]))  # not yet read
        self.assertEqual(len(folds), 1)

        await self.core.backup_mail.index.run()  # the signature's phone is read now
        status, card = await self.call(f"{self.base}/contacts/{max_id}")
        self.assertIn(b"TEL:+49 30 1234567", base64.b64decode(card["content"]))
        self.assertEqual(len(folds), 2)

        await self.store(mail("Dee <dee@x.test>", "c", text))  # a sync stores more
        self.assertIn("dee@x.test", await self.emails("sort=email"))
        self.assertEqual(await self.emails("sort=email&page=2"), [])
        self.assertEqual(len(folds), 3)

    async def test_requests_at_once_share_one_fold(self) -> None:
        await self.store(mail("Bo <bo@x.test>", "a", "--b\nContent-Type: text/plain\n\nhi\n"
                              "--b--\n"))
        held: list[tuple[defer.Deferred[Any], tuple[Any, ...]]] = []

        def holding(fn: Any, *args: Any) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = defer.Deferred()
            held.append((d, args))
            return d

        self.patch(self.core.cpu, "run_in_process", holding)
        asked = [defer.Deferred.fromCoroutine(self.call(f"{self.base}/contacts{q}"))
                 for q in ("", "?sort=email", f"/{contact_id('bo@x.test')}")]
        self.assertEqual(len(held), 1)
        # The fold fails (its request went away): one of those waiting folds again.
        held[0][0].errback(RuntimeError("worker died"))
        self.assertEqual(len(held), 2)
        held[1][0].callback(fold_contacts(*held[1][1]))
        self.web.http.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        replies = [self.successResultOf(d) for d in asked]
        self.assertEqual([status for status, _ in replies], [500, 200, 200])
        self.assertEqual(replies[1][1]["contacts"][0]["email"], "bo@x.test")
        self.assertEqual(replies[2][1]["filename"], "bo@x.test.vcf")
        status, _ = await self.call(f"{self.base}/contacts")  # kept
        self.assertEqual((status, len(held)), (200, 2))


class ContactBookPostgreSQLTests(ContactBookTests):
    postgres = True
    timeout = 240


class VcardCostTests(TestCase):
    """vobject parsed every property of an attached vCard, a photo of megabytes too, and
    more than linearly (4.5 s for a card with a 7.7 MB photo, 11.6 s for 14.6 MB), on the
    CPU pool at every fold of the account's contacts. It is given the lines of the names,
    addresses and numbers only."""

    def test_a_photo_is_not_parsed_and_the_card_reads_the_same(self) -> None:
        photo = "PHOTO;ENCODING=b;TYPE=JPEG:" + "\r\n ".join(["A" * 74] * 30_000) + "AAA=\r\n"
        card = ("BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Zo\u00eb\r\nitem1.EMAIL;type=INTERNET:"
                "zoe@x.test\r\n" + photo + "NOTE;ENCODING=QUOTED-PRINTABLE:a=\r\nTEL:1=\r\n"
                "b\r\nTEL;type=CELL:\r\n +33 1 23 45 67 89\r\nEND:VCARD\r\n"
                "BEGIN:VCARD\nVERSION:3.0\nFN:Bo\nEMAIL:bo@x.test\nPHOTO:!!\nEND:VCARD\n")
        parsed: list[int] = []
        real = contacts_module.vobject.readComponents

        def spy(text: str, *args: Any, **kwargs: Any) -> Any:
            parsed.append(len(text))
            return real(text, *args, **kwargs)

        self.patch(contacts_module.vobject, "readComponents", spy)
        # A photo that is no base64 no longer loses the card it is in (vobject raised).
        self.assertEqual(vcard_entries(card.encode()), [
            ("Zoë", "zoe@x.test", "+33 1 23 45 67 89"), ("Bo", "bo@x.test", "")])
        self.assertEqual(len(parsed), 1)
        self.assertLess(parsed[0], 300)


class ContactBooksBoundTests(TestCase):
    def test_books_are_kept_up_to_a_number_of_contacts_oldest_use_dropped_first(self) -> None:
        def book(n: int) -> ContactBook:
            return make_book([Contact(i, "", f"{i}@x.test", "", None) for i in range(n)])

        books = ContactBooks(max_contacts=10)
        for key, n in (("a", 4), ("b", 4)):
            books.fold_done(key, (1, 0), book(n))
        self.assertIsNotNone(books.get("a", (1, 0)))  # "b" is now the oldest used
        self.assertIsNone(books.get("a", (2, 0)))  # another stamp: stale
        books.fold_done("c", (1, 0), book(4))
        self.assertEqual([books.get(k, (1, 0)) is not None for k in "abc"],
                         [True, False, True])
        books.fold_done("d", (1, 0), book(11))  # larger than the bound: not kept
        self.assertIsNone(books.get("d", (1, 0)))
        self.assertIsNotNone(books.get("c", (1, 0)))


class HostileContactTests(IndexBase):

    async def test_a_name_decoded_to_nested_parentheses_breaks_no_listing(self) -> None:
        """A From whose encoded name decodes to 3,000 "(" is stored with that text; the
        listing read every row's text again with the email package's address parser,
        which recursed once per "(": every contacts request of the account was a 500."""
        await self.store(
            mail("Bo <bo@x.test>", "hi", "--b\nContent-Type: text/plain\n\nhi\n--b--\n"),
            b"From: =?utf-8?q?" + b"=28" * 3000 + b"?= <evil@x.test>\r\n"
            b"To: alice@example.test, Cy <cy@x.test>\r\nSubject: parens\r\n\r\nbody\r\n",
        )
        for query in ("", "?sort=email&page=1"):
            status, page = await self.call(f"{self.base}/contacts{query}")
            self.assertEqual(status, 200, page)
            self.assertEqual([(c["email"], c["name"]) for c in page["contacts"]],
                             [("bo@x.test", "Bo"), ("cy@x.test", "Cy"),
                              ("evil@x.test", ""), ("me@example.test", "")])
        evil = contact_id("evil@x.test")
        status, card = await self.call(f"{self.base}/contacts/{evil}")
        self.assertEqual(status, 200, card)


class DeeplyAttachedMessageTests(IndexBase):

    async def test_an_attached_message_nested_past_the_stack_is_served_as_it_stands(
        self,
    ) -> None:
        """A message/rfc822 nested 400 deep (stored with size 0): the email package wrote
        it out recursing once per level (RecursionError) to describe it, so the account's
        attachment listing was a 500, as were its download, the contacts (its file name
        ends in .vcf) and the indexer's pass. It is its bytes in the raw message now."""
        nested = "Content-Type: text/plain\n\nhello\n"
        for _ in range(400):
            nested = "Content-Type: message/rfc822\n\n" + nested
        raw = mail("Bo <bo@x.test>", "deep", "--b\nContent-Type: text/plain\n\nhi\n"
                   "--b\nContent-Disposition: attachment; filename=deep.vcf\n" + nested
                   + "--b--\n")
        await self.store(raw)
        status, page = await self.call(f"{self.base}/attachments")  # describes it
        self.assertEqual(status, 200, page)
        self.assertEqual([(a["filename"], a["mime_type"]) for a in page["attachments"]],
                         [("deep.vcf", "message/rfc822")])
        status, body = await self.call(f"{self.base}/attachments/{page['attachments'][0]['id']}")
        self.assertEqual(status, 200, body)
        inner = nested.split("\n\n", 1)[1].rstrip("\n").replace("\n", "\r\n").encode()
        self.assertEqual(base64.b64decode(body["content"]), inner)
        self.assertEqual(body["size"], len(inner))
        status, contacts = await self.call(f"{self.base}/contacts")
        self.assertEqual(status, 200, contacts)
        self.assertEqual([c["email"] for c in contacts["contacts"]],
                         ["bo@x.test", "me@example.test"])
        await self.store(raw)  # another copy, for the indexer's pass
        self.assertEqual(await self.undescribed(), 1)
        await self.core.backup_mail.index.run()
        self.assertEqual(await self.undescribed(), 0)


class BadInputBatteryTests(IndexBase):
    """Every id, page, sort and boolean of the read side and of account writes, wrong in
    each way the issue names, is a 4xx in the OAuth error shape, never a 5xx; another
    user's ids (of accounts, mailboxes, messages, attachments, contacts) are 404."""

    async def folder(self, account_id: int) -> int:
        def txn(conn: Any) -> int:
            result = conn.execute(fetch_folders.insert().values(
                account_id=account_id, name="INBOX", uidvalidity=1))
            return int(result.inserted_primary_key[0])
        return await self.core.db.run("t", txn)

    async def filled(self, user_id: int, account_id: int) -> dict[str, int]:
        folder = await self.folder(account_id)
        where = Location(user_id=user_id, account_id=account_id, folder_id=folder,
                         folder="INBOX", uidvalidity=1)
        self.uid += 1
        raw = mail("Max <max@beispiel.de>", "hi", "--b\nContent-Type: text/plain\n\nhi\n"
                   "-- \nTel: +49 30 1234567\n"
                   + attachment("a.pdf", "application/pdf", PDF) + "--b--\n")
        stored = await self.core.messages.store_batch(where, [FetchedMessage(raw, self.uid)])
        await self.core.backup_mail.index.run()

        def txn(conn: Any) -> int:
            return int(conn.execute(select(message_attachments.c.id).where(
                message_attachments.c.message_row_id == stored.created[0])).scalar_one())
        attachment_id = await self.core.db.read("t", txn)
        token = await access_token(self.core.oauth, user_id)
        status, contacts = await self.call(f"/v1/accounts/{account_id}/contacts", token)
        assert status == 200, contacts
        return {"account": account_id, "mailbox": folder, "message": stored.created[0],
                "attachment": attachment_id, "contact": contacts["contacts"][0]["id"]}

    async def test_another_users_ids_are_404(self) -> None:
        mine = await self.filled(self.alice.id, self.account.id)
        bob = await self.web.user("bob")
        bobs_account = await self.core.fetch.accounts.create(
            bob.id, name="b", email="bob@example.test", host="127.0.0.1", port=993,
            use_ssl=True, password="pw")
        theirs = await self.filled(bob.id, bobs_account.id)
        a, b = f"/v1/accounts/{mine['account']}", f"/v1/accounts/{theirs['account']}"
        paths = [
            b, f"{b}/mailboxes", f"{b}/mailboxes/{theirs['mailbox']}/messages",
            f"{b}/mailboxes/{theirs['mailbox']}/messages/{theirs['message']}",
            f"{b}/messages/search?query=hi", f"{b}/attachments",
            f"{b}/attachments/{theirs['attachment']}", f"{b}/attachments_search?query=a",
            f"{b}/contacts", f"{b}/contacts/{theirs['contact']}",
            # Bob's ids under Alice's own account.
            f"{a}/mailboxes/{theirs['mailbox']}/messages",
            f"{a}/mailboxes/{theirs['mailbox']}/messages/{theirs['message']}",
            f"{a}/mailboxes/{mine['mailbox']}/messages/{theirs['message']}",
            f"{a}/attachments/{theirs['attachment']}",
        ]
        for path in paths:
            status, body = await self.call(path)
            self.assertEqual((status, body.get("error")), (404, "not_found"), path)
        for method in ("PUT", "DELETE"):
            status, _, body = await self.web.call(
                method, b, json={"port": 1} if method == "PUT" else None,
                headers={"Authorization": f"Bearer {self.token}"})
            self.assertEqual((status, body["error"]), (404, "not_found"), method)
        # Alice's own ids do answer (the 404s above are about whose they are).
        for path in (f"{a}/mailboxes/{mine['mailbox']}/messages/{mine['message']}",
                     f"{a}/attachments/{mine['attachment']}", f"{a}/contacts/{mine['contact']}"):
            status, body = await self.call(path)
            self.assertEqual(status, 200, (path, body))

    async def test_bad_pages_sorts_ids_and_booleans_are_4xx(self) -> None:
        mine = await self.filled(self.alice.id, self.account.id)
        a = f"/v1/accounts/{mine['account']}"
        huge = 2 ** 63
        lists = [f"{a}/mailboxes", f"{a}/mailboxes/{mine['mailbox']}/messages",
                 f"{a}/messages/search?query=hi", f"{a}/attachments",
                 f"{a}/attachments_search?query=a", f"{a}/contacts"]
        paths = []
        for path in lists:
            join = "&" if "?" in path else "?"
            for bad in ("per_page=0", "per_page=41", "per_page=x", "per_page=-1",
                        "per_page=1.5", "page=0", "page=x", f"page={huge}",
                        "per_page=%EF%BC%91"):
                paths.append(f"{path}{join}{bad}")
            if "search" not in path:
                paths += [f"{path}{join}sort=nonsense", f"{path}{join}direction=up"]
        for template in ("/v1/accounts/{}", "/v1/accounts/{}/mailboxes",
                         f"{a}/mailboxes/{{}}/messages",
                         f"{a}/mailboxes/{mine['mailbox']}/messages/{{}}",
                         f"{a}/attachments/{{}}", f"{a}/contacts/{{}}"):
            paths += [template.format(huge), template.format(huge * 2 ** 64),
                      template.format(-1), template.format("x")]
        for path in paths:
            self.web.clock.advance(0.1)  # within the token's 20 requests a second
            status, body = await self.call(path)
            self.assertTrue(400 <= status < 500, (path, status, body))
            self.assertEqual(set(body), {"error", "error_description"}, path)
        for method, path in (("POST", "/v1/accounts"), ("PUT", a)):
            for field, value in (("ssl", "maybe"), ("ssl", 2), ("start_tls", []),
                                 ("start_tls", "yes please"), ("port", huge),
                                 ("port", True), ("protocol", "smtp")):
                json_body: dict[str, Any] = {"email": "x@example.test", "password": "p"} \
                    if method == "POST" else {}
                json_body[field] = value
                self.web.clock.advance(0.1)
                status, _, body = await self.web.call(
                    method, path, json=json_body,
                    headers={"Authorization": f"Bearer {self.token}"})
                self.assertEqual(status, 400, (method, field, value, body))
                self.assertEqual(set(body), {"error", "error_description"})
        account = await self.core.fetch.accounts.get(self.alice.id, self.account.id)
        self.assertEqual((account.port, account.use_ssl), (993, True))


def _ids(value: Any, key: str = "") -> list[int]:
    """Every integer of a reply that is an id: under "id", a key ending in "_id", or in
    "message_ids"."""
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _ids(v, k)]
    if isinstance(value, list):
        return [n for v in value for n in _ids(v, key)]
    if isinstance(value, int) and not isinstance(value, bool) and (
            key in ("id", "message_ids") or key.endswith("_id")):
        return [value]
    return []


class SafeIdTests(IndexBase):
    """Contact ids were the first 56 bits of the address's SHA-256, handed out as JSON
    numbers: a browser (a double, Number.MAX_SAFE_INTEGER = 2^53 - 1) read 7 in 8 of them
    rounded and asked for a contact that did not exist. Every id the API hands out fits
    2^53 - 1 now, and the ids handed out before still name their contacts."""

    def addresses(self) -> dict[str, str]:
        """Correspondents whose old ids are below 2^53, of 2^53 to 2^55, and above 2^55
        (where a double is a multiple of 8)."""
        found: dict[str, str] = {}
        for n in range(1000):
            address = f"c{n}@x.test"
            old = old_contact_id(address)
            kind = "low" if old < 2**53 else "mid" if old < 2**55 else "high"
            found.setdefault(kind, address)
            if len(found) == 3:
                return found
        raise AssertionError("no such addresses")

    async def walk(self) -> list[int]:
        """The ids of every reply of the account's read side, each list's items shown."""
        ids: list[int] = []

        async def get(path: str) -> Any:
            self.web.clock.advance(0.1)  # within the token's 20 requests a second
            status, body = await self.call(path)
            self.assertEqual(status, 200, (path, body))
            ids.extend(_ids(body))
            return body

        base = self.base
        await get("/v1/accounts")
        await get(base)
        for box in await get(f"{base}/mailboxes"):
            for m in await get(f"{base}/mailboxes/{box['id']}/messages"):
                await get(f"{base}/mailboxes/{box['id']}/messages/{m['id']}")
        await get(f"{base}/messages/search?query=hi")
        for a in (await get(f"{base}/attachments"))["attachments"]:
            await get(f"{base}/attachments/{a['id']}")
        await get(f"{base}/attachments_search?query=pdf")
        for c in (await get(f"{base}/contacts?per_page=40"))["contacts"]:
            await get(f"{base}/contacts/{c['id']}")
        for kind in ("migrates", "restores"):
            for job in await get(f"{base}/{kind}"):
                await get(f"{base}/{kind}/{job['id']}")
        return ids

    async def test_every_id_handed_out_fits_a_double_and_old_ids_still_work(self) -> None:
        addresses = self.addresses()
        folder = await self.core.db.run(
            "folder", lambda conn: thd_folder(conn, self.account.id, "INBOX").id)
        where = Location(self.alice.id, self.account.id, folder, "INBOX")
        stored = await self.core.messages.store_batch(where, [
            FetchedMessage(mail(f"C <{address}>", "hi", attachment(
                "a.pdf", "application/pdf", PDF) + "--b--\n"), uid=n)
            for n, address in enumerate(addresses.values(), 1)])
        now = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)

        def jobs(conn: Any) -> None:
            for kind in ("restore", "migrate"):
                job = thd_create_job(conn, dict(
                    kind=kind, user_id=self.alice.id, account_id=self.account.id,
                    status="done", email="a@x.test", host="imap.x.test", port=993,
                    created_at=now, updated_at=now))
                conn.execute(insert(mailbox_job_items), [
                    dict(job_id=job, message_row_id=m, state="done") for m in stored.created])

        await self.core.db.run("jobs", jobs)
        ids = await self.walk()
        self.assertGreater(len(ids), 40)
        self.assertEqual([n for n in ids if not 0 <= n <= 2**53 - 1], [])

        status, page = await self.call(f"{self.base}/contacts?sort=email")
        shown = {c["email"]: c["id"] for c in page["contacts"]}
        low, high = addresses["low"], addresses["high"]
        self.assertEqual(shown[low], old_contact_id(low))  # an old id below 2^53 stands
        # Old ids above 2^53, as a client kept them: exact, as the double it read (its
        # value, and the fewest digits that read back as it, as JavaScript writes it).
        for address in (addresses["mid"], high):
            old = old_contact_id(address)
            double = float(old)
            for kept in (old, int(double), int(decimal.Decimal(repr(double)))):
                status, card = await self.call(f"{self.base}/contacts/{kept}")
                self.assertEqual((status, card.get("id"), card.get("filename")),
                                 (200, shown[address], f"{address}.vcf"), (address, kept))
        # Near an old id (within what rounding gives) but no contact's: none.
        status, _ = await self.call(f"{self.base}/contacts/{old_contact_id(high) + 16}")
        self.assertEqual(status, 404)


class SafeIdPostgreSQLTests(SafeIdTests):
    postgres = True
    timeout = 240

"""safedrop files: uploads written to disk by content hash, within their limits; nothing of
a failed upload stays (no file, no temp file, no row); the files of a drop gone in a crash
before they were deleted are taken by the next sweep, and an expiry a crash cut off still
sends its summary."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.safedrop import access as safedrop_side
from mailcore.safedrop import store as safedrop_store
from mailcore.safedrop.model import DropError, SafedropSettings, TooLarge, bundle_full
from mailcore.store.schema import drop_files
from mailcore.uploads import encoded_bound
from tests.support.web import Web, make_core
from tests.test_web_safedrop_api import MULTIPART, SafedropFixture, multipart_file
from web.limits import BodyLimits
from web.root import MailcoreSite, build_root
from web.safedrop import UPLOAD_OVERHEAD, UPLOAD_PATH
from web.settings import WebSettings


def disposition_part(disposition: str) -> bytes:
    """A multipart body of one part, "hello", whose Content-Disposition is form-data with
    `disposition` (the boundary of MULTIPART)."""
    return (f"--def46f21fc67\r\ncontent-disposition: form-data; {disposition}\r\n"
            "Content-Type: text/plain\r\n\r\nhello\r\n--def46f21fc67--\r\n").encode()

class _NeverCommits:
    """A spool whose commit never comes: the process is killed before it does."""

    async def accept(self, *args: Any, **kwargs: Any) -> None:
        await defer.Deferred()


class _Recording:
    """The spool, recording the messages it committed."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        self.messages: list[bytes] = []

    async def accept(self, queue_id: str, envelope: Any, data: bytes, **kwargs: Any) -> None:
        await self.spool.accept(queue_id, envelope, data, **kwargs)
        self.messages.append(data)


class FileFixture(SafedropFixture):
    async def start_with(self, test: TestCase, **safedrop: Any) -> None:
        data_dir = Path(test.mktemp())
        config = Config(data_dir=data_dir, session_token_ttl=3600, http_max_body=200_000,
                        sections={"safedrop": safedrop})
        self.web = Web.build(config)
        self.data_dir = data_dir
        self.alice = await self.web.user("alice")
        self.key = await self.web.credential(self.alice)
        self.token = await self.login("alice@example.test", self.key)

    async def upload(self, bundle_id: int, body: bytes,
                     headers: dict[str, str] | None = None) -> tuple[int, Any]:
        status, _, reply = await self.call(
            "POST", f"/dropbundles/{bundle_id}/dropfiles", body, headers or MULTIPART
        )
        return status, reply

    async def sent_bundle(self, test: TestCase, query: str) -> int:
        """A bundle made with `query`, a file uploaded, ann@example.org added and sent."""
        bundle_id = await self.bundle(query)
        status, _ = await self.upload(bundle_id, multipart_file("a", b"%d" % bundle_id))
        test.assertEqual(status, 200)
        status, _ = await self.form("POST", f"/dropbundles/{bundle_id}/dropbundlerecipients",
                                    "email=ann%40example.org")
        test.assertEqual(status, 200)
        status, _, _ = await self.call("GET", f"/dropbundles/{bundle_id}?send")
        test.assertEqual(status, 200)
        return bundle_id

    def stored(self) -> list[Path]:
        root = self.data_dir / "safedrop"
        return sorted(p for p in root.rglob("*") if p.is_file())

    def file_rows(self) -> list[Any]:
        result: list[Any] = []
        self.web.core.db.read(
            "rows", lambda c: list(c.execute(sa.select(drop_files)))
        ).addCallback(result.extend)
        return result


class UploadTests(TestCase):
    async def test_a_file_is_stored_by_content_hash_with_its_exact_bytes(self) -> None:
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()
        data = os.urandom(300_000) + b"\r\n--def46f21fc6 almost a boundary\r\n"
        status, reply = await f.upload(bundle_id, multipart_file("C:\\tmp\\report.bin", data))
        self.assertEqual(status, 200, reply)  # above [web] max_body: uploads have their own
        self.assertEqual(reply["the_file"], "report.bin")
        digest = hashlib.sha256(data).hexdigest()
        path = f.data_dir / "safedrop" / str(bundle_id) / digest
        self.assertEqual(f.stored(), [path])
        self.assertEqual(path.read_bytes(), data)
        self.assertEqual(path.stat().st_mode & 0o077, 0)
        row = f.file_rows()[0]
        self.assertEqual((row.size, row.sha256, row.name), (len(data), digest, "report.bin"))
        # The same bytes again: a second file of the bundle, one copy on disk.
        status, again = await f.upload(bundle_id, multipart_file("copy.bin", data))
        self.assertEqual(status, 200)
        self.assertNotEqual(again["id"], reply["id"])
        self.assertEqual(f.stored(), [path])

    async def test_a_file_over_max_file_size_is_413_and_leaves_nothing(self) -> None:
        f = FileFixture()
        await f.start_with(self, max_file_size=1000)
        bundle_id = await f.bundle()
        status, reply = await f.upload(bundle_id, multipart_file("big.bin", b"x" * 1001))
        self.assertEqual(status, 413)
        self.assertEqual(list(reply["errors"]), ["the_file"])
        status, _ = await f.upload(bundle_id, multipart_file("ok.bin", b"x" * 1000))
        self.assertEqual(status, 200)
        self.assertEqual([r.size for r in f.file_rows()], [1000])
        self.assertEqual(len(f.stored()), 1)

    async def test_the_bundle_total_is_bounded(self) -> None:
        f = FileFixture()
        await f.start_with(self, max_bundle_size=150)
        bundle_id = await f.bundle()
        status, _ = await f.upload(bundle_id, multipart_file("a", b"a" * 100))
        self.assertEqual(status, 200)
        status, reply = await f.upload(bundle_id, multipart_file("b", b"b" * 51))
        self.assertEqual(status, 413, reply)
        self.assertEqual([r.name for r in f.file_rows()], ["a"])
        self.assertEqual(len(f.stored()), 1)
        other = await f.bundle()  # the limit is per bundle
        status, _ = await f.upload(other, multipart_file("b", b"b" * 51))
        self.assertEqual(status, 200)

    async def test_an_upload_losing_the_race_for_a_bundles_room_is_a_413(self) -> None:
        """An upload that fit the room it read, when another took the room before its row
        was written, is refused in its transaction with the 413 a lone upload gets (it was
        a 400 with other words)."""
        f = FileFixture()
        await f.start_with(self, max_bundle_size=150)
        bundle_id = await f.bundle()
        status, _ = await f.upload(bundle_id, multipart_file("a", b"a" * 100))
        self.assertEqual(status, 200)
        values = {"name": "b", "content_type": "application/octet-stream", "size": 51,
                  "sha256": "0" * 64, "created_at": datetime.now(UTC)}
        with self.assertRaises(TooLarge) as raised:
            await f.web.core.db.run("t", safedrop_store.add_file_txn, f.alice.id, bundle_id,
                                    values, 150, 10**12, 1000)
        self.assertEqual(raised.exception.args, bundle_full().args)
        self.assertEqual(len(f.file_rows()), 1)

    async def test_a_users_files_in_all_are_bounded(self) -> None:
        f = FileFixture()
        await f.start_with(self, max_user_size=150)
        first = await f.bundle()
        status, _ = await f.upload(first, multipart_file("a", b"a" * 100))
        self.assertEqual(status, 200)
        other = await f.bundle()  # another bundle: the same user's room
        status, reply = await f.upload(other, multipart_file("b", b"b" * 51))
        self.assertEqual(status, 413, reply)
        self.assertIn("may not exceed 150 bytes in all", str(reply))
        status, _ = await f.upload(other, multipart_file("b", b"b" * 50))
        self.assertEqual(status, 200)
        status, reply = await f.upload(other, multipart_file("c", b"c"))  # full: not read
        self.assertEqual(status, 413, reply)
        self.assertEqual(sorted(r.name for r in f.file_rows()), ["a", "b"])
        self.assertEqual(len(f.stored()), 2)

    async def test_a_bundle_has_at_most_max_files(self) -> None:
        """Empty files, or copies of one file's bytes, take no room, yet every mail of the
        bundle's send lists each of them (300 empty files made mails of 80 KB each, and
        nothing bounded their number): [safedrop] max_files bounds it, before the body is
        stored and again in the transaction that records the file."""
        self.assertEqual(SafedropSettings().max_files, 1000)
        f = FileFixture()
        await f.start_with(self, max_files=2)
        bundle_id = await f.bundle()
        for name in ("a", "b"):
            status, _ = await f.upload(bundle_id, multipart_file(name, b""))
            self.assertEqual(status, 200)
        status, reply = await f.upload(bundle_id, multipart_file("c", b"c"))
        self.assertEqual(status, 400, reply)
        self.assertEqual(reply["errors"], {"the_file": ["A drop may have at most 2 files."]})
        self.assertEqual(sorted(r.name for r in f.file_rows()), ["a", "b"])
        self.assertEqual(len(f.stored()), 1)  # the one empty file's bytes, not c's
        values = {"name": "d", "content_type": "application/octet-stream", "size": 0,
                  "sha256": "0" * 64, "created_at": datetime.now(UTC)}
        with self.assertRaises(DropError):
            await f.web.core.db.run("t", safedrop_store.add_file_txn, f.alice.id, bundle_id,
                                    values, 10**12, 10**12, 2)
        other = await f.bundle()  # the limit is per bundle
        status, _ = await f.upload(other, multipart_file("c", b"c"))
        self.assertEqual(status, 200)

    async def test_bundles_never_sent_are_deleted_once_expired_or_old(self) -> None:
        f = FileFixture()
        await f.start_with(self, unsent_max_age=86400)
        drops = f.web.core.safedrop
        # START is 2023-11-14T22:13:20Z.
        expired = await f.bundle("subject=x&expiry_date=2023-11-14T23%3A00%3A00Z")
        young = await f.bundle("subject=y")
        for bundle_id in (expired, young):
            status, _ = await f.upload(bundle_id, multipart_file("a", b"%d" % bundle_id))
            self.assertEqual(status, 200)
        sent = await f.sent_bundle(self, "subject=z&expiry_date=2023-11-14T23%3A00%3A00Z")
        f.web.clock.advance(3600)  # past the expiry date
        self.assertEqual(await drops.sweep(), 2)  # the unsent one deleted, the sent one's files
        f.token = await f.login("alice@example.test", f.key)  # an hour: a new session
        status, _, _ = await f.call("GET", f"/dropbundles/{expired}")
        self.assertEqual(status, 404)
        self.assertEqual([p.parent.name for p in f.stored()], [str(young)])
        f.web.clock.advance(86400 - 3600 - 1)
        self.assertEqual(await drops.sweep(), 0)
        f.web.clock.advance(1)  # a day after it was made, never sent
        self.assertEqual(await drops.sweep(), 1)
        self.assertEqual(f.stored(), [])
        f.token = await f.login("alice@example.test", f.key)
        status, _, _ = await f.call("GET", f"/dropbundles/{young}")
        self.assertEqual(status, 404)
        status, _, _ = await f.call("GET", f"/dropbundles/{sent}")  # sent: kept, as it was
        self.assertEqual(status, 200)

    async def test_an_expiry_cut_off_by_a_crash_still_sends_its_summary(self) -> None:
        # The process dies during the sweep of an expired drop, before the spool committed
        # the summary to its sender: the next sweep sends it (the drop was not marked
        # removed without it), and removes the files.
        f = FileFixture()
        await f.start_with(self)
        drops = f.web.core.safedrop
        await f.sent_bundle(self, "subject=z&expiry_date=2023-11-14T23%3A00%3A00Z")
        f.web.clock.advance(3600)  # past the expiry date
        spool = drops.spool
        drops.spool = _NeverCommits()  # type: ignore[assignment]
        cut_off = defer.Deferred.fromCoroutine(drops.sweep())
        self.assertNoResult(cut_off)
        recorder = _Recording(spool)
        drops.spool = recorder  # type: ignore[assignment]  # the next start
        self.assertEqual(await drops.sweep(), 1)
        [summary] = recorder.messages
        self.assertIn(b"Subject: Safedrop expired", summary)
        self.assertEqual(f.stored(), [])
        self.assertEqual(await drops.sweep(), 0)
        self.assertEqual(len(recorder.messages), 1)

    async def test_files_a_crash_left_behind_are_removed_by_the_sweep(self) -> None:
        # The process dies right after committing that a drop's files are removed (read
        # and removed, or expired) or that a bundle never sent is deleted, before it
        # deleted the files: the next sweep takes them.
        f = FileFixture()
        await f.start_with(self)
        drops = f.web.core.safedrop
        removed, deleted, kept, newest = [await f.bundle() for _ in range(4)]
        for bundle_id in (removed, deleted, kept, newest):
            status, _ = await f.upload(bundle_id, multipart_file("a", b"%d" % bundle_id))
            self.assertEqual(status, 200)
        db = f.web.core.db
        self.assertTrue(await db.run("crash", safedrop_side.mark_removed_txn, removed,
                                     datetime(2023, 11, 15, tzinfo=UTC)))
        self.assertTrue(await db.run("crash", safedrop_side.delete_unsent_bundle_txn, deleted))
        self.assertEqual(len(f.stored()), 4)
        self.assertEqual(await drops.sweep(), 0)  # no bundle went now
        self.assertEqual([p.parent.name for p in f.stored()], [str(kept), str(newest)])
        status, _, _ = await f.call("GET", f"/dropbundles/{kept}/dropfiles")
        self.assertEqual(status, 200)

    async def test_a_file_name_in_rfc_5987_notation_is_read(self) -> None:
        # urllib3 1.x (requests) names a file that is not ASCII `filename*=utf-8''...`; the
        # Mail API's uploads read it, safedrop's said "The part carries no file name."
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()

        def part(disposition: str) -> bytes:
            return (f"--def46f21fc67\r\ncontent-disposition: form-data; name=\"the_file\"; "
                    f"{disposition}\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
                    "--def46f21fc67--\r\n").encode()

        status, reply = await f.upload(bundle_id, part("filename*=utf-8''r%C3%A9sum%C3%A9.txt"))
        self.assertEqual((status, reply["the_file"]), (200, "r\u00e9sum\u00e9.txt"))
        status, _, shown = await f.call("GET", f"/dropbundles/{bundle_id}/dropfiles")
        self.assertEqual([d["the_file"] for d in shown], ["r\u00e9sum\u00e9.txt"])
        # Its last path component only, as a plain `filename`.
        status, reply = await f.upload(bundle_id, part("filename*=utf-8''..%2F..%2Fpasswd"))
        self.assertEqual((status, reply["the_file"]), (200, "passwd"))
        status, reply = await f.upload(bundle_id, part("filename*=utf-8''..%2F.."))
        self.assertEqual((status, reply["errors"]), (400, {"the_file": ["The file has no name."]}))
        self.assertEqual(len(f.file_rows()), 2)

    async def test_a_file_name_given_twice_with_other_values_is_refused(self) -> None:
        # `filename="report.pdf"; filename="run.exe"`: the multipart parser kept the last
        # (stored as run.exe, 200) where the email package, and so a proxy or scanner
        # reading the part with it, takes the first. A 400, nothing stored; the same name
        # twice (quoted or not) is taken.
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()

        for disposition in ('name="the_file"; filename="report.pdf"; filename="run.exe"',
                            'name="the_file"; filename=a.txt; FILENAME="b.txt"',
                            'name="other"; name="the_file"; filename="a.txt"',
                            # A key the parser does not take (a `.`, a tab before the
                            # value) hid `; filename=run.exe` in its quoted value: the
                            # parser skipped it and read run.exe, the email package a.pdf.
                            'name="the_file"; filename="a.pdf"; x.y="; filename=run.exe"',
                            'name="the_file"; filename="a.pdf"; x=\t"; filename=run.exe"',
                            'name="the_file"; x.y="; filename=run.exe"'):
            status, reply = await f.upload(bundle_id, disposition_part(disposition))
            self.assertEqual(status, 400, (disposition, reply))
            self.assertRegex(reply["error"], "more than once, with different values"
                             "|in a way that parsers read differently")
        self.assertEqual((f.file_rows(), f.stored()), ([], []))
        status, reply = await f.upload(
            bundle_id, disposition_part('name="the_file"; filename="a.txt"; filename=a.txt'))
        self.assertEqual((status, reply["the_file"]), (200, "a.txt"))

    async def test_filename_star_names_the_file_when_both_are_given(self) -> None:
        # `filename="run.exe"; filename*=UTF-8''a.pdf` was stored as run.exe, where RFC 6266
        # 4.3 has a recipient pick filename* (browsers, and a proxy or scanner reading it
        # so, saw a.pdf). .NET's MultipartFormDataContent sends both for a name that is not
        # ASCII, the plain one as an RFC 2047 word, which was stored as the name.
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()

        for disposition, stored in (
                ('name="the_file"; filename="run.exe"; filename*=UTF-8\'\'a.pdf', "a.pdf"),
                ("name=\"the_file\"; filename*=UTF-8''a.pdf; filename=\"run.exe\"", "a.pdf"),
                ('name="the_file"; filename="=?utf-8?B?csOpc3Vtw6kucGRm?="; '
                 "filename*=utf-8''r%C3%A9sum%C3%A9.pdf", "r\u00e9sum\u00e9.pdf"),
                # A quoted value merely spelling filename* is a plain name.
                ('name="the_file"; filename="filename*=x.txt"', "filename*=x.txt")):
            status, reply = await f.upload(bundle_id, disposition_part(disposition))
            self.assertEqual((status, reply.get("the_file")), (200, stored), disposition)

    async def test_filename_star_is_found_whatever_its_case(self) -> None:
        # Parameter names are case-insensitive (RFC 6266 4.1, RFC 9110 5.6.6), as browsers
        # and the multipart parser read them: `Filename*=` beside filename="run.exe" was
        # stored as run.exe (a proxy or scanner in front saw a.pdf), and `FILENAME*=` alone
        # made the part no file at all.
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()

        for disposition in ('name="the_file"; filename="run.exe"; Filename*=UTF-8\'\'a.pdf',
                            "name=\"the_file\"; FILENAME*=UTF-8''a.pdf; filename=\"run.exe\"",
                            "name=\"the_file\"; FILENAME*=UTF-8''a.pdf"):
            status, reply = await f.upload(bundle_id, disposition_part(disposition))
            self.assertEqual((status, reply.get("the_file")), (200, "a.pdf"), disposition)

    async def test_a_transfer_encoded_file_is_stored_decoded(self) -> None:
        # A part with Content-Transfer-Encoding (RFC 7578 4.7 says not to; some clients
        # do): its base64 text was stored as the file, with that size and hash, as the
        # Mail API's uploads did before c2efea7. The limits count the decoded bytes.
        f = FileFixture()
        await f.start_with(self, max_file_size=10_240)
        bundle_id = await f.bundle()

        def part(cte: bytes, data: bytes, name: bytes = b"b.bin") -> bytes:
            return (b'--def46f21fc67\r\ncontent-disposition: form-data; name="the_file"; '
                    b'filename="' + name + b'"\r\nContent-Transfer-Encoding: ' + cte
                    + b"\r\n\r\n" + data + b"\r\n--def46f21fc67--\r\n")

        payload = bytes(range(256)) * 40  # 10,240 bytes: 13,840 as base64
        encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        status, reply = await f.upload(bundle_id, part(b"BASE64", encoded))
        self.assertEqual(status, 200, reply)
        digest = hashlib.sha256(payload).hexdigest()
        path = f.data_dir / "safedrop" / str(bundle_id) / digest
        self.assertEqual(path.read_bytes(), payload)
        self.assertEqual((f.file_rows()[0].size, f.file_rows()[0].sha256),
                         (len(payload), digest))
        status, reply = await f.upload(bundle_id, part(
            b"quoted-printable", b"caf=C3=A9 =\r\nsoft", b"q.txt"))
        self.assertEqual(status, 200, reply)
        qp = f.data_dir / "safedrop" / str(bundle_id) / hashlib.sha256(
            "caf\u00e9 soft".encode()).hexdigest()
        self.assertEqual(qp.read_bytes(), "caf\u00e9 soft".encode())
        status, reply = await f.upload(bundle_id, part(
            b"base64", base64.encodebytes(payload + b"x")))
        self.assertEqual((status, list(reply["errors"])), (413, ["the_file"]))
        for cte, data, message in [
            (b"base64", b"not*base64", "The value is not valid base64."),
            (b"x-uuencode", b"begin 644 a", "Content-Transfer-Encoding 'x-uuencode' is "
             "not supported."),
        ]:
            self.assertEqual(await f.upload(bundle_id, part(cte, data)),
                             (400, {"error": message}))
        self.assertEqual(len(f.file_rows()), 2)
        self.assertEqual(f.stored(), sorted([path, qp]))

    async def test_a_cut_off_or_malformed_upload_leaves_no_file_and_no_row(self) -> None:
        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()
        whole = multipart_file("half.bin", b"y" * 50_000)
        two = multipart_file("one", b"1")[: -len(b"--def46f21fc67--\r\n")] + (
            b"--def46f21fc67\r\ncontent-disposition: form-data; name=\"the_file\"; "
            b"filename=\"two\"\r\n\r\n2\r\n--def46f21fc67--\r\n")
        for body, headers, field in [
            (whole[: len(whole) // 2], None, None),  # cut off halfway
            (whole[:-4], None, None),  # no closing boundary
            (multipart_file("x", b"1", field="file"), None, "file"),
            (two, None, "the_file"),
            (b"--def46f21fc67\r\ncontent-disposition: form-data; name=\"the_file\"\r\n\r\n1\r\n"
             b"--def46f21fc67--\r\n", None, "the_file"),
            (b"the_file=abc", {"Content-Type": "application/x-www-form-urlencoded"},
             "the_file"),
            (whole, {"Content-Type": "multipart/form-data"}, None),  # no boundary
        ]:
            status, reply = await f.upload(bundle_id, body, headers)
            self.assertEqual(status, 400, (body[:80], reply))
            if field:
                self.assertEqual(list(reply["errors"]), [field], reply)
        self.assertEqual(f.file_rows(), [])
        self.assertEqual(f.stored(), [])


class BodyLimitTests(TestCase):
    def test_only_upload_paths_get_the_upload_limit(self) -> None:
        limits = BodyLimits(100, ((UPLOAD_PATH, 5000),))
        self.assertEqual(limits.for_path(b"/dropbundles/12/dropfiles"), 5000)
        self.assertEqual(limits.for_path(b"/dropbundles/12/dropfiles/?x=1"), 5000)
        for path in (b"/dropbundles", b"/dropbundles/12", b"/dropbundles/12/dropfiles/3",
                     b"/api/v1/mail/", b"/x/dropbundles/1/dropfiles"):
            self.assertEqual(limits.for_path(path), 100, path)
        self.assertTrue(re.fullmatch(UPLOAD_PATH, "/dropbundles/1/dropfiles"))


class ChannelLimitTests(TestCase):
    """The real channel reads an upload path's body up to its own limit, not [web]'s."""

    def setUp(self) -> None:
        core, _ = make_core(Config(http_max_body=10_000, data_dir=Path(self.mktemp()),
                                   sections={"safedrop": {"max_file_size": 50_000}}))
        self.clock = Clock()
        settings = WebSettings(max_body=10_000)
        self.site = MailcoreSite(build_root(core, settings), settings, self.clock)
        # Limits only: who may send an upload's body is the upload gate's (test_web_upload_gate).
        self.site.upload_gate = None
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def tearDown(self) -> None:
        self.channel.connectionLost(None)

    def post(self, path: bytes, length: int) -> bytes:
        self.channel.dataReceived(
            b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
        )
        return bytes(self.transport.value())

    def test_an_upload_within_its_own_limit_is_read(self) -> None:
        # max_file_size as base64 would send it (the limit counts the file's own bytes).
        self.assertEqual(self.post(b"/dropbundles/1/dropfiles",
                                   encoded_bound(50_000) + UPLOAD_OVERHEAD), b"")

    def test_an_upload_over_its_limit_is_refused_at_once(self) -> None:
        sent = self.post(b"/dropbundles/1/dropfiles",
                         encoded_bound(50_000) + UPLOAD_OVERHEAD + 1)
        self.assertTrue(sent.startswith(b"HTTP/1.1 413 "), sent[:60])

    def test_other_paths_keep_the_web_limit(self) -> None:
        sent = self.post(b"/dropbundles/1/dropbundlerecipients", 40_000)
        self.assertTrue(sent.startswith(b"HTTP/1.1 413 "), sent[:60])


class _HeldPool:
    """A runner whose work runs only when the test says so (to cancel in between)."""

    def __init__(self) -> None:
        self.held: list[tuple[Any, tuple[Any, ...], Any]] = []

    def run(self, fn: Any, *args: Any) -> Any:
        from twisted.internet import defer

        d: Any = defer.Deferred()
        self.held.append((fn, args, d))
        return d

    def release(self) -> None:
        while self.held:
            fn, args, d = self.held.pop(0)
            d.callback(fn(*args))


class CancelledUploadTests(TestCase):
    async def test_a_client_gone_while_storing_leaves_neither_file_nor_row(self) -> None:
        """The client goes away (or [web] reply_timeout passes) while its file is stored:
        the row's write, not begun, never begins, and the file is taken back; the client's
        retry stores one file and one row (before, the upload stored its row after its
        client was told it failed)."""
        import io

        from twisted.internet import defer

        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()
        drops = f.web.core.safedrop
        pool = _HeldPool()
        drops.io = pool  # type: ignore[assignment]
        body = multipart_file("late.bin", b"z" * 5000)
        d = defer.Deferred.fromCoroutine(drops.add_file(
            f.alice.id, bundle_id, MULTIPART["Content-Type"], io.BytesIO(body)))
        d.cancel()  # what Klein does when the client goes away
        failures: list[Any] = []
        d.addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        pool.release()
        self.assertEqual(f.file_rows(), [])
        self.assertEqual(f.stored(), [])
        retried = defer.Deferred.fromCoroutine(drops.add_file(
            f.alice.id, bundle_id, MULTIPART["Content-Type"], io.BytesIO(body)))
        pool.release()
        self.successResultOf(retried)
        rows = f.file_rows()
        self.assertEqual([r.name for r in rows], ["late.bin"])
        self.assertEqual([p.name for p in f.stored()], [rows[0].sha256])


class FailedUploadTakeBackTests(TestCase):
    async def test_a_failed_upload_never_removes_the_same_bytes_another_upload_stored(
            self) -> None:
        """Two uploads of the same bytes to one bundle write one file. The one whose row
        could not be written (here a database error) removed the file when no row named
        it yet, and the other's row, committed just after, then named a file that was gone:
        its upload was answered 200 and its download found nothing. Only the upload that
        made the file, and only while the file is still the one it wrote, takes it back."""
        import io

        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()
        drops = f.web.core.safedrop
        pool = _HeldPool()
        drops.io = pool  # type: ignore[assignment]
        data = b"the same bytes" * 100
        body = multipart_file("same.bin", data)
        real = safedrop_store.add_file_txn
        calls = [0]

        def fails_first(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("the database went away")
            return real(*args, **kwargs)

        self.patch(safedrop_store, "add_file_txn", fails_first)
        first = defer.Deferred.fromCoroutine(drops.add_file(
            f.alice.id, bundle_id, MULTIPART["Content-Type"], io.BytesIO(body)))
        second = defer.Deferred.fromCoroutine(drops.add_file(
            f.alice.id, bundle_id, MULTIPART["Content-Type"], io.BytesIO(body)))
        failures: list[Any] = []
        first.addErrback(failures.append)
        done: list[Any] = []
        second.addCallback(done.append)
        # The first upload's file is written, its row fails; the second's file is written
        # and its row committed; then the first takes its file back.
        pool.release()
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(done), 1)
        rows = f.file_rows()
        self.assertEqual([r.name for r in rows], ["same.bin"])
        path = f.data_dir / "safedrop" / str(bundle_id) / rows[0].sha256
        self.assertEqual(path.read_bytes(), data)

    async def test_a_failed_upload_alone_leaves_no_file(self) -> None:
        import io

        f = FileFixture()
        await f.start_with(self)
        bundle_id = await f.bundle()

        def fails(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the database went away")

        self.patch(safedrop_store, "add_file_txn", fails)
        with self.assertRaises(RuntimeError):
            await f.web.core.safedrop.add_file(
                f.alice.id, bundle_id, MULTIPART["Content-Type"],
                io.BytesIO(multipart_file("gone.bin", b"x" * 50)))
        self.assertEqual(f.stored(), [])
        self.assertEqual(f.file_rows(), [])

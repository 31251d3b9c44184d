"""The built-in checks: GTUBE, EICAR (plain, encoded, zipped), zip bombs, dangerous
attachments, MIME limits and the BuiltinFilter's use of the CPU pool."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from filters.archive import ZipEntry, ZipLimits, declared_entries, inspect_zip
from filters.builtin import (
    DANGEROUS_NAME,
    DEFAULT_INLINE_MAX,
    EICAR,
    EICAR_NAME,
    ENCRYPTED_ZIP_NAME,
    GTUBE,
    LIMITS_NAME,
    ZIP_BOMB_NAME,
    BuiltinFilter,
    BuiltinSettings,
    analyse,
    executable_kind,
    extension,
)
from filters.interface import NotInline, Verdict
from filters.mime import MimeLimits
from mailcore.workers import CpuPool
from tests.support.filterd import (
    attachment,
    message,
    multipart,
    multipart_body,
    text_part,
    zip_bytes,
)

SETTINGS = BuiltinSettings()


def scan(data: bytes, settings: BuiltinSettings = SETTINGS) -> Verdict:
    return analyse(data, settings)


def minimal_pe() -> bytes:
    """The first bytes of a Windows PE file: MZ header pointing at a PE signature."""
    header = bytearray(b"MZ" + b"\0" * 0x3A + struct.pack("<I", 0x80))
    header += b"\0" * (0x80 - len(header)) + b"PE\0\0" + b"\0" * 64
    return bytes(header)


def nested_zip(depth: int, payload: dict[str, bytes]) -> bytes:
    data = zip_bytes(payload)
    for level in range(depth - 1):
        data = zip_bytes({f"level{level}.zip": data})
    return data


class Unseekable:
    """A stream zipfile cannot seek back in, so that it writes data descriptors."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def deflated_zeros_zip(entries: int, shared: bool = False) -> bytes:
    """A zip of `entries` entries 'a0', 'a1'... of one MiB of zeros, deflated to 1 KiB
    each: each with its own local data, or (`shared`) entries all named 'a' and naming
    the same local data (the overlapping-entries bomb, 6 KB for 100 MB with 99 entries)."""
    zeros = bytes(1024 * 1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(zeros) + compressor.flush()
    crc = zlib.crc32(zeros)
    files = b""
    directory = b""
    for i in range(entries):
        name = b"a" if shared else f"a{i}".encode()
        offset = 0 if shared else len(files)
        if not shared or i == 0:
            files += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc,
                                 len(deflated), len(zeros), len(name), 0) + name + deflated
        directory += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc,
                                 len(deflated), len(zeros), len(name), 0, 0, 0, 0, 0,
                                 offset) + name
    return files + directory + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, entries,
                                           entries, len(directory), len(files), 0)


class CleanMessageTests(TestCase):
    def test_clean_message_has_no_findings(self) -> None:
        verdict = scan(message())
        self.assertFalse(verdict.spam)
        self.assertEqual(verdict.viruses, ())
        self.assertEqual(verdict.symbols, ())
        self.assertEqual(verdict.score, 0.0)
        self.assertEqual(verdict.filter, "builtin")

    def test_clean_zip_and_pdf_attachments_are_fine(self) -> None:
        data = multipart([
            text_part(),
            attachment("report.pdf", b"%PDF-1.4 not really", "application/pdf"),
            attachment("photos.zip", zip_bytes({"a.jpg": b"\xff\xd8\xff" + b"x" * 5000}),
                       "application/zip"),
        ])
        verdict = scan(data)
        self.assertTrue(verdict.clean, verdict.reasons)
        self.assertEqual(verdict.symbols, ())


class GtubeTests(TestCase):
    def test_gtube_in_body_is_spam_with_1000_points(self) -> None:
        verdict = scan(message(b"test\r\n" + GTUBE + b"\r\n"))
        self.assertTrue(verdict.spam)
        self.assertEqual(verdict.symbol_names, ("GTUBE",))
        self.assertEqual(verdict.score, 1000.0)

    def test_gtube_in_base64_text_part_is_found(self) -> None:
        part = ([("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "base64")],
                base64.encodebytes(b"hello " + GTUBE))
        verdict = scan(multipart([part]))
        self.assertIn("GTUBE", verdict.symbol_names)
        self.assertTrue(verdict.spam)

    def test_gtube_check_can_be_turned_off(self) -> None:
        verdict = scan(message(GTUBE), BuiltinSettings(gtube=False))
        self.assertFalse(verdict.spam)

    def test_a_near_miss_is_not_gtube(self) -> None:
        verdict = scan(message(GTUBE[:-1] + b"Y"))
        self.assertNotIn("GTUBE", verdict.symbol_names)


class EicarTests(TestCase):
    def test_eicar_is_68_bytes(self) -> None:
        self.assertEqual(len(EICAR), 68)

    def test_plain_eicar_body_is_a_virus(self) -> None:
        verdict = scan(message(EICAR))
        self.assertEqual(verdict.viruses, (EICAR_NAME,))
        self.assertTrue(verdict.virus)

    def test_eicar_in_base64_attachment(self) -> None:
        verdict = scan(multipart([text_part(), attachment("eicar.com.txt", EICAR)]))
        self.assertIn(EICAR_NAME, verdict.viruses)
        self.assertTrue(any("eicar.com.txt" in r for r in verdict.reasons), verdict.reasons)

    def test_eicar_in_base64_with_junk_and_bad_padding(self) -> None:
        encoded = base64.b64encode(EICAR).rstrip(b"=")
        mangled = b"\r\n".join(encoded[i:i + 7] for i in range(0, len(encoded), 7)) + b"!!"
        part = ([("Content-Type", "application/octet-stream"),
                 ("Content-Transfer-Encoding", "BASE64")], mangled)
        self.assertIn(EICAR_NAME, scan(multipart([part])).viruses)

    def test_eicar_hidden_after_premature_base64_padding(self) -> None:
        part = ([("Content-Type", "application/octet-stream"),
                 ("Content-Transfer-Encoding", "base64")],
                b"QQ==\r\n" + base64.encodebytes(EICAR))
        self.assertIn(EICAR_NAME, scan(multipart([part])).viruses)

    def test_eicar_in_quoted_printable_part(self) -> None:
        # "$" written as =24 and a soft line break in the middle, as a mailer might.
        encoded = EICAR.replace(b"$", b"=24")
        encoded = encoded[:30] + b"=\r\n" + encoded[30:]
        self.assertEqual(binascii.a2b_qp(encoded), EICAR)
        self.assertNotIn(EICAR, encoded)
        part = ([("Content-Type", "text/plain"),
                 ("Content-Transfer-Encoding", "quoted-printable")], encoded)
        self.assertIn(EICAR_NAME, scan(multipart([part])).viruses)

    def test_eicar_in_zip_attachment(self) -> None:
        data = multipart([attachment("files.zip", zip_bytes({"docs/eicar.com": EICAR}))])
        verdict = scan(data)
        self.assertIn(EICAR_NAME, verdict.viruses)
        self.assertTrue(any("files.zip/docs/eicar.com" in r for r in verdict.reasons))

    def test_eicar_in_zip_inside_zip_inside_forwarded_message(self) -> None:
        inner = multipart_body([attachment("x.zip", nested_zip(2, {"e.txt": EICAR}))], "in")
        forwarded = (b"From: c@example.net\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
                     b'Content-Type: multipart/mixed; boundary="in"\r\n\r\n' + inner)
        part = ([("Content-Type", "message/rfc822")], forwarded)
        verdict = scan(multipart([text_part(), part]))
        self.assertIn(EICAR_NAME, verdict.viruses)

    def test_eicar_check_can_be_turned_off(self) -> None:
        self.assertEqual(scan(message(EICAR), BuiltinSettings(eicar=False)).viruses, ())


class LongFileNameTests(TestCase):
    """A file name was cut to its first 1,024 characters before its extension was read, so
    1,100 letters in front of ".exe" hid it; a mail client that shortens the name to save
    it keeps the extension."""

    def test_a_long_name_keeps_its_extension(self) -> None:
        name = "a" * 1100 + ".exe"
        verdict = scan(multipart([text_part(), attachment(name, b"hello")]))
        self.assertEqual(verdict.viruses, (DANGEROUS_NAME,))
        self.assertIn(f"Heuristics.Dangerous.Attachment: \u2026{'a' * 1019}.exe: "
                      "dangerous file type .exe", verdict.reasons)

    def test_a_long_name_in_encoded_words_keeps_its_end(self) -> None:
        raw = "=?utf-8?q?a?= " * 15_000 + "=?utf-8?b?" + base64.b64encode(
            "r\u00e9sum\u00e9.scr".encode()).decode() + "?="
        part = ([("Content-Type", "application/octet-stream"),
                 ("Content-Disposition", f'attachment; filename="{raw}"')], b"hello")
        verdict = scan(multipart([text_part(), part]))
        self.assertEqual(verdict.viruses, (DANGEROUS_NAME,))
        reason = verdict.reasons[-1]
        self.assertTrue(reason.endswith("r\u00e9sum\u00e9.scr: dangerous file type .scr"),
                        reason)
        self.assertIn("\u2026", reason)

    def test_a_short_name_is_whole(self) -> None:
        verdict = scan(multipart([text_part(), attachment("setup.exe", b"hello")]))
        self.assertIn("Heuristics.Dangerous.Attachment: setup.exe: dangerous file type .exe",
                      verdict.reasons)


class ZipBombTests(TestCase):
    def bomb_verdict(self, archive: bytes, **limits: Any) -> Verdict:
        settings = BuiltinSettings(zip=ZipLimits(**limits))
        return scan(multipart([attachment("a.zip", archive)]), settings)

    def test_high_compression_ratio_is_a_bomb(self) -> None:
        archive = zip_bytes({"zeros.bin": b"\0" * (4 * 1024 * 1024)})
        verdict = self.bomb_verdict(archive)
        self.assertIn(ZIP_BOMB_NAME, verdict.viruses)
        self.assertTrue(any("compression ratio" in r for r in verdict.reasons), verdict.reasons)

    def test_small_entries_may_compress_well(self) -> None:
        archive = zip_bytes({"zeros.bin": b"\0" * 100_000})
        self.assertNotIn(ZIP_BOMB_NAME, self.bomb_verdict(archive).viruses)

    def test_total_expanded_size_limit(self) -> None:
        files = {f"f{i}.bin": bytes(range(256)) * 400 for i in range(5)}  # 5 x 100 KiB
        archive = zip_bytes(files, compression=zipfile.ZIP_STORED)
        verdict = self.bomb_verdict(archive, max_total_size=300_000)
        self.assertIn(ZIP_BOMB_NAME, verdict.viruses)
        self.assertTrue(any("expands to more than 300000" in r for r in verdict.reasons))

    def test_too_many_entries(self) -> None:
        archive = zip_bytes({f"f{i}.txt": b"x" for i in range(20)})
        verdict = self.bomb_verdict(archive, max_entries=10)
        self.assertIn(ZIP_BOMB_NAME, verdict.viruses)
        self.assertTrue(any("20 entries" in r for r in verdict.reasons), verdict.reasons)

    def test_entry_count_is_read_before_the_central_directory(self) -> None:
        archive = zip_bytes({f"f{i}.txt": b"x" for i in range(7)})
        self.assertEqual(declared_entries(archive), 7)
        self.assertIsNone(declared_entries(b"not a zip"))

    def test_an_entry_count_that_lies_does_not_open_a_huge_central_directory(self) -> None:
        """zipfile reads the central directory by its size and ignores the end record's
        count: a zip declaring 1 entry with 20,000 central headers (all naming one empty
        local file, 47 bytes each) had infolist build 20,000 ZipInfo before the entry
        limit was looked at. At the largest message (700,000 such headers in 33 MB) that
        was 4 s of CPU holding the GIL and 337 MB; it is refused unopened now."""
        local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
        header = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                             1, 0, 0, 0, 0, 0, 0) + b"a"
        directory = header * 20_000
        end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(local), 0)
        archive = local + directory + end
        self.assertEqual(declared_entries(archive), 1)
        self.assertEqual(len(zipfile.ZipFile(io.BytesIO(archive)).infolist()), 20_000)
        tracemalloc.start()
        try:
            report = inspect_zip(archive, "a.zip", ZipLimits(), lambda entry: None)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(report.bombs, [
            "a.zip: 20000 central directory entries, declares 1 (limit 1000)"])
        self.assertEqual(report.entries, 0)
        self.assertLess(peak, 100_000)  # zipfile's directory of it: some 9 MB

    def test_an_honest_count_at_the_limit_is_opened(self) -> None:
        archive = zip_bytes({f"f{i}.txt": b"x" for i in range(1000)})
        report = inspect_zip(archive, "a.zip", ZipLimits(), lambda entry: None)
        self.assertEqual((report.bombs, report.entries), ([], 1000))

    def test_the_expansion_limit_counts_all_the_zips_of_a_message(self) -> None:
        """Entries of up to ratio_min_size may compress as well as they like: 99 entries
        of one deflated MiB of zeros each make a 100 KB zip expanding to 100 MB, and each
        attachment had the whole limit of its own (20 of them cost 5.3 s of CPU; the 1,000
        parts the MIME walk allows, minutes). The message's zips share it."""
        archive = deflated_zeros_zip(10)
        alone = inspect_zip(archive, "a.zip", ZipLimits(max_total_size=25 * 2**20),
                            lambda entry: None)
        self.assertEqual((alone.bombs, alone.expanded), ([], 10 * 2**20))
        attachments = [attachment(f"a{i}.zip", archive) for i in range(3)]
        settings = BuiltinSettings(zip=ZipLimits(max_total_size=25 * 2**20))
        verdict = scan(multipart([text_part(), *attachments]), settings)
        self.assertEqual(verdict.viruses, (ZIP_BOMB_NAME,))
        self.assertIn("Heuristics.Zip.Bomb: a2.zip/a5: expands to more than 26214400 bytes "
                      "(declares 1048576)", verdict.reasons)
        two = scan(multipart([text_part(), *attachments[:2]]), settings)
        self.assertNotIn(ZIP_BOMB_NAME, two.viruses)

    def test_entries_sharing_their_data_are_a_bomb_unopened(self) -> None:
        """The overlapping-entries bomb (Fifield, 2019): 99 central entries naming one
        local entry's 1 KiB of deflated zeros, 6 KB expanding to 100 MB within every
        other limit. It is refused from the central directory, nothing inflated."""
        archive = deflated_zeros_zip(99, shared=True)
        self.assertLess(len(archive), 7000)
        seen: list[ZipEntry] = []
        report = inspect_zip(archive, "a.zip", ZipLimits(), seen.append)
        self.assertEqual(report.bombs, ["a.zip: entries overlap ('a' starts at offset 0, "
                                        "within 'a', offsets 0 to 1064)"])
        self.assertEqual((report.entries, report.expanded, seen), (0, 0, []))
        verdict = self.bomb_verdict(archive)
        self.assertEqual(verdict.viruses, (ZIP_BOMB_NAME,))

    def test_an_entry_starting_inside_another_is_a_bomb(self) -> None:
        """Fifield's overlap by quoting: each local header sits inside the previous
        entry's compressed data, at an offset of its own."""
        names = [b"a", b"b", b"c"]
        payload = b"x" * 1000
        # Stored entries whose declared size runs over the next entry's local header.
        files = b""
        offsets = []
        for name in names:
            offsets.append(len(files))
            files += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0,
                                 len(name), 0) + name + payload[:300]
        directory = b""
        for name, offset in zip(names, offsets, strict=True):
            size = len(files) - offset - 30 - len(name)  # up to the end of the last one
            directory += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0,
                                     zlib.crc32(files[offset + 31:offset + 31 + size]),
                                     size, size, len(name), 0, 0, 0, 0, 0, offset) + name
        archive = files + directory + struct.pack(
            "<4s4H2IH", b"PK\x05\x06", 0, 0, 3, 3, len(directory), len(files), 0)
        report = inspect_zip(archive, "q.zip", ZipLimits(), lambda entry: None)
        self.assertEqual(report.bombs, ["q.zip: entries overlap ('b' starts at offset 331, "
                                        "within 'a', offsets 0 to 993)"])
        self.assertEqual((report.entries, report.expanded), (0, 0))

    def test_entries_side_by_side_are_no_overlap(self) -> None:
        """Many small entries, empty files and directories, data descriptors (written by
        a stream), junk in front: each entry's data is its own."""
        stream = Unseekable()
        with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as out:
            for i in range(300):
                out.writestr(f"f{i}.txt", b"hello %d" % i)
                out.writestr(f"empty{i}", b"")
            out.writestr("dir/", b"")
            with out.open("streamed.bin", "w") as entry:
                entry.write(bytes(50_000))
        archive = b"#!junk in front\n" + bytes(stream.data)
        self.assertTrue(all(info.flag_bits & 0x8 for info in
                            zipfile.ZipFile(io.BytesIO(archive)).infolist()))
        report = inspect_zip(archive, "ok.zip", ZipLimits(), lambda entry: None)
        self.assertEqual((report.bombs, report.unreadable, report.entries), ([], [], 601))

    def test_each_zip_of_a_message_is_still_scanned(self) -> None:
        """Sharing the counts, a bomb in one zip (its action off) stops neither the next
        zip nor a nested zip inside it."""
        bomb = zip_bytes({"zeros.bin": b"\0" * (4 * 1024 * 1024)})
        infected = zip_bytes({"inner.zip": zip_bytes({"a.txt": b"hello"}), "e.txt": EICAR})
        settings = BuiltinSettings(zip_bomb_action="off")
        verdict = scan(multipart([attachment("bomb.zip", bomb),
                                  attachment("x.zip", infected)]), settings)
        self.assertEqual(verdict.viruses, (EICAR_NAME,))

    def test_nesting_deeper_than_the_limit(self) -> None:
        archive = nested_zip(5, {"deep.txt": b"hello"})
        verdict = self.bomb_verdict(archive, max_depth=3)
        self.assertIn(ZIP_BOMB_NAME, verdict.viruses)
        self.assertTrue(any("nested deeper than 3" in r for r in verdict.reasons))

    def test_nesting_within_the_limit_is_scanned(self) -> None:
        archive = nested_zip(3, {"e.txt": EICAR})
        verdict = self.bomb_verdict(archive, max_depth=3)
        self.assertEqual(verdict.viruses, (EICAR_NAME,))

    def test_lying_declared_size_cannot_make_us_expand_more(self) -> None:
        """Sizes patched down to 10 bytes in both headers: the 3 MiB of zeros behind them
        never come out, so the declared-size checks are a real bound."""
        archive = bytearray(zip_bytes({"z.bin": b"\0" * (3 * 1024 * 1024)}))
        real = zipfile.ZipFile(io.BytesIO(bytes(archive))).infolist()[0]
        for offset in _find_all(bytes(archive), struct.pack("<I", real.file_size)):
            archive[offset:offset + 4] = struct.pack("<I", 10)
        seen: list[int] = []
        report = inspect_zip(bytes(archive), "a.zip", ZipLimits(),
                             lambda entry: seen.append(len(entry.content or b"")))
        self.assertLessEqual(report.expanded, 10)
        self.assertEqual(report.bombs, [])
        self.assertLessEqual(max(seen, default=0), 10)

    def test_bomb_action_spam_scores_instead(self) -> None:
        archive = zip_bytes({"zeros.bin": b"\0" * (4 * 1024 * 1024)})
        settings = BuiltinSettings(zip_bomb_action="spam")
        verdict = scan(multipart([attachment("a.zip", archive)]), settings)
        self.assertEqual(verdict.viruses, ())
        self.assertIn("ZIP_BOMB", verdict.symbol_names)
        self.assertTrue(verdict.spam)

    def test_bomb_action_off(self) -> None:
        archive = zip_bytes({"zeros.bin": b"\0" * (4 * 1024 * 1024)})
        verdict = scan(multipart([attachment("a.zip", archive)]),
                       BuiltinSettings(zip_bomb_action="off"))
        self.assertTrue(verdict.clean)

    def test_garbage_named_zip_is_not_an_error(self) -> None:
        verdict = scan(multipart([attachment("broken.zip", b"PK\x03\x04garbage")]))
        self.assertTrue(verdict.clean, verdict.reasons)
        self.assertTrue(any("not opened" in r and "broken.zip" in r for r in verdict.reasons))


class EncryptedZipTests(TestCase):
    def encrypted_zip(self) -> bytes:
        """A zip whose entry carries the "encrypted" flag (zipfile cannot write real ones):
        set bit 0 of the flags in the local header (offset 6) and central header (8)."""
        data = bytearray(zip_bytes({"secret.txt": b"not really encrypted"}))
        for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            pos = data.find(magic) + offset
            data[pos] |= 0x1
        return bytes(data)

    def test_encrypted_entries_are_ignored_by_default(self) -> None:
        verdict = scan(multipart([attachment("s.zip", self.encrypted_zip())]))
        self.assertTrue(verdict.clean, verdict.reasons)

    def test_encrypted_entries_as_virus_when_configured(self) -> None:
        verdict = scan(multipart([attachment("s.zip", self.encrypted_zip())]),
                       BuiltinSettings(encrypted_zip_action="virus"))
        self.assertEqual(verdict.viruses, (ENCRYPTED_ZIP_NAME,))


class DangerousAttachmentTests(TestCase):
    def assertDangerous(self, data: bytes, expect: str) -> None:
        verdict = scan(data)
        self.assertIn(DANGEROUS_NAME, verdict.viruses, verdict.reasons)
        self.assertTrue(any(expect in r for r in verdict.reasons), verdict.reasons)

    def test_each_default_extension_is_dangerous(self) -> None:
        for ext in ("exe", "scr", "js", "vbs", "bat", "cmd", "com", "pif", "jar", "msi",
                    "hta", "lnk", "iso"):
            data = multipart([attachment(f"invoice.{ext}", b"hello")])
            self.assertDangerous(data, f".{ext}")

    def test_double_extension_and_trailing_dots(self) -> None:
        self.assertDangerous(multipart([attachment("invoice.pdf.exe", b"x")]), ".exe")
        self.assertDangerous(multipart([attachment("invoice.exe. . ", b"x")]), ".exe")
        self.assertEqual(extension("INVOICE.EXE"), "exe")
        self.assertEqual(extension("dir\\sub/readme"), "")

    def test_rfc2231_and_encoded_word_file_names(self) -> None:
        part = ([("Content-Type", "application/octet-stream"),
                 ("Content-Disposition", "attachment; filename*=utf-8''r%C3%A9sum%C3%A9.scr"),
                 ("Content-Transfer-Encoding", "base64")], base64.encodebytes(b"x"))
        self.assertDangerous(multipart([part]), "résumé.scr")
        part = ([("Content-Type", 'application/octet-stream; name="=?utf-8?b?'
                  + base64.b64encode("fätura.js".encode()).decode() + '?="'),
                 ("Content-Transfer-Encoding", "base64")], base64.encodebytes(b"x"))
        self.assertDangerous(multipart([part]), "fätura.js")

    def test_dangerous_mime_type_without_file_name(self) -> None:
        part = ([("Content-Type", "application/x-msdownload"),
                 ("Content-Transfer-Encoding", "base64")], base64.encodebytes(b"x"))
        self.assertDangerous(multipart([part]), "application/x-msdownload")

    def test_executable_content_under_an_innocent_name(self) -> None:
        self.assertEqual(executable_kind(minimal_pe()), "Windows PE")
        self.assertEqual(executable_kind(b"\x7fELF\x02\x01"), "ELF")
        self.assertIsNone(executable_kind(b"MZ but not a PE"))
        self.assertDangerous(multipart([attachment("photo.jpg", minimal_pe())]), "Windows PE")

    def test_dangerous_file_inside_a_zip(self) -> None:
        data = multipart([attachment("docs.zip", zip_bytes({"docs/readme.txt": b"hi",
                                                            "docs/setup.js": b"alert(1)"}))])
        self.assertDangerous(data, "docs.zip/docs/setup.js")

    def test_configured_extension_list_replaces_the_default(self) -> None:
        settings = BuiltinSettings(dangerous_extensions=frozenset({"docm"}),
                                   dangerous_types=frozenset())
        self.assertTrue(scan(multipart([attachment("a.exe", b"x")]), settings).clean)
        verdict = scan(multipart([attachment("a.docm", b"x")]), settings)
        self.assertIn(DANGEROUS_NAME, verdict.viruses)

    def test_dangerous_action_spam(self) -> None:
        verdict = scan(multipart([attachment("a.exe", b"x")]),
                       BuiltinSettings(dangerous_action="spam"))
        self.assertEqual(verdict.viruses, ())
        self.assertIn("DANGEROUS_ATTACHMENT", verdict.symbol_names)
        self.assertTrue(verdict.spam)

    def test_inline_text_body_is_not_an_attachment(self) -> None:
        self.assertTrue(scan(message(b"please run setup.exe from the share")).clean)


class MimeLimitTests(TestCase):
    def test_too_many_parts_is_reported(self) -> None:
        data = multipart([text_part(b"p%d" % i) for i in range(30)])
        verdict = scan(data, BuiltinSettings(mime=MimeLimits(max_parts=10)))
        self.assertIn(LIMITS_NAME, verdict.viruses)
        self.assertTrue(any("more than 10 MIME parts" in r for r in verdict.reasons))

    def test_too_deep_is_reported(self) -> None:
        body = b"leaf"
        fields: list[tuple[str, str]] = [("Content-Type", "text/plain")]
        for level in range(8):
            boundary = f"b{level}"
            body = multipart_body([(fields, body)], boundary)
            fields = [("Content-Type", f'multipart/mixed; boundary="{boundary}"')]
        data = message(body, headers=[("From", "a@example.com"), *fields])
        verdict = scan(data, BuiltinSettings(mime=MimeLimits(max_depth=5)))
        self.assertIn(LIMITS_NAME, verdict.viruses)
        self.assertTrue(any("deeper than 5" in r for r in verdict.reasons))

    def test_eicar_past_the_limits_is_still_found_in_the_raw_bytes(self) -> None:
        data = multipart([text_part(b"p%d" % i) for i in range(30)] + [text_part(EICAR)])
        verdict = scan(data, BuiltinSettings(mime=MimeLimits(max_parts=10)))
        self.assertIn(EICAR_NAME, verdict.viruses)

    def test_limits_action_off(self) -> None:
        data = multipart([text_part(b"p%d" % i) for i in range(30)])
        settings = BuiltinSettings(mime=MimeLimits(max_parts=10), limits_action="off")
        self.assertEqual(scan(data, settings).viruses, ())

    def test_hostile_structure_is_walked_quickly(self) -> None:
        # 200,000 empty parts: bounded by max_parts, the walk stops early.
        body = b"--b\r\n\r\n" * 200_000
        data = message(body, headers=[("From", "a@example.com"),
                                      ("Content-Type", 'multipart/mixed; boundary="b"')])
        verdict = scan(data)
        self.assertIn(LIMITS_NAME, verdict.viruses)

    def test_attachment_behind_an_rfc2231_boundary_is_found(self) -> None:
        body = multipart_body([text_part(b"hi"), attachment("evil.exe", minimal_pe()),
                               attachment("x.txt", EICAR)], "frontier")
        data = message(body, headers=[
            ("From", "a@example.com"),
            ("Content-Type", "multipart/mixed; boundary*=us-ascii''frontier")])
        verdict = scan(data)
        self.assertIn(DANGEROUS_NAME, verdict.viruses)
        self.assertIn(EICAR_NAME, verdict.viruses)
        self.assertNotIn(LIMITS_NAME, verdict.viruses)
        self.assertTrue(any("evil.exe" in r for r in verdict.reasons))

    def test_ambiguous_structure_scores_points_by_kind(self) -> None:
        """Structure readers may take differently was walked (nothing went unread, unlike a
        limit): points towards spam per kind, the threshold for a field given twice (the
        way to show a client an attachment the filter took for text), tunable or off."""
        pe = attachment("evil.exe", minimal_pe())
        long_boundary = "f" * 201
        cases = (
            # the stdlib takes the first Content-Type, other readers the last
            (message(multipart_body([pe], "b"), headers=[
                ("From", "a@example.com"), ("Content-Type", "text/plain"),
                ("Content-Type", "multipart/mixed; boundary=b")]), "MIME_DUPLICATE_FIELD", True),
            (message(multipart_body([text_part(b"hi")], long_boundary), headers=[
                ("From", "a@example.com"),
                ("Content-Type", f"multipart/mixed; boundary={long_boundary}")]),
             "MIME_LONG_BOUNDARY", False),
            (message(b"opaque", headers=[("From", "a@example.com"),
                                         ("Content-Type", "multipart/mixed")]),
             "MIME_NO_PARTS", False),
        )
        for data, symbol, spam in cases:
            verdict = scan(data)
            self.assertEqual(verdict.viruses, (), symbol)
            self.assertIn(symbol, verdict.symbol_names)
            self.assertEqual(verdict.spam, spam, symbol)
            quiet = scan(data, BuiltinSettings(scores={symbol: 0.0}))
            self.assertNotIn(symbol, quiet.symbol_names)
        # walked all the same: the executable behind the long boundary is found
        found = scan(message(multipart_body([pe], long_boundary), headers=[
            ("From", "a@example.com"),
            ("Content-Type", f"multipart/mixed; boundary={long_boundary}")]))
        self.assertIn(DANGEROUS_NAME, found.viruses)

    def test_settings_reject_unknown_actions(self) -> None:
        self.assertRaises(ValueError, BuiltinSettings, dangerous_action="quarantine")
        self.assertRaises(ValueError, BuiltinSettings, threshold=0)


class RecordingRunner:
    """A CpuPool stand-in that records what it is asked to run."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []
        self.pool = CpuPool.for_tests()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls.append(fn)
        return self.pool.run(fn, *args, **kwargs)


class BuiltinFilterTests(TestCase):
    async def test_small_messages_run_inline(self) -> None:
        runner = RecordingRunner()
        verdict = await BuiltinFilter(runner).scan(message(GTUBE))
        self.assertTrue(verdict.spam)
        self.assertEqual(runner.calls, [])

    async def test_large_messages_run_on_the_cpu_pool(self) -> None:
        runner = RecordingRunner()
        big = multipart([text_part(b"x" * 100_000), attachment("e.bin", EICAR)])
        verdict = await BuiltinFilter(runner).scan(big)
        self.assertEqual(verdict.viruses, (EICAR_NAME,))
        self.assertEqual(runner.calls, [analyse])

    async def test_small_messages_whose_work_their_size_does_not_bound_run_on_the_pool(
            self) -> None:
        """A zip archive, many parts or many header lines in a small message: the work is
        not bounded by its size (3 KB of nested zips expanded to 80 MB, 228 ms on the
        reactor), so it is analysed on the CPU pool; the verdict is the same."""
        bomb = nested_zip(3, {f"f{i}.bin": b"\0" * (1024 * 1024) for i in range(20)})
        eicar = zip_bytes({"e.txt": EICAR})
        many = multipart([text_part(b"x") for _ in range(150)])
        fields = b"".join(b"X-Field: %d\r\n" % i for i in range(600)) + message(b"hello")
        for data in (multipart([attachment("a.zip", bomb)]),
                     multipart([attachment("e.zip", eicar)]), many, fields):
            self.assertLessEqual(len(data), DEFAULT_INLINE_MAX)
            runner = RecordingRunner()
            builtin = BuiltinFilter(runner)
            self.assertTrue(builtin.inline(data))
            self.assertRaises(NotInline, builtin.scan_inline, data)
            verdict = await builtin.scan(data)
            self.assertEqual(runner.calls, [analyse])
            self.assertEqual(verdict, analyse(data, SETTINGS))
        self.assertEqual(analyse(multipart([attachment("e.zip", eicar)]), SETTINGS).viruses,
                         (EICAR_NAME,))

    async def test_works_with_cpu_pool_for_tests(self) -> None:
        settings = BuiltinSettings(inline_max=0)
        verdict = await BuiltinFilter(CpuPool.for_tests(), settings).scan(message(EICAR))
        self.assertEqual(verdict.viruses, (EICAR_NAME,))


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, start = [], 0
    while (pos := data.find(needle, start)) >= 0:
        found.append(pos)
        start = pos + 1
    return found

"""safedrop's recipient pages: the link from the notification, the password and one-time
code checks, downloads (whole, ranged, RFC 6266 names), read_remove, expiry (410), the
expiry sweeper and replies to the sender."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import hashlib
import re
from typing import Any

import sqlalchemy as sa
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.safedrop.access import (
    CODE_FAILURES,
    CODE_LOCK_SECONDS,
    OPEN_RECEIPT_SECONDS,
    PASSWORD_FAILURES,
    PASSWORD_LOCK_SECONDS,
)
from mailcore.safedrop.service import SafedropSweeper, link_digest
from mailcore.store.schema import drop_recipients, users
from mailcore.store.schema.safedrop import drop_download_attempts, drop_downloads
from tests.support.pages import csrf_cookie, csrf_field
from tests.support.pg import create_test_database
from tests.support.web import BASE, Wire
from tests.test_web_safedrop_api import MULTIPART, SafedropFixture, multipart_file
from web.accesslog import redacted_path
from web.drop_page import (
    CHUNK,
    COMMENT_RATE,
    PASSWORD_RATE,
    DropPageApp,
    byte_range,
    content_disposition,
)
from web.pages import SECURITY_HEADERS
from web.ratelimit import RateLimiter

# What every page and error page carries (web.pages.SECURITY_HEADERS).
PAGE_HEADERS = {**SECURITY_HEADERS, "Content-Type": "text/html; charset=utf-8"}
PAGE_HEADERS = {name.lower(): value for name, value in PAGE_HEADERS.items()}
LINK = re.compile(r"https://localhost(/drop/[A-Za-z0-9_-]{43})")
# What the code step says of a code it sent by text message, and of one the gateway failed
# to send, which went by mail.
TEXTED = b"We sent a one-time code to your phone by text message"
MAILED_INSTEAD = (b"We sent a one-time code to bob@example.net (the text message could not "
                  b"be sent, so it came by email)")


class Browser:
    """A client with a cookie jar of its own, as one browser has."""

    def __init__(self, f: SafedropFixture) -> None:
        self.http: Any = StubTreq(f.web.root)
        self.pressed: set[str] = set()

    async def get(self, path: str, **headers: str) -> tuple[int, dict[str, list[str]], Any]:
        return await self._call("GET", path, headers=headers)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, BASE + path, **kwargs)
        body = await response.content()
        headers = {
            name.decode().lower(): [v.decode() for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        return response.code, headers, body

    async def post(self, path: str, **fields: str) -> tuple[int, dict[str, list[str]], Any]:
        status, _, body = await self.get(path)
        assert status == 200, (status, body)
        token = csrf_field(body, fields.get("action"))
        return await self._call("POST", path, data={"csrf_token": token, **fields},
                                allow_redirects=False)

    async def download(self, path: str, **headers: str) -> tuple[int, dict[str, list[str]],
                                                                  Any]:
        """GET the file at `path`, its download button (read_remove) pressed first the
        first time."""
        if path not in self.pressed:
            status, _, body = await self.post(path, action="download")
            assert status == 303, (status, body)
            self.pressed.add(path)
        return await self.get(path, **headers)


class PageFixture(SafedropFixture):
    async def sent_bundle(self, fields: str, recipients: tuple[str, ...] = (
            "ann%40example.org", "bob%40example.net&telephone=442077394252"),
            files: tuple[tuple[str, bytes], ...] = (("r\u00e9sum\u00e9 1.txt", b"0123456789"),
                                                   ("b.bin", b"\x00\xffdata"))) -> list[str]:
        bundle_id = await self.bundle(fields)
        self.bundle_id = bundle_id
        for r in recipients:
            status, reply = await self.form(
                "POST", f"/dropbundles/{bundle_id}/dropbundlerecipients", f"email={r}")
            assert status == 200, reply
        for name, data in files:
            status, _, reply = await self.call(
                "POST", f"/dropbundles/{bundle_id}/dropfiles", multipart_file(name, data),
                MULTIPART)
            assert status == 200, reply
        status, _, body = await self.call("GET", f"/dropbundles/{bundle_id}?send")
        assert status == 200, body
        return [LINK.search(raw.decode()).group(1)  # type: ignore[union-attr]
                for _, _, _, raw in self.spooled()]

    def mails_to(self, address: str) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[misc]
                for _, _, rcpt, raw in self.spooled() if rcpt == address]

    def stored_files(self) -> list[str]:
        root = self.data_dir / "safedrop" / str(self.bundle_id)
        return sorted(p.name for p in root.glob("*")) if root.exists() else []


class PasswordAndDownloadTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = PageFixture()
        await self.f.start(self)
        # These tests fetch a read_remove file in many ranges; how many downloads of one
        # may start is ReadRemoveAttemptsTests'.
        drops = self.f.web.core.safedrop
        drops.settings = dataclasses.replace(drops.settings, max_download_attempts=100)
        self.ann, self.bob = await self.f.sent_bundle(
            "subject=Plans&message=Hello+%3Cb%3Eyou%3C%2Fb%3E&password=Open-Sesame-77"
            "&secure_message=vault+%3Cscript%3E4711")

    async def test_the_password_opens_the_drop_and_its_files_download(self) -> None:
        browser = Browser(self.f)
        status, headers, page = await browser.get(self.ann)
        self.assertEqual(status, 200)
        self.assertIn(b'type="password"', page)
        self.assertNotIn(b"vault", page)
        self.assertNotIn(b"b.bin", page)
        self.assertIn("frame-ancestors 'none'", headers["content-security-policy"][0])
        status, _, page = await browser.post(self.ann, action="password", password="wrong")
        self.assertEqual(status, 403)
        self.assertIn(b"not right", page)
        status, headers, _ = await browser.post(self.ann, action="password",
                                                password="Open-Sesame-77")
        self.assertEqual(status, 303)
        self.assertEqual(headers["location"], [self.ann])
        status, _, page = await browser.get(self.ann)
        self.assertEqual(status, 200)
        self.assertIn(b"Hello &lt;b&gt;you&lt;/b&gt;", page)
        self.assertIn(b"vault &lt;script&gt;4711", page)
        self.assertNotIn(b"<script>", page)
        file_ids = re.findall(rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page)
        self.assertEqual(len(file_ids), 2)
        first = f"{self.ann}/files/{file_ids[0].decode()}"
        second = f"{self.ann}/files/{file_ids[1].decode()}"
        # A range is served as 206 and does not count as the whole file, not even one that
        # ends where the file ends (a tail, or the rest from an offset).
        status, headers, body = await browser.download(first, Range="bytes=2-5")
        self.assertEqual((status, body), (206, b"2345"))
        self.assertEqual(headers["content-range"], ["bytes 2-5/10"])
        status, headers, body = await browser.download(first, Range="bytes=-3")
        self.assertEqual((status, body), (206, b"789"))
        status, headers, body = await browser.download(first, Range="bytes=-1")
        self.assertEqual((status, body), (206, b"9"))
        status, headers, body = await browser.download(first, Range="bytes=5-")
        self.assertEqual((status, body), (206, b"56789"))
        status, headers, _ = await browser.download(first, Range="bytes=10-")
        self.assertEqual(status, 416)
        self.assertEqual(headers["content-range"], ["bytes */10"])
        # The other file in full: ann still lacks the whole of the first, so under
        # read_remove her drop stays open and its files stay on disk.
        status, _, body = await browser.download(second)
        self.assertEqual((status, body), (200, b"\x00\xffdata"))
        status, _, page = await browser.get(self.ann)
        self.assertEqual(status, 200)
        self.assertEqual(len(self.f.stored_files()), 2)
        # The first in full completes ann's download: read_remove ends her access.
        status, headers, body = await browser.download(first)
        self.assertEqual((status, body), (200, b"0123456789"))
        self.assertEqual(headers["content-type"], ["application/octet-stream"])
        self.assertEqual(
            headers["content-disposition"],
            ["attachment; filename=\"r_sum_ 1.txt\"; "
             "filename*=UTF-8''r%C3%A9sum%C3%A9%201.txt"])
        status, _, page = await browser.get(self.ann)
        self.assertEqual(status, 410)
        self.assertIn(b"downloaded every file", page)
        self.assertEqual(len(self.f.stored_files()), 2)  # bob has not downloaded yet
        # bob, in his own browser: once he has both files, they are deleted from disk. A
        # 206 of the whole file (bytes=0-) is the whole file.
        bob = Browser(self.f)
        await bob.post(self.bob, action="password", password="Open-Sesame-77")
        status, _, body = await bob.download(f"{self.bob}/files/{file_ids[0].decode()}",
                                        Range="bytes=0-")
        self.assertEqual((status, body), (206, b"0123456789"))
        self.assertEqual(len(self.f.stored_files()), 2)
        status, _, _ = await bob.download(f"{self.bob}/files/{file_ids[1].decode()}")
        self.assertEqual(status, 200)
        self.assertEqual(self.f.stored_files(), [])
        status, _, _ = await bob.get(self.bob)
        self.assertEqual(status, 410)
        # email_receipt_when=4 (default): one receipt once everybody has everything.
        receipts = self.f.mails_to("alice@example.test")
        self.assertEqual(len(receipts), 1)
        self.assertIn("Every recipient has downloaded every file.",
                      receipts[0].get_content())

    async def test_a_disabled_senders_drop_opens_nothing_until_it_is_enabled(self) -> None:
        """`mailcore user disable` of the sender: its links neither open the drop nor
        download its files (a browser that passed the password included); once enabled,
        everything works as before, nothing removed."""
        browser = Browser(self.f)
        await browser.post(self.ann, action="password", password="Open-Sesame-77")
        status, _, page = await browser.get(self.ann)
        file_ids = re.findall(rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page)
        first = f"{self.ann}/files/{file_ids[0].decode()}"
        identity = self.f.web.core.identity
        await identity.set_active(self.f.alice.id, False)
        for path in (self.ann, first, self.bob):
            status, _, page = await browser.get(path)
            self.assertEqual(status, 403, path)
            self.assertIn(b"cannot be opened for now", page)
            self.assertNotIn(b"0123456789", page)
        # The link's page documents that 403 (it listed none), as the file's does.
        _, _, doc = await self.f.web.call("GET", "/openapi.json")
        for path in ("/drop/{token}", "/drop/{token}/files/{file_id}"):
            self.assertIn("403", doc["paths"][path]["get"]["responses"], path)
        await identity.set_active(self.f.alice.id, True)
        status, _, body = await browser.download(first)
        self.assertEqual((status, body), (200, b"0123456789"))
        self.assertEqual(len(self.f.stored_files()), 2)

    async def test_ranges_that_together_cover_a_file_count_as_its_download(self) -> None:
        """A download manager's pieces, or a download resumed where it broke off: once the
        recipient was sent every byte of a file, it counts (here read_remove ends ann's
        access once she has both files)."""
        browser = Browser(self.f)
        await browser.post(self.ann, action="password", password="Open-Sesame-77")
        _, _, page = await browser.get(self.ann)
        first, second = (f"{self.ann}/files/{i.decode()}" for i in re.findall(
            rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page))
        for wanted, body in (("bytes=-1", b"9"), ("bytes=4-6", b"456"),
                             ("bytes=0-4", b"01234")):
            status, _, got = await browser.download(first, Range=wanted)
            self.assertEqual((status, got), (206, body))
        status, _, got = await browser.download(second, Range="bytes=0-2")
        self.assertEqual((status, got), (206, b"\x00\xffd"))
        status, _, got = await browser.download(second, Range="bytes=3-")
        self.assertEqual((status, got), (206, b"ata"))
        status, _, _ = await browser.get(self.ann)
        self.assertEqual(status, 200)  # bytes 7 and 8 of the first file are still missing
        status, _, got = await browser.download(first, Range="bytes=6-8")
        self.assertEqual((status, got), (206, b"678"))
        status, _, page = await browser.get(self.ann)
        self.assertEqual(status, 410)
        self.assertIn(b"downloaded every file", page)

    async def test_a_range_is_served_only_for_the_version_if_range_names(self) -> None:
        """Each download carries the file's ETag (the SHA-256 of its bytes: a strong
        validator, without which a browser restarts a broken download from the first
        byte, under read_remove spending one more of its downloads). A Range whose
        If-Range is that tag is served; one whose If-Range names anything else (another
        tag, a weak one, a date: we give no Last-Modified) is for another version: the
        file is served whole, 200, also where the range itself is unsatisfiable (RFC 9110
        13.1.5), and counts as downloaded."""
        browser = Browser(self.f)
        await browser.post(self.ann, action="password", password="Open-Sesame-77")
        _, _, page = await browser.get(self.ann)
        first = re.findall(rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page)[0]
        path = f"{self.ann}/files/{first.decode()}"
        tag = '"' + hashlib.sha256(b"0123456789").hexdigest() + '"'
        status, headers, body = await browser.download(path, Range="bytes=0-3")
        self.assertEqual((status, body, headers["etag"]), (206, b"0123", [tag]))
        status, headers, body = await browser.download(path, Range="Bytes=4-5",
                                                       **{"If-Range": tag})
        self.assertEqual((status, body), (206, b"45"))
        self.assertEqual(headers["content-range"], ["bytes 4-5/10"])
        # A HEAD answers as a GET would, and counts nothing.
        for other in ('"' + "0" * 64 + '"', "W/" + tag, "Mon, 07 Dec 2026 14:00:00 GMT"):
            for wanted in ("bytes=6-", "bytes=10-"):
                status, headers, _ = await browser._call(
                    "HEAD", path, headers={"Range": wanted, "If-Range": other})
                self.assertEqual(status, 200, (other, wanted))
                self.assertEqual(headers["content-length"], ["10"])
                self.assertNotIn("content-range", headers)
                self.assertEqual(headers["etag"], [tag])
        status, headers, body = await browser.download(
            path, Range="bytes=6-", **{"If-Range": '"' + "0" * 64 + '"'})
        self.assertEqual((status, body), (200, b"0123456789"))
        self.assertNotIn("content-range", headers)
        # Sent whole, it counts: under read_remove it does not start again.
        status, _, _ = await browser.download(path)
        self.assertEqual(status, 410)

    async def test_numbers_longer_than_python_converts_are_no_500(self) -> None:
        """A Range or a grant cookie with 5,000 digits (int() refuses more than 4,300): the
        range is ignored (the whole file), the cookie grants nothing."""
        browser = Browser(self.f)
        status, _, page = await browser.get(self.ann, Cookie="mc_drop=p." + "9" * 5000 + ".ab")
        self.assertEqual(status, 200)
        self.assertIn(b'type="password"', page)
        await browser.post(self.ann, action="password", password="Open-Sesame-77")
        _, _, page = await browser.get(self.ann)
        first = re.findall(rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page)[0]
        status, _, body = await browser.download(f"{self.ann}/files/{first.decode()}",
                                            Range="bytes=" + "9" * 5000 + "-")
        self.assertEqual((status, body), (200, b"0123456789"))

    async def test_downloads_need_the_password_in_this_browser(self) -> None:
        status, _, page = await Browser(self.f).get(f"{self.ann}/files/1")
        self.assertEqual(status, 403)
        self.assertNotIn(b"0123456789", page)

    async def test_every_drop_page_and_error_page_carries_the_security_headers(
            self) -> None:
        """Each page of a link (a password prompt, the drop, the redirect after the
        password) and each error page its routes answer (bad link, checks not passed,
        unknown file, wrong method, bad or too large form, unsatisfiable range, refused
        CSRF token) may not be framed, cached or leak its link in a Referer; a file is
        served as bytes no browser runs or keeps."""
        browser = Browser(self.f)
        first = f"{self.ann}/files/1"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        before = [
            ("GET", self.ann, {}, None, 200),
            ("GET", self.ann[:-3] + ("AAA" if not self.ann.endswith("AAA") else "BBB"), {},
             None, 404),
            ("GET", first, {}, None, 403),  # the password was not given in this browser
            ("POST", self.ann, form, b"action=password&password=x", 403),  # no CSRF token
        ]
        after = [
            ("GET", self.ann, {}, None, 200),
            ("GET", f"{self.ann}/files/999", {}, None, 404),
            ("GET", f"{self.ann}/files/x", {}, None, 404),
            ("PUT", self.ann, {}, None, 405),
            ("DELETE", first, {}, None, 405),
            ("POST", self.ann, {"Content-Type": "application/json"}, b"{}", 400),
            ("POST", self.ann, form, b"comment=" + b"x" * (70 * 1024), 413),
        ]
        for cases in (before, after):
            for method, path, headers, data, status in cases:
                got, reply, body = await browser._call(method, path, headers=headers,
                                                       data=data, allow_redirects=False)
                self.assertEqual(got, status, (method, path))
                self.assertPageHeaders(reply, f"{method} {path}")
                self.assertTrue(body.startswith(b"<!DOCTYPE html>"), (method, path))
            if cases is before:
                status, reply, _ = await browser.post(self.ann, action="password",
                                                      password="Open-Sesame-77")
                self.assertEqual(status, 303)
                self.assertPageHeaders(reply, "the redirect after the password")
        status, reply, _ = await browser.download(first, Range="bytes=10-")
        self.assertEqual(status, 416)
        self.assertPageHeaders(reply, "416")
        status, reply, body = await browser.download(first, Range="bytes=0-1")
        self.assertEqual((status, body), (206, b"01"))
        for name, value in (("cache-control", "no-store"),
                            ("x-content-type-options", "nosniff"),
                            ("content-type", "application/octet-stream"),
                            ("content-security-policy", "default-src 'none'; sandbox")):
            self.assertEqual(reply.get(name), [value], name)

    def assertPageHeaders(self, headers: dict[str, list[str]], what: str) -> None:
        for name, value in PAGE_HEADERS.items():
            self.assertEqual(headers.get(name), [value], f"{what}: {name}")

    async def test_password_guesses_are_throttled_per_link(self) -> None:
        browser = Browser(self.f)
        for _ in range(5):
            status, _, _ = await browser.post(self.ann, action="password", password="nope")
            self.assertEqual(status, 403)
        status, headers, _ = await browser.post(self.ann, action="password",
                                                password="Open-Sesame-77")
        self.assertEqual(status, 429)
        self.assertTrue(int(headers["retry-after"][0]) > 0)
        self.f.web.clock.advance(300)
        status, _, _ = await browser.post(self.ann, action="password",
                                          password="Open-Sesame-77")
        self.assertEqual(status, 303)

    async def test_password_guesses_are_throttled_per_link_across_nodes(self) -> None:
        browser = Browser(self.f)
        for _ in range(PASSWORD_RATE.limit):
            status, _, _ = await browser.post(self.ann, action="password", password="nope")
            self.assertEqual(status, 403)
        # The next guess lands on another node (an app of its own over the same store).
        app: Any = self.f.web.root.apps["drop"]
        other = DropPageApp(app.settings, pages=app.pages, drops=self.f.web.core.safedrop)
        app.limiter = other.limiter
        status, _, page = await browser.post(self.ann, action="password",
                                             password="nope")
        self.assertEqual(status, 429)
        self.assertIn(b"Too many wrong passwords", page)

    async def test_wrong_passwords_lock_the_link_for_a_day_across_restarts(self) -> None:
        browser = Browser(self.f)
        _, _, page = await browser.get(self.ann)
        token = csrf_field(page, "password")

        async def guess(password: str) -> tuple[int, dict[str, list[str]], bytes]:
            return await browser._call(  # type: ignore[no-any-return]
                "POST", self.ann, data={"csrf_token": token, "action": "password",
                                        "password": password}, allow_redirects=False)

        app = self.f.web.root.apps["drop"]
        for wrong in range(1, PASSWORD_FAILURES + 1):
            if wrong % 5 == 1:  # within the per-process rate; a restart forgets it
                self.f.web.clock.advance(300)
                app.limiter = RateLimiter(  # type: ignore[attr-defined]
                    self.f.web.clock, PASSWORD_RATE)
            status, _, page = await guess("nope")
            self.assertEqual(status, 403 if wrong < PASSWORD_FAILURES else 429, wrong)
        self.assertIn(b"Too many wrong passwords", page)
        # Locked: even the right password does not open the link, nor does the page ask.
        status, headers, page = await guess("Open-Sesame-77")
        self.assertEqual(status, 429)
        self.assertEqual(int(headers["retry-after"][0]), PASSWORD_LOCK_SECONDS)
        status, _, page = await browser.get(self.ann)
        self.assertEqual(status, 429)
        self.assertIn(b"ask alice@example.test to send you a new drop", page)
        self.assertNotIn(b'name="password"', page)
        # The link's page documents that 429 (it listed none).
        _, _, doc = await self.f.web.call("GET", "/openapi.json")
        self.assertIn("429", doc["paths"]["/drop/{token}"]["get"]["responses"])
        # Another recipient's link is not locked.
        status, _, _ = await Browser(self.f).post(self.bob, action="password",
                                                  password="Open-Sesame-77")
        self.assertEqual(status, 303)
        # A day later the link takes the password again; a right one starts the count anew.
        self.f.web.clock.advance(PASSWORD_LOCK_SECONDS)
        for _ in range(3):
            status, _, _ = await browser.post(self.ann, action="password", password="nope")
            self.assertEqual(status, 403)
        status, _, _ = await browser.post(self.ann, action="password",
                                          password="Open-Sesame-77")
        self.assertEqual(status, 303)
        failures = await self.f.web.core.db.read("count", lambda c: c.execute(
            sa.select(drop_recipients.c.password_failures)
            .where(drop_recipients.c.email == "ann@example.org")).scalar_one())
        self.assertEqual(failures, 0)

    async def test_a_post_without_the_csrf_token_is_refused(self) -> None:
        status, _, _ = await self.f.web.call(
            "POST", self.ann, data={"action": "password", "password": "Open-Sesame-77"})
        self.assertEqual(status, 403)
        self.assertIsNone(csrf_cookie({}))

    async def test_a_form_token_of_one_link_does_not_pass_on_another(self) -> None:
        browser = Browser(self.f)  # one browser, one CSRF cookie, two links
        _, _, ann_page = await browser.get(self.ann)
        status, _, _ = await browser._call(
            "POST", self.bob, allow_redirects=False, data={
                "csrf_token": csrf_field(ann_page), "action": "password",
                "password": "Open-Sesame-77"})
        self.assertEqual(status, 403)
        status, _, _ = await browser.post(self.bob, action="password",
                                          password="Open-Sesame-77")
        self.assertEqual(status, 303)

    async def test_unknown_links_are_404_and_links_never_reach_the_log(self) -> None:
        status, _, _ = await Browser(self.f).get("/drop/" + "A" * 43)
        self.assertEqual(status, 404)
        token = self.ann.rsplit("/", 1)[1]
        self.assertNotIn(token, redacted_path(self.ann.encode()))
        self.assertNotIn(token, redacted_path(f"{self.ann}/files/3".encode()))


class TokenAuthTests(TestCase):
    async def test_a_one_time_code_by_mail_opens_the_drop_and_a_reply_reaches_the_sender(
            self) -> None:
        f = PageFixture()
        await f.start(self)
        _, bob = await f.sent_bundle(
            "subject=Deal&require_token_auth=1&allow_comments=1&read_remove=0"
            "&email_receipt_when=2")
        browser = Browser(f)
        status, _, page = await browser.get(bob)
        self.assertEqual(status, 200)
        self.assertIn(b"Send me a code", page)
        self.assertIn(b"by email", page)  # bob has a telephone; no SMS gateway here
        status, _, _ = await browser.post(bob, action="send_code")
        self.assertEqual(status, 303)
        codes = [re.search(r"\b(\d{6})\b", m.get_content()) for m in f.mails_to(
            "bob@example.net") if m["Subject"] == "Your safedrop code"]
        self.assertEqual(len(codes), 1)
        code = codes[0].group(1)  # type: ignore[union-attr]
        wrong = "000000" if code != "000000" else "111111"
        status, _, _ = await browser.post(bob, action="code", code=wrong)
        self.assertEqual(status, 403)
        status, _, _ = await browser.post(bob, action="code", code=code)
        self.assertEqual(status, 303)
        status, _, page = await browser.get(bob)
        self.assertEqual(status, 200)
        self.assertIn(b"b.bin", page)
        # The code worked once: another browser needs a new one.
        other = Browser(f)
        status, _, _ = await other.post(bob, action="send_code")
        self.assertEqual(status, 303)
        status, _, _ = await other.post(bob, action="code", code=code)
        self.assertEqual(status, 403)
        # A reply is mailed to the sender; email_receipt_when=2: one receipt for the first
        # opening.
        status, _, page = await browser.post(bob, action="comment", comment="Agreed <ok>")
        self.assertEqual(status, 200)
        self.assertIn(b"Your reply was sent.", page)
        to_alice = [m.get_content() for m in f.mails_to("alice@example.test")]
        self.assertEqual(len([t for t in to_alice if "opened your drop" in t]), 1)
        self.assertEqual(len([t for t in to_alice if "Agreed <ok>" in t]), 1)
        # Replies are limited per link: each is a mail to the sender.
        for n in range(2, COMMENT_RATE.limit + 2):
            status, headers, page = await browser.post(bob, action="comment", comment=f"#{n}")
            if n <= COMMENT_RATE.limit:
                self.assertEqual(status, 200, n)
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], ["360"])
        self.assertIn(b"Too many replies", page)
        replies = [t for t in (m.get_content() for m in f.mails_to("alice@example.test"))
                   if "replied" in t]
        self.assertEqual(len(replies), COMMENT_RATE.limit)
        f.web.clock.advance(360)
        status, _, _ = await browser.post(bob, action="comment", comment="later")
        self.assertEqual(status, 200)


class CodeLimitTests(TestCase):
    """New codes are limited per link, and wrong codes are counted per recipient across new
    codes: asking for a new code does not give another five guesses for ever."""

    async def open_link(self) -> None:
        self.f = PageFixture()
        await self.f.start(self)
        [self.ann] = await self.f.sent_bundle("subject=S&require_token_auth=1",
                                              recipients=("ann%40example.org",))
        self.browser = Browser(self.f)
        self.csrf: dict[str, str] = {}

    async def post(self, **fields: str) -> tuple[int, dict[str, list[str]], Any]:
        """Post the page's form for fields["action"], with the token the page now gives
        that form (tokens are per form and expire), or the last one it gave when the page
        shows no such form (a locked link)."""
        action = fields["action"]
        _, _, page = await self.browser.get(self.ann)
        if f'name="action" value="{action}"'.encode() in page:
            self.csrf[action] = csrf_field(page, action)
        return await self.browser._call("POST", self.ann,
                                        data={"csrf_token": self.csrf[action], **fields},
                                        allow_redirects=False)

    def codes(self) -> list[str]:
        return [re.search(r"\b(\d{6})\b", m.get_content()).group(1)  # type: ignore[union-attr]
                for m in self.f.mails_to("ann@example.org")
                if m["Subject"] == "Your safedrop code"]

    async def test_new_codes_are_rate_limited_per_link(self) -> None:
        await self.open_link()
        for _ in range(3):
            status, _, _ = await self.post(action="send_code")
            self.assertEqual(status, 303)
        status, headers, page = await self.post(action="send_code")
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], ["300"])
        self.assertIn(b"A code was sent a moment ago", page)
        self.assertEqual(len(self.codes()), 3)
        self.f.web.clock.advance(300)
        status, _, _ = await self.post(action="send_code")
        self.assertEqual(status, 303)
        self.assertEqual(len(self.codes()), 4)

    async def test_new_codes_are_limited_per_link_across_nodes(self) -> None:
        """Another node's page (an app of its own over the same store) takes from the same
        bucket: N nodes do not send N times the codes (mails or paid text messages)."""
        await self.open_link()
        for _ in range(3):
            status, _, _ = await self.post(action="send_code")
            self.assertEqual(status, 303)
        app: Any = self.f.web.root.apps["drop"]
        other = DropPageApp(app.settings, pages=app.pages, drops=self.f.web.core.safedrop)
        app.code_limiter = other.code_limiter  # the next request lands on node b
        status, _, _ = await self.post(action="send_code")
        self.assertEqual(status, 429)
        self.assertEqual(len(self.codes()), 3)

    async def test_wrong_codes_count_across_new_codes_then_the_link_locks_for_a_day(
            self) -> None:
        await self.open_link()
        wrong = 0
        for _ in range(CODE_FAILURES):
            await self.post(action="send_code")
            self.f.web.clock.advance(300)  # within the rate of new codes
            code = self.codes()[-1]
            status, _, page = await self.post(action="code",
                                              code=f"{(int(code) + 1) % 10**6:06d}")
            wrong += 1
            if wrong < CODE_FAILURES:
                self.assertEqual(status, 403)
        self.assertEqual(status, 429)
        self.assertIn(b"Too many wrong codes", page)
        sent = len(self.codes())
        # Locked: no new code is sent, and even the right code does not open the link.
        status, headers, page = await self.post(action="send_code")
        self.assertEqual(status, 429)
        self.assertEqual(int(headers["retry-after"][0]), CODE_LOCK_SECONDS)
        self.assertEqual(len(self.codes()), sent)
        status, _, page = await self.browser.get(self.ann)
        self.assertEqual(status, 429)
        self.assertIn(b"ask alice@example.test to send you a new drop", page)
        self.assertNotIn(b'name="code"', page)
        # A day later the link takes codes again; the right one opens it.
        self.f.web.clock.advance(CODE_LOCK_SECONDS)
        status, _, _ = await self.post(action="send_code")
        self.assertEqual(status, 303)
        status, _, _ = await self.post(action="code", code=self.codes()[-1])
        self.assertEqual(status, 303)
        status, _, page = await self.browser.get(self.ann)
        self.assertEqual(status, 200)
        self.assertIn(b"b.bin", page)


class ReadRemoveAttemptsTests(TestCase):
    """read_remove: a file self-destructs for a recipient once it was sent whole, or once
    `[safedrop] max_download_attempts` (3) downloads of it started, whatever they sent (all
    but its last byte, a dropped connection); no download of it starts after that."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = PageFixture()
        await self.f.start(self)
        self.ann, self.bob = await self.f.sent_bundle("subject=S&email_receipt_when=3")
        self.browser = Browser(self.f)
        _, _, page = await self.browser.get(self.ann)
        self.first, self.second = (f"{self.ann}/files/{i.decode()}" for i in re.findall(
            rb'action="' + self.ann.encode() + rb'/files/(\d+)"', page))

    def receipts(self) -> list[str]:
        return [m.get_content().strip() for m in self.f.mails_to("alice@example.test")
                if "downloaded" in m.get_content()]

    async def test_all_but_the_last_byte_is_fetched_at_most_max_download_attempts_times(
            self) -> None:
        attempts = self.f.web.core.safedrop.settings.max_download_attempts
        self.assertEqual(attempts, 3)
        for _ in range(attempts):
            status, _, got = await self.browser.download(self.first, Range="bytes=0-8")
            self.assertEqual((status, got), (206, b"012345678"))
        self.assertEqual(self.receipts(), ["ann@example.org downloaded r\u00e9sum\u00e9 1.txt."])
        for wanted in ("bytes=0-8", "bytes=9-", None):
            status, _, page = await self.browser.get(
                self.first, **({"Range": wanted} if wanted else {}))
            self.assertEqual(status, 410, wanted)
            self.assertIn(b"self-destructs", page)
            self.assertNotIn(b"0123", page)
        status, _, page = await self.browser.get(self.ann)
        self.assertEqual(status, 200)
        self.assertIn(b"downloaded", page)
        # The other file whole: ann has every file, her link ends.
        status, _, got = await self.browser.download(self.second)
        self.assertEqual((status, got), (200, b"\x00\xffdata"))
        status, _, page = await self.browser.get(self.ann)
        self.assertEqual(status, 410)
        # Bob's attempts are his own.
        bob = Browser(self.f)
        await bob.get(self.bob)
        status, _, got = await bob.download(self.first.replace(self.ann, self.bob))
        self.assertEqual((status, got), (200, b"0123456789"))

    async def test_a_file_sent_whole_is_not_sent_again_while_another_is_left(self) -> None:
        status, _, got = await self.browser.download(self.first)
        self.assertEqual((status, got), (200, b"0123456789"))
        status, _, _ = await self.browser.download(self.first)
        self.assertEqual(status, 410)
        status, _, _ = await self.browser.download(self.first, Range="bytes=0-0")
        self.assertEqual(status, 410)
        status, _, _ = await self.browser.get(self.ann)
        self.assertEqual(status, 200)  # the second file is still to come

    async def test_a_head_request_is_no_attempt(self) -> None:
        for _ in range(5):
            status, _, _ = await self.browser._call("HEAD", self.first)
            self.assertEqual(status, 200)
        status, _, got = await self.browser.download(self.first)
        self.assertEqual((status, got), (200, b"0123456789"))
        # Once the file has self-destructed, a HEAD answers what a GET would: 410.
        status, headers, _ = await self.browser._call("HEAD", self.first)
        self.assertEqual(status, 410)
        self.assertNotIn("content-disposition", {k.lower() for k in headers})
        status, _, _ = await self.browser._call("HEAD", self.second)
        self.assertEqual(status, 200)


class LinkScannerTests(TestCase):
    """Mail security gateways and chat previews GET the link of a notification, and the
    addresses on the page they get: none of that may start the download of a read_remove
    file (it would self-destruct before the recipient saw it). The download starts from the
    page's button (a POST with its CSRF token); then the recipient has each file once."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.f = PageFixture()
        await self.f.start(self)
        self.ann, _ = await self.f.sent_bundle("subject=S&email_receipt_when=3")

    def attempts(self) -> list[Any]:
        def txn(conn: Any) -> list[Any]:
            return [*conn.execute(sa.select(drop_download_attempts)),
                    *conn.execute(sa.select(drop_downloads))]

        result: list[Any] = []
        self.f.web.core.db.read("rows", txn).addCallback(result.extend)
        return result

    async def test_gets_of_the_link_and_every_address_on_its_pages_consume_nothing(
            self) -> None:
        scanner = Browser(self.f)
        seen: set[str] = set()
        todo = [self.ann]
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            for method, sent in (("HEAD", {}), ("GET", {}), ("GET", {"Range": "bytes=0-"})):
                status, _, body = await scanner._call(method, path, headers=sent)
                self.assertIn(status, (200, 403), (method, path, sent))
                self.assertNotIn(b"0123456789", body)
                todo += [m.decode() for m in re.findall(rb'(?:href|action)="(/drop/[^"]+)"',
                                                       body)]
        self.assertEqual(len(seen), 3, seen)  # the link and its two files' addresses
        self.assertEqual(self.attempts(), [])
        self.assertEqual(self.f.mails_to("alice@example.test"), [])
        self.assertEqual(len(self.f.stored_files()), 2)
        # The recipient, in her own browser, presses each file's button on the page.
        person = Browser(self.f)
        _, _, page = await person.get(self.ann)
        files = [m.decode() for m in re.findall(
            rb'action="(' + self.ann.encode() + rb'/files/\d+)"', page)]
        self.assertEqual(len(files), 2)
        for path, data in zip(files, (b"0123456789", b"\x00\xffdata"), strict=True):
            status, headers, _ = await person.post(path, action="download")
            self.assertEqual(status, 303)
            self.assertEqual(headers["location"], [path])
            self.assertTrue(any(c.startswith("mc_drop_dl=") and f"Path={path}" in c
                                for c in headers["set-cookie"]), headers["set-cookie"])
            status, _, body = await person.get(path)
            self.assertEqual((status, body), (200, data))
        status, _, _ = await person.get(self.ann)
        self.assertEqual(status, 410)

    async def test_the_button_needs_its_csrf_token_and_grants_its_own_file_only(
            self) -> None:
        person = Browser(self.f)
        _, _, page = await person.get(self.ann)
        first, second = (m.decode() for m in re.findall(
            rb'action="(' + self.ann.encode() + rb'/files/\d+)"', page))
        status, _, _ = await person._call("POST", first, data={"action": "download"},
                                          allow_redirects=False)
        self.assertEqual(status, 403)
        status, headers, _ = await person.post(first, action="download")
        self.assertEqual(status, 303)
        grant = next(c for c in headers["set-cookie"] if c.startswith("mc_drop_dl="))
        value = grant.split(";")[0].split("=", 1)[1]
        # The first file's grant, sent to the second file's address: the page, no bytes.
        status, headers, body = await person.get(second, Cookie=f"mc_drop_dl={value}")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["text/html; charset=utf-8"])
        self.assertIn(b'name="action" value="download"', body)
        self.assertEqual(self.attempts(), [])
        # It lasts an hour: a download resumed later needs the button again.
        status, _, body = await person.get(first, Range="bytes=0-4")
        self.assertEqual((status, body), (206, b"01234"))
        self.f.web.clock.advance(3601)
        status, _, body = await person.get(first, Range="bytes=5-")
        self.assertEqual(status, 403)
        self.assertIn(b"press the file", body)
        await person.post(first, action="download")
        status, _, body = await person.get(first, Range="bytes=5-")
        self.assertEqual((status, body), (206, b"56789"))


class OpenReceiptTests(TestCase):
    async def test_each_opening_receipts_come_at_most_once_an_hour_and_head_is_none(
            self) -> None:
        f = PageFixture()
        await f.start(self)
        ann, bob = await f.sent_bundle("subject=S&email_receipt_when=1")

        def told() -> list[str]:
            return [m.get_content().strip() for m in f.mails_to("alice@example.test")
                    if "opened your drop" in m.get_content()]

        browser = Browser(f)
        status, _, _ = await browser._call("HEAD", ann)
        self.assertEqual(status, 200)
        self.assertEqual(told(), [])
        for _ in range(50):
            status, _, _ = await browser.get(ann)
            self.assertEqual(status, 200)
        self.assertEqual(told(), ["ann@example.org opened your drop."])
        await browser.get(bob)  # another recipient is told of on its own
        self.assertEqual(len(told()), 2)
        f.web.clock.advance(OPEN_RECEIPT_SECONDS - 1)
        await browser.get(ann)
        self.assertEqual(len(told()), 2)
        f.web.clock.advance(1)
        await browser.get(ann)
        self.assertEqual(len(told()), 3)


class BidiTests(TestCase):
    async def test_bidi_controls_are_never_shown_in_names_or_subjects(self) -> None:
        """"invoice<U+202E>fdp.exe" reads as "invoiceexe.pdf": a file name loses its bidi
        controls when it is uploaded; a subject (kept as the sender wrote it) is shown
        without them on the page and in the mails."""
        f = PageFixture()
        await f.start(self)
        [ann] = await f.sent_bundle(
            "subject=Pay+%E2%80%AEfdp.exe&email_receipt_when=3",
            recipients=("ann%40example.org",), files=(("invoice\u202efdp.exe", b"MZ"),))
        status, _, page = await Browser(f).get(ann)
        self.assertEqual(status, 200)
        self.assertIn(b"invoicefdp.exe", page)
        self.assertIn(b"<title>Pay fdp.exe", page)
        [notice] = f.mails_to("ann@example.org")
        self.assertEqual(notice["Subject"], "Secure drop from alice@example.test: Pay fdp.exe")
        self.assertIn("invoicefdp.exe", notice.get_content())
        [fid] = re.findall(rb'/files/(\d+)"', page)
        status, headers, _ = await Browser(f).download(f"{ann}/files/{fid.decode()}")
        self.assertEqual(status, 200)
        self.assertIn("invoicefdp.exe", headers["content-disposition"][0])
        [receipt] = f.mails_to("alice@example.test")
        self.assertEqual(receipt["Subject"], "Safedrop: Pay fdp.exe")
        for m in (notice, receipt):
            self.assertNotIn("\u202e", m.as_string() + m["Subject"])
        self.assertNotIn("\u202e".encode(), page)


    async def test_a_senders_address_is_shown_without_bidi_controls(self) -> None:
        """A user could give their account an address holding a bidirectional control
        (Protecmail's profile took it: normalise_email refused only controls; it refuses
        those now, and one stored before stays), and the drop's pages and mails showed it
        as it is: "<U+202E>" reordered the address and
        the text after it on the password, code, drop and download pages, in the
        notification's text and Subject and in the code's mail (found attacking the pages,
        session 46). They show it without them; the notification has no Reply-To (a
        reader would show it reordered) and a Subject without it."""
        f = PageFixture()
        await f.start(self)
        spoof = "billing\u202egro.knab@example.test"
        await f.web.core.db.run("spoof", lambda c: c.execute(
            sa.update(users).where(users.c.id == f.alice.id).values(email=spoof)))
        [ann] = await f.sent_bundle(
            "subject=Invoice&password=Open-Sesame-77&require_token_auth=1",
            recipients=("ann%40example.org",), files=(("a.txt", b"A"),))
        shown_as = "billinggro.knab@example.test"
        [notice] = f.mails_to("ann@example.org")
        self.assertEqual((notice["Subject"], notice["Reply-To"]), ("Secure drop: Invoice", None))
        self.assertIn(f"{shown_as} has sent you a secure drop.", notice.get_content())
        browser = Browser(f)
        pages = [(await browser.get(ann))[2]]
        status, _, _ = await browser.post(ann, action="password", password="Open-Sesame-77")
        self.assertEqual(status, 303)
        pages.append((await browser.get(ann))[2])  # the code's prompt
        status, _, _ = await browser.post(ann, action="send_code")
        self.assertEqual(status, 303)
        [code_mail] = [m for m in f.mails_to("ann@example.org")
                       if m["Subject"] == "Your safedrop code"]
        self.assertIn(f"from {shown_as} is:", code_mail.get_content())
        code = re.search(r"\b(\d{6})\b", code_mail.get_content()).group(1)  # type: ignore[union-attr]
        status, _, _ = await browser.post(ann, action="code", code=code)
        self.assertEqual(status, 303)
        status, _, page = await browser.get(ann)
        self.assertEqual(status, 200)
        pages.append(page)
        [fid] = re.findall(rb'/files/(\d+)"', page)
        status, _, page = await browser.get(f"{ann}/files/{fid.decode()}")  # its button
        self.assertEqual(status, 200)
        pages.append(page)
        for page in pages:
            self.assertIn(shown_as.encode(), page)
            self.assertNotIn("\u202e".encode(), page)
        for m in (notice, code_mail):
            self.assertNotIn("\u202e", m.as_string())


class ExpiryTests(TestCase):
    async def test_an_expired_drop_is_410_and_the_sweeper_deletes_its_files(self) -> None:
        f = PageFixture()
        await f.start(self)
        # START is 2023-11-14T22:13:20Z; the drop expires an hour later.
        ann, _ = await f.sent_bundle("subject=Soon&expiry_date=2023-11-14T23%3A13%3A20Z")
        status, _, _ = await Browser(f).get(ann)
        self.assertEqual(status, 200)
        clock: Clock = f.web.clock
        clock.advance(3600)
        status, _, page = await Browser(f).get(ann)
        self.assertEqual(status, 410)
        self.assertIn(b"This drop has expired.", page)
        self.assertEqual(len(f.stored_files()), 2)
        sweeper = SafedropSweeper(f.web.core.safedrop)
        sweeper.startService()
        clock.advance(f.web.core.safedrop.settings.sweep_interval)
        self.assertEqual(f.stored_files(), [])
        summary = [m for m in f.mails_to("alice@example.test")
                   if (m["Subject"] or "").startswith("Safedrop expired")]
        self.assertEqual(len(summary), 1)
        self.assertIn("ann@example.org: downloaded 0 of 2 files", summary[0].get_content())
        sweeper.stopService()
        self.assertFalse(sweeper.running)
        self.assertEqual(clock.getDelayedCalls(), [])
        status, _, page = await Browser(f).get(ann)
        self.assertEqual(status, 410)


    async def test_a_download_under_way_when_the_sweep_deletes_the_files_ends_whole(
            self) -> None:
        """The drop expires while a download is streaming, and the sweep deletes its files
        meanwhile: the download was sent from the file it opened, which keeps its bytes
        until it is closed, so it ends with every byte its headers promised (not cut short
        under a Content-Length it cannot meet), and nothing starts after."""
        f = PageFixture()
        await f.start(self)
        data = bytes(range(256)) * (3 * CHUNK // 256)
        [ann] = await f.sent_bundle(
            "subject=Soon&expiry_date=2023-11-14T23%3A13%3A20Z",
            recipients=("ann%40example.org",), files=(("report.pdf", data),))
        _, _, page = await Browser(f).get(ann)
        [fid] = re.findall(rb'/files/(\d+)"', page)
        drops = f.web.core.safedrop
        run = drops.io.run
        held = hold_reads(drops)
        wire = Wire.open(f.web)
        self.addCleanup(wire.close)
        wire.send(granted_get(f, ann, fid))
        held.pop(0).callback(None)  # the first chunk goes out; the next read waits
        f.web.clock.advance(3600)
        drops.io.run = run  # type: ignore[method-assign]
        self.assertEqual(await drops.sweep(), 1)
        self.assertEqual(f.stored_files(), [])
        while held:
            held.pop(0).callback(None)
        head, _, body = wire.transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head.split(b"\r\n")[0])
        self.assertEqual(body, data)
        self.assertFalse(wire.transport.disconnecting)
        status, _, page = await Browser(f).get(ann)
        self.assertEqual(status, 410)
        status, _, _ = await Browser(f).get(f"{ann}/files/{fid.decode()}")
        self.assertEqual(status, 410)


class DeadLinksTests(TestCase):
    """A sent bundle whose every recipient's link has ended (its own `valid_for` ran out,
    or under read_remove it has every file) serves nothing ever again (recipients cannot
    change once it is sent): the sweep deletes its files and mails the summary as for an
    expired drop. They stayed on disk for good when the bundle had no expiry_date (the
    sweep looked at that date only), filling the disk and `max_user_size`."""

    async def fixture(self) -> PageFixture:
        f = PageFixture()
        await f.start(self)
        return f

    async def sweep(self, f: PageFixture, seconds: float) -> None:
        sweeper = SafedropSweeper(f.web.core.safedrop)
        sweeper.startService()
        self.addCleanup(sweeper.stopService)
        f.web.clock.advance(seconds)

    def summaries(self, f: PageFixture) -> list[str]:
        return [m.get_content() for m in f.mails_to("alice@example.test")
                if (m["Subject"] or "").startswith("Safedrop expired")]

    async def test_read_remove_one_has_all_files_the_others_link_ran_out(self) -> None:
        f = await self.fixture()
        ann, bob = await f.sent_bundle("subject=S", recipients=(
            "ann%40example.org", "bob%40example.net&valid_for=3600"))
        browser = Browser(f)
        _, _, page = await browser.get(ann)
        for fid in re.findall(rb'/files/(\d+)"', page):
            status, _, _ = await browser.download(f"{ann}/files/{fid.decode()}")
            self.assertEqual(status, 200)
        interval = f.web.core.safedrop.settings.sweep_interval
        await self.sweep(f, interval)
        self.assertEqual(len(f.stored_files()), 2)  # bob's link still works
        f.web.clock.advance(3600)
        status, _, _ = await Browser(f).get(bob)
        self.assertEqual(status, 410)
        f.web.clock.advance(interval)
        self.assertEqual(f.stored_files(), [])
        [summary] = self.summaries(f)
        self.assertIn("bob@example.net: downloaded 0 of 2 files", summary)
        self.assertIsNotNone(f.bundle_rows()[0].removed_at)

    async def test_every_link_ran_out_without_read_remove(self) -> None:
        f = await self.fixture()
        await f.sent_bundle("subject=S&read_remove=0", recipients=(
            "ann%40example.org&valid_for=60", "bob%40example.net&valid_for=120"))
        interval = f.web.core.safedrop.settings.sweep_interval
        self.assertGreater(interval, 120)
        await self.sweep(f, 100)
        self.assertEqual(len(f.stored_files()), 2)
        f.web.clock.advance(interval)
        self.assertEqual(f.stored_files(), [])
        self.assertEqual(len(self.summaries(f)), 1)

    async def test_a_link_without_an_end_keeps_the_files(self) -> None:
        f = await self.fixture()
        await f.sent_bundle("subject=S&read_remove=0", recipients=(
            "ann%40example.org&valid_for=60", "bob%40example.net"))
        await self.sweep(f, 10 * f.web.core.safedrop.settings.sweep_interval)
        self.assertEqual(len(f.stored_files()), 2)
        self.assertEqual(self.summaries(f), [])


class DeadLinksOnPostgresTests(DeadLinksTests):
    """The same on PostgreSQL (its booleans and the sweep's NOT EXISTS)."""

    timeout = 120

    async def fixture(self) -> PageFixture:
        f = PageFixture()
        await f.start(self, await create_test_database(self))
        return f


class RemovedSecretsTests(TestCase):
    """A drop's secure message and password hash went nowhere when it expired or
    self-destructed: its row kept them for good (any copy of the database, with the key
    beside it, opened the message). Removal clears them; the API still says a secure
    message was set."""

    async def check(self, f: PageFixture) -> None:
        [row] = f.bundle_rows()
        self.assertIsNotNone(row.removed_at)
        self.assertEqual((row.secure_message, row.password_hash), (None, None))
        # What the API's `secure_message` reads (its session may have expired by now).
        bundle = await f.web.core.safedrop.bundle(f.alice.id, f.bundle_id)
        self.assertIs(bundle.has_secure_message, True)

    async def test_read_in_full_under_read_remove(self) -> None:
        f = PageFixture()
        await f.start(self)
        [ann] = await f.sent_bundle("subject=S&password=Open-Sesame-77&secure_message=vault",
                                    recipients=("ann%40example.org",))
        [row] = f.bundle_rows()
        self.assertIsNotNone(row.secure_message)
        browser = Browser(f)
        await browser.post(ann, action="password", password="Open-Sesame-77")
        _, _, page = await browser.get(ann)
        self.assertIn(b"vault", page)
        for fid in re.findall(rb'/files/(\d+)"', page):
            status, _, _ = await browser.download(f"{ann}/files/{fid.decode()}")
            self.assertEqual(status, 200)
        await self.check(f)

    async def test_expired(self) -> None:
        f = PageFixture()
        await f.start(self)
        await f.sent_bundle("subject=S&password=Open-Sesame-77&secure_message=vault"
                            "&expiry_date=2023-11-14T23%3A13%3A20Z")
        sweeper = SafedropSweeper(f.web.core.safedrop)
        sweeper.startService()
        self.addCleanup(sweeper.stopService)
        f.web.clock.advance(3600 + f.web.core.safedrop.settings.sweep_interval)
        self.assertEqual(f.stored_files(), [])
        await self.check(f)


class DownloadOnTheWireTests(TestCase):
    """What a client on the connection reads when a download cannot go as planned: never a
    page inside the file's reply (a kept-alive connection would read the next response as
    the rest of the file)."""

    async def start(self, fields: str, data: bytes) -> None:
        self.f = PageFixture()
        await self.f.start(self)
        [self.ann] = await self.f.sent_bundle(fields, recipients=("ann%40example.org",),
                                              files=(("report.pdf", data),))
        _, _, page = await Browser(self.f).get(self.ann)
        [fid] = re.findall(rb'/files/(\d+)"', page)
        self.get = granted_get(self.f, self.ann, fid)
        self.wire = Wire.open(self.f.web)
        self.addCleanup(self.wire.close)

    async def test_a_file_missing_on_disk_is_a_410_page_of_its_own(self) -> None:
        await self.start("subject=S", b"x" * 5000)
        for p in (self.f.data_dir / "safedrop" / str(self.f.bundle_id)).iterdir():
            p.unlink()
        self.wire.send(self.get +
                       b"GET /drop/" + b"A" * 43 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.f.web.clock.advance(0)  # the pipelined request is read in a turn of its own
        [(status, headers, body), (after, _, _)] = self.wire.responses()
        self.assertEqual(status, b"HTTP/1.1 410 Gone")
        self.assertNotIn(b"content-disposition", headers)
        self.assertEqual(headers[b"content-type"], b"text/html; charset=utf-8")
        self.assertIn(b"have been removed", body)
        self.assertTrue(body.rstrip().endswith(b"</html>"))
        self.assertEqual(after, b"HTTP/1.1 404 Not Found")

    async def test_a_failure_recording_a_sent_file_is_logged_not_written(self) -> None:
        # email_receipt_when=3: the download is recorded, and its receipt queued, once the
        # file went out, in the spool's write lane; the spool refuses it.
        data = b"F" * 3000
        await self.start("subject=S&email_receipt_when=3", data)

        def refuse(*_: Any, **__: Any) -> defer.Deferred[Any]:
            return defer.fail(OSError("No space left on device"))

        self.f.web.core.safedrop.spool.ride = refuse  # type: ignore[method-assign]
        self.wire.send(self.get)
        [(status, _, body)] = self.wire.responses()
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", data))
        self.assertTrue(self.wire.transport.value().endswith(data))
        self.assertFalse(self.wire.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    async def test_a_read_failing_midway_drops_the_connection_and_writes_no_page(
            self) -> None:
        data = b"R" * (3 * CHUNK)
        await self.start("subject=S", data)
        drops = self.f.web.core.safedrop
        run = drops.io.run
        reads: list[int] = []

        def failing(fn: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(fn, "__name__", "") == "read":
                reads.append(1)
                if len(reads) == 2:
                    return defer.fail(OSError(5, "Input/output error"))
            return run(fn, *args, **kwargs)

        drops.io.run = failing  # type: ignore[method-assign]
        self.wire.send(self.get +
                       b"GET /drop/" + b"A" * 43 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = self.wire.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(rest, data[:CHUNK])  # the first chunk, then nothing: no page
        self.assertTrue(self.wire.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


def hold_reads(drops: Any) -> list[defer.Deferred[Any]]:
    """The drop service's file reads wait, each until the test fires its Deferred (in the
    list returned, in the order they were asked); other work on its pool runs as before.
    The caller puts `drops.io.run` back when it needs reads to flow again."""
    run = drops.io.run
    held: list[defer.Deferred[Any]] = []

    def reads_wait(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "") != "read":
            return run(fn, *args, **kwargs)
        later: defer.Deferred[Any] = defer.Deferred()
        held.append(later)
        later.addCallback(lambda _: run(fn, *args, **kwargs))
        return later

    drops.io.run = reads_wait
    return held


def granted_get(f: PageFixture, ann: str, fid: str | bytes, headers: bytes = b"") -> bytes:
    """A raw GET of file `fid` of the link `ann` from a browser that pressed its download
    button (the grant cookie), with `headers` (each ending in CRLF)."""
    fid = fid.decode() if isinstance(fid, bytes) else fid
    grant = f.web.core.safedrop.grants.make_download(
        link_digest(ann.rpartition("/")[2]), int(fid), f.web.clock.seconds())
    return (b"GET " + f"{ann}/files/{fid}".encode() + b" HTTP/1.1\r\nHost: x\r\n"
            + f"Cookie: mc_drop_dl={grant}\r\n".encode() + headers + b"\r\n")


async def one_file_link(f: PageFixture, data: bytes) -> tuple[str, str]:
    """A bundle sent to ann with one file of `data`: her link, and the file's id."""
    [ann] = await f.sent_bundle("subject=S", recipients=("ann%40example.org",),
                                files=(("report.pdf", data),))
    _, _, page = await Browser(f).get(ann)
    [fid] = re.findall(rb'/files/(\d+)"', page)
    return ann, fid.decode()


TAG = b'"' + hashlib.sha256(b"0123456789").hexdigest().encode() + b'"'
OTHER_TAG = b'"' + b"0" * 64 + b'"'


class HeadAsGetTests(TestCase):
    """A HEAD of a file answers the status and headers its GET would, the bytes left out
    (RFC 9110 9.3.2), Range and If-Range included: a 206 with the part's Content-Range and
    Content-Length where the GET sends the part, a 416 where it is unsatisfiable, a 200 of
    the whole where If-Range names another version or the Range is not one we take."""

    def answer(self, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """(status line, headers, what follows them) of one request on its own connection.
        Left out of the headers: Date and X-Request-Id, which differ between any two
        requests, and Transfer-Encoding, the framing of a body written without a
        Content-Length (a page), which Twisted leaves out of a HEAD's answer as it sends
        no body (RFC 9110 9.3.2 and RFC 9112 6.1 let it)."""
        wire = Wire.open(self.f.web)
        self.addCleanup(wire.close)
        wire.send(request)
        head, _, rest = wire.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(b":") for line in lines)}
        for name in (b"date", b"x-request-id", b"transfer-encoding"):
            headers.pop(name, None)
        return status, headers, rest

    async def check(self, fields: str, *, whole: list[bytes], after: bytes) -> None:
        """HEAD then GET, for each Range and If-Range, of the one file (10 bytes) of a
        bundle sent with `fields`: the parts, then `whole` (the requests served the whole
        file, which under read_remove ends the link), then a plain one answered `after`."""
        self.f = PageFixture()
        await self.f.start(self)
        drops = self.f.web.core.safedrop  # each GET of a part is one download started
        drops.settings = dataclasses.replace(drops.settings, max_download_attempts=100)
        [ann] = await self.f.sent_bundle(fields, recipients=("ann%40example.org",),
                                         files=(("report.pdf", b"0123456789"),))
        _, _, page = await Browser(self.f).get(ann)
        [fid] = re.findall(rb'/files/(\d+)"', page)
        data = b"0123456789"
        cases = [
            (b"Range: bytes=2-5\r\n", b"206", b"2345"),
            (b"Range: bytes=-3\r\n", b"206", b"789"),
            (b"Range: bytes=5-\r\n", b"206", b"56789"),
            (b"Range: bytes=2-5\r\nIf-Range: " + TAG + b"\r\n", b"206", b"2345"),
            (b"Range: bytes=10-\r\n", b"416", None),
            (b"Range: bytes=-0\r\n", b"416", None),
            *((sent, b"200", data) for sent in whole),
            (b"", after, data if after == b"200" else None),
        ]
        for sent, code, body in cases:
            get = granted_get(self.f, ann, fid, sent)
            head_status, head_headers, head_rest = self.answer(b"HEAD" + get[3:])
            get_status, get_headers, get_rest = self.answer(get)
            self.assertEqual(get_status.split()[1], code, sent)
            self.assertEqual((head_status, head_headers), (get_status, get_headers), sent)
            self.assertEqual(head_rest, b"", sent)
            if body is not None:
                self.assertEqual(get_rest, body, sent)
                self.assertEqual(get_headers[b"content-length"], str(len(body)).encode())
            if code == b"206":
                self.assertTrue(get_headers[b"content-range"].endswith(b"/10"), sent)

    async def test_a_file_kept_after_its_download(self) -> None:
        await self.check("subject=S&read_remove=0", whole=[
            b"Range: bytes=0-1,4-5\r\n", b"Range: lines=1-2\r\n",
            b"Range: bytes=10-\r\nIf-Range: " + OTHER_TAG + b"\r\n",
            b"Range: bytes=2-5\r\nIf-Range: W/" + TAG + b"\r\n"], after=b"200")

    async def test_a_read_remove_file_whose_button_was_pressed(self) -> None:
        # A HEAD counts no download: the GETs of parts leave the file to download until
        # one sends it whole; then HEAD and GET are the same 410.
        await self.check("subject=S", whole=[
            b"Range: bytes=10-\r\nIf-Range: " + OTHER_TAG + b"\r\n"], after=b"410")


class GoneMidwayTests(TestCase):
    async def test_a_client_going_away_midway_logs_no_error_and_what_it_got_counts(
            self) -> None:
        """The connection is lost while a chunk is being read: the request no longer has
        a channel when the download ends. It ended with AttributeError ('NoneType' object
        has no attribute 'unregisterProducer') logged as an unhandled error."""
        f = PageFixture()
        await f.start(self)
        data = b"M" * (3 * CHUNK)
        ann, fid = await one_file_link(f, data)
        drops = f.web.core.safedrop
        run = drops.io.run
        held = hold_reads(drops)
        wire = Wire.open(f.web)
        wire.send(granted_get(f, ann, fid))
        held.pop(0).callback(None)  # the first chunk goes out; the next read waits
        wire.channel.connectionLost(Failure(ConnectionLost("gone")))
        self.assertEqual(self.flushLoggedErrors(AttributeError), [])
        drops.io.run = run  # type: ignore[method-assign]
        # The first chunk counts: the rest, resumed, completes the download (read_remove).
        browser = Browser(f)
        status, _, body = await browser.download(f"{ann}/files/{fid}",
                                            Range=f"bytes={CHUNK}-")
        self.assertEqual((status, body), (206, data[CHUNK:]))
        status, _, _ = await browser.get(ann)
        self.assertEqual(status, 410)


class ConcurrentDownloadTests(TestCase):
    """read_remove: a recipient's link ends once every byte of its files went out, so two
    downloads of the same bytes at once must not both be sent the file."""

    async def test_a_second_download_of_the_same_bytes_ends_the_first(self) -> None:
        f = PageFixture()
        await f.start(self)
        data = bytes(range(256)) * (3 * CHUNK // 256)
        ann, fid = await one_file_link(f, data)
        get = granted_get(f, ann, fid)
        held = hold_reads(f.web.core.safedrop)

        def release() -> None:
            while held:
                held.pop(0).callback(None)

        first, second = Wire.open(f.web), Wire.open(f.web)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.send(get)
        held.pop(0).callback(None)  # the first chunk goes out; the next read waits
        self.assertEqual(len(held), 1)
        second.send(get)  # the same bytes on another connection (the link forwarded)
        if first.transport.disconnecting:  # what the reactor does once it is aborted
            first.channel.connectionLost(Failure(ConnectionLost("aborted")))
        release()
        release()
        got = [w.transport.value().partition(b"\r\n\r\n")[2] for w in (first, second)]
        self.assertEqual([len(g) == len(data) for g in got], [False, True])
        self.assertEqual(got[1], data)
        self.assertTrue(first.transport.disconnecting)
        status, _, page = await Browser(f).get(ann)
        self.assertEqual(status, 410)
        self.assertIn(b"downloaded every file", page)

    async def test_a_download_that_has_written_all_is_not_cut_while_it_records(
            self) -> None:
        """Its bytes are all in the transport (maybe not yet at the client): cutting it
        would lose them though they count as sent. The second waits for its record: the
        file was the last the link lacked, so the second is a 410."""
        f = PageFixture()
        await f.start(self)
        data = b"W" * (2 * CHUNK)
        ann, fid = await one_file_link(f, data)
        get = granted_get(f, ann, fid)
        drops = f.web.core.safedrop
        sent = drops.sent
        recording: list[defer.Deferred[None]] = []

        async def slow_record(*args: Any) -> None:
            later: defer.Deferred[None] = defer.Deferred()
            recording.append(later)
            await later
            await sent(*args)

        drops.sent = slow_record  # type: ignore[method-assign,assignment]
        first, second = Wire.open(f.web), Wire.open(f.web)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.send(get)
        self.assertEqual(len(recording), 1)  # every byte written; recording
        second.send(get)
        self.assertFalse(first.transport.disconnecting)
        self.assertEqual(second.transport.value(), b"")  # waiting for the first
        recording.pop(0).callback(None)
        [(status, _, body)] = first.responses()
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", data))
        [(status, _, body)] = second.responses()
        self.assertEqual(status, b"HTTP/1.1 410 Gone")
        self.assertIn(b"downloaded every file", body)

    async def test_a_client_leaving_once_it_has_every_byte_is_recorded_without_error(
            self) -> None:
        """A client that closes its connection once it has read the whole body (curl, a
        download manager) leaves while the download is recorded, and the handler is
        cancelled there: the record ran on, but its cancelled wait was logged as a failure
        of it ('recording the download ... failed', CancelledError), and the download
        ended at once, so a second download of the same bytes waiting for it (Sending)
        started before the record said the file was downloaded and was sent the
        self-destructing file again. Now the download ends once its record has."""
        f = PageFixture()
        await f.start(self)
        data = b"L" * (2 * CHUNK)
        ann, fid = await one_file_link(f, data)
        get = granted_get(f, ann, fid)
        drops = f.web.core.safedrop
        sent = drops.sent
        recording: list[defer.Deferred[None]] = []

        async def slow_record(*args: Any) -> None:
            later: defer.Deferred[None] = defer.Deferred()
            recording.append(later)
            await later
            await sent(*args)

        drops.sent = slow_record  # type: ignore[method-assign,assignment]
        first, second = Wire.open(f.web), Wire.open(f.web)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        first.send(get)
        self.assertEqual(len(recording), 1)  # every byte written; recording
        [(status, _, body)] = first.responses()
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", data))
        first.channel.connectionLost(Failure(ConnectionLost("read it all, closed")))
        second.send(get)
        self.assertEqual(second.transport.value(), b"")  # waiting for the first's record
        recording.pop(0).callback(None)
        self.assertEqual(self.flushLoggedErrors(defer.CancelledError), [])
        [(status, _, body)] = second.responses()
        self.assertEqual(status, b"HTTP/1.1 410 Gone")
        self.assertIn(b"downloaded every file", body)
        page_status, _, _ = await Browser(f).get(ann)
        self.assertEqual(page_status, 410)

    async def test_parallel_downloads_of_other_bytes_go_on_side_by_side(self) -> None:
        """A download manager's ranges on two connections: neither cuts the other, and
        together they complete the download."""
        f = PageFixture()
        await f.start(self)
        data = bytes(range(256)) * (4 * CHUNK // 256)
        half = len(data) // 2
        ann, fid = await one_file_link(f, data)
        held = hold_reads(f.web.core.safedrop)
        low, high = Wire.open(f.web), Wire.open(f.web)
        self.addCleanup(low.close)
        self.addCleanup(high.close)
        low.send(granted_get(f, ann, fid, b"Range: bytes=0-%d\r\n" % (half - 1)))
        high.send(granted_get(f, ann, fid, b"Range: bytes=%d-\r\n" % half))
        self.assertEqual(len(held), 2)  # both are reading
        while held:
            held.pop(0).callback(None)
        [(status, _, body)] = low.responses()
        self.assertEqual((status, body), (b"HTTP/1.1 206 Partial Content", data[:half]))
        [(status, _, body)] = high.responses()
        self.assertEqual((status, body), (b"HTTP/1.1 206 Partial Content", data[half:]))
        self.assertFalse(low.transport.disconnecting or high.transport.disconnecting)
        opened, _, _ = await Browser(f).get(ann)
        self.assertEqual(opened, 410)


class HelperTests(TestCase):
    def test_byte_ranges(self) -> None:
        self.assertIsNone(byte_range(None, 10))
        self.assertEqual(byte_range(b"bytes=0-0", 10), (0, 0))
        self.assertEqual(byte_range(b"bytes=5-", 10), (5, 9))
        self.assertEqual(byte_range(b"bytes=5-100", 10), (5, 9))
        self.assertEqual(byte_range(b"bytes=-4", 10), (6, 9))
        self.assertIs(byte_range(b"bytes=10-", 10), False)
        self.assertIs(byte_range(b"bytes=6-5", 10), False)
        self.assertIsNone(byte_range(b"bytes=0-1,3-4", 10))  # several: served whole
        self.assertIsNone(byte_range(b"items=0-1", 10))
        # The range unit is case-insensitive (RFC 9110 14.1).
        self.assertEqual(byte_range(b"Bytes=2-5", 10), (2, 5))
        self.assertEqual(byte_range(b"BYTES=-3", 10), (7, 9))
        # Numbers longer than any offset are no range (int() of >4300 digits raised: a 500).
        self.assertIsNone(byte_range(b"bytes=" + b"9" * 5000 + b"-", 10))
        self.assertIsNone(byte_range(b"bytes=-" + b"9" * 5000, 10))
        self.assertIsNone(byte_range(b"bytes=0-" + b"9" * 20, 10))
        self.assertEqual(byte_range(b"bytes=0-" + b"9" * 19, 10), (0, 9))

    def test_content_disposition_has_an_ascii_fallback_and_the_exact_name(self) -> None:
        self.assertEqual(content_disposition("a b.txt"),
                         "attachment; filename=\"a b.txt\"; filename*=UTF-8''a%20b.txt")
        self.assertEqual(content_disposition('say "hi" 100%.txt'),
                         "attachment; filename=\"say _hi_ 100_.txt\"; "
                         "filename*=UTF-8''say%20%22hi%22%20100%25.txt")
        value = content_disposition("\u65e5\u672c;\r\n.pdf")
        self.assertNotIn("\r", value)
        self.assertTrue(value.isascii())


class SecretsNeverShownTests(TestCase):
    async def test_password_secure_message_and_links_stay_out_of_logs_and_rows(self) -> None:
        from twisted.logger import ILogObserver, eventAsText, globalLogPublisher
        from zope.interface import provider

        from tests.test_web_secrets import every_value, texts

        events: list[str] = []

        @provider(ILogObserver)
        def observe(event: Any) -> None:
            events.append(eventAsText(event, includeTimestamp=False) + repr(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        f = PageFixture()
        await f.start(self)
        secrets = ["Open-Sesame-77", "vault-code-4711"]
        [ann] = await f.sent_bundle(
            f"subject=S&password={secrets[0]}&secure_message={secrets[1]}",
            recipients=("ann%40example.org",))
        status, _ = await f.form("PUT", f"/dropbundles/{f.bundle_id}",
                                 f"password={secrets[0]}&expiry_date=bad")
        self.assertEqual(status, 400)
        status, _ = await f.form("POST", "/dropbundles",
                                 f"password={secrets[0]}&secure_message={secrets[1]}&x=1")
        self.assertEqual(status, 400)
        browser = Browser(f)
        await browser.post(ann, action="password", password=secrets[0] + "-wrong")
        await browser.post(ann, action="password", password=secrets[0])
        status, _, page = await browser.get(ann)
        self.assertIn(secrets[1].encode(), page)  # the recipient sees it, nobody else
        await browser.get(ann + "/files/999")
        token = ann.rsplit("/", 1)[1]
        self.assertTrue(events)
        for line in events:
            for secret in (*secrets, token):
                self.assertNotIn(secret, line)
        rows: list[Any] = []
        f.web.core.db.read("all", every_value).addCallback(rows.append)
        for table, values in rows[0].items():
            for row in values:
                for value in row:
                    for text in texts(value):
                        # The queued notification carries its link until it is delivered.
                        shown = secrets if table == "queue_messages" else (*secrets, token)
                        for secret in shown:
                            self.assertNotIn(secret, text, table)



class HungGateway:
    """An SMS gateway (treq's request) that takes the request and never answers: `asked`
    fires once it has it; `cancelled` holds each cancel of it."""

    def __init__(self) -> None:
        self.asked: defer.Deferred[None] = defer.Deferred()
        self.cancelled: list[object] = []

    def request(self, *_: Any, **__: Any) -> defer.Deferred[Any]:
        self.asked.callback(None)
        return defer.Deferred(self.cancelled.append)

class SmsGatewayTests(TestCase):
    async def start(self, status: int) -> tuple[PageFixture, list[dict[str, str]], str]:
        from twisted.web.resource import Resource

        from mailcore.safedrop.sms import SmsGateway

        posted: list[dict[str, str]] = []

        class Gateway(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                posted.append({k.decode(): v[0].decode() for k, v in request.args.items()})
                request.setResponseCode(status)
                return b"ok"

        f = PageFixture()
        await f.start(self)
        f.web.core.safedrop.sms = SmsGateway("http://sms.example/send", StubTreq(Gateway()),
                                             f.web.clock)
        _, bob = await f.sent_bundle("subject=Deal&require_token_auth=1")
        return f, posted, bob

    async def assertPageSays(self, browser: Browser, headers: dict[str, list[str]],
                             notice: bytes) -> None:
        """The page the code request's 303 leads to says `notice` of the way the code went,
        and not the other way's; so does the page of a wrong code posted from it."""
        [location] = headers["location"]
        other = MAILED_INSTEAD if notice == TEXTED else TEXTED
        for expected, (status, _, page) in [
                (200, await browser.get(location)),
                (403, await browser.post(location, action="code", code="x"))]:
            self.assertEqual(status, expected)
            self.assertIn(notice, page)
            self.assertNotIn(other, page)

    async def test_a_recipient_with_a_number_gets_the_code_by_text_message(self) -> None:
        f, posted, bob = await self.start(200)
        browser = Browser(f)
        status, _, page = await browser.get(bob)
        self.assertIn(b"to your phone by text message", page)
        status, headers, _ = await browser.post(bob, action="send_code")
        self.assertEqual(status, 303)
        self.assertEqual(len(posted), 1)
        self.assertEqual(posted[0]["to"], "442077394252")
        await self.assertPageSays(browser, headers, TEXTED)
        match = re.search(r"\b(\d{6})\b", posted[0]["text"])
        assert match is not None
        self.assertEqual([m for m in f.mails_to("bob@example.net")
                          if m["Subject"] == "Your safedrop code"], [])
        status, _, _ = await browser.post(bob, action="code", code=match.group(1))
        self.assertEqual(status, 303)
        status, _, page = await browser.get(bob)
        self.assertIn(b"b.bin", page)

    async def test_a_failing_gateway_falls_back_to_mail(self) -> None:
        f, posted, bob = await self.start(503)
        browser = Browser(f)
        status, headers, _ = await browser.post(bob, action="send_code")
        self.assertEqual(status, 303)
        self.assertEqual(len(posted), 1)
        self.assertEqual(len([m for m in f.mails_to("bob@example.net")
                              if m["Subject"] == "Your safedrop code"]), 1)
        await self.assertPageSays(browser, headers, MAILED_INSTEAD)

    async def test_without_a_gateway_the_page_never_says_a_text_message_went(self) -> None:
        """The way the code went is the 303's `sent`, which only the person editing their
        own address could change: `sent=sms` says nothing of a text message where none can
        go (no gateway)."""
        f = PageFixture()
        await f.start(self)
        _, bob = await f.sent_bundle("subject=Deal&require_token_auth=1")
        browser = Browser(f)
        status, headers, _ = await browser.post(bob, action="send_code")
        self.assertEqual(status, 303)
        self.assertEqual(headers["location"], [bob + "?sent=mail"])
        for query in ("?sent=mail", "?sent=sms", ""):
            _, _, page = await browser.get(bob + query)
            self.assertIn(b"We sent a one-time code to bob@example.net (text messages are not "
                          b"set up here, so it comes by email)", page, query)
            self.assertNotIn(b"by text message", page, query)

    async def test_a_gateway_that_never_answers_sends_the_code_by_mail_in_time(
            self) -> None:
        """A gateway that takes the request and never answers held the code request until
        `[web] reply_timeout` (120 s by default), with no deadline of its own. At
        SMS_TIMEOUT the message fails, its request is cancelled, and the code goes by mail,
        as with a gateway that refuses it."""
        from mailcore.safedrop.sms import SMS_TIMEOUT, SmsGateway

        gateway = HungGateway()
        f = PageFixture()
        await f.start(self)
        f.web.core.safedrop.sms = SmsGateway("http://sms.example/send", gateway, f.web.clock)
        _, bob = await f.sent_bundle("subject=Deal&require_token_auth=1")
        browser = Browser(f)
        await browser.get(bob)
        posting = defer.Deferred.fromCoroutine(browser.post(bob, action="send_code"))
        await gateway.asked
        f.web.clock.advance(SMS_TIMEOUT - 1)
        self.assertFalse(posting.called)
        self.assertEqual(gateway.cancelled, [])
        f.web.clock.advance(1)
        browser.http.flush()  # the reply, written meanwhile, to the client
        status, headers, _ = await posting
        self.assertEqual(status, 303)
        self.assertEqual(len(gateway.cancelled), 1)
        self.assertEqual(len([m for m in f.mails_to("bob@example.net")
                              if m["Subject"] == "Your safedrop code"]), 1)
        await self.assertPageSays(browser, headers, MAILED_INSTEAD)

    async def test_a_client_that_leaves_while_the_gateway_works_gets_no_code_by_mail(
            self) -> None:
        """The code's request, its client gone while the gateway has the text message: the
        message is cancelled with the request, and that is no failure of the gateway's,
        so the code does not go by mail. It went: the cancel reached SmsGateway.send as a
        CancelledError, which it made an SmsError, and send_code mailed the code, so that
        anyone holding the link could have a recipient's code that should go by text
        message sent to the mailbox instead, by closing the connection at once."""
        from twisted.web.client import ResponseNeverReceived

        from mailcore.safedrop.sms import SmsGateway

        gateway = HungGateway()
        f = PageFixture()
        await f.start(self)
        drops = f.web.core.safedrop
        drops.sms = SmsGateway("http://sms.example/send", gateway, f.web.clock)
        send_code = drops.send_code
        ended: defer.Deferred[None] = defer.Deferred()

        async def watched(found: Any) -> str | None:
            try:
                return await send_code(found)
            finally:
                ended.callback(None)

        drops.send_code = watched  # type: ignore[method-assign]
        _, bob = await f.sent_bundle("subject=Deal&require_token_auth=1")
        browser = Browser(f)
        await browser.get(bob)
        posting = defer.Deferred.fromCoroutine(browser.post(bob, action="send_code"))
        posting.addErrback(lambda failure: failure.trap(ResponseNeverReceived))
        await gateway.asked
        posting.cancel()  # the client closes its connection
        browser.http.flush()
        await ended
        self.assertEqual(len(gateway.cancelled), 1)
        self.assertEqual([m for m in f.mails_to("bob@example.net")
                          if m["Subject"] == "Your safedrop code"], [])

    def assert_given_up(self, sending: defer.Deferred[Any], transport: Any,
                        reactor: Any) -> None:
        """The daemon's client gave the message up at SMS_TIMEOUT: SmsError, its connection
        closed, no timer left."""
        from mailcore.safedrop.sms import SMS_TIMEOUT, SmsError

        failure = self.failureResultOf(sending, SmsError)
        self.assertEqual(str(failure.value),
                         f"the SMS gateway did not answer within {SMS_TIMEOUT:g} s")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def daemons_client(self, connected: bool = True) -> tuple[Any, defer.Deferred[None],
                                                               Any, Any]:
        """The daemon's client (SmsGateway.over) on a MemoryReactorClock, sending a code to
        1555: the reactor, the sending, the transport of its one connection and, when the
        gateway `connected`, its protocol (else None)."""
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from mailcore.safedrop.sms import SmsGateway

        reactor = MemoryReactorClock()
        gateway = SmsGateway.over("http://127.0.0.1:8025/send", reactor)
        sending = defer.Deferred.fromCoroutine(gateway.send("1555", "code"))
        [(_, _, factory, _, _)] = reactor.tcpClients
        transport = StringTransport()
        protocol = None
        if connected:
            protocol = factory.buildProtocol(None)
            assert protocol is not None
            protocol.makeConnection(transport)
        return reactor, sending, transport, protocol

    def test_the_daemons_client_closes_a_connection_that_never_answers(self) -> None:
        """The daemon's client (SmsGateway.over) on a connection the gateway accepted and
        never answered: at SMS_TIMEOUT, SmsError and the connection closed, no timer
        left."""
        from mailcore.safedrop.sms import SMS_TIMEOUT

        reactor, sending, transport, _ = self.daemons_client()
        [(host, port, _, _, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8025))
        self.assertIn(b"to=1555", transport.value())
        reactor.advance(SMS_TIMEOUT - 1)
        self.assertNoResult(sending)
        reactor.advance(1)
        self.assert_given_up(sending, transport, reactor)

    def test_the_daemons_client_cancelled_by_its_caller_raises_cancelled(self) -> None:
        """The daemon's client cancelled by its caller (the code's request, its client
        gone), connecting or waiting for the answer: CancelledError, not the SmsError that
        sends the code by mail (Agent fails the request with ConnectingCancelledError or
        ResponseNeverReceived, as at the deadline), the connection closed, no timer
        left."""
        for connected in (False, True):
            reactor, sending, transport, _ = self.daemons_client(connected)
            reactor.advance(1)
            sending.cancel()
            self.failureResultOf(sending, defer.CancelledError)
            self.assertEqual(transport.disconnecting, connected)
            self.assertEqual(reactor.getDelayedCalls(), [])

    def test_the_daemons_client_closes_a_connection_whose_answer_never_ends(self) -> None:
        """A gateway that sends its status and headers, then not the whole body: at
        SMS_TIMEOUT, SmsError and the connection closed, as when it sends nothing (treq's
        reading of a body cannot be cancelled: the connection stayed open, for as long as
        the gateway kept it)."""
        from mailcore.safedrop.sms import SMS_TIMEOUT

        reactor, sending, transport, protocol = self.daemons_client()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nque")
        reactor.advance(SMS_TIMEOUT - 1)
        self.assertNoResult(sending)
        self.assertFalse(transport.disconnecting)
        reactor.advance(1)
        self.assert_given_up(sending, transport, reactor)

    async def test_the_daemons_gateway_client_posts_over_a_real_socket(self) -> None:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        from mailcore.safedrop.sms import SmsError, SmsGateway
        from tests.support.browser import serve
        from tests.support.reactor import get_reactor

        posted: list[dict[bytes, list[bytes]]] = []

        class Gateway(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                posted.append(dict(request.args))
                request.setResponseCode(202 if posted[-1][b"to"] == [b"1555"] else 400)
                return b"queued"

        base = serve(self, Site(Gateway()))
        gateway = SmsGateway.over(base + "/send", get_reactor())
        await gateway.send("1555", "Your safedrop code: 123456")
        self.assertEqual(posted, [{b"to": [b"1555"], b"text": [b"Your safedrop code: 123456"]}])
        with self.assertRaises(SmsError):
            await gateway.send("2666", "x")


class GrantCookieTests(TestCase):
    def test_a_forged_cookie_with_other_scripts_digits_grants_nothing(self) -> None:
        from mailcore.safedrop.access import Grants

        grants = Grants(b"k" * 32)
        digest = b"d" * 32
        good = grants.make(digest, "p", 1_000.0)
        self.assertEqual(grants.levels(digest, good, 1_000.0), "p")
        for forged in ("p.١٢٣٤٥.abc", "p.99999999999.ÿÿ", "ü.1.2", "p." + "9" * 5000 + ".abc",
                       "p.1" + "0" * 12 + ".abc"):
            self.assertEqual(grants.levels(digest, forged, 1_000.0), "")

    def test_one_time_codes_are_stored_keyed(self) -> None:
        """A copy of the database does not give a code away: its digest depends on the
        node's key, not only on the recipient and the six digits."""
        import hashlib

        from mailcore.safedrop.access import Grants

        one, other = Grants(b"k" * 32), Grants(b"j" * 32)
        self.assertEqual(one.code_digest(7, "123456"), one.code_digest(7, "123456"))
        self.assertNotEqual(one.code_digest(7, "123456"), other.code_digest(7, "123456"))
        self.assertNotEqual(one.code_digest(7, "123456"), one.code_digest(8, "123456"))
        self.assertNotEqual(one.code_digest(7, "123456"),
                            hashlib.sha256(b"7:123456").digest())

"""safedrop in headless Chromium (JavaScript off), against the site on a real socket: a
recipient opens the link from the notification, enters the password and downloads the file
with the page's button (a form: a read_remove file's download starts from a click, never
from a GET of an address a link scanner could follow; the bytes are equal); with read_remove
the link then says the drop is gone and the file is deleted from disk; a second recipient
with token auth receives the code by mail and enters it; an expired drop says so.
Screenshots are kept in the test's temp dir.

The password test runs against the real daemon (twistd on free ports): it sends the
notification through its queue to an SMTP sink of ours on 127.0.0.1 (`[queue] relayhost`),
and the link is taken from the body of the message the sink received. The token test needs
the drop to expire, so it runs on the in-process site with a Clock and reads the mails where
the service queued them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import treq
from twisted.internet import task
from twisted.trial.unittest import TestCase

from tests.support.browser import Browser, serve
from tests.support.reactor import get_reactor
from tests.support.safedrop_daemon import SafedropDaemonTestCase
from tests.test_web_safedrop_api import MULTIPART, multipart_file
from tests.test_web_safedrop_pages import PageFixture
from web.root import build_site


async def type_into(browser: Browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    await browser.run(lambda: browser.driver.find_element(By.ID, element_id).send_keys(text))


async def download(browser: Browser, name: str, where: Path) -> bytes:
    """Click the download button (read_remove: a form that posts) or the link named `name`
    and wait (up to 20 s) for the file to be saved."""
    from selenium.webdriver.common.by import By

    def click() -> None:
        buttons = [b for b in browser.driver.find_elements(By.TAG_NAME, "button")
                   if b.text.strip() == name]
        (buttons[0] if buttons else browser.driver.find_element(By.LINK_TEXT, name)).click()

    await browser.run(lambda: browser.driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(where)}))
    await browser.run(click)
    for _ in range(200):
        saved = _saved(where, name)
        if saved is not None:
            return saved
        await task.deferLater(get_reactor(), 0.1, lambda: None)
    raise AssertionError(f"{name} was not downloaded into {where}")


def _absolute(path: str) -> Path:
    return Path(os.path.abspath(path))


def _saved(where: Path, name: str) -> bytes | None:
    """The bytes of a finished download, or None while it is not there yet."""
    target = where / name
    if target.exists() and not list(where.glob("*.crdownload")):
        return target.read_bytes()
    return None


class DaemonWithSink(SafedropDaemonTestCase):
    """The real daemon, its queue relaying every mail to an SMTP sink on 127.0.0.1, and
    alice's API session on it (start_with_sink)."""

    async def api(self, method: str, path: str, data: Any,
                  headers: dict[str, str] | None = None) -> Any:
        all_headers = dict(self.auth)
        for name, value in (headers or {}).items():
            all_headers[name] = value
        response = await self.http.request(method, self.base_url + path, data=data,
                                           headers=all_headers)
        body = await treq.content(response)
        self.assertEqual(response.code, 200, body)
        return json.loads(body) if body else None

    async def sent_bundle(self, fields: dict[str, str], recipient: str,
                          files: tuple[tuple[str, bytes], ...]) -> int:
        """A bundle with one recipient and `files`, sent; its id."""
        bundle = await self.api("POST", "/dropbundles", fields)
        self.bundle_id = int(bundle["id"])
        await self.api("POST", f"/dropbundles/{self.bundle_id}/dropbundlerecipients",
                       {"email": recipient})
        for name, data in files:
            await self.api("POST", f"/dropbundles/{self.bundle_id}/dropfiles",
                           multipart_file(name, data), MULTIPART)
        response = await self.http.get(f"{self.base_url}/dropbundles/{self.bundle_id}?send",
                                       headers=self.auth)
        self.assertEqual(response.code, 200, await treq.content(response))
        await treq.content(response)
        return self.bundle_id

    def stored_files(self) -> list[str]:
        root = self.data_dir / "safedrop" / str(self.bundle_id)
        return sorted(p.name for p in root.glob("*")) if root.exists() else []

    async def stored_files_settled(self) -> list[str]:
        """The stored files once the daemon has finished with them: the browser has the
        last byte before the daemon records the download and deletes the file, so wait
        (up to 10 s) for the directory to change."""
        for _ in range(100):
            stored = self.stored_files()
            if not stored:
                return stored
            await task.deferLater(get_reactor(), 0.1, lambda: None)
        return self.stored_files()


class RecipientOfADeliveredNotificationTests(DaemonWithSink):
    async def test_password_download_and_read_remove(self) -> None:
        await self.start_with_sink()
        data = bytes(range(256)) * 40
        await self.sent_bundle(
            {"subject": "Plans", "message": "Hello <b>you</b>", "password": "Open-Sesame-77",
             "secure_message": "vault 4711"},
            "ann@example.org", files=(("plans.bin", data),))
        link_path = await self.delivered_link("ann@example.org")
        link = self.base_url + link_path
        browser = await Browser.start(self)

        await browser.get(link)
        await browser.screenshot("1-password")
        self.assertEqual(await browser.title(), "Plans · Mailcore")
        self.assertNotIn("plans.bin", await browser.text())
        await type_into(browser, "password", "Open-Sesame-77")
        await browser.click_button("Open")
        await browser.screenshot("2-drop")
        page = await browser.text()
        for shown in ("From alice@example.test", "Hello <b>you</b>", "vault 4711", "plans.bin"):
            self.assertIn(shown, page)

        saved = await download(browser, "plans.bin", _absolute(self.mktemp()))
        self.assertEqual(saved, data)
        # the only recipient has read it all
        self.assertEqual(await self.stored_files_settled(), [])

        await browser.get(link)
        await browser.screenshot("3-gone")
        self.assertEqual(await browser.title(), "Drop no longer available · Mailcore")
        self.assertIn("You have downloaded every file", await browser.text())


class RecipientInChromiumTests(TestCase):
    async def test_token_auth_by_mail_and_an_expired_drop(self) -> None:
        f = PageFixture()
        await f.start(self)
        # START is 2023-11-14T22:13:20Z; the drop expires an hour later.
        _, bob_path = await f.sent_bundle(
            "subject=Deal&require_token_auth=1&expiry_date=2023-11-14T23%3A13%3A20Z")
        link = serve(self, build_site(f.web.core)) + bob_path
        browser = await Browser.start(self)

        await browser.get(link)
        await browser.screenshot("1-token")
        self.assertIn("one-time code", await browser.text())
        await browser.click_button("Send me a code")
        await browser.screenshot("2-code-sent")
        self.assertIn("We sent a one-time code to bob@example.net", await browser.text())
        mails: list[Any] = [m for m in f.mails_to("bob@example.net")
                            if m["Subject"] == "Your safedrop code"]
        match = re.search(r"\b(\d{6})\b", mails[0].get_content())
        assert match is not None
        await type_into(browser, "code", match.group(1))
        await browser.click_button("Check the code")
        await browser.screenshot("3-drop")
        self.assertIn("b.bin", await browser.text())

        f.web.clock.advance(3600)
        await browser.get(link)
        await browser.screenshot("4-expired")
        self.assertEqual(await browser.title(), "Drop no longer available · Mailcore")
        self.assertIn("This drop has expired.", await browser.text())

    async def test_a_link_scanner_consumes_nothing_and_a_click_downloads(self) -> None:
        """read_remove: a scanner (a mail gateway, a chat preview) GETs the link and the
        addresses it finds; the recipient then opens a file's address (here its own page,
        as from a copied address) and the drop, and gets each file by clicking."""
        f = PageFixture()
        await f.start(self)
        [ann] = await f.sent_bundle("subject=Deal", recipients=("ann%40example.org",),
                                    files=(("a.bin", b"A" * 3000), ("b.bin", b"B" * 500)))
        base = serve(self, build_site(f.web.core))
        seen: list[str] = []
        todo = [ann]
        while todo:
            path = todo.pop()
            seen.append(path)
            response = await treq.get(base + path, persistent=False)
            body = await treq.content(response)
            self.assertEqual(response.code, 200, path)
            self.assertNotIn(b"AAAA", body)
            todo += [m.decode() for m in re.findall(rb'action="(/drop/[^"]+)"', body)
                     if m.decode() not in seen]
        self.assertEqual(len(seen), 3)
        self.assertEqual(len(f.stored_files()), 2)
        data = {"a.bin": b"A" * 3000, "b.bin": b"B" * 500}
        where = _absolute(self.mktemp())
        browser = await Browser.start(self)

        await browser.get(base + seen[1])  # one file's address
        await browser.screenshot("1-file-page")
        page = await browser.text()
        self.assertIn("self-destructs", page)
        first = "a.bin" if "a.bin" in page else "b.bin"
        self.assertEqual(await download(browser, first, where), data.pop(first))
        await browser.get(base + ann)
        await browser.screenshot("2-drop")
        self.assertIn("downloaded", await browser.text())
        [(other, rest)] = data.items()
        self.assertEqual(await download(browser, other, where), rest)
        for _ in range(100):
            if not f.stored_files():
                break
            await task.deferLater(get_reactor(), 0.1, lambda: None)
        self.assertEqual(f.stored_files(), [])
        await browser.get(base + ann)
        await browser.screenshot("3-gone")
        self.assertEqual(await browser.title(), "Drop no longer available · Mailcore")

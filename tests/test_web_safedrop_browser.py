"""safedrop in headless Chromium (JavaScript off), against the site on a real socket: a
recipient opens the link from the notification, enters the password and downloads the file
(the bytes are equal); with read_remove the link then says the drop is gone and the file is
deleted from disk; a second recipient with token auth receives the code by mail and enters
it; an expired drop says so. Screenshots are kept in the test's temp dir.

The notification is read from the spool where the service queued it (a delivery to an SMTP
sink is the queue's business, tested on its own)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import TestCase

from tests.support.browser import Browser, serve
from tests.support.reactor import get_reactor
from tests.test_web_safedrop_pages import PageFixture
from web.root import build_site


async def type_into(browser: Browser, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    await browser.run(lambda: browser.driver.find_element(By.ID, element_id).send_keys(text))


async def download(browser: Browser, name: str, where: Path) -> bytes:
    """Click the link named `name` and wait (up to 20 s) for the file to be saved."""
    from selenium.webdriver.common.by import By

    await browser.run(lambda: browser.driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(where)}))
    await browser.run(lambda: browser.driver.find_element(By.LINK_TEXT, name).click())
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


class RecipientInChromiumTests(TestCase):
    async def test_password_download_and_read_remove(self) -> None:
        f = PageFixture()
        await f.start(self)
        data = bytes(range(256)) * 40
        [link_path] = await f.sent_bundle(
            "subject=Plans&message=Hello+%3Cb%3Eyou%3C%2Fb%3E&password=Open-Sesame-77"
            "&secure_message=vault+4711",
            recipients=("ann%40example.org",), files=(("plans.bin", data),))
        link = serve(self, build_site(f.web.core)) + link_path
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
        self.assertEqual(f.stored_files(), [])  # the only recipient has read it all

        await browser.get(link)
        await browser.screenshot("3-gone")
        self.assertEqual(await browser.title(), "Drop no longer available · Mailcore")
        self.assertIn("You have downloaded every file", await browser.text())

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

"""Headless Chromium, driven by Selenium, for tests that click through pages as a person.

`await Browser.start(test)` starts Debian's `chromium` through `chromedriver` (both given by
path: Selenium Manager would try to download a driver), with JavaScript off unless asked
for (our pages must work without it). It skips the test when Selenium, chromium or
chromedriver is missing, and fails it under CI=true. The browser quits when the test ends.

Selenium's calls block, so each runs in the reactor's thread pool (`deferToThreadPool`)
while the reactor goes on serving the site under test. Screenshots are PNGs in the test's
temp dir (`Browser.shots`), for a person to look at. Chromium's own scratch files go to a
TMPDIR of the test's, removed with it, not to /tmp.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.support.reactor import get_reactor
from tests.support.servers import missing, require_binary

T = TypeVar("T")

WINDOW = (1000, 700)


class Browser:
    """One headless Chromium session."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.driver = driver
        self.shots = shots

    @classmethod
    async def start(cls, test: TestCase, *, javascript: bool = False,
                    arguments: Sequence[str] = ()) -> Browser:
        """A browser for `test` (skipped, or failed under CI=true, without Chromium), with
        Chromium's command-line `arguments` added (e.g. `host_map`'s)."""
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            raise missing("selenium is not installed: pip install -e '.[test]'") from None
        chromium = require_binary("chromium", "chromium")
        chromedriver = require_binary("chromedriver", "chromium-driver")
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--disable-gpu",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync"):
            options.add_argument(arg)  # --no-sandbox: the tests may run as root
        for arg in arguments:
            options.add_argument(arg)
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        options.binary_location = chromium

        # Chromium keeps its singleton socket in a directory it makes under TMPDIR and
        # leaves behind: give it a scratch TMPDIR of its own, removed when the test ends.
        # Short, under /tmp: the socket's path must fit a sockaddr_un (108 bytes).
        scratch = await _in_thread(tempfile.mkdtemp, "", "mailcore-chromium-")
        test.addCleanup(_in_thread, shutil.rmtree, scratch, True)
        env = {**os.environ, "TMPDIR": scratch}

        def launch() -> Any:
            return webdriver.Chrome(service=Service(chromedriver, env=env), options=options)

        shots = Path(test.mktemp())
        await _in_thread(shots.mkdir, 0o755, True)
        driver = await _in_thread(launch)
        browser = cls(driver, shots)
        test.addCleanup(lambda: defer.Deferred.fromCoroutine(browser.quit()))
        return browser

    async def run(self, f: Callable[..., T], *args: Any) -> T:
        """`f(*args)` (a blocking Selenium call) in a thread."""
        return await _in_thread(f, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def title(self) -> str:
        return str(await self.run(lambda: self.driver.title))

    async def text(self) -> str:
        """The visible text of the page."""
        from selenium.webdriver.common.by import By

        return str(await self.run(lambda: self.driver.find_element(By.TAG_NAME, "body").text))

    async def click_button(self, label: str) -> None:
        """Click the button whose text is `label` and wait for the next page to load."""
        from selenium.common.exceptions import (
            StaleElementReferenceException,
            TimeoutException,
            WebDriverException,
        )
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def click() -> None:
            buttons = [b for b in self.driver.find_elements(By.TAG_NAME, "button")
                       if b.text.strip() == label]
            if len(buttons) != 1:
                raise AssertionError(f"{len(buttons)} buttons labelled {label!r}")
            page = self.driver.find_element(By.TAG_NAME, "html")

            def gone(driver: Any) -> bool:
                """Selenium's staleness_of, also taking ChromeDriver's answer for an element
                of a page that is being replaced ("does not belong to the document")."""
                try:
                    page.is_enabled()
                except StaleElementReferenceException:
                    return True
                except WebDriverException as e:
                    if "does not belong to the document" in str(e):
                        return True
                    raise
                return False

            buttons[0].click()
            # The click returns once the form is submitted, not always once the next page
            # is in: wait until the old page is gone (the driver's next command then waits
            # for the new one to load).
            try:
                WebDriverWait(self.driver, 10).until(gone)
            except TimeoutException:
                pass  # as before this wait: the test's own checks say what the page is

        await self.run(click)

    async def css(self, tag: str, prop: str) -> str:
        """The computed CSS property `prop` of the first `tag` element."""
        from selenium.webdriver.common.by import By

        return str(await self.run(
            lambda: self.driver.find_element(By.TAG_NAME, tag).value_of_css_property(prop)))

    async def screenshot(self, name: str) -> Path:
        """Save a PNG of the window as `{shots}/{name}.png`."""
        path = self.shots / f"{name}.png"
        ok = await self.run(self.driver.save_screenshot, str(path))
        if not ok:
            raise AssertionError(f"no screenshot saved at {path}")
        return path

    async def quit(self) -> None:
        await self.run(self.driver.quit)


def host_map(*names: str) -> str:
    """The Chromium argument that resolves host `names` to 127.0.0.1, so that a test may
    serve sites under names: an http:// site under a name other than localhost or an IP
    loopback address is not a potentially trustworthy origin (no `Sec-Fetch-*` headers),
    and names under one parent are one site with each other (sibling subdomains)."""
    return "--host-resolver-rules=" + ", ".join(f"MAP {name} 127.0.0.1" for name in names)


async def _in_thread(f: Callable[..., T], *args: Any) -> T:
    reactor = get_reactor()
    result: T = await threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return result


def serve(test: TestCase, factory: Factory[Any]) -> str:
    """Listen with `factory` on a free port of 127.0.0.1 until `test` ends, then wait for
    every connection (a browser keeps them alive) to close; returns the base URL."""
    reactor = get_reactor()
    closed: list[defer.Deferred[None]] = []
    build = factory.buildProtocol

    def build_protocol(addr: Any) -> Any:
        protocol = build(addr)
        if protocol is None:
            return None
        done: defer.Deferred[None] = defer.Deferred()
        closed.append(done)
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            try:
                lost(reason)
            finally:
                done.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        return protocol

    factory.buildProtocol = build_protocol  # type: ignore[method-assign]
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")

    async def stop() -> None:
        await defer.maybeDeferred(port.stopListening)
        await defer.gatherResults(closed)

    # Registered first, so it runs after the browser (registered later) has quit.
    test.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"


"""A person releases a quarantined message in headless Chromium (JavaScript off): the digest
link shows the message, the Release button releases it, and the link opened again says it
was released already. The site listens on a real socket; screenshots are kept in the
test's temp dir."""

from __future__ import annotations

import email
import html
import re
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.support.browser import Browser, serve
from tests.support.quarantine import GTUBE, Gateway, message, stopper
from web.root import build_site

LINK = re.compile(r"https://[^/\s]+(/quarantine/release/\S+)")


class OtherSite(Resource):
    """A page on another site whose button posts to the release link (a CSRF attempt)."""

    isLeaf = True

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return (
            "<!DOCTYPE html><html><head><title>Prize</title></head><body>"
            f'<form method="post" action="{html.escape(self.target, quote=True)}">'
            '<input type="hidden" name="csrf_token" value="guess">'
            "<button>Claim your prize</button></form></body></html>"
        ).encode()


async def quarantined_link(test: TestCase) -> tuple[Gateway, str]:
    """A gateway holding one message, and the path of its digest's release link."""
    gw = Gateway()
    test.addCleanup(stopper(gw))
    user = await gw.owner("alice")
    await gw.core.identity.set_plan(user.id, "standard")
    await gw.domain(user, "q.test", spam_action=0, send_resume=True)
    await gw.send(message("Invoice <March> & more", GTUBE), "joe@q.test",
                  sender="billing@x.test")
    gw.core.quarantine.startService()
    gw.clock.advance(gw.core.quarantine.settings.digest_interval)
    [(_sender, _rcpts, digest)] = gw.delivered()
    text = email.message_from_bytes(digest).get_payload(decode=True)
    assert isinstance(text, bytes)
    [path] = LINK.findall(text.decode())
    return gw, path


class ReleaseInChromiumTests(TestCase):
    async def test_a_person_releases_a_message_from_the_digest_link(self) -> None:
        gw, path = await quarantined_link(self)
        link = serve(self, build_site(gw.core)) + path
        browser = await Browser.start(self)

        await browser.get(link)
        await browser.screenshot("1-quarantined")
        self.assertEqual(await browser.title(), "Quarantined message · Mailcore")
        page = await browser.text()
        for shown in ("Subject\nInvoice <March> & more", "From\nbilling@x.test",
                      "To\njoe@q.test", "Date\n2023-11-14T22:13:20"):
            self.assertIn(shown, page)
        # The stylesheet arrived (the CSP allows it): the button has the accent colour.
        self.assertEqual(await browser.css("button", "background-color"),
                         "rgba(31, 95, 191, 1)")
        self.assertEqual(len(gw.delivered()), 1)  # looking released nothing

        await browser.click_button("Release this message")
        await browser.screenshot("2-released")
        self.assertEqual(await browser.title(), "Released · Mailcore")
        self.assertIn("The message was released and is on its way.", await browser.text())
        released = gw.delivered()[1:]
        self.assertEqual([(s, r) for s, r, _b in released], [("billing@x.test", ["joe@q.test"])])

        await browser.get(link)
        await browser.screenshot("3-already-released")
        self.assertEqual(await browser.title(), "Already released · Mailcore")
        page = await browser.text()
        self.assertIn("This message was released already.", page)
        self.assertNotIn("Release this message", page)
        self.assertEqual(len(gw.delivered()), 2)

    async def test_a_button_on_another_site_cannot_release(self) -> None:
        gw, path = await quarantined_link(self)
        link = serve(self, build_site(gw.core)) + path
        # "localhost" is another site than "127.0.0.1" for the browser (and its cookies).
        other = serve(self, Site(OtherSite(link))).replace("127.0.0.1", "localhost")
        browser = await Browser.start(self)
        await browser.get(link)  # the person has seen the page: the browser has the cookie
        await browser.get(other + "/prize")
        await browser.click_button("Claim your prize")
        await browser.screenshot("refused")
        self.assertEqual(await browser.title(), "Form expired · Mailcore")
        self.assertIn("did not come from this site, so nothing was done", await browser.text())
        self.assertEqual(len(gw.delivered()), 1)  # the digest only
        # The person's own click still works.
        await browser.get(link)
        await browser.click_button("Release this message")
        self.assertEqual(await browser.title(), "Released · Mailcore")
        self.assertEqual(len(gw.delivered()), 2)

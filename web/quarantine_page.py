"""The release page that quarantine digest links open.

`GET /quarantine/release/{token}` shows the message's date, sender and subject and a button;
only `POST` to the same path releases it, so mail scanners that fetch links in advance
release nothing. The token (signed, expiring; see mailcore.gateway.quarantine) is the credential.
A message is released once: a second POST says it was released already. Tampered or
expired links get a 404 page that says the link is not valid.
"""

from __future__ import annotations

from html import escape

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.gateway.quarantine import (
    ALREADY,
    MISSING,
    QuarantineError,
    QuarantineService,
    rfc3339,
)
from web.api import ApiApp
from web.errors import PlainErrors
from web.openapi import Reply, RouteTable
from web.settings import WebSettings

_HTML = {"type": "string"}


def page(title: str, body: str) -> bytes:
    """A small self-contained HTML page."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"robots\" content=\"noindex\">"
        f"<title>{escape(title)}</title></head>\n<body>\n<h1>{escape(title)}</h1>\n"
        f"{body}\n</body></html>\n"
    ).encode()


class QuarantinePageApp(ApiApp):
    name = "quarantine"
    title = "Quarantine release page (digest links)"
    shape = PlainErrors()
    app = Klein()
    routes = RouteTable(app, "quarantine")

    def __init__(self, settings: WebSettings, *, quarantine: QuarantineService) -> None:
        super().__init__(settings)
        self.quarantine = quarantine

    def html(self, request: IRequest, status: int, title: str, body: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Frame-Options", b"DENY")
        return page(title, body)

    def invalid(self, request: IRequest) -> bytes:
        return self.html(request, 404, "Link not valid",
                         "<p>This release link is not valid or has expired.</p>")

    @routes.route(
        "/quarantine/release/<token>",
        "GET",
        summary="Show a quarantined message and a release button",
        replies={200: Reply("HTML page", _HTML, content_type="text/html")},
        errors=(404,),
    )
    async def show(self, request: IRequest, token: str) -> bytes:
        ident = self.quarantine.link_ident(token)
        held = await self.quarantine.find(ident) if ident else None
        if held is None:
            return self.invalid(request)
        summary = (
            "<dl>"
            f"<dt>Date</dt><dd>{escape(rfc3339(held.date))}</dd>"
            f"<dt>To</dt><dd>{escape(held.email)}</dd>"
            f"<dt>From</dt><dd>{escape(held.mailfrom or '<>')}</dd>"
            f"<dt>Subject</dt><dd>{escape(held.subject)}</dd>"
            f"<dt>Held because</dt><dd>{escape(held.reason)}</dd>"
            "</dl>"
        )
        if held.released_at is not None:
            return self.html(request, 200, "Already released",
                             summary + "<p>This message was released already.</p>")
        form = (
            f'<form method="post" action="/quarantine/release/{escape(token, quote=True)}">'
            '<button type="submit">Release this message</button></form>'
        )
        return self.html(request, 200, "Quarantined message", summary + form)

    @routes.route(
        "/quarantine/release/<token>",
        "POST",
        summary="Release the quarantined message the link names (once)",
        replies={200: Reply("HTML page", _HTML, content_type="text/html")},
        errors=(404, 409),
    )
    async def release(self, request: IRequest, token: str) -> bytes:
        ident = self.quarantine.link_ident(token)
        if ident is None:
            return self.invalid(request)
        try:
            status = await self.quarantine.release(ident)
        except QuarantineError:
            return self.html(request, 503, "Try again later",
                             "<p>The message could not be released now.</p>")
        if status == MISSING:
            return self.invalid(request)
        if status == ALREADY:
            return self.html(request, 409, "Already released",
                             "<p>This link was used already: the message was released.</p>")
        return self.html(request, 200, "Released",
                         "<p>The message was released and is on its way.</p>")

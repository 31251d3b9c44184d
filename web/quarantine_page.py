"""The release page that quarantine digest links open.

`GET /quarantine/release/{token}` shows the message's date, sender and subject and a button;
only `POST` to the same path releases it, so mail scanners that fetch links in advance
release nothing. The token (signed, expiring; see mailcore.gateway.quarantine) is the credential;
the form also carries a CSRF token (web.pages) bound to the link, so another site cannot
make a visitor's browser post it. A message is released once: a second POST says it was
released already. Tampered or expired links get a 404 page that says the link is not valid;
a POST without the form's CSRF token gets a 403 page and releases nothing.
"""

from __future__ import annotations

from klein import Klein
from twisted.web.iweb import IRequest

from mailcore.gateway.quarantine import (
    ALREADY,
    MISSING,
    SUSPENDED,
    QuarantineError,
    QuarantineService,
    rfc3339,
)
from web.openapi import RouteTable
from web.pages import PageApp, PageError, Pages, form_body, page_replies
from web.settings import WebSettings


def _csrf_bind(token: str) -> str:
    """The release form's CSRF token is bound to the link: one made on another link's page
    does not release this one."""
    return "release:" + token


def invalid() -> PageError:
    """The 404 of a tampered, expired or unknown link."""
    return PageError(404, "Link not valid", "This release link is not valid or has expired.")


class QuarantinePageApp(PageApp):
    name = "quarantine"
    title = "Quarantine release page (digest links)"
    app = Klein()
    routes = RouteTable(app, "quarantine")

    def __init__(
        self, settings: WebSettings, *, pages: Pages, quarantine: QuarantineService
    ) -> None:
        super().__init__(settings, pages=pages)
        self.quarantine = quarantine

    @routes.route(
        "/quarantine/release/<token>",
        "GET",
        summary="Show a quarantined message and a release button",
        replies=page_replies({
            200: "HTML page: the message and a release form (or: released already)",
            404: "HTML page: the link is not valid or has expired",
        }),
    )
    async def show(self, request: IRequest, token: str) -> bytes:
        ident = self.quarantine.link_ident(token)
        held = await self.quarantine.find(ident) if ident else None
        if held is None:
            raise invalid()
        title = "Already released" if held.released_at is not None else "Quarantined message"
        return self.pages.render(request, "quarantine_release.html", title=title, held=held,
                                 date=rfc3339(held.date), csrf_bind=_csrf_bind(token))

    @routes.route(
        "/quarantine/release/<token>",
        "POST",
        summary="Release the quarantined message the link names (once)",
        body=form_body(),
        body_types=("application/x-www-form-urlencoded",),
        replies=page_replies({
            200: "HTML page: released",
            403: "HTML page: the account the message is kept for is suspended (it stays "
                 "held), or the form expired",
            404: "HTML page: the link is not valid or has expired",
            409: "HTML page: released already",
            503: "HTML page: the message could not be released now",
        }, form=True),
    )
    async def release(self, request: IRequest, token: str) -> bytes:
        ident = self.quarantine.link_ident(token)
        if ident is None:
            raise invalid()
        self.pages.check_csrf(request, purpose="release", bind=_csrf_bind(token))
        try:
            status = await self.quarantine.release(ident)
        except QuarantineError:
            raise PageError(503, "Try again later",
                            "The message could not be released now.") from None
        if status == MISSING:
            raise invalid()
        if status == SUSPENDED:
            return self.pages.message(
                request, 403, "Not now",
                "The account this message is kept for is suspended: the message stays in "
                "quarantine, and this link releases it once the account is active again.")
        if status == ALREADY:
            return self.pages.message(
                request, 409, "Already released",
                "This link was used already: the message was released.")
        return self.pages.message(request, 200, "Released",
                                  "The message was released and is on its way.")

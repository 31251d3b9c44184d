"""The page a safedrop recipient opens: `/drop/{token}` (the link in the notification).

Server-rendered (web.pages: autoescaped templates, security headers, CSRF-checked forms),
no JavaScript. The link opens the drop; a password prompt comes first when the bundle has
one (each link may guess `PASSWORD_RATE`, then 429 with Retry-After: this and the other
per-link rates are kept in the store, mailcore.ratelimits, so every node counts together; and
`PASSWORD_FAILURES` wrong passwords in all, counted in the store, lock it for a day, as wrong
one-time codes do: mailcore.safedrop.access.Lockout), then with
require_token_auth a one-time code sent to the recipient: by text message through
`[safedrop] sms_gateway` when it has a telephone number and a gateway is configured, else by
mail (the page says which: the redirect after a new code names the way it went, `?sent=sms`
or `?sent=mail`, so a code the gateway failed to send is said to have come by mail; only the
recipient editing that address changes what their page says, and `sms` is believed only
where a text message can go). The checks
passed are kept in a signed cookie scoped to the link's path (mailcore.safedrop.access).
Then the message, the secure message and the files: `/drop/{token}/files/{id}` streams a
file from disk in chunks read on a thread pool, with backpressure, as
`application/octet-stream` with an RFC 6266 `filename*`, and honours a single byte Range
(206, 416), and If-Range against the file's ETag (the SHA-256 of its bytes: browsers
resume a download only with a strong validator). A read_remove file self-destructs once
downloaded, and link scanners (mail security gateways, chat previews) GET the addresses
they see: so its download starts from a person's click only. The drop page has a button
(a CSRF-checked POST to the file's address) per file; the POST sets a cookie for that
file's address (`DOWNLOAD_COOKIE`, lasting mailcore.safedrop.access.DOWNLOAD_GRANT_SECONDS)
and redirects (303) to it, and
only a GET that carries the cookie downloads (and resumes). A GET without it downloads
nothing and counts nothing: it is a page with the button (a Range without it, a browser
resuming after the cookie ran out, is a 403 page). A file counts as downloaded (receipts,
read_remove) once the recipient was sent every byte of it: in one response, or in parts
(ranges, a download resumed after it broke off: what was written before it did counts)
that together cover it; a range that merely ends at the end (`bytes=-1`) is a part. Under
read_remove a file also counts once `[safedrop] max_download_attempts` downloads of it
started (when the last one ends), and no download of a file that counts starts again
(410). Under read_remove a download of bytes another download of the same link and file is
still sending ends that one first (`Sending`). With allow_comments (and
require_token_auth) a reply form mails the sender (`COMMENT_RATE` per link, then 429). An
unknown link is a 404 page; an expired or removed drop, or one a recipient has read in
full under read_remove, a 410 page.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, cast

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest

from mailcore.ratelimits import SharedBuckets
from mailcore.safedrop.access import (
    CHECK_CODE,
    CHECK_PW,
    CODE_OK,
    CODE_WRONG,
    DOWNLOAD_GRANT_SECONDS,
    Access,
    DropGone,
    DropPaused,
    LinkInvalid,
)
from mailcore.safedrop.model import DropFile
from mailcore.safedrop.service import (
    CODE_BY_MAIL,
    CODE_BY_SMS,
    LINK_PATH,
    SafedropService,
    link_digest,
    rfc3339,
)
from mailcore.text import has_control_multiline, shown
from web.api import is_head
from web.errors import ApiError
from web.openapi import Reply, RouteTable
from web.pacing import paced
from web.pages import (
    PageApp,
    PageError,
    Pages,
    form_body,
    get_cookie,
    page_replies,
    redirect,
    set_cookie,
)
from web.parsing import query_lists
from web.ratelimit import Limiter, Rate, SharedRateLimiter
from web.replies import content_disposition
from web.settings import WebSettings

log = Logger()

GRANT_COOKIE = "mc_drop"
# A read_remove file's download grant, scoped to that file's address.
DOWNLOAD_COOKIE = "mc_drop_dl"
PASSWORD_RATE = Rate(5, 300)
# New one-time codes per link: each is a mail or a text message to the recipient (and an
# SMS gateway's bill); three at once, then one every five minutes.
CODE_SEND_RATE = Rate(3, 900)
# Replies per link (allow_comments): each is a mail to the sender; ten at once, then one
# every six minutes, so that whoever holds a link cannot flood the sender's mailbox.
COMMENT_RATE = Rate(10, 3600)
CHUNK = 64 * 1024
MAX_COMMENT = 10_000
# At most 19 digits a number (a 64-bit offset): longer is no range we serve, and int() of
# more than 4300 digits raises.
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII | re.IGNORECASE)
_MAX_RANGE_HEADER = 64
# The query of the redirect after a new code: the way it went (CODE_BY_SMS, CODE_BY_MAIL).
SENT_QUERY = {"sent": {"type": "string",
                       "description": f"`{CODE_BY_SMS}` or `{CODE_BY_MAIL}`: the way the code "
                                      "last asked for went (the redirect after it names it), "
                                      "which the code step says; any other value is taken "
                                      "as none"}}
SELF_DESTRUCTED = ("You have downloaded this file (or started all the downloads of it "
                   "allowed); it self-destructs and cannot be downloaded again.")


@dataclass
class Written:
    """Bytes of a file handed to the client's transport by one response so far."""

    bytes: int = 0


@dataclass
class _Sending:
    """One download under way: the bytes it was asked for, and who waits for its end."""

    first: int
    last: int
    request: IRequest
    written: bool = False  # every byte was handed to the transport: it is only recording
    waiting: list[defer.Deferred[None]] = field(default_factory=list)


class Sending:
    """The downloads of read_remove files under way in this process, by recipient and
    file. A download of bytes that one under way is sending too ends that one (a resumed
    download replaces its stale connection; a link forwarded and opened at the same time
    does not get the file twice), unless that one has written all it had to, and waits
    until it has recorded what it sent. Downloads of other bytes (a download manager's
    parallel ranges) go on side by side. Per process: nodes sharing a store each keep
    their own."""

    def __init__(self) -> None:
        self._live: dict[tuple[int, int], list[_Sending]] = {}

    async def take(self, key: tuple[int, int], first: int, last: int,
                   request: IRequest) -> _Sending:
        """Register a download of bytes `first` to `last`, once every older download of
        any of them has ended; `release` it when it has recorded what it sent."""
        mine = _Sending(first, last, request)
        live = self._live.setdefault(key, [])
        older = [s for s in live if s.first <= last and first <= s.last]
        live.append(mine)
        try:
            for other in older:
                ended: defer.Deferred[None] = defer.Deferred()
                other.waiting.append(ended)
                if not other.written:
                    _abort(other.request)
                await ended
        except BaseException:
            self.release(key, mine)
            raise
        return mine

    def release(self, key: tuple[int, int], mine: _Sending) -> None:
        live = self._live.get(key, [])
        if mine in live:
            live.remove(mine)
        if not live:
            self._live.pop(key, None)
        waiting, mine.waiting = mine.waiting, []
        for ended in waiting:
            if not ended.called:
                ended.callback(None)


def _abort(request: IRequest) -> None:
    """Cut the connection of a request (its handler is cancelled, its download recorded)."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None:
        transport.abortConnection()


def _waiting_for(running: defer.Deferred[None]) -> defer.Deferred[None]:
    """A Deferred that fires once `running` has; cancelling it leaves `running` be."""
    waiter: defer.Deferred[None] = defer.Deferred(lambda _: None)

    def settle(_: object) -> None:
        if not waiter.called:
            waiter.callback(None)

    running.addBoth(settle)
    return waiter


def sent_by(request: IRequest) -> str | None:
    """The way the code last asked for went, as the redirect after it says (`sent`, in the
    address, so also on the forms posted from that page); None without it or for anything
    else, which the page takes as no word of it."""
    try:
        values = query_lists(request).get("sent", [])
    except ApiError:  # a query string that is not text
        return None
    if len(set(values)) == 1 and values[0] in (CODE_BY_SMS, CODE_BY_MAIL):
        return values[0]
    return None


def invalid() -> PageError:
    return PageError(404, "Link not valid", "This drop link is not valid.")


def gone(message: str) -> PageError:
    return PageError(410, "Drop no longer available", message)


def paused() -> PageError:
    """A drop whose sender is disabled: nothing opens or downloads until it is enabled."""
    return PageError(403, "Drop not available for now",
                     "This drop cannot be opened for now. Try again later.")


def byte_range(header: bytes | None, size: int) -> tuple[int, int] | bool | None:
    """(first, last) of a single satisfiable `Range`; None: serve it whole (no header, or
    one we do not take, such as several ranges); False: unsatisfiable (416)."""
    if header is None or len(header) > _MAX_RANGE_HEADER:
        return None
    m = _RANGE.fullmatch(header.decode("latin-1").strip())
    if m is None:
        return None
    first_text, last_text = m.groups()
    if not first_text and not last_text:
        return None
    if not first_text:
        length = int(last_text)
        if length == 0 or size == 0:
            return False
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        return False
    return first, min(last, size - 1)


def entity_tag(drop_file: DropFile) -> str:
    """The file's strong entity tag (RFC 9110 8.8.3): the SHA-256 of its bytes, which never
    change. A browser resumes a download that broke off only when its reply carried a strong
    validator, and sends it back in If-Range; without one it starts again from the first
    byte (under read_remove, one more of the downloads allowed)."""
    return f'"{drop_file.sha256}"'


def requested_range(request: IRequest, drop_file: DropFile) -> tuple[int, int] | bool | None:
    """`byte_range` of the request's Range, unless an If-Range names another version of
    the file: a tag other than ours, a weak one, or a date (we give no Last-Modified). Then
    the Range is ignored and the file is served whole (RFC 9110 13.1.5: a client holding
    the start of something else must not get the rest of this)."""
    header = request.getHeader(b"range")
    condition = request.getHeader(b"if-range")
    if header is not None and condition is not None \
            and condition.strip() != entity_tag(drop_file).encode("ascii"):
        return None
    return byte_range(header, drop_file.size)


def file_reply(description: str) -> Reply:
    return Reply(description, {"type": "string", "format": "binary"},
                 content_type="application/octet-stream",
                 headers={"ETag": "The file's strong entity tag (the SHA-256 of its bytes), "
                                  "for If-Range"})


class DropPageApp(PageApp):
    name = "drop"
    title = "safedrop recipient pages (notification links)"
    app = Klein()
    routes = RouteTable(app, "drop")

    def __init__(
        self, settings: WebSettings, *, pages: Pages, drops: SafedropService,
        limiter: Limiter | None = None, code_limiter: Limiter | None = None,
        comment_limiter: Limiter | None = None,
    ) -> None:
        super().__init__(settings, pages=pages)
        self.drops = drops
        # In the store (every node's page takes from the same buckets), unless given.
        shared = SharedBuckets(drops.db, drops.clock)
        self.limiter = limiter or SharedRateLimiter(shared, "drop-password", PASSWORD_RATE)
        self.code_limiter = code_limiter or SharedRateLimiter(shared, "drop-code",
                                                              CODE_SEND_RATE)
        self.comment_limiter = comment_limiter or SharedRateLimiter(shared, "drop-comment",
                                                                    COMMENT_RATE)
        self.sending = Sending()

    # -- helpers ---------------------------------------------------------------------------

    async def _open(self, token: str, *, viewing: bool = False) -> Access:
        try:
            return await self.drops.open_link(token, viewing=viewing)
        except LinkInvalid:
            raise invalid() from None
        except DropGone as e:
            raise gone(str(e)) from None
        except DropPaused:
            raise paused() from None

    def _levels(self, request: IRequest, token: str) -> str:
        return self.drops.grants.levels(
            link_digest(token), get_cookie(request, GRANT_COOKIE), self.drops.clock.seconds())

    def _grant(self, request: IRequest, token: str, levels: str) -> None:
        value = self.drops.grants.make(link_digest(token), levels, self.drops.clock.seconds())
        set_cookie(request, GRANT_COOKIE, value, path=LINK_PATH + token)

    def _file_path(self, token: str, file_id: int) -> str:
        return f"{LINK_PATH}{token}/files/{file_id}"

    def _download_granted(self, request: IRequest, token: str, file_id: int) -> bool:
        return self.drops.grants.may_download(
            link_digest(token), file_id, get_cookie(request, DOWNLOAD_COOKIE),
            self.drops.clock.seconds())

    @staticmethod
    def _csrf_bind(request: IRequest, found: Access) -> str:
        """What the forms' CSRF tokens are bound to: the recipient (their link) and the
        checks this browser passed (its grant cookie), so a token made on another link, or
        in another browser, does not pass."""
        return f"drop:{found.recipient.id}:{get_cookie(request, GRANT_COOKIE) or ''}"

    @staticmethod
    def _missing(found: Access, levels: str) -> str | None:
        """The next check this browser has to pass, or None."""
        if found.password_hash is not None and CHECK_PW not in levels:
            return CHECK_PW
        if found.bundle.require_token_auth and CHECK_CODE not in levels:
            return CHECK_CODE
        return None

    def _see_other(self, request: IRequest, token: str, sent: str | None = None) -> bytes:
        """Back to the drop (`sent`: naming the way the code just asked for went)."""
        location = LINK_PATH + token + ("" if sent is None else f"?sent={sent}")
        request.setResponseCode(http.SEE_OTHER)
        request.setHeader(b"Location", location.encode("ascii"))
        return self.pages.message(request, 303, "Continue", "Continue to the drop.")

    def _step(self, request: IRequest, found: Access, step: str, status: int = 200,
              error: str | None = None) -> bytes:
        title = shown(found.bundle.subject) or "Secure drop"
        if step == CHECK_PW:
            locked = self._locked(request, found.password_locked_until)
            return self.pages.render(request, "drop_password.html",
                                     429 if locked else status, title=title,
                                     sender=found.sender, error=error, locked=locked,
                                     csrf_bind=self._csrf_bind(request, found))
        locked = self._locked(request, found.code_locked_until)
        by_sms = self.drops.by_sms(found)
        # What the pending code's notice says: the way the redirect after it named; without
        # it, the way codes go here. A text message only where one can go.
        sent = sent_by(request)
        return self.pages.render(
            request, "drop_code.html", 429 if locked else status, title=title,
            sender=found.sender, csrf_bind=self._csrf_bind(request, found),
            email=found.recipient.email, pending=found.code_pending, error=error,
            locked=locked,
            by_sms=by_sms,
            by_mail_instead=bool(found.recipient.telephone) and not by_sms,
            sent_by_sms=by_sms and sent != CODE_BY_MAIL,
            sms_failed=by_sms and sent == CODE_BY_MAIL,
        )

    def _locked(self, request: IRequest, until: datetime.datetime | None) -> str | None:
        """A check locked `until` then (too many wrong answers): its Retry-After on the
        reply, and the time as the page shows it; None when it is not locked."""
        if until is None:
            return None
        wait = max(1, int(until.timestamp() - self.drops.clock.seconds()))
        request.setHeader(b"Retry-After", str(wait).encode("ascii"))
        return rfc3339(until)

    def _contents(self, request: IRequest, token: str, found: Access,
                  replied: bool = False) -> bytes:
        expiries = [d for d in (found.bundle.expiry_date, found.recipient.expires_at) if d]
        return self.pages.render(
            request, "drop.html", title=shown(found.bundle.subject) or "Secure drop",
            csrf_bind=self._csrf_bind(request, found),
            sender=found.sender, message=found.bundle.message,
            secure_message=self.drops.secure_text(found),
            files=[replace(f, name=shown(f.name)) for f in found.files],
            downloaded=found.downloaded, base=LINK_PATH + token,
            expires=rfc3339(min(expiries)) if expiries else None,
            read_remove=found.bundle.read_remove,
            attempts=self.drops.settings.max_download_attempts,
            comments=found.bundle.allow_comments and found.bundle.require_token_auth,
            replied=replied,
        )

    # -- routes ----------------------------------------------------------------------------

    @routes.route(
        "/drop/<token>",
        "GET",
        summary="A recipient's drop: password or code prompt, then its contents",
        query=SENT_QUERY,
        replies=page_replies({
            200: "HTML page: the next check (password, code) or the drop's contents",
            403: "HTML page: the drop's sender is disabled for now",
            404: "HTML page: the link is not valid",
            410: "HTML page: the drop expired or was removed",
            429: "HTML page: too many wrong passwords or codes lock the link for now "
                 "(Retry-After)",
        }),
    )
    async def show(self, request: IRequest, token: str) -> bytes:
        levels = self._levels(request, token)
        found = await self._open(token)
        step = self._missing(found, levels)
        if step is not None:
            return self._step(request, found, step)
        # A HEAD (a link scanner, a mail client's preview) is no opening: no receipt.
        if not is_head(request):
            found = await self._open(token, viewing=True)
        return self._contents(request, token, found)

    @routes.route(
        "/drop/<token>",
        "POST",
        summary="Answer the drop's password or code prompt, ask for a code, or reply",
        body=form_body({
            "action": {"enum": ["password", "send_code", "code", "comment"]},
            "password": {"type": "string"},
            "code": {"type": "string"},
            "comment": {"type": "string"},
        }, required=["action"]),
        body_types=("application/x-www-form-urlencoded",),
        query=SENT_QUERY,  # the forms post to the page's own address
        replies=page_replies({
            200: "HTML page: the reply was sent",
            303: "Redirect back to the drop (a check was passed or a code sent: then "
                 "with `sent`, the way the code went)",
            403: "HTML page: wrong password or code, or the drop's sender is disabled",
            404: "HTML page: the link is not valid",
            410: "HTML page: the drop expired or was removed",
            429: "HTML page: too many password guesses, new codes, wrong codes or "
                 "replies (Retry-After)",
        }, form=True),
    )
    async def answer(self, request: IRequest, token: str) -> bytes:
        found = await self._open(token)
        fields = self.pages.form(request)
        action = fields.get("action")
        self.pages.check_csrf(request, fields, purpose=str(action),
                              bind=self._csrf_bind(request, found))
        levels = self._levels(request, token)
        step = self._missing(found, levels)
        if action == "password" and step == CHECK_PW:
            if found.password_locked_until is not None:
                return self._step(request, found, CHECK_PW)  # 429, saying until when
            decision = await self.limiter.take(("drop-password", link_digest(token)))
            if not decision.allowed:
                raise PageError(429, "Too many attempts",
                                "Too many wrong passwords; try again later.",
                                headers={"Retry-After": str(decision.retry_after)})
            password = fields.get("password")
            checked = await self.drops.check_password(found, password) \
                if isinstance(password, str) else CODE_WRONG
            if checked == CODE_OK:
                self._grant(request, token, levels + CHECK_PW)
                return self._see_other(request, token)
            return self._step(request, await self._open(token), CHECK_PW, 403,
                              "That password is not right.")
        if action in ("send_code", "code") and step == CHECK_CODE \
                and found.code_locked_until is not None:
            return self._step(request, found, CHECK_CODE)  # 429, saying until when
        if action == "send_code" and step == CHECK_CODE:
            decision = await self.code_limiter.take(("drop-code", link_digest(token)))
            if not decision.allowed:
                request.setHeader(b"Retry-After", str(decision.retry_after).encode("ascii"))
                return self._step(
                    request, found, CHECK_CODE, 429,
                    "A code was sent a moment ago: use the latest one, or ask for another "
                    f"in {decision.retry_after} seconds.")
            sent = await self.drops.send_code(found)
            if sent is None:
                return self._step(request, await self._open(token), CHECK_CODE)
            return self._see_other(request, token, sent)
        if action == "code" and step == CHECK_CODE:
            code = fields.get("code")
            checked = await self.drops.check_code(found, code) if isinstance(code, str) \
                else CODE_WRONG
            if checked == CODE_OK:
                self._grant(request, token, levels + CHECK_CODE)
                return self._see_other(request, token)
            found = await self._open(token)
            return self._step(request, found, CHECK_CODE, 403,
                              "That code is not right or has expired.")
        if action == "comment" and step is None and found.bundle.allow_comments \
                and found.bundle.require_token_auth:
            text = fields.get("comment")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_COMMENT \
                    or has_control_multiline(text):
                raise PageError(400, "Reply not sent",
                                f"Write a reply of at most {MAX_COMMENT} characters.")
            decision = await self.comment_limiter.take(("drop-comment", link_digest(token)))
            if not decision.allowed:
                raise PageError(429, "Reply not sent",
                                "Too many replies from this link; try again later.",
                                headers={"Retry-After": str(decision.retry_after)})
            await self.drops.comment(found, text.strip())
            return self._contents(request, token, found, replied=True)
        if step is not None:
            return self._step(request, found, step)
        return self._see_other(request, token)

    @routes.route(
        "/drop/<token>/files/<int:file_id>",
        "GET",
        summary="Download one file of a drop (Range requests resume); a read_remove file "
                "only after its button was pressed (POST), else the page with the button",
        replies={
            **page_replies({
                403: "HTML page: the drop's checks were not passed in this browser, a "
                     "read_remove file's download is resumed without its button, or the "
                     "drop's sender is disabled",
                404: "HTML page: the link or the file is not valid",
                410: "HTML page: the drop expired or was removed",
                416: "HTML page: the range is not satisfiable",
            }),
            200: replace(file_reply(
                "The file's bytes; or, for a read_remove file whose button this browser "
                "has not pressed lately, an HTML page with that button"),
                alternatives={"text/html": {"type": "string"}}),
            206: file_reply("Part of the file (Range)"),
        },
    )
    async def download(self, request: IRequest, token: str, file_id: int) -> bytes:
        found = await self._open(token)
        drop_file, path = self._checked_file(request, token, found, file_id)
        if found.bundle.read_remove and not self._download_granted(request, token, file_id):
            # Not from the button (a link scanner, a copied address): nothing starts.
            if not await self.drops.may_download(found, drop_file):
                raise gone(SELF_DESTRUCTED)
            if request.getHeader(b"range") is not None:
                raise PageError(403, "Start the download again",
                                "This download can no longer be resumed: press the file's "
                                "button on the drop's page to start it again.")
            return self.pages.render(
                request, "drop_download.html", title=shown(drop_file.name) or "Download",
                csrf_bind=self._csrf_bind(request, found), sender=found.sender,
                file=replace(drop_file, name=shown(drop_file.name)),
                base=LINK_PATH + token, attempts=self.drops.settings.max_download_attempts)
        size = drop_file.size
        wanted = requested_range(request, drop_file)
        if wanted is False:
            raise PageError(416, "Range not satisfiable", "The requested range is not "
                            "satisfiable.", headers={"Content-Range": f"bytes */{size}"})
        first, last = wanted if isinstance(wanted, tuple) else (0, size - 1)
        ranged = isinstance(wanted, tuple)
        if not found.bundle.read_remove:
            return await self._serve(request, found, drop_file, path, first, last, ranged)
        if is_head(request):
            # Answers what a GET would, and counts no download.
            if not await self.drops.may_download(found, drop_file):
                raise gone(SELF_DESTRUCTED)
            return await self._serve(request, found, drop_file, path, first, last, ranged)
        # read_remove: bytes another download is sending end it (Sending), and the drop is
        # read again once it has recorded them: they may have been the last it lacked.
        key = (found.recipient.id, drop_file.id)
        mine = await self.sending.take(key, first, last, request)
        try:
            found = await self._open(token)
            if self.drops.file_path(found, file_id) is None:
                raise PageError(404, "Not found", "This drop has no such file.")
            if not await self.drops.start_download(found, drop_file):
                raise gone(SELF_DESTRUCTED)
            return await self._serve(request, found, drop_file, path, first, last, ranged,
                                     mine)
        finally:
            self.sending.release(key, mine)

    @routes.route(
        "/drop/<token>/files/<int:file_id>",
        "POST",
        summary="Start the download of a file of a drop (the page's button): a read_remove "
                "file's download starts from this only",
        body=form_body({"action": {"enum": ["download"]}}),
        body_types=("application/x-www-form-urlencoded",),
        replies=page_replies({
            303: "Redirect to the file's address, where the download starts (read_remove: "
                 "with a cookie that lets that address download the file for a while)",
            403: "HTML page: the drop's checks were not passed in this browser, or its "
                 "sender is disabled",
            404: "HTML page: the link or the file is not valid",
            410: "HTML page: the drop expired or was removed, or the file self-destructed",
        }, form=True),
    )
    async def start_download(self, request: IRequest, token: str, file_id: int) -> bytes:
        found = await self._open(token)
        fields = self.pages.form(request)
        self.pages.check_csrf(request, fields, purpose="download",
                              bind=self._csrf_bind(request, found))
        drop_file, _ = self._checked_file(request, token, found, file_id)
        where = self._file_path(token, file_id)
        if found.bundle.read_remove:
            if not await self.drops.may_download(found, drop_file):
                raise gone(SELF_DESTRUCTED)
            grant = self.drops.grants.make_download(link_digest(token), file_id,
                                                    self.drops.clock.seconds())
            set_cookie(request, DOWNLOAD_COOKIE, grant, DOWNLOAD_GRANT_SECONDS, path=where)
        return redirect(request, http.SEE_OTHER, where)

    def _checked_file(self, request: IRequest, token: str, found: Access,
                      file_id: int) -> tuple[DropFile, Path]:
        """The file `file_id` of the drop and its path, once this browser passed the
        drop's checks (403) and the drop has it (404)."""
        if self._missing(found, self._levels(request, token)) is not None:
            raise PageError(403, "Open the drop first",
                            "Open the drop's link and pass its checks before downloading.")
        located = self.drops.file_path(found, file_id)
        if located is None:
            raise PageError(404, "Not found", "This drop has no such file.")
        return located

    async def _serve(self, request: IRequest, found: Access, drop_file: DropFile, path: Path,
                     first: int, last: int, ranged: bool,
                     sending: _Sending | None = None) -> bytes:
        """Open the file and send bytes `first` to `last` of it (`sending`: marked once
        every byte was handed to the transport); a HEAD's headers, the file not opened."""
        # Opened (a HEAD: found) before any header of the file is set: a file missing on
        # disk is a 410 page of its own, not a page under the file's Content-Length and
        # Content-Disposition.
        if is_head(request):
            if not await self.drops.io.run(path.is_file):
                raise gone("The files of this drop have been removed.")
            self._file_headers(request, drop_file, first, last, ranged)
            return b""
        try:
            handle = cast(IO[bytes], await self.drops.io.run(path.open, "rb"))
        except OSError:
            raise gone("The files of this drop have been removed.") from None
        try:
            return await self._send(request, found, drop_file, handle, first, last,
                                    ranged=ranged, sending=sending)
        finally:
            await self.drops.io.run(handle.close)

    async def _send(self, request: IRequest, found: Access, drop_file: DropFile,
                    handle: IO[bytes], first: int, last: int, *, ranged: bool,
                    sending: _Sending | None = None) -> bytes:
        """The headers and the bytes `first` to `last` of an open file (`ranged`: a 206);
        what was sent is recorded (receipts, read_remove) once it has gone."""
        size = drop_file.size
        length = self._file_headers(request, drop_file, first, last, ranged)
        written = Written()
        try:
            await self._stream(request, handle, first, length, written)
            if sending is not None and written.bytes == length:
                sending.written = True
        finally:
            # What was written counts, also when the client went away midway (which cancels
            # this handler): it resumes from there with a Range. Recorded to its end. A
            # read_remove download (`sending`) is recorded even when it wrote nothing: it
            # may have been the last one allowed.
            if written.bytes or size == 0 or sending is not None:
                await self._record(found, drop_file, first, first + written.bytes - 1)
        return b""

    def _file_headers(self, request: IRequest, drop_file: DropFile, first: int, last: int,
                      ranged: bool) -> int:
        """Set the headers of bytes `first` to `last` of the file (`ranged`: a 206) and
        give their length: all a HEAD of it gets."""
        size = drop_file.size
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Disposition",
                          content_disposition(shown(drop_file.name)).encode("ascii"))
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"ETag", entity_tag(drop_file).encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Content-Security-Policy", b"default-src 'none'; sandbox")
        if ranged:
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {first}-{last}/{size}".encode())
        length = max(0, last - first + 1)
        request.setHeader(b"Content-Length", str(length).encode())
        return length

    async def _record(self, found: Access, drop_file: DropFile, first: int, last: int) -> None:
        """Record bytes sent, to the end. A client that leaves meanwhile (one that closes
        its connection once it has read the body) cancels the handler: the record is not
        cancelled with it, and the download waits for it all the same, so that a download
        of the same bytes waiting for this one (`Sending`) starts once the record says
        what was sent."""
        recording = defer.Deferred.fromCoroutine(self._recorded(found, drop_file, first, last))
        try:
            await _waiting_for(recording)
        except defer.CancelledError:
            await _waiting_for(recording)

    async def _recorded(self, found: Access, drop_file: DropFile, first: int,
                        last: int) -> None:
        """Record bytes sent. The reply has gone out by then: a failure here (the store, a
        receipt the spool refused) is logged; a page written now would trail the file."""
        try:
            await self.drops.sent(found, drop_file, first, last)
        except Exception:
            log.failure("recording the download of file {file} of safedrop bundle {bundle} "
                        "(bytes {first}-{last}) failed", file=drop_file.id,
                        bundle=found.bundle.id, first=first, last=last)

    async def _stream(self, request: IRequest, handle: IO[bytes], first: int, length: int,
                      written: Written) -> None:
        """Write `length` bytes of `handle` from `first`, a chunk at a time, reading on the
        drop service's thread pool and pausing while the client's transport is full;
        `written` counts the bytes handed to the transport."""
        with paced(request) as pacer:
            await self.drops.io.run(handle.seek, first)
            while written.bytes < length and not pacer.stopped:
                await pacer.ready()
                data = await self.drops.io.run(handle.read, min(CHUNK, length - written.bytes))
                if not data:
                    break
                request.write(data)
                written.bytes += len(data)

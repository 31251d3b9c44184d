"""Posting the forms of HTML pages (web.pages) as a browser would: fetch the page, keep its
CSRF cookie, send the form's hidden token back with it."""

from __future__ import annotations

import re
from typing import Any

from tests.support.web import Web

CSRF_INPUT = re.compile(rb'<input type="hidden" name="csrf_token" value="([^"]+)">')
FORM = re.compile(rb"<form\b.*?</form>", re.S)


def csrf_cookie(headers: dict[str, list[str]]) -> str | None:
    """The value of the `mc_csrf` cookie a reply sets, if it sets one."""
    for line in headers.get("set-cookie", []):
        name, _, rest = line.partition("=")
        if name.strip() == "mc_csrf":
            return rest.split(";", 1)[0]
    return None


def csrf_field(body: bytes, action: str | None = None) -> str:
    """The CSRF token of the form on a page whose hidden `action` field is `action` (each
    form's token is good for its own action only); None: of the page's first form."""
    forms = FORM.findall(body)
    if action is not None:
        marker = f'name="action" value="{action}"'.encode()
        forms = [form for form in forms if marker in form]
    match = CSRF_INPUT.search(forms[0]) if forms else None
    assert match is not None, f"no CSRF field for {action!r} on the page: {body[:400]!r}"
    return match.group(1).decode("ascii")


async def form_credentials(web: Web, path: str) -> tuple[dict[str, str], dict[str, str]]:
    """(cookies, form fields) to post the form of the page at `path` with.

    The client keeps cookies as a browser does: when it has the CSRF cookie already, the
    page sets none and the cookies returned are empty (the client sends its own)."""
    status, headers, body = await web.call("GET", path)
    assert status == 200, (status, body)
    cookie = csrf_cookie(headers)
    return ({"mc_csrf": cookie} if cookie else {}), {"csrf_token": csrf_field(body)}


async def post_form(web: Web, path: str, **kwargs: Any) -> tuple[int, dict[str, list[str]], Any]:
    """Fetch the page at `path` and post its form back, as a person clicking its button."""
    cookies, fields = await form_credentials(web, path)
    return await web.call("POST", path, cookies=cookies, data=fields, **kwargs)


"""DRF pages: `{count, next, previous, results}` with absolute `next`/`previous` URLs.

The URLs are built from the request's scheme and Host header (else the listener's address),
with `page` replaced and the other parameters kept, sorted, as DRF writes them.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson
from twisted.web.iweb import IRequest

from mailcore.messages import Page as StorePage
from web.errors import ApiError
from web.imap2api.queries import INVALID_PAGE, drf_query, page_number, page_size
from web.parsing import QueryParams

T = TypeVar("T")

_HOST = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")


def request_base(request: IRequest) -> str:
    """scheme://host[:port] of the request, from its Host header (else the listener)."""
    scheme = "https" if request.isSecure() else "http"
    raw = request.getHeader(b"host")
    host = raw.decode("latin-1").strip() if raw else ""
    if not host or not _HOST.match(host):
        address = request.getHost()
        name = getattr(address, "host", "localhost")
        port = getattr(address, "port", None)
        default = 443 if scheme == "https" else 80
        host = name if port in (None, default) else f"{name}:{port}"
    return f"{scheme}://{host}"


def request_path(request: IRequest) -> str:
    """The request's path, as text."""
    return str(request.path.decode("latin-1"))


def page_url(request: IRequest, page: int | None) -> str:
    """The request's absolute URL with `page` replaced (removed for None), as DRF's
    replace_query_param/remove_query_param write it (parameters sorted)."""
    path = request_path(request)
    _, _, query = request.uri.partition(b"?")
    pairs = [(k, v) for k, v in parse_qsl(query.decode("utf-8", "replace"),
                                          keep_blank_values=True) if k != "page"]
    if not pairs:  # only the page (most requests): nothing to sort or quote
        encoded = "" if page is None else f"page={page}"
    else:
        if page is not None:
            pairs.append(("page", str(page)))
        encoded = urlencode(sorted(pairs))
    return f"{request_base(request)}{path}" + (f"?{encoded}" if encoded else "")


async def paginate(
    request: IRequest, fetch: Callable[[int, int], Awaitable[StorePage[T]]],
    show: Callable[[T], Any], params: QueryParams | None = None,
) -> dict[str, Any]:
    """A DRF page of what `fetch(offset, limit)` returns: its items as `show` shows them,
    or its `json` as it is. `params`: the request's `drf_query`, when the caller read it
    already."""
    if params is None:
        params = drf_query(request)
    size = page_size(params)
    number = page_number(params)
    if number is None:  # "last": the count says which page that is
        total = (await fetch(0, 0)).count
        number = max(1, -(-total // size))
    found = await fetch((number - 1) * size, size)
    pages = max(1, -(-found.count // size))
    if number > pages:
        raise ApiError(404, INVALID_PAGE)
    return {
        "count": found.count,
        "next": page_url(request, number + 1) if number < pages else None,
        "previous": (page_url(request, number - 1 if number > 2 else None)
                     if number > 1 else None),
        # A page the store wrote as JSON already goes into the reply as it is.
        "results": (orjson.Fragment(found.json) if found.json is not None
                    else [show(item) for item in found.items]),
    }


def list_page(items: list[T]) -> Callable[[int, int], Awaitable[StorePage[T]]]:
    """A `fetch` for `paginate` over a list already in memory."""
    async def fetch(offset: int, limit: int) -> StorePage[T]:
        return StorePage(count=len(items), items=items[offset:offset + limit])

    return fetch

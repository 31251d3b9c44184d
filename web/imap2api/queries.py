"""What a Simple IMAP2API list request asks for: its filters, ordering and page.

DRF's readings: a bad filter value is a 400 naming the parameter; a bad `page` is 404
"Invalid page."; a bad `page_size` quietly falls back to the default, and an `ordering`
term on a field that cannot be ordered by is dropped (the default order, newest first,
when none is left), as DRF's OrderingFilter does.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping

from twisted.web.iweb import IRequest

from mailcore.messages import ORDER_FIELDS, MessageQuery
from web.errors import ApiError, field_error
from web.parsing import (
    ID_MAX,
    QueryParams,
    bool_field,
    collect_fields,
    int_field,
    parse_int,
    query_params,
)

INVALID_PAGE = "Invalid page."
INVALID_DATE = "Enter a valid date."
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def drf_query(request: IRequest) -> QueryParams:
    """The request's query parameters as DRF reads them: one given twice is its last value
    (Django's QueryDict.get), where the other APIs answer 400. The seed's service took the
    last, and the IMAP2API copies its leniency on purpose: a client of it gets what it got
    there."""
    return query_params(request, last_wins=True)


def _day(params: Mapping[str, str], name: str) -> datetime.date | None:
    value = params.get(name, "").strip()
    if not value:
        return None
    if not _DATE.match(value):
        raise field_error(name, INVALID_DATE)
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise field_error(name, INVALID_DATE) from None


def _flag(params: Mapping[str, str], name: str) -> bool | None:
    if not params.get(name, "").strip():
        return None
    return bool_field(params, name)


def _ordering(params: Mapping[str, str]) -> str:
    """`ordering` without its terms on fields we cannot order by (DRF's OrderingFilter
    drops them: a client of the seed's service gets its list, not an error); "-date" when
    none is left."""
    terms = [t.strip() for t in (params.get("ordering") or "").split(",")]
    return ",".join(t for t in terms if t.lstrip("-+") in ORDER_FIELDS) or "-date"


def _server_filter(params: Mapping[str, str]) -> int | None:
    if not params.get("imap_server", "").strip():
        return None
    return int_field(params, "imap_server", minimum=0, maximum=ID_MAX)


def server_param(request: IRequest) -> int | None:
    """The `imap_server` query parameter of a request (None: every server); 400 if bad."""
    values = collect_fields({"imap_server": lambda: _server_filter(drf_query(request))})
    return values["imap_server"]


def message_query(params: Mapping[str, str]) -> MessageQuery:
    """The filters and ordering of an emails list request (without the page window), over
    the mail of the user's IMAP accounts only (`MessageQuery.without_pop`)."""
    values = collect_fields({
        "q": lambda: (params.get("q") or "").strip() or None,
        "folder": lambda: params.get("folder") or None,
        "imap_server": lambda: _server_filter(params),
        "date_from": lambda: _day(params, "date_from"),
        "date_to": lambda: _day(params, "date_to"),
        "thread": lambda: _flag(params, "thread"),
        "has_attachments": lambda: _flag(params, "has_attachments"),
        "ordering": lambda: _ordering(params),
    })
    return MessageQuery(
        q=values["q"], folder=values["folder"], account_id=values["imap_server"],
        date_from=values["date_from"], date_to=values["date_to"],
        has_attachments=values["has_attachments"], threads_only=bool(values["thread"]),
        ordering=values["ordering"], without_pop=True,
    )


def search_terms(params: Mapping[str, str]) -> list[str]:
    """The words of `q`, as DRF's SearchFilter splits them (on commas and white space);
    a row matches when it holds every word."""
    return (params.get("q") or "").replace(",", " ").split()


def page_size(params: Mapping[str, str]) -> int:
    """`page_size` as DRF reads it: a positive integer, at most 100; anything else is 50."""
    value = parse_int(params.get("page_size", "").strip())
    if value is not None and value > 0:
        return min(value, MAX_PAGE_SIZE)
    return DEFAULT_PAGE_SIZE


def page_number(params: Mapping[str, str]) -> int | None:
    """`page` (default 1); None for "last"; 404 "Invalid page." for anything else."""
    raw = params.get("page", "").strip() or "1"
    if raw == "last":
        return None
    value = parse_int(raw) if len(raw) <= 9 else None
    if value is None or value < 1:
        raise ApiError(404, INVALID_PAGE)
    return value

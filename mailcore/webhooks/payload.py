"""The JSON shapes of event data (shared with the IMAP2API's e-mail list)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import orjson

from mailcore.messages.models import MessageSummary
from mailcore.messages.sql import utc

_ZERO = datetime.timedelta(0)


def iso(moment: datetime.datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as Django REST framework writes times."""
    if moment is None:
        return None
    # The store's times are UTC already (PostgreSQL's with a zoneinfo UTC: any zero offset
    # is written as Z, as it should be).
    if moment.tzinfo is not datetime.UTC and moment.utcoffset() != _ZERO:
        value = utc(moment)
        assert value is not None
        moment = value.astimezone(datetime.UTC)
    # orjson writes what `moment.isoformat()[:-6] + "Z"` would (microseconds only when
    # there are some) in a sixth of the time: a list page writes 50 to 100 of these.
    return orjson.dumps(moment, option=orjson.OPT_UTC_Z)[1:-1].decode("ascii")


def moment_json(moment: datetime.datetime | None) -> datetime.datetime | str | None:
    """A time for a JSON body that `encode_json` (web.replies) or `_event_payload` writes:
    a time in UTC as it is, which they write as `iso` would (orjson's own writer, no
    Python call per time: a list page holds 50 to 100), any other as `iso`'s text."""
    if moment is None or moment.tzinfo is datetime.UTC:
        return moment
    return iso(moment)


def json_default(value: Any) -> Any:
    """`default` for the standard library's JSON encoder: the times `moment_json` leaves as
    they are, written as `iso` writes them."""
    if isinstance(value, datetime.datetime):
        return iso(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def thread_ref(thread_id: int | None) -> str | None:
    """Seed 001's thread id: "thread-N"."""
    return f"thread-{thread_id}" if thread_id is not None else None


def email_head(m: MessageSummary) -> dict[str, Any]:
    """The fields every seed 001 e-mail shape starts with (list item, thread item, detail)."""
    return {
        "id": m.id,
        "message_id": m.message_id,
        "subject": m.subject,
        "sender": m.sender,
        "recipient": m.recipient,
        "date": moment_json(m.date),
    }


def email_json(m: MessageSummary) -> dict[str, Any]:
    """An e-mail as seed 001's emails list shows it (plus the account and attachments).
    `mailcore.messages.rendered` writes the same in SQL for a plain list page (SQLite and
    PostgreSQL): change the two together (tests/test_messages_rendered.py compares their
    bytes)."""
    return {
        **email_head(m),
        "folder": m.folder,
        "thread_id": thread_ref(m.thread_id),
        "thread_count": m.thread_count,
        "imap_server": m.account_id,
        "has_attachments": m.has_attachments,
    }


def _event_payload(delivery_id: str, event: str, created: datetime.datetime,
                   data: dict[str, Any]) -> str:
    return json.dumps(
        {"id": delivery_id, "event": event, "created_at": iso(created), "data": data},
        ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=json_default,
    )

"""The JSON schemas the Simple IMAP2API (seed 001) declares in the OpenAPI document.

Bodies and replies of the routes in `app`, and the query parameters of its lists. They
describe what `inputs` and `queries` accept and what `serializers` returns (`server_json`,
`email_detail_head`, …); keep them in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailcore.fetch.accounts import SYNC_LIMIT_TYPES
from mailcore.webhooks import EVENTS

_TIME = {"type": ["string", "null"], "format": "date-time"}
DELIVERY_STATUSES = ["pending", "success", "failed", "cancelled"]

CREDENTIALS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "user name or e-mail address"},
        "password": {"type": "string", "format": "password"},
    },
    "required": ["username", "password"],
}
TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"token": {"type": "string"}},
    "required": ["token"],
}
SERVER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "username": {"type": "string"},
        "use_ssl": {"type": "boolean"},
        "start_tls": {"type": "boolean"},
        "allow_cleartext": {"type": "boolean"},
        "tls_fingerprint": {"type": ["string", "null"]},
        "has_tls_ca": {"type": "boolean"},
        "sync_limit_type": {"enum": list(SYNC_LIMIT_TYPES)},
        "sync_limit_value": {"type": "integer"},
        "folders_to_sync": {"type": "string", "description": 'comma-separated; "" is all'},
        "exclude_trash": {"type": "boolean"},
        "sync_interval": {"type": ["integer", "null"]},
        "enabled": {"type": "boolean"},
        "last_sync": _TIME,
        "sync_status": {"enum": ["never", "running", "success", "error"]},
        "sync_error": {"type": ["string", "null"]},
        "sync_started_at": _TIME,
        "sync_progress": {
            "type": "object",
            "properties": {
                "folder": {"type": ["string", "null"]},
                "done": {"type": "integer"},
                "total": {"type": "integer"},
            },
        },
        "created_at": _TIME,
        "updated_at": _TIME,
    },
}
SERVER_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "host, username and password are required on create; every field is "
    "optional on update (PUT and PATCH change only what is given). use_ssl defaults to true "
    "unless start_tls is set.",
    "properties": {
        "name": {"type": "string"},
        "email": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "username": {"type": "string"},
        "password": {"type": "string", "format": "password", "writeOnly": True},
        "use_ssl": {"type": "boolean"},
        "start_tls": {"type": "boolean"},
        "allow_cleartext": {"type": "boolean"},
        "tls_ca_pem": {"type": ["string", "null"]},
        "tls_fingerprint": {"type": ["string", "null"]},
        "sync_limit_type": {"enum": list(SYNC_LIMIT_TYPES)},
        "sync_limit_value": {"type": "integer"},
        "folders_to_sync": {"type": ["string", "array"], "items": {"type": "string"}},
        "exclude_trash": {"type": "boolean"},
        "sync_interval": {"type": ["integer", "null"]},
        "enabled": {"type": "boolean"},
    },
}
# The fields every e-mail representation starts with (list item, thread item, detail).
_EMAIL_HEAD: dict[str, Any] = {
    "id": {"type": "integer"},
    "message_id": {"type": "string"},
    "subject": {"type": "string"},
    "sender": {"type": "string"},
    "recipient": {"type": "string"},
    "date": _TIME,
}
EMAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_EMAIL_HEAD,
        "folder": {"type": "string"},
        "thread_id": {"type": ["string", "null"], "examples": ["thread-123"]},
        "thread_count": {"type": "integer"},
        "imap_server": {"type": ["integer", "null"]},
        "has_attachments": {"type": "boolean"},
    },
}
THREAD_EMAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_EMAIL_HEAD,
        "body_text": {"type": "string"},
        "body_html": {"type": "string"},
        "folder": {"type": "string"},
    },
}
EMAIL_DETAIL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        **EMAIL_SCHEMA["properties"],
        **THREAD_EMAIL_SCHEMA["properties"],
        "cc": {"type": "string"},
        "in_reply_to": {"type": "string"},
        "references": {"type": "array", "items": {"type": "string"}},
        "size": {"type": "integer"},
        "flags": {"type": "array", "items": {"type": "string"}},
        "attachments": {"type": "array", "items": {"type": "object"}},
        "created_at": _TIME,
        "updated_at": _TIME,
        "thread_emails": {"type": "array", "items": THREAD_EMAIL_SCHEMA},
    },
}
THREAD_SCHEMA: dict[str, Any] = {"type": "array", "items": THREAD_EMAIL_SCHEMA}
FOLDERS_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
STATISTICS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "total_emails": {"type": "integer"},
        "total_threads": {"type": "integer"},
        "folders": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}
WEBHOOK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "url": {"type": "string", "format": "uri"},
        "events": {"type": "array", "items": {"enum": list(EVENTS)}},
        "description": {"type": "string"},
        "active": {"type": "boolean"},
        "created_at": _TIME,
        "updated_at": _TIME,
        "secret": {"type": "string", "description": "only when made or rotated"},
    },
}
WEBHOOK_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "url is required on create; events default to all three. A secret "
    "(16-256 characters) may be given, else one is made; rotate_secret=true makes a new one.",
    "properties": {
        "url": {"type": "string", "format": "uri"},
        "events": {"type": "array", "items": {"enum": list(EVENTS)}},
        "description": {"type": "string"},
        "active": {"type": "boolean"},
        "secret": {"type": "string", "writeOnly": True},
        "rotate_secret": {"type": "boolean"},
    },
}
DELIVERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "delivery_id": {"type": "string", "format": "uuid"},
        "event": {"enum": list(EVENTS)},
        "status": {"enum": DELIVERY_STATUSES},
        "attempts": {"type": "integer"},
        "last_status_code": {"type": ["integer", "null"]},
        "last_error": {"type": ["string", "null"]},
        "created_at": _TIME,
        "last_attempt_at": _TIME,
        "next_attempt_at": _TIME,
        "completed_at": _TIME,
        "payload": {"type": "object"},
    },
}
SYNC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["success", "running"]},
        "message": {"type": "string"},
        "new_messages": {"type": "integer"},
        "imap_server": SERVER_SCHEMA,
    },
    "required": ["status", "message"],
}


def page_schema(item: Mapping[str, Any]) -> dict[str, Any]:
    """A DRF page (`count`, `next`, `previous`, `results`) of `item`s."""
    return {
        "type": "object",
        "properties": {
            "count": {"type": "integer"},
            "next": {"type": ["string", "null"], "format": "uri"},
            "previous": {"type": ["string", "null"], "format": "uri"},
            "results": {"type": "array", "items": dict(item)},
        },
        "required": ["count", "next", "previous", "results"],
    }


PAGE_QUERY: dict[str, dict[str, Any]] = {
    "page": {"type": ["integer", "string"], "description": 'page number from 1 (or "last"); '
             'any other value, or a page past the end, is 404 "Invalid page." (as DRF '
             "answers it)"},
    "page_size": {"type": "integer", "description": "default 50, at most 100 (a larger one "
                  "is 100); a value that is not a positive integer is the default, as DRF "
                  "reads it"},
}
FILTER_QUERY: dict[str, dict[str, Any]] = {
    "q": {"type": "string", "description": "words in subject, sender, recipient or body"},
    "folder": {"type": "string"},
    "imap_server": {"type": "integer"},
    "date_from": {"type": "string", "format": "date"},
    "date_to": {"type": "string", "format": "date"},
    "has_attachments": {"type": "boolean"},
    "ordering": {"type": "string", "description": "fields separated by commas, each with "
                 "- for descending (e.g. -date, subject, sender, folder); a field that "
                 "cannot be ordered by is ignored, as DRF does (default -date)"},
}
EMAILS_QUERY = {**FILTER_QUERY, "thread": {"type": "boolean", "description": "one email "
                                             "per thread"}, **PAGE_QUERY}
THREADS_QUERY = {**FILTER_QUERY, "thread": {"type": "boolean", "description": "read as on "
                                            "/emails/ (a value that is no boolean is a 400); "
                                            "this list is one email per thread anyway"},
                 **PAGE_QUERY}
SERVERS_QUERY = {
    "q": {"type": "string", "description": "words each found in the name, host or username "
          "(any case)"},
    **PAGE_QUERY,
}
SERVER_FILTER_QUERY = {"imap_server": {"type": "integer"}}
DELIVERIES_QUERY = {"status": {"enum": DELIVERY_STATUSES}, **PAGE_QUERY}

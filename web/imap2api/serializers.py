"""The JSON shapes of the Simple IMAP2API: what its replies show of each object.

`web.imap2api.schemas` describes these shapes in the OpenAPI document; keep the two in step.
The e-mail list item (`email_json`) is shared with the webhooks' event data and lives in
`mailcore.webhooks.payload`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from mailcore.fetch import Account
from mailcore.messages import MessageDetail, Statistics
from mailcore.webhooks import Delivery, Webhook, email_json, iso, thread_ref
from mailcore.webhooks.payload import email_head


def server_json(a: Account) -> dict[str, Any]:
    """An IMAP server as the API shows it: never its password."""
    return {
        "id": a.id,
        "name": a.name,
        "email": a.email,
        "host": a.host,
        "port": a.port,
        "username": a.username,
        "use_ssl": a.use_ssl,
        "start_tls": a.start_tls,
        "allow_cleartext": a.allow_cleartext,
        "tls_fingerprint": a.tls_fingerprint,
        "has_tls_ca": bool(a.tls_ca_pem),
        "sync_limit_type": a.sync_limit_type,
        "sync_limit_value": a.sync_limit_value,
        "folders_to_sync": a.folders_to_sync,
        "exclude_trash": a.exclude_trash,
        "sync_interval": a.sync_interval,
        "enabled": a.enabled,
        "last_sync": iso(a.last_sync),
        "sync_status": a.sync_status,
        "sync_error": a.sync_error,
        "sync_started_at": iso(a.sync_started_at),
        "sync_progress": {
            "folder": a.progress_folder,
            "done": a.progress_done,
            "total": a.progress_total,
        },
        "created_at": iso(a.created_at),
        "updated_at": iso(a.updated_at),
    }


def thread_email_json(d: MessageDetail) -> dict[str, Any]:
    """One e-mail of a thread, with its bodies (seed 001's `thread_emails` items)."""
    return {
        **email_head(d.summary),
        "body_text": d.body_text,
        "body_html": d.body_html,
        "folder": d.summary.folder,
    }


def email_detail_head(d: MessageDetail) -> dict[str, Any]:
    """One e-mail with its bodies and attachments: seed 001's e-mail detail but its last
    member, `thread_emails`, the other e-mails of its thread (`thread_email_json` each),
    which the reply writes as they are read (web.jsonstream)."""
    m = d.summary
    return {
        **email_json(m),
        "cc": d.cc,
        "body_text": d.body_text,
        "body_html": d.body_html,
        "in_reply_to": d.in_reply_to,
        "references": list(d.references),
        "size": m.size,
        "flags": list(m.flags),
        "attachments": [
            {"id": a.id, "filename": a.filename, "mime_type": a.mime_type, "size": a.size}
            for a in d.attachments
        ],
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
        "thread_id": thread_ref(m.thread_id),
    }


def statistics_json(stats: Statistics) -> dict[str, Any]:
    """A user's e-mail statistics: totals and e-mails per folder."""
    return {
        "total_emails": stats.total_emails,
        "total_threads": stats.total_threads,
        "folders": stats.folders,
    }


def webhook_json(w: Webhook, secret: str | None = None) -> dict[str, Any]:
    """A webhook; its `secret` only when it was just made or rotated."""
    body: dict[str, Any] = {
        "id": w.id,
        "url": w.url,
        "events": list(w.events),
        "description": w.description,
        "active": w.active,
        "created_at": iso(w.created_at),
        "updated_at": iso(w.updated_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def _epoch(value: float | None) -> str | None:
    if value is None:
        return None
    return iso(datetime.datetime.fromtimestamp(value, datetime.UTC))


def delivery_json(d: Delivery) -> dict[str, Any]:
    """One row of a webhook's delivery log, with the payload it sends."""
    return {
        "id": d.id,
        "delivery_id": d.delivery_id,
        "event": d.event,
        "status": d.status,
        "attempts": d.attempts,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "created_at": _epoch(d.created_at),
        "last_attempt_at": _epoch(d.last_attempt_at),
        "next_attempt_at": _epoch(d.next_attempt_at),
        "completed_at": _epoch(d.completed_at),
        "payload": json.loads(d.payload),
    }

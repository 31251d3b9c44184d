"""The signature on every delivery: HMAC-SHA256 over "<timestamp>.<body>", and its check."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

SIGNATURE_HEADER = "X-Mailcore-Signature"
TIMESTAMP_HEADER = "X-Mailcore-Timestamp"
EVENT_HEADER = "X-Mailcore-Event"
DELIVERY_HEADER = "X-Mailcore-Delivery"
SIGNATURE_TOLERANCE = 300


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Mailcore-Signature value: HMAC-SHA256 over "<timestamp>.<body>"."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body,
                   hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str | bytes | None, body: bytes, signature: str | bytes | None,
    now: float, tolerance: float = SIGNATURE_TOLERANCE, *,
    delivery: str | bytes | None = None, event: str | bytes | None = None,
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent.

    The signature covers the timestamp and the body; the X-Mailcore-Delivery and
    X-Mailcore-Event headers are copies of the body's "id" and "event", not signed by
    themselves. Given (`delivery`, `event`: the headers' values), each must equal the
    body's field, so that a receiver dropping duplicates by the header is not fooled by a
    replay within `tolerance` that changed it."""
    if timestamp is None or signature is None:
        return False
    if isinstance(timestamp, bytes):
        timestamp = timestamp.decode("ascii", "replace")
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    if not hmac.compare_digest(sign(secret, int(timestamp), body), signature):
        return False
    return all(given is None or _body_field(body, name) == _text(given)
               for name, given in (("id", delivery), ("event", event)))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _body_field(body: bytes, name: str) -> Any:
    """Field `name` of the JSON object `body`, None when it is no such object."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def new_secret() -> str:
    """A fresh signing secret (shown once)."""
    return "whsec_" + secrets.token_urlsafe(32)

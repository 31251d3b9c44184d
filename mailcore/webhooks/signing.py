"""The signature on every delivery: HMAC-SHA256 over "<timestamp>.<body>", and its check."""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
    now: float, tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    if timestamp is None or signature is None:
        return False
    if isinstance(timestamp, bytes):
        timestamp = timestamp.decode("ascii", "replace")
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)


def new_secret() -> str:
    """A fresh signing secret (shown once)."""
    return "whsec_" + secrets.token_urlsafe(32)

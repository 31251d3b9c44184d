"""What a webhook and a delivery are, their limits, and the checks on a webhook's fields."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from mailcore.messages.sql import utc

EVENTS = ("sync.completed", "email.new", "thread.updated", "migrate.completed",
          "restore.completed")
STATUSES = ("pending", "success", "failed", "cancelled")
# E-mails or threads per delivery of email.new / thread.updated.
BATCH = 100
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 256
class WebhookError(Exception):
    """A webhook cannot be saved as asked; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class WebhookNotFound(WebhookError):
    """No such webhook for this user."""


@dataclass(frozen=True)
class Webhook:
    """A webhook as it may be shown: never its secret."""

    id: int
    user_id: int
    url: str
    events: tuple[str, ...]
    description: str
    active: bool
    created_at: datetime.datetime
    updated_at: datetime.datetime


@dataclass(frozen=True)
class Delivery:
    """One row of the delivery log."""

    id: int
    webhook_id: int
    delivery_id: str
    event: str
    status: str
    attempts: int
    next_attempt_at: float | None
    last_attempt_at: float | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    completed_at: float | None
    payload: str


def _webhook(row: Any) -> Webhook:
    m = row._mapping
    return Webhook(
        id=m["id"], user_id=m["user_id"], url=m["url"],
        events=tuple(e for e in m["events"].split(",") if e),
        description=m["description"], active=bool(m["active"]),
        created_at=utc(m["created_at"]),  # type: ignore[arg-type]
        updated_at=utc(m["updated_at"]),  # type: ignore[arg-type]
    )


def _delivery(row: Any) -> Delivery:
    m = row._mapping
    return Delivery(
        id=m["id"], webhook_id=m["webhook_id"], delivery_id=m["delivery_uuid"],
        event=m["event"], status=m["status"], attempts=m["attempts"],
        next_attempt_at=m["next_attempt_at"] if m["status"] == "pending" else None,
        last_attempt_at=m["last_attempt_at"], last_status_code=m["last_status_code"],
        last_error=m["last_error"], created_at=m["created_at"],
        completed_at=m["completed_at"], payload=m["payload"],
    )


def check_events(value: Any) -> tuple[str, ...]:
    """Event names from a list (or a comma-separated string); WebhookError("events")."""
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise WebhookError("Expected a list of event names.", "events")
    names = [v.strip() for v in value if v.strip()]
    if not names:
        raise WebhookError("Name at least one event: " + ", ".join(EVENTS) + ".", "events")
    for name in names:
        if name not in EVENTS:
            raise WebhookError(
                f'"{name}" is not a valid choice (one of {", ".join(EVENTS)}).', "events"
            )
    return tuple(e for e in EVENTS if e in names)


def check_secret(value: Any) -> str:
    if not isinstance(value, str):
        raise WebhookError("Not a valid string.", "secret")
    if not MIN_SECRET_LENGTH <= len(value) <= MAX_SECRET_LENGTH or not value.isprintable():
        raise WebhookError(
            f"A secret has {MIN_SECRET_LENGTH} to {MAX_SECRET_LENGTH} printable characters.",
            "secret",
        )
    return value


def _description(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebhookError("Not a valid string.", "description")
    if len(value) > 255:
        raise WebhookError("Ensure this field has no more than 255 characters.", "description")
    return value.strip()

"""Webhooks: a user's URLs told about syncs, new e-mails and updated threads, signed and retried.

Events (seed 001 lists them: "email sync completion, new email arrival, thread updates"):

- `sync.completed`: every finished sync of an account, success or error. `data`:
  `imap_server`, `status`, `error`, `new_messages`, `started_at`, `finished_at`.
- `email.new`: a sync stored new e-mails. `data`: `imap_server` and `emails`, up to 100
  e-mails as the emails list shows them (a bigger sync sends several deliveries).
- `thread.updated`: a sync added e-mails to threads. `data`: `imap_server` and `threads`,
  up to 100 of `{thread_id, thread_count, latest_email}`.

Every delivery is an HTTP POST of a JSON body `{"id", "event", "created_at", "data"}` with:

    Content-Type: application/json
    X-Mailcore-Event: email.new
    X-Mailcore-Delivery: <id, the same on every retry of this delivery>
    X-Mailcore-Timestamp: <Unix time of this attempt, seconds>
    X-Mailcore-Signature: sha256=<hex HMAC-SHA256 with the webhook's secret over
                          "<timestamp>.<raw body>">

A receiver recomputes the HMAC over the timestamp header, a dot and the raw body bytes,
compares it in constant time, and refuses a timestamp more than a few minutes old (the
signature covers the timestamp, so an old delivery cannot be replayed with a new one);
`verify_signature` does exactly that. Retries carry the same `X-Mailcore-Delivery` id, so a
receiver can drop duplicates.

Deliveries are durable: the sync engine's listener only writes delivery rows (it never waits
for a receiver), and the background `WebhookSender` posts them, at most `concurrency` at
once (and `per_webhook` to any one webhook, so a dead receiver cannot hold up the others),
each bounded by `timeout`. A non-2xx answer, a timeout or a connection failure is
retried with exponential backoff (`backoff_base` * 2^(attempt-1), at most `backoff_max`)
until `max_attempts`; 410 Gone stops at once and disables the webhook. Each row keeps its
status (pending, success, failed, cancelled), attempts, last status code and last error:
the delivery log.

Where deliveries may go is the operator's decision (`[webhooks]`): http and https only; no
loopback, private, link-local or otherwise non-global address unless allowed; the check runs
on the URL when it is saved and again on every address the host name resolves to when a
delivery connects (so DNS cannot point a saved name at a forbidden address later).

```toml
[webhooks]
allow_loopback = false       # 127.0.0.0/8 and ::1 (tests and single-host setups)
allow_private = false        # RFC 1918, CGNAT, ULA, link-local and other non-global ranges
allow_networks = []          # CIDRs allowed even if private ("10.1.2.0/24")
deny_networks = []           # CIDRs refused whatever else says
max_attempts = 8
backoff_base = 30            # seconds before the 2nd attempt; doubles each time
backoff_max = 3600
timeout = 10                 # seconds per attempt (connect, send, first bytes of the answer)
concurrency = 4              # attempts in flight at once, in all
per_webhook = 2              # ... and to one webhook (a dead receiver holds no more)
poll_interval = 5
retention_days = 30          # finished deliveries are pruned after this long
max_per_user = 20
```
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from http.cookiejar import Cookie
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Connection, delete, func, insert, select, update
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailcore import netpolicy
from mailcore.config import ConfigError
from mailcore.fetch.engine import SyncResult
from mailcore.fetch.secrets import SecretBox, SecretError
from mailcore.messages.models import MessageSummary, Page
from mailcore.messages.sql import new_id, utc
from mailcore.messages.store import thd_get_messages
from mailcore.netpolicy import AddressRefused, GuardedEndpoint, IPNetwork, parse_networks
from mailcore.store import Database
from mailcore.store.schema import messages, webhook_deliveries, webhooks

log = Logger()

EVENTS = ("sync.completed", "email.new", "thread.updated")
STATUSES = ("pending", "success", "failed", "cancelled")
SIGNATURE_HEADER = "X-Mailcore-Signature"
TIMESTAMP_HEADER = "X-Mailcore-Timestamp"
EVENT_HEADER = "X-Mailcore-Event"
DELIVERY_HEADER = "X-Mailcore-Delivery"
USER_AGENT = "Mailcore-Webhooks/1"
# E-mails or threads per delivery of email.new / thread.updated.
BATCH = 100
# How much of a receiver's answer the delivery log keeps.
SNIPPET_BYTES = 512
MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 256
SIGNATURE_TOLERANCE = 300

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class WebhookError(Exception):
    """A webhook cannot be saved as asked; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class WebhookNotFound(WebhookError):
    """No such webhook for this user."""


# -- settings and the address policy ------------------------------------------------------


@dataclass(frozen=True)
class WebhookSettings:
    """The `[webhooks]` table (see the module docstring)."""

    allow_loopback: bool = False
    allow_private: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()
    max_attempts: int = 8
    backoff_base: float = 30.0
    backoff_max: float = 3600.0
    timeout: float = 10.0
    concurrency: int = 4
    per_webhook: int = 2
    poll_interval: float = 5.0
    retention_days: float = 30.0
    max_per_user: int = 20

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> WebhookSettings:
        """Settings from `[webhooks]`; a bad value raises ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise ConfigError(f"unknown key in [webhooks]: {key}")
            default = getattr(cls, key)
            if key in ("allow_networks", "deny_networks"):
                values[key] = parse_networks("webhooks", key, value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"[webhooks] {key} must be true or false")
                values[key] = value
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"[webhooks] {key} must be a positive integer")
                values[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(f"[webhooks] {key} must be a positive number")
                values[key] = float(value)
        return cls(**values)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1)))


class AddressPolicy(netpolicy.AddressPolicy):
    """The operator's network policy (mailcore.netpolicy) plus the check of a webhook URL
    when it is saved."""

    def check_url(self, url: Any) -> str:
        """The URL, normalised, if deliveries may go there; else WebhookError("url")."""
        if not isinstance(url, str) or not url.strip():
            raise WebhookError("Enter a valid URL.", "url")
        text = url.strip()
        if len(text) > MAX_URL_LENGTH:
            raise WebhookError(
                f"Ensure this field has no more than {MAX_URL_LENGTH} characters.", "url"
            )
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
            raise WebhookError("Enter a valid URL.", "url")
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise WebhookError("Enter a valid URL: the scheme must be http or https.", "url")
        if parts.username is not None or parts.password is not None:
            raise WebhookError("A webhook URL must not carry a user name or password.", "url")
        try:
            port = parts.port
        except ValueError:
            raise WebhookError("Enter a valid URL: the port is not valid.", "url") from None
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise WebhookError("Enter a valid URL: it has no host.", "url")
        netloc = self._check_host(host)
        if port is not None:
            if port == 0:
                raise WebhookError("Enter a valid URL: the port is not valid.", "url")
            netloc += f":{port}"
        return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))

    def _check_host(self, host: str) -> str:
        """The host as it goes in the URL, if allowed."""
        refused = WebhookError("This server does not send webhooks to that address.", "url")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if not self.allows(ip):
                raise refused
            return f"[{ip}]" if ip.version == 6 else str(ip)
        try:
            name = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url") from None
        labels = name.split(".")
        if not all(_LABEL.match(label) for label in labels) or len(name) > 253:
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url")
        # A numeric last label is an address in disguise (2130706433, 0x7f.1), never a name.
        if labels[-1].isdigit() or labels[-1].startswith("0x"):
            raise WebhookError("Enter a valid URL: the host name is not valid.", "url")
        if name == "localhost" or name.endswith(".localhost"):
            if not self.allows("127.0.0.1"):
                raise refused
        return name


# -- signatures ---------------------------------------------------------------------------


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


# -- the wire shapes (shared with the IMAP2API) ----------------------------------------------


def iso(moment: datetime.datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as Django REST framework writes times."""
    if moment is None:
        return None
    value = utc(moment)
    assert value is not None
    return value.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def thread_ref(thread_id: int | None) -> str | None:
    """Seed 001's thread id: "thread-N"."""
    return f"thread-{thread_id}" if thread_id is not None else None


def email_json(m: MessageSummary) -> dict[str, Any]:
    """An e-mail as seed 001's emails list shows it (plus the account and attachments)."""
    return {
        "id": m.id,
        "message_id": m.message_id,
        "subject": m.subject,
        "sender": m.sender,
        "recipient": m.recipient,
        "date": iso(m.date),
        "folder": m.folder,
        "thread_id": thread_ref(m.thread_id),
        "thread_count": m.thread_count,
        "imap_server": m.account_id,
        "has_attachments": m.has_attachments,
    }


# -- the model ----------------------------------------------------------------------------


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


def thd_get_webhook(conn: Connection, user_id: int, webhook_id: int) -> Webhook:
    row = conn.execute(
        select(webhooks).where(webhooks.c.id == webhook_id, webhooks.c.user_id == user_id)
    ).first()
    if row is None:
        raise WebhookNotFound("Not found.", "id")
    return _webhook(row)


@dataclass(frozen=True)
class Due:
    """A delivery claimed for one attempt, with what the attempt needs."""

    id: int
    webhook_id: int
    user_id: int
    delivery_id: str
    event: str
    payload: str
    attempts: int
    url: str
    secret_enc: bytes
    active: bool


def thd_claim_due(
    conn: Connection, now: float, lease_until: float, limit: int,
    busy: Mapping[int, int] | None = None, per_webhook: int = 2,
) -> list[Due]:
    """Up to `limit` pending deliveries due at `now`, oldest first, at most `per_webhook`
    per webhook counting the `busy` ones (webhook id -> attempts in flight), so that one
    dead receiver cannot take every slot. Leased until `lease_until`: a crash mid-attempt
    retries after the lease."""
    busy = dict(busy or {})
    full = [w for w, n in busy.items() if n >= per_webhook]
    q = (
        select(webhook_deliveries, webhooks.c.url, webhooks.c.secret_enc, webhooks.c.active)
        .select_from(webhook_deliveries.join(
            webhooks, webhooks.c.id == webhook_deliveries.c.webhook_id
        ))
        .where(webhook_deliveries.c.status == "pending")
        .where(webhook_deliveries.c.next_attempt_at <= now)
        .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
        .limit(limit * 8)
    )
    if full:
        q = q.where(webhook_deliveries.c.webhook_id.not_in(full))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(of=webhook_deliveries, skip_locked=True)
    rows: list[Any] = []
    for r in conn.execute(q):
        if len(rows) >= limit:
            break
        if busy.get(r.webhook_id, 0) >= per_webhook:
            continue
        busy[r.webhook_id] = busy.get(r.webhook_id, 0) + 1
        rows.append(r)
    if rows:
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id.in_([r.id for r in rows]))
            .values(next_attempt_at=lease_until)
        )
    return [
        Due(id=r.id, webhook_id=r.webhook_id, user_id=r.user_id, delivery_id=r.delivery_uuid,
            event=r.event, payload=r.payload, attempts=r.attempts, url=r.url,
            secret_enc=bytes(r.secret_enc), active=bool(r.active))
        for r in rows
    ]


def thd_record_attempt(
    conn: Connection, delivery_id: int, *, now: float, status: str, attempts: int,
    next_attempt_at: float, status_code: int | None, error: str | None,
    disable_webhook: int | None = None,
) -> None:
    conn.execute(
        update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id).values(
            status=status, attempts=attempts, next_attempt_at=next_attempt_at,
            last_attempt_at=now, last_status_code=status_code, last_error=error,
            completed_at=None if status == "pending" else now,
        )
    )
    if disable_webhook is not None:
        conn.execute(update(webhooks).where(webhooks.c.id == disable_webhook).values(
            active=False))


def thd_prune(conn: Connection, before: float) -> int:
    """Drop finished deliveries that completed before `before`."""
    result = conn.execute(
        delete(webhook_deliveries)
        .where(webhook_deliveries.c.status != "pending")
        .where(webhook_deliveries.c.completed_at < before)
    )
    return int(result.rowcount or 0)


def _event_payload(delivery_id: str, event: str, created: datetime.datetime,
                   data: dict[str, Any]) -> str:
    return json.dumps(
        {"id": delivery_id, "event": event, "created_at": iso(created), "data": data},
        ensure_ascii=False, separators=(",", ":"), allow_nan=False,
    )


def _thread_entries(conn: Connection, user_id: int, thread_ids: Sequence[int]) -> list[
        dict[str, Any]]:
    """thread.updated entries: each thread's size and its newest e-mail."""
    rows = conn.execute(
        select(messages.c.id, messages.c.thread_id, messages.c.date)
        .where(messages.c.user_id == user_id)
        .where(messages.c.thread_id.in_(list(thread_ids)))
    ).all()
    newest: dict[int, tuple[Any, int]] = {}
    for r in rows:
        key = (utc(r.date) or datetime.datetime.min.replace(tzinfo=datetime.UTC), r.id)
        if r.thread_id not in newest or key > newest[r.thread_id]:
            newest[r.thread_id] = key
    latest = {d.summary.id: d.summary for d in thd_get_messages(
        conn, user_id, [k[1] for k in newest.values()]
    )}
    out = []
    for tid in thread_ids:
        if tid in newest and newest[tid][1] in latest:
            summary = latest[newest[tid][1]]
            out.append({"thread_id": thread_ref(tid),
                        "thread_count": summary.thread_count,
                        "latest_email": email_json(summary)})
    return out


@dataclass
class _Subscriber:
    id: int
    events: tuple[str, ...]


# Reads, in a transaction, the event data of one batch of ids (None: nothing to tell).
_Build = Callable[[Connection, list[int]], dict[str, Any] | None]


def thd_enqueue(
    conn: Connection, user_id: int, event: str, data_list: Sequence[dict[str, Any]],
    subscribers: Sequence[_Subscriber], created: datetime.datetime, now: float,
) -> int:
    """One delivery row per (subscribed webhook, data); returns how many."""
    rows = []
    for hook in subscribers:
        if event not in hook.events:
            continue
        for data in data_list:
            delivery_id = str(uuid.uuid4())
            rows.append({
                "webhook_id": hook.id, "user_id": user_id, "delivery_uuid": delivery_id,
                "event": event, "payload": _event_payload(delivery_id, event, created, data),
                "status": "pending", "attempts": 0, "next_attempt_at": now,
                "created_at": now,
            })
    if rows:
        conn.execute(insert(webhook_deliveries), rows)
    return len(rows)


# -- the service ---------------------------------------------------------------------------


class Webhooks:
    """Webhook CRUD, the delivery log, and turning sync results into queued deliveries."""

    def __init__(
        self, db: Database, clock: IReactorTime, secrets_box: SecretBox,
        settings: WebhookSettings | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.secrets = secrets_box
        self.settings = settings or WebhookSettings()
        self.policy = AddressPolicy(self.settings)
        self.sender: WebhookSender | None = None
        self._enqueues: set[Deferred[Any]] = set()

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- CRUD ----------------------------------------------------------------------------

    async def create(
        self, user_id: int, *, url: Any, events: Any = EVENTS, description: Any = "",
        secret: Any = None, active: Any = True,
    ) -> tuple[Webhook, str]:
        """A new webhook and its signing secret (the only time the secret is shown)."""
        clean_url = self.policy.check_url(url)
        names = check_events(events)
        text = _description(description)
        if not isinstance(active, bool):
            raise WebhookError("Must be a valid boolean.", "active")
        shown = check_secret(secret) if secret is not None else new_secret()
        token = self.secrets.encrypt(shown)
        now = self.now()
        limit = self.settings.max_per_user

        def txn(conn: Connection) -> Webhook:
            count = conn.execute(
                select(func.count()).select_from(webhooks).where(webhooks.c.user_id == user_id)
            ).scalar() or 0
            if count >= limit:
                raise WebhookError(f"A user may have at most {limit} webhooks.", None)
            webhook_id = new_id(conn.execute(insert(webhooks).values(
                user_id=user_id, url=clean_url, events=",".join(names), description=text,
                secret_enc=token, active=active, created_at=now, updated_at=now,
            )))
            return thd_get_webhook(conn, user_id, webhook_id)

        return await self.db.run("create_webhook", txn), shown

    async def update(self, user_id: int, webhook_id: int, **changes: Any) -> tuple[
            Webhook, str | None]:
        """Change some of url, events, description, active, secret (or rotate_secret=True:
        a new one). Returns the webhook and the new secret if it changed."""
        values: dict[str, Any] = {}
        shown: str | None = None
        for key, value in changes.items():
            if key == "url":
                values["url"] = self.policy.check_url(value)
            elif key == "events":
                values["events"] = ",".join(check_events(value))
            elif key == "description":
                values["description"] = _description(value)
            elif key == "active":
                if not isinstance(value, bool):
                    raise WebhookError("Must be a valid boolean.", "active")
                values["active"] = value
            elif key == "secret":
                shown = check_secret(value)
            elif key == "rotate_secret":
                if value is True:
                    shown = new_secret()
            else:
                raise WebhookError(f"unknown field {key!r}", key)
        if shown is not None:
            values["secret_enc"] = self.secrets.encrypt(shown)
        values["updated_at"] = self.now()

        def txn(conn: Connection) -> Webhook:
            thd_get_webhook(conn, user_id, webhook_id)
            conn.execute(update(webhooks).where(webhooks.c.id == webhook_id).values(**values))
            return thd_get_webhook(conn, user_id, webhook_id)

        return await self.db.run("update_webhook", txn), shown

    async def delete(self, user_id: int, webhook_id: int) -> Webhook:
        """Delete a webhook and its delivery log."""

        def txn(conn: Connection) -> Webhook:
            hook = thd_get_webhook(conn, user_id, webhook_id)
            conn.execute(delete(webhook_deliveries).where(
                webhook_deliveries.c.webhook_id == webhook_id))
            conn.execute(delete(webhooks).where(webhooks.c.id == webhook_id))
            return hook

        return await self.db.run("delete_webhook", txn)

    async def get(self, user_id: int, webhook_id: int) -> Webhook:
        return await self.db.read("get_webhook", thd_get_webhook, user_id, webhook_id)

    async def list_webhooks(self, user_id: int, *, offset: int = 0,
                            limit: int = 50) -> Page[Webhook]:
        def txn(conn: Connection) -> Page[Webhook]:
            where = webhooks.c.user_id == user_id
            count = conn.execute(select(func.count()).select_from(webhooks).where(where)).scalar()
            rows = conn.execute(
                select(webhooks).where(where).order_by(webhooks.c.id).offset(offset).limit(limit)
            ).all()
            return Page(count=int(count or 0), items=[_webhook(r) for r in rows])

        return await self.db.read("list_webhooks", txn)

    async def deliveries(
        self, user_id: int, webhook_id: int, *, status: str | None = None, offset: int = 0,
        limit: int = 50,
    ) -> Page[Delivery]:
        """The delivery log of one webhook, newest first."""
        if status is not None and status not in STATUSES:
            raise WebhookError(
                f'"{status}" is not a valid choice (one of {", ".join(STATUSES)}).', "status"
            )

        def txn(conn: Connection) -> Page[Delivery]:
            thd_get_webhook(conn, user_id, webhook_id)
            conds = [webhook_deliveries.c.webhook_id == webhook_id]
            if status is not None:
                conds.append(webhook_deliveries.c.status == status)
            count = conn.execute(
                select(func.count()).select_from(webhook_deliveries).where(*conds)
            ).scalar()
            rows = conn.execute(
                select(webhook_deliveries).where(*conds)
                .order_by(webhook_deliveries.c.id.desc()).offset(offset).limit(limit)
            ).all()
            return Page(count=int(count or 0), items=[_delivery(r) for r in rows])

        return await self.db.read("list_webhook_deliveries", txn)

    # -- events --------------------------------------------------------------------------

    def on_sync(self, result: SyncResult) -> None:
        """The sync engine's listener: queue the events of a finished sync, without waiting
        (the sync has already recorded its result; a receiver never delays it)."""
        d = Deferred.fromCoroutine(self.enqueue_sync(result))
        self._enqueues.add(d)

        def done(outcome: Any) -> None:
            self._enqueues.discard(d)
            if isinstance(outcome, Failure):
                log.failure("queueing webhooks of account {account} failed", outcome,
                            account=result.account_id)

        d.addBoth(done)

    async def settle(self) -> None:
        """Wait until every queued enqueue has been written (tests, shutdown)."""
        while self._enqueues:
            await defer.DeferredList(list(self._enqueues), consumeErrors=True)

    async def enqueue_sync(self, result: SyncResult) -> int:
        """Write the deliveries a sync result causes; returns how many rows."""
        user_id = result.user_id

        def subscribers_txn(conn: Connection) -> list[_Subscriber]:
            return [
                _Subscriber(r.id, tuple(e for e in r.events.split(",") if e))
                for r in conn.execute(
                    select(webhooks.c.id, webhooks.c.events)
                    .where(webhooks.c.user_id == user_id, webhooks.c.active.is_(True))
                )
            ]

        subscribers = await self.db.read("webhook_subscribers", subscribers_txn)
        if not subscribers:
            return 0
        wanted = {e for s in subscribers for e in s.events}
        created = self.now()
        now = self.clock.seconds()
        account = result.account_id
        total = 0
        if "sync.completed" in wanted:
            data = {
                "imap_server": account, "status": result.status, "error": result.problems(),
                "new_messages": result.new_messages, "started_at": iso(result.started_at),
                "finished_at": iso(result.finished_at),
            }
            total += await self.db.run("enqueue_webhooks", thd_enqueue, user_id,
                                       "sync.completed", [data], subscribers, created, now)

        async def in_batches(name: str, event: str, ids: list[int], build: _Build) -> int:
            """Queue `event` once per BATCH of `ids`, with the data `build` reads for them
            in the same transaction (None: nothing of that batch to tell)."""
            queued = 0
            for start in range(0, len(ids), BATCH):
                chunk = ids[start:start + BATCH]

                def txn(conn: Connection, chunk: list[int] = chunk) -> int:
                    data = build(conn, chunk)
                    if data is None:
                        return 0
                    return thd_enqueue(conn, user_id, event, [data], subscribers, created, now)

                queued += await self.db.run(name, txn)
            return queued

        def new_emails(conn: Connection, chunk: list[int]) -> dict[str, Any] | None:
            found = thd_get_messages(conn, user_id, chunk)
            if not found:
                return None
            return {"imap_server": account, "emails": [email_json(d.summary) for d in found]}

        def updated_threads(conn: Connection, chunk: list[int]) -> dict[str, Any] | None:
            entries = _thread_entries(conn, user_id, chunk)
            if not entries:
                return None
            return {"imap_server": account, "threads": entries}

        if "email.new" in wanted:
            total += await in_batches("enqueue_email_webhooks", "email.new",
                                      list(result.new_message_ids), new_emails)
        if "thread.updated" in wanted:
            total += await in_batches("enqueue_thread_webhooks", "thread.updated",
                                      sorted(result.thread_ids), updated_threads)
        if total and self.sender is not None:
            self.sender.kick()
        return total


def _description(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise WebhookError("Not a valid string.", "description")
    if len(value) > 255:
        raise WebhookError("Ensure this field has no more than 255 characters.", "description")
    return value.strip()


# -- sending -------------------------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Snippet(Protocol):
    """Keeps the first bytes of a receiver's answer and drops the connection after them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]
            if len(self.data) >= self.limit and self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class _NoCookies(IndexableCookieJar):
    """Receivers' cookies are never kept (nor sent to another receiver)."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


def _GuardedEndpoint(reactor: Any, policy: AddressPolicy, uri: URI,
                     timeout: float) -> IStreamClientEndpoint:
    """The endpoint of one delivery: only to addresses the policy allows (checked after
    resolution, so DNS cannot point an accepted name at a forbidden address), TLS for https."""
    host = uri.host.decode("ascii").strip("[]")
    endpoint: IStreamClientEndpoint = GuardedEndpoint(
        reactor, policy, host, uri.port, timeout,
        refusal="is where this server does not send webhooks",
    )
    if uri.scheme == b"https":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class _GuardedEndpointFactory:
    def __init__(self, reactor: Any, policy: AddressPolicy, timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _GuardedEndpoint(self.reactor, self.policy, uri, self.timeout)


def guarded_http_client(reactor: Any, policy: AddressPolicy, timeout: float) -> Any:
    """A treq HTTPClient whose connections go only where `policy` allows; no connection
    pooling, no cookies, request bodies written without the global cooperator."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(
        reactor, _GuardedEndpointFactory(reactor, policy, timeout), pool=pool
    )
    return HTTPClient(agent, cookiejar=_NoCookies(), data_to_body_producer=_BytesProducer)


class AttemptTimedOut(Exception):
    pass


@dataclass
class Outcome:
    """What one attempt got: a status code and what to log, or an error."""

    status_code: int | None = None
    error: str | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender(Service):
    """Posts due deliveries in the background: a sweep every `poll_interval` (and at once
    when events are queued), at most `concurrency` attempts at a time, each bounded."""

    name = "webhooks"

    def __init__(
        self, webhooks_service: Webhooks, clock: IReactorTime, http: Any,
    ) -> None:
        self.webhooks = webhooks_service
        self.db = webhooks_service.db
        self.clock = clock
        self.settings = webhooks_service.settings
        self._http = http
        self._loop: task.LoopingCall | None = None
        self._soon: IDelayedCall | None = None
        self._sweeping: Deferred[int] | None = None
        self._again = False
        # delivery id -> (webhook id, the attempt)
        self._in_flight: dict[int, tuple[int, Deferred[None]]] = {}
        self._last_prune = float("-inf")
        webhooks_service.sender = self

    @property
    def http(self) -> Any:
        """The HTTP client (the guarded treq client, built on first use, unless injected)."""
        if self._http is None:
            self._http = guarded_http_client(
                self.clock, self.webhooks.policy, self.settings.timeout
            )
        return self._http

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_interval, now=True).addErrback(
            lambda f: log.failure("webhook sender stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.webhooks.settle()
        pending = [d for _, d in self._in_flight.values()]
        for d in pending:
            d.cancel()
        if pending:
            await defer.DeferredList(pending, consumeErrors=True)
        if self._sweeping is not None:
            await defer.DeferredList([self._sweeping], consumeErrors=True)

    def kick(self) -> None:
        """New deliveries were queued: sweep soon rather than at the next tick."""
        if not self.running:
            return
        if self._soon is None or not self._soon.active():
            self._soon = self.clock.callLater(0, self._tick)

    def _tick(self) -> Deferred[int]:
        self._soon = None
        if self._sweeping is not None:
            self._again = True
            return defer.succeed(0)
        d = Deferred.fromCoroutine(self.sweep())
        d.addErrback(self._sweep_failed)
        return d

    def _sweep_failed(self, failure: Failure) -> int:
        log.failure("webhook sweep failed", failure)
        return 0

    async def sweep(self) -> int:
        """Claim what is due (up to free room) and start those attempts; returns how many."""
        if self._sweeping is not None:
            self._again = True
            return 0
        started = 0
        self._sweeping = Deferred()
        try:
            while True:
                self._again = False
                room = self.settings.concurrency - len(self._in_flight)
                if room <= 0:
                    break
                now = self.clock.seconds()
                lease = now + self.settings.timeout * 3 + 30
                busy: dict[int, int] = {}
                for webhook_id, _ in self._in_flight.values():
                    busy[webhook_id] = busy.get(webhook_id, 0) + 1
                due = await self.db.run("claim_webhook_deliveries", thd_claim_due, now, lease,
                                        room, busy, self.settings.per_webhook)
                for item in due:
                    self._start(item)
                started += len(due)
                if len(due) < room and not self._again:
                    break
            await self._prune()
        finally:
            sweeping, self._sweeping = self._sweeping, None
            sweeping.callback(started)
        return started

    async def _prune(self) -> None:
        now = self.clock.seconds()
        if now - self._last_prune < 3600:
            return
        self._last_prune = now
        await self.db.run("prune_webhook_deliveries", thd_prune,
                          now - self.settings.retention_days * 86400)

    def _start(self, item: Due) -> None:
        d = Deferred.fromCoroutine(self.attempt(item))
        self._in_flight[item.id] = (item.webhook_id, d)

        def finished(outcome: Any) -> None:
            self._in_flight.pop(item.id, None)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                log.failure("webhook delivery {id} failed", outcome, id=item.id)
            if self.running:
                self.kick()

        d.addBoth(finished)

    async def attempt(self, item: Due) -> None:
        """One attempt at one delivery, and its record in the log."""
        now = self.clock.seconds()
        if not item.active:
            await self.db.run(
                "record_webhook_attempt", thd_record_attempt, item.id, now=now,
                status="cancelled", attempts=item.attempts, next_attempt_at=now,
                status_code=None, error="the webhook is disabled",
            )
            return
        try:
            outcome = await self.post(item)
        except defer.CancelledError:
            # Stopping: the delivery stays pending and is retried after its lease.
            raise
        done = self.clock.seconds()
        attempts = item.attempts + 1
        disable = None
        if outcome.ok:
            status, next_at = "success", done
        elif outcome.status_code == 410:
            status, next_at, disable = "failed", done, item.webhook_id
            outcome.error = (outcome.error or "") + " (410 Gone: the webhook was disabled)"
        elif outcome.refused or attempts >= self.settings.max_attempts:
            status, next_at = "failed", done
        else:
            status, next_at = "pending", done + self.settings.backoff(attempts)
        await self.db.run(
            "record_webhook_attempt", thd_record_attempt, item.id, now=done, status=status,
            attempts=attempts, next_attempt_at=next_at, status_code=outcome.status_code,
            error=outcome.error, disable_webhook=disable,
        )

    async def post(self, item: Due) -> Outcome:
        """Sign and POST one delivery; never raises for what the receiver does."""
        try:
            url = self.webhooks.policy.check_url(item.url)
        except WebhookError as e:
            return Outcome(error=e.message, refused=True)
        try:
            secret = self.webhooks.secrets.decrypt(item.secret_enc)
        except SecretError as e:
            return Outcome(error=str(e), refused=True)
        body = item.payload.encode("utf-8")
        timestamp = int(self.clock.seconds())
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [USER_AGENT.encode("ascii")],
            EVENT_HEADER.encode("ascii"): [item.event.encode("ascii")],
            DELIVERY_HEADER.encode("ascii"): [item.delivery_id.encode("ascii")],
            TIMESTAMP_HEADER.encode("ascii"): [str(timestamp).encode("ascii")],
            SIGNATURE_HEADER.encode("ascii"): [sign(secret, timestamp, body).encode("ascii")],
        }
        try:
            response = await self._bounded(self.http.request(
                "POST", url, headers=headers, data=body, allow_redirects=False,
                unbuffered=True,
            ))
            snippet = _Snippet(SNIPPET_BYTES)
            response.deliverBody(snippet)
            text = (await self._bounded(snippet.done)).decode("utf-8", "replace").strip()
        except AttemptTimedOut:
            return Outcome(error=f"no answer within {self.settings.timeout:g} s")
        except AddressRefused as e:
            return Outcome(error=str(e), refused=True)
        except defer.CancelledError:
            raise
        except Exception as e:
            return Outcome(error=_describe(e))
        code = int(response.code)
        if 200 <= code < 300:
            return Outcome(status_code=code)
        return Outcome(status_code=code, error=f"HTTP {code}" + (f": {text}" if text else ""))

    async def _bounded(self, d: Deferred[Any]) -> Any:
        """`d`'s result, or AttemptTimedOut (and `d` cancelled) after the timeout."""
        result: Deferred[Any] = Deferred(lambda _: d.cancel())
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()
            if not result.called:
                result.errback(AttemptTimedOut())

        timer = self.clock.callLater(self.settings.timeout, expire)

        def forward(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if isinstance(outcome, Failure):
                result.errback(AttemptTimedOut() if timed_out else outcome)
            else:
                result.callback(outcome)

        d.addBoth(forward)
        return await result


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed attempt."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = reasons[0].value
        if isinstance(inner, AddressRefused):
            return str(inner)
        return f"{type(inner).__name__}: {inner}".strip()
    return f"{type(error).__name__}: {error}".strip()


def build_webhooks(
    section: Mapping[str, Any], db: Database, clock: IReactorTime, secrets_box: SecretBox,
    *, http: Any = None,
) -> Webhooks:
    """The webhook service (with its sender at `.sender`) from the `[webhooks]` section."""
    service = Webhooks(db, clock, secrets_box, WebhookSettings.from_section(section))
    WebhookSender(service, clock, http)
    return service


__all__ = [
    "DELIVERY_HEADER",
    "EVENTS",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AddressPolicy",
    "AddressRefused",
    "Delivery",
    "Webhook",
    "WebhookError",
    "WebhookNotFound",
    "WebhookSender",
    "WebhookSettings",
    "Webhooks",
    "build_webhooks",
    "email_json",
    "iso",
    "sign",
    "thread_ref",
    "verify_signature",
]

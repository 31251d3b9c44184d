"""The webhook service: a user's webhooks (create, change, list, delete), the delivery log, and
the delivery rows written when a sync finishes."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, func, insert, select, update
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.fetch.engine import SyncResult
from mailcore.fetch.secrets import SecretBox
from mailcore.messages.models import Page
from mailcore.messages.sql import new_id
from mailcore.messages.store import thd_get_messages
from mailcore.store import Database
from mailcore.store.schema import users, webhook_deliveries, webhooks
from mailcore.webhooks.model import (
    BATCH,
    EVENTS,
    STATUSES,
    Delivery,
    Webhook,
    WebhookError,
    _delivery,
    _description,
    _webhook,
    check_events,
    check_secret,
)
from mailcore.webhooks.payload import email_json, iso
from mailcore.webhooks.settings import AddressPolicy, WebhookSettings
from mailcore.webhooks.signing import new_secret
from mailcore.webhooks.store import (
    _Build,
    _Subscriber,
    _thread_entries,
    thd_enqueue,
    thd_get_webhook,
)

if TYPE_CHECKING:
    from mailcore.webhooks.sender import WebhookSender

log = Logger()


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
            # The user's row is locked first, so that concurrent creates for one user count
            # one after another (PostgreSQL's READ COMMITTED would let each count the same
            # rows; SQLite serialises writers anyway and ignores FOR UPDATE).
            conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update())
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

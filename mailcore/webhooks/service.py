"""The webhook service: a user's webhooks (create, change, list, delete), the delivery log, and
a sync's events: recorded as it commits, turned into delivery rows (`mailcore.webhooks.events`)."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, delete, func, insert, select, update
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.fetch.engine import SyncEngine, SyncResult
from mailcore.fetch.secrets import SecretBox
from mailcore.messages.models import Location, Page, StoreResult
from mailcore.messages.sql import new_id
from mailcore.outages import log_failure
from mailcore.periodic import delete_in_batches
from mailcore.store import Database
from mailcore.store.owners import thd_lock_owner
from mailcore.store.schema import webhook_deliveries, webhooks
from mailcore.webhooks import store as delivery_store
from mailcore.webhooks.events import (
    account_scope,
    thd_any_pending,
    thd_not_syncing,
    thd_record_batch,
    thd_record_outcome,
    thd_tell,
)
from mailcore.webhooks.model import (
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
from mailcore.webhooks.settings import AddressPolicy, WebhookSettings
from mailcore.webhooks.signing import new_secret
from mailcore.webhooks.store import thd_get_webhook

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
        self.engine: SyncEngine | None = None  # the syncs it is told of (`attach`)
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
            thd_lock_owner(conn, user_id)  # creates for one user count one after another
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

    def attach(self, engine: SyncEngine) -> None:
        """Be told of `engine`'s syncs: each batch's new e-mails and threads and each outcome
        recorded as pending events in the sync's own transactions (`thd_batch`,
        `thd_outcome`), told when the sync ends (`on_sync`) or, if that is cut short, by
        the sender's sweep (`tell_left`)."""
        self.engine = engine
        engine.recorders.append(self)
        engine.listeners.append(self.on_sync)

    def thd_batch(self, conn: Connection, where: Location, stored: StoreResult,
                  now: float) -> None:
        """Blocking, in a sync's batch transaction: its pending email.new/thread.updated."""
        if where.account_id is not None:
            thd_record_batch(conn, where.user_id, where.account_id, stored.created,
                             stored.thread_ids, now)

    def thd_outcome(self, conn: Connection, result: SyncResult, now: float) -> None:
        """Blocking, in the transaction recording a sync's outcome: its sync.completed."""
        thd_record_outcome(conn, result, now)

    def on_sync(self, result: SyncResult) -> None:
        """The sync engine's listener: tell the events the sync recorded, without waiting
        (the sync has already recorded its result; a receiver never delays it). What a
        failure here leaves pending, the sender's sweep tells."""
        d = Deferred.fromCoroutine(self.tell(account_scope(result.account_id)))
        self._enqueues.add(d)

        def done(outcome: Any) -> None:
            self._enqueues.discard(d)
            if isinstance(outcome, Failure):
                log_failure(log, "queueing webhooks of account {account} failed "
                            "(the sweep tries again)", outcome, account=result.account_id)

        d.addBoth(done)

    async def settle(self) -> None:
        """Wait until every queued enqueue has been written (tests, shutdown)."""
        while self._enqueues:
            await defer.DeferredList(list(self._enqueues), consumeErrors=True)

    async def prune(self) -> int:
        """Delete the finished deliveries that completed more than `retention_days` ago,
        PRUNE_BATCH a transaction; how many."""
        before = self.clock.seconds() - self.settings.retention_days * 86400
        return await delete_in_batches(self.db, "prune_webhook_deliveries",
                                       delivery_store.thd_prune, before,
                                       batch=delivery_store.PRUNE_BATCH)

    async def tell_left(self) -> int:
        """Tell the pending events no running sync will tell at its end: those a crash, a
        store error or a stop left, and a dead node's (once its lease lapsed)."""
        engine = self.engine
        if engine is None:
            scope = thd_not_syncing(self.clock.seconds(), None, [])
        else:  # judged by the clock the engine leases accounts with
            scope = thd_not_syncing(engine.reactor.seconds(), engine.node_id, engine.running())
        return await self.tell(scope)

    async def tell(self, scope: ColumnElement[bool]) -> int:
        """Turn the pending events in `scope` into delivery rows, one delivery's events a
        transaction; returns how many rows were written."""
        if not await self.db.read("webhook_events_pending", thd_any_pending, scope):
            return 0
        total = 0
        while True:
            written, found = await self.db.run("tell_webhook_events", thd_tell, scope,
                                               self.now(), self.clock.seconds())
            if not found:
                break
            total += written
        if total and self.sender is not None:
            self.sender.kick()
        return total

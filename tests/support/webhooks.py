"""A sync's webhook events recorded and told as the sync engine does it, for tests that need
the events of a sync without running one."""

from __future__ import annotations

from sqlalchemy import Connection

from mailcore.fetch.engine import SyncResult
from mailcore.messages.models import Location, StoreResult
from mailcore.webhooks import Webhooks
from mailcore.webhooks.events import account_scope


async def sync_ended(webhooks: Webhooks, result: SyncResult) -> int:
    """What a sync that did `result` leaves, its engine attached to `webhooks`: the
    recorders' pending events (`Webhooks.thd_batch` for its new e-mails and threads, as one
    batch, and `thd_outcome`) in one transaction, then told as its end tells them
    (`Webhooks.tell` for its account, as `on_sync` does); how many delivery rows were
    written."""
    now = webhooks.clock.seconds()
    where = Location(result.user_id, result.account_id, None, "INBOX")
    stored = StoreResult(created=list(result.new_message_ids),
                         thread_ids=sorted(result.thread_ids))

    def txn(conn: Connection) -> None:
        webhooks.thd_batch(conn, where, stored, now)
        webhooks.thd_outcome(conn, result, now)

    await webhooks.db.run("record_webhook_events", txn)
    return await webhooks.tell(account_scope(result.account_id))

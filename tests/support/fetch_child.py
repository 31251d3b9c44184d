"""A separate process that syncs one account, for the kill -9 test.

Usage: python -m tests.support.fetch_child DB_URL ACCOUNT_ID (key in $FETCH_CHILD_KEY).
It syncs in small batches so that the parent can kill it in the middle.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, task

from mailcore.fetch.accounts import Accounts
from mailcore.fetch.engine import SyncEngine
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.settings import FetchSettings
from mailcore.messages.store import MessageStore
from mailcore.store import Database
from mailcore.workers import CpuPool


async def run(reactor: Any, url: str, account_id: int) -> None:
    db = Database(url, reactor)
    await db.open()
    accounts = Accounts(db, reactor, SecretBox(os.environ["FETCH_CHILD_KEY"].encode()))
    store = MessageStore(db, CpuPool.for_tests(), reactor)
    settings = FetchSettings(batch_messages=5, allow_loopback=True)  # Dovecot is on 127.0.0.1
    engine = SyncEngine(reactor, db, accounts, store, settings)
    await engine.sync(account_id)
    await db.close()


def main(reactor: Any) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(run(reactor, sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    task.react(main)

"""The fetch engine: IMAP and POP3 accounts, sessions and the incremental sync on top of them.

`build_fetch` makes the services the daemon needs; `Accounts` is the account CRUD,
`SyncEngine.sync(account_id)` syncs one account now, `FetchScheduler` syncs them all
periodically.

Migrating one account into another and restoring a backup into an account (APPEND back)
belong here too, beside the engine that backs accounts up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailcore.fetch.accounts import Account, Accounts
from mailcore.fetch.engine import FolderResult, SyncEngine, SyncResult
from mailcore.fetch.errors import AccountError, AccountNotFound, FetchError
from mailcore.fetch.scheduler import FetchScheduler
from mailcore.fetch.secrets import KeyFileSecretBox, SecretBox
from mailcore.fetch.settings import FetchSettings
from mailcore.messages.store import MessageStore
from mailcore.store import Database
from mailcore.workers import CpuPool


@dataclass
class FetchServices:
    """Everything the fetch side offers, built once for the Core."""

    settings: FetchSettings
    secrets: KeyFileSecretBox
    accounts: Accounts
    messages: MessageStore
    engine: SyncEngine
    scheduler: FetchScheduler

    def load_key(self) -> None:
        """Read or make the password key now (blocks: call before the reactor runs)."""
        self.secrets.load()


def build_fetch(
    reactor: Any, db: Database, cpu: CpuPool, data_dir: Path, section: dict[str, Any],
    *, node_id: str = "local",
) -> FetchServices:
    """The fetch services from the `[fetch]` config section. The password key in
    `data_dir` is read (or made) on first use or by `load_key()`; `node_id` names this
    node in the accounts' sync leases."""
    settings = FetchSettings.from_section(section)
    secrets = KeyFileSecretBox(data_dir, settings.secret_key)
    accounts = Accounts(db, reactor, secrets, max_per_user=settings.max_accounts_per_user)
    messages = MessageStore(db, cpu, reactor)
    engine = SyncEngine(reactor, db, accounts, messages, settings, node_id=node_id)
    return FetchServices(
        settings=settings, secrets=secrets, accounts=accounts, messages=messages,
        engine=engine, scheduler=FetchScheduler(engine),
    )


__all__ = [
    "Account",
    "AccountError",
    "AccountNotFound",
    "Accounts",
    "FetchError",
    "FetchScheduler",
    "FetchServices",
    "FetchSettings",
    "FolderResult",
    "SecretBox",
    "SyncEngine",
    "SyncResult",
    "build_fetch",
]

"""Fetch services wired for tests: a real threaded SQLite, a synchronous CPU pool, a user."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import Connection, func, insert, select
from twisted.trial.unittest import TestCase

from mailcore.fetch.accounts import Account, Accounts
from mailcore.fetch.engine import SyncEngine
from mailcore.fetch.secrets import SecretBox
from mailcore.fetch.settings import FetchSettings
from mailcore.messages.models import MessageDetail
from mailcore.messages.sql import new_id
from mailcore.messages.store import MessageStore
from mailcore.store import Database
from mailcore.store.schema import messages, users
from mailcore.workers import CpuPool
from tests.support.db import open_database
from tests.support.dovecot import DovecotServer
from tests.support.reactor import get_reactor


def thd_make_user(conn: Connection, name: str) -> int:
    return new_id(conn.execute(insert(users).values(
        username=name, email=f"{name}@owner.test", nic=name,
        created_at=datetime.datetime.now(datetime.UTC),
    )))


@dataclass
class FetchEnv:
    db: Database
    accounts: Accounts
    store: MessageStore
    engine: SyncEngine
    user_id: int
    key: str

    async def imap_account(self, server: DovecotServer, user: str, **kw: Any) -> Account:
        """An account on `server` for `user`: STARTTLS on the plain port, trusting its CA."""
        values: dict[str, Any] = {
            "name": f"{user} at dovecot", "host": "localhost", "port": server.imap,
            "username": user, "password": server.PASSWORD,
            "tls_ca_pem": server.pki.ca_pem.decode(), "start_tls": True,
        }
        values.update(kw)
        return await self.accounts.create(self.user_id, **values)

    async def pop_account(self, server: DovecotServer, user: str, **kw: Any) -> Account:
        values: dict[str, Any] = {
            "email": f"{user}@dovecot.test", "protocol": "pop", "host": "localhost",
            "port": server.pop3, "username": user, "password": server.PASSWORD,
            "tls_ca_pem": server.pki.ca_pem.decode(), "start_tls": True,
        }
        values.update(kw)
        return await self.accounts.create(self.user_id, **values)

    async def held(self, account_id: int) -> list[tuple[str, str]]:
        """Sorted (folder, sha256) of every message row of the account (duplicates kept)."""

        def txn(conn: Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                select(messages.c.folder, messages.c.sha256)
                .where(messages.c.account_id == account_id)
            )
            return sorted((r.folder, r.sha256) for r in rows)

        return await self.db.read("test_held", txn)

    async def copies(self, account_id: int, folder: str) -> dict[int, tuple[str, bool]]:
        """uid -> (flags, on_server) of the account's copies in `folder`."""

        def txn(conn: Connection) -> dict[int, tuple[str, bool]]:
            rows = conn.execute(
                select(messages.c.uid, messages.c.flags, messages.c.on_server)
                .where(messages.c.account_id == account_id)
                .where(messages.c.folder == folder)
            )
            return {r.uid: (r.flags, bool(r.on_server)) for r in rows}

        return await self.db.read("test_copies", txn)

    async def count(self, account_id: int, on_server: bool | None = None) -> int:
        """How many copies the account has (only those on/off the server, if asked)."""

        def txn(conn: Connection) -> int:
            q = select(func.count()).select_from(messages).where(
                messages.c.account_id == account_id
            )
            if on_server is not None:
                q = q.where(messages.c.on_server == on_server)
            return int(conn.execute(q).scalar() or 0)

        return await self.db.read("test_count", txn)


async def make_env(test: TestCase, *, backend: str = "sqlite", **settings: Any) -> FetchEnv:
    reactor = get_reactor()
    db = await open_database(test, backend)
    user_id = await db.run("make_user", thd_make_user, "owner")
    key = Fernet.generate_key()
    accounts = Accounts(db, reactor, SecretBox(key))
    store = MessageStore(db, CpuPool.for_tests(), reactor)
    # The test servers listen on 127.0.0.1, which the default address policy refuses.
    settings = {"allow_loopback": True, **settings}
    engine = SyncEngine(reactor, db, accounts, store, FetchSettings(**settings))
    return FetchEnv(db=db, accounts=accounts, store=store, engine=engine, user_id=user_id,
                    key=key.decode("ascii"))


def expected(server: DovecotServer, user: str, folders: list[str]) -> list[tuple[str, str]]:
    """Sorted (folder, sha256) of what the server holds in `folders`."""
    return sorted((f, h) for f in folders for h in server.source_hashes(user, f))


async def thread_of(store: MessageStore, user_id: int, row_id: int) -> list[MessageDetail]:
    """Every message of the thread `row_id` belongs to, oldest first, all in memory (the
    replies write them as they are read: MessageStore.thread_ids and details_of)."""
    ids = await store.thread_ids(user_id, row_id)
    return [detail async for detail in store.details_of(user_id, ids)]

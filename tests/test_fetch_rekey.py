"""Changing the fetch key (`mailcore secrets rotate`) and giving up a lost one's secrets
(`mailcore secrets forget`): before, a lost fetch.key kept the whole daemon (the relay too)
from starting, with no way out but editing the database, and the key could not be changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import select
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.fetch import Accounts, rekey
from mailcore.fetch.secrets import (
    FORGOTTEN,
    KEY_FILE,
    KeyFileSecretBox,
    SecretBox,
    SecretError,
    check_key_blocking,
    parse_keys,
)
from mailcore.store.schema import fetch_accounts
from mailcore.workers import CpuPool
from tests.support.cli import CliTestCase
from tests.support.db import open_database_at, synchronous_database
from tests.support.fetchenv import thd_make_user

BASE: dict[str, Any] = {"host": "imap.example.test", "username": "me@example.test"}


class RekeyTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.data_dir = Path(self.mktemp())
        self.db = synchronous_database(f"sqlite:///{self.mktemp()}.sqlite")
        self.io = CpuPool.for_tests()
        self.user = await self.db.run("make_user", thd_make_user, "owner")
        self.accounts = Accounts(self.db, Clock(), KeyFileSecretBox(self.data_dir))
        self.ids = [(await self.accounts.create(self.user, **BASE, password=f"pw-{n}")).id
                    for n in range(5)]
        self.old = (self.data_dir / KEY_FILE).read_bytes().strip()
        self.patch(rekey, "BATCH", 2)  # three batches of the five

    def fresh(self, configured: str | None = None) -> Accounts:
        """The accounts as a daemon started now would read them."""
        return Accounts(self.db, Clock(), KeyFileSecretBox(self.data_dir, configured))

    async def passwords(self, accounts: Accounts) -> list[str]:
        return [(await accounts.credentials(i))[1] for i in self.ids]

    async def tokens(self) -> list[bytes]:
        rows = await self.db.read("tokens", lambda c: c.execute(
            select(fetch_accounts.c.password_enc).order_by(fetch_accounts.c.id)).scalars().all())
        return [bytes(t) for t in rows]

    async def test_rotate_puts_every_secret_under_a_new_key_alone_in_the_file(self) -> None:
        done = await rekey.rotate(self.db, self.io, self.data_dir, None)
        self.assertEqual((done.rotated, done.unreadable),
                         ({"fetch_accounts.password_enc": 5}, {}))
        keys = parse_keys((self.data_dir / KEY_FILE).read_bytes())
        self.assertEqual(len(keys), 1)
        self.assertNotEqual(keys[0], self.old)
        self.assertEqual(await self.passwords(self.fresh()), [f"pw-{n}" for n in range(5)])
        for token in await self.tokens():
            self.assertRaises(SecretError, SecretBox(self.old).decrypt, token)
        check_key_blocking(self.db.engine, self.data_dir)

    async def test_a_crash_midway_leaves_a_file_that_opens_everything(self) -> None:
        calls = []
        batch = rekey._batch_txn

        def crashing(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed")
            return batch(*args)

        self.patch(rekey, "_batch_txn", crashing)
        with self.assertRaises(RuntimeError):
            await rekey.rotate(self.db, self.io, self.data_dir, None)
        # Old and new keys both: half the secrets are under each, and all open.
        self.assertEqual(len(parse_keys((self.data_dir / KEY_FILE).read_bytes())), 2)
        self.assertEqual(await self.passwords(self.fresh()), [f"pw-{n}" for n in range(5)])
        check_key_blocking(self.db.engine, self.data_dir)
        self.patch(rekey, "_batch_txn", batch)
        await rekey.rotate(self.db, self.io, self.data_dir, None)  # run again: finished
        self.assertEqual(len(parse_keys((self.data_dir / KEY_FILE).read_bytes())), 1)
        self.assertEqual(await self.passwords(self.fresh()), [f"pw-{n}" for n in range(5)])

    async def test_a_secret_no_key_opens_keeps_the_old_keys(self) -> None:
        foreign = SecretBox.generate().encrypt("theirs")
        await self.db.run("foreign", lambda c: c.execute(
            fetch_accounts.update().where(fetch_accounts.c.id == self.ids[0])
            .values(password_enc=foreign)))
        done = await rekey.rotate(self.db, self.io, self.data_dir, None)
        self.assertEqual((done.rotated, done.unreadable),
                         ({"fetch_accounts.password_enc": 4},
                          {"fetch_accounts.password_enc": 1}))
        self.assertEqual(len(parse_keys((self.data_dir / KEY_FILE).read_bytes())), 2)
        self.assertEqual((await self.tokens())[0], foreign)  # left as it was

    async def test_with_configured_keys_the_first_encrypts(self) -> None:
        new = Fernet.generate_key().decode()
        configured = f"{new}, {self.old.decode()}"
        done = await rekey.rotate(self.db, self.io, self.data_dir, configured)
        self.assertEqual(done.rotated, {"fetch_accounts.password_enc": 5})
        self.assertEqual(await self.passwords(self.fresh(new)), [f"pw-{n}" for n in range(5)])
        self.assertEqual(parse_keys((self.data_dir / KEY_FILE).read_bytes()), [self.old])

    async def test_rotate_refuses_a_missing_key_file(self) -> None:
        (self.data_dir / KEY_FILE).unlink()
        with self.assertRaises(SecretError) as caught:
            await rekey.rotate(self.db, self.io, self.data_dir, None)
        self.assertIn("fetch.key is missing", str(caught.exception))
        self.assertFalse((self.data_dir / KEY_FILE).exists())

    async def test_forget_gives_up_what_a_lost_key_encrypted_and_the_daemon_starts(
            self) -> None:
        (self.data_dir / KEY_FILE).unlink()
        self.assertRaises(SecretError, check_key_blocking, self.db.engine, self.data_dir)
        done = await rekey.forget(self.db, self.io, self.data_dir, None)
        self.assertEqual(done.forgotten, {"fetch_accounts.password_enc": 5})
        self.assertEqual(await self.tokens(), [FORGOTTEN] * 5)
        check_key_blocking(self.db.engine, self.data_dir)  # starts with the new key
        accounts = self.fresh()
        with self.assertRaises(SecretError) as caught:
            await accounts.credentials(self.ids[0])
        self.assertIn("set it again", str(caught.exception))
        # The owner sets the password again: it is stored under the new key.
        await accounts.update(self.user, self.ids[0], password="new-pw")
        self.assertEqual((await accounts.credentials(self.ids[0]))[1], "new-pw")
        self.assertEqual((await rekey.forget(self.db, self.io, self.data_dir, None)).forgotten,
                         {})  # nothing more to give up; the new password stays

    async def test_forget_keeps_what_the_current_key_opens(self) -> None:
        foreign = SecretBox.generate().encrypt("theirs")
        await self.db.run("foreign", lambda c: c.execute(
            fetch_accounts.update().where(fetch_accounts.c.id == self.ids[2])
            .values(password_enc=foreign)))
        done = await rekey.forget(self.db, self.io, self.data_dir, None)
        self.assertEqual(done.forgotten, {"fetch_accounts.password_enc": 1})
        tokens = await self.tokens()
        self.assertEqual(tokens[2], FORGOTTEN)
        fresh = self.fresh()
        kept = [(await fresh.credentials(i))[1] for i in self.ids if i != self.ids[2]]
        self.assertEqual(kept, ["pw-0", "pw-1", "pw-3", "pw-4"])


class SecretsCliTests(CliTestCase):
    tempdir_prefix = "mailcore-cli-secrets-"

    async def test_rotate_and_forget_from_the_shell(self) -> None:
        await self.ok("init")
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        user = await db.run("make_user", thd_make_user, "owner")
        account = await Accounts(db, Clock(), KeyFileSecretBox(self.data_dir)).create(
            user, **BASE, password="pw")
        self.assertIn("secrets", await self.ok("--help"))
        self.assertIn("Stop the daemon first", await self.ok("secrets", "rotate", "--help"))
        out = await self.ok("secrets", "rotate")
        self.assertIn("encrypted again: 1 in fetch_accounts.password_enc", out)
        self.assertIn("holds the new key alone", out)
        fresh = Accounts(db, Clock(), KeyFileSecretBox(self.data_dir))
        self.assertEqual((await fresh.credentials(account.id))[1], "pw")

        (self.data_dir / KEY_FILE).unlink()  # lost
        await self.ok("user", "list")  # a command that uses no secret makes no new key
        self.assertFalse((self.data_dir / KEY_FILE).exists())
        await self.refused("secrets", "rotate", fragment="fetch.key is missing")
        await self.refused("secrets", "forget", fragment="run it again with --yes")
        self.assertEqual(await self.ok("secrets", "forget", "--yes"),
                         "given up: 1 in fetch_accounts.password_enc\n")
        check_key_blocking(db.engine, self.data_dir)

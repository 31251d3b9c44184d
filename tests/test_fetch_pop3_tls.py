"""POP3 sync and TLS verification against a real Dovecot.

POP3: UIDL-based and incremental, over STLS or POP3S, and it never deletes on the server.
TLS (IMAP and POP3): the account's CA with the right host name works, a pinned fingerprint
works, and a wrong CA, a wrong host name or the platform's trust store (which does not know
our test CA) all fail with a clear error — verification is never turned off.
"""

from __future__ import annotations

import datetime
from email.utils import format_datetime
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.fetch.pop3 import POP3Session
from tests.support.corpus import make_corpus
from tests.support.dovecot import DovecotClassMixin, DovecotServer
from tests.support.fetchenv import FetchEnv, expected, make_env
from tests.support.testca import shared_pki


class POP3SyncTests(DovecotClassMixin, TestCase):
    timeout = 60

    async def setup(self, count: int = 120) -> tuple[DovecotServer, str, FetchEnv]:
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(0, count)])
        return server, user, await make_env(self, batch_messages=25)

    async def test_pop3_sync_is_incremental_and_never_deletes(self) -> None:
        server, user, env = await self.setup()
        account = await env.pop_account(server, user)
        first = await env.engine.sync(account.id)
        self.assertEqual(first.status, "success", first.problems())
        self.assertEqual(first.new_messages, 120)
        self.assertEqual(await env.held(account.id), expected(server, user, ["INBOX"]))

        second = await env.engine.sync(account.id)
        self.assertEqual((second.status, second.new_messages), ("success", 0))

        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(500, 5, "pop-new")])
        third = await env.engine.sync(account.id)
        self.assertEqual((third.status, third.new_messages), ("success", 5))
        self.assertEqual(await env.held(account.id), expected(server, user, ["INBOX"]))
        # Nothing was deleted on the server: every file is still there.
        self.assertEqual(len(server.source_hashes(user, "INBOX")), 125)

    async def test_lines_of_dots_come_back_byte_exact_from_dovecot(self) -> None:
        """Dovecot byte-stuffs a message's lines "." and ".." (RFC 1939 3): each reply ends
        where it says, so none is taken for one that went on after its end (OutOfStep)."""
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [
            b"Subject: dots %d\r\nMessage-ID: <dots-%d@pop.test>\r\n\r\n.\r\n..\r\n.x\r\n"
            b"end %d\r\n.\r\n" % (i, i, i) for i in range(5)])
        env = await make_env(self, batch_messages=2)
        account = await env.pop_account(server, user)
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 5), result.problems())
        self.assertEqual(await env.held(account.id), expected(server, user, ["INBOX"]))

    async def test_pop3s_with_last_n_limit(self) -> None:
        server, user, env = await self.setup(30)
        account = await env.pop_account(
            server, user, port=server.pop3s, use_ssl=True, start_tls=False,
            sync_limit_type="last_n", sync_limit_value=10,
        )
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 10))

    async def test_pop3_date_limit_fetches_only_recent_mail_and_only_once(self) -> None:
        """The header (TOP n 0) tells each message's Date; the old ones are never fetched."""
        server, user, env = await self.setup(20)  # dated October 2024
        now = format_datetime(datetime.datetime.now(datetime.UTC))
        server.add_messages(user, "INBOX", [
            f"Subject: recent {i}\r\nMessage-ID: <recent-{i}@pop.test>\r\nDate: {now}\r\n"
            f"\r\nbody {i}\r\n".encode() for i in range(2)
        ])
        account = await env.pop_account(server, user, sync_limit_type="days",
                                        sync_limit_value=30)
        fetched: list[int] = []
        original = POP3Session.retrieve_bytes

        async def counted(session: POP3Session, index: int) -> bytes:
            fetched.append(index)
            return await original(session, index)

        self.patch(POP3Session, "retrieve_bytes", counted)
        first = await env.engine.sync(account.id)
        self.assertEqual((first.status, first.new_messages), ("success", 2), first.problems())
        second = await env.engine.sync(account.id)
        self.assertEqual((second.status, second.new_messages), ("success", 0))
        self.assertEqual(fetched, [20, 21])

    async def test_pop3_interrupted_then_rerun_gives_exact_set(self) -> None:
        server, user, env = await self.setup()
        account = await env.pop_account(server, user)
        original = env.store.store_batch
        calls = [0]

        async def store_then_fail(where: Any, fetched: Any, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("simulated crash before this batch committed")
            return await original(where, fetched, **kw)

        env.store.store_batch = store_then_fail  # type: ignore[method-assign]
        broken = await env.engine.sync(account.id)
        self.assertEqual(broken.status, "error")
        self.assertEqual(await env.count(account.id), 50)
        self.flushLoggedErrors(RuntimeError)
        env.store.store_batch = original  # type: ignore[method-assign]
        result = await env.engine.sync(account.id)
        self.assertEqual((result.status, result.new_messages), ("success", 70))
        self.assertEqual(await env.held(account.id), expected(server, user, ["INBOX"]))

    async def test_an_account_turning_to_pop3_and_back_keeps_one_copy_of_each(self) -> None:
        """Dropmyemail's PUT may change an account's protocol. Turned from IMAP to POP3, the
        POP3 sync stored every INBOX message again under its UIDL (found live: INBOX 40 ->
        80 backed-up messages, and a migrate then copied 80); turned back, IMAP stored the
        ones POP3 had fetched again under their UIDs. Now each is the copy held already,
        found by its bytes."""
        server, user, env = await self.setup(60)
        server.add_messages(user, "Archive", [m.raw for m in make_corpus(300, 10, "arch")])
        account = await env.imap_account(server, user, folders_to_sync=["Archive", "INBOX"])
        first = await env.engine.sync(account.id)
        self.assertEqual((first.status, first.new_messages), ("success", 70),
                         first.problems())
        await env.accounts.update(env.user_id, account.id, protocol="pop", port=server.pop3,
                                  password=server.PASSWORD)
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(500, 5, "as-pop")])
        popped = await env.engine.sync(account.id)
        self.assertEqual((popped.status, popped.new_messages), ("success", 5),
                         popped.problems())
        want = expected(server, user, ["Archive", "INBOX"])
        self.assertEqual(await env.held(account.id), want)
        again = await env.engine.sync(account.id)
        self.assertEqual((again.status, again.new_messages), ("success", 0))

        await env.accounts.update(env.user_id, account.id, protocol="imap", port=server.imap,
                                  password=server.PASSWORD)
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(600, 3, "as-imap")])
        back = await env.engine.sync(account.id)
        self.assertEqual((back.status, back.new_messages), ("success", 3), back.problems())
        self.assertEqual(await env.held(account.id),
                         expected(server, user, ["Archive", "INBOX"]))
        self.assertEqual(await env.count(account.id, on_server=False), 0)
        self.assertEqual((await env.engine.sync(account.id)).new_messages, 0)


class TLSVerificationTests(DovecotClassMixin, TestCase):
    timeout = 60

    async def attempt(self, protocol: str = "imap", **kw: Any) -> Any:
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(0, 3)])
        env = await make_env(self)
        make = env.imap_account if protocol == "imap" else env.pop_account
        account = await make(server, user, **kw)
        return await env.engine.sync(account.id)

    async def test_right_ca_and_host_name_succeed(self) -> None:
        result = await self.attempt()
        self.assertEqual((result.status, result.new_messages), ("success", 3))

    async def test_wrong_ca_fails(self) -> None:
        result = await self.attempt(tls_ca_pem=shared_pki().ca_pem.decode())
        self.assertEqual(result.status, "error")
        self.assertIn("certificate not trusted", result.error)

    async def test_wrong_host_name_fails(self) -> None:
        # The certificate names localhost only; 127.0.0.1 is the same server, another name.
        result = await self.attempt(host="127.0.0.1")
        self.assertEqual(result.status, "error")
        self.assertIn("certificate not trusted", result.error)

    async def test_platform_trust_does_not_know_a_private_ca(self) -> None:
        server = await self.dovecot()
        result = await self.attempt(tls_ca_pem=None, use_ssl=True, start_tls=False,
                                    port=server.imaps)
        self.assertEqual(result.status, "error")
        self.assertIn("certificate not trusted", result.error)

    async def test_wrong_pinned_fingerprint_fails(self) -> None:
        result = await self.attempt(tls_ca_pem=None, tls_fingerprint="ab" * 32)
        self.assertEqual(result.status, "error")
        self.assertIn("certificate not trusted", result.error)

    async def test_pop3_wrong_ca_fails_and_pin_succeeds(self) -> None:
        bad = await self.attempt("pop", tls_ca_pem=shared_pki().ca_pem.decode())
        self.assertEqual(bad.status, "error")
        self.assertIn("certificate not trusted", bad.error)
        server = await self.dovecot()
        good = await self.attempt("pop", host="127.0.0.1", tls_ca_pem=None,
                                  tls_fingerprint=server.pki.fingerprint)
        self.assertEqual((good.status, good.new_messages), ("success", 3))

    async def test_password_refused_is_a_clear_error(self) -> None:
        result = await self.attempt(password="wrong")
        self.assertEqual(result.status, "error")
        self.assertIn("login refused", result.error)

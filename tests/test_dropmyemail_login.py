"""Dropmyemail's logins on create and update: an update that changes how to log in logs in
again first (against a real Dovecot: a refusal is a 400 with the server's reason and nothing
changes), and a server that offers neither TLS nor STARTTLS gets no password in cleartext
unless the operator allows it ([dropmyemail] allow_cleartext_login)."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial.unittest import TestCase

from mailcore.backup import BackupSettings
from mailcore.config import ConfigError
from mailcore.fetch.tls import client_tls
from tests.support.dovecot import DovecotClassMixin
from tests.support.imap2api import LiveApi, live_api
from tests.support.oauth import access_token
from tests.support.reactor import get_reactor
from tests.test_dropmyemail_dovecot import ADDRESS_LOGINS, bearer
from tests.test_fetch_imap_hostile import FakeIMAPFactory


class UpdateLogsInAgainTests(DovecotClassMixin, TestCase):
    timeout = 60
    extra_config = ADDRESS_LOGINS

    async def test_a_changed_login_is_checked_before_it_is_stored(self) -> None:
        server = await self.dovecot()
        address = f"{server.new_user()}@example.test"
        api = await live_api(self, {})
        ca = server.pki.ca_pem.decode()

        def trusting(host: str, *, ca_pem: str | None = None,
                     fingerprint: str | None = None) -> IOpenSSLClientConnectionCreator:
            return client_tls(host, ca_pem=ca_pem or ca, fingerprint=fingerprint)

        api.core.fetch.engine.tls_factory = trusting
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": address, "password": server.PASSWORD, "host": "localhost",
            "port": server.imap})
        self.assertEqual(status, 201, created)
        await api.core.fetch.engine.sync(created["id"])
        path = f"/v1/accounts/{created['id']}"

        for change, reason in (({"password": "wrong"}, "could not log in to localhost"),
                               ({"port": server.pop3}, "could not log in to localhost"),
                               ({"host": "127.0.0.2"}, "could not log in to 127.0.0.2")):
            status, body = await bearer(api, token, "PUT", path, json=change)
            self.assertEqual((status, body["error"]), (400, "invalid_request"), change)
            self.assertIn(reason, body["error_description"], change)
        account, password = await api.core.fetch.accounts.credentials(created["id"])
        self.assertEqual((account.port, account.host, password),
                         (server.imap, "localhost", server.PASSWORD))

        status, changed = await bearer(api, token, "PUT", path,
                                       json={"port": server.imaps, "ssl": True})
        self.assertEqual((status, changed["port"], changed["ssl"]), (200, server.imaps, True))
        status, changed = await bearer(api, token, "PUT", path,
                                       json={"password": server.PASSWORD})
        self.assertEqual(status, 200, changed)
        # The account as it was read goes back unchanged (its email, as it is, too); its
        # email is not changed.
        status, read = await bearer(api, token, "GET", path)
        status, put_back = await bearer(api, token, "PUT", path, json=read)
        self.assertEqual(status, 200, put_back)
        self.assertEqual({k: v for k, v in put_back.items() if k != "updated_at"},
                         {k: v for k, v in read.items() if k != "updated_at"})
        status, body = await bearer(api, token, "PUT", path, json={"email": "x@example.test"})
        self.assertEqual((status, body["error_description"]),
                         (400, "The email of an account cannot change."))


class CleartextTests(TestCase):
    timeout = 30

    async def create_against(self, sections: dict[str, Any]) -> tuple[LiveApi, int, Any,
                                                                       FakeIMAPFactory]:
        factory = FakeIMAPFactory()
        factory.caps = b"IMAP4rev1 AUTH=PLAIN"  # no STARTTLS
        reactor = get_reactor()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        api = await live_api(self, sections)
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, body = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": "alice@example.test", "password": "sécret", "host": "localhost",
            "port": port.getHost().port, "ssl": False, "start_tls": False})
        if status == 201:
            await api.core.fetch.engine.sync(body["id"])
        for conn in factory.connections:
            if conn.transport is not None:
                conn.transport.loseConnection()
        return api, status, body, factory

    async def test_no_password_in_cleartext_by_default(self) -> None:
        api, status, body, factory = await self.create_against({})
        self.assertEqual((status, body["error"]), (400, "invalid_request"), body)
        self.assertIn("offers neither TLS nor STARTTLS", body["error_description"])
        sent = b" ".join(line for _tls, line in factory.received)
        self.assertNotIn(b"LOGIN", sent)
        self.assertNotIn(b"AUTHENTICATE", sent)
        self.assertEqual(await api.core.fetch.accounts.list_accounts(
            await self.user_id(api)), [])

    async def test_the_operator_may_allow_cleartext(self) -> None:
        api, status, body, factory = await self.create_against(
            {"dropmyemail": {"allow_cleartext_login": True}})
        self.assertEqual(status, 201, body)
        [account] = await api.core.fetch.accounts.list_accounts(await self.user_id(api))
        self.assertTrue(account.allow_cleartext)
        sent = b" ".join(line for _tls, line in factory.received)
        self.assertTrue(b"AUTHENTICATE" in sent or b"LOGIN" in sent)

    async def user_id(self, api: LiveApi) -> int:
        user = await api.core.identity.find_user("alice")
        assert user is not None
        return user.id

    def test_the_setting_is_a_boolean(self) -> None:
        self.assertFalse(BackupSettings.from_section({}).allow_cleartext_login)
        self.assertTrue(BackupSettings.from_section(
            {"allow_cleartext_login": True}).allow_cleartext_login)
        with self.assertRaises(ConfigError):
            BackupSettings.from_section({"allow_cleartext_login": "yes"})

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
from mailcore.fetch.accounts import DESTINATION_REFUSAL
from mailcore.fetch.tls import client_tls
from tests.support.dovecot import DovecotClassMixin
from tests.support.imap2api import LiveApi, live_api
from tests.support.oauth import access_token
from tests.support.reactor import get_reactor
from tests.test_dropmyemail_dovecot import ADDRESS_LOGINS, bearer
from tests.test_fetch_imap_hostile import FakeIMAPFactory, cleartext_servers


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

        # A new server or port comes with its password (NewDestinationTests): the login is
        # checked there with it.
        right = {"password": server.PASSWORD}
        for change, reason in (({"password": "wrong"}, "could not log in to localhost"),
                               ({"port": server.pop3, **right}, "could not log in to localhost"),
                               ({"host": "127.0.0.2", **right},
                                "could not log in to 127.0.0.2")):
            status, body = await bearer(api, token, "PUT", path, json=change)
            self.assertEqual((status, body["error"]), (400, "invalid_request"), change)
            self.assertIn(reason, body["error_description"], change)
        account, password = await api.core.fetch.accounts.credentials(created["id"])
        self.assertEqual((account.port, account.host, password),
                         (server.imap, "localhost", server.PASSWORD))

        status, changed = await bearer(api, token, "PUT", path,
                                       json={"port": server.imaps, "ssl": True, **right})
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


class NewDestinationTests(TestCase):
    """A PUT that moves an account (server, port, protocol, TLS) without its password is
    refused before any login: neither the check nor a later backup sends the stored
    password to a server the PUT names. Against two fake IMAP servers on loopback."""

    timeout = 30

    async def test_the_stored_password_is_never_sent_where_a_put_names(self) -> None:
        (old, old_port), (new, new_port) = cleartext_servers(self, 2)
        api = await live_api(self, {"dropmyemail": {"allow_cleartext_login": True}})
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": "alice@example.test", "password": "Stored-Pw", "host": "127.0.0.1",
            "port": old_port})
        self.assertEqual(status, 201, created)
        await api.core.fetch.engine.sync(created["id"])  # the first backup
        logins = len(old.passwords())
        path = f"/v1/accounts/{created['id']}"

        for change in ({"port": new_port}, {"host": "localhost", "port": new_port},
                       {"protocol": "pop"}, {"ssl": True}):
            status, body = await bearer(api, token, "PUT", path, json=change)
            self.assertEqual((status, body["error"], body["error_description"]),
                             (400, "invalid_request", DESTINATION_REFUSAL), change)
        self.assertEqual((new.connections, len(old.passwords())), ([], logins))
        account, password = await api.core.fetch.accounts.credentials(created["id"])
        self.assertEqual((account.host, account.port, account.protocol, password),
                         ("127.0.0.1", old_port, "imap", "Stored-Pw"))
        await api.core.fetch.engine.sync(created["id"])
        self.assertEqual(old.passwords()[logins:], ["Stored-Pw"])
        self.assertEqual(new.connections, [])

        # As read, it goes back without a password and without a login.
        status, read = await bearer(api, token, "GET", path)
        status, put_back = await bearer(api, token, "PUT", path, json=read)
        self.assertEqual(status, 200, put_back)
        self.assertEqual(len(old.passwords()), logins + 1)

        status, moved = await bearer(api, token, "PUT", path,
                                     json={"port": new_port, "password": "For-The-New"})
        self.assertEqual((status, moved["port"]), (200, new_port), moved)
        self.assertEqual(new.passwords(), ["For-The-New"])  # the login check

    async def test_restating_the_protocol_or_ssl_keeps_the_port(self) -> None:
        """A PUT naming the protocol or ssl the account has (a new password with what the
        client knows of the account) moved it to that protocol's default port (143): the
        login check went to localhost:143 and the PUT was a 400, or, without a password, a
        400 asking for one. Only a change of protocol or ssl without a port takes the
        default port."""
        ((old, old_port),) = cleartext_servers(self, 1)
        api = await live_api(self, {"dropmyemail": {"allow_cleartext_login": True}})
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": "alice@example.test", "password": "Stored-Pw", "host": "127.0.0.1",
            "port": old_port})
        self.assertEqual(status, 201, created)
        await api.core.fetch.engine.sync(created["id"])
        path = f"/v1/accounts/{created['id']}"
        restated: list[dict[str, Any]] = [{"ssl": False}, {"protocol": "imap"},
                                          {"protocol": "imap", "ssl": False}]
        for n, change in enumerate(restated):
            logins = len(old.passwords())
            status, body = await bearer(api, token, "PUT", path, json=change)
            self.assertEqual((status, body.get("port")), (200, old_port), (change, body))
            self.assertEqual(len(old.passwords()), logins)  # nothing changed: no login
            status, body = await bearer(api, token, "PUT", path,
                                        json={**change, "password": f"New-Pw-{n}"})
            self.assertEqual((status, body.get("port")), (200, old_port), (change, body))
            self.assertEqual(old.passwords()[logins:], [f"New-Pw-{n}"])
        account, password = await api.core.fetch.accounts.credentials(created["id"])
        self.assertEqual((account.port, account.protocol, account.use_ssl, password),
                         (old_port, "imap", False, "New-Pw-2"))
        # A change of ssl without a port still takes the default one (and its password).
        status, body = await bearer(api, token, "PUT", path,
                                    json={"ssl": True, "password": "New-Pw-3"})
        self.assertEqual(status, 400, body)
        self.assertIn("127.0.0.1:993", body["error_description"])

    async def test_an_update_without_password_never_turns_cleartext_on(self) -> None:
        """The operator allowing cleartext since the account was stored does not make a PUT
        without the password allow it for the stored password; one with it does."""
        api = await live_api(self, {"dropmyemail": {"allow_cleartext_login": True}})
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        account = await api.core.fetch.accounts.create(
            alice.id, email="alice@example.test", host="imap.example.test", port=993,
            use_ssl=True, password="Stored-Pw", allow_cleartext=False)
        path = f"/v1/accounts/{account.id}"
        status, read = await bearer(api, token, "GET", path)
        status, put_back = await bearer(api, token, "PUT", path, json=read)
        self.assertEqual(status, 200, put_back)
        self.assertFalse((await api.core.fetch.accounts.get(alice.id, account.id))
                         .allow_cleartext)


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

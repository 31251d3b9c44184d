"""Dropmyemail's /v1/accounts without a mail server: scopes, the Gmail refusal, the host
rule, bad input as 4xx in the OAuth error shape, another user's ids as 404; and the login
check's command deadline against a loopback server that never answers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import TestCase

import web.api
from mailcore.backup import (
    GOOGLE_REFUSAL,
    BackupAccounts,
    BackupError,
    BackupSettings,
    derive_host,
)
from mailcore.backup.accounts import login_check_deadline, login_check_timeout, login_within
from mailcore.config import Config, ConfigError
from mailcore.fetch.errors import ConnectFailed, FetchTimeout
from mailcore.fetch.settings import FetchSettings
from mailcore.fetch.state import thd_folder
from mailcore.store.schema import users
from tests.support.fetchenv import make_env
from tests.support.imap2api import live_api
from tests.support.oauth import access_token
from tests.support.reactor import get_reactor
from tests.support.web import Web
from web.parsing import read_fields


class HostRuleTests(TestCase):
    def test_imap_and_pop_hosts_come_from_the_domain(self) -> None:
        none = BackupSettings()
        self.assertEqual(derive_host("a@Example.COM", "imap", none), "imap.example.com")
        self.assertEqual(derive_host("a@example.com", "pop", none), "pop.example.com")

    def test_no_domain_no_host(self) -> None:
        none = BackupSettings({})
        for email in ("nobody", "nobody@", "@example.com", " @example.com", "a@ "):
            with self.assertRaises(BackupError) as caught:
                derive_host(email, "imap", none)
            self.assertEqual(caught.exception.field, "email")

    def test_providers_override_the_rule(self) -> None:
        settings = BackupSettings.from_section({"providers": {
            "example.com": "mail.example.net",
            "example.org": {"imap": "in.example.org", "pop": "pop3.example.org"},
        }})
        self.assertEqual(derive_host("a@example.com", "pop", settings), "mail.example.net")
        self.assertEqual(derive_host("a@example.org", "imap", settings), "in.example.org")
        self.assertEqual(derive_host("a@example.org", "pop", settings), "pop3.example.org")

    def test_max_queued_jobs_per_user(self) -> None:
        self.assertEqual(BackupSettings.from_section({}).max_queued_jobs_per_user, 100)
        self.assertEqual(BackupSettings.from_section({"max_queued_jobs_per_user": 3})
                         .max_queued_jobs_per_user, 3)
        self.assertEqual(BackupSettings.from_section({"jobs_kept_per_account": 4})
                         .jobs_kept_per_account, 4)
        for bad in (0, -1, True, "3", 2.5):
            for key in ("max_queued_jobs_per_user", "jobs_kept_per_account"):
                with self.assertRaises(ConfigError):
                    BackupSettings.from_section({key: bad})

    def test_bad_providers_are_config_errors(self) -> None:
        for section in ({"providers": "x"}, {"providers": {"a.b": {"smtp": "x"}}},
                        {"colour": 1}):
            with self.assertRaises(ConfigError):
                BackupSettings.from_section(section)


class ApiBase(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build(Config(sections={"fetch": {"allow_loopback": True}}))
        self.alice = await self.web.user()
        self.token = await access_token(self.web.core.oauth, self.alice.id)
        self.web.secrets.append(self.token)

    async def call(self, method: str, path: str, token: str | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        status, _, body = await self.web.call(method, path, headers=headers, **kwargs)
        return status, body

    async def stored(self) -> int:
        return len(await self.web.core.fetch.accounts.list_accounts(self.alice.id))


class AccountsApiTests(ApiBase):

    async def test_an_empty_list(self) -> None:
        self.assertEqual(await self.call("GET", "/v1/accounts"), (200, []))
        status, _, body = await self.web.call("GET", f"/v1/accounts?access_token={self.token}")
        self.assertEqual((status, body), (200, []))

    async def test_replies_are_private_and_not_stored(self) -> None:
        """No Cache-Control came with any /v1 reply, even one to a request carrying its
        token in the URL (RFC 6750 §2.3: SHOULD be private): a cache keyed on that URL
        could keep an account's data past the token's revocation."""
        for path, headers in (("/v1/accounts", {"Authorization": f"Bearer {self.token}"}),
                              (f"/v1/accounts?access_token={self.token}", {})):
            status, got, _ = await self.web.call("GET", path, headers=headers)
            self.assertEqual((status, got.get("cache-control")), (200, ["private, no-store"]),
                             path)

    async def test_gmail_and_google_are_a_clear_400_and_nothing_is_stored(self) -> None:
        for fields in ({"email": "a@gmail.com"}, {"email": "a@googlemail.com"},
                       {"email": "a@corp.example", "host": "imap.gmail.com"}):
            status, body = await self.call("POST", "/v1/accounts",
                                           json={**fields, "password": "pw"})
            self.assertEqual(status, 400, fields)
            self.assertEqual(body["error"], "invalid_request")
            self.assertEqual(body["error_description"], GOOGLE_REFUSAL)
            self.assertIn("client credentials", body["error_description"])
        self.assertEqual(await self.stored(), 0)

    async def test_accounts_past_the_cap_are_a_400_before_any_login(self) -> None:
        """`[fetch] max_accounts_per_user` counts IMAP2API servers and Dropmyemail accounts
        together; past it a create is refused before the login that checks it (which would
        otherwise dial the server, here one that does not resolve)."""
        self.web.core.fetch.accounts.max_per_user = 1
        await self.web.core.fetch.accounts.create(
            self.alice.id, name="a", email="a@x.test", host="127.0.0.1", port=143,
            password="pw", allow_cleartext=True)
        status, body = await self.call("POST", "/v1/accounts", json={
            "email": "b@nowhere.example", "password": "pw"})
        self.assertEqual((status, body), (400, {
            "error": "invalid_request", "error_description":
            "A user may have at most 1 accounts; delete one to add another."}))
        self.assertEqual(await self.stored(), 1)
        token = {"Authorization": f"Token {await self.web.credential(self.alice, 'token')}"}
        status, _, body = await self.web.call("POST", "/api/imap-servers/", headers=token, json={
            "host": "imap.example.test", "username": "a", "password": "p"})
        self.assertEqual((status, body), (400, {"non_field_errors": [
            "A user may have at most 1 accounts; delete one to add another."]}))
        self.assertEqual(await self.stored(), 1)

    async def test_a_mailbox_already_backed_up_is_a_409_before_any_login(self) -> None:
        """One account per mailbox (host in any case, port, user): adding it again, or
        pointing another account at it, is a 409 naming the account that backs it up,
        before the login (which would dial a server that does not resolve here)."""
        accounts = self.web.core.fetch.accounts
        first = await accounts.create(
            self.alice.id, name="f", email="fred@x.test", host="imap.x.test", port=993,
            use_ssl=True, password="pw")
        other = await accounts.create(
            self.alice.id, name="f", email="fred@x.test", host="imap.x.test", port=143,
            start_tls=True, password="pw")
        message = ("The mailbox of fred@x.test on IMAP.x.test:993 is already backed up as "
                   f"account {first.id}; change that account instead of adding the mailbox "
                   "again (it would be backed up twice).")
        status, body = await self.call("POST", "/v1/accounts", json={
            "email": "fred@x.test", "password": "pw", "host": "IMAP.x.test", "ssl": True})
        self.assertEqual((status, body), (409, {
            "error": "conflict", "error_description": message, "account_id": first.id}))
        status, body = await self.call("PUT", f"/v1/accounts/{other.id}", json={
            "port": 993, "ssl": True, "start_tls": False, "password": "pw"})
        self.assertEqual((status, body["account_id"]), (409, first.id), body)
        self.assertEqual(await self.stored(), 2)
        kept = await accounts.get(self.alice.id, other.id)
        self.assertEqual((kept.port, kept.start_tls), (143, True))
        # Two accounts of one mailbox made before the rule may still be changed otherwise.
        await accounts.update(self.alice.id, other.id, port=993, use_ssl=True,
                              start_tls=False, password="pw")
        changed = await accounts.update_one_per_mailbox(self.alice.id, other.id,
                                                        sync_interval=3600)
        self.assertEqual(changed.sync_interval, 3600)

    async def test_writing_needs_the_write_scope(self) -> None:
        reader = await access_token(self.web.core.oauth, self.alice.id, scope="read")
        status, body = await self.call("POST", "/v1/accounts", reader,
                                       json={"email": "a@x.test", "password": "pw"})
        self.assertEqual((status, body["error"]), (403, "insufficient_scope"))

    async def test_no_token_is_401(self) -> None:
        status, _, body = await self.web.call("GET", "/v1/accounts")
        self.assertEqual((status, body["error"]), (401, "invalid_token"))

    async def test_the_token_of_a_deactivated_user_is_401(self) -> None:
        self.assertEqual((await self.call("GET", "/v1/accounts"))[0], 200)
        await self.web.core.db.run("deactivate", lambda conn: conn.execute(
            update(users).where(users.c.id == self.alice.id).values(is_active=False)))
        status, body = await self.call("GET", "/v1/accounts")
        self.assertEqual((status, body["error"]), (401, "invalid_token"))

    async def test_bad_input_is_4xx_in_the_oauth_shape(self) -> None:
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/v1/accounts?sort=password", {}),
            ("GET", "/v1/accounts?type=smtp", {}),
            ("GET", "/v1/accounts?direction=up", {}),
            ("GET", "/v1/accounts/9223372036854775808", {}),
            ("GET", "/v1/accounts/99", {}),
            ("PUT", "/v1/accounts/99", {"json": {"port": 1}}),
            ("DELETE", "/v1/accounts/99", {}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test"}}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test", "password": "p",
                                               "ssl": "maybe"}}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test", "password": "p",
                                               "port": 70000}}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test", "password": "p",
                                               "port": "x"}}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test", "password": "p",
                                               "protocol": "smtp"}}),
            ("POST", "/v1/accounts", {"json": {"email": "a@x.test", "password": "p",
                                               "ssl": True, "start_tls": True}}),
            ("POST", "/v1/accounts", {"json": {"email": "a\nb@x.test", "password": "p"}}),
            ("POST", "/v1/accounts", {"json": {"email": "nobody", "password": "p"}}),
            ("POST", "/v1/accounts", {"json": ["x"]}),
        ]
        for method, path, kwargs in cases:
            status, body = await self.call(method, path, **kwargs)
            self.assertTrue(400 <= status < 500, (method, path, kwargs, status, body))
            self.assertIn("error", body, (method, path))
            self.assertIn("error_description", body, (method, path))
        self.assertEqual(await self.stored(), 0)

    async def test_a_field_an_account_does_not_have_is_a_400_naming_it(self) -> None:
        """A misspelt field would otherwise change nothing while the client believes it did
        (before, unknown fields were ignored at create and at change)."""
        for method, path in (("POST", "/v1/accounts"), ("PUT", "/v1/accounts/99")):
            status, body = await self.call(method, path, json={
                "email": "a@x.test", "password": "p", "pasword": "new"})
            self.assertEqual((status, body["error_description"]),
                             (400, "Unknown field: pasword."), method)
        self.assertEqual(await self.stored(), 0)

    async def test_another_users_account_is_404(self) -> None:
        bob = await self.web.user("bob")
        account = await self.web.core.fetch.accounts.create(
            bob.id, name="b", email="b@x.test", host="127.0.0.1", port=143,
            password="pw", allow_cleartext=True)
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("GET", {}), ("PUT", {"json": {"port": 144}}), ("DELETE", {})]
        for method, kwargs in attempts:
            status, body = await self.call(method, f"/v1/accounts/{account.id}", **kwargs)
            self.assertEqual((status, body["error"]), (404, "not_found"), method)
        still = await self.web.core.fetch.accounts.get(bob.id, account.id)
        self.assertEqual(still.port, 143)


class BodyTokenTests(ApiBase):
    """The documentation takes the token in `?access_token=` or `Authorization: Bearer`;
    one in the body (RFC 6750 2.2's form) was neither used nor refused: alone, a 401 as if
    none were sent; beside a header's, ignored even when another token. It is a 400
    `invalid_request` naming where the token goes, and nothing is done."""

    async def test_a_token_in_the_body_is_refused(self) -> None:
        other = await access_token(self.web.core.oauth, self.alice.id)
        bearer = {"Authorization": f"Bearer {self.token}"}
        account = {"email": "joe@example.test", "password": "pw"}
        for headers, kwargs in [
            ({}, {"data": {**account, "access_token": self.token}}),
            (bearer, {"data": {**account, "access_token": other}}),
            (bearer, {"data": {**account, "access_token": self.token}}),
            (bearer, {"json": {**account, "access_token": other}}),
        ]:
            status, _, body = await self.web.call("POST", "/v1/accounts/", headers=headers,
                                                  **kwargs)
            self.assertEqual((status, body.get("error")), (400, "invalid_request"), kwargs)
            self.assertIn("Authorization: Bearer", body["error_description"])
        self.assertEqual(await self.stored(), 0)
        # A body with no token is served as before (no such account).
        status, _, body = await self.web.call("PUT", "/v1/accounts/999", headers=bearer,
                                              data={"port": "993"})
        self.assertEqual(status, 404, body)

    async def test_the_body_is_parsed_once(self) -> None:
        """The check for a token in the body and the route read the fields the body was
        parsed into once (web.api.ApiApp.fields), not a parse each."""
        parsed: list[int] = []

        def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
            parsed.append(1)
            return read_fields(*args, **kwargs)

        self.patch(web.api, "read_fields", counting)
        status, _, body = await self.web.call(
            "PUT", "/v1/accounts/999", headers={"Authorization": f"Bearer {self.token}"},
            data={"port": "993"})
        self.assertEqual((status, len(parsed)), (404, 1), body)


class MailboxInputTests(ApiBase):
    """The read side's query parameters; the account exists but holds nothing yet."""

    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        account = await self.web.core.fetch.accounts.create(
            self.alice.id, name="a", email="a@x.test", host="127.0.0.1", port=143,
            password="pw", allow_cleartext=True)
        self.account = account.id
        self.base = f"/v1/accounts/{account.id}"

    async def test_an_empty_account_reads_as_empty(self) -> None:
        self.assertEqual(await self.call("GET", f"{self.base}/mailboxes"), (200, []))
        status, body = await self.call("GET", f"{self.base}/messages/search?query=x")
        self.assertEqual((status, body), (200, {"count": 0, "start": 0, "messages": []}))
        status, body = await self.call("GET", f"{self.base}/attachments")
        self.assertEqual((status, body), (200, {"count": 0, "start": 0, "attachments": []}))
        status, body = await self.call("GET", f"{self.base}/contacts")
        self.assertEqual((status, body), (200, {"count": 0, "start": 0, "contacts": []}))

    async def test_bad_pages_sorts_and_ids_are_4xx(self) -> None:
        paths = [
            f"{self.base}/mailboxes?per_page=0", f"{self.base}/mailboxes?per_page=41",
            f"{self.base}/mailboxes?per_page=x", f"{self.base}/mailboxes?page=0",
            f"{self.base}/mailboxes?page=-1", f"{self.base}/mailboxes?per_page=%D9%A3",
            f"{self.base}/mailboxes?sort=size", f"{self.base}/mailboxes?direction=sideways",
            f"{self.base}/mailboxes/1/messages?type=pdf",
            f"{self.base}/mailboxes/1/messages?sort=subject",
            f"{self.base}/mailboxes/1/messages", f"{self.base}/mailboxes/1/messages/1",
            f"{self.base}/mailboxes/9223372036854775808/messages",
            f"{self.base}/messages/search", f"{self.base}/messages/search?query=",
            f"{self.base}/messages/search?query=x&per_page=41",
            "/v1/accounts/9223372036854775808/mailboxes",
            f"{self.base}/attachments?per_page=41", f"{self.base}/attachments?sort=size",
            f"{self.base}/attachments?direction=no", f"{self.base}/attachments_search",
            f"{self.base}/attachments/1", f"{self.base}/attachments/9223372036854775808",
            f"{self.base}/contacts?sort=phone", f"{self.base}/contacts?page=x",
            f"{self.base}/contacts/1",
            f"{self.base}/mailboxes?page={'9' * 5000}",  # past int()'s digit limit
        ]
        for path in paths:
            status, body = await self.call("GET", path)
            self.assertTrue(400 <= status < 500, (path, status, body))
            self.assertEqual(set(body), {"error", "error_description"}, path)

    async def test_another_users_account_reads_as_not_found(self) -> None:
        bob = await self.web.user("bob")
        token = await access_token(self.web.core.oauth, bob.id)
        folder = await self.web.core.db.run(
            "folder", lambda conn: thd_folder(conn, self.account, "INBOX").id)
        mailbox = f"{self.base}/mailboxes/{folder}/messages"
        self.assertEqual(await self.call("GET", mailbox), (200, []))
        for path in (f"{self.base}/mailboxes", f"{self.base}/messages/search?query=x",
                     f"{self.base}/attachments", f"{self.base}/contacts", mailbox,
                     f"{mailbox}/1"):
            status, body = await self.call("GET", path, token)
            self.assertEqual((status, body["error"]), (404, "not_found"), path)
        # Nor is one account's mailbox found under another account of the same user.
        other = await self.web.core.fetch.accounts.create(
            self.alice.id, name="b", email="b@x.test", host="127.0.0.1", port=143,
            password="pw", allow_cleartext=True)
        status, body = await self.call("GET", f"/v1/accounts/{other.id}/mailboxes/{folder}"
                                       "/messages")
        self.assertEqual((status, body["error_description"]), (404, "No such mailbox."))


class _Trickler(Protocol):
    """An IMAP server that greets, then answers no command, only '* OK' every 0.1 s."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] ready\r\n")
        self.ticker = LoopingCall(transport.write, b"* OK still working\r\n")
        self.ticker.clock = get_reactor()

    def dataReceived(self, data: bytes) -> None:
        if not self.ticker.running:
            self.ticker.start(0.1)

    def connectionLost(self, reason: Any = None) -> None:
        if self.ticker.running:
            self.ticker.stop()


class LoginCheckDeadlineTests(TestCase):
    """A login check runs while the HTTP client waits: a server trickling untagged lines
    held it until the client gave up ([fetch] command_timeout, 1,800 s for syncs, was not
    applied). Loopback servers, real time (half a second)."""

    timeout = 30

    def test_the_deadline_is_a_minute_at_most(self) -> None:
        self.assertEqual(login_check_timeout(FetchSettings()), 60.0)
        self.assertEqual(login_check_timeout(FetchSettings(command_timeout=5.0)), 5.0)
        self.assertEqual(login_check_timeout(FetchSettings(command_timeout=0.0)), 60.0)

    async def test_a_trickling_server_fails_the_check_at_the_deadline(self) -> None:
        factory = Factory.forProtocol(_Trickler)
        port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        env = await make_env(self, command_timeout=0.5)
        backup = BackupAccounts(env.db, env.accounts, env.engine, BackupSettings())
        with self.assertRaises(BackupError) as caught:
            await backup._check_login({
                "host": "127.0.0.1", "port": port.getHost().port, "protocol": "imap",
                "use_ssl": False, "start_tls": False, "allow_cleartext": True,
                "username": "alice", "password": "secret"})
        self.assertIn("answered no command for 0.5 s", str(caught.exception))

    def test_the_whole_check_keeps_within_the_reply_timeout(self) -> None:
        self.assertEqual(login_check_deadline(120.0), 115.0)
        self.assertEqual(login_check_deadline(30.0), 25.0)
        self.assertEqual(login_check_deadline(10.0), 8.0)
        self.assertEqual(login_check_deadline(2.0), 1.6)

    async def test_a_check_past_the_reply_timeout_is_the_routes_own_400(self) -> None:
        """[web] reply_timeout under the check's 60 s command deadline: a create whose
        server never answered the login was answered 503 'the database did not answer in
        time' at the reply deadline; the check now ends first, a 400 naming the server."""
        port = get_reactor().listenTCP(0, Factory.forProtocol(_Trickler),
                                       interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        api = await live_api(self, {"web": {"reply_timeout": 2},
                                    "dropmyemail": {"allow_cleartext_login": True}})
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, body = await api.call(
            "POST", "/v1/accounts", headers={"Authorization": f"Bearer {token}"},
            json={"email": "alice@example.test", "password": "secret", "host": "localhost",
                  "port": port.getHost().port, "protocol": "imap"})
        self.assertEqual((status, body["error_description"]),
                         (400, "could not log in to localhost: no login within 1.6 s"), body)
        self.assertEqual(await api.core.fetch.accounts.list_accounts(alice.id), [])

        # A migrate's destination is checked the same way.
        account = await api.core.fetch.accounts.create(
            alice.id, name="a", email="alice@example.test", host="127.0.0.1", port=143,
            password="pw", allow_cleartext=True)
        status, body = await api.call(
            "POST", f"/v1/accounts/{account.id}/migrates",
            headers={"Authorization": f"Bearer {token}"},
            json={"email": "alice@example.test", "password": "secret", "host": "localhost",
                  "port": port.getHost().port})
        self.assertEqual((status, body["error_description"]),
                         (400, "could not log in to localhost: no login within 1.6 s"), body)

    async def test_a_connection_still_opening_at_the_deadline_is_no_login_within_it(
        self,
    ) -> None:
        """A connect cancelled at the deadline ends as a ConnectFailed (connect_to makes one
        of every error): the check said 'cannot connect to ...: ' and no more."""
        clock = Clock()
        connecting: defer.Deferred[None] = defer.Deferred()

        async def opening() -> None:
            try:
                await connecting
            except Exception as e:
                raise ConnectFailed(f"cannot connect to mail.test:143: {e}") from None

        d = defer.Deferred.fromCoroutine(login_within(clock, 3.0, opening()))
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(d, FetchTimeout).value),
                         "no login within 3 s")
        self.assertEqual(clock.getDelayedCalls(), [])

"""Dropmyemail against a real Dovecot: creating an account logs in first (a wrong password is
a 400 with the server's reason, and nothing is stored), starts the first backup at once, and
the account then shows what was backed up; it is a fetch-engine account like the IMAP2API's.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial.unittest import TestCase

from mailcore.fetch.tls import client_tls
from tests.support.corpus import Made, make_corpus
from tests.support.dovecot import DovecotClassMixin
from tests.support.imap2api import LiveApi, live_api
from tests.support.oauth import access_token

# Dovecot's test users have no domain; this passdb lets "<user>@example.test" in too.
ADDRESS_LOGINS = """
passdb {
  driver = static
  args = password=secret
}
"""


async def bearer(api: LiveApi, token: str, method: str, path: str,
                 **kwargs: Any) -> tuple[int, Any]:
    return await api.call(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)


class AccountsAgainstDovecotTests(DovecotClassMixin, TestCase):
    timeout = 60
    extra_config = ADDRESS_LOGINS

    async def test_create_logs_in_backs_up_and_shows_the_totals(self) -> None:
        server = await self.dovecot()
        address = f"{server.new_user()}@example.test"
        made = make_corpus(0, 12)
        corpus = [m.raw for m in made]
        server.add_messages(address, "INBOX", corpus[:8])
        server.add_messages(address, "Archive", corpus[8:])
        api = await live_api(self, {})
        # Dropmyemail's accounts name no CA: this machine trusts the test CA for them.
        ca = server.pki.ca_pem.decode()

        def trusting(host: str, *, ca_pem: str | None = None,
                     fingerprint: str | None = None) -> IOpenSSLClientConnectionCreator:
            return client_tls(host, ca_pem=ca_pem or ca, fingerprint=fingerprint)

        api.core.fetch.engine.tls_factory = trusting
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        account = {"email": address, "host": "localhost", "port": server.imap,
                   "protocol": "imap", "ssl": False, "start_tls": False}

        status, body = await bearer(api, token, "POST", "/v1/accounts",
                                    json={**account, "password": "wrong"})
        self.assertEqual((status, body["error"]), (400, "invalid_request"), body)
        self.assertIn("could not log in to localhost", body["error_description"])
        self.assertNotIn("TLS", body["error_description"])
        self.assertEqual(await api.core.fetch.accounts.list_accounts(alice.id), [])

        status, created = await bearer(api, token, "POST", "/v1/accounts",
                                       json={**account, "password": server.PASSWORD})
        self.assertEqual(status, 201, created)
        self.assertNotIn("password", created)
        self.assertEqual((created["email"], created["host"], created["port"], created["ssl"]),
                         (address, "localhost", server.imap, False))
        # The first backup started at once: join it.
        self.assertTrue(api.core.fetch.engine.is_running(created["id"]))
        result = await api.core.fetch.engine.sync(created["id"])
        self.assertEqual(result.status, "success", result.error)

        status, listed = await bearer(api, token, "GET", "/v1/accounts?sort=storage")
        self.assertEqual(status, 200)
        [shown] = listed
        self.assertEqual((shown["id"], shown["msg_count"], shown["storage"]),
                         (created["id"], 12, sum(len(m) for m in corpus)))
        # One engine, one account: the IMAP2API's imap-servers list the same row.
        [same] = await api.core.fetch.accounts.list_accounts(alice.id)
        self.assertEqual(same.id, created["id"])

        await self.read_side(api, token, created["id"], made)

        status, changed = await bearer(api, token, "PUT", f"/v1/accounts/{created['id']}",
                                       json={"port": server.imaps, "ssl": True,
                                             "password": server.PASSWORD})
        self.assertEqual((status, changed["port"], changed["ssl"]), (200, server.imaps, True))
        status, gone = await bearer(api, token, "DELETE", f"/v1/accounts/{created['id']}")
        self.assertEqual((status, gone["id"], gone["msg_count"]), (200, created["id"], 12))
        status, _ = await bearer(api, token, "GET", f"/v1/accounts/{created['id']}")
        self.assertEqual(status, 404)

    async def read_side(self, api: LiveApi, token: str, account_id: int,
                        made: list[Made]) -> None:
        """Mailboxes and counts, messages, the byte-exact .eml, search."""
        base = f"/v1/accounts/{account_id}"
        status, boxes = await bearer(api, token, "GET", f"{base}/mailboxes")
        self.assertEqual(status, 200, boxes)
        counts = {b["name"]: b["message_count"] for b in boxes}
        self.assertEqual((counts["INBOX"], counts["Archive"]), (8, 4))
        inbox = next(b for b in boxes if b["name"] == "INBOX")
        status, by_count = await bearer(api, token, "GET",
                                        f"{base}/mailboxes?sort=message_count&direction=desc")
        self.assertEqual(by_count[0]["name"], "INBOX")

        path = f"{base}/mailboxes/{inbox['id']}/messages"
        status, page1 = await bearer(api, token, "GET", f"{path}?per_page=5")
        status2, page2 = await bearer(api, token, "GET", f"{path}?per_page=5&page=2")
        self.assertEqual((status, status2, len(page1), len(page2)), (200, 200, 5, 3))
        dates = [m["date"] for m in page1 + page2]
        self.assertEqual(dates, sorted(dates))
        status, newest = await bearer(api, token, "GET", f"{path}?direction=desc&per_page=1")
        self.assertEqual(newest[0]["date"], dates[-1])
        status, with_files = await bearer(api, token, "GET", f"{path}?type=has_attachments")
        expected = sum(1 for m in made[:8] if m.attachment)
        self.assertEqual(len(with_files), expected)
        self.assertTrue(all(m["has_attachments"] for m in with_files))

        first = page1[0]
        status, eml = await bearer(api, token, "GET", f"{path}/{first['id']}")
        self.assertEqual(status, 200, eml)
        raw = base64.b64decode(eml["content"])
        self.assertEqual(len(raw), eml["size"])
        self.assertEqual(eml["size"], first["size"])
        originals = [m.raw.replace(b"\r\n", b"\n") for m in made]
        self.assertIn(raw.replace(b"\r\n", b"\n"), originals)
        stored = await api.core.messages.raw_message(
            (await api.core.fetch.accounts.owner_of(account_id)), first["id"])
        self.assertEqual(raw, stored)
        status, _ = await bearer(api, token, "GET", f"{path}/{first['id'] + 1000}")
        self.assertEqual(status, 404)

        status, found = await bearer(api, token, "GET",
                                     f"{base}/messages/search?query=Word7x&per_page=10")
        self.assertEqual((status, found["count"], found["start"]), (200, 1, 0), found)
        self.assertEqual(len(found["messages"]), 1)
        status, found = await bearer(api, token, "GET",
                                     f"{base}/messages/search?query=message&per_page=5&page=2")
        self.assertEqual((found["count"], found["start"], len(found["messages"])), (12, 5, 5))


class OneAccountPerMailboxTests(DovecotClassMixin, TestCase):
    """The same mailbox (host, port, user) could be added to one user's accounts any number
    of times: each a backup of it into the one store, twice the work, and a migrate of each
    every message again. The second is a 409 naming the first, also when both are added at
    once (each passes the check made before its login; the one made where the account is
    stored, under the user's lock, refuses the second)."""

    timeout = 120
    extra_config = ADDRESS_LOGINS

    async def test_two_adds_at_once_store_one_account(self) -> None:
        server = await self.dovecot()
        address = f"{server.new_user()}@example.test"
        api = await live_api(self, {}, backend="postgresql")
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        account = {"email": address, "password": server.PASSWORD, "host": "localhost",
                   "port": server.imap, "start_tls": True}
        api.core.fetch.engine.tls_factory = lambda host, **_: client_tls(
            host, ca_pem=server.pki.ca_pem.decode())
        both = await defer.gatherResults([
            defer.Deferred.fromCoroutine(bearer(api, token, "POST", "/v1/accounts",
                                                json=account)) for _ in range(2)])
        statuses = sorted(status for status, _ in both)
        self.assertEqual(statuses, [201, 409], both)
        created = next(body for status, body in both if status == 201)
        refused = next(body for status, body in both if status == 409)
        self.assertEqual((refused["error"], refused["account_id"]), ("conflict", created["id"]))
        self.assertIn(f"already backed up as account {created['id']}",
                      refused["error_description"])
        await api.core.fetch.engine.sync(created["id"])
        [stored] = await api.core.fetch.accounts.list_accounts(alice.id)
        self.assertEqual(stored.id, created["id"])

        # Once stored, the same mailbox is refused before any login (another case of the
        # host too); another user may back it up.
        again = {**account, "host": "LocalHost", "password": "not even tried"}
        status, body = await bearer(api, token, "POST", "/v1/accounts", json=again)
        self.assertEqual((status, body.get("account_id")), (409, created["id"]), body)
        bob = await api.core.identity.create_user("bob", "bob@example.test", "pw")
        status, theirs = await bearer(api, await access_token(api.core.oauth, bob.id),
                                      "POST", "/v1/accounts", json=account)
        self.assertEqual(status, 201, theirs)
        await api.core.fetch.engine.sync(theirs["id"])

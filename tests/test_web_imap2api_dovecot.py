"""The IMAP2API end to end: a real Dovecot synced through `POST /api/imap-servers/{id}/sync/`
on a real HTTP listener, then listed and searched; webhooks delivered over real sockets to a
receiver that checks the signature, while a dead receiver slows nothing down."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from mailcore.webhooks import verify_signature
from tests.support.corpus import make_corpus
from tests.support.dovecot import DovecotClassMixin, DovecotServer
from tests.support.imap2api import LiveApi, Receiver, black_hole, live_api
from tests.support.reactor import get_reactor
from tests.support.servers import sleep

PASSWORD = "s3cret-Pa55"


async def login(api: LiveApi, name: str = "alice") -> str:
    await api.core.identity.create_user(name, f"{name}@example.test", PASSWORD)
    status, body = await api.call("POST", "/api-token-auth/",
                                  json={"username": name, "password": PASSWORD})
    assert status == 200, body
    return str(body["token"])


def imap_server(server: DovecotServer, user: str, **kw: Any) -> dict[str, Any]:
    """The account as a client posts it: STARTTLS on the plain port, trusting the test CA."""
    return {
        "name": f"{user} at dovecot", "host": "localhost", "port": server.imap,
        "username": user, "password": server.PASSWORD, "use_ssl": False, "start_tls": True,
        "tls_ca_pem": server.pki.ca_pem.decode(), "folders_to_sync": "INBOX,Archive", **kw,
    }


def listen(resource_or_factory: Any) -> tuple[Any, int]:
    reactor = get_reactor()
    factory = resource_or_factory
    if not hasattr(factory, "buildProtocol"):
        factory = Site(resource_or_factory, timeout=None)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, port.getHost().port


class DovecotThroughTheApiTests(DovecotClassMixin, TestCase):
    timeout = 60

    async def test_sync_list_search_and_webhooks(self) -> None:
        reactor = get_reactor()
        server = await self.dovecot()
        user = server.new_user()
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(0, 80)])
        server.add_messages(user, "Archive", [m.raw for m in make_corpus(80, 40)])
        api = await live_api(self, {"webhooks": {
            "allow_loopback": True, "timeout": 8, "poll_interval": 1,
        }})
        token = await login(api)

        receiver = Receiver()
        port, receiver_port = listen(receiver)
        self.addCleanup(port.stopListening)
        dead, dead_port = listen(black_hole())
        self.addCleanup(dead.stopListening)
        status, live_hook = await api.call("POST", "/api/webhooks/", token, json={
            "url": f"http://127.0.0.1:{receiver_port}/hook",
            "events": ["sync.completed", "email.new"],
        })
        self.assertEqual(status, 201, live_hook)
        status, dead_hook = await api.call("POST", "/api/webhooks/", token, json={
            "url": f"http://127.0.0.1:{dead_port}/hook",
        })
        self.assertEqual(status, 201, dead_hook)
        sender = api.core.webhooks.sender
        sender.startService()
        self.addCleanup(sender.stopService)

        status, created = await api.call("POST", "/api/imap-servers/", token,
                                         json=imap_server(server, user))
        self.assertEqual(status, 201, created)
        sid = created["id"]

        status, body = await api.call("POST", f"/api/imap-servers/{sid}/sync/", token)
        self.assertEqual((status, body["status"], body["message"], body["new_messages"]),
                         (200, "success", "Email sync completed", 120), body)

        status, page = await api.call("GET", "/api/emails/?page_size=100", token)
        self.assertEqual((status, page["count"], len(page["results"])), (200, 120, 100))
        self.assertEqual(page["next"], f"{api.base}/api/emails/?page=2&page_size=100")
        status, found = await api.call("GET", "/api/emails/?q=Word7x", token)
        self.assertEqual([e["message_id"] for e in found["results"]], ["<corpus-7@corpus.test>"])
        status, found = await api.call("GET", "/api/emails/?q=topic+35&ordering=date", token)
        self.assertEqual([e["message_id"] for e in found["results"]],
                         [f"<corpus-{n}@corpus.test>" for n in range(35, 40)])
        status, found = await api.call("GET", "/api/emails/?q=reunion&folder=Archive", token)
        self.assertEqual(found["count"], 40)
        status, found = await api.call(
            "GET", f"/api/emails/?imap_server={sid}&thread=true&page_size=1", token)
        self.assertEqual(found["count"], 24)
        self.assertEqual(found["results"][0]["thread_count"], 5)

        reply = next(e for e in page["results"] if e["message_id"] == "<corpus-12@corpus.test>")
        status, detail = await api.call("GET", f"/api/emails/{reply['id']}/", token)
        self.assertIn("Word12x appears only here", detail["body_text"])
        self.assertEqual(detail["in_reply_to"], "<corpus-11@corpus.test>")
        self.assertEqual(len(detail["thread_emails"]), 4)
        status, thread = await api.call("GET", f"/api/emails/{reply['id']}/thread/", token)
        self.assertEqual([t["id"] for t in thread][2], reply["id"])
        status, folders = await api.call("GET", "/api/emails/folders/", token)
        self.assertEqual(folders, ["Archive", "INBOX"])
        status, stats = await api.call("GET", "/api/emails/statistics/", token)
        self.assertEqual(stats, {"total_emails": 120, "total_threads": 24,
                                 "folders": {"INBOX": 80, "Archive": 40}})
        status, shown = await api.call("GET", f"/api/imap-servers/{sid}/", token)
        self.assertEqual((shown["sync_status"], shown["sync_progress"]["done"],
                          shown["sync_progress"]["total"]), ("success", 120, 120))
        self.assertIsNotNone(shown["last_sync"])
        self.assertNotIn(server.PASSWORD, json.dumps(shown))

        # The first sync's deliveries to the dead receiver hang; new mail syncs at full speed.
        server.add_messages(user, "INBOX", [m.raw for m in make_corpus(200, 10, "later")])
        started = reactor.seconds()
        status, body = await api.call("POST", f"/api/imap-servers/{sid}/sync/", token)
        elapsed = reactor.seconds() - started
        self.assertEqual((status, body["new_messages"]), (200, 10), body)
        self.assertLess(elapsed, 4.0)
        status, log = await api.call("GET", f"/api/webhooks/{dead_hook['id']}/deliveries/",
                                     token)
        self.assertTrue(any(d["status"] == "pending" and d["attempts"] == 0
                            for d in log["results"]), log)  # still waiting for an answer
        status, body = await api.call("POST", f"/api/imap-servers/{sid}/sync/", token)
        self.assertEqual((status, body["new_messages"]), (200, 0))

        # The live receiver got every event, signed.
        for _ in range(100):
            payloads = [json.loads(raw) for _, raw in receiver.received]
            ids = {e["id"] for p in payloads for e in p["data"].get("emails", [])}
            completed = [p for p in payloads if p["event"] == "sync.completed"]
            if len(ids) == 130 and len(completed) == 3:
                break
            await sleep(0.05)
        self.assertEqual(len(ids), 130)
        self.assertEqual(sorted(p["data"]["new_messages"] for p in completed), [0, 10, 120])
        for headers, raw in receiver.received:
            self.assertTrue(verify_signature(
                live_hook["secret"], headers["x-mailcore-timestamp"], raw,
                headers["x-mailcore-signature"], now=reactor.seconds(),
            ))

    async def test_a_failed_sync_is_a_502_and_shows_on_the_server(self) -> None:
        server = await self.dovecot()
        user = server.new_user()
        api = await live_api(self, {})
        token = await login(api)
        status, created = await api.call("POST", "/api/imap-servers/", token,
                                         json=imap_server(server, user, password="wrong"))
        status, body = await api.call("POST", f"/api/imap-servers/{created['id']}/sync/", token)
        self.assertEqual((status, body["status"]), (502, "error"), body)
        self.assertIn("Email sync failed", body["detail"])
        status, shown = await api.call("GET", f"/api/imap-servers/{created['id']}/", token)
        self.assertEqual(shown["sync_status"], "error")
        self.assertTrue(shown["sync_error"])

    async def test_a_sync_longer_than_the_wait_answers_202_with_progress(self) -> None:
        await self.dovecot()  # the class's server; this test talks to a silent one
        dead, dead_port = listen(black_hole())
        self.addCleanup(dead.stopListening)
        api = await live_api(self, {"web": {"imap2api_sync_wait": 1},
                                    "fetch": {"idle_timeout": 30.0}})
        self.addCleanup(api.core.fetch.engine.stop)
        token = await login(api)
        status, created = await api.call("POST", "/api/imap-servers/", token, json={
            "host": "127.0.0.1", "port": dead_port, "username": "u", "password": "p",
            "use_ssl": False, "start_tls": True,
        })
        self.assertEqual(status, 201, created)
        started = get_reactor().seconds()
        status, body = await api.call("POST", f"/api/imap-servers/{created['id']}/sync/",
                                      token)
        self.assertEqual((status, body["status"]), (202, "running"), body)
        self.assertGreaterEqual(get_reactor().seconds() - started, 1.0)
        self.assertEqual(body["imap_server"]["sync_status"], "running")
        self.assertTrue(api.core.fetch.engine.is_running(created["id"]))

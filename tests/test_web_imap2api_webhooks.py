"""The webhooks API under the IMAP2API: `/api/webhooks/` CRUD and the delivery log."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import select
from twisted.trial.unittest import TestCase

from mailcore.fetch.engine import SyncResult
from mailcore.store.schema import webhooks
from tests.support.imap2api import Client, client, config
from tests.support.web import BASE, Web, header
from tests.support.webhooks import sync_ended

HOOK = "https://hooks.example.com/mailcore"


async def setup(**webhooks: Any) -> tuple[Web, Client]:
    web = Web.build(config(webhooks=webhooks or None))
    return web, await client(web)


class WebhookApiTests(TestCase):
    async def test_create_shows_the_secret_once(self) -> None:
        web, alice = await setup()
        status, headers, created = await alice.call("POST", "/api/webhooks/", json={
            "url": HOOK, "events": ["email.new", "sync.completed"], "description": "CRM",
        })
        self.assertEqual(status, 201, created)
        self.assertEqual(header(headers, "Cache-Control"), "no-store")
        self.assertEqual(created["events"], ["sync.completed", "email.new"])
        self.assertEqual((created["url"], created["description"], created["active"]),
                         (HOOK, "CRM", True))
        secret = created.pop("secret")
        self.assertTrue(secret.startswith("whsec_") and len(secret) > 30)
        self.assertEqual(await alice.ok("GET", f"/api/webhooks/{created['id']}/"), created)
        listing = await alice.ok("GET", "/api/webhooks/")
        self.assertEqual(listing, {"count": 1, "next": None, "previous": None,
                                   "results": [created]})
        # What the database holds is ciphertext that the fetch key opens.
        token = bytes(await web.core.db.read("secret", lambda conn: conn.execute(
            select(webhooks.c.secret_enc)).scalar_one()))
        self.assertNotIn(secret.encode(), token)
        self.assertEqual(web.core.fetch.secrets.decrypt(token), secret)

    async def test_defaults_and_a_given_secret(self) -> None:
        _, alice = await setup()
        body = await alice.ok("POST", "/api/webhooks/", 201, json={
            "url": HOOK, "secret": "my-own-secret-1234567",
        })
        self.assertEqual(body["events"], ["sync.completed", "email.new", "thread.updated",
                                          "migrate.completed", "restore.completed"])
        self.assertEqual(body["secret"], "my-own-secret-1234567")

    async def test_update_is_partial_and_rotates_secrets_on_request(self) -> None:
        _, alice = await setup()
        created = await alice.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        path = f"/api/webhooks/{created['id']}/"
        patched = await alice.ok("PATCH", path, json={"events": "thread.updated",
                                                       "active": False})
        self.assertEqual((patched["events"], patched["active"], patched["url"]),
                         (["thread.updated"], False, HOOK))
        self.assertNotIn("secret", patched)
        rotated = await alice.ok("PUT", path, json={"rotate_secret": True})
        self.assertNotEqual(rotated["secret"], created["secret"])
        self.assertNotIn("secret", await alice.ok("GET", path))

    async def test_bad_input_names_the_field(self) -> None:
        _, alice = await setup()
        for data, field in [
            ({}, "url"),
            ({"url": "ftp://files.example.com/"}, "url"),
            ({"url": "http://127.0.0.1:8080/hook"}, "url"),
            ({"url": "http://169.254.169.254/latest/meta-data"}, "url"),
            ({"url": "http://localhost/x"}, "url"),
            ({"url": HOOK, "events": ["email.deleted"]}, "events"),
            ({"url": HOOK, "events": []}, "events"),
            ({"url": HOOK, "secret": "short"}, "secret"),
            ({"url": HOOK, "active": "perhaps"}, "active"),
        ]:
            status, _, body = await alice.call("POST", "/api/webhooks/", json=data)
            self.assertEqual(status, 400, data)
            self.assertEqual(list(body), [field], (data, body))
        created = await alice.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        status, _, body = await alice.call("PATCH", f"/api/webhooks/{created['id']}/",
                                           json={"url": "http://10.1.2.3/"})
        self.assertEqual((status, list(body)), (400, ["url"]))

    async def test_the_operator_may_allow_loopback(self) -> None:
        _, alice = await setup(allow_loopback=True)
        await alice.ok("POST", "/api/webhooks/", 201, json={"url": "http://127.0.0.1:9/h"})

    async def test_a_user_has_a_bounded_number_of_webhooks(self) -> None:
        _, alice = await setup(max_per_user=2)
        for _ in range(2):
            await alice.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        status, _, body = await alice.call("POST", "/api/webhooks/", json={"url": HOOK})
        self.assertEqual(status, 400)
        self.assertIn("at most 2", body["non_field_errors"][0])

    async def test_delete(self) -> None:
        _, alice = await setup()
        created = await alice.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        status, _, body = await alice.call("DELETE", f"/api/webhooks/{created['id']}/")
        self.assertEqual((status, body), (204, b""))
        status, _, _ = await alice.call("GET", f"/api/webhooks/{created['id']}/")
        self.assertEqual(status, 404)

    async def test_a_deleted_webhooks_id_is_never_given_again(self) -> None:
        # On SQLite a deleted webhook's id went to the next webhook made, by any user (the
        # highest id in use plus one): a client holding the old id reached another webhook.
        # Found by deleting and creating objects against the daemon.
        web, alice = await setup()
        bob = await client(web, "bob")
        first = await alice.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        await alice.ok("DELETE", f"/api/webhooks/{first['id']}/", 204)
        theirs = await bob.ok("POST", "/api/webhooks/", 201, json={"url": HOOK})
        self.assertNotEqual(theirs["id"], first["id"])

    async def test_the_delivery_log_is_paginated_and_filtered(self) -> None:
        web, alice = await setup()
        created = await alice.ok("POST", "/api/webhooks/", 201,
                                 json={"url": HOOK, "events": ["sync.completed"]})
        now = datetime.datetime.fromtimestamp(web.clock.seconds(), datetime.UTC)
        for n in range(3):
            await sync_ended(web.core.webhooks, SyncResult(
                account_id=5, user_id=alice.user.id, started_at=now, finished_at=now,
                status="success", new_messages=n,
            ))
        path = f"/api/webhooks/{created['id']}/deliveries/"
        page = await alice.ok("GET", path + "?page_size=2")
        self.assertEqual(page["count"], 3)
        self.assertEqual(page["next"], f"{BASE}{path}?page=2&page_size=2")
        first = page["results"][0]
        self.assertEqual((first["event"], first["status"], first["attempts"]),
                         ("sync.completed", "pending", 0))
        self.assertEqual(first["payload"]["data"]["new_messages"], 2)  # newest first
        self.assertEqual(first["payload"]["id"], first["delivery_id"])
        self.assertEqual(first["created_at"], "2023-11-14T22:13:20Z")
        self.assertEqual((await alice.ok("GET", path + "?status=success"))["count"], 0)
        status, _, body = await alice.call("GET", path + "?status=lost")
        self.assertEqual((status, list(body)), (400, ["status"]))

"""Two real daemons sharing one PostgreSQL and their keys: with each node's keys made in its
own data directory, a quarantine release link of one node is refused by the other, and the
node started second logs an error naming each key that differs (mailcore.nodes.keys); with
the first node's keys copied to the second before its start, either node serves the other's
links and neither complains."""

from __future__ import annotations

import datetime
import shutil
import time

from sqlalchemy import Connection, insert, select
from treq.client import HTTPClient
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from mailcore.gateway.quarantine import LinkSigner
from mailcore.store import Database
from mailcore.store.schema import domains, quarantine, users
from tests.support.mailsink import Daemon, done
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for
from tests.test_gateway_cluster_files import log_of
from tests.test_gateway_mailapi import prepare

IDENT = "06122026120000123456"
KEYS = ("pages.key", "quarantine.key", "safedrop.key", "fetch.key")


def thd_hold(conn: Connection) -> None:
    """A message held for bob@customer.test (bob's domain), released by IDENT's link."""
    owner = conn.execute(select(users.c.id).where(users.c.username == "bob")).scalar_one()
    domain = conn.execute(select(domains.c.id).where(domains.c.name == "customer.test")
                          ).scalar_one()
    conn.execute(insert(quarantine).values(
        ident=IDENT, owner_id=owner, domain_id=domain, domain="customer.test",
        email="bob@customer.test", email_key="bob", mailfrom="spam@x.test", subject="hi",
        category="spam", reason="score 9", queue_id="Q1", body=b"Subject: hi\r\n\r\nx\r\n",
        size=18, created_at=datetime.datetime.now(datetime.UTC),
    ))


class SharedKeysTests(TestCase):
    timeout = 180

    async def start(self, copied: bool) -> tuple[Daemon, Daemon, str]:
        url = await create_test_database(self)
        base = tempdir_for(self)
        a = Daemon(base / "a", db_url=url, name="node-a", queue={"node_id": "node-a"})
        b = Daemon(base / "b", db_url=url, name="node-b", queue={"node_id": "node-b"})
        prepare(a, 9)  # no mail leaves: any next-hop port will do
        db = Database(url, None, synchronous=True)  # type: ignore[arg-type]
        done(db.run("hold", thd_hold))
        db.engine.dispose()
        await a.start()
        self.addCleanup(a.stop)
        await a.process.wait_for_port(a.http_port, timeout=30)
        if copied:  # what README tells the operator to do
            for name in KEYS:
                shutil.copy2(a.data_dir / name, b.data_dir / name)
        await b.start()  # second: a's fingerprints are there to compare
        self.addCleanup(b.stop)
        await b.process.wait_for_port(b.http_port, timeout=30)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        self.http = HTTPClient(Agent(get_reactor(), pool=pool))
        # The link node a's digest would send for the held message.
        token = LinkSigner.from_file(a.data_dir / "quarantine.key").sign(IDENT, time.time() + 3600)
        return a, b, token

    async def open_link(self, node: Daemon, token: str) -> int:
        response = await self.http.request(
            "GET", f"http://127.0.0.1:{node.http_port}/quarantine/release/{token}")
        await response.content()
        return int(response.code)

    async def test_a_node_with_keys_of_its_own_says_so(self) -> None:
        a, b, token = await self.start(copied=False)
        # What the error is about: node a's release link is refused by node b.
        self.assertEqual(await self.open_link(a, token), 200)
        self.assertEqual(await self.open_link(b, token), 404)
        text = log_of(b)
        for name in KEYS:  # each once, not again by its timer
            self.assertEqual(text.count(f"{name}: node 'node-a' holds another key than "
                                        f"this node's ({b.data_dir / name})"), 1)
        self.assertIn("quarantine release links sent by one node are refused", text)
        self.assertNotIn("holds another key", log_of(a))  # it started first
        for name in KEYS:  # the fingerprint says nothing of the key
            key = (b.data_dir / name).read_bytes().strip()
            self.assertNotIn(key.hex()[:16], text)

    async def test_nodes_with_the_same_keys_serve_each_others_links(self) -> None:
        a, b, token = await self.start(copied=True)
        self.assertEqual(await self.open_link(a, token), 200)
        self.assertEqual(await self.open_link(b, token), 200)
        for daemon in (a, b):
            self.assertNotIn("holds another key", log_of(daemon))

"""mailcore.nodekeys: nodes sharing a store find out whether they hold the same keys (each
records an HMAC of a fixed label under each of its keys; another node's that differs is an
error naming the key file and what breaks)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailcore.nodekeys import KEYS, STALE, NodeKeys, fingerprint
from mailcore.store import Database
from mailcore.store.schema import node_keys
from tests.support.servers import tempdir_for


class NodeKeysTests(TestCase):
    def setUp(self) -> None:
        self.db = Database.for_tests()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.base = tempdir_for(self)
        self.errors: list[str] = []

        def keep(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.error:
                self.errors.append(formatEvent(event))

        observe: Any = keep
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def node(self, node_id: str, data_dir: Path, fetch_key: str | None = None) -> NodeKeys:
        return NodeKeys(self.db, self.clock, node_id, data_dir, fetch_key)

    def rows(self) -> list[Any]:
        with self.db.engine.connect() as conn:
            return list(conn.execute(node_keys.select().order_by(node_keys.c.node_id,
                                                                 node_keys.c.name)))

    async def test_nodes_with_copied_keys_agree(self) -> None:
        a = self.node("node-a", self.base / "a")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        shutil.copytree(self.base / "a", self.base / "b")
        b = self.node("node-b", self.base / "b")
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        self.assertEqual(self.errors, [])
        self.assertEqual([(r.node_id, r.name) for r in self.rows()],
                         [(n, k) for n in ("node-a", "node-b") for k in sorted(KEYS)])

    async def test_a_node_with_keys_of_its_own_is_an_error_naming_each(self) -> None:
        a = self.node("node-a", self.base / "a")
        b = self.node("node-b", self.base / "b")
        a.announce_blocking(self.db.engine)
        found = b.announce_blocking(self.db.engine)
        self.assertEqual(sorted(m.key.name for m in found), sorted(KEYS))
        self.assertEqual({m.node_id for m in found}, {"node-a"})
        self.assertEqual(len(self.errors), len(KEYS))
        quarantine = next(e for e in self.errors if e.startswith("quarantine.key"))
        self.assertIn(f"node 'node-a' holds another key than this node's "
                      f"({self.base / 'b' / 'quarantine.key'})", quarantine)
        self.assertIn("release links", quarantine)
        # Node a, already running, finds node b at its next check.
        self.errors.clear()
        self.assertEqual({m.node_id for m in await a.check()}, {"node-b"})
        self.assertEqual(len(self.errors), len(KEYS))
        # Copied and started again: no more errors on either.
        shutil.rmtree(self.base / "b")
        shutil.copytree(self.base / "a", self.base / "b")
        self.errors.clear()
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        self.assertEqual(self.errors, [])

    async def test_the_store_holds_no_key_nor_a_plain_hash_of_one(self) -> None:
        a = self.node("node-a", self.base / "a")
        a.announce_blocking(self.db.engine)
        stored = " ".join(r.fingerprints for r in self.rows())
        for name in KEYS:
            key = (self.base / "a" / name).read_bytes().strip()
            for text in (key.hex(), hashlib.sha256(key).hexdigest()[:32],
                         key.decode("latin-1")):
                self.assertNotIn(text, stored)
        self.assertIn(fingerprint((self.base / "a" / "pages.key").read_bytes()), stored)

    async def test_a_fetch_key_rotated_on_every_node_is_no_error(self) -> None:
        """`mailcore secrets rotate` (every node stopped) leaves NEW then OLD: the nodes
        started again with them agree, one given OLD alone (not copied) does not: it cannot
        decrypt what NEW encrypts."""
        old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
        a = self.node("node-a", self.base / "a", old)
        a.announce_blocking(self.db.engine)
        b = self.node("node-b", self.base / "a", new)
        [found] = b.announce_blocking(self.db.engine)  # while a runs
        self.assertEqual((found.node_id, found.key.name), ("node-a", "fetch.key"))
        self.assertIn("[fetch] secret_key", self.errors[0])
        self.errors.clear()
        for node in (a, b):
            node.startService()
            await node.stopService()  # each removes its rows
        self.assertEqual(self.rows(), [])
        a = self.node("node-a", self.base / "a", f"{new},{old}")
        b = self.node("node-b", self.base / "a", f"{new},{old}")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        c = self.node("node-c", self.base / "a", old)
        self.assertEqual({(m.node_id, m.key.name) for m in c.announce_blocking(self.db.engine)},
                         {("node-a", "fetch.key"), ("node-b", "fetch.key")})

    async def test_a_node_not_seen_for_an_hour_is_not_compared(self) -> None:
        self.node("node-a", self.base / "a").announce_blocking(self.db.engine)
        self.clock.advance(STALE + 1)
        self.assertEqual(self.node("node-b", self.base / "b").announce_blocking(
            self.db.engine), [])

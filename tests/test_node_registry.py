"""mailcore.nodes: the nodes sharing a store record themselves once each, in `nodes`, with
what they declare, and check the other running nodes: do they see one files directory (each
writes a marker named by its node id; another node's marker missing or changed is an error
naming `files_dir`), and do they hold the same keys (each declares an HMAC of a fixed label
under each of its keys; another node's that differs is an error naming the key file and what
breaks). Each problem is logged once, not at every check."""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, cast

from cryptography.fernet import Fernet
from sqlalchemy import Connection, func, select
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.core import Core
from mailcore.nodes.files import MARKERS, Unseen, marker_name
from mailcore.nodes.keys import KEYS, fingerprint
from mailcore.nodes.model import STALE
from mailcore.nodes.registry import CHECK_INTERVAL, REMIND, NodeRegistry
from mailcore.service import build_core
from mailcore.store import Database
from mailcore.store.schema import nodes
from mailcore.workers import CpuPool
from tests.support.db import synchronous_database
from tests.support.logs import logged_at
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for


class NodeRegistryTests(TestCase):
    """On SQLite in memory; `PostgresNodeRegistryTests` runs them on PostgreSQL, the store
    nodes share."""

    async def database(self) -> Database:
        return synchronous_database()

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.database()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.base = tempdir_for(self)
        self.errors = logged_at(self, LogLevel.error)
        self.news = logged_at(self, LogLevel.info)

    def node(self, node_id: str, *, data: str = "data", files: str = "files",
             fetch_key: str | None = None) -> NodeRegistry:
        """A node with its keys in `base/data` and its files under `base/files` unless
        told: by default every node holds the same keys and sees the same files."""
        root = self.base / files
        return NodeRegistry(self.db, self.clock, CpuPool.for_tests(), node_id,
                            {"safedrop": root / "safedrop", "mailapi": root / "mailapi"},
                            self.base / data, fetch_key)

    def rows(self) -> list[Any]:
        with self.db.engine.connect() as conn:
            return list(conn.execute(nodes.select().order_by(nodes.c.node_id)))

    # -- the registry ----------------------------------------------------------------------

    async def test_each_node_is_one_row_declaring_its_marker_and_keys(self) -> None:
        a, b = self.node("node-a"), self.node("node-b")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        self.assertEqual(await b.check(), [])
        [row_a, row_b] = self.rows()
        self.assertEqual((row_a.node_id, row_b.node_id), ("node-a", "node-b"))
        self.assertIsNotNone(a.declared)
        assert a.declared is not None
        self.assertEqual(row_a.files_marker, a.declared.files_marker)
        self.assertEqual(sorted(a.declared.keys), sorted(KEYS))
        self.assertEqual(row_b.seen_at, self.clock.seconds())
        self.assertEqual(self.errors, [])

    async def test_a_running_node_checks_each_interval_and_a_clean_stop_removes_it(
        self,
    ) -> None:
        a, b = self.node("node-a"), self.node("node-b")
        a.announce_blocking(self.db.engine)
        b.announce_blocking(self.db.engine)
        a.startService()  # announced: its first check comes an interval later
        self.assertEqual([r.seen_at for r in self.rows()], [self.clock.seconds()] * 2)
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.rows()[0].seen_at, self.clock.seconds())
        await a.stopService()
        self.assertEqual([r.node_id for r in self.rows()], ["node-b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_a_node_started_unannounced_declares_itself_at_its_first_check(
        self,
    ) -> None:
        a = self.node("node-a")
        a.startService()
        self.assertEqual([r.node_id for r in self.rows()], ["node-a"])
        self.assertTrue((self.base / "files" / "mailapi" / MARKERS / marker_name("node-a"))
                        .exists())
        await a.stopService()
        self.assertEqual(self.rows(), [])

    # -- files_dir -------------------------------------------------------------------------

    async def test_nodes_on_one_files_directory_see_each_other(self) -> None:
        a, b = self.node("host-a:/srv/a"), self.node("host-b:/srv/b")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        # Named by the node id's digest (a default node id holds slashes), in each area.
        shared = self.base / "files"
        self.assertEqual(sorted(p.name for p in (shared / "mailapi" / MARKERS).iterdir()),
                         sorted([marker_name("host-a:/srv/a"), marker_name("host-b:/srv/b")]))
        self.assertTrue((shared / "safedrop" / MARKERS / marker_name("host-a:/srv/a")).exists())
        self.assertEqual(self.errors, [])

    async def test_a_node_on_storage_of_its_own_is_an_error_naming_files_dir(self) -> None:
        a = self.node("node-a", files="a")
        b = self.node("node-b", files="b")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        [problem] = b.announce_blocking(self.db.engine)
        self.assertEqual(problem, Unseen(
            "node-a", self.base / "b" / "mailapi" / MARKERS / marker_name("node-a"), None))
        [logged] = self.errors
        self.assertIn("files_dir: node 'node-a'", logged)
        self.assertIn("is missing", logged)
        # Node a, already running, finds node b at its next check.
        self.errors.clear()
        [seen_by_a] = await a.check()
        self.assertEqual(seen_by_a.node_id, "node-b")
        [logged] = self.errors
        self.assertIn("files_dir: node 'node-b'", logged)

    async def test_a_copied_directory_is_not_the_same_storage(self) -> None:
        a = self.node("node-a", files="a")
        a.announce_blocking(self.db.engine)
        shutil.copytree(self.base / "a", self.base / "b")  # a's markers, then a restarts
        a.announce_blocking(self.db.engine)
        [problem] = self.node("node-b", files="b").announce_blocking(self.db.engine)
        self.assertIsNotNone(cast(Unseen, problem).found)
        self.assertIn("holds another node's marker", self.errors[0])

    async def test_a_node_restarted_meanwhile_is_no_error(self) -> None:
        a, b = self.node("node-a"), self.node("node-b")
        a.announce_blocking(self.db.engine)
        b.announce_blocking(self.db.engine)
        self.node("node-a").announce_blocking(self.db.engine)  # a new marker
        self.assertEqual(await b.check(), [])
        self.assertEqual(self.errors, [])

    async def test_a_node_gone_for_a_while_is_not_checked(self) -> None:
        self.node("node-a", data="a", files="a").announce_blocking(self.db.engine)
        self.clock.advance(STALE + 1)
        self.assertEqual(self.node("node-b", data="b", files="b").announce_blocking(
            self.db.engine), [])
        self.assertEqual(self.errors, [])

    async def test_a_running_node_keeps_itself_seen_and_its_markers_there(self) -> None:
        a, b = self.node("node-a"), self.node("node-b")
        a.announce_blocking(self.db.engine)
        shared = self.base / "files"
        shutil.rmtree(shared / "mailapi" / MARKERS)
        self.clock.advance(STALE - 1)
        self.assertEqual(await a.check(), [])  # its marker written again, its row fresh
        self.clock.advance(STALE - 1)
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        # b saw a (fresh), and a's marker it could read.
        self.assertTrue((shared / "mailapi" / MARKERS / marker_name("node-a")).exists())

    # -- keys ------------------------------------------------------------------------------

    async def test_nodes_with_copied_keys_agree(self) -> None:
        a = self.node("node-a", data="a")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        shutil.copytree(self.base / "a", self.base / "b")
        b = self.node("node-b", data="b")
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        self.assertEqual(self.errors, [])

    async def test_a_node_with_keys_of_its_own_is_an_error_naming_each(self) -> None:
        a = self.node("node-a", data="a")
        b = self.node("node-b", data="b")
        a.announce_blocking(self.db.engine)
        found = b.announce_blocking(self.db.engine)
        self.assertEqual(sorted(m.subject for m in found), sorted(KEYS))
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
        # Copied and started again: no more errors on either, and each says it is over.
        shutil.rmtree(self.base / "b")
        shutil.copytree(self.base / "a", self.base / "b")
        self.errors.clear()
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        self.assertEqual(self.errors, [])
        self.assertEqual(sorted(self.news), sorted(
            f"{name}: node '{node}' now holds the same key as this node"
            for node in ("node-a", "node-b") for name in KEYS))

    async def test_the_store_holds_no_key_nor_a_plain_hash_of_one(self) -> None:
        a = self.node("node-a", data="a")
        a.announce_blocking(self.db.engine)
        stored = " ".join(r.key_fingerprints for r in self.rows())
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
        a = self.node("node-a", fetch_key=old)
        a.announce_blocking(self.db.engine)
        b = self.node("node-b", fetch_key=new)
        [found] = b.announce_blocking(self.db.engine)  # while a runs
        self.assertEqual((found.node_id, found.subject), ("node-a", "fetch.key"))
        self.assertIn("[fetch] secret_key", self.errors[0])
        self.errors.clear()
        for node in (a, b):
            node.startService()
            await node.stopService()  # each removes its row
        self.assertEqual(self.rows(), [])
        a = self.node("node-a", fetch_key=f"{new},{old}")
        b = self.node("node-b", fetch_key=f"{new},{old}")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        c = self.node("node-c", fetch_key=old)
        self.assertEqual({(m.node_id, m.subject) for m in c.announce_blocking(self.db.engine)},
                         {("node-a", "fetch.key"), ("node-b", "fetch.key")})

    async def test_a_node_not_seen_for_an_hour_is_not_compared(self) -> None:
        self.node("node-a", data="a").announce_blocking(self.db.engine)
        self.clock.advance(STALE + 1)
        self.assertEqual(self.node("node-b", data="b").announce_blocking(self.db.engine), [])

    # -- the log ---------------------------------------------------------------------------

    async def test_each_problem_is_logged_once_then_once_a_day_while_it_lasts(self) -> None:
        """At a start the error is logged by the check made before the reactor runs, and
        not again by the timer's; a check every ten minutes finding it again keeps quiet."""
        a = self.node("node-a", data="a", files="a")
        a.announce_blocking(self.db.engine)
        a.startService()
        self.addCleanup(a.stopService)
        b = self.node("node-b", data="b", files="b")
        self.assertEqual(len(b.announce_blocking(self.db.engine)), 1 + len(KEYS))
        b.startService()
        self.addCleanup(b.stopService)
        self.assertEqual(len(self.errors), 1 + len(KEYS))  # by b, at its start
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(len(self.errors), 2 * (1 + len(KEYS)))  # by a, at its next check
        for _ in range(int(REMIND // CHECK_INTERVAL) - 2):  # quiet until a day after b's
            self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(len(self.errors), 2 * (1 + len(KEYS)))
        self.clock.advance(CHECK_INTERVAL)  # a day after b logged them
        self.assertEqual(len(self.errors), 3 * (1 + len(KEYS)))
        self.clock.advance(CHECK_INTERVAL)  # and after a did
        self.assertEqual(len(self.errors), 4 * (1 + len(KEYS)))
        self.assertEqual(self.news, [])

    async def test_a_problem_with_a_node_that_stopped_ends_without_a_word(self) -> None:
        a = self.node("node-a", data="a")
        a.announce_blocking(self.db.engine)
        b = self.node("node-b", data="b")
        b.announce_blocking(self.db.engine)
        self.assertEqual(len(await a.check()), len(KEYS))
        b.startService()
        await b.stopService()
        self.assertEqual(await a.check(), [])
        self.assertEqual(self.news, [])
        self.errors.clear()  # started again, as it was: logged again
        self.node("node-b", data="b").announce_blocking(self.db.engine)
        self.assertEqual(len(await a.check()), len(KEYS))
        self.assertEqual(len(self.errors), 2 * len(KEYS))


class PostgresNodeRegistryTests(NodeRegistryTests):
    timeout = 240

    async def database(self) -> Database:
        db = synchronous_database(await create_test_database(self))
        self.addCleanup(db.close)
        return db


def thd_node_count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(nodes)).scalar_one())


class SingleNodeTests(TestCase):
    """On SQLite one node holds the store: there is nothing to register nor check."""

    def test_no_registry_runs_on_sqlite(self) -> None:
        db = synchronous_database()
        core = Core.build(Config(data_dir=tempdir_for(self)), db, Clock(),
                          cpu=CpuPool.for_tests())
        self.assertFalse(core.shared_store)
        self.assertNotIn(core.node_registry, core.background_services())

    async def test_the_daemon_on_sqlite_records_no_node_and_writes_no_marker(self) -> None:
        data_dir = tempdir_for(self)
        self.addCleanup(os.umask, os.umask(0o077))  # build_core sets 077, as the daemon
        core = build_core(Config(data_dir=data_dir), get_reactor(), check_secrets=True)
        self.addCleanup(core.cpu.stop)
        await core.db.open()
        self.addCleanup(core.db.close)
        self.assertEqual(await core.db.read("nodes", thd_node_count), 0)
        self.assertFalse((data_dir / "mailapi" / MARKERS).exists())
        self.assertFalse((data_dir / "safedrop" / MARKERS).exists())


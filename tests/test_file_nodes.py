"""mailcore.filenodes: nodes sharing a store find out whether they see one files directory
(each writes a marker named by its node id and records it; a marker of another node missing
or changed is an error naming `files_dir`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailcore.filenodes import MARKERS, STALE, FileNodes, marker_name
from mailcore.store import Database
from mailcore.workers import CpuPool
from tests.support.servers import tempdir_for


class FileNodesTests(TestCase):
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

    def node(self, node_id: str, files: Path) -> FileNodes:
        return FileNodes(self.db, self.clock, CpuPool.for_tests(), node_id,
                         {"safedrop": files / "safedrop", "mailapi": files / "mailapi"})

    async def test_nodes_on_one_files_directory_see_each_other(self) -> None:
        shared = self.base / "shared"
        a, b = self.node("host-a:/srv/a", shared), self.node("host-b:/srv/b", shared)
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        self.assertEqual(await a.check(), [])
        # Named by the node id's digest (a default node id holds slashes), in each area.
        self.assertEqual(sorted(p.name for p in (shared / "mailapi" / MARKERS).iterdir()),
                         sorted([marker_name("host-a:/srv/a"), marker_name("host-b:/srv/b")]))
        self.assertTrue((shared / "safedrop" / MARKERS / marker_name("host-a:/srv/a")).exists())
        self.assertEqual(self.errors, [])

    async def test_a_node_on_storage_of_its_own_is_an_error_naming_files_dir(self) -> None:
        a = self.node("node-a", self.base / "a")
        b = self.node("node-b", self.base / "b")
        self.assertEqual(a.announce_blocking(self.db.engine), [])
        [problem] = b.announce_blocking(self.db.engine)
        self.assertEqual(problem.node_id, "node-a")
        self.assertEqual(problem.path,
                         self.base / "b" / "mailapi" / MARKERS / marker_name("node-a"))
        [logged] = self.errors
        self.assertIn("files_dir: node 'node-a'", logged)
        self.assertIn("is missing", logged)
        # Node a, already running, finds node b at its next check.
        self.errors.clear()
        [seen_by_a] = await a.check()
        self.assertEqual(seen_by_a.node_id, "node-b")
        self.assertIn("files_dir: node 'node-b'", self.errors[0])

    async def test_a_copied_directory_is_not_the_same_storage(self) -> None:
        a = self.node("node-a", self.base / "a")
        a.announce_blocking(self.db.engine)
        shutil.copytree(self.base / "a", self.base / "b")  # a's markers, then a restarts
        a.announce_blocking(self.db.engine)
        [problem] = self.node("node-b", self.base / "b").announce_blocking(self.db.engine)
        self.assertIsNotNone(problem.found)
        self.assertIn("holds another node's marker", self.errors[0])

    async def test_a_node_restarted_meanwhile_is_no_error(self) -> None:
        shared = self.base / "shared"
        a, b = self.node("node-a", shared), self.node("node-b", shared)
        a.announce_blocking(self.db.engine)
        b.announce_blocking(self.db.engine)
        self.node("node-a", shared).announce_blocking(self.db.engine)  # a new marker
        self.assertEqual(await b.check(), [])
        self.assertEqual(self.errors, [])

    async def test_a_node_gone_for_a_while_is_not_checked(self) -> None:
        self.node("node-a", self.base / "a").announce_blocking(self.db.engine)
        self.clock.advance(STALE + 1)
        self.assertEqual(self.node("node-b", self.base / "b").announce_blocking(
            self.db.engine), [])

    async def test_a_running_node_keeps_itself_seen_and_its_markers_there(self) -> None:
        shared = self.base / "shared"
        a, b = self.node("node-a", shared), self.node("node-b", shared)
        a.announce_blocking(self.db.engine)
        shutil.rmtree(shared / "mailapi" / MARKERS)
        self.clock.advance(STALE - 1)
        self.assertEqual(await a.check(), [])  # its marker written again, its row fresh
        self.clock.advance(STALE - 1)
        self.assertEqual(b.announce_blocking(self.db.engine), [])
        # b saw a (fresh), and a's marker it could read.
        self.assertTrue((shared / "mailapi" / MARKERS / marker_name("node-a")).exists())

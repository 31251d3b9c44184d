"""Whether the nodes sharing a PostgreSQL store see one files directory.

safedrop's drop files and the Mail API's attachments and messages are files under
`files_dir` (`safedrop/`, `mailapi/`; the data directory unless given), named in the
database. Nodes sharing the database must see the same files there (shared storage, a
network file system mounted on each): otherwise a file uploaded through one node is not
found through another (its download fails) and each node's sweeps see only its own files.

A daemon on PostgreSQL writes, at its start, a marker file named by its node id (`[queue]
node_id`) under each files area (`<area>/nodes/<sha256 of the node id, 32 digits>`) holding
a random text, and records that text in `file_nodes` with the time (the database's clock).
It then reads the markers of every other node seen in the last `STALE` seconds: one missing
or holding another text means that node's files are elsewhere, and this node logs an error
naming `files_dir`. It says again that it runs, and checks again, every `CHECK_INTERVAL`
seconds, so a node started later with storage of its own is found by the nodes already
running too. Nothing is refused: a cluster that serves no files (a relay) runs as before,
with the error in its logs.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, insert, select, update
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.files import durable_directory, write_whole
from mailcore.periodic import PeriodicService
from mailcore.store.database import Database
from mailcore.store.schema import file_nodes
from mailcore.workers import CpuPool

log = Logger()

# A node that has not said it runs for this long (stopped, or gone for good) is not checked.
STALE = 3600.0
# How often a running node says it runs and checks the others' markers again.
CHECK_INTERVAL = 600.0
MARKERS = "nodes"

_n = file_nodes.c


@dataclass(frozen=True)
class Node:
    """Another node's row: its id and the marker text it wrote."""

    node_id: str
    marker: str


@dataclass(frozen=True)
class Unseen:
    """Another node's marker this node cannot read as that node wrote it: `path` is missing
    (`found` None) or holds another text."""

    node_id: str
    path: Path
    found: str | None

    def describe(self) -> str:
        what = "is missing" if self.found is None else "holds another node's marker"
        return (f"files_dir: node {self.node_id!r} keeps its files where this node cannot "
                f"see them ({self.path} {what}): a file uploaded through one node cannot be "
                "downloaded through the other, and each node's sweeps see only its own. "
                "Set files_dir (or --files-dir) of every node sharing this database to one "
                "shared storage (a network file system mounted on each), or run safedrop "
                "and the Mail API on one node only.")


def marker_name(node_id: str) -> str:
    """The file name of a node's marker (a node id may hold slashes: the default does)."""
    return hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:32]


def thd_record(conn: Connection, node_id: str, marker: str | None, now: float,
               stale: float = STALE) -> list[Node]:
    """Record that `node_id` runs at `now` (with `marker`, when given: its start), and
    return the other nodes seen since `now - stale`."""
    values: dict[str, object] = {"seen_at": now}
    if marker is not None:
        values["marker"] = marker
    done = conn.execute(update(file_nodes).where(_n.node_id == node_id).values(**values))
    if not done.rowcount:
        conn.execute(insert(file_nodes).values(node_id=node_id, marker=marker or "",
                                               seen_at=now))
    rows = conn.execute(select(_n.node_id, _n.marker)
                        .where(_n.node_id != node_id, _n.seen_at >= now - stale)
                        .order_by(_n.node_id))
    return [Node(row.node_id, row.marker) for row in rows]


def thd_markers(conn: Connection, node_ids: Sequence[str]) -> list[Node]:
    """The rows of `node_ids` as they are now (a node may have started again meanwhile)."""
    rows = conn.execute(select(_n.node_id, _n.marker).where(_n.node_id.in_(node_ids)))
    return [Node(row.node_id, row.marker) for row in rows]


class FileNodes(PeriodicService):
    """This node's marker under each files area, and the check of the others' (see the
    module docstring). `roots` maps each area's name to its directory."""

    name = "file_nodes_check"

    def __init__(self, db: Database, clock: IReactorTime, io: CpuPool, node_id: str,
                 roots: Mapping[str, Path], interval: float = CHECK_INTERVAL) -> None:
        self.db = db
        self.clock = clock
        self.io = io
        self.node_id = node_id
        self.roots = dict(roots)
        self._interval = interval
        self.marker = ""

    def interval(self) -> float:
        return self._interval

    def marker_paths(self, node_id: str) -> list[Path]:
        name = marker_name(node_id)
        return [root / MARKERS / name for _, root in sorted(self.roots.items())]

    def write_markers(self) -> None:
        """Write this node's marker under each area (replaced whole: at a start, a new
        text). Blocks."""
        for path in self.marker_paths(self.node_id):
            durable_directory(path.parent)
            write_whole(path, self.marker.encode("ascii"))

    def unseen(self, nodes: Sequence[Node]) -> list[Unseen]:
        """The markers of `nodes` this node cannot read as they wrote them. Blocks."""
        found: list[Unseen] = []
        for node in nodes:
            for path in self.marker_paths(node.node_id):
                try:
                    text: str | None = path.read_text("ascii", errors="replace").strip()
                except (FileNotFoundError, NotADirectoryError):
                    text = None
                if text != node.marker:
                    found.append(Unseen(node.node_id, path, text))
                    break
        return found

    def announce_blocking(self, engine: Engine) -> list[Unseen]:
        """At the daemon's start: a new marker written and recorded, the others' checked;
        each node whose files this one cannot see is logged as an error. Blocks."""
        self.marker = secrets.token_hex(16)
        self.write_markers()
        with engine.begin() as conn:
            nodes = thd_record(conn, self.node_id, self.marker, self.clock.seconds())
        problems = self.unseen(nodes)
        if problems:  # a node may have started again between the row and its file
            with engine.begin() as conn:
                again = thd_markers(conn, [p.node_id for p in problems])
            problems = self.unseen(again)
        self._report(problems)
        return problems

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._check())

    async def check(self) -> list[Unseen]:
        """Say again that this node runs (its markers written again if they went) and check
        the others' markers."""
        if not self.marker:
            self.marker = secrets.token_hex(16)
        await self.io.run(self._rewrite_missing)
        nodes = await self.db.run("file_nodes_record", thd_record, self.node_id, self.marker,
                                  self.clock.seconds())
        problems = await self.io.run(self.unseen, nodes)
        if problems:
            again = await self.db.read("file_nodes_markers", thd_markers,
                                       [p.node_id for p in problems])
            problems = await self.io.run(self.unseen, again)
        self._report(problems)
        return problems

    async def _check(self) -> None:
        try:
            await self.check()
        except Exception:
            log.failure("checking the other nodes' files directories failed")

    def _rewrite_missing(self) -> None:
        if any(not path.exists() for path in self.marker_paths(self.node_id)):
            self.write_markers()

    def _report(self, problems: Sequence[Unseen]) -> None:
        for problem in problems:
            log.error("{problem}", problem=problem.describe())

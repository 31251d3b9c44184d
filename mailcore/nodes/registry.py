"""This node in the node registry (see `mailcore.nodes`): its row recorded at the daemon's
start and every `CHECK_INTERVAL` while it runs, removed when it stops cleanly, and the
checks run over the other running nodes' rows each time.

What the checks find is logged as an error when first found (at this node's start, or when
another node starts with storage or keys of its own), then once a day (`REMIND`) while it
lasts, so that the log of any day holds it; when it ends with the other node still running
(its operator fixed it and restarted it), that is logged too. A check that finds the same
problem every ten minutes does not log it again each time.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from sqlalchemy import Engine
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.nodes import files, keys
from mailcore.nodes.model import Node, Problem, thd_forget, thd_heartbeat, thd_nodes
from mailcore.outages import log_failure
from mailcore.periodic import PeriodicService
from mailcore.store.database import Database
from mailcore.workers import CpuPool

log = Logger()

# How often a running node says it runs and checks the others again.
CHECK_INTERVAL = 600.0
# How often a problem that lasts is logged again.
REMIND = 86400.0


class ProblemLog:
    """The problems logged, each by its node and subject, with when it was last logged."""

    def __init__(self) -> None:
        self._logged: dict[tuple[str, str], tuple[float, Problem]] = {}

    def report(self, found: Sequence[Problem], running: Collection[str], now: float) -> None:
        """Log what is new in `found`, what lasted `REMIND` since it was logged, and the end
        of a problem logged before whose node is among the `running` nodes."""
        current = {(p.node_id, p.subject): p for p in found}
        for ident, (_, problem) in list(self._logged.items()):
            if ident not in current:
                del self._logged[ident]
                if problem.node_id in running:
                    log.info("{news}", news=problem.settled())
        for ident, problem in current.items():
            last = self._logged.get(ident)
            if last is None or now - last[0] >= REMIND:
                log.error("{problem}", problem=problem.describe())
                self._logged[ident] = (now, problem)


class NodeRegistry(PeriodicService):
    """This node's row in `nodes`, declaring its files marker under each of `roots` (each
    files area's directory by name) and the fingerprints of its keys (in `data_dir`, the
    fetch key `fetch_key` when configured); and the checks of the other nodes' rows."""

    name = "node_registry"

    def __init__(self, db: Database, clock: IReactorTime, io: CpuPool, node_id: str,
                 roots: Mapping[str, Path], data_dir: Path, fetch_key: str | None,
                 interval: float = CHECK_INTERVAL) -> None:
        self.db = db
        self.clock = clock
        self.io = io
        self.node_id = node_id
        self.roots = dict(roots)
        self.data_dir = data_dir
        self.fetch_key = fetch_key
        self._interval = interval
        self.keys: list[keys.Key] = []
        self.declared: Node | None = None
        self.problems = ProblemLog()

    def interval(self) -> float:
        return self._interval

    def declare_blocking(self) -> Node:
        """What this node declares, made anew (at a start): a new marker written under each
        files area, its keys read (each made if absent, as its service would). Blocks."""
        self.keys = keys.own_keys_blocking(self.data_dir, self.fetch_key)
        node = Node(self.node_id, secrets.token_hex(16), keys.declared(self.keys))
        files.write_markers_blocking(self.roots, node)
        self.declared = node
        return node

    def announce_blocking(self, engine: Engine) -> list[Problem]:
        """At the daemon's start: declared, recorded and checked, what the checks find
        logged; the timer's first check comes an interval later. Blocks."""
        node = self.declare_blocking()
        with engine.begin() as conn:
            others = thd_heartbeat(conn, node, self.clock.seconds())
        unseen = files.unseen_blocking(self.roots, others)
        if unseen:  # a node may have started again between its row and its markers
            with engine.begin() as conn:
                again = thd_nodes(conn, [u.node_id for u in unseen])
            unseen = files.unseen_blocking(self.roots, again)
        self.tick_at_start = False
        return self._found(others, unseen)

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._check())

    async def check(self) -> list[Problem]:
        """Say again that this node runs (its markers written again where they went) and
        check the other nodes."""
        node = await self.io.run(self._declared_blocking)
        others = await self.db.run("nodes_heartbeat", thd_heartbeat, node,
                                   self.clock.seconds())
        unseen = await self.io.run(files.unseen_blocking, self.roots, others)
        if unseen:
            again = await self.db.read("nodes_again", thd_nodes, [u.node_id for u in unseen])
            unseen = await self.io.run(files.unseen_blocking, self.roots, again)
        return self._found(others, unseen)

    def stopService(self) -> defer.Deferred[None]:
        stopped = super().stopService()
        return defer.Deferred.fromCoroutine(self._forget(stopped))

    async def _forget(self, stopped: defer.Deferred[None]) -> None:
        """After a check in flight: this node's row goes, so that the nodes started after
        it (a key changed on every node meanwhile) do not check it."""
        await stopped
        if self.declared is None:
            return
        try:
            await self.db.run("nodes_forget", thd_forget, self.node_id)
        except Exception:
            log.failure("removing this node from the node registry failed")

    async def _check(self) -> None:
        try:
            await self.check()
        except Exception:
            log_failure(log, "checking the other nodes sharing the store failed")

    def _declared_blocking(self) -> Node:
        if self.declared is None:  # not announced at the start
            return self.declare_blocking()
        files.write_markers_blocking(self.roots, self.declared, missing_only=True)
        return self.declared

    def _found(self, others: Sequence[Node], unseen: Sequence[files.Unseen]
               ) -> list[Problem]:
        found: list[Problem] = [*unseen, *keys.mismatches(self.keys, others)]
        self.problems.report(found, {node.node_id for node in others}, self.clock.seconds())
        return found

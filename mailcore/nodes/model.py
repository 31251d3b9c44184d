"""The node registry's table, `nodes`: each running node once, with what it declares."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Connection, delete, insert, select, update

from mailcore.store.schema import nodes

# A node that has not said it runs for this long (killed, or gone for good) is not checked.
STALE = 3600.0

_n = nodes.c


@dataclass(frozen=True)
class Node:
    """A node as it declares itself: the text of the marker it wrote under each files area,
    and the fingerprints of its keys by key name (the one that signs or encrypts first)."""

    node_id: str
    files_marker: str
    keys: Mapping[str, tuple[str, ...]]


class Problem(Protocol):
    """What a check found of another node: `subject` names what differs (`files_dir`, a key
    file), so that a problem found again is known for the same."""

    @property
    def node_id(self) -> str: ...

    @property
    def subject(self) -> str: ...

    def describe(self) -> str:
        """The error: what differs, what breaks, what to do."""

    def settled(self) -> str:
        """The news that it no longer differs (the node still running)."""


def thd_heartbeat(conn: Connection, node: Node, now: float, stale: float = STALE
                  ) -> list[Node]:
    """Record that `node` runs at `now`, declaring what it holds, and return the other nodes
    seen since `now - stale`."""
    values = {"seen_at": now, "files_marker": node.files_marker,
              "key_fingerprints": json.dumps({k: list(v) for k, v in node.keys.items()})}
    done = conn.execute(update(nodes).where(_n.node_id == node.node_id).values(**values))
    if not done.rowcount:
        conn.execute(insert(nodes).values(node_id=node.node_id, **values))
    return _thd_nodes(conn, _n.node_id != node.node_id, _n.seen_at >= now - stale)


def thd_nodes(conn: Connection, node_ids: Sequence[str]) -> list[Node]:
    """The rows of `node_ids` as they are now (a node may have started again meanwhile)."""
    return _thd_nodes(conn, _n.node_id.in_(node_ids))


def thd_forget(conn: Connection, node_id: str) -> None:
    """`node_id` stopped: no node checks it any more (until it starts again)."""
    conn.execute(delete(nodes).where(_n.node_id == node_id))


def _thd_nodes(conn: Connection, *where: ColumnElement[bool]) -> list[Node]:
    rows = conn.execute(select(_n.node_id, _n.files_marker, _n.key_fingerprints)
                        .where(*where).order_by(_n.node_id))
    return [Node(row.node_id, row.files_marker, _keys(row.key_fingerprints)) for row in rows]


def _keys(text: str) -> dict[str, tuple[str, ...]]:
    declared: Any = json.loads(text or "{}")
    if not isinstance(declared, dict):
        return {}
    return {str(name): tuple(str(f) for f in fingerprints)
            for name, fingerprints in declared.items() if isinstance(fingerprints, list)}

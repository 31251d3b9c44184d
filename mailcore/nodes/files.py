"""The node registry's files check: whether the nodes sharing a PostgreSQL store see one
files directory.

safedrop's drop files and the Mail API's attachments and messages are files under
`files_dir` (`safedrop/`, `mailapi/`; the data directory unless given), named in the
database. Nodes sharing the database must see the same files there (shared storage, a
network file system mounted on each): otherwise a file uploaded through one node is not
found through another (its download fails) and each node's sweeps see only its own files.

At its start a node writes a marker file named by its node id under each files area
(`<area>/nodes/<sha256 of the node id, 32 digits>`) holding a random text, and declares that
text in its row of the registry; at each check it writes its markers again if they went.
Another node's marker missing, or holding another text than that node declares, means
that node's files are elsewhere. Nothing is refused: a cluster that serves no files (a
relay) runs as before, with the error in its logs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailcore.files import durable_directory, write_whole
from mailcore.nodes.model import Node

MARKERS = "nodes"


@dataclass(frozen=True)
class Unseen:
    """Another node's marker this node cannot read as that node wrote it: `path` is missing
    (`found` None) or holds another text."""

    node_id: str
    path: Path
    found: str | None

    @property
    def subject(self) -> str:
        return "files_dir"

    def describe(self) -> str:
        what = "is missing" if self.found is None else "holds another node's marker"
        return (f"files_dir: node {self.node_id!r} keeps its files where this node cannot "
                f"see them ({self.path} {what}): a file uploaded through one node cannot be "
                "downloaded through the other, and each node's sweeps see only its own. "
                "Set files_dir (or --files-dir) of every node sharing this database to one "
                "shared storage (a network file system mounted on each), or run safedrop "
                "and the Mail API on one node only.")

    def settled(self) -> str:
        return f"files_dir: this node now sees the files of node {self.node_id!r}"


def marker_name(node_id: str) -> str:
    """The file name of a node's marker (a node id may hold slashes: the default does)."""
    return hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:32]


def marker_paths(roots: Mapping[str, Path], node_id: str) -> list[Path]:
    """Where `node_id` writes its marker: one file under each files area in `roots`."""
    name = marker_name(node_id)
    return [root / MARKERS / name for _, root in sorted(roots.items())]


def write_markers_blocking(roots: Mapping[str, Path], node: Node, *,
                           missing_only: bool = False) -> None:
    """Write `node`'s marker under each area (replaced whole: at a start, a new text), or
    with `missing_only` only where it went. Blocks."""
    for path in marker_paths(roots, node.node_id):
        if missing_only and path.exists():
            continue
        durable_directory(path.parent)
        write_whole(path, node.files_marker.encode("ascii"))


def unseen_blocking(roots: Mapping[str, Path], others: Sequence[Node]) -> list[Unseen]:
    """The markers of `others` this node cannot read as they declare them. Blocks."""
    found: list[Unseen] = []
    for node in others:
        for path in marker_paths(roots, node.node_id):
            try:
                text: str | None = path.read_text("ascii", errors="replace").strip()
            except (FileNotFoundError, NotADirectoryError):
                text = None
            if text != node.files_marker:
                found.append(Unseen(node.node_id, path, text))
                break
    return found

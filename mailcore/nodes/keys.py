"""The node registry's keys check: whether the nodes sharing a PostgreSQL store hold the
same secret keys.

Each node keeps its keys in its data directory, made at its first start when absent:
`pages.key` (the web pages' forms and session cookies, the OAuth pages), `quarantine.key`
(quarantine release links), `safedrop.key` (a recipient's grants and one-time codes) and the
fetch key (`fetch.key`, or `[fetch] secret_key`: remote mailbox passwords, webhook secrets,
safedrop secure messages). Behind a load balancer, what one node signed or encrypted must be
read by another: a node that made keys of its own refuses the others' links and cookies, and
cannot decrypt the secrets they stored.

A node declares, in its row of the registry, a fingerprint of each key: the HMAC-SHA256 of
`LABEL` under the key (32 hex digits), which tells keys apart without saying anything of
them (neither the key nor a plain hash of it leaves the node). The keys are those read at
the start (the services keep the keys they read then). A node stopped cleanly removes its
row, so that a key changed while every node was stopped (`mailcore secrets rotate`, a key
file replaced by hand), then copied to each, is no error when the nodes start again one by
one.

Nothing is refused: a new node makes keys of its own at its first start when the operator
has not copied the others' yet, and a node killed before a key changed would otherwise stop
every node started within the hour after it. The fetch key may hold several keys (the first
encrypts, each decrypts: `mailcore secrets rotate`): keys differ when another node's first
key is not among this node's (this node cannot decrypt what it stores), or this node's first
key is not among the other's.

The keys are not kept in the store to be handed to new nodes: the fetch key would then sit
in the database beside the secrets it encrypts, which it is there to protect.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailcore.fetch.secrets import KEY_FILE as FETCH_KEY_FILE
from mailcore.fetch.secrets import SecretBox
from mailcore.files import secret_key_file
from mailcore.nodes.model import Node

LABEL = b"mailcore node key fingerprint v1"

# Each key file signing something another node must verify, and what breaks when it differs.
SIGNING_KEYS = {
    "pages.key": "the web pages' forms, login sessions and OAuth pages made on one node "
                 "are refused by the other",
    "quarantine.key": "quarantine release links sent by one node are refused by the other",
    "safedrop.key": "a safedrop recipient's page and download grants and one-time codes "
                    "from one node are refused by the other",
}
FETCH_BREAKS = ("remote mailbox passwords, webhook secrets and safedrop secure messages "
                "stored through one node cannot be decrypted by the other")

# The name of each key a node declares.
KEYS = (*SIGNING_KEYS, FETCH_KEY_FILE)


def fingerprint(key: bytes) -> str:
    """What tells `key` from another without saying anything of it."""
    return hmac.new(key, LABEL, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Key:
    """One of this node's keys: its `name`, where it is kept (`where`), what breaks when
    nodes differ, and the fingerprints of its keys (the first signs or encrypts; each
    verifies or decrypts)."""

    name: str
    where: str
    breaks: str
    fingerprints: tuple[str, ...]

    def differs(self, theirs: Sequence[str]) -> bool:
        """Whether a node with keys `theirs` (first one first) cannot read what this
        node's key makes, or this node what theirs makes."""
        return (not theirs or theirs[0] not in self.fingerprints
                or self.fingerprints[0] not in theirs)


@dataclass(frozen=True)
class Mismatch:
    """Another node whose key `key.name` differs from this node's."""

    node_id: str
    key: Key

    @property
    def subject(self) -> str:
        return self.key.name

    def describe(self) -> str:
        return (f"{self.key.name}: node {self.node_id!r} holds another key than this node's "
                f"({self.key.where}): {self.key.breaks}. Copy one node's key to every node "
                "sharing this database (stop them, copy, start them again).")

    def settled(self) -> str:
        return f"{self.key.name}: node {self.node_id!r} now holds the same key as this node"


def own_keys_blocking(data_dir: Path, fetch_key: str | None) -> list[Key]:
    """This node's keys as its services read them (each made, mode 0600, if absent, as they
    would make it). Blocks: call at start-up."""
    keys = [Key(name, str(data_dir / name), breaks,
                (fingerprint(secret_key_file(data_dir / name)),))
            for name, breaks in SIGNING_KEYS.items()]
    box = SecretBox.from_data_dir(data_dir, fetch_key)
    where = "[fetch] secret_key" if fetch_key else str(data_dir / FETCH_KEY_FILE)
    keys.append(Key(FETCH_KEY_FILE, where, FETCH_BREAKS,
                    tuple(fingerprint(k) for k in box.keys)))
    return keys


def declared(keys: Sequence[Key]) -> dict[str, tuple[str, ...]]:
    """What a node declares of `keys`: their fingerprints by name."""
    return {key.name: key.fingerprints for key in keys}


def mismatches(keys: Sequence[Key], others: Sequence[Node]) -> list[Mismatch]:
    """The other nodes' keys that differ from this node's `keys`."""
    return [Mismatch(node.node_id, key) for node in others for key in keys
            if key.name in node.keys and key.differs(node.keys[key.name])]

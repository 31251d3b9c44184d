"""Whether the nodes sharing a PostgreSQL store hold the same secret keys.

Each node keeps its keys in its data directory, made at its first start when absent:
`pages.key` (the web pages' forms and session cookies, the OAuth pages), `quarantine.key`
(quarantine release links), `safedrop.key` (a recipient's grants and one-time codes) and the
fetch key (`fetch.key`, or `[fetch] secret_key`: remote mailbox passwords, webhook secrets,
safedrop secure messages). Behind a load balancer, what one node signed or encrypted must be
read by another: a node that made keys of its own refuses the others' links and cookies, and
cannot decrypt the secrets they stored.

A daemon on PostgreSQL records, at its start, a fingerprint of each key in `node_keys`: the
HMAC-SHA256 of `LABEL` under the key (32 hex digits), which tells keys apart without saying
anything of them (neither the key nor a plain hash of it leaves the node). It then compares
the fingerprints of every other node seen in the last `STALE` seconds with its own, and logs
an error naming the file and what breaks for each key that differs. It says again that it
runs, and checks again, every `CHECK_INTERVAL` seconds, so the nodes already running log it
too when a node starts with keys of its own.

A node stopped cleanly removes its rows, so that a key changed while every node was
stopped (`mailcore secrets rotate`, a key file replaced by hand), then copied to each, is
no error when the nodes start again one by one. A node killed leaves its rows for up to
`STALE` seconds.

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

from sqlalchemy import Connection, Engine, delete, insert, select, update
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.fetch.secrets import KEY_FILE as FETCH_KEY_FILE
from mailcore.fetch.secrets import SecretBox
from mailcore.files import secret_key_file
from mailcore.periodic import PeriodicService
from mailcore.store.database import Database
from mailcore.store.schema import node_keys

log = Logger()

LABEL = b"mailcore node key fingerprint v1"
# A node that has not said it runs for this long (stopped, or gone for good) is not checked.
STALE = 3600.0
# How often a running node says it runs and checks the others' keys again.
CHECK_INTERVAL = 600.0

_k = node_keys.c

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


# The name of each key in `node_keys`.
KEYS = (*SIGNING_KEYS, FETCH_KEY_FILE)


def fingerprint(key: bytes) -> str:
    """What tells `key` from another without saying anything of it."""
    return hmac.new(key, LABEL, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Key:
    """One of this node's keys: its `name` in `node_keys`, where it is kept (`where`), what
    breaks when nodes differ, and the fingerprints of its keys (the first signs or
    encrypts; each verifies or decrypts)."""

    name: str
    where: str
    breaks: str
    fingerprints: tuple[str, ...]

    def stored(self) -> str:
        return ",".join(self.fingerprints)

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

    def describe(self) -> str:
        return (f"{self.key.name}: node {self.node_id!r} holds another key than this node's "
                f"({self.key.where}): {self.key.breaks}. Copy one node's key to every node "
                "sharing this database (stop them, copy, start them again).")


def node_keys_blocking(data_dir: Path, fetch_key: str | None) -> list[Key]:
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


def thd_record(conn: Connection, node_id: str, keys: Sequence[Key], now: float,
               stale: float = STALE) -> list[tuple[str, str, list[str]]]:
    """Record that `node_id` runs at `now` with `keys`, and return the other nodes' keys
    seen since `now - stale`: (node id, key name, fingerprints)."""
    for key in keys:
        values = {"fingerprints": key.stored(), "seen_at": now}
        done = conn.execute(update(node_keys).where(_k.node_id == node_id, _k.name == key.name)
                            .values(**values))
        if not done.rowcount:
            conn.execute(insert(node_keys).values(node_id=node_id, name=key.name, **values))
    rows = conn.execute(select(_k.node_id, _k.name, _k.fingerprints)
                        .where(_k.node_id != node_id, _k.seen_at >= now - stale)
                        .order_by(_k.node_id, _k.name))
    return [(row.node_id, row.name, row.fingerprints.split(",")) for row in rows]


def thd_forget(conn: Connection, node_id: str) -> None:
    """`node_id` stopped: its keys are compared no more (until it starts again)."""
    conn.execute(delete(node_keys).where(_k.node_id == node_id))


def mismatches(keys: Sequence[Key], others: Sequence[tuple[str, str, list[str]]]
               ) -> list[Mismatch]:
    """The other nodes' keys that differ from this node's."""
    mine = {key.name: key for key in keys}
    return [Mismatch(node_id, mine[name]) for node_id, name, theirs in others
            if name in mine and mine[name].differs(theirs)]


class NodeKeys(PeriodicService):
    """This node's key fingerprints in the store, and the check of the others' (see the
    module docstring)."""

    name = "node_keys_check"

    def __init__(self, db: Database, clock: IReactorTime, node_id: str, data_dir: Path,
                 fetch_key: str | None, interval: float = CHECK_INTERVAL) -> None:
        self.db = db
        self.clock = clock
        self.node_id = node_id
        self.data_dir = data_dir
        self.fetch_key = fetch_key
        self._interval = interval
        self.keys: list[Key] = []

    def interval(self) -> float:
        return self._interval

    def announce_blocking(self, engine: Engine) -> list[Mismatch]:
        """At the daemon's start: this node's keys read (made if absent) and recorded, the
        others' compared; each that differs is logged as an error. Blocks."""
        self.keys = node_keys_blocking(self.data_dir, self.fetch_key)
        with engine.begin() as conn:
            others = thd_record(conn, self.node_id, self.keys, self.clock.seconds())
        return self._report(mismatches(self.keys, others))

    def stopService(self) -> defer.Deferred[None]:
        stopped = super().stopService()
        return defer.Deferred.fromCoroutine(self._forget(stopped))

    async def _forget(self, stopped: defer.Deferred[None]) -> None:
        """After a check in flight: this node's rows go, so that the nodes started after
        it (a key changed on every node meanwhile) do not compare theirs with its old
        ones."""
        await stopped
        if not self.keys:
            return
        try:
            await self.db.run("node_keys_forget", thd_forget, self.node_id)
        except Exception:
            log.failure("forgetting this node's key fingerprints failed")

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._check())

    async def check(self) -> list[Mismatch]:
        """Say again that this node runs, and compare the others' keys (those read at the
        start: the services keep the keys they read then)."""
        if not self.keys:
            return []
        others = await self.db.run("node_keys_record", thd_record, self.node_id, self.keys,
                                   self.clock.seconds())
        return self._report(mismatches(self.keys, others))

    async def _check(self) -> None:
        try:
            await self.check()
        except Exception:
            log.failure("checking the other nodes' keys failed")

    def _report(self, found: list[Mismatch]) -> list[Mismatch]:
        for mismatch in found:
            log.error("{problem}", problem=mismatch.describe())
        return found

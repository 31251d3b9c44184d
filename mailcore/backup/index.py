"""Dropmyemail's index of the backup: what is worked out once per stored item, not per read.

The message store already records each attachment when it stores a message (its MIME part,
file name decoded per RFC 2231/2047, type, size; sender and date are the message's). This
module adds what is costlier and only Dropmyemail needs, in columns of migration 0017:

- `message_attachments.meta_data`: what libmagic says of the attachment's decoded bytes
  (what `file(1)` prints);
- `messages.signature_phone`: the telephone number of the text's signature block
  (`mailcore.backup.signature`), "" when there is none.

NULL means "not yet worked out". `BackupIndex.run` works through those rows in batches, the
oldest first: one read of the rows, one blob at a time parsed and described on the CPU pool
(never on the reactor thread), one write per batch (`… WHERE meta_data IS NULL`, so that two
nodes indexing the same store at once only repeat work, never disagree). `BackupIndexer`
runs it after every sync (the fetch engine's listener) and every `interval` seconds, which
is also how the backups that existed before the upgrade are described: the first passes
after the upgrade backfill them, a batch at a time. A page of attachments read before its
rows are described describes them itself (`BackupIndex.describe`), once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from sqlalchemy import Connection, bindparam, func, select, update
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailcore.backup.signature import MAX_TEXT, signature_phone
from mailcore.messages import MessageStore, parts
from mailcore.messages.parse import MimeLimits, extract_parts
from mailcore.outages import log_failure
from mailcore.periodic import InFlight
from mailcore.store import Database
from mailcore.store.schema import message_attachments, message_blobs, messages

log = Logger()

# How much of a file libmagic looks at (what `file` reads by default is about this much).
MAGIC_BYTES = 1 << 20
BATCH = 100


def describe(content: bytes) -> str:
    """What `file(1)` says of `content` (libmagic). Blocks: run it on the CPU pool."""
    import magic

    try:
        return str(magic.from_buffer(content[:MAGIC_BYTES]))
    except Exception as e:  # libmagic refuses rarely; the listing still works
        return f"unknown ({type(e).__name__})"


def _clean_head(raw: bytes, part_path: str, limits: MimeLimits,
                cache: parts.Children) -> bytes | None:
    """The first MAGIC_BYTES of the attachment's decoded bytes, cut without building the
    MIME tree (mailcore.messages.parts); None when the part does not decode cleanly so."""
    located = parts.locate(raw, part_path, limits, cache)
    if located is None:
        return None
    out = bytearray()
    try:
        for piece in parts.decoded_chunks(raw, located):
            out += piece
            if len(out) >= MAGIC_BYTES:
                break
    except parts.NotClean:
        return None
    return bytes(out)


def describe_parts(raw: bytes | None, wanted: Iterable[tuple[int, str]],
                   limits: MimeLimits) -> dict[int, str]:
    """libmagic's description of each (attachment id, part path) of one raw message; ""
    for a part that is not there. Each part is cut from the bytes when it decodes cleanly
    (each multipart walked once for them all), the others by the email package from one
    parse of the message for them all (once per part, a 5.7 MB message of 200 attached
    messages took 0.65 s a part). CPU-bound."""
    out: dict[int, str] = {}
    slow: dict[str, list[int]] = defaultdict(list)
    cache: parts.Children = {}
    for attachment_id, part_path in wanted:
        out[attachment_id] = ""
        head = _clean_head(raw, part_path, limits, cache) if raw is not None else None
        if head is not None:
            out[attachment_id] = describe(head)
        elif raw is not None:
            slow[part_path].append(attachment_id)
    if raw is not None and slow:
        for part_path, content in extract_parts(raw, list(slow), limits):
            if content is not None:
                text = describe(content)
                for attachment_id in slow[part_path]:
                    out[attachment_id] = text
    return out


def scan_signatures(rows: Iterable[tuple[int, str, str]]) -> dict[int, str]:
    """The signature phone of each (message id, text, sender address). CPU-bound."""
    return {row_id: signature_phone(text, sender) for row_id, text, sender in rows}


_SET_META = (
    update(message_attachments)
    .where(message_attachments.c.id == bindparam("i"),
           message_attachments.c.meta_data.is_(None))
    .values(meta_data=bindparam("m"))
)
_SET_PHONE = (
    update(messages)
    .where(messages.c.id == bindparam("i"), messages.c.signature_phone.is_(None))
    .values(signature_phone=bindparam("p"))
)


class BackupIndex:
    """Fills the index's NULL rows (module docstring)."""

    def __init__(self, db: Database, store: MessageStore, *, batch: int = BATCH) -> None:
        self.db = db
        self.store = store
        self.batch = batch

    async def describe(self, ids: list[int] | None = None) -> dict[int, str]:
        """Describe the attachments `ids` (or the next batch of undescribed ones) and keep
        the descriptions; returns them by id."""

        def pending(conn: Connection) -> list[tuple[int, str, str]]:
            query = (
                select(message_attachments.c.id, message_attachments.c.part_path,
                       messages.c.sha256)
                .select_from(message_attachments.join(
                    messages, messages.c.id == message_attachments.c.message_row_id))
                .where(message_attachments.c.meta_data.is_(None))
            )
            if ids is not None:
                query = query.where(message_attachments.c.id.in_(ids))
            else:
                query = query.order_by(message_attachments.c.id).limit(self.batch)
            return [(r[0], r[1], r[2]) for r in conn.execute(query)]

        rows = await self.db.read("backup_index_pending_attachments", pending)
        by_blob: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for attachment_id, part_path, sha256 in rows:
            by_blob[sha256].append((attachment_id, part_path))
        found: dict[int, str] = {}
        for sha256, wanted in by_blob.items():
            raw = await self._blob(sha256)
            found.update(await self.store.cpu.run(describe_parts, raw, wanted,
                                                  self.store.limits))
            del raw  # one message in memory at a time
        if found:
            await self.db.run("backup_index_describe", lambda conn: conn.execute(
                _SET_META, [{"i": k, "m": v} for k, v in found.items()]))
        return found

    async def _blob(self, sha256: str) -> bytes | None:
        def txn(conn: Connection) -> bytes | None:
            raw = conn.execute(
                select(message_blobs.c.raw).where(message_blobs.c.sha256 == sha256)
            ).scalar()
            return None if raw is None else bytes(raw)

        return await self.db.read("backup_index_blob", txn)

    async def scan(self) -> int:
        """Find the signature phone of the next batch of unscanned messages; how many."""

        def pending(conn: Connection) -> list[tuple[int, str, str]]:
            return [(r[0], r[1] or "", r[2] or "") for r in conn.execute(
                select(messages.c.id, func.substr(messages.c.body_text, 1, MAX_TEXT),
                       messages.c.sender_address)
                .where(messages.c.signature_phone.is_(None))
                .order_by(messages.c.id)
                .limit(self.batch)
            )]

        rows = await self.db.read("backup_index_pending_signatures", pending)
        if not rows:
            return 0
        phones = await self.store.cpu.run(scan_signatures, rows)
        await self.db.run("backup_index_signatures", lambda conn: conn.execute(
            _SET_PHONE, [{"i": k, "p": v} for k, v in phones.items()]))
        return len(rows)

    async def run(self, keep_going: Callable[[], bool] | None = None) -> int:
        """Work through every row still to index, a batch at a time; how many were done.
        `keep_going()` (when given) is asked between batches."""
        done = 0
        while keep_going is None or keep_going():
            described = len(await self.describe())
            scanned = await self.scan()
            done += described + scanned
            if not described and not scanned:
                break
        return done


class BackupIndexer(Service):
    """Runs `BackupIndex.run` at start, after every sync, and every `interval` seconds; a
    kick during a pass asks for one more pass after it. Stopping waits for a pass in
    flight (it stops between batches)."""

    name = "backup-index"

    def __init__(self, index: BackupIndex, clock: IReactorTime, *,
                 interval: float = 300.0) -> None:
        self.index = index
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        self._in_flight = InFlight()
        self._current: defer.Deferred[None] | None = None
        self._again = False

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.kick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return defer.Deferred.fromCoroutine(self._in_flight.wait())

    def kick(self, *_: object) -> None:
        """Index what is new, now (the fetch engine calls this after each sync)."""
        if not self.running:
            return
        if self._current is not None:
            self._again = True
            return
        d = defer.Deferred.fromCoroutine(self._passes())
        if not d.called:  # a pass that ended at once has already forgotten itself
            self._current = self._in_flight.track(d)

    async def _passes(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self.index.run(lambda: bool(self.running))
                except Exception:
                    log_failure(log, "indexing the backup failed; the next pass retries")
                if not (self._again and self.running):
                    return
        finally:
            self._current = None

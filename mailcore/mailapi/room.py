"""How much room the nearly full hosted mailboxes have left, for the SMTP server's RCPT.

Mail for a mailbox that cannot take it is refused at RCPT (552 5.2.2 "mailbox full",
mailcore.smtp.server), where the sender's own server tells its user, rather than accepted
and bounced later (a DSN to a sender that may be forged: backscatter); a message larger
than its SIZE said is asked about again at the end of DATA. The later check at
delivery (mailcore.mailapi.delivery) stays: it is the one that counts, for the message
whose bytes pass the quota.

No RCPT reads the store: the mailboxes whose room (their quota, mailcore.mailapi.counts'
effective_quota, less `used_bytes`) is under `margin` (the largest message the SMTP server
takes: any other mailbox has room for whatever a client may send) are read at once, with
their room, and that answer is kept `ttl` seconds. Callers that find it expired queue on one
lock and the first of them reads it (one read for all of them). So a mailbox freed by a
delete takes mail again within `ttl` seconds, and one filled meanwhile is refused within as
long (until then its mail is accepted and bounced at delivery, as before). A read that fails
leaves the answer unknown: the recipient is accepted (the delivery's check still holds).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, or_, select
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.mailapi.addresses import mailbox_key
from mailcore.mailapi.snapshot import Snapshot
from mailcore.store import Database
from mailcore.store.schema import mailboxes

log = Logger()

# How long the room of the nearly full mailboxes is trusted before it is read again.
ROOM_TTL = 10.0

_b = mailboxes.c


def _nearly_full(quota: Any) -> Select[Any]:
    """The active mailboxes (address, room) with less than :margin bytes left under
    `quota`, and a limit (not 0)."""
    return select(_b.address, (quota - _b.used_bytes).label("room")) \
        .where(_b.domain_id.is_not(None), or_(_b.quota_bytes.is_(None), _b.quota_bytes != 0),
               _b.used_bytes > quota - bindparam("margin"))


# Under each mailbox's own quota, else the configured one; with none configured, under its
# own only (a mailbox without one has no limit).
_NEARLY_FULL = _nearly_full(func.coalesce(_b.quota_bytes, bindparam("quota")))
_NEARLY_FULL_OWN = _nearly_full(_b.quota_bytes).where(_b.quota_bytes.is_not(None))


def thd_nearly_full(conn: Connection, quota: int | None, margin: int) -> dict[str, int]:
    """Blocking: address -> room left (bytes, 0 or less: full) of each active mailbox that
    has less than `margin` bytes left under its quota (its own, else `quota`; None: no
    limit; mailcore.mailapi.counts.effective_quota)."""
    if quota is None:
        rows = conn.execute(_NEARLY_FULL_OWN, {"margin": margin})
    else:
        rows = conn.execute(_NEARLY_FULL, {"quota": quota, "margin": margin})
    return {row.address: int(row.room) for row in rows}


class MailboxRoom:
    """The room hosted mailboxes have left, from a cached read of the nearly full ones (see
    the module docstring)."""

    def __init__(self, db: Database, clock: IReactorTime, quota: int | None, margin: int,
                 ttl: float = ROOM_TTL) -> None:
        self.db = db
        self.clock = clock
        self.quota = quota  # the configured quota (None: no limit but mailboxes' own)
        self.margin = margin
        self.ttl = ttl
        self._known = Snapshot(clock, ttl, self._read)

    async def room(self, address: str) -> int | None:
        """The bytes the mailbox at `address` may still take, when fewer than `margin`;
        None when it has more (or no limit), is no mailbox, or the last read failed."""
        known = await self._known.get()
        key = mailbox_key(address)
        return None if key is None else known.get(key)

    async def _read(self) -> dict[str, int]:
        try:
            return await self.db.read("mailapi_nearly_full", thd_nearly_full, self.quota,
                                      self.margin)
        except defer.CancelledError:
            raise  # its caller gave up waiting (the SMTP command deadline): no answer to keep
        except Exception:
            log.failure("reading the room of the hosted mailboxes failed; their mail is "
                        "accepted for {ttl} s, and bounced at delivery if it does not fit",
                        ttl=self.ttl)
            return {}  # (not read again by every RCPT while the store fails)

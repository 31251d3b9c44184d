"""Per-user caps on the mail the APIs send for a user (`[limits]`): the Mail API's outbox
and safedrop's notifications of a bundle to its recipients, the two ways a user's API
credential sends mail, with the user's own text, to addresses the user chose. Without a cap
a stolen credential sends to any address as fast as the request rate lets it (20 a second):
spam from the gateway's address.

```toml
[limits]
user_recipients_per_hour = 500   # recipients of a user's API mail in any 60 minutes
user_recipients_per_day = 2000   # ... in any 24 hours (0: no cap, for either)
```

A send counts its recipients (a mail's distinct to, cc and bcc addresses; a bundle's
recipients) when it is made: in the transaction that puts the mail in the outbox or marks
the bundle sent, recorded in the store (mailcore.store.sends) so that every node sharing it
counts one total, and checked under a per-user lock so that two sends at once cannot both
take the last of a cap. A transaction holds one user's lock and no other, taken before
any row's (`SendCaps.thd_hold`), so that it never waits for another while holding it: on
PostgreSQL each send is a transaction of its own, never a rider of the spool's group
commit with other users' sends. A send that would pass either cap is refused whole and
changes nothing but what a refusal keeps: the mail stays a draft (its edit saved), the
bundle stays unsent; the API answers 429 with Retry-After (when the windows' sends will
have made room for it), or 400 when the send alone has more recipients than a cap. Mail
the gateway sends on its own account (bounces, quarantine digests, safedrop's receipts
and codes) is not counted.

The first refusal of a user logs a warning naming the user and the cap; the user's next
refusals are not logged until SPELL_QUIET seconds pass without one (each node logs its
own). /metrics counts every refusal: `mailcore_api_sends_refused_total{api, window}`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.config import ConfigError, refuse_unknown
from mailcore.identity.service import thd_get_user
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.store.database import Database
from mailcore.store.sends import (
    SendVerdict,
    Window,
    thd_hold_sends,
    thd_sweep_sends,
    thd_take_sends,
)

log = Logger()

HOUR = 3600.0
DAY = 86400.0
# A user's refusals after the first are logged again once this long has passed without one.
SPELL_QUIET = 3600.0
# Users whose last refusal this node remembers, past which the quiet ones are forgotten.
SPELLS_KEPT = 10_000
# How often sends no window counts any more are deleted, and how many a transaction.
SWEEP_INTERVAL = 600.0
SWEEP_BATCH = 1000
MAX_CAP = 1_000_000_000


@dataclass(frozen=True)
class SendCapSettings:
    """The `[limits]` table; 0 is no cap."""

    user_recipients_per_hour: int = 500
    user_recipients_per_day: int = 2000

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> SendCapSettings:
        refuse_unknown("limits", section, cls)
        values: dict[str, int] = {}
        for key, value in section.items():
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value <= MAX_CAP:
                raise ConfigError(f"[limits] {key} must be a whole number from 0 (no cap) "
                                  f"to {MAX_CAP}")
            values[key] = value
        return cls(**values)

    def windows(self) -> tuple[Window, ...]:
        """The caps that are on."""
        return tuple(Window(name, seconds, cap) for name, seconds, cap in (
            ("hour", HOUR, self.user_recipients_per_hour),
            ("day", DAY, self.user_recipients_per_day)) if cap > 0)


class SendCapped(Exception):
    """A send refused by a cap (the transaction that would have sent raises it, so that it
    changes nothing)."""

    def __init__(self, verdict: SendVerdict) -> None:
        super().__init__(describe(verdict))
        self.verdict = verdict


def describe(verdict: SendVerdict) -> str:
    """Why a send was refused, for its API's error: the cap, and what is left of it."""
    window = verdict.window
    if window is None:
        return "sent"
    cap = f"{window.cap} recipients a{'n' if window.name == 'hour' else ''} {window.name}"
    if verdict.retry_after is None:
        return (f"too many recipients for the sending limit: {verdict.recipients}, over "
                f"the {cap} a user may send to")
    return (f"sending limit reached: {verdict.used} of {cap} used, this send has "
            f"{verdict.recipients}; try again in {verdict.retry_after} s")


def http_refusal(verdict: SendVerdict) -> tuple[int, str, dict[str, str]]:
    """A refused send's answer, for each API to put in its own error's shape: its status
    (429 when waiting makes room, 400 when the send alone has more recipients than a cap),
    why (`describe`), and its headers (Retry-After, with the 429)."""
    if verdict.retry_after is None:
        return 400, describe(verdict), {}
    return 429, describe(verdict), {"Retry-After": str(verdict.retry_after)}


class Spells:
    """The users in a spell of refusals on this node (each node keeps its own): a user's
    refusal starts one, to be logged, unless its last came less than SPELL_QUIET seconds
    before. At most SPELLS_KEPT users are remembered past their spell's end."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        # User id -> when this node last refused it (the spell it logged goes on).
        self._last: dict[int, float] = {}

    def starts(self, user_id: int) -> bool:
        """Record a refusal of `user_id` now: whether it starts a spell (log it)."""
        now = self.clock.seconds()
        last = self._last.get(user_id)
        self._last[user_id] = now
        if last is not None and now - last < SPELL_QUIET:
            return False
        if len(self._last) > SPELLS_KEPT:
            self._last = {u: t for u, t in self._last.items() if now - t < SPELL_QUIET}
        return True


async def user_named(db: Database, user_id: int) -> str:
    """A user as a warning names it: "name <email>", or "gone" (deleted, or unread)."""
    try:
        user = await db.read("get_user", thd_get_user, user_id)
    except Exception:
        user = None
    return "gone" if user is None else f"{user.username} <{user.email}>"


class SendCaps:
    """The caps of `[limits]` over the store, for the services that send a user's mail."""

    def __init__(self, db: Database, clock: IReactorTime, settings: SendCapSettings,
                 registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.windows = settings.windows()
        self.refusals = Counter(
            "mailcore_api_sends_refused",
            "Sends of a user's API mail (Mail API outbox, safedrop bundles) refused by a "
            "[limits] cap on recipients, by API and window", ["api", "window"],
            registry=registry)
        self.spells = Spells(clock)

    def thd_hold(self, conn: Connection, user_id: int) -> None:
        """Blocking, first in a transaction that may send for `user_id`: take the user's
        lock (mailcore.store.sends.thd_hold_sends), when a cap is on."""
        if self.windows:
            thd_hold_sends(conn, user_id)

    def thd_take(self, conn: Connection, user_id: int, recipients: int,
                 now: float) -> SendVerdict:
        """Blocking, in the transaction that sends: count the send (mailcore.store.sends)."""
        return thd_take_sends(conn, user_id, recipients, now, self.windows)

    def thd_check(self, conn: Connection, user_id: int, recipients: int,
                  now: float) -> SendVerdict:
        """Blocking: what `thd_take` would say now, recording nothing."""
        return thd_take_sends(conn, user_id, recipients, now, self.windows, take=False)

    async def refused(self, user_id: int, api: str, verdict: SendVerdict) -> None:
        """Count a refusal (on the reactor, once its transaction ended); the first of a
        spell is logged as a warning."""
        window = verdict.window
        self.refusals.labels(api=api, window=window.name if window else "").inc()
        if not self.spells.starts(user_id):
            return
        log.warn("user {user_id} ({name}) reached its cap on mail the APIs send: {why} "
                 "({api}); its next refusals are not logged until {quiet:g} s pass without "
                 "one", user_id=user_id, name=await user_named(self.db, user_id),
                 why=describe(verdict), api=api, quiet=SPELL_QUIET)

    async def sweep(self) -> int:
        """Delete the sends no window counts any more (every one, with no cap on),
        SWEEP_BATCH a transaction; how many."""
        longest = max((w.seconds for w in self.windows), default=0.0)
        return await delete_in_batches(self.db, "api_sends_sweep", thd_sweep_sends,
                                       self.clock.seconds() - longest, batch=SWEEP_BATCH)


class SendsSweeper(Sweeper[int]):
    """Deletes the sends no cap counts any more, every SWEEP_INTERVAL seconds (a user's
    own are deleted by its next send; these are the users who stopped sending). The Core
    gives it the store's job leases: one node of those sharing the store sweeps per period
    (the delete is idempotent, should two meet in one)."""

    name = "api-sends-sweeper"
    failed = "sweeping the API sends no cap counts failed"

    def __init__(self, caps: SendCaps, every: float = SWEEP_INTERVAL) -> None:
        super().__init__(caps.clock, every)
        self.caps = caps

    def sweep(self) -> Awaitable[int]:
        return self.caps.sweep()

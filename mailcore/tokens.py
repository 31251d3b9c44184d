"""Filtering tokens: a monthly tank and a permanent tank per user.

Filtering a message costs one token per recipient, taken from the monthly tank first, then
from the permanent one, all or nothing, in one transaction that holds the user's tank row
(`SELECT … FOR UPDATE` on PostgreSQL, SQLite's write lock): two nodes charging at once can
never take the same token twice or drive a tank below zero (the table also has CHECK
constraints). Purchases (`mailcore.invoices`) credit the permanent tank.

Month start (UTC, from the injected clock): the unused monthly tokens move to the permanent
tank and the monthly tank refills with the plan's allowance (`mailcore.plans`). A tank row
remembers the month it belongs to, so a rollover is applied once and only once whoever gets
there first: the first charge, purchase or listing in the new month (lazily), or the
periodic sweep of `TokenService` (every `[tokens] rollover_interval` seconds) on any node.
When the daemon missed whole months, each missed month counts as one unused allowance.

The pipeline calls `consume(user_id, n_recipients, key=queue_id)` for each filtered
message and gets "ok" or "empty"; on "empty" it defers the message with a 4xx (nothing is
lost, the message is retried later). With `[tokens] when_empty = "allow"` an empty tank
lets mail through instead: what is left is taken and the answer is "ok". The `key` makes a
charge idempotent: a message processed again (after a crash, or a deferral further down)
is not charged twice.

Consumption is logged per user and UTC day for `daily_average` (seed 004's
`/api/v1/token/daily-average`).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Table, delete, exists, func, insert, select, update
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.config import ConfigError
from mailcore.plans import Plans
from mailcore.store import Database
from mailcore.store.schema import token_charges, token_tanks, token_usage, users

log = Logger()

ConsumeResult = Literal["ok", "empty"]
OK: ConsumeResult = "ok"
EMPTY: ConsumeResult = "empty"

WHEN_EMPTY = ("defer", "allow")
DAILY_AVERAGE_DAYS = 30
ROLLOVER_BATCH = 500
MAX_KEY_LENGTH = 128


class TokenError(Exception):
    """A token operation was refused (unknown user, bad count)."""


@dataclass(frozen=True)
class Tanks:
    """A user's two tanks, as seed 004's `{monthly, perm, total}`."""

    monthly: int
    perm: int

    @property
    def total(self) -> int:
        return self.monthly + self.perm

    def as_dict(self) -> dict[str, int]:
        return {"monthly": self.monthly, "perm": self.perm, "total": self.total}


@dataclass(frozen=True)
class TokenSettings:
    """The TOML table `[tokens]`."""

    when_empty: str = "defer"
    rollover_interval: float = 600.0
    usage_retention_days: int = 400
    charge_retention_days: int = 14

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> TokenSettings:
        known = {"when_empty", "rollover_interval", "usage_retention_days",
                 "charge_retention_days"}
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"[tokens] unknown key {sorted(unknown)[0]!r}")
        when_empty = section.get("when_empty", cls.when_empty)
        if when_empty not in WHEN_EMPTY:
            raise ConfigError('[tokens] when_empty must be "defer" or "allow"')
        interval = section.get("rollover_interval", cls.rollover_interval)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError("[tokens] rollover_interval must be a positive number of seconds")
        days: dict[str, int] = {}
        for key in ("usage_retention_days", "charge_retention_days"):
            value = section.get(key, getattr(cls, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"[tokens] {key} must be a positive integer")
            days[key] = value
        if days["usage_retention_days"] < DAILY_AVERAGE_DAYS:
            raise ConfigError(
                f"[tokens] usage_retention_days must be at least {DAILY_AVERAGE_DAYS}"
            )
        return cls(when_empty=when_empty, rollover_interval=float(interval), **days)


# -- month arithmetic ------------------------------------------------------------------------


def month_index(moment: datetime.datetime) -> int:
    """The UTC month of `moment` as one integer (year * 12 + month - 1)."""
    utc = moment.astimezone(datetime.UTC)
    return utc.year * 12 + utc.month - 1


def rolled_over(
    monthly: int, perm: int, period: int, current: int, allowance: int
) -> tuple[int, int, int]:
    """(monthly, perm, period) after the month starts between `period` and `current`.

    The unused monthly tokens move to perm and the monthly tank refills; a month that
    passed without any rollover counts as a whole unused allowance.
    """
    if period >= current:
        return monthly, perm, period
    missed = current - period - 1
    return allowance, perm + monthly + missed * allowance, current


# -- blocking helpers (run inside Database transactions) -------------------------------------


def _insert_ignore_txn(conn: Connection, table: Table, values: Mapping[str, Any]) -> None:
    """Blocking: insert a row unless its primary key exists (no error, no wait on PG)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(table).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - the two supported backends are above
        keys = [c for c in table.primary_key.columns]
        found = conn.execute(
            select(*keys).where(*[c == values[c.name] for c in keys])
        ).first()
        if found is None:
            conn.execute(insert(table).values(**values))


def _plan_of_txn(conn: Connection, user_id: int) -> str:
    plan = conn.execute(select(users.c.plan).where(users.c.id == user_id)).scalar_one_or_none()
    if plan is None:
        raise TokenError(f"No such user (id {user_id}).")
    return str(plan)


def lock_tank_txn(
    conn: Connection, user_id: int, now: datetime.datetime, plans: Plans
) -> tuple[int, int]:
    """Blocking: open (if needed), lock and roll over the user's tank; (monthly, perm).

    The row stays locked until the transaction ends, so the caller may change it safely.
    """
    allowance = plans.monthly_tokens(_plan_of_txn(conn, user_id))
    current = month_index(now)
    _insert_ignore_txn(
        conn,
        token_tanks,
        {"user_id": user_id, "monthly": allowance, "perm": 0, "period": current,
         "updated_at": now},
    )
    row = conn.execute(
        select(token_tanks.c.monthly, token_tanks.c.perm, token_tanks.c.period)
        .where(token_tanks.c.user_id == user_id)
        .with_for_update()
    ).one()
    monthly, perm, period = rolled_over(
        int(row.monthly), int(row.perm), int(row.period), current, allowance
    )
    if period != row.period:
        _store_tank_txn(conn, user_id, monthly, perm, now, period=period)
    return monthly, perm


def _store_tank_txn(
    conn: Connection,
    user_id: int,
    monthly: int,
    perm: int,
    now: datetime.datetime,
    *,
    period: int | None = None,
) -> None:
    values: dict[str, Any] = {"monthly": monthly, "perm": perm, "updated_at": now}
    if period is not None:
        values["period"] = period
    conn.execute(update(token_tanks).where(token_tanks.c.user_id == user_id).values(**values))


def credit_perm_txn(
    conn: Connection, user_id: int, n: int, now: datetime.datetime, plans: Plans
) -> Tanks:
    """Blocking: add `n` tokens to the permanent tank (a purchase); the tanks after."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TokenError("The number of tokens must be a positive integer.")
    monthly, perm = lock_tank_txn(conn, user_id, now, plans)
    _store_tank_txn(conn, user_id, monthly, perm + n, now)
    return Tanks(monthly, perm + n)


def _log_usage_txn(conn: Connection, user_id: int, day: datetime.date, n: int) -> None:
    """Blocking: add `n` to the user's usage of `day` (the tank lock serialises writers)."""
    changed = conn.execute(
        update(token_usage)
        .where(token_usage.c.user_id == user_id, token_usage.c.day == day)
        .values(used=token_usage.c.used + n)
    ).rowcount
    if not changed:
        conn.execute(insert(token_usage).values(user_id=user_id, day=day, used=n))


def _consume_txn(
    conn: Connection,
    user_id: int,
    n: int,
    key: str | None,
    now: datetime.datetime,
    plans: Plans,
    allow_empty: bool,
) -> ConsumeResult:
    monthly, perm = lock_tank_txn(conn, user_id, now, plans)
    if key is not None:
        charged = conn.execute(
            select(token_charges.c.tokens).where(
                token_charges.c.user_id == user_id, token_charges.c.charge_key == key
            )
        ).first()
        if charged is not None:
            return OK
    taken = n
    if monthly + perm < n:
        if not allow_empty:
            return EMPTY
        taken = monthly + perm
    from_monthly = min(monthly, taken)
    from_perm = taken - from_monthly
    if taken:
        _store_tank_txn(conn, user_id, monthly - from_monthly, perm - from_perm, now)
        _log_usage_txn(conn, user_id, now.date(), taken)
    if key is not None:
        conn.execute(
            insert(token_charges).values(
                user_id=user_id, charge_key=key, tokens=taken, charged_at=now
            )
        )
    return OK


def _tanks_txn(
    conn: Connection, user_id: int, now: datetime.datetime, plans: Plans
) -> Tanks:
    """Blocking, read-only: the tanks as they are after any due rollover (not written)."""
    allowance = plans.monthly_tokens(_plan_of_txn(conn, user_id))
    row = conn.execute(
        select(token_tanks.c.monthly, token_tanks.c.perm, token_tanks.c.period).where(
            token_tanks.c.user_id == user_id
        )
    ).first()
    if row is None:
        return Tanks(allowance, 0)
    monthly, perm, _ = rolled_over(
        int(row.monthly), int(row.perm), int(row.period), month_index(now), allowance
    )
    return Tanks(monthly, perm)


def _open_missing_tanks_txn(conn: Connection, now: datetime.datetime, plans: Plans) -> int:
    """Blocking: a tank for every user that has none yet (this month's allowance)."""
    missing = conn.execute(
        select(users.c.id, users.c.plan).where(
            ~exists(select(token_tanks.c.user_id).where(token_tanks.c.user_id == users.c.id))
        )
    ).all()
    current = month_index(now)
    for user_id, plan in missing:
        _insert_ignore_txn(
            conn,
            token_tanks,
            {"user_id": user_id, "monthly": plans.monthly_tokens(plan), "perm": 0,
             "period": current, "updated_at": now},
        )
    return len(missing)


def _rollover_batch_txn(
    conn: Connection, now: datetime.datetime, plans: Plans, limit: int
) -> int:
    """Blocking: roll over up to `limit` tanks still in an earlier month; how many.

    On PostgreSQL a row rolled by another node meanwhile no longer matches once its lock
    is released (READ COMMITTED re-checks the condition), so it is never rolled twice.
    """
    current = month_index(now)
    rows = conn.execute(
        select(token_tanks.c.user_id, token_tanks.c.monthly, token_tanks.c.perm,
               token_tanks.c.period, users.c.plan)
        .join(users, users.c.id == token_tanks.c.user_id)
        .where(token_tanks.c.period < current)
        .order_by(token_tanks.c.user_id)
        .limit(limit)
        .with_for_update(of=token_tanks)
    ).all()
    for row in rows:
        monthly, perm, period = rolled_over(
            int(row.monthly), int(row.perm), int(row.period), current,
            plans.monthly_tokens(row.plan),
        )
        _store_tank_txn(conn, row.user_id, monthly, perm, now, period=period)
    return len(rows)


def _purge_txn(
    conn: Connection, now: datetime.datetime, usage_days: int, charge_days: int
) -> None:
    conn.execute(
        delete(token_usage).where(
            token_usage.c.day < now.date() - datetime.timedelta(days=usage_days)
        )
    )
    conn.execute(
        delete(token_charges).where(
            token_charges.c.charged_at < now - datetime.timedelta(days=charge_days)
        )
    )


def _usage_sum_txn(conn: Connection, user_id: int, since: datetime.date) -> int:
    total = conn.execute(
        select(func.coalesce(func.sum(token_usage.c.used), 0)).where(
            token_usage.c.user_id == user_id, token_usage.c.day >= since
        )
    ).scalar_one()
    return int(total)


# -- the service -----------------------------------------------------------------------------


class TokenService(Service):
    """Charges, credits and month rollovers of the token tanks.

    As a twisted Service it sweeps every `settings.rollover_interval` seconds on `clock`:
    opens a tank for users without one, rolls over tanks left in an earlier month, and
    purges old usage and charge records. Without starting it (CLI, tests) every method
    still works: rollovers then happen lazily.
    """

    name = "tokens"

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        plans: Plans,
        settings: TokenSettings | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.plans = plans
        self.settings = settings or TokenSettings()
        self._loop: LoopingCall | None = None

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- lifecycle ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.rollover_interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._sweep_logged())

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except Exception as e:
            log.failure("token tank sweep failed", Failure(e))

    async def sweep(self) -> int:
        """Open missing tanks, roll over stale ones, purge old logs; the number rolled."""
        now = self.now()
        await self.db.run("open_token_tanks", _open_missing_tanks_txn, now, self.plans)
        rolled = 0
        while True:
            batch = await self.db.run(
                "rollover_token_tanks", _rollover_batch_txn, now, self.plans, ROLLOVER_BATCH
            )
            rolled += batch
            if batch < ROLLOVER_BATCH:
                break
        await self.db.run(
            "purge_token_logs", _purge_txn, now,
            self.settings.usage_retention_days, self.settings.charge_retention_days,
        )
        if rolled:
            log.info("rolled over {count} token tanks", count=rolled)
        return rolled

    # -- charges and credits --------------------------------------------------------------

    async def consume(self, user_id: int, n: int, *, key: str | None = None) -> ConsumeResult:
        """Take `n` tokens (one per recipient) for a filtered message: "ok" or "empty".

        "empty" takes nothing: the caller defers the message. With a `key` (the queue id)
        a second call with the same key is "ok" and takes nothing more.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TokenError("The number of tokens must be a non-negative integer.")
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            raise TokenError(f"A charge key is 1 to {MAX_KEY_LENGTH} characters.")
        if n == 0:
            return OK
        return await self.db.run(
            "consume_tokens", _consume_txn, user_id, n, key, self.now(), self.plans,
            self.settings.when_empty == "allow",
        )

    async def credit(self, user_id: int, n: int) -> Tanks:
        """Add `n` tokens to the permanent tank (purchases go through InvoiceService)."""
        return await self.db.run(
            "credit_tokens", credit_perm_txn, user_id, n, self.now(), self.plans
        )

    def credit_txn(self, conn: Connection, user_id: int, n: int, now: datetime.datetime) -> Tanks:
        """Blocking: `credit` inside a caller's transaction (a purchase and its invoice)."""
        return credit_perm_txn(conn, user_id, n, now, self.plans)

    # -- reading --------------------------------------------------------------------------

    async def tanks(self, user_id: int) -> Tanks:
        """The user's tanks now (a due rollover is shown as done; nothing is written)."""
        return await self.db.read("token_tanks", _tanks_txn, user_id, self.now(), self.plans)

    async def daily_average(self, user_id: int, days: int = DAILY_AVERAGE_DAYS) -> int:
        """Tokens consumed per day over the last `days` UTC days (today included), floored."""
        since = self.now().date() - datetime.timedelta(days=days - 1)
        total = await self.db.read("token_usage", _usage_sum_txn, user_id, since)
        return total // days

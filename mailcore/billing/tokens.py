"""Filtering tokens: a monthly tank and a permanent tank per user.

Filtering a message costs one token per recipient, taken from the monthly tank first, then
from the permanent one, all or nothing, in one transaction that holds the user's tank row
(`SELECT … FOR UPDATE` on PostgreSQL, SQLite's write lock): two nodes charging at once can
never take the same token twice or drive a tank below zero (the table also has CHECK
constraints). Purchases (`mailcore.billing.invoices`) credit the permanent tank.

Month start (UTC, from the injected clock): the unused monthly tokens move to the permanent
tank and the monthly tank refills with the plan's allowance (`mailcore.billing.plans`). A tank row
remembers the month it belongs to, so a rollover is applied once and only once whoever gets
there first: the first charge, purchase or listing in the new month (lazily, on any node),
or the periodic sweep of `TokenService` (every `[tokens] rollover_interval` seconds, on one
node of those sharing the store per period), which also purges old usage and charge
records.
When the daemon missed whole months, each missed month counts as one unused allowance.

Filtering a message charges `n_recipients` tokens to the owner of each recipient domain,
keyed by queue id and domain, and gets "ok" or "empty"; on "empty" the message is deferred
with a 4xx (nothing is lost, the message is retried later). With `[tokens] when_empty =
"allow"` an empty tank lets mail through instead: what is left is taken and the answer is
"ok". The `key` makes a charge idempotent: a message processed again (after a crash, or a
deferral further down) is not charged twice.

In the daemon a relayed message is charged in the very group commit that stores it (the
spool's `Charger`, `Spool.accept`): the charge commits with the message or not at all, costs
no transaction, fsync or wait of its own, writes no keyed row (a `fresh` charge: the
recipients it paid for are stored `charged`, and that is its record), and its filtering, on
any node, finds it paid. An acknowledged message's charge is therefore never lost, and a
crash before the commit takes nothing (the client got a 451). The charges the filtering
still asks for (an empty tank at the accept, a message queued before the recipients
recorded their charge) go through a `ChargeBatcher`, keyed: the charges requested while
one charge transaction is in flight wait together and are applied in the next single
transaction (each charge still all or nothing on its own); in the daemon that is the
spool's next group commit (`Spool.charge`, in the same call as the accepted messages'
charges, so all tank rows of a transaction are locked in one order).
`TokenService.consume` is the same charge alone, in its own transaction (HTTP API, CLI).

Consumption is logged per user and UTC day for `daily_average` (seed 004's
`/api/v1/token/daily-average`).

```toml
[tokens]
when_empty = "defer"         # an owner with no tokens left: "defer" its mail (4.7.1) until
                             # tokens are bought or the month starts, or "allow" it, filtered
rollover_interval = 600.0    # seconds between sweeps that roll tanks over at a month's start
usage_retention_days = 400   # days of the per-day consumption log kept (30 at least: the
                             # daily average reads the last 30)
charge_retention_days = 14   # days a keyed charge is remembered, so that a message filtered
                             # again within them is not charged twice
```
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    tuple_,
    update,
)
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.billing.plans import Plans
from mailcore.config import ConfigError, is_positive_number, unknown_key
from mailcore.outages import log_failure
from mailcore.periodic import PeriodicService, delete_in_batches
from mailcore.store import Database, errands
from mailcore.store.schema import token_charges, token_tanks, token_usage, users

log = Logger()

ConsumeResult = Literal["ok", "empty"]
OK: ConsumeResult = "ok"
EMPTY: ConsumeResult = "empty"

WHEN_EMPTY = ("defer", "allow")
DAILY_AVERAGE_DAYS = 30
ROLLOVER_BATCH = 500
# Old usage and charge records deleted a transaction by the sweep's purge.
PURGE_BATCH = 1000
MAX_KEY_LENGTH = 128
# Charges applied in one transaction at most (the rest wait for the next one).
MAX_CHARGE_BATCH = 1000


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
            raise unknown_key("tokens", sorted(unknown)[0])
        when_empty = section.get("when_empty", cls.when_empty)
        if when_empty not in WHEN_EMPTY:
            raise ConfigError('[tokens] when_empty must be "defer" or "allow"')
        interval = section.get("rollover_interval", cls.rollover_interval)
        if not is_positive_number(interval):
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


# The statements of a charge, built once (a batch runs them for every owner it charges).
_LOCK_TANK = (
    select(token_tanks.c.monthly, token_tanks.c.perm, token_tanks.c.period, users.c.plan)
    .join(users, users.c.id == token_tanks.c.user_id)
    .where(token_tanks.c.user_id == bindparam("uid"))
    .with_for_update(of=token_tanks)
)
_SET_TANK = (
    update(token_tanks)
    .where(token_tanks.c.user_id == bindparam("uid"))
    .values(monthly=bindparam("new_monthly"), perm=bindparam("new_perm"),
            updated_at=bindparam("now"))
)
_ADD_USAGE = (
    update(token_usage)
    .where(token_usage.c.user_id == bindparam("uid"), token_usage.c.day == bindparam("d"))
    .values(used=token_usage.c.used + bindparam("n"))
)
_CHARGED_KEYS = select(token_charges.c.charge_key).where(
    token_charges.c.user_id == bindparam("uid"),
    token_charges.c.charge_key.in_(bindparam("keys", expanding=True)),
)
_INSERT_CHARGES = insert(token_charges)


def lock_tank_txn(
    conn: Connection, user_id: int, now: datetime.datetime, plans: Plans
) -> tuple[int, int]:
    """Blocking: open (if needed), lock and roll over the user's tank; (monthly, perm).

    The row stays locked until the transaction ends, so the caller may change it safely.
    """
    current = month_index(now)
    row = conn.execute(_LOCK_TANK, {"uid": user_id}).first()
    if row is None:
        # The first charge, credit or sweep of this user opens the tank (on PostgreSQL a
        # concurrent opener's insert is waited for, then this one does nothing).
        _insert_ignore_txn(
            conn,
            token_tanks,
            {"user_id": user_id, "monthly": plans.monthly_tokens(_plan_of_txn(conn, user_id)),
             "perm": 0, "period": current, "updated_at": now},
        )
        row = conn.execute(_LOCK_TANK, {"uid": user_id}).one()
    monthly, perm, period = rolled_over(
        int(row.monthly), int(row.perm), int(row.period), current,
        plans.monthly_tokens(row.plan),
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
    if period is None:
        conn.execute(_SET_TANK, {"uid": user_id, "new_monthly": monthly, "new_perm": perm,
                                 "now": now})
        return
    conn.execute(update(token_tanks).where(token_tanks.c.user_id == user_id).values(
        monthly=monthly, perm=perm, updated_at=now, period=period))


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
    changed = conn.execute(_ADD_USAGE, {"uid": user_id, "d": day, "n": n}).rowcount
    if not changed:
        conn.execute(insert(token_usage).values(user_id=user_id, day=day, used=n))


@dataclass(frozen=True)
class Charge:
    """One charge: `n` tokens from `user_id`'s tanks, idempotent under `key` when given.

    `fresh`: the key cannot have been charged before (a message being stored now): the
    store is not asked whether it was, and no keyed row is written; the caller records the
    charge in the same transaction (the message's recipients are stored `charged`)."""

    user_id: int
    n: int
    key: str | None = None
    fresh: bool = False


def check_charge(n: int, key: str | None) -> None:
    """Raise TokenError for a count or key no charge may have."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TokenError("The number of tokens must be a non-negative integer.")
    if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
        raise TokenError(f"A charge key is 1 to {MAX_KEY_LENGTH} characters.")


class _CoreStatements:
    """The statements of a batch of charges, as SQLAlchemy Core (any backend)."""

    def __init__(self, conn: Connection, now: datetime.datetime, plans: Plans) -> None:
        self.conn = conn
        self.now = now
        self.plans = plans

    def lock(self, user_id: int) -> tuple[int, int]:
        return lock_tank_txn(self.conn, user_id, self.now, self.plans)

    def charged_keys(self, user_id: int, keys: Sequence[str]) -> set[str]:
        return set(self.conn.execute(_CHARGED_KEYS, {"uid": user_id, "keys": keys}).scalars())

    def spend(self, user_id: int, monthly: int, perm: int, used: int,
              rows: list[tuple[str, int]]) -> None:
        """Store the tank, log `used` for today, record the keyed charges `rows`."""
        conn, now = self.conn, self.now
        if used:
            _store_tank_txn(conn, user_id, monthly, perm, now)
            _log_usage_txn(conn, user_id, now.date(), used)
        if rows:
            conn.execute(_INSERT_CHARGES, [
                {"user_id": user_id, "charge_key": key, "tokens": tokens, "charged_at": now}
                for key, tokens in rows
            ])


# Straight through the sqlite3 driver: the Core statements cost several times their SQL
# (a group commit charges its messages with them: ~45 us a message at 8 a group).
_SQLITE_LOCK_TANK = (
    "SELECT t.monthly, t.perm, t.period FROM token_tanks AS t JOIN users AS u "
    "ON u.id = t.user_id WHERE t.user_id = ?"
)
_SQLITE_CHARGED_KEYS = (
    "SELECT charge_key FROM token_charges WHERE user_id = ? AND charge_key IN ({marks})"
)
_SQLITE_SET_TANK = "UPDATE token_tanks SET monthly = ?, perm = ?, updated_at = ? WHERE user_id = ?"
_SQLITE_ADD_USAGE = "UPDATE token_usage SET used = used + ? WHERE user_id = ? AND day = ?"
_SQLITE_INSERT_USAGE = "INSERT INTO token_usage (user_id, day, used) VALUES (?, ?, ?)"
_SQLITE_INSERT_CHARGES = (
    "INSERT INTO token_charges (user_id, charge_key, tokens, charged_at) VALUES (?, ?, ?, ?)"
)
_SQLITE_MAX_KEYS = 900  # under the 999 bound parameters any SQLite build takes


class _SQLiteStatements(_CoreStatements):
    """The same statements through the sqlite3 driver, on the transaction's connection;
    values stored exactly as SQLAlchemy's types store them. A tank to open or roll over
    takes the Core path (once a month)."""

    def __init__(self, conn: Connection, now: datetime.datetime, plans: Plans) -> None:
        super().__init__(conn, now, plans)
        self.cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        stamp = token_tanks.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(
            conn.dialect)
        day = token_usage.c.day.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
        self.stamp = stamp(now) if stamp else now
        self.day = day(now.date()) if day else now.date()
        self.period = month_index(now)

    def lock(self, user_id: int) -> tuple[int, int]:
        row = self.cursor.execute(_SQLITE_LOCK_TANK, (user_id,)).fetchone()
        if row is None or row[2] != self.period:
            return super().lock(user_id)
        return int(row[0]), int(row[1])

    def charged_keys(self, user_id: int, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(keys), _SQLITE_MAX_KEYS):
            chunk = keys[i:i + _SQLITE_MAX_KEYS]
            sql = _SQLITE_CHARGED_KEYS.format(marks=", ".join("?" * len(chunk)))
            found.update(k for (k,) in self.cursor.execute(sql, (user_id, *chunk)))
        return found

    def spend(self, user_id: int, monthly: int, perm: int, used: int,
              rows: list[tuple[str, int]]) -> None:
        cursor = self.cursor
        if used:
            cursor.execute(_SQLITE_SET_TANK, (monthly, perm, self.stamp, user_id))
            if not cursor.execute(_SQLITE_ADD_USAGE, (used, user_id, self.day)).rowcount:
                cursor.execute(_SQLITE_INSERT_USAGE, (user_id, self.day, used))
        if rows:
            stamp = self.stamp
            cursor.executemany(_SQLITE_INSERT_CHARGES,
                               [(user_id, key, tokens, stamp) for key, tokens in rows])


def consume_batch_txn(
    conn: Connection,
    charges: Sequence[Charge],
    now: datetime.datetime,
    plans: Plans,
    allow_empty: bool,
) -> list[ConsumeResult | TokenError]:
    """Blocking: apply `charges` in this one transaction; one answer per charge, in order.

    Each charge is all or nothing on its own ("empty" takes nothing, unless `allow_empty`:
    then what is left is taken and the answer is "ok"); a key already charged (before, or
    earlier in this batch) is "ok" and takes nothing more. Tank rows are locked in user id
    order, so two nodes charging the same users can never deadlock. An unknown user gets a
    TokenError as its answer and the other charges go on.
    """
    results: list[ConsumeResult | TokenError] = [OK] * len(charges)
    by_user: dict[int, list[int]] = {}
    for i, charge in enumerate(charges):
        if charge.n:
            by_user.setdefault(charge.user_id, []).append(i)
    if not by_user:
        return results
    statements = (_SQLiteStatements if conn.dialect.name == "sqlite" else _CoreStatements)(
        conn, now, plans)
    for user_id in sorted(by_user):
        indexes = by_user[user_id]
        try:
            monthly, perm = statements.lock(user_id)
        except TokenError as e:
            for i in indexes:
                results[i] = e
            continue
        keys = {c.key for c in (charges[i] for i in indexes) if c.key is not None and not c.fresh}
        charged = statements.charged_keys(user_id, sorted(keys)) if keys else set()
        used = 0
        rows: list[tuple[str, int]] = []
        for i in indexes:
            charge = charges[i]
            if charge.key is not None and charge.key in charged:
                continue
            taken = charge.n
            if monthly + perm < taken:
                if not allow_empty:
                    results[i] = EMPTY
                    continue
                taken = monthly + perm
            from_monthly = min(monthly, taken)
            monthly -= from_monthly
            perm -= taken - from_monthly
            used += taken
            if charge.key is not None:
                charged.add(charge.key)
                if not charge.fresh:
                    rows.append((charge.key, taken))
        statements.spend(user_id, monthly, perm, used, rows)
    return results


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


def _purge_before_txn(conn: Connection, table: Table, key: tuple[str, ...], when: str,
                      before: datetime.date | datetime.datetime, batch: int) -> int:
    """Blocking: delete up to `batch` rows of `table` (a purge of token_usage, by its
    ix_token_usage_day, or of token_charges, by ix_token_charges_charged_at) whose `when`
    is before `before`, naming them by their primary `key`; how many."""
    columns = [table.c[name] for name in key]
    rows = select(*columns).where(table.c[when] < before).limit(batch)
    return int(conn.execute(delete(table).where(tuple_(*columns).in_(rows))).rowcount or 0)


def _usage_sum_txn(conn: Connection, user_id: int, since: datetime.date) -> int:
    total = conn.execute(
        select(func.coalesce(func.sum(token_usage.c.used), 0)).where(
            token_usage.c.user_id == user_id, token_usage.c.day >= since
        )
    ).scalar_one()
    return int(total)


# -- the service -----------------------------------------------------------------------------


class TokenService(PeriodicService):
    """Charges, credits and month rollovers of the token tanks.

    As a twisted Service it sweeps every `settings.rollover_interval` seconds on `clock`:
    opens a tank for users without one, rolls over tanks left in an earlier month, and
    purges old usage and charge records (PURGE_BATCH rows a transaction). Without starting
    it (CLI, tests) every method still works: rollovers then happen lazily. The Core gives
    it the store's job leases: one node of those sharing the store sweeps per period (each
    node's sweep would lock and delete the same rows at the same time). The others need
    none to charge: a charge, credit or listing on any node rolls its tank over itself if
    no sweep did yet. Each step is idempotent all the same (a tank is opened or rolled over
    once, under its row lock; the purges are DELETEs), should two nodes meet in one (a node
    whose lease lapsed mid-sweep).
    """

    name = "token-sweeper"

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

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- lifecycle ------------------------------------------------------------------------

    def interval(self) -> float:
        return self.settings.rollover_interval

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._sweep_logged())

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except Exception as e:
            log_failure(log, "token tank sweep failed", Failure(e))

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
        await self.purge(now)
        if rolled:
            log.info("rolled over {count} token tanks", count=rolled)
        return rolled

    async def purge(self, now: datetime.datetime) -> tuple[int, int]:
        """Delete the usage and charge records past their retention at `now`, PURGE_BATCH
        rows a transaction; how many of each."""
        usage = await delete_in_batches(
            self.db, "purge_token_usage", _purge_before_txn, token_usage, ("user_id", "day"),
            "day", now.date() - datetime.timedelta(days=self.settings.usage_retention_days),
            batch=PURGE_BATCH)
        charges = await delete_in_batches(
            self.db, "purge_token_charges", _purge_before_txn, token_charges,
            ("user_id", "charge_key"), "charged_at",
            now - datetime.timedelta(days=self.settings.charge_retention_days),
            batch=PURGE_BATCH)
        return usage, charges

    # -- charges and credits --------------------------------------------------------------

    async def consume(self, user_id: int, n: int, *, key: str | None = None) -> ConsumeResult:
        """Take `n` tokens (one per recipient) for a filtered message: "ok" or "empty".

        "empty" takes nothing: the caller defers the message. With a `key` (the queue id)
        a second call with the same key is "ok" and takes nothing more.
        """
        check_charge(n, key)
        if n == 0:
            return OK
        [result] = await self.db.run(
            "consume_tokens", consume_batch_txn, [Charge(user_id, n, key)], self.now(),
            self.plans, self.allow_empty,
        )
        if isinstance(result, TokenError):
            raise result
        return result

    @property
    def allow_empty(self) -> bool:
        """Whether an empty tank lets mail through (`[tokens] when_empty = "allow"`)."""
        return self.settings.when_empty == "allow"

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


# -- batched charges -------------------------------------------------------------------------

# Applies a batch of charges in one write transaction, one answer each (`consume_batch_txn`):
# the store directly, or in the daemon the spool's next group commit (`Spool.charge`).
Lane = Callable[[list[Charge]], "defer.Deferred[list[ConsumeResult | TokenError]]"]


class ChargeBatcher:
    """Charges for the pipeline, many per transaction.

    The charges requested while a charge transaction is in flight wait together and go
    into the next single transaction (at most MAX_CHARGE_BATCH), as the spool groups its
    commits: under load one commit covers the charges of many messages, and with no load a
    charge is applied at once. `lane` applies a batch: by default a store transaction of its
    own; in the daemon the spool's next group commit (`Spool.charge`, so it never meets a
    group commit on SQLite's lock nor costs a commit of its own).

    In the daemon most charges are not requested at all: the spool charges a message in the
    very group commit that stores it (`thd_charge`, through the spool's `Charger`, fresh
    charges with no keyed row) and stores the recipients it paid for `charged`, so their
    filtering asks for nothing. A charge that was not made so (the tank was empty at the
    accept, the message was stored before recipients recorded it) is requested here, and
    its idempotent key makes it exactly once.
    Answers and idempotence are those of `TokenService.consume`.
    """

    def __init__(
        self, tokens: TokenService, lane: Lane | None = None,
        max_batch: int = MAX_CHARGE_BATCH,
    ) -> None:
        self.tokens = tokens
        self.lane: Lane = lane or self._own_transaction
        self.max_batch = max_batch
        self._waiting: list[tuple[Charge, defer.Deferred[ConsumeResult]]] = []
        self._busy = False
        # The batch handed to the lane and the lane's Deferred, while it is in flight.
        self._flight: tuple[list[tuple[Charge, defer.Deferred[ConsumeResult]]],
                            defer.Deferred[list[ConsumeResult | TokenError]]] | None = None
        self.transactions = 0  # charge transactions run (for tests and the benchmark)

    def _own_transaction(
        self, charges: list[Charge]
    ) -> defer.Deferred[list[ConsumeResult | TokenError]]:
        tokens = self.tokens
        return tokens.db.run("consume_tokens", consume_batch_txn, charges, tokens.now(),
                             tokens.plans, tokens.allow_empty)

    # -- charges made in the transaction that stores the message --------------------------

    def thd_charge(
        self, conn: Connection, charges: list[Charge], now: float
    ) -> list[ConsumeResult | TokenError]:
        """Blocking: apply `charges` in the caller's transaction (`consume_batch_txn`)."""
        tokens = self.tokens
        return consume_batch_txn(conn, charges, datetime.datetime.fromtimestamp(now, datetime.UTC),
                                 tokens.plans, tokens.allow_empty)

    # -- requests ---------------------------------------------------------------------------

    async def consume(self, user_id: int, n: int, *, key: str | None = None) -> ConsumeResult:
        """One charge, in the next batch: "ok" or "empty" (see `TokenService.consume`)."""
        [result] = await self.consume_all([Charge(user_id, n, key)])
        return result

    async def consume_all(self, charges: Sequence[Charge]) -> list[ConsumeResult]:
        """Several charges (one message's owners), all in the same batch; one answer each.

        Raises TokenError for a bad count or key (before anything is charged) or an unknown
        user, and the store's error when the transaction failed (nothing was charged).
        A caller that gives up (cancels) takes back its charges not yet handed to the lane;
        a batch the lane has is withdrawn once all its callers gave up, unless its
        transaction took it already (then it is applied, unheard: see `_give_up`).
        """
        for charge in charges:
            check_charge(charge.n, charge.key)
        waits: list[defer.Deferred[ConsumeResult]] = []
        for charge in charges:
            if charge.n == 0:
                waits.append(defer.succeed(OK))
                continue
            d: defer.Deferred[ConsumeResult] = defer.Deferred(self._give_up)
            self._waiting.append((charge, d))
            waits.append(d)
        self._kick()
        if len(waits) == 1:  # one owner, the usual message: no DeferredList around it
            return [await waits[0]]
        try:
            return list(await defer.gatherResults(waits, consumeErrors=True))
        except defer.FirstError as e:
            e.subFailure.raiseException()
            raise  # pragma: no cover - raiseException always raises

    def _give_up(self, d: defer.Deferred[ConsumeResult]) -> None:
        """A caller gave up waiting for a charge (the filtering of its message goes no
        further: the message stays queued, and its keyed charge is asked for again when it
        is filtered again). One still waiting for a batch is taken out and never applied;
        the lane's batch is withdrawn (`Spool.charge`: unless a group took it) once every
        caller in it gave up. One applied all the same is charged once: by its key, the
        next filtering of the message takes nothing more."""
        for i, (_c, waiting) in enumerate(self._waiting):
            if waiting is d:
                del self._waiting[i]
                return
        if self._flight is not None:
            batch, lane = self._flight
            if all(w is d or w.called for _c, w in batch):
                lane.cancel()

    def _kick(self) -> None:
        if self._busy or not self._waiting:
            return
        self._busy = True
        batch = self._waiting[:self.max_batch]
        del self._waiting[:self.max_batch]
        # The batch (and each one `_apply` kicks after it) serves every caller in it: it
        # starts outside any errand, or the errand of the caller whose charge happened to
        # start it would withdraw its transaction, and refuse the next ones, once given up.
        errands.outside(defer.Deferred.fromCoroutine, self._apply(batch))

    async def _apply(self, batch: list[tuple[Charge, defer.Deferred[ConsumeResult]]]) -> None:
        try:
            lane = self.lane([c for c, _d in batch])
            self._flight = (batch, lane)
            try:
                results = await lane
            except Exception as e:
                for _c, d in batch:
                    if not d.called:  # (a caller that gave up has its CancelledError)
                        d.errback(Failure(e))
                return
            finally:
                self._flight = None
            self.transactions += 1
            for (_c, d), result in zip(batch, results, strict=True):
                if d.called:
                    continue
                if isinstance(result, TokenError):
                    d.errback(Failure(result))
                else:
                    d.callback(result)
        finally:
            self._busy = False
            self._kick()

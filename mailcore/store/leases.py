"""Leases on named background jobs: N nodes on one store, each such job on one node.

A job that must not run on two nodes at once is claimed by name in `job_leases`. `claim`
succeeds when no node holds the job, when this node already holds it (a renewal), or when
the holder's lease lapsed (it stopped or died); it holds the job until `now + hold`.

A periodic job (a quarantine digest run, a domain verification pass) is claimed with
`claim_periodic` at each run: it succeeds only once the previous run's claim, by whichever
node, is a period old (less `PERIOD_SLACK` of it, for timers that fire a little late). So
however many nodes tick, and whenever they restart, the job runs at most once per period,
and while any node runs its timer, at least about once per period.
Per-row work (queue recipients, webhook deliveries, account syncs) is leased on its own rows
instead; see `mailcore.queue.model`, `mailcore.webhooks.store` and `mailcore.fetch.accounts`.

The claim is one conditional UPDATE (then an INSERT that does nothing on conflict, for a job
never claimed): on PostgreSQL a concurrent claimer waits for the row lock and re-checks the
condition against the committed row, on SQLite writers are serialised (BEGIN IMMEDIATE), so
two nodes never both win the same lease.
"""

from __future__ import annotations

from sqlalchemy import Connection, Insert, and_, case, insert, or_, update

from mailcore.store.database import Database
from mailcore.store.schema import job_leases

# A periodic job's claim lasts its period less this fraction of it: a node whose timer
# fires that much late still finds the job free for its next run.
PERIOD_SLACK = 0.02

_c = job_leases.c


def thd_claim_job(
    conn: Connection, name: str, owner: str, now: float, until: float, *, renew: bool = True
) -> bool:
    """Blocking: take job `name` for `owner` until `until` if its lease lapsed at `now`
    (or, with `renew`, if `owner` holds it already); whether `owner` holds it now."""
    free = or_(_c.owner == owner, _c.until <= now) if renew else _c.until <= now
    # A renewal never shortens the lease: two claims of one node committing out of order
    # (the older `until` last) would otherwise let it lapse while the job runs.
    longest = case((and_(_c.owner == owner, _c.until > until), _c.until), else_=until)
    taken = conn.execute(
        update(job_leases).where(_c.name == name, free).values(owner=owner, until=longest)
    )
    if taken.rowcount:
        return True
    row = {"name": name, "owner": owner, "until": until}
    dialect = conn.dialect.name
    stmt: Insert
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(job_leases).values(**row).on_conflict_do_nothing()
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(job_leases).values(**row).on_conflict_do_nothing()
    else:  # pragma: no cover - the two supported backends are above
        stmt = insert(job_leases).values(**row)
    # RETURNING says whether the row went in (a driver's rowcount may not, after a conflict).
    return conn.execute(stmt.returning(_c.name)).first() is not None


def thd_claim_periodic(conn: Connection, name: str, owner: str, now: float,
                       period: float) -> bool:
    """Blocking: `JobLeases.claim_periodic` in the caller's transaction (to record, in the
    same commit, what the run is about to do)."""
    return thd_claim_job(conn, name, owner, now, now + period * (1 - PERIOD_SLACK),
                         renew=False)


def thd_release_job(conn: Connection, name: str, owner: str, now: float) -> bool:
    """Blocking: give job `name` up at `now` if `owner` holds it (any node may claim it
    next); whether it did."""
    result = conn.execute(
        update(job_leases).where(_c.name == name, _c.owner == owner).values(until=now)
    )
    return bool(result.rowcount)


class JobLeases:
    """This node's claims on named jobs in the store (`node_id` is `[queue] node_id`)."""

    def __init__(self, db: Database, node_id: str) -> None:
        self.db = db
        self.node_id = node_id

    async def claim(self, name: str, now: float, hold: float) -> bool:
        """Whether this node may run job `name` now (it then holds it for `hold` seconds,
        and may claim it again meanwhile to hold it longer)."""
        return bool(await self.db.run("claim_job_lease", thd_claim_job, name, self.node_id,
                                      now, now + hold))

    async def claim_periodic(self, name: str, now: float, period: float) -> bool:
        """Whether this node runs job `name`, run every `period` seconds, now: no node ran
        it within the last period (less the slack)."""
        return bool(await self.db.run(
            "claim_periodic_job", thd_claim_periodic, name, self.node_id, now, period))

    async def release(self, name: str, now: float) -> bool:
        """Give job `name` up at once (another node may take it at its next run)."""
        return bool(await self.db.run("release_job_lease", thd_release_job, name,
                                      self.node_id, now))

"""Blocking reads and writes of `recipient_verdicts`: the next hops' answers about their
recipients (see mailcore.store.schema.verdicts), for mailcore.gateway.callout."""

from __future__ import annotations

from sqlalchemy import Connection, delete, select

from mailcore.store.schema import recipient_verdicts

_v = recipient_verdicts.c


def thd_read_verdict(conn: Connection, address: str, domain_id: int, hop: str,
                     now: float) -> tuple[bool, str] | None:
    """Whether `address` (its domain lower-cased) was deliverable and the reply that said
    so, while that answer holds at `now` and was given by the route the address has now
    (domain `domain_id`, next hop `hop`); None when there is none."""
    row = conn.execute(
        select(_v.deliverable, _v.reply).where(_v.address == address,
                                                _v.domain_id == domain_id, _v.hop == hop,
                                                _v.expires_at > now)
    ).first()
    return None if row is None else (bool(row.deliverable), row.reply)


def thd_write_verdict(conn: Connection, address: str, domain_id: int, hop: str,
                      deliverable: bool, reply: str, expires_at: float) -> None:
    """Keep the answer of next hop `hop` of domain `domain_id` about `address` (its domain
    lower-cased) until `expires_at`, in place of any older one (of another route, or
    another node's written at the same moment: no error)."""
    changed = {"domain_id": domain_id, "hop": hop, "deliverable": deliverable,
               "reply": reply, "expires_at": expires_at}
    values = {"address": address, **changed}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(recipient_verdicts).values(**values)
                     .on_conflict_do_update(index_elements=["address"], set_=changed))
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(recipient_verdicts).values(**values)
                     .on_conflict_do_update(index_elements=["address"], set_=changed))


def thd_sweep_verdicts(conn: Connection, now: float, batch: int) -> int:
    """Delete up to `batch` of the answers expired by `now`; how many."""
    addresses = (select(_v.address).where(_v.expires_at <= now).limit(batch)
                 .scalar_subquery())
    return int(conn.execute(
        delete(recipient_verdicts).where(_v.address.in_(addresses))).rowcount or 0)

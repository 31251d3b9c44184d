"""The lock a transaction takes on a user's row before it counts that user's objects against
a cap (webhooks, fetch accounts, Dropmyemail jobs, safedrop bundles). Blocking (`thd_`)."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select

from mailcore.store.schema import users

# FOR NO KEY UPDATE: two such transactions for one user take turns (PostgreSQL's READ
# COMMITTED would let each count the same rows and both write; SQLite serialises writers
# anyway and ignores the clause), while the inserts of rows naming the user (their FOR KEY
# SHARE: a sync's message batches, api_sends) go on; FOR UPDATE held them up until the
# counting transaction committed.
_LOCK = select(users.c.id).where(users.c.id == bindparam("user")).with_for_update(
    key_share=True)


def thd_lock_owner(conn: Connection, user_id: int) -> None:
    """Lock `user_id`'s row until the transaction ends (module docstring)."""
    conn.execute(_LOCK, {"user": user_id})

"""How much mail each mailbox holds: `mailboxes.mail_count`, kept by its writers.

The listing's `count` (every mail the caller may read) is the sum of the counts of the
mailboxes it may read: a few rows, where counting the mail rows themselves walks an index
of every mail (about 10 ms per 100,000 on SQLite, on every page).
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, update

from mailcore.store.schema import mailboxes

_COUNT = update(mailboxes).where(mailboxes.c.id == bindparam("box")) \
    .values(mail_count=mailboxes.c.mail_count + bindparam("delta"))


def thd_count_mail(conn: Connection, mailbox_id: int, delta: int) -> None:
    """Blocking: `mailboxes.mail_count` of a mailbox changes by `delta`, in the transaction
    that adds, removes or moves its mail (every writer of mailapi_mail rows calls it)."""
    conn.execute(_COUNT, {"box": mailbox_id, "delta": delta})

"""The SQL of safedrop: every function runs inside one transaction on the store's pool
(`Database.run`/`read`) and says so by its `_txn` suffix."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mailcore.safedrop.model import (
    MAX_VALID_FOR,
    Bundle,
    DropError,
    DropFile,
    DropNotFound,
    DropRecipient,
    DropSent,
    TooLarge,
    bundle_full,
    check_expiry,
)
from mailcore.store.owners import thd_lock_owner
from mailcore.store.schema.identity import users
from mailcore.store.schema.safedrop import drop_bundles, drop_files, drop_recipients

T = TypeVar("T")


def _utc(value: datetime.datetime | None) -> datetime.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def bundle_of(row: Any) -> Bundle:
    return Bundle(
        id=row.id, owner_id=row.owner_id, subject=row.subject, message=row.message,
        has_secure_message=bool(row.has_secure_message),
        has_password=row.password_hash is not None,
        expiry_date=_utc(row.expiry_date), email_receipt_when=row.email_receipt_when,
        read_remove=bool(row.read_remove), allow_comments=bool(row.allow_comments),
        require_token_auth=bool(row.require_token_auth),
        created_at=_utc(row.created_at) or datetime.datetime.min,
        sent_at=_utc(row.sent_at), removed_at=_utc(row.removed_at),
    )


def recipient_of(row: Any) -> DropRecipient:
    return DropRecipient(
        id=row.id, bundle_id=row.bundle_id, email=row.email, telephone=row.telephone,
        valid_for=row.valid_for, expires_at=_utc(row.expires_at), done_at=_utc(row.done_at),
    )


def file_of(row: Any) -> DropFile:
    return DropFile(
        id=row.id, bundle_id=row.bundle_id, name=row.name, content_type=row.content_type,
        size=row.size, sha256=row.sha256, created_at=_utc(row.created_at) or datetime.datetime.min,
    )


def _check_flags(values: Mapping[str, Any]) -> None:
    if values["read_remove"] and values["allow_comments"]:
        raise DropError(
            "allow_comments",
            "read_remove and allow_comments cannot both be enabled.",
        )


def _owned_row_txn(conn: Connection, owner_id: int, bundle_id: int, *,
                   lock: bool = False) -> Any:
    """The owner's bundle (DropNotFound); `lock`: locked until the end of the transaction."""
    query = sa.select(drop_bundles).where(
        drop_bundles.c.id == bundle_id, drop_bundles.c.owner_id == owner_id
    )
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise DropNotFound()
    return row


def _changeable_row_txn(conn: Connection, owner_id: int, bundle_id: int) -> Any:
    """The owner's bundle, not yet sent (DropNotFound, DropSent), locked until the end of the
    transaction (PostgreSQL; SQLite's writers take turns): a change and a send of the same
    bundle take turns, so no change lands on a bundle once it has been sent."""
    row = _owned_row_txn(conn, owner_id, bundle_id, lock=True)
    if row.sent_at is not None:
        raise DropSent()
    return row


def unsent_bundles_txn(conn: Connection, owner_id: int) -> int:
    """How many bundles of `owner_id` are not yet sent (and not removed), read through
    ix_drop_bundles_owner_unsent: however many the owner sent, they are not read."""
    return int(conn.execute(sa.select(sa.func.count()).select_from(drop_bundles).where(
        drop_bundles.c.owner_id == owner_id, drop_bundles.c.sent_at.is_(None),
        drop_bundles.c.removed_at.is_(None))).scalar_one())


def create_bundle_txn(conn: Connection, owner_id: int, values: Mapping[str, Any],
                      max_bundles: int) -> Bundle:
    """A new bundle of `owner_id`; DropError (naming no field) when the owner already has
    `max_bundles` bundles not yet sent (0: no limit). An empty one costs no bytes of
    `max_user_size` and the API has no DELETE, but an unsent bundle is deleted by the sweep
    `unsent_max_age` after it was made. A sent one does not count: the `[limits]` send caps
    bound how many there are, and one sent with no expiry that nobody downloads is never
    removed, so counting it would lock its owner out for good."""
    _check_flags(values)
    if max_bundles:
        thd_lock_owner(conn, owner_id)  # creates for one user count one after another
        if unsent_bundles_txn(conn, owner_id) >= max_bundles:
            raise DropError(None, f"A user may have at most {max_bundles} drops not yet "
                            "sent; send one, or wait until an unsent one is deleted, "
                            "unsent_max_age after it was made.")
    new_id = conn.execute(
        sa.insert(drop_bundles).values(owner_id=owner_id, **values)
    ).inserted_primary_key[0]  # type: ignore[index]
    return bundle_of(_owned_row_txn(conn, owner_id, new_id))


def update_bundle_txn(
    conn: Connection, owner_id: int, bundle_id: int, changes: Mapping[str, Any]
) -> Bundle:
    row = _changeable_row_txn(conn, owner_id, bundle_id)
    merged = {"read_remove": row.read_remove, "allow_comments": row.allow_comments, **changes}
    _check_flags(merged)
    if changes:
        conn.execute(
            sa.update(drop_bundles).where(drop_bundles.c.id == bundle_id).values(**changes)
        )
    return bundle_of(_owned_row_txn(conn, owner_id, bundle_id))


def get_bundle_txn(conn: Connection, owner_id: int, bundle_id: int) -> Bundle:
    return bundle_of(_owned_row_txn(conn, owner_id, bundle_id))


def list_bundles_txn(conn: Connection, owner_id: int, after: int, limit: int) -> list[Bundle]:
    """The owner's next `limit` bundles, by id, after bundle `after` (0: from the first)."""
    rows = conn.execute(
        sa.select(drop_bundles)
        .where(drop_bundles.c.owner_id == owner_id, drop_bundles.c.id > after)
        .order_by(drop_bundles.c.id)
        .limit(limit)
    )
    return [bundle_of(r) for r in rows]


DUPLICATE = "This address is a recipient of the drop already."


def _refuse_duplicate_txn(conn: Connection, bundle_id: int, email: str,
                          recipient_id: int | None = None) -> None:
    """DropError("email") when another recipient of the bundle (not `recipient_id`) has
    `email`, in any case: a send mails each recipient its own link, so the address would get
    two mails of the drop and two links. The caller holds the bundle's row lock, so two
    adds of one address take turns and the second sees the first."""
    r = drop_recipients.c
    query = sa.select(r.id).where(r.bundle_id == bundle_id,
                                  sa.func.lower(r.email) == email.lower())
    if recipient_id is not None:
        query = query.where(r.id != recipient_id)
    if conn.execute(query.limit(1)).first() is not None:
        raise DropError("email", DUPLICATE)


def add_recipient_txn(
    conn: Connection, owner_id: int, bundle_id: int, values: Mapping[str, Any],
    max_recipients: int,
) -> DropRecipient:
    _changeable_row_txn(conn, owner_id, bundle_id)
    held = conn.execute(sa.select(sa.func.count()).select_from(drop_recipients).where(
        drop_recipients.c.bundle_id == bundle_id)).scalar_one()
    if held >= max_recipients:
        raise DropError("email", f"A drop may have at most {max_recipients} recipients.")
    _refuse_duplicate_txn(conn, bundle_id, values["email"])
    new_id = conn.execute(
        sa.insert(drop_recipients).values(bundle_id=bundle_id, **values)
    ).inserted_primary_key[0]  # type: ignore[index]
    return get_recipient_txn(conn, owner_id, bundle_id, new_id)


def update_recipient_txn(
    conn: Connection, owner_id: int, bundle_id: int, recipient_id: int,
    changes: Mapping[str, Any],
) -> DropRecipient:
    _changeable_row_txn(conn, owner_id, bundle_id)
    get_recipient_txn(conn, owner_id, bundle_id, recipient_id)
    if "email" in changes:
        _refuse_duplicate_txn(conn, bundle_id, changes["email"], recipient_id)
    if changes:
        conn.execute(
            sa.update(drop_recipients)
            .where(drop_recipients.c.id == recipient_id)
            .values(**changes)
        )
    return get_recipient_txn(conn, owner_id, bundle_id, recipient_id)


def _get_part_txn(
    conn: Connection, table: sa.Table, of: Callable[[Any], T], owner_id: int, bundle_id: int,
    part_id: int,
) -> T:
    """One row of `table` (a bundle's recipients or files) of the owner's bundle, mapped by
    `of`; DropNotFound when the bundle is not the owner's or the row not the bundle's."""
    _owned_row_txn(conn, owner_id, bundle_id)
    row = conn.execute(
        sa.select(table).where(table.c.id == part_id, table.c.bundle_id == bundle_id)
    ).first()
    if row is None:
        raise DropNotFound()
    return of(row)


def _list_parts_txn(
    conn: Connection, table: sa.Table, of: Callable[[Any], T], owner_id: int, bundle_id: int
) -> list[T]:
    """Every row of `table` of the owner's bundle, by id, mapped by `of`."""
    _owned_row_txn(conn, owner_id, bundle_id)
    rows = conn.execute(
        sa.select(table).where(table.c.bundle_id == bundle_id).order_by(table.c.id)
    )
    return [of(r) for r in rows]


def get_recipient_txn(
    conn: Connection, owner_id: int, bundle_id: int, recipient_id: int
) -> DropRecipient:
    return _get_part_txn(conn, drop_recipients, recipient_of, owner_id, bundle_id, recipient_id)


def list_recipients_txn(conn: Connection, owner_id: int, bundle_id: int) -> list[DropRecipient]:
    return _list_parts_txn(conn, drop_recipients, recipient_of, owner_id, bundle_id)


def upload_room_txn(conn: Connection, owner_id: int, bundle_id: int, max_files: int) -> int:
    """Bytes already stored in the bundle, which must be changeable and hold fewer than
    `max_files` files (else DropError("the_file")): a file costs no room when it is empty,
    or has the bytes of another file of the bundle, yet every mail of the bundle's send
    lists it and every opening of a link reads it."""
    _changeable_row_txn(conn, owner_id, bundle_id)
    held, total = conn.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(drop_files.c.size), 0)).where(
            drop_files.c.bundle_id == bundle_id
        )
    ).one()
    if held >= max_files:
        raise DropError("the_file", f"A drop may have at most {max_files} files.")
    return int(total)


def user_stored_txn(conn: Connection, owner_id: int) -> int:
    """Bytes of the files a user keeps on disk: those of every bundle not yet removed."""
    total = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(drop_files.c.size), 0))
        .join(drop_bundles, drop_bundles.c.id == drop_files.c.bundle_id)
        .where(drop_bundles.c.owner_id == owner_id, drop_bundles.c.removed_at.is_(None))
    ).scalar_one()
    return int(total)


def user_full(max_user_size: int) -> TooLarge:
    """The 413 of an upload that would take a user's files past `[safedrop] max_user_size`."""
    return TooLarge("the_file", f"Your drops' files may not exceed {max_user_size} bytes in "
                    "all (a drop's files go when it expires or its recipients have them).")


def add_file_txn(
    conn: Connection, owner_id: int, bundle_id: int, values: Mapping[str, Any],
    max_bundle_size: int, max_user_size: int, max_files: int,
) -> DropFile:
    used = upload_room_txn(conn, owner_id, bundle_id, max_files)
    if used + int(values["size"]) > max_bundle_size:  # another upload took the room
        raise bundle_full()
    # The user's uploads are recorded in turn (its row held: mailcore.store.owners), each
    # counting the bytes of those before it, whatever their bundle: two at once to two
    # bundles must not both fit in the room one of them leaves.
    thd_lock_owner(conn, owner_id)
    if user_stored_txn(conn, owner_id) + int(values["size"]) > max_user_size:
        raise user_full(max_user_size)
    new_id = conn.execute(
        sa.insert(drop_files).values(bundle_id=bundle_id, **values)
    ).inserted_primary_key[0]  # type: ignore[index]
    return get_file_txn(conn, owner_id, bundle_id, new_id)


def get_file_txn(conn: Connection, owner_id: int, bundle_id: int, file_id: int) -> DropFile:
    return _get_part_txn(conn, drop_files, file_of, owner_id, bundle_id, file_id)


def list_files_txn(conn: Connection, owner_id: int, bundle_id: int) -> list[DropFile]:
    return _list_parts_txn(conn, drop_files, file_of, owner_id, bundle_id)


def file_hash_in_use_txn(conn: Connection, bundle_id: int, sha256: str) -> bool:
    return conn.execute(
        sa.select(drop_files.c.id).where(
            drop_files.c.bundle_id == bundle_id, drop_files.c.sha256 == sha256
        ).limit(1)
    ).first() is not None


def _sendable_txn(conn: Connection, owner_id: int, row: Any, now: datetime.datetime
                  ) -> tuple[list[DropRecipient], list[DropFile]]:
    """The recipients and files of the owner's unsent bundle `row`, once it may be sent: it
    has at least one recipient and one file, and its expiry date is still to come (else
    DropError)."""
    recipients = list_recipients_txn(conn, owner_id, row.id)
    files = list_files_txn(conn, owner_id, row.id)
    if not recipients:
        raise DropError("recipients", "Add at least one recipient before sending.")
    if not files:
        raise DropError("files", "Add at least one file before sending.")
    check_expiry(_utc(row.expiry_date), now)
    return recipients, files


def check_send_txn(conn: Connection, owner_id: int, bundle_id: int,
                   now: datetime.datetime) -> int:
    """Refuse as `claim_send_txn` would (DropNotFound, DropSent, DropError), changing
    nothing: the answer to a HEAD of the send. Returns how many recipients it would
    mail."""
    row = _owned_row_txn(conn, owner_id, bundle_id)
    if row.sent_at is not None:
        raise DropSent()
    return len(_sendable_txn(conn, owner_id, row, now)[0])


def claim_send_txn(
    conn: Connection, owner_id: int, bundle_id: int, now: datetime.datetime,
    new_link: Callable[[], tuple[str, bytes]],
) -> tuple[Bundle, str, list[tuple[DropRecipient, str]], list[DropFile]]:
    """Mark the bundle sent and give each recipient a link (`new_link()`: the token and
    the digest kept) and its expiry; returns the bundle, its owner's address, each
    recipient with its link token, and the files. The bundle must have at least one
    recipient and one file, and an expiry date still to come."""
    row = _changeable_row_txn(conn, owner_id, bundle_id)
    recipients, files = _sendable_txn(conn, owner_id, row, now)
    done = conn.execute(
        sa.update(drop_bundles)
        .where(drop_bundles.c.id == bundle_id, drop_bundles.c.sent_at.is_(None))
        .values(sent_at=now)
    )
    if done.rowcount != 1:
        raise DropSent()
    tokens: dict[int, str] = {}
    for r in recipients:
        token, digest = new_link()
        tokens[r.id] = token
        # At most MAX_VALID_FOR: a row stored before the API had that maximum may hold up to
        # 2**63 - 1, past datetime's year 9999 (an OverflowError, a send that never goes).
        seconds = min(r.valid_for, MAX_VALID_FOR)
        expires = now + datetime.timedelta(seconds=seconds) if seconds else None
        conn.execute(
            sa.update(drop_recipients)
            .where(drop_recipients.c.id == r.id)
            .values(link_digest=digest, expires_at=expires)
        )
    sender = conn.execute(sa.select(users.c.email).where(users.c.id == owner_id)).scalar_one()
    updated = [(r, tokens[r.id]) for r in list_recipients_txn(conn, owner_id, bundle_id)]
    return bundle_of(_owned_row_txn(conn, owner_id, bundle_id)), sender, updated, files

"""Hosted mailboxes and who may use them (seed 002's `/api/v1/mailboxes/…`).

A mailbox is an address of a served domain whose mail is kept here. It belongs to the domain
row it was created under (`mailboxes.domain_id`): once that domain is removed the mailbox is
inactive for good (nothing is delivered to it or sent from it, whoever claims the name
again), and its mail stays readable to those who may read it until the mailbox is deleted.
Its owner holds every right; another user holds what its grant says (`allow_read`, `allow_send`,
`allow_reply_to`, `allow_delete`, `allow_modify`). A mailbox the caller holds no right on is
invisible: it answers as unknown. Only the owner or a holder of `allow_modify` changes
grants, and nobody grants a right it does not hold itself. A grant is a user holding at
least one right: a change that leaves none (every right set to false, or no right named
for a user holding none) removes the user from the access list, as a revoke does, and the
access list shows no row of no rights (`_HOLDS_A_RIGHT`).

A grantee's outbox mail (`mailapi_mail.author_id`) is sent on the strength of its
`allow_send`: taking that right away (a revoke, a grant changed to allow_send false, the
grantee deleted) sends the grantee's mail still in the mailbox's outbox back to the drafts,
where the owner finds it (`_thd_unsend`), in the same transaction. So does taking
`allow_reply_to` away for the grantee's outbox mail, from any mailbox, whose reply-to names
the mailbox (`_thd_unsend_replying`): the mail was let out with that reply-to on the
strength of the right, and would otherwise go with it however long it waits. The sender's
take of a row (mailcore.mailapi.outbox.thd_take) and these changes are ordered by the row's
lock on PostgreSQL: a mail already handed to the queue has gone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, or_, select, update
from twisted.internet.interfaces import IReactorTime

from mailcore.gateway.domains import thd_mailboxes_changed
from mailcore.identity.service import thd_user_row_by_name
from mailcore.mailapi.addresses import normalise_address, parse_address_list, stored_form
from mailcore.mailapi.counts import thd_use
from mailcore.mailapi.errors import CONFLICT, DENIED, INVALID, NOT_FOUND, MailApiError
from mailcore.messages.sql import dialect_insert
from mailcore.store import Database
from mailcore.store.schema import domains, mailapi_mail, mailbox_grants, mailboxes, users
from mailcore.store.schema.mailapi import DRAFT, OUTBOX

RIGHTS = ("allow_read", "allow_send", "allow_reply_to", "allow_delete", "allow_modify")

_b = mailboxes.c
_g = mailbox_grants.c


class OutboxNotEmpty(MailApiError):
    """The operator's removal of a mailbox whose outbox holds mail (`MailboxService.remove`
    without `force`)."""

    def __init__(self, address: str, waiting: int) -> None:
        super().__init__(CONFLICT, f"mailbox {address} has {waiting} "
                         f"{'mail' if waiting == 1 else 'mails'} waiting to be sent")
        self.address = address
        self.waiting = waiting


@dataclass(frozen=True)
class Rights:
    """The five rights of seed 002 on one mailbox."""

    allow_read: bool = False
    allow_send: bool = False
    allow_reply_to: bool = False
    allow_delete: bool = False
    allow_modify: bool = False

    @classmethod
    def every(cls) -> Rights:
        return cls(True, True, True, True, True)

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)

    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def with_changes(self, changes: Mapping[str, bool]) -> Rights:
        return Rights(**{**self.as_dict(), **changes})


@dataclass(frozen=True)
class Mailbox:
    id: int
    address: str
    owner_id: int
    owner: str  # the owner's username
    created_at: float
    # The domain row it belongs to; None once that domain is removed (the mailbox is then
    # inactive: see the module docstring).
    domain_id: int | None = None
    # The bytes its mail takes (mailcore.mailapi.counts).
    used_bytes: int = 0
    # Its own quota in bytes, set by the operator (None: `[mailapi] mailbox_quota_bytes`;
    # 0: no limit): mailcore.mailapi.counts.effective_quota.
    quota_bytes: int | None = None

    @property
    def active(self) -> bool:
        return self.domain_id is not None


@dataclass(frozen=True)
class Access:
    """A mailbox as one user may use it."""

    mailbox: Mailbox
    rights: Rights
    is_owner: bool


@dataclass(frozen=True)
class Grant:
    """One user's rights on a mailbox (the owner's are every right)."""

    user_id: int
    username: str
    rights: Rights
    is_owner: bool = False


def _not_found(address: str) -> MailApiError:
    return MailApiError(NOT_FOUND, "mailbox not found", "email")


def _mailbox(row: Any) -> Mailbox:
    return Mailbox(row.id, row.address, row.owner_id, row.owner, row.created_at,
                   row.domain_id, row.used_bytes, row.quota_bytes)


def _rights(row: Any) -> Rights:
    return Rights(**{r: bool(getattr(row, r)) for r in RIGHTS})


def _mailbox_query() -> Any:
    return select(_b.id, _b.address, _b.owner_id, _b.created_at, _b.domain_id, _b.used_bytes,
                  _b.quota_bytes, users.c.username.label("owner")) \
        .join(users, users.c.id == _b.owner_id)


_BY_ADDRESS = _mailbox_query().where(_b.address == bindparam("address"))


def _thd_outbox_waiting(conn: Connection, box: int) -> int:
    """Blocking, before the mailbox `box` is deleted: how many of its mails wait in its
    outbox. The mailbox row is locked first (PostgreSQL), so mail put in the outbox
    meanwhile (which holds the row: thd_mailbox(hold=True)) is counted or finds no
    mailbox."""
    conn.execute(select(_b.id).where(_b.id == box).with_for_update())
    return int(conn.execute(select(func.count()).select_from(mailapi_mail).where(
        mailapi_mail.c.mailbox_id == box,
        mailapi_mail.c.status == OUTBOX)).scalar_one())


def thd_mailbox(conn: Connection, address: str, *, hold: bool = False) -> Mailbox | None:
    """Blocking: the mailbox at `address` (stored form), or None. `hold`: kept from being
    deleted until the transaction ends (PostgreSQL: FOR KEY SHARE, which the owner's delete
    waits for; SQLite's writers take turns), for mail put in its outbox or a row that names
    it (one deleted before is None: no insert then fails on its foreign key)."""
    query = _BY_ADDRESS.with_for_update(read=True, key_share=True, of=mailboxes) \
        if hold else _BY_ADDRESS
    row = conn.execute(query, {"address": address}).first()
    return _mailbox(row) if row is not None else None


_HOLD_BY_ID = select(_b.id).where(_b.id == bindparam("box")) \
    .with_for_update(read=True, key_share=True)


def thd_hold_mailbox(conn: Connection, box: int) -> bool:
    """Blocking: whether the mailbox `box` is still there, then kept from being deleted
    until the transaction ends (as thd_mailbox's `hold`)."""
    return conn.execute(_HOLD_BY_ID, {"box": box}).first() is not None


def thd_rights(conn: Connection, mailbox: Mailbox, user_id: int) -> Rights:
    """Blocking: what `user_id` may do with `mailbox` (nothing: every right false)."""
    if mailbox.owner_id == user_id:
        return Rights.every()
    row = conn.execute(
        select(mailbox_grants).where(_g.mailbox_id == mailbox.id, _g.user_id == user_id)
    ).first()
    return _rights(row) if row is not None else Rights()


def thd_access(conn: Connection, user_id: int, address: str, *, hold: bool = False
               ) -> Access:
    """Blocking: `user_id`'s access to the mailbox at `address`; unknown or invisible
    mailboxes raise NOT_FOUND. `hold`: the mailbox is kept from being deleted until the
    transaction ends (thd_mailbox), for a write that adds a row naming it."""
    try:
        stored = stored_form(address, "email")
    except MailApiError:
        raise _not_found(address) from None
    mailbox = thd_mailbox(conn, stored, hold=hold)
    if mailbox is None:
        raise _not_found(address)
    rights = thd_rights(conn, mailbox, user_id)
    if not rights.any():
        raise _not_found(address)
    return Access(mailbox, rights, mailbox.owner_id == user_id)


def thd_visible(conn: Connection, user_id: int) -> list[Access]:
    """Blocking: every mailbox `user_id` owns or holds a right on, by address."""
    found: list[Access] = []
    for row in conn.execute(_mailbox_query().where(_b.owner_id == user_id)):
        found.append(Access(_mailbox(row), Rights.every(), True))
    granted = conn.execute(
        _mailbox_query().add_columns(*(getattr(_g, r) for r in RIGHTS))
        .join(mailbox_grants, _g.mailbox_id == _b.id)
        .where(_g.user_id == user_id, _b.owner_id != user_id)
    )
    for row in granted:
        rights = _rights(row)
        if rights.any():
            found.append(Access(_mailbox(row), rights, False))
    return sorted(found, key=lambda a: a.mailbox.address)


def _thd_user(conn: Connection, name: str) -> tuple[int, str]:
    """Blocking: (id, username) of the user named `name` (username, else email)."""
    row = thd_user_row_by_name(conn, name)
    if row is not None:
        return row.id, row.username
    raise MailApiError(NOT_FOUND, "user not found", "username")


# A grant's row that holds a right: the access list shows these only (a row of none, left
# by a change before it was removed as set_grant removes it, is no access).
_HOLDS_A_RIGHT = or_(*(getattr(_g, r).is_(True) for r in RIGHTS))


def _thd_insert_grant(conn: Connection, mailbox_id: int, user_id: int) -> None:
    """Blocking: a grant of no rights of `mailbox_id` to `user_id`, unless it has one."""
    conn.execute(dialect_insert(conn)(mailbox_grants).values(
        mailbox_id=mailbox_id, user_id=user_id, **Rights().as_dict()).on_conflict_do_nothing())


def _thd_unsend(conn: Connection, author: int, box: int | None = None) -> int:
    """Blocking: `author`'s mail in the outbox of mailbox `box` (None: of every mailbox
    `author` does not own) goes back to the drafts, its message dropped and its bytes given
    back to its mailbox; how many. Its rows are locked as read (PostgreSQL), so the bytes
    given back are those of the rows changed."""
    m = mailapi_mail.c
    where = [m.status == OUTBOX, m.author_id == author]
    if box is None:
        where.append(m.mailbox_id.in_(select(_b.id).where(_b.owner_id != author)))
    else:
        where.append(m.mailbox_id == box)
    return thd_unsend_where(conn, where)


def _thd_unsend_replying(conn: Connection, author: int, addresses: Collection[str]) -> int:
    """Blocking: `author`'s outbox mail (from any mailbox) whose reply-to names one of
    `addresses` (mailboxes whose allow_reply_to it no longer holds) goes back to the drafts,
    as `_thd_unsend`; how many."""
    if not addresses:
        return 0
    m = mailapi_mail.c
    ids = []
    for row_id, reply_to in conn.execute(select(m.id, m.reply_to).where(
            m.status == OUTBOX, m.author_id == author, m.reply_to != "")):
        try:
            named = parse_address_list(reply_to or "", "reply-to")
        except MailApiError:
            named = []
        if any(a in addresses for a in named):
            ids.append(row_id)
    going = 0
    for start in range(0, len(ids), 500):
        going += thd_unsend_where(conn, [m.id.in_(ids[start:start + 500]),
                                          m.status == OUTBOX])
    return going


def thd_unsend_where(conn: Connection, where: list[Any]) -> int:
    """Blocking: the outbox mail `where` selects goes back to the drafts (see
    `_thd_unsend`); how many."""
    m = mailapi_mail.c
    going = conn.execute(select(m.id, m.mailbox_id, func.coalesce(func.length(m.raw), 0))
                         .where(*where).with_for_update()).all()
    for row_id, box_id, length in going:
        conn.execute(update(mailapi_mail).where(m.id == row_id).values(
            status=DRAFT, queue_id=None, outbox_seq=None, raw=None,
            size=m.size - func.coalesce(func.length(m.raw), 0)))
        thd_use(conn, box_id, -int(length))
    return len(going)


def _require_modify(access: Access) -> None:
    if not access.rights.allow_modify:
        raise MailApiError(DENIED, "you may not change access to this mailbox")


class MailboxService:
    """Hosted mailboxes and their grants, over the store."""

    def __init__(
        self, db: Database, clock: IReactorTime, on_change: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.clock = clock
        # Told when a mailbox comes or goes (local delivery's cache of hosted addresses).
        self.on_change = on_change

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- the operator's side (CLI) ------------------------------------------------------

    async def add(self, address: str, owner_id: int) -> Mailbox:
        """Host `address` (of a served domain) for `owner_id`, in the domain row now named
        so. An address still held by a mailbox of a removed domain is refused (CONFLICT)
        until that mailbox, with its mail, is removed: the operator decides."""
        stored = normalise_address(address)
        now = self.clock.seconds()

        def txn(conn: Connection) -> Mailbox:
            domain = stored.rpartition("@")[2]
            # Held (FOR KEY SHARE on PostgreSQL) until the mailbox is in: a removal of the
            # domain meanwhile waits, then unbinds it too (ON DELETE SET NULL).
            domain_id = conn.execute(select(domains.c.id).where(domains.c.name == domain)
                                     .with_for_update(read=True, key_share=True)).scalar()
            if domain_id is None:
                raise MailApiError(INVALID, f"{domain} is not a served domain "
                                   "(add it with `mailcore domain add`)", "address")
            held = thd_mailbox(conn, stored)
            if held is not None and not held.active:
                raise MailApiError(CONFLICT, f"{stored} is still the mailbox of {held.owner} "
                                   "from when its domain was removed; remove that mailbox "
                                   "(and its mail) first", "address")
            if held is not None:
                raise MailApiError(CONFLICT, f"{stored} is already a mailbox", "address")
            conn.execute(insert(mailboxes).values(address=stored, owner_id=owner_id,
                                                  created_at=now, domain_id=domain_id))
            thd_mailboxes_changed(conn, [domain_id])
            found = thd_mailbox(conn, stored)
            assert found is not None
            return found

        found = await self.db.run("mailapi_add_mailbox", txn)
        self._changed()
        return found

    async def set_quota(self, address: str, quota_bytes: int | None) -> Mailbox:
        """The operator sets the mailbox's own quota in bytes (0: no limit; None: back to
        `[mailapi] mailbox_quota_bytes`). A quota below what its mail takes now refuses it
        new mail until mail is deleted; nothing is removed."""
        if quota_bytes is not None and (isinstance(quota_bytes, bool) or quota_bytes < 0):
            raise MailApiError(INVALID, "a quota is a number of bytes (0: no limit)",
                               "quota_bytes")
        stored = stored_form(address)

        def txn(conn: Connection) -> Mailbox:
            changed = conn.execute(update(mailboxes).where(_b.address == stored)
                                   .values(quota_bytes=quota_bytes)).rowcount
            if not changed:
                raise _not_found(stored)
            found = thd_mailbox(conn, stored)
            assert found is not None
            return found

        return await self.db.run("mailapi_set_quota", txn)

    async def list_all(self, owner_id: int | None = None) -> list[Mailbox]:
        """Every mailbox (or those of one owner), by address."""

        def txn(conn: Connection) -> list[Mailbox]:
            query = _mailbox_query().order_by(_b.address)
            if owner_id is not None:
                query = query.where(_b.owner_id == owner_id)
            return [_mailbox(row) for row in conn.execute(query)]

        return await self.db.read("mailapi_list_mailboxes", txn)

    async def remove(self, address: str, *, force: bool = False) -> int:
        """Delete the mailbox at `address` with its mail and grants, once its outbox is
        empty (OutboxNotEmpty while mail answered 202 waits in it); `force`: with that
        mail too, unsent. Returns how many mails of its outbox went unsent."""
        stored = stored_form(address)

        def txn(conn: Connection) -> int:
            box = conn.execute(_BY_ADDRESS, {"address": stored}).first()
            if box is None:
                raise _not_found(stored)
            waiting = _thd_outbox_waiting(conn, box.id)
            if waiting and not force:
                raise OutboxNotEmpty(stored, waiting)
            conn.execute(delete(mailboxes).where(_b.id == box.id))
            thd_mailboxes_changed(conn, [box.domain_id])
            return waiting

        unsent = await self.db.run("mailapi_remove_mailbox", txn)
        self._changed()
        return unsent

    async def forget_grantee(self, user_id: int) -> int:
        """Delete every grant `user_id` holds on other users' mailboxes (a deleted user's);
        how many went."""

        def txn(conn: Connection) -> int:
            _thd_unsend(conn, user_id)
            _thd_unsend_replying(conn, user_id, set(conn.execute(
                select(_b.address).join(mailbox_grants, _g.mailbox_id == _b.id)
                .where(_g.user_id == user_id, _g.allow_reply_to.is_(True))).scalars()))
            return int(conn.execute(delete(mailbox_grants).where(_g.user_id == user_id))
                       .rowcount or 0)

        return await self.db.run("mailapi_forget_grantee", txn)

    async def find(self, address: str) -> Mailbox | None:
        """The mailbox at `address`, or None (also for a malformed address)."""
        try:
            stored = stored_form(address)
        except MailApiError:
            return None
        return await self.db.read("mailapi_find_mailbox", thd_mailbox, stored)

    # -- a user's side (the API) ----------------------------------------------------------

    async def visible(self, user_id: int) -> list[Access]:
        return await self.db.read("mailapi_visible_mailboxes", thd_visible, user_id)

    async def access(self, user_id: int, address: str) -> Access:
        return await self.db.read("mailapi_mailbox_access", thd_access, user_id, address)

    async def delete(self, user_id: int, address: str) -> None:
        """The owner deletes its mailbox (with its mail and grants), once its outbox is
        empty: mail answered 202 "enqueued to be sent" (its grantees' too) is sent, never
        deleted with it (CONFLICT while any waits)."""

        def txn(conn: Connection) -> None:
            access = thd_access(conn, user_id, address)
            if not access.is_owner:
                raise MailApiError(DENIED, "only the owner may delete this mailbox")
            box = access.mailbox.id
            if _thd_outbox_waiting(conn, box):
                raise MailApiError(CONFLICT, "this mailbox has mail waiting to be sent; "
                                   "delete it once its outbox is empty")
            conn.execute(delete(mailboxes).where(_b.id == box))
            thd_mailboxes_changed(conn, [access.mailbox.domain_id])

        await self.db.run("mailapi_delete_mailbox", txn)
        self._changed()

    async def grants(self, user_id: int, address: str) -> tuple[Mailbox, list[Grant]]:
        """The mailbox, with its owner and every grant (owner or `allow_modify` only)."""

        def txn(conn: Connection) -> tuple[Mailbox, list[Grant]]:
            access = thd_access(conn, user_id, address)
            _require_modify(access)
            box = access.mailbox
            out = [Grant(box.owner_id, box.owner, Rights.every(), True)]
            rows = conn.execute(
                select(mailbox_grants, users.c.username)
                .join(users, users.c.id == _g.user_id)
                .where(_g.mailbox_id == box.id, _HOLDS_A_RIGHT).order_by(users.c.username)
            )
            out.extend(Grant(row.user_id, row.username, _rights(row)) for row in rows)
            return box, out

        return await self.db.read("mailapi_list_grants", txn)

    async def grant_of(self, user_id: int, address: str, username: str) -> Grant:
        """One user's rights on the mailbox: the caller's own, or anyone's for the owner or
        a holder of `allow_modify`. To any other caller an unknown user answers as another
        user does (401, not 404), so that a grantee cannot learn which usernames exist."""

        def txn(conn: Connection) -> Grant:
            access = thd_access(conn, user_id, address)
            try:
                target_id, target_name = _thd_user(conn, username)
            except MailApiError:
                _require_modify(access)
                raise
            if target_id != user_id:
                _require_modify(access)
            box = access.mailbox
            return Grant(target_id, target_name, thd_rights(conn, box, target_id),
                         target_id == box.owner_id)

        return await self.db.read("mailapi_grant_of", txn)

    async def set_grant(
        self, user_id: int, address: str, username: str, changes: Mapping[str, bool]
    ) -> Grant:
        """Change `username`'s rights (the rights not named keep their value). A right set
        to true must be one the caller holds. A grant left with no right is removed (the
        user is no longer on the access list): a change naming no right, or only rights
        set to false, of a user holding none stores nothing."""
        unknown = sorted(set(changes) - set(RIGHTS))
        if unknown:
            raise MailApiError(INVALID, f"unknown right: {unknown[0]}", unknown[0])

        def txn(conn: Connection) -> Grant:
            # Held: the owner's delete of the mailbox meanwhile waits for the grant (then
            # takes it along) or went first (NOT_FOUND), instead of failing its insert.
            access = thd_access(conn, user_id, address, hold=True)
            _require_modify(access)
            box = access.mailbox
            target_id, target_name = _thd_user(conn, username)
            if target_id == box.owner_id:
                raise MailApiError(INVALID, "the owner holds every right on its mailbox",
                                   "username")
            held = access.rights.as_dict()
            beyond = [r for r in RIGHTS if changes.get(r) and not held[r]]
            if beyond:
                raise MailApiError(DENIED, f"you may not grant {beyond[0]}", beyond[0])
            # The grant's row (no rights) unless it is there, then only the rights named:
            # a grant made or changed by another request meanwhile is neither a clash (on
            # PostgreSQL the insert waits for the other's commit and leaves its row) nor
            # written over with what this one read before it. A row the insert left (no
            # lock) may be revoked before the update: then it is made again, this change
            # being the later one.
            where = (_g.mailbox_id == box.id, _g.user_id == target_id)
            while True:
                _thd_insert_grant(conn, box.id, target_id)
                if changes:
                    conn.execute(update(mailbox_grants).where(*where).values(**changes))
                row = conn.execute(select(mailbox_grants).where(*where)).first()
                if row is not None:
                    if not row.allow_send:
                        _thd_unsend(conn, target_id, box.id)
                    if not row.allow_reply_to:
                        _thd_unsend_replying(conn, target_id, {box.address})
                    rights = _rights(row)
                    if not rights.any():
                        # No access: off the list, as a revoke. Only while it holds none: a
                        # right another request granted meanwhile (a change naming no right
                        # took no lock on the row) stays, that change being the later.
                        conn.execute(delete(mailbox_grants).where(*where, ~_HOLDS_A_RIGHT))
                    return Grant(target_id, target_name, rights)

        return await self.db.run("mailapi_set_grant", txn)

    async def revoke(self, user_id: int, address: str, username: str) -> None:
        """Remove `username` from the mailbox's access list."""

        def txn(conn: Connection) -> None:
            access = thd_access(conn, user_id, address)
            _require_modify(access)
            box = access.mailbox
            target_id, _ = _thd_user(conn, username)
            if target_id == box.owner_id:
                raise MailApiError(INVALID, "the owner's access cannot be removed", "username")
            gone = conn.execute(delete(mailbox_grants).where(
                _g.mailbox_id == box.id, _g.user_id == target_id)).rowcount
            if not gone:
                raise MailApiError(NOT_FOUND, "user has no access to this mailbox", "username")
            _thd_unsend(conn, target_id, box.id)
            _thd_unsend_replying(conn, target_id, {box.address})

        await self.db.run("mailapi_revoke_grant", txn)

"""The quarantine: held messages, their listing and release, retention, and digests.

A message the pipeline decides to quarantine is kept here, one row per recipient, with a
seed-004-shaped `ident` (ddmmyyyyHHMMSS in UTC + 6 random digits). A release hands the kept
bytes back to the queue (`Spool.accept`, kind "release", the original sender and the
quarantined recipient): nothing is filtered again. A release happens at most once: the row is
claimed with `UPDATE … WHERE released_at IS NULL` in the very transaction that queues the
message (the accept's guard): only the request whose UPDATE changed the row queues it, and
the claim and the queued message commit together or not at all (a crash in between leaves
the message releasable).

Retention: every `purge_interval` seconds the messages held longer than `retention_days`
are deleted, PURGE_BATCH rows a transaction, by one node of those sharing the store (the
node that claims that period's run of the "quarantine_purge" job).

Digests (seed 004's `sendResume`): every `digest_interval` seconds each recipient of a domain
with `send_resume` (and a plan that allows it, re-checked when sending) gets one mail listing
the messages quarantined for it since its last digest: the newest `MAX_DIGEST_ITEMS` (200) of
them, and a line counting the older ones not listed ({count} counts them all), which the
next digest does not list again (the domain's owner sees them in the quarantine listing).
A recipient is its address_key in its domain: its spellings (case, Unicode normal form,
U- or A-label domain) get one digest. A run is recorded as it claims its period
(`quarantine_digest_runs`, migration 0046) and marked finished once every digest is queued;
one cut short (crash, kill -9, a digest that could not be queued) is taken up again at the
next start and at each purge sweep, for the recipients it had not served: one who had a
digest queued since the run started gets no second one that period.
The digest is built on the CPU pool. Each item carries a signed, expiring
link `https://{host}/quarantine/release/{token}` that opens a small page (web/quarantine_page)
whose POST releases that one message; the token is HMAC-SHA256 over ident and expiry with a
key kept in `{data_dir}/quarantine.key` (mode 0600). A link is single-use because a message
is released only once.

Templates (agency plan; defaults otherwise). Placeholders are replaced by plain text
substitution of `{name}`; anything else stays as written:
- subject (`resumeTemplateSubject`): {email} {domain} {count}
- body (`resumeTemplateBody`): {email} {domain} {count} {items}
- item (`resumeTemplateResume`, one per message, joined into {items}): {date} {mailfrom}
  {subject} {link} {ident} {email} {reason}
  ({subject}: its first MAX_ITEM_SUBJECT characters, "…" when it is longer)
The recipient's address and the Reply-To are written as spelt or not at all
(`header_as_written`): a domain without an address list takes any local part, and one
spelling an RFC 2047 word (`=?utf-8?b?DQpCY2M6...?=`) would be decoded. Such a digest goes
`To: undisclosed-recipients:;`, and its Subject is `PLAIN_SUBJECT` if the template names
{email}; so is a Subject that would hold a line break once decoded. A digest that cannot
be built is logged once, with its recipient, and counts as done for that run (the next run
tries again); it stops no other recipient's.

```toml
[quarantine]
retention_days = 30        # quarantined messages older than this are purged
purge_interval = 3600      # seconds between purge runs
digest_interval = 86400    # seconds between digest runs
link_ttl = 604800          # seconds a release link stays valid (7 days)
link_hostname = ""         # host of release links when the domain sets none; "" = hostname
digest_from = ""           # From of digests; "" = quarantine@{hostname}
digest_sender = ""         # envelope sender of digests (an address); "" = the null sender <>
```
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import functools
import hashlib
import hmac
import math
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailcore.billing.plans import Plans
from mailcore.config import ConfigError, is_positive_number
from mailcore.emailpolicy import SMTP, header_as_written, header_breaks, to_field
from mailcore.files import secret_key_file
from mailcore.messages.parse import decode_header_value
from mailcore.outages import log_failure
from mailcore.periodic import InFlight, delete_in_batches
from mailcore.queue.model import header_block
from mailcore.queue.spool import Withdrawn
from mailcore.smtp.address import PathError, parse_mail_from
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.queueid import new_queue_id
from mailcore.store import Database
from mailcore.store.leases import JobLeases, thd_claim_periodic
from mailcore.store.schema import domains, quarantine, quarantine_digest_runs, users
from mailcore.text import replace_cc, shown, storable
from mailcore.workers import CpuPool

log = Logger()

RELEASED = "released"
ALREADY = "already released"
MISSING = "missing"
# The owner of the domain is disabled (`mailcore user disable`): the message stays held.
SUSPENDED = "owner suspended"

MAX_PAGE = 1000
# The messages one digest lists (the newest); a spam flood to one address made a digest of
# 9 MB, 50,000 links built in 2 s.
MAX_DIGEST_ITEMS = 200
_DIGITS = re.compile(r"[0-9]{1,20}")
# The most characters of a held message's Subject a digest item shows (its end cut, "…"):
# a spammer's may be as long as the header block a message keeps (64 KB), and
# MAX_DIGEST_ITEMS of those made a digest of 12.5 MB, more than many next hops take.
MAX_ITEM_SUBJECT = 200

DEFAULT_SUBJECT = "Quarantine summary for {email}: {count} new message(s)"
# The Subject of a digest whose own would decode to a line break, or names {email} when the
# recipient's address (any, for a domain without an address list) spells an RFC 2047 word.
PLAIN_SUBJECT = "Quarantine summary: {count} new message(s)"
DEFAULT_BODY = (
    "Hello,\n\n"
    "{count} message(s) addressed to {email} were held in quarantine by the filters of\n"
    "{domain}. They will not be delivered unless you release them.\n\n"
    "{items}\n"
    "Each link works once and for a limited time.\n"
)
DEFAULT_ITEM = (
    "- {date}  from {mailfrom}\n"
    "  Subject: {subject}\n"
    "  Release: {link}\n"
)
# After the items of a digest whose recipient has more than MAX_DIGEST_ITEMS new messages.
MORE_ITEMS = (
    "... and {more} older message(s), not listed here. Ask the administrator of {domain}\n"
    "to release any of them from the quarantine.\n"
)


@dataclass(frozen=True)
class QuarantineSettings:
    """The `[quarantine]` table (see the module docstring)."""

    retention_days: int = 30
    purge_interval: float = 3600.0
    digest_interval: float = 86400.0
    link_ttl: float = 7 * 86400.0
    link_hostname: str = ""
    digest_from: str = ""
    digest_sender: str = ""

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> QuarantineSettings:
        known = set(cls.__dataclass_fields__)
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"[quarantine] unknown key {sorted(unknown)[0]!r}")
        values: dict[str, Any] = {}
        for key in ("purge_interval", "digest_interval", "link_ttl"):
            if key in section:
                v = section[key]
                if not is_positive_number(v):
                    raise ConfigError(f"[quarantine] {key} must be a positive number of seconds")
                values[key] = float(v)
        if "retention_days" in section:
            v = section["retention_days"]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError("[quarantine] retention_days must be a positive integer")
            values["retention_days"] = v
        for key in ("link_hostname", "digest_from", "digest_sender"):
            if key in section:
                if not isinstance(section[key], str):
                    raise ConfigError(f"[quarantine] {key} must be a string")
                values[key] = section[key]
        sender = values.get("digest_sender", "")
        if sender:
            # It goes into MAIL FROM: a plain address, nothing that could split the line.
            try:
                mailbox, params = parse_mail_from(f"FROM:<{sender}>")
            except PathError as e:
                raise ConfigError(f"[quarantine] digest_sender {sender!r}: {e.text}") from None
            if mailbox is None or params:
                raise ConfigError(f"[quarantine] digest_sender {sender!r} is not an address")
        return cls(**values)


@dataclass(frozen=True)
class Held:
    """One quarantined message for one recipient, as listings show it."""

    ident: str
    date: datetime.datetime
    email: str
    domain: str
    mailfrom: str
    subject: str
    category: str
    reason: str
    released_at: datetime.datetime | None


@dataclass(frozen=True)
class Page:
    emails: list[Held]
    count: int
    nb_pages: int
    current_page: int


@dataclass(frozen=True)
class ToKeep:
    """What the pipeline hands over for one recipient."""

    queue_id: str
    mailfrom: str
    email: str
    domain_id: int
    category: str
    reason: str


class QuarantineError(Exception):
    """A release could not be queued (the spool refused it); nothing was released."""


class NotOwned(Exception):
    """The domain or address is not one of the user's (shown as 404)."""


# -- helpers ---------------------------------------------------------------------------------


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def rfc3339(value: datetime.datetime) -> str:
    """A UTC time as RFC 3339 with an explicit offset (the seed writes `+02:00`)."""
    return _utc(value).astimezone(datetime.UTC).isoformat(timespec="seconds")


def new_ident(when: datetime.datetime) -> str:
    """Twenty digits like the seed's: ddmmyyyyHHMMSS (UTC) and six random digits."""
    return when.strftime("%d%m%Y%H%M%S") + f"{secrets.randbelow(10**6):06d}"


def decoded_subject(body: bytes) -> str:
    """The message's Subject, RFC 2047 words and raw 8-bit text decoded as the message
    store decodes them (`decode_header_value`: UTF-8, else Windows-1252; a word in a charset
    Python does not know, or holding bytes its charset does not, read all the same); ""
    when absent or unreadable.

    It is one line of text for the quarantine's pages and digests and a column of the
    store: a control character an encoded word carried (NUL, which PostgreSQL refuses; ESC)
    becomes U+FFFD, as does a lone surrogate, so whatever the sender wrote can be kept."""
    try:
        headers = BytesHeaderParser().parsebytes(header_block(body))
        # As written (raw 8-bit bytes surrogate-escaped): compat32's get() makes a Header
        # of them, whose text has U+FFFD for each byte of a UTF-8 Subject.
        raw = next((v for k, v in headers.raw_items() if k.lower() == "subject"), None)
        if raw is None:
            return ""
        text = decode_header_value(str(raw))
    except Exception:
        return ""
    return storable(replace_cc(" ".join(text.split())))


def _cut(text: str, most: int) -> str:
    """`text`, or its first `most` - 1 characters and "…" when it is longer."""
    return text if len(text) <= most else text[: most - 1] + "\u2026"


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def render(template: str, values: Mapping[str, str]) -> str:
    """`template` with each known `{name}` replaced; no format-string semantics at all."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


# -- link tokens -----------------------------------------------------------------------------


class LinkSigner:
    """Signed, expiring release tokens: `{ident}.{expiry}.{base64url HMAC-SHA256}`."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    @classmethod
    def from_file(cls, path: Path) -> LinkSigner:
        """Load the key, making a new one (mode 0600) if the file is absent. Blocks."""
        try:
            return cls(secret_key_file(path))
        except ValueError:
            raise ConfigError(f"{path}: the quarantine link key is too short") from None

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self.key, payload.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(self, ident: str, expires: float) -> str:
        payload = f"{ident}.{int(expires)}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float) -> str | None:
        """The ident of a genuine, unexpired token, else None."""
        parts = token.split(".")
        # ASCII only: str.isdigit also takes other scripts' digits ("١٢"), and neither the
        # MAC's input nor compare_digest takes anything else.
        if len(parts) != 3 or not all(_DIGITS.fullmatch(p) for p in parts[:2]):
            return None
        if not parts[2].isascii():
            return None
        payload = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(self._mac(payload), parts[2]):
            return None
        if int(parts[1]) < now:
            return None
        return parts[0]


def address_key(email: str) -> str:
    """What a quarantined recipient is listed by within its domain (column `email_key`):
    the local part of `email`, trimmed, NFC, lower case. It is made here, when a row is
    stored and when an address is looked up, and compared as is: SQL lower() folds ASCII
    only on SQLite, and the domain is left out as the row's domain_id names it (however
    the recipient spelled it, A-label or U-label)."""
    local = email.rpartition("@")[0] if "@" in email else email
    return unicodedata.normalize("NFC", local.strip()).lower()


# -- transactions ----------------------------------------------------------------------------


# The row kept for one recipient of one queued message (ix_quarantine_queue_id).
_KEPT = sa.select(quarantine.c.ident).where(
    quarantine.c.queue_id == sa.bindparam("queue_id"),
    quarantine.c.email == sa.bindparam("email")).limit(1)


def _keep_txn(
    conn: Connection, items: Sequence[ToKeep], body: bytes, now: datetime.datetime
) -> list[str]:
    """Blocking: store one row per recipient; returns their idents. Every text taken from
    the mail (sender, recipient, Subject, the filter's reason) is made `storable`: a NUL
    in any of them would fail the insert on PostgreSQL, and the spam would be deferred
    until it bounced to its (forged) sender instead of being kept.

    A recipient of a queued message already kept keeps its row: the ident is that row's,
    and no second entry is listed, digested or released. (The queue runner records the
    recipients quarantined in this transaction, but a node whose lease lapsed meanwhile
    records nothing, and the node that took the message over filters it again.)"""
    subject = decoded_subject(body)
    ids = {i.domain_id for i in items}
    rows = conn.execute(
        sa.select(domains.c.id, domains.c.name, domains.c.owner_id).where(domains.c.id.in_(ids))
    ).all()
    by_id = {r.id: r for r in rows}
    idents = []
    for item in items:
        dom = by_id.get(item.domain_id)
        if dom is None:
            raise QuarantineError(f"domain {item.domain_id} no longer exists")
        kept = conn.execute(_KEPT, {"queue_id": item.queue_id,
                                    "email": storable(item.email)}).scalar()
        if kept is not None:
            idents.append(kept)
            continue
        for _ in range(20):
            ident = new_ident(now)
            try:
                with conn.begin_nested():
                    conn.execute(quarantine.insert().values(
                        ident=ident, owner_id=dom.owner_id, domain_id=dom.id, domain=dom.name,
                        email=storable(item.email),
                        email_key=address_key(storable(item.email)),
                        mailfrom=storable(item.mailfrom),
                        subject=subject, category=storable(item.category),
                        reason=storable(item.reason), queue_id=item.queue_id,
                        body=body, size=len(body), created_at=now,
                    ))
            except IntegrityError:
                continue  # the same second and the same six digits: draw again
            idents.append(ident)
            break
        else:
            raise QuarantineError("could not draw a unique ident")
    return idents


def _held(row: Any) -> Held:
    return Held(
        ident=row.ident, date=_utc(row.created_at), email=row.email, domain=row.domain,
        mailfrom=row.mailfrom, subject=row.subject, category=row.category, reason=row.reason,
        released_at=_utc(row.released_at) if row.released_at is not None else None,
    )


_LIST_COLUMNS = (
    quarantine.c.ident, quarantine.c.created_at, quarantine.c.email, quarantine.c.domain,
    quarantine.c.mailfrom, quarantine.c.subject, quarantine.c.category, quarantine.c.reason,
    quarantine.c.released_at,
)


def _list_txn(
    conn: Connection, domain_id: int, email: str | None, start: int, count: int
) -> tuple[list[Held], int]:
    """Blocking: one page, newest first, and the total."""
    where = [quarantine.c.domain_id == domain_id]
    if email is not None:
        where.append(quarantine.c.email_key == address_key(email))
    total = conn.execute(
        sa.select(sa.func.count()).select_from(quarantine).where(*where)
    ).scalar_one()
    rows = conn.execute(
        sa.select(*_LIST_COLUMNS).where(*where)
        .order_by(quarantine.c.created_at.desc(), quarantine.c.id.desc())
        .offset(start).limit(count)
    ).all()
    return [_held(r) for r in rows], int(total)


def _release_row_txn(conn: Connection, ident: str, owner_id: int | None,
                     with_body: bool = True) -> Any:
    """Blocking: the row to release (None if there is none for this owner), with whether
    its owner is active; its body only `with_body` (what a release queues: a check of one
    reads none)."""
    where = [quarantine.c.ident == ident]
    if owner_id is not None:
        where.append(quarantine.c.owner_id == owner_id)
    body = (quarantine.c.body,) if with_body else ()
    return conn.execute(
        sa.select(quarantine.c.id, quarantine.c.mailfrom, quarantine.c.email,
                  quarantine.c.domain_id, *body, quarantine.c.released_at,
                  users.c.is_active.label("owner_active"))
        .select_from(quarantine.join(users, users.c.id == quarantine.c.owner_id))
        .where(*where)
    ).first()


class _Gone(Exception):
    """The row to release was deleted (the retention purge) after the release read it."""


def _claim_txn(conn: Connection, row_id: int, now: datetime.datetime, queue_id: str) -> bool:
    """Blocking, in the spool's transaction that queues the release (its guard): mark the
    row released as `queue_id` unless it was; whether it was not. Raises _Gone when the
    row is no longer there (purged meanwhile): the message is gone, not released."""
    if conn.execute(
        quarantine.update()
        .where(quarantine.c.id == row_id, quarantine.c.released_at.is_(None))
        .values(released_at=now, release_queue_id=queue_id)
    ).rowcount == 1:
        return True
    if conn.execute(sa.select(quarantine.c.id).where(quarantine.c.id == row_id)).first() is None:
        raise _Gone(row_id)
    return False


def _find_txn(conn: Connection, ident: str) -> Held | None:
    row = conn.execute(sa.select(*_LIST_COLUMNS).where(quarantine.c.ident == ident)).first()
    return _held(row) if row is not None else None


def _purge_txn(conn: Connection, before: datetime.datetime, batch: int) -> int:
    """Blocking: delete up to `batch` rows held before `before` (ix_quarantine_created_at);
    how many."""
    ids = sa.select(quarantine.c.id).where(quarantine.c.created_at < before) \
        .limit(batch).scalar_subquery()
    return int(conn.execute(quarantine.delete().where(quarantine.c.id.in_(ids))).rowcount)


def _undigested(domain_id: int, key: str) -> list[Any]:
    """The conditions of one recipient's held, unreleased, undigested rows in domain
    `domain_id`: its address in any spelling it was held under (`key`, its address_key)."""
    return [quarantine.c.domain_id == domain_id, quarantine.c.email_key == key,
            quarantine.c.released_at.is_(None), quarantine.c.digested_at.is_(None)]


def _served_since(domain_id: int, key: str, since: datetime.datetime) -> Any:
    """Whether the recipient had a digest queued at `since` or later: a row of it digested
    since then (read on the (domain_id, email_key, created_at) index)."""
    return sa.exists().where(quarantine.c.domain_id == domain_id,
                             quarantine.c.email_key == key,
                             quarantine.c.digested_at >= since)


def _digest_recipients_txn(
    conn: Connection, since: datetime.datetime | None = None
) -> list[tuple[int, str]]:
    """Blocking: (domain id, address_key) of each recipient with held, unreleased,
    undigested rows in a domain with send_resume whose owner is enabled (a disabled owner's
    rows wait, undigested, for the first digest once it is enabled); one recipient however
    its address was spelled (case, Unicode normal form, the domain in U- or A-labels).
    With `since` (the start of the run), leaving out the recipients the run served."""
    found = [(row.domain_id, row.email_key) for row in conn.execute(
        sa.select(quarantine.c.domain_id, quarantine.c.email_key)
        .select_from(quarantine.join(domains, domains.c.id == quarantine.c.domain_id)
                     .join(users, users.c.id == domains.c.owner_id))
        .where(quarantine.c.released_at.is_(None), quarantine.c.digested_at.is_(None),
               domains.c.send_resume.is_(True), users.c.is_active.is_(True))
        .group_by(quarantine.c.domain_id, quarantine.c.email_key)
        .order_by(quarantine.c.domain_id, quarantine.c.email_key)
    )]
    if since is None or not found:
        return found
    # One pass for the served ones (a NOT EXISTS per undigested row read every row of the
    # recipient for each: quadratic in a flood to one address).
    served = set(conn.execute(
        sa.select(quarantine.c.domain_id, quarantine.c.email_key).distinct()
        .where(quarantine.c.digested_at >= since)
    ).tuples())
    return [r for r in found if r not in served]


def _digest_items_txn(conn: Connection, domain_id: int, key: str) -> tuple[list[Any], int]:
    """Blocking: the newest MAX_DIGEST_ITEMS undigested rows of one recipient, oldest
    first, with their domain's settings, and how many older ones there are."""
    rows: list[Any] = list(conn.execute(
        sa.select(
            quarantine.c.id, quarantine.c.ident, quarantine.c.created_at, quarantine.c.email,
            quarantine.c.mailfrom, quarantine.c.subject, quarantine.c.reason,
            quarantine.c.domain_id, domains.c.name.label("domain_name"),
            domains.c.resume_template_subject, domains.c.resume_template_body,
            domains.c.resume_template_resume, domains.c.resume_link_hostname,
            domains.c.resume_reply_to, users.c.plan,
        )
        .select_from(quarantine.join(domains, domains.c.id == quarantine.c.domain_id)
                     .join(users, users.c.id == domains.c.owner_id))
        .where(*_undigested(domain_id, key), domains.c.send_resume.is_(True),
               users.c.is_active.is_(True))
        .order_by(quarantine.c.id.desc())
        .limit(MAX_DIGEST_ITEMS)
    ))
    if len(rows) < MAX_DIGEST_ITEMS:
        return rows[::-1], 0
    more = conn.execute(
        sa.select(sa.func.count()).select_from(quarantine)
        .where(*_undigested(domain_id, key), quarantine.c.id < rows[-1].id)
    ).scalar_one()
    return rows[::-1], int(more)


def _mark_digested_txn(
    conn: Connection, domain_id: int, key: str, items: Sequence[Any], more: int,
    now: datetime.datetime, since: datetime.datetime | None = None,
) -> bool:
    """Blocking, in the spool's transaction that queues the digest (its guard): the rows it
    lists (`items`, oldest first), and the older ones it counts, are digested. False (the
    digest is left out, and this undone) when a listed row was digested meanwhile, or (with
    `since`, the start of the run) the recipient had a digest queued since then."""
    if since is not None and conn.execute(
            sa.select(_served_since(domain_id, key, since))).scalar():
        return False
    ids = [r.id for r in items]
    marked = conn.execute(
        quarantine.update().where(quarantine.c.id.in_(ids), quarantine.c.digested_at.is_(None))
        .values(digested_at=now)
    ).rowcount
    if marked != len(ids):
        return False
    if more:
        conn.execute(
            quarantine.update()
            .where(*_undigested(domain_id, key), quarantine.c.id < items[0].id)
            .values(digested_at=now)
        )
    return True


@dataclass(frozen=True)
class DigestRun:
    """A digest run as recorded in quarantine_digest_runs."""

    id: int
    started_at: datetime.datetime


def _start_run_txn(
    conn: Connection, node: str, now: float, period: float | None
) -> DigestRun | None:
    """Blocking: claim this period's digest run (with `period`: nodes share the store's
    leases; None when they do not) and record it as the latest run, replacing the one
    before (finished, or taken over: this run serves whoever that one left). None when
    another node ran this period's."""
    if period is not None and not thd_claim_periodic(conn, DIGEST_JOB, node, now, period):
        return None
    started = datetime.datetime.fromtimestamp(now, datetime.UTC)
    conn.execute(quarantine_digest_runs.delete())
    run_id = conn.execute(
        quarantine_digest_runs.insert().values(node=node, started_at=started)
        .returning(quarantine_digest_runs.c.id)
    ).scalar_one()
    return DigestRun(int(run_id), started)


def _unfinished_run_txn(conn: Connection) -> DigestRun | None:
    """Blocking: the latest digest run if it has not queued every digest (cut short)."""
    row = conn.execute(
        sa.select(quarantine_digest_runs.c.id, quarantine_digest_runs.c.started_at)
        .where(quarantine_digest_runs.c.finished_at.is_(None))
        .order_by(quarantine_digest_runs.c.id.desc()).limit(1)
    ).first()
    return DigestRun(row.id, _utc(row.started_at)) if row is not None else None


def _finish_run_txn(conn: Connection, run_id: int, now: datetime.datetime) -> None:
    conn.execute(quarantine_digest_runs.update()
                 .where(quarantine_digest_runs.c.id == run_id).values(finished_at=now))


# The periodic job of the digest runs (one per period, whatever the nodes), and the lease of
# sending a run's digests (one node at a time, renewed while it sends).
DIGEST_JOB = "quarantine_digest"
SEND_JOB = "quarantine_digest_send"
SEND_HOLD = 600.0
# The periodic job of the retention purge, and the rows it deletes a transaction: each
# held message carries its body, so a batch is kept short (its locks, PostgreSQL's WAL,
# SQLite's write lock that the queue's commits wait for).
PURGE_JOB = "quarantine_purge"
PURGE_BATCH = 500


# -- the service -----------------------------------------------------------------------------


class QuarantineService(Service):
    """Keeps, lists and releases quarantined mail; purges and sends digests on timers."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: QuarantineSettings,
        plans: Plans,
        *,
        hostname: str,
        signer: LinkSigner | Path,
        spool: Any = None,
        leases: JobLeases | None = None,
        cpu: CpuPool | None = None,
    ) -> None:
        self.db = db
        self.cpu = cpu  # builds digests off the reactor (None: on the caller's thread)
        self.clock = clock
        self.settings = settings
        self.plans = plans
        self.hostname = hostname
        # The link key: a LinkSigner, or the key file's path, read (or made) by load_key()
        # or on first use.
        self._signer = signer if isinstance(signer, LinkSigner) else None
        self._key_path = signer if isinstance(signer, Path) else None
        self.spool = spool  # a Spool; set by the Core once the queue exists
        # Nodes sharing the store: digests and the retention purge each run once per
        # period, on the node that claims the "quarantine_digest" or "quarantine_purge" job.
        self.leases = leases
        self._purge: LoopingCall | None = None
        self._digest: LoopingCall | None = None
        self._runs = InFlight()  # a purge or digest run a stop waits for
        self._sending = False  # a digest run is sending (one at a time in a process)
        # The run (its start) and the recipients whose digest it could not build: done for
        # it, not built and logged again when the run is resumed for another's sake.
        self._unbuilt: tuple[datetime.datetime | None, set[tuple[int, str]]] = (None, set())

    def load_key(self) -> None:
        """Read or make the link key now (blocks: call before the reactor runs)."""
        if self._signer is None and self._key_path is not None:
            self._signer = LinkSigner.from_file(self._key_path)

    @property
    def signer(self) -> LinkSigner:
        self.load_key()
        assert self._signer is not None
        return self._signer

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    # -- keeping ---------------------------------------------------------------------------

    async def keep(self, items: Sequence[ToKeep], body: bytes) -> list[str]:
        """Store `body` for each recipient in `items`; returns the idents."""
        return await self.db.run("quarantine_keep", self.thd_keep, items, body,
                                 self.clock.seconds())

    @staticmethod
    def thd_keep(conn: Connection, items: Sequence[ToKeep], body: bytes,
                 now: float) -> list[str]:
        """Blocking: `keep` in the caller's transaction (the queue runner's, which records
        the recipients quarantined in it: `mailcore.queue.runner.thd_quarantine`)."""
        return _keep_txn(conn, items, body, datetime.datetime.fromtimestamp(now, datetime.UTC))

    # -- listing ---------------------------------------------------------------------------

    async def page(self, domain_id: int, email: str | None, start: int, count: int) -> Page:
        """Newest first from offset `start`; page numbers as the seed's example shows them
        (start 0, count 3 → page 1 of ceil(total / 3))."""
        emails, total = await self.db.read("quarantine_list", _list_txn, domain_id, email,
                                           start, count)
        return Page(emails, total, math.ceil(total / count), start // count + 1)

    async def find(self, ident: str) -> Held | None:
        return await self.db.read("quarantine_find", _find_txn, ident)

    # -- releasing -------------------------------------------------------------------------

    async def release(self, ident: str, *, owner_id: int | None = None) -> str:
        """Queue the kept message for its recipient once: RELEASED, ALREADY, MISSING, or
        SUSPENDED while its owner is disabled (a disabled account's mail waits: nothing of
        it is delivered, digests included, until `mailcore user enable`)."""
        status, row = await self._releasable(ident, owner_id, with_body=True)
        if row is None:
            return status
        queue_id = new_queue_id(self.clock.seconds())
        envelope = Envelope(row.mailfrom, (Recipient(row.email, row.domain_id),),
                            kind="release")
        # The claim commits with the queued message or not at all: a claim of its own,
        # committed first, would be left behind by a crash before the message is queued,
        # and the message could then never be released.
        guard = functools.partial(_claim_txn, row_id=row.id, now=self.now(), queue_id=queue_id)
        try:
            await self.spool.accept(queue_id, envelope, bytes(row.body), guard=guard)
        except Withdrawn:
            return ALREADY  # released meanwhile (another request, another node)
        except _Gone:
            return MISSING  # purged meanwhile (the retention ran between read and claim)
        except Exception as e:
            raise QuarantineError(f"the release could not be queued: {e}") from e
        log.info("quarantine {ident} released as {queue_id}", ident=ident, queue_id=queue_id)
        return RELEASED

    async def check_release(self, ident: str, *, owner_id: int | None = None) -> str:
        """What `release` would answer now (RELEASED: it would queue the message), with
        nothing queued or marked and the held message not read: a HEAD of the API's
        release."""
        status, _ = await self._releasable(ident, owner_id, with_body=False)
        return status

    async def _releasable(self, ident: str, owner_id: int | None, *,
                          with_body: bool) -> tuple[str, Any]:
        """(RELEASED, its row: with its body only `with_body`) for a message a release would
        queue now, else (ALREADY, MISSING or SUSPENDED, None); QuarantineError when there
        is no queue."""
        if not (ident.isascii() and ident.isdigit() and len(ident) == 20):
            return MISSING, None
        row = await self.db.read("quarantine_release_row", _release_row_txn, ident, owner_id,
                                 with_body)
        if row is None:
            return MISSING, None
        if row.released_at is not None:
            return ALREADY, None
        if not row.owner_active:
            return SUSPENDED, None
        if self.spool is None:
            raise QuarantineError("the release could not be queued: no queue to release into")
        return RELEASED, row

    def link_ident(self, token: str) -> str | None:
        """The ident a release link names, if genuine and unexpired."""
        return self.signer.verify(token, self.clock.seconds())

    def link(self, ident: str, hostname: str | None, at: float | None = None) -> str:
        """The release link of `ident`, valid `link_ttl` from time `at` (default now)."""
        host = hostname or self.settings.link_hostname or self.hostname
        at = self.clock.seconds() if at is None else at
        token = self.signer.sign(ident, at + self.settings.link_ttl)
        return f"https://{host}/quarantine/release/{token}"

    # -- retention -------------------------------------------------------------------------

    async def purge(self) -> int:
        """Delete what is older than the retention period, PURGE_BATCH rows a transaction;
        returns how many rows."""
        before = self.now() - datetime.timedelta(days=self.settings.retention_days)
        n = await delete_in_batches(self.db, "quarantine_purge", _purge_txn, before,
                                    batch=PURGE_BATCH)
        if n:
            log.info("quarantine purge removed {n} message(s)", n=n)
        return n

    async def leased_purge(self) -> int:
        """This period's purge, run only by the node that claims this period's run of the
        "quarantine_purge" job (any node when no leases are set): each node's purge would
        delete the same rows at the same time. How many rows went (0 on the others)."""
        if self.leases is not None and not await self.leases.claim_periodic(
                PURGE_JOB, self.clock.seconds(), self.settings.purge_interval):
            return 0
        return await self.purge()

    # -- digests ---------------------------------------------------------------------------

    async def leased_digests(self) -> int:
        """This period's digests, sent only by the node that claims this period's run of the
        "quarantine_digest" job (any node when no leases are set); returns how many were
        sent (0 on the others). The run is recorded as it is claimed, so that one cut
        short (a crash, kill -9) is finished by `resume_digests`."""
        node = self.leases.node_id if self.leases is not None else ""
        period = self.settings.digest_interval if self.leases is not None else None
        run = await self.db.run("quarantine_digest_start", _start_run_txn, node,
                                self.clock.seconds(), period)
        if run is None:
            return 0
        return await self._digest_run(run)

    async def resume_digests(self) -> int:
        """Finish the latest digest run if it was cut short: the digests of the recipients
        it had not served (none had a digest queued since it started), whatever was held
        for them meanwhile; returns how many were sent. Run at start and at each purge
        sweep; nothing to do (one read) when the run finished."""
        run = await self.db.read("quarantine_digest_unfinished", _unfinished_run_txn)
        if run is None:
            return 0
        log.info("resuming the quarantine digest run of {started}", started=run.started_at)
        return await self._digest_run(run)

    async def _digest_run(self, run: DigestRun) -> int:
        """Send `run`'s digests, one node and one call at a time (the "quarantine_digest_send"
        lease, renewed while sending), and mark the run finished once every digest is
        queued (a failure to queue one leaves the run to be resumed)."""
        if self._sending:
            return 0  # this node is sending a run's digests (a resumed one): it goes on
        if self.leases is not None and not await self.leases.claim(
                SEND_JOB, self.clock.seconds(), SEND_HOLD):
            return 0  # another node is sending (it takes the run up if it must)
        self._sending = True
        try:
            sent, complete = await self._send(run.started_at)
            if complete:
                await self.db.run("quarantine_digest_finish", _finish_run_txn, run.id,
                                  self.now())
        except Exception:
            await self._release_send()
            raise
        finally:
            self._sending = False
        await self._release_send()
        return sent

    async def _release_send(self) -> None:
        if self.leases is not None:
            await self.leases.release(SEND_JOB, self.clock.seconds())

    async def send_digests(self) -> int:
        """One digest per recipient with new quarantined mail; returns how many were sent."""
        sent, _ = await self._send(None)
        return sent

    async def _send(self, since: datetime.datetime | None) -> tuple[int, bool]:
        """The digests (of the recipients not served since `since`, when given): how many
        were queued, and whether every one that was due was (one that cannot be built
        counts as done: `_unbuilt`)."""
        recipients = await self.db.read("quarantine_digest_recipients",
                                        _digest_recipients_txn, since)
        sent, complete = 0, True
        renewed = self.clock.seconds()
        if since is None or self._unbuilt[0] != since:
            self._unbuilt = (since, set())
        unbuilt = self._unbuilt[1]
        for domain_id, key in recipients:
            if (domain_id, key) in unbuilt:
                continue
            if self.leases is not None and since is not None:
                now = self.clock.seconds()
                if now - renewed > SEND_HOLD / 2:
                    if not await self.leases.claim(SEND_JOB, now, SEND_HOLD):
                        return sent, False  # the lease lapsed: another node took over
                    renewed = now
            items, more = await self.db.read("quarantine_digest_items", _digest_items_txn,
                                             domain_id, key)
            if not items:
                continue  # released or digested meanwhile
            plan = self.plans[items[0].plan]
            if not plan.send_resume:
                continue  # the plan changed since sendResume was set
            build = functools.partial(self.digest_message, items, agency=plan.agency_options,
                                      more=more, at=self.clock.seconds())
            try:
                message = await (self.cpu.run(build) if self.cpu is not None else
                                 defer.maybeDeferred(build))
            except Exception:
                # One recipient's digest (what its mail or its domain's templates hold)
                # stops no other's. It counts as done for this run: resuming the run (at
                # start, at each purge sweep) would build it, fail and log again until the
                # next run, which tries it again.
                log.failure("building a quarantine digest for {email} failed",
                            email=items[0].email)
                unbuilt.add((domain_id, key))
                continue
            sender = self.settings.digest_sender
            envelope = Envelope(sender, (Recipient(items[0].email, domain_id),), kind="digest")
            # Marked digested in the transaction that queues the digest: a crash between
            # two commits would send the same digest again at the next run.
            guard = functools.partial(_mark_digested_txn, domain_id=domain_id,
                                      key=key, items=items, more=more,
                                      now=self.now(), since=since)
            try:
                await self.spool.accept(new_queue_id(self.clock.seconds()), envelope, message,
                                        guard=guard)
            except Withdrawn:
                continue  # digested meanwhile (by another run)
            except Exception:
                log.failure("queueing a quarantine digest for {email} failed",
                            email=items[0].email)
                complete = False
                continue
            sent += 1
        return sent, complete

    def digest_message(self, items: Sequence[Any], *, agency: bool, more: int = 0,
                       at: float | None = None) -> bytes:
        """The digest for one recipient, built from the domain's templates or defaults:
        `items` listed, `more` older messages counted (MORE_ITEMS), links signed and the
        Date set as at time `at` (default now). Blocking CPU work: the service runs it on
        its CPU pool."""
        at = self.clock.seconds() if at is None else at
        first = items[0]

        def custom(value: str | None) -> str | None:
            return value if agency and value else None

        item_template = custom(first.resume_template_resume) or DEFAULT_ITEM
        hostname = custom(first.resume_link_hostname)
        lines = []
        for row in items:
            lines.append(render(item_template, {
                "date": rfc3339(row.created_at), "mailfrom": shown(row.mailfrom or "<>"),
                "subject": _cut(shown(row.subject), MAX_ITEM_SUBJECT),
                "link": self.link(row.ident, hostname, at),
                "ident": row.ident, "email": row.email, "reason": row.reason,
            }))
        if more:
            lines.append(render(MORE_ITEMS, {"more": f"{more:,}", "domain": first.domain_name}))
        values = {"email": first.email, "domain": first.domain_name,
                  "count": str(len(items) + more)}
        subject_template = custom(first.resume_template_subject) or DEFAULT_SUBJECT
        subject = " ".join(render(subject_template, values).split())
        body = render(custom(first.resume_template_body) or DEFAULT_BODY,
                      {**values, "items": "\n".join(lines)})
        # The recipient's address and the domain's Reply-To as written, or not at all: a
        # value the email package reads otherwise (an RFC 2047 word in it is decoded) is
        # refused when it decodes to a line break, or shows what its words encode. The
        # Subject template is the owner's, RFC 2047 words included, unless they break it.
        to_as_written = header_as_written("To", first.email)
        if header_breaks("Subject", subject) or (
                not to_as_written and "{email}" in subject_template):
            subject = render(PLAIN_SUBJECT, values)
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.settings.digest_from or f"quarantine@{self.hostname}"
        msg["To"] = to_field(first.email)
        reply_to = custom(first.resume_reply_to)
        if reply_to and header_as_written("Reply-To", reply_to):
            msg["Reply-To"] = reply_to
        msg["Subject"] = subject
        msg["Date"] = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(at, datetime.UTC))
        msg["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body)
        return msg.as_bytes()

    # -- timers ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # The purge sweep also finishes a digest run cut short; so does the start, at once.
        self._purge = LoopingCall(self._tick, self._sweep, "purge")
        self._purge.clock = self.clock
        self._purge.start(self.settings.purge_interval, now=False)
        self._tick(self.resume_digests, "digest resume")
        self._digest = LoopingCall(self._tick, self.leased_digests, "digest")
        self._digest.clock = self.clock
        self._digest.start(self.settings.digest_interval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        """Stop the timers; the Deferred fires once a run in flight has ended (the store
        closes after this service stops)."""
        for loop in (self._purge, self._digest):
            if loop is not None and loop.running:
                loop.stop()
        self._purge = self._digest = None
        super().stopService()
        return defer.Deferred.fromCoroutine(self._runs.wait())

    async def _sweep(self) -> None:
        try:
            await self.leased_purge()
        finally:
            await self.resume_digests()

    def _tick(self, job: Any, name: str) -> defer.Deferred[None]:
        return self._runs.track(defer.Deferred.fromCoroutine(self._run(job, name)))

    async def _run(self, job: Any, name: str) -> None:
        try:
            await job()
        except Exception:
            log_failure(log, "quarantine {name} run failed", name=name)

"""Served domains and their address lists: the store's rows, and a snapshot for SMTP.

A domain is a customer's mail domain we are MX for; `redirect_host`/`redirect_port` is its
next hop (seed 004's `redirectTo`), and `tls` its outbound STARTTLS policy: None follows the
`[queue] tls` default, else one of `mailcore.queue.settings.TLS_POLICIES` overrides it for
this domain (customers' own servers often have self-signed certificates: "may"). The older
`require_tls` option is kept as a shorthand for the "verify" policy, so the two never
disagree. When a domain has an address list only those local parts are accepted; an empty
list accepts every local part.

The SMTP server asks `lookup` and `accepts` for every RCPT, so they answer from an in-memory
snapshot and never touch SQL. Several nodes may share one database, and the admin CLI is a
process of its own, so every change made through this service also raises the `domains`
change counter (`mailcore.store.counters`) in the same transaction, and logs the ids of the
domains it touched under the counter's new value (`domain_changes`). A running service
reads that counter every `poll_interval` seconds (0.5 by default: one primary-key read);
when it moved, it reads the logged ids since the value it holds and patches its snapshot
with those domains and their address lists alone, so a customer editing one list does not
make every node read every list. A change is therefore served on every node within about
`poll_interval` of its commit (and at once on the node that made it). The whole snapshot is
read when the log cannot say (a node `CHANGE_LOG_KEEP` changes behind, or one change of
more than `_MOST_PATCHED` domains), and every `refresh_interval` seconds (300 by default)
anyway, for rows written behind the service's back. A RCPT for a domain that is not in
the snapshot is refused at once (550) rather than looked up in the store: the poll keeps
that window under a second without putting SQL on the RCPT path, which unknown-domain
floods would otherwise reach.

The domains of a disabled user (`mailcore user disable`) stay in the snapshot, marked
suspended (`suspended`): the SMTP server answers their recipients 450 4.2.1, a temporary
refusal, so senders keep the mail and try again, and it arrives once the user is enabled
(within the senders' retry time, typically 4 to 5 days) with nothing held or charged here
meanwhile. Enabling or disabling a user logs its domains' change (`thd_owner_changed`).

With `[protecmail] verify_domains` on, a domain added without `verified=True` is stored
pending, with a random token its owner publishes in DNS (`mailcore.gateway.verification`);
it is left out of the snapshot (its mail is refused like an unknown domain's) until
`mark_verified` records the proof. With it off, a domain added through the API is served
at once but not vouched for: this gateway's own mail to it goes by MX, as the world's does
(`mailcore.queue.model.VOUCHED`); the operator's adds (`verified=True`) are vouched for.
"""

from __future__ import annotations

import builtins
import datetime
import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import idna
from sqlalchemy import ColumnElement, Connection, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.config import ConfigError, is_positive_number
from mailcore.emailpolicy import header_as_written, header_breaks
from mailcore.gateway.redirects import RedirectForbidden, RedirectPolicy
from mailcore.outages import told
from mailcore.periodic import PeriodicService
from mailcore.queue.settings import TLS_POLICIES
from mailcore.store import Database
from mailcore.store.counters import thd_bump_counter, thd_read_counter
from mailcore.store.schema import (
    domain_addresses,
    domain_changes,
    domains,
    mailapi_mail,
    mailboxes,
    users,
)
from mailcore.store.schema.mailapi import DRAFT, OUTBOX
from mailcore.text import has_control, has_control_multiline

log = Logger()

DEFAULT_PORT = 25
DEFAULT_POLL_INTERVAL = 0.5
DEFAULT_REFRESH_INTERVAL = 300.0
DEFAULT_MAX_PER_USER = 1000  # domains per user ([domains] max_per_user)
DEFAULT_MAX_ADDRESSES = 10_000  # addresses per domain ([domains] max_addresses)
DOMAINS_COUNTER = "domains"
# The change log keeps the ids of the last this many raises of the counter; a node further
# behind reads the whole snapshot again.
CHANGE_LOG_KEEP = 10_000
# A catch-up that finds more changed domains than this reads the whole snapshot instead.
_MOST_PATCHED = 500
ACTIONS = (0, 1)  # seed 004: 0 quarantine, 1 tag and deliver

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
# The local part of resumeReplyTo: a dot-atom, UTF-8 letters allowed (RFC 6531), nothing
# that would make the Reply-To field mean something else (a list, a group, a route).
_REPLY_ATOM = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f\s])+"
_REPLY_LOCAL = re.compile(rf"{_REPLY_ATOM}(?:\.{_REPLY_ATOM})*")
_PORT = re.compile(r"^[0-9]{1,5}$")

# Domain fields that `update` may change, and the optional text fields of seed 004.
_RESUME_FIELDS = (
    "resume_template_subject",
    "resume_template_body",
    "resume_template_resume",
    "resume_link_hostname",
    "resume_reply_to",
)
UPDATABLE_FIELDS = (
    "redirect_to",
    "tls",
    "require_tls",  # shorthand: true sets tls "verify", false drops a "verify" override
    "spam_action",
    "virus_action",
    "send_resume",
    *_RESUME_FIELDS,
)


class DomainError(Exception):
    """A domain or address operation was refused; `field` names the offending input."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class DomainLimitReached(DomainError):
    """A user's domains, or a domain's addresses, are at `[domains]`'s cap."""


@dataclass(frozen=True)
class Domain:
    """One served domain. `name` and `redirect_host` are ASCII (A-labels), lower case."""

    id: int
    owner_id: int
    name: str
    redirect_host: str
    redirect_port: int
    tls: str | None
    spam_action: int
    virus_action: int
    send_resume: bool
    resume_template_subject: str | None
    resume_template_body: str | None
    resume_template_resume: str | None
    resume_link_hostname: str | None
    resume_reply_to: str | None
    created_at: datetime.datetime
    # Proof of ownership: None, None for a domain that never needed it; a token and no
    # verified_at for one waiting for its DNS record (not served meanwhile).
    verify_token: str | None = None
    verified_at: datetime.datetime | None = None

    @property
    def pending(self) -> bool:
        """Whether the domain waits for proof of ownership (and is not served meanwhile)."""
        return self.verify_token is not None and self.verified_at is None

    @property
    def unicode_name(self) -> str:
        """The name as people write it (U-labels), for display."""
        try:
            return idna.decode(self.name)
        except idna.IDNAError:
            return self.name

    @property
    def require_tls(self) -> bool:
        """Whether mail to the next hop goes only over verified TLS (the "verify" policy)."""
        return self.tls == "verify"

    @property
    def redirect_to(self) -> str:
        """The next hop in seed 004's `redirectTo` spelling (the port only when not 25);
        "" for a hosted domain."""
        if self.hosted:
            return ""
        return format_redirect(self.redirect_host, self.redirect_port)

    @property
    def hosted(self) -> bool:
        """Whether the domain's mail is kept here (its Mail API mailboxes) instead of being
        relayed: it has no next hop."""
        return self.redirect_host == HOSTED


# -- names ---------------------------------------------------------------------------------


def _to_ascii(name: str, what: str, field: str) -> str:
    """IDNA (UTS 46) A-label form of a host name, lower case, checked label by label."""
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError(f"{what} is empty.", field)
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):  # said in our words, not the idna library's
        raise DomainError(f"{what} {name!r} is not a valid host name (letters, digits and "
                          "hyphens, in dot-separated labels of 1 to 63).", field) from None
    if len(ascii_name) > 253:
        raise DomainError(f"{what} {name!r} is longer than 253 characters.", field)
    labels = ascii_name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise DomainError(
                f"{what} {name!r} is not a valid host name: bad label {label!r}.", field
            )
    if labels[-1].isdigit():
        raise DomainError(f"{what} {name!r} is not a host name (numeric last label).", field)
    return ascii_name


def normalise_domain(name: str) -> str:
    """The stored form of a domain name: A-labels, lower case, no trailing dot.

    Raises DomainError for anything that is not a fully qualified DNS name (an IP address,
    a single label, bad characters, over-long labels).
    """
    ascii_name = _to_ascii(name, "Domain name", "domain")
    if "." not in ascii_name:
        raise DomainError(
            f"Domain name {name!r} must be fully qualified (at least two labels).", "domain"
        )
    return ascii_name


def normalise_host_name(name: str) -> str:
    """A host name (one label, such as localhost, will do) in A-labels, lower case, no
    trailing dot. Raises DomainError for anything else (an IP address, bad characters)."""
    return _to_ascii(name, "Host name", "host")


def normalise_local_part(local_part: str) -> str:
    """The stored form of a local part: a dot-atom (RFC 5321), at most 64 octets, lower case.

    Matching is case-insensitive, as every MX does in practice, so the list keeps one case.
    """
    text = local_part.strip()
    if not text:
        raise DomainError("Local part is empty.", "address")
    if "@" in text:
        raise DomainError(
            f"Give the local part only (the text before the @), not {local_part!r}.", "address"
        )
    if len(text.encode("utf-8")) > 64:
        raise DomainError(f"Local part {local_part!r} is longer than 64 octets.", "address")
    if not text.isascii() or not _LOCAL_PART.match(text):
        raise DomainError(
            f"Local part {local_part!r} is not a valid dot-atom (letters, digits and "
            "!#$%&'*+/=?^_`{|}~- separated by single dots).",
            "address",
        )
    return text.lower()


def _parse_port(text: str, value: str) -> int:
    if not _PORT.match(text) or not 1 <= int(text) <= 65535:
        raise DomainError(f"redirectTo {value!r}: port must be a number from 1 to 65535.",
                          "redirectTo")
    return int(text)


# The next hop of a hosted domain (`mailcore domain add --local`): none. Its mailboxes'
# mail is stored here; other addresses of it bounce (5.1.1).
HOSTED = ""


def _redirect_address(text: str, value: str) -> str:
    """The IP address `text` of redirectTo `value`, compressed; ValueError when it is not
    one, DomainError when it carries a zone index."""
    address = ipaddress.ip_address(text)
    if "%" in text:
        raise DomainError(
            f"redirectTo {value!r}: an IPv6 zone index (%...) is not accepted; give the "
            "address alone.", "redirectTo")
    return address.compressed


def parse_redirect(value: str) -> tuple[str, int]:
    """Parse seed 004's `redirectTo` into (host, port); the port is 25 when absent.

    Accepted spellings: `host`, `host:port`, `1.2.3.4`, `1.2.3.4:port`, `[1.2.3.4]`,
    `[1.2.3.4]:port`, `[2001:db8::1]`, `[IPv6:2001:db8::1]:port`, and a bare IPv6 address
    (no port then: brackets are needed to give one). Host names are IDNA-normalised; IP
    addresses come back in their compressed form, without brackets. An IPv6 zone index
    (`fe80::1%eth0`) is refused: it names an interface of whichever host reads it, and
    Python's ipaddress takes any text after the `%` (CR LF, thousands of characters).
    """
    text = value.strip()
    if not text:
        raise DomainError("redirectTo is empty.", "redirectTo")
    port = DEFAULT_PORT
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise DomainError(f"redirectTo {value!r}: missing ']'.", "redirectTo")
        inner, rest = text[1:close], text[close + 1:]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        try:
            host = _redirect_address(inner, value)
        except ValueError:
            raise DomainError(
                f"redirectTo {value!r}: only an IP address may stand in brackets.", "redirectTo"
            ) from None
        if rest:
            if not rest.startswith(":"):
                raise DomainError(
                    f"redirectTo {value!r}: unexpected text after ']'.", "redirectTo"
                )
            port = _parse_port(rest[1:], value)
        return host, port
    try:
        return _redirect_address(text, value), port
    except ValueError:
        pass
    if text.count(":") > 1:
        raise DomainError(
            f"redirectTo {value!r}: write an IPv6 address with a port as [address]:port.",
            "redirectTo",
        )
    host_text, sep, port_text = text.partition(":")
    if sep:
        port = _parse_port(port_text, value)
    try:
        return ipaddress.IPv4Address(host_text).compressed, port
    except ValueError:
        pass
    return _to_ascii(host_text, "redirectTo host", "redirectTo"), port


def format_redirect(host: str, port: int) -> str:
    """The inverse of `parse_redirect`: brackets around IPv6, the port only when not 25."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    shown = f"[{host}]" if is_v6 else host
    return shown if port == DEFAULT_PORT else f"{shown}:{port}"


# -- option checking -----------------------------------------------------------------------


def _check_action(value: Any, field: str) -> int:
    if isinstance(value, bool) or value not in ACTIONS:
        raise DomainError(f"{field} must be 0 (quarantine) or 1 (tag and deliver).", field)
    return int(value)


def _check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise DomainError(f"{field} must be true or false.", field)
    return value


def check_tls_policy(value: Any) -> str | None:
    """A domain's TLS policy: None (or "", "default") for the queue default, else a policy."""
    if value is None or value in ("", "default"):
        return None
    if not isinstance(value, str) or value not in TLS_POLICIES:
        raise DomainError(
            f"tls must be one of {', '.join(TLS_POLICIES)}, or default (the [queue] tls "
            "setting).",
            "tls",
        )
    return value


def _check_text(value: Any, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DomainError(f"{field} must be a string.", field)
    if field == "resume_link_hostname":
        return _to_ascii(value, "resume_link_hostname", field)
    if field == "resume_reply_to":
        return _check_reply_to(value)
    if len(value) > 100_000:
        raise DomainError(f"{field} is longer than 100000 characters.", field)
    # The digest's templates: its Subject is one header line (a control character there
    # would split or corrupt it), its body and item lines text someone reads.
    if field == "resume_template_subject" and header_breaks("Subject", value):
        raise DomainError(f"{field} may not hold control characters, nor RFC 2047 words "
                          "that decode to them.", field)
    if has_control_multiline(value):
        raise DomainError(
            f"{field} may not hold control characters other than TAB, CR and LF.", field)
    return value


def _check_reply_to(value: str) -> str:
    """resumeReplyTo, the Reply-To of the domain's digests: one address, local@domain."""
    text = value.strip()
    local, _, domain = text.rpartition("@")
    bad = DomainError("resume_reply_to must be an e-mail address (local-part@domain).",
                      "resume_reply_to")
    # Not an RFC 2047 word either ("=?utf-8?b?DQpCY2M6...?=@x.test" decodes to a line
    # break): the field is written as spelt or left out of the digest.
    if (len(text) > 254 or has_control(text) or len(local.encode("utf-8")) > 64
            or not _REPLY_LOCAL.fullmatch(local) or not header_as_written("Reply-To", text)):
        raise bad
    try:
        _to_ascii(domain, "resume_reply_to", "resume_reply_to")
    except DomainError:
        raise bad from None
    return text


def _column_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check domain options (UPDATABLE_FIELDS spelling) and turn them into column values.

    `require_tls` true becomes tls "verify" (refused beside a different `tls`); false is
    left to the caller, since it only drops a stored "verify".
    """
    unknown = set(options) - set(UPDATABLE_FIELDS)
    if unknown:
        name = sorted(unknown)[0]
        raise DomainError(f"Unknown domain field: {name}.", name)
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key == "redirect_to":
            if not isinstance(value, str):
                raise DomainError("redirectTo must be a string.", "redirectTo")
            values["redirect_host"], values["redirect_port"] = parse_redirect(value)
        elif key in ("spam_action", "virus_action"):
            values[key] = _check_action(value, key)
        elif key == "send_resume":
            values[key] = _check_bool(value, key)
        elif key == "tls":
            values[key] = check_tls_policy(value)
        elif key != "require_tls":
            values[key] = _check_text(value, key)
    if "require_tls" in options:
        required = _check_bool(options["require_tls"], "require_tls")
        if "tls" in values and (values["tls"] == "verify") != required:
            raise DomainError(
                f"require_tls {str(required).lower()} contradicts tls "
                f"{values['tls'] or 'default'} (require_tls means tls verify).",
                "tls",
            )
        if required:
            values["tls"] = "verify"
    return values


def _utc(value: datetime.datetime) -> datetime.datetime:
    return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value


def _domain(row: Any) -> Domain:
    m = row._mapping
    return Domain(
        id=m["id"],
        owner_id=m["owner_id"],
        name=m["name"],
        redirect_host=m["redirect_host"],
        redirect_port=int(m["redirect_port"]),
        tls=m["tls"],
        spam_action=int(m["spam_action"]),
        virus_action=int(m["virus_action"]),
        send_resume=bool(m["send_resume"]),
        resume_template_subject=m["resume_template_subject"],
        resume_template_body=m["resume_template_body"],
        resume_template_resume=m["resume_template_resume"],
        resume_link_hostname=m["resume_link_hostname"],
        resume_reply_to=m["resume_reply_to"],
        created_at=_utc(m["created_at"]),
        verify_token=m["verify_token"],
        verified_at=_utc(m["verified_at"]) if m["verified_at"] is not None else None,
    )


# The domains that may be served: never needed the proof, or have it.
SERVABLE: ColumnElement[bool] = or_(
    domains.c.verify_token.is_(None), domains.c.verified_at.is_not(None)
)


def _find_domain_txn(conn: Connection, name: str, owner_id: int | None, *,
                     lock: bool = False) -> Domain:
    """Blocking: the domain row, or DomainError when absent (or owned by someone else);
    `lock`: the row locked FOR NO KEY UPDATE until the transaction ends (rows referencing
    it, which take FOR KEY SHARE, do not wait for it)."""
    query = select(domains).where(domains.c.name == name)
    row = conn.execute(query.with_for_update(key_share=True) if lock else query).first()
    if row is None or (owner_id is not None and row._mapping["owner_id"] != owner_id):
        raise DomainError(f"No such domain: {name}.", "domain")
    return _domain(row)


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    by_name: dict[str, Domain]
    addresses: dict[int, frozenset[str]]
    mailboxes: dict[int, frozenset[str]]
    suspended: frozenset[int]


def _generation_txn(conn: Connection) -> int:
    """Blocking: the domain change counter."""
    return thd_read_counter(conn, DOMAINS_COUNTER)


def _bump_generation_txn(conn: Connection, domain_ids: Iterable[int]) -> None:
    """Blocking: raise the change counter and log the domains changed under its new value,
    inside the transaction that changes them; log rows `CHANGE_LOG_KEEP` raises old go.

    The raise is an UPDATE of the counter's row, so writers take its row lock in turn: a
    value is only seen once every lower one is committed, with its log rows."""
    changed = [{"domain_id": domain_id} for domain_id in set(domain_ids)]
    if not changed:  # nothing to tell: each raise logs at least one id (see _changes_txn)
        return
    seq = thd_bump_counter(conn, DOMAINS_COUNTER)
    conn.execute(insert(domain_changes), [{"seq": seq, **row} for row in changed])
    conn.execute(delete(domain_changes).where(domain_changes.c.seq <= seq - CHANGE_LOG_KEEP))


def thd_mailboxes_changed(conn: Connection, domain_ids: Iterable[int | None]) -> None:
    """Blocking, inside the transaction that adds or removes hosted mailboxes of these
    domains (a mailbox's `domain_id`; None, a removed domain's, changes none): log their
    change, so that every node's RCPT snapshot learns of it (`mailcore.mailapi.mailboxes`
    calls it)."""
    _bump_generation_txn(conn, (i for i in domain_ids if i is not None))


def thd_owner_changed(conn: Connection, owner_id: int) -> None:
    """Blocking, inside the transaction that disables or enables user `owner_id`: log its
    domains' change, so that every node's RCPT snapshot suspends or serves them again."""
    ids = conn.execute(select(domains.c.id).where(domains.c.owner_id == owner_id)).scalars()
    _bump_generation_txn(conn, ids)


def _thd_unbind_mailboxes(conn: Connection, domain_ids: Sequence[int]) -> None:
    """Blocking, in the transaction that deletes these domains, before it does: their Mail
    API mailboxes stay (with their mail, readable) but are no longer theirs (the delete
    sets `mailboxes.domain_id` NULL, for good: a new row of the name is another domain),
    so nothing is delivered to them or sent from them any more. Their outbox mail not yet
    handed to the queue goes back to being drafts, as a send from them now would.

    The domain rows are locked first (FOR UPDATE): a send from one of their mailboxes
    holds its domain's row (FOR KEY SHARE) until its mail is in the outbox, so it commits
    before and its mail is seen here, or finds the domain gone."""
    conn.execute(select(domains.c.id).where(domains.c.id.in_(domain_ids)).with_for_update())
    theirs = select(mailboxes.c.id).where(mailboxes.c.domain_id.in_(domain_ids))
    m = mailapi_mail.c
    # Locked as read (PostgreSQL: the sender's take of one waits), so that the bytes of the
    # messages dropped are those of the rows changed (their mailboxes' used_bytes).
    going = conn.execute(select(m.id, m.mailbox_id, func.coalesce(func.length(m.raw), 0))
                         .where(m.status == OUTBOX, m.mailbox_id.in_(theirs))
                         .with_for_update()).all()
    ids = [row[0] for row in going]
    for start in range(0, len(ids), 500):
        conn.execute(update(mailapi_mail).where(m.id.in_(ids[start:start + 500]))
                     .values(status=DRAFT, queue_id=None, outbox_seq=None, raw=None,
                             size=m.size - func.coalesce(func.length(m.raw), 0)))
    freed: dict[int, int] = {}
    for _id, box, length in going:
        freed[box] = freed.get(box, 0) + int(length)
    for box, length in freed.items():  # (mailcore.mailapi.counts keeps used_bytes so)
        conn.execute(update(mailboxes).where(mailboxes.c.id == box)
                     .values(used_bytes=mailboxes.c.used_bytes - length))


def _thd_suspended(conn: Connection, ids: Iterable[int] | None = None) -> frozenset[int]:
    """Blocking: the ids of the domains (among `ids`, if given) whose owner is disabled."""
    query = select(domains.c.id).join(users, users.c.id == domains.c.owner_id) \
        .where(users.c.is_active.is_(False))
    if ids is not None:
        query = query.where(domains.c.id.in_(list(ids)))
    return frozenset(conn.execute(query).scalars())


def _addresses_of(rows: Iterable[Any]) -> dict[int, frozenset[str]]:
    lists: dict[int, set[str]] = {}
    for domain_id, local_part in rows:
        lists.setdefault(domain_id, set()).add(local_part.lower())
    return {k: frozenset(v) for k, v in lists.items()}


def _thd_hosted_mailboxes(
    conn: Connection, found: Iterable[Domain], *, every: bool = False
) -> dict[int, frozenset[str]]:
    """Blocking: the local parts of the mailboxes of the hosted domains in `found`, by
    domain id; a mailbox belongs to the domain row it was created under (`domain_id`), not
    to a later row of the same name. `every`: `found` is every domain (a whole snapshot),
    so every bound mailbox is read rather than asked for by domain."""
    hosted = {d.id for d in found if d.hosted}
    if not hosted:
        return {}
    query = select(mailboxes.c.domain_id, mailboxes.c.address)
    query = query.where(mailboxes.c.domain_id.is_not(None)) if every \
        else query.where(mailboxes.c.domain_id.in_(sorted(hosted)))
    boxes: dict[int, set[str]] = {}
    for domain_id, address in conn.execute(query):
        if domain_id in hosted:
            boxes.setdefault(domain_id, set()).add(address.rpartition("@")[0])
    return {k: frozenset(v) for k, v in boxes.items()}


def _snapshot_txn(conn: Connection, servable_only: bool) -> _Snapshot:
    """Blocking: the change counter, then every domain (only those that may be served, with
    `servable_only`) and address list, for the RCPT snapshot.

    The counter is read first: under READ COMMITTED (PostgreSQL) a change committed between
    the statements then shows in the rows and moves the counter past the value kept, which
    costs one more reload at worst, never a missed change.
    """
    generation = _generation_txn(conn)
    query = select(domains).where(SERVABLE) if servable_only else select(domains)
    by_name = {d.name: d for d in map(_domain, conn.execute(query))}
    rows = conn.execute(select(domain_addresses.c.domain_id, domain_addresses.c.local_part))
    return _Snapshot(generation, by_name, _addresses_of(rows),
                     _thd_hosted_mailboxes(conn, by_name.values(), every=True),
                     _thd_suspended(conn))


@dataclass(frozen=True)
class _Changes:
    """What changed after a snapshot's generation: the ids logged, and those domains (the
    ones still there and servable) with their address lists, as of `generation`."""

    generation: int
    ids: frozenset[int]
    domains: tuple[Domain, ...]
    addresses: dict[int, frozenset[str]]
    mailboxes: dict[int, frozenset[str]]
    suspended: frozenset[int] = frozenset()


def _changes_txn(conn: Connection, since: int, servable_only: bool) -> _Changes | None:
    """Blocking: the changes logged after generation `since`, or None when the log cannot
    tell them all (pruned past `since`, a counter that went back, too many domains).

    As in `_snapshot_txn` the counter is read first; every raise up to it has its rows
    (each raise logs at least one id), so a complete log has one distinct `seq` for each.
    Rows read later may be newer than `generation`: the next catch-up reads them again."""
    generation = _generation_txn(conn)
    behind = generation - since
    if behind < 0 or behind > CHANGE_LOG_KEEP:
        return None
    rows = conn.execute(
        select(domain_changes.c.seq, domain_changes.c.domain_id)
        .where(domain_changes.c.seq > since, domain_changes.c.seq <= generation)
    ).all()
    if len({row.seq for row in rows}) != behind:
        return None
    ids = frozenset(row.domain_id for row in rows)
    if len(ids) > _MOST_PATCHED:
        return None
    if not ids:
        return _Changes(generation, ids, (), {}, {})
    query = select(domains).where(domains.c.id.in_(ids))
    if servable_only:
        query = query.where(SERVABLE)
    found = tuple(map(_domain, conn.execute(query)))
    addresses = conn.execute(
        select(domain_addresses.c.domain_id, domain_addresses.c.local_part)
        .where(domain_addresses.c.domain_id.in_([d.id for d in found]))
    )
    return _Changes(generation, ids, found, _addresses_of(addresses),
                    _thd_hosted_mailboxes(conn, found),
                    _thd_suspended(conn, [d.id for d in found]))


@dataclass(frozen=True)
class DomainSettings:
    """The `[domains]` table: how fresh each node's RCPT snapshot is kept (seconds), and how
    many domains a user may have and addresses a domain may list.

    The caps bound what one account can make every node hold in memory and reload on each
    change (the whole snapshot is read again after every write). Seed 004 states no limit
    for any plan, so the defaults are far above what a customer has (1,000 domains, 10,000
    addresses each); an operator serving larger accounts raises them.
    """

    poll_interval: float = DEFAULT_POLL_INTERVAL
    refresh_interval: float = DEFAULT_REFRESH_INTERVAL
    max_per_user: int = DEFAULT_MAX_PER_USER
    max_addresses: int = DEFAULT_MAX_ADDRESSES

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> DomainSettings:
        """From `[domains]`; an unknown key, an interval that is not a positive number of
        seconds or a cap that is not a positive integer raises ConfigError naming it."""
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key in ("max_per_user", "max_addresses"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"[domains] {key} must be a positive integer")
                values[key] = value
                continue
            if key not in ("poll_interval", "refresh_interval"):
                raise ConfigError(f"[domains] unknown key {key!r}")
            if not is_positive_number(value):
                raise ConfigError(f"[domains] {key} must be a positive number of seconds")
            values[key] = float(value)
        return cls(**values)


# -- the service ---------------------------------------------------------------------------


class DomainService(PeriodicService):
    """Domains and address lists in the store, with a snapshot for per-RCPT checks.

    As a twisted Service it loads the snapshot when started, then every `poll_interval`
    seconds on `clock` reads the change counter and reloads when it moved (or when
    `refresh_interval` has passed since the last reload), until stopped. The daemon reads
    both from the TOML table `[domains]` (`DomainSettings`). Used without starting (the
    admin CLI), it is a plain store API and keeps no snapshot; its changes still raise the
    counter, which is how a running daemon hears of them.
    """

    name = "domains"

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        *,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        redirects: RedirectPolicy | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        verify_domains: bool = False,
        max_per_user: int = DEFAULT_MAX_PER_USER,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
    ) -> None:
        if refresh_interval <= 0:
            raise ValueError("refresh_interval must be positive")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.db = db
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.redirects = redirects  # the next hops refused when set (None: no check)
        self.poll_interval = poll_interval
        # [protecmail] verify_domains: new domains wait for proof of ownership, and domains
        # waiting for it are not served.
        self.verify_domains = verify_domains
        # [domains] caps: domains per owner, addresses per domain (DomainLimitReached).
        self.max_per_user = max_per_user
        self.max_addresses = max_addresses
        self._by_name: dict[str, Domain] = {}
        self._by_id: dict[int, Domain] = {}
        self._addresses: dict[int, frozenset[str]] = {}
        self._mailboxes: dict[int, frozenset[str]] = {}  # of hosted domains, by domain id
        self._suspended: frozenset[int] = frozenset()  # ids of disabled owners' domains
        self._generation = -1
        self._loaded_at = 0.0
        self._loaded = False
        # How often the whole snapshot was read, and how often patched from the log.
        self.reloads = 0
        self.patches = 0
        self._failures = 0
        self._failure_logged = False  # a line said the run of failures began
        self._lock = defer.DeferredLock()
        self._checking: defer.Deferred[None] | None = None
        self._waiters: list[defer.Deferred[None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    # A check in flight at stop finishes on its own (the store waits for it).

    def interval(self) -> float:
        return self.poll_interval

    def tick(self) -> defer.Deferred[None]:
        """One poll of the change counter; failures are logged and never stop the loop."""
        return self._start_check()

    def _start_check(self) -> defer.Deferred[None]:
        """Begin a check unless one is already running; the Deferred never fails."""
        if self._checking is None:
            checking = defer.Deferred.fromCoroutine(self._check_logged())
            if not checking.called:
                self._checking = checking
                checking.addBoth(self._check_done)
            return checking
        return self._checking

    def _check_done(self, result: object) -> object:
        self._checking = None
        return result

    def idle(self) -> defer.Deferred[None]:
        """Fires once no check or reload started by the timer is in flight."""
        if self._checking is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()

        def finished(result: object) -> object:
            done.callback(None)
            return result

        self._checking.addBoth(finished)
        return done

    async def _check_logged(self) -> None:
        # The first failure is logged with its traceback; the rest of a run of failures
        # (a database down for a minute would be 120 of them) only when it ends. A store
        # outage's are left to the store's own lines (mailcore.outages).
        try:
            await self._check()
        except Exception as e:
            self._failures += 1
            if not self._failure_logged and not told(e):
                self._failure_logged = True
                log.failure(
                    "could not load the domain snapshot (retrying every {interval} s)",
                    Failure(e), interval=self.poll_interval,
                )
            return
        if self._failure_logged:
            log.info("domain snapshot loaded again after {count} failed attempts",
                     count=self._failures)
        self._failures = 0
        self._failure_logged = False

    async def _check(self) -> None:
        """Catch up when the change counter moved; reload everything when nothing is loaded
        yet or the periodic full reload is due."""
        if self._loaded and self.clock.seconds() - self._loaded_at < self.refresh_interval:
            if await self.db.read("domain_generation", _generation_txn) != self._generation:
                await self.catch_up()
            return
        await self.refresh()

    # -- the snapshot (no SQL on these paths) ---------------------------------------------

    @property
    def loaded(self) -> bool:
        """Whether a snapshot has been loaded at least once (RCPTs can be answered)."""
        return self._loaded

    def when_loaded(self) -> defer.Deferred[None]:
        """Fires once a snapshot is loaded; fails if the load attempt it waits on fails."""
        if self._loaded:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        self._start_check()
        return waiter

    def lookup(self, domain_name: str) -> Domain | None:
        """The served domain called `domain_name` (any case, A- or U-labels), or None."""
        found = self._by_name.get(domain_name)
        if found is not None:
            return found
        key = domain_name.lower()
        if key.endswith("."):
            key = key[:-1]
        found = self._by_name.get(key)
        if found is None and not key.isascii():
            try:
                found = self._by_name.get(normalise_domain(key))
            except DomainError:
                return None
        return found

    def accepts(self, local_part: str, domain_name: str) -> bool:
        """Whether mail to `local_part@domain_name` is accepted: served, and listed if the
        domain has an address list; for a hosted domain (no next hop), one of its
        mailboxes, as mail to any other address could only bounce, to a sender who may
        be forged. postmaster@ a served domain is always accepted (RFC 5321 4.5.1) and goes
        to the domain's next hop like the rest of its mail (its mailbox, if hosted; the
        operator's postmaster if it has none: `postmaster_elsewhere`)."""
        found = self.lookup(domain_name)
        if found is None:
            return False
        local = local_part.lower()
        if found.hosted:
            return local in self._mailboxes.get(found.id, ()) or local == "postmaster"
        allowed = self._addresses.get(found.id)
        return not allowed or local in allowed or local == "postmaster"

    def verifiable(self, domain_name: str) -> bool:
        """Whether the recipients of `domain_name` are verified at its next hop when
        `[smtp] verify_recipients` is on (mailcore.gateway.callout): served, relayed (a hosted
        domain's mailboxes are its list) and without an address list (a list is the
        answer)."""
        found = self.lookup(domain_name)
        return found is not None and not found.hosted and not self._addresses.get(found.id)

    def suspended(self, domain_name: str) -> bool:
        """Whether the served domain `domain_name` belongs to a disabled user (its mail is
        refused for now, 4xx, until the user is enabled)."""
        found = self.lookup(domain_name)
        return found is not None and found.id in self._suspended

    def postmaster_elsewhere(self, domain_name: str) -> bool:
        """Whether mail to postmaster@domain_name goes to the operator's postmaster: the
        domain is hosted and has no postmaster mailbox, so the mail RFC 5321 4.5.1 has us
        accept would have nowhere to go in it but back to its sender."""
        found = self.lookup(domain_name)
        return (found is not None and found.hosted
                and "postmaster" not in self._mailboxes.get(found.id, ()))


    def domain_by_id(self, domain_id: int) -> Domain | None:
        """The snapshot's domain with this id (for the queue's routing), or None."""
        return self._by_id.get(domain_id)

    async def catch_up(self) -> None:
        """Patch the snapshot with the domains changed since it was taken (the change log);
        the whole snapshot is read when the log cannot tell, or none is loaded yet. Runs
        one at a time with reloads, in order."""
        await self._lock.acquire()
        try:
            if self._loaded:
                changes = await self.db.read(
                    "domain_changes", _changes_txn, self._generation, self.verify_domains
                )
                if changes is not None:
                    self._patch(changes)
                    return
            await self._reload()
        finally:
            self._lock.release()

    def _patch(self, changes: _Changes) -> None:
        """Put `changes` into the snapshot: each logged id's old entry out, its row in."""
        for domain_id in changes.ids:
            old = self._by_id.pop(domain_id, None)
            if old is not None and self._by_name.get(old.name) is old:
                del self._by_name[old.name]
            self._addresses.pop(domain_id, None)
            self._mailboxes.pop(domain_id, None)
        for domain in changes.domains:
            self._by_name[domain.name] = domain
            self._by_id[domain.id] = domain
        self._addresses.update(changes.addresses)
        self._mailboxes.update(changes.mailboxes)
        self._suspended = (self._suspended - changes.ids) | changes.suspended
        self._generation = changes.generation
        self.patches += 1

    async def refresh(self) -> None:
        """Reload the whole snapshot from the store. Reloads run one at a time, in order."""
        await self._lock.acquire()
        try:
            await self._reload()
        finally:
            self._lock.release()

    async def _reload(self) -> None:
        """The whole snapshot from the store; the caller holds the lock."""
        started = self.clock.seconds()
        try:
            snapshot = await self.db.read(
                "domain_snapshot", _snapshot_txn, self.verify_domains
            )
        except Exception as e:
            waiters, self._waiters = self._waiters, []
            if not self._loaded:
                for waiter in waiters:
                    waiter.errback(Failure(e))
            else:
                for waiter in waiters:
                    waiter.callback(None)
            raise
        self._by_name = snapshot.by_name
        self._by_id = {d.id: d for d in snapshot.by_name.values()}
        self._addresses = snapshot.addresses
        self._mailboxes = snapshot.mailboxes
        self._suspended = snapshot.suspended
        self._generation = snapshot.generation
        self._loaded_at = started
        self._loaded = True
        self.reloads += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _changed(self) -> None:
        """After a committed change: catch the snapshot up if one is in use."""
        if self._loaded or self.running:
            await self.catch_up()

    # -- domains --------------------------------------------------------------------------

    def _check_next_hop(self, values: Mapping[str, Any]) -> None:
        """A DomainError when the next hop in `values` may not be set (the operator's
        policy, or one of our own listeners: `mailcore.gateway.redirects`)."""
        if self.redirects is None or "redirect_host" not in values:
            return
        try:
            self.redirects.check(values["redirect_host"], values["redirect_port"])
        except RedirectForbidden as e:
            raise DomainError(str(e), "redirectTo") from None

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    async def add(
        self, name: str, owner_id: int, redirect_to: str, *, verified: bool = False,
        hosted: bool = False, **options: Any,
    ) -> Domain:
        """Serve a new domain for `owner_id`. Options: the other UPDATABLE_FIELDS.

        A `hosted` domain has no next hop (`redirect_to` is ignored): its mail is kept in
        its Mail API mailboxes.

        `verified`: an operator vouches for it (the CLI), so that this gateway's own mail
        to it takes its next hop directly (`mailcore.queue.model.VOUCHED`). Else, with
        `verify_domains` on, the domain is stored pending with a fresh token; with it off it
        is served at once, but this gateway's own mail to it goes by MX
        (`mailcore.queue.routing`).

        DomainLimitReached when the owner already has `max_per_user` domains (pending ones
        count: they hold their names too).
        """
        domain_name = normalise_domain(name)
        if hosted:
            values = _column_values(options)
            values.update(redirect_host=HOSTED, redirect_port=DEFAULT_PORT)
        else:
            values = _column_values({"redirect_to": redirect_to, **options})
            self._check_next_hop(values)
        values.setdefault("spam_action", 0)
        values.setdefault("virus_action", 0)
        values.setdefault("send_resume", False)
        values.update(name=domain_name, owner_id=owner_id, created_at=self.now())
        if verified:
            values["verified_at"] = values["created_at"]
        elif self.verify_domains:
            values["verify_token"] = secrets.token_hex(16)

        limit = self.max_per_user

        def txn(conn: Connection) -> Domain:
            # The owner's row is locked, so that concurrent adds for one user count one
            # after another (under PostgreSQL's READ COMMITTED each counted the same rows);
            # FOR NO KEY UPDATE, which rows referencing it (their FOR KEY SHARE) do not wait
            # for.
            if conn.execute(select(users.c.id).where(users.c.id == owner_id)
                            .with_for_update(key_share=True)).first() is None:
                raise DomainError(f"No such user (id {owner_id}).", "owner")
            taken = conn.execute(select(domains.c.id).where(domains.c.name == domain_name))
            if taken.first() is not None:
                raise DomainError(f"Domain {domain_name} is already served.", "domain")
            owned = conn.execute(
                select(func.count()).select_from(domains).where(domains.c.owner_id == owner_id)
            ).scalar() or 0
            if owned >= limit:
                raise DomainLimitReached(
                    f"A user may have at most {limit} domains; delete one to add another.",
                    "domain")
            try:
                conn.execute(insert(domains).values(**values))
            except IntegrityError:
                raise DomainError(f"Domain {domain_name} is already served.", "domain") from None
            added = _find_domain_txn(conn, domain_name, None)
            _bump_generation_txn(conn, [added.id])
            return added

        domain = await self.db.run("add_domain", txn)
        await self._changed()
        return domain

    async def get(self, name: str, *, owner_id: int | None = None) -> Domain | None:
        """The domain from the store (not the snapshot); with `owner_id`, only if theirs."""
        try:
            domain_name = normalise_domain(name)
        except DomainError:
            return None

        def txn(conn: Connection) -> Domain | None:
            try:
                return _find_domain_txn(conn, domain_name, owner_id)
            except DomainError:
                return None

        return await self.db.read("get_domain", txn)

    async def list(self, owner_id: int | None = None) -> list[Domain]:
        """Every domain, or those of one owner, by name."""

        def txn(conn: Connection) -> list[Domain]:
            query = select(domains).order_by(domains.c.name)
            if owner_id is not None:
                query = query.where(domains.c.owner_id == owner_id)
            return [_domain(r) for r in conn.execute(query)]

        return await self.db.read("list_domains", txn)

    async def update(
        self, name: str, changes: Mapping[str, Any], *, owner_id: int | None = None
    ) -> Domain:
        """Change some of a domain's UPDATABLE_FIELDS; returns the domain as stored.

        `require_tls=False` drops a "verify" TLS policy back to the queue default and leaves
        any other policy alone.
        """
        domain_name = normalise_domain(name)
        values = _column_values(changes)
        self._check_next_hop(values)
        drop_verify = changes.get("require_tls") is False and "tls" not in values

        def txn(conn: Connection) -> Domain:
            found = _find_domain_txn(conn, domain_name, owner_id)
            if drop_verify and found.tls == "verify":
                values["tls"] = None
            if values:
                conn.execute(update(domains).where(domains.c.id == found.id).values(**values))
                _bump_generation_txn(conn, [found.id])
            return _find_domain_txn(conn, domain_name, None)

        domain = await self.db.run("update_domain", txn)
        await self._changed()
        return domain

    async def remove(self, name: str, *, owner_id: int | None = None) -> None:
        """Stop serving a domain; its address list goes with it. Its Mail API mailboxes
        stay, with their mail, but inactive for good (`_thd_unbind_mailboxes`)."""
        domain_name = normalise_domain(name)

        def txn(conn: Connection) -> None:
            found = _find_domain_txn(conn, domain_name, owner_id)
            _thd_unbind_mailboxes(conn, [found.id])
            conn.execute(delete(domain_addresses).where(domain_addresses.c.domain_id == found.id))
            conn.execute(delete(domains).where(domains.c.id == found.id))
            _bump_generation_txn(conn, [found.id])

        await self.db.run("remove_domain", txn)
        await self._changed()

    # -- proof of ownership ---------------------------------------------------------------

    async def pending_domains(self) -> builtins.list[Domain]:
        """The domains waiting for proof of ownership, oldest first."""

        def txn(conn: Connection) -> builtins.list[Domain]:
            query = (
                select(domains)
                .where(domains.c.verify_token.is_not(None), domains.c.verified_at.is_(None))
                .order_by(domains.c.created_at, domains.c.id)
            )
            return [_domain(r) for r in conn.execute(query)]

        return await self.db.read("pending_domains", txn)

    async def mark_verified(self, domain: Domain) -> Domain | None:
        """Record that `domain`'s token was found, so that it is served. None when the
        domain is gone, or is no longer waiting for that token (removed and added again)."""
        now = self.now()

        def txn(conn: Connection) -> Domain | None:
            result = conn.execute(
                update(domains)
                .where(domains.c.id == domain.id, domains.c.verify_token == domain.verify_token,
                       domains.c.verified_at.is_(None))
                .values(verified_at=now)
            )
            if result.rowcount == 0:
                return None
            _bump_generation_txn(conn, [domain.id])
            return _find_domain_txn(conn, domain.name, None)

        verified = await self.db.run("verify_domain", txn)
        if verified is not None:
            await self._changed()
        return verified

    async def drop_unverified(self, added_before: datetime.datetime) -> builtins.list[str]:
        """Forget the domains added up to `added_before` that are still waiting for their
        proof (so that an unproven claim does not keep the name from its owner forever);
        their names, by name."""

        def txn(conn: Connection) -> builtins.list[str]:
            stale = conn.execute(
                select(domains.c.id, domains.c.name).where(
                    domains.c.verify_token.is_not(None), domains.c.verified_at.is_(None),
                    domains.c.created_at <= added_before,
                )
            ).all()
            if not stale:
                return []
            ids = [row.id for row in stale]
            _thd_unbind_mailboxes(conn, ids)
            conn.execute(delete(domain_addresses).where(domain_addresses.c.domain_id.in_(ids)))
            conn.execute(delete(domains).where(domains.c.id.in_(ids)))
            _bump_generation_txn(conn, ids)
            return sorted(row.name for row in stale)

        dropped = await self.db.run("drop_unverified_domains", txn)
        if dropped:
            await self._changed()
        return dropped

    # -- addresses ------------------------------------------------------------------------

    async def add_address(
        self, domain: str, local_part: str, *, owner_id: int | None = None
    ) -> bool:
        """Add a local part to the domain's list; False when it was already there (also
        when a concurrent call listed it first). DomainLimitReached when the list already
        has `max_addresses` entries."""
        domain_name = normalise_domain(domain)
        local = normalise_local_part(local_part)
        limit = self.max_addresses

        def txn(conn: Connection) -> bool:
            # The domain's row is locked, so that concurrent adds to its list count one
            # after another (as the owner's row is for add).
            found = _find_domain_txn(conn, domain_name, owner_id, lock=True)
            exists = conn.execute(
                select(domain_addresses.c.id).where(
                    domain_addresses.c.domain_id == found.id,
                    domain_addresses.c.local_part == local,
                )
            ).first()
            if exists is not None:
                return False
            listed = conn.execute(
                select(func.count()).select_from(domain_addresses)
                .where(domain_addresses.c.domain_id == found.id)
            ).scalar() or 0
            if listed >= limit:
                raise DomainLimitReached(
                    f"{domain_name} may list at most {limit} addresses; remove one to add "
                    "another.", "address")
            try:
                with conn.begin_nested():
                    conn.execute(
                        insert(domain_addresses).values(domain_id=found.id, local_part=local))
            except IntegrityError:
                # PostgreSQL (READ COMMITTED): a concurrent request listed it (or removed
                # the domain) since the SELECT above, and committed first.
                _find_domain_txn(conn, domain_name, owner_id)
                return False
            _bump_generation_txn(conn, [found.id])
            return True

        added = await self.db.run("add_domain_address", txn)
        if added:
            await self._changed()
        return added

    async def remove_address(
        self, domain: str, local_part: str, *, owner_id: int | None = None
    ) -> None:
        """Remove a local part from the domain's list; DomainError when it is not listed."""
        domain_name = normalise_domain(domain)
        local = normalise_local_part(local_part)

        def txn(conn: Connection) -> None:
            found = _find_domain_txn(conn, domain_name, owner_id)
            result = conn.execute(
                delete(domain_addresses).where(
                    domain_addresses.c.domain_id == found.id,
                    domain_addresses.c.local_part == local,
                )
            )
            if result.rowcount == 0:
                raise DomainError(f"{local}@{domain_name} is not in the address list.", "address")
            _bump_generation_txn(conn, [found.id])

        await self.db.run("remove_domain_address", txn)
        await self._changed()

    async def list_addresses(
        self, domain: str, *, owner_id: int | None = None
    ) -> builtins.list[str]:
        """The domain's address list, sorted (empty: every local part is accepted)."""
        domain_name = normalise_domain(domain)

        def txn(conn: Connection) -> builtins.list[str]:
            found = _find_domain_txn(conn, domain_name, owner_id)
            rows = conn.execute(
                select(domain_addresses.c.local_part)
                .where(domain_addresses.c.domain_id == found.id)
                .order_by(domain_addresses.c.local_part)
            )
            return [r[0] for r in rows]

        return await self.db.read("list_domain_addresses", txn)

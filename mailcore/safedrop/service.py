"""The drop service: bundles, recipients and files of a user, and sending a bundle.

Secrets are kept as the schema says: the password is hashed with Argon2id on the CPU pool,
the secure message encrypted with the daemon's secret box (the Fernet key in
`{data_dir}/fetch.key` or `[fetch] secret_key`), and each recipient's link token is random
(256 bits) and stored only as its SHA-256. Neither the password, the secure message nor a
link token is ever logged or returned by a read.

Sending claims the bundle once (`UPDATE … WHERE sent_at IS NULL`) together with the
recipients' link digests and queues one notification per recipient (kind "notification",
the owner's address as envelope sender so bounces reach them), all in one transaction (on
SQLite, in the spool's write lane): every recipient is told, or the bundle stays unsent.
The same transaction counts the recipients against the owner's `[limits]` caps
(mailcore.sendcaps); a send past one is refused (SendCapped) and the bundle stays unsent.
Safedrop's mail is routed as the Mail API's outbox is: a recipient of a served domain goes
to that domain's next hop (or mailbox), any other through relayhost or MX.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import Connection
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.emailpolicy import (
    SMTP,
    header_as_written,
    header_breaks,
    header_reorders,
    to_field,
)
from mailcore.fetch.secrets import SecretBox, SecretError
from mailcore.files import secret_key_file
from mailcore.identity.passwords import hash_password, verify_password
from mailcore.identity.secrets import digest
from mailcore.mailapi.addresses import mailbox_key
from mailcore.periodic import Sweeper
from mailcore.queue.model import thd_vouched_domain_for
from mailcore.queue.spool import Spool, Withdrawn
from mailcore.ratelimits import SharedBuckets
from mailcore.safedrop import access as side
from mailcore.safedrop import store
from mailcore.safedrop.access import Access, Grants
from mailcore.safedrop.files import DropFiles
from mailcore.safedrop.model import (
    DEFAULT_RECEIPT_WHEN,
    Bundle,
    DropFile,
    DropRecipient,
    SafedropSettings,
    TooLarge,
    bundle_full,
)
from mailcore.safedrop.sms import SmsError, SmsGateway
from mailcore.sendcaps import SPELL_QUIET, SendCapped, SendCaps, Spells, user_named
from mailcore.smtp.envelope import Envelope, Recipient
from mailcore.smtp.queueid import new_queue_id
from mailcore.store import Database
from mailcore.store.errands import Errand
from mailcore.text import has_bidi_control, shown
from mailcore.uploads import shielded
from mailcore.workers import CpuPool

log = Logger()

# The fields of a bundle a client may set, and what a new bundle has.
BUNDLE_DEFAULTS: dict[str, Any] = {
    "subject": "",
    "message": "",
    "expiry_date": None,
    "email_receipt_when": DEFAULT_RECEIPT_WHEN,
    "read_remove": True,
    "allow_comments": False,
    "require_token_auth": False,
}
SECRET_FIELDS = ("secure_message", "password")
RECIPIENT_DEFAULTS: dict[str, Any] = {"telephone": "", "valid_for": 0}
LINK_PATH = "/drop/"
# The ways a one-time code goes (`SafedropService.send_code`).
CODE_BY_SMS = "sms"
CODE_BY_MAIL = "mail"
# Bundles read at once by `SafedropService.bundles` (each message up to 100,000 characters:
# a batch is a few megabytes at most).
BUNDLES_BATCH = 32
# The shared buckets (mailcore.ratelimits) of the texts sent for each owner's drops and for
# each recipient's link, and the period of `[safedrop] max_sms_per_user_per_day` and
# `max_sms_per_link_per_day`.
SMS_LIMIT = "safedrop-sms"
SMS_LINK_LIMIT = "safedrop-sms-link"
SMS_PERIOD = 86400.0


# The stored digest of a link token (any text has one: a token that is not ours matches no
# link rather than failing to encode).
link_digest = digest


def new_link() -> tuple[str, bytes]:
    """A recipient's link token (256 random bits) and the digest that is stored."""
    token = secrets.token_urlsafe(32)
    return token, link_digest(token)


def subject_line(prefix: str, subject: str) -> str:
    """The Subject of a safedrop mail: `prefix`, and the drop's subject (`shown`) after a
    colon unless its RFC 2047 encoded words decode to what `shown` keeps out: a line break
    or control character (it would not stay one header field) or a bidirectional control
    (the subject, and a mail reader's text after it, would read otherwise). The mail's text
    shows it as written."""
    line = f"{prefix}: {subject}" if subject else prefix
    if header_breaks("Subject", line) or header_reorders("Subject", line):
        return prefix
    return line


def rfc3339(value: datetime.datetime) -> str:
    utc = value.astimezone(datetime.UTC)
    return utc.isoformat(timespec="seconds").replace("+00:00", "Z")


def thd_recipient(conn: Connection, address: str) -> Recipient:
    """Blocking: `address` as the queue routes it: with its served domain when that is
    proved or vouched for (that domain's next hop, as for the Mail API's outbox), else
    relayhost or MX (`mailcore.queue.model.VOUCHED`)."""
    key = mailbox_key(address)
    domain = (key or address).rpartition("@")[2].lower()
    return Recipient(address, thd_vouched_domain_for(conn, domain))


class SafedropService:
    """Everything the safedrop API does, for one owner at a time."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        cpu: CpuPool,
        box: SecretBox,
        spool: Spool,
        settings: SafedropSettings,
        *,
        data_dir: Path,
        hostname: str,
        files_dir: Path | None = None,
        io: CpuPool | None = None,
        sms: SmsGateway | None = None,
        caps: SendCaps | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.cpu = cpu
        self.io = io or cpu
        self.box = box
        self.spool = spool
        self.settings = settings
        self.hostname = hostname
        # The files under `files_dir` (default: the data directory), the grants' key in
        # the data directory.
        self.files = DropFiles((files_dir or data_dir) / "safedrop")
        self.sms = sms
        # The caps on the recipients of a user's mail ([limits]; None: no cap).
        self.caps = caps
        # The texts sent for each owner's drops and for each recipient's link, counted in
        # the store (every node sharing it takes from one bucket): `[safedrop]
        # max_sms_per_user_per_day` and `max_sms_per_link_per_day`.
        self.sms_sent = SharedBuckets(db, clock)
        self.sms_capped = Counter(
            "mailcore_safedrop_sms_capped",
            "One-time codes mailed, not texted, past a cap on texts: cap=\"link\", the "
            "recipient's link had reached [safedrop] max_sms_per_link_per_day; cap=\"user\", "
            "the drop's owner max_sms_per_user_per_day", ["cap"], registry=registry)
        for cap in ("link", "user"):
            self.sms_capped.labels(cap=cap)
        # The owners, and the recipients (by id), in a spell of refusals.
        self._sms_spells = Spells(clock)
        self._link_spells = Spells(clock)
        self._key_path = data_dir / "safedrop.key"
        self._grants: Grants | None = None

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def prepare(self) -> None:
        """Make the file directories, clear half-written uploads, read (or make) the key
        of the recipients' grants. Blocks (start-up)."""
        self.files.prepare()
        self._grants = Grants(secret_key_file(self._key_path))

    @property
    def grants(self) -> Grants:
        if self._grants is None:
            raise RuntimeError("SafedropService.prepare() was not called")
        return self._grants

    # -- bundles ---------------------------------------------------------------------------

    async def _stored(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Column values for `changes`: secrets hashed or encrypted ("" clears them)."""
        values = {k: v for k, v in changes.items() if k not in SECRET_FIELDS}
        if "secure_message" in changes:
            text = changes["secure_message"]
            values["secure_message"] = self.box.encrypt(text) if text else None
            values["has_secure_message"] = bool(text)
        if "password" in changes:
            password = changes["password"]
            values["password_hash"] = (
                await self.cpu.run(hash_password, password) if password else None
            )
        return values

    async def create_bundle(self, owner_id: int, changes: Mapping[str, Any]) -> Bundle:
        values = {**BUNDLE_DEFAULTS, **await self._stored(changes), "created_at": self.now()}
        return await self.db.run("safedrop_create_bundle", store.create_bundle_txn, owner_id,
                                 values, self.settings.max_bundles_per_user)

    async def update_bundle(
        self, owner_id: int, bundle_id: int, changes: Mapping[str, Any]
    ) -> Bundle:
        values = await self._stored(changes)
        return await self.db.run(
            "safedrop_update_bundle", store.update_bundle_txn, owner_id, bundle_id, values
        )

    async def bundle(self, owner_id: int, bundle_id: int) -> Bundle:
        return await self.db.read("safedrop_bundle", store.get_bundle_txn, owner_id, bundle_id)

    async def bundles(self, owner_id: int) -> AsyncGenerator[Bundle]:
        """Every bundle of the owner, by id, read BUNDLES_BATCH at a time (a user may hold
        thousands, each message up to 100,000 characters: a reply writes them as they come
        instead of holding them all). Each batch is its own read: a bundle made while they
        are read shows if it comes after those already read."""
        after = 0
        while True:
            batch = await self.db.read("safedrop_bundles", store.list_bundles_txn, owner_id,
                                       after, BUNDLES_BATCH)
            for bundle in batch:
                yield bundle
            if len(batch) < BUNDLES_BATCH:
                return
            after = batch[-1].id

    # -- recipients ------------------------------------------------------------------------

    async def add_recipient(
        self, owner_id: int, bundle_id: int, values: Mapping[str, Any]
    ) -> DropRecipient:
        return await self.db.run(
            "safedrop_add_recipient", store.add_recipient_txn, owner_id, bundle_id,
            {**RECIPIENT_DEFAULTS, **values}, self.settings.max_recipients,
        )

    async def update_recipient(
        self, owner_id: int, bundle_id: int, recipient_id: int, changes: Mapping[str, Any]
    ) -> DropRecipient:
        return await self.db.run(
            "safedrop_update_recipient", store.update_recipient_txn, owner_id, bundle_id,
            recipient_id, changes,
        )

    async def recipient(self, owner_id: int, bundle_id: int, recipient_id: int) -> DropRecipient:
        return await self.db.read(
            "safedrop_recipient", store.get_recipient_txn, owner_id, bundle_id, recipient_id
        )

    async def recipients(self, owner_id: int, bundle_id: int) -> list[DropRecipient]:
        return await self.db.read(
            "safedrop_recipients", store.list_recipients_txn, owner_id, bundle_id
        )

    # -- files -----------------------------------------------------------------------------

    async def add_file(
        self, owner_id: int, bundle_id: int, content_type: str, body: BinaryIO
    ) -> DropFile:
        """Store the `the_file` part of a multipart body and record it. Nothing stays of an
        upload that fails (bad body, over a limit, the bundle sent meanwhile). Once the body
        is being stored the work is not cancelled (the client going away cancels the
        request's Deferred, as `[web] reply_timeout` does): it ends with the file and its
        row, or with neither. A caller that gives up before the store begins the row's
        write takes the upload back (an errand: mailcore.store.errands)."""
        errand = Errand()
        return await shielded(
            self._add_file(errand, owner_id, bundle_id, content_type, body), errand)

    async def upload_room(self, owner_id: int, bundle_id: int) -> tuple[int, TooLarge]:
        """How many bytes an upload to the bundle may still store (the bundle's room or its
        owner's, whichever is less), and the 413 past it. DropNotFound (not the owner's),
        DropSent, DropError (`max_files` reached), and the 413 when the owner has no room
        left at all."""
        used = await self.db.read(
            "safedrop_upload_room", store.upload_room_txn, owner_id, bundle_id,
            self.settings.max_files,
        )
        room = self.settings.max_bundle_size - used
        mine = await self.db.read("safedrop_user_stored", store.user_stored_txn, owner_id)
        user_room = self.settings.max_user_size - mine
        if user_room <= 0:
            raise store.user_full(self.settings.max_user_size)
        if user_room < room:
            return user_room, store.user_full(self.settings.max_user_size)
        return room, bundle_full()

    async def check_upload(self, owner_id: int, bundle_id: int, least: int) -> None:
        """Refuse, before its body is read, an upload that would be refused after: the
        bundle is not the owner's or is sent, holds `max_files`, or has no room for the
        `least` bytes the file will have at least (what its declared length leaves once
        the multipart framing is taken off, and decoded: mailcore.uploads.decoded_least)."""
        if least > self.settings.max_file_size:
            limit = self.settings.max_file_size
            raise TooLarge("the_file", f"The file is larger than {limit} bytes.")
        room, full = await self.upload_room(owner_id, bundle_id)
        if least > room:
            raise full

    async def _add_file(
        self, errand: Errand, owner_id: int, bundle_id: int, content_type: str,
        body: BinaryIO,
    ) -> DropFile:
        room, full = await errand.run(self.upload_room(owner_id, bundle_id))
        stored = await self.io.run(
            self.files.receive, body, content_type, bundle_id, self.settings.max_file_size,
            room, full,
        )
        values = {
            "name": stored.name, "content_type": stored.content_type, "size": stored.size,
            "sha256": stored.sha256, "created_at": self.now(),
        }
        try:
            return await errand.run(self._record_file(owner_id, bundle_id, values))
        except BaseException:
            in_use = await self.db.read(
                "safedrop_file_in_use", store.file_hash_in_use_txn, bundle_id, stored.sha256
            )
            if not in_use:
                await self.io.run(self.files.take_back, bundle_id, stored)
            raise

    async def _record_file(self, owner_id: int, bundle_id: int, values: dict[str, Any]
                           ) -> DropFile:
        return await self.db.run(
            "safedrop_add_file", store.add_file_txn, owner_id, bundle_id, values,
            self.settings.max_bundle_size, self.settings.max_user_size,
            self.settings.max_files,
        )

    async def file(self, owner_id: int, bundle_id: int, file_id: int) -> DropFile:
        return await self.db.read("safedrop_file", store.get_file_txn, owner_id, bundle_id,
                                  file_id)

    async def file_list(self, owner_id: int, bundle_id: int) -> list[DropFile]:
        return await self.db.read("safedrop_files", store.list_files_txn, owner_id, bundle_id)

    # -- sending ---------------------------------------------------------------------------

    def link(self, token: str) -> str:
        host = self.settings.link_hostname or self.hostname
        return f"https://{host}{LINK_PATH}{token}"

    async def send(self, owner_id: int, bundle_id: int) -> int:
        """Send the bundle: one notification per recipient; returns how many were queued.
        The claim and every notification commit together, or none of them does: a send
        that fails leaves the bundle unsent, to be sent again. SQLite: in the spool's
        write lane (a rider of its next group commit: its writers take turns, and a commit
        of its own costs an fsync). PostgreSQL: a transaction of its own, which holds one
        user's send-cap lock (mailcore.store.sends) and no other: in a group commit it
        held its owner's with the other riders', and two nodes' groups sending for two
        users in turn deadlocked (one holding each lock, waiting for the other's)."""
        now = self.now()
        at = self.clock.seconds()

        def txn(conn: Connection) -> int:
            if self.caps is not None:  # the owner's send-cap lock first, before any row's
                self.caps.thd_hold(conn, owner_id)
            bundle, sender, recipients, files = store.claim_send_txn(
                conn, owner_id, bundle_id, now, new_link)
            if self.caps is not None:
                verdict = self.caps.thd_take(conn, owner_id, len(recipients), at)
                if not verdict.allowed:
                    raise SendCapped(verdict)  # the claim is rolled back with it
            mails = [(Envelope(sender, (thd_recipient(conn, r.email),), kind="notification"),
                      self.notification(bundle, sender, r, files, self.link(token)))
                     for r, token in recipients]
            self.spool.thd_queue(conn, mails, at)
            return len(mails)

        try:
            if self.spool.takes_riders:
                return await self.spool.ride("safedrop_send", txn)
            return await self.db.run("safedrop_send", txn)
        except SendCapped as e:
            assert self.caps is not None
            await self.caps.refused(owner_id, "safedrop", e.verdict)
            raise

    async def check_send(self, owner_id: int, bundle_id: int) -> None:
        """Refuse as `send` would now (DropNotFound, DropSent, DropError, SendCapped),
        sending nothing and changing nothing."""
        now = self.now()
        at = self.clock.seconds()

        def txn(conn: Connection) -> None:
            recipients = store.check_send_txn(conn, owner_id, bundle_id, now)
            if self.caps is not None:
                verdict = self.caps.thd_check(conn, owner_id, recipients, at)
                if not verdict.allowed:
                    raise SendCapped(verdict)

        await self.db.read("safedrop_check_send", txn)

    def notification(
        self, bundle: Bundle, sender: str, recipient: DropRecipient,
        files: Sequence[DropFile], link: str,
    ) -> bytes:
        """The mail that tells one recipient about a drop (no secret but its own link)."""
        expires = [d for d in (bundle.expiry_date, recipient.expires_at) if d is not None]
        lines = [
            f"{shown(sender)} has sent you a secure drop.",
            "",
        ]
        subject = shown(bundle.subject)
        if subject:
            lines += [f"Subject: {subject}", ""]
        if bundle.message:
            lines += [bundle.message, ""]
        lines.append(f"Files ({len(files)}):")
        lines += [f"  {shown(f.name)} ({f.size} bytes)" for f in files]
        lines += ["", "Open the drop here:", f"  {link}", ""]
        if bundle.has_password:
            lines.append("The sender has protected it with a password.")
        if bundle.require_token_auth:
            lines.append("A one-time code will be sent to you when you open it.")
        if expires:
            lines.append(f"It is available until {rfc3339(min(expires))}.")
        else:
            lines.append("It does not expire.")
        if bundle.read_remove:
            lines.append("It is removed once you have downloaded every file; each file can "
                         f"be downloaded once ({self.settings.max_download_attempts} tries "
                         "in all if a download breaks off).")
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.settings.notify_from or f"safedrop@{self.hostname}"
        # The sender's address (its account's email) as written, or not at all: one stored
        # before such addresses were refused may spell an RFC 2047 word, which the email
        # package decodes (to a line break it refuses: the send failed); and a user may
        # give their account an address holding a bidirectional control (Protecmail's
        # profile), which would have the recipient's mail reader show it, and the subject
        # after it, reordered. The text shows it without them.
        sent_by = header_as_written("Reply-To", sender) and not has_bidi_control(sender)
        if sent_by:
            msg["Reply-To"] = sender
        msg["To"] = to_field(recipient.email)
        msg["Subject"] = subject_line("Secure drop from " + sender if sent_by
                                      else "Secure drop", subject)
        msg["Date"] = email.utils.format_datetime(self.now())
        msg["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content("\n".join(lines) + "\n")
        return msg.as_bytes()

    # -- the recipient's side --------------------------------------------------------------

    async def open_link(self, token: str, *, viewing: bool = False) -> Access:
        """The drop a link opens (LinkInvalid, DropGone). `viewing`: the recipient sees its
        contents now (read receipts 1, at most one an hour per recipient, and 2)."""
        if not token or len(token) > 100 or not token.isascii():
            raise side.LinkInvalid()
        digest, now = link_digest(token), self.now()
        if not viewing:
            return await self.db.run("safedrop_open_link", side.open_link_txn, digest, now,
                                     False)
        at = self.clock.seconds()

        def txn(conn: Connection) -> Access:
            found = side.open_link_txn(conn, digest, now, True)
            if found.tell_opened:
                self._thd_tell_sender(conn, found.sender, found.bundle,
                                      f"{found.recipient.email} opened your drop.", at)
            return found

        # The receipt is queued in the transaction that records the opening it goes with
        # (`opened_at`, `opened_receipt_at`), a rider of the spool's write lane:
        # recorded first and queued after, a crash between the two commits lost the
        # receipt for good (the recipient's row said it was sent).
        return await self.spool.ride("safedrop_open_link", txn)

    async def check_password(self, found: Access, password: str) -> str:
        """side.CODE_OK (no password, or the right one), CODE_WRONG, or CODE_LOCKED while
        too many wrong passwords lock the link (side.PASSWORD_LOCK: counted in the store
        before the hash is checked, taken back when it was right)."""
        if found.password_hash is None:
            return side.CODE_OK
        recipient_id = found.recipient.id
        if await self.db.run("safedrop_password_guess", side.take_guess_txn, recipient_id,
                             side.PASSWORD_LOCK, self.now()) is not None:
            return side.CODE_LOCKED
        if not await self.cpu.run(verify_password, found.password_hash, password):
            return side.CODE_WRONG
        await self.db.run("safedrop_password_right", side.guess_right_txn, recipient_id,
                          side.PASSWORD_LOCK)
        return side.CODE_OK

    def by_sms(self, found: Access) -> bool:
        """Whether this recipient's codes go by text message (a number and a gateway)."""
        return bool(found.recipient.telephone) and self.sms is not None

    async def send_code(self, found: Access) -> str | None:
        """Send the recipient a fresh one-time code (valid CODE_SECONDS): by text message
        when it has a number and a gateway is configured, else (or if the gateway fails,
        or the link or the drop's owner reached its cap on texts: `_may_text`) by mail.
        The way it went (CODE_BY_SMS, CODE_BY_MAIL), for the page to say; None (nothing
        sent) while too many wrong codes lock the link."""
        code = f"{secrets.randbelow(10**6):06d}"
        now = self.now()
        expires = now + datetime.timedelta(seconds=side.CODE_SECONDS)
        if not await self.db.run("safedrop_set_code", side.set_code_txn, found.recipient.id,
                                 self.grants.code_digest(found.recipient.id, code), expires,
                                 now):
            return None
        if self.sms is not None and found.recipient.telephone \
                and await self._may_text(found):
            try:
                await self.sms.send(found.recipient.telephone,
                                    f"Your safedrop code: {code} (works once, 10 minutes)")
                return CODE_BY_SMS
            except SmsError as e:
                log.warn("safedrop code for recipient {recipient} goes by mail: {why}",
                         recipient=found.recipient.id, why=str(e))
        body = (f"Your code to open the secure drop from {shown(found.sender)} is:\n\n"
                f"    {code}\n\n"
                f"It works once, until {rfc3339(expires)}.\n")
        await self._mail(found.recipient.email, "Your safedrop code", body)
        return CODE_BY_MAIL

    async def _may_text(self, found: Access) -> bool:
        """Whether a text for the drop fits its recipient link's `[safedrop]
        max_sms_per_link_per_day` and its owner's `max_sms_per_user_per_day` (each N at
        once, then one more every day/N seconds), counting it against both if it does, in
        one transaction: every text handed to the gateway counts, whatever it answers. The
        link's cap is asked first, and a text refused by either is counted by neither, so
        a link holder past its own cap spends none of the owner's texts (the owner's other
        recipients still get theirs). Past a cap the code goes by mail, the refusal is
        counted in /metrics by cap, and the first of the link's or owner's spell logged."""
        link_cap = self.settings.max_sms_per_link_per_day
        user_cap = self.settings.max_sms_per_user_per_day
        recipient_id, owner_id = found.recipient.id, found.bundle.owner_id
        takes: list[tuple[str, int, int, float]] = []
        if link_cap:
            takes.append((SMS_LINK_LIMIT, recipient_id, link_cap, SMS_PERIOD))
        if user_cap:
            takes.append((SMS_LIMIT, owner_id, user_cap, SMS_PERIOD))
        refused = await self.sms_sent.take_all(takes) if takes else None
        if refused is None:
            return True
        if takes[refused][0] == SMS_LINK_LIMIT:
            self.sms_capped.labels(cap="link").inc()
            if self._link_spells.starts(recipient_id):
                log.warn("the link of safedrop recipient {recipient} (bundle {bundle} of user "
                         "{user_id} ({name})) reached its cap on text messages ([safedrop] "
                         "max_sms_per_link_per_day = {cap}): its codes go by mail; its next "
                         "are not logged until {quiet:g} s pass without one",
                         recipient=recipient_id, bundle=found.bundle.id, user_id=owner_id,
                         name=await user_named(self.db, owner_id), cap=link_cap,
                         quiet=SPELL_QUIET)
            return False
        self.sms_capped.labels(cap="user").inc()
        if self._sms_spells.starts(owner_id):
            log.warn("user {user_id} ({name}) reached its cap on safedrop text messages "
                     "([safedrop] max_sms_per_user_per_day = {cap}): its drops' codes go by "
                     "mail; its next are not logged until {quiet:g} s pass without one",
                     user_id=owner_id, name=await user_named(self.db, owner_id), cap=user_cap,
                     quiet=SPELL_QUIET)
        return False

    async def check_code(self, found: Access, code: str) -> str:
        """side.CODE_OK, CODE_WRONG (anything but six digits too, which counts as no
        guess) or CODE_LOCKED."""
        code = code.strip()
        if not (len(code) == 6 and code.isascii() and code.isdigit()):
            return side.CODE_WRONG
        digest = self.grants.code_digest(found.recipient.id, code)
        return await self.db.run("safedrop_check_code", side.check_code_txn,
                                 found.recipient.id, digest, self.now())

    def secure_text(self, found: Access) -> str | None:
        if found.secure_message is None:
            return None
        try:
            return self.box.decrypt(found.secure_message)
        except SecretError:
            log.error("the secure message of safedrop bundle {bundle} cannot be decrypted",
                      bundle=found.bundle.id)
            return None

    def file_path(self, found: Access, file_id: int) -> tuple[DropFile, Path] | None:
        for f in found.files:
            if f.id == file_id:
                return f, self.files.path(found.bundle.id, f.sha256)
        return None

    async def may_download(self, found: Access, drop_file: DropFile) -> bool:
        """Whether a download of a read_remove file may start, without counting one (a
        HEAD's answer)."""
        return await self.db.run(
            "safedrop_may_download", side.may_download_txn, found.recipient.id,
            drop_file.id, self.settings.max_download_attempts)

    async def start_download(self, found: Access, drop_file: DropFile) -> bool:
        """A download of a read_remove file starts: False (it may not) once the recipient
        has the file, or has started `[safedrop] max_download_attempts` downloads of it
        (each counts, whatever it sends: a Range, a broken connection)."""
        return await self.db.run(
            "safedrop_start_download", side.start_download_txn, found.recipient.id,
            drop_file.id, self.settings.max_download_attempts)

    async def sent(self, found: Access, drop_file: DropFile, first: int, last: int) -> None:
        """Bytes `first` to `last` of a file went to a recipient (none when `last` <
        `first`); once it has all of the file (in one response or in parts), or under
        read_remove once its last allowed download has ended: receipts, and read_remove."""
        bundle = found.bundle
        attempts = self.settings.max_download_attempts if bundle.read_remove else None
        when = bundle.email_receipt_when
        now, at = self.now(), self.clock.seconds()

        def txn(conn: Connection) -> bool:
            """Record the bytes, and in the same transaction queue the receipt they decide
            and mark the drop removed once every recipient has every file (read_remove):
            whether it was marked now (its files are deleted after the commit)."""
            result = side.record_sent_txn(conn, found.recipient.id, bundle.id, drop_file.id,
                                          drop_file.size, first, last, now, attempts)
            if result.first_time and when == 3:
                self._thd_tell_sender(
                    conn, found.sender, bundle,
                    f"{found.recipient.email} downloaded {shown(drop_file.name)}.", at)
            if result.all_done and when == 4:
                self._thd_tell_sender(conn, found.sender, bundle,
                                      "Every recipient has downloaded every file.", at)
            return (result.all_done and bundle.read_remove
                    and side.mark_removed_txn(conn, bundle.id, now))

        # A receipt is queued in the transaction that records the download deciding it (a
        # rider of the spool's write lane, as `open_link`'s); committed apart, a crash
        # between the two lost it for good (the download was counted, never again first
        # or last). So is the removal: marked apart, a crash left a drop every recipient
        # had in full to the expiry sweep, which mailed its sender "Your drop has expired".
        if when in (3, 4):
            removed = await self.spool.ride("safedrop_record_download", txn)
        else:
            removed = await self.db.run("safedrop_record_download", txn)
        if removed:
            # A crash before this leaves them to the sweep (`_sweep_left_behind`).
            await self.io.run(self.files.remove_bundle, bundle.id)

    async def remove(self, bundle_id: int) -> bool:
        """Delete a bundle's files from disk and mark it removed (once)."""
        if not await self.db.run("safedrop_mark_removed", side.mark_removed_txn, bundle_id,
                                 self.now()):
            return False
        await self.io.run(self.files.remove_bundle, bundle_id)
        return True

    async def bundle_ids(self, owner_id: int) -> list[int]:
        """The ids of every bundle of `owner_id`, sent or not, removed or not."""
        return await self.db.read("safedrop_owner_bundles", side.owner_bundle_ids_txn,
                                  owner_id)

    async def delete_owner_bundles(self, owner_id: int) -> int:
        """Delete every bundle of `owner_id` (a deleted user's), sent or not, with its
        recipients and its files on disk; how many went. Each bundle's files go first,
        then its row, then any file an upload finishing meanwhile placed: a run cut short
        leaves rows to find again (and the files of an id SQLite may give again are never
        left without their row); nobody is mailed."""
        deleted = 0
        for bundle_id in await self.bundle_ids(owner_id):
            await self.io.run(self.files.remove_bundle, bundle_id)
            if await self.db.run("safedrop_delete_bundle", side.delete_bundle_txn, bundle_id):
                deleted += 1
            await self.io.run(self.files.remove_bundle, bundle_id)
        return deleted

    async def comment(self, found: Access, text: str) -> None:
        """A recipient's reply, mailed to the sender."""
        await self._tell_sender(found.sender, found.bundle,
                                f"{found.recipient.email} replied:\n\n{text}")

    async def sweep(self) -> int:
        """Remove the files of drops no link serves any more (expired, or each
        recipient's link ended: `side.expired_bundles_txn`) and mail each sender a
        summary, and delete bundles
        never sent that expired or are older than `[safedrop] unsent_max_age` (nobody was
        told of them: no mail), and the files a crash left behind of bundles gone before;
        returns how many bundles went."""
        removed = await self._sweep_sent() + await self._sweep_unsent()
        await self._sweep_left_behind()
        return removed

    async def _sweep_unsent(self) -> int:
        now = self.now()
        made_before = now - datetime.timedelta(seconds=self.settings.unsent_max_age)
        ids = await self.db.read("safedrop_stale_unsent", side.stale_unsent_bundles_txn, now,
                                 made_before)
        deleted = 0
        for bundle_id in ids:
            # The row first: an upload finishing meanwhile finds no bundle and takes its file
            # back; a send claiming it first keeps it (and this deletes nothing).
            if not await self.db.run("safedrop_delete_unsent", side.delete_unsent_bundle_txn,
                                     bundle_id):
                continue
            await self.io.run(self.files.remove_bundle, bundle_id)
            log.info("deleted safedrop bundle {bundle}, never sent, and its files",
                     bundle=bundle_id)
            deleted += 1
        return deleted

    async def _sweep_sent(self) -> int:
        rows = await self.db.read("safedrop_expired", side.expired_bundles_txn, self.now())
        removed = 0
        for row in rows:
            summary = await self.db.read("safedrop_summary", side.download_summary_txn, row.id)
            lines = ["Your drop has expired and its files have been deleted.", ""]
            lines += [f"  {email}: downloaded {got} of {total} files"
                      for email, got, total in summary]
            subject = shown(row.subject)
            # The bundle is marked removed in the transaction that queues the summary: a
            # crash between two commits would lose the summary for good (the bundle, marked
            # removed, is never swept again). The files go after it (or at the next sweep).
            mark = functools.partial(side.mark_removed_txn, bundle_id=row.id, now=self.now())
            try:
                await self._mail(row.email, subject_line("Safedrop expired", subject),
                                 "\n".join(lines), guard=mark)
            except Withdrawn:
                continue  # removed meanwhile (read and removed, or another node's sweep)
            except Exception:
                log.failure("queueing the expiry summary of safedrop bundle {bundle} failed",
                            bundle=row.id)
                # Expired all the same: removed without its summary.
                if await self.remove(row.id):
                    removed += 1
                continue
            await self.io.run(self.files.remove_bundle, row.id)
            removed += 1
        return removed

    async def _sweep_left_behind(self) -> None:
        """Remove the files of bundles whose row says they are gone (marked removed, or
        deleted) but whose directory is still there: the process died between that commit
        and the removal of the files (`remove`, `_sweep_unsent`), and nothing else would
        ever take them."""
        on_disk = await self.io.run(self.files.bundle_ids)
        if not on_disk:
            return
        gone = await self.db.read("safedrop_left_behind", side.left_behind_txn, on_disk)
        for bundle_id in gone:
            await self.io.run(self.files.remove_bundle, bundle_id)
            log.info("removed the files of safedrop bundle {bundle}, left behind",
                     bundle=bundle_id)

    async def _tell_sender(self, sender: str, bundle: Bundle, text: str) -> None:
        subject = shown(bundle.subject)
        await self._mail(sender, subject_line("Safedrop", subject), text)

    def _thd_tell_sender(self, conn: Connection, sender: str, bundle: Bundle, text: str,
                         at: float) -> None:
        """Blocking, in the transaction that records what decides it: queue a mail to the
        drop's sender, as `_tell_sender` does."""
        subject = subject_line("Safedrop", shown(bundle.subject))
        envelope = Envelope("", (thd_recipient(conn, sender),), kind="notification")
        self.spool.thd_queue(conn, [(envelope, self._message(sender, subject, text, at))], at)

    def _message(self, to: str, subject: str, body: str, at: float) -> bytes:
        """A message from safedrop itself, dated `at`."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.settings.notify_from or f"safedrop@{self.hostname}"
        # A sender's account email or a recipient stored before addresses spelling RFC 2047
        # words were refused goes To undisclosed-recipients:; (the mail could not be built).
        msg["To"] = to_field(to)
        msg["Subject"] = subject
        msg["Date"] = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(at, datetime.UTC))
        msg["Message-ID"] = email.utils.make_msgid(domain=self.hostname)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body + "\n")
        return msg.as_bytes()

    async def _mail(self, to: str, subject: str, body: str,
                    guard: Callable[[Connection], bool] | None = None) -> None:
        """A message from safedrop itself (null envelope sender: nothing bounces back);
        `guard` as for `Spool.accept`."""
        at = self.clock.seconds()
        message = self._message(to, subject, body, at)
        recipient = await self.db.read("safedrop_route", thd_recipient, to)
        envelope = Envelope("", (recipient,), kind="notification")
        await self.spool.accept(new_queue_id(at), envelope, message, guard=guard)


class SafedropSweeper(Sweeper[int]):
    """Runs `SafedropService.sweep` every `[safedrop] sweep_interval` seconds on the
    injected clock (not at start); stopped with the daemon. The Core gives it the store's
    job leases: the nodes share the store and `files_dir`, so one node of them sweeps each
    period (another node's sweep would read the same drops and list the same files; it
    could not mail a second expiry notice, as the notice is queued by the transaction that
    marks the drop removed, once)."""

    name = "safedrop-sweeper"
    failed = "the safedrop expiry sweep failed"
    tick_at_start = False

    def __init__(self, drops: SafedropService) -> None:
        super().__init__(drops.clock, drops.settings.sweep_interval)
        self.drops = drops

    def sweep(self) -> Awaitable[int]:
        return self.drops.sweep()

"""Deleting a user with everything it owns (`mailcore user delete`).

Each kind of object goes through the removal path of the service that owns it, as the APIs
and the CLI remove one: what that path does beyond deleting a row (a domain's change told
to every node's RCPT snapshot, a fetch account's blobs and threads, a safedrop bundle's
files on disk, a mailbox's files) is done here too. In order:

1. `Identity.begin_deletion`: the user is disabled and marked being deleted, in one
   commit. From then on nothing acts for it on any node (logins, keys, tokens, sessions
   and OAuth tokens refused within a second; no sync, webhook delivery, migrate/restore
   job or outbox send starts; mail to its domains refused with 450), and `user enable`
   refuses it.
2. Its OAuth apps (with the codes and tokens they hold), and the grants it gave apps.
3. Its webhooks with their delivery log, pending deliveries included.
4. Its fetch accounts with the messages, blobs and threads only they hold (their migrate
   and restore jobs go with them), then any message of its outside an account.
5. Its safedrop bundles, sent or not, with their files on disk.
6. Its domains (`DomainService.remove`: addresses and quarantined mail go with each; its
   mailboxes are unbound, their outbox mail back to drafts).
7. Its Mail API mailboxes, with their mail, drafts and outbox (unsent), the grants it gave
   on them and their files on disk; then the grants it holds on other users' mailboxes.
8. `Identity.finish_deletion`: its credentials of every kind and its row. The counters
   kept beside the row (token tanks and usage, message counts) go with it (foreign-key
   cascade); its invoices stay, no longer linked to any user (ON DELETE SET NULL): an
   issued invoice is an accounting record that must be kept, and it holds the account's
   details as they were when it was issued.

Every step removes what is left of its kind, so a run cut short at any point (a crash,
kill -9) leaves a disabled user marked being deleted, and running the deletion again
finishes it. Mail already accepted for the user's domains is bounced to its senders at its
next delivery attempt ("domain ... is no longer served", `mailcore.queue.routing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.logger import Logger

from mailcore.fetch.accounts import AccountNotFound, Accounts
from mailcore.gateway.domains import DomainError, DomainService
from mailcore.identity import Identity, User
from mailcore.mailapi.errors import MailApiError
from mailcore.mailapi.mail import MailService
from mailcore.mailapi.mailboxes import MailboxService
from mailcore.messages.store import MessageStore
from mailcore.oauth.provider import OAuthError, OAuthProvider
from mailcore.safedrop.service import SafedropService
from mailcore.webhooks.model import WebhookNotFound
from mailcore.webhooks.service import Webhooks

log = Logger()

# Webhooks read at once while deleting them.
_WEBHOOK_PAGE = 100


@dataclass(frozen=True)
class Holdings:
    """What a user owns now: what its deletion would remove."""

    domains: tuple[str, ...]
    mailboxes: tuple[str, ...]
    accounts: int
    bundles: int
    webhooks: int
    apps: int

    def summary(self) -> str:
        """One line: each kind held, with how many ("" when it holds none)."""
        parts = [_count(len(self.domains), "domain"), _count(len(self.mailboxes), "mailbox"),
                 _count(self.accounts, "fetch account"), _count(self.bundles,
                                                                "safedrop bundle"),
                 _count(self.webhooks, "webhook"), _count(self.apps, "OAuth app")]
        return ", ".join(p for p in parts if p)


@dataclass
class Removed:
    """What one run of a deletion removed (a run resumed counts only its own part)."""

    domains: list[str] = field(default_factory=list)
    mailboxes: list[str] = field(default_factory=list)
    unsent: int = 0
    grants_held: int = 0
    accounts: int = 0
    messages: int = 0
    bundles: int = 0
    webhooks: int = 0
    apps: int = 0
    oauth_tokens: int = 0
    files: int = 0
    user: bool = False


def _count(n: int, noun: str) -> str:
    if n == 0:
        return ""
    plural = noun + ("es" if noun.endswith("x") else "s")
    return f"{n} {noun if n == 1 else plural}"


class UserDeletion:
    """Deletes users with everything they own, through the services that own it."""

    def __init__(
        self,
        identity: Identity,
        domains: DomainService,
        mailboxes: MailboxService,
        mail: MailService,
        safedrop: SafedropService,
        accounts: Accounts,
        messages: MessageStore,
        webhooks: Webhooks,
        oauth: OAuthProvider,
    ) -> None:
        self.identity = identity
        self.domains = domains
        self.mailboxes = mailboxes
        self.mail = mail
        self.safedrop = safedrop
        self.accounts = accounts
        self.messages = messages
        self.webhooks = webhooks
        self.oauth = oauth

    async def holdings(self, user: User) -> Holdings:
        """What `user` owns now."""
        owned = await self.domains.list(owner_id=user.id)
        boxes = await self.mailboxes.list_all(owner_id=user.id)
        accounts = await self.accounts.list_accounts(user.id)
        bundles = await self.safedrop.bundle_ids(user.id)
        hooks = await self.webhooks.list_webhooks(user.id, limit=1)
        apps = await self.oauth.list_apps(owner_id=user.id)
        return Holdings(
            domains=tuple(d.name for d in owned), mailboxes=tuple(b.address for b in boxes),
            accounts=len(accounts), bundles=len(bundles), webhooks=hooks.count,
            apps=len(apps),
        )

    async def delete(self, user: User) -> Removed:
        """Delete `user` and everything it owns (see the module's docstring); safe to run
        again on a user whose deletion was cut short."""
        removed = Removed()
        marked = await self.identity.begin_deletion(user.id)
        log.info("deleting user {user} (id {id}), begun {since}", user=marked.username,
                 id=marked.id, since=marked.deleting_at)
        await self._oauth(user.id, removed)
        await self._webhooks(user.id, removed)
        await self._accounts(user.id, removed)
        removed.bundles = await self.safedrop.delete_owner_bundles(user.id)
        await self._domains(user.id, removed)
        await self._mailboxes(user.id, removed)
        removed.user = await self.identity.finish_deletion(user.id)
        log.info("deleted user {user} (id {id})", user=marked.username, id=marked.id)
        return removed

    async def _oauth(self, user_id: int, removed: Removed) -> None:
        for app in await self.oauth.list_apps(owner_id=user_id):
            try:
                await self.oauth.remove_app(app.uid, owner_id=user_id)
            except OAuthError:
                continue  # removed meanwhile
            removed.apps += 1
        removed.oauth_tokens = await self.oauth.forget_user(user_id)

    async def _webhooks(self, user_id: int, removed: Removed) -> None:
        while hooks := (await self.webhooks.list_webhooks(user_id, limit=_WEBHOOK_PAGE)).items:
            for hook in hooks:
                try:
                    await self.webhooks.delete(user_id, hook.id)
                except WebhookNotFound:
                    continue
                removed.webhooks += 1

    async def _accounts(self, user_id: int, removed: Removed) -> None:
        for account in await self.accounts.list_accounts(user_id):
            try:
                await self.accounts.delete(user_id, account.id)
            except AccountNotFound:
                continue
            removed.accounts += 1
        removed.messages = await self.messages.delete_user_messages(user_id)

    async def _domains(self, user_id: int, removed: Removed) -> None:
        for domain in await self.domains.list(owner_id=user_id):
            try:
                await self.domains.remove(domain.name, owner_id=user_id)
            except DomainError:
                continue  # removed meanwhile
            removed.domains.append(domain.name)
            log.info("removed domain {domain} of a deleted user; mail queued for it "
                     "bounces", domain=domain.name)

    async def _mailboxes(self, user_id: int, removed: Removed) -> None:
        for box in await self.mailboxes.list_all(owner_id=user_id):
            hashes = await self.mail.mailbox_files(box.id)
            try:
                unsent = await self.mailboxes.remove(box.address, force=True)
            except MailApiError:
                continue  # removed meanwhile
            removed.mailboxes.append(box.address)
            removed.unsent += unsent
            if unsent:
                log.warn("{n} outbox mails of {box}, of a deleted user, went unsent",
                         n=unsent, box=box.address)
            # Files written within the last GRACE seconds stay for the daemon's sweep
            # (another mail may be about to name the same bytes).
            removed.files += await self.mail.collect(hashes)
        removed.grants_held = await self.mailboxes.forget_grantee(user_id)

"""Password logins that hand out tokens (IMAP2API `/api-token-auth/`, Mail API `/api/v1/auth/`)
and the OAuth login page.

Three limits slow password guessing without letting a guesser lock the owner out:

- every attempt, right or wrong, first takes a token from the login rate limiter of the
  client's address, so that guessing is slow whatever name is tried;
- every failure takes one from the limiter of the pair (name tried, client address): one
  address guessing at an account is refused there, and only there;
- every failure also takes one from the account's limiter (any address), whose budget is
  larger, so that many addresses (a botnet, an IPv6 network's /64s) do not multiply the
  guesses at one password. A client address that logged in to the account in the last
  KNOWN_SOURCE_DAYS days is not refused by that one (the owner's usual address still logs
  in while others guess), only by its own pair's.

The three are kept in the store (web.ratelimit.SharedRateLimiter), so that nodes sharing it
allow together the guesses one node allows. The name is counted as typed (trimmed, lower
case), whether a user has it or not: the 429 says nothing of who exists. A success creates
a new "token" credential marked as a login's (`login=True`: it ends when the password
changes): only its digest is stored, so the same token cannot be handed out twice (DRF
would return the existing one).
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.web.iweb import IRequest

from mailcore.identity import Identity, IdentityError, User
from mailcore.identity.service import name_key
from web.context import context_of
from web.ratelimit import Limiter, RateLimited, client_key, refuse_spent
from web.replies import set_headers

# How long an address that logged in to an account stays exempt from the account's limit,
# and how many such (account, address) pairs are remembered.
KNOWN_SOURCE_DAYS = 30
KNOWN_SOURCES_KEPT = 100_000


class PasswordLogin:
    """Checks a username (or e-mail) and password, rate-limited per client address and, for
    failed attempts, per (account name, client address) (`failures`) and per account name
    (`account_failures`), when given."""

    def __init__(self, identity: Identity, limiter: Limiter,
                 failures: Limiter | None = None,
                 account_failures: Limiter | None = None) -> None:
        self.identity = identity
        self.limiter = limiter
        self.failures = failures
        self.account_failures = account_failures
        # (account digest, client key) -> when it last logged in (the limiter's clock).
        self._known: dict[tuple[bytes, str], float] = {}

    async def throttle(self, request: IRequest) -> None:
        """Count one attempt from this client; 429 when it has made too many."""
        decision = await self.limiter.take(("login", client_key(request)))
        set_headers(request, decision.headers())
        if not decision.allowed:
            raise RateLimited(decision)

    async def check(self, request: IRequest, username: str, password: str) -> User | None:
        """The user if the password is right, else None (the attempt is counted first)."""
        await self.throttle(request)
        # A digest: a name may be as long as a body (1 MiB), and the limiter keeps 100,000.
        name = hashlib.sha256(name_key(username).encode("utf-8", "replace")).digest()
        client = client_key(request)
        pair = ("pair", name, client)
        account = ("account", name)
        if self.failures is not None:
            await refuse_spent(self.failures, pair)
        if self.account_failures is not None and not self._is_known(name, client):
            await refuse_spent(self.account_failures, account)
        user = await self.identity.authenticate_password(username, password)
        if user is None:
            if self.failures is not None:
                await self.failures.take(pair)
            if self.account_failures is not None:
                await self.account_failures.take(account)
            return None
        self._remember(name, client)
        context_of(request).user = user.username
        return user

    def _is_known(self, name: bytes, client: str) -> bool:
        """Whether `client` logged in to the account `name` within KNOWN_SOURCE_DAYS."""
        at = self._known.get((name, client))
        return at is not None and self._now() - at < KNOWN_SOURCE_DAYS * 86400

    def _remember(self, name: bytes, client: str) -> None:
        """Note a login of `client` to `name`; the memory stays within KNOWN_SOURCES_KEPT
        (the pairs past KNOWN_SOURCE_DAYS go first, then the oldest half)."""
        now = self._now()
        key = (name, client)
        self._known.pop(key, None)  # re-inserted last: the dict stays in login order
        if len(self._known) >= KNOWN_SOURCES_KEPT:
            cutoff = now - KNOWN_SOURCE_DAYS * 86400
            kept = {k: at for k, at in self._known.items() if at >= cutoff}
            if len(kept) >= KNOWN_SOURCES_KEPT:
                kept = dict(list(kept.items())[len(kept) // 2:])
            self._known = kept
        self._known[key] = now

    def _now(self) -> float:
        return self.limiter.clock.seconds()

    async def issue_token(self, user: User, label: str) -> str | None:
        """A new token for `user` as `check` found it (shown once), marked as a password
        login's; None when the password changed since `check` read it (the login failed)."""
        return await self.issue(user, "token", label=label, login=True)

    async def issue(self, user: User, kind: str, **options: Any) -> str | None:
        """A new credential of `kind` for `user` as `check` found it, made only while the
        password is still the one checked (else None): a password change ends every
        credential a login made, and one made just after it must not escape that."""
        try:
            secret, _ = await self.identity.create_credential(
                user.id, kind, password_stamp=user.password_stamp, **options)
        except IdentityError as e:
            if e.field != "password":
                raise
            return None
        return secret

"""Password logins that hand out tokens (IMAP2API `/api-token-auth/`, Mail API `/api/v1/auth/`).

Every attempt, right or wrong, first takes a token from the login rate limiter of the
client's address, so that guessing passwords is slow whatever name is tried; and every
failure takes one from the limiter of the name tried (any address), so that guesses at one
account are slow however many addresses make them. The name is counted as typed (trimmed,
lower case), whether a user has it or not: the 429 says nothing of who exists. A success
creates a new non-expiring "token" credential: only its digest is stored, so the same token
cannot be handed out twice (DRF would return the existing one).
"""

from __future__ import annotations

import hashlib

from twisted.web.iweb import IRequest

from mailcore.identity import Identity, User
from mailcore.identity.service import name_key
from web.context import context_of
from web.ratelimit import RateLimited, RateLimiter, client_key, enforce


class PasswordLogin:
    """Checks a username (or e-mail) and password, rate-limited per client address and
    (`failures`, when given) per account name for failed attempts."""

    def __init__(self, identity: Identity, limiter: RateLimiter,
                 failures: RateLimiter | None = None) -> None:
        self.identity = identity
        self.limiter = limiter
        self.failures = failures

    def throttle(self, request: IRequest) -> None:
        """Count one attempt from this client; 429 when it has made too many."""
        enforce(request, self.limiter, ("login", client_key(request)))

    async def check(self, request: IRequest, username: str, password: str) -> User | None:
        """The user if the password is right, else None (the attempt is counted first)."""
        self.throttle(request)
        # A digest: a name may be as long as a body (1 MiB), and the limiter keeps 100,000.
        account = ("account", hashlib.sha256(name_key(username).encode("utf-8", "replace"))
                   .digest())
        if self.failures is not None and self.failures.peek(account) < 1:
            raise RateLimited(self.failures.check(account))
        user = await self.identity.authenticate_password(username, password)
        if user is None:
            if self.failures is not None:
                self.failures.check(account)
            return None
        context_of(request).user = user.username
        return user

    async def issue_token(self, user: User, label: str) -> str:
        """A new non-expiring token for `user` (shown once)."""
        secret, _ = await self.identity.create_credential(
            user.id, "token", label=label, login=True)
        return secret

"""Password logins that hand out tokens (IMAP2API `/api-token-auth/`, Mail API `/api/v1/auth/`).

Every attempt, right or wrong, first takes a token from the login rate limiter of the
client's address, so that guessing passwords is slow whatever name is tried. A success
creates a new non-expiring "token" credential: only its digest is stored, so the same token
cannot be handed out twice (DRF would return the existing one).
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from mailcore.identity import Identity, User
from web.context import context_of
from web.ratelimit import RateLimiter, client_key, enforce


class PasswordLogin:
    """Checks a username (or e-mail) and password, rate-limited per client address."""

    def __init__(self, identity: Identity, limiter: RateLimiter) -> None:
        self.identity = identity
        self.limiter = limiter

    def throttle(self, request: IRequest) -> None:
        """Count one attempt from this client; 429 when it has made too many."""
        enforce(request, self.limiter, ("login", client_key(request)))

    async def check(self, request: IRequest, username: str, password: str) -> User | None:
        """The user if the password is right, else None (the attempt is counted first)."""
        self.throttle(request)
        user = await self.identity.authenticate_password(username, password)
        if user is not None:
            context_of(request).user = user.username
        return user

    async def issue_token(self, user: User, label: str) -> str:
        """A new non-expiring token for `user` (shown once)."""
        secret, _ = await self.identity.create_credential(user.id, "token", label=label)
        return secret

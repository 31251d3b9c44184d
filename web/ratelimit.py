"""Rate limits: a token bucket per key, on an injected clock, and the headers that report it.

A `Rate` of N per period lets a key make N requests at once, then one more every
period/N seconds. Every reply of a limited endpoint carries `X-RateLimit-Limit`,
`X-RateLimit-Remaining` and `X-RateLimit-Reset` (epoch seconds when the bucket is full again);
a refused request gets 429 with `Retry-After`. Users: the password-login endpoints (per
client address; failures per account name and address, and per account name: web.login),
IMAP2API (1000/h per user, 100/h anonymous), Dropmyemail (20/s per token; its
`POST /oauth/token` 20 at once then 10/s per client, and failed client authentications
there and at `/oauth/revoke` per client address), Protecmail, the
Mail API and safedrop (20/s per user each; 100/h per client address for requests whose
credential is missing or bad, the three APIs together). The limits that guard a secret (the
password logins', the OAuth client failures', a drop's password, code and reply limits) are
`SharedRateLimiter`s, kept in the store, so that nodes sharing it allow together what one
node does; the others are kept in each process's memory. `InFlight` bounds what a key has
under way at once instead (a safedrop user's concurrent uploads): 429 beyond, with
Retry-After.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Hashable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from mailcore.connlimits import address_key, client_address
from mailcore.identity import Principal
from mailcore.ratelimits import SharedBuckets
from web.errors import ApiError
from web.replies import set_headers

_UNITS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """`limit` requests per `period` seconds."""

    limit: int
    period: float

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0:
            raise ValueError("a rate needs a positive limit and period")

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Read "100/hour", "20/second", "5/10min" (N per [count] unit)."""
        m = _RATE.match(text.lower())
        if not m or m.group(3) not in _UNITS:
            raise ValueError(f"not a rate: {text!r} (write e.g. 100/hour or 20/second)")
        count = int(m.group(2) or 1)
        return cls(int(m.group(1)), count * _UNITS[m.group(3)])


@dataclass(frozen=True)
class Decision:
    """The outcome of one check, and what the rate-limit headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset: int
    retry_after: int

    def headers(self) -> dict[str, str]:
        values = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            values["Retry-After"] = str(self.retry_after)
        return values


class RateLimited(ApiError):
    """429 Too Many Requests, with the rate-limit headers and Retry-After. `message` (a
    format string of `wait`, the seconds to wait) and `code` replace the default words,
    where an API has its own (OAuth's slow_down)."""

    def __init__(self, decision: Decision, *, message: str | None = None,
                 code: str | None = None) -> None:
        wait = decision.retry_after
        unit = "second" if wait == 1 else "seconds"
        super().__init__(
            429,
            message.format(wait=wait) if message is not None
            else f"Request was throttled. Expected available in {wait} {unit}.",
            code=code,
            headers=decision.headers(),
        )
        self.decision = decision


class RateLimiter:
    """Token buckets keyed by anything hashable (a user id, a token id, a client address).

    Memory stays bounded: once more than `max_keys` buckets exist, the ones that have
    refilled completely (they carry no state worth keeping) are dropped, then the oldest.
    """

    def __init__(self, clock: IReactorTime, rate: Rate, *, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.rate = rate
        self.max_keys = max_keys
        # key -> (tokens left, time of that count)
        self._buckets: dict[Hashable, tuple[float, float]] = {}

    def _refilled(self, key: Hashable, now: float) -> float:
        limit, period = self.rate.limit, self.rate.period
        tokens, at = self._buckets.get(key, (float(limit), now))
        return min(float(limit), tokens + (now - at) * limit / period)

    def check(self, key: Hashable, cost: int = 1) -> Decision:
        """Take `cost` tokens from `key`'s bucket if it has them; say what happened."""
        now = self.clock.seconds()
        tokens = self._refilled(key, now)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (tokens, now)
        return decision(self.rate, now, allowed, tokens, cost)

    def peek(self, key: Hashable) -> int:
        """How many requests `key` may still make now (nothing is taken)."""
        return math.floor(self._refilled(key, self.clock.seconds()))

    async def take(self, key: Hashable, cost: int = 1) -> Decision:
        """`check`, as the shared limiter's (SharedRateLimiter) is called."""
        return self.check(key, cost)

    async def available(self, key: Hashable) -> int:
        """`peek`, likewise."""
        return self.peek(key)

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._refilled(k, now) >= self.rate.limit]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for k in oldest[: len(oldest) // 2 + 1]:
                del self._buckets[k]


class SharedRateLimiter:
    """A RateLimiter whose buckets are in the store (mailcore.ratelimits), so that it holds
    across the nodes sharing it: for the limits that guard a secret. `name` tells its
    buckets from another limit's for the same key."""

    def __init__(self, buckets: SharedBuckets, name: str, rate: Rate) -> None:
        self.buckets = buckets
        self.name = name
        self.rate = rate
        self.clock = buckets.clock

    async def take(self, key: Hashable, cost: int = 1) -> Decision:
        """Take `cost` tokens from `key`'s bucket if it has them; say what happened."""
        allowed, tokens = await self.buckets.take(self.name, key, self.rate.limit,
                                                  self.rate.period, cost)
        return decision(self.rate, self.clock.seconds(), allowed, tokens, cost)

    async def available(self, key: Hashable) -> int:
        """How many requests `key` may still make now (nothing is taken)."""
        return math.floor(await self.buckets.available(self.name, key, self.rate.limit,
                                                       self.rate.period))


# What PasswordLogin and the drop page take: either kind.
Limiter = RateLimiter | SharedRateLimiter


def decision(rate: Rate, now: float, allowed: bool, tokens: float, cost: int) -> Decision:
    """The Decision of a take that left `tokens` in a bucket of `rate` at `now`."""
    per_token = rate.period / rate.limit
    retry_after = 0 if allowed else max(1, math.ceil((cost - tokens) * per_token))
    reset = math.ceil(now + (rate.limit - tokens) * per_token)
    return Decision(allowed, rate.limit, max(0, math.floor(tokens)), reset, retry_after)


class InFlight:
    """At most `limit` things under way at once per key (in this process): `take` a slot
    before the work, `give_back` after it."""

    RETRY_AFTER = 10

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[Hashable, int] = {}

    def take(self, key: Hashable) -> bool:
        """Take one of `key`'s slots; False (nothing taken) when all are held."""
        held = self._held.get(key, 0)
        if held >= self.limit:
            return False
        self._held[key] = held + 1
        return True

    def give_back(self, key: Hashable) -> None:
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: Hashable) -> int:
        return self._held.get(key, 0)

    def refusal(self, what: str) -> ApiError:
        """The 429 of a request over the limit; `what` names what is under way."""
        return ApiError(429, f"You have {self.limit} {what} under way; try again once one "
                        "has finished.", headers={"Retry-After": str(self.RETRY_AFTER)})


def enforce(request: IRequest, limiter: RateLimiter, key: Hashable, *,
            message: str | None = None, code: str | None = None) -> Decision:
    """Check `key` against `limiter`, put the headers on the reply, raise 429 when refused
    (RateLimited's `message` and `code`)."""
    decision = limiter.check(key)
    set_headers(request, decision.headers())
    if not decision.allowed:
        raise RateLimited(decision, message=message, code=code)
    return decision


async def refuse_spent(limiter: Limiter, key: Hashable, *, message: str | None = None,
                       code: str | None = None) -> None:
    """429 (RateLimited's `message` and `code`) when `key` has nothing left in `limiter`,
    a limit that counts failures only (take one after each): asked before the secret is
    checked, so that a right guess past the budget is refused as a wrong one is. Nothing is
    taken while some is left."""
    if await limiter.available(key) < 1:
        raise RateLimited(await limiter.take(key), message=message, code=code)


def client_key(request: IRequest) -> str:
    """The key of an anonymous client: its address (the peer of the connection), an
    IPv4-mapped address as its IPv4 address, an IPv6 one as its /64 (a host has a whole /64
    to take addresses from)."""
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    key = address_key(client_address(host))
    if key is not None:
        return key
    return str(host) if host else "unknown"


def count_bad_credential(request: IRequest, limiter: RateLimiter) -> None:
    """Count a request whose credential was missing or not live against its client address;
    429 once that address has made too many."""
    enforce(request, limiter, ("anonymous", client_key(request)))


async def admit(
    request: IRequest, resolving: Awaitable[Principal], *, users: RateLimiter,
    anonymous: RateLimiter,
) -> Principal:
    """The principal `resolving` yields, within `users`' rate for its user; when it raises
    (no or a bad credential), the request counts against its address in `anonymous` and
    gets its 429 once that is spent, else the API's own error.

    A good credential is served whatever its address's `anonymous` count: behind a reverse
    proxy or a NAT every client has one address, and one client guessing must not lock the
    others out. The secrets are long random strings; the limit makes guessing loud and slow,
    not possible.
    """
    try:
        principal = await resolving
    except ApiError:
        count_bad_credential(request, anonymous)
        raise
    enforce(request, users, ("user", principal.user.id))
    return principal

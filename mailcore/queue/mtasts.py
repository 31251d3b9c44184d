"""Outbound MTA-STS (RFC 8461): which MX hosts of a domain may get its mail, and only over
verified TLS.

With `[queue] mta_sts = true` (the default) the router asks, for each domain it routes by
MX (never a served domain's redirect, its own TLS override, nor the relayhost), whether the
domain publishes a policy, as Postfix with postfix-mta-sts-resolver does:

- discovery: the TXT record `_mta-sts.<domain>` (`v=STSv1; id=...;`, through the router's
  own twisted.names resolver, TXT_TIMEOUT at most); none, or more than one, is no policy
  (3.1);
- the policy: `https://mta-sts.<domain>/.well-known/mta-sts.txt`, fetched with treq over
  HTTPS whose certificate must verify against the trust roots (`tls_ca_file`, else the
  system's) and name the policy host, to the addresses the next-hop address policy allows
  only (the `[queue]` allow_loopback, allow_private, allow_networks and deny_networks keys,
  checked after resolution: a hostile domain cannot make us fetch from our own network),
  no redirect followed, `text/plain` only, at most MAX_POLICY_BYTES (64 KiB) read, within
  FETCH_TIMEOUT; any of these failing is no new policy;
- parsed strictly (3.2): `version: STSv1`, `mode` enforce, testing or none, `mx` patterns
  (a host name, or `*.` and one, the wildcard standing for one leftmost label), `max_age`
  (at most 31557600 s, one year); a policy that breaks any of it is ignored;
- cached in the store (table `mta_sts_policies`, migration 0070, shared by the nodes), with
  the TXT id it was fetched under: it is fetched again when the TXT record's id changes or
  once it has expired (fetched_at + max_age, route_cache_seconds at the least: a policy
  whose max_age is 0 is not fetched at every route), and a failed fetch, or a TXT record
  gone, keeps the cached policy until it expires (5.1, 10.2): an attacker who strips the
  record later changes nothing; a write to the store that fails is logged, the policy used
  all the same. Expired rows are deleted every hour (`PolicySweeper`, on one node of those
  sharing the store).

What a policy does (the router applies it, `Router._mx`): `enforce` keeps only the MX hosts
that match one of its patterns (none left: the mail is deferred 4.7.5, never sent
elsewhere) and makes their TLS policy `verify` (STARTTLS required, the certificate verified
against the MX host's name, else deferred 4.7.5, nothing in cleartext); `testing` delivers
as without a policy and logs what enforce would have refused (once per domain, or per MX
host for one that offers no STARTTLS, and route_cache_seconds, a minute at least: `Quiet`);
`none` does nothing.

Lookups do not block: the TXT lookups and the fetches are Deferreds, MAX_LOOKUPS and
MAX_FETCHES at most under way at once; lookups for one domain at once share one; what was
found for a domain (its policy or none) is kept in memory for `route_cache_seconds`, so the
store is read once per domain and period, not per message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http.cookiejar import Cookie
from typing import Any, Protocol

from sqlalchemy import Connection, delete, select
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone

from mailcore.messages.sql import dialect_insert
from mailcore.netpolicy import AddressCheck, AddressPolicy, AddressRefused, GuardedEndpoint
from mailcore.outages import log_failure
from mailcore.periodic import Sweeper, delete_in_batches
from mailcore.queue.settings import QueueSettings
from mailcore.store import Database
from mailcore.store.schema import mta_sts_policies
from mailcore.tls import trust_roots, verifying_options

log = Logger()

# A policy body read at most (RFC 8461 3.3: senders may limit it; 64 KiB, as Postfix's
# resolver does).
MAX_POLICY_BYTES = 64 * 1024
# A policy fetch, connection, TLS and body together, at most (seconds).
FETCH_TIMEOUT = 20.0
# mx patterns a policy may have at most (their distinct values); one with more is no policy.
# Real policies list a handful; 64 KiB of `mx: a.b` lines are 8,000, and each policy is
# kept in memory (_MEMORY_LIMIT domains) and in a store row that outlives the message:
# a hostile wildcard domain, reached by bounces to its random subdomains, held ~0.4 MB of
# memory and 64 KiB of store per subdomain.
MAX_MX_PATTERNS = 64
# max_age's ceiling (RFC 8461 3.2: 31557600 s, about a year).
MAX_AGE_LIMIT = 31557600
# TXT lookups and policy fetches under way at once at most; the others wait.
MAX_LOOKUPS = 20
MAX_FETCHES = 10
# A TXT lookup at most (seconds): past it the domain has no new policy (a cached one holds).
# twisted.names' own retries take a minute per name server, and every message to a domain
# whose servers drop `_mta-sts` queries would wait that long before going as it always did.
TXT_TIMEOUT = 10.0
# A policy fetch at most, its wait for one of the MAX_FETCHES slots included (seconds): past
# it the domain has no new policy (a cached one holds). Policy hosts that answer slowly (a
# hostile wildcard domain's, say) otherwise made every other domain's fetch wait its turn
# without end, and that domain's mail with it.
FETCH_WAIT = 2 * FETCH_TIMEOUT
# How often expired policies are deleted from the store (PolicySweeper), and how many rows a
# transaction deletes.
SWEEP_INTERVAL = 3600.0
SWEEP_BATCH = 1000
# Domains whose answer is kept in memory at most (then the memory starts again).
_MEMORY_LIMIT = 4096
MODES = ("enforce", "testing", "none")

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})+")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class Quiet:
    """Whether a warning about `key` (a domain, a host) is due: once per `period` seconds
    at most (route_cache_seconds, a minute at least), so a testing policy's warnings come
    once a period per domain or host, not once per recipient routed or connection made.
    At most _MEMORY_LIMIT keys are remembered (then the memory starts again)."""

    def __init__(self, clock: IReactorTime, period: float) -> None:
        self.clock = clock
        self.period = max(period, 60.0)
        self._last: dict[str, float] = {}

    def due(self, key: str) -> bool:
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now < last + self.period:
            return False
        if last is None and len(self._last) >= _MEMORY_LIMIT:
            self._last.clear()
        self._last[key] = now
        return True


class PolicyError(Exception):
    """No policy: a fetch that failed or a policy that does not parse (why, for the log)."""


@dataclass(frozen=True)
class Policy:
    """A domain's MTA-STS policy, as fetched under TXT id `policy_id`."""

    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def matches(self, host: str) -> bool:
        """Whether MX host `host` matches one of the policy's patterns (4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: `mail.example.com` matches itself; `*.example.com` matches one label
    more (`mx1.example.com`), not `example.com` nor `a.b.example.com`."""
    host = host.rstrip(".").lower()
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


def parse_txt(records: list[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT records (each its strings joined), or None when
    there is not exactly one `v=STSv1` record or it does not parse (3.1)."""
    ours = [r for r in records if r.startswith("v=STSv1;") or r == "v=STSv1"]
    if len(ours) != 1:
        return None
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            return None
        fields.setdefault(key, value)
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str, policy_id: str, now: float) -> Policy:
    """The policy body `text` (3.2), or PolicyError saying what is wrong with it."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        # Field names (3.2: sts-policy-ext-name), an extension's included: one unknown to
        # us is ignored, never the policy.
        if not sep or not _FIELD.fullmatch(key):
            raise PolicyError(f"malformed line {line[:80]!r}")
        if key == "mx":
            pattern = value.rstrip(".").lower()
            if not _PATTERN.fullmatch(pattern):
                raise PolicyError(f"malformed mx pattern {value[:80]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)  # a key given again: its first value counts
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(age):
        raise PolicyError(f"max_age {age[:20]!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any mx")
    patterns = tuple(dict.fromkeys(mx))
    if len(patterns) > MAX_MX_PATTERNS:
        raise PolicyError(f"{len(patterns)} mx patterns, more than {MAX_MX_PATTERNS}")
    return Policy(policy_id, mode, patterns, min(int(age), MAX_AGE_LIMIT), now)


def thd_read_policy(conn: Connection, domain: str) -> Policy | None:
    """Blocking: the cached policy of `domain`, expired or not; None when there is none."""
    p = mta_sts_policies.c
    row = conn.execute(select(p.policy_id, p.mode, p.mx, p.max_age, p.fetched_at)
                       .where(p.domain == domain)).first()
    if row is None:
        return None
    return Policy(row.policy_id, row.mode, tuple(m for m in row.mx.split("\n") if m),
                  int(row.max_age), float(row.fetched_at))


def thd_write_policy(conn: Connection, domain: str, policy: Policy) -> None:
    """Blocking: keep `policy` as `domain`'s, in place of any older one (another node's
    written at the same moment too: no error)."""
    changed = {"policy_id": policy.policy_id, "mode": policy.mode, "mx": "\n".join(policy.mx),
               "max_age": policy.max_age, "fetched_at": policy.fetched_at,
               "expires_at": policy.expires_at}
    conn.execute(dialect_insert(conn)(mta_sts_policies).values(domain=domain, **changed)
                 .on_conflict_do_update(index_elements=["domain"], set_=changed))


def thd_sweep_policies(conn: Connection, now: float, batch: int) -> int:
    """Blocking: delete up to `batch` of the policies expired by `now` (they count for
    nothing: `PolicyFinder` takes an expired one as none); how many."""
    p = mta_sts_policies.c
    domains = select(p.domain).where(p.expires_at <= now).limit(batch).scalar_subquery()
    return int(conn.execute(
        delete(mta_sts_policies).where(p.domain.in_(domains))).rowcount or 0)


class PolicySweeper(Sweeper[int]):
    """Deletes the expired policies every SWEEP_INTERVAL seconds, SWEEP_BATCH a transaction
    (on one node of those sharing the store: the Core gives it the job leases). Without it
    the rows of every domain ever mailed by MX stayed for good."""

    name = "mta-sts-policy-sweeper"
    failed = "sweeping the expired MTA-STS policies failed"

    def __init__(self, db: Database, clock: IReactorTime,
                 every: float = SWEEP_INTERVAL) -> None:
        super().__init__(clock, every)
        self.db = db

    def sweep(self) -> Deferred[int]:
        return Deferred.fromCoroutine(delete_in_batches(
            self.db, "mta_sts_sweep", thd_sweep_policies, self.clock.seconds(),
            batch=SWEEP_BATCH))


class TXTResolver(Protocol):
    """The part of twisted.names' resolver interface discovery uses."""

    def lookupText(self, name: str) -> Any: ...


class _Capped(TwistedProtocol):
    """Reads a response body of at most `limit` octets; past it, the connection is cut."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        # Cancelled (FETCH_TIMEOUT): the connection is cut, not left to trickle.
        self.done: Deferred[bytes] = Deferred(lambda _d: self._cut())

    def _cut(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.done.errback(PolicyError(f"policy larger than {self.limit} octets"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(PolicyError(f"policy body cut short: {reason.value}"))


def _discard(response: Any) -> None:
    """Read none of a refused response's body (the connection is not kept: it closes)."""
    body = _Capped(0)
    body.done.addErrback(lambda _: None)
    response.original.deliverBody(body)


class _NoCookies(IndexableCookieJar):
    """Policy hosts' cookies are never kept (nor sent to another host)."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class _PolicyEndpoints:
    """The endpoint of a policy host: only to addresses `policy` allows, over HTTPS whose
    certificate must verify against `trust` and name the host."""

    def __init__(self, reactor: Any, policy: AddressCheck, trust: Any, port: int,
                 timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.trust = trust
        self.port = port
        self.timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint = GuardedEndpoint(self.reactor, self.policy, host, self.port, self.timeout,
                                   refusal="is not an address an MTA-STS policy may come "
                                           "from")
        return wrapClientTLS(verifying_options(host, self.trust), endpoint)


class PolicyFetcher:
    """Fetches `https://mta-sts.<domain>/.well-known/mta-sts.txt` (see the module doc).
    `port` is 443 but in tests."""

    def __init__(self, reactor: Any, settings: QueueSettings, port: int = 443) -> None:
        self.reactor = reactor
        self.settings = settings
        self.port = port
        self._client: Any = None

    def _http(self) -> Any:
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            endpoints = _PolicyEndpoints(self.reactor, AddressPolicy(self.settings, "queue"),
                                         trust_roots(self.settings.tls_ca_file), self.port,
                                         FETCH_TIMEOUT)
            agent = Agent.usingEndpointFactory(
                self.reactor, endpoints, pool=HTTPConnectionPool(self.reactor, persistent=False))
            self._client = HTTPClient(agent, cookiejar=_NoCookies())
        return self._client

    def fetch(self, domain: str) -> Deferred[str]:
        """The policy text of `domain`, or PolicyError."""
        d = Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(FETCH_TIMEOUT, self.reactor)
        return d

    async def _fetch(self, domain: str) -> str:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        try:
            response = await self._http().get(url, allow_redirects=False, unbuffered=True)
        except (defer.CancelledError, ConnectingCancelledError):
            raise defer.CancelledError() from None  # FETCH_TIMEOUT: fetch() says so
        except Exception as e:
            why = str(e)
            if isinstance(e, AddressRefused) and e.reasons:
                why += f" ({'; '.join(f'{a}: {r}' for a, r in sorted(e.reasons.items()))})"
            raise PolicyError(f"fetching {url} failed: {why}") from None
        if response.code != 200:
            # A redirect (3xx) is not followed (3.3): no policy.
            _discard(response)
            raise PolicyError(f"{url} answered {response.code}")
        kind = (response.headers.getRawHeaders("content-type") or [""])[0]
        if kind.split(";")[0].strip().lower() != "text/plain":
            _discard(response)
            raise PolicyError(f"{url} is {kind or 'of no type'}, not text/plain")
        length = response.original.length
        if isinstance(length, int) and length > MAX_POLICY_BYTES:
            _discard(response)
            raise PolicyError(f"{url} is {length} octets, more than {MAX_POLICY_BYTES}")
        body = _Capped(MAX_POLICY_BYTES)
        response.original.deliverBody(body)
        raw = await body.done
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{url} is not UTF-8") from None


class PolicyFinder:
    """A domain's MTA-STS policy in force (see the module doc), or None."""

    def __init__(self, db: Database, clock: IReactorTime, settings: QueueSettings,
                 fetcher: Any) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        # What fetches a policy's text: PolicyFetcher, a fake in tests.
        self.fetcher = fetcher
        # Domain -> (expiry, the policy in force or None).
        self._memory: dict[str, tuple[float, Policy | None]] = {}
        self._pending: dict[str, list[Deferred[Policy | None]]] = {}
        self._lookups = DeferredSemaphore(MAX_LOOKUPS)
        self._fetches = DeferredSemaphore(MAX_FETCHES)

    async def policy(self, domain: str, resolver: TXTResolver) -> Policy | None:
        """`domain`'s policy in force (mode none included), or None (a domain that is no
        host name has none: it makes no URL)."""
        try:
            domain = domain.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return None
        if not _DOMAIN.fullmatch(domain):
            return None
        now = self.clock.seconds()
        kept = self._memory.get(domain)
        if kept is not None and kept[0] > now:
            return kept[1]
        waiters = self._pending.get(domain)
        if waiters is not None:  # a lookup for the domain is under way: its answer is ours
            mine: Deferred[Policy | None] = Deferred()
            waiters.append(mine)
            return await mine
        waiters = self._pending[domain] = []
        try:
            found = await self._discover(domain, resolver)
        except BaseException:
            failure = Failure()
            del self._pending[domain]
            for waiter in waiters:
                waiter.errback(failure)
            raise
        del self._pending[domain]
        for waiter in waiters:
            waiter.callback(found)
        return found

    async def _discover(self, domain: str, resolver: TXTResolver) -> Policy | None:
        found = await self._find(domain, resolver, self.clock.seconds())
        # Kept from when the answer came, not from when it was asked: a lookup that took
        # longer than route_cache_seconds was otherwise never kept, and each message waited
        # for one again.
        now = self.clock.seconds()
        if len(self._memory) >= _MEMORY_LIMIT:
            self._memory.clear()
        keep = self.settings.route_cache_seconds
        if found is not None:
            keep = min(keep, self._lasts(found) - now)
        self._memory[domain] = (now + keep, found)
        return found

    def _lasts(self, policy: Policy) -> float:
        """Until when `policy` counts: its expiry, but route_cache_seconds after its fetch
        at the least. A policy whose max_age is 0 (or a few seconds) was otherwise fetched
        again at every route, every message to the domain waiting for a fetch; RFC 8461
        (3.2, 5.1) lets a sender cache it up to max_age, and a period this short past it
        changes nothing that matters."""
        return max(policy.expires_at, policy.fetched_at + self.settings.route_cache_seconds)

    async def _find(self, domain: str, resolver: TXTResolver, now: float) -> Policy | None:
        cached = await self.db.read("mta_sts_policy", thd_read_policy, domain)
        if cached is not None and self._lasts(cached) <= now:
            cached = None
        try:
            policy_id = await self._lookups.run(
                lambda: Deferred.fromCoroutine(self._txt(resolver, domain)).addTimeout(
                    TXT_TIMEOUT, self.clock))
        except Exception as e:
            log.info("MTA-STS TXT lookup for {domain} failed ({error})", domain=domain,
                     error=str(e))
            return cached
        if policy_id is None:
            return cached  # a record gone (stripped?) leaves a cached policy in force (10.2)
        if cached is not None and cached.policy_id == policy_id:
            return cached
        try:
            text = await self._fetches.run(self.fetcher.fetch, domain).addTimeout(
                FETCH_WAIT, self.clock)
            fetched = parse_policy(text, policy_id, self.clock.seconds())
        except (PolicyError, defer.TimeoutError, defer.CancelledError) as e:
            log.warn("MTA-STS policy of {domain} not taken: {error}{kept}", domain=domain,
                     error=str(e) or type(e).__name__,
                     kept="; the cached policy stays in force" if cached is not None else "")
            return cached
        try:
            await self.db.run("mta_sts_store", thd_write_policy, domain, fetched)
        except Exception:
            # Best effort: the policy fetched is good and is used (and kept in memory);
            # only the other nodes, and a restart, miss it until the next fetch.
            log_failure(log, "keeping the MTA-STS policy of {domain} in the store failed; "
                        "it is used all the same", domain=domain)
        return fetched

    @staticmethod
    async def _txt(resolver: TXTResolver, domain: str) -> str | None:
        from twisted.names.error import DNSNameError

        try:
            answers, _authority, _additional = await resolver.lookupText(f"_mta-sts.{domain}")
        except DNSNameError:
            return None
        records = []
        for rr in answers:
            data = getattr(getattr(rr, "payload", None), "data", None)
            if not isinstance(data, list):
                continue
            records.append(b"".join(data).decode("utf-8", "replace"))
        return parse_txt(records)

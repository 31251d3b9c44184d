"""Where a recipient's mail goes next: the served domain's redirect, a relayhost, or its MX.

A hosted mailbox's address (`mailcore mailbox add`, the Mail API) is delivered locally: its
hop is `LOCAL`, which the runner writes into the mailbox store instead of connecting.
Mail for a served domain goes to that domain's `redirect_host:redirect_port` (its
`redirectTo`), with the domain's own TLS policy when it has one and the `[queue] tls`
default otherwise. While the domain is suspended (its owner disabled) this gateway's own
mail for it (Mail API outbox mail, bounces, notifications, digests: any kind but those of
ACCEPTED_KINDS) waits, deferred 4.2.1 (retried on the queue's schedule, bounced at its
lifetime), as the SMTP server answers the world's mail for it 450 4.2.1 meanwhile: it is not
relayed to a suspended customer's server. Mail accepted from the world before the
suspension (and released from quarantine) is still delivered, as it was answered 250.
Mail for anyone else (bounces to foreign senders) goes to the configured
`relayhost`, or, when none is set, to the recipient domain's best MX found with
twisted.names (the resolver is injectable), with the `[queue] tls` default; its other MX
hosts (up to MAX_MX_HOSTS in all, by preference) are tried in turn when it cannot be reached.
An MX route follows the domain's MTA-STS policy (`[queue] mta_sts`, mailcore.queue.mtasts):
under `enforce`, only the MX hosts it lists, with the `verify` TLS policy, or none at all
(deferred 4.7.5); under `testing`, what enforce would refuse is logged.

This gateway's own mail (bounces, Mail API and safedrop mail) names a served domain only
when that domain is proved or vouched for (`mailcore.queue.model.VOUCHED`): a user may claim
any name through the API while `[protecmail] verify_domains` is off, and must not draw the
gateway's mail for it to their own server. Mail for a domain served but not vouched for goes
the way the world's mail goes, with its served hop as `Hop.loop_to`: when that way leads
back to one of our own listeners (the domain's MX names us), or when the domain has no DNS
at all (nobody else can have it), the served hop is taken after all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy import Connection, select
from twisted.internet.defer import DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.queue.model import thd_domain_for
from mailcore.queue.mtasts import PolicyFinder, Quiet
from mailcore.queue.settings import DEFAULT_TLS, QueueSettings, effective_tls
from mailcore.store import Database
from mailcore.store.schema import domains, users

log = Logger()


@dataclass(frozen=True)
class Hop:
    """A next hop: host, port and TLS policy (one of settings.TLS_POLICIES); for an MX
    route, `fallbacks` are the domain's other MX hosts, tried in turn when `host` cannot be
    reached (RFC 5321 5.1)."""

    host: str
    port: int
    tls: str = DEFAULT_TLS
    fallbacks: tuple[str, ...] = ()
    # The hop to take instead when this one loops back to our own listeners: the served
    # hop of a domain that is served here but not vouched for (see the module's doc).
    loop_to: Hop | None = None
    # The mode of the MTA-STS policy that chose this MX hop ("enforce", "testing"), and
    # the domain whose it is; "" when none applies (mailcore.queue.mtasts). The domain is
    # no part of the hop's identity: domains whose MX hosts are the same (many domains of
    # one mail provider) share one hop, its hop_concurrency and its connections, as they do
    # without a policy; it names one of them, for the log.
    sts: str = ""
    sts_domain: str = field(default="", compare=False)

    def hosts(self) -> list[Hop]:
        """The hop of each host to try, in order, with no fallbacks of its own."""
        return [self if not self.fallbacks else replace(self, fallbacks=())] + [
            replace(self, host=host, fallbacks=()) for host in self.fallbacks]

    @property
    def label(self) -> str:
        if self.port == 0:
            return self.host  # LOCAL
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# The hop of a hosted mailbox: stored here, never sent.
LOCAL = Hop("local", 0, "local")


class LocalAddresses(Protocol):
    """Which addresses are hosted mailboxes (mailcore.mailapi.delivery.HostedAddresses)."""

    async def contains(self, address: str) -> bool: ...


class RoutingError(Exception):
    """No next hop for a recipient; `permanent` says whether to bounce rather than retry."""

    def __init__(self, message: str, *, permanent: bool = False,
                 no_domain: bool = False, status: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        # The recipient's domain does not exist in DNS (NXDOMAIN).
        self.no_domain = no_domain
        # The RFC 3463 status of the recipient's result.
        self.status = status or ("5.1.2" if permanent else "4.4.3")


# The kinds of mail (Envelope.kind) the gateway accepted from the world: still relayed to a
# suspended domain, as they were accepted (250) while it was served.
ACCEPTED_KINDS = frozenset({"relay", "release"})
# MX hosts of a domain tried at most (Postfix's smtp_mx_address_limit is 5 addresses).
MAX_MX_HOSTS = 5
# MX lookups under way at once at most (each is a socket of its own); the others wait.
MAX_LOOKUPS = 20
# Domain names whose served id is cached at most (then the cache starts again).
_SERVED_CACHE_LIMIT = 4096


class MXResolver(Protocol):
    """The part of twisted.names' resolver interface we use."""

    def lookupMailExchange(self, name: str) -> Any: ...


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` to (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return host, port
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, int(port_text)
    return text, default_port


def _domain_routes(conn: Connection, ids: list[int]
                   ) -> dict[int, tuple[str, int, str | None, bool]]:
    """Blocking: (redirect host, port, TLS policy or None, whether suspended: its owner is
    disabled) of each served domain in `ids`."""
    rows = conn.execute(
        select(
            domains.c.id, domains.c.redirect_host, domains.c.redirect_port, domains.c.tls,
            users.c.is_active,
        ).join(users, users.c.id == domains.c.owner_id).where(domains.c.id.in_(ids))
    ).all()
    return {row.id: (row.redirect_host, row.redirect_port, row.tls, not row.is_active)
            for row in rows}


class Router:
    """Maps (domain_id, address) to a Hop, caching the domains table for a short while."""

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        settings: QueueSettings,
        resolver: MXResolver | None = None,
        local: LocalAddresses | None = None,
        sts: PolicyFinder | None = None,
    ) -> None:
        self.db = db
        self.local = local
        self.clock = clock
        self.settings = settings
        self._resolver = resolver
        # Domain id -> (expiry, its hop or None: not served, whether it is suspended).
        self._cache: dict[int, tuple[float, Hop | None, bool]] = {}
        # Domain name -> (expiry, served domain id or None), for mail without a domain id.
        self._served: dict[str, tuple[float, int | None]] = {}
        self._lookups = DeferredSemaphore(MAX_LOOKUPS)
        # The MTA-STS policies of MX routes (None: `[queue] mta_sts` is off).
        self.sts = sts
        # A testing policy's warning: once a period per domain, not per recipient.
        self._sts_quiet = Quiet(clock, settings.route_cache_seconds)

    def _policy(self, domain_tls: str | None = None) -> str:
        """The domain's own TLS policy, or the `[queue] tls` default."""
        return effective_tls(domain_tls, self.settings.tls)

    def _fresh(self, domain_id: int, now: float) -> tuple[float, Hop | None, bool] | None:
        """The cached route of a served domain, unless it is missing or has expired."""
        entry = self._cache.get(domain_id)
        return entry if entry is not None and entry[0] >= now else None

    async def prefetch(self, domain_ids: Iterable[int | None]) -> None:
        """Load the routes of served domains not in the cache (one query for all)."""
        now = self.clock.seconds()
        missing = sorted(
            {d for d in domain_ids if d is not None and self._fresh(d, now) is None}
        )
        if not missing:
            return
        found = await self.db.read("queue_routes", _domain_routes, missing)
        expires = now + self.settings.route_cache_seconds
        for d in missing:
            route = found.get(d)
            hop = None
            suspended = False
            if route is not None:
                host, port, domain_tls, suspended = route
                host, parsed_port = parse_hostport(host, port)
                hop = Hop(host, parsed_port, self._policy(domain_tls))
            self._cache[d] = (expires, hop, suspended)

    def looks_up(self, domain_id: int | None) -> bool:
        """Whether the route of a recipient of `domain_id` is an MX lookup (it may be slow)."""
        return domain_id is None and not self.settings.relayhost

    async def route(self, domain_id: int | None, address: str, kind: str = "relay") -> Hop:
        """The next hop for one recipient (LOCAL for a hosted mailbox) of mail of `kind`
        (Envelope.kind), or RoutingError."""
        if self.local is not None and await self.local.contains(address):
            return LOCAL
        if domain_id is not None:
            cached = self._fresh(domain_id, self.clock.seconds())
            if cached is None:
                await self.prefetch([domain_id])
                cached = self._cache[domain_id]
            hop = cached[1]
            if hop is None:
                # Removed (by its owner, or with its owner by `mailcore user delete`): an
                # id is never given again (migration 0034), so no retry can route it.
                # Bounced now, not after days of retries to the same end.
                raise RoutingError(f"domain {domain_id} is no longer served", permanent=True)
            if hop.host == "":
                # A hosted domain (no next hop) and an address that is not its mailbox.
                raise RoutingError(f"no such mailbox here: {address}", permanent=True)
            if cached[2] and kind not in ACCEPTED_KINDS:
                # Its owner is disabled: our own mail for it waits, as the SMTP server's
                # 450 4.2.1 has the world's wait (see the module docstring).
                raise RoutingError("mailbox temporarily unavailable (its domain is "
                                   "suspended)", status="4.2.1")
            return hop
        if self.settings.relayhost:
            host, port = parse_hostport(self.settings.relayhost)
            return Hop(host, port, self._policy())
        served_id = await self._served_id(address)
        if served_id is None:
            return await self._mx(address)
        try:
            served: Hop | None = await self.route(served_id, address)
        except RoutingError:
            served = None  # removed meanwhile, or hosted and not a mailbox: the MX decides
        try:
            found = await self._mx(address)
        except RoutingError as e:
            if served is not None and e.permanent and e.no_domain:
                return served  # no DNS at all: nobody but us can have its mail
            raise
        return replace(found, loop_to=served)

    async def _served_id(self, address: str) -> int | None:
        """The served domain of an address routed without one (cached like routes)."""
        name = address.rpartition("@")[2].strip().rstrip(".").lower()
        now = self.clock.seconds()
        entry = self._served.get(name)
        if entry is None or entry[0] < now:
            if len(self._served) >= _SERVED_CACHE_LIMIT:
                self._served.clear()
            found = await self.db.read("queue_served_domain", thd_domain_for, name)
            entry = self._served[name] = (now + self.settings.route_cache_seconds, found)
        return entry[1]

    async def _mx(self, address: str) -> Hop:
        """The lowest-preference MX of the address's domain (its A record if it has none)."""
        from twisted.names.error import DNSNameError

        domain = address.rpartition("@")[2].strip().rstrip(".").lower()
        if not domain:
            raise RoutingError(f"no domain in {address!r}", permanent=True)
        if domain.startswith("[") and domain.endswith("]"):
            raise RoutingError("address literals are not routed", permanent=True)
        resolver = self._resolver
        if resolver is None:
            from twisted.names import client

            resolver = self._resolver = client.createResolver()
        try:
            answers, _authority, _additional = await self._lookups.run(
                resolver.lookupMailExchange, domain)
        except DNSNameError:
            raise RoutingError(f"domain {domain} does not exist", permanent=True,
                               no_domain=True) from None
        except Exception as e:
            raise RoutingError(f"MX lookup for {domain} failed: {e}") from None
        found: set[tuple[int, str]] = set()
        for rr in answers:
            payload = getattr(rr, "payload", None)
            if payload is None or not hasattr(payload, "preference"):
                continue
            found.add((int(payload.preference), str(payload.name).rstrip(".").lower()))
        if not found:
            return await self._sts(domain, Hop(domain, 25, self._policy()))
        ranked = sorted(found)
        if ranked[0][1] in ("", "."):
            raise RoutingError(f"domain {domain} accepts no mail (null MX)", permanent=True)
        names = list(dict.fromkeys(name for _pref, name in ranked if name not in ("", ".")))
        # Every MX host to _sts, which keeps MAX_MX_HOSTS of them once it has left out
        # those an enforce policy does not list (a listed sixth is not lost).
        return await self._sts(domain, Hop(names[0], 25, self._policy(), tuple(names[1:])))

    async def _sts(self, domain: str, hop: Hop) -> Hop:
        """`hop`, the MX route of `domain`, as its MTA-STS policy has it (see the module
        doc): under enforce only its matching hosts, STARTTLS required and verified; at
        most MAX_MX_HOSTS hosts in all."""
        hosts = [hop.host, *hop.fallbacks]
        hop = replace(hop, fallbacks=hop.fallbacks[:MAX_MX_HOSTS - 1])
        if self.sts is None or self._resolver is None:
            return hop
        policy = await self.sts.policy(domain, self._resolver)  # type: ignore[arg-type]
        if policy is None or policy.mode == "none":
            return hop
        if policy.mode == "testing":
            unlisted = [h for h in (hop.host, *hop.fallbacks) if not policy.matches(h)]
            if unlisted and self._sts_quiet.due(domain):
                log.warn("MTA-STS policy of {domain} (testing) does not list MX {hosts}; "
                         "delivering as without a policy", domain=domain,
                         hosts=", ".join(unlisted))
            return replace(hop, sts="testing", sts_domain=domain)
        matching = [h for h in hosts if policy.matches(h)]
        if not matching:
            raise RoutingError(
                f"no MX host of {domain} ({', '.join(hosts)}) is listed by its MTA-STS "
                f"policy (enforce: {', '.join(policy.mx)})", status="4.7.5")
        return replace(hop, host=matching[0], fallbacks=tuple(matching[1:MAX_MX_HOSTS]),
                       tls="verify", sts="enforce", sts_domain=domain)

"""Proof that a customer owns a domain: a DNS TXT record carrying a per-domain token.

Opt-in, with `[protecmail] verify_domains = true`. A domain then added through the API or
the admin CLI (without `--verified`) is stored pending with a random token and is not
served (its mail is refused 550, like an unknown domain's) until its owner publishes

    _mailcore-verify.<domain>.  TXT  "mailcore-verify=<token>"

(`<domain>` in its A-label form) and a lookup finds it. The API's reply to adding the
domain names the record; `mailcore domain verify NAME` prints it and looks now. A
`DomainVerifier` looks for the record of every pending domain every `verify_interval`
seconds, `verify_concurrency` lookups at a time, and forgets claims still unproven after
`verify_expiry_days`, so that nobody can hold a name (say gmail.com) they cannot prove.
Lookups go to `dns_servers` (a list of "host", "host:port" or "[v6]:port"), by default
to the `nameserver`s of /etc/resolv.conf. A recursive resolver keeps a "no such record"
answer for the zone's negative TTL, so a record published after a failed lookup may take
that long to be seen; servers that do not cache avoid the wait.

The token is not a secret: it is published. What it proves is control of the zone.

`[protecmail]` keys read here: verify_domains (false), dns_servers ([]: the system's),
verify_interval (60), verify_concurrency (8), verify_expiry_days (7).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.names.common import ResolverBase
from twisted.python.failure import Failure

from mailcore.config import ConfigError, is_positive_number
from mailcore.gateway.domains import Domain, DomainError, DomainService
from mailcore.outages import log_failure
from mailcore.periodic import PeriodicService

log = Logger()

RECORD_LABEL = "_mailcore-verify"
VALUE_PREFIX = "mailcore-verify="
RESOLV_CONF = Path("/etc/resolv.conf")
# Seconds to wait for each try of a lookup (then the next server, then give up).
LOOKUP_TIMEOUT = (2, 4)
# The [protecmail] keys this module reads (the table holds others too).
SETTINGS_KEYS = (
    "verify_domains", "dns_servers", "verify_interval", "verify_concurrency",
    "verify_expiry_days",
)


@dataclass(frozen=True)
class VerificationRecord:
    """The DNS record that proves a domain's ownership."""

    name: str
    value: str
    type: str = "TXT"

    def zone_line(self) -> str:
        """The record as a zone file line."""
        return f'{self.name}. IN TXT "{self.value}"'

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "type": self.type, "value": self.value}


def verification_record(domain: Domain) -> VerificationRecord | None:
    """The record `domain` needs, or None when it never needed one."""
    if domain.verify_token is None:
        return None
    return VerificationRecord(f"{RECORD_LABEL}.{domain.name}", VALUE_PREFIX + domain.verify_token)


@dataclass(frozen=True)
class CheckResult:
    """What a lookup found: `verified` (now or before) and, when not, why not."""

    domain: Domain
    verified: bool
    detail: str


def _server(text: str) -> tuple[str, int]:
    """'host', 'host:port', 'v6' or '[v6]:port' to (IP address, port)."""
    host, port = text.strip(), 53
    if host.startswith("["):
        inner, _, rest = host[1:].partition("]")
        host = inner
        if rest:
            if not rest.startswith(":") or not rest[1:].isascii() or not rest[1:].isdigit():
                raise ValueError(text)
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(text)
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return ipaddress.ip_address(host).compressed, port


@dataclass(frozen=True)
class VerificationSettings:
    """The `[protecmail]` keys of domain ownership checks."""

    verify_domains: bool = False
    dns_servers: tuple[tuple[str, int], ...] = ()
    verify_interval: float = 60.0
    verify_concurrency: int = 8
    verify_expiry_days: float = 7.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> VerificationSettings:
        """From `[protecmail]` (other keys of the table are left to their readers)."""
        values: dict[str, Any] = {}
        if "verify_domains" in section:
            value = section["verify_domains"]
            if not isinstance(value, bool):
                raise ConfigError("[protecmail] verify_domains must be true or false")
            values["verify_domains"] = value
        if "dns_servers" in section:
            servers = section["dns_servers"]
            if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
                raise ConfigError('[protecmail] dns_servers must be a list of "host[:port]" '
                                  "strings")
            try:
                values["dns_servers"] = tuple(_server(s) for s in servers)
            except ValueError as e:
                raise ConfigError(f"[protecmail] dns_servers: {str(e)!r} is not an IP address "
                                  'with an optional port ("192.0.2.53", "192.0.2.53:5353", '
                                  '"[2001:db8::53]:53")') from None
        for key, kind in (("verify_interval", float), ("verify_concurrency", int),
                          ("verify_expiry_days", float)):
            if key not in section:
                continue
            value = section[key]
            if not is_positive_number(value, integer=kind is int):
                what = "a positive whole number" if kind is int else "a positive number"
                raise ConfigError(f"[protecmail] {key} must be {what}")
            values[key] = kind(value)
        return cls(**values)


def system_nameservers(path: Path = RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf (127.0.0.1 when there are none, as libc
    does). Blocks on a small file read: call before the reactor runs."""
    servers: list[tuple[str, int]] = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append((ipaddress.ip_address(fields[1].split("%")[0]).compressed, 53))
            except ValueError:
                continue
    return servers or [("127.0.0.1", 53)]


class DomainVerifier(PeriodicService):
    """Looks up the ownership records of pending domains: every `verify_interval` seconds
    on `clock` (when run as a service) and on demand (`check`). `reactor` carries the DNS
    queries (UDP, and their timeouts); it defaults to `clock`, which the daemon gives as
    its reactor."""

    name = "domain-verifier"

    def __init__(
        self,
        domains: DomainService,
        clock: IReactorTime,
        settings: VerificationSettings,
        *,
        reactor: Any = None,
    ) -> None:
        self.domains = domains
        self.clock = clock
        self.settings = settings
        self._reactor = reactor if reactor is not None else clock
        self._servers: list[tuple[str, int]] = list(settings.dns_servers)
        self._resolver: ResolverBase | None = None
        self._limit = defer.DeferredSemaphore(settings.verify_concurrency)
        self._pass: defer.Deferred[None] = defer.succeed(None)

    def load_nameservers(self) -> None:
        """Read the system's name servers when `dns_servers` gives none. Blocks (a small
        file): call before the reactor runs, as `Core.build` does."""
        if not self._servers:
            self._servers = system_nameservers()

    @property
    def resolver(self) -> ResolverBase:
        if self._resolver is None:
            if not self._servers:
                raise RuntimeError("DomainVerifier.load_nameservers() was not called")
            self._resolver = client.Resolver(
                servers=self._servers, reactor=self._reactor, timeout=LOOKUP_TIMEOUT
            )
        return self._resolver

    # -- the periodic pass ----------------------------------------------------------------

    def interval(self) -> float:
        return self.settings.verify_interval

    def tick(self) -> defer.Deferred[None]:
        self._pass = defer.Deferred.fromCoroutine(self._tick_logged())
        return self._pass

    def idle(self) -> defer.Deferred[None]:
        """Fires once the periodic pass in flight (if any) is over."""
        done: defer.Deferred[None] = defer.Deferred()

        def finished(result: object) -> object:
            done.callback(None)
            return result

        self._pass.addBoth(finished)
        return done

    async def _tick_logged(self) -> None:
        try:
            await self.check_pending()
        except Exception as e:
            log_failure(log, "checking the domains that wait for proof of ownership failed",
                        Failure(e))

    async def check_pending(self) -> list[CheckResult]:
        """Forget expired claims, then look for the record of every other pending domain,
        at most `verify_concurrency` lookups at a time."""
        expiry = datetime.timedelta(days=self.settings.verify_expiry_days)
        for name in await self.domains.drop_unverified(self.domains.now() - expiry):
            log.info("domain {name} dropped: its ownership record was not found within "
                     "{days} days", name=name, days=self.settings.verify_expiry_days)
        pending = await self.domains.pending_domains()
        checks = [self._limit.run(self._check, domain) for domain in pending]
        results: list[CheckResult] = await defer.gatherResults(checks, consumeErrors=True)
        return results

    # -- one domain -----------------------------------------------------------------------

    async def check(self, name: str, *, owner_id: int | None = None) -> CheckResult:
        """Look for `name`'s record now and mark the domain verified when it is found.
        DomainError when there is no such domain (or it is not `owner_id`'s)."""
        domain = await self.domains.get(name, owner_id=owner_id)
        if domain is None:
            raise DomainError(f"No such domain: {name}.", "domain")
        if not domain.pending:
            return CheckResult(domain, True, "verified")
        return await self._check(domain)

    async def _check(self, domain: Domain) -> CheckResult:
        record = verification_record(domain)
        assert record is not None
        try:
            found = await self._lookup(record.name)
        except dns_error.DNSNameError:
            return CheckResult(domain, False, f"{record.name} does not exist in DNS")
        except (dns_error.DomainError, dns_error.DNSQueryTimeoutError, OSError) as e:
            return CheckResult(domain, False,
                               f"the DNS lookup of {record.name} failed: {_describe(e)}")
        if record.value not in found:
            if not found:
                return CheckResult(domain, False, f"{record.name} has no TXT record")
            return CheckResult(domain, False,
                               f"the TXT records of {record.name} do not include "
                               f'"{record.value}"')
        verified = await self.domains.mark_verified(domain)
        if verified is None:
            return CheckResult(domain, False, "the domain was changed meanwhile")
        log.info("domain {name} verified: {record} found", name=domain.name,
                 record=record.zone_line())
        return CheckResult(verified, True, "verified")

    async def _lookup(self, name: str) -> list[str]:
        """The TXT strings at `name` (each record's character-strings joined)."""
        answers, _authority, _additional = await self.resolver.lookupText(
            name, timeout=LOOKUP_TIMEOUT
        )
        found: list[str] = []
        for answer in answers:
            if answer.type == dns.TXT:
                data: Sequence[bytes] = answer.payload.data
                found.append(b"".join(data).decode("utf-8", "replace"))
        return found


def _describe(error: BaseException) -> str:
    if isinstance(error, dns_error.DNSQueryTimeoutError):
        return "no answer (timed out)"
    names = {
        dns_error.DNSServerError: "server failure (SERVFAIL)",
        dns_error.DNSQueryRefusedError: "query refused (REFUSED)",
        dns_error.DNSFormatError: "format error (FORMERR)",
        dns_error.DNSNotImplementedError: "not implemented (NOTIMP)",
    }
    for kind, text in names.items():
        if isinstance(error, kind):
            return text
    return str(error) or type(error).__name__

"""The filtering stage of the pipeline: tokens, the filter chain, then the domain's policy.

Only messages of kind "relay" are filtered (bounces, releases, digests are ours, and a
released message was judged already). For a relay message:

1. Filtering tokens: one per recipient, charged to the owner of each recipient domain,
   keyed by queue id and domain so a retried message is not charged twice. An empty tank
   (with `[tokens] when_empty = "defer"`) defers the message: it stays queued, nothing lost.
   Each owner's charge is all or nothing; when one owner's tanks are empty the others'
   charges stand, so the retry does not take them again. In the daemon the stage is also
   the spool's `Charger`: a message is charged in the group commit that stores it
   (`charges_for`: the same charges, made at the accept), and the recipients paid for are
   stored `charged` (`paid`): that mark, not a keyed row, records the charge, so their
   filtering, on any node and after any restart, asks nothing of the store. What is still
   to charge (an empty tank at the accept, a message stored before the mark existed) is
   asked for here, keyed: the charges of every message being filtered at the same moment
   share one transaction (`mailcore.billing.tokens.ChargeBatcher`, in the spool's next
   group commit).
2. The filter chain scans the bytes. `FilterUnavailable` defers the message (a fail-open
   filter never raises it: the chain skips that filter instead, as the operator chose).
   A message larger than a fail-closed filter takes (its `max_size`, clamd's
   StreamMaxLength) would only be deferred again and again until it expired: it is
   quarantined unscanned instead (category "oversize"; released, it is delivered as it
   is), unless that filter's entry has `skip_oversize`.
3. Per recipient domain, seed 004's policy: `virusAction` for a virus, else `spamAction`
   for spam: 0 quarantine (not delivered), 1 tag and deliver. Tags are `X-Spam-Flag: YES`,
   `X-Spam-Score`, `X-Spam-Status: Yes, score=… required=… tests=…`, for a virus
   `X-Virus-Status: Infected (names)`, and the subject tag. Clean mail is not touched.

A recipient outside the served domains (mail to `<postmaster>` when `[smtp] postmaster`
is such an address: the only one the SMTP server accepts) costs no token and is never
quarantined, there being no owner to charge or to release it: it is scanned with the
rest and tagged when not clean.

The queue runner runs the pipeline before it takes a connection to the next hop, for at
most `max_scans` messages at a time (the others wait their turn, already counted in the
runner's memory bound), so a slow filter never holds an outbound connection and a burst
never opens thousands of scans at once.

```toml
[pipeline]
filtering = true               # run this stage at all (false: every message is delivered
                               # unfiltered, no tokens charged)
max_scans = 32                 # messages filtered at the same time, at most
subject_tag = "[SPAM]"         # put before the Subject of tagged spam ("" = none)
virus_subject_tag = "[VIRUS]"  # put before the Subject of tagged virus mail ("" = none)
```

A tag is one line of text (a control character is refused when the config is read); one
that is not ASCII ("[СПАМ]") goes into the Subject as an RFC 2047 encoded word.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from filters import FilterChain, FilterUnavailable, ScanContext, Verdict
from mailcore import maillog
from mailcore.billing.tokens import (
    EMPTY,
    OK,
    Charge,
    ChargeBatcher,
    ConsumeResult,
    TokenService,
)
from mailcore.config import ConfigError
from mailcore.gateway.domains import Domain
from mailcore.gateway.quarantine import QuarantineService, ToKeep
from mailcore.queue.pipeline import (
    DEFAULT_MAX_SCANS,
    LATER,
    Action,
    Decision,
    Later,
    PipelineMessage,
)
from mailcore.smtp.envelope import Envelope
from mailcore.text import has_control, has_surrogate

log = Logger()


@dataclass(frozen=True)
class PolicySettings:
    """The `[pipeline]` table."""

    filtering: bool = True
    max_scans: int = DEFAULT_MAX_SCANS
    subject_tag: str = "[SPAM]"
    virus_subject_tag: str = "[VIRUS]"

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> PolicySettings:
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key == "filtering":
                if not isinstance(value, bool):
                    raise ConfigError("[pipeline] filtering must be true or false")
            elif key == "max_scans":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError("[pipeline] max_scans must be a positive integer")
            elif key not in ("subject_tag", "virus_subject_tag"):
                raise ConfigError(f"[pipeline] unknown key {key!r}")
            elif not isinstance(value, str):
                raise ConfigError(f"[pipeline] {key} must be a string")
            elif has_control(value) or has_surrogate(value):
                # It goes into the Subject of every tagged message: a CR or LF would add
                # header fields, a NUL no next hop takes.
                raise ConfigError(f"[pipeline] {key} must be one line of text: {key} = "
                                  f"{value!r} holds a control character")
            values[key] = value
        return cls(**values)


class DomainLookup(Protocol):
    """The served-domain snapshot (DomainService)."""

    @property
    def loaded(self) -> bool: ...

    def when_loaded(self) -> defer.Deferred[None]: ...

    def domain_by_id(self, domain_id: int) -> Domain | None: ...


def spam_headers(verdict: Verdict) -> tuple[tuple[str, str], ...]:
    """SpamAssassin-style header fields for a spam verdict."""
    tests = ",".join(verdict.symbol_names) or "none"
    return (
        ("X-Spam-Flag", "YES"),
        ("X-Spam-Score", f"{verdict.score:.1f}"),
        ("X-Spam-Status",
         f"Yes, score={verdict.score:.1f} required={verdict.threshold:.1f} tests={tests}"),
    )


def describe(verdict: Verdict) -> tuple[str, str]:
    """(category, reason) of a verdict that is not clean."""
    if verdict.viruses:
        return "virus", "virus: " + ", ".join(verdict.viruses)
    tests = ",".join(verdict.symbol_names)
    return "spam", f"spam: score={verdict.score:.1f} required={verdict.threshold:.1f} " \
                   f"tests={tests}"


def log_verdict(queue_id: str, verdict: Verdict) -> None:
    """The mail log's `filtered` line: the verdict, the score and which filters answered."""
    if verdict.viruses:
        word = "virus"
    elif verdict.spam:
        word = "spam"
    else:
        word = "clean"
    names = [v.filter for v in verdict.results] or [verdict.filter]
    skipped = f"skipped={','.join(verdict.skipped)}" if verdict.skipped else ""
    maillog.filtered(queue_id, verdict=word, score=verdict.score, threshold=verdict.threshold,
                     filters=names, detail=skipped)


class FilteringStage:
    """A pipeline Stage; see the module docstring."""

    def __init__(
        self,
        chain: FilterChain,
        domains: DomainLookup,
        tokens: ChargeBatcher | TokenService | None,
        settings: PolicySettings | None = None,
    ) -> None:
        self.chain = chain
        self.domains = domains
        # A bare TokenService charges through a batcher of its own, straight to the store.
        self.tokens = ChargeBatcher(tokens) if isinstance(tokens, TokenService) else tokens
        self.settings = settings or PolicySettings()

    def _by_domain(
        self, recipients: Iterable[tuple[str, int | None]]
    ) -> tuple[dict[int, list[str]], dict[int, Domain]] | None:
        """The recipients' addresses by served domain, and those domains; None when one is
        not in the snapshot (yet)."""
        by_domain: dict[int, list[str]] = {}
        doms: dict[int, Domain] = {}
        for address, domain_id in recipients:
            if domain_id is None:
                continue  # the postmaster outside the served domains (module docstring)
            dom = self.domains.domain_by_id(domain_id)
            if dom is None:
                return None
            doms[dom.id] = dom
            by_domain.setdefault(dom.id, []).append(address)
        return by_domain, doms

    # -- the spool's Charger: a message is charged in the commit that stores it ---------

    def charges_for(self, queue_id: str, envelope: Envelope) -> list[DomainCharge]:
        """The charges of a message the spool is about to store: those `process` will ask
        for (none when it will not filter it, or cannot tell the owners yet)."""
        if (envelope.kind != "relay" or not isinstance(self.tokens, ChargeBatcher)
                or not self.domains.loaded):
            return []
        owners = self._by_domain((r.address, r.domain_id) for r in envelope.recipients)
        if owners is None:
            return []
        return _charges(queue_id, *owners, fresh=True)

    def thd_charge(self, conn: Connection, charges: list[Charge], now: float) -> list[Any]:
        """Blocking: apply `charges` in the spool's group commit."""
        assert isinstance(self.tokens, ChargeBatcher)
        return self.tokens.thd_charge(conn, charges, now)

    @staticmethod
    def paid(charges: list[DomainCharge], outcomes: list[Any]) -> frozenset[int]:
        """The domains one message's `charges_for` paid for ("ok"; not "empty", not an
        error): its recipients there are stored `charged`."""
        return frozenset(c.domain_id for c, outcome in zip(charges, outcomes, strict=True)
                         if outcome == OK)

    # -- the stage ------------------------------------------------------------------------

    async def process(self, message: PipelineMessage) -> Decision | None:
        if message.kind != "relay":
            return None
        if not self.domains.loaded:
            # Just started: work claimed before the first snapshot is not deferred for it.
            await self.domains.when_loaded()
        owners = self._by_domain((r.address, r.domain_id) for r in message.recipients)
        if owners is None:
            return _UNKNOWN_DOMAIN
        by_domain, doms = owners
        if self.tokens is not None:
            charges = _unpaid(message, by_domain, doms)
            if charges:
                empty = _empty(await self.tokens.consume_all(charges), charges, doms)
                if empty is not None:
                    return empty
        context = _context(message)
        try:
            verdict = await self.chain.scan(message.body, context)
        except FilterUnavailable as e:
            return _unavailable(message, e, by_domain)
        return self._decide(message, verdict, by_domain, doms)

    def process_now(self, message: PipelineMessage) -> Decision | Later | None:
        """`process` as a plain call when nothing in it waits (the usual relayed message in
        the daemon: the domains are loaded, its tokens were charged when it was stored, and
        every filter analyses it inline); else LATER, with nothing done."""
        if message.kind != "relay":
            return None
        if not self.domains.loaded or not self.chain.inline(message.body):
            return LATER
        owners = self._by_domain((r.address, r.domain_id) for r in message.recipients)
        if owners is None:
            return _UNKNOWN_DOMAIN
        by_domain, doms = owners
        if self.tokens is not None and _unpaid(message, by_domain, doms):
            return LATER  # a charge to ask the store for
        try:
            verdict = self.chain.scan_now(message.body, _context(message))
        except FilterUnavailable as e:
            return _unavailable(message, e, by_domain)
        if verdict is None:
            return LATER  # more work than a plain call takes on (filters.NotInline)
        return self._decide(message, verdict, by_domain, doms)

    def _decide(self, message: PipelineMessage, verdict: Verdict,
                by_domain: dict[int, list[str]], doms: dict[int, Domain]) -> Decision | None:
        """The verdict logged, and what the recipients' domains' policy makes of it."""
        log_verdict(message.queue_id, verdict)
        if verdict.clean:
            return None
        category, reason = describe(verdict)
        held: list[str] = []
        for domain_id, addresses in by_domain.items():
            dom = doms[domain_id]
            action = dom.virus_action if verdict.viruses else dom.spam_action
            if action == 0:
                held.extend(addresses)
        if len(held) == len(message.recipients):
            return Decision(Action.QUARANTINE, reason=reason, category=category)
        headers: tuple[tuple[str, str], ...] = ()
        prefix = ""
        if verdict.spam:
            headers += spam_headers(verdict)
            prefix = self.settings.subject_tag
        if verdict.viruses:
            headers += (("X-Virus-Status", f"Infected ({', '.join(verdict.viruses)})"),)
            prefix = self.settings.virus_subject_tag
        return Decision(Action.TAG, headers, reason=reason, quarantine=tuple(held),
                        subject_prefix=prefix, category=category)


_UNKNOWN_DOMAIN = Decision(Action.DEFER, reason="4.3.0 recipient domain not known to the "
                           "filtering policy yet")


def _empty(results: list[ConsumeResult], charges: list[DomainCharge],
           doms: dict[int, Domain]) -> Decision | None:
    """The deferral when an owner's tanks were empty (results in `charges`' order)."""
    for charge, result in zip(charges, results, strict=True):
        if result == EMPTY:
            return Decision(Action.DEFER, reason=f"4.7.1 filtering tokens of the owner "
                            f"of {doms[charge.domain_id].name} are exhausted")
    return None


def _context(message: PipelineMessage) -> ScanContext:
    return ScanContext(
        mail_from=message.mail_from,
        recipients=tuple(r.address for r in message.recipients),
        queue_id=message.queue_id,
    )


# The deferral when a fail-closed filter gave no verdict. The filter's own reason (an
# internal daemon's address, an unexpected exception's text) is logged: the result's detail
# is quoted to the sender by the DSN if the message expires.
FILTERING_UNAVAILABLE = "4.7.0 filtering unavailable"


# The category of mail a fail-closed filter can never scan (larger than it takes).
UNSCANNED = "oversize"


def _unavailable(message: PipelineMessage, e: FilterUnavailable,
                 by_domain: dict[int, list[str]]) -> Decision:
    """A fail-closed filter gave no verdict: defer. When retrying cannot help (the message
    is larger than the filter takes), the recipients of served domains are quarantined
    instead, unscanned, for a person to release; the others (`[smtp] postmaster` outside
    them: no owner to release it) stay deferred until the message expires."""
    if not e.permanent:
        log.warn("{queue_id}: deferred, {error}", queue_id=message.queue_id, error=str(e))
        return Decision(Action.DEFER, reason=FILTERING_UNAVAILABLE)
    log.warn("{queue_id}: quarantined unscanned, {error}", queue_id=message.queue_id,
             error=str(e))
    reason = f"unscanned: too large for filter {e.filter}"
    held = tuple(address for addresses in by_domain.values() for address in addresses)
    if len(held) == len(message.recipients):
        return Decision(Action.QUARANTINE, reason=reason, category=UNSCANNED)
    return Decision(Action.DEFER, reason=FILTERING_UNAVAILABLE, quarantine=held,
                    category=UNSCANNED)


@dataclass(frozen=True)
class DomainCharge(Charge):
    """The charge for one recipient domain's part of a message."""

    domain_id: int = 0


def _charges(queue_id: str, by_domain: dict[int, list[str]],
             doms: dict[int, Domain], *, fresh: bool = False) -> list[DomainCharge]:
    """One charge per recipient domain: a token per recipient to its owner, keyed by queue
    id and domain (`fresh` for a message being stored: no charge can have that key yet)."""
    return [DomainCharge(doms[domain_id].owner_id, len(addresses), f"{queue_id}:{domain_id}",
                         fresh, domain_id)
            for domain_id, addresses in by_domain.items()]


def _unpaid(message: PipelineMessage, by_domain: dict[int, list[str]],
            doms: dict[int, Domain]) -> list[DomainCharge]:
    """The charges still to ask for: those of the domains with a recipient not stored
    `charged` (all of a domain's recipients in a message share its one charge)."""
    unpaid = {r.domain_id for r in message.recipients if not r.charged}
    if not unpaid:
        return []
    return _charges(message.queue_id,
                    {d: a for d, a in by_domain.items() if d in unpaid}, doms)


class PipelineQuarantine:
    """The pipeline's QuarantineStore: keeps a message for the decision's recipients (all
    of them for a QUARANTINE, else those named in `decision.quarantine`), in the queue
    runner's transaction that records them quarantined."""

    def __init__(self, service: QuarantineService) -> None:
        self.service = service

    def thd_keep(self, conn: Connection, message: PipelineMessage, decision: Decision,
                 now: float) -> None:
        wanted = set(decision.quarantine)
        items = [
            ToKeep(message.queue_id, message.mail_from, r.address, int(r.domain_id or 0),
                   decision.category or "spam", decision.reason)
            for r in message.recipients
            if decision.action is Action.QUARANTINE or r.address in wanted
        ]
        self.service.thd_keep(conn, items, message.body, now)


class ChainService(Service):
    """Owns the filter chain's lifetime: closes its connections (rspamd pool) at stop."""

    def __init__(self, chain: FilterChain) -> None:
        self.chain = chain

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self.chain.close())

"""The background sender: claims due deliveries, posts them signed, records each attempt and
retries with backoff."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.fetch.secrets import SecretError
from mailcore.netpolicy import AddressRefused
from mailcore.outages import log_failure
from mailcore.periodic import Sweeper
from mailcore.text import storable
from mailcore.webhooks.client import (
    SNIPPET_BYTES,
    USER_AGENT,
    AnswerTooLong,
    _Snippet,
    guarded_http_client,
)
from mailcore.webhooks.events import SWEEP_INTERVAL
from mailcore.webhooks.model import WebhookError
from mailcore.webhooks.service import Webhooks
from mailcore.webhooks.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from mailcore.webhooks.store import (
    GONE,
    TAKEN,
    Due,
    thd_claim_due,
    thd_record_attempt,
)

log = Logger()

PRUNE_INTERVAL = 3600.0  # the delivery log's prune (WebhookPruner)
class AttemptTimedOut(Exception):
    pass


@dataclass
class Outcome:
    """What one attempt got: a status code and what to log, or an error."""

    status_code: int | None = None
    error: str | None = None
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender(Service):
    """Posts due deliveries in the background: a sweep every `poll_interval` (and at once
    when events are queued), at most `concurrency` attempts at a time, each bounded. The
    sweep also tells the sync events left pending (`Webhooks.tell_left`), at its start and
    every `SWEEP_INTERVAL` seconds."""

    name = "webhooks"

    def __init__(
        self, webhooks_service: Webhooks, clock: IReactorTime, http: Any,
    ) -> None:
        self.webhooks = webhooks_service
        self.db = webhooks_service.db
        self.clock = clock
        self.settings = webhooks_service.settings
        self._http = http
        self._loop: task.LoopingCall | None = None
        self._soon: IDelayedCall | None = None
        self._sweeping: Deferred[int] | None = None
        self._again = False
        # delivery id -> (webhook id, user id, the attempt)
        self._in_flight: dict[int, tuple[int, int, Deferred[None]]] = {}
        self._last_told = float("-inf")
        webhooks_service.sender = self

    @property
    def http(self) -> Any:
        """The HTTP client (the guarded treq client, built on first use, unless injected)."""
        if self._http is None:
            self._http = guarded_http_client(
                self.clock, self.webhooks.policy, self.settings.timeout
            )
        return self._http

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_interval, now=True).addErrback(
            lambda f: log.failure("webhook sender stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.webhooks.settle()
        pending = [d for _, _, d in self._in_flight.values()]
        for d in pending:
            d.cancel()
        if pending:
            await defer.DeferredList(pending, consumeErrors=True)
        if self._sweeping is not None:
            await defer.DeferredList([self._sweeping], consumeErrors=True)

    def kick(self) -> None:
        """New deliveries were queued: sweep soon rather than at the next tick."""
        if not self.running:
            return
        if self._soon is None or not self._soon.active():
            self._soon = self.clock.callLater(0, self._tick)

    def _tick(self) -> Deferred[int]:
        self._soon = None
        if self._sweeping is not None:
            self._again = True
            return defer.succeed(0)
        d = Deferred.fromCoroutine(self.sweep())
        d.addErrback(self._sweep_failed)
        return d

    def _sweep_failed(self, failure: Failure) -> int:
        log_failure(log, "webhook sweep failed", failure)
        return 0

    async def sweep(self) -> int:
        """Claim what is due (up to free room) and start those attempts; returns how many."""
        if self._sweeping is not None:
            self._again = True
            return 0
        started = 0
        self._sweeping = Deferred()
        try:
            await self._tell_left()
            while True:
                self._again = False
                room = self.settings.concurrency - len(self._in_flight)
                if room <= 0:
                    break
                now = self.clock.seconds()
                lease = now + self.settings.timeout * 3 + 30
                busy: dict[int, int] = {}
                busy_users: dict[int, int] = {}
                for webhook_id, user_id, _ in self._in_flight.values():
                    busy[webhook_id] = busy.get(webhook_id, 0) + 1
                    busy_users[user_id] = busy_users.get(user_id, 0) + 1
                due = await self.db.run("claim_webhook_deliveries", thd_claim_due, now, lease,
                                        room, busy, self.settings.per_webhook, busy_users,
                                        self.settings.per_user)
                for item in due:
                    self._start(item)
                started += len(due)
                if len(due) < room and not self._again:
                    break
        finally:
            sweeping, self._sweeping = self._sweeping, None
            sweeping.callback(started)
        return started

    async def _tell_left(self) -> None:
        # The events a crash, a store error or a stop left pending: at the first sweep (the
        # start) and every SWEEP_INTERVAL after. A failure leaves them to the next one.
        now = self.clock.seconds()
        if now - self._last_told < SWEEP_INTERVAL:
            return
        self._last_told = now
        try:
            await self.webhooks.tell_left()
        except Exception:
            log_failure(log, "telling pending webhook events failed")

    def _start(self, item: Due) -> None:
        d = Deferred.fromCoroutine(self.attempt(item))
        self._in_flight[item.id] = (item.webhook_id, item.user_id, d)

        def finished(outcome: Any) -> None:
            self._in_flight.pop(item.id, None)
            if isinstance(outcome, Failure) and not outcome.check(defer.CancelledError):
                log.failure("webhook delivery {id} failed", outcome, id=item.id)
            if self.running:
                self.kick()

        d.addBoth(finished)

    async def attempt(self, item: Due) -> None:
        """One attempt at one delivery, and its record in the log."""
        now = self.clock.seconds()
        if not item.active:
            await self._record(item, now=now, status="cancelled", attempts=item.attempts,
                               next_attempt_at=now, status_code=None,
                               error="the webhook is disabled")
            return
        try:
            outcome = await self.post(item)
        except defer.CancelledError:
            # Stopping: the delivery stays pending and is retried after its lease.
            raise
        done = self.clock.seconds()
        attempts = item.attempts + 1
        disable = None
        if outcome.ok:
            status, next_at = "success", done
        elif outcome.status_code == 410:
            status, next_at, disable = "failed", done, item.webhook_id
            outcome.error = (outcome.error or "") + " (410 Gone: the webhook was disabled)"
        elif outcome.refused or attempts >= self.settings.max_attempts:
            status, next_at = "failed", done
        else:
            status, next_at = "pending", done + self.settings.backoff(attempts)
        await self._record(item, now=done, status=status, attempts=attempts,
                           next_attempt_at=next_at, status_code=outcome.status_code,
                           error=outcome.error, disable_webhook=disable)

    async def _record(self, item: Due, **outcome: Any) -> None:
        """Record an attempt at `item` while this node's claim on it stands (else another
        node took it over after the lease lapsed, and its record stands). The error may
        quote the receiver's answer, which may hold NUL: PostgreSQL's text columns refuse
        it (the record would fail, and the attempt go uncounted), so it is replaced."""
        if outcome.get("error"):
            outcome["error"] = storable(outcome["error"])
        done = await self.db.run("record_webhook_attempt", thd_record_attempt, item.id,
                                 lease=item.lease, **outcome)
        if done == TAKEN:
            log.warn("webhook delivery {id} was taken over by another node while this one "
                     "attempted it (its lease lapsed); this attempt is not recorded",
                     id=item.id)
        elif done == GONE:
            log.info("webhook delivery {id} was removed while it was attempted (its webhook "
                     "or its user was deleted): nothing to record", id=item.id)

    async def post(self, item: Due) -> Outcome:
        """Sign and POST one delivery; never raises for what the receiver does."""
        try:
            url = self.webhooks.policy.check_url(item.url)
        except WebhookError as e:
            return Outcome(error=e.message, refused=True)
        try:
            secret = self.webhooks.secrets.decrypt(item.secret_enc)
        except SecretError as e:
            return Outcome(error=str(e), refused=True)
        body = item.payload.encode("utf-8")
        timestamp = int(self.clock.seconds())
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [USER_AGENT.encode("ascii")],
            EVENT_HEADER.encode("ascii"): [item.event.encode("ascii")],
            DELIVERY_HEADER.encode("ascii"): [item.delivery_id.encode("ascii")],
            TIMESTAMP_HEADER.encode("ascii"): [str(timestamp).encode("ascii")],
            SIGNATURE_HEADER.encode("ascii"): [sign(secret, timestamp, body).encode("ascii")],
        }
        # One deadline for the whole attempt: connecting, sending, the answer's head and
        # what is read of its body.
        deadline = self.clock.seconds() + self.settings.timeout
        try:
            response = await self._bounded(self.http.request(
                "POST", url, headers=headers, data=body, allow_redirects=False,
                unbuffered=True,
            ), deadline)
            snippet = _Snippet(SNIPPET_BYTES)
            response.deliverBody(snippet)
            text = (await self._bounded(snippet.done, deadline)).decode(
                "utf-8", "replace").strip()
        except AttemptTimedOut:
            return Outcome(error=f"no answer within {self.settings.timeout:g} s")
        except AddressRefused as e:
            return self._refused(item, e)
        except defer.CancelledError:
            raise
        except Exception as e:
            reasons = getattr(e, "reasons", None)
            if reasons and isinstance(reasons[0].value, AddressRefused):
                return self._refused(item, reasons[0].value)
            return Outcome(error=_describe(e))
        code = int(response.code)
        if not 100 <= code <= 599:
            # Twisted takes any integer (RFC 9110 15: every valid code is 100 to 599); the
            # log's column would refuse one past 32 bits on PostgreSQL.
            return Outcome(error=f"the answer's status code {code} is not an HTTP status "
                                 "code (100 to 599)")
        if 200 <= code < 300:
            return Outcome(status_code=code)
        return Outcome(status_code=code, error=f"HTTP {code}" + (f": {text}" if text else ""))

    def _refused(self, item: Due, error: AddressRefused) -> Outcome:
        """The outcome of a connection the address policy refused. A name that does not
        resolve (or a resolver that failed) may resolve later: only the operator's refusal of
        the addresses is final. Which addresses a name resolves to is for the operator's log,
        never the user's delivery log (it would map internal names)."""
        if not error.reasons:
            return Outcome(error=str(error))
        log.info("webhook {webhook} delivery {id}: {error}: {reasons}", webhook=item.webhook_id,
                 id=item.id, error=str(error), reasons=error.reasons)
        return Outcome(error=error.public, refused=True)

    async def _bounded(self, d: Deferred[Any], deadline: float) -> Any:
        """`d`'s result, or AttemptTimedOut (and `d` cancelled) at `deadline` (clock time)."""
        result: Deferred[Any] = Deferred(lambda _: d.cancel())
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()
            if not result.called:
                result.errback(AttemptTimedOut())

        timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), expire)

        def forward(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                return
            if isinstance(outcome, Failure):
                result.errback(AttemptTimedOut() if timed_out else outcome)
            else:
                result.callback(outcome)

        d.addBoth(forward)
        return await result


def _describe(error: BaseException) -> str:
    """A one-line reason for a failed attempt."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        inner = reasons[0].value
        if isinstance(inner, AnswerTooLong):
            return str(inner)
        return f"{type(inner).__name__}: {inner}".strip()
    return f"{type(error).__name__}: {error}".strip()


class WebhookPruner(Sweeper[int]):
    """Deletes the finished deliveries older than `[webhooks] retention_days` (the delivery
    log's end) every PRUNE_INTERVAL seconds, PRUNE_BATCH rows a transaction. Idempotent,
    but the Core gives it the store's job leases: one node of those sharing a store prunes
    each period, so no two nodes' deletes wait on (or deadlock over) the same rows."""

    name = "webhook-pruner"
    failed = "pruning the webhook delivery log failed"

    def __init__(self, webhooks_service: Webhooks, clock: IReactorTime,
                 every: float = PRUNE_INTERVAL) -> None:
        super().__init__(clock, every)
        self.webhooks = webhooks_service

    def sweep(self) -> Awaitable[int]:
        return self.webhooks.prune()

    def swept(self, pruned: int) -> None:
        if pruned:
            log.info("pruned {n} finished webhook deliveries past their retention", n=pruned)

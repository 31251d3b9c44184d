"""Webhooks: a user's URLs told about syncs, new e-mails and updated threads, signed and retried.

One module per job: `model` (what a webhook and a delivery are), `settings` (the
`[webhooks]` table and where deliveries may go), `signing`, `payload` (event data shapes),
`store` (the SQL), `events` (a sync's pending events), `service` (the user-facing
operations), `client` (the guarded HTTP client) and `sender` (the background sender).

Events (seed 001 lists the first three: "email sync completion, new email arrival, thread
updates"; the last two are Dropmyemail's jobs):

- `sync.completed`: every finished sync of an IMAP account, success or error (a POP3
  account's syncs tell no event: the webhooks are the IMAP2API's, which shows only the IMAP
  accounts and their mail; `mailcore.webhooks.events`). `data`:
  `imap_server`, `status`, `error`, `new_messages`, `started_at`, `finished_at`. A sync
  whose process died is told once a scheduler shows it failed (`mailcore.fetch.scheduler`):
  `status` "error", `error` "the sync was interrupted: ...", `new_messages` what it stored,
  `finished_at` when it was found. A sync cancelled by a stop of the daemon is not told.
- `email.new`: a sync stored new e-mails. `data`: `imap_server` and `emails`, up to 100
  e-mails as the emails list shows them (a bigger sync sends several deliveries; a sync
  stopped or cut short mid-way tells those it stored).
- `thread.updated`: a sync added e-mails to threads. `data`: `imap_server` and `threads`,
  up to 100 of `{thread_id, thread_count, latest_email}`.
- `migrate.completed`, `restore.completed`: a Dropmyemail migrate or restore ended (done or
  failed; `mailcore.fetch.jobs`). `data`: `id`, `account_id`, `status`, `reason`,
  `downloaded`, `messages`, `appended`, `attempts`, `start_time`, `end_time`, and for a
  migrate `email`, `host`, `port`, for a restore `restore_size`. Queued in the transaction
  that records the job's end.

Every delivery is an HTTP POST of a JSON body `{"id", "event", "created_at", "data"}` with:

    Content-Type: application/json
    X-Mailcore-Event: email.new
    X-Mailcore-Delivery: <id, the same on every retry of this delivery>
    X-Mailcore-Timestamp: <Unix time of this attempt, seconds>
    X-Mailcore-Signature: sha256=<hex HMAC-SHA256 with the webhook's secret over
                          "<timestamp>.<raw body>">

A receiver recomputes the HMAC over the timestamp header, a dot and the raw body bytes,
compares it in constant time, and refuses a timestamp more than a few minutes old (the
signature covers the timestamp, so an old delivery cannot be replayed with a new one);
`verify_signature` does exactly that. Retries carry the same `X-Mailcore-Delivery` id, so a
receiver can drop duplicates. That header and `X-Mailcore-Event` are copies of the body's
`id` and `event`, which the signature covers; the headers themselves are not signed (the
signed text stays "<timestamp>.<raw body>", which receivers already check), so a receiver
drops duplicates by the body's `id`, or checks that the header equals it
(`verify_signature(..., delivery=header, event=header)` does): otherwise a copy of a
delivery replayed within the timestamp's tolerance under another `X-Mailcore-Delivery`
would pass as new.

Events are durable with what they describe: a sync records its email.new and thread.updated
in the transaction that stores each batch and its sync.completed in the one that records its
outcome (`events`; only for a user with an active webhook that wants them), and they are
turned into delivery rows once, when the sync ends, or by the sender's sweep (at its start
and every minute) for what a crash, a store error or a stop left: at least once, normally
exactly once, whatever the nodes. Deliveries are durable: the sync engine's listener only
writes delivery rows (it never waits for a receiver), and the background `WebhookSender`
posts them, at most `concurrency` at
once (and `per_webhook` to any one webhook, so a dead receiver cannot hold up the others,
and `per_user` to one user's webhooks, so one user's backlog cannot hold up other users),
each bounded by `timeout` and by what it reads (a connection that receives more than about
64 KiB, the answer's headers and the start of its body, is aborted: `client.MAX_ANSWER_BYTES`).
A non-2xx answer (a status code outside 100 to 599 is logged as none), a timeout, an
answer too long or a connection failure is retried with exponential backoff
(`backoff_base` * 2^(attempt-1), at most `backoff_max`) until `max_attempts`; 410 Gone
stops at once and disables the webhook. Each row keeps its status (pending, success,
failed, cancelled), attempts, last status code and last error (with the first 512 bytes of
a refusal's body, NUL in them written as U+FFFD): the delivery log.

Where deliveries may go, retries and limits: the `[webhooks]` table, documented in
`mailcore.webhooks.settings`.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime

from mailcore.fetch.secrets import SecretBox
from mailcore.netpolicy import AddressRefused
from mailcore.store import Database
from mailcore.webhooks.model import (
    EVENTS,
    Delivery,
    Webhook,
    WebhookError,
    WebhookNotFound,
)
from mailcore.webhooks.payload import email_json, iso, thread_ref
from mailcore.webhooks.sender import WebhookPruner, WebhookSender
from mailcore.webhooks.service import Webhooks
from mailcore.webhooks.settings import AddressPolicy, WebhookSettings
from mailcore.webhooks.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    verify_signature,
)


def build_webhooks(
    section: Mapping[str, Any], db: Database, clock: IReactorTime, secrets_box: SecretBox,
    *, http: Any = None,
) -> Webhooks:
    """The webhook service (with its sender at `.sender`) from the `[webhooks]` section."""
    service = Webhooks(db, clock, secrets_box, WebhookSettings.from_section(section))
    WebhookSender(service, clock, http)
    return service


__all__ = [
    "DELIVERY_HEADER",
    "EVENTS",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AddressPolicy",
    "AddressRefused",
    "Delivery",
    "Webhook",
    "WebhookError",
    "WebhookNotFound",
    "WebhookPruner",
    "WebhookSender",
    "WebhookSettings",
    "Webhooks",
    "build_webhooks",
    "email_json",
    "iso",
    "sign",
    "thread_ref",
    "verify_signature",
]

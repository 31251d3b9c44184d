"""Every table of Mailcore, declared once, in one package: a module per area.

Alembic migrations in `mailcore/store/migrations/versions/` build exactly this schema; a
test checks that an empty database migrated to head matches it. Add a table in the area's
module and a migration beside the others. Times are timezone-aware UTC. Secrets never appear
in clear: only digests or ciphertext.
"""

from mailcore.store.schema.billing import (
    billing_counters,
    invoice_lines,
    invoices,
    token_charges,
    token_tanks,
    token_usage,
)
from mailcore.store.schema.counters import change_counters
from mailcore.store.schema.domains import domain_addresses, domain_changes, domains
from mailcore.store.schema.fetch import fetch_accounts, fetch_folders
from mailcore.store.schema.identity import credentials, users
from mailcore.store.schema.jobs import mailbox_job_items, mailbox_jobs
from mailcore.store.schema.leases import job_leases
from mailcore.store.schema.mailapi import (
    mailapi_attachments,
    mailapi_gone,
    mailapi_mail,
    mailbox_grants,
    mailboxes,
)
from mailcore.store.schema.messages import (
    FTS_TABLES,
    message_attachments,
    message_blobs,
    message_pop_sizes,
    message_refs,
    messages,
    threads,
)
from mailcore.store.schema.meta import metadata
from mailcore.store.schema.mtasts import mta_sts_policies
from mailcore.store.schema.nodes import nodes
from mailcore.store.schema.oauth import oauth_apps, oauth_codes, oauth_tokens
from mailcore.store.schema.quarantine import quarantine, quarantine_digest_runs
from mailcore.store.schema.queue import queue_messages, queue_recipients
from mailcore.store.schema.rates import rate_buckets
from mailcore.store.schema.safedrop import drop_bundles, drop_files, drop_recipients
from mailcore.store.schema.sends import api_sends
from mailcore.store.schema.verdicts import recipient_verdicts
from mailcore.store.schema.webhooks import webhook_deliveries, webhook_events, webhooks

__all__ = [
    "FTS_TABLES",
    "api_sends",
    "billing_counters",
    "change_counters",
    "credentials",
    "domain_addresses",
    "domain_changes",
    "domains",
    "drop_bundles",
    "drop_files",
    "drop_recipients",
    "fetch_accounts",
    "fetch_folders",
    "invoice_lines",
    "invoices",
    "job_leases",
    "mailapi_attachments",
    "mailapi_gone",
    "mailapi_mail",
    "mailbox_grants",
    "mailbox_job_items",
    "mailbox_jobs",
    "mailboxes",
    "message_attachments",
    "message_blobs",
    "message_pop_sizes",
    "message_refs",
    "messages",
    "metadata",
    "mta_sts_policies",
    "nodes",
    "oauth_apps",
    "oauth_codes",
    "oauth_tokens",
    "quarantine",
    "quarantine_digest_runs",
    "queue_messages",
    "queue_recipients",
    "rate_buckets",
    "recipient_verdicts",
    "threads",
    "token_charges",
    "token_tanks",
    "token_usage",
    "users",
    "webhook_deliveries",
    "webhook_events",
    "webhooks",
]

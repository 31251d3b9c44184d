"""Simple IMAP2API (seed 001): a Django REST framework service, `Authorization: Token`.

Served at `/api-token-auth/` (also `/api/v1/api-token-auth/`) and under both `/api/` and
`/api/v1/` (API-MAP.md):

- `imap-servers/`: list (`q`: words in the name, host or username), create;
  `imap-servers/{id}/`: retrieve, update (PUT and PATCH are both partial, as the seed's PUT
  example is), delete; `imap-servers/{id}/sync/`: sync now.
- `emails/` (filters `q`, `folder`, `imap_server`, `date_from`, `date_to`, `thread`,
  `has_attachments`, `ordering`), `emails/{id}/` with `thread_emails`, `emails/{id}/thread/`,
  `emails/threads/`, `emails/folders/`, `emails/statistics/`.
  Only the mail of the user's IMAP accounts: a POP3 account (a Dropmyemail one) is no
  imap-server here, so its mail is left out of all of them (`MessageQuery.without_pop`)
  and its syncs tell the webhooks nothing.
- `webhooks/` and `webhooks/{id}/` (the seed's webhooks, given an API here), and
  `webhooks/{id}/deliveries/`, the delivery log. See mailcore.webhooks for the events and
  the signature.

Errors are DRF's: `{"detail": ...}` or `{"field": ["message"]}`. Lists are DRF pages
`{count, next, previous, results}` (`page`, `page_size` default 50, at most 100; a page
past the end is 404 "Invalid page.") with absolute `next`/`previous` URLs built from the
request's Host and scheme. Authenticated requests are limited per user (1000/h),
unauthenticated ones per client address (100/h); every reply of a limited request carries
the X-RateLimit-* headers. CORS: `[web] cors_origins` lists the origins browsers may call
from (none by default; "*" for any); preflight OPTIONS requests are answered without a
credential. Another user's objects are 404, and no password or secret is ever returned
(a webhook's secret is shown once, when it is made or rotated).

A sync waits for the sync to end up to `[web] imap2api_sync_wait` seconds (25 by default):
200 `{"status": "success", "message": "Email sync completed"}`; 502 with the reason when
the sync failed; 202 `{"status": "running", ...}` when it is still running, whose progress
then shows in the IMAP server object (`sync_status`, `sync_progress`).
"""

from __future__ import annotations

from web.imap2api.app import Imap2ApiApp

__all__ = ["Imap2ApiApp"]

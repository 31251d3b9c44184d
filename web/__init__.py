"""The HTTP side of Mailcore: five seed APIs on one listener (see root.py for the map).

One module per job: `root` (dispatch by path prefix, the Site), `api` (the base class of the
apps), one module or package per seed API (`imap2api`, `mailapi`, `protecmail`, `safedrop`,
`dropmyemail`) plus `meta` (/metrics, /openapi.json); shared helpers `errors` (each API's
error shape), `replies`, `parsing`, `auth` (the credential resolver), `login`, `ratelimit`,
`limits` (request size), `accesslog`, `metrics`, `openapi` (route registry and document),
`context` (per-request facts) and `settings` (the `[web]` configuration table).
"""

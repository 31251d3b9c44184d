"""Mailcore's core, free of HTTP: services, protocols, domain logic and the store.

Packages by job:

- `smtp/`: the SMTP envelope and queue ids, the inbound ESMTP server and the outbound client;
- `queue/`: the durable spool, leased per-recipient state, the pipeline of stages run before
  delivery, the delivery runner and its bounces;
- `gateway/`: what makes this an MX gateway for customer domains: served domains, next-hop
  policy, the filtering stage and the quarantine;
- `billing/`: plans, filtering tokens and invoices;
- `fetch/`: IMAP and POP3 clients and the sync engine (backup; migrate and restore);
- `messages/`: the stored mail (parsing, threads, search);
- `identity/`: users, passwords and credentials;
- `webhooks/`: signed HTTP notifications of syncs;
- `mailapi/`: the Mail API's hosted mailboxes, grants, mail and outbox;
- `safedrop/`: secure file drops;
- `oauth/`: the OAuth 2 provider of Dropmyemail's apps;
- `backup/`: Dropmyemail's view of the backups (accounts, mailboxes, attachments, contacts);
- `store/`: the database (tables, migrations, the thread-pool `Database`);
- `cli/`: the admin command line.

Beside them, the small infrastructure every package may use: `config`, `tls`, `periodic`,
`workers`, `netwrite`, `netpolicy`, `files`, `connlimits`, `logfilter`, `logwriter`,
`logrotation`, `maillog`, `text`, `startup`; `core` wires the services together once and
`service` assembles the daemon.
"""

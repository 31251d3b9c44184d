"""Change counters: one row per name, raised in the same transaction as the change it stands
for, so that every node (and the admin CLI, a process of its own) can tell a change happened
with one primary-key read. `mailcore.store.counters` reads and raises them."""

from sqlalchemy import BigInteger, Column, String, Table

from mailcore.store.schema.meta import metadata

# "domains": every change to `domains` or `domain_addresses` made through DomainService;
# each node polls it about twice a second and reloads its RCPT snapshot when it moved.
# "queue_flush": every `mailcore queue flush`; each node's queue sweep reads it and makes
# next hops it had marked unusable usable again.
change_counters = Table(
    "change_counters",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

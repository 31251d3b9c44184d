"""Every table of Mailcore, declared once, in one package: a module per area.

Alembic migrations in `mailcore/store/migrations/versions/` build exactly this schema; a
test checks that an empty database migrated to head matches it. Add a table in the area's
module and a migration beside the others. Times are timezone-aware UTC. Secrets never appear
in clear: only digests or ciphertext.
"""

from mailcore.store.schema.domains import domain_addresses, domains
from mailcore.store.schema.identity import credentials, users
from mailcore.store.schema.meta import metadata

__all__ = ["credentials", "domain_addresses", "domains", "metadata", "users"]

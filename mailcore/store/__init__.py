"""The store: the only package that knows SQL.

`schema` declares every table once, `migrations/` holds the Alembic history that builds
them, and `Database` runs blocking work on its own thread pool and hands back Deferreds.
"""

from mailcore.store.database import Database, StoreError

__all__ = ["Database", "StoreError"]

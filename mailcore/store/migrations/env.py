"""Alembic environment: always run with a connection handed in by mailcore.store.migrate."""

import warnings

from alembic import context
from sqlalchemy.exc import SAWarning

from mailcore.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through mailcore.store.migrate, with a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction(), warnings.catch_warnings():
    # A batch rebuild on SQLite reflects the tables its foreign keys name, and SQLAlchemy
    # cannot reflect the users' lower() indexes (0040): it warned on stderr at every
    # migration run, the CLI's `init` included. Harmless for tables that only refer to
    # users; a migration that rebuilds `users` itself must create ux_users_*_lower again.
    warnings.filterwarnings(
        "ignore", message="Skipped unsupported reflection of expression-based index",
        category=SAWarning)
    context.run_migrations()

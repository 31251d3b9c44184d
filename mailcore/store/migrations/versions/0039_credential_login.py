"""Credentials: mark the tokens password logins handed out (`credentials.login`).

A token made by `POST /api-token-auth/` or `POST /api/v1/auth/` stood for the password it
was made with, yet nothing told it from a token the operator made with `mailcore token
create`: a password change could not end the first kind without ending the second, and the
number a user holds could not be bounded. `login` is true for a credential made by a
password login.

Upgrade: the column, false by default; the existing tokens whose label is one the logins
give ("api-token-auth", "mailapi-auth") are marked as login tokens. Downgrade: the column
goes.

Revision ID: 0039_credential_login
Revises: 0038_quarantine_queue_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0039_credential_login"
down_revision = "0038_quarantine_queue_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "credentials", sa.Column("login", sa.Boolean(), nullable=False, server_default="0")
    )
    op.get_bind().execute(sa.text(
        "UPDATE credentials SET login = :yes WHERE kind = 'token'"
        " AND label IN ('api-token-auth', 'mailapi-auth')"
    ), {"yes": True})


def downgrade() -> None:
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("login")

"""A per-domain outbound TLS policy replaces the require_tls flag.

`domains.tls` is NULL (the `[queue] tls` default) or one of none, may, verify-if-offered,
verify. A domain that had require_tls gets "verify", which is what the flag meant. The
downgrade keeps "verify" as require_tls and forgets the weaker overrides.

Revision ID: 0008_domain_tls
Revises: 0007_quarantine
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_domain_tls"
down_revision = "0007_quarantine"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("domains", sa.Column("tls", sa.String(20), nullable=True))
    op.execute("UPDATE domains SET tls = 'verify' WHERE require_tls")
    op.drop_column("domains", "require_tls")


def downgrade() -> None:
    op.add_column(
        "domains",
        sa.Column("require_tls", sa.Boolean(), nullable=False, server_default="0"),
    )
    op.execute("UPDATE domains SET require_tls = (tls = 'verify') WHERE tls IS NOT NULL")
    op.drop_column("domains", "tls")

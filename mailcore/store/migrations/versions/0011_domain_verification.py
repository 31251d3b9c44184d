"""Proof of domain ownership: a token to publish in DNS, and when it was found.

`domains.verify_token` is NULL for a domain that never needed the proof (every domain added
before this revision, or while `[protecmail] verify_domains` is off, or by an operator with
`mailcore domain add --verified`); a domain with a token is served only once `verified_at`
is set, i.e. once `_mailcore-verify.<domain>` carries the TXT record
"mailcore-verify=<token>".

Revision ID: 0011_domain_verification
Revises: 0010_change_counters
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_domain_verification"
down_revision = "0010_change_counters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("domains", sa.Column("verify_token", sa.String(64), nullable=True))
    op.add_column(
        "domains", sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    # Domains still waiting for their proof would be served without it: drop them.
    op.execute("DELETE FROM domain_addresses WHERE domain_id IN (SELECT id FROM domains"
               " WHERE verify_token IS NOT NULL AND verified_at IS NULL)")
    op.execute("DELETE FROM domains WHERE verify_token IS NOT NULL AND verified_at IS NULL")
    with op.batch_alter_table("domains") as batch:
        batch.drop_column("verified_at")
        batch.drop_column("verify_token")

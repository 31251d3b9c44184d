"""Users: one username and one e-mail address in any case, enforced by the store.

A user's name and e-mail are compared in lower case (`identity.name_key`) and were unique
only as typed (`users.username`, `users.email`): the check that no other user has them in
another case ran in the code, so two user creations racing on PostgreSQL (READ COMMITTED)
could both pass it and store "Alice" and "alice". Unique indexes on lower(username) and
lower(email) make the second one fail.

Upgrade: refused, with a one-line message naming them, while two users already share a
username or an e-mail in lower case (which user keeps it is the operator's decision; no
user is renamed or dropped here). Downgrade: the indexes go.

Revision ID: 0040_users_lower_unique
Revises: 0039_credential_login
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0040_users_lower_unique"
down_revision = "0039_credential_login"
branch_labels = None
depends_on = None

_INDEXES = (("ux_users_username_lower", "username"), ("ux_users_email_lower", "email"))


def upgrade() -> None:
    conn = op.get_bind()
    clashes: list[str] = []
    for _, column in _INDEXES:
        keys = conn.execute(sa.text(
            f"SELECT lower({column}) FROM users GROUP BY lower({column})"
            " HAVING count(*) > 1 ORDER BY 1")).scalars().all()
        for key in keys:
            rows = conn.execute(sa.text(
                f"SELECT id, {column} FROM users WHERE lower({column}) = :key"
                " ORDER BY id"), {"key": key}).all()
            clashes.append(f"{column} " + " = ".join(f"{v!r} (user {i})" for i, v in rows))
    if clashes:
        raise RuntimeError(
            "0040: users share a username or email in another case, which logins cannot tell"
            f" apart; change all but one of each, then migrate again: {'; '.join(clashes)}")
    for name, column in _INDEXES:
        op.create_index(name, "users", [sa.text(f"lower({column})")], unique=True)


def downgrade() -> None:
    for name, _ in _INDEXES:
        op.drop_index(name, table_name="users")

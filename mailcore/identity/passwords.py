"""Password hashing with Argon2id (memory-hard). Both functions block: run them on a CpuPool."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# RFC 9106's second recommended option (64 MiB, 3 passes), which fits a 2-core gateway.
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=2)
MAX_PASSWORD_LENGTH = 1024


@functools.cache
def _dummy_hash() -> str:
    """A hash verified when the user does not exist, so that a login for an unknown name
    costs the same time as one for a known name. Made on first use (on the CpuPool), not
    at import: it costs ~0.2 s and 64 MiB, which every CLI call would otherwise pay."""
    return _hasher.hash("mailcore-dummy-password-for-timing")


def hash_password(password: str) -> str:
    """The Argon2id hash string for `password`. Blocks for tens of milliseconds."""
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Whether `password` matches `stored`; None (no password set) never matches. Blocks."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return _hasher.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    try:
        return _hasher.check_needs_rehash(stored)
    except InvalidHashError:
        return True

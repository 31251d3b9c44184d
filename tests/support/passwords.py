"""Argon2id at its cheapest in the test process, for the tests that are not about hashing.

mailcore.identity.passwords hashes with RFC 9106's second option (64 MiB, 3 passes): some
0.2 s of CPU for each hash and each verify, and a test makes a user or logs in more often
than not (the web, Dropmyemail, Safedrop and identity tests). `tests/__init__.py` puts
`TEST_HASHER` in its place for every test process, a test that checks the hashing itself
takes the real one back with `production_hashing(self)`.

The hashes stay Argon2id strings, verified and checked for a rehash by the same code. One
made with the production parameters (by the CLI or a daemon the test started) is as
current as one of ours: a login in the test process does not rehash it, and a hash made
here that a daemon verifies is simply upgraded there, as any older hash is.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from twisted.trial.unittest import TestCase

from mailcore.identity import passwords

PRODUCTION_HASHER = passwords._hasher


class _TestHasher(PasswordHasher):
    """The cheapest Argon2id (1 pass over 8 KiB) that takes a production hash as current."""

    def check_needs_rehash(self, hash: str | bytes) -> bool:
        return super().check_needs_rehash(hash) and PRODUCTION_HASHER.check_needs_rehash(hash)


TEST_HASHER = _TestHasher(time_cost=1, memory_cost=8, parallelism=1)


def install() -> None:
    """Hash and verify with `TEST_HASHER` in this process from now on."""
    passwords._hasher = TEST_HASHER
    passwords._dummy_hash.cache_clear()


def production_hashing(test: TestCase) -> None:
    """For `test` only: hash and verify with the production parameters (its dummy hash
    for unknown names made with them too)."""
    test.patch(passwords, "_hasher", PRODUCTION_HASHER)
    passwords._dummy_hash.cache_clear()
    test.addCleanup(passwords._dummy_hash.cache_clear)

"""Mailcore's tests, run by trial.

Importing the package makes Argon2id cheap in the test process (tests.support.passwords):
most tests make users and log them in, and the production parameters cost each hash and
each verify some 0.2 s of CPU. A test of the hashing itself takes the real parameters back.
"""

from tests.support import passwords as _passwords

_passwords.install()

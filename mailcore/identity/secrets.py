"""Credential secrets: generation, the stored digest and the lookup prefix.

A secret is 160 random bits as 40 hex characters (the shape DRF tokens and safedrop keys
have). Only SHA-256 of it is stored; its first PREFIX_LEN characters are stored in clear to
find candidate rows, and the digest is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _secrets

SECRET_BYTES = 20
PREFIX_LEN = 8


def new_secret() -> str:
    return _secrets.token_hex(SECRET_BYTES)


def digest(secret: str) -> bytes:
    """The stored SHA-256 of a high-entropy secret (keys, tokens, links). Any text has one:
    a lone surrogate matches nothing, rather than failing to encode."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def prefix_of(secret: str) -> str:
    return secret[:PREFIX_LEN]


_HEX = re.compile(f"[0-9a-f]{{{2 * SECRET_BYTES}}}")


def well_formed(secret: str) -> bool:
    """Cheap shape check before touching the store: 40 lower-case hex characters."""
    return _HEX.fullmatch(secret) is not None


def matches(stored_digest: bytes, secret: str) -> bool:
    return hmac.compare_digest(stored_digest, digest(secret))

"""Identity: users, passwords (Argon2id) and credentials of every kind, for every API."""

from mailcore.identity.service import (
    KINDS,
    PLANS,
    PROFILE_FIELDS,
    CredentialInfo,
    Identity,
    IdentityError,
    Principal,
    User,
)

__all__ = [
    "KINDS",
    "PLANS",
    "PROFILE_FIELDS",
    "CredentialInfo",
    "Identity",
    "IdentityError",
    "Principal",
    "User",
]

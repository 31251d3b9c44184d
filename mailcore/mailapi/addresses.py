"""Addresses as the Mail API takes them: one address, or a comma-separated list.

An address is `local@domain` with a dot-atom local part and a fully qualified domain, or
`Name <local@domain>`. CR, LF and every other control character are refused, so that no
value can add a header field to a message built from it (header injection).
"""

from __future__ import annotations

from email.headerregistry import AddressHeader, HeaderRegistry
from functools import lru_cache

from mailcore.gateway.domains import DomainError, normalise_domain, normalise_local_part
from mailcore.mailapi.errors import INVALID, MailApiError
from mailcore.text import has_control

_REGISTRY = HeaderRegistry()


def normalise_address(address: str, field: str = "address") -> str:
    """`local@domain` in its stored form (lower case, A-label domain), or MailApiError."""
    text = address.strip()
    if has_control(text):
        raise MailApiError(INVALID, f"{field}: {address!r} is not an email address.", field)
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise MailApiError(INVALID, f"{field}: {address!r} is not an email address.", field)
    try:
        return f"{normalise_local_part(local)}@{normalise_domain(domain)}"
    except DomainError as e:
        raise MailApiError(INVALID, f"{field}: {e.message}", field) from None


@lru_cache(maxsize=4096)
def mailbox_key(address: str) -> str | None:
    """The stored form of a recipient address, as `mailboxes.address` keeps it
    (normalise_address), or None when no mailbox can have it. Cached: it is asked for every
    recipient the queue routes."""
    try:
        return normalise_address(address)
    except MailApiError:
        return None


def parse_address_list(text: str, field: str) -> list[str]:
    """The addresses of a comma-separated list (display names dropped), in order; an empty
    or blank text is no addresses. Any malformed entry refuses the whole field. Cached:
    parsing costs about a millisecond an address, and a mail's fields are parsed before
    its write transaction so that the transaction finds them parsed (mailcore.mailapi.mail)."""
    found = _parsed(text, field)
    if isinstance(found, MailApiError):
        raise MailApiError(found.kind, found.message, found.field)
    return list(found)


def display_name(text: str) -> str:
    """The display name of the first address of `text`, a list parse_address_list took
    (its encoded words decoded); "" when it has none."""
    header = _REGISTRY("To", text)
    assert isinstance(header, AddressHeader)
    return str(header.addresses[0].display_name) if header.addresses else ""


@lru_cache(maxsize=1024)
def _parsed(text: str, field: str) -> tuple[str, ...] | MailApiError:
    try:
        return tuple(_parse(text, field))
    except MailApiError as e:
        return e


def _parse(text: str, field: str) -> list[str]:
    if has_control(text):
        raise MailApiError(INVALID, f"{field}: control characters are not allowed.", field)
    if not text.strip():
        return []
    try:
        header = _REGISTRY("To", text)
    except Exception:  # the stdlib parser raises on some inputs ("a@")
        raise MailApiError(INVALID, f"{field}: {text!r} is not a list of email addresses.",
                           field) from None
    if header.defects or not isinstance(header, AddressHeader):
        raise MailApiError(INVALID, f"{field}: {text!r} is not a list of email addresses.",
                           field)
    found: list[str] = []
    for address in header.addresses:
        if not address.username or not address.domain:
            raise MailApiError(INVALID, f"{field}: {text!r} is not a list of email addresses.",
                               field)
        found.append(normalise_address(f"{address.username}@{address.domain}", field))
    return found

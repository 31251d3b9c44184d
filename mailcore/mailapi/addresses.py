"""Addresses as the Mail API takes them: one address, or a comma-separated list.

An address is `local@domain` with a dot-atom local part and a fully qualified domain, or
`Name <local@domain>`, and a list may hold groups (`Team: a@x.test, b@x.test;`). CR, LF
and every other control character are refused, as written or in an encoded word of a name,
so that no value can add a header field to a message built from it (header injection).
So is a local part spelling an RFC 2047 encoded word (`=?utf-8?q?=0d=0a?=@x.test`, a valid
dot-atom; or one written as an encoded word that decodes to such a spelling): the `email`
package decodes it in a To or From field, refusing the field (a line break) or showing
the text it encodes instead of the address (`emailpolicy.header_as_written`).
The message sent keeps the names and groups (`header_text`); its envelope, the bare
addresses (`parse_address_list`).
"""

from __future__ import annotations

from email.errors import MessageDefect, ObsoleteHeaderDefect
from email.headerregistry import Address, AddressHeader, Group, HeaderRegistry
from functools import lru_cache

from mailcore.emailpolicy import header_as_written
from mailcore.gateway.domains import DomainError, normalise_domain, normalise_local_part
from mailcore.mailapi.errors import INVALID, MailApiError
from mailcore.text import has_control

_REGISTRY = HeaderRegistry()

# A parsed list: its groups in order, each its name (None: an address outside any group)
# and its addresses, each its display name (encoded words decoded) and stored form.
_Parsed = tuple[tuple[str | None, tuple[tuple[str, str], ...]], ...]


def normalise_address(address: str, field: str = "address") -> str:
    """`local@domain` in its stored form (lower case, A-label domain), or MailApiError."""
    stored = stored_form(address, field)
    if "=?" in stored and not header_as_written("To", stored):
        # The address could not be written in a message's To or From as it is spelt.
        raise MailApiError(INVALID, f"{field}: {address!r} is not an email address (its "
                           "local part spells an RFC 2047 encoded word).", field)
    return stored


def stored_form(address: str, field: str = "address") -> str:
    """`local@domain` as `mailboxes.address` would store it, or MailApiError: what
    normalise_address takes, and a local part spelling an RFC 2047 word besides. For finding
    a mailbox (one added before such words were refused is still found), never for taking
    a new address."""
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
    recipient the queue routes. A mailbox added before normalise_address refused a local
    part spelling an RFC 2047 word still receives its mail."""
    try:
        return stored_form(address, "address")
    except MailApiError:
        return None


def parse_address_list(text: str, field: str) -> list[str]:
    """The addresses of a comma-separated list (display names dropped), in order; an empty
    or blank text is no addresses. Any malformed entry refuses the whole field. Cached:
    parsing costs about a millisecond an address, and a mail's fields are parsed before
    its write transaction so that the transaction finds them parsed (mailcore.mailapi.mail)."""
    return [address for _, members in _groups(text, field) for _, address in members]


def display_name(text: str) -> str:
    """The display name of the first address of `text`, a list parse_address_list took
    (its encoded words decoded); "" when it has none."""
    named = [name for _, members in _groups(text, "from") for name, _ in members]
    return named[0] if named else ""


def header_text(text: str, field: str) -> str:
    """`text`, a list parse_address_list took, as the To, Cc or Reply-To field of a message
    carries it: each address in its stored form with the display name the client gave it
    (encoded words decoded), in the groups it was written in ("Team: a@…, b@…;", an empty
    one too); comments dropped; "" for no addresses. Written by email.headerregistry
    (Address, Group), which quotes a name where it needs it; the policy the message is
    built with RFC 2047-encodes what is not ASCII as it folds the field. No part holds a
    control character (`_parse` refused them, encoded or not)."""
    return ", ".join(str(Group(group, [Address(name, *address.rsplit("@", 1))
                                       for name, address in members]))
                     for group, members in _groups(text, field))


def _groups(text: str, field: str) -> _Parsed:
    found = _parsed(text, field)
    if isinstance(found, MailApiError):
        raise MailApiError(found.kind, found.message, found.field)
    return found


# RFC 5322 4.1's obsolete phrase with a period ("Dr. Bob <bob@x.test>", "J. Smith"): what
# mail clients still write and readers all take; the name is quoted when the header is
# written from it. Every other defect refuses the address list.
_PERIOD_IN_PHRASE = "period in 'phrase'"


def _refused(defect: MessageDefect) -> bool:
    return not (isinstance(defect, ObsoleteHeaderDefect) and str(defect) == _PERIOD_IN_PHRASE)


@lru_cache(maxsize=1024)
def _parsed(text: str, field: str) -> _Parsed | MailApiError:
    try:
        return _parse(text, field)
    except MailApiError as e:
        return e


def _parse(text: str, field: str) -> _Parsed:
    if has_control(text):
        raise MailApiError(INVALID, f"{field}: control characters are not allowed.", field)
    if not text.strip():
        return ()
    try:
        # Raises on some inputs ("a@"), and on an encoded word decoding to CR or LF.
        header = _REGISTRY("To", text)
    except Exception:
        raise MailApiError(INVALID, f"{field}: {text!r} is not a list of email addresses.",
                           field) from None
    # A defect: among them an encoded word decoding to a control character
    # (NonPrintableDefect); the names are checked again below, as the message's header
    # fields are written from them (header_addresses).
    if any(map(_refused, header.defects)) or not isinstance(header, AddressHeader):
        raise MailApiError(INVALID, f"{field}: {text!r} is not a list of email addresses.",
                           field)
    found: list[tuple[str | None, tuple[tuple[str, str], ...]]] = []
    for group in header.groups:
        if has_control(group.display_name or ""):
            raise MailApiError(INVALID, f"{field}: control characters are not allowed.",
                               field)
        members: list[tuple[str, str]] = []
        for address in group.addresses:
            if has_control(address.display_name):
                raise MailApiError(INVALID, f"{field}: control characters are not allowed.",
                                   field)
            if not address.username or not address.domain:
                raise MailApiError(INVALID,
                                   f"{field}: {text!r} is not a list of email addresses.",
                                   field)
            members.append((str(address.display_name),
                            normalise_address(f"{address.username}@{address.domain}", field)))
        found.append((group.display_name, tuple(members)))
    return tuple(found)

"""RFC 5321 paths in MAIL and RCPT: parsing them, and refusing the old relay tricks.

`parse_mail_from` and `parse_rcpt_to` take the argument of the command (`FROM:<a@b> SIZE=9`)
and return the mailbox and the ESMTP parameters, or raise PathError carrying the reply.
`relay_refusal` says why a syntactically valid recipient must still be refused: source
routes (`<@a,@b:user@c>`), `%`-hacks (`user%c@b`), bang paths (`c!user@b`), quoted local
parts and address literals (`user@[192.0.2.1]`) all let a next hop route the mail onwards,
which would make us an open relay through our own customers' servers.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, angle brackets included
MAX_LOCAL_PART = 64  # 4.5.3.1.1
MAX_DOMAIN = 255  # 4.5.3.1.2

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_AT_DOMAIN = rf"@(?:{_DOMAIN}|{_LITERAL})"
_PATH = re.compile(
    rf"<(?:(?P<route>{_AT_DOMAIN}(?:,{_AT_DOMAIN})*):)?"
    rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})>"
)
_POSTMASTER = re.compile(r"<postmaster>", re.IGNORECASE)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


class PathError(Exception):
    """A MAIL or RCPT argument was refused; the reply to send is in code/status/text."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Mailbox:
    """A mailbox as written by the client: quotes and literal brackets kept.

    `source_route` holds an RFC 821 A-d-l (`@a,@b`) when one was given; `domain` is empty
    only for the special recipient `<postmaster>`.
    """

    local_part: str
    domain: str
    source_route: str = ""

    @property
    def quoted(self) -> bool:
        return self.local_part.startswith('"')

    @property
    def domain_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part


Params = dict[str, str | None]


def _split_path(rest: str) -> tuple[str, str]:
    """Split `<path> params` (or a bare `a@b params`) at the end of the path."""
    if not rest.startswith("<"):
        # Not RFC 5321, but common; Postfix accepts it too. No spaces possible then.
        path, space, params = rest.partition(" ")
        return f"<{path}>", space + params
    in_quote = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if in_quote:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            return rest[: i + 1], rest[i + 1:]
        i += 1
    raise PathError(501, "5.5.4", "Syntax error: missing '>' after the address")


def _parse_params(text: str) -> Params:
    """ESMTP parameters `KEY[=VALUE]`, separated by spaces; keys come back upper-case."""
    if text and not text.startswith(" "):
        raise PathError(501, "5.5.4", "Syntax error after the address")
    params: Params = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise PathError(501, "5.5.4", f"Syntax error in parameter {item[:40]!r}")
        upper = key.upper()
        if upper in params:
            raise PathError(501, "5.5.4", f"Parameter {upper} given twice")
        params[upper] = value if eq else None
    return params


def _check_literal(literal: str, status: str) -> None:
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise PathError(501, status, "Bad IPv6 address literal") from None
    elif ":" not in inner:
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise PathError(501, status, "Bad IPv4 address literal") from None


def _parse(arg: str, keyword: str, status: str, what: str) -> tuple[Mailbox | None, Params]:
    """The common part of MAIL and RCPT: `keyword:<path> params`."""
    if arg[: len(keyword)].upper() != keyword:
        raise PathError(501, "5.5.4", f"Syntax: {what} {keyword}<address>")
    path, param_text = _split_path(arg[len(keyword):].lstrip(" "))
    if not path.isascii() or not param_text.isascii():
        raise PathError(553, "5.6.7", "Non-ASCII addresses need SMTPUTF8, which is not offered")
    if len(path) > MAX_PATH:
        raise PathError(501, status, "Path too long")
    params = _parse_params(param_text)
    if path == "<>":
        return None, params
    match = _PATH.fullmatch(path)
    if match is None:
        if _POSTMASTER.fullmatch(path):
            return Mailbox("postmaster", ""), params
        raise PathError(501, status, "Bad address syntax")
    local, domain = match.group("local"), match.group("domain")
    if len(local) > MAX_LOCAL_PART:
        raise PathError(501, status, "Local part too long")
    if len(domain) > MAX_DOMAIN:
        raise PathError(501, status, "Domain too long")
    if domain.startswith("["):
        _check_literal(domain, status)
    return Mailbox(local, domain, match.group("route") or ""), params


def parse_mail_from(arg: str) -> tuple[Mailbox | None, Params]:
    """The reverse-path and parameters of `MAIL FROM:<...>`; None is the null sender `<>`.

    A source route is dropped, as RFC 5321 3.6.1 asks (its mailbox is what counts).
    """
    mailbox, params = _parse(arg, "FROM:", "5.1.7", "MAIL")
    if mailbox is not None and not mailbox.domain:
        raise PathError(501, "5.1.7", "Bad sender address syntax")
    if mailbox is not None and mailbox.source_route:
        mailbox = Mailbox(mailbox.local_part, mailbox.domain)
    return mailbox, params


def parse_rcpt_to(arg: str) -> tuple[Mailbox, Params]:
    """The forward-path and parameters of `RCPT TO:<...>`; `<>` is refused."""
    mailbox, params = _parse(arg, "TO:", "5.1.3", "RCPT")
    if mailbox is None:
        raise PathError(501, "5.1.3", "Bad recipient address syntax")
    return mailbox, params


def relay_refusal(mailbox: Mailbox) -> str | None:
    """Why this recipient must be refused whatever its domain, or None when it may pass."""
    if mailbox.source_route:
        return "Source routes are not accepted"
    if mailbox.domain_literal:
        return "Address literals are not accepted as recipient domains"
    if mailbox.quoted:
        return "Quoted local parts are not accepted"
    if "%" in mailbox.local_part:
        return "The %-hack is not accepted"
    if "!" in mailbox.local_part:
        return "Bang paths are not accepted"
    return None

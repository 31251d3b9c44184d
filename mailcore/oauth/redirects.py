"""Redirect URIs in their one normal form, which is how they are stored and compared.

A registered URI and the one an authorization or token request names are both brought to
this form, so `https://Bücher.example/cb` registered is `https://xn--bcher-kva.example/cb`
everywhere: in the database, in the comparison, in the Location a browser is sent to and in
the consent page's CSP (whose `form-action` names the URI's origin, so the host must be a
host and nothing else).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote, urlsplit, urlunsplit

from mailcore.gateway.domains import DomainError, normalise_host_name
from mailcore.text import has_control

MAX_LENGTH = 2000


def normal_redirect_uri(uri: str) -> str:
    """`uri` in normal form: scheme lower case; the host a DNS name in IDNA A-labels, lower
    case (UTS 46), or an IP address literal; the port, if any, a number; non-ASCII in the
    path and query percent-encoded (UTF-8). Raises ValueError (saying why) for anything not
    an absolute http(s) URI, a fragment, userinfo, or a host holding anything else (`;`,
    `,`, quotes, spaces: they would end up in a header)."""
    if not isinstance(uri, str) or has_control(uri) or any(c.isspace() for c in uri) \
            or len(uri) > MAX_LENGTH:
        raise ValueError(f"redirect URI {uri!r} is not a URI")
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise ValueError(f"redirect URI {uri!r} is not a URI") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"redirect URI {uri!r} must be an absolute http:// or https:// URI")
    if parts.fragment or "#" in uri:
        raise ValueError(f"redirect URI {uri!r} may not have a fragment")
    if "@" in parts.netloc:
        raise ValueError(f"redirect URI {uri!r} may not have a user name or password")
    return urlunsplit((scheme, _authority(uri, parts.netloc), _ascii(parts.path),
                       _ascii(parts.query), ""))


def is_loopback_redirect(normal: str) -> bool:
    """Whether a redirect URI in normal form names a loopback host: `localhost`, an address
    of 127.0.0.0/8, or `[::1]`."""
    host = urlsplit(normal).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redirect_origin(uri: str) -> str:
    """scheme://host[:port] of a redirect URI, from its normal form (ValueError as
    `normal_redirect_uri`)."""
    parts = urlsplit(normal_redirect_uri(uri))
    return f"{parts.scheme}://{parts.netloc}"


def _authority(uri: str, netloc: str) -> str:
    """host[:port] of `netloc` in normal form."""
    bad_host = ValueError(f"redirect URI {uri!r}: the host must be a host name or an IP "
                          "address, optionally with a port")
    if netloc.startswith("["):
        literal, bracket, port_text = netloc[1:].partition("]")
        try:
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            raise bad_host from None
        if not bracket or "%" in literal:  # no zone id: it means nothing to another host
            raise bad_host
    else:
        name, colon, port_text = netloc.partition(":")
        port_text = colon + port_text
        try:
            host = str(ipaddress.IPv4Address(name))
        except ValueError:
            try:
                host = normalise_host_name(name)
            except DomainError:
                raise bad_host from None
    if not port_text:
        return host
    digits = port_text[1:]
    if not port_text.startswith(":") or not digits.isascii() or not digits.isdigit() \
            or not 0 < int(digits) < 65536:
        raise bad_host
    return f"{host}:{int(digits)}"


def _ascii(text: str) -> str:
    """`text` with its non-ASCII characters percent-encoded (UTF-8), the rest as it is."""
    return "".join(c if c.isascii() else quote(c, safe="") for c in text)

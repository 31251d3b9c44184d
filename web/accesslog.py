"""The access log: one line per reply, without credentials or secret URLs.

Twisted's own access log writes the full URI (a Dropmyemail `access_token`, a Mail API
`auth_key` or a quarantine release token would land in the log), so the site turns it off
and this one is used instead. What must never be logged is one rule, `SECRETS`: the query
parameters whose values are hidden and the path patterns whose `{secret}` segment is
hidden. A route that puts a secret in its URL (OAuth `code`/`state`, drop links) adds its
parameter or path here, and every log line that shows a request target goes through
`SECRETS.target` or `SECRETS.path`. No request header is ever logged (`Authorization`,
`Api-Key`, `X-Auth-Key`, `X-Auth-Token` carry credentials).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import parse_qsl, quote, unquote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mailcore.logwriter import emit_text
from web.context import RequestContext

REDACTED = "[redacted]"
# The scheme and "//" of an absolute-form request target (RFC 3986 §3.1).
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A path separator as the log sees one: a slash, or a percent-encoded one.
_SEPARATOR = re.compile(r"(/|%2[Ff])")
HIDDEN_SEGMENT = "{secret}"
ANY_SEGMENT = "*"


@dataclass(frozen=True)
class RedactionRule:
    """Which parts of a request target the logs replace by `REDACTED`.

    `params`: query parameter names whose values are hidden, and `suffixes`: name endings
    whose values are hidden too (`key` hides `api_key`, `x-api-key`, `apikey`). Both are
    written in lower case letters and digits: a query's name is compared in lower case with
    everything else left out, so `Pass_Word`, `api-key`, ` password` or `password%00`
    (names an API refuses or ignores, whose value is still a credential a client sent)
    are hidden as `password` and `api_key` are.
    `paths`: path patterns, one segment per `/`: a literal segment (compared without case,
    after percent-decoding), `*` (any one segment, shown) or `{secret}` (any one segment,
    hidden). A pattern matches the start of a path; empty segments (`//`) are skipped, as
    the dispatcher skips them, so no spelling of a secret URL escapes the rule.
    """

    params: frozenset[str]
    paths: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()

    def hides(self, name: str) -> bool:
        """Whether the value of the query parameter `name` is hidden."""
        plain = _plain_name(name)
        return bool(plain) and (plain in self.params or plain.endswith(self.suffixes))

    @cached_property
    def _patterns(self) -> tuple[tuple[str, ...], ...]:
        return tuple(_pattern_segments(p) for p in self.paths)

    def path(self, path: bytes) -> str:
        """The path for a log line, its secret segments hidden. An absolute-form target
        (`http://host/drop/…`, RFC 9112 §3.2.2) is matched from its path, after the scheme
        and authority (shown, a user name and password in it hidden); an authority-form
        (`host:port`) or asterisk-form (`*`) one has no path to hide."""
        text = path.decode("utf-8", "backslashreplace")
        scheme = _ABSOLUTE.match(text)
        if scheme is not None:
            rest = text[scheme.end():]
            end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0),
                      default=len(rest))
            return scheme.group() + _authority(rest[:end]) + self._path(rest[end:])
        if not text.startswith("/") and "/" not in text:
            return _authority(text)
        return self._path(text)

    @cached_property
    def _first_segments(self) -> tuple[str, ...] | None:
        """The first segment of every pattern that has one, when each is a literal (None
        when one is `*` or `{secret}`): a pattern matches only a path that holds it."""
        firsts = tuple(p[0] for p in self._patterns if p)
        if any(s in (HIDDEN_SEGMENT, ANY_SEGMENT) for s in firsts):
            return None
        return firsts

    def _path(self, text: str) -> str:
        # Most paths (every API's) hold no pattern's first segment: they are shown as they
        # are. Only an ASCII path without `%` is judged so (its segments are compared
        # as they are spelt, lower-cased letter by letter), without splitting it.
        firsts = self._first_segments
        if firsts is not None and text.isascii() and "%" not in text:
            lowered = text.lower()
            if not any(first in lowered for first in firsts):
                return text
        # An encoded slash separates segments too: the router decodes `%2F` before it
        # matches, so `/drop%2FTOKEN` reaches the drop page.
        pieces = _SEPARATOR.split(text)
        raw, separators = pieces[0::2], pieces[1::2]
        shown = list(raw)
        present = [i for i, segment in enumerate(raw) if segment]
        for pattern in self._patterns:
            if len(present) < len(pattern):
                continue
            at = present[: len(pattern)]
            if all(_segment_matches(want, raw[i]) for want, i in zip(pattern, at, strict=True)):
                for want, i in zip(pattern, at, strict=True):
                    if want == HIDDEN_SEGMENT:
                        shown[i] = REDACTED
        return "".join(s + sep for s, sep in zip(shown, [*separators, ""], strict=True))

    def target(self, uri: bytes) -> str:
        """The request target for a log line: the path and the query, secrets hidden."""
        path, sep, query = uri.partition(b"?")
        shown = self.path(path)
        if not sep:
            return shown
        pairs = parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True)
        parts = [
            f"{quote(k)}={REDACTED if self.hides(k) else quote(v)}"
            for k, v in pairs
        ]
        return shown + "?" + "&".join(parts)


def _authority(text: str) -> str:
    """An authority for a log line: its userinfo (`user:password@`), if any, hidden."""
    _, at, host = text.rpartition("@")
    return f"{REDACTED}@{host}" if at else text


def _pattern_segments(pattern: str) -> tuple[str, ...]:
    return tuple(s.lower() if s not in (HIDDEN_SEGMENT, ANY_SEGMENT) else s
                 for s in pattern.split("/") if s)


def _segment_matches(want: str, segment: str) -> bool:
    return want in (HIDDEN_SEGMENT, ANY_SEGMENT) or unquote(segment).lower() == want


# What a query parameter's name is compared by: its letters and digits, lower case.
_NOT_NAME = re.compile(r"[^0-9a-z]")


def _plain_name(name: str) -> str:
    return _NOT_NAME.sub("", name.lower())


def _names(*groups: Iterable[str]) -> frozenset[str]:
    return frozenset(_plain_name(name) for group in groups for name in group)


SECRETS = RedactionRule(
    params=_names(
        # credentials in the query that the suffixes below do not already name (those
        # cover access_token, auth_key, api_key, client_secret, password, ...)
        ("credential", "credentials", "session", "sessionid"),
        # OAuth 2 authorization responses (RFC 6749 §4.1.2)
        ("code", "state"),
    ),
    # Any name ending so (`key`, `x-api-key`, `id_token`, `new_password`, `db_pwd`)
    suffixes=("key", "token", "secret", "password", "passwd", "pwd", "pass", "passphrase"),
    paths=(
        "/quarantine/release/{secret}",  # digest links (web/quarantine_page.py)
        "/drop/{secret}",  # safedrop recipients' links and downloads (web/drop_page.py)
    ),
)


def redacted_target(uri: bytes) -> str:
    """The request target for the log: the path and the query with secrets hidden."""
    return SECRETS.target(uri)


def redacted_path(path: bytes) -> str:
    """A request path for the log with secret segments hidden."""
    return SECRETS.path(path)


ACCESS_FORMAT = ("{client} {user} {method} {target} {status} {bytes} {duration:.3f}s "
                 "api={api} id={request_id}{aborted}")


class AccessLog:
    """Writes one structured event per finished request."""

    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger or Logger(namespace="mailcore.web.access")

    def record(
        self, request: IRequest, ctx: RequestContext, status: int, seconds: float,
        *, aborted: bool = False,
    ) -> None:
        address = request.getClientAddress()
        fields = {
            "client": getattr(address, "host", "-"),
            "user": ctx.user or "-",
            "method": request.method.decode("latin-1", "replace"),
            "target": redacted_target(request.uri),
            "status": status,
            "bytes": getattr(request, "sentLength", 0),
            "duration": seconds,
            "api": ctx.api,
            "request_id": ctx.request_id,
            "aborted": " (client went away)" if aborted else "",
        }
        # The line is formatted here once with str.format (the format has no
        # twisted.logger-only syntax): the text log writers take it as it is instead of
        # running it through twisted.logger's formatter; structured observers still get
        # every field. It names its request's id, so it is never the same line twice: the
        # repeated-line limiter lets it pass untracked.
        emit_text(self.log, ACCESS_FORMAT, ACCESS_FORMAT.format(**fields), fields,
                  unique=True)

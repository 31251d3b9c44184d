"""The access log: one line per reply, without credentials or secret query parameters.

Twisted's own access log writes the full URI (a Dropmyemail `access_token` or a Mail API
`auth_key` would land in the log), so the site turns it off and this one is used instead.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from web.context import RequestContext

# Query parameters whose values are never logged.
SECRET_PARAMS = frozenset(
    {
        "access_token", "refresh_token", "auth_key", "auth_token", "api_key", "apikey",
        "key", "token", "password", "code", "client_secret", "secret",
    }
)
REDACTED = "[redacted]"


def redacted_target(uri: bytes) -> str:
    """The request target for the log: the path, and the query with secret values hidden."""
    path, sep, query = uri.partition(b"?")
    shown = path.decode("utf-8", "backslashreplace")
    if not sep:
        return shown
    pairs = parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True)
    parts = [
        f"{quote(k)}={REDACTED if k.lower() in SECRET_PARAMS else quote(v)}" for k, v in pairs
    ]
    return shown + "?" + "&".join(parts)


class AccessLog:
    """Writes one structured event per finished request."""

    def __init__(self, logger: Logger | None = None) -> None:
        self.log = logger or Logger(namespace="mailcore.web.access")

    def record(
        self, request: IRequest, ctx: RequestContext, status: int, seconds: float,
        *, aborted: bool = False,
    ) -> None:
        address = request.getClientAddress()
        self.log.info(
            "{client} {user} {method} {target} {status} {bytes} {duration:.3f}s "
            "api={api} id={request_id}{aborted}",
            client=getattr(address, "host", "-"),
            user=ctx.user or "-",
            method=request.method.decode("latin-1", "replace"),
            target=redacted_target(request.uri),
            status=status,
            bytes=getattr(request, "sentLength", 0),
            duration=seconds,
            api=ctx.api,
            request_id=ctx.request_id,
            aborted=" (client went away)" if aborted else "",
        )

"""What the web layer knows about one request while it is served.

The root resource creates the context when a request arrives; the credential resolver adds
the principal; the access log, the metrics and Protecmail's envelope read it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.web.iweb import IRequest

from mailcore.identity import Principal

_ATTRIBUTE = "_mailcore_context"
# Request ids must be unique, not secret: drawn from a generator seeded by the OS (each
# process its own), which costs a fraction of `uuid.uuid4()`'s system call and object.
_ids = random.Random()
_VERSION_4 = (0x4 << 76) | (0x2 << 62)
_KEEP = ~((0xF << 76) | (0x3 << 62))


def new_request_id() -> str:
    """A random (version 4, RFC 9562) UUID in its text form."""
    n = (_ids.getrandbits(128) & _KEEP) | _VERSION_4
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class RequestContext:
    """Per-request facts: which API serves it, its id, when it began, who it acts as."""

    api: str = "none"
    request_id: str = field(default_factory=new_request_id)
    started: float = 0.0
    principal: Principal | None = None
    # What a 401 of the app serving it says in WWW-Authenticate (ApiApp.challenge).
    challenge: str | None = None
    # Who the access log names: the principal's user, or the user a password login found.
    user: str | None = None
    # The secrets (policy name, secret) the request presented that resolved to no one:
    # looked up once, though the upload gate and the API both ask (web.auth).
    refused: set[tuple[str, str]] = field(default_factory=set)
    # Fires when the reply deadline passes (web.deadline); None when none is armed.
    overdue: defer.Deferred[None] | None = None

    def authenticated(self, principal: Principal) -> None:
        self.principal = principal
        self.user = principal.user.username


def context_of(request: IRequest) -> RequestContext:
    """The request's context, created on first use."""
    ctx = getattr(request, _ATTRIBUTE, None)
    if ctx is None:
        ctx = RequestContext()
        setattr(request, _ATTRIBUTE, ctx)
    return ctx

"""What the web layer knows about one request while it is served.

The root resource creates the context when a request arrives; the credential resolver adds
the principal; the access log, the metrics and Protecmail's envelope read it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from twisted.web.iweb import IRequest

from mailcore.identity import Principal

_ATTRIBUTE = "_mailcore_context"


@dataclass
class RequestContext:
    """Per-request facts: which API serves it, its id, when it began, who it acts as."""

    api: str = "none"
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = 0.0
    principal: Principal | None = None
    # Who the access log names: the principal's user, or the user a password login found.
    user: str | None = None

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

"""The service's own endpoints: `GET /metrics` (Prometheus) and `GET /openapi.json`.

/metrics has no credential: it answers clients on loopback only unless `[web] metrics_allow`
names other networks (`[]`: every client; `metrics = false` turns it off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.web.iweb import IRequest

from web.api import ApiApp
from web.errors import ApiError, PlainErrors
from web.metrics import exposition
from web.openapi import Reply, RouteTable
from web.replies import encode_json, encoded_json_reply
from web.settings import WebSettings


class MetaApp(ApiApp):
    name = "meta"
    title = "The gateway itself: metrics and this document"
    shape = PlainErrors()
    app = Klein()
    routes = RouteTable(app, "meta")
    cache_control = None  # nobody's data: the metrics (loopback) and the document

    def __init__(
        self,
        settings: WebSettings,
        *,
        registry: CollectorRegistry,
        openapi: Callable[[], dict[str, Any]],
    ) -> None:
        super().__init__(settings)
        self.registry = registry
        self.openapi = openapi
        # The document, encoded, once asked for: the routes it is made of are fixed when the
        # apps are built, and making it (about 470 KB) kept the reactor 20-50 ms a request.
        self._document: bytes | None = None

    @routes.route(
        "/metrics",
        "GET",
        summary="Prometheus metrics",
        replies={200: Reply("Prometheus text exposition format", {"type": "string"},
                            content_type="text/plain")},
        errors=(403,),
    )
    def metrics(self, request: IRequest) -> bytes:
        """Counters and histograms of the whole process, HTTP requests by API included."""
        host = getattr(request.getClientAddress(), "host", None)
        if not self.settings.metrics_allowed(host):
            raise ApiError(403, "Metrics are not served to this client.")
        body, content_type = exposition(self.registry)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return body

    @routes.route(
        "/openapi.json",
        "GET",
        summary="This OpenAPI 3.1 document",
        replies={200: Reply("The OpenAPI document", {"type": "object"})},
    )
    def openapi_document(self, request: IRequest) -> bytes:
        """Every route served, generated from the routes the apps declare (once, the first
        time it is asked for)."""
        if self._document is None:
            self._document = encode_json(self.openapi())
        return encoded_json_reply(request, self._document)
